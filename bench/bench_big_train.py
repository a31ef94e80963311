"""Peak memory and seconds per step of QLoRA training steps on a big checkpoint (tools/make_model.py), each run
in its own process, beside `qlora-ext estimate`'s figure for the same settings.

Sides (one fresh process each):

  qlora_ext   qlora-ext finetune --model DIR --max-steps N --batch-size 1 --packing (rows of --length tokens)
              --no-eval-before --no-eval-after, paged AdamW (--optim), checkpointing, LoRA r=64 on all linear
              layers, plus any --extra flags (e.g. --embedding-dtype bfloat16)
  peft_bnb    transformers + bitsandbytes 4-bit (NF4 + DQ) + PEFT LoRA with the same settings: the same rows,
              prepare_model_for_kbit_training, gradient checkpointing, bitsandbytes' PagedAdamW (32-bit, or
              8-bit with --optim paged_adamw_8bit; on CPU bitsandbytes runs them unpaged), lr 2e-4, clip 0.3

Memory: the child's RssAnon and RSS sampled every 20 ms from /proc/PID/status (peak of each), and the child's
own ru_maxrss. Seconds per step from the child's step timings (the first step apart: it includes one-time
costs). The load average before and after is recorded: other jobs on the machine slow the steps.

    python bench/bench_big_train.py --model /work/bigmodels/llama-13b-nf4 --side qlora_ext \\
        --extra="--embedding-dtype bfloat16 --lora-dtype bfloat16" --out bench/results/big_train_cpu.md
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO, cpu_model, git_commit, md_table

GB = 1e9


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_sampled(cmd, env=None, cwd=None):
    """Runs cmd, sampling its memory; returns (CompletedProcess-like dict, peaks)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    peaks = {"VmRSS": 0, "RssAnon": 0, "VmHWM": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status(p.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    done.set()
    th.join()
    return {"rc": p.returncode, "stdout": out, "stderr": err, "seconds": time.time() - t0}, peaks


def side_qlora(args, out_dir: Path):
    cmd = [sys.executable, "-m", "qlora_ext", "finetune", "--model", args.model, "--max-steps", str(args.steps),
           "--batch-size", "1", "--packing", "--source-max-len", str(args.length - args.length // 4),
           "--target-max-len", str(args.length // 4), "--no-eval-before", "--no-eval-after", "--no-progress",
           "--optim", args.optim, "--lora-r", "64", "--lora-alpha", "16", "--save-steps", "1000",
           "--output-dir", str(out_dir)] + shlex.split(args.extra or "")
    res, peaks = run_sampled(cmd, cwd=tempfile.gettempdir())
    info = {"command": " ".join(shlex.quote(c) for c in cmd[1:]), **res}
    if res["rc"] == 0:
        summary = json.loads((out_dir / "summary.json").read_text())
        steps = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in ln and '"step"' in ln]
        steps = [s for s in steps if "tokens_per_s" in s]
        info.update(peak_ru_maxrss=summary["peak_memory"], train_seconds=summary["train_seconds"],
                    step_seconds=[s["tokens"] / s["tokens_per_s"] for s in steps],
                    losses=[s["loss"] for s in steps], tokens=[s["tokens"] for s in steps],
                    total_seconds=summary["total_seconds"])
        for line in res["stderr"].splitlines():
            if "model ready in" in line:
                info["model_ready"] = line.strip()
    return info, peaks


PEFT_CHILD = r'''
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer
import bitsandbytes as bnb
model_dir, steps, length, optim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # its bitsandbytes config
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
params = [p for p in model.parameters() if p.requires_grad]
cls = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.PagedAdamW
opt = cls(params, lr=2e-4)
print("READY", time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)
tok = AutoTokenizer.from_pretrained(model_dir)
text = open(sys.argv[5]).read()
ids = tok(text, return_tensors="pt")["input_ids"][0]
model.train()
times, losses = [], []
for s in range(steps):
    x = ids[s * length:(s + 1) * length][None]
    t = time.time()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.time() - t); losses.append(float(loss))
    print("STEP", s, times[-1], losses[-1], flush=True)
print("RESULT " + json.dumps({"step_seconds": times, "losses": losses,
                              "peak_ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def side_peft(args, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "peft_child.py"
    script.write_text(PEFT_CHILD)
    corpus = out_dir / "text.txt"
    data = REPO / "qlora_ext" / "dataset" / "train.jsonl"
    corpus.write_text("\n".join(json.loads(ln).get("prompt", "") + " " + json.loads(ln).get("completion", "")
                                if "prompt" in ln else ln for ln in data.read_text().splitlines()[:200]))
    cmd = [sys.executable, str(script), args.model, str(args.steps), str(args.length), args.optim, str(corpus)]
    res, peaks = run_sampled(cmd, cwd=tempfile.gettempdir())
    info = {"command": "peft + bitsandbytes child (bench/bench_big_train.py PEFT_CHILD) " + " ".join(cmd[2:]), **res}
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("RESULT ")]
    if line:
        info.update(json.loads(line[0][7:]))
    return info, peaks


def estimate_for(args) -> dict:
    sys.path.insert(0, str(REPO))
    from qlora_ext import estimate as E
    extra = shlex.split(args.extra or "")
    def flag(name):
        return extra[extra.index(name) + 1] if name in extra else "float32"
    return E.finetune_estimate(E.resolve_shape(args.model), lora_r=64, batch=1, seq_len=args.length,
                               compute_dtype="float32", embedding_dtype=flag("--embedding-dtype"), optim=args.optim,
                               lora_dtype=flag("--lora-dtype"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--side", choices=("qlora_ext", "peft_bnb"), default="qlora_ext")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--length", type=int, default=128, help="tokens per row")
    ap.add_argument("--optim", default="paged_adamw_32bit", choices=("paged_adamw_32bit", "paged_adamw_8bit"))
    ap.add_argument("--extra", default="", help="more finetune flags (qlora_ext side)")
    ap.add_argument("--out", default=None, help="markdown file to append a section to (+ .jsonl of raw results)")
    args = ap.parse_args()
    load0 = os.getloadavg()
    commit, started = git_commit(), datetime.datetime.now(datetime.timezone.utc)  # what runs is what is there now
    with tempfile.TemporaryDirectory(dir="/work/bigmodels" if Path("/work/bigmodels").is_dir() else None) as tmp:
        fn = side_qlora if args.side == "qlora_ext" else side_peft
        info, peaks = fn(args, Path(tmp) / "run")
    load1 = os.getloadavg()
    est = None
    try:
        est = estimate_for(args)
    except Exception as exc:  # noqa: BLE001  (an estimate problem must not lose a long measurement)
        print(f"estimate failed: {exc}", file=sys.stderr)
    ok = info["rc"] == 0
    peak = max(peaks["VmRSS"], peaks["VmHWM"], info.get("peak_ru_maxrss") or 0)
    steps = info.get("step_seconds") or []
    later = steps[1:] or steps
    row = [Path(args.model).name, args.side, args.optim + (" " + args.extra if args.extra else ""),
           f"{peak / GB:.2f}" if ok else f"failed (rc {info['rc']})", f"{peaks['RssAnon'] / GB:.2f}",
           f"{est['total'] / GB:.2f}" if est else "-",
           f"{100 * (est['total'] - peak) / peak:+.1f}%" if est and ok else "-",
           f"{steps[0]:.0f}" if steps else "-", f"{sum(later) / len(later):.0f}" if later else "-"]
    header = ["model", "side", "settings", "peak RSS GB", "peak RssAnon GB", "estimate GB", "estimate vs peak",
              "step 1 s", "later steps s (mean)"]
    text = ["", f"## {Path(args.model).name}, {args.side}, {args.optim} {args.extra}".rstrip(), "",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {load0[0]:.1f} before, "
            f"{load1[0]:.1f} after (the run's own threads count; more before means other jobs were running)",
            f"- commit: {commit}; started {started:%Y-%m-%d %H:%M} UTC; wall {info['seconds']:.0f} s",
            f"- command: `{info['command']}`", "", *md_table(header, [row]), ""]
    if info.get("model_ready"):
        text.insert(-1, f"- {info['model_ready']}")
    allocator_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    if allocator_env:
        text.insert(-1, "- allocator environment: " + " ".join(f"{k}={v}" for k, v in sorted(allocator_env.items())))
    if est:
        text.insert(-1, "- estimate breakdown (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in est.items()
                                                                   if k not in ("total", "trainable")))
    if not ok:
        text.insert(-1, "- stderr tail: `" + " / ".join(info["stderr"].strip().splitlines()[-3:]) + "`")
    print("\n".join(text))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(text) + "\n")
        with open(Path(args.out).with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps({"args": vars(args), "peaks": peaks, "estimate": est,
                                **{k: v for k, v in info.items() if k not in ("stdout", "stderr")},
                                "stderr_tail": info["stderr"][-2000:]}) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
