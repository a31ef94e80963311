"""The robustness suite: bad input is refused with one clear message, never a crash, a hang or silence; a
kill -9 inside checkpoint writing loses nothing that --resume cannot restore.

* LIBRARY_CASES: native ops, QuantState.from_dict, optimizers, LoRA arguments, clip norms, adapter loading.
  One worker process imports torch and qlora_ext once, then runs every case in its own forked child (a crash
  in a kernel kills only that child: its signal is the case's failure). Each case must raise the expected
  exception class with a one-line message naming the problem.
* CLI cases: `python -m qlora_ext ...` in a subprocess each: a non-zero exit, the failure as one line on
  stderr `qlora-ext...: error: ...` naming the problem (after any status lines), no traceback.
* Fault injection: kill -9 at points inside checkpoint writing (os.fsync / os.replace / os.rename calls, as a
  sitecustomize hook sees them), then --resume: the losses equal the uninterrupted run's.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
A_KEY = "base_model.model.proj.lora_A.weight"  # also defined in _SETUP

# ---------------------------------------------------------------------------------------------------------
# library cases: (name, code, expected exception class, substrings the message must contain)
# The code runs in a namespace prepared by _SETUP (torch, F, ops, optim, nn, Q, a small 4-bit model `net`,
# a saved adapter directory `adir`, a bitsandbytes-style state dict `sd` of one plain and one DQ weight).
_SETUP = r'''
import copy, json, math, os, pathlib, shutil, struct, sys
import torch
from torch import nn
import qlora_ext as Q
from qlora_ext import functional as F, optim
from qlora_ext._ops import ops
from qlora_ext.distributed import clip_grad_norm
torch.set_num_threads(1)
torch.manual_seed(0)
W = torch.randn(32, 64)
packed, st = F.quantize_4bit(W, 64, "nf4", double_quant=False)
packed_dq, st_dq = F.quantize_4bit(W, 64, "nf4", double_quant=True)
sd = {"p.weight": packed, **st.as_dict("p.weight."), "q.weight": packed_dq, **st_dq.as_dict("q.weight.")}
def with_(key, value, base=None):
    d = dict(sd if base is None else base); d[key] = value; return d
def with_json(prefix, **changes):
    k = [k for k in sd if k.startswith(prefix + "quant_state.")][0]
    meta = json.loads(bytes(sd[k].tolist())); meta.update(changes)
    return with_(k, torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8))
def nan_at(t, i=0, v=float("nan")):
    t = t.clone(); t.view(-1)[i] = v; return t
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Q.nn.Linear4bit.from_linear(nn.Linear(64, 32))
        self.out = Q.nn.Linear4bit.from_linear(nn.Linear(32, 16))
    def forward(self, x):
        return self.out(self.proj(x))
def net():
    torch.manual_seed(0); return Net()
tmp = pathlib.Path(os.environ["QX_ROBUST_TMP"])
adir = tmp / "adapter"
if not adir.exists():
    m = Q.add_lora(net(), r=4, lora_alpha=8, lora_dropout=0.0)
    Q.save_adapter(m, adir)
def adapter_copy(name):
    d = tmp / name; shutil.rmtree(d, ignore_errors=True); shutil.copytree(adir, d); return d
def rewrite_weights(d, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "adapter_model.safetensors")); fn(t)
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d
def rewrite_config(d, **changes):
    p = d / "adapter_config.json"; cfg = json.loads(p.read_text()); cfg.update(changes)
    p.write_text(json.dumps(cfg)); return d
A_KEY = "base_model.model.proj.lora_A.weight"
def params():
    return [nn.Parameter(torch.randn(8, 8))]
def step(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
'''

LIBRARY_CASES = [
    # ---- native ops and the functional API ----
    ("dequantize: huge shape over small buffers",
     "F.dequantize_4bit(packed, F.QuantState(st.absmax, (1 << 25, 1 << 25), torch.float32, 64, 'nf4'))",
     ValueError, ["packed weight has", "needs"]),
    ("raw op: huge shape over small buffers",
     "ops.dequantize_4bit(packed.view(-1), st.absmax, None, None, 0.0, 256, 64, 'nf4', [1 << 25, 1 << 25], "
     "torch.float32)", RuntimeError, ["packed weight has"]),
    ("raw op: shape overflowing int64",
     "ops.dequantize_4bit(packed.view(-1), st.absmax, None, None, 0.0, 256, 64, 'nf4', [1 << 40, 1 << 40], "
     "torch.float32)", RuntimeError, ["too large"]),
    ("raw op: nested_blocksize near INT64_MAX",
     "ops.dequantize_4bit(packed_dq.view(-1), st_dq.absmax, st_dq.nested_absmax, st_dq.nested_code, 0.0, "
     "(1 << 63) - 1, 64, 'nf4', [32, 64], torch.float32)", RuntimeError, ["nested_blocksize"]),
    ("raw op: 8-bit blocksize near INT64_MAX",
     "ops.quantize_8bit(torch.randn(10), F.get_code('dynamic_signed'), (1 << 63) - 1)", RuntimeError,
     ["blocksize"]),
    ("raw op: dequantize_8bit absmax too short",
     "ops.dequantize_8bit(torch.zeros(1000, dtype=torch.uint8), torch.ones(1), F.get_code('dynamic_signed'), 256, "
     "torch.float32)", RuntimeError, ["absmax must be float32 with 4 entries"]),
    ("quantize_4bit: NaN weight", "F.quantize_4bit(nan_at(W, 5))", ValueError, ["NaN or Inf"]),
    ("quantize_4bit: Inf weight", "F.quantize_4bit(nan_at(W, 5, float('inf')))", ValueError, ["NaN or Inf"]),
    ("quantize_4bit: blocksize 48", "F.quantize_4bit(W, 48)", ValueError, ["blocksize", "48"]),
    ("quantize_4bit: int weight", "F.quantize_4bit(torch.ones(4, 4, dtype=torch.int32))", TypeError, ["int32"]),
    ("quantize_blockwise: NaN", "F.quantize_blockwise(nan_at(torch.randn(300), 7))", ValueError, ["NaN or Inf"]),
    ("quantize_blockwise: int input", "F.quantize_blockwise(torch.ones(4, dtype=torch.int64))", TypeError,
     ["int64"]),
    ("quantize_blockwise: blocksize 0", "F.quantize_blockwise(torch.randn(4), blocksize=0)", ValueError,
     ["blocksize", "0"]),
    ("matmul_4bit: wrong inner dimension", "F.matmul_4bit(torch.randn(3, 65), packed, st)", ValueError,
     ["[3, 65]", "[32, 64]"]),
    ("matmul_4bit: truncated packed weight", "F.matmul_4bit(torch.randn(3, 64), packed[:-1], st)", ValueError,
     ["packed weight has"]),
    ("dequantize_4bit: nested_absmax too short",
     "s = F.QuantState(st_dq.absmax, st_dq.shape, torch.float32, 64, 'nf4', offset=st_dq.offset, "
     "nested_absmax=torch.ones(0), nested_code=st_dq.nested_code); F.dequantize_4bit(packed_dq, s)", ValueError,
     ["nested_absmax has 0 entries"]),
    ("dequantize_4bit: out too small", "F.dequantize_4bit(packed, st, out=torch.empty(7))", ValueError,
     ["out must be contiguous"]),
    # ---- QuantState.from_dict: untrusted checkpoints ----
    ("from_dict: NaN in plain float32 absmax",
     "F.QuantState.from_dict(with_('p.weight.absmax', nan_at(st.absmax)), 'p.weight.')", ValueError,
     ["p.weight.absmax", "nan"]),
    ("from_dict: Inf in plain absmax",
     "F.QuantState.from_dict(with_('p.weight.absmax', nan_at(st.absmax, 3, float('inf'))), 'p.weight.')",
     ValueError, ["p.weight.absmax", "entry 3"]),
    ("from_dict: Inf in nested_absmax",
     "F.QuantState.from_dict(with_('q.weight.nested_absmax', nan_at(st_dq.nested_absmax, 0, float('inf'))), "
     "'q.weight.')", ValueError, ["q.weight.nested_absmax"]),
    ("from_dict: NaN in nested_quant_map",
     "F.QuantState.from_dict(with_('q.weight.nested_quant_map', nan_at(st_dq.nested_code, 9)), 'q.weight.')",
     ValueError, ["q.weight.nested_quant_map"]),
    ("from_dict: NaN nested_offset", "F.QuantState.from_dict(with_json('q.weight.', nested_offset=float('nan')), "
     "'q.weight.')", ValueError, ["nested_offset"]),
    ("from_dict: nested_offset overflowing float32",
     "F.QuantState.from_dict(with_json('q.weight.', nested_offset=1e39), 'q.weight.')", ValueError,
     ["nested_offset"]),
    ("from_dict: NaN in quant_map",
     "F.QuantState.from_dict(with_('p.weight.quant_map', nan_at(st.code)), 'p.weight.')", ValueError,
     ["p.weight.quant_map"]),
    ("from_dict: huge shape over small buffers",
     "F.QuantState.from_dict(with_json('p.weight.', shape=[1 << 24, 1 << 24]), 'p.weight.')", ValueError,
     ["p.weight.absmax", "expected"]),
    ("from_dict: shape beyond 2**48 elements",
     "F.QuantState.from_dict(with_json('p.weight.', shape=[1 << 40, 1 << 40]), 'p.weight.')", ValueError,
     ["shape"]),
    ("from_dict: negative dimension",
     "F.QuantState.from_dict(with_json('p.weight.', shape=[-32, 64]), 'p.weight.')", ValueError, ["shape"]),
    ("from_dict: blocksize 0", "F.QuantState.from_dict(with_json('p.weight.', blocksize=0), 'p.weight.')",
     ValueError, ["blocksize"]),
    ("from_dict: garbage JSON",
     "F.QuantState.from_dict(with_('p.weight.quant_state.bitsandbytes__nf4', torch.tensor([0xff, 0x7b], "
     "dtype=torch.uint8)), 'p.weight.')", ValueError, ["quant_state.bitsandbytes__nf4", "malformed"]),
    ("from_dict: absmax of the wrong dtype",
     "F.QuantState.from_dict(with_('p.weight.absmax', st.absmax.half()), 'p.weight.')", ValueError,
     ["p.weight.absmax", "float16"]),
    ("Linear4bit.load_state_dict: NaN absmax",
     "m = net(); s = m.proj.state_dict(); s['weight.absmax'] = nan_at(s['weight.absmax']) "
     "if s['weight.absmax'].dtype == torch.float32 else s['weight.absmax']; "
     "s['weight.nested_absmax'] = nan_at(s['weight.nested_absmax']); m.proj.load_state_dict(s)",
     ValueError, ["nested_absmax"]),
    # ---- optimizers ----
    ("AdamW lr=nan", "optim.AdamW(params(), lr=float('nan'))", ValueError, ["learning rate", "nan"]),
    ("AdamW lr=inf", "optim.AdamW(params(), lr=float('inf'))", ValueError, ["learning rate", "inf"]),
    ("AdamW eps=inf", "optim.AdamW(params(), eps=float('inf'))", ValueError, ["epsilon", "inf"]),
    ("AdamW eps=nan", "optim.AdamW(params(), eps=float('nan'))", ValueError, ["epsilon", "nan"]),
    ("AdamW betas nan", "optim.AdamW(params(), betas=(float('nan'), 0.999))", ValueError, ["betas"]),
    ("AdamW beta2 = 1", "optim.AdamW(params(), betas=(0.9, 1.0))", ValueError, ["betas"]),
    ("AdamW weight_decay=inf", "optim.AdamW(params(), weight_decay=float('inf'))", ValueError,
     ["weight_decay", "inf"]),
    ("PagedAdamW8bit lr=-1", "optim.PagedAdamW8bit(params(), lr=-1.0)", ValueError, ["learning rate"]),
    ("Lion lr=inf", "optim.Lion(params(), lr=float('inf'))", ValueError, ["learning rate"]),
    ("AdamW: group lr set to nan before a step",
     "o = optim.AdamW(params()); o.param_groups[0]['lr'] = float('nan'); step(o)", ValueError,
     ["learning rate", "nan"]),
    ("AdamW: load_state_dict with an inf lr",
     "o = optim.AdamW(params()); step(o); s = o.state_dict(); s['param_groups'][0]['lr'] = float('inf'); "
     "optim.AdamW(o.param_groups[0]['params']).load_state_dict(s)", ValueError, ["learning rate", "inf"]),
    ("AdamW: load_state_dict with a wrong-shape state",
     "o = optim.AdamW(params()); step(o); s = o.state_dict(); s['state'][0]['exp_avg'] = torch.zeros(3); "
     "optim.AdamW(o.param_groups[0]['params']).load_state_dict(s)", ValueError, ["exp_avg", "(3,)"]),
    # ---- LoRA and clipping ----
    ("add_lora lora_alpha=nan", "Q.add_lora(net(), r=4, lora_alpha=float('nan'))", ValueError, ["lora_alpha"]),
    ("add_lora lora_alpha=inf", "Q.add_lora(net(), r=4, lora_alpha=float('inf'))", ValueError, ["lora_alpha"]),
    ("add_lora lora_dropout=nan", "Q.add_lora(net(), r=4, lora_dropout=float('nan'))", ValueError,
     ["lora_dropout"]),
    ("add_lora lora_dropout=1", "Q.add_lora(net(), r=4, lora_dropout=1.0)", ValueError, ["lora_dropout"]),
    ("add_lora r=0", "Q.add_lora(net(), r=0)", ValueError, ["r must be"]),
    ("add_lora leaves the model untouched on a bad argument",
     "m = net()\ntry:\n    Q.add_lora(m, r=4, lora_alpha=float('nan'))\nexcept ValueError:\n    pass\n"
     "assert type(m.proj).__name__ == 'Linear4bit' and all(p.requires_grad for p in m.parameters() "
     "if p.is_floating_point()), 'modified'\nraise ValueError('untouched')", ValueError, ["untouched"]),
    ("LoraLinear4bit.add_adapter alpha=inf",
     "Q.nn.LoraLinear4bit.from_linear4bit(net().proj, 4, float('inf'))", ValueError, ["lora_alpha"]),
    ("clip_grad_norm max_norm=nan", "clip_grad_norm(params(), float('nan'))", ValueError, ["max_grad_norm", "nan"]),
    ("clip_grad_norm max_norm=inf", "clip_grad_norm(params(), float('inf'))", ValueError, ["max_grad_norm"]),
    # ---- adapters ----
    ("load_adapter: wrong shape",
     "Q.load_adapter(net(), rewrite_weights(adapter_copy('shape'), lambda t: t.__setitem__(A_KEY, "
     "torch.zeros(5, 64))))", ValueError, [A_KEY, "[5, 64]", "[4, 64]"]),
    ("load_adapter: integer dtype",
     "Q.load_adapter(net(), rewrite_weights(adapter_copy('dtype'), lambda t: t.__setitem__(A_KEY, "
     "torch.zeros(4, 64, dtype=torch.int32))))", ValueError, [A_KEY, "int32"]),
    ("load_adapter: NaN weight",
     "Q.load_adapter(net(), rewrite_weights(adapter_copy('nan'), lambda t: t.__setitem__(A_KEY, "
     "nan_at(t[A_KEY]))))", ValueError, [A_KEY, "NaN"]),
    ("load_adapter: truncated safetensors",
     "d = adapter_copy('trunc'); p = d / 'adapter_model.safetensors'; b = p.read_bytes(); "
     "p.write_bytes(b[:len(b) - 100]); Q.load_adapter(net(), d)", ValueError,
     ["adapter_model.safetensors", "truncated"]),
    ("load_adapter: empty safetensors",
     "d = adapter_copy('empty'); (d / 'adapter_model.safetensors').write_bytes(b''); Q.load_adapter(net(), d)",
     ValueError, ["adapter_model.safetensors"]),
    ("load_adapter: garbage config", "d = adapter_copy('cfg'); (d / 'adapter_config.json').write_bytes(b'\\xff{'); "
     "Q.load_adapter(net(), d)", ValueError, ["adapter_config.json"]),
    ("load_adapter: lora_alpha NaN in the config",
     "Q.load_adapter(net(), rewrite_config(adapter_copy('alpha'), lora_alpha=float('nan')))", ValueError,
     ["lora_alpha"]),
    ("load_adapter: r a string", "Q.load_adapter(net(), rewrite_config(adapter_copy('r'), r='8'))", ValueError,
     ["'r'"]),
    ("load_adapter: missing directory", "Q.load_adapter(net(), tmp / 'nowhere')", ValueError,
     ["nowhere", "not found"]),
]

_WORKER = r'''
import os, sys, json, traceback
os.environ.setdefault("OMP_NUM_THREADS", "1")
ns = {}
exec(compile(SETUP, "<setup>", "exec"), ns)
cases = json.loads(sys.stdin.read())
out = open(sys.argv[1], "w")
for name, code in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child runs one case and reports through the pipe; its exit status is the verdict
        os.close(r)
        try:
            exec(compile(code, name, "exec"), dict(ns))
            msg, status = "accepted silently", 10
        except Exception as exc:
            msg, status = type(exc).__name__ + "\x00" + str(exc), 11
            if type(exc).__name__ not in ("ValueError", "TypeError", "KeyError") and not isinstance(exc, RuntimeError):
                msg += "\x00" + traceback.format_exc()
        os.write(w, msg.encode("utf-8", "replace"))
        os.close(w)
        os._exit(status)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out.write(json.dumps({"name": name, "status": status, "msg": b"".join(chunks).decode()}) + "\n")
    out.flush()
'''


@pytest.fixture(scope="module")
def library_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    results = tmp / "results.jsonl"
    env = dict(os.environ, QX_ROBUST_TMP=str(tmp), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", f"SETUP = {_SETUP!r}\n" + _WORKER, str(results)],
                          input=json.dumps([(n, c) for n, c, _, _ in LIBRARY_CASES]), text=True,
                          capture_output=True, env=env, cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in map(json.loads, results.read_text().splitlines())}


@pytest.mark.parametrize("name,code,exc,needles", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input(library_results, name, code, exc, needles):
    r = library_results.get(name)
    assert r is not None, "the worker never reported this case"
    st = r["status"]
    assert os.WIFEXITED(st), f"crashed with signal {os.WTERMSIG(st) if os.WIFSIGNALED(st) else st}"
    assert os.WEXITSTATUS(st) == 11, f"not refused: {r['msg']}"
    cls, msg, *tb = r["msg"].split("\x00")
    assert cls == exc.__name__, f"{cls}: {msg}" + (tb[0] if tb else "")
    assert "\n" not in msg.strip(), f"the message is not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"


# ---------------------------------------------------------------------------------------------------------
# CLI cases: python -m qlora_ext in a subprocess; (name, argv with {model} {data} {tmp} placeholders, files to
# create under tmp, substrings of the one stderr line)

@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    from cli_fixtures import make_tiny_model_dir
    root = tmp_path_factory.mktemp("robust_cli")
    model = make_tiny_model_dir(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w, "output": "yes"}) + "\n"
                            for w in ("red", "blue", "cat", "dog", "sun", "sea", "oak", "ice")))
    return {"root": root, "model": model, "data": data}


def _ft(*extra):
    return ["finetune", "--model", "{model}", "--data", "{data}", "--output-dir", "{tmp}/out", "--batch-size", "4",
            "--lora-r", "4", "--max-steps", "2", "--no-progress", "--no-eval-before", *extra]


def _model_dir(name, files):
    """A model directory `name` holding the fixture's config and tokenizer (not its weights) and `files`."""
    return {f"{name}/": "@fixture-without-weights", **{f"{name}/{k}": v for k, v in files.items()}}


