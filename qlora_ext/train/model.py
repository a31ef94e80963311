"""The model side of a run, in one call each: the tokenizer, the 4-bit base model (`load_quantized_model`),
the base plus LoRA adapters ready to train (`load_for_training`), the optimizer and the learning-rate schedule
(transformers' schedulers). A model that cannot be loaded is a one-line SetupError naming what to fix."""
from __future__ import annotations

import contextlib
import pathlib
from typing import Optional

import torch

from ..errors import MissingDependencyError, SetupError
from ..model import release_checkpoint_mapping  # noqa: F401  (re-exported: bench scripts use it from here)
from .setup import LoraSettings, ModelSpec, QuantSettings, resolve_dtype


def api(name: str):
    """A name from qlora_ext's layers API, or a clear error while it is not part of this build."""
    import qlora_ext
    obj = getattr(qlora_ext, name, None)
    if obj is None:
        raise SetupError(f"qlora_ext.{name} is not available in this build: the 4-bit LoRA layers "
                         f"(qlora_ext.QLoRAConfig, quantize_model, add_lora, ...) are required")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_dependency(exc: ImportError, spec: ModelSpec) -> MissingDependencyError:
    """transformers' ImportErrors name the package to install; GGUF needs gguf (and accelerate in some paths)."""
    msg = _first_line(exc)
    name = getattr(exc, "name", None)
    if name:
        pkg = {"gguf": "gguf", "accelerate": "accelerate"}.get(name.split(".")[0], name.split(".")[0])
        return MissingDependencyError(f"loading {spec.label} needs the {pkg} package: pip install {pkg}")
    hint = "pip install gguf accelerate" if spec.gguf_file else "pip install 'qlora_ext[train]'"
    return MissingDependencyError(f"loading {spec.label}: {msg} ({hint})")


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec.path, **spec.hf_kwargs())
    except ImportError as exc:
        raise _missing_dependency(exc, spec) from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise SetupError(f"{spec.label}: cannot load a tokenizer ({_first_line(exc)})") from None
    return tok


