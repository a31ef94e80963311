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


class PeakMemory:
    """This process's memory peaks from now on: VmHWM is reset to the current RSS (/proc/self/clear_refs), and a
    thread samples RssAnon every `interval` s (the kernel keeps no high-water mark for it). `stop()` ends the
    sampling; `base_anon` / `base_hwm` are the values at the start, `peak_anon` the highest RssAnon seen."""

    def __init__(self, interval: float):
        import threading
        import time
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS
            f.write("5")
        self.base_anon, self.base_hwm = proc_status("RssAnon"), proc_status("VmHWM")
        self.peak_anon = self.base_anon
        self._done = threading.Event()

        def sample():
            while not self._done.is_set():
                self.peak_anon = max(self.peak_anon, proc_status("RssAnon"))
                time.sleep(interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, proc_status("RssAnon"))
        return self.peak_anon


def md_table(header, rows) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(r) for r in rows]]
