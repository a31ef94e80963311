"""The NF4 / FP4 4-bit format in one place: QuantState, quantize_4bit / dequantize_4bit and the 8-bit
blockwise quantization used for double-quantized scales (and optimizer state), on CPU and CUDA.

Byte-compatible with bitsandbytes + transformers (see shared/spec/nf4-format.md): a QuantState's
`as_dict(prefix)` produces exactly the state-dict entries a bitsandbytes checkpoint holds, and
`QuantState.from_dict` reads them back, validating every field before any kernel touches them.
"""
from __future__ import annotations

import json
import math
import threading
from typing import Dict, Mapping, Optional, Tuple

import torch

from ._ops import FLOAT_DTYPES, VALID_BLOCKSIZES_4BIT, ops

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32,
                   torch.int64, torch.float64)
# A shape with more elements than this cannot be a real weight; reject it before allocating anything.
_MAX_NUMEL = 1 << 48

_code_cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}


def get_code(name: str, device="cpu") -> torch.Tensor:
    """Exact float32 code table: 'nf4', 'fp4', 'dynamic_signed' or 'dynamic_unsigned' (cached per device)."""
    key = (name, torch.device(device))
    if key not in _code_cache:
        _code_cache[key] = ops.code_table(name).to(key[1])
    return _code_cache[key]


