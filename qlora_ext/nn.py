"""4-bit layers: Linear4bit (a frozen NF4/FP4 weight in the bitsandbytes layout, forward = matmul_4bit) and
LoraLinear4bit (Linear4bit + named LoRA adapters, one active: y = W4 x + b + scaling * B(A(dropout(x)))).

State dicts use exactly the bitsandbytes keys (`P.weight` packed, `P.weight.absmax`, ... see
shared/spec/nf4-format.md); LoRA weights live under `P.lora_A.<adapter>.weight` / `P.lora_B.<adapter>.weight`,
PEFT's in-memory layout, so PEFT's file format is the same keys with the adapter name dropped.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, Optional

import torch
from torch import nn

from ._ops import _C
from .functional import QuantState, dequantize_4bit, matmul_4bit, quantize_4bit

__all__ = ["Linear4bit", "LoraLinear4bit", "LoraDropout"]


def _packed_numel(out_features: int, in_features: int, storage: torch.dtype) -> int:
    nbytes = (out_features * in_features + 1) // 2
    if nbytes % storage.itemsize:
        raise ValueError(f"{nbytes} packed bytes of a [{out_features}, {in_features}] weight cannot be viewed as "
                         f"{storage}")
    return nbytes // storage.itemsize


class LoraDropout(nn.Dropout):
    """nn.Dropout for the LoRA branch. On CPU float32 it runs qlora_ext's Philox kernel: the keep mask is a pure
    function of a seed drawn from torch's default generator (so torch.manual_seed and the RNG-state replay of
    gradient checkpointing reproduce it) and of the element index, nothing is stored for backward, and it costs
    about a tenth of torch's CPU bernoulli_ + mul (which took ~20% of a SmolLM2 QLoRA training step). Elsewhere
    (CUDA, other dtypes) it is torch's own dropout, already fused there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.inplace:
            return super().forward(x)
        seed = int(torch.randint(2**63 - 1, (), dtype=torch.int64))
        return torch.ops.qlora_ext.lora_dropout(x, self.p, seed)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and its relatives): a linear layer with its weight stored [in, out]."""
    tf = sys.modules.get("transformers.pytorch_utils")  # not imported: no Conv1D can exist
    return tf is not None and isinstance(module, tf.Conv1D)


class Linear4bit(nn.Linear):
    """A Linear layer whose weight is stored in 4 bits (frozen); the bias, if any, stays a float parameter.

    A subclass of nn.Linear (as bitsandbytes' Linear4bit is), so that code looking for linear layers (PEFT's
    "all-linear" and its LoRA dispatch, transformers' target lists) finds it; nn.Linear's float weight is never
    created, and anything that would read `weight` as an [out, in] float matrix must go through
    `dequantized_weight()`.

    `weight` is the packed parameter (shape [(N*K + 1) // 2 // itemsize, 1] of the storage dtype, never
    trainable) and `quant_state` the QuantState that decodes it. Inputs are cast to `compute_dtype` (default:
    the original weight dtype) and the output back to the input dtype, as bitsandbytes does.

    `source_transposed` is True for a layer that replaced transformers' `Conv1D` (GPT-2 and its relatives),
    whose float weight is stored [in, out]: the 4-bit weight is [out, in] like any other (the layout
    bitsandbytes gives it), and float weights read from or written to the original model's checkpoints are
    transposed on the way (`from_linear`, the loaders, `export_merged`).
    """

    source_transposed = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=None,
                 quant_storage: torch.dtype = torch.uint8, device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float [out, in] weight
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        # placeholder until quantized weights are assigned (from_linear, load_state_dict or a loader)
        self.weight = nn.Parameter(torch.empty(_packed_numel(out_features, in_features, quant_storage), 1,
                                               dtype=quant_storage, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.quant_state: Optional[QuantState] = None

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, torch.Tensor):
            # packed bytes are never initialised as a float weight: transformers' _init_weights sees an nn.Linear
            # and would run normal_ on whatever weight a loader put here (it skips tensors with this flag)
            value._is_hf_initialized = True
        super().__setattr__(name, value)

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    quant_storage: torch.dtype = torch.uint8, compute_dtype=None) -> "Linear4bit":
        """Quantizes a float nn.Linear or transformers Conv1D (on its device); the bias is kept as it is (shared,
        not copied)."""
        conv1d = is_conv1d(linear)
        if not (conv1d or isinstance(linear, nn.Linear)):
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.is_meta:
            raise ValueError("cannot quantize a Linear whose weight is on the meta device (not loaded yet)")
        packed, state = quantize_4bit(w.t() if conv1d else w, blocksize, quant_type, double_quant, quant_storage)
        m = cls.from_quantized(packed, state, linear.bias, compute_dtype).train(linear.training)
        m.source_transposed = conv1d
        return m

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                       compute_dtype=None) -> "Linear4bit":
        """Wraps an already packed weight and its QuantState (e.g. read from a checkpoint)."""
        if len(state.shape) != 2:
            raise ValueError(f"a Linear4bit weight must be 2-D, got shape {list(state.shape)}")
        out_features, in_features = state.shape
        with torch.device("meta"):
            m = cls(in_features, out_features, bias is not None, compute_dtype, packed.dtype)
        m._set_quantized(packed, state)
        if bias is not None:
            m.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        return m

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Assigns packed bytes + state after checking they describe this layer's [out, in] weight."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {list(state.shape)} does not fit a Linear4bit "
                             f"[{self.out_features}, {self.in_features}]")
        n = self.out_features * self.in_features
        if packed.numel() * packed.element_size() != (n + 1) // 2:
            raise ValueError(f"packed weight has {packed.numel() * packed.element_size()} bytes, a "
                             f"[{self.out_features}, {self.in_features}] weight needs {(n + 1) // 2}")
        if type(self.weight).__name__ == "DTensor":
            self._load_sharded(packed)
        else:
            self.weight = nn.Parameter(packed.detach().reshape(-1, 1), requires_grad=False)
        self.quant_state = state.to(packed.device)

    @torch.no_grad()
    def _load_sharded(self, packed: torch.Tensor) -> None:
        """Loads packed bytes into an FSDP2-sharded weight in place: FSDP owns that DTensor parameter and would
        lose track of a replacement. `packed` is a DTensor (a sharded state dict) or the whole tensor (each
        rank keeps its own shard of it)."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        w = self.weight
        if packed.dtype != w.dtype:
            if isinstance(packed, DTensor):
                raise ValueError(f"packed weight stored as {packed.dtype} cannot be loaded into a sharded "
                                 f"{w.dtype} quant_storage")
            packed = packed.contiguous().view(torch.uint8).view(w.dtype)  # the same bytes
        packed = packed.reshape(w.shape)
        if not isinstance(packed, DTensor):
            packed = distribute_tensor(packed.to(w.device), w.device_mesh, w.placements)
        w.copy_(packed)

    @property
    def is_quantized(self) -> bool:
        return self.quant_state is not None

    def _check_ready(self):
        if self.quant_state is None:
            raise RuntimeError("this Linear4bit holds no quantized weight yet (build it with from_linear / "
                               "from_quantized or load a state dict)")

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float [out, in] weight the 4-bit codes represent (in `dtype`, default the original dtype)."""
        self._check_ready()
        if dtype is None:
            return dequantize_4bit(self.weight, self.quant_state)
        out = torch.empty(self.quant_state.shape, dtype=dtype, device=self.weight.device)
        return dequantize_4bit(self.weight, self.quant_state, out=out)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        cd = self.compute_dtype or self.quant_state.dtype
        bias = None if self.bias is None else self.bias.to(cd)
        return matmul_4bit(x.to(cd), self.weight, self.quant_state, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._base_forward(x).to(x.dtype)

    # ---- device moves and dtype casts ----
    def _apply(self, fn, recurse=True):
        # model.half() / .to(bfloat16) must never convert the packed bytes (a float quant_storage would be
        # value-converted and destroyed) nor the float32 scales: run fn on a uint8 view of the packed weight,
        # which only device moves affect, and let the QuantState follow the packed weight's device.
        packed = self._parameters.get("weight")
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = packed
        if packed is not None:
            moved = fn(packed.data.view(torch.uint8))
            if moved is not packed.data.view(torch.uint8) or moved.device != packed.device:
                self.weight = nn.Parameter(moved.view(packed.dtype), requires_grad=False)
            if self.quant_state is not None and self.quant_state.absmax.device != self.weight.device:
                self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # ---- the bitsandbytes state-dict layout ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quant_state is not None:
            entries = self.quant_state.as_dict(prefix + "weight.")
            # the code tables are one cached tensor shared by every layer; a checkpoint stores a copy per layer
            # (safetensors and transformers' save refuse tensors that share memory)
            for k in (prefix + "weight.quant_map", prefix + "weight.nested_quant_map"):
                if k in entries:
                    entries[k] = entries[k].clone()
            destination.update(entries)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The packed weight's QuantState comes from the `weight.*` entries, validated (ValueError naming the key)
        # before anything is assigned; the bias and children load the usual way.
        key = prefix + "weight"
        if key in state_dict:
            entries = {k: v for k, v in state_dict.items() if k.startswith(key + ".")}
            state = QuantState.from_dict(entries, prefix=key + ".", device=state_dict[key].device)
            self._set_quantized(state_dict[key], state)
        else:
            missing_keys.append(key)
        packed = self._parameters["weight"]
        self._parameters["weight"] = None  # skipped by the generic loader
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._parameters["weight"] = packed
        unexpected_keys[:] = [k for k in unexpected_keys if k != key and not k.startswith(key + ".")]

    def extra_repr(self) -> str:
        qs = self.quant_state
        fmt = f", {qs.quant_type}, blocksize={qs.blocksize}, double_quant={qs.nested}" if qs is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{fmt}, compute_dtype={self.compute_dtype}")


def check_lora_args(r, lora_alpha, lora_dropout, use_rslora=False) -> None:
    """LoRA hyperparameters as they enter (add_lora, add_adapter): ValueError naming the bad one. NaN / Inf
    alpha or dropout would silently train nothing (or NaN)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if (not isinstance(lora_dropout, (int, float)) or isinstance(lora_dropout, bool)
            or not 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be a bool, got {use_rslora!r}")


_CPU_BF16_GEMM = bool(_C.cpu_bf16_gemm())  # fixed for the process (the C++ side reads its settings once)


def _lora_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the LoRA products: on CPU, 16-bit ones are widened to float32 (as the 4-bit matmul widens its
    inputs) unless the CPU multiplies bfloat16 natively (AVX512-BF16, `_C.cpu_bf16_gemm()`): without it torch's
    16-bit CPU GEMMs are many times slower than float32."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and \
            not (dtype == torch.bfloat16 and _CPU_BF16_GEMM):
        return torch.float32
    return dtype


class LoraLinear4bit(Linear4bit):
    """Linear4bit plus LoRA adapters: y = W4 x + b + scaling * B(A(dropout(x))) for the active adapter.

    Adapters are named; exactly one (or none) is active, and only the active one is trainable. A is
    kaiming-uniform initialised (a = sqrt(5)), B zeros, so a fresh adapter leaves the output unchanged;
    scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). LoRA weights are kept in `lora_dtype`
    (default float32, as PEFT upcasts them) and the input is cast to it for the LoRA branch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=None,
                 quant_storage: torch.dtype = torch.uint8, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, compute_dtype, quant_storage, device, dtype)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: Dict[str, float] = {}
        self.lora_config: Dict[str, dict] = {}
        self.active_adapter: Optional[str] = None

    @classmethod
    def from_linear4bit(cls, base: Linear4bit, r: int = 64, lora_alpha: float = 16, lora_dropout: float = 0.05,
                        use_rslora: bool = False, adapter_name: str = "default",
                        lora_dtype: torch.dtype = torch.float32) -> "LoraLinear4bit":
        """A LoraLinear4bit sharing `base`'s packed weight, QuantState and bias, with one new adapter. `base` may
        still be on the meta device, not yet quantized (a deferred build, as load_sharded's): see add_adapter."""
        if not base.weight.is_meta:
            base._check_ready()
        with torch.device("meta"):
            m = cls(base.in_features, base.out_features, base.bias is not None, base.compute_dtype,
                    base.weight.dtype)
        m.weight, m.quant_state, m.bias = base.weight, base.quant_state, base.bias
        m.source_transposed = base.source_transposed
        m.train(base.training)
        m.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, lora_dtype)
        return m

    @property
    def adapters(self):
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                    lora_dtype: torch.dtype = torch.float32) -> None:
        """Adds a freshly initialised adapter and makes it the active one. The adapter lives on the packed weight's
        device; while that weight is still on the meta device (a model built for deferred loading, e.g. by
        qlora_ext.distributed.load_sharded) the adapter is created on the CPU, for real: initialised from the
        global RNG exactly as on a loaded model, so it does not depend on how the base was loaded."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        check_lora_args(r, lora_alpha, lora_dropout, use_rslora)
        if lora_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"lora_dtype must be a float dtype, got {lora_dtype}")
        device = torch.device("cpu") if self.weight.is_meta else self.weight.device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = LoraDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # a new module defaults to training mode; follow ours
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_config[name] = dict(r=r, lora_alpha=lora_alpha, lora_dropout=float(lora_dropout),
                                      use_rslora=bool(use_rslora))
        self.set_adapter(name)

    def set_adapter(self, name: Optional[str]) -> None:
        """Makes `name` the active (and only trainable) adapter; None runs the base layer alone."""
        if name is not None and name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (has {self.adapters})")
        self.active_adapter = name
        for n in self.lora_A:
            self.lora_A[n].weight.requires_grad_(n == name)
            self.lora_B[n].weight.requires_grad_(n == name)

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (has {self.adapters})")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name], self.lora_config[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: Optional[str] = None) -> torch.Tensor:
        """scaling * B @ A of an adapter (default: the active one), float32 [out, in]."""
        name = self.active_adapter if name is None else name
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (has {self.adapters})")
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        name = self.active_adapter
        if name is None:
            return y.to(x.dtype)
        # in the wider of x's and the adapter's dtypes: 16-bit adapters (lora_dtype) under float32 activations
        # are a storage format, widened here (their gradients come back in their own dtype)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        cd = _lora_compute_dtype(torch.promote_types(x.dtype, a.dtype), x.device)
        a, b = a.to(cd), b.to(cd)
        xa = self.lora_dropout[name](x.to(cd)) @ a.t()
        # y + scaling * xa @ B^T as one GEMM accumulating into y (beta = 1): no separate [M, N] LoRA output,
        # scaling pass and addition over the output.
        out = torch.addmm(y.reshape(-1, self.out_features).to(cd), xa.reshape(-1, xa.shape[-1]), b.t(),
                          alpha=self.scaling[name])
        return out.view(*y.shape[:-1], self.out_features).to(x.dtype)

    def to_linear4bit(self) -> Linear4bit:
        """The base layer alone (sharing the packed weight, state and bias), adapters dropped."""
        base = Linear4bit.from_quantized(self.weight, self.quant_state, self.bias, self.compute_dtype)
        base.source_transposed = self.source_transposed
        return base.train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", adapters={self.adapters}, active={self.active_adapter!r}"
