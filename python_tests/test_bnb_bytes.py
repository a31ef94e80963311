"""Bytes against bitsandbytes itself in the corners: odd element counts (the padding nibble), near-zero and
tiny negative values, values on the decision thresholds, every block size, 16-bit input to 8-bit blockwise.

The canonical bytes are bitsandbytes' CUDA kernels' (what 4-bit checkpoints on the Hub hold); on the CPU,
bitsandbytes 0.50.2 quantizes 4-bit with a pure-PyTorch fallback that departs from its CUDA kernels in two
documented ways (README, "Format"), and only those are allowed here:
  * FP4, a value that rounds to magnitude 0: CUDA takes the sign from x < 0 (0b1000 for a tiny negative
    value, 0b0000 otherwise); the fallback's sign comes from bucketizing over the sorted code, where +0 and
    -0 sit side by side (it gives +0 to tiny negative values and -0 to tiny positive ones);
  * FP4, a negative value exactly on a threshold between two magnitudes: CUDA (comparing |x| > pivot) takes
    the smaller magnitude, the fallback's bucketize over the signed code the larger one;
  * the last partial block: the fallback divides (x / absmax) where CUDA (and we) multiply by the float32
    reciprocal (x * (1 / absmax)); where the two roundings differ, the nibble may differ; and when that
    block is all zeros the fallback records absmax 1e-38 (its clamp) where CUDA records 0.
Everything else - NF4 and FP4 codes, the padding nibble (the code of 0.0), absmax - must be identical, and
bitsandbytes' own dequantize must read our bytes to exactly our values.
"""
import math

import bitsandbytes.functional as BF
import pytest
import torch

import qlora_ext
from qlora_ext import functional as F
from qlora_ext import reference as R

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bitsandbytes' CPU fallback wraps its kernels in torch.compile, recompiling for every odd shape here
    # (minutes); eager mode computes the same values.
    with torch._dynamo.config.patch(disable=True):
        yield


