"""The 4-bit matmul against a float64 reference on the dequantized weight: forward and backward errors
must stay within 2x those of torch.nn.functional.linear on the same weight at the same precision."""
import pytest
import torch

from qlora_ext import functional as F
from qlora_ext._ops import ops

MS = [1, 3, 17, 64, 257]
SHAPES_NK = [(96, 130), (33, 1000), (200, 97)]  # K never a multiple of 64


def _setup(M, N, K, dtype, device, quant_type="nf4", double_quant=True, blocksize=64, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    packed, state = F.quantize_4bit(w.to(device), blocksize, quant_type, double_quant)
    W = torch.empty(N, K, device=device)
    F.dequantize_4bit(packed, state, out=W)  # the dequantized weight in float32 (what the matmul uses)
    shape = (M, K) if batch is None else (batch, M, K)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    return packed, state, W, x


def _bound(err_ours, err_linear, ref, dtype):
    # 2x F.linear's error, plus one rounding of the output for the rare case where F.linear is exact
    return err_ours <= 2 * err_linear + torch.finfo(dtype).eps * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", MS)
def test_forward_and_backward_error(device, dtype, M):
    for i, (N, K) in enumerate(SHAPES_NK):
        packed, state, W, x = _setup(M, N, K, dtype, device, seed=M * 10 + i)
        x.requires_grad_(True)
        y = F.matmul_4bit(x, packed, state)
        assert y.dtype == dtype and y.shape == (M, N)
        ref = x.detach().double() @ W.double().t()
        lin = torch.nn.functional.linear(x.detach(), W.to(dtype))
        e, el = (y.detach().double() - ref).abs().max().item(), (lin.double() - ref).abs().max().item()
        assert _bound(e, el, ref, dtype), f"forward M={M} N={N} K={K}: {e:.3g} vs F.linear {el:.3g}"

        grad = torch.randn_like(y)
        y.backward(grad)
        gref = grad.double() @ W.double()
        glin = grad @ W.to(dtype)
        e, el = (x.grad.double() - gref).abs().max().item(), (glin.double() - gref).abs().max().item()
        assert _bound(e, el, gref, dtype), f"backward M={M} N={N} K={K}: {e:.3g} vs {el:.3g}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 128])
def test_formats_block_sizes_and_batched_input(device, quant_type, double_quant, blocksize):
    for M in (1, 2, 9):  # batched 3-D input: 2*M rows, on both sides of the fused/tiled switch
        packed, state, W, x = _setup(M, 70, 129, torch.float32, device, quant_type, double_quant, blocksize, batch=2)
        bias = torch.randn(70, device=device, requires_grad=True)
        x.requires_grad_(True)
        y = F.matmul_4bit(x, packed, state, bias)
        ref = x.detach().double() @ W.double().t() + bias.detach().double()
        lin = torch.nn.functional.linear(x.detach(), W, bias.detach())
        assert y.shape == (2, M, 70)
        assert _bound((y.double() - ref).abs().max().item(), (lin.double() - ref).abs().max().item(), ref,
                      torch.float32)
        y.sum().backward()
        assert torch.allclose(bias.grad, torch.full_like(bias, 2 * M))
        assert torch.allclose(x.grad, W.sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def test_odd_K_rows_start_mid_byte(device):
    # K odd: every other row starts on the low nibble of a byte, blocks straddle rows
    for M in (1, 5, 40):
        packed, state, W, x = _setup(M, 31, 77, torch.float32, device, blocksize=32)
        ref = x.double() @ W.double().t()
        lin = torch.nn.functional.linear(x, W)
        assert _bound((F.matmul_4bit(x, packed, state).double() - ref).abs().max().item(),
                      (lin.double() - ref).abs().max().item(), ref, torch.float32)


def test_weight_gets_no_gradient_and_storage_views_work(device):
    packed, state, W, x = _setup(4, 64, 128, torch.float32, device)
    for storage in (torch.bfloat16, torch.float32):
        p = packed.view(-1).view(storage)
        assert torch.equal(F.matmul_4bit(x, p, state), F.matmul_4bit(x, packed, state))
    assert not packed.requires_grad


def test_bad_shapes_and_dtypes(device):
    packed, state, W, x = _setup(2, 64, 128, torch.float32, device)
    with pytest.raises(ValueError, match="cannot multiply"):
        F.matmul_4bit(torch.randn(2, 127, device=device), packed, state)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        F.matmul_4bit(torch.ones(2, 128, dtype=torch.int64, device=device), packed, state)
    p1, s1 = F.quantize_4bit(torch.randn(2, 4, 64, device=device))
    with pytest.raises(ValueError, match="2-D"):
        F.matmul_4bit(torch.randn(2, 64, device=device), p1, s1)
    args = [packed.view(-1), state.absmax, state.nested_absmax, state.nested_code, state.offset_value, 256, 64,
            "nf4", [64, 128]]
    with pytest.raises(RuntimeError, match="last dimension must be 128"):
        ops.matmul_4bit(torch.randn(3, 100, device=device), *args)
    with pytest.raises(RuntimeError, match="absmax has"):
        ops.matmul_4bit(x, packed.view(-1), state.absmax[:5], *args[2:])
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.matmul_4bit(x, *args[:-1], [64 * 128])
    with pytest.raises(RuntimeError, match="does not match a weight"):
        ops.matmul_4bit_t(torch.randn(3, 100, device=device), *args)


def test_opcheck():
    packed, state, W, x = _setup(3, 40, 70, torch.float32, "cpu")
    args = (packed.view(-1), state.absmax, state.nested_absmax, state.nested_code, state.offset_value, 256, 64, "nf4",
            [40, 70])
    torch.library.opcheck(ops.matmul_4bit.default, (x,) + args)
    torch.library.opcheck(ops.matmul_4bit.default, (torch.randn(20, 70, requires_grad=True),) + args)
    torch.library.opcheck(ops.matmul_4bit_t.default, (torch.randn(5, 40),) + args)


def test_torch_compile_forward_and_backward_without_graph_breaks():
    packed, state, W, x = _setup(5, 48, 96, torch.float32, "cpu")

    class Layer(torch.nn.Module):
        def forward(self, x):
            return F.matmul_4bit(torch.nn.functional.gelu(x), packed, state)

    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = layer(xa), compiled(xb)
    assert torch.allclose(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.allclose(xa.grad, xb.grad)
