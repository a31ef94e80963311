"""What a run tells the user: one-line log messages, the progress bar, OUTPUT/metrics.jsonl (plus TensorBoard
event files with `--report-to tensorboard`), the loss-curve PNG, memory figures and the final summary."""
from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
from typing import Dict, List, Optional

import torch

_LOG = {"enabled": True}  # off on ranks > 0 of a distributed run: rank 0 alone reports


def log(msg: str):
    if _LOG["enabled"]:
        print(msg, file=sys.stderr, flush=True)


def set_logging(enabled: bool):
    _LOG["enabled"] = enabled


def memory_bytes(device: torch.device) -> Dict[str, int]:
    """Current and peak memory of this process: GPU allocator bytes on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"current": current, "peak": max(peak, current)}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _write_text_atomic(path: pathlib.Path, text: str):
    from ..checkpoint import write_text_atomic
    write_text_atomic(path, text)


class MetricsLog:
    """OUTPUT/metrics.jsonl: one JSON object per logged step or evaluation, flushed as it is written; with
    `tensorboard` the same scalars also go to TensorBoard event files in OUTPUT/tensorboard."""

    def __init__(self, path: pathlib.Path, keep_until_step: Optional[int] = None, tensorboard: bool = False):
        self.path = path
        if keep_until_step is not None and path.exists():
            # resuming: drop what was logged after the checkpoint (those steps are about to be redone), and a
            # line torn by a crash mid-write
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= keep_until_step and rec.get("eval") != "after":
                    keep.append(ln)
            _write_text_atomic(path, "".join(k + "\n" for k in keep))
        self.f = open(path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events past the checkpoint from an interrupted attempt are dropped on resume
            self.tb = SummaryWriter(str(path.parent / "tensorboard"),
                                    purge_step=(keep_until_step + 1) if keep_until_step else None)

    def write(self, rec: Dict):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            prefix = f"eval_{rec['eval']}/" if "eval" in rec else "train/"
            for k, v in rec.items():
                if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(prefix + k, v, rec.get("step", 0))
            self.tb.flush()

    def close(self):
        self.f.close()
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def read(path) -> List[Dict]:
        return [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(records: List[Dict], path: pathlib.Path) -> bool:
    """loss_curve.png: training loss per optimizer step, held-out loss during training as a line, before /
    after as markers. Returns False, saying so in one line, when matplotlib is not installed: the plot is the
    one output of a run that can be redrawn later from metrics.jsonl, so a finished run does not fail over it."""
    try:
        import matplotlib
    except ImportError:
        log(f"{path.name} not written: matplotlib is not installed (pip install matplotlib; "
            f"metrics.jsonl has the same figures)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in records if "loss" in r and "eval" not in r]
    losses = [r["loss"] for r in records if "loss" in r and "eval" not in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1.2, label="train loss")
    during = [r for r in records if r.get("eval") == "step"]
    if during:
        ax.plot([r["step"] for r in during], [r["loss"] for r in during], lw=1.2, marker=".",
                label="held-out loss (--eval-steps)")
    for r in records:
        if r.get("eval") in ("before", "after"):
            ax.scatter([r["step"]], [r["loss"]], zorder=3, marker="o" if r["eval"] == "before" else "s",
                       label=f"held-out loss {r['eval']} ({r['loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5)


def format_summary(s: Dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    lines = []
    if s["eval_loss_after"] is None:  # --no-eval-after
        if s["exact_match_before"] is not None:
            lines.append(f"exact match before training {pct(s['exact_match_before'])} on {s['eval_examples']} "
                         f"held-out examples; eval loss {s['eval_loss_before']:.3f}; no evaluation after")
    elif s["exact_match_before"] is not None:
        delta = 100 * ((s["exact_match_after"] or 0) - s["exact_match_before"])
        lines.append(f"exact match {pct(s['exact_match_before'])} -> {pct(s['exact_match_after'])} "
                     f"({delta:+.1f} points) on {s['eval_examples']} held-out examples; eval loss "
                     f"{s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}")
    else:
        lines.append(f"exact match {pct(s['exact_match_after'])} on {s['eval_examples']} held-out examples; "
                     f"eval loss {s['eval_loss_after']:.3f}")
    if s.get("best_step") is not None:
        lines.append(f"best held-out loss {s['best_eval_loss']:.3f} at step {s['best_step']}")
    lines.append(f"{s['steps']} steps, training {s['train_seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s), "
                 f"total {s['total_seconds']:.0f} s, peak memory {fmt_bytes(s['peak_memory'])}")
    lines.append(f"adapter: {s['adapter']}   metrics: {s['metrics']}   loss curve: {s['loss_curve'] or 'not plotted'}")
    return "\n".join(lines)
