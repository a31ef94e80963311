"""Training checkpoints that resume exactly: optimizer and scheduler state, RNG states and the trainer's
position, in safetensors + JSON only (never pickle: a checkpoint is untrusted input), written to a temporary
directory and renamed into place so a crash mid-save never replaces a good checkpoint with half of one.

Layout of OUTPUT/checkpoints/checkpoint-120/ (transformers' name, so its get_last_checkpoint finds it):
  adapter_model.safetensors, adapter_config.json   the adapter, in PEFT format (written by the caller)
  optimizer.safetensors + optimizer.json            per-parameter state tensors / param groups and scalars
  rng.safetensors + rng.json                        torch CPU/CUDA generator states / Python, NumPy states
  trainer_state.json                                step, data position, scheduler state, logged figures,
                                                    the hash of the run's trajectory settings
OUTPUT/checkpoints/latest names the newest complete one; resuming does not depend on it: `newest_usable`
verifies the checkpoints from the newest down (every file present and readable, config hash matching), so a
kill between publishing a checkpoint and writing `latest` loses nothing. Runs of earlier versions named their
checkpoints step-NNNNNN; those are still found.

Distributed runs (qlora_ext.distributed) write the same directory together: rank 0 the adapter (gathered),
trainer_state.json and rng.*, rank r > 0 its rng.rank<r>.*, and every rank its shards of the adapter and
optimizer state under optimizer/ (a torch.distributed.checkpoint directory, in place of optimizer.*; its
.metadata file is torch's pickle, so resume only from checkpoints you wrote).
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
_NAME = re.compile(r"^(?:checkpoint-(\d+)|step-(\d+))$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the current run."""


def _fsync_dir(path: pathlib.Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: pathlib.Path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: pathlib.Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + JSON


def optimizer_to_files(opt: torch.optim.Optimizer):
    """(tensors, json) for opt.state_dict(): tensors under 'state.<param id>.<key>', everything else JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, (int, float, bool, str)) or value is None:
                scalars.setdefault(str(pid), {})[key] = value
            else:
                raise CheckpointError(f"optimizer state {pid}.{key} has unsupported type {type(value).__name__}")
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: Dict[str, torch.Tensor], meta: Dict) -> Dict:
    """Rebuild the state_dict optimizer_to_files was given."""
    state: Dict[int, Dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------------------
# RNG states


def rng_to_files():
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's wheels
        pass
    return tensors, meta


def restore_rng(tensors: Dict[str, torch.Tensor], meta: Dict):
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        import numpy as np
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------------
# save / load


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng.rank{rank}"


def _no_barrier():
    pass


def save(ckpt_root, step: int, save_adapter: Callable[[pathlib.Path], None], optimizer, scheduler,
         trainer_state: Dict, keep: int = 2, save_optimizer: Optional[Callable[[pathlib.Path], None]] = None,
         rank: int = 0, barrier: Callable[[], None] = _no_barrier) -> pathlib.Path:
    """Write checkpoint `step` under ckpt_root atomically, point `latest` at it, keep the newest `keep`.

    Distributed runs call it on every rank with their rank, a barrier and save_optimizer (a collective that
    writes the sharded optimizer state into the directory it is given); save_adapter is then called on every
    rank too (gathering is collective), and only rank 0 publishes the checkpoint."""
    root = pathlib.Path(ckpt_root)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    save_adapter(tmp)
    if save_optimizer is not None:
        save_optimizer(tmp / "optimizer")
    else:
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_meta)
    rng_tensors, rng_meta = rng_to_files()
    save_file(rng_tensors, str(tmp / f"{_rng_name(rank)}.safetensors"))
    _write_json(tmp / f"{_rng_name(rank)}.json", rng_meta)
    barrier()
    if rank != 0:
        barrier()  # until rank 0 has published it
        return final
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "scheduler": sched})
    for f in (f for f in tmp.iterdir() if f.is_file()):  # adapter files come from another module: make them
        with open(f, "rb") as fh:                           # durable too (DCP fsyncs its own)
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step from a run that was resumed before it: replace
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    steps = sorted(list_checkpoints(root), key=checkpoint_step)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoint_step(path: pathlib.Path) -> int:
    m = _NAME.match(pathlib.Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory name (checkpoint-N)")
    return int(m.group(1) or m.group(2))


def list_checkpoints(root) -> List[pathlib.Path]:
    """The checkpoint directories under `root` (complete or not), newest step first."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_checkpoint_dir(path: pathlib.Path) -> bool:
    return bool(_NAME.match(path.name)) or (path / "trainer_state.json").is_file()


def _check_json(path: pathlib.Path) -> Dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} unreadable ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return obj


