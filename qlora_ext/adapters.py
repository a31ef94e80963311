"""LoRA adapters on a model's 4-bit layers: add_lora, set_adapter, print_trainable_parameters, and
save_adapter / load_adapter in PEFT's exact format (adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r], and for PEFT's
`modules_to_save` (float modules trained in full, e.g. a classification head) every entry of the module's
state dict as `base_model.model.<module path>.<name>`, as PEFT writes them), so PEFT loads ours and we load
PEFT's. Saves are atomic; loaded adapters are validated completely before the model is touched.

modules_to_save: the model keeps one copy of each such module (trainable), shared by its adapters; loading
an adapter that has one overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from torch import nn

from . import _io
from .nn import Linear4bit, LoraLinear4bit, check_lora_args

__all__ = ["add_lora", "set_adapter", "print_trainable_parameters", "save_adapter", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_HASH_KEY = "qlora_ext.adapter_config_sha256"
_MAX_RANK = 1 << 16
_SAVED_ATTR = "_qlora_modules_to_save"   # {adapter name: [module names as given, ...]} on the model
# PEFT's defaults by task: the head a task type trains in full (names that match nothing are ignored, as in PEFT)
_TASK_HEADS = {"ForSequenceClassification": ("SEQ_CLS", ["classifier", "score"]),
               "ForTokenClassification": ("TOKEN_CLS", ["classifier", "score"]),
               "ForQuestionAnswering": ("QUESTION_ANS", ["qa_outputs"]),
               "ForCausalLM": ("CAUSAL_LM", None)}


def _task(model: nn.Module) -> Tuple[Optional[str], Optional[List[str]]]:
    name = type(model).__name__
    return next((v for k, v in _TASK_HEADS.items() if name.endswith(k)), (None, None))


def _name_matches(path: str, key: str) -> bool:
    # PEFT's modules_to_save rule, exactly: a plain suffix, no '.' boundary ("classifier" also names DistilBERT's
    # "pre_classifier", which PEFT then trains and saves too)
    return path.endswith(key)


def _resolve_saved(model: nn.Module, names, source: str) -> Dict[str, nn.Module]:
    """Module paths designated by modules_to_save names (PEFT's rule: paths ending in the name); names
    matching nothing are ignored, as PEFT ignores its task defaults a model lacks. A match that is a 4-bit layer,
    lies inside a 4-bit layer or has no float parameter raises ValueError."""
    if names is None:
        return {}
    if not (isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"{source}: modules_to_save must be a list of module names, got {names!r}")
    quant = tuple(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
    out = {}
    for path, m in model.named_modules():
        if path and any(_name_matches(path, k) for k in names):
            if path in quant or path.startswith(tuple(q + "." for q in quant)):
                raise ValueError(f"{source}: modules_to_save names the 4-bit layer '{path}': only float modules "
                                 f"can be trained in full (leave it in float with QLoRAConfig(skip_modules=...))")
            params = list(m.parameters())
            if not params or not all(p.is_floating_point() for p in params):
                raise ValueError(f"{source}: modules_to_save '{path}' has no float parameters to train")
            if not any(path.startswith(o + ".") for o in out):   # a match inside another match is covered
                out[path] = m
    return out


def _linear_like(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules a LoRA target could name: 4-bit layers and float nn.Linear (LoRA's own A/B excluded)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    inside = tuple(n + "." for n in found)
    found.update({n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n and not (inside and n.startswith(inside))})
    return found


def _output_layer_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None


def _matches(name: str, target_modules, exclude_modules=None) -> bool:
    """PEFT's matching rule: a string is a regex that must match the whole module path; a list matches a
    path equal to an entry or ending with '.' + entry."""
    def match(spec):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)
    return match(target_modules) and not (exclude_modules and match(exclude_modules))


def _resolve_targets(model: nn.Module, target_modules, exclude_modules=None) -> List[str]:
    """Paths of the 4-bit layers `target_modules` designates ("all-linear": every 4-bit linear layer except the
    output layer, as in PEFT). A target that is a float layer or not a linear layer raises ValueError."""
    candidates = _linear_like(model)
    if target_modules == "all-linear":
        out = _output_layer_name(model)
        names = [n for n, m in candidates.items() if isinstance(m, Linear4bit) and n != out
                 and not (exclude_modules and _matches(n, exclude_modules))]
    else:
        if not (isinstance(target_modules, str) or (isinstance(target_modules, (list, tuple, set))
                                                    and all(isinstance(t, str) for t in target_modules))):
            raise ValueError(f"target_modules must be 'all-linear', a regex or a list of names, "
                             f"got {target_modules!r}")
        if not isinstance(target_modules, str):
            target_modules = sorted(target_modules)
        inside = tuple(n + "." for n, m in candidates.items() if isinstance(m, Linear4bit))
        others = [n for n in (n for n, _ in model.named_modules()) if n and n not in candidates
                  and not (inside and n.startswith(inside)) and _matches(n, target_modules, exclude_modules)]
        if others:
            raise ValueError(f"target_modules {target_modules!r} matches modules that are not linear layers: "
                             f"{others[:5]}")
        names = [n for n in candidates if _matches(n, target_modules, exclude_modules)]
        floats = [n for n in names if not isinstance(candidates[n], Linear4bit)]
        if floats:
            raise ValueError(f"target_modules {target_modules!r} matches float (not 4-bit) layers {floats[:5]}: "
                             f"LoRA here applies to 4-bit layers; quantize them or leave them out of the targets")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matches no 4-bit linear layer of the model "
                         f"(quantize_model first?)")
    return names


def _lora_layers(model: nn.Module) -> Dict[str, LoraLinear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new


def set_adapter(model: nn.Module, adapter_name: Optional[str]) -> None:
    """Activates `adapter_name` on every layer that has it (layers without it run their base alone) and makes
    it the only trainable adapter; None deactivates all adapters."""
    layers = _lora_layers(model)
    if adapter_name is not None and not any(adapter_name in m.adapters for m in layers.values()):
        raise KeyError(f"no layer has an adapter named {adapter_name!r}")
    for m in layers.values():
        m.set_adapter(adapter_name if adapter_name in m.adapters else None)


def add_lora(model: nn.Module, r: int = 64, lora_alpha: float = 16, lora_dropout: float = 0.05,
             target_modules: Union[str, List[str]] = "all-linear", use_rslora: bool = False,
             adapter_name: str = "default", modules_to_save: Union[str, List[str], None] = "auto",
             lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Adds a LoRA adapter named `adapter_name` to the targeted 4-bit layers (default: all of them, the QLoRA
    paper's finding), makes it active, and freezes everything else except `modules_to_save`: float modules
    trained in full and saved with the adapter (PEFT's option of that name; "auto" = PEFT's default for the
    model's task: 'classifier' / 'score' for sequence and token classification, 'qa_outputs' for question
    answering, none otherwise). `lora_dtype`: the adapter weights' (and so their gradients') dtype; float32
    (PEFT's) or 16-bit, which halves both (the QLoRA paper trained bfloat16 adapters; the optimizers keep
    their own float32 or 8-bit state either way); float32 activations still multiply in float32. Returns
    the model. Arguments are validated before the model is touched (ValueError naming the bad one)."""
    check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
    if modules_to_save == "auto":
        modules_to_save = _task(model)[1]
        quant = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
        four = [k for k in modules_to_save or () if any(_name_matches(n, k) for n in quant)]
        if four:   # e.g. a transformers + bitsandbytes checkpoint that stored its classifier in 4 bits
            warnings.warn(f"add_lora: the task head {four} is a 4-bit layer in this model (as its checkpoint stored "
                          f"it), so it is not trained in full; LoRA targets it like any 4-bit layer", stacklevel=2)
            modules_to_save = [k for k in modules_to_save if k not in four] or None
    saved = _resolve_saved(model, modules_to_save, "add_lora")
    names = _resolve_targets(model, target_modules)
    layers = _lora_layers(model)
    clash = [n for n in names if n in layers and adapter_name in layers[n].adapters]
    if clash:
        raise ValueError(f"adapter {adapter_name!r} already exists on {clash[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoraLinear4bit):
            m.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        else:
            _replace(model, n, LoraLinear4bit.from_linear4bit(m, r, lora_alpha, lora_dropout, use_rslora,
                                                              adapter_name, lora_dtype))
    set_adapter(model, adapter_name)
    _set_saved(model, adapter_name, modules_to_save if saved else None, saved)
    return model


def _set_saved(model: nn.Module, adapter_name: str, names, modules: Dict[str, nn.Module]) -> None:
    registry = getattr(model, _SAVED_ATTR, None) or {}
    registry.pop(adapter_name, None)
    if modules:
        registry[adapter_name] = list(names)
    setattr(model, _SAVED_ATTR, registry)
    for m in modules.values():
        m.requires_grad_(True)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Prints and returns (trainable, total) parameter counts; a 4-bit weight counts as its number of
    weights (out * in), not as its packed bytes."""
    trainable = total = 0
    seen = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if isinstance(m, Linear4bit) and p is m.weight:
                n = m.in_features * m.out_features
            total += n
            trainable += n if p.requires_grad else 0
    print(f"trainable params: {trainable:,} || all params: {total:,} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


# ---- PEFT format ----
def _active_name(layers: Dict[str, LoraLinear4bit]) -> str:
    active = {m.active_adapter for m in layers.values()} - {None}
    if len(active) != 1:
        raise ValueError(f"cannot tell which adapter to save (active adapters: {sorted(active)}); pass adapter_name")
    return active.pop()


def _adapter_config(model, modules: Dict[str, LoraLinear4bit], name: str, saved_names) -> dict:
    cfgs = {n: m.lora_config[name] for n, m in modules.items()}
    r = Counter(c["r"] for c in cfgs.values()).most_common(1)[0][0]
    alpha = Counter(c["lora_alpha"] for c in cfgs.values()).most_common(1)[0][0]
    rslora = {c["use_rslora"] for c in cfgs.values()}
    if len(rslora) != 1:
        raise ValueError(f"adapter {name!r} mixes use_rslora settings, which PEFT's format cannot express")
    # suffixes when each one designates exactly the adapted layers (on any model of this architecture, float
    # or 4-bit), full paths otherwise
    all_linear = _linear_like(model)
    suffixes = sorted({n.rpartition(".")[2] for n in modules})
    exact = all(n in modules for n in all_linear if n.rpartition(".")[2] in suffixes)
    cfg = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": _task(model)[0],
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "r": r, "lora_alpha": alpha,
        "lora_dropout": Counter(c["lora_dropout"] for c in cfgs.values()).most_common(1)[0][0],
        "target_modules": suffixes if exact else sorted(modules),
        "rank_pattern": {n: c["r"] for n, c in cfgs.items() if c["r"] != r},
        "alpha_pattern": {n: c["lora_alpha"] for n, c in cfgs.items() if c["lora_alpha"] != alpha},
        "use_rslora": rslora.pop(), "use_dora": False, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": list(saved_names) if saved_names else None, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None, "lora_bias": False, "revision": None,
    }


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> None:
    """Writes one adapter (default: the active one) in PEFT's format. Atomic: both files are written under
    temporary names and renamed into place (weights, then config); the weights carry a hash of the config,
    which load_adapter checks, so even a crash between the two renames cannot be loaded as a mixed pair."""
    from safetensors.torch import save_file
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (add_lora first)")
    name = adapter_name if adapter_name is not None else _active_name(layers)
    modules = {n: m for n, m in layers.items() if name in m.adapters}
    if not modules:
        raise KeyError(f"no layer has an adapter named {name!r}")
    saved_names = (getattr(model, _SAVED_ATTR, None) or {}).get(name)
    saved = _resolve_saved(model, saved_names, "save_adapter")
    config_text = json.dumps(_adapter_config(model, modules, name, saved_names), indent=2, sort_keys=True) + "\n"
    tensors = {}
    for n, m in modules.items():
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = m.lora_A[name].weight.detach().contiguous()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = m.lora_B[name].weight.detach().contiguous()
    for path, m in saved.items():   # PEFT's file keys: the module's own, without 'modules_to_save.<adapter>'
        for k, t in m.state_dict().items():
            tensors[f"{_PREFIX}{path}.{k}"] = t.detach().contiguous().clone()
    meta = {"format": "pt", _HASH_KEY: hashlib.sha256(config_text.encode()).hexdigest()}
    _io.atomic_write(directory, {WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata=meta),
                                 CONFIG_NAME: lambda p: p.write_text(config_text)})


def _number(cfg, key, cond, what):
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not cond(v):
        raise ValueError(f"{CONFIG_NAME}: '{key}' must be {what}, got {v!r}")
    return v


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_adapter_config(path: Path) -> Tuple[dict, bytes]:
    raw = (path / CONFIG_NAME).read_bytes() if (path / CONFIG_NAME).is_file() else None
    cfg = _io.read_json(path / CONFIG_NAME)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{CONFIG_NAME}: 'peft_type' is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    _number(cfg, "r", lambda v: isinstance(v, int) and 0 < v <= _MAX_RANK, f"an integer in [1, {_MAX_RANK}]")
    _number(cfg, "lora_alpha", lambda v: True, "a finite number")
    cfg.setdefault("lora_dropout", 0.0)
    _number(cfg, "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    # fan_in_fan_out (PEFT sets it for a float Conv1D base) only says how the base stores its weight; A and B
    # have their usual shapes, and a 4-bit layer is [out, in] whatever it replaced, so it is accepted as
    # PEFT's bitsandbytes layers accept it (they reset it)
    unsupported = {"use_dora": (False, None), "bias": ("none", None),
                   "lora_bias": (False, None), "layers_to_transform": (None, []),
                   "target_parameters": (None, []), "trainable_token_indices": (None, {}, [])}
    for key, fine in unsupported.items():
        if cfg.get(key) not in fine:
            raise ValueError(f"{CONFIG_NAME}: '{key}' = {cfg[key]!r} is not supported (plain LoRA on linear "
                             f"layers only)")
    tm = cfg.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm))):
        raise ValueError(f"{CONFIG_NAME}: 'target_modules' must be a regex or a non-empty list of names, got {tm!r}")
    if isinstance(tm, str) and tm != "all-linear":
        try:
            re.compile(tm)
        except re.error as exc:
            raise ValueError(f"{CONFIG_NAME}: 'target_modules' is not a valid regex ({exc})") from None
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in pat.values()):
            raise ValueError(f"{CONFIG_NAME}: '{key}' must map module names to numbers, got {pat!r}")
        if key == "rank_pattern" and not all(isinstance(v, int) and 0 < v <= _MAX_RANK for v in pat.values()):
            raise ValueError(f"{CONFIG_NAME}: 'rank_pattern' ranks must be integers in [1, {_MAX_RANK}]")
        cfg[key] = pat
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise ValueError(f"{CONFIG_NAME}: 'use_rslora' must be a bool, got {cfg.get('use_rslora')!r}")
    return cfg, raw


def load_adapter(model: nn.Module, directory, adapter_name: str = "default",
                 lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Loads a PEFT LoRA adapter (ours or PEFT's; target_modules as suffixes, full paths or a regex) onto the
    model's 4-bit layers under `adapter_name`, its weights in `lora_dtype` (float32 whatever the file holds,
    as PEFT does by default), and makes it active. The files are untrusted: the config, every
    key, shape, dtype and value are validated before the model is modified (ValueError naming the key)."""
    path = Path(directory)
    cfg, raw = _read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    header = _io.check_safetensors(weights)
    meta = header.get("__metadata__") or {}
    if _HASH_KEY in meta and meta[_HASH_KEY] != hashlib.sha256(raw).hexdigest():
        raise ValueError(f"{weights}: written for a different {CONFIG_NAME} (interrupted save?)")
    targets = _resolve_targets(model, cfg["target_modules"], cfg.get("exclude_modules"))
    saved = _resolve_saved(model, cfg.get("modules_to_save"), str(path / CONFIG_NAME))
    layers = {n: model.get_submodule(n) for n in targets}
    clash = [n for n, m in layers.items() if isinstance(m, LoraLinear4bit) and adapter_name in m.adapters]
    if clash:
        raise ValueError(f"adapter {adapter_name!r} already exists on {clash[:3]}")
    expected = {}
    for n, m in layers.items():
        r = _pattern(cfg["rank_pattern"], n, cfg["r"])
        expected[f"{_PREFIX}{n}.lora_A.weight"] = (n, "A", (r, m.in_features))
        expected[f"{_PREFIX}{n}.lora_B.weight"] = (n, "B", (m.out_features, r))
    for p_, m in saved.items():
        for k, t in m.state_dict().items():
            expected[f"{_PREFIX}{p_}.{k}"] = (p_, "saved:" + k, tuple(t.shape))
    for key in header:
        if key != "__metadata__" and key not in expected:
            raise ValueError(f"{weights}: unexpected key '{key}' (not a lora_A / lora_B weight of a layer matched "
                             f"by target_modules, nor a tensor of a module in modules_to_save)")
    loaded: Dict[str, Dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key, (n, which, shape) in expected.items():
                if key not in header:
                    raise ValueError(f"{weights}: missing key '{key}'")
                t = f.get_tensor(key)
                if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    raise ValueError(f"{weights}: '{key}' has dtype {t.dtype}, expected a float type")
                if tuple(t.shape) != shape:
                    raise ValueError(f"{weights}: '{key}' has shape {list(t.shape)}, expected {list(shape)}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"{weights}: '{key}' contains NaN or Inf")
                loaded.setdefault(n, {})[which] = t
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors on a corrupt file
        raise ValueError(f"{weights}: cannot read ({exc})") from None
    # everything validated: now modify the model
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p_, m in saved.items():
            m.load_state_dict({k[len("saved:"):]: t for k, t in loaded[p_].items()})
    for n, m in layers.items():
        r = _pattern(cfg["rank_pattern"], n, cfg["r"])
        alpha = _pattern(cfg["alpha_pattern"], n, cfg["lora_alpha"])
        if not isinstance(m, LoraLinear4bit):
            m = LoraLinear4bit.from_linear4bit(m, r, alpha, cfg["lora_dropout"], cfg.get("use_rslora", False),
                                               adapter_name, lora_dtype)
            _replace(model, n, m)
        else:
            m.add_adapter(adapter_name, r, alpha, cfg["lora_dropout"], cfg.get("use_rslora", False), lora_dtype)
        with torch.no_grad():
            m.lora_A[adapter_name].weight.copy_(loaded[n]["A"])
            m.lora_B[adapter_name].weight.copy_(loaded[n]["B"])
    set_adapter(model, adapter_name)
    _set_saved(model, adapter_name, cfg.get("modules_to_save") if saved else None, saved)
    return model
