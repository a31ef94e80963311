"""Memory needed to fine-tune a decoder-only transformer under full 16-bit fine-tuning, LoRA (16-bit frozen
base) and QLoRA (NF4 base, optionally double-quantized scales), from its shape alone, broken into weights,
quantization scales, adapters, gradients, optimizer state and activations. Bytes are exact counts for the
stated storage; activations are a first-order model of what backward keeps (documented in `activations`).

Assumptions (the QLoRA paper's setting): 16-bit weights and gradients for full fine-tuning with 32-bit AdamW
state (12 bytes per parameter in all); LoRA on every linear layer of the transformer blocks, adapters and
their gradients in 16-bit, AdamW state in 32-bit; the embedding, the LM head and the norms stay 16-bit and
frozen under (Q)LoRA; NF4 packs two weights per byte with one absmax per block (float32, or with double
quantization uint8 codes plus one float32 per 256 of them and one float32 offset per tensor).

`per_rank` gives the bytes on each rank of a data-parallel run (qlora_ext.distributed: DDP or FSDP2 with one
unit per decoder layer), the global batch split over the ranks.
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

GB = 1e9  # the paper quotes decimal gigabytes (65e9 parameters x 12 bytes = 780 GB)
METHODS = ("full16", "lora", "qlora")
COMPONENTS = ("weights", "scales", "adapters", "gradients", "optimizer", "activations")
NESTED_BLOCK = 256
STRATEGIES = ("ddp", "fsdp")
# what FSDP2 divides by the world size; the quantization scales (each weight's QuantState) are replicated
SHARDED = ("weights", "adapters", "gradients", "optimizer")


@dataclass(frozen=True)
class ModelShape:
    """What the memory depends on: a Llama-style decoder (attention with grouped KV heads + gated MLP)."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int = 0  # 0: hidden // heads

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    def block_linears(self) -> List[Tuple[int, int]]:
        """(in_features, out_features) of every linear layer of one transformer block."""
        h, f = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h),  # q k v o
                (h, f), (h, f), (f, h)]                                                 # gate up down

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.block_linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


# LLaMA-1 shapes (Touvron et al. 2023, table 2; the "33B" is the released 32.5B model). Untied embeddings.
NAMED = {
    "7B": ModelShape("LLaMA-7B", 4096, 11008, 32, 32, 32, 32000),
    "13B": ModelShape("LLaMA-13B", 5120, 13824, 40, 40, 40, 32000),
    "33B": ModelShape("LLaMA-33B", 6656, 17920, 60, 52, 52, 32000),
    "65B": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000),
}
# not a LLaMA-1 size: TinyLlama-1.1B's LLaMA-architecture shape (grouped KV heads), for small experiments
NAMED["1B"] = ModelShape("TinyLlama-1.1B", 2048, 5632, 22, 32, 4, 32000)


def shape_from_config(cfg: Dict, name: str = "config") -> ModelShape:
    """A ModelShape from a transformers config dict (Llama / Mistral / Qwen / Gemma names, GPT-2 aliases)."""
    def get(*keys, default=None):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is not None:
            return default
        raise ValueError(f"{name}: config has none of {keys}; cannot estimate this architecture")

    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    shape = ModelShape(
        name=str(cfg.get("_name_or_path") or cfg.get("model_type") or name),
        hidden=hidden,
        intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads", default=heads)),
        vocab=int(get("vocab_size")),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg.get("head_dim") or 0),
    )
    for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(shape, field) <= 0:
            raise ValueError(f"{name}: {field} must be positive, got {getattr(shape, field)}")
    return shape


def resolve_shape(model: str) -> ModelShape:
    """A named size (7B, 13B, 33B, 65B), a config.json path, or a model directory holding one."""
    key = model.strip().upper()
    if key in NAMED:
        return NAMED[key]
    path = pathlib.Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{model!r} is neither a named size ({', '.join(NAMED)}) nor a config.json / "
                         f"model directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    return shape_from_config(cfg, str(path))


