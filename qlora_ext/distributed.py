"""Multi-process QLoRA on PyTorch's own engine: DDP (model replicated, LoRA gradients all-reduced) or FSDP2
(`fully_shard` per decoder layer: packed 4-bit weights, stored in a float quant_storage, are sharded and
gathered like any parameter; each QuantState is small and replicated), with sharded checkpoints of adapters +
optimizer through torch.distributed.checkpoint (DCP). Started by torchrun (RANK / WORLD_SIZE / ... in the env).

The trainer sees: `init` (process group + this rank's device), `wrap` (the model behind one module whose
forward runs any function of the inner model, so DDP's and FSDP2's hooks see every training and evaluation
pass), `rank_share` (its part of a global batch), `gathered` (whole weights, to write the PEFT adapter) and
`save_state` / `load_state` (adapters + optimizer, sharded, through DCP; qlora_ext.checkpoint lays out the
rest of a checkpoint).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import _io
from .errors import SetupError

MODES = ("ddp", "fsdp")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(SetupError):
    """A distributed run that cannot start (no torchrun environment, a batch that does not split, ...)."""


@dataclass(frozen=True)
class Context:
    mode: str
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(mode: str, device: str = "auto") -> Context:
    """Joins the process group torchrun set up: gloo on CPU, NCCL on CUDA (one GPU per local rank)."""
    if mode not in MODES:
        raise DistributedSetupError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"--distributed {mode} must be started by torchrun (missing {', '.join(missing)} in the environment): "
            f"torchrun --nproc-per-node N -m qlora_ext finetune --distributed {mode} ...")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {device}: CUDA is not available on this machine")
        dev = torch.device("cuda", local)  # one GPU per local rank, whatever index was named
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise DistributedSetupError(f"--device {device}: only cpu and cuda are supported")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.get_world_size() != world:
        raise DistributedSetupError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return Context(mode, rank, world, dev)


def shutdown(clean: bool = True) -> None:
    """Leaves the process group; after a clean run, only once every rank is done (none tears the group down
    while another is still in a collective). After an error no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def rank_share(indices: List[int], rank: int, world: int) -> List[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one, like torch.chunk)."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (rank < extra)]


# ---------------------------------------------------------------------------------------------------------
# the model


class Runner(nn.Module):
    """`runner(fn, *args)` = fn(model, *args) inside this module's forward. DDP must see the forward to sync
    gradients, and FSDP2 gathers the parameters not owned by a decoder layer (embeddings, final norm, LM head)
    in the root module's forward; the trainer calls the inner model in several ways (the chunked-head loss
    reaches for `model.model` and `lm_head.weight` directly, evaluation generates), so each one runs through
    here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (transformers names their classes in _no_split_modules)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedSetupError(f"{type(model).__name__}: cannot find its decoder layers (no "
                                    f"_no_split_modules), so FSDP2 has no unit to shard")
    return layers


def check_fsdp_storage(model: nn.Module) -> torch.dtype:
    """FSDP2 gathers each unit's parameters in one buffer of one dtype: the packed 4-bit weights must be stored
    as the same float dtype as the unit's other parameters (the bytes viewed as float32 / bfloat16)."""
    from .nn import Linear4bit
    for layer in decoder_layers(model):
        dtypes = {p.dtype for p in layer.parameters()}
        packed = {m.weight.dtype for m in layer.modules() if isinstance(m, Linear4bit)}
        if len(dtypes) != 1 or not all(d.is_floating_point for d in packed):
            raise DistributedSetupError(
                f"FSDP2 needs one float dtype per decoder layer, got {sorted(map(str, dtypes))} (packed 4-bit "
                f"weights in {sorted(map(str, packed))}): quantize with quant_storage equal to the other "
                f"parameters' dtype (QLoRAConfig(quant_storage=torch.float32))")
    return dtypes.pop()


