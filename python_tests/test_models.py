"""Model-level QLoRA on the tiny-llama fixtures: loading bitsandbytes checkpoints and quantizing float ones
(through the registered transformers quantizer), interop with transformers + bitsandbytes both ways, save /
load / export / merge round trips, training with gradient checkpointing against a float64 reference, memory
accounting, and corrupted (untrusted) checkpoints."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import qlora_ext as Q
from qlora_ext import reference as R
from qlora_ext.nn import Linear4bit, LoraLinear4bit

from conftest import TINY

BNB_DIR, FLOAT_DIR, ADAPTER_DIR = TINY / "bnb-nf4-dq", TINY / "float32", TINY / "peft-lora-adapter"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def expected():
    return load_file(TINY / "expected_logits.safetensors")


@pytest.fixture(scope="module")
def bnb_tensors():
    return load_file(BNB_DIR / "model.safetensors")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _checkpointing(model) -> bool:
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        pytest.fail("bitsandbytes is not installed (part of the test extra: pip install 'bitsandbytes>=0.50.2')")
    return bitsandbytes


def _bnb_float32_path(model):
    """bitsandbytes' CPU inference path on AVX512-BF16 machines repacks the weight and multiplies in bfloat16;
    turn it off so its result is the float32 one the fixture's expected logits were made with."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


# ---- the fixtures ----
def test_bnb_checkpoint_and_peft_adapter_reproduce_expected_logits(expected):
    ids = expected["input_ids"]
    model = Q.load_quantized(BNB_DIR)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    assert type(model.lm_head) is nn.Linear
    base = _logits(model, ids)
    assert _max_rel(base, expected["logits_bnb_base"]) <= 1e-4
    Q.load_adapter(model, ADAPTER_DIR)
    with_adapter = _logits(model, ids)
    assert _max_rel(with_adapter, expected["logits_bnb_with_adapter"]) <= 1e-4
    assert _rel(with_adapter, base) > 1e-3  # the adapter really changes the output


def _quantized_names(tensors):
    return sorted(k[:-len(".absmax")] for k in tensors if k.endswith(".weight.absmax"))


def test_from_pretrained_with_qlora_config_is_byte_identical_to_bnb(bnb_tensors):
    model = AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=Q.QLoRAConfig())
    ours = model.state_dict()
    assert set(ours) == set(bnb_tensors)
    for key, ref in bnb_tensors.items():
        assert ours[key].dtype == ref.dtype and torch.equal(ours[key], ref), key
    assert sum(v.numel() for k, v in ours.items() if k.endswith(".weight.absmax")) == 4608  # 14 layers
    # load_quantized on a float checkpoint goes through the same quantizer
    again = Q.load_quantized(FLOAT_DIR).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ours.items())


def test_quantize_model_in_place_matches_the_loader():
    loaded = AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=Q.QLoRAConfig()).state_dict()
    model = AutoModelForCausalLM.from_pretrained(FLOAT_DIR)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert Q.quantize_model(model, Q.QLoRAConfig()) is model
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit) and type(model.lm_head) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj is not q_proj
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head" and "lora" not in n)
    sd = model.state_dict()
    assert set(sd) == set(loaded) and all(torch.equal(sd[k], v) for k, v in loaded.items())
    assert isinstance(model.config.quantization_config, Q.QLoRAConfig)


def test_skip_modules_patterns():
    cfg = Q.QLoRAConfig(skip_modules=["lm_head", "model.layers.1", "v_proj"])
    for model in (AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=cfg),
                  Q.quantize_model(AutoModelForCausalLM.from_pretrained(FLOAT_DIR), cfg)):
        quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        assert quantized == {f"model.layers.0.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in PROJ
                             if p != "v_proj"}


