"""Optimizers (qlora_ext.optim): the fused kernels against the float64 references, 200 steps against
torch.optim.AdamW, 8-bit variants tracking float32 AdamW, 8-bit state size, exact resume (in-process and in a
fresh process), the non-finite gradient policy, paging (CUDA only) and clear errors on bad input."""
import gc
import io
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import qlora_ext
from qlora_ext import optim as O
from qlora_ext import reference as R
from qlora_ext._ops import ops
from qlora_ext.functional import get_code

from conftest import TINY, needs_shared

ALL = [O.AdamW, O.PagedAdamW, O.AdamW8bit, O.PagedAdamW8bit, O.Lion, O.PagedLion, O.Lion8bit, O.PagedLion8bit]
PAGED = {O.PagedAdamW: O.AdamW, O.PagedAdamW8bit: O.AdamW8bit, O.PagedLion: O.Lion, O.PagedLion8bit: O.Lion8bit}
SIZES = [1, 7, 255, 256, 257, 1000, 4097, 70001]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _lr(cls):
    return 1e-4 if issubclass(cls, O.Lion) else 1e-3


def _state_tensors(opt):
    return [t for st in opt.state.values() for t in st.values()]


# ---------------------------------------------------------------------------------------------------------
# kernels vs the float64 references (one step from random state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adamw_kernel_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(1)
    for n in SIZES:
        p = torch.randn(n, generator=g).to(dtype)
        grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
        m, v = torch.randn(n, generator=g) * 0.01, torch.rand(n, generator=g) * 1e-4
        pk, gk, mk, vk = (t.clone().to(device) for t in (p, grad, m, v))
        ops.optimizer_step(pk, gk, mk, vk, None, None, "adamw", 5, 1e-3, 0.9, 0.999, 1e-8, 0.1)
        p64, m64, v64 = R.adamw_step_ref(p, grad, m, v, 5, 1e-3, (0.9, 0.999), 1e-8, 0.1)
        # float32 compute: a few roundings of the operands' magnitude; the parameter then rounds to its dtype
        torch.testing.assert_close(mk.cpu().double(), m64, rtol=1e-6, atol=1e-6 * m64.abs().max().item())
        torch.testing.assert_close(vk.cpu().double(), v64, rtol=1e-6, atol=1e-6 * v64.abs().max().item())
        expect = p64.to(dtype) if dtype != torch.float32 else p64
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(pk.cpu().double(), expect.double(), rtol=tol, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lion_kernel_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(2)
    for n in SIZES:
        p = torch.randn(n, generator=g).to(dtype)
        grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
        m = torch.randn(n, generator=g) * 0.01
        pk, gk, mk = (t.clone().to(device) for t in (p, grad, m))
        ops.optimizer_step(pk, gk, mk, None, None, None, "lion", 3, 1e-4, 0.9, 0.99, 0.0, 0.5)
        p64, m64 = R.lion_step_ref(p, grad, m, 1e-4, (0.9, 0.99), 0.5)
        c = 0.9 * m.double() + 0.1 * grad.double()
        clear = c.abs() > 1e-6  # sign(c) of a value at float32 rounding level is not well defined
        torch.testing.assert_close(mk.cpu().double(), m64, rtol=1e-6, atol=1e-6 * m64.abs().max().item())
        expect = p64.to(dtype).double() if dtype != torch.float32 else p64
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(pk.cpu().double()[clear], expect[clear], rtol=tol, atol=1e-7)


def _assert_nearest_codes(q, absmax, x64, signed):
    """q must be the nearest code to x64 / absmax per element (float32 vs float64 rounding may flip near-ties)."""
    code = get_code("dynamic_signed" if signed else "dynamic_unsigned").double()
    n = x64.numel()
    amax64 = R._blocks(x64.abs(), R.OPTIM_BLOCK).amax(dim=1)
    torch.testing.assert_close(absmax.cpu().double(), amax64, rtol=1e-6, atol=0)
    scale = amax64.repeat_interleave(R.OPTIM_BLOCK)[:n]
    x = torch.where(scale > 0, x64 / scale, torch.zeros_like(x64))
    d_kernel = (code[q.long().cpu()] - x).abs()
    d_best = (code[None, :] - x[:, None]).abs().min(dim=1).values
    assert torch.all(d_kernel <= d_best + 1e-6 * x.abs() + 1e-12), "a code is not the nearest one"
    assert (d_kernel > d_best).float().mean() < 0.01


@pytest.mark.parametrize("kind", ["adamw", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_kernel_decodes_updates_and_reencodes(device, kind, dtype):
    g = torch.Generator().manual_seed(3)
    for n in SIZES:
        nb = -(-n // 256)
        p = torch.randn(n, generator=g).to(dtype)
        grad = (torch.randn(n, generator=g) * 0.01).to(dtype)
        q1 = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        q2 = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        a1, a2 = torch.rand(nb, generator=g) * 0.01, torch.rand(nb, generator=g) * 1e-5
        m0, v0 = R.dequantize_state_ref(q1, a1, True), R.dequantize_state_ref(q2, a2, False)
        pk, gk, q1k, q2k, a1k, a2k = (t.clone().to(device) for t in (p, grad, q1, q2, a1, a2))
        if kind == "adamw":
            ops.optimizer_step(pk, gk, q1k, q2k, a1k, a2k, "adamw", 9, 1e-3, 0.9, 0.999, 1e-8, 0.01)
            p64, m64, v64 = R.adamw_step_ref(p, grad, m0, v0, 9, 1e-3, (0.9, 0.999), 1e-8, 0.01)
            _assert_nearest_codes(q2k, a2k, v64, signed=False)
        else:
            ops.optimizer_step(pk, gk, q1k, None, a1k, None, "lion", 9, 1e-4, 0.9, 0.99, 0.0, 0.01)
            p64, m64 = R.lion_step_ref(p, grad, m0, 1e-4, (0.9, 0.99), 0.01)
        _assert_nearest_codes(q1k, a1k, m64, signed=True)
        expect = p64.to(dtype).double() if dtype != torch.float32 else p64
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        if kind == "lion":
            clear = (0.9 * m0.double() + 0.1 * grad.double()).abs() > 1e-6
            pk, expect = pk.cpu()[clear], expect[clear]
        torch.testing.assert_close(pk.cpu().double(), expect, rtol=tol, atol=1e-7)


def test_state_quantization_reference_round_trips():
    x = torch.randn(1000) * 0.01
    x[256:512] = 0.0
    for signed in (True, False):
        v = x if signed else x.abs()
        q, absmax = R.quantize_state_ref(v, signed)
        assert q.dtype == torch.uint8 and absmax.shape == (4,) and absmax[1] == 0
        back = R.dequantize_state_ref(q, absmax, signed)
        assert torch.all(back[256:512] == 0)
        # the dynamic map's relative error in the top half of each block's range is under 2%
        big = v.abs() > 0.5 * absmax.repeat_interleave(256)[:1000]
        assert ((back - v).abs()[big] / v.abs()[big]).max() < 0.02


# ---------------------------------------------------------------------------------------------------------
# against torch.optim.AdamW


def _run(opt_factory, shapes, steps, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    targets = [torch.randn(s, generator=g).to(device) for s in shapes]
    weights = [(torch.rand(s, generator=g) + 0.5).to(device) for s in shapes]
    half = len(params) // 2
    opt = opt_factory([{"params": params[:half], "lr": 2e-3, "weight_decay": 0.1}, {"params": params[half:]}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for t in range(steps):
        for p, tg, w in zip(params, targets, weights):
            p.grad = w * (p.detach() - tg) + 0.01 * torch.sin(t * p.detach())
        opt.step()
        sched.step()
        opt.zero_grad()
    return params


@pytest.mark.parametrize("cls", [O.AdamW, O.PagedAdamW])
@pytest.mark.parametrize("shapes", [[(7,), (33, 65), (1000,), (4097,), (3, 5, 7)], [(1,), (256,), (257, 3)]])
def test_matches_torch_adamw_over_200_steps(device, cls, shapes):
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ours = _run(lambda groups: cls(groups, **kw), shapes, 200, device)
    ref = _run(lambda groups: torch.optim.AdamW(groups, **kw), shapes, 200, device)
    for a, b in zip(ours, ref):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-6, (tuple(a.shape), rel)


def test_loads_torch_adamw_state_and_continues_like_it(device):
    shapes = [(33, 65), (4097,)]
    kw = dict(lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(40)]

    def run(params, opt, ts):
        for t in ts:
            for p, gr in zip(params, grads[t]):
                p.grad = gr.clone()
            opt.step()

    ref = [torch.nn.Parameter(x.clone()) for x in init]
    topt = torch.optim.AdamW(ref, **kw)
    run(ref, topt, range(20))
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    oopt = O.AdamW(ours, **kw)
    oopt.load_state_dict(topt.state_dict())
    run(ref, topt, range(20, 40))
    run(ours, oopt, range(20, 40))
    for a, b in zip(ours, ref):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


# ---------------------------------------------------------------------------------------------------------
# 8-bit state tracks float32 AdamW; 8-bit state size


def _regression_losses(make_opt, steps=200):
    """(initial, final) training loss of a small MLP on a noisy regression task, full batch."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 32, generator=g)
    W = torch.randn(32, 4, generator=g) / 4
    y = torch.tanh(X @ W).sum(1, keepdim=True) + 0.1 * torch.randn(2048, 1, generator=g)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))  # 4096: 8-bit
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(X), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], torch.nn.functional.mse_loss(model(X), y).item()


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Documented tolerance (README, Optimizers): the 8-bit run's final loss differs from the float32 run's by at most
# 5% of the float32 run's loss reduction.
@pytest.mark.parametrize("cls32, classes8, lr", [(torch.optim.AdamW, (O.AdamW8bit, O.PagedAdamW8bit), 1e-2),
                                                 (O.Lion, (O.Lion8bit, O.PagedLion8bit), 1e-3)])
def test_8bit_tracks_float32_on_regression(one_thread, cls32, classes8, lr):
    l0, l32 = _regression_losses(lambda ps: cls32(ps, lr=lr))
    assert l32 < 0.1 * l0, (l0, l32)  # the task is learned
    for cls8 in classes8:
        _, l8 = _regression_losses(lambda ps: cls8(ps, lr=lr))
        assert abs(l8 - l32) <= 0.05 * (l0 - l32), (cls8.__name__, l0, l8, l32)


def _tiny_llama():
    needs_shared()
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM.from_pretrained(str(TINY / "float32"))


def test_adamw8bit_tracks_float32_on_tiny_llama_lm(one_thread):
    """LM task: 25 steps on a fixed batch of the tiny Llama fixture; final loss within 2% of float32 AdamW's."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    final = {}
    for cls in (torch.optim.AdamW, O.AdamW8bit):
        model = _tiny_llama()
        opt = cls(model.parameters(), lr=3e-3)
        for _ in range(25):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[cls] = model(input_ids=ids, labels=ids).loss.item()
    l32, l8 = final[torch.optim.AdamW], final[O.AdamW8bit]
    assert l32 < 4.0, l32  # learned something (initial loss ~5.6)
    assert abs(l8 - l32) <= 0.02 * l32, (l8, l32)


def test_8bit_state_costs_at_most_2_1_bytes_per_parameter():
    model = _tiny_llama()
    params = list(model.parameters())
    nparams = sum(p.numel() for p in params)
    for cls in (O.AdamW8bit, O.PagedAdamW8bit):
        opt = cls(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        tensor_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(opt))
        held = opt.state_bytes()  # the allocated memory, alignment padding included
        assert held <= 2.1 * nparams and tensor_bytes <= 2.1 * nparams, (held / nparams, tensor_bytes / nparams)
        assert held >= 2.0 * nparams  # two bytes of codes per parameter really are there
    opt32 = O.AdamW(params)
    opt32.step()
    assert opt32.state_bytes() >= 8 * nparams


# ---------------------------------------------------------------------------------------------------------
# exact resume

RESUME_SHAPES = [((5000,), torch.float32), ((70, 90), torch.float32), ((257,), torch.bfloat16),
                 ((4100,), torch.bfloat16)]


def resume_problem(device):
    g = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dt).to(device)) for s, dt in RESUME_SHAPES]
    targets = [torch.randn(s, generator=g).to(device) for s, _ in RESUME_SHAPES]
    return params, targets


def resume_build(cls, params):
    opt = cls([{"params": params[:2], "lr": 2 * _lr(cls)}, {"params": params[2:], "weight_decay": 0.05}], lr=_lr(cls))
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)


def resume_train(opt, sched, params, targets, start, steps):
    for t in range(start, start + steps):
        for p, tg in zip(params, targets):
            x = p.detach().float()
            p.grad = ((x - tg) + 0.01 * torch.sin(t * x)).to(p.dtype)
        opt.step()
        sched.step()
        opt.zero_grad()


def resume_continue(cls, ckpt, device, steps):
    """A fresh model + optimizer + scheduler loaded from a checkpoint, trained `steps` more; returns
    (params, optimizer)."""
    params = [torch.nn.Parameter(p.clone().to(device)) for p in ckpt["params"]]
    _, targets = resume_problem(device)
    opt, sched = resume_build(cls, params)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    resume_train(opt, sched, params, targets, ckpt["t"], steps)
    return params, opt


def _checkpoint_bytes(cls, device):
    params, targets = resume_problem(device)
    opt, sched = resume_build(cls, params)
    resume_train(opt, sched, params, targets, 0, 10)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict(),
                "t": 10}, buf)
    resume_train(opt, sched, params, targets, 10, 6)  # the uninterrupted run
    return buf.getvalue(), params, opt


def _assert_same(params_a, opt_a, params_b, opt_b):
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach().cpu(), b.detach().cpu())
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            assert torch.equal(sa[k][key].cpu(), sb[k][key].cpu()), (k, key)