def wrap(model: nn.Module, ctx: Context) -> Runner:
    """The model ready for ctx.mode: DDP over the whole Runner, or FSDP2 with one unit per decoder layer
    and the Runner as root. Every rank must hold the same model (same checkpoint, same seed)."""
    runner = Runner(model)
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers at construction: the adapters start identical even if
        # a rank's RNG drifted
        return DDP(runner, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    check_fsdp_storage(model)
    # explicit: the default mesh follows the machine's accelerator, not the device this run chose
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(runner, mesh=mesh)
    return runner


def inner(wrapped: nn.Module) -> nn.Module:
    """The transformers model inside a wrapped Runner (DDP adds a `.module`)."""
    return getattr(wrapped, "module", wrapped).model


def run(wrapped: nn.Module, fn: Callable, *args, **kwargs):
    """fn(model, *args) through the wrapper's forward. Call it under torch.no_grad() when fn does not train
    (under DDP a forward with grad enabled expects a backward)."""
    return wrapped(fn, *args, **kwargs)


def check_max_norm(max_norm) -> None:
    """A gradient-clipping norm must be a finite positive number (ValueError naming the value otherwise)."""
    if (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not math.isfinite(max_norm)
            or max_norm <= 0):
        raise ValueError(f"max_grad_norm must be a finite positive number, got {max_norm!r}")


def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_; under FSDP2 the gradients are sharded DTensors and the norm is a DTensor whose
    full value needs one all-reduce. A NaN, infinite or non-positive max_norm raises ValueError (torch would
    write NaN into every gradient, or clip nothing)."""
    check_max_norm(max_norm)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def all_reduce_sum(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (a Ctrl-C seen by one rank checkpoints them all)."""
    return all_reduce_sum(float(bool(flag)), device) > 0


# ---------------------------------------------------------------------------------------------------------
# state: full adapters for PEFT files, sharded adapters + optimizer for resume


@contextlib.contextmanager
def gathered(wrapped: nn.Module):
    """Inside: every FSDP2 unit of `wrapped` is unsharded (full plain tensors in the modules), so code that
    reads parameters directly (save_adapter) sees whole weights. Collective: all ranks must enter. A no-op
    for DDP, whose parameters are never sharded."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    try:
        yield inner(wrapped)
    finally:
        for u in units:
            u.reshard()


def full_state_dict(wrapped: nn.Module) -> Dict[str, torch.Tensor]:
    """The inner model's whole state dict (packed 4-bit bytes with their QuantState entries, adapters, ...)
    with every FSDP2 shard gathered, keyed as on a plain model, so it loads into one. Collective.

    torch's get_model_state_dict cannot be used for this: it resolves every key as an attribute path, and the
    bitsandbytes layout keys a weight's scales under the weight (`q_proj.weight.absmax`)."""
    from torch.distributed.tensor import DTensor
    prefix = "module.model." if hasattr(wrapped, "module") else "model."
    return {k[len(prefix):]: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in wrapped.state_dict().items()}


def _trainable_state(wrapped: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable parameters (the active adapters) as state-dict entries: DTensor shards under FSDP2."""
    keep = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    return {k: v for k, v in wrapped.state_dict().items() if k in keep}


def _optim_state(wrapped: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, optimizer)


def save_state(directory, wrapped: nn.Module, optimizer) -> None:
    """Adapters + optimizer state as a DCP checkpoint in `directory`: each rank writes its own shards (DDP:
    rank 0 writes the replicated tensors once). Collective."""
    import torch.distributed.checkpoint as dcp
    state = {"adapter": _trainable_state(wrapped), "optimizer": _optim_state(wrapped, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))


def load_state(directory, wrapped: nn.Module, optimizer) -> None:
    """Reads what save_state wrote into the (already wrapped) model and optimizer, resharding to this run's
    world size if it differs. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    adapter = _trainable_state(wrapped)
    state = {"adapter": adapter, "optimizer": _optim_state(wrapped, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    with torch.no_grad():  # dcp.load fills the state-dict tensors, which share memory with the parameters
        params = dict(wrapped.named_parameters())
        for k, v in adapter.items():
            params[k].copy_(v)  # a no-op copy when they do; kept in case a state-dict hook copied
    set_optimizer_state_dict(wrapped, optimizer, state["optimizer"])


# ---------------------------------------------------------------------------------------------------------
# loading straight into shards


def _shard_range(dim0: int, rank: int, world: int):
    """[start, stop) of dim 0 that FSDP2's Shard(0) gives `rank` (torch.chunk's split: ceil-sized chunks)."""
    c = -(-dim0 // world)
    start = min(rank * c, dim0)
    return start, min(start + c, dim0)


def _read_rows(handle, key: str, r0: int, r1: int) -> torch.Tensor:
    return handle.get_slice(key)[r0:r1]


@torch.no_grad()
def _quantize_shard(handle, key: str, module, local: torch.Tensor, start: int, cfg, dtype, group=None):
    """This rank's part of one 4-bit weight: its packed bytes (the [start, start + len) storage units of the
    whole packed tensor) quantized from the float rows that cover them, and the whole QuantState, assembled
    from every rank's block absmax (each block is owned by the rank holding its first element) and then
    double-quantized identically on every rank. Equal, byte for byte, to slicing a one-process quantization.
    Returns (QuantState, bytes of 4-bit codes this rank quantized: its part plus the blocks it shares with a
    neighbour)."""
    from .functional import QuantState, _double_quantize, quantize_4bit
    out_f, in_f = module.out_features, module.in_features
    n, bs = out_f * in_f, cfg.blocksize
    per_unit = 2 * local.element_size()  # weights per storage unit (two per byte)
    e0, e1 = min(start * per_unit, n), min((start + local.shape[0]) * per_unit, n)
    nblocks = -(-n // bs)
    absmax = torch.zeros(nblocks, dtype=torch.float32)
    made = 0
    if e1 > e0:
        b0, b1 = e0 // bs, -(-e1 // bs)
        lo, hi = b0 * bs, min(b1 * bs, n)
        r0, r1 = lo // in_f, -(-hi // in_f)
        x = _read_rows(handle, key, r0, r1).to(dtype).reshape(-1)[lo - r0 * in_f:hi - r0 * in_f]
        packed, st = quantize_4bit(x, bs, cfg.quant_type, double_quant=False)
        del x
        raw = packed.view(-1).view(torch.uint8)
        made = raw.numel()
        mine = raw[(e0 - lo) // 2:(e1 - lo + 1) // 2]
        dst = local.view(-1).view(torch.uint8)
        dst.zero_()
        dst[:mine.numel()].copy_(mine)
        first_owned = -(-e0 // bs)  # blocks whose first element lies in [e0, e1)
        absmax[first_owned:b1] = st.absmax[first_owned - b0:]
    dist.all_reduce(absmax, group=group)  # x + 0 = x: every block's value arrives exactly
    state = QuantState(absmax, (out_f, in_f), dtype, bs, cfg.quant_type)
    return (_double_quantize(state) if cfg.double_quant else state), made


def load_sharded(path, config, ctx: Context, dtype: torch.dtype = torch.float32,
                 prepare: Optional[Callable[[nn.Module], nn.Module]] = None, progress: bool = False) -> "Runner":
    """A float checkpoint loaded straight into FSDP2 shards: the model is built on the meta device (buffers
    real), every linear layer but the kept-float ones becomes a Linear4bit, `fully_shard` runs per decoder
    layer and on the root, and then each rank reads only the rows of each checkpoint tensor that its shards
    need and quantizes only its own part of each weight (one float slice in memory at a time). Each rank ends
    up holding its shard of the 4-bit model plus the replicated QuantStates; no rank ever holds the whole
    model, float or 4-bit. `config.quant_storage` must be `dtype` (FSDP2 gathers a unit in one dtype).

    `prepare(model)`, when given, runs on the meta-built model before sharding and returns it: what a trainer
    does to a loaded model before wrapping it (dtype casts, checkpointing, LoRA adapters; adapters are created
    on the CPU, for real, while their base is on meta: qlora_ext.nn.LoraLinear4bit.add_adapter). Parameters
    it leaves off the meta device keep their values (FSDP2 shards them); every other one is read from the
    checkpoint.

    `progress`: a bar over the checkpoint's tensors on this rank's stderr (pass it on one rank only).

    Returns the Runner (as `wrap` does) around the model, in eval mode, with `runner.load_report`: this rank's
    `quantized_bytes` (4-bit codes it produced) and the whole model's `packed_bytes`. Collective."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import _checkpoint_files, _float_modules, _replace_linears
    from .nn import Linear4bit
    if config.quant_storage != dtype:
        raise ValueError(f"load_sharded: quant_storage {config.quant_storage} must be the model dtype {dtype} "
                         f"(FSDP2 gathers each decoder layer in one buffer)")
    hf_config = AutoConfig.from_pretrained(path)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{path}: load_sharded reads float checkpoints (this one is already quantized)")
    files = _checkpoint_files(Path(path))
    if not files:
        raise ValueError(f"{path}: no .safetensors weights (other formats are not read: they may hold pickle)")
    handles, where = [], {}
    for f in files:
        _io.check_safetensors(f)  # untrusted: every header against the file's size before reading
        h = safe_open(str(f), framework="pt")
        handles.append(h)
        for k in h.keys():
            where[k] = h
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    _replace_linears(model, config, _float_modules(model, config), quantize=False)
    transposed = [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.source_transposed]
    if transposed:  # each rank reads its rows of the checkpoint tensor, and a Conv1D stores the transpose
        raise ValueError(f"{path}: load_sharded cannot shard transformers Conv1D layers (GPT-2 style: "
                         f"{transposed[0]}, ...); load the model with from_pretrained / load_quantized instead")
    model.requires_grad_(False)
    if prepare is not None:
        model = prepare(model)
    buffers = {n: b for n, b in model.named_buffers()}
    runner = Runner(model)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(runner, mesh=mesh)

    def local_of(p):
        return p.to_local() if isinstance(p, DTensor) else p.data
    # parameters prepare() made real (adapters): their local shards, put back after to_empty
    kept = {n: local_of(p).clone() for n, p in model.named_parameters() if not local_of(p).is_meta}
    runner.to_empty(device=ctx.device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
        for n, p in model.named_parameters():
            if n in kept:
                local_of(p).copy_(kept[n])
    made_real = set(kept)
    del kept
    _io.release_free_heap()  # the full-size adapters FSDP2 sharded and their copies: not resident while loading
    modules = dict(model.named_modules())
    tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
    report = {"quantized_bytes": 0, "packed_bytes": 0}
    to_load = [(n, p) for n, p in model.named_parameters() if n not in made_real]  # prepare()'s: restored above
    for name, p in tqdm(to_load, desc="load shards", unit="tensor", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5, disable=not progress):
        local = local_of(p)
        start, _ = _shard_range(p.shape[0], ctx.rank, ctx.world_size) if isinstance(p, DTensor) else (0, 0)
        key = name if name in where else tied.get(name, name)
        if key not in where:
            raise ValueError(f"{path}: no tensor {name} in the checkpoint")
        mod = modules[name.rpartition(".")[0]]
        if isinstance(mod, Linear4bit) and name.endswith(".weight"):
            mod.quant_state, made = _quantize_shard(where[key], key, mod, local, start, config, dtype)
            report["quantized_bytes"] += made
            report["packed_bytes"] += -(-mod.out_features * mod.in_features // 2)
        elif local.numel():
            with torch.no_grad():
                local.copy_(_read_rows(where[key], key, start, start + local.shape[0]))  # converts as it copies
        _io.drop_mapped_pages()
        _io.release_free_heap()  # this tensor's float slice: not left resident in the heap under the next one
    del handles
    model.eval()
    runner.load_report = report
    return runner
