"""LoRA adapters in PEFT's format: round trips, PEFT loading our adapters and us loading PEFT's (suffix,
full-path and regex target_modules, rank / alpha patterns, rsLoRA), several named adapters, atomic saves,
and corrupted adapter files.

PEFT runs on a float copy of the tiny model whose linear weights are our dequantized 4-bit weights, so the
two implementations compute the same function and must agree to float32 rounding."""
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qlora_ext as Q
from qlora_ext.nn import Linear4bit, LoraLinear4bit

from conftest import TINY

BNB_DIR, FLOAT_DIR, ADAPTER_DIR = TINY / "bnb-nf4-dq", TINY / "float32", TINY / "peft-lora-adapter"
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _quantized():
    return Q.load_quantized(BNB_DIR)


def _dequantized_float_twin(quantized):
    """The float fixture model with each 4-bit layer's weight replaced by its dequantized value."""
    model = AutoModelForCausalLM.from_pretrained(FLOAT_DIR)
    for n, m in quantized.named_modules():
        if isinstance(m, Linear4bit):
            model.get_submodule(n).weight.data = m.dequantized_weight().float()
    return model


def _randomize_b(model, seed=0, std=0.05, adapter=None):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLinear4bit):
            for name in m.adapters if adapter is None else [adapter] if adapter in m.adapters else []:
                w = m.lora_B[name].weight
                w.data = torch.randn(w.shape, generator=g) * std


def _lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear4bit))


# ---- our own round trip ----
@pytest.mark.parametrize("kwargs", [dict(r=4, lora_alpha=8),
                                    dict(r=3, lora_alpha=5, use_rslora=True,
                                         target_modules=["model.layers.1.self_attn.q_proj", "v_proj"])])
def test_save_adapter_then_load_into_a_fresh_model_gives_identical_logits(tmp_path, kwargs):
    model = Q.add_lora(_quantized(), **kwargs)
    _randomize_b(model)
    Q.save_adapter(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in weights)
    fresh = Q.load_adapter(_quantized(), tmp_path)
    assert _lora_names(fresh) == _lora_names(model)
    assert torch.equal(_logits(fresh), _logits(model))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kwargs["r"] and cfg["lora_alpha"] == kwargs["lora_alpha"]
    if "target_modules" in kwargs:  # a subset: written as full paths, since suffixes would match more layers
        assert cfg["target_modules"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                         "model.layers.1.self_attn.v_proj"]
    else:
        assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])


# ---- PEFT loads ours ----
def test_peft_loads_our_adapter_and_matches(tmp_path):
    model = Q.add_lora(_quantized(), r=4, lora_alpha=16, lora_dropout=0.1,
                       target_modules=["q_proj", "model.layers.0.mlp.down_proj"])
    _randomize_b(model)
    model.eval()
    Q.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(_dequantized_float_twin(model), tmp_path)
    peft_model.eval()
    assert _rel(_logits(peft_model), _logits(model)) < 1e-5
    lora_a = peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert torch.equal(lora_a, model.model.layers[0].mlp.down_proj.lora_A["default"].weight)


# ---- we load PEFT's ----
def _peft_adapter(path, quantized, **config):
    float_twin = _dequantized_float_twin(quantized)
    peft_model = get_peft_model(float_twin, LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    peft_model.save_pretrained(path)
    peft_model.eval()
    return peft_model


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"down_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3}),
    dict(r=2, lora_alpha=4, use_rslora=True,
         target_modules=["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"]),
    dict(r=3, lora_alpha=6, target_modules=r"model\.layers\.1\..*_proj"),
])
def test_we_load_peft_adapters_and_match(tmp_path, config):
    quantized = _quantized()
    peft_model = _peft_adapter(tmp_path / "peft", quantized, **config)
    Q.load_adapter(quantized, tmp_path / "peft")
    assert _rel(_logits(quantized), _logits(peft_model)) < 1e-5
    peft_layers = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                         if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    assert _lora_names(quantized) == peft_layers
    # ... and saving it again gives PEFT an adapter it reads back to the same outputs
    Q.save_adapter(quantized, tmp_path / "ours")
    again = PeftModel.from_pretrained(_dequantized_float_twin(quantized), tmp_path / "ours")
    again.eval()
    assert _rel(_logits(again), _logits(peft_model)) < 1e-5


# ---- several adapters ----
def test_named_adapters_switch_and_save_separately(tmp_path):
    model = Q.load_adapter(_quantized(), ADAPTER_DIR, adapter_name="fixture")
    with_fixture = _logits(model)
    Q.add_lora(model, r=2, lora_alpha=2, target_modules=["q_proj"], adapter_name="mine")
    _randomize_b(model, seed=3, adapter="mine")
    mine = _logits(model)
    assert _rel(mine, with_fixture) > 1e-3
    # layers without "mine" run their base alone while "mine" is active
    assert model.model.layers[0].mlp.up_proj.active_adapter is None
    Q.set_adapter(model, "fixture")
    assert torch.equal(_logits(model), with_fixture)
    Q.save_adapter(model, tmp_path / "fixture")
    saved = load_file(tmp_path / "fixture" / "adapter_model.safetensors")
    original = load_file(ADAPTER_DIR / "adapter_model.safetensors")
    assert set(saved) == set(original) and all(torch.equal(saved[k], original[k]) for k in saved)
    Q.save_adapter(model, tmp_path / "mine", adapter_name="mine")
    assert len(load_file(tmp_path / "mine" / "adapter_model.safetensors")) == 4
    Q.set_adapter(model, None)
    assert torch.equal(_logits(model), _logits(_quantized()))
    with pytest.raises(KeyError, match="nope"):
        Q.set_adapter(model, "nope")


