#!/usr/bin/env bash
# The prepared GPU check: one command on a lent GPU machine (one H200, sm_90, no package registry) that
# builds for sm_90 with all cores (the Python extension and the CMake CUDA test binaries), runs the CUDA cases
# of pytest and CTest, compute-sanitizer memcheck / racecheck over the CTest CUDA binaries, the CUDA benchmarks
# in a quick mode (with bitsandbytes from the carried wheel) and a short `qlora-ext finetune` on CUDA, timing
# each phase. It keeps going past a failing phase; the report says which failed.
#
#   bash tools/gpu_check.sh --prepare   # here, before the GPU call: fills .whl/ and .gtest/ (carried, ignored)
#   bash tools/gpu_check.sh             # on the GPU machine (README "GPU" gives the exact device-tool call)
#   bash tools/gpu_check.sh --dry-run   # no GPU: compiles every kernel for sm_90, imports the extension and
#                                       # runs every phase up to where a GPU is needed
#
# Output: one folder, $OUT/gpu_check when $OUT is set (the device tool brings $OUT back), else
# ./gpu_check_out: report.md (the summary table and the key figures) and one raw log per phase.
# Total budget: about 9 minutes on the H200 (the per-phase limits below add up to 545 s).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --prepare) MODE=prepare ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--dry-run | --prepare]" >&2; exit 2 ;;
esac

if [ "$MODE" = prepare ]; then
  # What the GPU machine cannot fetch: the bitsandbytes wheel (for the comparison) and googletest's source
  # (for the CTest binaries when libgtest-dev is not installed there). Both paths are git-ignored.
  mkdir -p .whl
  ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 || pip download -q --no-deps -d .whl "bitsandbytes==0.50.2"
  # What the image may lack (it promises torch, transformers, PEFT and Python 3.12): pytest, and ninja (without
  # it torch's extension build falls back to compiling one file at a time). Installed there only if missing.
  for w in pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 ninja==1.13.2; do
    ls .whl/"${w%%==*}"-*.whl >/dev/null 2>&1 || pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$w" || exit 1
  done
  if [ ! -f .gtest/CMakeLists.txt ]; then
    [ -d /usr/src/googletest ] || { echo "no /usr/src/googletest: apt-get install libgtest-dev" >&2; exit 1; }
    rm -rf .gtest && cp -rL /usr/src/googletest .gtest
  fi
  # The tests' fixtures live in ../shared, which does not travel: a copy goes in .shared/ (2 MB).
  rm -rf .shared && cp -rL ../shared .shared
  du -sh .whl .gtest .shared
  echo "carry: [\".whl\", \".gtest\", \".shared\"]"
  exit 0
fi

R="${OUT:-$ROOT/gpu_check_out}/gpu_check"
mkdir -p "$R"
# The tests read ../shared beside the repository; on the GPU machine it comes carried as .shared/.
[ -d ../shared ] || { [ -d .shared ] && ln -s "$ROOT/.shared" ../shared; } ||
  echo "warning: no ../shared fixtures: tests that need them will fail" >&2
JOBS="$(nproc)"
DRY_SCALE="${DRY_SCALE:-10}"  # the dry run compiles on whatever cores it has: longer limits
PY="${PYTHON:-python3}"
START=$(date +%s)
SUMMARY="$R/.summary"
: > "$SUMMARY"

# run_phase NAME TIMEOUT_S COMMAND...: log in $R/NAME.log, one summary row (status, seconds).
run_phase() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc status
  t0=$(date +%s%N)
  [ "$MODE" = dry ] && limit=$((limit * DRY_SCALE))
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$R/$name.log" 2>&1
  rc=$?
  local ms dt
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  dt="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit}s" ;;
    77) status="skipped: $(tail -1 "$R/$name.log")" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "   $status, ${dt}s"
  printf '| %s | %s | %s | [%s.log](%s.log) |\n' "$name" "$status" "$dt" "$name" "$name" >> "$SUMMARY"
  return 0
}

# Exit code 77 = the phase needs a GPU and this is the dry run (reported as skipped, not as a pass).
needs_gpu() {
  if [ "$MODE" = dry ]; then echo "dry run: needs a GPU"; exit 77; fi
}
export -f needs_gpu
export MODE R PY JOBS ROOT

# ---- phases -----------------------------------------------------------------------------------------------
phase_env() {
  date -u
  echo "mode: $MODE"
  nvidia-smi || echo "(no nvidia-smi)"
  nvcc --version || echo "(no nvcc)"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)"
  "$PY" -c "import peft; print('peft', peft.__version__)" || true
  echo "cores: $JOBS"; command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || true
}

