"""Sweeps tiny random models of many transformers families through qlora_ext against transformers +
bitsandbytes + PEFT (CPU, float32): which layers each quantizes, state-dict keys and bytes, logits, the
prepared model's loss with labels (the chunked head loss where it applies) against transformers' own, LoRA
gradients, our adapter under PEFT on the bitsandbytes model, export_merged read back by plain transformers,
and merge_lora + save_quantized read back by transformers + bitsandbytes. Causal LMs, seq2seq LMs and
encoders with a classification head. One line per family, OK or FAIL with the reason; exit 1 on any FAIL.

    python tools/family_sweep.py [family ...]      (needs the test extra: peft, bitsandbytes)

Task heads (classifiers) stay float in qlora_ext; transformers + bitsandbytes quantizes a head whose last
parameter is a bias (its skip rule strips only '.weight'). There the head's entries and the logits differ by
design, the comparisons cover the base model only, and PEFT's adapter check is skipped (PEFT cannot wrap a
4-bit head as a module to save).
"""
import os
import sys
import tempfile
import traceback
import warnings

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BitsAndBytesConfig)

import qlora_ext as Q

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

CAUSAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
               num_labels=3)
LM, S2S, CLS, TOK = AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, \
    AutoModelForTokenClassification
# family -> (auto class, config kwargs)
FAMILIES = {
    "llama": (LM, CAUSAL), "mistral": (LM, CAUSAL), "qwen2": (LM, CAUSAL), "qwen3": (LM, {**CAUSAL, "head_dim": 16}),
    "phi3": (LM, {**CAUSAL, "pad_token_id": 0}), "gemma": (LM, {**CAUSAL, "head_dim": 16}),
    "gemma2": (LM, {**CAUSAL, "head_dim": 16}), "olmo": (LM, CAUSAL), "olmo2": (LM, CAUSAL), "granite": (LM, CAUSAL),
    "cohere": (LM, CAUSAL), "starcoder2": (LM, CAUSAL), "stablelm": (LM, CAUSAL), "phi": (LM, CAUSAL),
    "smollm3": (LM, {**CAUSAL, "pad_token_id": 0}), "glm": (LM, {**CAUSAL, "head_dim": 16, "pad_token_id": 0}),
    "glm4": (LM, {**CAUSAL, "head_dim": 16, "pad_token_id": 0}),
    "helium": (LM, {**CAUSAL, "head_dim": 16, "pad_token_id": 0}), "arcee": (LM, CAUSAL), "exaone4": (LM, CAUSAL),
    "seed_oss": (LM, {**CAUSAL, "head_dim": 16}), "apertus": (LM, CAUSAL),
    "qwen3_moe": (LM, {**CAUSAL, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                       "num_experts_per_tok": 2}),
    "mixtral": (LM, {**CAUSAL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": (LM, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128)),
    "opt": (LM, dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
                     max_position_embeddings=128, word_embed_proj_dim=64)),
    "gpt_neox": (LM, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=320, max_position_embeddings=128)),
    "falcon": (LM, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320)),
    "bloom": (LM, dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=320)),
    "gptj": (LM, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128, rotary_dim=8)),
    "t5": (S2S, dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=320)),
    "bart": (S2S, dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=320,
                       max_position_embeddings=64)),
    "bert": (CLS, ENCODER), "roberta": (CLS, {**ENCODER, "pad_token_id": 1}), "deberta-v2": (CLS, ENCODER),
    "distilbert": (CLS, dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=320, num_labels=3)),
    "modernbert": (TOK, {**ENCODER, "pad_token_id": 0, "global_attn_every_n_layers": 1}),
}


