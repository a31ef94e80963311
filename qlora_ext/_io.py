"""Checkpoint I/O shared by model.py and adapters.py: atomic saves (every file written under a temporary name
in the target directory, then renamed into place) and validating reads of untrusted safetensors and JSON
files (never pickle), with errors that name the file and the offending key.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

_MAX_JSON_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself enforces
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def atomic_write(directory, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Writes each file `name` of `writers` (a function writing to the path it is given) into `directory`.

    All files are first written and fsynced under temporary names in the same directory; only then are they
    renamed into place, in the given order (put the file that makes the set valid, e.g. a config, last). A
    failure while writing removes the temporary files and leaves the previous files untouched; other files
    in the directory are never touched.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmps: Dict[str, Path] = {}
    try:
        for name, write in writers.items():
            tmp = directory / f".{name}.tmp-{tag}"
            tmps[name] = tmp
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for name, tmp in tmps.items():
            os.replace(tmp, directory / name)
        _fsync_dir(directory)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path, max_bytes: int = _MAX_JSON_BYTES) -> dict:
    """A JSON object from `path`; ValueError naming the file when it is missing, too large or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is too large for a JSON config")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path) -> dict:
    """Validates a safetensors file's header against the file before any tensor is read.

    Returns the header (name -> {"dtype", "shape", "data_offsets"}, plus "__metadata__"). Raises ValueError
    naming the file and the key for a truncated file (a tensor whose bytes lie past the end), a shape that
    does not match its byte range, an unknown dtype or overlapping / out-of-order ranges.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise ValueError(f"{path}: __metadata__ must be an object")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"{path}: entry '{key}' is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise ValueError(f"{path}: '{key}' has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in shape)):
            raise ValueError(f"{path}: '{key}' has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise ValueError(f"{path}: '{key}' has invalid data_offsets {offsets!r}")
        if math.prod(shape) * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise ValueError(f"{path}: '{key}' of shape {shape} and dtype {dtype} needs "
                             f"{math.prod(shape) * _ITEMSIZE[dtype]} bytes but spans {offsets[1] - offsets[0]}")
        if offsets[1] > data_len:
            raise ValueError(f"{path}: truncated file: '{key}' ends at byte {offsets[1]} of the data section, "
                             f"which holds only {data_len} bytes")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}: '{a}' and '{b}' overlap")
    return header


def load_safetensors(path) -> Dict[str, torch.Tensor]:
    """All tensors of a validated safetensors file (safetensors' own loader, no pickle)."""
    from safetensors.torch import load_file
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type; report it as bad input
        raise ValueError(f"{path}: cannot read safetensors file ({exc})") from None


_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels refuse it (EINVAL) and nothing happens
_libc = None


def _c_library():
    """This process's C library (ctypes, loaded once); OSError / AttributeError where there is none to load."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc = lib
    return _libc


def drop_mapped_pages(suffix: str = ".safetensors") -> int:
    """Reclaims the resident pages of this process's memory mappings of `suffix` files (Linux
    madvise(MADV_PAGEOUT); elsewhere nothing), returning how many mappings were advised.

    While a checkpoint loads, every page of it that was read stays mapped into the process (safetensors maps
    the whole files), so resident memory grows by the size of the checkpoint although the tensors were
    quantized and dropped. The loaders call this as they go. PAGEOUT never loses data: clean file pages are
    dropped (a tensor still viewing the file reads them back from the file, unchanged) and privately written
    pages could only be swapped out, never discarded."""
    try:
        libc = _c_library()
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except (OSError, AttributeError):
        return 0
    n = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].rstrip("\n").endswith(suffix):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            n += libc.madvise(lo, hi - lo, _MADV_PAGEOUT) == 0
    return n


def release_free_heap() -> bool:
    """Returns the C heap's free pages to the system (glibc malloc_trim(0); elsewhere nothing), True if it ran.

    glibc keeps freed medium-sized blocks (up to its mmap threshold, which rises to 32 MB as large blocks are
    freed) in the process's heap, where they stay resident: a loader that allocates temporaries between
    tensors it keeps (load_sharded's full-size adapters before FSDP2 shards them, float slices while it
    quantizes) would otherwise end up holding their memory as well."""
    try:
        trim = _c_library().malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)
    return True


# Torch's CPU tensors come from glibc's malloc, which, left alone, serves every request under a threshold that
# grows up to 32 MiB (after the first larger block is freed) from its heap and returns heap memory to the system
# only from the top. A CPU training step allocates and frees MiB-sized activations between long-lived ones, so
# the freed holes stay resident: SmolLM2-135M, batch 4 x 256, peaked 1.5 GB above the loaded model for ~0.45 GB
# in use. Mapping every large block on its own (malloc's thresholds fixed at 128 KiB) ends that, but then each
# block is fresh pages, faulted in on first touch: the step took 1.5x as long. The block cache (C++,
# csrc/torch/large_alloc.cpp) does both: blocks of at least `min_bytes` are mappings of their own, kept after
# use for the next tensor that fits one with at most 1/8 to spare, up to `limit_bytes` of them and never more
# than keeps blocks in use + cached under the most ever in use at once (so the cache does not raise the peak).
CPU_BLOCK_CACHE_BYTES = 256 << 20
CPU_BLOCK_MIN_BYTES = 128 << 10


def cpu_block_cache(limit_bytes: Optional[int] = CPU_BLOCK_CACHE_BYTES,
                    min_bytes: int = CPU_BLOCK_MIN_BYTES) -> Dict[str, int]:
    """Turns torch's CPU block cache on (limit_bytes > 0) or off (0 or None). When on, CPU tensors of at
    least `min_bytes` are separate mappings, kept after they are freed and reused for the next tensor that
    fits one with at most 1/8 to spare (of equal ones, the one freed last): a training step's activations then neither stay resident as holes in
    malloc's heap nor fault fresh pages in on every step. Cached blocks are at most `limit_bytes`, and at most
    what keeps blocks in use + cached under the high-water mark of blocks in use (the oldest go first), so
    the cache never raises the peak above what unmapping every freed block would give. Process-wide
    (it replaces torch's CPU allocator; smaller tensors still come from malloc). Off: the cached blocks are
    returned to the system, and blocks freed later too. prepare_model_for_training turns it on for CPU
    models; `qlora-ext finetune --cpu-block-cache-mib` sets it for a run. Returns cpu_block_cache_stats()."""
    limit = 0 if limit_bytes is None else int(limit_bytes)
    if limit < 0 or int(min_bytes) < 0:
        raise ValueError(f"cpu_block_cache: limit_bytes and min_bytes must be >= 0, got {limit_bytes} and "
                         f"{min_bytes}")
    from . import _C
    _C.cpu_block_cache(limit > 0, limit, int(min_bytes))
    return cpu_block_cache_stats()


def cpu_block_cache_stats() -> Dict[str, int]:
    """The block cache's state: on, live_bytes (blocks in use), cached_bytes (kept for reuse), peak_live_bytes,
    reuses and mappings (blocks served from the cache / newly mapped, since the process started)."""
    from . import _C
    keys = ("on", "live_bytes", "cached_bytes", "peak_live_bytes", "reuses", "mappings")
    return dict(zip(keys, _C.cpu_block_cache_stats()))