def _corner_values(n: int, seed: int, dtype) -> torch.Tensor:
    """n values: normals, exact zeros, -0.0, tiny and denormal values of both signs, and values exactly on
    (and one float32 step around) the NF4 and FP4 decision thresholds of a block whose absmax is 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    thr = torch.cat([R._thresholds(F.get_code("nf4")),
                     R._thresholds(F.get_code("fp4")[:8].sort().values)])
    specials = torch.cat([torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-42, -1e-42, 1e-8, -1e-8, -2e-3, 2e-3, 1.0]),
                          thr, -thr, torch.nextafter(thr, torch.zeros_like(thr)),
                          torch.nextafter(thr, torch.ones_like(thr)), -torch.nextafter(thr, torch.ones_like(thr))])
    idx = torch.randperm(n, generator=g)[:min(n, specials.numel())]
    x[idx] = specials[:idx.numel()]
    # make the blocks' absmax 1 where possible, so the thresholds above are thresholds of the scaled values
    x = x.clamp(-1.0, 1.0)
    return x.to(dtype)


def _sizes(bs):
    return [1, 3, bs - 1, bs + 1, 2 * bs + 7]


def _nibbles(packed: torch.Tensor, n_padded: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:n_padded]


_FP4_THR = R._thresholds(F.get_code("fp4")[:8].sort().values)


def _explained(x32, i, bs, n, absmax, ours, theirs, quant_type) -> bool:
    """Whether the nibble difference at element i is one of the documented CPU-fallback differences."""
    if i >= n:
        return False  # the padding nibble must match
    block = i // bs
    a = absmax[block]
    s_mul = x32[i] * (1.0 / a) if a > 0 else torch.tensor(0.0)
    if quant_type == "fp4" and ours == (8 if s_mul < 0 else 0) and theirs & 7 == 0:
        return True  # magnitude 0: the sign of x (CUDA's x < 0) vs the fallback's sorted +-0
    if quant_type == "fp4" and s_mul < 0 and bool((_FP4_THR == -s_mul).any()):
        return True  # a negative value exactly on a threshold: CUDA's smaller magnitude vs the fallback's -inf
    last_partial = n % bs and block == n // bs
    return bool(last_partial and (x32[i] / a) != s_mul)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_4bit_matches_bitsandbytes_in_the_corners(quant_type, blocksize):
    allowed = 0
    for dtype in DTYPES:
        for k, n in enumerate(_sizes(blocksize)):
            x = _corner_values(n, seed=blocksize * 10 + k, dtype=dtype)
            ours, state = F.quantize_4bit(x, blocksize, quant_type, double_quant=False)
            theirs, bstate = BF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=False)
            babsmax = bstate.absmax.clone()
            if n % blocksize and state.absmax[-1] == 0:  # an all-zero last partial block (third difference)
                assert babsmax[-1] == torch.tensor(1e-38)
                babsmax[-1] = 0.0
            assert torch.equal(state.absmax, babsmax), (dtype, n)
            assert ours.shape == theirs.shape
            n_padded = n + n % 2
            a, b = _nibbles(ours, n_padded), _nibbles(theirs, n_padded)
            if n % 2:  # the element past the end is 0.0: NF4 0b0111, FP4 0b0000, as bitsandbytes' CUDA
                assert a[n] == (7 if quant_type == "nf4" else 0) and b[n] == a[n], (dtype, n)
            x32 = x.float()
            for i in (a != b).nonzero().view(-1).tolist():
                assert _explained(x32, i, blocksize, n, state.absmax, int(a[i]), int(b[i]), quant_type), \
                    f"{quant_type} bs={blocksize} {dtype} n={n}: element {i} = {x32[i].item()!r} (absmax " \
                    f"{state.absmax[i // blocksize].item()!r}): ours {int(a[i]):#06b}, bitsandbytes {int(b[i]):#06b}"
                allowed += 1
            # bitsandbytes reads our bytes to exactly our values (its native CPU dequantize or its fallback)
            back = BF.dequantize_4bit(ours, bstate.__class__(absmax=state.absmax, shape=x.shape, code=bstate.code,
                                                            blocksize=blocksize, quant_type=quant_type,
                                                            dtype=dtype))
            assert torch.equal(back.reshape(-1), F.dequantize_4bit(ours, state).reshape(-1)), (dtype, n)
    if quant_type == "fp4":
        assert allowed > 0  # the inputs do reach the tiny-negative corner


def test_fp4_sign_of_zero_follows_cuda():
    # x < 0 decides the sign: a tiny negative value is -0 (0b1000), -0.0 itself and +0.0 are +0 (0b0000)
    x = torch.tensor([1.0, -1e-30, -0.0, 0.0, -1e-3, 1e-3])
    packed, _ = F.quantize_4bit(x, 32, "fp4", double_quant=False)
    assert _nibbles(packed, 6).tolist() == [3, 8, 0, 0, 8, 0]
    ref, _ = R.quantize_4bit_ref(x, 32, "fp4")
    assert torch.equal(packed, ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_padding_nibble_is_the_code_of_zero_on_every_path(device, quant_type):
    zero = 7 if quant_type == "nf4" else 0
    for n in (1, 63, 65, 4097):
        for dtype in DTYPES:
            x = (torch.randn(n) + 0.5).to(dtype).to(device)
            packed, _ = F.quantize_4bit(x, 64, quant_type, double_quant=False)
            assert int(packed.view(-1)[-1].cpu()) & 0xF == zero, (n, dtype)
            assert torch.equal(packed.cpu(), R.quantize_4bit_ref(x, 64, quant_type)[0])


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_8bit_accepts_16bit_input_like_bitsandbytes(blocksize):
    code = F.get_code("dynamic_signed")
    for dtype in DTYPES:
        for k, n in enumerate([1, 255, blocksize + 3, 3 * blocksize + 1]):
            x = _corner_values(n, seed=k, dtype=dtype) * 3
            q, absmax = F.quantize_blockwise(x, code, blocksize)
            bq, bstate = BF.quantize_blockwise(x, code=code, blocksize=blocksize)
            assert torch.equal(q, bq), (dtype, n)
            assert torch.equal(absmax, bstate.absmax), (dtype, n)
            rq, rabsmax = R.quantize_8bit_ref(x, code, blocksize)  # the 16-bit values widened exactly
            assert torch.equal(q, rq) and torch.equal(absmax, rabsmax)


# ---- GPU: the CUDA kernels' bytes (run where a GPU is present) ----
def _near_threshold(s: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Scaled values within a few float32 rounding steps of a decision threshold: bitsandbytes' CUDA build
    uses fast-math (an approximate reciprocal), so there the nibble cannot be reproduced bit for bit."""
    if quant_type == "nf4":
        thr, v = R._thresholds(F.get_code("nf4")), s
    else:
        thr, v = R._thresholds(F.get_code("fp4")[:8].sort().values), s.abs()
    d = (v[:, None] - thr[None, :]).abs().min(1).values
    return d <= 4 * torch.finfo(torch.float32).eps * v.abs().clamp(min=1e-30)


@pytest.mark.skipif(not (torch.cuda.is_available() and qlora_ext.with_cuda()),
                    reason="needs a GPU and the CUDA build (compares with bitsandbytes' CUDA kernels)")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_cuda_bytes_match_bitsandbytes_cuda(quant_type, blocksize):
    for dtype in DTYPES:
        for k, n in enumerate(_sizes(blocksize) + [123457]):
            x = _corner_values(n, seed=k, dtype=dtype).cuda()
            ours, state = F.quantize_4bit(x, blocksize, quant_type, double_quant=False)
            theirs, bstate = BF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=False)
            assert torch.equal(state.absmax, bstate.absmax)
            n_padded = n + n % 2
            a, b = _nibbles(ours.cpu(), n_padded), _nibbles(theirs.cpu(), n_padded)
            assert a[-1] == b[-1] or n % 2 == 0, "the padding nibble"
            absmax = state.absmax.cpu().repeat_interleave(blocksize)[:n_padded]
            x32 = torch.cat([x.float().cpu(), torch.zeros(n % 2)])
            s = torch.where(absmax > 0, x32 * (1.0 / absmax), torch.zeros_like(x32))
            # zero blocks: bitsandbytes' CUDA scales by 1/0 and codes the NaN as 0b0000 (we pack the code of
            # 0.0, the spec's 0x77); both dequantize to zero
            ok = _near_threshold(s, quant_type) | (absmax == 0)
            assert torch.all((a == b) | ok), (dtype, n, (~((a == b) | ok)).nonzero()[:5].view(-1).tolist())
