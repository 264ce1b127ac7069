"""What of a Triton decode step's run() host time is the cache's own Python, and what is the kernel launches.

    TRITON_INTERPRET=1 python scripts/run_host_profile.py [--batches 1 8 64 128] [--rounds 2000]
    python scripts/run_host_profile.py --device cuda --launches real --profile-top 25     # a GPU machine

Issue 16 asks for <= 25 us of host time per run() at batch 64; the H200 host measured 109 us
(`conformance/benchmarks/test_host_overhead.py`). Here the two Triton launches of run() (`launch_items`: the item
kernel and the merge) are replaced by a no-op, so what is timed is everything else run() does on a plain decode
step: the input checks (`StepPlan.fits`), the bucket's launch state, the output's allocation. It runs on any
machine, the CPU included (TRITON_INTERPRET=1 only makes the Triton kernel selectable there; nothing is
interpreted). Layout of `scripts/plan_profile.py` (the host-overhead benchmark's on CUDA): 32/8 heads, head dim 128,
page 64, contexts 512-4096 at random, one layer (float32 on the CPU). plan() of the same step is timed beside it (host work only: on the CPU its page zeroing
is real memory work, on CUDA two enqueued fills). Medians, torch single-threaded.

On a GPU (`--device cuda --launches real`) the launches are kept (the GPU synchronised before each timed call) and
`--profile-top N` prints a cProfile of run() at the largest batch: what bounds run()'s host time there.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import paged.kernels.triton_decode as triton_decode
from plan_profile import build          # the host-overhead layout (this script's folder is on sys.path)

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
    p.add_argument("--device", default="cpu")
    p.add_argument("--launches", choices=("none", "real"), default="none")
    p.add_argument("--profile-top", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    launches = []
    if args.launches == "none":
        triton_decode.launch_items = lambda *a: (launches.append(1), a[13])[1]     # no kernel: `out` as is
    what = "without its two kernel launches" if args.launches == "none" else "with its kernel launches"
    for batch in args.batches:
        cache, ids = build(batch, args.rounds, dev, decode_kernel="triton")
        ones = [1] * batch

        def plan_done():
            if cache.current_plan is not None:
                cache.current_plan.layers_run.add(0)            # as if the step ran
            sync()

        plan_us = median_us(lambda: cache.plan(ids, ones), min(args.rounds, 300), plan_done)
        plan = cache.plan(ids, ones)
        dt = cache.spec.dtype
        q = torch.randn(batch, 1, 32, 128, device=dev, dtype=dt)                               # (B, 1, Hq, D)
        k, v = (torch.randn(batch, 1, 8, 128, device=dev, dtype=dt) for _ in "kv")             # (B, 1, Hkv, D)

        def again():
            plan.layers_run.clear()
            sync()

        run_us = median_us(lambda: cache.run(0, q, k, v), args.rounds, again)
        assert plan.kernel == "triton" and (launches or args.launches == "real"), "run() did not reach the kernel"
        print(f"batch {batch:4d}: plan() {plan_us:7.1f} us   run() {what} {run_us:6.1f} us", flush=True)
    if args.profile_top:
        prof = cProfile.Profile()
        for _ in range(args.rounds):
            again()
            prof.enable()
            cache.run(0, q, k, v)
            prof.disable()
        print(f"cProfile of {args.rounds} run() calls at batch {batch} (tottime, seconds):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
