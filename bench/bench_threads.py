#!/usr/bin/env python
"""OpenMP on a shared machine (issue 20): the time of a small 2-thread training step while other processes
keep every core busy, under libgomp's default wait policy and under the one qlora_ext sets (PASSIVE), with
2 threads and with 1.

The step: a SmolLM2-sized stack of 4 x (LoRA 4-bit 576 -> 1536, SiLU, LoRA 4-bit 1536 -> 576, layer norm),
r=16, on 256 tokens, forward + backward: many short parallel regions (our kernels and torch's), as in a
training step. Each configuration runs in a fresh process, torch imported first with OMP_WAIT_POLICY unset
(libgomp's default) or PASSIVE; `--busy N` starts N busy-loop processes (default: one per core) for the "busy" rows.

    python bench/bench_threads.py --out bench/results/bench_threads_cpu.md
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from _common import cpu_model, git_commit

CHILD = r"""
import sys, time, json
import torch  # first: libgomp reads OMP_WAIT_POLICY as torch loads it, before qlora_ext could set it
import qlora_ext
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
layers = []
for _ in range(4):
    for i, o in ((576, 1536), (1536, 576)):
        base = qlora_ext.Linear4bit.from_linear(torch.nn.Linear(i, o))
        layers.append(qlora_ext.LoraLinear4bit.from_linear4bit(base, r=16, lora_dropout=0.0))
x = torch.randn(256, 576)
def step():
    h = x
    for i, layer in enumerate(layers):
        h = layer(h)
        h = torch.nn.functional.silu(h) if i % 2 == 0 else torch.nn.functional.layer_norm(h, h.shape[-1:])
    h.square().mean().backward()
step()
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def run(policy, threads, steps):
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=os.cpu_count(), help="busy-loop processes for the busy rows")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for load in ("as found", "busy"):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy if load == "busy" else 0)]
        try:
            for policy in ("default", "PASSIVE"):
                for threads in (2, 1):
                    t = run(policy, threads, a.steps)
                    rows.append((load, policy, threads, t))
                    print(load, policy, threads, f"{statistics.median(t) * 1e3:.0f} ms", file=sys.stderr, flush=True)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    lines = ["# A 2-thread step on a shared machine: OpenMP wait policy and thread count (bench/bench_threads.py)", "",
             f"- device: {cpu_model()}, {os.cpu_count()} logical CPUs; commit {git_commit()}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average after {loadavg}",
             f"- command: `python bench/bench_threads.py {' '.join(sys.argv[1:])}`; {a.steps} steps per row after "
             f"one warmup; 'busy' = {a.busy} extra busy-loop processes; 'as found' = whatever else the machine ran",
             "- default = libgomp's own policy (spin ~300000 iterations, then sleep); PASSIVE = sleep at once "
             "(what qlora_ext sets when it is imported before torch)", "",
             "| other load | OMP_WAIT_POLICY | threads | step ms, median (min-max) |", "| --- | --- | ---: | ---: |"]
    for load, policy, threads, t in rows:
        lines.append(f"| {load} | {policy} | {threads} | {statistics.median(t) * 1e3:.0f} "
                     f"({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
