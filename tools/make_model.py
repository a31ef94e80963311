"""Writes a LLaMA-architecture checkpoint of a named size with random weights, in the layouts users download:

  float   bfloat16, sharded safetensors (model-0000i-of-0000N.safetensors) + model.safetensors.index.json,
          config.json, generation_config.json and a tokenizer, as transformers' save_pretrained writes them;
  nf4     the transformers + bitsandbytes 4-bit layout (NF4 + double quantization, block 64, uint8 storage):
          every decoder linear weight as bitsandbytes' entries (`weight`, `weight.absmax`, `weight.quant_map`,
          `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), the
          embeddings, norms and LM head in bfloat16, and config.json's quantization_config
          (quant_method "bitsandbytes", llm_int8_skip_modules ["lm_head"]).

Weights: each tensor comes from its own seeded generator (seed, tensor index), so both layouts hold the same
model and the nf4 layout's bytes equal quantizing the float layout's bfloat16 tensors with qlora_ext. Scale as
LLaMA's initialisation (normal, std 0.02, the config's initializer_range; RMSNorm weights 1), which keeps
activations finite through any depth. Streaming: tensors are generated in checkpoint order and each shard is
written as soon as it is full, so at most one shard (--shard-size) plus one float32 tensor is in memory.

    python tools/make_model.py --size 7B --layout both --out /work/bigmodels/llama-7b      # -> llama-7b{,-nf4}
    python tools/make_model.py --size 33B --layout nf4 --out /work/bigmodels/llama-33b     # -> llama-33b-nf4
    python tools/make_model.py --size tiny --layout both --out /tmp/tiny --shard-size 2MB  # the CI test's model

Sizes: the LLaMA-1 shapes of `qlora-ext estimate` (7B, 13B, 33B, 65B), 1B (TinyLlama-1.1B's LLaMA shape)
and tiny (2 layers, hidden 64, for tests). Free disk is checked first; the tool says what is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

try:
    import qlora_ext  # noqa: F401  (installed)
except ImportError:  # run from a source checkout built in place
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STD = 0.02  # LLaMA's initializer_range
TINY_VOCAB = 512


def shape_for(size: str):
    from qlora_ext.estimate import NAMED, ModelShape
    if size.lower() == "tiny":
        return ModelShape("tiny-llama", 64, 160, 2, 4, 2, TINY_VOCAB)
    key = size.upper()
    if key not in NAMED:
        raise SystemExit(f"make_model: --size {size!r}: choose tiny or one of {', '.join(NAMED)}")
    return NAMED[key]


def hf_config(shape) -> dict:
    """config.json fields, as LlamaConfig writes them for the LLaMA-1 checkpoints."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      initializer_range=STD, tie_word_embeddings=shape.tied_embeddings, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, dtype=torch.bfloat16)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def tensors(shape) -> List[Tuple[str, Tuple[int, ...], bool]]:
    """(name, shape, is a decoder linear weight) in the order transformers writes a Llama checkpoint."""
    h = shape.hidden
    out = [("model.embed_tokens.weight", (shape.vocab, h), False)]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (shape.q_dim, h), True),
                (p + "self_attn.k_proj.weight", (shape.kv_dim, h), True),
                (p + "self_attn.v_proj.weight", (shape.kv_dim, h), True),
                (p + "self_attn.o_proj.weight", (h, shape.q_dim), True),
                (p + "mlp.gate_proj.weight", (shape.intermediate, h), True),
                (p + "mlp.up_proj.weight", (shape.intermediate, h), True),
                (p + "mlp.down_proj.weight", (h, shape.intermediate), True),
                (p + "input_layernorm.weight", (h,), False),
                (p + "post_attention_layernorm.weight", (h,), False)]
    out.append(("model.norm.weight", (h,), False))
    if not shape.tied_embeddings:
        out.append(("lm_head.weight", (shape.vocab, h), False))
    return out


def nf4_entry_bytes(shp) -> int:
    from qlora_ext.estimate import nf4_bytes
    packed, scales = nf4_bytes(math.prod(shp))
    return packed + scales + 16 * 4 + 256 * 4 + 200  # + code tables + JSON


def entry_bytes(name: str, shp, linear: bool, layout: str) -> int:
    if layout == "nf4" and linear:
        return nf4_entry_bytes(shp)
    return 2 * math.prod(shp)


