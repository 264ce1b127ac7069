#!/usr/bin/env bash
# Issue 19's decode classes on one GPU (scripts/gpu_decode_classes.py): the work-list Triton decode kernel against
# the per-row split kernel it replaced and FlashInfer's decode wrapper, device time with L2 flushed, % of copy BW.
#
#   bash scripts/gpu_decode_classes.sh OUT [BUDGET_S]     (from the repository root; <= 4 minutes on an H200)
#
# OUT/decode_classes.md (the table), OUT/decode_classes.json (every case), OUT/decode_classes.log, OUT/machine.txt.
# BUDGET_S (default 180): no case starts past it; FlashInfer JIT-compiles a new (dtype, head dim) only in its
# first half. FlashInfer comes from ./.whl (scripts/gpu_env.sh); without it its columns stay empty.
set -u
OUT=${1:?usage: scripts/gpu_decode_classes.sh OUT [BUDGET_S]}
BUDGET=${2:-180}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
. scripts/gpu_env.sh
machine_info "$OUT/machine.txt"
t=$(date +%s)
timeout -k 10 $(( BUDGET + 50 )) "$PY" scripts/gpu_decode_classes.py "$OUT" --budget-s "$BUDGET" \
  > "$OUT/decode_classes.log" 2>&1
echo "decode_classes: exit $? in $(( $(date +%s) - t ))s" | tee "$OUT/summary.txt"
cat "$OUT/decode_classes.md" 2>/dev/null || tail -n 30 "$OUT/decode_classes.log"
