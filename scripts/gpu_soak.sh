#!/usr/bin/env bash
# Issue 17's soak: >= 10^4 trace steps of the conformance checks on one GPU, in ONE process, its report under OUT.
#
#   bash scripts/gpu_soak.sh OUT        (from the repository root; one 9-minute device call, single GPU)
#
# The checks share a wall-clock budget (SOAK_BUDGET_S, default 450 s: `python -m conformance --time-budget`): each gets
# an equal share of the time left when it starts and starts no new trace once its share is spent, then the report is
# written (steps per check, each stopped check marked). The 10^4-step minimum is judged on what ran (exit 1 below it).
# A `timeout` at budget + 70 s sends SIGTERM if a last trace overruns: the report is then written with status
# "interrupted" (exit 4); even a SIGKILL leaves the checkpoint report (status "running") of the traces completed.
# Outputs: OUT/conformance-soak.json (the report), OUT/soak.log, OUT/machine.txt, OUT/rev.txt, OUT/summary.txt.
set -u
OUT=${1:?usage: scripts/gpu_soak.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
. scripts/gpu_env.sh
machine_info "$OUT/machine.txt"
git rev-parse HEAD > "$OUT/rev.txt" 2>/dev/null || cp .git/HEAD "$OUT/rev.txt" 2>/dev/null || true
BUDGET=${SOAK_BUDGET_S:-450}
t0=$(date +%s)
timeout -s TERM -k 15 $((BUDGET + 70)) "$PY" -m conformance --device cuda --profile soak --backend paged \
  --time-budget "$BUDGET" --json "$OUT/conformance-soak.json" > "$OUT/soak.log" 2>&1
rc=$?
echo "soak rc=$rc $(( $(date +%s) - t0 ))s (0 passed; 1 failed or < 10^4 steps; 2 bad command line; 3 pytest could not run; 4 interrupted; 124/137 killed)" \
  | tee "$OUT/summary.txt"
tail -n 32 "$OUT/soak.log"