def plan_shards(items, layout: str, shard_bytes: int) -> List[List[int]]:
    """Indices of the tensors of each shard: consecutive, a new shard when the next tensor would overflow
    (transformers' rule; a tensor bigger than the limit gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for i, (name, shp, linear) in enumerate(items):
        b = entry_bytes(name, shp, linear, layout)
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += b
    if cur:
        shards.append(cur)
    return shards


def make_tensor(index: int, name: str, shp, seed: int) -> torch.Tensor:
    """The bfloat16 tensor both layouts store: RMSNorm weights are ones, the rest normal(0, STD)."""
    if name.endswith("norm.weight"):
        return torch.ones(shp, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(shp, generator=g, dtype=torch.float32) * STD).to(torch.bfloat16)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB or 500MB")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * mult)


def write_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer (never an id >= the model's vocabulary) trained on the shipped dataset, with
    LLaMA's special tokens and a chat template, saved by transformers (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    data = Path(__import__("qlora_ext").__file__).parent / "dataset"
    texts = []
    for f in sorted(data.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            texts.append(line)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 8000), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab:
        raise SystemExit(f"make_model: the tokenizer has {tok.get_vocab_size()} tokens, more than the vocabulary "
                         f"{vocab}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    fast.save_pretrained(str(out))


def write_layout(shape, layout: str, out: Path, shard_bytes: int, seed: int, progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from qlora_ext import QLoRAConfig, quantize_4bit
    items = tensors(shape)
    shards = plan_shards(items, layout, shard_bytes)
    n = len(shards)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: Dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for s, idx in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        sd: Dict[str, torch.Tensor] = {}
        for i in idx:
            name, shp, linear = items[i]
            w = make_tensor(i, name, shp, seed)
            if layout == "nf4" and linear:
                packed, state = quantize_4bit(w, 64, "nf4", True)
                sd[name] = packed
                # the code tables are shared between states; safetensors stores each tensor on its own
                sd.update({k: v.clone() for k, v in state.as_dict(name + ".").items()})
            else:
                sd[name] = w
            del w
        for k, v in sd.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        tmp = out / (fname + ".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; transformers' checkpoints are world-readable
        os.replace(tmp, out / fname)
        del sd
        if progress:
            print(f"\r  {layout}: shard {s + 1}/{n} written ({total / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg = hf_config(shape)
    if layout == "nf4":
        cfg.quantization_config = QLoRAConfig().to_bnb_dict(torch.bfloat16, ["lm_head"])
    cfg.save_pretrained(str(out))
    from transformers import GenerationConfig
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
    write_tokenizer(out, shape.vocab)
    return {"dir": str(out), "bytes": total, "shards": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", required=True, help="tiny, 1B, 7B, 13B, 33B or 65B")
    ap.add_argument("--layout", default="both", choices=("float", "nf4", "both"))
    ap.add_argument("--out", required=True, help="directory of the float layout; the nf4 layout goes to OUT-nf4 "
                                                  "(with --layout nf4 alone: OUT-nf4 too)")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                    help="largest shard (default 2GB: the most this tool holds in memory at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite existing output directories")
    args = ap.parse_args(argv)
    shape = shape_for(args.size)
    layouts = ["float", "nf4"] if args.layout == "both" else [args.layout]
    base = Path(args.out)
    dirs = {lay: base if lay == "float" else base.with_name(base.name + "-nf4") for lay in layouts}
    items = tensors(shape)
    need = {lay: sum(entry_bytes(n, s, lin, lay) for n, s, lin in items) for lay in layouts}
    for lay, d in dirs.items():
        if d.exists() and any(d.iterdir()) and not args.force:
            raise SystemExit(f"make_model: {d} exists and is not empty (--force to overwrite)")
    probe = base.parent if base.parent.exists() else Path(".")
    free = shutil.disk_usage(probe).free
    total_need = sum(need.values())
    print(f"{shape.name}: {shape.params / 1e9:.2f}B parameters; needs "
          + ", ".join(f"{lay} {need[lay] / 1e9:.2f} GB" for lay in layouts)
          + f"; {free / 1e9:.1f} GB free on {probe}", file=sys.stderr)
    if total_need * 1.01 + 1e8 > free:
        raise SystemExit(f"make_model: not enough disk: {total_need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free "
                         f"on {probe}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for lay in layouts:
        r = write_layout(shape, lay, dirs[lay], args.shard_size, args.seed)
        print(json.dumps({"layout": lay, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
