"""Peak memory while loading a float checkpoint straight to 4-bit, beside loading it in float.

Builds a random Llama checkpoint (float32 safetensors, bigger than the tiny fixture; size set by the flags),
then loads it in fresh processes and samples the process memory every millisecond:

  float       AutoModelForCausalLM.from_pretrained(path)                       (the reference)
  nf4         load_quantized(path, QLoRAConfig())  (= from_pretrained with quantization_config=QLoRAConfig())
  nf4-ckpt    load_quantized of the same model saved by save_quantized (bitsandbytes layout)

Reported per mode: the peak increase of anonymous memory (RssAnon: the heap, what loading really allocates),
the peak increase of total RSS (VmHWM, which also counts pages of the memory-mapped checkpoint file the
kernel can drop at will), the final model's bytes (memory_report), and the largest single float tensor of the
checkpoint, since "the 4-bit model plus one layer" is the target for the nf4 modes.
tracemalloc is not used: torch's CPU allocator bypasses Python's, so tracemalloc does not see tensors.

    python bench/bench_load.py                      # ~150M parameters (600 MB float32), prints a table
    python bench/bench_load.py --dtype bfloat16     # load to bfloat16: every float tensor is converted
    python bench/bench_load.py --layers 2 --hidden 512 --intermediate 1408 --vocab 8000   # quick
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import PeakMemory, proc_status

MiB = 1 << 20




def _measure(mode: str, path: str, qpath: str, dtype: str) -> dict:
    """Runs in a fresh process: one load, sampled."""
    import torch  # (imports are not part of the measurement)
    from transformers import AutoModelForCausalLM

    import qlora_ext as Q

    mem = PeakMemory(interval=0.001)
    base_anon, base_hwm = mem.base_anon, mem.base_hwm
    kw = dict(dtype=getattr(torch, dtype))
    t0 = time.perf_counter()
    if mode == "float":
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    elif mode == "nf4":
        model = Q.load_quantized(path, Q.QLoRAConfig(), **kw)
    else:
        model = Q.load_quantized(qpath, **kw)
    seconds = time.perf_counter() - t0
    peak_anon = mem.stop()
    peak_rss = proc_status("VmHWM") - base_hwm
    rep = Q.memory_report(model)
    final = rep["total_bytes"] if rep["quantized_weight_count"] else \
        sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    return {"mode": mode, "peak_anon": peak_anon - base_anon, "peak_rss": peak_rss,
            "final": final, "quantized": rep["packed_weight_bytes"] + rep["scale_bytes"], "seconds": seconds}


def _build(path: str, args) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    import qlora_ext as Q

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                      vocab_size=args.vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    Q.quantize_model(model, Q.QLoRAConfig())
    Q.save_quantized(model, path + "-nf4")
    largest = largest_linear = 0
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = 4
            for s in f.get_slice(k).get_shape():
                n *= s
            largest = max(largest, n)
            if k.endswith("proj.weight"):
                largest_linear = max(largest_linear, n)
    return {"params": sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()),
            "file": os.path.getsize(os.path.join(path, "model.safetensors")), "largest": largest,
            "largest_linear": largest_linear}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype= passed to from_pretrained (bfloat16 forces copies of every float tensor)")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_measure(*args._child)))
        return
    if args._build:
        print(json.dumps(_build(args._build, args)))
        return

    flags = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
             "--vocab", str(args.vocab)]
    env = dict(os.environ, HF_DEACTIVATE_ASYNC_LOAD="1", TRANSFORMERS_VERBOSITY="error")
    # glibc raises its mmap threshold each time a large block is freed, after which freed layer-sized buffers
    # stay in the heap and count as anonymous memory; a fixed threshold shows the live memory instead.
    fixed = dict(env, MALLOC_MMAP_THRESHOLD_=str(256 << 10))

    def run(*a, environ=env):
        out = subprocess.run([sys.executable, __file__, *flags, *a], check=True, env=environ, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "float")
        info = run("--_build", path)
        rows = []
        for mode in ("float", "nf4", "nf4-ckpt"):
            for label, environ in (("glibc default", env), ("MALLOC_MMAP_THRESHOLD_=256K", fixed)):
                rows.append({**run("--_child", mode, path, path + "-nf4", args.dtype, environ=environ),
                             "malloc": label})

    lines = [
        "# Peak memory while loading (bench/bench_load.py)",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}; shared machine (other jobs running), memory figures are unaffected by load",
        f"- command: `python bench/bench_load.py {' '.join(flags)} --dtype {args.dtype}`",
        f"- checkpoint: random Llama, {info['params'] / 1e6:.1f}M parameters, float32 safetensors of "
        f"{info['file'] / MiB:.1f} MiB; largest tensor {info['largest'] / MiB:.1f} MiB",
        "",
        "| mode | malloc | peak anonymous increase (MiB) | peak RSS increase incl. mapped file pages (MiB) "
        "| final model (MiB) | load time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['malloc']} | {r['peak_anon'] / MiB:.1f} | {r['peak_rss'] / MiB:.1f} "
                     f"| {r['final'] / MiB:.1f} | {r['seconds']:.2f} |")
    lines += ["", "Anonymous memory is what loading allocates. Float tensors loaded without a dtype change stay views "
              "of the memory-mapped checkpoint (file pages, paged in when first read, droppable by the kernel): "
              "with float32 the float model's anonymous figure is only the loader's own overhead and its weights "
              "appear as they are used. With a dtype change every tensor is a real copy. The nf4 mode reads every "
              "linear weight once (hence the mapped pages in its RSS) and keeps only its 4-bit form. glibc raises "
              "its mmap threshold whenever a large block is freed, after which freed layer-sized buffers stay in "
              "the heap: the fixed-threshold rows show the live memory."]
    live = {r["mode"]: r for r in rows if r["malloc"] != "glibc default"}
    if args.dtype == "float32":
        # nothing is converted: the float model's anonymous peak is the loader's own overhead, and the nf4
        # model's anonymous part is its 4-bit layers (its float embeddings stay mapped)
        overhead = live["float"]["peak_anon"]
        extra = live["nf4"]["peak_anon"] - overhead - live["nf4"]["quantized"]
        lines += ["", f"nf4 live peak {live['nf4']['peak_anon'] / MiB:.1f} MiB = transformers' own loading overhead "
                  f"{overhead / MiB:.1f} MiB (the float row) + the 4-bit layers {live['nf4']['quantized'] / MiB:.1f} "
                  f"MiB + {extra / MiB:.1f} MiB in flight, against {info['largest_linear'] / MiB:.1f} MiB for the "
                  f"largest float32 linear weight: peak = final 4-bit model + about one layer "
                  f"({'met' if extra <= info['largest_linear'] else 'NOT met'})."]
    else:
        # everything is a copy: peak - final is the loader's overhead plus what is in flight
        overhead = live["float"]["peak_anon"] - live["float"]["final"]
        extra = live["nf4"]["peak_anon"] - live["nf4"]["final"] - overhead
        in_flight = info["largest"] * (1 + 2 / 4)  # one float32 tensor read and its 16-bit copy
        lines += ["", f"Peak (live) minus final model: float {overhead / MiB:.1f} MiB (transformers' own loading "
                  f"overhead), nf4 {(extra + overhead) / MiB:.1f} MiB. Beyond that overhead, loading to 4-bit holds "
                  f"{extra / MiB:.1f} MiB more than the final 4-bit model, against {in_flight / MiB:.1f} MiB for "
                  f"the largest float32 tensor read plus its {args.dtype} copy: peak = final 4-bit model + about one "
                  f"layer ({'met' if extra <= in_flight else 'NOT met'}), while the float load peaks at the whole "
                  f"{args.dtype} model ({live['float']['final'] / MiB:.1f} MiB)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
