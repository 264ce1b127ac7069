#!/usr/bin/env bash
# Issue 6's next experiments in one GPU call (docs/decode-performance-notes.md), each a run of the small decode
# grid with one thing changed, all under OUT:
#
#   bash scripts/gpu_decode_ab.sh OUT        (from the repository root; offline is fine; ~7 minutes on an H200, limits sum to 480 s)
#
#   base      paged, FlexAttention on a contiguous cache and FlashInfer as shipped (Hopper decode default:
#             num_stages 3, num_warps 4; pool 5% of the card)
#   torchcfg  paged with stages 1 / warps 2 (what torch's sm_90 heuristic ends at): is the shipped default a gain?
#   pool4x    paged + FlashInfer with a 4x larger pool (20%), same sequences: target 4, hypothesis 2
#   split32   paged with SPLIT_KV 32 (more split-KV tiles): hypothesis 2 at batch 1 and 8
#   masked    paged with decode_full_blocks=False (split-KV tiles follow each sequence, not the pool): hypothesis 2
#   fi_tc     FlashInfer with use_tensor_cores=True: is our FlashInfer baseline FlashInfer's best?
#   prefill   the prefill grid, paged vs FlexAttention on a contiguous cache (target 7: a 4k chunk within 1.2x)
# Each run writes OUT/<name>.json (pytest-benchmark JSON, extra_info has GB/s and copy fraction) and
# OUT/<name>.log; then OUT/ab.md compares medians case by case against `base`.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_decode_ab.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
. scripts/gpu_env.sh
machine_info "$OUT/machine.txt"

run() {  # run NAME LIMIT_S [ENV=VALUE ...] -- PYTEST ARGS...
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local t=$(date +%s) file=conformance/benchmarks/test_decode.py
  [ "$name" = prefill ] && file=conformance/benchmarks/test_prefill.py
  env "${envs[@]}" timeout -s INT -k 20 "$limit" "$PY" -m pytest -p no:cacheprovider -q \
    "$file" --bench-grid small --benchmark-json "$OUT/$name.json" \
    --bench-results "$OUT/$name-results" --benchmark-columns median,rounds "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
run base 100 -- --bench-backends paged,flexcontig,flashinfer
run torchcfg 65 -- --bench-backends paged --bench-kernel-options '{"num_stages": 1, "num_warps": 2}'
run pool4x 90 -- --bench-backends paged,flashinfer --bench-pool-fraction 0.2
run split32 65 -- --bench-backends paged --bench-kernel-options '{"SPLIT_KV": 32}'
run masked 65 PAGED_BENCH_DECODE_FULL_BLOCKS=0 -- --bench-backends paged
run fi_tc 45 PAGED_BENCH_FLASHINFER_TENSOR_CORES=1 -- --bench-backends flashinfer
run prefill 50 -- --bench-backends paged,flexcontig

"$PY" - "$OUT" <<'EOF' | tee "$OUT/ab.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def medians(name):
    f = out / f"{name}.json"
    if not f.is_file():
        return {}
    return {b["name"]: b["stats"]["median"] * 1e3 for b in json.loads(f.read_text())["benchmarks"]}
runs = {n: medians(n) for n in ("base", "torchcfg", "pool4x", "split32", "masked", "fi_tc", "prefill")}
cases = sorted({name.split("-", 1)[1].rstrip("]") for name in runs["base"]})
def case_of(name):
    return name.split("[", 1)[1].split("-", 1)[1].rstrip("]")
print("# Decode A/B (median ms; ratio to `base` in brackets)\n")
print("| case | paged base | paged torchcfg | paged pool4x | paged split32 | paged masked | flex contiguous | FlashInfer base | FlashInfer pool4x | FlashInfer tensor cores |")
print("|---|---|---|---|---|---|---|---|---|---|")
def cell(run, backend, case, ref):
    test = "test_prefill" if run == "prefill" else "test_decode"
    v = runs[run].get(f"{test}[{backend}-{case}]")
    if v is None:
        return "-"
    return f"{v:.3f}" + (f" ({v / ref:.2f}x)" if ref else "")
for c in cases:
    pb = runs["base"].get(f"test_decode[paged-{c}]")
    fb = runs["base"].get(f"test_decode[flashinfer-{c}]")
    print(f"| {c} | {cell('base', 'paged', c, None)} | {cell('torchcfg', 'paged', c, pb)} | "
          f"{cell('pool4x', 'paged', c, pb)} | {cell('split32', 'paged', c, pb)} | {cell('masked', 'paged', c, pb)} | "
          f"{cell('base', 'flexcontig', c, pb)} | "
          f"{cell('base', 'flashinfer', c, None)} | {cell('pool4x', 'flashinfer', c, fb)} | {cell('fi_tc', 'flashinfer', c, fb)} |")
print("\n# Prefill (median ms; flex contiguous as a ratio to paged)\n")
print("| case | paged | flex contiguous |")
print("|---|---|---|")
for c in sorted({case_of(n) for n in runs["prefill"]}):
    pp = runs["prefill"].get(f"test_prefill[paged-{c}]")
    print(f"| {c} | {cell('prefill', 'paged', c, None)} | {cell('prefill', 'flexcontig', c, pp)} |")
EOF
