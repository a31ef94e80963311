"""Benchmark the 4-bit matmul (qlora_ext.functional.matmul_4bit) against dense F.linear on the float
weight and against dequantize-then-F.linear, all measured in the same run.

Prints a Markdown table (and writes it with --out): time, GB/s (bytes the method must move: its weight
form, x and y) and TFLOP/s (2*M*N*K / time), forward for every M and backward (grad_x) for M >= 32.

Every method (the 4-bit one included) cycles through enough copies of its weight that the copies together
exceed twice the last-level cache (CUDA: L2; CPU: the L3 size the kernel reports), so each call reads its
weight from memory as in a real model's forward pass; the copy bandwidth is measured in the same run (on
CUDA the M = 1 row reports ours as % of it). Each cell is timed --runs times, the methods interleaved; the
table gives the median over runs and, in brackets, the range (min-max) over runs, of the times and of the
ratio ours/dense: quote the ranges, not the best run. Backward rows (grad_x = grad_y @ W) for M >= 32.
With --bnb (CUDA), bitsandbytes' matmul_4bit on its own NF4 + double-quant weight is timed the same way
(forward only). --quick: the GPU check's short run (4096x4096 and 14336x4096, M = 1, 16, 64, 1024).

Targets (issues 3 and 20): CPU float32: M = 1 at most 0.35x dense time on 4096x4096 and 11008x4096;
forward at M = 32 ... 256 and backward at M = 256 ... 2048 at most 1.0x dense. GPU bfloat16 (weights rotated so L2 is cold): M = 1 >= 75% of copy bandwidth in weight
bytes on 14336x4096 and >= 3x cuBLAS; M = 16 >= 2.5x cuBLAS; M >= 512 >= 0.95x cuBLAS throughput.
"""
import argparse
import datetime
import itertools
import statistics
import sys
import time

import torch

import qlora_ext
from qlora_ext import functional as F
from _common import cpu_model, git_commit

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096)]
MS = [1, 8, 32, 256, 1024, 2048]
MS_CUDA = [1, 8, 16, 32, 256, 512, 1024]


