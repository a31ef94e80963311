"""PEP 517 backend: setuptools, compiled against the torch already installed where the package goes.

A torch extension only loads into the torch it was compiled against. pip's isolated build would pull
the newest torch from the index (often a multi-GB CUDA build of another version), so when the target
environment already has torch we put that environment's site-packages behind the build environment
and declare no torch requirement; without torch there, we ask for plain `torch`, which pip then also
installs as the runtime dependency, so both sides match.
"""
import json
import os
import subprocess
import sys

from setuptools import build_meta as _orig

build_sdist = _orig.build_sdist
get_requires_for_build_sdist = _orig.get_requires_for_build_sdist


def _target_torch_path():
    """site-packages of the installing interpreter that holds torch, or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = ("import json, os, importlib.util as u; s = u.find_spec('torch'); "
             "print(json.dumps(os.path.dirname(os.path.dirname(s.origin)) if s else None))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except Exception:
        return None


def _use_target_torch():
    try:
        import torch  # noqa: F401  (already importable: --no-build-isolation, or torch in the build env)
        return True
    except ImportError:
        pass
    path = _target_torch_path()
    if path and path not in sys.path:
        sys.path.append(path)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), path) if p)
        return True
    return False


def get_requires_for_build_wheel(config_settings=None):
    # setup.py declares no setup_requires, so this is the whole list (and setup.py is not run here:
    # it imports torch, which may only become importable through _use_target_torch)
    return ["setuptools>=64", "wheel", "pybind11", "ninja"] + ([] if _use_target_torch() else ["torch"])


def get_requires_for_build_editable(config_settings=None):
    return get_requires_for_build_wheel(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _orig.build_editable(wheel_directory, config_settings, metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()  # every hook runs in a fresh process, and setup.py imports torch
    return _orig.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _orig.prepare_metadata_for_build_editable(metadata_directory, config_settings)
