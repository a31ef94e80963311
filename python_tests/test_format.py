"""The checkpoint format: quantizing the tiny-llama float32 weights reproduces the bitsandbytes checkpoint,
QuantState.as_dict / from_dict round-trip its entries, and corrupted entries give errors naming the key."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_ext import functional as F
from qlora_ext import reference as R

from conftest import TINY


@pytest.fixture(scope="module")
def float_weights():
    return load_file(TINY / "float32" / "model.safetensors")


@pytest.fixture(scope="module")
def bnb():
    return load_file(TINY / "bnb-nf4-dq" / "model.safetensors")


def _quantized_layers(bnb):
    return sorted(k[:-len(".absmax")] for k in bnb if k.endswith(".weight.absmax"))


def test_fixture_has_the_expected_layers(bnb):
    assert len(_quantized_layers(bnb)) == 14  # 7 projections x 2 layers; lm_head is not quantized
    assert "lm_head.weight.absmax" not in bnb


def test_quantizing_float32_reproduces_the_bnb_checkpoint(float_weights, bnb):
    """Packed bytes, double-quantized absmax, nested absmax, offset, quant maps and the JSON are
    byte-identical for every layer (the 8-bit absmax bytes follow bitsandbytes' 65536-point grid rule,
    see reference.quantize_8bit_ref: nearest-value rounding alone differs on 13 of these 4,608 bytes)."""
    for name in _quantized_layers(bnb):
        packed, state = F.quantize_4bit(float_weights[name])
        ours = state.as_dict(name + ".")
        assert torch.equal(packed, bnb[name]), name
        assert set(ours) == {k for k in bnb if k.startswith(name + ".")}
        for key in ours:
            assert torch.equal(ours[key], bnb[key]), key
        assert bytes(ours[name + ".quant_state.bitsandbytes__nf4"].tolist()) == \
            bytes(bnb[name + ".quant_state.bitsandbytes__nf4"].tolist())


def test_the_grid_rule_is_what_the_fixture_needs(float_weights, bnb):
    """Guards the rule itself: plain nearest-value rounding of the same scales does NOT give the fixture's
    bytes, so a regression to it would be caught here even if both kernels and reference changed."""
    code = F.get_code("dynamic_signed")
    nearest_differs = 0
    for name in _quantized_layers(bnb):
        _, absmax = R.quantize_4bit_ref(float_weights[name])
        shifted = absmax - absmax.mean()
        q, nested = R.quantize_8bit_ref(shifted, code, 256)
        assert torch.equal(q, bnb[name + ".absmax"]), name
        normed = shifted * (1.0 / nested).repeat_interleave(256)[:shifted.numel()]
        nearest = (normed[:, None] - code).abs().argmin(dim=1).to(torch.uint8)
        nearest_differs += int((nearest != q).sum())
    assert nearest_differs > 0


def test_dequantizing_the_bnb_checkpoint_matches_the_spec_formula(bnb):
    for name in _quantized_layers(bnb):
        state = F.QuantState.from_dict(bnb, prefix=name + ".")
        assert state.nested and state.shape == torch.Size(json.loads(
            bytes(bnb[name + ".quant_state.bitsandbytes__nf4"].tolist()))["shape"])
        scales = R.dequantize_absmax_ref(state.absmax, state.nested_absmax, state.offset)
        expect = R.dequantize_4bit_ref(bnb[name], scales, state.shape, torch.float32)
        assert torch.equal(F.dequantize_4bit(bnb[name], state), expect)


def test_as_dict_from_dict_round_trip():
    for dq in (True, False):
        for qt, dtype in (("nf4", torch.bfloat16), ("fp4", torch.float16)):
            w = torch.randn(100, 70).to(dtype)
            packed, state = F.quantize_4bit(w, 128, qt, double_quant=dq)
            d = state.as_dict("m.weight.")
            expected_keys = {"absmax", "quant_map", f"quant_state.bitsandbytes__{qt}"}
            if dq:
                expected_keys |= {"nested_absmax", "nested_quant_map"}
            assert set(d) == {"m.weight." + k for k in expected_keys}
            back = F.QuantState.from_dict(d, prefix="m.weight.")
            assert back.shape == state.shape and back.dtype == dtype and back.blocksize == 128
            assert torch.equal(F.dequantize_4bit(packed, back), F.dequantize_4bit(packed, state))
            meta = json.loads(bytes(d[f"m.weight.quant_state.bitsandbytes__{qt}"].tolist()))
            assert list(meta) == (["quant_type", "blocksize", "dtype", "shape"] +
                                  (["nested_blocksize", "nested_dtype", "nested_offset"] if dq else []))


def _corrupt(bnb, name, key, value):
    d = {k: v for k, v in bnb.items() if k.startswith(name + ".")}
    if value is None:
        del d[name + "." + key]
    else:
        d[name + "." + key] = value
    return d


def _json_tensor(text):
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def test_corrupted_entries_raise_errors_naming_the_key(bnb):
    name = "model.layers.0.self_attn.q_proj.weight"
    js = bytes(bnb[name + ".quant_state.bitsandbytes__nf4"].tolist()).decode()
    meta = json.loads(js)
    qs = "quant_state.bitsandbytes__nf4"
    bad = {
        "absmax": [("absmax", bnb[name + ".absmax"][:-1]), ("absmax", None),
                   ("absmax", bnb[name + ".absmax"].float()),
                   (qs, _json_tensor(json.dumps({**meta, "shape": [64, 128]})))],  # absmax no longer fits
        "nested_absmax": [("nested_absmax", torch.ones(5)), ("nested_absmax", torch.tensor([float("nan")]))],
        "nested_quant_map": [("nested_quant_map", torch.ones(255))],
        "quant_map": [("quant_map", torch.zeros(16))],
        qs: [(qs, _json_tensor(js[:-7])),  # truncated JSON
             (qs, _json_tensor("[1, 2]")),
             (qs, torch.tensor([0xff, 0xfe], dtype=torch.uint8)),  # not UTF-8
             (qs, _json_tensor(json.dumps({**meta, "shape": [128, -128]}))),
             (qs, _json_tensor(json.dumps({**meta, "shape": [2 ** 40, 2 ** 40]}))),  # absurd
             (qs, _json_tensor(json.dumps({**meta, "blocksize": 48}))),
             (qs, _json_tensor(json.dumps({**meta, "dtype": "int8"}))),
             (qs, _json_tensor(json.dumps({**meta, "quant_type": "fp4"}))),
             (qs, _json_tensor(json.dumps({**meta, "nested_offset": "NaN"}))),
             (qs, torch.zeros(10000, dtype=torch.uint8))],
    }
    for key, variants in bad.items():
        for k, value in variants:
            with pytest.raises(ValueError, match=key.replace(".", r"\.")):
                F.QuantState.from_dict(_corrupt(bnb, name, k, value), prefix=name + ".")


def test_truncated_packed_weight_is_rejected(bnb):
    name = "model.layers.0.self_attn.q_proj.weight"
    state = F.QuantState.from_dict(bnb, prefix=name + ".")
    with pytest.raises(ValueError, match="packed weight has"):
        F.dequantize_4bit(bnb[name][:-1], state)
