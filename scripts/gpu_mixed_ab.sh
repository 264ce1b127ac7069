#!/usr/bin/env bash
# Issue 19's mixed-step A/B on the GPU, all in one device call (same machine state): the mixed kernel's GPU tests,
# scripts/gpu_mixed_steps.py in an older tree (BASE, a `git archive` of the commit to compare with, unpacked there)
# and in this one (FlashInfer in both), then the mixed sweep of this tree. Each stage is capped by `timeout`; a limit
# or budget of 0 skips its stage.
#   bash scripts/gpu_mixed_ab.sh OUT BASE [STEPS_BUDGET_S=80] [SWEEP_BUDGET_S=120] [UNIT_LIMIT_S=100]
set -u
OUT=$1 BASE=$2 STEPS=${3:-80} SWEEP=${4:-120} UNIT=${5:-100}
. scripts/gpu_env.sh
export GPU_ENV_SITE_READY=1
mkdir -p "$OUT"
machine_info "$OUT/machine.txt"
echo "tree $(cat REV 2>/dev/null), base $(cat "$BASE/REV" 2>/dev/null)" | tee -a "$OUT/machine.txt"
if [ "$UNIT" != 0 ]; then
  timeout -s INT "$UNIT" "$PY" -m pytest tests/test_triton_mixed.py tests/test_sdpa_prefill.py tests/test_cuda_graph.py \
    tests/test_triton_decode.py -q --device cuda -n 6 --dist loadfile -p conformance.plugin > "$OUT/unit.log" 2>&1
  echo "unit rc=$?" | tee -a "$OUT/unit.log"; tail -5 "$OUT/unit.log"
fi
(cd "$BASE" && PYTHONPATH="/tmp/site:$PWD" timeout -s INT $((STEPS + 60)) "$PY" scripts/gpu_mixed_steps.py "$OUT/base" \
  --budget-s "$STEPS" > "$OUT/base.log" 2>&1); echo "base rc=$?"
timeout -s INT $((STEPS + 60)) "$PY" scripts/gpu_mixed_steps.py "$OUT/new" --budget-s "$STEPS" > "$OUT/new.log" 2>&1
echo "new rc=$?"
if [ "$SWEEP" != 0 ]; then
  timeout -s INT $((SWEEP + 60)) "$PY" scripts/gpu_sweep19.py "$OUT/sweep" --only mixed --no-flashinfer \
    --budget-s "$SWEEP" > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"
fi
for f in base/mixed_steps.md new/mixed_steps.md sweep/sweep19.md; do echo "== $f"; cat "$OUT/$f" 2>/dev/null; done
