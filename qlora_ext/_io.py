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
from typing import Callable, Dict, Mapping

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


# glibc's malloc, left alone, serves every request under a threshold that grows up to 32 MiB (after the first
# larger block is freed) from its heap, and returns heap memory to the system only from the top. A CPU training
# step allocates and frees MiB-sized activations between long-lived ones, so the freed holes stay resident:
# LLaMA-1B, r=64, 128 tokens peaked at 2.43 GB RssAnon for 1.6 GB in use. Fixed thresholds (128 KiB: larger
# blocks are mapped and unmapped; 1 MiB: the heap's free top is trimmed) end that, at a price: every large
# block is then fresh pages, faulted in on first touch. Small models on long batches pay most (SmolLM2-135M,
# batch 4 x 256: a training step 1.5x slower); a 33B model on 128-token rows needed it to fit in 21 GB. Opt-in.
MMAP_THRESHOLD = 128 << 10
TRIM_THRESHOLD = 1 << 20
_heap_limited = None


def limit_heap_retention() -> bool:
    """Sets glibc's malloc thresholds (mallopt M_MMAP_THRESHOLD = 128 KiB, M_TRIM_THRESHOLD = 1 MiB) so that
    memory a CPU training step frees goes back to the system instead of staying resident; which also fixes
    the thresholds (glibc otherwise raises them as it goes). Process-wide, once; nothing is changed when the
    C library is not glibc or the user set MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES
    (their choice stands). True when the thresholds are in effect. `qlora-ext finetune --release-freed-memory`
    calls it; it costs time where activations are large next to the work done on them (see above).
    release_free_heap, by contrast, returns what is free once."""
    global _heap_limited
    if _heap_limited is None:
        _heap_limited = False
        import platform
        user = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"))
        if platform.libc_ver()[0] == "glibc" and not user:
            try:
                mallopt = _c_library().mallopt
            except (OSError, AttributeError):
                return False
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
            _heap_limited = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _heap_limited
