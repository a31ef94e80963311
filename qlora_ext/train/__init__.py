"""QLoRA fine-tuning end to end (what `qlora-ext finetune / eval / generate / merge` run), in parts named for
what they do:

  setup       the run's settings (FinetuneConfig, validated before any long work), where the model is (local
              directory, GGUF file, Hub id, the default SmolLM2), device, dtype, and the run directory
              (fresh, or resumed from its newest usable checkpoint)
  data        train / held-out examples, token ids (optionally packed), the deterministic batch order
  model       tokenizer, 4-bit base model, base + LoRA ready to train, optimizer, learning-rate schedule
  loop        finetune(): the training loop with exact-resume checkpoints
  evaluation  held-out loss / perplexity / exact match before, during (--eval-steps) and after training
  reporting   log lines, progress bar, metrics.jsonl (+ TensorBoard), loss-curve PNG, summary

This package re-exports the names the command line and the benchmarks use.
"""
from ..errors import MissingDependencyError, SetupError
from .data import batch_at, batch_plan, pack, prepare_data, training_rows
from .evaluation import Evaluator
from .loop import Interrupted, finetune
from .model import (api, build_optimizer, build_scheduler, check_adapter, load_adapter, load_for_training,
                    load_quantized_model, load_tokenizer, release_checkpoint_mapping)
from .reporting import MetricsLog, fmt_bytes, format_summary, memory_bytes, plot_losses
from .setup import (DEFAULT_RUN_STEPS, DTYPES, OPTIMIZERS, SCHEDULERS, FinetuneConfig, LoraSettings, ModelSpec,
                    QuantSettings, default_model_spec, read_run_config, resolve_device, resolve_dtype,
                    resolve_model, resolve_output, total_steps, validate)

__all__ = ["MissingDependencyError", "SetupError", "batch_at", "batch_plan", "pack", "prepare_data",
           "training_rows", "Evaluator", "Interrupted", "finetune", "api", "build_optimizer", "build_scheduler",
           "check_adapter", "load_adapter", "load_for_training", "load_quantized_model", "load_tokenizer",
           "release_checkpoint_mapping", "MetricsLog", "fmt_bytes", "format_summary", "memory_bytes",
           "plot_losses", "DEFAULT_RUN_STEPS", "DTYPES", "OPTIMIZERS", "SCHEDULERS", "FinetuneConfig",
           "LoraSettings", "ModelSpec", "QuantSettings", "default_model_spec", "read_run_config",
           "resolve_device", "resolve_dtype", "resolve_model", "resolve_output", "total_steps", "validate"]
