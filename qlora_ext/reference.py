"""Pure-PyTorch reference of every qlora_ext quantization op: the readable specification and the test oracle.

Slow on purpose: one obvious tensor expression per rule of shared/spec/nf4-format.md. The kernels must
agree with it bit for bit (packed bytes, absmax, and dequantized values).
"""
import torch

from .functional import double_quant_offset, get_code


def _thresholds(code_sorted: torch.Tensor) -> torch.Tensor:
    # midpoints of adjacent code values, computed in double and compared in float32 (the spec)
    c = code_sorted.double()
    return ((c[:-1] + c[1:]) / 2).float()


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flat x zero-padded to whole blocks, shaped [nblocks, blocksize]."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=x.dtype)
    padded[:n] = x.reshape(-1)
    return padded.view(nblocks, blocksize)


def quantize_4bit_ref(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Returns (packed uint8 [(n + 1) // 2, 1], absmax float32 [nblocks])."""
    x = w.detach().cpu().float().reshape(-1)
    n = x.numel()
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    s = blocks * (1.0 / absmax)[:, None]  # float32 reciprocal, then multiply
    s = torch.where(torch.isnan(s) | (absmax[:, None] == 0), torch.zeros_like(s), s).clamp(-1.0, 1.0)
    code = get_code(quant_type)
    if quant_type == "nf4":
        idx = (s[..., None] > _thresholds(code)).sum(-1)
    else:
        mags = code[:8]
        order = torch.argsort(mags)
        rank = (s.abs()[..., None] > _thresholds(mags[order])).sum(-1)
        idx = order[rank] | torch.where(s < 0, 8, 0)
    # An odd count keeps one element past the end: 0.0 of the last block, quantized like the others (the
    # zero padding of _blocks), as bitsandbytes' CUDA kernels load it: NF4 0b0111, FP4 0b0000.
    idx = idx.reshape(-1)[:n + n % 2].to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.view(-1, 1), absmax


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8).cpu()
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def dequantize_4bit_ref(packed, absmax, shape, dtype=torch.float32, blocksize=64, quant_type="nf4"):
    """absmax: the float32 per-block scales (see dequantize_absmax_ref for double quantization)."""
    n = int(torch.Size(shape).numel())
    nib = unpack_nibbles(packed, n).long()
    scale = absmax.cpu().float().repeat_interleave(blocksize)[:n]
    return (get_code(quant_type)[nib] * scale).to(dtype).reshape(shape)


def quantize_8bit_ref(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' CPU rule (it made the checkpoints we reproduce): v = A * (1 / absmax) clamped to [-1, 1]
    picks grid point u = trunc(((v + 1) * 0.5) * 65535 + 0.5) of 65536; the byte is the number of map
    midpoints 0.5 * (map[j] + map[j + 1]) below the grid value -1 + (2 * u) / 65535, all in float32. That
    is the nearest map value except within half a grid step of a midpoint. An all-zero block codes 0."""
    x = A.detach().cpu().float().reshape(-1)
    n = x.numel()
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    u = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # float32 ops, truncation
    grid = -1.0 + (2.0 * u.float()) / 65535.0
    c = code.cpu().float()
    mid = 0.5 * (c[:-1] + c[1:])
    q = torch.searchsorted(mid, grid.reshape(-1), side="left").view_as(grid)  # midpoints strictly below
    q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8).view(A.shape), absmax


def dequantize_8bit_ref(q, absmax, code, blocksize, dtype=torch.float32):
    n = q.numel()
    scale = absmax.cpu().float().repeat_interleave(blocksize)[:n]
    return (code.cpu()[q.reshape(-1).long().cpu()] * scale).to(dtype).view(q.shape)


def double_quantize_ref(absmax: torch.Tensor, nested_blocksize: int = 256):
    """(uint8 absmax, float32 nested_absmax, float32 offset) as bitsandbytes computes them on a CPU (the offset
    pinned to the one-thread CPU mean, see functional.double_quant_offset)."""
    offset = double_quant_offset(absmax)
    q, nested = quantize_8bit_ref(absmax - offset, get_code("dynamic_signed"), nested_blocksize)
    return q, nested, offset


def dequantize_absmax_ref(q, nested_absmax, offset, nested_blocksize=256):
    code = get_code("dynamic_signed")
    a = code[q.long().cpu()] * nested_absmax.cpu().repeat_interleave(nested_blocksize)[:q.numel()]
    return a + offset.cpu().float()  # two roundings (multiply, then add), never a fused multiply-add


# ---------------------------------------------------------------------------------------------------------
# Optimizers (qlora_ext.optim): one update in float64, the math the fused kernels compute in float32.
# Non-finite policy: elements whose gradient is NaN / Inf (AdamW: or whose new second moment would overflow
# float32) keep their parameter and state.

OPTIM_BLOCK = 256  # elements per absmax of 8-bit optimizer state
_F32_MAX = torch.finfo(torch.float32).max


def adamw_step_ref(p, g, m, v, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 1e-2):
    """torch.optim.AdamW's update: returns the new (p, m, v) in float64."""
    p, g, m, v = (t.detach().cpu().double() for t in (p, g, m, v))
    b1, b2 = betas
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    p1 = p * (1 - lr * weight_decay) - (lr / bc1) * m1 / ((v1 / bc2).sqrt() + eps)
    ok = torch.isfinite(g) & (v1 <= _F32_MAX)
    return torch.where(ok, p1, p), torch.where(ok, m1, m), torch.where(ok, v1, v)


def lion_step_ref(p, g, m, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
    """Lion (Chen et al. 2023): returns the new (p, m) in float64."""
    p, g, m = (t.detach().cpu().double() for t in (p, g, m))
    b1, b2 = betas
    p1 = p * (1 - lr * weight_decay) - lr * torch.sign(b1 * m + (1 - b1) * g)
    m1 = b2 * m + (1 - b2) * g
    ok = torch.isfinite(g)
    return torch.where(ok, p1, p), torch.where(ok, m1, m)


def quantize_state_ref(x: torch.Tensor, signed: bool):
    """8-bit optimizer state: (codes uint8 of x's shape, float32 absmax per 256 elements); the signed dynamic map
    for the first moment, the unsigned one for the second, nearest rounding (ties to the lower code)."""
    return quantize_8bit_ref(x.float(), get_code("dynamic_signed" if signed else "dynamic_unsigned"), OPTIM_BLOCK)


def dequantize_state_ref(q: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """float32 values of 8-bit optimizer state: code[q] * absmax[block]."""
    return dequantize_8bit_ref(q, absmax, get_code("dynamic_signed" if signed else "dynamic_unsigned"), OPTIM_BLOCK)