def load_quantized_model(spec: ModelSpec, quant: QuantSettings, device: torch.device,
                         quant_storage: torch.dtype = torch.uint8, progress: bool = False):
    """The base model with every linear layer but the LM head in 4-bit, on `device`, in eval mode; the packed
    bytes are viewed as `quant_storage` (a float dtype for FSDP2). `progress`: transformers' bar while the
    weights load (tensor by tensor)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    dtype = resolve_dtype(quant.compute_dtype, device)
    config = api("QLoRAConfig")(quant_type=quant.quant_type, blocksize=quant.blocksize,
                                double_quant=quant.double_quant, compute_dtype=dtype, quant_storage=quant_storage)
    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    with _load_errors(spec):
        if spec.gguf_file:
            # GGUF tensors are dequantized to float by transformers, then quantized to NF4 layer by layer.
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **spec.hf_kwargs())
            model = api("quantize_model")(model.to(device), config)
        else:
            # load_quantized copies what is left of the memory-mapped checkpoint (release_checkpoint_mapping)
            # 16-bit embeddings: the float tensors load in 16-bit (never in float32); norms go to float32 later
            load_dtype = dtype if quant.embedding_dtype == "float32" else getattr(torch, quant.embedding_dtype)
            model = api("load_quantized")(spec.path, config, dtype=load_dtype, **spec.hf_kwargs())
            model = _view_packed_as(model.to(device), quant_storage)
    set_portable_name(model, spec)
    model.eval()
    return model


def _view_packed_as(model, storage: torch.dtype):
    """The packed 4-bit weights viewed as `storage`: an already-quantized checkpoint keeps the storage dtype it
    was written with (bitsandbytes: uint8), and FSDP2 needs the float dtype of the other parameters (the bytes
    are the same)."""
    from ..nn import Linear4bit
    for m in model.modules():
        if isinstance(m, Linear4bit) and m.weight.dtype != storage:
            raw = m.weight.data.reshape(-1).view(torch.uint8)
            if raw.numel() % storage.itemsize:
                raise SetupError(f"{raw.numel()} packed bytes of a {list(m.quant_state.shape)} weight cannot be "
                                 f"viewed as {storage}")
            m.weight = torch.nn.Parameter(raw.view(storage).reshape(-1, 1), requires_grad=False)
    return model


def check_adapter(directory) -> pathlib.Path:
    """A PEFT adapter directory validated before any base model is loaded: its adapter_config.json and the
    header of adapter_model.safetensors (a truncated file is caught here). Raises SetupError."""
    from .. import _io
    from ..adapters import _read_adapter_config
    path = pathlib.Path(directory)
    if not (path / "adapter_config.json").is_file():
        raise SetupError(f"--adapter {directory}: no adapter_config.json there (not a PEFT adapter or a run's "
                         f"output directory)")
    try:
        _read_adapter_config(path)
        _io.check_safetensors(path / "adapter_model.safetensors")
    except (ValueError, OSError) as exc:
        raise SetupError(f"--adapter {directory}: {_first_line(exc)}") from None
    return path


def load_adapter(model, directory):
    try:
        return api("load_adapter")(model, str(directory))
    except (ValueError, TypeError, OSError) as exc:
        raise SetupError(f"--adapter {directory}: {_first_line(exc)}") from None


def load_for_training(spec: ModelSpec, quant: QuantSettings, lora: LoraSettings, device: torch.device,
                      gradient_checkpointing: bool = True, resume_adapter: Optional[pathlib.Path] = None,
                      quant_storage: torch.dtype = torch.uint8, progress: bool = False):
    """Model preparation in one call: 4-bit frozen base, checkpointing-ready, plus the LoRA adapter (fresh, or
    the one saved in `resume_adapter`, which then carries the same LoRA settings)."""
    model = load_quantized_model(spec, quant, device, quant_storage, progress)
    return _ready_for_training(model, quant, lora, gradient_checkpointing, resume_adapter)


def _ready_for_training(model, quant: QuantSettings, lora: LoraSettings, gradient_checkpointing: bool,
                        resume_adapter: Optional[pathlib.Path]):
    """What a run does to its 4-bit base before training: prepare_model_for_training, then the LoRA adapter."""
    model = api("prepare_model_for_training")(model, gradient_checkpointing=gradient_checkpointing,
                                              embedding_dtype=getattr(torch, quant.embedding_dtype),
                                              cpu_block_cache=None)  # the run sets it (loop.py)
    if resume_adapter is not None:
        return api("load_adapter")(model, str(resume_adapter), adapter_name="default",
                                   lora_dtype=getattr(torch, lora.dtype))
    try:
        return api("add_lora")(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                               lora_dtype=getattr(torch, lora.dtype))
    except ValueError as exc:
        raise SetupError(f"--target-modules {lora.target_modules}: {_first_line(exc)}") from None


def loads_into_shards(spec: ModelSpec) -> bool:
    """Whether `--distributed fsdp` can load `spec` straight into shards (qlora_ext.distributed.load_sharded):
    a float safetensors checkpoint directory. Not a GGUF file (transformers dequantizes it whole first) and not
    an already-quantized checkpoint: load_sharded makes each rank's shard by quantizing float rows, and such a
    checkpoint has none (its codes and scales are stored per whole weight, to be sliced, not quantized), so
    both keep the usual path: the whole 4-bit model on every rank, then sharded by distributed.wrap."""
    if spec.gguf_file:
        return False
    from .. import _io
    try:
        config = _io.read_json(pathlib.Path(spec.path) / "config.json")
    except (OSError, ValueError):
        return False  # the usual path reports what is wrong with it
    return isinstance(config, dict) and config.get("quantization_config") is None


def load_sharded_for_training(spec: ModelSpec, quant: QuantSettings, lora: LoraSettings, ctx,
                              gradient_checkpointing: bool = True, resume_adapter: Optional[pathlib.Path] = None,
                              progress: bool = False):
    """load_for_training for FSDP2 on a float checkpoint, without the whole model on any rank: the model is
    built on the meta device, readied and given its adapter there (the adapter itself is real, initialised from
    the same RNG draws as load_for_training's), sharded, and then each rank quantizes only its own shard of
    each weight (qlora_ext.distributed.load_sharded). Returns the FSDP2-wrapped Runner."""
    from .. import distributed
    config = api("QLoRAConfig")(quant_type=quant.quant_type, blocksize=quant.blocksize,
                                double_quant=quant.double_quant, quant_storage=torch.float32,
                                compute_dtype=resolve_dtype(quant.compute_dtype, ctx.device))
    with _load_errors(spec):
        runner = distributed.load_sharded(
            spec.path, config, ctx, dtype=torch.float32,
            prepare=lambda m: _ready_for_training(m, quant, lora, gradient_checkpointing, resume_adapter),
            progress=progress)
    set_portable_name(distributed.inner(runner), spec)
    return runner


@contextlib.contextmanager
def _load_errors(spec: ModelSpec):
    """Loading errors as one SetupError line naming --model (a SetupError raised inside already says what to
    fix and passes through)."""
    try:
        yield
    except SetupError:
        raise
    except ImportError as exc:
        raise _missing_dependency(exc, spec) from None
    except (OSError, ValueError, TypeError, KeyError, EOFError) as exc:
        raise SetupError(f"--model {spec.label}: cannot be loaded ({_first_line(exc)})") from None
    except Exception as exc:  # safetensors' SafetensorError (truncated / corrupt weights) is no ValueError
        if type(exc).__name__ != "SafetensorError":
            raise
        raise SetupError(f"--model {spec.label}: corrupt weights ({_first_line(exc)})") from None


def set_portable_name(model, spec: ModelSpec):
    """The base model's name as adapters record it (PEFT's base_model_name_or_path comes from
    config._name_or_path): the portable name (a Hub id or a model name), not the local path it was loaded from
    (the run records that separately, in run_config.json's resolved_model)."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg._name_or_path = spec.portable_name
    if hasattr(model, "name_or_path"):
        try:
            model.name_or_path = spec.portable_name
        except AttributeError:
            pass


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """The optimizer in one call; the paper's is paged AdamW with 32-bit state."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        from .. import optim
    except ImportError:
        optim = None
    cls_name = {"paged_adamw_32bit": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit",
                "adamw_8bit": "AdamW8bit"}[name]
    cls = getattr(optim, cls_name, None)
    if cls is None:
        raise SetupError(f"--optim {name}: qlora_ext.optim.{cls_name} is not available in this build "
                         f"(use --optim adamw_torch)")
    return cls(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    """transformers' schedule `name` after a linear warmup of `warmup_steps` optimizer steps: constant
    (constant_with_warmup), linear or cosine decay to 0 at `total_steps`."""
    from transformers import get_scheduler
    hf_name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[name]
    return get_scheduler(hf_name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
