"""CPU-specific paths: every instruction set this machine runs (QLORA_EXT_CPU_ISA caps the choice, read once
per process, so each cap runs in a fresh interpreter) gives the fused GEMV's results within 2x F.linear's
error against a float64 reference; large outputs come from huge-page mappings and behave as ordinary
tensors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_ext import functional as F
from qlora_ext._ops import _C

_GEMV_CHECK = r"""
import json, sys, torch
from qlora_ext import functional as F
from qlora_ext._ops import _C
bad = []
g = torch.Generator().manual_seed(7)
g_wide = torch.Generator().manual_seed(8)   # M > 8 draws its own x: the M <= 8 cases keep their inputs
# rows of whole blocks (K a multiple of the block size: the AVX2 block kernel) and rows that are not
for N, K, bs, qt, dq in [(33, 1000, 64, "nf4", True), (31, 77, 32, "nf4", True), (70, 4099, 256, "fp4", True),
                         (9, 4096, 128, "nf4", True), (5, 31, 32, "fp4", True), (37, 640, 64, "nf4", True),
                         (41, 640, 64, "nf4", False), (6, 96, 32, "fp4", True), (3, 8192, 4096, "nf4", True),
                         (19, 1536, 512, "fp4", False)]:
    w = torch.randn(N, K, generator=g) * 0.05
    packed, state = F.quantize_4bit(w, bs, qt, dq)
    W = F.dequantize_4bit(packed, state).double()
    for M in [*range(1, 9), 9, 12, 17, 32]:   # up to the SIMD paths' limit, in groups of 8 rows and remainders
        x = torch.randn(M, K, generator=g if M <= 8 else g_wide)
        ref = x.double() @ W.t()
        e = (F.matmul_4bit(x, packed, state).double() - ref).abs().max().item()
        el = (torch.nn.functional.linear(x, W.float()).double() - ref).abs().max().item()
        if not e <= 2 * el + torch.finfo(torch.float32).eps * ref.abs().max().item():
            bad.append(f"M={M} N={N} K={K} bs={bs} {qt}: {e:.3g} vs F.linear {el:.3g}")
print(json.dumps({"isa": _C.cpu_isa(), "bad": bad}))
"""


def _run_check(script, tmp_path, **env_set):
    """Runs a check script in a fresh interpreter (the CPU settings are read once per process) with these
    QLORA_EXT_* variables (None: unset); returns its last line of JSON."""
    env = dict(os.environ)
    for k in ("QLORA_EXT_CPU_ISA", "QLORA_EXT_CPU_BF16_GEMM"):
        env.pop(k, None)
    env.update({k: v for k, v in env_set.items() if v is not None})
    # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the source tree has no _C
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_RANK = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "native"])
def test_gemv_every_isa_against_reference(isa, tmp_path):
    native = _C.cpu_isa()
    if isa != "native" and _RANK[isa] > _RANK[native]:
        pytest.skip(f"this CPU's kernels run {native}: the {isa} path cannot run here")
    res = _run_check(_GEMV_CHECK, tmp_path, QLORA_EXT_CPU_ISA=None if isa == "native" else isa)
    assert res["isa"] == (native if isa == "native" else isa)
    assert not res["bad"], res["bad"]


_BF16_CHECK = r"""
import json, torch
from qlora_ext import functional as F
from qlora_ext._ops import _C
bad = []
g = torch.Generator().manual_seed(11)
# M above the fused GEMV's rows (dequantized tiles + the platform GEMM); N < 2K and N >= 2K (the float32
# backward's two tile shapes); 1100x4096: several ~8 MiB tiles each way
for N, K, bs, qt in [(200, 320, 64, "nf4"), (1300, 192, 32, "fp4"), (77, 640, 128, "nf4"), (1100, 4096, 64, "nf4")]:
    w = torch.randn(N, K, generator=g) * 0.05
    packed, state = F.quantize_4bit(w, bs, qt, True)
    W = F.dequantize_4bit(packed, state).double()
    Wb = W.to(torch.bfloat16)
    for M in (33, 100):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16).requires_grad_()
        gy = torch.randn(M, N, generator=g).to(torch.bfloat16)
        y = F.matmul_4bit(x, packed, state)
        y.backward(gy)
        for name, got, ref, lin in (("forward", y, x.detach().double() @ W.t(), torch.nn.functional.linear(x.detach(), Wb)),
                                    ("backward", x.grad, gy.double() @ W, gy @ Wb)):
            e = (got.double() - ref).abs().max().item()
            el = (lin.double() - ref).abs().max().item()
            if got.dtype != torch.bfloat16 or not e <= 2 * el:
                bad.append(f"{name} M={M} N={N} K={K} {qt}: {got.dtype} error {e:.3g} vs F.linear in bfloat16 {el:.3g}")
