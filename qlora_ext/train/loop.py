"""The training loop: `finetune(cfg)` sets a run up (qlora_ext.train.setup / data / model), trains with
token-weighted gradient accumulation, clipping and checkpoints that resume to the same loss sequence,
evaluates (qlora_ext.train.evaluation) and reports (qlora_ext.train.reporting)."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from typing import Dict, Optional

import torch

from .. import checkpoint as ckpt_io
from ..data import IGNORE_INDEX, pad_id
from ..lm import token_loss
from . import data as run_data
from . import model as run_model
from .evaluation import Evaluator
from .reporting import MetricsLog, fmt_bytes, log, memory_bytes, plot_losses, progress_bar, set_logging
from .setup import (RUN_CONFIG, FinetuneConfig, SetupError, resolve_device, resolve_model, resolve_output,
                    total_steps, validate)


class _Interrupt:
    """SIGINT during training: the first sets a flag (the loop checkpoints at the end of the current step and
    exits), a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nqlora-ext: interrupt received, saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


class Interrupted(Exception):
    """Training stopped on SIGINT after saving a checkpoint."""

    def __init__(self, step: int, path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


def finetune(cfg: FinetuneConfig, resume=None, overwrite: bool = False) -> Optional[Dict]:
    """Run (or resume) a fine-tuning job; returns the summary also written to OUTPUT/summary.json (None on the
    ranks > 0 of a distributed run). Raises Interrupted after checkpointing on SIGINT.

    With cfg.distributed ("ddp" / "fsdp", under torchrun) every rank runs this: batch_size is the global
    micro-batch, split over the ranks (qlora_ext.distributed.rank_share), and the loss is weighted by the whole
    global batch's target tokens, so the update is the single-process one; rank 0 alone logs and writes."""
    validate(cfg)
    if not cfg.distributed:
        return _finetune(cfg, resume, overwrite, None)
    from .. import distributed
    ctx = distributed.init(cfg.distributed, cfg.device)
    set_logging(ctx.is_main)
    try:
        summary = _finetune(cfg, resume, overwrite, ctx)
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    finally:
        set_logging(True)
    distributed.shutdown()
    return summary


def _sharded_load_report(local: Dict, ctx) -> Dict:
    """load_sharded's report with every rank's quantized bytes (rank order). Collective."""
    import torch.distributed as dist
    t = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.device)
    t[ctx.rank] = local["quantized_bytes"]
    dist.all_reduce(t)
    return {"path": "sharded (each rank quantized its own shards)",
            "quantized_bytes": [int(v) for v in t.tolist()], "packed_bytes": int(local["packed_bytes"])}


