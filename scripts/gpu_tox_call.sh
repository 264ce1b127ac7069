#!/usr/bin/env bash
# One device call: the host-overhead benchmark (run()'s cached vs plain Triton launch, plan()), then `tox -e gpu`
# itself on the offline GPU machine (tox-current-env), timed.
#   bash scripts/gpu_tox_call.sh OUTDIR [TOX_LIMIT_S]
# Needs ./.whl from `bash ../shared/tools/device-wheels.sh --peers` and `--tox` (+ pytest-xdist, execnet wheels).
set -uo pipefail
out=${1:?usage: gpu_tox_call.sh OUTDIR [TOX_LIMIT_S]}; limit=${2:-450}
mkdir -p "$out"; out=$(cd "$out" && pwd)
. scripts/gpu_env.sh
machine_info "$out/machine.txt"
git_rev=$(cat REV 2>/dev/null || echo unknown); echo "commit $git_rev" >> "$out/machine.txt"
# tox and its build backends apart from the test wheels; the project's own dist-info (entry points: the pytest
# plugin, the backends) from a no-deps, no-isolation build, with the source tree first on PYTHONPATH.
"$PY" -m pip install -q --no-index --no-deps --target /tmp/toxsite .whl/tox/*.whl > "$out/pip.log" 2>&1
PYTHONPATH=/tmp/toxsite "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/projsite . \
    >> "$out/pip.log" 2>&1 || echo "project install failed (see pip.log)"
export PYTHONPATH="$PYTHONPATH:/tmp/projsite"
t=$(date +%s)
"$PY" -m pytest conformance/benchmarks/test_host_overhead.py --device cuda -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name --benchmark-json "$out/host_overhead.json" \
    > "$out/host.log" 2>&1
echo "host benchmark: exit $? in $(( $(date +%s) - t ))s" | tee -a "$out/machine.txt"
t=$(date +%s)
PYTHONPATH="/tmp/toxsite:$PYTHONPATH" timeout -s INT -k 20 "$limit" "$PY" -m tox -e gpu --current-env \
    > "$out/tox-gpu.log" 2>&1
echo "tox -e gpu --current-env: exit $? in $(( $(date +%s) - t ))s (limit $limit)" | tee -a "$out/machine.txt"
cp results/conformance-gpu.json "$out/" 2>/dev/null
grep -E "^=====|passed|failed|^FAILED|^ERROR|PASSED|conformance report" "$out/tox-gpu.log" | cut -c1-250 | tail -60
tail -30 "$out/host.log"