# Each case: one line naming the problem, non-zero exit, no traceback.
PASSING_CLI_CASES = [
    ("missing data file", _ft("--data", "{tmp}/missing.jsonl"), {}, ["missing.jsonl"]),
    ("lr zero", _ft("--lr", "0"), {}, ["--lr"]),
    ("lora dropout 1.5", _ft("--lora-dropout", "1.5"), {}, ["--lora-dropout"]),
    ("model path that does not exist", _ft("--model", "{tmp}/nowhere"), {}, ["nowhere"]),
]

# Fixed with the CLI's top-level handler (issue 21): before it, each ended in a traceback or a silent success.
CLI_CASES = [
    ("non-UTF-8 data file", _ft("--data", "{tmp}/latin1.jsonl"),
     {"latin1.jsonl": b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n'}, ["latin1.jsonl"]),
    ("model dir without weights", _ft("--model", "{tmp}/noweights"), _model_dir("noweights", {}), ["noweights"]),
    ("model dir with pickle weights", _ft("--model", "{tmp}/pickled"),
     _model_dir("pickled", {"pytorch_model.bin": b"\x80\x04junk"}), ["pickled"]),
    ("model dir with a truncated safetensors", _ft("--model", "{tmp}/cut"),
     _model_dir("cut", {"model.safetensors": "@truncated"}), ["cut", "model.safetensors"]),
    ("--lr nan", _ft("--lr", "nan"), {}, ["--lr"]),
    ("--lr inf", _ft("--lr", "inf"), {}, ["--lr"]),
    ("--lora-alpha nan", _ft("--lora-alpha", "nan"), {}, ["--lora-alpha"]),
    ("--max-grad-norm nan", _ft("--max-grad-norm", "nan"), {}, ["--max-grad-norm"]),
    ("--target-modules matching nothing", _ft("--target-modules", "no_such_layer"), {}, ["no_such_layer"]),
    # a regular file where a parent directory should be: unwritable for every user, root included
    ("unwritable output dir", _ft("--output-dir", "{tmp}/ro/out"), {"ro": "not a directory"}, ["ro"]),
    ("garbage resume state", _ft("--output-dir", "{tmp}/run", "--resume"), {"run/": "@garbage-run"}, ["run"]),
    ("eval with a wrong-shape adapter", ["eval", "--model", "{model}", "--data", "{data}", "--adapter", "{tmp}/ad"],
     {"ad/": "@adapter-wrong-shape"}, ["lora_A"]),
    ("eval with a truncated adapter", ["eval", "--model", "{model}", "--data", "{data}", "--adapter", "{tmp}/ad"],
     {"ad/": "@adapter-truncated"}, ["adapter_model.safetensors"]),
]


def _make_files(tmp: pathlib.Path, files: dict, env: dict):
    from safetensors.torch import save_file
    import torch
    fixture = env["model"]
    for rel, content in files.items():
        p = tmp / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif content == "@fixture-without-weights":
            for f in fixture.iterdir():
                if f.is_file() and f.name != "model.safetensors":
                    (p / f.name).write_bytes(f.read_bytes())
        elif content == "@truncated":
            b = (fixture / "model.safetensors").read_bytes()
            p.write_bytes(b[:len(b) // 2])
        elif content == "@garbage-run":
            # a run directory with state files a resume would read, all garbage
            (p / "run_config.json").write_bytes(b"\x00garbage")
            (p / "checkpoints").mkdir()
            (p / "checkpoints" / "latest").write_text("step-000002\n")
            ck = p / "checkpoints" / "step-000002"
            ck.mkdir()
            for name in ("trainer_state.json", "optimizer.json", "rng.json"):
                (ck / name).write_bytes(b"")
            (ck / "optimizer.safetensors").write_bytes(b"garbage")
        elif content.startswith("@adapter"):
            import qlora_ext as Q
            m = Q.add_lora(Q.load_quantized(str(fixture), Q.QLoRAConfig()), r=4)
            Q.save_adapter(m, p)
            w = p / "adapter_model.safetensors"
            if content == "@adapter-truncated":
                b = w.read_bytes()
                w.write_bytes(b[:len(b) - 64])
            else:
                from safetensors.torch import load_file
                t = load_file(str(w))
                k = sorted(k for k in t if "lora_A" in k)[0]
                t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
                save_file(t, str(w), metadata={"format": "pt"})
        else:
            p.write_text(content)


def _run_cli(cli_env, tmp_path, argv, files):
    _make_files(tmp_path, files, cli_env)
    subst = {"model": str(cli_env["model"]), "data": str(cli_env["data"]), "tmp": str(tmp_path)}
    argv = [a.format(**subst) for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "qlora_ext", *argv], capture_output=True, text=True,
                          errors="replace", env=env, cwd=tmp_path, timeout=300)


def _check_one_line_error(r, needles):
    err = r.stderr.strip()
    assert r.returncode not in (0, None) and r.returncode > 0, f"exit {r.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    # status lines printed before the failure are fine; the failure itself is one line, the last one
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"qlora-ext[\w -]*: error: ", ln)]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"


@pytest.mark.parametrize("name,argv,files,needles", PASSING_CLI_CASES + CLI_CASES,
                         ids=[c[0] for c in PASSING_CLI_CASES + CLI_CASES])
def test_cli_bad_input(cli_env, tmp_path, name, argv, files, needles):
    _check_one_line_error(_run_cli(cli_env, tmp_path, argv, files), needles)


# ---------------------------------------------------------------------------------------------------------
# fault injection: kill -9 inside checkpoint writing, then --resume

_HOOK = textwrap.dedent(r'''
    # sitecustomize for the fault-injection test: counts the calls that make files durable or publish them
    # (os.fsync, os.replace, os.rename) and, with QX_FAULT_KILL_AT=N, sends itself SIGKILL at the N-th.
    # QX_FAULT_LOG: appends "N name last-logged-step" per call (the step read from metrics.jsonl).
    import json, os, signal
    _kill_at = int(os.environ.get("QX_FAULT_KILL_AT", "0"))
    _log = os.environ.get("QX_FAULT_LOG")
    _metrics = os.environ.get("QX_FAULT_METRICS")
    _count = [0]
    def _last_step():
        try:
            with open(_metrics) as f:
                steps = [json.loads(ln).get("step", 0) for ln in f if ln.strip().endswith("}")]
            return max(steps) if steps else 0
        except OSError:
            return 0
    def _wrap(name, fn):
        def hooked(*a, **k):
            _count[0] += 1
            if _log:
                with open(_log, "a") as f:
                    f.write(f"{_count[0]} {name} {_last_step()}\n")
            if _count[0] == _kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return hooked
    for _n in ("fsync", "replace", "rename"):
        setattr(os, _n, _wrap(_n, getattr(os, _n)))
''')


def _losses(metrics: pathlib.Path):
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"], r["lr"]) for r in recs if "eval" not in r and "loss" in r]


def test_kill_9_inside_checkpoint_writing_then_resume(cli_env, tmp_path):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_HOOK)
    argv = ["--model", str(cli_env["model"]), "--data", str(cli_env["data"]), "--batch-size", "4", "--lora-r", "4",
            "--lr", "1e-2", "--max-steps", "6", "--save-steps", "2", "--no-progress", "--no-eval-before"]

    def run(out, resume=False, **hook_env):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(hook_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            QX_FAULT_METRICS=str(out / "metrics.jsonl"), **hook_env)
        cmd = [sys.executable, "-m", "qlora_ext", "finetune", *argv, "--output-dir", str(out)]
        return subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    # the uninterrupted run, logging every hooked call with the last step logged when it happened
    log = tmp_path / "calls.log"
    ref = run(tmp_path / "ref", QX_FAULT_LOG=str(log))
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_losses = _losses(tmp_path / "ref" / "metrics.jsonl")
    assert [s for s, _, _ in ref_losses] == list(range(1, 7))
    calls = [ln.split() for ln in log.read_text().splitlines()]
    # calls made after step 3 was logged: the checkpoint of step 2 is complete on disk by then, so a resume
    # must continue from it (or a later one), never start again from step 0
    after = [int(i) for i, _, step in calls if int(step) >= 3]
    assert len(after) >= 3, calls
    points = sorted({after[0], after[len(after) // 2]})  # two points keep the test short (5 runs of the CLI)
    for k in points:
        out = tmp_path / f"killed-{k}"
        r = run(out, QX_FAULT_KILL_AT=str(k))
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr[-2000:])
        before = (out / "metrics.jsonl").read_text().splitlines()
        r = run(out, resume=True)
        assert r.returncode == 0, (k, r.stderr[-3000:])
        assert _losses(out / "metrics.jsonl") == ref_losses, k  # bit-identical losses and learning rates
        # the records of steps before the surviving checkpoint were kept, not recomputed (a restart from step
        # 0 would rewrite them with new timings)
        assert (out / "metrics.jsonl").read_text().splitlines()[:2] == before[:2], k
