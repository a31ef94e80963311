"""PEFT on qlora_ext's 4-bit layers: what lets a bitsandbytes + PEFT script run on qlora_ext.

`qlora_ext.nn.Linear4bit` subclasses `nn.Linear` (as bitsandbytes' Linear4bit does), so PEFT finds it with
`target_modules="all-linear"`, lists and regexes, and its default LoRA dispatcher wraps it in PEFT's own
`lora.Linear`, whose forward calls the base layer (our `matmul_4bit` kernels, forward and backward) and adds
the LoRA branch. Training, several adapters, `set_adapter`, `save_pretrained`, `PeftModel.from_pretrained`
and `AutoPeftModelForCausalLM` all work that way with an unmodified `LoraConfig`; nothing needs registering.

Merging is the one thing PEFT's plain `lora.Linear` cannot do on a packed weight (it adds the delta to
`weight.data`). `Linear4bitLoRA` below is PEFT's `lora.Linear` with `merge` / `unmerge` done as PEFT does
them for bitsandbytes: dequantize, add (or subtract) the delta in float32, requantize in the layer's own
format. PEFT picks it through its public custom-module registration, which PEFT keeps per `LoraConfig`
(there is no global dispatcher registry to add to), so a config that should merge into 4-bit weights is
registered once: `register(lora_config)` (returns the config). Without it, PEFT's `merge_and_unload` fails
on the packed weight (a size-mismatch RuntimeError from PEFT's `weight.data += delta`); use a registered config
or `qlora_ext.merge_lora` on our own `add_lora` layers.

This module imports peft; `import qlora_ext` does not import it (qlora_ext works without peft).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .functional import dequantize_4bit, quantize_4bit
from .nn import Linear4bit, LoraLinear4bit

__all__ = ["Linear4bitLoRA", "register", "dispatch"]


def _base(target):
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


class Linear4bitLoRA(_PeftLoraLinear):
    """PEFT's LoRA Linear on a qlora_ext Linear4bit: PEFT's forward (base = our 4-bit kernels, plus the LoRA
    branch in the adapter's dtype), with merge / unmerge into the 4-bit weight by dequantize + add +
    requantize (the requantization error is that of quantizing W + dW, like PEFT on bitsandbytes)."""

    def __init__(self, base_layer, adapter_name: str, **kwargs):
        base = _base(base_layer)
        if not isinstance(base, Linear4bit) or isinstance(base, LoraLinear4bit):
            raise TypeError(f"Linear4bitLoRA wraps a qlora_ext Linear4bit without qlora_ext adapters, got "
                            f"{type(base).__name__}")
        super().__init__(base_layer, adapter_name, **kwargs)

    def _requantize(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        qs = base.quant_state
        if not torch.isfinite(w).all():
            raise ValueError("NaN or Inf in the merged weights: the adapter seems to be broken")
        packed, state = quantize_4bit(w.to(qs.dtype), qs.blocksize, qs.quant_type, qs.nested, base.weight.dtype)
        base._set_quantized(packed, state)

    def _check_plain(self, adapter: str) -> None:
        if adapter in self.lora_variant or self.lora_bias[adapter]:
            raise ValueError(f"adapter {adapter!r}: merging DoRA / LoRA variants or lora_bias into a 4-bit weight "
                             f"is not supported")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A.keys():
                continue
            self._check_plain(adapter)
            base = self.get_base_layer()
            w = dequantize_4bit(base.weight, base.quant_state).float()
            w += self.get_delta_weight(adapter).float().to(w.device)
            self._requantize(w)  # always checked for NaN / Inf: safe_merge costs nothing more here
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            base = self.get_base_layer()
            w = dequantize_4bit(base.weight, base.quant_state).float()
            w -= self.get_delta_weight(adapter).float().to(w.device)
            self._requantize(w)

    def __repr__(self) -> str:
        return "qlora_ext." + super().__repr__()


def dispatch(target, adapter_name: str, config=None, **kwargs):
    """A PEFT LoRA dispatcher: a Linear4bitLoRA for a qlora_ext Linear4bit, None for anything else."""
    base = _base(target)
    if isinstance(base, Linear4bit) and not isinstance(base, LoraLinear4bit):
        return Linear4bitLoRA(target, adapter_name, config=config, **kwargs)
    return None


def register(lora_config):
    """Registers Linear4bitLoRA for qlora_ext's Linear4bit on a PEFT LoraConfig (PEFT's public custom-module
    API), so that models built from it can merge adapters into the 4-bit weights. Returns the config."""
    from peft import LoraConfig
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"register needs a peft.LoraConfig, got {type(lora_config).__name__}")
    lora_config._register_custom_module({Linear4bit: Linear4bitLoRA})
    return lora_config
