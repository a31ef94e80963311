"""OpenMP wait policy (issue 20): qlora_ext sets OMP_WAIT_POLICY=PASSIVE when it is imported before torch (so
libgomp, which reads it once as torch loads it, sleeps instead of spinning at barriers), keeps a value the user
set, and prepare_model_for_training warns once on CPU when it came too late. Each case runs in a fresh
interpreter; libgomp's own report (OMP_DISPLAY_ENV=VERBOSE) says which spin count it took."""
import os
import subprocess
import sys
import tempfile

import pytest


def _run(code, policy=None):
    # cwd outside the repository: `python -c` puts the cwd first on sys.path, and the source tree there has no
    # compiled _C in a non-editable install (CI's), so the child must import the installed package
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


def _spin_count(stderr):
    lines = [ln for ln in stderr.splitlines() if "GOMP_SPINCOUNT" in ln]
    assert len(lines) == 1, f"libgomp did not report its settings:\n{stderr[-2000:]}"
    return int(lines[0].split("=")[1].strip().strip("'"))


@pytest.mark.parametrize("entry", ["import qlora_ext", "from qlora_ext.cli import main"])
def test_import_before_torch_makes_openmp_passive(entry):
    # the library and the CLI's console script (which imports qlora_ext.cli) alike
    out, err = _run(entry + "\nimport os, torch\ntorch.ones(1)\nprint(os.environ['OMP_WAIT_POLICY'])")
    assert out.strip() == "PASSIVE"
    assert _spin_count(err) == 0


def test_user_policy_is_kept():
    out, err = _run("import qlora_ext, os, torch\nprint(os.environ['OMP_WAIT_POLICY'])", policy="ACTIVE")
    assert out.strip() == "ACTIVE"
    assert _spin_count(err) > 300000


_PREPARE = """
import torch
import qlora_ext
m = torch.nn.Sequential(qlora_ext.LoraLinear4bit.from_linear4bit(qlora_ext.Linear4bit.from_linear(torch.nn.Linear(64, 64)), r=4))
qlora_ext.prepare_model_for_training(m, gradient_checkpointing=False)
qlora_ext.prepare_model_for_training(m, gradient_checkpointing=False)
"""


def test_prepare_warns_once_when_torch_came_first_with_the_default_policy():
    _, err = _run(_PREPARE)
    assert _spin_count(err) == 300000    # libgomp's spinning default: too late to change
    assert err.count("RuntimeWarning") == 1 and "OMP_WAIT_POLICY=PASSIVE" in err


def test_prepare_is_silent_when_the_policy_is_set():
    _, err = _run(_PREPARE, policy="PASSIVE")
    assert _spin_count(err) == 0
    assert "RuntimeWarning" not in err
