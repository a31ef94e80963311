"""QLoRAConfig (how to quantize a model) and, when transformers is installed, its transformers quantizer, so that
`AutoModelForCausalLM.from_pretrained(path, quantization_config=QLoRAConfig(...))` builds our 4-bit layers
while loading: float checkpoints are quantized tensor by tensor as they stream in, bitsandbytes-format
checkpoints are deserialized (and validated) into the same layers.

Registered with transformers' own API (`register_quantization_config` / `register_quantizer`) under the
method name "qlora_ext". A config serializes as {"quant_method": "qlora_ext", ...}; `to_bnb_dict` gives the
bitsandbytes form that `save_quantized` writes.
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch

from . import _io
from ._ops import FLOAT_DTYPES, VALID_BLOCKSIZES_4BIT
from .functional import QUANT_TYPES, QuantState, quantize_4bit

try:
    from transformers.utils.quantization_config import QuantizationConfigMixin
    _HAVE_TRANSFORMERS = True
except ImportError:  # the layers and functional ops work without transformers
    QuantizationConfigMixin = object
    _HAVE_TRANSFORMERS = False

__all__ = ["QLoRAConfig", "QUANT_METHOD"]

QUANT_METHOD = "qlora_ext"
_STORAGE = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}


def _dtype(value, what: str, allowed) -> Optional[torch.dtype]:
    """A torch dtype from a dtype or its name ('bfloat16' or 'torch.bfloat16')."""
    if value is None or isinstance(value, torch.dtype):
        dt = value
    elif isinstance(value, str):
        dt = getattr(torch, value.replace("torch.", ""), None)
    else:
        dt = None
    if (dt is None and value is not None) or (dt is not None and dt not in allowed):
        raise ValueError(f"{what} must be one of {[str(a).replace('torch.', '') for a in allowed]}, got {value!r}")
    return dt


def _dtype_name(dt: Optional[torch.dtype]) -> Optional[str]:
    return None if dt is None else str(dt).replace("torch.", "")


def _take_bnb_arguments(kwargs: dict, given: dict) -> bool:
    """Moves bitsandbytes-named arguments out of kwargs into `given` (our names); True if any was present."""
    bnb_style = False
    if "load_in_8bit" in kwargs:
        bnb_style = True
        if kwargs.pop("load_in_8bit"):
            raise ValueError("load_in_8bit=True: qlora_ext loads models in 4 bits only (NF4 / FP4); 8-bit LLM.int8 "
                             "is not supported: use load_in_4bit=True")
    if "load_in_4bit" in kwargs:
        bnb_style = True
        if kwargs.pop("load_in_4bit") is not True:
            raise ValueError("load_in_4bit must be True (QLoRAConfig always quantizes to 4 bits)")
    for bnb_name, ours in _BNB_NAMES.items():
        if bnb_name in kwargs:
            bnb_style = True
            value = kwargs.pop(bnb_name)
            if ours in given and given[ours] != value:
                raise ValueError(f"both {ours}={given[ours]!r} and {bnb_name}={value!r} given: pass one of them")
            given[ours] = value
    for name, default in _BNB_8BIT_ONLY.items():
        if name in kwargs:
            bnb_style = True
            value = kwargs.pop(name)
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by qlora_ext (it concerns bitsandbytes' 8-bit "
                                 f"LLM.int8 / CPU offload); leave it at {default!r}")
    return bnb_style


_UNSET = object()
# bitsandbytes' argument name -> ours
_BNB_NAMES = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
              "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage",
              "llm_int8_skip_modules": "skip_modules"}
_OURS_DEFAULTS = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None,
                  "quant_storage": torch.uint8, "skip_modules": ["lm_head"]}
# what BitsAndBytesConfig means when an argument is left out (applies once any bitsandbytes name is used)
_BNB_DEFAULTS = {"quant_type": "fp4", "blocksize": 64, "double_quant": False, "compute_dtype": torch.float32,
                 "quant_storage": torch.uint8, "skip_modules": None}
# bitsandbytes arguments that only concern 8-bit (LLM.int8) loading or CPU offload: accepted at their default
_BNB_8BIT_ONLY = {"llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
                  "llm_int8_enable_fp32_cpu_offload": False}


class QLoRAConfig(QuantizationConfigMixin):
    """How to quantize: NF4 or FP4, block size, double quantization of the scales, compute dtype (None: the
    weight's own dtype), the storage dtype of packed bytes, and the modules kept in float.

    skip_modules: module names or patterns left unquantized. A pattern matches a module whose path equals it,
    starts with it (up to a '.'), ends with '.' + it, or that it matches as a regex from the start up to a
    module boundary (transformers' rule). None means transformers' default for the model (output embeddings,
    tied weights and the last module), as bitsandbytes does. Linear layers whose weight is shared with another
    module are never quantized (that would break the tie).

    bitsandbytes' names are accepted too (`load_in_4bit`, `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`,
    `bnb_4bit_compute_dtype`, `bnb_4bit_quant_storage`, `llm_int8_skip_modules`), with BitsAndBytesConfig's
    meaning: once any of them is given, the settings left out take bitsandbytes' defaults (FP4, no double
    quantization, float32 compute, transformers' default skip list), so a BitsAndBytesConfig(...) line becomes
    QLoRAConfig(...) with the same arguments and the same result. What cannot be honoured (8-bit loading,
    load_in_4bit=False, CPU offload, LLM.int8 settings) raises ValueError naming the argument.
    """

    def __init__(self, quant_type=_UNSET, blocksize=_UNSET, double_quant=_UNSET, compute_dtype=_UNSET,
                 quant_storage=_UNSET, skip_modules=_UNSET, **kwargs):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        given = {k: v for k, v in dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                       compute_dtype=compute_dtype, quant_storage=quant_storage,
                                       skip_modules=skip_modules).items() if v is not _UNSET}
        bnb_style = _take_bnb_arguments(kwargs, given)
        if method != QUANT_METHOD:
            raise ValueError(f"QLoRAConfig: quant_method={method!r} is not {QUANT_METHOD!r}")
        if kwargs:
            raise ValueError(f"unknown QLoRAConfig arguments {sorted(kwargs)}")
        s = dict(_BNB_DEFAULTS if bnb_style else _OURS_DEFAULTS, **given)
        quant_type, blocksize, double_quant = s["quant_type"], s["blocksize"], s["double_quant"]
        skip_modules = s["skip_modules"]
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES_4BIT:
            raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES_4BIT}, got {blocksize!r}")
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {double_quant!r}")
        if skip_modules is not None and (not isinstance(skip_modules, (list, tuple))
                                         or not all(isinstance(s, str) and s for s in skip_modules)):
            raise ValueError(f"skip_modules must be a list of module names or None, got {skip_modules!r}")
        self.quant_method = QUANT_METHOD
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = _dtype(s["compute_dtype"], "compute_dtype", FLOAT_DTYPES)
        self.quant_storage = _dtype(s["quant_storage"], "quant_storage", tuple(_STORAGE.values()))
        self.skip_modules = None if skip_modules is None else list(skip_modules)

    @classmethod
    def from_bnb(cls, config) -> "QLoRAConfig":
        """The QLoRAConfig equivalent to a transformers BitsAndBytesConfig (or its dict form, as found in a
        checkpoint's config.json). An 8-bit config raises ValueError naming load_in_8bit."""
        d = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(d, dict):
            raise ValueError(f"from_bnb needs a BitsAndBytesConfig or its dict, got {type(config).__name__}")
        # null in a checkpoint's JSON means bitsandbytes' default (llm_int8_skip_modules: transformers' default)
        d = {k: v for k, v in d.items() if v is not None or k == "llm_int8_skip_modules"}
        if d.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(f"not a bitsandbytes quantization_config: quant_method={d.get('quant_method')!r}")
        d.pop("quant_method", None)
        for private in ("_load_in_4bit", "_load_in_8bit"):  # to_dict() repeats load_in_4bit / load_in_8bit
            if private in d and d[private] != d.get(private[1:], d[private]):
                raise ValueError(f"inconsistent {private} and {private[1:]} in {d!r}")
            d.pop(private, None)
        d.setdefault("load_in_4bit", False)  # a bitsandbytes config that does not say 4-bit is not 4-bit
        return cls(**d)

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant, "compute_dtype": _dtype_name(self.compute_dtype),
                "quant_storage": _dtype_name(self.quant_storage), "skip_modules": self.skip_modules}

    def to_bnb_dict(self, compute_dtype: Optional[torch.dtype] = None, skip_modules=None) -> dict:
        """The `quantization_config` transformers + bitsandbytes write for this format (bitsandbytes' block size
        is fixed at 64, so other block sizes are readable by qlora_ext only)."""
        cd = compute_dtype or self.compute_dtype or torch.float32
        return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": _dtype_name(cd),
                "bnb_4bit_quant_storage": _dtype_name(self.quant_storage), "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": self.double_quant, "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": self.skip_modules if skip_modules is None else list(skip_modules),
                "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
                "quant_method": "bitsandbytes"}

    @classmethod
    def from_bnb_dict(cls, d: dict) -> "QLoRAConfig":
        """Reads a bitsandbytes 4-bit `quantization_config` (as found in a checkpoint's config.json)."""
        if not isinstance(d, dict):
            raise ValueError(f"not a bitsandbytes 4-bit quantization_config: {d!r}")
        return cls.from_bnb(d)

    def __repr__(self):
        return f"QLoRAConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'quant_method')})"