class QuantState:
    """Everything needed to dequantize a 4-bit tensor besides its packed bytes."""

    def __init__(self, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int, quant_type: str,
                 code: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                 nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                 nested_blocksize: int = NESTED_BLOCKSIZE):
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        self.code = code if code is not None else get_code(quant_type, absmax.device)
        self.offset = offset
        # read once here: a .item() inside dequantize_4bit would be a graph break under torch.compile
        self.offset_value = float(offset.item()) if offset is not None else 0.0
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_blocksize = int(nested_blocksize)

    @property
    def nested(self) -> bool:
        """True when absmax is double-quantized (uint8 + nested absmax + offset)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device) -> "QuantState":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState(mv(self.absmax), self.shape, self.dtype, self.blocksize, self.quant_type, mv(self.code),
                          mv(self.offset), mv(self.nested_absmax), mv(self.nested_code), self.nested_blocksize)

    def __repr__(self):
        dq = f", nested_blocksize={self.nested_blocksize}, offset={float(self.offset):.6g}" if self.nested else ""
        return (f"QuantState(shape={list(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
                f"blocksize={self.blocksize}{dq})")

    # ---- the checkpoint format ----
    def json_bytes(self) -> bytes:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": str(self.dtype).replace("torch.", ""), "shape": list(self.shape)}
        if self.nested:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.offset_value)
        return json.dumps(meta).encode("utf-8")

    def as_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """State-dict entries as bitsandbytes writes them, keyed `prefix + name` (prefix e.g. 'layer.weight.')."""
        d = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        if self.nested:
            d[prefix + "nested_absmax"] = self.nested_absmax
            d[prefix + "nested_quant_map"] = self.nested_code
        js = torch.frombuffer(bytearray(self.json_bytes()), dtype=torch.uint8)
        d[prefix + f"quant_state.bitsandbytes__{self.quant_type}"] = js
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor], prefix: str = "", device=None) -> "QuantState":
        """Reads the entries written by `as_dict` (or by bitsandbytes). Every length, shape, block size and
        dtype is validated against the tensors; a bad checkpoint raises ValueError naming the key."""
        qs_keys = [k for k in d if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise ValueError(f"expected exactly one '{prefix}quant_state.bitsandbytes__<nf4|fp4>' entry, "
                             f"found {len(qs_keys)}")
        qs_key = qs_keys[0]
        suffix = qs_key[len(prefix + "quant_state.bitsandbytes__"):]
        meta = _parse_quant_json(d[qs_key], qs_key)
        quant_type = meta.get("quant_type")
        if quant_type not in QUANT_TYPES or quant_type != suffix:
            raise ValueError(f"{qs_key}: quant_type {quant_type!r} is not 'nf4' or 'fp4' or does not match the key")
        blocksize = meta.get("blocksize")
        if not _is_int(blocksize) or blocksize not in VALID_BLOCKSIZES_4BIT:
            raise ValueError(f"{qs_key}: blocksize {blocksize!r} is not one of {VALID_BLOCKSIZES_4BIT}")
        dtype = _DTYPE_NAMES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"{qs_key}: dtype {meta.get('dtype')!r} is not one of {sorted(_DTYPE_NAMES)}")
        shape = meta.get("shape")
        if (not isinstance(shape, list) or not shape or not all(_is_int(s) and s > 0 for s in shape)
                or math.prod(shape) > _MAX_NUMEL):
            raise ValueError(f"{qs_key}: shape {shape!r} must be a non-empty list of positive integers "
                             f"with at most 2**48 elements")
        n = math.prod(shape)
        nblocks = -(-n // blocksize)
        nested = "nested_offset" in meta or prefix + "nested_absmax" in d
        absmax = _get(d, prefix + "absmax", torch.uint8 if nested else torch.float32, (nblocks,))
        if not nested:
            _check_finite(absmax, prefix + "absmax")
        code = _get(d, prefix + "quant_map", torch.float32, (16,))
        if not torch.equal(code.cpu(), get_code(quant_type)):
            raise ValueError(f"{prefix}quant_map: not the standard {quant_type} code")
        kw = {}
        if nested:
            nbs = meta.get("nested_blocksize")
            if not _is_int(nbs) or nbs <= 0 or nbs > 1 << 20:
                raise ValueError(f"{qs_key}: nested_blocksize {nbs!r} must be a positive integer")
            if meta.get("nested_dtype") != "float32":
                raise ValueError(f"{qs_key}: nested_dtype {meta.get('nested_dtype')!r} must be 'float32'")
            off = meta.get("nested_offset")
            if not isinstance(off, (int, float)) or isinstance(off, bool) or not math.isfinite(off):
                raise ValueError(f"{qs_key}: nested_offset {off!r} must be a finite number")
            nested_absmax = _get(d, prefix + "nested_absmax", torch.float32, (-(-nblocks // nbs),))
            _check_finite(nested_absmax, prefix + "nested_absmax")
            nested_code = _get(d, prefix + "nested_quant_map", torch.float32, (256,))
            _check_finite(nested_code, prefix + "nested_quant_map")
            if not math.isfinite(float(torch.tensor(off, dtype=torch.float32))):
                raise ValueError(f"{qs_key}: nested_offset {off!r} overflows float32")
            kw = dict(offset=torch.tensor(off, dtype=torch.float32), nested_absmax=nested_absmax,
                      nested_code=nested_code, nested_blocksize=nbs)
        state = cls(absmax, shape, dtype, blocksize, quant_type, code=code, **kw)
        return state.to(device) if device is not None else state


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(d, key, dtype, shape) -> torch.Tensor:
    if key not in d:
        raise ValueError(f"missing checkpoint entry '{key}'")
    t = d[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{key}: expected {dtype} of shape {list(shape)}, got {got}")
    return t.contiguous()


def _check_finite(t: torch.Tensor, key: str) -> None:
    """Scales feed every dequantized weight: one NaN or Inf poisons a whole block (or 256 of them)."""
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{key}: entry {i} is {float(t[i])}; quantization scales must be finite")


def _parse_quant_json(t, key) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > 4096:
        raise ValueError(f"{key}: expected a 1-D uint8 tensor holding a short JSON text")
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}: malformed quant_state JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: quant_state JSON must be an object")
    return meta


def _check_quantize_args(w, blocksize, quant_type, quant_storage):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"can only quantize float32, float16 or bfloat16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {list(w.shape)})")
    if blocksize not in VALID_BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES_4BIT}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if quant_storage not in _STORAGE_DTYPES:
        raise TypeError(f"quant_storage {quant_storage} is not supported")
    nbytes = (w.numel() + 1) // 2
    if nbytes % quant_storage.itemsize:
        raise ValueError(f"{nbytes} packed bytes of shape {list(w.shape)} cannot be viewed as {quant_storage} "
                         f"({quant_storage.itemsize} bytes per element)")


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8) -> Tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization of `w` (any shape, row-major blocks).

    Returns the packed bytes (shape [(n + 1) // 2 // itemsize, 1] of `quant_storage`) and the QuantState.
    NaN or Inf in `w` raises ValueError (a 4-bit code cannot hold them; failing loudly beats a silently
    wrong block). Non-contiguous input is quantized as its contiguous copy.
    """
    _check_quantize_args(w, blocksize, quant_type, quant_storage)
    try:
        packed, absmax = ops.quantize_4bit(w, blocksize, quant_type)
    except RuntimeError as exc:
        if "NaN or Inf" in str(exc):
            raise ValueError(str(exc).split("\n")[0]) from None
        raise
    state = QuantState(absmax, w.shape, w.dtype, blocksize, quant_type)
    if double_quant:
        state = _double_quantize(state)
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).view(-1, 1)
    return packed, state


_ONE_THREAD = threading.Lock()


