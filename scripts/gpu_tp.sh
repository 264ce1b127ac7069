#!/usr/bin/env bash
# Tensor parallel on several GPUs of one host (issue 7): equivalence and the inference benchmark at 1, 2, 4 (and 8)
# ranks, as many as the GPUs visible, NCCL, each rank on its own paged cache. All output under OUT.
#
#   bash scripts/gpu_tp.sh OUT [1b|7b]        (from the repository root; offline is fine; default 1b)
#
# 1. equivalence  a seeded random tiny Llama (MHA 8 heads / 8 kv heads, and GQA 8 / 2, so kvheads < 4 ranks),
#                 float32, 6 random prompts of 37 tokens, 24 greedy tokens, at every world size that fits the
#                 visible GPUs: the tokens of N ranks must equal those of 1 rank (tokens-<model>-N.json).
# 2. benchmark    a random-weight Llama of the chosen shape written once as an HF checkpoint (1b: Llama-3.2-1B,
#                 7b: Llama-2-7B), bf16, 64 random prompts of 512 tokens, 64 new tokens, a KV pool of 16 GiB per
#                 rank, one untimed warm-up generate: tokens/s, K/V pool bytes per rank, bytes per token per
#                 rank, concurrent sequences the pool holds at the longest request (tp-<size>-N.json).
# Then OUT/results.md (tables), OUT/summary.txt, OUT/machine.txt.
# Needs ibm-fms (and transformers, which the GPU machine has): `bash ../shared/tools/device-wheels.sh` puts its
# wheel in ./.whl, installed into /tmp/site here when present.
# GPU_TP_DRY=1 runs the same plumbing on a CPU with gloo, world sizes 1 and 2, a micro model (checked there).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_tp.sh OUT [1b|7b]}
SIZE=${2:-1b}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
. scripts/gpu_env.sh

if [ "${GPU_TP_DRY:-0}" = 1 ]; then
  DEV=cpu; WORLDS=(1 2); SIZE=micro
  BENCH=(--random-prompts 4 --prompt-len 24 --max-new-tokens 4 --token-budget 512 --eager)
  EQ_EXTRA=(--eager)
else
  DEV=cuda
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  WORLDS=(); for n in 1 2 4 8; do [ "$n" -le "$NGPU" ] && WORLDS+=("$n"); done
  [ "${#WORLDS[@]}" -gt 0 ] || { echo "no GPU visible" | tee "$OUT/summary.txt"; exit 2; }
  BENCH=(--random-prompts 64 --prompt-len 512 --max-new-tokens 64 --kv-gib 16 --warmup)
  EQ_EXTRA=()
fi
machine_info "$OUT/machine.txt"
{
  "$PY" -c "import fms, torch; print('ibm-fms imported; nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
  echo "world sizes: ${WORLDS[*]}"
} 2>&1 | tee -a "$OUT/machine.txt"
: > "$OUT/summary.txt"

# Checkpoints: written once, read by every rank of every run.
"$PY" - "$OUT/ckpt" "$SIZE" <<'EOF' 2>&1 | tee "$OUT/checkpoints.log"
import sys, time
import torch
from paged.fms.checkpoint import write_tiny_llama_checkpoint
root, size = sys.argv[1], sys.argv[2]
shapes = {  # hidden, layers, heads, kv heads, ffn, vocab
    "micro": (64, 2, 4, 2, 128, 512),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "7b": (4096, 32, 32, 32, 11008, 32000),
}
for name, kv in (("tiny-mha", 8), ("tiny-gqa", 2)):
    write_tiny_llama_checkpoint(f"{root}/{name}", vocab_size=512, hidden_size=128, num_layers=2, num_heads=8,
                                num_kv_heads=kv, intermediate_size=256, seed=7)
h, n, q, kv, f, v = shapes[size]
t = time.perf_counter()
write_tiny_llama_checkpoint(f"{root}/{size}", vocab_size=v, hidden_size=h, num_layers=n, num_heads=q, num_kv_heads=kv,
                            intermediate_size=f, max_position_embeddings=4096, seed=7, dtype=torch.bfloat16)
