"""Sweeps tiny random models of many transformers families through qlora_ext against transformers +
bitsandbytes + PEFT (CPU, float32): which layers each quantizes, state-dict keys and bytes, logits, the
prepared model's loss with labels (the chunked head loss where it applies) against transformers' own, LoRA
gradients, our adapter under PEFT on the bitsandbytes model, export_merged read back by plain transformers,
and save_quantized read back by transformers + bitsandbytes. One line per family, OK or FAIL with the reason.

    python tools/family_sweep.py [family ...]      (needs the test extra: peft, bitsandbytes)
"""
import sys, os, tempfile, traceback, warnings
warnings.filterwarnings("ignore")
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
import qlora_ext as Q
transformers.logging.set_verbosity_error()

base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
FAM = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=16), "phi3": dict(pad_token_id=0), "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16), "olmo": {}, "olmo2": {}, "granite": {}, "cohere": {}, "starcoder2": {},
    "stablelm": {}, "phi": {}, "smollm3": dict(pad_token_id=0), "glm": dict(head_dim=16, pad_token_id=0),
    "glm4": dict(head_dim=16, pad_token_id=0), "helium": dict(head_dim=16, pad_token_id=0), "arcee": {},
    "exaone4": {}, "seed_oss": dict(head_dim=16), "apertus": {}, "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
                max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320, max_position_embeddings=128),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=320),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128, rotary_dim=8),
}
only = sys.argv[1:] or list(FAM)
failed = 0
def check(ok, what):
    if not ok:
        raise AssertionError(what)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
for fam in only:
    kw = dict(FAM[fam]) if fam in ("gpt2", "opt", "gpt_neox", "falcon", "bloom", "gptj") else {**base, **FAM[fam]}
    steps = []
    try:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(fam, **kw)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() >= 2: p.normal_(0, 0.08)
        d = tempfile.mkdtemp(prefix=f"fam_{fam}_")
        m.save_pretrained(d)
        ids = torch.randint(0, 320, (2, 24))
        qc = Q.QLoRAConfig(compute_dtype=torch.float32)
        ours = AutoModelForCausalLM.from_pretrained(d, quantization_config=qc, dtype=torch.float32)
        nq = sum(isinstance(x, Q.Linear4bit) for x in ours.modules())
        bnb = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
        import bitsandbytes as bnbl
        nb = sum(isinstance(x, bnbl.nn.Linear4bit) for x in bnb.modules())
        if nq == nb == 0:
            print(f"OK   {fam}: neither library quantizes a layer of it", flush=True)
            continue
        so, sb = ours.state_dict(), bnb.state_dict()
        ko, kb = set(so), set(sb)
        diffk = (ko ^ kb)
        diffv = [k for k in ko & kb if so[k].shape != sb[k].shape or not torch.equal(so[k].cpu().view(-1).view(torch.uint8) if so[k].dtype==torch.uint8 else so[k].cpu(), sb[k].cpu().view(-1).view(torch.uint8) if sb[k].dtype==torch.uint8 else sb[k].cpu())]
        check(nq == nb and not diffk and not diffv, "quantized layers, keys or bytes differ from bitsandbytes'")
        steps.append(f"4bit ours {nq} bnb {nb}; keys differ {len(diffk)} {sorted(diffk)[:3]}; values differ {len(diffv)} {sorted(diffv)[:3]}")
        with torch.no_grad():
            lo, lb = ours(ids).logits, bnb(ids).logits
        steps.append(f"logits rel {rel(lo, lb):.2e}")
        check(rel(lo, lb) < 1e-5, "logits differ from bitsandbytes'")
        # training path
        ours = Q.prepare_model_for_training(ours)
        ours = Q.add_lora(ours, r=4, lora_alpha=8, lora_dropout=0.0)
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.05)
        ref_fwd = getattr(ours, "_qlora_ext_forward", None)
        if ref_fwd is not None:  # compared in eval mode: some families have dropout on by default
            ours.eval()
            with torch.no_grad():
                o1, o2 = ours(input_ids=ids, labels=ids), ref_fwd(input_ids=ids, labels=ids)
            steps.append(f"chunked loss {float(o1.loss):.5f} vs plain {float(o2.loss):.5f} logits rel "
                         f"{rel(o1.logits, o2.logits):.1e}")
            if abs(float(o1.loss) - float(o2.loss)) > 1e-4 * abs(float(o2.loss)):
                raise AssertionError("the chunked head loss differs from transformers' loss")
        else:
            steps.append("(no chunked loss)")
        ours.train()
        out = ours(input_ids=ids, labels=ids)
        out.loss.backward()
        g = [p.grad for n, p in ours.named_parameters() if p.requires_grad]
        check(g and all(x is not None and torch.isfinite(x).all() for x in g), "missing or non-finite LoRA grads")
        steps.append(f"grads {len(g)} none {sum(x is None for x in g)} finite {all(torch.isfinite(x).all() for x in g if x is not None)}")
        ours.eval()
        with torch.no_grad():
            la = ours(input_ids=ids).logits
        ad = tempfile.mkdtemp()
        Q.save_adapter(ours, ad)
        from peft import PeftModel
        pm = PeftModel.from_pretrained(bnb, ad)
        pm.eval()
        with torch.no_grad():
            lp = pm(input_ids=ids).logits
        steps.append(f"peft-on-bnb with our adapter rel {rel(la, lp):.2e}")
        check(rel(la, lp) < 1e-5, "PEFT on bitsandbytes with our adapter differs")
        ex = tempfile.mkdtemp()
        Q.export_merged(ours, ex, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_pretrained(ex, dtype=torch.float32)
        with torch.no_grad():
            le = plain(input_ids=ids).logits
        steps.append(f"export_merged rel {rel(le, la):.2e}")
        check(rel(le, la) < 1e-5, "export_merged read back by transformers differs")
        sq = tempfile.mkdtemp()
        Q.merge_lora(ours)
        Q.save_quantized(ours, sq)
        b2 = AutoModelForCausalLM.from_pretrained(sq, dtype=torch.float32)
        with torch.no_grad():
            lm_ = ours(input_ids=ids).logits; lb2 = b2(input_ids=ids).logits
        steps.append(f"merged->save_quantized->bnb rel {rel(lb2, lm_):.2e} (merged vs adapter {rel(lm_, la):.1e})")
        check(rel(lb2, lm_) < 1e-5, "save_quantized read back by bitsandbytes differs")
        print(f"OK   {fam}: " + " | ".join(steps), flush=True)
    except Exception as e:
        print(f"FAIL {fam}: " + " | ".join(steps) + f" || {type(e).__name__}: {str(e)[:300]}", flush=True)
        failed += 1
        if os.environ.get("TB"):
            traceback.print_exc()
sys.exit(1 if failed else 0)
