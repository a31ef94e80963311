"""Linear4bit and LoraLinear4bit against float64 references built from the pure-PyTorch dequantization:
forward and gradients on awkward sizes, the bitsandbytes state-dict layout, casts that must not touch the
packed bytes, named adapters (one active, only it trainable), and errors on bad arguments."""
import math

import pytest
import torch
from torch import nn

from qlora_ext import reference as R
from qlora_ext.nn import Linear4bit, LoraLinear4bit


def _ref_weight(layer: Linear4bit) -> torch.Tensor:
    """The layer's weight decoded by reference.py (not by the kernels), in float64."""
    qs = layer.quant_state
    scales = R.dequantize_absmax_ref(qs.absmax, qs.nested_absmax, qs.offset, qs.nested_blocksize) \
        if qs.nested else qs.absmax
    return R.dequantize_4bit_ref(layer.weight, scales, qs.shape, torch.float64, qs.blocksize, qs.quant_type)


def _close(a, b, rtol):
    """Relative error in the Frobenius norm (robust to individual near-zero outputs)."""
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err < rtol, f"relative error {err:.3g} >= {rtol}"


@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 128, False),
                                                               ("nf4", 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_and_grad_match_float64_reference(quant_type, blocksize, double_quant, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(72, 33, bias=True).to(dtype)  # 72 * 33 is not a multiple of the block size
    layer = Linear4bit.from_linear(lin, quant_type, blocksize, double_quant)
    assert not layer.weight.requires_grad and layer.bias is lin.bias
    w = _ref_weight(layer)
    for m in (3, 17):  # the fused small-M kernel and the tiled path
        x = torch.randn(2, m, 72, dtype=dtype, requires_grad=True)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, m, 33)
        ref = x.detach().double() @ w.T + lin.bias.detach().double()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        _close(y, ref, tol)
        g = torch.randn_like(y)
        y.backward(g)
        _close(x.grad, g.double() @ w, tol)
        assert lin.bias.grad is not None
        lin.bias.grad = None


def test_compute_dtype_is_used_and_output_keeps_input_dtype():
    torch.manual_seed(1)
    layer = Linear4bit.from_linear(nn.Linear(64, 40, bias=False), compute_dtype=torch.bfloat16)
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expect = (x.bfloat16() @ layer.dequantized_weight(torch.bfloat16).T).float()
    _close(y, expect, 1e-2)
    assert not torch.equal(y, x @ layer.dequantized_weight().T)  # bf16 compute really happened


def test_state_dict_is_the_bitsandbytes_layout_and_round_trips():
    torch.manual_seed(2)
    layer = Linear4bit.from_linear(nn.Linear(96, 48))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (96 * 48 // 2, 1)
    fresh = Linear4bit(96, 48, bias=True)
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.weight, layer.weight)
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), layer(x))
    # a packed weight for another shape is rejected before any kernel reads it
    other = Linear4bit.from_linear(nn.Linear(96, 47)).state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        Linear4bit(96, 48).load_state_dict(other, strict=False)
    missing = Linear4bit(96, 48).load_state_dict({"bias": sd["bias"]}, strict=False)
    assert missing.missing_keys == ["weight"]


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_module_casts_never_touch_packed_bytes_or_scales(storage):
    torch.manual_seed(3)
    layer = Linear4bit.from_linear(nn.Linear(64, 64), quant_storage=storage)
    packed = layer.weight.detach().clone()
    absmax, nested = layer.quant_state.absmax.clone(), layer.quant_state.nested_absmax.clone()
    x = torch.randn(3, 64)
    before = layer(x)
    layer.half()
    assert layer(x.half()).dtype == torch.float16
    layer.to(torch.bfloat16)
    layer.float()
    assert layer.weight.dtype == storage and torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(layer.quant_state.absmax, absmax) and layer.quant_state.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.quant_state.nested_absmax, nested)
    assert layer.bias.dtype == torch.float32  # float parameters do follow the cast
    _close(layer(x), before, 1e-2)  # only the bias went through half / bfloat16


def test_empty_layer_and_bad_construction_raise():
    with pytest.raises(RuntimeError, match="no quantized weight"):
        Linear4bit(64, 64)(torch.randn(1, 64))
    with pytest.raises(ValueError, match="meta"):
        Linear4bit.from_linear(nn.Linear(64, 64, device="meta"))
    lin = Linear4bit.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="does not fit"):
        Linear4bit(64, 64)._set_quantized(lin.weight, lin.quant_state)


def _lora_ref(layer: LoraLinear4bit, x, name):
    a = layer.lora_A[name].weight.detach().double()
    b = layer.lora_B[name].weight.detach().double()
    base = x.double() @ _ref_weight(layer).T + (layer.bias.detach().double() if layer.bias is not None else 0)
    return base + layer.scaling[name] * (x.double() @ a.T) @ b.T


