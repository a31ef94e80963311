"""Held-out evaluation during a run: before training, every `--eval-steps` steps and after training, each
written to metrics.jsonl and logged in one line; the best (lowest) held-out loss of the trained model and its step are tracked."""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import torch

from ..data import Example
from ..lm import evaluate
from .reporting import log


class Evaluator:
    """evaluator(tag, step) -> the evaluation record (an empty dict on ranks > 0 of a DDP run).

    `run(fn, *args)` calls fn(model, *args) through the distributed wrapper (FSDP2 gathers layers in its
    forward); under DDP rank 0 evaluates the replicated model alone."""

    def __init__(self, model, run: Callable, tokenizer, examples: Sequence[Example], device, cfg, metrics,
                 main: bool = True, best: Optional[Dict] = None):
        self.model, self.run, self.tokenizer, self.examples = model, run, tokenizer, examples
        self.device, self.cfg, self.metrics, self.main = device, cfg, metrics, main
        self.best = best      # {"step", "loss"} of the lowest held-out loss so far (kept in checkpoints)

    def __call__(self, tag: str, step: int) -> Dict:
        cfg = self.cfg
        if tag != "step":
            log(f"evaluating ({tag}) on {len(self.examples)} held-out examples ...")
        t = time.time()
        args = (self.tokenizer, self.examples, self.device, cfg.source_max_len, cfg.target_max_len,
                cfg.eval_batch_size)
        if cfg.distributed == "ddp":
            # replicated model: rank 0 evaluates alone (the others wait in the next step's all-reduce)
            r = evaluate(self.model, *args) if self.main else {}
        elif cfg.distributed:
            with torch.no_grad():  # FSDP2: every rank runs the same passes, gathering the layers it needs
                r = self.run(evaluate, *args)
        else:
            r = evaluate(self.model, *args)
        if not self.main:
            return r
        r.update(eval=tag, step=step, seconds=time.time() - t)
        self.metrics.write({k: v for k, v in r.items() if k != "samples"} if tag == "step" else r)
        if tag != "before" and (self.best is None or r["loss"] < self.best["loss"]):
            self.best = {"step": step, "loss": r["loss"]}
        em = "n/a" if r.get("exact_match") is None else f"{100 * r['exact_match']:.1f}%"
        msg = (f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, exact match {em} "
               f"({r['seconds']:.0f} s)")
        if tag == "step":
            log(f"  held-out at step {step}: {msg}")
        else:
            log(f"  {tag}: {msg}")
        return r
