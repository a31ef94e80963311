"""qlora_ext.cpu_block_cache: torch's CPU allocator with a cache of mapped blocks (csrc/torch/large_alloc.cpp).
A freed large tensor's block is reused for the next one that fits it with at most 1/8 to spare (of equal
blocks, the one freed last); the cache holds at most its limit, and never more than keeps blocks in use + cached
under the most ever in use at once; freed blocks do not stay resident between long-lived small tensors (glibc's
heap, the control, keeps them)."""
import json
import subprocess
import sys

import pytest
import torch

import qlora_ext
from qlora_ext import cpu_block_cache, cpu_block_cache_stats

MiB = 1 << 20


@pytest.fixture
def cache_state():
    """Leaves the process's cache as the test found it."""
    before = cpu_block_cache_stats()["on"]
    yield
    cpu_block_cache(qlora_ext._io.CPU_BLOCK_CACHE_BYTES if before else 0)


def test_reuse_limit_and_off(cache_state):
    cpu_block_cache(8 * MiB)
    s0 = cpu_block_cache_stats()
    assert s0["on"] == 1 and set(s0) == {"on", "live_bytes", "cached_bytes", "peak_live_bytes", "reuses",
                                         "mappings"}
    a = torch.empty(300_000)  # 1.2 MB
    ptr = a.data_ptr()
    s1 = cpu_block_cache_stats()
    assert s1["mappings"] == s0["mappings"] + 1 and s1["live_bytes"] >= s0["live_bytes"] + 1_200_000
    del a
    assert cpu_block_cache_stats()["cached_bytes"] >= 1_200_000
    b = torch.empty(290_000)  # 3% smaller: the same block again (a cached block is reused with <= 1/8 to spare)
    s2 = cpu_block_cache_stats()
    assert b.data_ptr() == ptr and s2["reuses"] == s1["reuses"] + 1 and s2["mappings"] == s1["mappings"]
    b.fill_(3.0)
    c = torch.ones(300_000)  # a different block while b lives; contents independent
    assert c.data_ptr() != b.data_ptr() and torch.all(b == 3.0) and torch.all(c == 1.0)
    # of blocks of the same length, the one freed last comes back first (the likeliest still in the CPU caches)
    ptrs = (b.data_ptr(), c.data_ptr())
    del b
    del c
    assert torch.empty(300_000).data_ptr() == ptrs[1]
    # more freed than the limit: the oldest go, at most 8 MiB stay
    many = [torch.empty(1 << 20) for _ in range(6)]  # 4 MiB each
    del many
    assert cpu_block_cache_stats()["cached_bytes"] <= 8 * MiB
    small = torch.empty(1000)  # under min_bytes: malloc's, not the cache's
    s3 = cpu_block_cache_stats()
    del small
    assert cpu_block_cache_stats()["live_bytes"] == s3["live_bytes"]
    cpu_block_cache(0)
    s4 = cpu_block_cache_stats()
    assert s4["on"] == 0 and s4["cached_bytes"] == 0
    d = torch.empty(1 << 20)
    assert cpu_block_cache_stats()["mappings"] == s4["mappings"]  # off: torch's own allocator
    del d


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 0"):
        cpu_block_cache(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        cpu_block_cache(MiB, min_bytes=-5)


def test_training_step_same_with_and_without(cache_state):
    """A 4-bit LoRA step gives bit-identical loss and gradients whether its tensors come from the cache
    (reused blocks hold stale data: nothing may depend on fresh memory) or from malloc."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(1000, 1500), torch.nn.GELU(), torch.nn.Linear(1500, 1000))
    x = torch.randn(3, 70, 1000)

    def base_copy():
        import copy
        return copy.deepcopy(base)

    results = []
    for limit in (0, 64 * MiB, 64 * MiB):  # off, then on twice (the second run reuses the first's blocks)
        cpu_block_cache(limit)
        torch.manual_seed(1)
        model = qlora_ext.add_lora(qlora_ext.quantize_model(base_copy()), r=8, lora_alpha=16, lora_dropout=0.1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # nonzero B: every gradient path carries signal
        loss = model(x).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    assert cpu_block_cache_stats()["reuses"] > 0
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert grads.keys() == results[0][1].keys() and len(grads) == 4
        for n in grads:
            assert torch.equal(grads[n], results[0][1][n]), n


def test_freed_blocks_not_resident(tmp_path):
    """Blocks freed between long-lived small tensors: glibc's heap keeps them resident (the control, once
    its mmap threshold has grown past them); with the cache only the limit's worth stays, and turning the
    cache off returns that too."""
    code = r"""
import json, sys, torch, qlora_ext
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "cache":
    qlora_ext.cpu_block_cache(32 << 20)
t = torch.ones(16 << 18)  # a freed 16 MiB block: glibc's threshold grows past the 1 MiB blocks below
del t
before = anon()
big, keep = [], []
for i in range(256):
    big.append(torch.ones(1 << 18))  # 1 MiB, touched
    keep.append(torch.ones(1 << 12))  # 16 KiB, long-lived, between them
del big
retained = anon() - before
s0 = qlora_ext.cpu_block_cache_stats()
again = [torch.ones(1 << 18) for _ in range(16)]  # the same size: served from the cache, no new pages
s1 = qlora_ext.cpu_block_cache_stats()
del again
qlora_ext.cpu_block_cache(0)
print(json.dumps({"retained": retained / 2**20, "s0": s0, "s1": s1, "off": (anon() - before) / 2**20}))
"""
    out = {}
    for mode in ("default", "cache"):
        # cwd away from the source tree: the installed package (with its compiled _C) must be the one imported
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["default"]["retained"] > 128, out  # the control: glibc keeps the freed 1 MiB blocks
    c = out["cache"]
    assert c["retained"] < 32 + 16, out  # the 32 MiB the cache keeps, plus the small tensors
    assert c["s0"]["cached_bytes"] <= 32 << 20
    assert c["s1"]["reuses"] - c["s0"]["reuses"] == 16 and c["s1"]["mappings"] == c["s0"]["mappings"]
    assert c["off"] < 16, out  # off: the cached blocks are unmapped


def test_high_water_bound(tmp_path):
    """A new mapping first evicts cached blocks so that in use + cached stays under the high-water mark of
    blocks in use: the cache never raises the peak above what unmapping every freed block would give."""
    code = r"""
import json, torch, qlora_ext
qlora_ext.cpu_block_cache(64 << 20)
blocks = [torch.empty(1 << 18) for _ in range(10)]  # 10 x 1 MiB in use: the high-water mark
del blocks  # all 10 cached (under the limit)
s0 = qlora_ext.cpu_block_cache_stats()
x = torch.empty(5 << 18)  # 5 MiB: no cached block fits; 5 of the 1 MiB ones must go
s1 = qlora_ext.cpu_block_cache_stats()
print(json.dumps([s0, s1]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s0, s1 = json.loads(res.stdout.strip().splitlines()[-1])
    assert s0["cached_bytes"] == 10 * MiB and s0["live_bytes"] == 0 and s0["peak_live_bytes"] == 10 * MiB, s0
    assert s1["live_bytes"] == 5 * MiB and s1["peak_live_bytes"] == 10 * MiB, s1
    assert s1["cached_bytes"] == 5 * MiB and s1["mappings"] == s0["mappings"] + 1, s1
