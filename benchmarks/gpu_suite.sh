#!/usr/bin/env bash
# Every CUDA path of moeflux, run, sanitised and measured on a lent H100/H200, in one call of the device tool
# (<= 10 minutes; a second call may run the steps the first did not reach).
#
#   on the GPU machine (device tool):  bash benchmarks/gpu_suite.sh
#   a second call, for the steps the first did not reach (a fresh machine needs the build again):
#                                      STEPS="env build sanitize bench summary" bash benchmarks/gpu_suite.sh
#   dry run here, without a GPU:       bash benchmarks/gpu_suite.sh --dry-run
#
# Steps (STEPS, in this order): env build tests sanitize bench summary
#   env       GPU, driver, torch, nvcc, compute-sanitizer
#   build     pip install -e . against the machine's torch, sm_90 only, ninja (+ ccache if there); timed
#   tests     every test on the CUDA device (the suite parametrises ops over CPU and CUDA: tests/conftest.py)
#   sanitize  the CUDA op tests under compute-sanitizer: memcheck, racecheck, synccheck
#   bench     benchmarks/bench_gpu.py (ceilings, route, grouped GEMMs, layer shapes, no-sync (raises on a host
#             sync), NCCL at world 1 against one process: dropless, and capacity on the fixed splits that GPUs
#             take across ranks (the dry run takes them on the CPU by the test-only flat.FIXED_SPLITS_ON_CPU;
#             at world 2 and 4 they are tests/test_expert_parallel.py's, on gloo), CUDA==CPU)
#             and benchmarks/bench_ops.py --device cuda (the permute/unpermute grid)
#   summary   the short table, last
# Logs, JSON and PNG go to $SUITE_FILES (default /tmp/moeflux_gpu_suite), packed after every step into
# $OUT/suite.tar.gz ($OUT: the device tool's output folder, which brings back at most 8 files; ./gpu_out by
# default); $OUT/steps.tsv records each step's status and seconds, $OUT/gpu.json the measurements. A failing
# step is recorded and the next one still runs.
# The dry run does every step that can run on a CPU: the build check, test collection of the CUDA tests, the
# sanitizer command lines, bench_gpu at toy sizes on the CPU, bench_ops at a small size, the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
OUT=${OUT:-$PWD/gpu_out}
FILES=${SUITE_FILES:-/tmp/moeflux_gpu_suite}
mkdir -p "$OUT" "$FILES"
PY=${PYTHON:-python3}
STEPS=${STEPS:-env build tests sanitize bench summary}
export PYTHONUNBUFFERED=1
: >"$OUT/steps.tsv"

# step NAME COMMAND...: runs it with its output in $FILES/NAME.log (and on the console), records status and time.
step() {
  local name=$1
  shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$FILES/$name.log"
  local status=${PIPESTATUS[0]}
  printf '%s\t%s\t%ss\n' "$name" "$([[ $status == 0 ]] && echo ok || echo "failed($status)")" \
    "$((SECONDS - start))" | tee -a "$OUT/steps.tsv"
  [[ -f "$FILES/gpu.json" ]] && cp "$FILES/gpu.json" "$OUT/gpu.json"
  tar czf "$OUT/suite.tar.gz" -C "$FILES" .
}

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  nvcc --version 2>&1 | tail -1 || echo "no nvcc"
  command -v compute-sanitizer || echo "no compute-sanitizer"
  command -v ccache || echo "no ccache (the build runs without it)"
}

build() {
  if ((DRY)); then  # the build here is scripts/setup.sh's; check what the GPU run relies on
    "$PY" -c "import moeflux; print('built, CUDA kernels:', moeflux.cuda_kernels_built())"
    return
  fi
  # Only sm_90; no isolation and no dependencies: the machine has torch and cannot download.
  if command -v ccache >/dev/null; then export CMAKE_CXX_COMPILER_LAUNCHER=ccache CMAKE_CUDA_COMPILER_LAUNCHER=ccache; fi
  MOEFLUX_CUDA_ARCH=90 MAX_JOBS=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps -e . &&
    "$PY" -c "import moeflux; assert moeflux.cuda_kernels_built(), 'built without the CUDA kernels'; print('CUDA kernels built')"
}

cuda_op_tests=(tests/test_route.py tests/test_permute.py tests/test_unpermute.py tests/test_grouped_mm.py
  tests/test_expert_ffn.py tests/test_apply_capacity.py)

tests() {
  if ((DRY)); then
    "$PY" -m pytest -q --collect-only -k cuda tests | tail -3
    return
  fi
  # Every test parametrised over the CUDA device (tests/conftest.py DEVICES) and the CUDA-only ones; the CPU
  # tests are CI's. pytest-xdist (in the machine's image) spreads them over its cores.
  local parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  "$PY" -m pytest -q "${parallel[@]}" --timeout 300 --junitxml "$FILES/junit.xml" -k cuda tests
}

sanitize() {
  local status=0
  for tool in memcheck racecheck synccheck; do
    local cmd=(compute-sanitizer --tool "$tool" --error-exitcode 1 --log-file "$FILES/sanitizer_$tool.txt"
      "$PY" -m pytest -q -x -k cuda "${cuda_op_tests[@]}")
    if ((DRY)); then
      echo "would run: ${cmd[*]}"
      continue
    fi
    echo "-- $tool"
    "${cmd[@]}" | tail -3 || status=1
    tail -2 "$FILES/sanitizer_$tool.txt"
  done
  return $status
}

bench() {
  local status=0
  if ((DRY)); then
    "$PY" benchmarks/bench_gpu.py --device cpu --quick --out "$FILES" || status=1
    "$PY" benchmarks/bench_ops.py --device cpu --tokens 1024 --hidden 256 --repeat 2 --out "$FILES/ops" || status=1
    return $status
  fi
  "$PY" benchmarks/bench_gpu.py --device cuda --out "$FILES" || status=1
  for shape in "4096 2048" "16384 4096" "65536 7168"; do
    read -r tokens hidden <<<"$shape"
    "$PY" benchmarks/bench_ops.py --device cuda --dtypes bfloat16 --tokens "$tokens" --hidden "$hidden" \
      --experts 64 --topk 2 8 --repeat 20 --out "$FILES/ops_T${tokens}_H${hidden}" || status=1
  done
  return $status
}

summary() {
  echo "steps:"
  cat "$OUT/steps.tsv"
  [[ -f "$FILES/gpu.json" ]] && "$PY" benchmarks/bench_gpu.py --summary "$FILES"
  return 0
}

step env env_report
step build build
step tests tests
step sanitize sanitize
step bench bench
step summary summary
