#!/usr/bin/env bash
# End-to-end FMS generation on one GPU (conformance.fms_bench): FMS + paged (eager; compiled + CUDA graphs) against
# HF transformers (eager; static cache + torch.compile) and FMS's default path, same random weights, one process.
#
#   bash scripts/gpu_fms_bench.sh OUT [1b|8b|all]       (from the repository root; offline is fine)
#
# Needs ibm-fms on the machine: `bash ../shared/tools/device-wheels.sh` fetches its wheel into ./.whl, installed
# into /tmp/site here when present (send .whl along with the tree).
#   1b  Llama-3.2-1B shape, bf16: every mode at prompt 512, batches 1,8,64,128; the compiled modes at prompt 2048.
#   8b  Llama-3-8B shape (32 layers, dim 4096, 32/8 heads, FFN 14336, vocab 128256), bf16: batches 1,8,64 at
#       prompts 512 and 2048, HF static vs paged graphs; every mode at batch 1, prompt 512.
# Writes OUT/<name>/results.{json,md}, step_vs_batch.png, and OUT/machine.txt.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_fms_bench.sh OUT [1b|8b|all]}
WHAT=${2:-all}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
. scripts/gpu_env.sh
machine_info "$OUT/machine.txt"
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: python -m conformance.fms_bench $*"
  timeout -s INT -k 20 "$limit" "$PY" -m conformance.fms_bench "$@" --out "$OUT/$name" 2>&1 \
    | tee "$OUT/$name.log" | grep "^\[bench\]"
}
C=(--new-tokens 16 --repeats 2)
if [ "$WHAT" = 1b ] || [ "$WHAT" = all ]; then
  bench 1b-p512 250 --size 1b --batches 1,8,64,128 --prompts 512 "${C[@]}"
  bench 1b-p2048 170 --size 1b --batches 1,8,64,128 --prompts 2048 --modes hf-static,paged-graphs,paged-eager "${C[@]}"
fi
if [ "$WHAT" = 8b ] || [ "$WHAT" = all ]; then
  bench 8b 330 --size 8b --batches 1,8,64 --prompts 512,2048 --modes hf-static,paged-graphs "${C[@]}"
  bench 8b-all-modes 150 --size 8b --batches 1 --prompts 512 "${C[@]}"
fi
