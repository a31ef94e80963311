"""One rank of test_distributed.py's FSDP2 check (run by torch.distributed.run): the 4-bit weights of the tiny
model, stored as float32, are sharded by fully_shard; gathering them, the forward, a full state dict and a
sharded DCP save -> load all give back the reference bytes and QuantStates; the fused optimizers update the
local shards and save their state sharded like the parameters. Fails by assertion; prints one "ok <check>"
line per check on rank 0."""
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

import qlora_ext
from qlora_ext import distributed as D
from qlora_ext.nn import Linear4bit

MODEL, CKPT = sys.argv[1], sys.argv[2]


def build():
    torch.manual_seed(0)
    cfg = qlora_ext.QLoRAConfig(quant_storage=torch.float32, compute_dtype=torch.float32)
    model = qlora_ext.load_quantized(MODEL, cfg, dtype=torch.float32)
    model = qlora_ext.prepare_model_for_training(model, gradient_checkpointing=False)
    return qlora_ext.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def same_state(a, b):
    assert a.shape == b.shape and a.blocksize == b.blocksize and a.quant_type == b.quant_type
    assert a.nested == b.nested and a.offset_value == b.offset_value
    for x, y in ((a.absmax, b.absmax), (a.code, b.code), (a.nested_absmax, b.nested_absmax)):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y))


def bits(t):
    """Bitwise view: packed 4-bit bytes stored as float32 may hold NaN patterns, which never compare equal."""
    return t.contiguous().view(-1).view(torch.uint8) if t.is_floating_point() else t


def say(msg):
    if dist.get_rank() == 0:
        print("ok", msg, flush=True)


ctx = D.init("fsdp", "cpu")
ref = build()  # never wrapped: the single-process reference
ref_bytes = {n: m.weight.detach().view(torch.uint8).clone() for n, m in quant_layers(ref).items()}
ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref_logits = ref(input_ids=ids).logits

model = build()
wrapped = D.wrap(model, ctx)
for n, m in quant_layers(model).items():
    assert isinstance(m.weight, DTensor) and m.weight.dtype == torch.float32, n
    local = m.weight.to_local()
    assert local.shape[0] < m.weight.shape[0], f"{n} is not sharded"
    same_state(m.quant_state, quant_layers(ref)[n].quant_state)  # replicated, untouched by sharding
say("sharded")

with D.gathered(wrapped) as inner:
    for n, m in quant_layers(inner).items():
        assert not isinstance(m.weight, DTensor)
        assert torch.equal(m.weight.detach().view(torch.uint8), ref_bytes[n]), n
        assert torch.equal(m.dequantized_weight(), quant_layers(ref)[n].dequantized_weight()), n
say("gathered")

with torch.no_grad():
    logits = D.run(wrapped, lambda m, x: m(input_ids=x).logits, ids)
assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-6), (logits - ref_logits).abs().max()
say("forward")

full = D.full_state_dict(wrapped)
if ctx.is_main:
    ref_sd = ref.state_dict()
    assert set(full) == set(ref_sd), sorted(set(full) ^ set(ref_sd))[:5]
    for k, v in ref_sd.items():
        assert torch.equal(bits(full[k]), bits(v)), k
    fresh = build()
    for m in quant_layers(fresh).values():
        m.weight.data.zero_()
    fresh.load_state_dict(full)  # a whole state dict loads into a plain model: the QuantStates come with it
    for n, m in quant_layers(fresh).items():
        assert torch.equal(m.weight.view(torch.uint8), ref_bytes[n]), n
        same_state(m.quant_state, quant_layers(ref)[n].quant_state)
say("full state dict")

dcp.save(wrapped.state_dict(), checkpoint_id=CKPT)
other = build()
for m in quant_layers(other).values():
    m.weight.data.zero_()
    m.quant_state.absmax = torch.zeros_like(m.quant_state.absmax)
other_wrapped = D.wrap(other, ctx)
sd = other_wrapped.state_dict()
dcp.load(sd, checkpoint_id=CKPT)
other_wrapped.load_state_dict(sd)
for n, m in quant_layers(other).items():
    assert isinstance(m.weight, DTensor), f"{n}: loading replaced FSDP's sharded parameter"
    same_state(m.quant_state, quant_layers(ref)[n].quant_state)
with D.gathered(other_wrapped) as inner:
    for n, m in quant_layers(inner).items():
        assert torch.equal(m.weight.detach().view(torch.uint8), ref_bytes[n]), n
with torch.no_grad():
    logits = D.run(other_wrapped, lambda m, x: m(input_ids=x).logits, ids)
assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-6)
say("sharded save and load")

# the fused optimizers on DTensor parameters: local updates, state sharded like the parameters
from qlora_ext.lm import token_loss  # noqa: E402
from qlora_ext.optim import AdamW8bit, PagedAdamW  # noqa: E402

params = [p for p in other_wrapped.parameters() if p.requires_grad]
opt = PagedAdamW(params, lr=1e-2)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
D.run(other_wrapped, token_loss, batch)[0].backward()
before = [p.to_local().clone() for p in params]
opt.step()
assert all(not torch.equal(p.to_local(), b) for p, b in zip(params, before)), "local shards not updated"
sd = opt.state_dict()
for i, p in enumerate(params):
    st = sd["state"][i]
    assert isinstance(st["exp_avg"], DTensor) and st["exp_avg"].shape == p.shape
    assert st["exp_avg"].placements == p.placements
    assert torch.equal(st["exp_avg"].to_local(), opt.state[p]["exp_avg"])
fresh_opt = PagedAdamW(params, lr=1e-2)
fresh_opt.load_state_dict(sd)
for p in params:
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh_opt.state[p][k], opt.state[p][k])
opt8 = AdamW8bit(params, lr=1e-2, min_8bit_size=1)
opt8.step()
try:
    opt8.state_dict()
    raise AssertionError("8-bit state of sharded parameters must be refused")
except RuntimeError as exc:
    assert "8-bit" in str(exc)
say("optimizer")
D.shutdown()
