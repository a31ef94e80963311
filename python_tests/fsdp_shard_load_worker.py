"""One rank of test_big_models.py's shard-loading check (run by torch.distributed.run): load_sharded builds
the model on the meta device and quantizes only this rank's part of each weight; its local packed bytes,
QuantStates and float shards must equal the matching slices of a one-process load_quantized, and the sharded
model's logits the one-process model's. Prints "ok <check>" on rank 0; fails by assertion."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import qlora_ext
from qlora_ext import distributed as D
from qlora_ext.nn import Linear4bit

MODEL = sys.argv[1]
ctx = D.init("fsdp", "cpu")
cfg = qlora_ext.QLoRAConfig(quant_storage=torch.float32, compute_dtype=torch.float32)
ref = qlora_ext.load_quantized(MODEL, cfg, dtype=torch.float32)
runner = D.load_sharded(MODEL, cfg, ctx, dtype=torch.float32)
model = D.inner(runner)


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


refp = dict(ref.named_parameters())
misaligned = 0
for name, p in model.named_parameters():
    assert isinstance(p, DTensor), name
    local = p.to_local()
    start, stop = D._shard_range(p.shape[0], ctx.rank, ctx.world_size)
    assert local.shape[0] == stop - start
    assert torch.equal(bits(local), bits(refp[name].detach()[start:stop])), name
    mod = model.get_submodule(name.rpartition(".")[0])
    if isinstance(mod, Linear4bit) and name.endswith("weight"):
        misaligned += (start * 8) % mod.quant_state.blocksize != 0
        a, b = mod.quant_state, ref.get_submodule(name.rpartition(".")[0]).quant_state
        assert a.shape == b.shape and a.dtype == b.dtype and a.nested == b.nested
        for x, y in ((a.absmax, b.absmax), (a.nested_absmax, b.nested_absmax), (a.offset, b.offset)):
            assert torch.equal(x, y), name
t = torch.tensor([misaligned])
dist.all_reduce(t)
assert int(t) > 0, "no shard boundary fell inside a block: the check would not cover that case"
if ctx.is_main:
    print("ok shards equal one-process slices", flush=True)
ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
with torch.no_grad():
    got = D.run(runner, lambda m, x: m(input_ids=x).logits, ids)
    want = ref(input_ids=ids).logits
assert torch.equal(got, want), float((got - want).abs().max())
if ctx.is_main:
    print("ok logits", flush=True)
D.shutdown()
