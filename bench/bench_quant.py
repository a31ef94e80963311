#!/usr/bin/env python
"""NF4 quantize / dequantize benchmark: qlora_ext kernels vs the pure-PyTorch reference and vs memory bandwidth.

For each weight shape (default 4096x4096 and 11008x4096), NF4 with double quantization (blocksize 64,
nested blocksize 256):

* dequantize to float32 and to bfloat16 with qlora_ext.functional.dequantize_4bit, both into a
  preallocated `out=` tensor and allocating its result, against the reference
  (dequantize_absmax_ref + dequantize_4bit_ref);
* quantize (quantize_4bit(w, double_quant=True)) from a float32 and from a bfloat16 weight, against the
  reference (quantize_4bit_ref + double_quantize_ref);
* the machine's copy bandwidth (dst.copy_(src), bytes = read + write, buffers >= 4x the last-level cache),
  measured in the same run, and the dequantize bandwidth (packed + uint8 absmax + nested absmax read,
  output written) as a percentage of it.

Timings are the median of --reps repetitions after warmup (time.perf_counter on CPU, CUDA events on CUDA).
By default the last-level cache is flushed (a large read-only sweep, outside the timed region) before each
timed repetition of our kernels and of the copy, so that every measurement starts from a cold cache: a
4096x4096 packed weight (8 MiB) would otherwise stay cache-resident between repetitions.

Run from the repository root:  python bench/bench_quant.py --out bench/results/bench_quant_cpu.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

import qlora_ext
from qlora_ext import functional as F
from qlora_ext import reference as R

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DEQUANT_TARGET_PCT = 80.0
QUANT_TARGET_SPEEDUP = 10.0
OUT_DTYPES = (torch.float32, torch.bfloat16)
IN_DTYPES = (torch.float32, torch.bfloat16)
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# machine description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None when it cannot be read."""
    try:
        cores, phys = set(), "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":", 1)[1].strip()))
        return len(cores) or None
    except OSError:
        return None


def llc_bytes() -> int:
    """Size of the last-level CPU cache (sysfs), 32 MiB when it cannot be read."""
    best_level, best_size = -1, 32 * MiB
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            if not idx.startswith("index"):
                continue
            d = os.path.join(base, idx)
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            size = int(s[:-1] if s[-1] in "KMG" else s) * mult
            if level > best_level:
                best_level, best_size = level, size
    except (OSError, ValueError):
        pass
    return best_size


