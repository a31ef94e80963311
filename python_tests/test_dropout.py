"""The CPU LoRA dropout (qlora_ext::lora_dropout, nn.LoraDropout): its keep mask against a pure-Python model of
the documented Philox stream, its statistics, its gradient, its reproducibility under torch.manual_seed and the
RNG replay of gradient checkpointing, and the fallback to torch's dropout off CPU float32."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_ext._ops import ops
from qlora_ext.nn import Linear4bit, LoraDropout, LoraLinear4bit

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def _philox(c, key):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit words (c: 4 arrays), key: a Python int."""
    c = [np.asarray(w, dtype=np.uint64) for w in c]
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
             p0 & MASK32]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return c


def _keep_ref(n, seed, p):
    """Element e is kept iff word (e % 64) // 16 of philox({e // 64 (64 bits), e % 16, 0}, seed) >= p * 2^32."""
    e = np.arange(n, dtype=np.uint64)
    k, j, lane = e // np.uint64(64), (e % np.uint64(64)) // np.uint64(16), e % np.uint64(16)
    words = np.stack(_philox([k & MASK32, k >> np.uint64(32), lane, np.zeros_like(e)], seed))
    thr = min(round(p * 2**32), 2**32 - 1)
    return torch.from_numpy(words[j.astype(np.int64), np.arange(n)] >= np.uint64(thr))


def test_philox_known_answer():  # Random123's published vector for counter 0, key 0
    assert [int(w[0]) for w in _philox([[0]] * 4, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("shape", [(1,), (17,), (3, 65), (2, 7, 129), (1000, 3)])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_mask_matches_the_stream_model(shape, p):
    x = torch.randn(shape) + 5.0  # no zeros, so out == 0 marks a dropped element
    seed = int(torch.randint(2**63 - 1, ()))
    out = ops.lora_dropout(x, p, seed)
    keep = _keep_ref(x.numel(), seed, p).view(shape)
    assert torch.equal(out, torch.where(keep, x * torch.tensor(1 / (1 - p), dtype=torch.float32), 0.0))
    # a non-contiguous input is taken in its logical (row-major) order
    if len(shape) > 1:
        xt = x.transpose(0, -1)
        assert torch.equal(ops.lora_dropout(xt, p, seed), ops.lora_dropout(xt.contiguous(), p, seed))


def test_drop_rate_and_independence_of_seeds():
    x = torch.ones(1_000_003)
    for p in (0.05, 0.5):
        kept = [(ops.lora_dropout(x, p, s) != 0) for s in (1, 2)]
        n, sd = x.numel(), (x.numel() * p * (1 - p)) ** 0.5
        for k in kept:
            assert abs(int(k.sum()) - n * (1 - p)) < 6 * sd
        # two seeds: masks agree on a fraction (1-p)^2 + p^2 of the elements, as independent draws would
        agree = float((kept[0] == kept[1]).double().mean())
        assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 0.005
    assert torch.equal(ops.lora_dropout(x[:10], 0.0, 5), x[:10])


def test_gradient_is_the_same_mask():
    x = (torch.randn(37, 53) + 4).requires_grad_()
    out = ops.lora_dropout(x, 0.25, 1234)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, torch.where(out != 0, g * torch.tensor(1 / 0.75), 0.0))
    torch.library.opcheck(ops.lora_dropout.default, (torch.randn(9, 70, requires_grad=True), 0.1, 77))


def test_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="float32"):
        ops.lora_dropout(torch.randn(4, dtype=torch.float64), 0.1, 1)
    with pytest.raises(RuntimeError, match=r"\[0, 1\)"):
        ops.lora_dropout(torch.randn(4), 1.0, 1)


def test_module_follows_torch_seed_mode_and_falls_back():
    d = LoraDropout(0.4)
    x = torch.randn(8, 100)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    assert torch.equal(d(x), a)
    assert not torch.equal(d(x), a)  # the generator moved on
    d.eval()
    assert d(x) is x
    d.train()
    for dt in (torch.bfloat16, torch.float64):  # torch's dropout: values are 0 or x / (1 - p)
        y = d(x.to(dt))
        assert y.dtype == dt
        scaled = x.to(dt) / (1 - 0.4)
        assert bool(((y == 0) | torch.isclose(y, scaled, rtol=1e-2)).all())


def test_checkpoint_replays_the_mask():
    """Gradients of a LoRA layer with dropout under non-reentrant checkpointing equal the plain run's."""
    torch.manual_seed(0)
    layer = LoraLinear4bit.from_linear4bit(Linear4bit.from_linear(nn.Linear(96, 80)), r=4, lora_alpha=8,
                                           lora_dropout=0.3)
    assert isinstance(layer.lora_dropout["default"], LoraDropout)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(5, 96, requires_grad=True)
    grads = []
    for use_ckpt in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        y = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
        (y.square().sum()).backward()
        grads.append([x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                      layer.lora_B["default"].weight.grad.clone()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
