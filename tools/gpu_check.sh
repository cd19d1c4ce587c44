#!/usr/bin/env bash
# One-shot device check: build, report, selftest, GPU tests and benchmarks, all logs in OUTDIR.
#
#   tools/gpu_check.sh OUTDIR            on a GPU machine (make gpu-check OUT=OUTDIR)
#   tools/gpu_check.sh --dry OUTDIR      on a CPU (or GPU_CHECK_DRY=1): every step a CPU can run,
#                                        at smoke sizes (tests/test_gpu_check.py runs this)
#
# For a machine with no network and a CUDA build of torch already installed: it uses that python
# (${PYTHON:-python3}), never a venv nor a download (PIP_NO_INDEX=1, hub offline). GPU mode
# builds the extension in place for the present GPU's arch only (TORCH_CUDA_ARCH_LIST from
# torch.cuda.get_device_capability()); dry mode builds the CPU extension into OUTDIR/build-lib
# (the installed one is left alone; GPU_CHECK_SKIP_BUILD=1 skips the compile) and the later
# steps use the installed package. Each step has its own timeout, cut to what is left of
# GPU_CHECK_BUDGET seconds (default 460: under 8 minutes in all), so one hang cannot eat the
# rest; OUTDIR/<step>.log holds each step's output and OUTDIR/summary.md the table
# (step, status, seconds), also printed last. Exit status 1 when a step failed, timed out or
# was not reached (the budget spent).
set -u

DRY=${GPU_CHECK_DRY:-0}
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: tools/gpu_check.sh [--dry] OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-460} ))
SUMMARY="$OUT/summary.md"
printf '| step | status | seconds |\n|---|---|---|\n' > "$SUMMARY"
FAILED=0

# step NAME LIMIT_S COMMAND: runs COMMAND (a bash string) under its own timeout, logs to
# OUTDIR/NAME.log, adds a summary row. A command that exits 99 is a skip (it said why in its log).
step() {
  local name=$1 limit=$2 cmd=$3 left status
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then
    echo "$name: not run, the budget (GPU_CHECK_BUDGET) is spent" > "$OUT/$name.log"
    printf '| %s | skipped (budget spent) | 0 |\n' "$name" >> "$SUMMARY"
    FAILED=1
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $cmd"
  local t0=$EPOCHREALTIME
  { echo "\$ $cmd"; timeout --kill-after=10 "$limit" bash -c "$cmd"; } > "$OUT/$name.log" 2>&1
  local rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    99) status="skipped ($(tail -n 1 "$OUT/$name.log"))" ;;
    124 | 137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  printf '| %s | %s | %s |\n' "$name" "$status" "$secs" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
}

selftest_cmd() {  # the selftest lands with rlhf_kernels/selftest.py; until then, a skip
  echo "if $PY -c 'import rlhf_kernels.selftest' 2>/dev/null; then
          $PY -m rlhf_kernels selftest --device $1 --json '$OUT/selftest.json'
        else echo 'selftest: rlhf_kernels.selftest is not in this checkout yet'; exit 99; fi"
}

# pytest-xdist and pytest-timeout are used when installed (the device image has both)
PYTEST_EXTRA=""
$PY -c "import xdist" 2>/dev/null && (( DRY == 0 )) && PYTEST_EXTRA+=" -n 8"
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=" --timeout=120"

VERSIONS='import sys, importlib.metadata as m
print(sys.version)
for name in ("torch", "triton", "transformers", "deepspeed", "pytest", "pytest-xdist"):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, "not installed")
import torch; print("cuda", torch.version.cuda, "device", torch.cuda.is_available())'
SHOW_BUILD="$PY -c 'import rlhf_kernels._C as c; print(c.build_info)'"

build_cmd() {
  if (( ! DRY )); then  # in place, for this GPU's arch only
    local arch
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    [[ -n "$arch" ]] || { echo "echo 'no CUDA device visible to torch'; exit 1"; return; }
    echo "RLHF_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST='$arch' $PY setup.py -q build_ext --inplace" \
         "--build-temp build/gpu-check && $SHOW_BUILD"
  elif [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then  # setup.py still runs (offline), no compile
    echo "$PY setup.py --name && $SHOW_BUILD && echo 'build: compile skipped" \
         "(GPU_CHECK_SKIP_BUILD=1), the installed extension is used' && exit 99"
  else  # the CPU build, out of tree: the installed extension is left alone
    echo "RLHF_KERNELS_CUDA=0 $PY setup.py -q build_ext --build-temp build/gpu-check-cpu" \
         "--build-lib '$OUT/build-lib' && ls '$OUT/build-lib/rlhf_kernels'"
  fi
}

if (( DRY )); then  # smoke sizes; the Triton tests run in the interpreter
  DEVICE=cpu
  TESTS="TRITON_INTERPRET=1 $PY -m pytest tests/test_review_fixes.py -k 'gae or temperature'"
  GAE_ARGS="--shapes 4x64 --modes zero --repeats 2 --loop-repeats 1"
  PPO_ARGS="--shapes 2x16x1000 --linear-shapes '' --repeats 2"
  GEN_ARGS="--models tiny-llama --batches 2 --new-tokens 4 --repeats 1"
else  # test_triton_aot.py only compiles (no GPU needed): the CPU test pass covers it
  DEVICE=cuda
  TESTS="$PY -m pytest --ignore=tests/test_triton_aot.py"
  GAE_ARGS="--shapes 1024x2048 --repeats 50 --loop-repeats 2"
  PPO_ARGS="--dtype bfloat16 --shapes 16x1024x32000 --linear-shapes '' --repeats 10"
  GEN_ARGS="--models qwen2.5-0.5b-shape --batches 64 --new-tokens 64 --repeats 2"
fi
BENCH="$PY benchmarks/bench_"

step environment 30 "$PY -c '$VERSIONS'; env | grep -E '^(PIP_NO_INDEX|HF_HUB_OFFLINE)=';
                     nvidia-smi || true"
step build 300 "$(build_cmd)"
step report 60 "$PY -m rlhf_kernels report"
step selftest 150 "$(selftest_cmd $DEVICE)"
step pytest 200 "$TESTS -q -p no:cacheprovider $PYTEST_EXTRA -m 'gpu or triton' \
                 --junitxml='$OUT/pytest.xml'"
step bench_gae 60 "${BENCH}gae.py --device $DEVICE $GAE_ARGS --out '$OUT/bench_gae.md'"
step bench_ppo_loss 120 "${BENCH}ppo_loss.py --device $DEVICE $PPO_ARGS \
                         --out '$OUT/bench_ppo_loss.md'"
step bench_generation 150 "${BENCH}generation.py --device $DEVICE $GEN_ARGS \
                           --out '$OUT/bench_generation.md'"

echo
cat "$SUMMARY"
exit $FAILED
