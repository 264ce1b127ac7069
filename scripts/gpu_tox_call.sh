#!/usr/bin/env bash
# One device call, from the repository root of a tree sent to the offline GPU machine:
#   1. run()'s host time with its real launches, and a cProfile of it (scripts/run_host_profile.py)
#   2. the host-overhead benchmark (run(): cached vs Triton's own launch, in the same run; plan())
#   0. issue 19's sizing sweeps (scripts/gpu_sweep19.py, SWEEP_BUDGET_S, 0 skips it); HOST_STAGES=0 skips 1 and 2
#   3. the decode classes of issue 19 (scripts/gpu_decode_classes.sh, DECODE_BUDGET_S, 0 skips it), and its mixed
#      prefill+decode steps (scripts/gpu_mixed_steps.py, MIXED_BUDGET_S, 0 skips it)
#   4. `tox -e gpu` itself (tox-current-env: this machine's torch lives in a venv tox cannot see), timed
#   SWEEP_ARGS: more arguments of the sweep (e.g. `--only mixed --cases NAME --no-flashinfer`); PACK=1 packs every
#   output but machine.txt into OUTDIR/all.tgz at the end (a device call brings back at most 8 files)
#   bash scripts/gpu_tox_call.sh OUTDIR [TOX_LIMIT_S]
# Needs ./.whl from `bash ../shared/tools/device-wheels.sh --peers` and `--tox`, plus the pytest-xdist and execnet
# wheels (`pip download --no-deps pytest-xdist execnet -d .whl`).
set -uo pipefail
out=${1:?usage: gpu_tox_call.sh OUTDIR [TOX_LIMIT_S]}; limit=${2:-450}
mkdir -p "$out"; out=$(cd "$out" && pwd)
. scripts/gpu_env.sh
machine_info "$out/machine.txt"
echo "commit $(cat REV 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$out/machine.txt"
# tox and its build backends apart from the test wheels; the project's own dist-info (entry points: the pytest
# plugin, the backends) from a no-deps, no-isolation build, with the source tree first on PYTHONPATH.
"$PY" -m pip install -q --no-index --no-deps --target /tmp/toxsite .whl/tox/*.whl > "$out/pip.log" 2>&1
PYTHONPATH=/tmp/toxsite "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/projsite . \
    >> "$out/pip.log" 2>&1 || echo "project install failed (see pip.log)"
export PYTHONPATH="$PYTHONPATH:/tmp/projsite"
stage() {  # stage NAME LIMIT CMD...: run CMD under LIMIT seconds into OUT/NAME.log, exit code and seconds to machine.txt
  local name=$1 lim=$2 t; shift 2
  t=$(date +%s)
  timeout -s INT -k 20 "$lim" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t ))s (limit $lim)" | tee -a "$out/machine.txt"
}
if [ "${SWEEP_BUDGET_S:-0}" != 0 ]; then  # issue 19's sizing sweeps first: the data a later rule is fitted to
  stage sweep19 $(( SWEEP_BUDGET_S + 60 )) "$PY" scripts/gpu_sweep19.py "$out/sweep" --budget-s "$SWEEP_BUDGET_S" \
      ${SWEEP_ARGS:-}
fi
if [ "${HOST_STAGES:-1}" != 0 ]; then
stage run_profile 60 "$PY" scripts/run_host_profile.py --device cuda --launches real --rounds 1000 --profile-top 25
stage host 90 "$PY" -m pytest conformance/benchmarks/test_host_overhead.py --device cuda -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name --benchmark-json "$out/host_overhead.json"
fi
if [ "${DECODE_BUDGET_S:-0}" != 0 ]; then
  stage decode_classes $(( DECODE_BUDGET_S + 80 )) bash scripts/gpu_decode_classes.sh "$out/decode" "$DECODE_BUDGET_S"
fi
if [ "${MIXED_BUDGET_S:-0}" != 0 ]; then
  stage mixed_steps $(( MIXED_BUDGET_S + 90 )) "$PY" scripts/gpu_mixed_steps.py "$out/mixed" --budget-s "$MIXED_BUDGET_S"
fi
PYTHONPATH="/tmp/toxsite:$PYTHONPATH" stage tox-gpu "$limit" "$PY" -m tox -e gpu --current-env
cp results/conformance-gpu.json "$out/" 2>/dev/null
grep -E "^=====|passed|failed|^FAILED|^ERROR|PASSED|conformance report" "$out/tox-gpu.log" | cut -c1-250 | tail -40
cat "$out/run_profile.log" | head -60
grep -E "test_|Name" "$out/host.log" | head -30
cat "$out/decode/decode_classes.md" 2>/dev/null | head -60
cat "$out/sweep/sweep19.md" 2>/dev/null
if [ -f "$out/mixed/mixed_steps.md" ]; then head -40 "$out/mixed/mixed_steps.md"; else tail -n 30 "$out/mixed_steps.log" 2>/dev/null; fi
if [ "${PACK:-0}" = 1 ]; then
  (cd "$out" && tar czf /tmp/all.tgz --exclude machine.txt . && find . -mindepth 1 ! -name machine.txt -delete \
      && mv /tmp/all.tgz .)
fi