print(json.dumps({"bf16_gemm": _C.cpu_bf16_gemm(), "isa": _C.cpu_isa(), "bad": bad}))
"""


@pytest.mark.parametrize("mode", ["widened", "bf16_gemm_forced", "native"])
def test_bfloat16_matmul_every_path_against_reference(mode, tmp_path):
    """bfloat16 x through the large-M path, forward and backward, within 2x F.linear's bfloat16 error against a
    float64 reference: widened to float32 (QLORA_EXT_CPU_BF16_GEMM=0; AVX2's path), bfloat16 tiles and torch's
    bfloat16 GEMM forced on (=1; where the CPU has no AVX512-BF16 that GEMM runs in software), and the machine's
    own choice."""
    native_bf16 = _C.cpu_isa() == "avx512bf16"
    if mode == "native" and not native_bf16:
        pytest.skip("this CPU has no AVX512-BF16: its bfloat16 GEMM ran only forced (bf16_gemm_forced), in software")
    flag = {"widened": "0", "bf16_gemm_forced": "1", "native": None}[mode]
    res = _run_check(_BF16_CHECK, tmp_path, QLORA_EXT_CPU_BF16_GEMM=flag)
    assert res["bf16_gemm"] == (mode != "widened")
    assert not res["bad"], res["bad"]


_LARGE_M_CHECK = r"""
import json, torch
from qlora_ext import functional as F
from qlora_ext._ops import _C
bad = []
g = torch.Generator().manual_seed(12)
# y = x @ W^T and grad_x = grad_y @ W past the fused GEMV's rows: either inner dimension over several 256-deep
# slices (the last partial), output columns over several 2048-column blocks per thread (4200) or under one
# register tile (5), rows that start mid-byte (K odd), M in partial and whole 6-row panels and over two 144-row
# blocks; the gradient also at M <= 32 (it has no GEMV)
for N, K, bs, qt, dq in [(600, 4200, 64, "nf4", True), (77, 129, 32, "fp4", True), (300, 5, 64, "nf4", False),
                         (4100, 300, 128, "nf4", True)]:
    w = torch.randn(N, K, generator=g) * 0.05
    packed, state = F.quantize_4bit(w, bs, qt, dq)
    W = F.dequantize_4bit(packed, state).double()
    for M in (7, 33, 150, 300):
        x = torch.randn(M, K, generator=g).requires_grad_()
        gy = torch.randn(M, N, generator=g)
        y = F.matmul_4bit(x, packed, state)
        y.backward(gy)
        for name, got, ref, lin in (("forward", y, x.detach().double() @ W.t(), x.detach() @ W.float().t()),
                                    ("backward", x.grad, gy.double() @ W, gy @ W.float())):
            e = (got.double() - ref).abs().max().item()
            el = (lin.double() - ref).abs().max().item()
            if not e <= 2 * el + torch.finfo(torch.float32).eps * ref.abs().max().item():
                bad.append(f"{name} M={M} N={N} K={K} bs={bs} {qt}: {e:.3g} vs float32 {el:.3g}")
print(json.dumps({"isa": _C.cpu_isa(), "fused": _C.cpu_fused_gemm(), "bad": bad}))
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "native"])
def test_large_m_matmul_every_isa_against_reference(isa, tmp_path):
    """Forward past the GEMV's rows and the gradient for x (the packed GEMM decoding W into its panels on AVX2,
    dequantized tiles and the platform GEMM elsewhere) within 2x float32 matmul's error against a float64
    reference, over the block edges of either path."""
    native = _C.cpu_isa()
    if isa != "native" and _RANK[isa] > _RANK[native]:
        pytest.skip(f"this CPU's kernels run {native}: the {isa} path cannot run here")
    res = _run_check(_LARGE_M_CHECK, tmp_path, QLORA_EXT_CPU_ISA=None if isa == "native" else isa)
    assert res["isa"] == (native if isa == "native" else isa)
    assert res["fused"] == (res["isa"] == "avx2")
    assert not res["bad"], res["bad"]


@pytest.mark.parametrize("cache", [False, True])
def test_large_output_is_an_ordinary_tensor(cache):
    """A large output (from a 2 MiB-aligned mapping, whether the CPU block cache is on or not) behaves as any
    tensor: contents, resize through its allocator, release."""
    from qlora_ext import _io
    was = _io.cpu_block_cache_stats()["on"]
    _io.cpu_block_cache(_io.CPU_BLOCK_CACHE_BYTES if cache else 0)
    try:
        _large_output_checks()
    finally:
        _io.cpu_block_cache(_io.CPU_BLOCK_CACHE_BYTES if was else 0)


def _large_output_checks():
    w = torch.randn(4096, 2049) * 0.02  # 32 MiB + 16 KiB of float32: above the huge-page threshold
    packed, state = F.quantize_4bit(w, 64, "nf4", True)
    ref = torch.empty(4096, 2049)
    F.dequantize_4bit(packed, state, out=ref)  # the caller's tensor: torch's own allocator
    y = F.dequantize_4bit(packed, state)
    assert y.is_contiguous() and y.shape == (4096, 2049) and torch.equal(y, ref)
    assert y.untyped_storage().data_ptr() % (2 << 20) == 0  # a 2 MiB-aligned mapping
    y.resize_(4096, 4096)  # grows through the same allocator, keeping the data
    assert torch.equal(y.view(-1)[: ref.numel()], ref.view(-1))
    y.fill_(1.0)
    del y  # unmapped here (a second free or a bad length would crash the process)
    small = F.dequantize_4bit(*F.quantize_4bit(torch.randn(64, 64)))
    assert small.shape == (64, 64)
