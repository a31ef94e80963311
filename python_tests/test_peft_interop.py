"""Drop-in for bitsandbytes + PEFT users, against the real peers (PEFT, transformers' Trainer, TRL's SFTTrainer,
bitsandbytes on CPU): QLoRAConfig with bitsandbytes' names, PEFT's LoRA on our 4-bit layers (targets, kernels
used forward and backward, merge, several adapters, save / reload, AutoPeftModel), our optimizers in Trainer,
and the end-to-end script of python_tests/scripts/ (a bitsandbytes user's script with two lines changed),
whose adapters load on a bitsandbytes model and the other way round."""
import difflib
import json
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qlora_ext as Q
from qlora_ext.nn import Linear4bit

from conftest import REPO, TINY

FLOAT_DIR = TINY / "float32"
SCRIPTS = REPO / "python_tests" / "scripts"
OURS, THEIRS = SCRIPTS / "qlora_qlora_ext.py", SCRIPTS / "qlora_bitsandbytes.py"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = sorted(f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in (0, 1) for p in PROJ)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _ours(**kw):
    return AutoModelForCausalLM.from_pretrained(FLOAT_DIR, quantization_config=Q.QLoRAConfig(**kw))


def _bnb_model(path=FLOAT_DIR):
    """transformers + bitsandbytes (CPU) 4-bit model, on bitsandbytes' float32 path (its AVX512-BF16 inference
    path repacks weights and computes in bfloat16)."""
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map={"": "cpu"})
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _randomize_lora(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * std


def _peft_layers(model):
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if isinstance(m, PeftLoraLinear))


