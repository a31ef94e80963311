"""4-bit and 8-bit quantization kernels against the pure-PyTorch reference, on fresh random inputs of
awkward sizes: bit-exact packed bytes, scales and dequantized values; clear errors on bad input."""
import math

import pytest
import torch

import qlora_ext
from qlora_ext import functional as F
from qlora_ext import reference as R
from qlora_ext._ops import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (3, 5), (63,), (65,), (17, 129), (257, 100), (4097,)]


def _weights(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    if flat.numel() > 300:
        flat[64:192] = 0.0  # whole zero blocks
        flat[200] = 0.75  # an outlier block
    return w.to(dtype).to(device)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_4bit_matches_reference(device, quant_type, dtype, blocksize):
    for i, shape in enumerate(SHAPES):
        w = _weights(shape, dtype, device, seed=blocksize + i)
        packed, state = F.quantize_4bit(w, blocksize, quant_type, double_quant=False)
        ref_packed, ref_absmax = R.quantize_4bit_ref(w, blocksize, quant_type)
        assert packed.device.type == device.type
        assert torch.equal(packed.cpu(), ref_packed), (shape, blocksize)
        assert torch.equal(state.absmax.cpu(), ref_absmax)
        assert state.shape == torch.Size(shape) and state.dtype == dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_reference(device, quant_type):
    for shape in [(1,), (100, 65), (300, 257), (64 * 256 * 2 + 64 * 3,)]:
        w = _weights(shape, torch.float32, device, seed=sum(shape))
        packed, state = F.quantize_4bit(w, 64, quant_type, double_quant=True)
        _, absmax = R.quantize_4bit_ref(w, 64, quant_type)
        q, nested, offset = R.double_quantize_ref(absmax)
        assert state.nested and state.absmax.dtype == torch.uint8
        assert torch.equal(state.absmax.cpu(), q)
        assert torch.equal(state.nested_absmax.cpu(), nested)
        assert state.offset.item() == offset.item()
        # the kernel decodes the double-quantized scales exactly as the reference does
        scales = R.dequantize_absmax_ref(q, nested, offset)
        for dtype in DTYPES:
            state.dtype = dtype
            expect = R.dequantize_4bit_ref(packed, scales, shape, dtype, 64, quant_type)
            assert torch.equal(F.dequantize_4bit(packed, state).cpu(), expect)
        assert torch.equal(F.dequantize_absmax(state).cpu(), scales)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024])
