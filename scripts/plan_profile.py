"""Where PagedKVCache.plan() spends its host time on a decode step (issue 6, target 5), on this machine.

    python scripts/plan_profile.py [--batches 8 32 128] [--rounds 200] [--top 15]

The whole-step benchmark's cache layout (8 kv heads, head dim 128, page 64, contexts 512-4096, pages at random;
one layer: plan() never touches the pools on a plain decode step) and the shipped decode kernel. For each batch:
the median host ms of plan() with the GPU idle (synchronised before each call), with the GPU busy (a ~2 ms
`torch.cuda._sleep` enqueued before each call, as when plan() runs while a step's graph replays), and a cProfile
of the busy case, `--top` functions by own time. On the CPU only the first and the profile mean anything.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time

import torch

from paged import CacheSpec, PagedKVCache


def build(batch: int, rounds: int, device: torch.device,
          decode_kernel: str = "auto") -> tuple[PagedKVCache, list[int]]:
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(512, 4096, (batch,), generator=gen).tolist()
    page, steps = 64, 3 * rounds + 8
    pages = max(sum(math.ceil((n + steps) / page) for n in lens) + batch, math.ceil((4096 + steps) / page))
    spec = CacheSpec(num_layers=1, num_kv_heads=8, head_dim=128, page_size=page, num_pages=pages,
                     max_seq_len=4096 + steps, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                     device=device)
    cache = PagedKVCache(spec, policy="random", seed=batch, decode_kernel=decode_kernel)
    ids = list(range(batch))
    for i in ids:
        cache.admit(i)
    cache.plan(ids, lens)                       # the contexts (K/V never written: plan() does not read them)
    return cache, ids


def timed_plans(cache: PagedKVCache, ids: list[int], rounds: int, busy: bool) -> list[float]:
    cuda = cache.spec.device.type == "cuda"
    out = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(4_000_000)    # ~2 ms of GPU work ahead of plan()'s copies
        t = time.perf_counter()
        cache.plan(ids, [1] * len(ids))
        out.append(time.perf_counter() - t)
        cache._plan.layers_run.add(0)           # as if the step ran
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for batch in args.batches:
        cache, ids = build(batch, args.rounds, device)
        timed_plans(cache, ids, 10, busy=False)                                   # warm-up
        idle = statistics.median(timed_plans(cache, ids, args.rounds, busy=False)) * 1e3
        busy = statistics.median(timed_plans(cache, ids, args.rounds, busy=True)) * 1e3
        print(f"\nbatch {batch}: plan() median {idle:.3f} ms with the GPU idle, {busy:.3f} ms with it busy")
        profile = cProfile.Profile()
        profile.enable()
        timed_plans(cache, ids, args.rounds, busy=True)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