def test_add_lora_freezes_the_base_and_counts_parameters(capsys):
    model = Q.add_lora(_quantized(), r=4)
    trainable, total = Q.print_trainable_parameters(model)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(layers) == 14
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in layers)
    base = sum(m.in_features * m.out_features for m in layers) + sum(
        p.numel() for n, p in model.named_parameters() if "proj" not in n)
    assert total == base + trainable
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}


def test_add_lora_target_errors():
    with pytest.raises(ValueError, match="no 4-bit linear layer"):
        Q.add_lora(AutoModelForCausalLM.from_pretrained(FLOAT_DIR))
    model = _quantized()
    with pytest.raises(ValueError, match="float"):
        Q.add_lora(model, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="not linear layers"):
        Q.add_lora(model, target_modules=["mlp"])
    with pytest.raises(ValueError, match="no 4-bit linear layer"):
        Q.add_lora(model, target_modules=["nonexistent_proj"])
    Q.add_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already exists"):
        Q.add_lora(model, target_modules=["q_proj"])


# ---- atomic saves ----
def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_crash_while_saving_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    import safetensors.torch
    model = Q.add_lora(_quantized(), r=4)
    _randomize_b(model, seed=5)
    Q.save_adapter(model, tmp_path)
    good = _snapshot(tmp_path)
    _randomize_b(model, seed=6)
    real_save = safetensors.torch.save_file

    def crashing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        Q.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == good  # same files, same bytes, no temporary left behind

    # a crash while writing the second file (the config) also leaves both previous files in place
    def crashing_write_text(self, *a, **k):
        raise KeyboardInterrupt

    import pathlib
    monkeypatch.setattr(pathlib.Path, "write_text", crashing_write_text)
    with pytest.raises(KeyboardInterrupt):
        Q.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == good
    assert torch.equal(_logits(Q.load_adapter(_quantized(), tmp_path)), _logits(_load_snapshot(good, tmp_path)))


def _load_snapshot(files, tmp_path):
    d = tmp_path.parent / (tmp_path.name + "-copy")
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Q.load_adapter(_quantized(), d)


def test_weights_and_config_from_different_saves_are_detected(tmp_path, monkeypatch):
    model = Q.add_lora(_quantized(), r=4)
    Q.save_adapter(model, tmp_path / "a")
    Q.add_lora(model, r=2, lora_alpha=32, adapter_name="other")
    real_replace, calls = os.replace, []

    def dies_between_renames(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise SystemExit("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_between_renames)
    with pytest.raises(SystemExit):
        Q.save_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different adapter_config.json"):
        Q.load_adapter(_quantized(), tmp_path / "a")


# ---- corrupted adapter files ----
def _corrupt_copy(tmp_path, name, config=None, tensors=None, raw_weights=None):
    d = tmp_path / name
    shutil.copytree(ADAPTER_DIR, d)
    if config is not None:
        (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    if raw_weights is not None:
        (d / "adapter_model.safetensors").write_bytes(raw_weights)
    return d


def test_corrupted_adapters_raise_errors_naming_the_key(tmp_path):
    cfg = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    t = load_file(ADAPTER_DIR / "adapter_model.safetensors")
    key_a = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    raw = (ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    cases = [
        (dict(config='{"r": 8, "lora_alpha": '), r"adapter_config\.json: malformed JSON"),
        (dict(config=[1, 2]), "expected a JSON object"),
        (dict(config={**cfg, "r": -3}), "'r' must be"),
        (dict(config={**cfg, "lora_alpha": "16"}), "'lora_alpha' must be"),
        (dict(config={**cfg, "use_dora": True}), "'use_dora'"),
        (dict(config={**cfg, "peft_type": "IA3"}), "'peft_type'"),
        (dict(config={**cfg, "target_modules": ["lm_head"]}), "float"),
        (dict(config={**cfg, "target_modules": ["q_proj"]}), "unexpected key"),
        (dict(config={**cfg, "rank_pattern": {"q_proj": 0}}), "rank_pattern"),
        (dict(tensors={**t, key_a: t[key_a][:, :100].contiguous()}), key_a.replace(".", r"\.") + "' has shape"),
        (dict(tensors={k: v for k, v in t.items() if k != key_b}), "missing key '" + key_b.replace(".", r"\.")),
        (dict(tensors={**t, key_b: torch.full_like(t[key_b], float("nan"))}), key_b.replace(".", r"\.") + ".*NaN"),
        (dict(tensors={**t, key_a: t[key_a].to(torch.int32)}), key_a.replace(".", r"\.") + ".*dtype"),
        (dict(tensors={**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128)}), "unexpected key"),
        (dict(raw_weights=raw[:-1000]), r"truncated file: '[\w.]+'"),
        (dict(raw_weights=raw[:4]), "truncated"),
    ]
    model = _quantized()
    before = _logits(model)
    for i, (corruption, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            Q.load_adapter(model, _corrupt_copy(tmp_path, f"c{i}", **corruption))
        # nothing was applied: validation happens before the model is modified
        assert not _lora_names(model) and torch.equal(_logits(model), before)


def test_lora_dropout_follows_the_model_mode():
    model = Q.quantize_model(AutoModelForCausalLM.from_pretrained(FLOAT_DIR).eval())
    Q.add_lora(model, r=4, lora_dropout=0.5)
    _randomize_b(model)
    assert torch.equal(_logits(model), _logits(model))  # eval: no dropout
    model.train()
    assert not torch.equal(_logits(model), _logits(model))
    model.eval()
    before = _logits(model)
    Q.add_lora(model, r=2, lora_dropout=0.5, adapter_name="second")
    Q.set_adapter(model, "default")
    assert torch.equal(_logits(model), before)
