#!/usr/bin/env bash
# Benchmarks of the conformance suite on a GPU machine, all output under RESULTS_DIR.
#
#   bash scripts/gpu_bench.sh RESULTS_DIR          (from the repository root; offline is fine)
#
# Stages (each under a time limit so that the whole script ends within ~7 minutes on an H200, compiles included):
#   1. grid      decode + prefill benchmarks of the small grid, every backend (paged, sdpa, torchpa, flashinfer),
#                --benchmark-json RESULTS_DIR/bench.json, autosaved into .benchmarks-gpu/ (copied to RESULTS_DIR/storage)
#   2. tests     capacity (sequences per KV budget, peak GPU memory per step), recompiles (1000-step trace),
#                strategies (page size x placement: figures + decode time) -> *.json, strategies_bench.json
#   3. compare   the paged decode benchmarks again with PAGED_BENCH_PLANTED_SLOWDOWN=0.2 (a planted 20%
#                slowdown, demonstration only), autosaved and compared against stage 1 with
#                --benchmark-compare-fail=median:10%: this stage is EXPECTED TO FAIL (exit code recorded)
#   4. plots     RESULTS_DIR/figures/*.png
# Then RESULTS_DIR/summary.txt (stage, exit code, seconds) and RESULTS_DIR/bench_results.tar.gz (everything).
#
# Environment: PYTHON (default python3), PAGED_BENCH_ALLOW_CPU=1 (dry run of this script on a CPU: timings
# meaningless), PAGED_BENCH_BUDGET_S (default 390: the whole script
# then fits a 10-minute device call), PAGED_BENCH_* options (see
# conformance/benchmarks/conftest.py). Wheels the machine lacks (ibm-fms, FlashInfer) are installed from ./.whl
# when present (fetch them with `bash ../shared/tools/device-wheels.sh --peers` before sending the tree).
set -u
OUT=${1:?usage: scripts/gpu_bench.sh RESULTS_DIR}
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
BUDGET=${PAGED_BENCH_BUDGET_S:-390}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

. scripts/gpu_env.sh

"$PY" - <<'EOF' 2>&1 | tee "$OUT/logs/00_env.log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "flashinfer", "pytest_benchmark"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(name, "not importable:", repr(exc)[:200])
import os
raise SystemExit(0 if torch.cuda.is_available() or os.environ.get("PAGED_BENCH_ALLOW_CPU") == "1"
                 else "no CUDA GPU visible")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "env: no GPU (see logs/00_env.log)" | tee -a "$SUMMARY"; exit 2; }

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME RESERVE_S EXPECT CMD...: run CMD with a limit of (time left - RESERVE_S) seconds. SIGINT on timeout
# lets pytest finish its session (pytest-benchmark still writes the JSON of the benchmarks that ran).
stage() {
  local name=$1 reserve=$2 expect=$3; shift 3
  local limit=$(( $(left) - reserve ))
  if [ "$limit" -lt 20 ]; then
    echo "$name: SKIPPED (no time left)" | tee -a "$SUMMARY"
    return
  fi
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/logs/$name.log"
  # Tests starting after the deadline are skipped (the session still ends normally and writes its JSON);
  # timeout is the backstop for a test that overruns it.
  PAGED_BENCH_DEADLINE=$(( $(date +%s) + limit - 45 )) timeout -s INT -k 30 "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note=" TIMED OUT after ${limit}s (partial results)"
  grep -q "PAGED_BENCH_DEADLINE passed" "$OUT/logs/$name.log" && note="$note (some tests skipped at the deadline)"
  [ "$expect" = fail ] && note="$note (EXPECTED to fail: planted slowdown; $(grep -c "failed PercentageRegressionCheck" "$OUT/logs/$name.log") regression(s) flagged)"
  echo "$name: exit $rc in $(( $(date +%s) - t ))s$note" | tee -a "$SUMMARY"
  tail -n 5 "$OUT/logs/$name.log"
}

# Saved runs live under the working directory: pytest-benchmark 5.2 crashes formatting its machine_info
# warning for a storage path outside the cwd (Path.relative_to).
STORE=.benchmarks-gpu
rm -rf "$STORE"
PYTEST=("$PY" -m pytest -p no:cacheprovider --bench-results "$OUT")

stage 01_grid 165 pass "${PYTEST[@]}" conformance/benchmarks/test_decode.py conformance/benchmarks/test_prefill.py \
  --bench-grid small --benchmark-json "$OUT/bench.json" --benchmark-autosave \
  --benchmark-storage "file://$STORE" --benchmark-columns min,median,iqr,rounds --benchmark-sort name

stage 02_tests 70 pass "${PYTEST[@]}" conformance/benchmarks/test_capacity.py conformance/benchmarks/test_recompiles.py \
  conformance/benchmarks/test_strategies.py --benchmark-json "$OUT/strategies_bench.json" \
  --benchmark-columns min,median,iqr,rounds

PAGED_BENCH_PLANTED_SLOWDOWN=0.2 stage 03_compare_planted_slowdown 15 fail "${PYTEST[@]}" \
  conformance/benchmarks/test_decode.py --bench-grid small --bench-backends paged \
  --bench-results "$OUT/slowdown" --benchmark-autosave --benchmark-storage "file://$STORE" \
  --benchmark-compare --benchmark-compare-fail=median:10% --benchmark-columns min,median,rounds

stage 04_plots 0 pass "$PY" -m conformance.benchmarks.plots --results "$OUT" --out "$OUT/figures"

cp -r "$STORE" "$OUT/storage" 2>/dev/null
echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
tar -czf /tmp/bench_results.tar.gz -C "$OUT" --exclude bench_results.tar.gz . && mv /tmp/bench_results.tar.gz "$OUT/"
cat "$SUMMARY"