@pytest.mark.parametrize("cls", ALL)
def test_resume_is_bit_identical_in_process(device, cls):
    blob, params, opt = _checkpoint_bytes(cls, device)
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    params2, opt2 = resume_continue(cls, ckpt, device, 6)
    _assert_same(params, opt, params2, opt2)
    if cls in (O.AdamW8bit, O.PagedAdamW8bit):  # the large tensors really hold 8-bit state
        assert opt2.state[params2[1]]["exp_avg"].dtype == torch.uint8
        assert opt2.state[params2[2]]["exp_avg"].dtype == torch.float32  # 257 elements: below min_8bit_size


FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_optim as T
from qlora_ext import optim as O
ckpts = torch.load(sys.argv[2], weights_only=True)
out = {}
for name, ckpt in ckpts.items():
    params, opt = T.resume_continue(getattr(O, name), ckpt, sys.argv[4], 6)
    out[name] = {"params": [p.detach().cpu() for p in params], "opt": opt.state_dict()}
torch.save(out, sys.argv[3])
"""


def test_resume_is_bit_identical_in_a_fresh_process(device, tmp_path):
    classes = [O.AdamW, O.PagedAdamW8bit, O.Lion8bit, O.PagedLion]
    ckpts, runs = {}, {}
    for cls in classes:
        blob, params, opt = _checkpoint_bytes(cls, device)
        ckpts[cls.__name__] = torch.load(io.BytesIO(blob), weights_only=True)
        runs[cls.__name__] = (params, opt)
    torch.save(ckpts, tmp_path / "ckpts.pt")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(qlora_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(pathlib.Path(__file__).parent), str(tmp_path / "ckpts.pt"),
                    str(tmp_path / "out.pt"), str(device)], check=True, env=env, timeout=300,
                   cwd=tmp_path)  # not the repository root: `python -c` would import the uncompiled source tree
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for cls in classes:
        params, opt = runs[cls.__name__]
        for a, b in zip(params, out[cls.__name__]["params"]):
            assert torch.equal(a.detach().cpu(), b), cls.__name__
        sa, sb = opt.state_dict()["state"], out[cls.__name__]["opt"]["state"]
        for k in sa:
            for key in sa[k]:
                assert torch.equal(sa[k][key].cpu(), sb[k][key].cpu()), (cls.__name__, k, key)


# ---------------------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("cls", ALL)
def test_nonfinite_gradients_skip_only_their_elements(device, cls):
    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(5000, generator=g).to(device))
    opt = cls([p], lr=_lr(cls), weight_decay=0.1)
    for _ in range(2):
        p.grad = torch.randn(5000, generator=g).to(device)
        opt.step()
    before = p.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    grad = torch.randn(5000, generator=g)
    bad = torch.tensor([0, 17, 300, 4999])
    grad[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    p.grad = grad.to(device)
    opt.step()
    skipped = torch.zeros(5000, dtype=torch.bool)
    skipped[bad] = True
    after = p.detach().cpu()
    assert torch.isfinite(after).all()
    assert torch.equal(after[skipped], before.cpu()[skipped])
    assert (after[~skipped] != before.cpu()[~skipped]).all()
    assert opt.state[p]["step"].item() == 3
    for t in opt.state[p].values():
        assert torch.isfinite(t.float()).all()
    if opt.state[p]["exp_avg"].dtype == torch.float32:  # float32 state: the skipped elements are untouched
        for key in O.Lion._moments if isinstance(opt, O.Lion) else O.AdamW._moments:
            assert torch.equal(opt.state[p][key].cpu()[skipped], state_before[key].cpu()[skipped])


def test_grad_scaler_skips_whole_steps_on_overflow():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([p])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale((p * p).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.state[p]["step"].item() == 1
    before = p.detach().clone()
    opt.zero_grad()
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.step(opt)  # found inf: the optimizer is not called
    scaler.update()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 1


def test_params_without_grad_are_skipped_and_zero_grad_works():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    opt = O.AdamW8bit([a, b])
    a.grad = torch.ones(10)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(10)) and torch.equal(b.detach(), torch.ones(10))
    assert len(opt.state[b]) == 0
    opt.zero_grad()
    assert a.grad is None


def test_cpu_accepts_and_ignores_paging():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = O.PagedAdamW8bit([p], gpu_budget_bytes=1 << 40)
    p.grad = torch.randn(5000)
    opt.step()
    assert opt.page_out() == 0
    opt.step()
    assert all(t.device.type == "cpu" for t in _state_tensors(opt))


def test_opcheck():
    p, g, m, v = torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300)
    torch.library.opcheck(ops.optimizer_step.default,
                          (p, g, m, v, None, None, "adamw", 1, 1e-3, 0.9, 0.999, 1e-8, 0.01))
    q1, q2 = torch.full((300,), 127, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8)
    a1, a2 = torch.zeros(2), torch.zeros(2)
    torch.library.opcheck(ops.optimizer_step.default, (p, g, q1, q2, a1, a2, "adamw", 1, 1e-3, 0.9, 0.999, 1e-8, 0.0))
    torch.library.opcheck(ops.optimizer_step.default, (p, g, m, None, None, None, "lion", 1, 1e-4, 0.9, 0.99, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_rejects_sparse_complex_and_unsupported_gradients():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = O.AdamW([p])
    p.grad = torch.eye(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    c = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    c.grad = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        O.PagedAdamW([c]).step()
    d = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    d.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        O.Lion([d]).step()
    h = torch.nn.Parameter(torch.randn(4))
    h.grad_dtype = None  # torch otherwise refuses the mismatched gradient itself
    h.grad = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 but the parameter is torch.float32"):
        O.AdamW([h]).step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(amsgrad=True), "amsgrad"),
    (dict(gpu_budget_bytes=1 << 30), "paged"), (dict(optim_bits=4), "optim_bits")])
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        O.AdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_rejects_mismatched_state_dicts():
    a = [torch.nn.Parameter(torch.randn(70, 90)), torch.nn.Parameter(torch.randn(10))]
    opt = O.AdamW8bit(a)
    for p in a:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    # same counts, other shapes
    other = [torch.nn.Parameter(torch.randn(90, 70)), torch.nn.Parameter(torch.randn(10))]
    fresh = O.AdamW8bit(other)
    with pytest.raises(ValueError, match=r"'exp_avg' has shape \(70, 90\), expected \(90, 70\)"):
        fresh.load_state_dict(sd)
    assert len(fresh.state) == 0  # nothing was loaded
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        O.AdamW8bit(a[:1]).load_state_dict(sd)
    with pytest.raises(ValueError, match="keeps \\['exp_avg', 'exp_avg_sq'\\]"):  # 8-bit state into 32-bit
        O.AdamW(a).load_state_dict(sd)
    bad = O.AdamW8bit(a).state_dict()
    bad["state"] = {0: {**sd["state"][0], "exp_avg_absmax": sd["state"][0]["exp_avg_absmax"].half()}}
    with pytest.raises(ValueError, match="'exp_avg_absmax' is torch.float16, expected torch.float32"):
        O.AdamW8bit(a).load_state_dict(bad)
    bad["state"] = {5: sd["state"][0]}
    with pytest.raises(ValueError, match="no group lists"):
        O.AdamW8bit(a).load_state_dict(bad)
    torch_sd = torch.optim.Adam(a, weight_decay=0.1).state_dict()
    with pytest.raises(ValueError, match="decoupled"):
        O.AdamW(a).load_state_dict(torch_sd)


def test_op_rejects_inconsistent_state():
    p, g = torch.randn(300), torch.randn(300)
    with pytest.raises(RuntimeError, match="state1 .* 300 elements"):
        ops.optimizer_step(p, g, torch.zeros(299), torch.zeros(300), None, None, "adamw", 1, 1e-3, 0.9, 0.999, 0, 0)
    with pytest.raises(RuntimeError, match="absmax1 must be a contiguous Float tensor of 2 elements"):
        ops.optimizer_step(p, g, torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8),
                           torch.zeros(3), torch.zeros(2), "adamw", 1, 1e-3, 0.9, 0.999, 0, 0)
    with pytest.raises(RuntimeError, match="invalid hyperparameters"):
        ops.optimizer_step(p, g, torch.zeros(300), torch.zeros(300), None, None, "adamw", 0, 1e-3, 0.9, 0.999, 0, 0)
    with pytest.raises(RuntimeError, match="'adamw' or 'lion'"):
        ops.optimizer_step(p, g, torch.zeros(300), None, None, None, "sgd", 1, 1e-3, 0.9, 0.999, 0, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.optimizer_step(torch.randn(20, 15).t(), torch.randn(15, 20), torch.zeros(300), None, None, None, "lion", 1,
                           1e-3, 0.9, 0.99, 0, 0)
    with pytest.raises(RuntimeError, match="paged memory is CUDA managed memory"):
        ops.paged_empty(1024, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# paging (CUDA only)


@needs_cuda
@pytest.mark.parametrize("cls", list(PAGED))
def test_paged_state_lives_in_managed_memory_and_pages_out(cls):
    torch.cuda.synchronize()
    p = torch.nn.Parameter(torch.randn(16 << 20, device="cuda"))  # 64 MiB of float32 parameters
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = cls([p], lr=_lr(cls)), PAGED[cls]([ref], lr=_lr(cls))  # the same optimizer, not paged
    grads = [torch.randn_like(p) for _ in range(3)]
    p.grad, ref.grad = grads[0], grads[0]
    opt.step()
    ref_opt.step()
    torch.cuda.synchronize()
    moved = opt.page_out()
    assert moved == opt.state_bytes() > 0
    # No assertion on free device memory here: a prefetch to the host is a hint, and the driver may keep
    # (or duplicate) the pages on the GPU. What must hold either way is below: the state comes back intact.
    torch.cuda.synchronize()
    for g in grads[1:]:  # the next step brings the state back; results equal the non-paged optimizer's
        p.grad, ref.grad = g, g
        opt.step()
        ref_opt.step()
    assert torch.equal(p, ref)
    for key in opt.state[p]:
        assert torch.equal(opt.state[p][key], ref_opt.state[ref][key])
    before_del = torch.cuda.mem_get_info()[0]
    nbytes = opt.state_bytes()
    del opt
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] - before_del >= 0.9 * nbytes  # managed buffers freed with the optimizer


@needs_cuda
def test_paged_allocation_refuses_more_than_free_memory():
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(RuntimeError, match="refusing a paged allocation"):
        ops.paged_empty(free + (1 << 30), torch.device("cuda"))


@needs_cuda
def test_gpu_budget_pages_out_after_each_step():
    p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
    opt = O.PagedAdamW8bit([p], gpu_budget_bytes=torch.cuda.mem_get_info()[1])  # always below the budget
    ref = torch.nn.Parameter(p.detach().clone())
    ref_opt = O.AdamW8bit([ref])
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, ref.grad = g, g
        opt.step()
        assert opt._paged_out
        ref_opt.step()
    assert torch.equal(p, ref)
