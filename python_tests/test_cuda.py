"""CUDA-only cases (they skip without a CUDA device; tools/gpu_check.sh runs them on a GPU): the CUDA ops
against the CPU twin on the same inputs, the block sizes whose reductions span warps, double quantization's
bytes, NaN / Inf through every op, non-default streams, a dequantize past 2^31 elements, error messages,
and the matmul dispatch boundaries."""
import pytest
import torch

from qlora_ext import functional as F
from qlora_ext import optim as O
from qlora_ext import reference as R
from qlora_ext._ops import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weights(n, dtype, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("blocksize", [512, 1024, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_cross_warp_blocks_match_cpu(blocksize, dtype, quant_type):
    for n in [blocksize - 1, 3 * blocksize + 17, 40 * blocksize]:
        w = _weights(n, dtype, seed=n)
        w[n // 3] = 0.9  # an outlier that only one warp of the block sees
        pc, sc = F.quantize_4bit(w, blocksize, quant_type, double_quant=False)
        pg, sg = F.quantize_4bit(w.cuda(), blocksize, quant_type, double_quant=False)
        assert torch.equal(pg.cpu(), pc) and torch.equal(sg.absmax.cpu(), sc.absmax), (n, blocksize)
        out = F.dequantize_4bit(pg, sg)
        assert torch.equal(out.cpu(), F.dequantize_4bit(pc, sc)), (n, blocksize)


@pytest.mark.parametrize("blocksize", [512, 1024, 2048, 100])
def test_quantize_8bit_cross_warp_blocks_match_reference(blocksize):
    code = F.get_code("dynamic_signed")
    for n in [blocksize - 1, 5 * blocksize + 3]:
        a = _weights(n, torch.float32, seed=n + blocksize, scale=1.0)
        q, absmax = F.quantize_blockwise(a.cuda(), code.cuda(), blocksize)
        rq, rabsmax = R.quantize_8bit_ref(a, code, blocksize)
        assert torch.equal(q.cpu(), rq) and torch.equal(absmax.cpu(), rabsmax), (n, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_bytes_equal_on_cpu_and_cuda(quant_type):
    # 4096 x 640 in blocks of 64: 40960 scales, above the 32768 where torch's CPU mean would split by thread.
    for shape in [(300, 257), (4096, 640)]:
        w = _weights(shape[0] * shape[1], torch.bfloat16, seed=shape[0]).view(shape)
        pc, sc = F.quantize_4bit(w, 64, quant_type, double_quant=True)
        pg, sg = F.quantize_4bit(w.cuda(), 64, quant_type, double_quant=True)
        assert torch.equal(pg.cpu(), pc)
        assert sg.offset.item() == sc.offset.item()
        assert torch.equal(sg.absmax.cpu(), sc.absmax)
        assert torch.equal(sg.nested_absmax.cpu(), sc.nested_absmax)
        assert sg.as_dict("w.").keys() == sc.as_dict("w.").keys()
        for k, v in sg.as_dict("w.").items():
            assert torch.equal(v.cpu(), sc.as_dict("w.")[k]), k
        assert torch.equal(F.dequantize_4bit(pg, sg).cpu(), F.dequantize_4bit(pc, sc))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_through_every_cuda_op(bad):
    # quantize: ValueError on CUDA as on the CPU, 4-bit (every dtype) and 8-bit (tiled and generic kernels)
    for dtype in DTYPES:
        w = _weights(5000, dtype, seed=1).cuda()
        w[4321] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize_4bit(w)
    for blocksize in [256, 2048, 100]:
        a = _weights(5000, torch.float32, seed=2).cuda()
        a[77] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize_blockwise(a, blocksize=blocksize)
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize_blockwise(a.cpu(), blocksize=blocksize)
    # dequantize, matmul (GEMV, tensor-core and cuBLAS paths) and the optimizers propagate it where the CPU does
    w = _weights(256 * 320, torch.float32, seed=3).view(256, 320)
    pc, sc = F.quantize_4bit(w, 64, double_quant=False)
    sc.absmax[3] = bad
    pg, sg = F.quantize_4bit(w.cuda(), 64, double_quant=False)
    sg.absmax[3] = bad
    for dtype in DTYPES:
        sc.dtype = sg.dtype = dtype
        assert torch.equal(F.dequantize_4bit(pg, sg).isnan().cpu(), F.dequantize_4bit(pc, sc).isnan())
        for M in [1, 16, 200]:
            x = _weights(M * 320, dtype, seed=M, scale=1.0).view(M, 320)
            x[0, 5] = bad
            yc, yg = F.matmul_4bit(x.float(), pc, sc), F.matmul_4bit(x.cuda(), pg, sg)
            assert torch.equal(yg.isfinite().cpu(), yc.isfinite()), (dtype, M)
    q, absmax = F.quantize_blockwise(_weights(1000, torch.float32, seed=4).cuda())
    absmax[1] = bad
    assert torch.equal(F.dequantize_blockwise(q, absmax).isfinite().cpu(),
                       F.dequantize_blockwise(q.cpu(), absmax.cpu()).isfinite())
    for cls in [O.AdamW, O.AdamW8bit, O.Lion, O.Lion8bit]:
        params = [torch.nn.Parameter(torch.ones(4096, device=d)) for d in ("cpu", "cuda")]
        for p in params:
            p.grad = torch.full_like(p, 0.5)
            p.grad[100] = bad
        for p in params:
            cls([p]).step()
        assert torch.equal(params[1].isfinite().cpu(), params[0].isfinite()), cls.__name__


def test_ops_run_on_the_current_non_default_stream():
    s = torch.cuda.Stream()
    w = _weights(1 << 22, torch.bfloat16, seed=5).view(2048, 2048)
    pc, sc = F.quantize_4bit(w, 64)
    p = torch.nn.Parameter(torch.ones(1 << 22))
    p.grad = _weights(1 << 22, torch.float32, seed=6, scale=1.0)
    pg_ref = torch.nn.Parameter(p.detach().clone())
    pg_ref.grad = p.grad.clone()
    O.AdamW8bit([pg_ref]).step()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        # the inputs are produced on `s` right before each op: a kernel on another stream would race them
        wg = w.cuda(non_blocking=True).mul_(1.0)
        pg, sg = F.quantize_4bit(wg, 64)
        out = F.dequantize_4bit(pg, sg)
        y = F.matmul_4bit(torch.ones(8, 2048, device="cuda", dtype=torch.bfloat16).mul_(0.5), pg, sg)
        q = torch.nn.Parameter(torch.ones(1 << 22, device="cuda"))
        q.grad = p.grad.cuda().mul_(1.0)
        O.AdamW8bit([q]).step()
    s.synchronize()
    assert torch.equal(pg.cpu(), pc) and torch.equal(out.cpu(), F.dequantize_4bit(pc, sc))
    assert torch.allclose(y.float().cpu(), F.matmul_4bit(torch.full((8, 2048), 0.5), pc, sc), rtol=2e-2, atol=2e-2)
    assert torch.equal(q.detach().cpu(), pg_ref.detach())


def test_dequantize_past_2_pow_31_elements():
    n = (1 << 31) + 64 * 1000 + 32  # int32 element indices would wrap
    free = torch.cuda.mem_get_info()[0]
    if free < 3 * n + (2 << 30):
        pytest.fail(f"needs {3 * n / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(7)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.rand(-(-n // 64), device="cuda", generator=g)
    state = F.QuantState(absmax, torch.Size([n]), torch.bfloat16, 64, "nf4")
    out = F.dequantize_4bit(packed, state)
    for start in [0, (1 << 31) - 4096, n - 4096 - 32]:  # blocks around the 2^31 boundary and the ragged end
        stop = start + 4096 + 32
        st = F.QuantState(absmax[start // 64: -(-stop // 64)].cpu(), torch.Size([stop - start]), torch.bfloat16, 64,
                          "nf4")
        expect = F.dequantize_4bit(packed[start // 2: (stop + 1) // 2].cpu(), st)
        assert torch.equal(out[start:stop].cpu(), expect), start


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_dispatch_boundaries_and_transpose_match_the_cpu(dtype):
    # GEMV up to M = 4, the tensor-core kernel up to 64, dequantize + cuBLAS above: each side of both edges
    N, K = 384, 1000
    w = _weights(N * K, torch.float32, seed=8, scale=0.05).view(N, K)
    pc, sc = F.quantize_4bit(w, 64)
    pg, sg = F.quantize_4bit(w.cuda(), 64)
    W = F.dequantize_4bit(pc, sc).double()
    for M in [4, 5, 64, 65]:
        x = _weights(M * K, dtype, seed=M, scale=1.0).view(M, K)
        y = F.matmul_4bit(x.cuda(), pg, sg)
        ref = x.double() @ W.t()
        lin = torch.nn.functional.linear(x.cuda(), W.to(dtype).cuda()).double().cpu()
        err, err_lin = (y.double().cpu() - ref).abs().max().item(), (lin - ref).abs().max().item()
        assert err <= 2 * err_lin + torch.finfo(dtype).eps * ref.abs().max().item(), (M, err, err_lin)
        yc = F.matmul_4bit(x.float(), pc, sc).to(dtype)
        atol = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
        assert torch.allclose(y.float().cpu(), yc.float(), rtol=2e-2, atol=atol), M
        # the backward's transposed product against the CPU op
        gr = _weights(M * N, dtype, seed=M + 1, scale=1.0).view(M, N)
        shape = list(sc.shape)
        tg = ops.matmul_4bit_t(gr.cuda(), pg, sg.absmax, sg.nested_absmax, sg.nested_code, sg.offset_value,
                               sg.nested_blocksize, sg.blocksize, sg.quant_type, shape)
        tc = ops.matmul_4bit_t(gr.float(), pc, sc.absmax, sc.nested_absmax, sc.nested_code, sc.offset_value,
                               sc.nested_blocksize, sc.blocksize, sc.quant_type, shape)
        tref = gr.double() @ W
        tol = 4 * torch.finfo(dtype).eps * tref.abs().max().item() * K ** 0.5
        assert (tg.double().cpu() - tc.double()).abs().max().item() <= tol, M


def test_a_cuda_error_names_itself_and_leaves_nothing_pending():
    # A prefetch of ordinary (cudaMalloc) memory is refused by the runtime on most systems; when it is, the
    # message must carry the CUDA error's name and text and the call that failed, and the next ops must run
    # normally (nothing left pending). (CTest's PendingErrorIsReportedThenCleared covers the pending path.)
    t = torch.empty(1024, device="cuda")
    try:
        ops.paged_prefetch(t, True)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        assert "cudaError" in str(exc) and "in cudaMemPrefetchAsync" in str(exc), str(exc)
    else:
        pytest.skip("this runtime accepts a prefetch of cudaMalloc memory, so no error to check")
    x = torch.ones(4096, device="cuda")
    q, absmax = F.quantize_blockwise(x)
    assert torch.equal(F.dequantize_blockwise(q, absmax).cpu(), torch.ones(4096))
    torch.cuda.synchronize()