if _HAVE_TRANSFORMERS:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    class _QuantizerOp(ConversionOps):
        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def __deepcopy__(self, memo):
            # transformers deep-copies a converter (and its ops) per checkpoint key; the copies must keep
            # reporting to the one quantizer that raises the recorded errors after loading
            return type(self)(self.hf_quantizer)

    class _Quantize(_QuantizerOp):
        """Float checkpoint tensor -> packed 4-bit parameter of a Linear4bit (one tensor at a time)."""

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            cfg = self.hf_quantizer.quantization_config
            out = {}
            for name, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                module = model.get_submodule(name.rpartition(".")[0])
                if module.source_transposed:  # a Conv1D's [in, out] weight (a 4-bit checkpoint stores [out, in])
                    value = value.t()
                try:
                    packed, state = quantize_4bit(value, cfg.blocksize, cfg.quant_type, cfg.double_quant,
                                                  cfg.quant_storage)
                except ValueError as exc:  # e.g. NaN or Inf in the checkpoint
                    self.hf_quantizer.record_error(name, f"{name}: {exc}")
                    continue
                module._set_quantized(packed, state)
                module._is_hf_initialized = True
                out[name] = module.weight
            del input_dict, value
            _io.drop_mapped_pages()  # the float tensor's pages of the mapped checkpoint are not needed again
            return out

    class _Deserialize(_QuantizerOp):
        """bitsandbytes checkpoint entries (`weight`, `weight.absmax`, ...) -> packed parameter + QuantState,
        validated against the layer's shape before anything reads them. Float weights arriving for a
        Linear4bit (a layer the checkpoint left in float) are quantized with the config's format."""

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            from .nn import Linear4bit
            # Errors are recorded and the layer left empty (returning nothing), not raised: transformers would
            # turn an exception into a generic "conversion issues" error; the quantizer raises ours, naming the
            # key, once loading is over.
            # own copies of the (small, 4-bit) entries: views would keep the mapped checkpoint's pages resident
            d = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
            d = {k: v.clone() if v.device.type == "cpu" else v for k, v in d.items()}
            _io.drop_mapped_pages()
            module = model.get_submodule(full_layer_name.rpartition(".")[0])
            if not isinstance(module, Linear4bit):
                if len(d) > 1:
                    stats = sorted(k for k in d if k != "weight")
                    self.hf_quantizer.record_error(full_layer_name, f"{full_layer_name}: the checkpoint holds 4-bit "
                                                   f"entries {stats} for a module that is not quantized")
                    return {}
                w = d["weight"]
                target = model.get_parameter_or_buffer(full_layer_name)
                return {"weight": w.to(target.dtype) if w.is_floating_point() else w}
            if len(d) == 1:  # a float weight for a layer the checkpoint left unquantized
                out = _Quantize(self.hf_quantizer).convert({full_layer_name: d["weight"]}, model=model)
                return {"weight": out[full_layer_name]} if out else {}
            try:
                # full checkpoint keys, so that every message names the offending entry
                entries = {full_layer_name + k[len("weight"):]: v for k, v in d.items()}
                state = QuantState.from_dict(entries, prefix=full_layer_name + ".", device=d["weight"].device)
                if d["weight"].dtype != self.hf_quantizer.quantization_config.quant_storage:
                    raise ValueError(f"{full_layer_name}: packed dtype {d['weight'].dtype} is not the configured "
                                     f"quant_storage {self.hf_quantizer.quantization_config.quant_storage}")
                module._set_quantized(d["weight"], state)
            except ValueError as exc:
                msg = str(exc)
                self.hf_quantizer.record_error(full_layer_name, msg if full_layer_name in msg else
                                               f"{full_layer_name}: {msg}")
                return {}
            module._is_hf_initialized = True
            return {"weight": module.weight}

    class QLoRAHfQuantizer(HfQuantizer):
        """transformers quantizer for QLoRAConfig: swaps nn.Linear for qlora_ext.nn.Linear4bit on the meta model,
        then quantizes (float checkpoint) or deserializes (bitsandbytes-format checkpoint) each weight as it
        is loaded, so peak memory is the 4-bit model plus one float tensor."""

        requires_calibration = False
        quantization_config: QLoRAConfig
        serialized_names = {"weight": ["weight", "weight.nested_absmax", "weight.nested_quant_map",
                                       "weight.quant_map", "weight.absmax", "weight.quant_state.bitsandbytes__nf4",
                                       "weight.quant_state.bitsandbytes__fp4"]}

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._errors = {}

        def record_error(self, name, message):
            # raised after loading: a checkpoint that does not validate must not produce a half-loaded model
            self._errors[name] = message

        @property
        def quantized_element_size(self) -> float:
            return 0.5

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("qlora_ext 4-bit layers cannot be offloaded to disk (device_map has 'disk')")

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            from .nn import Linear4bit
            module_name, _, tensor = param_name.rpartition(".")
            return tensor == "weight" and isinstance(model.get_submodule(module_name), Linear4bit)

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .model import _float_modules, _replace_linears, _stored_4bit_modules
            cfg = self.quantization_config
            # a 4-bit checkpoint's own 4-bit layers are 4-bit here too, even where our rules keep a layer float
            # (transformers + bitsandbytes quantizes e.g. a sequence classifier whose last parameter is a bias)
            stored = _stored_4bit_modules(model, checkpoint_files) if self.pre_quantized else set()
            _replace_linears(model, cfg, _float_modules(model, cfg), quantize=False, stored=stored)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .nn import Linear4bit
            if self._errors:
                raise ValueError("invalid 4-bit checkpoint: " + "; ".join(self._errors.values()))
            empty = [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and not m.is_quantized]
            if empty:
                raise ValueError(f"the checkpoint has no weight for the 4-bit layers {empty}")
            from .model import release_checkpoint_mapping
            release_checkpoint_mapping(model)  # views of the memory-mapped checkpoint would keep it resident
            # PEFT's prepare_model_for_kbit_training turns gradient checkpointing on (and makes the embeddings'
            # output require grad) only for models flagged is_loaded_in_4bit, as transformers flags bitsandbytes
            # models. transformers' num_parameters() (called by Trainer every step) imports bitsandbytes when it
            # sees the flag, so it is set only where bitsandbytes is installed; elsewhere turn checkpointing on
            # with TrainingArguments(gradient_checkpointing=True) or model.gradient_checkpointing_enable().
            if importlib.util.find_spec("bitsandbytes") is not None:
                model.is_loaded_in_4bit = True
            return model

        def get_quantize_ops(self):
            return _Quantize(self)

        def get_load_operations(self):
            return {"deserialize": _Deserialize}

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    # Guarded so that re-importing (e.g. importlib.reload in a notebook) does not raise "already registered".
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QLoRAConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QLoRAHfQuantizer)
