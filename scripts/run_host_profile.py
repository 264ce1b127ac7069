"""What of a Triton decode step's run() host time is the cache's own Python, and what is the kernel launches.

    TRITON_INTERPRET=1 python scripts/run_host_profile.py [--batches 1 8 64 128] [--rounds 2000]

Issue 16 asks for <= 25 us of host time per run() at batch 64; the H200 host measured 109 us
(`conformance/benchmarks/test_host_overhead.py`). Here the two Triton launches of run() (`launch_items`: the item
kernel and the merge) are replaced by a no-op, so what is timed is everything else run() does on a plain decode
step: the input checks (`StepPlan.fits`), the bucket's launch state, the output's allocation. It runs on any
machine, the CPU included (TRITON_INTERPRET=1 only makes the Triton kernel selectable there; nothing is
interpreted). Layout of the host-overhead benchmark on CUDA: 32/8 heads, head dim 128, page 64, contexts 512-4096 at
random, bf16, one layer. plan() of the same step is timed beside it (host work only: on the CPU its page zeroing
is real memory work, on CUDA two enqueued fills). Medians, torch single-threaded.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import paged.kernels.triton_decode as triton_decode
from paged import CacheSpec, PagedKVCache

PAGE, STEPS = 64, 5000


def build(batch: int) -> tuple[PagedKVCache, list[int]]:
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(512, 4096, (batch,), generator=gen).tolist()
    pages = max(sum(math.ceil((n + STEPS) / PAGE) for n in lens) + batch, math.ceil((4096 + STEPS) / PAGE))
    spec = CacheSpec(num_layers=1, num_kv_heads=8, head_dim=128, page_size=PAGE, num_pages=pages,
                     max_seq_len=4096 + STEPS, dtype=torch.bfloat16, device=torch.device("cpu"))
    cache = PagedKVCache(spec, policy="random", seed=batch, decode_kernel="triton")
    ids = list(range(batch))
    for i in ids:
        cache.admit(i)
    left = dict(zip(ids, lens))
    while any(left.values()):                                   # the contexts, in bounded chunks
        step = [i for i in ids if left[i]]
        chunk = [min(1024, left[i]) for i in step]
        cache.plan(step, chunk)
        for i, n in zip(step, chunk):
            left[i] -= n
    return cache, ids


def median_us(fn, rounds: int, setup) -> float:
    times = []
    for _ in range(rounds):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 128])
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    launches = []
    triton_decode.launch_items = lambda *a: (launches.append(1), a[13])[1]     # no kernel: `out` comes back as is
    for batch in args.batches:
        cache, ids = build(batch)
        ones = [1] * batch

        def plan_done():
            if cache.current_plan is not None:
                cache.current_plan.layers_run.add(0)            # as if the step ran

        plan_us = median_us(lambda: cache.plan(ids, ones), min(args.rounds, 300), plan_done)
        plan = cache.plan(ids, ones)
        q = torch.randn(batch, 1, 32, 128).bfloat16()
        k, v = torch.randn(batch, 1, 8, 128).bfloat16(), torch.randn(batch, 1, 8, 128).bfloat16()
        run_us = median_us(lambda: cache.run(0, q, k, v), args.rounds, plan.layers_run.clear)
        assert launches and plan.kernel == "triton", "run() did not reach the Triton kernel's launch"
        print(f"batch {batch:4d}: plan() {plan_us:7.1f} us   run() without its two kernel launches {run_us:6.1f} us")


if __name__ == "__main__":
    main()
