"""Peak memory of loading a big checkpoint (tools/make_model.py) to 4-bit, each measurement in its own process.

Modes (a fresh process each; memory sampled every 2 ms from /proc/self/status):

  from_pretrained  AutoModelForCausalLM.from_pretrained(DIR, quantization_config=QLoRAConfig(...), dtype=...)
  load_quantized   qlora_ext.load_quantized(DIR, QLoRAConfig(...), dtype=...)
  finetune         qlora_ext.train.load_for_training: what `qlora-ext finetune --model DIR` runs before its
                   first step (4-bit model, prepare_model_for_training, LoRA r=64 on all linear layers)
  fsdp_shards      qlora_ext.distributed.load_sharded on 2 gloo ranks (torchrun): each rank builds the model on
                   the meta device and quantizes only its shard of each weight (float layout only); one row per
                   rank, "model GB" = that rank's shards + the replicated QuantStates
  fsdp_finetune    what `torchrun --nproc-per-node 2 -m qlora_ext finetune --distributed fsdp --model DIR` runs
                   before its first step (qlora_ext.train.model.load_sharded_for_training: meta build,
                   prepare_model_for_training, LoRA r=64 on all linear layers, then each rank quantizes its
                   shards); one row per rank, "model GB" = that rank's shards (adapters included) + QuantStates

The fsdp modes also report the whole model's sizes (4-bit weights + scales; everything, at the global shapes)
to compare each rank's peak against half of them, and the 4-bit bytes each rank quantized (the loader's count).

Reported per run: peak RssAnon (the heap) and peak RSS (VmHWM; also counts pages of the memory-mapped
checkpoint, which the kernel can drop) above the process's baseline after imports, RSS and RssAnon once
loaded, the model's bytes (memory_report: 4-bit weights + scales + float tensors [+ adapters]), the largest
float tensor the loader holds in flight (the largest checkpoint tensor, in the load dtype), and
overhead = peak - model - largest tensor (what should not grow with the model).

    python bench/bench_big_load.py --model /work/bigmodels/llama-7b --model /work/bigmodels/llama-7b-nf4 \\
        --out bench/results/big_load_7b.md
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import PeakMemory, cpu_model, git_commit, md_table, proc_status

GB = 1e9
MODES = ("from_pretrained", "load_quantized", "finetune", "fsdp_shards", "fsdp_finetune")
FSDP_MODES = ("fsdp_shards", "fsdp_finetune")


def _largest_tensor(directory: Path, itemsize: int) -> int:
    """Bytes of the largest tensor of the checkpoint once converted to the load dtype (packed 4-bit entries are
    read as stored)."""
    import json as _json
    import struct
    best = 0
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = _json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            numel = 1
            for d in v["shape"]:
                numel *= d
            size = numel * itemsize if v["dtype"] in ("BF16", "F16", "F32") else numel
            best = max(best, size)
    return best


def child(mode: str, path: str, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import qlora_ext as Q
    from qlora_ext.train.model import load_for_training
    from qlora_ext.train.setup import LoraSettings, ModelSpec, QuantSettings

    dtype = getattr(torch, dtype_name)
    mem = PeakMemory(interval=0.002)
    base_anon, base_hwm = mem.base_anon, mem.base_hwm
    t0 = time.perf_counter()
    cfg = Q.QLoRAConfig(compute_dtype=dtype)
    rank, extra = 0, {}
    if mode in FSDP_MODES:
        from torch.distributed.tensor import DTensor

        from qlora_ext import distributed as D
        from qlora_ext.train.model import load_sharded_for_training
        ctx = D.init("fsdp", "cpu")
        rank = ctx.rank
        if mode == "fsdp_shards":
            cfg = Q.QLoRAConfig(compute_dtype=dtype, quant_storage=dtype)
            runner = D.load_sharded(path, cfg, ctx, dtype=dtype)
        else:
            spec = ModelSpec(path=path, gguf_file=None, name=Path(path).name)
            runner = load_sharded_for_training(spec, QuantSettings(compute_dtype=dtype_name), LoraSettings(
                r=64, alpha=16.0, dropout=0.0, target_modules="all-linear"), ctx)
        model = D.inner(runner)
        params = list(model.parameters())
        local = {id(p): (p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params}
        packed = {id(m.weight) for m in model.modules() if isinstance(m, Q.nn.Linear4bit)}
        scales = sum(t.nbytes for m in model.modules() if isinstance(m, Q.nn.Linear4bit)
                     for t in (m.quant_state.absmax, m.quant_state.nested_absmax) if t is not None)
        adapters = sum(local[id(p)] for p in params if p.requires_grad)
        rep = {"total_bytes": sum(local.values()) + scales, "scale_bytes": scales, "adapter_bytes": adapters,
               "packed_weight_bytes": sum(local[i] for i in packed)}
        extra = {"quantized_bytes": runner.load_report["quantized_bytes"],
                 "whole_four_bit_bytes": runner.load_report["packed_bytes"] + scales,
                 "whole_model_bytes": sum(p.numel() * p.element_size() for p in params) + scales}
    elif mode == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype)
    elif mode == "load_quantized":
        model = Q.load_quantized(path, cfg, dtype=dtype)
    else:
        spec = ModelSpec(path=path, gguf_file=None, name=Path(path).name)
        model = load_for_training(spec, QuantSettings(compute_dtype=dtype_name), LoraSettings(r=64, alpha=16.0,
                                  dropout=0.0, target_modules="all-linear"), torch.device("cpu"), progress=False)
    seconds = time.perf_counter() - t0
    import gc
    gc.collect()
    peak_anon = mem.stop()
    if mode not in FSDP_MODES:
        rep = Q.memory_report(model)
    return {"mode": mode if mode not in FSDP_MODES else f"{mode} rank {rank}/2", "model_dir": path, **extra,
            "peak_anon_total": peak_anon, "peak_rss_total": proc_status("VmHWM"),
            "seconds": round(seconds, 1),
            "peak_anon": peak_anon - base_anon, "peak_rss": proc_status("VmHWM") - base_hwm,
            "after_anon": proc_status("RssAnon") - base_anon, "after_rss": proc_status("VmRSS") - base_hwm,
            "model_bytes": rep["total_bytes"], "four_bit_bytes": rep["packed_weight_bytes"] + rep["scale_bytes"],
            "adapter_bytes": rep["adapter_bytes"],
            "largest_tensor": _largest_tensor(Path(path), torch.finfo(dtype).bits // 8)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="checkpoint directory (repeatable)")
    ap.add_argument("--mode", action="append", choices=MODES, help="default: all; from_pretrained: float only")
    ap.add_argument("--dtype", default="float32", help="load / compute dtype (finetune's on CPU: float32)")
    ap.add_argument("--out", default=None, help="markdown file to write (plus a .json beside it)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0
    if not args.model:
        ap.error("--model is required")
    rows, results = [], []
    for d in args.model:
        prequant = "quantization_config" in json.loads((Path(d) / "config.json").read_text())
        for mode in args.mode or MODES:
            if mode == "from_pretrained" and prequant:
                continue  # a 4-bit checkpoint names its own quantizer
            if mode in FSDP_MODES and prequant:
                continue  # load_sharded reads float checkpoints
            cmd = [sys.executable, __file__, "--child", mode, d, args.dtype]
            if mode in FSDP_MODES:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                       "127.0.0.1", "--master-port", "29533", *cmd[1:]]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode != 0 or not lines:
                print(res.stderr[-3000:], file=sys.stderr)
                results.append({"mode": mode, "model_dir": d, "error": res.stderr.strip().splitlines()[-1:]})
                continue
            for line in lines:
                _row(json.loads(line[7:]), prequant, d, rows, results)
    _finish(args, rows, results)
    return 0


def _row(r, prequant, d, rows, results):
    r["layout"] = "nf4 (bitsandbytes)" if prequant else "bfloat16"
    results.append(r)
    over = max(r["peak_anon"], r["peak_rss"]) - r["model_bytes"] - r["largest_tensor"]
    rows.append([Path(d).name, r["layout"], r["mode"], f"{r['four_bit_bytes'] / GB:.2f}",
                 f"{r['model_bytes'] / GB:.2f}", f"{r['largest_tensor'] / GB:.3f}",
                 f"{r['peak_anon'] / GB:.2f}", f"{r['peak_rss'] / GB:.2f}", f"{r['after_rss'] / GB:.2f}",
                 f"{over / GB:.2f}", f"{r['seconds']:.0f}"])
    print(" | ".join(rows[-1]), flush=True)


def _fsdp_table(fsdp) -> list:
    """Each rank's peak against the whole model and half of it (the fsdp modes)."""
    if not fsdp:
        return []
    header = ["mode", "whole 4-bit weights+scales GB", "half GB", "whole model GB", "half GB",
              "this rank's model GB", "4-bit codes quantized GB", "peak RssAnon GB", "peak RSS GB",
              "peak RssAnon / whole model", "process peak RssAnon GB", "process peak RSS GB"]
    rows = [[r["mode"], f"{r['whole_four_bit_bytes'] / GB:.2f}", f"{r['whole_four_bit_bytes'] / 2 / GB:.2f}",
             f"{r['whole_model_bytes'] / GB:.2f}", f"{r['whole_model_bytes'] / 2 / GB:.2f}",
             f"{r['model_bytes'] / GB:.2f}", f"{r['quantized_bytes'] / GB:.2f}", f"{r['peak_anon'] / GB:.2f}",
             f"{r['peak_rss'] / GB:.2f}", f"{r['peak_anon'] / r['whole_model_bytes']:.2f}",
             f"{r['peak_anon_total'] / GB:.2f}", f"{r['peak_rss_total'] / GB:.2f}"] for r in fsdp]
    return ["Per rank, against the whole model (peaks above the process's baseline after imports, as above; "
            "process peaks: the whole process, runtime included):", "", *md_table(header, rows)]


def _finish(args, rows, results):
    header = ["model", "layout", "mode", "4-bit weights+scales GB", "model GB", "largest tensor GB",
              "peak RssAnon GB", "peak RSS GB", "RSS after GB", "overhead GB", "s"]
    load = os.getloadavg()
    meta = [f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB; "
            f"{platform.platform()}",
            f"- shared with other jobs (load average {load[0]:.1f} at the end): times are under load",
            f"- commit: {git_commit()}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- command: `python bench/bench_big_load.py {' '.join(sys.argv[1:])}`",
            f"- dtype {args.dtype}; overhead = max(peak RssAnon, peak RSS) - model - largest tensor; GB = 1e9 bytes"]
    fsdp = [r for r in results if "whole_model_bytes" in r]
    if fsdp:
        meta.append(f"- environment: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                    f"niceness {os.nice(0)}; the fsdp rows are 2 gloo ranks on this machine at once")
    text = "\n".join(["# Loading big checkpoints to 4-bit: peak memory", "", *meta, "",
                      *md_table(header, rows), "", *_fsdp_table(fsdp), ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
