"""DDP and FSDP2 on CPU: each test run starts 2 processes itself (torch.distributed.run on a free port, gloo,
OMP_NUM_THREADS=1) on the tiny-llama fixture. `qlora-ext finetune --distributed {ddp,fsdp}` matches the
single-process run with the same global batch, step by step and in its final adapter; an FSDP2 run stopped at
a checkpoint and resumed continues exactly as the uninterrupted one; the 4-bit weights and their QuantStates
survive sharding, gathering and state-dict save / load, and the fused optimizers update and save DTensor
shards (fsdp_quant_worker.py); bad use fails with one line;
`estimate --world-size` gives the bytes per rank.

Tolerance against the single-process run: 1e-5 relative on losses, 1e-5 absolute on adapter weights (of size
~1e-2 to 1e-1). Each rank pads its half of a batch to its own longest sequence and the gradients are summed
across ranks by gloo, so float32 sums run in another order and over other shapes: results differ in the last
bits (measured: < 1e-6), never by a learning-rate-sized step. A resumed run repeats the same computation on
the same ranks, so it must match the uninterrupted one exactly.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import qlora_ext
from cli_fixtures import TINY_FLOAT, make_tiny_model_dir
from qlora_ext import estimate as E
from qlora_ext import train as T
from qlora_ext.cli import main
from qlora_ext.distributed import TORCHRUN_ENV, rank_share

# The directory holding the qlora_ext these tests import (the repository for an in-place build, site-packages
# for an installed one): never the source tree of an installed copy, which has no compiled _C.
PACKAGE_ROOT = pathlib.Path(qlora_ext.__file__).resolve().parents[1]
STEPS, SAVE = 6, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args, nproc=2):
    """(command, environment) of `python -m torch.distributed.run --nproc-per-node N ARGS` importing the
    qlora_ext under test."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *args]
    return cmd, env