def nf4_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> Tuple[int, int]:
    """(packed weight bytes, scale bytes) of one n-element tensor in NF4."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4
    else:
        scales = 4 * blocks
    return math.ceil(n / 2), scales


def bits_per_weight(blocksize: int = 64, double_quant: bool = True) -> float:
    """Asymptotic storage per NF4 weight: 4 + 32/64 = 4.5 bits, or 4 + 8/64 + 32/(64*256) = 4.127 with DQ."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCK)
    return 4 + 32 / blocksize


def activations(shape: ModelShape, batch: int, seq_len: int, gradient_checkpointing: bool,
                act_bytes: int = 2, lora_r: int = 0) -> int:
    """Bytes backward keeps alive at its peak (first-order model, attention via SDPA / flash: no T x T
    scores are stored).

    Per token and block, backward needs: the two norm inputs and outputs (4h), q, k, v after rotary
    (q + 2 kv), the attention output (q), the two MLP branch outputs, silu(gate) and their product (4f), and
    each adapter's r-dim hidden (7r). With gradient checkpointing only each block's input (h) is kept and one
    block is recomputed at a time. The loss adds float32 logits and their gradient (2 x 4 bytes x vocab)."""
    per_block = 4 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.intermediate + 7 * lora_r
    tokens = batch * seq_len
    if gradient_checkpointing:
        kept = shape.layers * shape.hidden + per_block
    else:
        kept = shape.layers * per_block
    return tokens * kept * act_bytes + tokens * shape.vocab * 8


