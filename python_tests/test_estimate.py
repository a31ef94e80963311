"""qlora_ext.estimate: memory of full 16-bit fine-tuning, LoRA and QLoRA from first principles; the paper's
headline (65B: QLoRA < 48 GB, full 16-bit > 780 GB) and exact byte counts checked against real tensors."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cli_fixtures import TINY_FLOAT
from qlora_ext import estimate as E
from qlora_ext import quantize_4bit
from qlora_ext.cli import main


def test_bits_per_weight_from_first_principles():
    # 4-bit code + one uint8 scale code per 64 weights + one float32 per 256 scale codes
    assert E.bits_per_weight(64, True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(E.bits_per_weight(64, True), 3) == 4.127
    assert E.bits_per_weight(64, False) == 4.5          # one float32 absmax per 64 weights


@pytest.mark.parametrize("shape, blocksize, dq", [((4096, 4096), 64, True), ((300, 77), 64, True),
                                                 ((1000, 33), 128, False), ((64, 64), 32, True)])
def test_nf4_bytes_match_the_real_quantized_tensors(shape, blocksize, dq):
    w = torch.randn(*shape)
    packed, st = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", double_quant=dq)
    scales = st.absmax.numel() * st.absmax.element_size()
    if dq:
        scales += st.nested_absmax.numel() * st.nested_absmax.element_size() + st.offset.numel() * 4
    assert E.nf4_bytes(w.numel(), blocksize, dq) == (packed.numel() * packed.element_size(), scales)


@pytest.mark.parametrize("name, published", [("7B", 6.7e9), ("13B", 13.0e9), ("33B", 32.5e9), ("65B", 65.2e9)])
def test_named_sizes_have_llama_parameter_counts(name, published):
    assert abs(E.NAMED[name].params - published) / published < 0.01


def test_param_count_of_a_config_matches_the_checkpoint():
    shape = E.resolve_shape(str(TINY_FLOAT))
    tensors = load_file(str(TINY_FLOAT / "model.safetensors"))
    assert shape.params == sum(t.numel() for t in tensors.values())
    linear = sum(t.numel() for k, t in tensors.items() if k.endswith("proj.weight"))
    assert shape.linear_params == linear


def test_paper_headline_65b():
    s = E.NAMED["65B"]
    full, lora, qlora = (E.estimate(s, m) for m in E.METHODS)
    # full 16-bit: 2 (weights) + 2 (gradients) + 8 (two float32 Adam moments) bytes per parameter
    assert full["weights"] + full["gradients"] + full["optimizer"] == 12 * s.params
    assert full["total"] > 780e9
    assert qlora["total"] < 48e9
    assert lora["total"] > 48e9 > qlora["total"]        # it is the 4-bit base that makes it fit
    # the quantized linear layers cost 4.127 bits per weight (up to one partial block per tensor)
    bits = 8 * (qlora["weights"] - (s.embedding_params + s.norm_params) * 2 + qlora["scales"]) / s.linear_params
    assert abs(bits - E.bits_per_weight()) < 1e-4
    # adapters on all 7 linear layers of all 80 blocks: r * (in + out) each
    assert qlora["trainable"] == 80 * 64 * (4 * 2 * 8192 + 3 * (8192 + 22016))
    assert qlora["optimizer"] == 8 * qlora["trainable"] and qlora["gradients"] == 2 * qlora["trainable"]


def test_activations_model():
    s = E.NAMED["7B"]
    ck = E.activations(s, batch=1, seq_len=512, gradient_checkpointing=True)
    no = E.activations(s, batch=1, seq_len=512, gradient_checkpointing=False)
    assert no > 5 * ck
    assert E.activations(s, batch=4, seq_len=512, gradient_checkpointing=True) == 4 * ck
    # checkpointing keeps one 16-bit hidden state per block and token, plus float32 logits and their grad
    per_block = 4 * 4096 + 2 * 4096 + 2 * 4096 + 4 * 11008
    assert ck == 512 * (32 * 4096 + per_block) * 2 + 512 * 32000 * 8


def test_estimate_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="neither a named size"):
        E.resolve_shape("70Q")
    (tmp_path / "config.json").write_text('{"model_type": "mystery"}')
    with pytest.raises(ValueError, match="config has none of"):
        E.resolve_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        E.resolve_shape(str(tmp_path / "config.json"))
    with pytest.raises(ValueError, match="lora_r must be >= 1"):
        E.estimate(E.NAMED["7B"], "qlora", lora_r=0)


def test_cli_estimate(capsys):
    assert main(["estimate", "--model", "65B"]) == 0
    out = capsys.readouterr().out
    assert "LLaMA-65B" in out and "QLoRA NF4 + DQ" in out
    total = [ln for ln in out.splitlines() if ln.startswith("total")][0].split()[1:]
    assert float(total[0]) > 780 and float(total[2]) < 48
    assert main(["estimate", "--model", str(TINY_FLOAT / "config.json"), "--json", "--lora-r", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["settings"]["lora_r"] == 8 and rep["bytes"]["qlora"]["trainable"] > 0
    assert main(["estimate", "--model", "70Q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlora-ext: error: ") and len(err.strip().splitlines()) == 1
    assert math.isfinite(rep["bytes"]["full16"]["total"])


def test_finetune_estimate_counts_what_finetune_stores():
    s = E.NAMED["13B"]
    base = E.finetune_estimate(s, seq_len=128)
    t = base["trainable"]
    assert base["adapters"] == 4 * t and base["gradients"] == 4 * t and base["optimizer"] == 8 * t
    q = E.estimate(s, "qlora", seq_len=128)
    # float32 embeddings / head and norms on top of the paper's 16-bit ones; the 4-bit part is the same
    assert base["weights"] - q["weights"] == 2 * (s.embedding_params + s.norm_params)
    assert base["scales"] == q["scales"] and base["runtime"] == E.FINETUNE_RUNTIME_BYTES
    small = E.finetune_estimate(s, seq_len=128, embedding_dtype="bfloat16", optim="paged_adamw_8bit")
    assert base["weights"] - small["weights"] == 2 * s.embedding_params
    assert small["optimizer"] == int(t * (2 + 8 / 256))
    assert base["total"] == sum(base[c] for c in E.COMPONENTS) + base["runtime"]
    half = E.finetune_estimate(s, seq_len=128, lora_dtype="bfloat16")
    assert half["adapters"] == 2 * t and half["gradients"] == 2 * t and half["optimizer"] == base["optimizer"]
    assert base["total"] - half["total"] == 4 * t
    with pytest.raises(ValueError, match="optim must be one of"):
        E.finetune_estimate(s, optim="sgd")
    with pytest.raises(ValueError, match="lora_dtype must be one of"):
        E.finetune_estimate(s, lora_dtype="int8")


def test_cli_estimate_finetune(capsys):
    assert main(["estimate", "--model", "13B", "--seq-len", "128", "--finetune", "--embedding-dtype", "bfloat16",
                 "--optim", "paged_adamw_8bit", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["finetune"]["settings"]["optim"] == "paged_adamw_8bit"
    assert rep["finetune"]["bytes"] == E.finetune_estimate(E.NAMED["13B"], seq_len=128, embedding_dtype="bfloat16",
                                                           optim="paged_adamw_8bit")
    assert main(["estimate", "--model", "33B", "--seq-len", "128", "--finetune", "--lora-dtype", "bfloat16",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["finetune"]["bytes"] == E.finetune_estimate(E.NAMED["33B"], seq_len=128, lora_dtype="bfloat16")
    assert main(["estimate", "--model", "1B", "--finetune"]) == 0
    assert "qlora-ext finetune, one process" in capsys.readouterr().out
