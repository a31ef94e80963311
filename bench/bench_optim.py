#!/usr/bin/env python
"""Optimizer step benchmark: qlora_ext.optim against torch.optim.AdamW (foreach=True, and fused=True where this
torch has it), measured in the same run.

For each model size (default 10M and 100M parameters, as tensors of at most 2048 x 2048 elements), with
gradients set once, the median wall time of optimizer.step() over --reps steps after --warmup steps (the first
warmup step allocates the state): torch AdamW(foreach=True), torch AdamW(fused=True), and ours: AdamW (float32
state), AdamW8bit, Lion; on CUDA also PagedAdamW and PagedAdamW8bit. GB/s counts the bytes one fused pass must
move (parameter, gradient and state read, parameter and state written).

CUDA only, per size: page_out() of PagedAdamW (the GPU memory it frees, by torch.cuda.mem_get_info = cudaMemGetInfo)
and the extra time of the following step, against state bytes / the host-to-device bandwidth measured here
(pinned host memory to the GPU).

Targets: CPU, our float32 AdamW step no slower than torch AdamW(foreach=True); CUDA, the resident PagedAdamW step
within 5% of torch AdamW(fused=True), and the step after page_out() at most 2x state bytes / bandwidth slower.

Run from the repository root:  python bench/bench_optim.py --out bench/results/bench_optim_cpu.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time

import torch

import qlora_ext
from qlora_ext import optim as O
from _common import cpu_model, md_table

MAX_TENSOR = 2048 * 2048
CPU_TARGET = "ours AdamW (fp32 state) step <= torch AdamW(foreach=True) step"
CUDA_TARGETS = ("resident PagedAdamW step within 5% of torch AdamW(fused=True); the step after page_out() at most "
                "2x (state bytes / host-to-device bandwidth) slower than a resident step")




def parse_count(s: str) -> int:
    mult = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(s[-1].lower(), 1)
    return int(float(s[:-1] if s[-1].lower() in "kmg" else s) * mult)


def make_params(n: int, dtype: torch.dtype, device: torch.device):
    sizes = [MAX_TENSOR] * (n // MAX_TENSOR) + ([n % MAX_TENSOR] if n % MAX_TENSOR else [])
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in sizes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device).to(dtype))
        p.grad = (torch.randn(s, generator=g, device=device) * 1e-2).to(dtype)
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt, device, reps: int, warmup: int) -> float:
    """Median seconds of opt.step() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        opt.step()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pass_bytes(n: int, dtype: torch.dtype, state_bytes_per_param: float) -> float:
    """Bytes one fused pass moves: parameter read + written, gradient read, state read + written."""
    e = torch.empty((), dtype=dtype).element_size()
    return n * (3 * e + 2 * state_bytes_per_param)


