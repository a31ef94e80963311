"""qlora_ext: QLoRA for PyTorch — NF4 / FP4 4-bit kernels on CPU and CUDA in the bitsandbytes format, 4-bit
LoRA layers, fused and paged optimizers, and model-level quantize / load / train / save / merge for
transformers models."""
import os as _os
import sys as _sys

# OpenMP on a shared machine (bench/results/bench_threads_cpu.md): libgomp's default wait policy spins ~300000
# iterations at each barrier before sleeping, so when other processes keep the cores busy a 2-thread step
# runs several times slower than with PASSIVE (sleep at once), the fastest setting measured there. libgomp reads the variable once, when torch loads it: it can only be set here if torch is not yet
# imported; a value the user set is kept. Otherwise prepare_model_for_training says how to set it.
OMP_POLICY_SET_LATE = "torch" in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from . import functional, nn, optim, reference
from ._ops import cpu_isa, with_cuda
from .adapters import add_lora, load_adapter, print_trainable_parameters, save_adapter, set_adapter
from .config import QLoRAConfig
from .functional import QuantState, dequantize_4bit, matmul_4bit, quantize_4bit
from ._io import cpu_block_cache, cpu_block_cache_stats
from .model import (export_merged, load_quantized, memory_report, merge_lora, prepare_model_for_training,
                    quantize_model, save_quantized)
from .nn import Linear4bit, LoraLinear4bit

__version__ = "0.1.0"


def __getattr__(name):
    # qlora_ext.peft needs peft, an optional dependency: imported on first use only
    if name == "peft":
        import importlib
        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["functional", "nn", "optim", "reference", "QuantState", "quantize_4bit", "dequantize_4bit",
           "matmul_4bit", "cpu_isa", "with_cuda", "QLoRAConfig", "Linear4bit", "LoraLinear4bit", "quantize_model",
           "load_quantized", "save_quantized", "prepare_model_for_training", "merge_lora", "export_merged",
           "memory_report", "cpu_block_cache", "cpu_block_cache_stats", "add_lora", "set_adapter", "print_trainable_parameters", "save_adapter", "load_adapter"]