def double_quant_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quantization offset: torch's float32 CPU mean of the block absmax, computed on one thread.

    bitsandbytes takes ``absmax.mean()`` on the tensor's device, which is not one number: CUDA's mean rounds
    differently from the CPU's, and the CPU's own result changes in the last bit with the thread count once
    the reduction is split (above 32768 blocks). Pinning it to the one-thread CPU mean makes the offset, the
    nested absmax and the absmax codes identical on every device and thread count, and equal to what
    bitsandbytes stores when it quantizes on a CPU (AVX2 and AVX-512 give the same bits).
    """
    a = absmax.detach().to("cpu", torch.float32)
    with _ONE_THREAD:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return a.mean()
        finally:
            torch.set_num_threads(threads)


def _double_quantize(state: QuantState) -> QuantState:
    # offset (see double_quant_offset), then 8-bit blockwise (256) quantization of absmax - offset with the
    # signed dynamic map, on the absmax's device.
    absmax = state.absmax
    offset = double_quant_offset(absmax)
    nested_code = get_code("dynamic_signed", absmax.device)
    q, nested_absmax = ops.quantize_8bit(absmax - offset.to(absmax.device), nested_code, NESTED_BLOCKSIZE)
    return QuantState(q, state.shape, state.dtype, state.blocksize, state.quant_type, state.code, offset,
                      nested_absmax, nested_code, NESTED_BLOCKSIZE)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 per-block scales of `state` (decoding double quantization when present)."""
    if not state.nested:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize) \
        + state.offset.to(state.absmax.device)


def _check_state(packed, state) -> None:
    """The packed bytes and scales must fit the state's shape (ValueError before anything is allocated from
    the shape: a QuantState claiming a huge shape over small buffers is bad input, not an allocator error)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    n = state.numel
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise ValueError(f"the packed weight has {nbytes} bytes but shape {list(state.shape)} needs {(n + 1) // 2}")
    if state.absmax.numel() != state.nblocks:
        raise ValueError(f"absmax has {state.absmax.numel()} entries but shape {list(state.shape)} in blocks of "
                         f"{state.blocksize} has {state.nblocks}")
    if state.nested:
        nb = state.nested_blocksize
        need = -(-state.nblocks // nb) if 0 < nb <= 1 << 31 else -1
        if state.nested_absmax.numel() != need:
            raise ValueError(f"nested_absmax has {state.nested_absmax.numel()} entries but {state.nblocks} blocks "
                             f"in nested blocks of {nb} need {need}")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float tensor of `state.shape` and `state.dtype` (or written into `out`, any float dtype)."""
    _check_state(packed, state)
    nested = state.nested
    args = (packed.reshape(-1), state.absmax, state.nested_absmax if nested else None,
            state.nested_code if nested else None, state.offset_value,
            state.nested_blocksize, state.blocksize, state.quant_type, list(state.shape))
    if out is None:
        return ops.dequantize_4bit(*args, state.dtype)
    if out.numel() != state.numel or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with {state.numel} elements, got shape {list(out.shape)}")
    ops.dequantize_4bit.out(*args, out=out)
    return out


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x[..., K] @ W.T (+ bias)` with W the 4-bit [N, K] weight of (packed, state); output in x's dtype.

    Differentiable in x (through the dequantized weight) and bias; the 4-bit weight gets no gradient.
    CPU: a fused dequantize-multiply for up to 32 rows (AVX-512 or AVX2; 8 scalar); above that, on AVX2, a
    packed GEMM that decodes the codes into its panels of W, elsewhere dequantized row tiles + the platform
    GEMM. CUDA: a GEMV for M <= 4, a tensor-core kernel up to 64 rows, dequantize + cuBLAS above.
    """
    _check_state(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D [N, K] weight, got shape {list(state.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x of shape {list(x.shape)} cannot multiply a weight of shape {list(state.shape)}")
    nested = state.nested
    y = ops.matmul_4bit(x, packed.reshape(-1), state.absmax, state.nested_absmax if nested else None,
                        state.nested_code if nested else None, state.offset_value, state.nested_blocksize,
                        state.blocksize, state.quant_type, list(state.shape))
    return y if bias is None else y + bias.to(y.dtype)


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None,
                       blocksize: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of `A` (float32, float16 or bfloat16, as bitsandbytes accepts; 16-bit
    input gives the codes of its exact float32 values) with a sorted 256-entry map (default: signed
    dynamic). Returns (uint8 codes shaped like A, float32 absmax per block). NaN or Inf in `A` raises
    ValueError, on every device."""
    if not isinstance(A, torch.Tensor) or A.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_blockwise takes a float32, float16 or bfloat16 tensor, got "
                        f"{A.dtype if isinstance(A, torch.Tensor) else type(A).__name__}")
    if not _is_int(blocksize) or not 0 < blocksize <= 1 << 31:
        raise ValueError(f"blocksize must be an integer in [1, 2**31], got {blocksize!r}")
    if code is None:
        code = get_code("dynamic_signed", A.device)
    try:
        return ops.quantize_8bit(A, code, blocksize)
    except RuntimeError as exc:
        if "NaN or Inf" in str(exc):
            raise ValueError(str(exc).split("\n")[0]) from None
        raise


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: Optional[torch.Tensor] = None,
                         blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if code is None:
        code = get_code("dynamic_signed", q.device)
    return ops.dequantize_8bit(q, absmax, code, blocksize, dtype)


def bits_per_weight(state: QuantState) -> float:
    """Storage cost of the packed weight plus its scales, in bits per weight."""
    n = state.numel
    bits = 4 * n + state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.nested_absmax.numel() * 32
    return bits / n
