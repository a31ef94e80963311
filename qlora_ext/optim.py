"""Fused AdamW and Lion optimizers with float32 or blockwise 8-bit state, optionally paged (CUDA managed memory).

Drop-in replacements for ``torch.optim.AdamW`` (lr, betas, eps, weight_decay; amsgrad off): param groups,
lr schedulers, ``zero_grad``, ``state_dict()`` / ``load_state_dict()`` work as in torch. Each parameter tensor
is updated by one fused kernel (a vectorized multithreaded loop on CPU, one CUDA kernel on GPU) reading and
writing parameter, gradient and state once.

* ``AdamW`` / ``PagedAdamW``: float32 state (``exp_avg``, ``exp_avg_sq``, torch's keys), also for float16 /
  bfloat16 parameters.
* ``AdamW8bit`` / ``PagedAdamW8bit``: blockwise 8-bit state (signed dynamic map for ``exp_avg``, unsigned for
  ``exp_avg_sq``, a float32 absmax per 256 elements under ``<name>_absmax``); tensors with fewer than
  ``min_8bit_size`` (4096) elements keep float32 state.
* ``Lion`` / ``PagedLion`` (and ``Lion8bit`` / ``PagedLion8bit``): one state, ``exp_avg``.

Paged optimizers keep their state on CUDA in managed memory (one allocation per device and step that creates
state and dtype), refuse any allocation larger than the free GPU memory, prefetch the state to the GPU on the current
stream before every step, move it to host memory on ``page_out()`` (the next step brings it back), and free it
when the optimizer is deleted. On CPU every class works with its state in ordinary host memory (``paged`` and
``gpu_budget_bytes`` are accepted and ignored there), with the same kernels.

Non-finite gradients: an element whose gradient is NaN or +-Inf (AdamW: or whose square overflows float32) is
skipped - its parameter and state keep their values - while every other element is updated; the step count
advances. (torch.optim.AdamW would write NaN into the parameter and its state instead.) To skip whole steps
on overflow, use ``torch.amp.GradScaler``, which works with these optimizers.

Resume is exact: the state_dict holds every bit of the state, and a fresh optimizer (in a fresh process) that
loads it continues bit-identically to the uninterrupted run.

FSDP2 (DTensor parameters): each rank updates its local shard with the same kernels and keeps state for that
shard only; ``state_dict()`` returns the state as DTensors sharded like their parameters (what
torch.distributed.checkpoint saves shard by shard) and ``load_state_dict`` takes them back. Blockwise 8-bit
state is not shardable that way (its absmax blocks follow the local shard), so the 8-bit classes refuse it.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Dict, Iterable, List, Optional

import torch

from ._ops import FLOAT_DTYPES, OPTIM_BLOCK, ops
from .functional import get_code

MIN_8BIT_SIZE = 4096
_ALIGN = 64  # bytes: every state buffer in an arena starts on a cache line (and a 16-byte vector boundary)

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Lion", "Lion8bit", "PagedLion", "PagedLion8bit"]


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t):
    """The local shard of an FSDP2 DTensor parameter / gradient / state (the tensor itself otherwise)."""
    return t.to_local() if _is_dtensor(t) else t


def _zero_index(name: str) -> int:
    """Index of 0.0 in a dynamic map: the encoding of a zero state."""
    code = get_code(name)
    idx = (code == 0).nonzero()
    assert idx.numel() == 1, f"{name} must hold 0.0 exactly once"
    return int(idx)


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery: state layout and allocation, paging, the fused step, exact state_dict round trips."""

    _kind = "adamw"  # or "lion"
    _moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, defaults: dict, *, optim_bits: int, paged: bool, min_8bit_size: int,
                 gpu_budget_bytes: Optional[int]):
        _check_hparams(type(self).__name__, defaults)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")
        if gpu_budget_bytes is not None:
            if not paged:
                raise ValueError("gpu_budget_bytes needs a paged optimizer (paged=True)")
            if not isinstance(gpu_budget_bytes, int) or gpu_budget_bytes < 0:
                raise ValueError(f"gpu_budget_bytes must be a non-negative int, got {gpu_budget_bytes!r}")
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.paged = bool(paged)
        self.min_8bit_size = min_8bit_size
        self.gpu_budget_bytes = gpu_budget_bytes
        self._arenas: List[torch.Tensor] = []  # the memory every state tensor is a view of
        self._paged_out = False

    # ---- state layout and allocation ----
    def _layout(self, p: torch.Tensor):
        """[(key, shape, dtype)] of the state of parameter p (besides 'step'); of its local shard for a DTensor."""
        p = _local(p)
        eight = self.optim_bits == 8 and p.numel() >= self.min_8bit_size
        out = []
        for name in self._moments:
            if eight:
                out.append((name, tuple(p.shape), torch.uint8))
                out.append((name + "_absmax", (-(-p.numel() // OPTIM_BLOCK),), torch.float32))
            else:
                out.append((name, tuple(p.shape), torch.float32))
        return out

    def _new_arena(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if self.paged and device.type == "cuda":
            if nbytes > torch.cuda.mem_get_info(device)[0]:
                torch.cuda.empty_cache()  # memory cached by torch's allocator counts as used by the driver
            arena = ops.paged_empty(nbytes, device)  # refuses more than the free GPU memory
            ops.paged_prefetch(arena, False)  # populate on the GPU rather than page-faulting in the fill below
        else:
            arena = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._arenas.append(arena)
        return arena

    def _init_state(self, params: List[torch.Tensor]) -> None:
        """Zero state for `params`: per device, one arena for the 8-bit codes and one for the float32 state
        (one allocation and one prefetch each per step; torch.save needs every storage viewed as one dtype)."""
        zero_s, zero_u = _zero_index("dynamic_signed"), _zero_index("dynamic_unsigned")
        plans: Dict[tuple, list] = {}
        for p in params:
            for key, shape, dtype in self._layout(p):
                plans.setdefault((_local(p).device, dtype), []).append((p, key, shape))
        for (device, dtype), plan in plans.items():
            size = torch.empty((), dtype=dtype).element_size()
            align = _ALIGN // size
            offsets, total = [], 0
            for _, _, shape in plan:
                offsets.append(total)
                total += -(-math.prod(shape) // align) * align
            arena = self._new_arena(max(total, align) * size, device).view(dtype)
            for (p, key, shape), off in zip(plan, offsets):
                t = arena[off:off + math.prod(shape)].view(shape)
                if dtype == torch.uint8:  # 8-bit codes of 0.0
                    t.fill_(zero_s if key == "exp_avg" else zero_u)
                else:
                    t.zero_()
                self.state[p][key] = t
        for p in params:
            self.state[p]["step"] = torch.tensor(0.0)  # as torch.optim.AdamW: a float32 CPU scalar

    def state_bytes(self) -> int:
        """Bytes of memory this optimizer holds for state (its arenas, alignment included; not the step counts)."""
        return sum(a.numel() for a in self._arenas)

    # ---- paging ----
    def _paged_arenas(self) -> List[torch.Tensor]:
        return [a for a in self._arenas if self.paged and a.is_cuda]

    def page_out(self) -> int:
        """Moves all paged state to host memory and waits until it is there, freeing its GPU memory for a spike;
        the next step brings it back. Returns the bytes moved (0 on CPU or for a non-paged optimizer)."""
        arenas = self._paged_arenas()
        for a in arenas:
            ops.paged_prefetch(a, True)
        for dev in {a.device for a in arenas}:
            torch.cuda.current_stream(dev).synchronize()
        self._paged_out = self._paged_out or bool(arenas)
        return sum(a.numel() for a in arenas)

    def _page_in(self) -> None:
        arenas = self._paged_arenas()
        if self._paged_out:
            # Never oversubscribe: bringing back more than the GPU has free could stall the machine.
            for dev in {a.device for a in arenas}:
                need = sum(a.numel() for a in arenas if a.device == dev)
                if need > torch.cuda.mem_get_info(dev)[0]:
                    torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info(dev)[0]
                if need > free:
                    raise RuntimeError(
                        f"{type(self).__name__}: cannot bring {need} bytes of paged optimizer state back to {dev}: "
                        f"only {free} bytes are free; free GPU memory before the next step")
            self._paged_out = False
        for a in arenas:  # asynchronous, ordered before the step's kernels on the current stream
            ops.paged_prefetch(a, False)

    def _apply_budget(self) -> None:
        if self.gpu_budget_bytes is None:
            return
        for dev in {a.device for a in self._paged_arenas()}:
            if torch.cuda.mem_get_info(dev)[0] < self.gpu_budget_bytes:
                self.page_out()
                return

    # ---- the step ----
    def _check_param(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        name = type(self).__name__
        if grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                               "use torch.optim.SparseAdam")
        if p.is_complex() or grad.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters or gradients (shape {tuple(p.shape)}); "
                               "optimize torch.view_as_real(param) instead")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} updates float32, float16 or bfloat16 parameters, got {p.dtype} "
                            f"(shape {tuple(p.shape)})")
        if grad.dtype != p.dtype:
            raise TypeError(f"{name}: the gradient is {grad.dtype} but the parameter is {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure()'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        for group in self.param_groups:
            _check_hparams(type(self).__name__, {k: v for k, v in group.items() if k != "params"})
            for p in group["params"]:
                if p.grad is not None:
                    self._check_param(_local(p), _local(p.grad))
                    todo.append((group, p))
        fresh = [p for _, p in todo if not self.state[p]]
        if fresh:
            self._init_state(fresh)
        self._page_in()
        for group, p in todo:
            st = self.state[p]
            st["step"] += 1
            beta1, beta2 = group["betas"]
            ops.optimizer_step(_local(p), _local(p.grad), st["exp_avg"], st.get("exp_avg_sq"), st.get("exp_avg_absmax"),
                               st.get("exp_avg_sq_absmax"), self._kind, int(st["step"].item()), float(group["lr"]),
                               float(beta1), float(beta2), float(group.get("eps", 0.0)),
                               float(group["weight_decay"]))
        self._apply_budget()
        return loss

    # ---- exact state_dict round trips ----
    def state_dict(self) -> dict:
        """torch's state_dict; the state of a DTensor parameter as DTensors sharded like it (see the header)."""
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for idx, st in sd["state"].items():
            p = params[idx]
            if _is_dtensor(p):  # new dicts: the originals are this optimizer's live state
                sd["state"][idx] = {k: v if k == "step" else self._as_dtensor(p, k, v) for k, v in st.items()}
        return sd

    def _as_dtensor(self, p, key: str, value: torch.Tensor):
        from torch.distributed.tensor import DTensor
        if value.dtype == torch.uint8 or key.endswith("_absmax"):
            raise RuntimeError(f"{type(self).__name__}: blockwise 8-bit state of a sharded (DTensor) parameter "
                               f"cannot be saved as a sharded state_dict; use a 32-bit optimizer with FSDP")
        return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict of this optimizer class (or torch.optim.AdamW's, into the 32-bit AdamW classes).

        Every state tensor is validated against its parameter (keys, shapes, dtypes) before anything changes,
        then copied bit for bit into freshly allocated state (paged memory for paged optimizers). Unlike
        torch.optim.Optimizer, 8-bit codes and float32 state are never cast to the parameter's dtype.
        """
        name = type(self).__name__
        state_dict = {**state_dict, "state": {k: ({kk: _local(vv) for kk, vv in v.items()} if isinstance(v, dict)
                                                  else v) for k, v in state_dict["state"].items()}}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            raise ValueError(f"{name}: the state_dict has parameter groups of sizes "
                             f"{[len(g['params']) for g in saved_groups]}, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for g in saved_groups:
            _check_hparams(name, {k: v for k, v in g.items() if k != "params"})
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        loaded = {}
        for k, v in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"{name}: the state_dict has state for parameter {k!r}, which no group lists")
            loaded[id_map[k]] = self._validated(k, id_map[k], v)
        super().load_state_dict({**state_dict, "state": {}})
        self._arenas = []
        self._paged_out = False
        self._init_state(list(loaded))
        for p, values in loaded.items():
            for key, value in values.items():
                self.state[p][key].copy_(value)

    def _validated(self, k, p: torch.Tensor, v) -> dict:
        name = type(self).__name__
        where = f"{name}: state of parameter {k} (shape {tuple(p.shape)})"
        if not isinstance(v, dict) or "step" not in v:
            raise ValueError(f"{where} must be a dict with a 'step'")
        layout = self._layout(p)
        expected = {key for key, _, _ in layout}
        if set(v) - {"step"} != expected:
            raise ValueError(f"{where} has keys {sorted(set(v) - {'step'})}, but {name} (optim_bits="
                             f"{self.optim_bits}, min_8bit_size={self.min_8bit_size}) keeps {sorted(expected)} for it")
        out = {}
        step = v["step"]
        step_value = float(step.item() if isinstance(step, torch.Tensor) else step)
        if not (step_value >= 0 and step_value == int(step_value)):
            raise ValueError(f"{where}: step must be a non-negative integer, got {step_value}")
        out["step"] = torch.tensor(step_value)
        for key, shape, dtype in layout:
            t = v[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: '{key}' has shape {got}, expected {shape} - is this the state_dict "
                                 "of an optimizer over the same parameters?")
            # 8-bit codes and absmax are taken bit for bit; float32 state also accepts torch.optim.AdamW's
            # float16 / bfloat16 state (exactly representable in float32).
            ok = t.dtype == dtype if (dtype == torch.uint8 or key.endswith("_absmax")) else t.is_floating_point()
            if not ok:
                raise ValueError(f"{where}: '{key}' is {t.dtype}, expected {dtype}")
            out[key] = t
        return out


def _check_hparams(name: str, h: dict) -> None:
    """torch.optim.AdamW's argument checks, made strict about NaN / Inf (torch accepts lr=inf, eps=inf and
    weight_decay=inf and then writes NaN into the parameters), plus the options these optimizers do not
    implement. Run at construction, on load_state_dict and before every step (a scheduler or the user may
    change a group's values)."""
    def finite(v) -> bool:
        v = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0.0

    if not finite(h.get("lr", 0.0)):
        raise ValueError(f"{name}: invalid learning rate {h.get('lr')!r}, must be a finite number >= 0")
    if "eps" in h and not finite(h["eps"]):
        raise ValueError(f"{name}: invalid epsilon value {h['eps']!r}, must be a finite number >= 0")
    betas = h.get("betas", (0.9, 0.999))
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(finite(b) and float(b) < 1.0 for b in betas)):
        raise ValueError(f"{name}: invalid betas {betas!r}, must be two numbers in [0, 1)")
    wd = h.get("weight_decay", 0.0)
    if not finite(wd):
        raise ValueError(f"{name}: invalid weight_decay value {wd!r}, must be a finite number >= 0")
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if h.get(flag):
            raise ValueError(f"{name}: {flag}=True is not supported")
    if h.get("decoupled_weight_decay") is False and wd:  # torch.optim.Adam's L2 penalty is another update
        raise ValueError(f"{name}: these groups use L2 weight decay (decoupled_weight_decay=False, "
                         "torch.optim.Adam); AdamW decouples it")


class AdamW(_FusedOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) in one fused kernel per tensor.

    ``optim_bits=8`` keeps blockwise 8-bit state, ``paged=True`` keeps state in CUDA managed memory with an
    optional ``gpu_budget_bytes``: after a step, if the GPU has less free memory than that (cudaMemGetInfo, so
    memory cached by torch's allocator counts as used), the state is paged out until the next step.
    """

    _kind = "adamw"
    _moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, optim_bits: int = 32, paged: bool = False,
                 min_8bit_size: int = MIN_8BIT_SIZE, gpu_budget_bytes: Optional[int] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, optim_bits=optim_bits, paged=paged, min_8bit_size=min_8bit_size,
                         gpu_budget_bytes=gpu_budget_bytes)


class AdamW8bit(AdamW):
    """AdamW with blockwise 8-bit state (tensors under ``min_8bit_size`` elements keep float32 state)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits=8, min_8bit_size=min_8bit_size)


class PagedAdamW(AdamW):
    """AdamW with float32 state in paged (CUDA managed) memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 gpu_budget_bytes: Optional[int] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, paged=True, gpu_budget_bytes=gpu_budget_bytes)


class PagedAdamW8bit(AdamW):
    """AdamW with blockwise 8-bit state in paged (CUDA managed) memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 min_8bit_size: int = MIN_8BIT_SIZE, gpu_budget_bytes: Optional[int] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits=8, paged=True,
                         min_8bit_size=min_8bit_size, gpu_budget_bytes=gpu_budget_bytes)


class Lion(_FusedOptimizer):
    """Lion (Chen et al. 2023): p = p * (1 - lr * wd) - lr * sign(b1 * m + (1 - b1) * g); m = b2 * m + (1 - b2) * g."""

    _kind = "lion"
    _moments = ("exp_avg",)

    def __init__(self, params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 optim_bits: int = 32, paged: bool = False, min_8bit_size: int = MIN_8BIT_SIZE,
                 gpu_budget_bytes: Optional[int] = None):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits=optim_bits, paged=paged, min_8bit_size=min_8bit_size,
                         gpu_budget_bytes=gpu_budget_bytes)


class Lion8bit(Lion):
    """Lion with blockwise 8-bit state."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, weight_decay, optim_bits=8, min_8bit_size=min_8bit_size)


class PagedLion(Lion):
    """Lion with float32 state in paged (CUDA managed) memory."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 gpu_budget_bytes: Optional[int] = None):
        super().__init__(params, lr, betas, weight_decay, paged=True, gpu_budget_bytes=gpu_budget_bytes)


class PagedLion8bit(Lion):
    """Lion with blockwise 8-bit state in paged (CUDA managed) memory."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 min_8bit_size: int = MIN_8BIT_SIZE, gpu_budget_bytes: Optional[int] = None):
        super().__init__(params, lr, betas, weight_decay, optim_bits=8, paged=True, min_8bit_size=min_8bit_size,
                         gpu_budget_bytes=gpu_budget_bytes)