def h2d_bandwidth(device, nbytes: int = 512 << 20) -> float:
    """GB/s of a pinned host -> device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    sync(device)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def copy_bandwidth(device, nbytes: int = 512 << 20) -> float:
    """GB/s of dst.copy_(src) on the device (bytes = read + write): the memory roofline of one pass."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    times = []
    for i in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def candidates(device):
    """(label, factory, state bytes per parameter of one pass) in the order they run."""
    out = [("torch AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 8)]
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
        out.append(("torch AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 8))
    except (RuntimeError, ValueError):
        pass
    out += [("ours AdamW (fp32 state)", lambda ps: O.AdamW(ps, lr=1e-3), 8),
            ("ours AdamW8bit", lambda ps: O.AdamW8bit(ps, lr=1e-3), 2 + 8 / 256),
            ("ours Lion (fp32 state)", lambda ps: O.Lion(ps, lr=1e-4), 4)]
    if device.type == "cuda":
        out += [("ours PagedAdamW (resident)", lambda ps: O.PagedAdamW(ps, lr=1e-3), 8),
                ("ours PagedAdamW8bit (resident)", lambda ps: O.PagedAdamW8bit(ps, lr=1e-3), 2 + 8 / 256)]
    return out




def paging_row(label, params, device, reps, warmup, h2d_gbs):
    """PagedAdamW: GPU bytes freed by page_out() and the extra time of the step after it."""
    opt = O.PagedAdamW(params, lr=1e-3)
    resident = time_steps(opt, device, reps, warmup)
    extras, freed = [], []
    for _ in range(reps):
        sync(device)
        free0 = torch.cuda.mem_get_info(device)[0]
        opt.page_out()  # returns once the state is on the host
        freed.append(torch.cuda.mem_get_info(device)[0] - free0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()  # prefetches the state back, then steps
        end.record()
        end.synchronize()
        extras.append(start.elapsed_time(end) / 1e3 - resident)
    state = opt.state_bytes()
    expected = state / (h2d_gbs * 1e9)
    extra = statistics.median(extras)
    del opt
    return [label, f"{state / 2**20:.0f}", f"{statistics.median(freed) / 2**20:.0f}", f"{resident * 1e3:.2f}",
            f"{extra * 1e3:.2f}", f"{expected * 1e3:.2f}", "yes" if extra <= 2 * expected else "NO"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", default=["10M", "100M"], help="model sizes in parameters")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first allocates the state)")
    ap.add_argument("--out", help="also write the report as Markdown to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and qlora_ext.with_cuda()):
        ap.error("--device cuda needs a GPU and a CUDA build of qlora_ext")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        dev_line = f"{torch.cuda.get_device_name(device)}; host {cpu_model()}"
    else:
        dev_line = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, qlora_ext.cpu_isa()={qlora_ext.cpu_isa()}, "
                    f"torch.get_num_threads()={torch.get_num_threads()}")
    env = {k: os.environ[k] for k in ("QLORA_EXT_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ}
    lines = [
        "# qlora_ext optimizer step benchmark",
        "",
        f"- device: {args.device} — {dev_line}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, qlora_ext {qlora_ext.__version__}, Python {platform.python_version()}",
        "- command: `" + " ".join(["python", *map(shlex.quote, sys.argv)]) + "`"
        + (f" (env: {' '.join(f'{k}={v}' for k, v in env.items())})" if env else ""),
        f"- parameters: {args.dtype}, tensors of at most {MAX_TENSOR} elements, gradients set once; "
        "lr 1e-3 (Lion 1e-4)",
        f"- timing: median of {args.reps} steps after {args.warmup} warmup steps "
        f"({'CUDA events' if device.type == 'cuda' else 'time.perf_counter'})",
        f"- target: {CUDA_TARGETS if device.type == 'cuda' else CPU_TARGET}",
        "",
    ]
    lines.insert(-1, f"- copy bandwidth: {copy_bandwidth(device):.1f} GB/s (`dst.copy_(src)`, 2 x 512 MiB, "
                     "read + write counted, not the write-allocate reads)")
    for line in lines:
        print(line, flush=True)
    rows, paging = [], []
    h2d = h2d_bandwidth(device) if device.type == "cuda" else None
    for count in args.params:
        n = parse_count(count)
        params = make_params(n, dtype, device)
        times = {}
        for label, factory, sbytes in candidates(device):
            opt = factory(params)
            t = time_steps(opt, device, args.reps, args.warmup)
            times[label] = t
            del opt
            gc.collect()
            gbs = pass_bytes(n, dtype, sbytes) / t / 1e9
            base = times["torch AdamW(foreach=True)"]
            rows.append([count, label, f"{t * 1e3:.1f}", f"{gbs:.1f}", f"{base / t:.2f}x"])
            print(f"  {count} {label}: {t * 1e3:.1f} ms ({gbs:.1f} GB/s)", flush=True)
        ours = times["ours AdamW (fp32 state)"]
        if device.type == "cpu":
            ok = ours <= times["torch AdamW(foreach=True)"]
            rows.append([count, "target: ours AdamW <= foreach", "", "", "yes" if ok else "NO"])
        else:
            fused = times.get("torch AdamW(fused=True)")
            resident = times["ours PagedAdamW (resident)"]
            ok = fused is not None and resident <= 1.05 * fused
            rows.append([count, "target: PagedAdamW within 5% of fused", "", "",
                         "-" if fused is None else ("yes" if ok else "NO")])
            paging.append(paging_row(count, params, device, args.reps, args.warmup, h2d))
        del params
        gc.collect()
    out = md_table(["params", "optimizer", "ms / step", "GB/s (one pass)", "speed vs foreach"], rows)
    if paging:
        out += ["", f"page_out() (PagedAdamW); host-to-device bandwidth {h2d:.1f} GB/s (pinned copy, this run)", ""]
        out += md_table(["params", "state MiB", "GPU MiB freed", "resident step ms", "extra ms after page_out",
                         "state / bandwidth ms", "extra <= 2x"], paging)
    print("", flush=True)
    for line in out:
        print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines + out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