def _check_tensors(path: pathlib.Path):
    from ._io import check_safetensors
    if not path.is_file():
        raise CheckpointError(f"{path.name} missing")
    try:
        check_safetensors(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path.name} truncated or corrupt") from None


def unusable_reason(ckpt: pathlib.Path, config_hash: Optional[str] = None) -> Optional[str]:
    """Why `ckpt` cannot be resumed from (a short phrase), or None when it is usable: every file present and
    readable (JSON parsed, safetensors headers consistent with the file sizes) and, when both are known, its
    config hash equal to `config_hash`."""
    ckpt = pathlib.Path(ckpt)
    if not ckpt.is_dir():
        return "missing"
    try:
        state = _check_json(ckpt / "trainer_state.json")
        if not isinstance(state.get("step"), int) or not isinstance(state.get("scheduler"), dict):
            raise CheckpointError("trainer_state.json lacks its step or scheduler state")
        _check_json(ckpt / "adapter_config.json")
        _check_tensors(ckpt / "adapter_model.safetensors")
        _check_json(ckpt / "rng.json")
        _check_tensors(ckpt / "rng.safetensors")
        if (ckpt / "optimizer").is_dir():
            if not (ckpt / "optimizer" / ".metadata").is_file():
                raise CheckpointError("optimizer/.metadata missing")
        else:
            _check_json(ckpt / "optimizer.json")
            _check_tensors(ckpt / "optimizer.safetensors")
    except CheckpointError as exc:
        return str(exc)
    saved = state.get("config_hash")
    if config_hash is not None and saved is not None and saved != config_hash:
        return "written with other settings (config hash differs)"
    return None


def newest_usable(root, config_hash: Optional[str] = None
                  ) -> Tuple[Optional[pathlib.Path], List[Tuple[pathlib.Path, str]]]:
    """(the newest usable checkpoint under `root` or None, [(newer checkpoint skipped, why)])."""
    skipped = []
    for ckpt in list_checkpoints(root):
        why = unusable_reason(ckpt, config_hash)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    return None, skipped


def find(path) -> pathlib.Path:
    """The checkpoint named by `path`: a checkpoint itself, or the newest usable one of a checkpoints/ root or
    an output dir (whatever `latest` says)."""
    p = pathlib.Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        ckpt, skipped = newest_usable(root)
        if ckpt is not None:
            return ckpt
        if skipped:
            raise CheckpointError(f"no usable checkpoint in {root} ("
                                  + "; ".join(f"{c.name}: {why}" for c, why in skipped) + ")")
    raise CheckpointError(f"no checkpoint found in {p} (expected {p / 'checkpoints'}/checkpoint-N)")


def load(ckpt: pathlib.Path, optimizer, scheduler,
         load_optimizer: Optional[Callable[[pathlib.Path], None]] = None, rank: int = 0) -> Dict:
    """Restore optimizer, scheduler and RNG states from `ckpt`; returns its trainer_state (the adapter is
    the caller's). Distributed runs pass load_optimizer (the collective reading what save_optimizer wrote) and
    their rank (a rank the saving run did not have takes rank 0's RNG states)."""
    distributed = load_optimizer is not None
    if distributed != (ckpt / "optimizer").is_dir():
        raise CheckpointError(f"{ckpt}: written by a {'distributed' if not distributed else 'single-process'} run; "
                              f"resume it the same way")
    rng = _rng_name(rank) if (ckpt / f"{_rng_name(rank)}.json").is_file() else _rng_name(0)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        rng_meta = json.loads((ckpt / f"{rng}.json").read_text())
        rng_tensors = load_file(str(ckpt / f"{rng}.safetensors"))
        if not distributed:
            opt_meta = json.loads((ckpt / "optimizer.json").read_text())
            opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({exc})") from None
    except Exception as exc:  # safetensors raises its own error type on truncated / corrupt files
        raise CheckpointError(f"{ckpt}: corrupt checkpoint tensors ({exc})") from None
    try:
        if distributed:
            load_optimizer(ckpt / "optimizer")
        else:
            optimizer.load_state_dict(optimizer_from_files(opt_tensors, opt_meta))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: optimizer state does not fit this model ({exc})") from None
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    restore_rng(rng_tensors, rng_meta)
    return state


def latest_step(ckpt_root) -> Optional[int]:
    try:
        return checkpoint_step(find(ckpt_root))
    except CheckpointError:
        return None