def test_qlora_config_validation_and_serialization():
    cfg = Q.QLoRAConfig(quant_type="fp4", blocksize=128, double_quant=False, compute_dtype="bfloat16")
    assert cfg.compute_dtype is torch.bfloat16
    assert Q.QLoRAConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    bnb = cfg.to_bnb_dict()
    assert bnb["quant_method"] == "bitsandbytes" and bnb["bnb_4bit_quant_type"] == "fp4"
    back = Q.QLoRAConfig.from_bnb_dict(bnb)
    assert (back.quant_type, back.double_quant, back.compute_dtype) == ("fp4", False, torch.bfloat16)
    for kw, match in [(dict(quant_type="int4"), "quant_type"), (dict(blocksize=48), "blocksize"),
                      (dict(double_quant=1), "double_quant"), (dict(compute_dtype=torch.int8), "compute_dtype"),
                      (dict(quant_storage="int4"), "quant_storage"), (dict(skip_modules="lm_head"), "skip_modules"),
                      (dict(bogus=1), "bogus")]:
        with pytest.raises(ValueError, match=match):
            Q.QLoRAConfig(**kw)


# ---- transformers + bitsandbytes, both ways ----
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_bitsandbytes_checkpoints_load_into_our_layers(tmp_path, expected, quant_type, double_quant):
    _bitsandbytes()
    from transformers import BitsAndBytesConfig
    ids = expected["input_ids"]
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    bnb_model = _bnb_float32_path(AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=cfg))
    bnb_model.save_pretrained(tmp_path)
    ours = Q.load_quantized(tmp_path)
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.quant_state.quant_type == quant_type
    assert layer.quant_state.nested == double_quant
    saved = load_file(tmp_path / "model.safetensors")
    sd = ours.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())
    assert _max_rel(_logits(ours, ids), _logits(bnb_model, ids)) <= 1e-5


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_transformers_bitsandbytes_loads_save_quantized(tmp_path, expected, quant_type, double_quant):
    bnb = _bitsandbytes()
    ids = expected["input_ids"]
    ours = Q.load_quantized(FLOAT_DIR, Q.QLoRAConfig(quant_type=quant_type, double_quant=double_quant))
    Q.save_quantized(ours, tmp_path)
    bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = bnb_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert torch.equal(layer.weight.data, ours.model.layers[0].self_attn.q_proj.weight)
    default_path = _logits(bnb_model, ids)  # bitsandbytes' own CPU path, bfloat16 where the CPU has it
    assert _max_rel(default_path, _logits(ours, ids)) <= 2e-2
    bnb_model = _bnb_float32_path(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert _max_rel(_logits(bnb_model, ids), _logits(ours, ids)) <= 1e-5


# ---- round trips ----
def test_save_quantized_load_round_trip_is_bit_identical(tmp_path, expected, bnb_tensors):
    ids = expected["input_ids"]
    model = Q.load_quantized(BNB_DIR)
    Q.load_adapter(model, ADAPTER_DIR)  # adapters are not part of the base checkpoint
    Q.save_quantized(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(bnb_tensors) and all(torch.equal(saved[k], v) for k, v in bnb_tensors.items())
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    fixture_qc = json.loads((BNB_DIR / "config.json").read_text())["quantization_config"]
    assert qc.pop("llm_int8_skip_modules") == ["lm_head"]
    fixture_qc.pop("llm_int8_skip_modules")
    assert qc == fixture_qc
    back = Q.load_quantized(tmp_path)
    assert torch.equal(_logits(back, ids), _logits(Q.load_quantized(BNB_DIR), ids))
    assert _max_rel(_logits(back, ids), expected["logits_bnb_base"]) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]


def test_save_pretrained_of_a_qlora_model_reloads_through_the_quantizer(tmp_path, expected):
    ids = expected["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=Q.QLoRAConfig(quant_type="fp4"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "qlora_ext"
    for back in (AutoModelForCausalLM.from_pretrained(tmp_path), Q.load_quantized(tmp_path)):
        assert isinstance(back.model.layers[0].mlp.up_proj, Linear4bit)
        assert torch.equal(_logits(back, ids), _logits(model, ids))


def _with_fixture_adapter():
    model = Q.load_quantized(BNB_DIR)
    Q.load_adapter(model, ADAPTER_DIR)
    return model


def test_export_merged_loads_in_plain_transformers(tmp_path, expected):
    ids = expected["input_ids"]
    model = _with_fixture_adapter()
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = tmp_path / str(dtype)
        Q.export_merged(model, out, dtype=dtype)
        cfg = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["dtype"] == str(dtype).replace("torch.", "")
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        assert not any(isinstance(m, Linear4bit) for m in plain.modules())
        assert plain.model.layers[0].self_attn.q_proj.weight.dtype == dtype
        assert _rel(_logits(plain, ids).float(), ref) <= tol
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_merge_lora_reports_the_requantization_error(expected):
    ids = expected["input_ids"]
    model = _with_fixture_adapter()
    unmerged = _logits(model, ids)
    layer = model.model.layers[1].mlp.up_proj
    exact = layer.dequantized_weight().double() + layer.delta_weight().double()
    report = Q.merge_lora(model)
    assert not any(isinstance(m, LoraLinear4bit) for m in model.modules())
    assert len(report["layers"]) == 14
    merged_layer = model.model.layers[1].mlp.up_proj
    qs = merged_layer.quant_state
    scales = R.dequantize_absmax_ref(qs.absmax, qs.nested_absmax, qs.offset)
    merged_w = R.dequantize_4bit_ref(merged_layer.weight, scales, qs.shape, torch.float64)
    entry = report["layers"]["model.layers.1.mlp.up_proj"]
    assert entry["rel_error"] == pytest.approx(float((merged_w - exact).norm() / exact.norm()), rel=1e-4)
    assert entry["max_abs_error"] == pytest.approx(float((merged_w - exact).abs().max()), rel=1e-4)
    assert 0 < report["mean_rel_error"] <= report["max_rel_error"] < 0.2
    merged = _logits(model, ids)
    # merging adds one more 4-bit rounding: the merged model is as far from the unmerged one as a
    # quantization step, far closer than the base model without the adapter
    assert _rel(merged, unmerged) < 0.5 * _rel(expected["logits_bnb_base"], unmerged)


# ---- training ----
class _PlainLoRA(nn.Module):
    """Float64 reference layer: x W^T + scaling (x A^T) B^T with W the reference-decoded 4-bit weight."""

    def __init__(self, layer: LoraLinear4bit):
        super().__init__()
        qs = layer.quant_state
        scales = R.dequantize_absmax_ref(qs.absmax, qs.nested_absmax, qs.offset)
        self.register_buffer("w", R.dequantize_4bit_ref(layer.weight, scales, qs.shape, torch.float64))
        self.a = nn.Parameter(layer.lora_A["default"].weight.detach().double().clone())
        self.b = nn.Parameter(layer.lora_B["default"].weight.detach().double().clone())
        self.s = layer.scaling["default"]

    def forward(self, x):
        return x @ self.w.T + self.s * (x @ self.a.T) @ self.b.T


def _lora_model(seed=0, r=4):
    torch.manual_seed(seed)
    model = Q.load_quantized(BNB_DIR)
    Q.add_lora(model, r=r, lora_alpha=2 * r, lora_dropout=0.0)
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):  # non-zero B so that A gets a gradient too
            nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    return model


def test_training_step_with_checkpointing_matches_float64_reference(expected):
    ids = expected["input_ids"]
    model = Q.prepare_model_for_training(_lora_model(), gradient_checkpointing=True)
    model.train()
    assert _checkpointing(model)
    calls = []
    # (q_proj: torch stops recomputing a block early once the tensors backward needs are back)
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert len(calls) == 2  # the checkpointed block ran again during backward

    ref = AutoModelForCausalLM.from_pretrained(FLOAT_DIR, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()
                         if v.is_floating_point() and "lora_" not in k and ".weight." not in k}, strict=False)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
    assert len(lora) == 14
    for n, m in lora.items():
        parent, _, child = n.rpartition(".")
        ref.get_submodule(parent)._modules[child] = _PlainLoRA(m)
    ref.train()
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for n, m in lora.items():
        r = ref.get_submodule(n)
        for ours, theirs in ((m.lora_A["default"].weight.grad, r.a.grad), (m.lora_B["default"].weight.grad, r.b.grad)):
            assert ours is not None and ours.dtype == torch.float32
            assert _rel(ours, theirs) < 1e-4, n
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_loss_decreases_on_a_tiny_overfit_task():
    model = Q.prepare_model_for_training(_lora_model(seed=1, r=8))
    model.train()
    packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    # One thread: these shapes are tiny, and on a busy 2-core machine the thread pool's waits under gradient
    # checkpointing (plain PyTorch shows it too) turn a ~30 ms step into up to a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(30):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    finally:
        torch.set_num_threads(threads)
    # The frozen final norm and lm_head of this tiny random model bound its logits (|h| is fixed by the norm,
    # lm_head's rows are small), so the loss cannot go far below ~3 whatever the adapters learn: ask for a
    # clear, steady decrease from ln(256) = 5.5 rather than for zero.
    assert losses[-1] < 0.65 * losses[0] and max(losses[-5:]) < min(losses[:5]), losses
    assert all(torch.equal(m.weight, packed[n]) for n, m in model.named_modules() if isinstance(m, Linear4bit))


