"""Does the pool's size change the Triton decode kernel's time? (issue 6, target 4), in ONE process on the GPU.

    python scripts/pool_size_ab.py [--fractions 0.0125 0.05] [--seeds 4] [--rounds 40]

The `pool4x` benchmark run found batch 1 8% FASTER in a 4x larger pool, twice, while FlashInfer moved < 1%;
each pool size ran in its own process with one fixed page placement, so placement, pool size and process state
were confounded. Here both pools live side by side (bf16, 8 kv heads, D 128, page 64, the benchmark's mixed
lengths 512-4096), each with several random placements, timed alternately: per call an L2 flush, a spin that
hides the launch, then the decode kernel (new token stored, balanced split-KV, as `PagedKVCache` runs it),
timed with CUDA events; median of `--rounds`. Prints per batch and pool the median over placements, the spread
across placements, and large / small.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from conformance.benchmarks.grid import Ctx
from conformance.benchmarks.harness import flush_l2, spin
from paged import triton_decode
from paged.plan import bucket

HQ, HKV, D, PAGE, MAX_SEQ_LEN = 32, 8, 128, 64, 32768 + 1024


def placements(lens: list[int], pages: int, seeds: int, dev: torch.device) -> list[torch.Tensor]:
    """`seeds` page tables (B, W) int32, each row's pages drawn at random from the whole pool."""
    need = [-(-(n + 1) // PAGE) for n in lens]                              # the new token included
    tables = []
    for seed in range(seeds):
        perm = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))[:sum(need)].int()
        table = torch.zeros(len(lens), -(-MAX_SEQ_LEN // PAGE), dtype=torch.int32)
        used = 0
        for b, k in enumerate(need):
            table[b, :k] = perm[used:used + k]
            used += k
        tables.append(table.to(dev))
    return tables


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0125, 0.05])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    page_bytes = 2 * PAGE * HKV * D * 2                                      # K + V of one page, bf16
    pools = {}
    for f in args.fractions:
        pages = min(int(f * total) // page_bytes, (2**31 - 1) // (PAGE * HKV * D))
        k = torch.randn(HKV, pages * PAGE, D, device=dev, dtype=torch.bfloat16)  # (Hkv, N * P, D)
        pools[f] = (pages, k, torch.randn_like(k))
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton_decode.triton.__version__}; "
          f"pools: " + ", ".join(f"{f:.4f} of the card = {p[0]} pages ({p[0] * page_bytes / 2**30:.2f} GiB)"
                                 for f, p in pools.items()))
    gen = torch.Generator(device=dev).manual_seed(0)
    for B in args.batches:
        lens = Ctx("mix", 512, 4096).lengths(B, 1234 + B)
        splits = triton_decode.decode_splits(bucket(B), HKV, MAX_SEQ_LEN, dev)
        keys = torch.tensor([triton_decode.split_keys([n + 1 for n in lens], HKV, splits, dev)], device=dev)
        q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k_new, v_new = (torch.randn(B, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
        q_start = torch.tensor(lens, dtype=torch.int32, device=dev)          # stored keys; the new one goes next
        q_len = torch.ones(B, dtype=torch.int32, device=dev)
        runs = [(f, i, table) for f, (pages, _, _) in pools.items()
                for i, table in enumerate(placements(lens, pages, args.seeds, dev))]
        times: dict[tuple, list[float]] = {(f, i): [] for f, i, _ in runs}
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for r in range(args.rounds + 3):                                     # 3 warm-up rounds
            for f, i, table in (runs if r % 2 else runs[::-1]):              # alternate the order
                _, k, v = pools[f]
                flush_l2(dev)
                spin(dev, 300e-6)
                ev0.record()
                triton_decode.paged_decode(q, k, v, table, q_start, q_len, PAGE, D ** -0.5, splits,
                                           k_new=k_new, v_new=v_new, split_keys=keys)
                ev1.record()
                ev1.synchronize()
                if r >= 3:
                    times[(f, i)].append(ev0.elapsed_time(ev1) * 1e3)      # us
        med = {key: statistics.median(t) for key, t in times.items()}
        line = [f"B{B} ({splits} split slots):"]
        per_pool = {}
        for f in pools:
            m = [med[(f, i)] for i in range(args.seeds)]
            per_pool[f] = statistics.median(m)
            line.append(f"pool {f:.4f}: {per_pool[f]:.2f} us (placements {min(m):.2f}-{max(m):.2f})")
        small, large = min(pools), max(pools)
        line.append(f"large / small {per_pool[large] / per_pool[small]:.3f}x")
        print("  ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
