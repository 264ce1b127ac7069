#!/usr/bin/env bash
# FMS inference benchmark on one GPU (paged.fms.bench): FMS's default sdpa path vs the paged op vs no cache,
# with a 7B-shaped and a 1B-shaped random-weight Llama in bf16. All output under OUT.
#
#   bash scripts/gpu_fms_bench.sh OUT [7b|1b|all]       (from the repository root; offline is fine)
#
# Needs ibm-fms on the machine: `bash ../shared/tools/device-wheels.sh` fetches its wheel into ./.whl, which is
# installed into /tmp/site here when present (send .whl along with the tree).
#
#   7b  FMS LLaMAConfig() = Llama-2-7B shape (emb 4096, 32 heads, 32 layers, FFN 11008, vocab 32000), bf16;
#       batches 1,8,32 x prompts 128,512,2048; 32 new tokens (31 timed decode steps), 4 without cache.
#       Runs that would start after 240 s are recorded as skipped; hard limit 300 s.
#   1b  Llama-3.2-1B shape (emb 2048, 32 heads / 8 kv heads, 16 layers, vocab 128256, tied head), bf16;
#       same grid plus batch 64; soft limit 150 s, hard 200 s.
# `all` (default) runs both, about 8.5 minutes at most (under the device's 10-minute command limit); run
# `7b` and `1b` as two commands to leave more slack. Every configuration's pool is sized to that
# configuration (batch x longest sequence), so each one compiles one prefill and one decode graph during its
# untimed warm-up.
#
# Writes OUT/fms-7b/ and OUT/fms-1b/ (results.json, results.md, latency_vs_seq.png, throughput_vs_batch.png,
# memory.png), OUT/*.log, OUT/machine.txt, OUT/summary.txt, OUT/fms_bench_results.tar.gz.
# A run cut by its hard limit keeps every configuration it finished (results.json is rewritten after each);
# its report and plots are then rebuilt with --replot.
# FMS_BENCH_DRY=1 runs the same plumbing on a CPU with the micro model and a tiny grid (checked there, ~1 min).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_fms_bench.sh OUT [7b|1b|all]}
WHAT=${2:-all}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)

. scripts/gpu_env.sh

machine_info "$OUT/machine.txt"
"$PY" -c "import fms, torch; print('ibm-fms imported; gpu:', torch.cuda.is_available() and torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/machine.txt"
: > "$OUT/summary.txt"

# bench NAME HARD_LIMIT_S ARGS...: one benchmark process; SIGINT at the hard limit, then rebuild its report.
bench() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "== $name: python -m paged.fms.bench $* --out $OUT/$name" | tee "$OUT/$name.log"
  timeout -s INT -k 20 "$limit" "$PY" -m paged.fms.bench "$@" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note=" (hard limit ${limit}s hit: partial results)"
  if [ -f "$OUT/$name/results.json" ] && [ ! -f "$OUT/$name/results.md" ]; then
    "$PY" -m paged.fms.bench --replot "$OUT/$name" >> "$OUT/$name.log" 2>&1
  fi
  echo "$name: exit $rc in $(( $(date +%s) - t ))s$note" | tee -a "$OUT/summary.txt"
  grep -E "^\[bench\]" "$OUT/$name.log" | tail -n 40
}

GRID=(--device cuda --dtype bf16 --seq-lens 128,512,2048 --new-tokens 32 --nocache-tokens 4 --warmup-tokens 2)
S7=(--size 7b --batches 1,8,32 --time-budget 240)
S1=(--size 1b --batches 1,8,32,64 --time-budget 150)
if [ "${FMS_BENCH_DRY:-0}" = 1 ]; then
  # Dry run of this script's plumbing on a CPU (micro model, tiny grid, eager attention): numbers meaningless.
  GRID=(--device cpu --dtype fp32 --seq-lens 17 --new-tokens 3 --nocache-tokens 2 --attention eager)
  S7=(--size micro --batches 1,2 --time-budget 60)
  S1=(--size micro --batches 1 --time-budget 60)
fi
if [ "$WHAT" = 7b ] || [ "$WHAT" = all ]; then
  bench fms-7b 300 "${S7[@]}" "${GRID[@]}"
fi
if [ "$WHAT" = 1b ] || [ "$WHAT" = all ]; then
  bench fms-1b 200 "${S1[@]}" "${GRID[@]}"
fi

echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
tar -czf /tmp/fms_bench_results.tar.gz -C "$OUT" --exclude fms_bench_results.tar.gz . \
  && mv /tmp/fms_bench_results.tar.gz "$OUT/"
cat "$OUT/summary.txt"