def cpu_busy_jiffies() -> int | None:
    """Busy (non-idle, non-iowait) CPU time of the whole machine in clock ticks, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]) - v[3] - v[4]  # user nice system [idle iowait] irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * MiB) or 50 * MiB)
    return llc_bytes()


# ---------------------------------------------------------------------------------------------------------
# timing


class Timer:
    """Median wall time of fn() over reps repetitions after warmup, optionally flushing the cache first."""

    def __init__(self, device: torch.device, flush_bytes: int = 0):
        self.device = device
        self.cuda = device.type == "cuda"
        # CPU: a read-only sweep evicts the cache without leaving dirty lines behind to be written back later
        # (the eviction of our own dirty output lines happens here, outside the timed region).
        # CUDA: the usual zero_() of a buffer larger than L2.
        self.flush_buf = torch.ones(flush_bytes // 4, dtype=torch.float32, device=device) if flush_bytes else None

    def flush(self):
        if self.flush_buf is None:
            return
        if self.cuda:
            self.flush_buf.zero_()
        else:
            self.flush_buf.sum()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, reps: int, warmup: int = 2, flush: bool = True) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(max(1, reps)):
            if flush:
                self.flush()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.sync()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def time_host(fn, reps: int, warmup: int, sync) -> float:
    """Median perf_counter time of a host-side function (the reference, which runs on the CPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------
# measurements


def copy_bandwidth(timer: Timer, nbytes: int, reps: int) -> float:
    """GB/s of dst.copy_(src) on float32 tensors of nbytes each (bytes = read + write)."""
    src = torch.randn(nbytes // 4, device=timer.device)
    dst = torch.empty_like(src)
    dst.fill_(0.0)  # first touch outside the timed region
    t = timer(lambda: dst.copy_(src), reps, warmup=2)
    return 2 * src.numel() * 4 / t / 1e9


def dequant_bytes(packed: torch.Tensor, state: F.QuantState, out_dtype: torch.dtype) -> int:
    b = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        b += state.nested_absmax.numel() * state.nested_absmax.element_size()
    return b + state.numel * torch.empty((), dtype=out_dtype).element_size()


def parse_sizes(items) -> list[tuple[int, int]]:
    sizes = []
    for item in items:
        for tok in item.replace(",", " ").split():
            r, c = tok.lower().split("x")
            sizes.append((int(r), int(c)))
    return sizes


def short(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def md_table(header, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(r) for r in rows]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4096x4096", "11008x4096"],
                    help="weight shapes ROWSxCOLS (space or comma separated); default 4096x4096 11008x4096")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions of our kernels and the copy (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warmup calls before our kernels' timings")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed repetitions of the reference dequantize")
    ap.add_argument("--ref-quant-reps", type=int, default=2,
                    help="timed repetitions of the reference quantize (~25 s each for 11008x4096 on 2 cores)")
    ap.add_argument("--skip-ref", action="store_true", help="do not time the pure-PyTorch reference")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--copy-mib", type=int, default=256,
                    help="copy-bandwidth buffer size in MiB (raised to >= 4x the last-level cache)")
    ap.add_argument("--no-flush", action="store_true",
                    help="do not flush the cache before each timed repetition (hot-cache numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report as Markdown to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch.cuda.is_available() is False")
        if not qlora_ext.with_cuda():
            ap.error("--device cuda: this build of qlora_ext has no CUDA kernels")
    sizes = parse_sizes(args.sizes)
    torch.manual_seed(args.seed)
    t_start, busy0, own0 = time.perf_counter(), cpu_busy_jiffies(), os.times()

    llc = cache_bytes(device)
    copy_bytes = max(args.copy_mib * MiB, 4 * llc)
    timer = Timer(device, 0 if args.no_flush else max(2 * copy_bytes // 4, 4 * llc))
    sync = timer.sync

    # ---- header ----
    cores = physical_cores()
    dev_line = (f"{cpu_model()}, {os.cpu_count()} logical CPUs"
                + (f" / {cores} physical cores" if cores else "")
                + f", qlora_ext.cpu_isa()={qlora_ext.cpu_isa()}, torch.get_num_threads()={torch.get_num_threads()}"
                + f", LLC {llc // MiB} MiB")
    if device.type == "cuda":
        dev_line = (f"{torch.cuda.get_device_name(device)} (L2 {llc // MiB} MiB); host: {cpu_model()}, "
                    f"{os.cpu_count()} logical CPUs, torch.get_num_threads()={torch.get_num_threads()}")
    env = {k: os.environ[k] for k in ("QLORA_EXT_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    header = [
        "# qlora_ext NF4 quantize / dequantize benchmark",
        "",
        f"- device: {args.device} — {dev_line}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, qlora_ext {qlora_ext.__version__}, Python {platform.python_version()}",
        "- command: `" + " ".join(["python", *map(shlex.quote, sys.argv)]) + "`"
        + (f" (env: {' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""),
        f"- format: NF4, blocksize {BLOCKSIZE}, double quant (uint8 absmax, nested blocksize "
        f"{F.NESTED_BLOCKSIZE}); weights torch.randn * 0.02, torch.manual_seed({args.seed})",
        f"- timing: median of {args.reps} reps after {args.warmup} warmup "
        f"({'CUDA events' if device.type == 'cuda' else 'time.perf_counter'}); reference: median of "
        f"{args.ref_reps} (dequantize) / {args.ref_quant_reps} (quantize) reps, runs on the CPU; cache "
        + ("not flushed (hot)" if args.no_flush else
           f"flushed before each timed rep ({timer.flush_buf.numel() * 4 // MiB} MiB sweep, untimed)"),
        "- targets: dequantize >= 80% of copy bandwidth; quantize >= 10x faster than the reference",
    ]
    for line in header:
        print(line, flush=True)

    # ---- copy bandwidth ----
    copy_gbs = copy_bandwidth(timer, copy_bytes, args.reps)
    copy_line = (f"- copy bandwidth: {copy_gbs:.1f} GB/s (`dst.copy_(src)`, 2 x {copy_bytes // MiB} MiB float32, "
                 f"bytes = read + write)")
    print(copy_line, flush=True)

    deq_rows, q_rows = [], []
    for rows, cols in sizes:
        name = f"{rows}x{cols}"
        w32 = torch.randn(rows, cols, device=device) * 0.02
        wbf = w32.to(torch.bfloat16)

        # ---- quantize ----
        for in_dt, w in ((torch.float32, w32), (torch.bfloat16, wbf)):
            ours = timer(lambda: F.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE, double_quant=True), args.reps,
                         args.warmup)
            packed, state = F.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE, double_quant=True)
            ref = match = None
            if not args.skip_ref:
                res = {}

                def run_ref():
                    p, a = R.quantize_4bit_ref(w, BLOCKSIZE, QUANT_TYPE)
                    res["r"] = (p, a, *R.double_quantize_ref(a, F.NESTED_BLOCKSIZE))

                ref = time_host(run_ref, args.ref_quant_reps, 0, sync)
                p, _, qa, na, off = res["r"]
                match = torch.equal(p, packed.cpu())
                if device.type == "cpu":
                    match = match and (torch.equal(qa, state.absmax) and torch.equal(na, state.nested_absmax)
                                       and torch.equal(off, state.offset))
                else:  # the offset is a mean reduced in a different order on the GPU: compare the scales
                    match = match and torch.allclose(R.dequantize_absmax_ref(qa, na, off),
                                                     F.dequantize_absmax(state).cpu(), rtol=1e-5, atol=0)
                del res
            speed = ref / ours if ref else None
            q_rows.append([name, short(in_dt), fmt_ms(ours), fmt_ms(ref),
                           f"{speed:.0f}x" if speed else "-",
                           "-" if speed is None else ("yes" if speed >= QUANT_TARGET_SPEEDUP else "NO"),
                           "-" if match is None else ("yes" if match else "NO")])
            print(f"  quantize   {name} from {short(in_dt)}: ours {fmt_ms(ours)} ms, ref {fmt_ms(ref)} ms"
                  + (f", {speed:.0f}x" if speed else ""), flush=True)

        # ---- dequantize (of the float32 weight's quantization) ----
        packed, state = F.quantize_4bit(w32, BLOCKSIZE, QUANT_TYPE, double_quant=True)
        del wbf
        for out_dt in OUT_DTYPES:
            st = F.QuantState(state.absmax, state.shape, out_dt, state.blocksize, state.quant_type, state.code,
                              state.offset, state.nested_absmax, state.nested_code, state.nested_blocksize)
            out = torch.empty(rows, cols, dtype=out_dt, device=device)
            out.fill_(0.0)  # first touch outside the timed region
            t_out = timer(lambda: F.dequantize_4bit(packed, st, out=out), args.reps, args.warmup)
            t_new = timer(lambda: F.dequantize_4bit(packed, st), args.reps, args.warmup)
            nbytes = dequant_bytes(packed, st, out_dt)
            gbs, gbs_new = nbytes / t_out / 1e9, nbytes / t_new / 1e9
            pct = 100 * gbs / copy_gbs
            ref = match = None
            if not args.skip_ref:
                res = {}

                def run_ref():
                    a = R.dequantize_absmax_ref(st.absmax, st.nested_absmax, st.offset, st.nested_blocksize)
                    res["r"] = R.dequantize_4bit_ref(packed, a, st.shape, out_dt, BLOCKSIZE, QUANT_TYPE)

                ref = time_host(run_ref, args.ref_reps, 1, sync)
                match = torch.equal(res.pop("r"), out.cpu())
            deq_rows.append([name, short(out_dt), f"{nbytes / 1e6:.1f}", fmt_ms(t_out), f"{gbs:.1f}",
                             f"{pct:.0f}%", "yes" if pct >= DEQUANT_TARGET_PCT else "NO",
                             fmt_ms(t_new), f"{gbs_new:.1f}", fmt_ms(ref),
                             f"{ref / t_out:.0f}x" if ref else "-",
                             "-" if match is None else ("yes" if match else "NO")])
            print(f"  dequantize {name} to {short(out_dt)}: out= {fmt_ms(t_out)} ms ({gbs:.1f} GB/s, {pct:.0f}% "
                  f"of copy), alloc {fmt_ms(t_new)} ms ({gbs_new:.1f} GB/s), ref {fmt_ms(ref)} ms", flush=True)
            del out
        del w32, packed, state

    report = [*header, copy_line, "", "## Dequantize", ""]
    report += md_table(["weight", "out", "MB moved", "ours out= (ms)", "GB/s", "% of copy", ">= 80%",
                        "ours alloc (ms)", "alloc GB/s", "ref (ms)", "vs ref", "== ref"], deq_rows)
    report += ["", "MB moved = packed bytes + uint8 absmax + float32 nested absmax read + output written. "
               "`out=` writes into a preallocated, already-touched tensor; `alloc` lets dequantize_4bit allocate "
               "its result on every call (its time includes the allocation and, on CPU, the first-touch page "
               "faults of the fresh pages). % of copy uses the `out=` time.",
               "", "## Quantize (double_quant=True)", ""]
    report += md_table(["weight", "in", "ours (ms)", "ref (ms)", "speedup", ">= 10x", "== ref"], q_rows)
    report += ["", "ref = quantize_4bit_ref + double_quantize_ref (`speedup` = ref / ours); == ref checks packed "
               "bytes, uint8 absmax, nested absmax and offset bit for bit"
               + (" (CUDA: packed bytes, and the decoded scales to 1e-5)." if device.type == "cuda" else "."), ""]
    wall = time.perf_counter() - t_start
    busy1, own1 = cpu_busy_jiffies(), os.times()
    footer = f"Total benchmark time: {wall:.0f} s."
    if busy0 is not None and busy1 is not None:
        own = (own1.user + own1.system) - (own0.user + own0.system)
        other = max(0.0, (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - own) / wall
        footer += (f" Other processes kept {other:.2f} of {os.cpu_count()} CPUs busy on average during the run"
                   + (" (timings may be perturbed)." if other > 0.05 else " (quiet machine)."))
    report.append(footer)
    print()
    print("\n".join(report[len(header) + 1:]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