def _finetune(cfg: FinetuneConfig, resume, overwrite, ctx) -> Optional[Dict]:
    t_start = time.time()
    main = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world_size
    device = resolve_device(cfg.device) if ctx is None else ctx.device
    spec = resolve_model(cfg.model)
    train_ex, eval_ex = run_data.prepare_data(cfg)
    out, resume_from = resolve_output(cfg, resume, overwrite)
    if ctx is not None:
        import torch.distributed as dist
        from .. import distributed
        barrier = dist.barrier
        barrier()  # every rank has checked the output dir before rank 0 writes into it
    tokenizer = run_model.load_tokenizer(spec)
    rows = run_data.training_rows(cfg, train_ex, tokenizer)
    pad = pad_id(tokenizer)
    plan = run_data.batch_plan(cfg, rows)
    n_steps = total_steps(cfg, len(plan))
    warmup = math.ceil(cfg.warmup_ratio * n_steps)

    if device.type == "cpu":
        from .._io import cpu_block_cache
        cpu_block_cache(cfg.cpu_block_cache_mib << 20)  # before loading: its temporaries are reused too
    torch.manual_seed(cfg.seed)
    t_load = time.time()
    wrapped, load_report = None, None
    if cfg.distributed == "fsdp" and run_model.loads_into_shards(spec):
        # a float checkpoint: built on meta, sharded, each rank quantizing only its own shard of each weight
        wrapped = run_model.load_sharded_for_training(spec, cfg.quant, cfg.lora, ctx, cfg.gradient_checkpointing,
                                                      resume_from, progress=cfg.progress and main)
        model = distributed.inner(wrapped)
        load_report = _sharded_load_report(wrapped.load_report, ctx)
    else:
        # FSDP2 gathers a decoder layer's parameters in one float32 buffer: the packed bytes are viewed as float32
        storage = torch.float32 if cfg.distributed == "fsdp" else torch.uint8
        model = run_model.load_for_training(spec, cfg.quant, cfg.lora, device, cfg.gradient_checkpointing,
                                            resume_from, storage, progress=cfg.progress and main)
        if cfg.distributed == "fsdp":  # GGUF or already-quantized: whole 4-bit model on every rank, then sharded
            load_report = {"path": "whole model per rank"}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not n_trainable:
        raise SetupError("no trainable parameters after add_lora (do --target-modules match any layer?)")
    # the run directory is written only once the model loaded: a failed start leaves nothing to resume
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                record = dict(cfg.to_dict(), resolved_model=spec.label, base_model=spec.portable_name)
                ckpt_io.write_text_atomic(out / RUN_CONFIG, json.dumps(record, indent=1))
        except OSError as exc:
            raise SetupError(f"--output-dir {out}: cannot write there ({exc.strerror or exc})") from None
    where = str(device) if ctx is None else f"{world} x {device.type} ({cfg.distributed})"
    log(f"qlora-ext finetune: {spec.label} on {where}, {len(train_ex)} train / {len(eval_ex)} eval examples"
        f"{f' packed into {len(rows)} rows' if cfg.packing else ''}, {n_steps} steps of {cfg.batch_size} x "
        f"{cfg.grad_accum} sequences -> {out}")
    if device.type == "cpu":
        log(f"CPU block cache: up to {cfg.cpu_block_cache_mib} MiB of freed tensors kept for reuse"
            if cfg.cpu_block_cache_mib else "CPU block cache: off")

    if load_report is not None:
        log(f"loaded for FSDP2: {load_report['path']}" + (
            f" (4-bit codes quantized per rank: {', '.join(fmt_bytes(b) for b in load_report['quantized_bytes'])} "
            f"of the model's {fmt_bytes(load_report['packed_bytes'])})" if "packed_bytes" in load_report else ""))
    if ctx is None:
        def run(fn, *args):
            return fn(model, *args)
    else:
        if wrapped is None:
            wrapped = distributed.wrap(model, ctx)

        def run(fn, *args):
            return distributed.run(wrapped, fn, *args)
    # after wrapping: FSDP2 replaced the parameters by sharded DTensors
    params = [p for p in (wrapped or model).parameters() if p.requires_grad]
    optimizer = run_model.build_optimizer(cfg.optim, params, cfg.lr, cfg.weight_decay)
    scheduler = run_model.build_scheduler(cfg.lr_scheduler_type, optimizer, warmup, n_steps)
    log(f"model ready in {time.time() - t_load:.1f} s: {n_trainable / 1e6:.2f}M trainable parameters, "
        f"memory {fmt_bytes(memory_bytes(device)['current'])}")

    state = {"step": 0, "tokens": 0, "train_time": 0.0, "eval_before": None, "best": None,
             "config_hash": cfg.config_hash()}
    if resume_from is not None:
        if ctx is None:
            state.update(ckpt_io.load(resume_from, optimizer, scheduler))
        else:
            state.update(ckpt_io.load(resume_from, optimizer, scheduler, rank=ctx.rank,
                                      load_optimizer=lambda d: distributed.load_state(d, wrapped, optimizer)))
        log(f"resumed from {resume_from} at step {state['step']}")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=state["step"] if resume_from else None,
                         tensorboard=cfg.report_to == "tensorboard") if main else None
    _save_adapter = run_model.api("save_adapter")

    def save_adapter(directory):
        if ctx is None:
            return _save_adapter(model, str(directory))
        with distributed.gathered(wrapped):  # collective: whole adapter weights on every rank
            if main:
                _save_adapter(model, str(directory))

    evaluator = Evaluator(model, run, tokenizer, eval_ex, device, cfg, metrics, main, state["best"])
    if cfg.eval_before and state["eval_before"] is None:
        state["eval_before"] = {k: v for k, v in evaluator("before", 0).items() if k != "samples"}

    def checkpoint():
        state["best"] = evaluator.best
        extra = {} if ctx is None else dict(
            rank=ctx.rank, barrier=barrier, save_optimizer=lambda d: distributed.save_state(d, wrapped, optimizer))
        return ckpt_io.save(out / "checkpoints", state["step"], save_adapter, optimizer, scheduler,
                            {k: v for k, v in state.items() if k != "step"}, keep=cfg.save_total_limit, **extra)

    model.train()
    bar = progress_bar(cfg.progress and main, n_steps, state["step"])
    step_tokens_t0 = time.time()
    last_eval = ""
    try:
        with _Interrupt() as intr:
            while state["step"] < n_steps:
                t0 = time.time()
                first = state["step"] * cfg.grad_accum
                window = [run_data.batch_at(plan, m) for m in range(first, first + cfg.grad_accum)]
                batches = [run_data.collate_rows([rows[i] for i in idx], pad) for idx in window]
                n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
                loss_sum = 0.0
                for idx, b in zip(window, batches):
                    weight = 1.0
                    if ctx is not None:  # this rank's share of the global micro-batch
                        mine = distributed.rank_share(idx, ctx.rank, world)
                        # a rank left without a sequence (a short last batch) still joins the collectives
                        mine, weight = (mine, 1.0) if mine else (idx[:1], 0.0)
                        b = run_data.collate_rows([rows[i] for i in mine], pad)
                    b = {k: v.to(device) for k, v in b.items()}
                    s, _ = run(token_loss, b)
                    # token-weighted over the whole accumulation window (and the whole global batch) as if it
                    # were one batch; DDP and FSDP2 average gradients over the ranks, hence the world factor
                    (s * (weight * world / max(n_target, 1))).backward()
                    loss_sum += weight * float(s.detach())
                if ctx is not None:
                    loss_sum = distributed.all_reduce_sum(loss_sum, device)
                clip = torch.nn.utils.clip_grad_norm_ if ctx is None else distributed.clip_grad_norm
                grad_norm = float(clip(params, cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else float("nan")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                dt = time.time() - t0
                state["tokens"] += tokens
                state["train_time"] += dt
                loss = loss_sum / max(n_target, 1)
                mem = memory_bytes(device)
                if main and (step % cfg.logging_steps == 0 or step == n_steps):
                    metrics.write({"step": step, "epoch": first / len(plan), "loss": loss, "lr": lr,
                                   "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt,
                                   "memory": mem["current"], "time": round(time.time() - t_start, 3)})
                if cfg.eval_steps and step % cfg.eval_steps == 0 and step < n_steps:
                    r = evaluator("step", step)
                    model.train()
                    if main:
                        last_eval = f" eval {r['loss']:.4f}"
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss:.4f}{last_eval} lr {lr:.2e} {tokens / dt:.0f} tok/s "
                                        f"mem {fmt_bytes(mem['current'])}", refresh=False)
                    bar.update(1)
                requested = intr.requested if ctx is None else distributed.any_rank(intr.requested, device)
                if requested:
                    path = checkpoint()
                    raise Interrupted(step, path)
                if step % cfg.save_steps == 0 and step < n_steps:
                    checkpoint()
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.time() - step_tokens_t0

    checkpoint()
    after = evaluator("after", state["step"]) if cfg.eval_after else {}
    adapter_dir = out / "adapter"
    save_adapter(adapter_dir)
    if not main:
        return None
    tokenizer.save_pretrained(str(adapter_dir))  # so `generate --adapter` finds the chat template too
    metrics.close()
    records = MetricsLog.read(out / "metrics.jsonl")
    plotted = plot_losses(records, out / "loss_curve.png")
    before = state["eval_before"] or {}
    best = evaluator.best or {}
    summary = {
        "model": spec.label, "base_model": spec.portable_name, "device": str(device),
        "distributed": cfg.distributed, "world_size": world,
        "steps": state["step"], "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "trainable_params": n_trainable,
        "exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
        "eval_loss_before": before.get("loss"), "eval_loss_after": after.get("loss"),
        "per_task_before": before.get("per_task"), "per_task_after": after.get("per_task"),
        "best_step": best.get("step"), "best_eval_loss": best.get("loss"),
        "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
        "tokens_per_s": state["tokens"] / max(state["train_time"], 1e-9),
        "peak_memory": memory_bytes(device)["peak"],
        "adapter": str(adapter_dir), "metrics": str(out / "metrics.jsonl"),
        "loss_curve": str(out / "loss_curve.png") if plotted else None, "output_dir": str(out),
    }
    if load_report is not None:
        summary["fsdp_load"] = load_report
    ckpt_io.write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary
