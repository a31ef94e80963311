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
  measured in the same run -- at the start and again in alternation with every dequantize measurement, rep
  by rep, because on a shared VM the available bandwidth drifts by tens of percent within a minute -- and
  the dequantize bandwidth (packed + uint8 absmax + nested absmax read, output written) as a percentage of
  it.

Timings are the median of --reps repetitions after warmup (time.perf_counter on CPU, CUDA events on CUDA).
By default the last-level cache is flushed (a large read-only sweep, outside the timed region) before each
timed repetition of our kernels and of the copy, so that every measurement starts from a cold cache: a
4096x4096 packed weight (8 MiB) would otherwise stay cache-resident between repetitions. On CPU each timed
call then waits --settle-ms (busy) so that OpenMP threads left spinning by earlier torch ops do not compete
with qlora_ext's own worker threads; the "after torch op" column shows the cost of that competition.

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
from _common import cpu_model, md_table

BLOCKSIZE = 64
QUANT_TYPE = "nf4"
DEQUANT_TARGET_PCT = 80.0
QUANT_TARGET_SPEEDUP = 10.0
OUT_DTYPES = (torch.float32, torch.bfloat16)
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# machine description




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


def cpu_ticks() -> tuple[int, int, int] | None:
    """(busy, steal, total) clock ticks of the whole machine from /proc/stat; busy excludes idle, iowait and
    steal (time the hypervisor gave this VM's CPUs to someone else)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        v += [0] * (8 - len(v))
        return v[0] + v[1] + v[2] + v[5] + v[6], v[7], sum(v[:8])
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
    """Times single calls on a cold cache and quiet threads; see once()."""

    def __init__(self, device: torch.device, flush_bytes: int = 0, settle_s: float = 0.0):
        self.device = device
        self.cuda = device.type == "cuda"
        self.settle_s = settle_s
        self.flush_buf = torch.ones(flush_bytes // 4, dtype=torch.float32, device=device) if flush_bytes else None
        # CPU: a read-only sweep (it leaves no dirty lines behind to be written back inside the timed region;
        # our own dirty output lines are evicted here, untimed), run through NumPy: single-threaded, outside
        # OpenMP. CUDA: the usual zero_() of a buffer larger than L2.
        self._flush_np = None
        if self.flush_buf is not None and not self.cuda:
            try:
                self._flush_np = self.flush_buf.numpy()
            except Exception:  # noqa: BLE001 - torch built without NumPy: fall back to a torch sweep
                self._flush_np = None

    def flush(self):
        if self.flush_buf is None:
            return
        if self.cuda:
            self.flush_buf.zero_()
        elif self._flush_np is not None:
            self._flush_np.sum()
        else:
            self.flush_buf.sum()

    def settle(self, since: float):
        """CPU: busy-wait until settle_s after `since`. After any parallel torch op, libgomp's worker threads
        spin-wait for the next parallel region (GOMP_SPINCOUNT; about 8 ms on the 2-core VM this was written
        on) and would compete for the cores with qlora_ext's own worker threads inside the timed region. The
        wait is spent spinning on this thread, so that its core does not go idle either."""
        if not self.cuda:
            while time.perf_counter() - since < self.settle_s:
                pass

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn, pre=None) -> float:
        """One timed call of fn, in seconds: cache flush (unless --no-flush), settle, pre() if given (untimed,
        for measuring fn right after it), then fn."""
        t_flush = time.perf_counter()
        self.flush()
        self.settle(t_flush)
        if pre is not None:
            pre()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def __call__(self, fn, reps: int, warmup: int = 2, pre=None) -> tuple[float, float]:
        """(median, best) seconds of fn over reps timed calls after warmup untimed ones."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = [self.once(fn, pre) for _ in range(max(1, reps))]
        return statistics.median(times), min(times)

    def paired(self, fn, ref_fn, reps: int, warmup: int = 2) -> tuple[list[float], list[float]]:
        """Times of fn and of ref_fn over reps alternating repetitions, so that both see the same machine:
        on a shared VM the available memory bandwidth drifts by tens of percent within a minute."""
        for _ in range(warmup):
            fn()
            ref_fn()
        self.sync()
        a, b = [], []
        for _ in range(max(1, reps)):
            a.append(self.once(fn))
            b.append(self.once(ref_fn))
        return a, b


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


