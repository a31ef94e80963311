"""CPU checks of issue 20 (AVX2-only machines): the fused 4-bit GEMV at M = 1 and 8 against dense F.linear,
and dequantize_4bit's alloc form against out= (4096x4096 float32), ours and theirs alternating call by call.

Weights rotate through copies totalling > 256 MiB on both sides (beyond the last-level cache). Two timings:
wall time with the default threads (what a user sees; at the mercy of other processes on a shared machine),
and one-thread CPU time (time.thread_time, torch.set_num_threads(1)), which preemption does not inflate.
Figures are medians with the interquartile range. Usage: python bench/bench_cpu_gemv.py [--out FILE]
"""
import argparse
import time

import torch

import qlora_ext
from qlora_ext import functional as F
from _common import cpu_model, git_commit


def q(v, p):
    v = sorted(v)
    return v[int(p * (len(v) - 1))] * 1e3


def fmt(v):
    return f"{q(v, .5):.2f} ({q(v, .25):.2f}-{q(v, .75):.2f})"


def gemv_rows(clock, rounds=8):
    rows = []
    for N, K in [(4096, 4096), (11008, 4096)]:
        nrot = max(2, (256 << 20) // (N * K * 4) + 1)
        Ws = [torch.randn(N, K) * 0.02 for _ in range(nrot)]
        Q = [F.quantize_4bit(w, 64, "nf4", True) for w in Ws]
        for M in (1, 8):
            x = torch.randn(M, K)
            ours, dense = [], []
            for r in range(rounds + 1):
                for i in range(nrot):
                    t = clock(); F.matmul_4bit(x, *Q[i]); a = clock() - t
                    t = clock(); torch.nn.functional.linear(x, Ws[i]); b = clock() - t
                    if r:
                        ours.append(a), dense.append(b)
            rows.append(f"| {N}x{K} | {M} | {fmt(ours)} | {fmt(dense)} | {q(ours, .5) / q(dense, .5):.2f} |")
        del Ws, Q
    return rows


def dequant_rows(rounds=30):
    w = torch.randn(4096, 4096) * 0.02
    packed, state = F.quantize_4bit(w, 64, "nf4", True)
    out = torch.empty(4096, 4096)
    old, new, into = [], [], []
    for r in range(rounds + 2):
        t = time.perf_counter(); y = torch.empty(4096, 4096); F.dequantize_4bit(packed, state, out=y); a = time.perf_counter() - t
        del y
        t = time.perf_counter(); y = F.dequantize_4bit(packed, state); b = time.perf_counter() - t
        del y
        t = time.perf_counter(); F.dequantize_4bit(packed, state, out=out); c = time.perf_counter() - t
        if r >= 2:
            old.append(a), new.append(b), into.append(c)
    return [f"| fresh torch.empty + out= (the alloc form before this change: 4 KiB first-touch faults) | {fmt(old)} |",
            f"| alloc form `dequantize_4bit(packed, state)` (2 MiB MADV_HUGEPAGE mapping) | {fmt(new)} |",
            f"| `out=` a reused tensor | {fmt(into)} |"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    commit = git_commit()
    load = open("/proc/loadavg").read().split()[:3]
    lines = [f"CPU: {cpu_model()}, kernels: {qlora_ext.cpu_isa() if hasattr(qlora_ext, 'cpu_isa') else ''}, "
             f"commit {commit}, load average at start {' '.join(load)} (shared machine), torch {torch.__version__}", ""]
    head = ["| W (N x K) | M | ours ms median (IQR) | dense F.linear ms median (IQR) | ours / dense |",
            "|---|---|---|---|---|"]
    lines += [f"Wall time, default threads ({torch.get_num_threads()}):", ""] + head + gemv_rows(time.perf_counter)
    lines += ["", "dequantize_4bit 4096x4096 -> float32, wall time, default threads:", "",
              "| form | ms median (IQR) |", "|---|---|"] + dequant_rows()
    torch.set_num_threads(1)
    lines += ["", "One-thread CPU time (time.thread_time):", ""] + head + gemv_rows(time.thread_time)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