def test_dequantize_random_bytes_matches_reference(device, quant_type, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    for shape in [(1,), (7, 9), (33, 65), (1001,)]:
        n = math.prod(shape)
        packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, generator=g)
        absmax = torch.rand(-(-n // blocksize), generator=g) * 3
        for dtype in DTYPES:
            state = F.QuantState(absmax.to(device), shape, dtype, blocksize, quant_type)
            out = F.dequantize_4bit(packed.to(device), state)
            assert out.shape == torch.Size(shape) and out.dtype == dtype
            assert torch.equal(out.cpu(), R.dequantize_4bit_ref(packed, absmax, shape, dtype, blocksize, quant_type))
            buf = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
            assert F.dequantize_4bit(packed.to(device), state, out=buf) is buf
            assert torch.equal(buf.cpu(), R.dequantize_4bit_ref(packed, absmax, shape, torch.float32, blocksize,
                                                                quant_type))


def test_large_output_is_bit_exact():
    # 32 MiB and more of output take the non-temporal-store path on CPU
    w = torch.randn(2048, 4096) * 0.02
    packed, state = F.quantize_4bit(w)
    scales = R.dequantize_absmax_ref(state.absmax, state.nested_absmax, state.offset)
    for dtype in (torch.float32, torch.bfloat16):
        state.dtype = dtype
        big = torch.cat([packed, packed])  # 4096 x 4096 elements
        state_big = F.QuantState(torch.cat([state.absmax, state.absmax]), (4096, 4096), dtype, 64, "nf4",
                                 offset=state.offset, nested_absmax=torch.cat([state.nested_absmax] * 2),
                                 nested_code=state.nested_code)
        expect = R.dequantize_4bit_ref(packed, scales, w.shape, dtype)
        out = F.dequantize_4bit(big, state_big)
        assert torch.equal(out[:2048], expect) and torch.equal(out[2048:], expect)


def test_roundtrip_error_is_bounded(device):
    w = _weights((300, 200), torch.float32, device, seed=1)
    for quant_type in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(w, 64, quant_type, double_quant=False)
        back = F.dequantize_4bit(packed, state)
        code = F.get_code(quant_type).sort().values
        half_gap = ((code[1:] - code[:-1]) / 2).max()
        bound = state.absmax.repeat_interleave(64)[:w.numel()].view(w.shape) * half_gap.to(device)
        assert torch.all((back - w).abs() <= bound * (1 + 1e-6) + 1e-12)


def test_nf4_error_below_fp4_on_normal_weights():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    err = {}
    for qt in ("nf4", "fp4"):
        p, s = F.quantize_4bit(w, 64, qt, double_quant=False)
        err[qt] = (F.dequantize_4bit(p, s) - w).pow(2).mean().item()
    assert err["nf4"] < err["fp4"]


def test_all_zero_weight_packs_0x77_and_dequantizes_to_zero(device):
    w = torch.zeros(130, device=device)
    packed, state = F.quantize_4bit(w, 64, "nf4")
    assert torch.all(packed.cpu() == 0x77)
    assert torch.equal(F.dequantize_4bit(packed, state), w)
    packed, state = F.quantize_4bit(w, 64, "fp4")
    assert torch.equal(F.dequantize_4bit(packed, state), w)


def test_quant_storage_views_the_same_bytes(device):
    w = _weights((64, 96), torch.bfloat16, device, seed=3)
    ref, _ = F.quantize_4bit(w)
    for storage in (torch.bfloat16, torch.float32, torch.int8):
        packed, state = F.quantize_4bit(w, quant_storage=storage)
        assert packed.dtype == storage and packed.shape == (ref.numel() // storage.itemsize, 1)
        assert torch.equal(packed.view(torch.uint8).view(-1), ref.view(-1))
        assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(ref, state))
    with pytest.raises(ValueError, match="cannot be viewed as"):
        F.quantize_4bit(torch.randn(3, 3, device=device), quant_storage=torch.float32)  # 5 bytes


def test_non_contiguous_input_is_quantized_as_its_contiguous_copy(device):
    w = _weights((96, 130), torch.float32, device, seed=4).t()
    assert not w.is_contiguous()
    a, sa = F.quantize_4bit(w)
    b, sb = F.quantize_4bit(w.contiguous())
    assert torch.equal(a, b) and torch.equal(sa.absmax, sb.absmax) and sa.shape == w.shape


def test_results_do_not_depend_on_thread_count():
    w = _weights((1000, 515), torch.float32, "cpu", seed=5)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, s1 = F.quantize_4bit(w)
        d1 = F.dequantize_4bit(p1, s1)
        torch.set_num_threads(max(2, saved))
        p2, s2 = F.quantize_4bit(w)
        d2 = F.dequantize_4bit(p2, s2)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax) and torch.equal(d1, d2)


def test_bits_per_weight_double_quant():
    _, state = F.quantize_4bit(torch.randn(4096, 4096))
    assert F.bits_per_weight(state) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))  # 4.127
    _, state = F.quantize_4bit(torch.randn(4096, 4096), double_quant=False)
    assert F.bits_per_weight(state) == pytest.approx(4.5)