def test_lora_forward_and_gradients_match_float64_plain_lora():
    torch.manual_seed(4)
    base = Linear4bit.from_linear(nn.Linear(80, 36))
    layer = LoraLinear4bit.from_linear4bit(base, r=5, lora_alpha=10, lora_dropout=0.0)
    assert layer.weight is base.weight and layer.quant_state is base.quant_state
    x = torch.randn(2, 7, 80)
    # fresh adapter: B = 0, the output is the base layer's
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.scaling["default"] == 2.0
    y = layer(x)
    _close(y, _lora_ref(layer, x, "default"), 1e-5)
    # gradients of A and B against autograd on the float64 formula
    g = torch.randn_like(y)
    y.backward(g)
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    ref = x.double() @ _ref_weight(layer).T + layer.bias.detach().double() + 2.0 * (x.double() @ a.T) @ b.T
    ref.backward(g.double())
    _close(layer.lora_A["default"].weight.grad, a.grad, 1e-5)
    _close(layer.lora_B["default"].weight.grad, b.grad, 1e-5)


def test_16bit_lora_products_on_cpu_are_widened_unless_it_multiplies_bfloat16():
    """Without AVX512-BF16 torch's 16-bit CPU GEMMs are many times slower than float32: the LoRA products of 16-bit
    activations and adapters run in float32 there (as the 4-bit matmul widens its inputs), results and gradients
    returned in the 16-bit dtypes; with it, bfloat16 stays bfloat16."""
    from qlora_ext import nn as qnn
    cpu, native = torch.device("cpu"), qnn._CPU_BF16_GEMM
    assert qnn._lora_compute_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
    assert qnn._lora_compute_dtype(torch.float16, cpu) == torch.float32
    assert qnn._lora_compute_dtype(torch.float32, cpu) == torch.float32
    assert qnn._lora_compute_dtype(torch.float64, cpu) == torch.float64
    torch.manual_seed(6)
    base = Linear4bit.from_linear(nn.Linear(96, 40), compute_dtype=torch.bfloat16)
    layer = LoraLinear4bit.from_linear4bit(base, r=4, lora_alpha=8, lora_dropout=0.0, lora_dtype=torch.bfloat16)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 11, 96).bfloat16().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    a, b = (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double())
    xd = x.detach().double()
    ref = xd @ _ref_weight(layer).T + layer.bias.detach().double() + 2.0 * (xd @ a.T) @ b.T
    assert (y.double() - ref).abs().max() <= 4 * 2 ** -8 * ref.abs().max()  # bfloat16 rounding, not more


def test_rslora_scaling_and_kaiming_init():
    torch.manual_seed(5)
    layer = LoraLinear4bit.from_linear4bit(Linear4bit.from_linear(nn.Linear(256, 64)), r=16, lora_alpha=8,
                                           use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert a.dtype == torch.float32


def test_named_adapters_one_active_and_only_it_trainable():
    torch.manual_seed(6)
    layer = LoraLinear4bit.from_linear4bit(Linear4bit.from_linear(nn.Linear(64, 32)), r=4, lora_alpha=4,
                                           lora_dropout=0.0, adapter_name="a")
    layer.add_adapter("b", r=2, lora_alpha=8)
    assert layer.active_adapter == "b" and layer.adapters == ["a", "b"]
    for n in "ab":
        nn.init.normal_(layer.lora_B[n].weight)
    x = torch.randn(3, 64)
    yb = layer(x)
    _close(yb, _lora_ref(layer, x, "b"), 1e-5)
    assert layer.lora_A["b"].weight.requires_grad and not layer.lora_A["a"].weight.requires_grad
    layer.set_adapter("a")
    _close(layer(x), _lora_ref(layer, x, "a"), 1e-5)
    assert layer.lora_B["a"].weight.requires_grad and not layer.lora_B["b"].weight.requires_grad
    layer.set_adapter(None)
    assert torch.equal(layer(x), layer.to_linear4bit()(x))
    layer.delete_adapter("a")
    assert layer.adapters == ["b"] and layer.active_adapter is None
    with pytest.raises(KeyError, match="'a'"):
        layer.set_adapter("a")


def test_lora_dropout_only_in_training_and_dtype_handling():
    torch.manual_seed(7)
    layer = LoraLinear4bit.from_linear4bit(Linear4bit.from_linear(nn.Linear(64, 64).bfloat16()), r=8,
                                           lora_alpha=16, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    layer.eval()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    _close(y, _lora_ref(layer, x, "default"), 2e-2)
    layer.train()
    assert not torch.equal(layer(x), y)


def test_lora_bad_arguments_raise():
    base = Linear4bit.from_linear(nn.Linear(64, 64))
    for kw, match in [(dict(r=0), "r must"), (dict(r=2.5), "r must"), (dict(lora_dropout=1.0), "lora_dropout"),
                      (dict(lora_alpha=float("nan")), "lora_alpha"), (dict(adapter_name="a.b"), "adapter name")]:
        with pytest.raises(ValueError, match=match):
            LoraLinear4bit.from_linear4bit(base, **kw)
    layer = LoraLinear4bit.from_linear4bit(base)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 4, 4)