def estimate(shape: ModelShape, method: str, lora_r: int = 64, batch: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = True, blocksize: int = 64, double_quant: bool = True,
             weight_bytes: int = 2, adapter_bytes: int = 2, optim_bytes_per_param: int = 8) -> Dict[str, int]:
    """Bytes per component for one method ('full16', 'lora' or 'qlora'), plus 'total' and 'trainable'."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for label, v in (("lora_r", lora_r), ("batch", batch), ("seq_len", seq_len)):
        if v < 1:
            raise ValueError(f"{label} must be >= 1, got {v}")
    other = shape.embedding_params + shape.norm_params
    out = dict.fromkeys(COMPONENTS, 0)
    if method == "full16":
        trainable = shape.params
        out["weights"] = shape.params * weight_bytes
        out["gradients"] = trainable * weight_bytes
    else:
        trainable = shape.layers * sum((i + o) * lora_r for i, o in shape.block_linears())
        if method == "lora":
            out["weights"] = shape.params * weight_bytes
        else:
            for i, o in shape.block_linears():
                packed, scales = nf4_bytes(i * o, blocksize, double_quant)
                out["weights"] += shape.layers * packed
                out["scales"] += shape.layers * scales
            out["weights"] += other * weight_bytes
        out["adapters"] = trainable * adapter_bytes
        out["gradients"] = trainable * adapter_bytes
    out["optimizer"] = trainable * optim_bytes_per_param
    out["activations"] = activations(shape, batch, seq_len, gradient_checkpointing,
                                     lora_r=0 if method == "full16" else lora_r)
    out["total"] = sum(out[c] for c in COMPONENTS)
    out["trainable"] = trainable
    return out


# What `qlora-ext finetune` holds besides the model and its training state: Python, torch, transformers and
# qlora_ext, the tokenizer and the data. Measured: the peak RSS of a whole finetune run of the tiny generated
# model (bench/bench_big_train.py --model <tools/make_model.py --size tiny>: 0.48 GB; 0.37 GB after imports).
# It is not fitted to the big runs: on LLaMA-13B the estimates fall 5-6% under the measured peaks
# (bench/results/big_train_cpu.md), the rest being allocator slack and transient copies (gradient clipping,
# the checkpoint written at the end) that grow with the adapters.
FINETUNE_RUNTIME_BYTES = int(0.45e9)
OPTIM_BYTES = {"paged_adamw_32bit": 8.0, "adamw_torch": 8.0,
               # 8-bit: two uint8 moments + a float32 absmax per 256 elements for each
               "paged_adamw_8bit": 2 + 8 / 256, "adamw_8bit": 2 + 8 / 256}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def finetune_estimate(shape: ModelShape, lora_r: int = 64, batch: int = 1, seq_len: int = 512,
                      gradient_checkpointing: bool = True, blocksize: int = 64, double_quant: bool = True,
                      compute_dtype: str = "float32", embedding_dtype: str = "float32",
                      optim: str = "paged_adamw_32bit", lora_dtype: str = "float32") -> Dict[str, int]:
    """Bytes of a `qlora-ext finetune` run (one process) as it stores things, unlike the paper's 16-bit
    assumptions of `estimate`: LoRA weights and their gradients in `lora_dtype` (--lora-dtype), norms in float32
    (prepare_model_for_training), the input embeddings and untied head in `embedding_dtype`
    (--embedding-dtype), optimizer state per `optim` (8 bytes per trainable parameter, 2.03 in 8 bits),
    activations in the compute dtype (float32 on CPU), plus the process's fixed runtime (FINETUNE_RUNTIME_BYTES).
    Keys: the COMPONENTS, 'runtime', 'total' and 'trainable'."""
    for label, v, table in (("compute_dtype", compute_dtype, DTYPE_BYTES), ("embedding_dtype", embedding_dtype,
                            DTYPE_BYTES), ("optim", optim, OPTIM_BYTES), ("lora_dtype", lora_dtype, DTYPE_BYTES)):
        if v not in table:
            raise ValueError(f"{label} must be one of {', '.join(table)}, got {v!r}")
    out = estimate(shape, "qlora", lora_r=lora_r, batch=batch, seq_len=seq_len,
                   gradient_checkpointing=gradient_checkpointing, blocksize=blocksize, double_quant=double_quant,
                   weight_bytes=2, adapter_bytes=DTYPE_BYTES[lora_dtype])
    trainable = out["trainable"]
    out["weights"] += (shape.embedding_params * (DTYPE_BYTES[embedding_dtype] - 2) + shape.norm_params * 2)
    out["optimizer"] = int(trainable * OPTIM_BYTES[optim])
    out["activations"] = activations(shape, batch, seq_len, gradient_checkpointing, DTYPE_BYTES[compute_dtype],
                                     lora_r)
    out["runtime"] = FINETUNE_RUNTIME_BYTES
    out["total"] = sum(out[c] for c in COMPONENTS) + out["runtime"]
    return out


def _layer_bytes(shape: ModelShape, method: str, lora_r: int, blocksize: int, double_quant: bool,
                 weight_bytes: int = 2, adapter_bytes: int = 2) -> int:
    """Parameter bytes of one decoder layer (weights, adapters, norms; not the replicated scales): what FSDP2
    gathers for it."""
    n = 0
    for i, o in shape.block_linears():
        n += nf4_bytes(i * o, blocksize, double_quant)[0] if method == "qlora" else i * o * weight_bytes
        if method != "full16":
            n += (i + o) * lora_r * adapter_bytes
    return n + 2 * shape.hidden * weight_bytes  # the two norms


def per_rank(shape: ModelShape, method: str, world_size: int, strategy: str = "fsdp", batch: int = 1,
             **kw) -> Dict[str, int]:
    """Bytes on each of `world_size` ranks training on a global batch of `batch` sequences (each rank runs
    ceil(batch / world_size) of them), as `estimate` returns them plus 'buffers':

    ddp: the whole model, its gradients and optimizer state on every rank; buffers = DDP's gradient buckets (a
      second copy of the trainable gradients, all-reduced from there).
    fsdp (FSDP2, one unit per decoder layer, the rest in the root unit): weights, adapters, gradients and
      optimizer state divided by world_size, the scales replicated (qlora_ext keeps each QuantState whole on
      every rank); buffers = what is gathered at once: the root unit (embedding,
      final norm, LM head; unsharded from the start of forward to the end of backward) and two decoder layers
      (the one computing and the one prefetched).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out = estimate(shape, method, batch=-(-batch // world_size), **kw)
    out["buffers"] = 0
    if world_size > 1:
        if strategy == "ddp":
            out["buffers"] = out["gradients"]
        else:
            for c in SHARDED:
                out[c] = -(-out[c] // world_size)
            weight_bytes = kw.get("weight_bytes", 2)
            root = (shape.embedding_params + shape.hidden) * weight_bytes
            out["buffers"] = root + 2 * _layer_bytes(shape, method, kw.get("lora_r", 64), kw.get("blocksize", 64),
                                                     kw.get("double_quant", True), weight_bytes,
                                                     kw.get("adapter_bytes", 2))
    out["total"] = sum(out[c] for c in COMPONENTS) + out["buffers"]
    return out


def report(model: str, world_size: int = 1, strategy: str = "fsdp", finetune: Dict = None, **kw) -> Dict:
    """Everything `qlora-ext estimate` prints, as a dict (the --json output); with world_size > 1 also the
    bytes per rank of a `strategy` run on world_size ranks (the batch being the global batch); with `finetune`
    (compute_dtype, embedding_dtype, optim, lora_dtype) also what `qlora-ext finetune` itself holds (finetune_estimate)."""
    shape = resolve_shape(model)
    rep = {"model": asdict(shape), "params": shape.params, "settings": kw,
           "bytes": {m: estimate(shape, m, **kw) for m in METHODS}}
    if finetune:
        rep["finetune"] = {"settings": finetune, "bytes": finetune_estimate(shape, **kw, **finetune)}
    if world_size != 1:
        rep["distributed"] = {"world_size": world_size, "strategy": strategy,
                              "per_rank": {m: per_rank(shape, m, world_size, strategy, **kw) for m in METHODS}}
    return rep


def format_table(rep: Dict) -> str:
    """A fixed-width table in GB (1e9 bytes), one column per method."""
    m = rep["model"]
    s = rep["settings"]
    head = (f"{m['name']}: {rep['params'] / 1e9:.2f}B parameters ({m['layers']} layers, hidden {m['hidden']}, "
            f"vocab {m['vocab']}); batch {s.get('batch', 1)} x {s.get('seq_len', 512)} tokens, LoRA r="
            f"{s.get('lora_r', 64)}, gradient checkpointing {'on' if s.get('gradient_checkpointing', True) else 'off'}")
    cols = ("full 16-bit", "LoRA 16-bit", "QLoRA NF4" + (" + DQ" if s.get("double_quant", True) else ""))
    lines = [head, f"{'GB':<14}" + "".join(f"{c:>16}" for c in cols)]
    for comp in COMPONENTS + ("total",):
        lines.append(f"{comp:<14}" + "".join(f"{rep['bytes'][meth][comp] / GB:>16.2f}" for meth in METHODS))
    lines.append(f"{'trainable':<14}" + "".join(f"{rep['bytes'][meth]['trainable'] / 1e6:>15.1f}M"
                                               for meth in METHODS))
    f = rep.get("finetune")
    if f:
        fs = f["settings"]
        lines.append(f"qlora-ext finetune, one process ({fs['compute_dtype']} compute, "
                     f"{fs.get('lora_dtype', 'float32')} adapters, float32 norms, "
                     f"{fs['embedding_dtype']} embeddings and head, {fs['optim']}):")
        lines.append("  " + ", ".join(f"{c} {f['bytes'][c] / GB:.2f}" for c in COMPONENTS + ("runtime",))
                     + f"; total {f['bytes']['total'] / GB:.2f} GB")
    d = rep.get("distributed")
    if d:
        w, b = d["world_size"], s.get("batch", 1)
        lines.append(f"per rank, {w} ranks, {d['strategy']} (global batch {b}: {-(-b // w)} per rank)")
        for comp in COMPONENTS + ("buffers", "total"):
            lines.append(f"{comp:<14}" + "".join(f"{d['per_rank'][meth][comp] / GB:>16.2f}" for meth in METHODS))
    return "\n".join(lines)
