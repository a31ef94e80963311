"""tools/make_model.py on the tiny size (the big sizes are benchmarks: bench/bench_big_load.py, bench/results):
both layouts load with transformers through QLoRAConfig, and the 4-bit layout's bytes are exactly what
quantizing the float layout's tensors gives."""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_model.py"

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "tiny"
    res = subprocess.run([sys.executable, str(TOOL), "--size", "tiny", "--layout", "both", "--out", str(out),
                          "--shard-size", "150KB"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    return out, out.with_name("tiny-nf4")


def _read_all(directory: pathlib.Path):
    from safetensors.torch import load_file
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    sd = {}
    for f in files:
        sd.update(load_file(str(directory / f)))
    assert set(sd) == set(index["weight_map"])
    return sd, files


def test_layouts_are_sharded_as_transformers_writes_them(made):
    flt, nf4 = made
    for d in (flt, nf4):
        sd, files = _read_all(d)
        assert len(files) > 1 and files[0].startswith("model-00001-of-")
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), name
    cfg = json.loads((nf4 / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True and qc["load_in_4bit"] is True
    assert "quantization_config" not in json.loads((flt / "config.json").read_text())
    fsd, _ = _read_all(flt)
    assert all(t.dtype == torch.bfloat16 for t in fsd.values())
    w = fsd["model.layers.0.mlp.down_proj.weight"].float()
    assert 0.015 < w.std().item() < 0.025  # LLaMA's initialisation scale
    assert torch.equal(fsd["model.norm.weight"], torch.ones_like(fsd["model.norm.weight"]))


def test_nf4_layout_bytes_equal_quantizing_the_float_layout(made):
    import qlora_ext as Q
    flt, nf4 = made
    fsd, _ = _read_all(flt)
    qsd, _ = _read_all(nf4)
    linear = [k for k in fsd if k.endswith("_proj.weight")]
    assert len(linear) == 14
    for k, v in fsd.items():
        if k in linear:
            packed, state = Q.quantize_4bit(v, 64, "nf4", True)
            expect = {k: packed, **state.as_dict(k + ".")}
            got = {e: qsd[e] for e in qsd if e == k or e.startswith(k + ".")}
            assert set(got) == set(expect), k
            for e in expect:
                assert got[e].dtype == expect[e].dtype and torch.equal(got[e], expect[e]), e
        else:
            assert torch.equal(qsd[k], v), k  # embeddings, norms, head: the same bfloat16 tensors


def test_both_layouts_load_with_transformers(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qlora_ext as Q
    flt, nf4 = made
    a = AutoModelForCausalLM.from_pretrained(str(flt), quantization_config=Q.QLoRAConfig(), dtype=torch.float32)
    b = Q.load_quantized(str(nf4), Q.QLoRAConfig(compute_dtype=torch.float32), dtype=torch.float32)
    la = {n: m for n, m in a.named_modules() if isinstance(m, Q.nn.Linear4bit)}
    lb = {n: m for n, m in b.named_modules() if isinstance(m, Q.nn.Linear4bit)}
    assert set(la) == set(lb) and len(la) == 14
    for n in la:
        assert torch.equal(la[n].weight, lb[n].weight), n
        assert torch.equal(la[n].quant_state.absmax, lb[n].quant_state.absmax), n
    tok = AutoTokenizer.from_pretrained(str(flt))
    ids = tok.apply_chat_template([{"role": "user", "content": "Sort: 3, 1, 2"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert int(ids.max()) < a.config.vocab_size
    with torch.no_grad():
        la_, lb_ = a(ids).logits, b(ids).logits
    assert torch.isfinite(la_).all() and torch.allclose(la_, lb_)


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import make_model
    finally:
        sys.path.remove(str(TOOL.parent))
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(SystemExit, match=r"not enough disk: 17\.34 GB needed"):
        make_model.main(["--size", "7B", "--out", str(tmp_path / "m")])


def test_loading_leaves_no_view_of_the_checkpoint_mapping(made):
    """Views of the memory-mapped safetensors would keep the file's pages resident: after loading, neither
    from_pretrained's nor load_quantized's model holds a tensor inside a mapping of the checkpoint."""
    import gc

    from transformers import AutoModelForCausalLM

    import qlora_ext as Q
    from qlora_ext.model import _mapped_ranges
    flt, nf4 = made
    for d, load in ((nf4, lambda d: Q.load_quantized(str(d), Q.QLoRAConfig())),
                    (flt, lambda d: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16,
                                                                         quantization_config=Q.QLoRAConfig()))):
        model = load(d)
        gc.collect()
        files = sorted(d.glob("*.safetensors"))
        ranges = _mapped_ranges(files)
        tensors = list(model.parameters()) + list(model.buffers())
        for m in model.modules():
            if isinstance(m, Q.nn.Linear4bit):
                qs = m.quant_state
                tensors += [t for t in (qs.absmax, qs.offset, qs.nested_absmax, qs.code, qs.nested_code)
                            if t is not None]
        inside = [t.shape for t in tensors
                  if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]
        assert not inside, (d.name, inside[:5])
        assert not ranges, f"{d.name}: the checkpoint is still mapped: {len(ranges)} ranges"
        x = torch.tensor([[1, 5, 9]])
        with torch.no_grad():
            assert torch.isfinite(model(x).logits).all()


def test_16bit_embeddings_and_head(made):
    """prepare_model_for_training(embedding_dtype=bfloat16) keeps the embeddings and the untied head in 16 bits
    (norms float32): the loss (chunked head and the model's own forward) and the LoRA gradients stay close to
    the float32 ones, and the model holds half the bytes for them."""
    import qlora_ext as Q
    from qlora_ext.lm import token_loss
    flt, _ = made
    ids = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 2], [1, 8, 9, 10, 11, 12, 13, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def run(dtype):
        torch.manual_seed(0)
        m = Q.load_quantized(str(flt), Q.QLoRAConfig(compute_dtype=torch.float32), dtype=torch.bfloat16)
        m = Q.prepare_model_for_training(m, embedding_dtype=dtype)
        m = Q.add_lora(m, r=4, lora_alpha=8, lora_dropout=0.0)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter, so A gets a gradient too
        s, n = token_loss(m, batch)
        s.backward()
        logits = m(input_ids=ids).logits
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
        lib_loss = float(m(input_ids=ids, labels=ids).loss)  # the library path's chunked head loss
        return m, float(s.detach()) / n, logits, grads, lib_loss

    m32, l32, lg32, g32, lib32 = run(torch.float32)
    m16, l16, lg16, g16, lib16 = run(torch.bfloat16)
    assert abs(lib16 - lib32) < 0.01 * abs(lib32)
    assert m16.get_input_embeddings().weight.dtype == torch.bfloat16
    assert m16.get_output_embeddings().weight.dtype == torch.bfloat16
    assert m16.model.norm.weight.dtype == torch.float32 and m32.get_input_embeddings().weight.dtype == torch.float32
    assert abs(l16 - l32) < 0.01 * abs(l32)
    assert lg16.dtype == torch.bfloat16 and torch.allclose(lg16.float(), lg32, atol=0.05 * lg32.abs().max().item())
    assert torch.isfinite(g16).all() and torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    emb = 2 * 512 * 64  # input embeddings + head elements of the tiny model
    assert Q.memory_report(m32)["other_bytes"] - Q.memory_report(m16)["other_bytes"] == 2 * emb
    with pytest.raises(ValueError, match="embedding_dtype"):
        Q.prepare_model_for_training(m16, embedding_dtype=torch.int8)


def test_16bit_adapters(made, tmp_path):
    """add_lora(lora_dtype=bfloat16): the adapter weights and their gradients are bfloat16 (half the bytes),
    while float32 activations multiply in float32 (the same output and gradients as float32 adapters holding the
    same values); save_adapter / load_adapter round-trip them exactly, in float32 by default or in bfloat16."""
    import qlora_ext as Q
    from qlora_ext.nn import LoraLinear4bit
    flt, _ = made
    ids = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 2]])

    def build(dtype, values=None):
        m = Q.load_quantized(str(flt), Q.QLoRAConfig(compute_dtype=torch.float32), dtype=torch.float32)
        m = Q.prepare_model_for_training(m)
        m = Q.add_lora(m, r=4, lora_alpha=8, lora_dropout=0.0, lora_dtype=dtype)
        with torch.no_grad():
            for i, (n, p) in enumerate((n, p) for n, p in m.named_parameters() if p.requires_grad):
                if values is None:
                    g = torch.Generator().manual_seed(i)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # B non-zero: A gets a gradient too
                else:
                    p.copy_(values[n])
        return m

    m16 = build(torch.bfloat16)
    lora = {n: p.detach() for n, p in m16.named_parameters() if p.requires_grad}
    assert lora and {p.dtype for p in lora.values()} == {torch.bfloat16}
    m32 = build(torch.float32, lora)  # float32 adapters holding the same (bfloat16) values

    def loss_and_grads(m):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    l16, g16 = loss_and_grads(m16)
    l32, g32 = loss_and_grads(m32)
    assert abs(l16 - l32) <= 1e-5 * abs(l32)
    for n, g in g16.items():
        assert g.dtype == torch.bfloat16
        ref = g32[n]
        assert torch.allclose(g.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()), n
    a16 = Q.memory_report(m16)["adapter_bytes"]
    assert a16 * 2 == Q.memory_report(m32)["adapter_bytes"] == 4 * sum(p.numel() for p in lora.values())
    Q.save_adapter(m16, str(tmp_path / "a"))
    for dtype in (torch.float32, torch.bfloat16):
        m = Q.load_quantized(str(flt), Q.QLoRAConfig(compute_dtype=torch.float32), dtype=torch.float32)
        kw = {} if dtype == torch.float32 else {"lora_dtype": dtype}
        m = Q.load_adapter(m, str(tmp_path / "a"), **kw)
        got = {n: p for n, p in m.named_parameters() if "lora_" in n}
        assert set(got) == set(lora)
        for n, p in got.items():
            assert p.dtype == dtype and torch.equal(p.detach().to(torch.bfloat16), lora[n]), n
    layer = next(mod for mod in m16.modules() if isinstance(mod, LoraLinear4bit))
    with pytest.raises(ValueError, match="lora_dtype"):
        layer.add_adapter("other", 4, 8, lora_dtype=torch.int8)


def test_finetune_cpu_block_cache(made, tmp_path):
    """finetune turns the CPU block cache on with --cpu-block-cache-mib (default 256) or off with 0, says so,
    records the setting and trains; a negative size is refused before any work."""
    _, nf4 = made
    args = [sys.executable, "-m", "qlora_ext", "finetune", "--model", str(nf4), "--max-steps", "1", "--batch-size",
            "1", "--packing", "--source-max-len", "48", "--target-max-len", "16", "--no-eval-before",
            "--no-eval-after", "--no-progress", "--lora-r", "4"]
    for mib, said in ((None, "CPU block cache: up to 256 MiB"), (0, "CPU block cache: off"),
                      (32, "CPU block cache: up to 32 MiB")):
        out = tmp_path / f"run{mib}"
        extra = [] if mib is None else ["--cpu-block-cache-mib", str(mib)]
        res = subprocess.run(args + extra + ["--output-dir", str(out)], capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert said in res.stdout + res.stderr
        assert json.loads((out / "run_config.json").read_text())["cpu_block_cache_mib"] == (256 if mib is None else mib)
        assert json.loads((out / "summary.json").read_text())["steps"] == 1
    res = subprocess.run(args + ["--cpu-block-cache-mib", "-1", "--output-dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode != 0 and "--cpu-block-cache-mib must be >= 0" in res.stderr, res.stderr[-1000:]


def _mapped_rss(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=5)
            if len(first) >= 5 and "-" in first[0] and ":" in first[3]:  # a mapping's header line
                inside = len(first) == 6 and first[5].strip() == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_drop_mapped_pages_keeps_views_valid(tmp_path):
    """Loading unmaps the checkpoint pages it has read (they would otherwise stay resident until the end):
    the pages leave the process and a tensor still viewing the file reads the same values afterwards."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qlora_ext import _io
    f = tmp_path / "w.safetensors"
    w = torch.randn(1 << 20)
    save_file({"w": w}, str(f))
    with safe_open(str(f), framework="pt") as h:
        view = h.get_tensor("w")
    float(view.sum())  # reads every page
    if _mapped_rss(f.resolve()) == 0:
        pytest.skip("this safetensors build copies tensors instead of mapping the file")
    assert _mapped_rss(f.resolve()) >= 4 * (1 << 20) // 1024 - 8
    # PAGEOUT is advice: a page the kernel cannot isolate at that moment stays (one 4 kB page of the 4 MB,
    # now and then), so a few tries are allowed and a few pages may remain
    for _ in range(5):
        assert _io.drop_mapped_pages() >= 1
        if _mapped_rss(f.resolve()) == 0:
            break
    assert _mapped_rss(f.resolve()) <= 16
    assert torch.equal(view, w)
    view[0] = 42.0  # a private (copy-on-write) page: that mapping must be left alone
    _io.drop_mapped_pages()
    assert float(view[0]) == 42.0 and torch.equal(view[1:], w[1:])


def test_finetune_with_16bit_embeddings_and_no_final_evaluation(made, tmp_path):
    """The memory flags end to end on the generated model: --embedding-dtype bfloat16 and --lora-dtype bfloat16
    are recorded with the run, train, and the adapter is saved in bfloat16; --no-eval-after skips the final evaluation (no eval loss in the summary)."""
    from qlora_ext.cli import main
    flt, _ = made
    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(flt), "--max-steps", "2", "--batch-size", "1", "--packing",
               "--source-max-len", "48", "--target-max-len", "16", "--no-eval-before", "--no-eval-after",
               "--no-progress", "--embedding-dtype", "bfloat16", "--lora-dtype", "bfloat16", "--lora-r", "4",
               "--output-dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_loss_after"] is None
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["quant"]["embedding_dtype"] == "bfloat16" and run_config["lora"]["dtype"] == "bfloat16"
    from safetensors.torch import load_file
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_fsdp_load_sharded_equals_one_process_slices(tmp_path):
    """FSDP2 loading straight into shards (2 gloo ranks): each rank's packed bytes, QuantStates and float
    shards equal the slices of a one-process quantization, on awkward shapes where shard boundaries fall
    inside a quantization block, from a sharded bfloat16 checkpoint; and the logits agree."""
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    try:
        from test_distributed import torchrun
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "m"), max_shard_size="60KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    res = torchrun(str(pathlib.Path(__file__).with_name("fsdp_shard_load_worker.py")), str(tmp_path / "m"),
                   cwd=tmp_path)
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("ok ")] == [
        "ok shards equal one-process slices", "ok logits"]


def _fsdp_and_single(model_dir, tmp_path):
    """The same 3-step run (seed, data, batch of 3) as one process and as `finetune --distributed fsdp` on 2
    gloo ranks: (training losses, final adapter) of each, the 2-rank run's summary and its stderr."""
    from safetensors.torch import load_file

    from qlora_ext.cli import main
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    try:
        from test_distributed import torchrun
    finally:
        sys.path.pop(0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Is it a word?", "input": w + str(i), "output": "yes"}) + "\n"
                            for i, w in enumerate(["red", "blue", "cat", "dog", "sun", "sea", "oak"] * 2)))

    def args(out):
        return ["finetune", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data),
                "--output-dir", str(out), "--batch-size", "3", "--lora-r", "4", "--lr", "1e-2", "--warmup-ratio",
                "0", "--max-steps", "3", "--seed", "3", "--no-eval-before", "--no-eval-after", "--no-progress"]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args(tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(n)
    res = torchrun("-m", "qlora_ext", *args(tmp_path / "fsdp"), "--distributed", "fsdp", "--progress", cwd=tmp_path)
    runs = {}
    for name in ("single", "fsdp"):
        out = tmp_path / name
        runs[name] = ([json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()],
                      load_file(str(out / "adapter" / "adapter_model.safetensors")))
    return runs["single"], runs["fsdp"], json.loads((tmp_path / "fsdp" / "summary.json").read_text()), res.stderr


def _assert_same_run(single, sharded):
    """2 ranks sum their gradients in another order than one process: the last bits may differ (rel 1e-5 on
    losses, 1e-5 on adapter weights), never by a learning-rate-sized step (no warmup: the adapters move from
    step 1)."""
    assert len(single[0]) == len(sharded[0]) == 3
    assert sharded[0] == pytest.approx(single[0], rel=1e-5)
    a, b = single[1], sharded[1]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # it trained


def test_finetune_fsdp_loads_float_checkpoint_into_shards(made, tmp_path):
    """`finetune --distributed fsdp` (2 gloo ranks) on the generated float layout goes through load_sharded:
    each rank quantizes about half of the model's 4-bit codes (counted by the loader, reported in
    summary.json and logged), never the whole model, and the run is the one-process run with the same seed
    and data."""
    single, sharded, summary, stderr = _fsdp_and_single(made[0], tmp_path)
    _assert_same_run(single, sharded)
    load = summary["fsdp_load"]
    assert load["path"].startswith("sharded"), load
    per_rank, whole = load["quantized_bytes"], load["packed_bytes"]
    assert len(per_rank) == 2 and whole > 0
    assert sum(per_rank) >= whole  # together they quantized every weight (blocks on a boundary twice)
    assert max(per_rank) < 0.6 * whole, load  # and no rank came near the whole 4-bit model
    assert "4-bit codes quantized per rank" in stderr
    # the loading bar: rank 0's only, ended once (tqdm ends a closed bar with one newline)
    assert sum("load shards: 100%" in line for line in stderr.split("\n")) == 1, stderr[-2000:]


def test_finetune_fsdp_on_an_already_quantized_checkpoint(made, tmp_path):
    """The generated NF4 (bitsandbytes) layout has no float rows to quantize per shard: it loads whole on every
    rank (its uint8-stored codes viewed as float32 for FSDP2), is sharded, and trains as one process does."""
    single, sharded, summary, _ = _fsdp_and_single(made[1], tmp_path)
    _assert_same_run(single, sharded)
    assert summary["fsdp_load"] == {"path": "whole model per rank"}
