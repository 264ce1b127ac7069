#!/usr/bin/env bash
# The GPU test suite and the conformance suite in parallel shards on one GPU machine (16 cores), so that both
# fit in one 10-minute device call: compiles are CPU-bound, the GPU is mostly idle while they run.
#   bash scripts/gpu_parallel.sh OUTDIR [LIMIT_S]
# OUTDIR gets summary.txt (one line per shard: exit code, seconds, pytest's last line, failures) and
# logs.tar.gz (every shard's full log and junit XML). Environment: scripts/gpu_env.sh; ONLY=REGEX runs only the
# shards and checks whose names (t_core, s_isolation_poison, s_paged_flex, ...) match it.
set -uo pipefail
out=${1:?usage: gpu_parallel.sh OUTDIR [LIMIT_S]}; limit=${2:-420}
mkdir -p "$out/logs"; out=$(cd "$out" && pwd)
. scripts/gpu_env.sh
export PAGED_REQUIRE_GPU=1 TORCHINDUCTOR_COMPILE_THREADS=2
machine_info "$out/machine.txt"

PYTEST=("$PY" -m pytest -p conformance.plugin --device cuda -q -p no:cacheprovider -rfE --tb=short)
declare -A shard=(
  [t_fms_generate]="tests/fms/test_fms_generate.py"
  [t_fms_other]="tests/fms --ignore=tests/fms/test_fms_generate.py"
  [t_scenarios]="tests/test_scenarios.py"
  [t_core]="tests/test_allocator.py tests/test_errors.py tests/test_run_errors.py tests/test_config_errors.py tests/test_public_api.py tests/test_plugin.py tests/test_host_table.py tests/test_kernel_options.py tests/test_cuda_graph.py tests/test_transfer.py"
  [t_twins]="tests/test_cache_bookkeeping.py tests/test_eager_vs_compiled.py tests/test_peer_torch_paged.py tests/test_peer_torch_paged_defects.py"
  [t_triton]="tests/test_triton_decode.py tests/test_teeth.py -k triton_decode"
  [t_more]="tests/test_triton_worklist.py tests/test_sdpa_prefill.py tests/test_reliability.py tests/test_mods.py tests/test_oracle_rules.py"
)
checks=(outputs_match_oracle fragmentation isolation_poison isolation_fork eager_matches_compiled
        errors_leave_state_unchanged determinism stateful)
t0=$(date +%s)
timed() {  # timed NAME CMD...: run CMD under the limit, log to logs/NAME.log, exit code and seconds to logs/NAME.rc
  local name=$1 t; shift
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return 0
  t=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  echo "exit $? in $(( $(date +%s) - t ))s" > "$out/logs/$name.rc"
}
for name in "${!shard[@]}"; do
  # shellcheck disable=SC2086
  timed "$name" "${PYTEST[@]}" ${shard[$name]} --junitxml="$out/logs/$name.xml" &
done
for c in "${checks[@]}"; do
  timed "s_$c" "$PY" -m conformance --device cuda --profile gpu --json "$out/logs/s_$c.json" \
      -- -p conformance.plugin -k "test_$c" --junitxml="$out/logs/s_$c.xml" &
done
# `paged` decodes on the Triton kernel on CUDA: keep FlexAttention decode under the suite too (ci profile).
timed s_paged_flex "$PY" -m conformance --device cuda --profile ci --backend paged-flex \
    --json "$out/logs/s_paged_flex.json" -- -p conformance.plugin --junitxml="$out/logs/s_paged_flex.xml" &
wait
: > "$out/summary.txt"
for f in "$out"/logs/*.log; do
  n=$(basename "$f" .log)
  echo "== $n ($(cat "${f%.log}.rc" 2>/dev/null); exit 124 = timed out): $(grep -E '(passed|failed|error|skipped|xfailed).* in [0-9.]+s' "$f" | tail -1)" >> "$out/summary.txt"
  grep -E "^(FAILED|ERROR) " "$f" | cut -c1-220 >> "$out/summary.txt"
  sed -n '/conformance report/,$p' "$f" | head -20 >> "$out/summary.txt"
done
echo "total $(( $(date +%s) - t0 ))s" >> "$out/summary.txt"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
cat "$out/summary.txt"