phase_bnb_wheel() {
  local whl
  whl=$(ls "$ROOT"/.whl/bitsandbytes-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then echo "no .whl/bitsandbytes-*.whl carried: the bitsandbytes comparison is skipped"; exit 77; fi
  "$PY" -m pip install --no-deps --no-index "$whl"
  "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
}

phase_deps() {
  # Carried wheels (tools/gpu_check.sh --prepare) for what the image lacks; what it has is left alone.
  local mod whl
  for mod in iniconfig pluggy pytest ninja; do
    if "$PY" -c "import $mod" 2>/dev/null; then echo "$mod: present"; continue; fi
    whl=$(ls "$ROOT"/.whl/"$mod"-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || { echo "$mod: missing and not carried"; exit 1; }
    "$PY" -m pip install --no-deps --no-index "$whl" || exit 1
  done
  command -v cmake || echo "cmake: not installed (the CMake phases will say so)"
}

phase_build_extension() {
  # torch finds the CUDA toolkit through CUDA_HOME or nvcc's location; an nvcc wrapper script (as on this
  # project's build VM) points it at a directory without the CUDA headers, so look for them.
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
      [ -f "$d/include/cuda_runtime_api.h" ] && { export CUDA_HOME="$d"; break; }
    done
  fi
  # torch's CUDA headers include cuSPARSE / cuBLAS headers; a minimal toolkit lacks them, but torch's CUDA wheels
  # ship them (site-packages/nvidia/*/include).
  if [ ! -f "${CUDA_HOME:-/nonexistent}/include/cusparse.h" ]; then
    local inc
    inc=$("$PY" -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for d in site.getsitepackages()
for p in glob.glob(os.path.join(d, 'nvidia', '*', 'include', 'cusparse.h'))})))")
    [ -n "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset} CPATH=${CPATH:-}"
  # sm_90 only, all cores; --no-build-isolation: the machine has no registry and the build must use its torch.
  QLORA_EXT_CUDA=1 QLORA_EXT_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e "$ROOT"
}

phase_import() {
  cd /tmp && "$PY" -c "
import torch, qlora_ext
print('qlora_ext', qlora_ext.__file__, 'with_cuda', qlora_ext.with_cuda(), 'cpu_isa', qlora_ext.cpu_isa())
assert qlora_ext.with_cuda(), 'the extension was built without its CUDA kernels'
ops = [n for n in dir(torch.ops.qlora_ext) if not n.startswith('_')]
print('ops:', ops)
if torch.cuda.is_available():
    from qlora_ext import functional as F
    w = torch.randn(256, 256, device='cuda')
    p, s = F.quantize_4bit(w)
    print('smoke: dequantize max err', (F.dequantize_4bit(p, s) - w).abs().max().item())
"
}

phase_build_cmake() {
  command -v cmake >/dev/null || { echo "cmake is not installed on this machine"; exit 77; }
  local gt=()
  [ -f "$ROOT/.gtest/CMakeLists.txt" ] && gt=(-DQX_GTEST_SOURCE_DIR="$ROOT/.gtest")
  cmake -S "$ROOT" -B "$ROOT/build/gpu_check" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 "${gt[@]}" &&
    cmake --build "$ROOT/build/gpu_check" -j "$JOBS" &&
    for s in quant matmul optim; do
      readelf -S "$ROOT/build/gpu_check/test_${s}_cuda" | grep -q '\.nv_fatbin' ||
        { echo "test_${s}_cuda has no CUDA device code"; exit 1; }
    done
}

phase_pytest_cuda() {
  # The CUDA cases: test_cuda.py, every device-parametrized case's [cuda] half, and the paged-memory tests.
  # --continue-on-collection-errors: a test module importing a package the image lacks costs that module (its
  # collection error is reported and fails the phase), not every CUDA case of the others.
  cd "$ROOT" && "$PY" -m pytest python_tests -q -p no:cacheprovider -rs --maxfail=20 --continue-on-collection-errors \
    -k "cuda or paged or gpu_budget" --junitxml="$R/pytest_cuda.xml" -o addopts="" 2>&1
  local rc=$?
  [ "$MODE" = dry ] && [ $rc -eq 0 ] && { echo "dry run: collected and skipped (no GPU)"; }
  return $rc
}

phase_ctest_cuda() {
  [ -x "$ROOT/build/gpu_check/test_quant_cuda" ] || { echo "no CTest CUDA binaries (see build_cmake)"; exit 77; }
  ctest --test-dir "$ROOT/build/gpu_check" -R '_cuda$' --output-on-failure --output-junit "$R/ctest_cuda.xml"
}

sanitizer_bin() {
  command -v compute-sanitizer 2>/dev/null || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1
}

phase_sanitizer() {  # $1 = memcheck | racecheck
  local tool="$1" cs
  cs=$(sanitizer_bin)
  if [ -z "$cs" ]; then echo "compute-sanitizer is not installed on this machine"; exit 77; fi
  needs_gpu
  [ -x "$ROOT/build/gpu_check/test_quant_cuda" ] || { echo "no CTest CUDA binaries (see build_cmake)"; exit 77; }
  local failed=0
  for s in quant matmul optim; do
    echo "---- $tool test_${s}_cuda"
    # LargeTensor (20M elements) is slow under the sanitizer and adds nothing the small cases do not cover.
    local out rc
    out=$("$cs" --tool "$tool" --error-exitcode 99 "$ROOT/build/gpu_check/test_${s}_cuda" --gtest_filter='-*Large*' 2>&1)
    rc=$?
    echo "$out" | tail -40
    if [ $rc -ne 0 ] && grep -qiE "not supported|unable to (attach|initialize)|device not supported" <<< "$out"; then
      echo "compute-sanitizer $tool is not supported by this machine's driver/runtime"; exit 77
    fi
    [ "$rc" -ne 0 ] && failed=1
  done
  return $failed
}

