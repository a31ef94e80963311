"""Helpers shared by the bench scripts (each script runs as `python bench/X.py`, so this directory is on
sys.path): the machine's CPU name, /proc/self/status fields, markdown tables, the commit measured."""
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def git_commit(short: bool = True, sep: str = " + ") -> str:
    """HEAD of the repository (abbreviated unless short=False), with `sep`"uncommitted changes" appended when
    tracked files differ from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (sep + "uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def md_table(header, rows) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(r) for r in rows]]