def test_prepare_model_for_training_keeps_norms_float32_and_packed_weights_untouched():
    model = Q.load_quantized(FLOAT_DIR, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    packed, absmax = layer.weight.clone(), layer.quant_state.absmax.clone()
    assert model.model.norm.weight.dtype == torch.bfloat16 and layer.quant_state.dtype == torch.bfloat16
    Q.prepare_model_for_training(model)
    Q.add_lora(model, r=4)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[1].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight, packed) and torch.equal(layer.quant_state.absmax, absmax)
    assert _checkpointing(model) and model.config.use_cache is False
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    ids = torch.randint(0, 256, (1, 8))
    model(ids, labels=ids).loss.backward()  # bf16 base, float32 norms and adapters: runs and gives grads
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_memory_report_counts_each_part():
    model = _lora_model(r=4)
    rep = Q.memory_report(model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    n = sum(m.in_features * m.out_features for m in layers)
    assert rep["quantized_weight_count"] == n
    assert rep["packed_weight_bytes"] == sum((m.in_features * m.out_features + 1) // 2 for m in layers)
    nblocks = [-(-m.in_features * m.out_features // 64) for m in layers]
    assert rep["bits_per_quantized_weight"] == pytest.approx(
        (4 * n + 8 * sum(nblocks) + 32 * sum(-(-b // 256) for b in nblocks)) / n)
    assert rep["bits_per_quantized_weight"] == pytest.approx(4.127, abs=5e-4)
    assert rep["adapter_bytes"] == sum(4 * 4 * (m.in_features + m.out_features) for m in layers)
    other = sum(t.numel() * 4 for n_, t in list(model.named_parameters()) + list(model.named_buffers())
                if "proj" not in n_)  # embeddings, norms, lm_head and the rotary inv_freq buffers
    assert rep["other_bytes"] == other
    assert rep["total_bytes"] == sum(rep[k] for k in ("packed_weight_bytes", "scale_bytes", "adapter_bytes",
                                                      "other_bytes"))
    nodq = Q.memory_report(Q.load_quantized(FLOAT_DIR, Q.QLoRAConfig(double_quant=False)))
    assert nodq["bits_per_quantized_weight"] == pytest.approx(4.5)


# ---- untrusted checkpoints ----
def _copy_bnb(tmp_path, tensors=None):
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(BNB_DIR / f, d / f)
    if tensors is None:
        shutil.copy(BNB_DIR / "model.safetensors", d / "model.safetensors")
    else:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_truncated_checkpoint_names_the_tensor(tmp_path):
    d = _copy_bnb(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-5000])
    with pytest.raises(ValueError, match=r"truncated file: '[\w.]+'"):
        Q.load_quantized(d)
    (d / "model.safetensors").write_bytes(data[:50])
    with pytest.raises(ValueError, match="truncated"):
        Q.load_quantized(d)


def test_wrong_absmax_length_names_the_key(tmp_path, bnb_tensors):
    t = dict(bnb_tensors)
    key = "model.layers.1.self_attn.k_proj.weight.absmax"
    t[key] = t[key][:-3].clone()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Q.load_quantized(_copy_bnb(tmp_path, t))


def test_absurd_or_mismatched_shapes_name_the_key(tmp_path, bnb_tensors):
    name = "model.layers.0.mlp.gate_proj.weight"
    qs_key = name + ".quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(bnb_tensors[qs_key].tolist()))
    t = dict(bnb_tensors)
    t[qs_key] = torch.tensor(list(json.dumps({**meta, "shape": [2 ** 40, 2 ** 40]}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=qs_key.replace(".", r"\.")):
        Q.load_quantized(_copy_bnb(tmp_path / "a", t))
    # a complete, self-consistent 4-bit weight of another shape ([256, 128] where [128, 128] belongs)
    t = dict(bnb_tensors)
    src, dst = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    for k in [k for k in bnb_tensors if k.startswith(src)]:
        t[dst + k[len(src):]] = bnb_tensors[k].clone()
    with pytest.raises(ValueError, match=r"q_proj\.weight.*does not fit"):
        Q.load_quantized(_copy_bnb(tmp_path / "b", t))
    # a safetensors header claiming an absurd shape for its bytes
    d = _copy_bnb(tmp_path / "c")
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [2 ** 31, 2 ** 31]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' of shape"):
        Q.load_quantized(d)


def test_malformed_json_names_the_file_or_key(tmp_path, bnb_tensors):
    d = _copy_bnb(tmp_path / "a")
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON"):
        Q.load_quantized(d)
    t = dict(bnb_tensors)
    qs_key = "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"
    t[qs_key] = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 6'), dtype=torch.uint8)
    with pytest.raises(ValueError, match=qs_key.replace(".", r"\.") + ": malformed quant_state JSON"):
        Q.load_quantized(_copy_bnb(tmp_path / "b", t))


def test_missing_or_misplaced_4bit_entries_are_errors(tmp_path, bnb_tensors):
    t = {k: v for k, v in bnb_tensors.items() if k != "model.layers.0.self_attn.v_proj.weight.nested_absmax"}
    with pytest.raises(ValueError, match=r"v_proj\.weight.*nested_absmax"):
        Q.load_quantized(_copy_bnb(tmp_path / "a", t))
    t = {k: v for k, v in bnb_tensors.items() if not k.startswith("model.layers.1.mlp.up_proj.weight")}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        Q.load_quantized(_copy_bnb(tmp_path / "b", t))
    t = dict(bnb_tensors)  # 4-bit statistics beside lm_head's float weight: a 4-bit layer (as stored) whose
    for k, v in bnb_tensors.items():   # "packed" weight is float32, refused
        if k.startswith("model.layers.0.self_attn.q_proj.weight."):
            t["lm_head.weight." + k.rpartition("q_proj.weight.")[2]] = v.clone()
    with pytest.raises(ValueError, match=r"lm_head\.weight: packed dtype torch\.float32"):
        Q.load_quantized(_copy_bnb(tmp_path / "c", t))


def test_pickle_checkpoints_are_never_read(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(FLOAT_DIR / "config.json", d / "config.json")
    import pickle
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ValueError, match="no .safetensors"):
        Q.load_quantized(d)
    assert not marker.exists()


def test_tied_embeddings_biases_and_awkward_shapes_round_trip(tmp_path):
    """A model unlike the fixture: tied input/output embeddings, biases on every projection, and widths that
    are not multiples of the block size (blocks straddle rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, head_dim=32, vocab_size=300, tie_word_embeddings=True,
                      attention_bias=True, mlp_bias=True)
    float_model = LlamaForCausalLM(cfg)
    for n, p in float_model.named_parameters():
        if n.endswith(".bias"):
            nn.init.normal_(p, std=0.1)
    float_model.save_pretrained(tmp_path / "float")
    ids = torch.randint(0, 300, (2, 10))
    model = Q.load_quantized(tmp_path / "float")
    assert model.lm_head.weight is model.model.embed_tokens.weight and type(model.lm_head) is nn.Linear
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.bias is not None
    assert _rel(_logits(model, ids), _logits(float_model, ids)) < 0.1  # 4-bit noise, nothing worse

    Q.save_quantized(model, tmp_path / "nf4")
    back = Q.load_quantized(tmp_path / "nf4")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(_logits(back, ids), _logits(model, ids))

    Q.add_lora(model, r=4, lora_dropout=0.0)
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):
            nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    with_adapter = _logits(model, ids)
    Q.export_merged(model, tmp_path / "merged", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert _rel(_logits(plain, ids), with_adapter) < 1e-5
    Q.merge_lora(model)
    assert _rel(_logits(model, ids), with_adapter) < 0.1


@pytest.mark.parametrize("case", ["plain", "ignore+mask", "num_items", "shift_labels"])
def test_prepared_forward_with_labels_chunks_the_head_loss_exactly(monkeypatch, expected, case):
    """prepare_model_for_training routes forward(labels=...) through the chunked head loss (issue 20): the same
    loss, logits and LoRA gradients as transformers' own forward, over several chunks of rows."""
    from qlora_ext import lm
    monkeypatch.setattr(lm, "HEAD_CHUNK_ELEMENTS", 7 * 256)   # several chunks of the tiny vocabulary, a partial last
    ids = expected["input_ids"].repeat(2, 1)
    model = Q.prepare_model_for_training(_lora_model(seed=3), gradient_checkpointing=True)
    assert "_qlora_ext_forward" in vars(model)
    model.train()
    labels, kw = ids.clone(), {}
    if case == "ignore+mask":
        labels[0, :3] = -100
        labels[1, -2:] = -100
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        kw["attention_mask"] = mask
    elif case == "num_items":
        kw["num_items_in_batch"] = torch.tensor(11)
    elif case == "shift_labels":
        kw["shift_labels"] = torch.roll(ids, -1, 1)
        kw["shift_labels"][:, -1] = -100

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward(input_ids=ids, labels=labels, **kw)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads
    ours, g_ours = run(model)
    theirs, g_theirs = run(model._qlora_ext_forward)   # transformers' forward, unchunked
    assert ours.logits.shape == (*ids.shape, model.config.vocab_size) and not ours.logits.requires_grad
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits, theirs.logits.detach(), rtol=1e-5, atol=1e-5)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 28
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-6, msg=n)


# tiny-config extras per family (pad_token_id / head_dim where the generic tiny config does not fit the default)
_PLAIN_HEAD_EXTRAS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=16), "phi": {}, "phi3": dict(pad_token_id=0),
    "gemma": dict(head_dim=16), "olmo": {}, "olmo2": {}, "smollm3": dict(pad_token_id=0), "starcoder2": {},
    "stablelm": {}, "glm": dict(head_dim=16, pad_token_id=0), "glm4": dict(head_dim=16, pad_token_id=0),
    "helium": dict(head_dim=16, pad_token_id=0), "arcee": {}, "exaone4": {}, "seed_oss": dict(head_dim=16),
    "apertus": {}}


@pytest.mark.parametrize("model_type", sorted(_PLAIN_HEAD_EXTRAS))
def test_every_plain_head_family_gets_the_exact_chunked_loss(model_type):
    """Each family listed as having a plain head (decoder -> lm_head, nothing in between) gets the chunked loss,
    and it equals transformers' own: loss, logits and LoRA gradients (random tiny model, biased head for phi)."""
    from transformers import AutoConfig
    from qlora_ext import lm
    assert set(_PLAIN_HEAD_EXTRAS) == lm.PLAIN_HEAD_MODEL_TYPES   # a family added there is tested here
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                               max_position_embeddings=64, **_PLAIN_HEAD_EXTRAS[model_type])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else None
    model = Q.prepare_model_for_training(Q.quantize_model(model), cpu_block_cache=None)
    assert "_qlora_ext_forward" in vars(model)
    Q.add_lora(model, r=4, lora_dropout=0.0)
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):
            nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    model.eval()   # some families default to dropout in attention or residuals
    ids = torch.randint(0, 320, (2, 12))

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward(input_ids=ids, labels=ids)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ours, g_ours = run(model)
    theirs, g_theirs = run(model._qlora_ext_forward)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits, theirs.logits.detach(), rtol=1e-5, atol=1e-5)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-6, msg=n)


def test_prepared_forward_falls_back_where_chunking_does_not_apply(expected):
    ids = expected["input_ids"]
    model = Q.prepare_model_for_training(_lora_model(), gradient_checkpointing=False)
    assert model(input_ids=ids).loss is None                           # no labels: transformers' forward
    model.lm_head.weight.requires_grad_(True)                          # a trained head: its gradient is needed
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    Q.prepare_model_for_training(model, gradient_checkpointing=False)  # idempotent: one wrapper
    from qlora_ext import lm
    assert vars(model)["_qlora_ext_forward"].__func__ is not lm._chunked_causal_lm_forward


def test_gpt2_conv1d_layers_quantize_and_interoperate_like_bitsandbytes(tmp_path):
    """transformers' Conv1D (GPT-2 and its relatives: a linear layer whose weight is stored [in, out]) is
    quantized, as bitsandbytes quantizes it, transposed to [out, in]: the same bytes and keys as transformers +
    bitsandbytes, both ways, adapters both ways (PEFT's fan_in_fan_out adapters of the float model too), and a
    merged export whose Conv1D weights plain transformers reads back in their own layout."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel
    _bitsandbytes()
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=96, n_layer=2, n_head=3, n_inner=200, vocab_size=300, n_positions=64)
    float_model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, p in float_model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    float_model.save_pretrained(tmp_path / "float")
    ids = torch.randint(0, 300, (2, 12))
    conv = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32,
                                                quantization_config=Q.QLoRAConfig(compute_dtype=torch.float32))
    bnb = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32, quantization_config=
                                               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_use_double_quant=True,
                                                                  bnb_4bit_compute_dtype=torch.float32))
    _bnb_float32_path(bnb)
    for i in range(2):
        for c in conv:
            m = ours.get_submodule(f"transformer.h.{i}.{c}")
            src = float_model.get_submodule(f"transformer.h.{i}.{c}").weight   # [in, out]
            assert isinstance(m, Linear4bit) and m.source_transposed
            assert (m.out_features, m.in_features) == tuple(src.shape[::-1]) == tuple(m.quant_state.shape)
            assert _rel(m.dequantized_weight(torch.float32), src.t()) < 0.15  # 4-bit noise of the transpose
    assert type(ours.lm_head) is nn.Linear  # tied to the embeddings: float
    sd_ours, sd_bnb = ours.state_dict(), bnb.state_dict()
    assert set(sd_ours) == set(sd_bnb)
    for k, v in sd_bnb.items():
        assert torch.equal(sd_ours[k], v.view(sd_ours[k].dtype).reshape(sd_ours[k].shape)), k
    ref = _logits(bnb, ids)
    assert _max_rel(_logits(ours, ids), ref) < 1e-5
    assert _rel(_logits(ours, ids), _logits(float_model, ids)) < 0.1

    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv2d"):
        Linear4bit.from_linear(nn.Conv2d(4, 4, 1))
    inplace = Q.quantize_model(GPT2LMHeadModel.from_pretrained(tmp_path / "float"), Q.QLoRAConfig())
    assert all(torch.equal(v, sd_ours[k]) for k, v in inplace.state_dict().items())
    bnb.save_pretrained(tmp_path / "bnb")        # transformers + bitsandbytes' own 4-bit checkpoint
    assert torch.equal(_logits(Q.load_quantized(tmp_path / "bnb", Q.QLoRAConfig(compute_dtype=torch.float32)),
                               ids), _logits(ours, ids))
    Q.save_quantized(ours, tmp_path / "nf4")   # and ours into transformers + bitsandbytes
    back = _bnb_float32_path(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", dtype=torch.float32))
    assert _max_rel(_logits(back, ids), ref) < 1e-5

    # PEFT's adapter for the float model (fan_in_fan_out=True: PEFT's Conv1D convention) onto both 4-bit models
    peft_float = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "float"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                           fan_in_fan_out=True)).eval()
    with torch.no_grad():
        for n, p in peft_float.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_float.save_pretrained(tmp_path / "peft-adapter")
    assert json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    Q.load_adapter(ours, tmp_path / "peft-adapter")
    ours.eval()
    with_adapter = _logits(ours, ids)
    on_bnb = PeftModel.from_pretrained(bnb, tmp_path / "peft-adapter").eval()
    assert _max_rel(with_adapter, _logits(on_bnb, ids)) < 1e-5
    assert _rel(with_adapter, _logits(peft_float, ids)) < 0.1   # the float model with the same adapter

    # our adapter, saved and loaded by PEFT on the bitsandbytes model (removing the float adapter first)
    on_bnb = on_bnb.unload()
    Q.save_adapter(ours, tmp_path / "ours-adapter")
    again = PeftModel.from_pretrained(on_bnb, tmp_path / "ours-adapter").eval()
    assert _max_rel(_logits(again, ids), with_adapter) < 1e-5

    Q.export_merged(ours, tmp_path / "merged", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert _rel(_logits(plain, ids), with_adapter) < 1e-5