# ---- QLoRAConfig with bitsandbytes' names ----
def test_qlora_config_takes_bitsandbytes_arguments_and_configs():
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
              llm_int8_skip_modules=["lm_head"])
    ours, converted = Q.QLoRAConfig(**kw), Q.QLoRAConfig.from_bnb(BitsAndBytesConfig(**kw))
    for cfg in (ours, converted):
        assert (cfg.quant_type, cfg.double_quant, cfg.compute_dtype, cfg.quant_storage, cfg.skip_modules) == \
            ("nf4", True, torch.bfloat16, torch.uint8, ["lm_head"])
    # bitsandbytes' meaning of what is left out: FP4, no double quant, float32 compute, transformers' skip list
    bare = Q.QLoRAConfig(load_in_4bit=True)
    bnb_bare = Q.QLoRAConfig.from_bnb(BitsAndBytesConfig(load_in_4bit=True))
    for cfg in (bare, bnb_bare):
        assert (cfg.quant_type, cfg.double_quant, cfg.compute_dtype, cfg.skip_modules) == \
            ("fp4", False, torch.float32, None)
    assert Q.QLoRAConfig.from_bnb(BitsAndBytesConfig(**kw).to_dict()).to_dict() == ours.to_dict()
    assert Q.QLoRAConfig(quant_type="nf4", bnb_4bit_quant_type="nf4").quant_type == "nf4"  # same value twice: fine
    # a checkpoint's JSON null means bitsandbytes' default
    from_json = Q.QLoRAConfig.from_bnb_dict({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                             "bnb_4bit_quant_storage": None, "bnb_4bit_quant_type": "nf4"})
    assert (from_json.quant_type, from_json.quant_storage) == ("nf4", torch.uint8)
    for bad, match in [(dict(load_in_8bit=True), "load_in_8bit"), (dict(load_in_4bit=False), "load_in_4bit"),
                       (dict(quant_type="nf4", bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type"),
                       (dict(llm_int8_threshold=4.0), "llm_int8_threshold"),
                       (dict(llm_int8_enable_fp32_cpu_offload=True), "llm_int8_enable_fp32_cpu_offload"),
                       (dict(bnb_4bit_quant_type="int4"), "quant_type"), (dict(bnb_4bit_foo=1), "bnb_4bit_foo")]:
        with pytest.raises(ValueError, match=match):
            Q.QLoRAConfig(**bad)
    with pytest.raises(ValueError, match="load_in_8bit"):
        Q.QLoRAConfig.from_bnb(BitsAndBytesConfig(load_in_8bit=True))


# ---- PEFT's LoRA on our layers ----
@pytest.mark.parametrize("targets", ["all-linear", list(PROJ), r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj"])
def test_get_peft_model_finds_our_layers(targets):
    model = prepare_model_for_kbit_training(_ours())
    assert model.is_loaded_in_4bit and model.is_gradient_checkpointing  # bitsandbytes is installed here
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert _peft_layers(peft_model) == LAYERS
    assert all(isinstance(m.get_base_layer(), Linear4bit) for m in peft_model.modules()
               if isinstance(m, PeftLoraLinear))
    assert type(peft_model.base_model.model.lm_head) is torch.nn.Linear  # the output layer is left alone


def _op_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_peft_lora_runs_our_kernels_and_matches_add_lora():
    """PEFT's LoRA layer on our base and our own add_lora, with the same adapter weights, compute the same
    outputs and gradients; PEFT's path runs qlora_ext's 4-bit matmul forward and its transpose backward."""
    peft_model = get_peft_model(_ours(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    _randomize_lora(peft_model)
    ours = Q.add_lora(_ours(), r=4, lora_alpha=8, lora_dropout=0.0)
    theirs = dict(peft_model.named_parameters())
    for n, p in ours.named_parameters():
        if "lora_" in n:
            p.data = theirs["base_model.model." + n].detach().clone()
    for m in (peft_model, ours):
        m.train()
    losses = {}

    def step(name, model):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        losses[name] = out.loss.detach()

    names = _op_names(lambda: step("peft", peft_model))
    assert {"qlora_ext::matmul_4bit", "qlora_ext::matmul_4bit_t"} <= names
    step("ours", ours)
    assert torch.allclose(losses["peft"], losses["ours"], rtol=1e-6)
    for n, p in ours.named_parameters():
        if "lora_" in n:
            g = theirs["base_model.model." + n].grad
            assert g is not None and torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7), n


def test_merge_and_unload_requantizes_like_merge_lora():
    cfg = Q.peft.register(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model = get_peft_model(_ours(), cfg)
    _randomize_lora(peft_model, std=0.02)
    assert isinstance(peft_model.base_model.model.model.layers[0].mlp.up_proj, Q.peft.Linear4bitLoRA)
    with_adapter = _logits(peft_model)
    ours = Q.add_lora(_ours(), r=4, lora_alpha=8)
    theirs = dict(peft_model.named_parameters())
    for n, p in ours.named_parameters():
        if "lora_" in n:
            p.data = theirs["base_model.model." + n].detach().clone()
    Q.merge_lora(ours)
    merged = peft_model.merge_and_unload()
    assert sum(type(m) is Linear4bit for m in merged.modules()) == 14
    sd, expected = merged.state_dict(), ours.state_dict()
    assert set(sd) == set(expected) and all(torch.equal(sd[k], v) for k, v in expected.items())
    # merge_lora's requantization (tested in test_models.py against its reported error) gives the same bytes,
    # hence the same function; the 4-bit grid cannot hold W + dW exactly, so it differs from the adapter's output
    assert torch.equal(_logits(merged), _logits(ours)) and not torch.equal(_logits(merged), with_adapter)


def test_merge_after_loading_a_saved_adapter_with_a_registered_config(tmp_path):
    peft_model = get_peft_model(_ours(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    _randomize_lora(peft_model, std=0.02)
    peft_model.save_pretrained(tmp_path)
    cfg = Q.peft.register(LoraConfig.from_pretrained(tmp_path))
    merged = PeftModel.from_pretrained(_ours(), tmp_path, config=cfg).merge_and_unload()
    reference = Q.load_adapter(_ours(), tmp_path)  # our own loader + merge, as the reference
    assert Q.merge_lora(reference)["max_rel_error"] > 0
    sd = merged.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items())


def test_merge_without_registration_fails_loudly():
    peft_model = get_peft_model(_ours(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError):
        peft_model.merge_and_unload()


def test_several_adapters_save_and_reload_through_peft_and_auto_peft(tmp_path):
    peft_model = get_peft_model(_ours(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    _randomize_lora(peft_model)
    first = _logits(peft_model)
    peft_model.set_adapter("second")
    second = _logits(peft_model)
    assert _max_rel(first, second) > 1e-3
    peft_model.set_adapter("default")
    assert torch.equal(_logits(peft_model), first)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(FLOAT_DIR)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(_ours(), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert torch.equal(_logits(reloaded), first)
    reloaded.set_adapter("second")
    assert torch.equal(_logits(reloaded), second)
    # AutoPeftModel loads the base from adapter_config's path; our config goes to from_pretrained
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path, quantization_config=Q.QLoRAConfig())
    assert isinstance(auto.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), Linear4bit)
    assert torch.equal(_logits(auto), first)


def test_our_optimizers_in_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(4, 40, (16, 24), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    runs = {}
    for how in ("optimizers", "optimizer_cls_and_kwargs"):
        torch.manual_seed(0)
        model = get_peft_model(prepare_model_for_kbit_training(_ours()),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        if how == "optimizers":
            opt = Q.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=5e-3)
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              optimizers=(opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)))
        else:
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              optimizer_cls_and_kwargs=(Q.optim.PagedAdamW8bit, {"lr": 5e-3}))
        trainer.train()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert type(inner) is Q.optim.PagedAdamW8bit
        assert model.base_model.model.is_gradient_checkpointing
        runs[how] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(runs[how]) == 4 and runs[how][-1] < runs[how][0]


# ---- the end-to-end script: a bitsandbytes user's script with two lines changed ----
def test_the_script_is_the_bitsandbytes_script_with_two_lines_changed():
    ours, theirs = OURS.read_text().splitlines(), THEIRS.read_text().splitlines()
    changed = [line for line in difflib.ndiff(theirs, ours) if line[:2] in ("- ", "+ ")]
    assert changed == ["- from transformers import BitsAndBytesConfig", "+ import qlora_ext",
                       "- " + next(x for x in theirs if x.startswith("bnb_config = BitsAndBytesConfig(")),
                       "+ " + next(x for x in ours if x.startswith("bnb_config = qlora_ext.QLoRAConfig("))]
    assert changed[2][len("- bnb_config = BitsAndBytesConfig("):] == changed[3][len("+ bnb_config = qlora_ext."
                                                                                  "QLoRAConfig("):]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny float fixture plus a character-level tokenizer (the fixture has none; the scripts need one)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny") / "model"
    shutil.copytree(FLOAT_DIR, d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(d)
    return d


def _run_script(script, model, out, trainer):
    argv = sys.argv
    sys.argv = [str(script), str(model), str(out), "--trainer", trainer]
    try:
        return runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def bnb_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bnb_run")
    _run_script(THEIRS, model_dir, out, "trainer")
    return out


@pytest.mark.parametrize("trainer", ["trainer", "sft", "sft-wrapped"])
def test_the_script_trains_and_its_adapter_loads_on_bitsandbytes(model_dir, bnb_run, tmp_path, trainer):
    g = _run_script(OURS, model_dir, tmp_path, trainer)
    model = g["trainer"].model
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 14 and all(isinstance(m.get_base_layer(), Linear4bit) for m in layers)
    assert model.base_model.model.is_gradient_checkpointing
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1, losses
    if trainer == "trainer":  # bitsandbytes' run, same seed, same bytes: the same losses
        theirs = json.loads((bnb_run / "losses.json").read_text())
        assert max(abs(a - b) for a, b in zip(losses, theirs)) < 1e-3, (losses, theirs)
    ids = torch.randint(4, 98, (2, 16), generator=torch.Generator().manual_seed(5))
    for adapter in (tmp_path, bnb_run):  # ours on bitsandbytes' model, and bitsandbytes' on ours
        on_bnb = PeftModel.from_pretrained(_bnb_model(model_dir), adapter)
        on_ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=Q.QLoRAConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True)), adapter)
        a, b = _logits(on_ours, ids), _logits(on_bnb, ids)
        assert _max_rel(a, b) <= 1e-4
        with on_ours.disable_adapter():
            assert _max_rel(a, _logits(on_ours, ids)) > 1e-3  # the adapter was trained


def test_import_qlora_ext_without_peft():
    code = ("import sys; sys.modules['peft'] = None\n"
            "import qlora_ext\n"
            "assert 'peft' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n    qlora_ext.peft\nexcept ImportError as e:\n    print('needs peft:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    assert out.returncode == 0, out.stderr
    assert "needs peft" in out.stdout
