#!/usr/bin/env bash
# Everything GPU-specific in one call on the offline GPU machine (repo at cwd, wheels in .whl/):
#   bash scripts/gpu_all.sh OUTDIR [tests|suite|bench|all]
# Writes logs and JSON under OUTDIR. The project is used from the source tree (PYTHONPATH), so the pytest
# plugin is loaded with -p conformance.plugin instead of through its entry point.
set -uo pipefail
out=${1:?usage: gpu_all.sh OUTDIR [tests|suite|bench|all]}; what=${2:-all}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGED_REQUIRE_GPU=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${GPU_TESTS_TIMEOUT:-420} python3 -m pytest -p conformance.plugin tests --device cuda -q -p no:cacheprovider \
      --ignore=tests/test_teeth.py --tb=${GPU_TB:-short} --junitxml="$out/tests-gpu.xml" -o junit_logging=no > "$out/tests-gpu.log" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests-gpu.log" | grep -v DEBUG | tail -15
fi
if [ "$what" = suite ] || [ "$what" = all ]; then
  timeout ${GPU_SUITE_TIMEOUT:-420} python3 -m conformance --device cuda --profile gpu --json "$out/conformance-gpu.json" \
      -- -p conformance.plugin ${GPU_SUITE_ARGS:-} > "$out/conformance-gpu.log" 2>&1
  echo "suite rc=$?"; sed -n '/conformance report/,$p' "$out/conformance-gpu.log" | head -30
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  [ -f scripts/gpu_bench.sh ] && timeout 420 bash scripts/gpu_bench.sh "$out/bench" > "$out/bench.log" 2>&1
  echo "bench rc=$?"; tail -20 "$out/bench.log"
fi
