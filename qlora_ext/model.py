"""Model-level QLoRA: quantize a model's linear layers in place, load float or bitsandbytes-format checkpoints
straight into 4-bit layers, save in the bitsandbytes layout, prepare for training, merge LoRA adapters into
the 4-bit weights, export a merged float checkpoint, and account for memory.

Works on any nn.Module for quantize_model / merge_lora / memory_report; the checkpoint functions expect a
transformers PreTrainedModel (transformers is imported only when they are called).
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from . import _io
from .config import QLoRAConfig
from .functional import dequantize_4bit, quantize_4bit
from .nn import Linear4bit, LoraLinear4bit, is_conv1d

__all__ = ["quantize_model", "load_quantized", "save_quantized", "prepare_model_for_training", "merge_lora",
           "export_merged", "memory_report", "release_checkpoint_mapping"]

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def _skipped(name: str, patterns) -> bool:
    """transformers' rule for modules left unquantized: a pattern matches as a regex from the start of the
    module path up to a module boundary ('layer.1' matches 'layer.1.attn', not 'layer.11.attn'), or as a
    suffix of the path ('lm_head' matches 'model.lm_head')."""
    for p in patterns:
        if name.endswith(p):
            return True
        try:
            if re.match(rf"(?:{p}){_BOUNDARY}", name):
                return True
        except re.error:
            if name == p or name.startswith(p + "."):
                return True
    return False


def _shared_param_ids(model: nn.Module) -> set:
    counts: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {i for i, c in counts.items() if c > 1}


def _default_skips(model: nn.Module) -> List[str]:
    """Without explicit skip_modules: transformers' choice for the model (output embeddings, tied weights and
    the last module), as bitsandbytes uses; nothing for a plain nn.Module. transformers names the last module by
    its last parameter minus '.weight', so a last bias ('classifier.bias') is mapped to its module here."""
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    modules = dict(model.named_modules())
    return sorted({k.removesuffix(".bias") if k not in modules and k.removesuffix(".bias") in modules else k
                   for k in get_keys_to_not_convert(model)})


def _task_heads(model: nn.Module) -> List[str]:
    """Anchored patterns for the modules of a transformers model that lie outside its base model (the task
    heads: classifier, score, qa_outputs, lm_head, ...). They are newly initialised or task specific, so they
    stay float and trainable (PEFT's modules_to_save), as transformers + bitsandbytes keep the output head."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return []
    return ["^" + re.escape(n) for n, _ in model.named_children() if n != prefix]


def _float_modules(model: nn.Module, config: QLoRAConfig) -> List[str]:
    """Every pattern quantize_model and from_pretrained leave in float: the config's skip_modules (transformers'
    default when None), the model's _keep_in_fp32_modules, its output embeddings and its task heads."""
    skip = list(config.skip_modules) if config.skip_modules is not None else _default_skips(model)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = getattr(model, "get_output_embeddings", None)
    out = out() if callable(out) else None
    skip += ["^" + re.escape(n) + "$" for n, m in model.named_modules() if n and out is not None and m is out]
    return skip + _task_heads(model)


def _quantizable(m: nn.Module) -> bool:
    """The layers bitsandbytes (and so qlora_ext) quantizes: exactly nn.Linear (not subclasses, which may do more
    than x @ W^T + b), and transformers' Conv1D."""
    return type(m) is nn.Linear or is_conv1d(m)


def _stored_4bit_modules(model: nn.Module, checkpoint_files) -> set:
    """Module paths of `model` whose weight a (pre-quantized) checkpoint stores in 4 bits, read from the
    safetensors headers (validated against the files first); a checkpoint saved from the base model (keys
    without the task model's `base_model_prefix.`) or from a task model (with it) is matched either way."""
    keys = set()
    for f in checkpoint_files or ():
        if str(f).endswith(".safetensors"):
            keys |= {k[:-len(".weight.absmax")] for k in _io.check_safetensors(f) if k.endswith(".weight.absmax")}
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    out = set()
    for n, _ in model.named_modules():
        if n and (n in keys or (n.startswith(prefix) and n[len(prefix):] in keys) or prefix + n in keys):
            out.add(n)
    return out


def _replace_linears(model: nn.Module, config: QLoRAConfig, skip, quantize: bool, stored=()) -> List[str]:
    """Swaps every plain nn.Linear and transformers Conv1D (as bitsandbytes does; its weight transposed, see
    Linear4bit.source_transposed) that is not skipped, not tied to another module and not inside a 4-bit layer
    for a Linear4bit, in place; the module paths in `stored` (a checkpoint's 4-bit layers) are swapped whatever
    the skip lists say, so a checkpoint is read as it was written. quantize=True quantizes the float weight
    (freeing it as soon as its layer is swapped); quantize=False builds empty layers (on the meta device, for a
    loader to fill)."""
    shared = _shared_param_ids(model)
    inside_4bit = tuple(n + "." for n, m in model.named_modules() if isinstance(m, Linear4bit))
    names = [n for n, m in model.named_modules()
             if _quantizable(m) and n and not n.startswith(inside_4bit) and (n in stored or not _skipped(n, skip))
             and id(m.weight) not in shared]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = parent._modules[child]
        if quantize:
            new = Linear4bit.from_linear(old, config.quant_type, config.blocksize, config.double_quant,
                                         config.quant_storage, config.compute_dtype)
        else:
            in_f, out_f = old.weight.shape if is_conv1d(old) else (old.in_features, old.out_features)
            new = Linear4bit(in_f, out_f, old.bias is not None, config.compute_dtype, config.quant_storage,
                             device="meta", dtype=old.weight.dtype)
            new.source_transposed = is_conv1d(old)
        new.requires_grad_(False)
        new.train(old.training)  # a LoRA dropout added later must follow the model's train / eval mode
        parent._modules[child] = new
        del old  # the float weight is freed here, one layer at a time
    return names


def quantize_model(model: nn.Module, config: Optional[QLoRAConfig] = None) -> nn.Module:
    """Replaces every nn.Linear (and transformers Conv1D) except those _float_modules keeps (skip_modules, output
    embeddings, task heads such as a classifier) by a Linear4bit, in place, layer by layer (each float weight is
    released as soon as its layer is quantized). Returns the model."""
    config = QLoRAConfig() if config is None else config
    if not isinstance(config, QLoRAConfig):
        raise TypeError(f"config must be a QLoRAConfig, got {type(config).__name__}")
    with torch.no_grad():
        _replace_linears(model, config, _float_modules(model, config), quantize=True)
    if hasattr(model, "config"):
        model.config.quantization_config = config  # save_pretrained then records the format
    return model


def _checkpoint_files(path: Path) -> List[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _io.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and "\\" not in v
                                                       for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
        return sorted({path / v for v in weight_map.values()})
    return sorted(path.glob("*.safetensors"))


def load_quantized(path, config: Optional[QLoRAConfig] = None, **from_pretrained_kwargs) -> nn.Module:
    """Loads a checkpoint directory into a model with 4-bit layers, never holding the whole float model.

    - a float checkpoint is quantized tensor by tensor while loading, with `config`;
    - a checkpoint already quantized by transformers + bitsandbytes (`quant_method: "bitsandbytes"`, NF4 or
      FP4, with or without double quant) or saved by save_quantized is read as it is; its format comes from
      the checkpoint and `config` contributes only compute_dtype.
    Checkpoints are untrusted: safetensors only (never pickle), every file's header is checked against its
    size, and every quant_state is validated before use; a bad file raises ValueError naming the key.
    Extra keyword arguments go to `from_pretrained` (e.g. dtype, model_class=AutoModelForSequenceClassification).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    config = QLoRAConfig() if config is None else config
    path = Path(path)
    model_class = from_pretrained_kwargs.pop("model_class", AutoModelForCausalLM)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (load_quantized reads local checkpoint directories)")
    _io.read_json(path / "config.json")  # malformed JSON -> an error naming the file
    files = _checkpoint_files(path)
    if not files:
        raise ValueError(f"{path}: no .safetensors weights (other formats are not read: they may hold pickle)")
    for f in files:
        _io.check_safetensors(f)
    hf_config = AutoConfig.from_pretrained(path)
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None:
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        if qc.get("quant_method") == "bitsandbytes":
            if qc.get("load_in_8bit") or not qc.get("load_in_4bit"):
                raise ValueError(f"{path}: quantization_config is bitsandbytes but not 4-bit (LLM.int8 is not "
                                 f"supported)")
            stored = QLoRAConfig.from_bnb_dict(qc)
        elif qc.get("quant_method") == QLoRAConfig().quant_method:
            stored = QLoRAConfig.from_dict(qc)
        else:
            raise ValueError(f"{path}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
                             f"'bitsandbytes' or 'qlora_ext'")
        if config.compute_dtype is not None:
            stored.compute_dtype = config.compute_dtype
        hf_config.quantization_config = stored.to_dict()  # dispatches to our quantizer, pre-quantized
        from_pretrained_kwargs.pop("quantization_config", None)
        kw = dict(config=hf_config)
    else:
        kw = dict(config=hf_config, quantization_config=config)
    kw.update(use_safetensors=True)
    kw.update(from_pretrained_kwargs)
    return model_class.from_pretrained(path, **kw)  # the quantizer releases the checkpoint's mapping


def _mapped_ranges(files) -> Optional[List[tuple]]:
    """Address ranges of this process's memory mappings of `files` (every .safetensors file when None), from
    /proc/self/maps; None where that is missing."""
    names = None if files is None else {str(Path(f).resolve()) for f in files}
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                if (path in names) if names is not None else path.endswith(".safetensors"):
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return None
    return ranges


@torch.no_grad()
def release_checkpoint_mapping(model: nn.Module, files=None) -> int:
    """Gives the model its own copy of every tensor that is still a view of a memory-mapped checkpoint file.

    transformers' loader hands out views of the safetensors mapping for tensors that need no conversion
    (float tensors already in the target dtype, the packed bytes and scales of a 4-bit checkpoint), and such
    a view keeps the whole mapping, with every page read while loading, resident and attributed to the process.
    Copying the views, one at a time, lets the mapping go. Exactly the tensors inside a mapping of `files`
    (default: any .safetensors file) are copied, found through /proc/self/maps; where /proc is missing, every
    CPU tensor is. The transformers quantizer calls this after loading, so from_pretrained(...,
    quantization_config=QLoRAConfig()) and load_quantized need nothing more. Returns the bytes copied."""
    ranges = _mapped_ranges(files)
    if ranges is not None and not ranges:
        return 0

    def mapped(t) -> bool:
        if t is None or t.device.type != "cpu" or t.is_meta:
            return False
        if ranges is None:
            return True
        ptr = t.untyped_storage().data_ptr()
        return any(lo <= ptr < hi for lo, hi in ranges)

    copied = 0
    for m in model.modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if mapped(t):
                    t.data = t.data.clone()
                    copied += t.numel() * t.element_size()
        qs = getattr(m, "quant_state", None) if isinstance(m, Linear4bit) else None
        if qs is not None:
            for k in ("absmax", "offset", "nested_absmax", "code", "nested_code"):
                t = getattr(qs, k, None)
                if mapped(t):
                    setattr(qs, k, t.clone())
                    copied += t.numel() * t.element_size()
    return copied


def _four_bit_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def _lora_prefixes(model: nn.Module):
    return tuple(n + ".lora_" for n, m in model.named_modules() if isinstance(m, LoraLinear4bit))


def _untie(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drops the tied copies transformers re-ties on load; anything else sharing memory is cloned, since
    safetensors stores each tensor once."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in sd and source in sd and sd[target].data_ptr() == sd[source].data_ptr():
            del sd[target]
    seen = set()
    for k, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            sd[k] = t.clone()
        seen.add(key)
    return {k: t.detach().contiguous() for k, t in sd.items()}


def _write_model_dir(model, directory, sd, config_dict_fn) -> None:
    from safetensors.torch import save_file
    writers = {"model.safetensors": lambda p: save_file(sd, str(p), metadata={"format": "pt"})}
    if getattr(model, "generation_config", None) is not None:
        gen = model.generation_config.to_json_string()
        writers["generation_config.json"] = lambda p: p.write_text(gen)
    if hasattr(model, "config"):
        cfg = config_dict_fn()
        writers["config.json"] = lambda p: p.write_text(cfg)  # last: it is what makes the directory loadable
    _io.atomic_write(directory, writers)


def save_quantized(model: nn.Module, directory) -> None:
    """Writes the 4-bit model (base weights only, no adapters) in the transformers + bitsandbytes layout: a
    `model.safetensors` with the bitsandbytes keys and a config.json whose quantization_config says
    `quant_method: "bitsandbytes"`, so transformers + bitsandbytes and load_quantized both read it. Atomic:
    files are written under temporary names and then renamed."""
    layers = _four_bit_layers(model)
    if not layers:
        raise ValueError("the model has no 4-bit layers (quantize it first)")
    formats = {(m.quant_state.quant_type, m.quant_state.nested, m.weight.dtype) for _, m in layers}
    if len(formats) != 1:
        raise ValueError(f"one bitsandbytes config cannot describe layers of different formats "
                         f"{sorted(map(str, formats))}")
    (quant_type, nested, storage), first = formats.pop(), layers[0][1]
    qconfig = QLoRAConfig(quant_type=quant_type, double_quant=nested, quant_storage=storage)
    compute = first.compute_dtype or first.quant_state.dtype
    lora = _lora_prefixes(model)
    sd = {k: v for k, v in model.state_dict().items() if not (lora and k.startswith(lora))}
    # bitsandbytes converts every nn.Linear and Conv1D not listed here: name the ones we kept in float explicitly
    inside = tuple(n + "." for n, _ in layers)
    float_linears = [n for n, m in model.named_modules() if _quantizable(m) and not n.startswith(inside)]

    def config_json():
        cfg = copy.deepcopy(model.config)
        cfg.quantization_config = qconfig.to_bnb_dict(compute, float_linears)
        return cfg.to_json_string(use_diff=True)

    _write_model_dir(model, directory, _untie(model, sd), config_json)


def export_merged(model: nn.Module, directory, dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes a plain float checkpoint (no quantization_config) that plain transformers loads: every 4-bit
    weight dequantized, plus scaling * B @ A of its active adapter (computed in float32), in `dtype`; the
    other float parameters cast to `dtype`. The model itself is not modified. Atomic, like save_quantized."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    sd = {}
    lora = _lora_prefixes(model)
    layers = {n + ".weight": m for n, m in _four_bit_layers(model)}
    quant_entries = tuple(k + "." for k in layers)  # absmax, quant_map, ... of each 4-bit weight
    converted = {}  # one converted copy per storage, so tied weights stay tied (and are saved once)
    for k, v in model.state_dict().items():
        if (lora and k.startswith(lora)) or (quant_entries and k.startswith(quant_entries)):
            continue
        if k in layers:
            m = layers[k]
            w = m.dequantized_weight(torch.float32)
            if isinstance(m, LoraLinear4bit) and m.active_adapter is not None:
                w += m.delta_weight().to(w.device)
            sd[k] = (w.t() if m.source_transposed else w).to(dtype).contiguous()  # Conv1D: [in, out]
            del w
        else:
            key = (v.data_ptr(), v.dtype, tuple(v.shape))
            if key not in converted:
                converted[key] = v.to(dtype) if v.is_floating_point() else v
            sd[k] = converted[key]

    def config_json():
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = dtype
        return cfg.to_json_string(use_diff=True)

    _write_model_dir(model, directory, _untie(model, sd), config_json)


def merge_lora(model: nn.Module) -> dict:
    """Merges each LoraLinear4bit's active adapter into its 4-bit weight (dequantize, add scaling * B @ A in
    float32, requantize in the layer's own format) and replaces the layer by a plain Linear4bit (all its
    adapters are dropped). Returns the error this causes, since a 4-bit grid cannot hold W + dW exactly:

    {"layers": {name: {"rel_error", "max_abs_error", "delta_rel_norm"}}, "max_rel_error", "mean_rel_error"}
    where rel_error = ||Q(W + dW) - (W + dW)||_F / ||W + dW||_F and delta_rel_norm = ||dW||_F / ||W||_F.
    """
    report = {"layers": {}}
    with torch.no_grad():
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)]:
            qs = m.quant_state
            if m.active_adapter is None:
                new = m.to_linear4bit()
            else:
                w = m.dequantized_weight(torch.float32)
                delta = m.delta_weight().to(w.device)
                target = w + delta
                packed, state = quantize_4bit(target.to(qs.dtype), qs.blocksize, qs.quant_type, qs.nested,
                                              m.weight.dtype)
                err = dequantize_4bit(packed, state).float() - target
                tnorm = target.norm().clamp_min(torch.finfo(torch.float32).tiny)
                report["layers"][name] = {"rel_error": float(err.norm() / tnorm),
                                          "max_abs_error": float(err.abs().max()),
                                          "delta_rel_norm": float(delta.norm() / w.norm().clamp_min(1e-30))}
                new = Linear4bit.from_quantized(packed, state, m.bias, m.compute_dtype).train(m.training)
                new.source_transposed = m.source_transposed
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child] = new
    errs = [v["rel_error"] for v in report["layers"].values()]
    report["max_rel_error"] = max(errs) if errs else 0.0
    report["mean_rel_error"] = sum(errs) / len(errs) if errs else 0.0
    return report


_warned_omp = False

def _warn_spinning_openmp(model: nn.Module) -> None:
    """One warning per process when a CPU model will train under libgomp's spinning default wait policy
    (torch imported before qlora_ext with OMP_WAIT_POLICY unset): see qlora_ext/__init__.py."""
    global _warned_omp
    from . import OMP_POLICY_SET_LATE
    p = next(model.parameters(), None)
    if _warned_omp or not OMP_POLICY_SET_LATE or p is None or p.device.type != "cpu":
        return
    _warned_omp = True
    warnings.warn("OpenMP threads spin while waiting (torch was imported before qlora_ext with OMP_WAIT_POLICY "
                  "unset): a CPU training step can run several times slower when other processes use the cores; "
                  "set OMP_WAIT_POLICY=PASSIVE in the environment, or import qlora_ext before torch",
                  RuntimeWarning, stacklevel=3)


def _cast_input_to_weight(module, args):
    x = args[0]
    return (x.to(module.weight.dtype),) + tuple(args[1:]) if x.dtype != module.weight.dtype else None


def prepare_model_for_training(model: nn.Module, gradient_checkpointing: bool = True,
                               embedding_dtype: torch.dtype = torch.float32,
                               cpu_block_cache: Optional[int] = _io.CPU_BLOCK_CACHE_BYTES) -> nn.Module:
    """Readies a 4-bit model for LoRA training, in place: freezes every base parameter (active LoRA adapters
    stay trainable); puts every float parameter that is not a packed 4-bit weight in float32 (norms, whose
    statistics need it, and with them embeddings and float heads, which then receive float32 activations,
    as PEFT's prepare_model_for_kbit_training does; packed weights and their scales are left as they are);
    makes the input embeddings' output require grad (so checkpointed blocks see a graph although the
    embedding is frozen); turns on non-reentrant gradient checkpointing (use_cache off); and, for the model
    families of qlora_ext.lm.PLAIN_HEAD_MODEL_TYPES with a float head, makes `model(..., labels=...)` compute
    its loss in chunks of the vocabulary (the full logits exist once, returned without a graph).

    `embedding_dtype` (float32, bfloat16 or float16): where the frozen input embeddings and float output head
    are stored. float32 is PEFT's choice; a 16-bit dtype halves them (LLaMA-13B: 1.31 -> 0.66 GB) and loses
    nothing of a 16-bit checkpoint's values; the head then computes the logits in that dtype (its input is cast
    to it), and the embeddings' 16-bit output meets the float32 norms of the first block.

    `cpu_block_cache`: for a model on CPU, the limit in bytes given to qlora_ext.cpu_block_cache, which keeps
    a step's freed activations for reuse instead of leaving them resident in malloc's heap (SmolLM2-135M,
    batch 4 x 256: peak RSS 0.99 against 1.96 GB, steps 6-8% slower); 0 turns the cache off, None leaves it as
    it is. The cache is process-wide."""
    if embedding_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"embedding_dtype must be float32, bfloat16 or float16, got {embedding_dtype}")
    _warn_spinning_openmp(model)
    if cpu_block_cache is not None and any(p.device.type == "cpu" for p in model.parameters()):
        _io.cpu_block_cache(cpu_block_cache)
    for p in model.parameters():
        p.requires_grad_(False)
    packed = {id(m.weight) for m in model.modules() if isinstance(m, Linear4bit)}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if type(head) is nn.Linear else None  # a 4-bit or adapted head keeps its own rules
    sixteen = {id(p) for mod in (emb, head) if mod is not None for p in mod.parameters(recurse=False)}
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):
            m.set_adapter(m.active_adapter)  # re-enables only the active adapter's grads
        for p in m.parameters(recurse=False):
            want = embedding_dtype if id(p) in sixteen else torch.float32
            if p.is_floating_point() and id(p) not in packed and p.dtype != want:
                p.data = p.data.to(want)
    if head is not None and embedding_dtype != torch.float32 and not getattr(head, "_qlora_cast_hook", False):
        head.register_forward_pre_hook(_cast_input_to_weight)
        head._qlora_cast_hook = True
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable (a transformers "
                            f"PreTrainedModel is needed); pass gradient_checkpointing=False")
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # the KV cache is useless while training and conflicts with checkpointing
    from .lm import install_chunked_loss
    install_chunked_loss(model)   # forward(labels=...) computes the loss in chunks of the vocabulary
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes held by the model, each tensor storage counted once (tied weights, shared code tables):

    packed_weight_bytes (4-bit codes), scale_bytes (absmax, nested absmax and code tables), adapter_bytes
    (LoRA A and B), other_bytes (every other parameter and buffer), total_bytes, quantized_weight_count
    (weights held in 4 bits) and bits_per_quantized_weight (codes + absmax + nested absmax per weight:
    4.127 for NF4 + double quant at block size 64, 4.5 without double quant).
    """
    seen = set()

    def nbytes(t) -> int:
        if t is None:
            return 0
        key = (t.untyped_storage().data_ptr(), t.device, t.storage_offset(), t.dtype, tuple(t.shape))
        if key in seen or t.is_meta:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    packed = scales = adapters = other = 0
    bits = count = 0
    for _, m in _four_bit_layers(model):
        qs = m.quant_state
        if qs is None:
            continue
        p = nbytes(m.weight)
        a, na = nbytes(qs.absmax), nbytes(qs.nested_absmax)
        packed += p
        scales += a + na + nbytes(qs.code) + nbytes(qs.nested_code) + nbytes(qs.offset)
        bits += 8 * (m.weight.numel() * m.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
                     + (qs.nested_absmax.numel() * 4 if qs.nested else 0))
        count += qs.numel
        if isinstance(m, LoraLinear4bit):
            adapters += sum(nbytes(p_) for p_ in list(m.lora_A.parameters()) + list(m.lora_B.parameters()))
    for t in list(model.parameters()) + list(model.buffers()):
        other += nbytes(t)
    return {"packed_weight_bytes": packed, "scale_bytes": scales, "adapter_bytes": adapters,
            "other_bytes": other, "total_bytes": packed + scales + adapters + other,
            "quantized_weight_count": count, "bits_per_quantized_weight": bits / count if count else 0.0}