print(f"checkpoints written ({size}: {time.perf_counter() - t:.0f} s)")
EOF

launch() {  # launch N LOG ARGS...: one torchrun of the project's launcher
  local n=$1 log=$2; shift 2
  timeout -k 20 "${GPU_TP_LIMIT_S:-240}" torchrun --standalone --nproc-per-node "$n" -m paged.fms.distributed generate \
    --device "$DEV" --no-progress "$@" > "$log" 2>&1
}

for model in tiny-mha tiny-gqa; do
  for n in "${WORLDS[@]}"; do
    t=$(date +%s)
    launch "$n" "$OUT/eq-$model-$n.log" --model-path "$OUT/ckpt/$model" --dtype float32 --random-prompts 6 \
      --prompt-len 37 --max-new-tokens 24 --token-budget 2048 --tokens-out "$OUT/tokens-$model-$n.json" "${EQ_EXTRA[@]}"
    echo "equivalence $model world $n: exit $? in $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
  done
done
for n in "${WORLDS[@]}"; do
  t=$(date +%s)
  launch "$n" "$OUT/tp-$SIZE-$n.log" --model-path "$OUT/ckpt/$SIZE" --dtype bfloat16 --stats "${BENCH[@]}"
  echo "benchmark $SIZE world $n: exit $? in $(( $(date +%s) - t ))s" | tee -a "$OUT/summary.txt"
  grep -E '^\{"world_size"' "$OUT/tp-$SIZE-$n.log" | tail -1 > "$OUT/tp-$SIZE-$n.json"
done
rm -rf "$OUT/ckpt"

"$PY" - "$OUT" "$SIZE" "${WORLDS[@]}" <<'EOF' | tee "$OUT/results.md"
import json, sys
from pathlib import Path
out, size, worlds = Path(sys.argv[1]), sys.argv[2], [int(w) for w in sys.argv[3:]]
print(f"# Tensor parallel on {len(worlds) and max(worlds)} device(s): {size}\n")
print((out / "machine.txt").read_text().strip().replace("\n", "  \n"), "\n")
print("## Equivalence (float32, greedy): tokens of N ranks vs 1 rank\n")
print("| model | " + " | ".join(f"{w} rank(s)" for w in worlds) + " |")
print("|---|" + "---|" * len(worlds))
for model in ("tiny-mha", "tiny-gqa"):
    runs = {w: out / f"tokens-{model}-{w}.json" for w in worlds}
    ref = json.loads(runs[1].read_text())["tokens"] if runs[1].is_file() else None
    cells = []
    for w in worlds:
        if ref is None:
            cells.append("no 1-rank reference (see its log)")
        elif not runs[w].is_file():
            cells.append("no output (see log)")
            continue
        toks = json.loads(runs[w].read_text())["tokens"]
        cells.append("identical" if toks == ref else
                     f"DIFFERENT in {sum(a != b for a, b in zip(toks, ref or []))} of {len(toks)} prompts")
    print(f"| {model} | " + " | ".join(cells) + " |")
print(f"\n## Benchmark ({size}, bf16)\n")
print("| ranks | tokens/s | seconds | K/V pool per rank (GiB) | K/V bytes per token per rank | "
      "pool tokens | concurrent sequences at the longest request |")
print("|---|---|---|---|---|---|---|")
for w in worlds:
    f = out / f"tp-{size}-{w}.json"
    text = f.read_text().strip() if f.is_file() else ""
    if not text:
        print(f"| {w} | failed (see tp-{size}-{w}.log) | | | | | |")
        continue
    s = json.loads(text)
    pool = max(s["kv_pool_bytes_per_rank"]) / 2**30
    print(f"| {w} | {s['tokens_per_s']} | {s['seconds']} | {pool:.2f} | {s['kv_bytes_per_token_per_rank']} | "
          f"{s['pool_tokens']} | {s['concurrent_sequences_at_longest']} |")
EOF
echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