phase_bench() {  # $1 = quant | matmul | optim
  needs_gpu
  cd "$ROOT/bench" || exit 1
  case "$1" in
    quant) "$PY" bench_quant.py --device cuda --sizes 4096x4096 11008x4096 --reps 10 --skip-ref \
             --out "$R/bench_quant_cuda.md" ;;
    matmul)
      local bnb=()
      "$PY" -c "import bitsandbytes" 2>/dev/null && bnb=(--bnb)
      "$PY" bench_matmul.py --device cuda --quick "${bnb[@]}" --out "$R/bench_matmul_cuda.md" ;;
    optim) "$PY" bench_optim.py --device cuda --params 10M 100M --reps 5 --out "$R/bench_optim_cuda.md" ;;
  esac
}

phase_finetune() {
  # A model the script makes (the shared fixtures do not travel): a small random Llama with the test suite's
  # character tokenizer, then a short fine-tune on the shipped dataset; on CUDA in the GPU run, on the CPU
  # for 2 steps in the dry run (so the whole pipeline is exercised either way).
  local model="$R/tmp_model" dev=cuda steps=30
  [ "$MODE" = dry ] && dev=cpu steps=2
  "$PY" - "$model" <<'PYEOF' || exit 1
import sys
sys.path.insert(0, "python_tests")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from cli_fixtures import char_tokenizer
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
char_tokenizer(chat_template=True).save_pretrained(sys.argv[1])
print("model:", sys.argv[1])
PYEOF
  cd "$R" && qlora-ext finetune --model "$model" --device "$dev" --max-steps "$steps" --batch-size 8 \
    --eval-samples 16 --no-progress --output-dir "$R/finetune_run"
  local rc=$?
  rm -rf "$model"
  [ "$MODE" = dry ] && [ $rc -eq 0 ] && echo "dry run: finetune ran 2 steps on the CPU; the CUDA run needs a GPU"
  return $rc
}

export -f phase_env phase_deps phase_bnb_wheel phase_build_extension phase_import phase_build_cmake phase_pytest_cuda \
  phase_ctest_cuda sanitizer_bin phase_sanitizer phase_bench phase_finetune

run_phase env 15 bash -c phase_env
run_phase deps 15 bash -c phase_deps
run_phase bnb_wheel 25 bash -c phase_bnb_wheel
run_phase build_extension 130 bash -c phase_build_extension
run_phase import 15 bash -c phase_import
run_phase build_cmake 80 bash -c phase_build_cmake
run_phase pytest_cuda 70 bash -c phase_pytest_cuda
run_phase ctest_cuda 30 bash -c phase_ctest_cuda
run_phase sanitizer_memcheck 35 bash -c "phase_sanitizer memcheck"
run_phase sanitizer_racecheck 25 bash -c "phase_sanitizer racecheck"
run_phase bench_quant 20 bash -c "phase_bench quant"
run_phase bench_matmul 25 bash -c "phase_bench matmul"
run_phase bench_optim 20 bash -c "phase_bench optim"
run_phase finetune 40 bash -c phase_finetune

# ---- report -------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
  echo "# GPU check ($MODE run)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M') UTC; host $(hostname); $JOBS cores; total ${TOTAL}s"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- command: \`bash tools/gpu_check.sh${1:+ $1}\`"
  echo
  echo "| phase | status | seconds | log |"
  echo "|---|---|---|---|"
  cat "$SUMMARY"
  echo
  failed=$(grep -cE '\| (FAILED|TIMEOUT)' "$SUMMARY")
  echo "**${failed} phase(s) failed or timed out.**"
  for f in pytest_cuda ctest_cuda; do
    [ -f "$R/$f.xml" ] && "$PY" - "$R/$f.xml" "$f" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
def kind(c):
    if c.find("failure") is not None or c.find("error") is not None or c.get("status") == "fail":
        return "failed"
    if c.find("skipped") is not None or c.get("status") in ("notrun", "disabled"):
        return "skipped"
    return "passed"
k = [kind(c) for c in cases]
print(f"- {sys.argv[2]}: {k.count('passed')} passed, {k.count('skipped')} skipped, {k.count('failed')} failed")
for c in cases:
    if kind(c) == "failed":
        print(f"  - FAILED {c.get('classname', '')}::{c.get('name')}")
PYEOF
  done
  echo
  for b in bench_quant_cuda bench_matmul_cuda bench_optim_cuda; do
    [ -f "$R/$b.md" ] && { echo "## $b"; echo; sed 's/^# /### /' "$R/$b.md"; echo; }
  done
  [ -f "$R/finetune.log" ] && { echo "## finetune (last lines)"; echo; echo '```'; tail -15 "$R/finetune.log"; echo '```'; }
} > "$R/report.md"
rm -f "$SUMMARY"
echo "report: $R/report.md (${TOTAL}s)"