# ---- bad input: a clear error, never a crash or a silently wrong answer ----

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_is_rejected(device, bad):
    w = torch.randn(10, 64, device=device)
    w[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.quantize_4bit(w)


def test_bad_quantize_arguments(device):
    w = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="empty"):
        F.quantize_4bit(torch.empty(0, 64, device=device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.quantize_4bit(torch.ones(8, 64, dtype=torch.int32, device=device))
    for bs in (0, 16, 48, 8192):
        with pytest.raises(ValueError, match="blocksize"):
            F.quantize_4bit(w, blocksize=bs)
    with pytest.raises(ValueError, match="quant_type"):
        F.quantize_4bit(w, quant_type="int4")
    # the ops themselves check too
    with pytest.raises(RuntimeError, match="blocksize"):
        ops.quantize_4bit(w, 48, "nf4")
    with pytest.raises(RuntimeError, match="quant_type"):
        ops.quantize_4bit(w, 64, "nf5")


def test_mismatched_state_is_rejected_before_any_kernel_runs(device):
    packed, state = F.quantize_4bit(torch.randn(64, 128, device=device))
    args = dict(packed=packed.view(-1), absmax=state.absmax, nested_absmax=state.nested_absmax,
                nested_code=state.nested_code, offset=float(state.offset), nested_blocksize=256, blocksize=64,
                quant_type="nf4", shape=[64, 128], dtype=torch.float32)
    cases = {
        "absmax has": dict(absmax=state.absmax[:-1]),
        "packed weight has": dict(packed=packed.view(-1)[:-5]),
        "nested_absmax must be float32 with": dict(nested_absmax=torch.ones(7, device=device)),
        "nested_code must be 256": dict(nested_code=state.nested_code[:100]),
        "double-quantized absmax must be uint8": dict(absmax=state.absmax.float()),
        "absmax must be float32": dict(nested_absmax=None, nested_code=None, absmax=state.absmax),
        "must be given together": dict(nested_code=None),
        "blocksize must be": dict(blocksize=100),
        "shape": dict(shape=[64, -128]),
        "output dtype": dict(dtype=torch.int64),
    }
    for msg, change in cases.items():
        with pytest.raises(RuntimeError, match=msg):
            ops.dequantize_4bit(**{**args, **change})
    with pytest.raises(ValueError, match="out must be contiguous"):
        F.dequantize_4bit(packed, state, out=torch.empty(10, device=device))


def test_blockwise_8bit_matches_reference(device):
    g = torch.Generator().manual_seed(2)
    for n in (1, 255, 257, 5000):
        A = (torch.randn(n, generator=g) * 3).to(device)
        for code_name in ("dynamic_signed", "dynamic_unsigned"):
            code = F.get_code(code_name, device)
            x = A.abs() if code_name == "dynamic_unsigned" else A
            q, absmax = F.quantize_blockwise(x, code, 256)
            rq, rabsmax = R.quantize_8bit_ref(x, code, 256)
            assert torch.equal(q.cpu(), rq) and torch.equal(absmax.cpu(), rabsmax)
            for dtype in DTYPES:
                back = F.dequantize_blockwise(q, absmax, code, 256, dtype)
                assert torch.equal(back.cpu(), R.dequantize_8bit_ref(rq, rabsmax, code, 256, dtype))


# ---- torch integration ----

def test_opcheck():
    w = torch.randn(33, 70)
    packed, absmax = ops.quantize_4bit(w, 64, "nf4")
    code = F.get_code("dynamic_signed")
    q, nested = ops.quantize_8bit(absmax - absmax.mean(), code, 256)
    torch.library.opcheck(ops.quantize_4bit.default, (w, 64, "nf4"))
    torch.library.opcheck(ops.dequantize_4bit.default,
                          (packed, absmax, None, None, 0.0, 256, 64, "nf4", [33, 70], torch.bfloat16))
    torch.library.opcheck(ops.dequantize_4bit.default,
                          (packed, q, nested, code, 0.05, 256, 64, "fp4", [33, 70], torch.float32))
    torch.library.opcheck(ops.dequantize_4bit.out,
                          (packed, absmax, None, None, 0.0, 256, 64, "nf4", [33, 70]),
                          {"out": torch.empty(33, 70)})
    torch.library.opcheck(ops.quantize_8bit.default, (absmax, code, 256))
    torch.library.opcheck(ops.dequantize_8bit.default, (q, nested, code, 256, torch.float16))


def test_torch_compile_without_graph_breaks():
    w = torch.randn(64, 96)
    packed, state = F.quantize_4bit(w)

    def f(x):
        return x @ F.dequantize_4bit(packed, state).t()

    x = torch.randn(5, 96)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_public_api_surface():
    assert qlora_ext.quantize_4bit is F.quantize_4bit
    assert qlora_ext.cpu_isa() in ("avx512", "avx2", "scalar")
    assert isinstance(qlora_ext.with_cuda(), bool)


def test_double_quant_offset_does_not_depend_on_the_thread_count():
    # 2048 x 1280 in blocks of 64: 40960 scales, more than torch's CPU mean reduces in one piece (32768), so a
    # plain absmax.mean() may change in the last bit with torch.get_num_threads(); the offset must not.
    w = torch.randn(2048, 1280, generator=torch.Generator().manual_seed(3)) * 0.02
    threads = torch.get_num_threads()
    states = []
    try:
        for t in [1, 2, 3, 4, 7]:
            torch.set_num_threads(t)
            states.append(F.quantize_4bit(w, 64, double_quant=True)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for s in states[1:]:
        assert s.offset.item() == states[0].offset.item()
        assert torch.equal(s.absmax, states[0].absmax) and torch.equal(s.nested_absmax, states[0].nested_absmax)
    _, absmax = R.quantize_4bit_ref(w, 64, "nf4")
    assert states[0].offset.item() == R.double_quantize_ref(absmax)[2].item()


def test_quantize_blockwise_non_finite_is_a_value_error():
    for bad in [float("nan"), float("inf")]:
        a = torch.randn(1000)
        a[10] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize_blockwise(a)
