"""Pure-PyTorch reference of every qlora_ext quantization op: the readable specification and the test oracle.

Slow on purpose: one obvious tensor expression per rule of shared/spec/nf4-format.md. The kernels must
agree with it bit for bit (packed bytes, absmax, and dequantized values).
"""
import torch

from .functional import get_code


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
    idx = idx.reshape(-1)[:n].to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, torch.zeros(1, dtype=torch.uint8)])
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
    """(uint8 absmax, float32 nested_absmax, float32 offset) as bitsandbytes computes them."""
    offset = absmax.mean()
    q, nested = quantize_8bit_ref(absmax - offset, get_code("dynamic_signed"), nested_blocksize)
    return q, nested, offset


def dequantize_absmax_ref(q, nested_absmax, offset, nested_blocksize=256):
    code = get_code("dynamic_signed")
    a = code[q.long().cpu()] * nested_absmax.cpu().repeat_interleave(nested_blocksize)[:q.numel()]
    return a + offset.cpu().float()  # two roundings (multiply, then add), never a fused multiply-add