def check(ok, what):
    if not ok:
        raise AssertionError(what)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def sweep(fam, steps):
    cls, kw = FAMILIES[fam]
    torch.manual_seed(0)
    m = cls.from_config(AutoConfig.for_model(fam, **kw), dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    d = tempfile.mkdtemp(prefix=f"sweep_{fam}_")
    m.save_pretrained(d)
    ids = torch.randint(2, 320, (2, 16))
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, :8]) if cls is S2S else dict(input_ids=ids)
    labels = {LM: ids, S2S: ids[:, :8].contiguous(), CLS: torch.tensor([0, 2]), TOK: torch.zeros_like(ids)}[cls]
    ours = cls.from_pretrained(d, quantization_config=Q.QLoRAConfig(compute_dtype=torch.float32),
                               dtype=torch.float32).eval()
    bnb = cls.from_pretrained(d, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)).eval()
    import bitsandbytes
    for x in bnb.modules():   # bitsandbytes' float32 CPU path, not its AVX512-BF16 repack
        if hasattr(x, "support_avx512bf16_for_cpu"):
            x.support_avx512bf16_for_cpu = False
    nq = sum(isinstance(x, Q.Linear4bit) for x in ours.modules())
    nb = sum(isinstance(x, bitsandbytes.nn.Linear4bit) for x in bnb.modules())
    if nq == nb == 0:
        steps.append("neither library quantizes a layer of it")
        return
    base = "" if cls in (LM, S2S) else ours.base_model_prefix + "."   # heads: see the module docstring
    so = {k: v for k, v in ours.state_dict().items() if k.startswith(base)}
    sb = {k: v for k, v in bnb.state_dict().items() if k.startswith(base)}
    dk = set(so) ^ set(sb)
    dv = [k for k in set(so) & set(sb) if so[k].shape != sb[k].shape or not torch.equal(so[k], sb[k])]
    heads_differ = nq != nb
    steps.append(f"4-bit layers ours {nq} bitsandbytes {nb}{' (head)' if heads_differ else ''}; "
                 f"base keys differ {len(dk)}, values {len(dv)}")
    check(not dk and not dv and (nq == nb or base),   # only a task model's head may differ
          f"quantized layers, keys or bytes differ from bitsandbytes': {sorted(dk)[:3]} {sorted(dv)[:3]}")
    lo, lb = logits(ours, inputs), logits(bnb, inputs)
    steps.append(f"logits {rel(lo, lb):.1e}")
    check(heads_differ or rel(lo, lb) < 1e-5, "logits differ from bitsandbytes'")

    ours = Q.add_lora(Q.prepare_model_for_training(ours), r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    plain = getattr(ours, "_qlora_ext_forward", None)
    if plain is not None:  # eval mode: some families have dropout on by default
        ours.eval()
        with torch.no_grad():
            o1, o2 = ours(**inputs, labels=labels), plain(**inputs, labels=labels)
        steps.append(f"chunked loss {float(o1.loss):.5f} vs {float(o2.loss):.5f}")
        check(abs(float(o1.loss) - float(o2.loss)) <= 1e-4 * abs(float(o2.loss)) and rel(o1.logits, o2.logits) < 1e-5,
              "the chunked head loss differs from transformers' loss")
    ours.train()
    ours(**inputs, labels=labels).loss.backward()
    g = [p.grad for p in ours.parameters() if p.requires_grad]
    check(g and all(x is not None and torch.isfinite(x).all() for x in g), "missing or non-finite gradients")
    steps.append(f"{len(g)} grads")
    ours.eval()
    la = logits(ours, inputs)
    if not heads_differ:
        from peft import PeftModel
        ad = tempfile.mkdtemp()
        Q.save_adapter(ours, ad)
        lp = logits(PeftModel.from_pretrained(bnb, ad).eval(), inputs)
        steps.append(f"PEFT + bitsandbytes with our adapter {rel(la, lp):.1e}")
        check(rel(la, lp) < 1e-5, "PEFT on bitsandbytes with our adapter differs")
    ex = tempfile.mkdtemp()
    Q.export_merged(ours, ex, dtype=torch.float32)
    le = logits(cls.from_pretrained(ex, dtype=torch.float32).eval(), inputs)
    steps.append(f"export_merged {rel(le, la):.1e}")
    check(rel(le, la) < 1e-5, "export_merged read back by transformers differs")
    sq = tempfile.mkdtemp()
    Q.merge_lora(ours)
    Q.save_quantized(ours, sq)
    back = cls.from_pretrained(sq, dtype=torch.float32).eval()
    for x in back.modules():
        if hasattr(x, "support_avx512bf16_for_cpu"):
            x.support_avx512bf16_for_cpu = False
    lm_, lb2 = logits(ours, inputs), logits(back, inputs)
    steps.append(f"merged + save_quantized read by bitsandbytes {rel(lb2, lm_):.1e}")
    check(rel(lb2, lm_) < 1e-5, "save_quantized read back by bitsandbytes differs")


def main():
    failed = 0
    for fam in sys.argv[1:] or list(FAMILIES):
        steps = []
        try:
            sweep(fam, steps)
            print(f"OK   {fam}: " + " | ".join(steps), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported on its family's line
            failed += 1
            print(f"FAIL {fam}: " + " | ".join(steps) + f" || {type(e).__name__}: {str(e)[:300]}", flush=True)
            if os.environ.get("TB"):
                traceback.print_exc()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