def last_level_cache(device) -> int:
    """Bytes of the last-level cache: the GPU's L2, or the largest CPU cache the kernel lists (L3)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    import glob
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or (32 << 20)


def rotating(make, nbytes, llc):
    """A list of weight copies (from make()) whose total exceeds 2x the last-level cache."""
    return [make() for _ in range(max(1, -(-2 * llc // nbytes) + 1))]


def copy_bandwidth(device, reps, budget):
    """Device-to-device (or host memory) copy bandwidth in GB/s, bytes = read + write, 256 MiB buffers."""
    src = torch.ones(64 << 20, device=device)
    dst = torch.empty_like(src)
    t = timer(device, lambda: dst.copy_(src), reps, budget)
    return 2 * src.numel() * 4 / t / 1e9




def timer(device, fn, reps, budget_s):
    """Median seconds of fn() after one warm-up; fewer repetitions when a call is slow."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    n = max(1, min(reps, int(budget_s / max(first, 1e-9))))
    times = [first]
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spread(xs, scale, fmt):
    """median (min-max) of xs * scale; just the value for one run."""
    xs = [x * scale for x in xs]
    med = format(statistics.median(xs), fmt)
    return med if len(xs) == 1 else f"{med} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096")
    ap.add_argument("--ms", default=None, help="e.g. 1,8,1024")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="timings per cell (methods interleaved); median + range")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell at most")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bnb", action="store_true", help="also time bitsandbytes.matmul_4bit (CUDA, forward)")
    ap.add_argument("--quick", action="store_true", help="short run: 2 shapes, M = 1,16,64,1024, 5 reps, 0.5 s")
    args = ap.parse_args()
    if args.quick:
        args.shapes = args.shapes or "4096x4096,14336x4096"
        args.ms = args.ms or "1,16,64,1024"
        args.reps, args.budget, args.runs = min(args.reps, 5), min(args.budget, 0.5), 1
    bnb = None
    if args.bnb:
        import bitsandbytes as bnb  # the carried wheel on the GPU machine (tools/gpu_check.sh)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (MS_CUDA if device.type == "cuda" else MS)
    torch.manual_seed(0)
    esize = torch.finfo(dtype).bits // 8

    copy_bw = copy_bandwidth(device, args.reps, args.budget)
    llc = last_level_cache(device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads, qlora_ext cpu_isa={qlora_ext.cpu_isa()}"
    lines = [
        "# 4-bit matmul benchmark",
        "",
        f"- device: {dev_name}",
        f"- commit: {git_commit()}; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"dtype {dtype}; NF4 + double quant, blocksize 64",
        f"- command: `python {' '.join(sys.argv)}`",
        "- ours = matmul_4bit; dense = F.linear on the float weight; deq+linear = dequantize_4bit then F.linear",
        "- GB/s counts the weight form each method reads (packed + scales for ours) plus x and y",
        f"- copy bandwidth (`dst.copy_(src)`, 256 MiB, read + write): {copy_bw:.1f} GB/s; every method's "
        f"weight rotated through copies totalling > 2x the last-level cache ({llc >> 20} MiB)",
        f"- {args.runs} run(s) per cell, methods interleaved: median over runs (min-max over runs); each run is "
        f"the median of up to {args.reps} calls within {args.budget} s",
        "",
        "| weight | M | pass | ours ms | dense ms | deq+linear ms | ours/dense | ours GB/s | dense GB/s | "
        "ours TFLOP/s | dense TFLOP/s | bnb ms | ours/bnb |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for N, K in shapes:
        w = torch.randn(N, K, device=device) * 0.02
        packed, state = F.quantize_4bit(w.to(dtype))
        wq_bytes = packed.numel() * packed.element_size() + state.absmax.numel() + state.nested_absmax.numel() * 4
        W = F.dequantize_4bit(packed, state).to(dtype)
        theirs_q = None
        if bnb is not None:
            bp, bqs = bnb.functional.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4",
                                                   compress_statistics=True)
            theirs_q = itertools.cycle(rotating(lambda: (bp.clone(), bqs), wq_bytes, llc))
        del w
        # (packed, state) and W copies, cycled so that no call finds its weight in the last-level cache
        quant = itertools.cycle(rotating(lambda: (packed.clone(), state), wq_bytes, llc))
        dense_w = itertools.cycle(rotating(W.clone, N * K * esize, llc))
        del W
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            passes = ["fwd"] + (["bwd"] if M >= 32 else [])
            for p in passes:
                if p == "fwd":
                    def ours():
                        pk, st = next(quant)
                        return F.matmul_4bit(x, pk, st)

                    def dense():
                        return torch.nn.functional.linear(x, next(dense_w))

                    def deq():
                        pk, st = next(quant)
                        return torch.nn.functional.linear(x, F.dequantize_4bit(pk, st))
                    io = (M * K + M * N) * esize
                else:
                    g = torch.randn(M, N, device=device, dtype=dtype)

                    def ours():
                        pk, st = next(quant)
                        return torch.ops.qlora_ext.matmul_4bit_t(g, pk.view(-1), st.absmax, st.nested_absmax,
                                                                 st.nested_code, st.offset_value, 256, 64, "nf4",
                                                                 [N, K])

                    def dense():
                        return g @ next(dense_w)

                    def deq():
                        pk, st = next(quant)
                        return g @ F.dequantize_4bit(pk, st)
                    io = (M * N + M * K) * esize
                t_bnb = None
                runs = {"ours": [], "dense": [], "deq": []}
                with torch.no_grad():
                    for _ in range(args.runs):
                        for name, fn in (("ours", ours), ("dense", dense), ("deq", deq)):
                            runs[name].append(timer(device, fn, args.reps, args.budget))
                    if theirs_q is not None and p == "fwd":
                        def theirs():
                            pk, qs = next(theirs_q)
                            return bnb.matmul_4bit(x, pk.t(), quant_state=qs)
                        t_bnb = timer(device, theirs, args.reps, args.budget)
                t_ours, t_dense = statistics.median(runs["ours"]), statistics.median(runs["dense"])
                ratios = [o / d for o, d in zip(runs["ours"], runs["dense"])]
                flops = 2 * M * N * K
                row = (f"| {N}x{K} | {M} | {p} | {spread(runs['ours'], 1e3, '.3f')} | "
                       f"{spread(runs['dense'], 1e3, '.3f')} | {spread(runs['deq'], 1e3, '.3f')} | "
                       f"{spread(ratios, 1, '.2f')} | {(wq_bytes + io) / t_ours / 1e9:.1f} | "
                       f"{(N * K * esize + io) / t_dense / 1e9:.1f} | {flops / t_ours / 1e12:.3f} | "
                       f"{flops / t_dense / 1e12:.3f} | "
                       + (f"{t_bnb * 1e3:.3f} | {t_ours / t_bnb:.2f} |" if t_bnb else "- | - |"))
                if M == 1 and device.type == "cuda":
                    row += f" ours weight bytes at {100 * wq_bytes / t_ours / 1e9 / copy_bw:.0f}% of copy |"
                print(row, flush=True)
                lines.append(row)
        del quant, dense_w, theirs_q
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
