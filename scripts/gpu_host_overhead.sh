#!/usr/bin/env bash
# Issue 16's "cheap run()" and the kernel refactor of issue 18 on a GPU machine, all output under RESULTS_DIR.
#
#   bash scripts/gpu_host_overhead.sh RESULTS_DIR        (from the repository root; ~5 minutes on an H200)
#
#   1. tests   the kernel / graph / padded-batch tests on the GPU (tests/test_triton_decode.py, test_cuda_graph.py,
#              test_kernel_options.py, test_eager_vs_compiled.py -k "not scenario")
#   2. host    conformance/benchmarks/test_host_overhead.py: host time per plan() and per run() of a decode step
#              at batch 1/8/64/128, Triton and FlexAttention decode (targets at batch 64: plan <= 150 us,
#              run <= 25 us) -> RESULTS_DIR/host_overhead.json
#   3. profile scripts/plan_profile.py --batches 8 64 128 (plan() with the GPU idle and busy, and a cProfile)
# Then RESULTS_DIR/summary.txt (stage, exit code, seconds).
set -u
OUT=${1:?usage: scripts/gpu_host_overhead.sh RESULTS_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
. scripts/gpu_env.sh
machine_info "$OUT/machine.txt"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0; shift 2; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
}
stage tests 240 "$PY" -m pytest -p conformance.plugin -q -x tests/test_triton_decode.py tests/test_cuda_graph.py \
  tests/test_kernel_options.py tests/test_host_table.py tests/test_transfer.py
stage host 240 "$PY" -m pytest -p conformance.plugin -q conformance/benchmarks/test_host_overhead.py \
  --benchmark-json="$OUT/host_overhead.json" --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name
stage profile 120 "$PY" scripts/plan_profile.py --batches 8 64 128 --rounds 200 --top 12
tail -n 25 "$OUT/host.log"