class CopyBench:
    """dst.copy_(src) on float32 tensors of nbytes each; bytes = read + write. Every timed copy is kept, so that
    the header can report the bandwidth over the whole run."""

    def __init__(self, timer: Timer, nbytes: int):
        self.src = torch.randn(nbytes // 4, device=timer.device)
        self.dst = torch.empty_like(self.src)
        self.dst.fill_(0.0)  # first touch outside the timed region
        self.nbytes = 2 * self.src.numel() * 4
        self.times: list[float] = []

    def __call__(self):
        self.dst.copy_(self.src)

    def gbs(self, times) -> tuple[float, float]:
        """(median, best) GB/s of these copy times."""
        self.times += times
        return self.nbytes / statistics.median(times) / 1e9, self.nbytes / min(times) / 1e9


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




def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4096x4096", "11008x4096"],
                    help="weight shapes ROWSxCOLS (space or comma separated); default 4096x4096 11008x4096")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions of our kernels and the copy (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warmup calls before our kernels' timings")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed repetitions of the reference dequantize")
    ap.add_argument("--ref-quant-reps", type=int, default=2,
                    help="timed repetitions of the reference quantize (6-8 s each for 11008x4096 on a quiet 2-core VM)")
    ap.add_argument("--skip-ref", action="store_true", help="do not time the pure-PyTorch reference")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--copy-mib", type=int, default=256,
                    help="copy-bandwidth buffer size in MiB (raised to >= 4x the last-level cache)")
    ap.add_argument("--no-flush", action="store_true",
                    help="do not flush the cache before each timed repetition (hot-cache numbers)")
    ap.add_argument("--settle-ms", type=float, default=20.0,
                    help="CPU: busy-wait this long after each cache flush, before the timed call, so that OpenMP "
                         "worker threads left spinning by earlier torch ops have gone to sleep (default 20)")
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
    t_start, ticks0, own0 = time.perf_counter(), cpu_ticks(), os.times()

    llc = cache_bytes(device)
    copy_bytes = max(args.copy_mib * MiB, 4 * llc)
    timer = Timer(device, 0 if args.no_flush else max(128 * MiB, 4 * llc), args.settle_ms / 1e3)
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
    env = {k: os.environ[k] for k in ("QLORA_EXT_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                      "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE") if k in os.environ}
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
           f"flushed before each timed rep ({timer.flush_buf.numel() * 4 // MiB} MiB NumPy sweep, untimed)")
        + ("" if device.type == "cuda" else
           f", then {args.settle_ms:g} ms of busy-waiting so that OpenMP threads left spinning by earlier torch ops "
           "are asleep"),
        "- targets: dequantize >= 80% of copy bandwidth; quantize >= 10x faster than the reference",
    ]
    for line in header:
        print(line, flush=True)

    # ---- copy bandwidth (measured here, and again alongside every dequantize measurement) ----
    copy = CopyBench(timer, copy_bytes)
    copy()
    copy.gbs([timer.once(copy) for _ in range(max(1, args.reps))])
    copy0 = copy.nbytes / statistics.median(copy.times) / 1e9
    print(f"- copy bandwidth at the start: {copy0:.1f} GB/s median", flush=True)

    small = torch.ones(1 << 16, device=device)
    small_op = small.sum  # 64K elements: one OpenMP parallel region on CPU
    deq_rows, q_rows = [], []
    for rows, cols in sizes:
        name = f"{rows}x{cols}"
        w32 = torch.randn(rows, cols, device=device) * 0.02
        wbf = w32.to(torch.bfloat16)

        # ---- quantize ----
        for in_dt, w in ((torch.float32, w32), (torch.bfloat16, wbf)):
            ours, _ = timer(lambda: F.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE, double_quant=True), args.reps,
                            args.warmup)
            packed, state = F.quantize_4bit(w, BLOCKSIZE, QUANT_TYPE, double_quant=True)
            ref = match = None
            if not args.skip_ref:
                res = {}

                def run_ref():
                    p, a = R.quantize_4bit_ref(w, BLOCKSIZE, QUANT_TYPE)
                    res["r"] = (p, a, *R.double_quantize_ref(a, F.NESTED_BLOCKSIZE))

                ref = time_host(run_ref, args.ref_quant_reps, 0, sync)
                p, _, qa, na, off = res.pop("r")
                match = torch.equal(p, packed.cpu())
                if device.type == "cpu":
                    match = match and (torch.equal(qa, state.absmax) and torch.equal(na, state.nested_absmax)
                                       and torch.equal(off, state.offset))
                else:  # the offset is a mean reduced in a different order on the GPU: compare the scales
                    match = match and torch.allclose(R.dequantize_absmax_ref(qa, na, off),
                                                     F.dequantize_absmax(state).cpu(), rtol=1e-5, atol=0)
                del p, qa, na, off
            speed = ref / ours if ref else None
            q_rows.append([name, short(in_dt), fmt_ms(ours), fmt_ms(ref),
                           f"{speed:.0f}x" if speed else "-",
                           "-" if speed is None else ("yes" if speed >= QUANT_TARGET_SPEEDUP else "NO"),
                           "-" if match is None else ("yes" if match else "NO")])
            print(f"  quantize   {name} from {short(in_dt)}: ours {fmt_ms(ours)} ms, ref {fmt_ms(ref)} ms"
                  + (f", {speed:.0f}x" if speed else ""), flush=True)
            del packed, state

        # ---- dequantize (of the float32 weight's quantization) ----
        packed, state = F.quantize_4bit(w32, BLOCKSIZE, QUANT_TYPE, double_quant=True)
        del wbf, w32
        for out_dt in OUT_DTYPES:
            st = F.QuantState(state.absmax, state.shape, out_dt, state.blocksize, state.quant_type, state.code,
                              state.offset, state.nested_absmax, state.nested_code, state.nested_blocksize)
            out = torch.empty(rows, cols, dtype=out_dt, device=device)
            out.fill_(0.0)  # first touch outside the timed region
            # dequantize and copy alternate, rep by rep: % of copy compares medians taken over the same minute
            t_outs, t_copies = timer.paired(lambda: F.dequantize_4bit(packed, st, out=out), copy, args.reps,
                                            args.warmup)
            t_out, t_out_best = statistics.median(t_outs), min(t_outs)
            copy_gbs, copy_best = copy.gbs(t_copies)
            t_new, _ = timer(lambda: F.dequantize_4bit(packed, st), args.reps, args.warmup)
            # the same call right after a small parallel torch op, as in a model's forward pass
            t_after, _ = timer(lambda: F.dequantize_4bit(packed, st, out=out), args.reps, args.warmup,
                               pre=small_op)
            nbytes = dequant_bytes(packed, st, out_dt)
            gbs, gbs_best, gbs_new = nbytes / t_out / 1e9, nbytes / t_out_best / 1e9, nbytes / t_new / 1e9
            pct, pct_best = 100 * gbs / copy_gbs, 100 * gbs_best / copy_best
            ref = match = None
            if not args.skip_ref:
                res = {}

                def run_ref():
                    a = R.dequantize_absmax_ref(st.absmax, st.nested_absmax, st.offset, st.nested_blocksize)
                    res["r"] = R.dequantize_4bit_ref(packed, a, st.shape, out_dt, BLOCKSIZE, QUANT_TYPE)

                ref = time_host(run_ref, args.ref_reps, 1, sync)
                match = torch.equal(res.pop("r"), out.cpu())
            deq_rows.append([name, short(out_dt), f"{nbytes / 1e6:.1f}", fmt_ms(t_out), f"{gbs:.1f}",
                             f"{copy_gbs:.1f}", f"{pct:.0f}%", "yes" if pct >= DEQUANT_TARGET_PCT else "NO",
                             f"{gbs_best:.1f} ({pct_best:.0f}%)", fmt_ms(t_after), fmt_ms(t_new), fmt_ms(ref),
                             f"{ref / t_out:.0f}x" if ref else "-",
                             "-" if match is None else ("yes" if match else "NO")])
            print(f"  dequantize {name} to {short(out_dt)}: out= {fmt_ms(t_out)} ms ({gbs:.1f} GB/s, {pct:.0f}% "
                  f"of copy at {copy_gbs:.1f} GB/s; best rep {gbs_best:.1f} GB/s, {pct_best:.0f}% of best copy), "
                  f"after a torch op {fmt_ms(t_after)} ms, alloc {fmt_ms(t_new)} ms ({gbs_new:.1f} GB/s), "
                  f"ref {fmt_ms(ref)} ms", flush=True)
            del out
        del packed, state

    all_copy = sorted(copy.times)
    copy_line = (f"- copy bandwidth: {copy.nbytes / statistics.median(all_copy) / 1e9:.1f} GB/s median, "
                 f"{copy.nbytes / all_copy[0] / 1e9:.1f} GB/s best, over all {len(all_copy)} copies of the run "
                 f"(`dst.copy_(src)`, 2 x {copy_bytes // MiB} MiB float32, bytes = read + write; "
                 f"{copy0:.1f} GB/s at the start)")
    report = [*header, copy_line, "", "## Dequantize", ""]
    report += md_table(["weight", "out", "MB moved", "out= (ms)", "GB/s", "copy GB/s", "% of copy", ">= 80%",
                        "best rep GB/s (% of best copy)", "after torch op (ms)", "alloc (ms)", "ref (ms)", "vs ref",
                        "== ref"],
                       deq_rows)
    report += ["", "MB moved = packed bytes + uint8 absmax + float32 nested absmax read + output written. "
               "`out=`: `dequantize_4bit(packed, state, out=out)` into a preallocated, already-touched tensor; "
               "`alloc`: `dequantize_4bit(packed, state)`, which allocates its result on every call (its time "
               "includes the allocation and, on CPU, the first-touch page faults of the fresh pages). after torch op: "
               "the `out=` call timed right after an (untimed) 64K-element `torch.sum`, with no wait in between, as "
               "in a model's forward pass. copy GB/s: "
               "the copy timed in alternation with the `out=` dequantize, rep by rep; GB/s and % of copy use the "
               "median of each; the best-rep column compares the fastest repetition of each. vs ref = reference "
               "time / median `out=` time; == ref: bit-identical output.",
               "", "## Quantize (double_quant=True)", ""]
    report += md_table(["weight", "in", "ours (ms)", "ref (ms)", "speedup", ">= 10x", "== ref"], q_rows)
    report += ["", "ref = quantize_4bit_ref + double_quantize_ref (`speedup` = ref / ours, medians); == ref checks "
               "packed bytes, uint8 absmax, nested absmax and offset bit for bit"
               + (" (CUDA: packed bytes, and the decoded scales to 1e-5)." if device.type == "cuda" else "."), ""]
    wall = time.perf_counter() - t_start
    ticks1, own1 = cpu_ticks(), os.times()
    footer = f"Total benchmark time: {wall:.0f} s."
    if ticks0 is not None and ticks1 is not None:
        hz = os.sysconf("SC_CLK_TCK")
        own = (own1.user + own1.system) - (own0.user + own0.system)
        other = max(0.0, (ticks1[0] - ticks0[0]) / hz - own) / wall
        steal = 100 * (ticks1[1] - ticks0[1]) / max(1, ticks1[2] - ticks0[2])
        footer += (f" During the run other processes kept {other:.2f} of {os.cpu_count()} CPUs busy on average, "
                   f"and the hypervisor stole {steal:.0f}% of this machine's CPU time"
                   + (" (timings are perturbed by the machine's load)." if other > 0.05 or steal > 2 else "."))
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