def torchrun(*args, cwd, timeout=240, nproc=2) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node 2 ARGS` importing the qlora_ext under test."""
    cmd, env = torchrun_cmd(*args, nproc=nproc)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model_dir(root / "model")
    words = ["red", "blue", "cat", "dog", "sun", "sea", "oak", "ice", "fig", "owl", "ant"]
    train = root / "train.jsonl"  # 22 records in batches of 3: a batch of 1 leaves a rank without data
    train.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w + str(i), "output": "yes"})
                             + "\n" for i, w in enumerate(words * 2)))
    evald = root / "eval.jsonl"
    evald.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w, "output": "yes"}) + "\n"
                             for w in ("pen", "cup", "map")))
    return {"root": root, "model": str(model), "train": str(train), "eval": str(evald)}


def ft_args(tiny, out, *extra):
    # batch 3 over 2 ranks: shares of 2 and 1 sequences (uneven on purpose)
    return ["finetune", "--model", tiny["model"], "--data", tiny["train"], "--eval-data", tiny["eval"],
            "--output-dir", str(out), "--batch-size", "3", "--grad-accum", "2", "--lora-r", "4", "--lr", "1e-2",
            "--eval-batch-size", "4", "--no-progress", "--max-steps", str(STEPS), "--save-steps", str(SAVE),
            "--save-total-limit", "3", *extra]


@pytest.fixture(scope="module")
def runs(tiny):
    """Output dirs of the same run: single process, DDP, FSDP2, and FSDP2 resumed from its step-3 checkpoint."""
    root = tiny["root"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(ft_args(tiny, root / "single")) == 0
    finally:
        torch.set_num_threads(n)
    out = {"single": root / "single"}
    for mode in ("ddp", "fsdp"):
        res = torchrun("-m", "qlora_ext", *ft_args(tiny, root / mode, "--distributed", mode), cwd=root)
        out[mode] = root / mode
        out[mode + "_stdout"] = res.stdout
    # stopped after the step-3 checkpoint: drop what came later, as a crash would have
    res = root / "resumed"
    _truncate_to_save(root / "fsdp", res)
    torchrun("-m", "qlora_ext", *ft_args(tiny, res, "--distributed", "fsdp", "--resume"), cwd=root)
    out["resumed"] = res
    return out


def train_losses(out):
    return [r["loss"] for r in T.MetricsLog.read(out / "metrics.jsonl") if "eval" not in r]


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_matches_single_process(runs, mode):
    single, dist = train_losses(runs["single"]), train_losses(runs[mode])
    assert len(dist) == STEPS
    assert dist == pytest.approx(single, rel=1e-5)
    assert single[-1] < single[0] - 0.5  # it trained: the comparison is not between two idle runs
    a, b = adapter(runs["single"]), adapter(runs[mode])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # B moved away from 0
    # rank 0 alone reports: one summary on stdout, each step logged once, both evaluations
    summary = json.loads((runs[mode] / "summary.json").read_text())
    assert summary["distributed"] == mode and summary["world_size"] == 2
    assert runs[mode + "_stdout"].count("exact match") == 1
    recs = T.MetricsLog.read(runs[mode] / "metrics.jsonl")
    assert [r["step"] for r in recs if "eval" not in r] == list(range(1, STEPS + 1))
    evals = {r["eval"]: r for r in recs if "eval" in r}
    single_evals = {r["eval"]: r for r in T.MetricsLog.read(runs["single"] / "metrics.jsonl") if "eval" in r}
    assert evals.keys() == {"before", "after"}
    assert evals["after"]["loss"] == pytest.approx(single_evals["after"]["loss"], rel=1e-5)
    assert (runs[mode] / "loss_curve.png").is_file()


def test_fsdp_checkpoint_is_sharded(runs):
    ckpt = runs["fsdp"] / "checkpoints" / f"checkpoint-{SAVE}"
    shards = sorted(p.name for p in (ckpt / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert {"rng.safetensors", "rng.rank1.safetensors", "adapter_model.safetensors", "trainer_state.json"} <= \
        {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "optimizer.safetensors").exists()


def test_fsdp_resume_continues_exactly(runs):
    assert train_losses(runs["resumed"]) == train_losses(runs["fsdp"])
    a, b = adapter(runs["fsdp"]), adapter(runs["resumed"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def _truncate_to_save(src, dst):
    """A copy of run `src` as if it had stopped right after its step-SAVE checkpoint."""
    shutil.copytree(src, dst)
    kept = dst / "checkpoints" / f"checkpoint-{SAVE}"
    assert kept.is_dir()  # (the names were step-N once: a glob on those removed nothing and resumed at the end)
    later = [p for p in (dst / "checkpoints").glob("checkpoint-*") if p != kept]
    assert later, "no later checkpoint to drop: the resume would not be tested"
    for p in later:
        shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"checkpoint-{SAVE}\n")
    shutil.rmtree(dst / "adapter")
    (dst / "summary.json").unlink()


def test_fsdp_resume_on_another_number_of_ranks(runs, tiny):
    """A 2-rank FSDP2 checkpoint resumed on 1 rank: DCP reshards the adapter and optimizer state, and the run
    continues as the uninterrupted 2-rank run did (2 ranks and 1 process agree to 1e-5)."""
    res = tiny["root"] / "resumed_1rank"
    _truncate_to_save(runs["fsdp"], res)
    torchrun("-m", "qlora_ext", *ft_args(tiny, res, "--distributed", "fsdp", "--resume"), cwd=tiny["root"], nproc=1)
    assert json.loads((res / "summary.json").read_text())["world_size"] == 1
    assert train_losses(res) == pytest.approx(train_losses(runs["fsdp"]), rel=1e-5)
    a, b = adapter(runs["fsdp"]), adapter(res)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_ctrl_c_under_torchrun_checkpoints_every_rank(tiny, tmp_path):
    """Ctrl-C in the terminal of a torchrun: SIGINT reaches torchrun and every rank at once (and torchrun
    forwards it to the ranks again). Every rank finishes its step, they checkpoint together (each rank's
    shard of the optimizer state in the DCP directory) and all stop with the interrupted status."""
    import signal
    import time
    out = tmp_path / "run"
    args = ft_args(tiny, out, "--distributed", "fsdp")
    args[args.index("--max-steps") + 1] = "100000"
    cmd, env = torchrun_cmd("-m", "qlora_ext", *args)
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            m = out / "metrics.jsonl"
            if m.is_file() and sum('"loss"' in ln and '"eval"' not in ln for ln in m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert p.poll() is None, "the run ended before it could be interrupted"
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert stderr.count("interrupted at step") == 2, stderr[-3000:]
    step = int(stderr.split("interrupted at step")[1].split(";")[0])
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"checkpoint-{step}"
    shards = sorted(p.name for p in (out / "checkpoints" / latest / "optimizer").glob("*.distcp"))
    assert len(shards) == 2, shards  # one file per rank


def test_fsdp_quant_state_survives_sharding_and_state_dicts(tmp_path):
    res = torchrun(str(pathlib.Path(__file__).with_name("fsdp_quant_worker.py")), str(TINY_FLOAT), str(tmp_path / "ckpt"),
                   cwd=tmp_path)
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")] == [
        "ok sharded", "ok gathered", "ok forward", "ok full state dict", "ok sharded save and load", "ok optimizer"]


# ---------------------------------------------------------------------------------------------------------
# pieces and bad use, in process


def test_rank_share_splits_like_chunk():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [rank_share(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def one_line_error(capsys, rc, pattern):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qlora-ext") and "error:" in err and pattern in err, err


def test_distributed_needs_torchrun(tiny, tmp_path, capsys, monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    rc = main(ft_args(tiny, tmp_path / "o", "--distributed", "ddp"))
    one_line_error(capsys, rc, "must be started by torchrun")
    assert not (tmp_path / "o").exists()


def test_bad_distributed_options(tiny, tmp_path, capsys):
    rc = main(ft_args(tiny, tmp_path / "o", "--distributed", "fsdp", "--optim", "paged_adamw_8bit"))
    one_line_error(capsys, rc, "cannot be used with --distributed fsdp")
    with pytest.raises(SystemExit) as e:
        main(ft_args(tiny, tmp_path / "o", "--distributed", "zero3"))
    assert e.value.code == 2
    assert "--distributed" in capsys.readouterr().err


def test_estimate_per_rank():
    shape = E.resolve_shape("65B")
    one = E.estimate(shape, "qlora", batch=8)
    for world in (2, 4, 8):
        f = E.per_rank(shape, "qlora", world, "fsdp", batch=8)
        for c in E.SHARDED:
            assert f[c] == -(-one[c] // world)
        assert f["activations"] == E.estimate(shape, "qlora", batch=8 // world)["activations"]
        assert f["buffers"] > 0 and f["total"] == sum(f[c] for c in E.COMPONENTS) + f["buffers"]
        d = E.per_rank(shape, "qlora", world, "ddp", batch=8)
        assert d["weights"] == one["weights"] and d["buffers"] == one["gradients"]
        assert f["total"] < d["total"]
    totals = [E.per_rank(shape, "qlora", w, batch=8)["total"] for w in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    assert E.per_rank(shape, "qlora", 1, batch=8)["total"] == one["total"]  # one rank: nothing changes
    with pytest.raises(ValueError, match="world_size"):
        E.per_rank(shape, "qlora", 0)
    with pytest.raises(ValueError, match="strategy"):
        E.per_rank(shape, "qlora", 2, "zero3")


def test_cli_estimate_world_size(capsys):
    assert main(["estimate", "--model", "7B", "--world-size", "4", "--batch-size", "8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["distributed"]["world_size"] == 4 and rep["distributed"]["strategy"] == "fsdp"
    assert rep["distributed"]["per_rank"]["qlora"]["total"] < rep["bytes"]["qlora"]["total"]
    assert main(["estimate", "--model", "7B", "--world-size", "4", "--strategy", "ddp"]) == 0
    assert "per rank, 4 ranks, ddp" in capsys.readouterr().out
    one_line_error(capsys, main(["estimate", "--model", "7B", "--world-size", "0"]), "--world-size")
