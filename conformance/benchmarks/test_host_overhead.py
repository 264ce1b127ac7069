"""Host time of `PagedKVCache.plan()` and `run()` on a plain decode step (issue 16: <= 150 us per plan() and
<= 25 us per run() at batch 64, on the GPU).

Each round times ONE call with the host clock and nothing else: on CUDA the GPU is synchronised before the round
(untimed), so the round measures what the host spends enqueueing (plan()'s one copy; run()'s kernel launches),
never a wait for the GPU. Cache layout on CUDA as scripts/plan_profile.py: 32/8 heads, head dim 128, page 64,
contexts 512-4096 at random, bf16; on the CPU 16/4 heads, head dim 64, contexts 64-512, float32 (pools of a few
dozen MB). Pages placed at random, one layer (plan() and run() cost the same host time per layer).

    python -m pytest conformance/benchmarks/test_host_overhead.py --benchmark-columns=median,iqr,min   # GPU
    python -m pytest conformance/benchmarks/test_host_overhead.py -k "plan or flex"                     # CPU

Kernels: on CUDA `triton` (the default decode kernel) and `flex`; on the CPU only `flex` for run(): the Triton
kernel runs there only under Triton's interpreter, whose time says nothing. plan() of a Triton step is host-only
work and is timed on the CPU too (when Triton's interpreter is on: TRITON_INTERPRET=1 before Python starts).
On the CPU run() includes the attention itself (the CPU kernel runs on the host), and plan() fills block lists as
wide as the whole pool (the CPU kernel's requirement; on CUDA they are as wide as one sequence's pages): the CPU
figures are an upper bound of the Python path, not the GPU's host cost. torch runs single-threaded here (small
host ops pay a thread-pool handoff otherwise, and a busy 2-core machine turns that into milliseconds).
"""

from __future__ import annotations

import math

import pytest
import torch

from paged import CacheSpec, PagedKVCache

BATCHES = (1, 8, 64, 128)
KERNELS = ("triton", "flex")
GPU_LAYOUT = dict(hkv=8, hq=32, d=128, ctx=(512, 4096))
CPU_LAYOUT = dict(hkv=4, hq=16, d=64, ctx=(64, 512))
PAGE = 64


def _layout(bench) -> dict:
    return GPU_LAYOUT if bench.cuda else CPU_LAYOUT


def _cache(bench, batch: int, kernel: str, rounds: int) -> tuple[PagedKVCache, list[int]]:
    dev, lay = bench.device, _layout(bench)
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(*lay["ctx"], (batch,), generator=gen).tolist()
    steps = 3 * rounds + 64
    hi = lay["ctx"][1] + steps
    pages = max(sum(math.ceil((n + steps) / PAGE) for n in lens) + batch, math.ceil(hi / PAGE))
    spec = CacheSpec(num_layers=1, num_kv_heads=lay["hkv"], head_dim=lay["d"], page_size=PAGE, num_pages=pages,
                     max_seq_len=hi, dtype=torch.bfloat16 if bench.cuda else torch.float32, device=dev)
    try:
        cache = PagedKVCache(spec, policy="random", seed=batch, decode_kernel=kernel)
    except Exception as exc:  # UnsupportedConfigError: e.g. Triton on the CPU without its interpreter
        pytest.skip(f"decode_kernel={kernel!r} cannot run here: {exc}")
    ids = list(range(batch))
    for i in ids:
        cache.admit(i)
    left = dict(zip(ids, lens))
    while any(left.values()):                                   # reserve the contexts in bounded chunks
        step = [i for i in ids if left[i]]
        chunk = [min(1024, left[i]) for i in step]
        cache.plan(step, chunk)
        for i, n in zip(step, chunk):
            left[i] -= n
    return cache, ids


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rounds(bench) -> int:
    return max(bench.rounds, 200 if bench.cuda else 50)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_plan_host_time(benchmark, bench, batch, kernel):
    """plan() of a decode step: validation, page bookkeeping, host buffers, the kernel's plan, one copy."""
    rounds = _rounds(bench)
    cache, ids = _cache(bench, batch, kernel, rounds)
    ones = [1] * batch

    def setup():
        if cache.current_plan is not None:
            cache.current_plan.layers_run.add(0)                # as if the step ran
        if bench.cuda:
            torch.cuda.synchronize(bench.device)

    def target():
        cache.plan(ids, ones)

    for _ in range(5):
        setup()
        target()
    assert cache.current_plan.kernel == kernel
    benchmark.extra_info.update(batch=batch, kernel=kernel, device=str(bench.device), what="plan() host time")
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("launch", ["cached", "plain"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("batch", BATCHES)
def test_run_host_time(benchmark, bench, batch, kernel, launch, monkeypatch):
    """run() of one layer of a decode step: input checks and the kernel's launches (plus, on the CPU, its work).
    Triton: `cached` launches through paged.kernels.triton_launch (the default), `plain` through `kernel[grid]`
    (the A/B of that module, in the same run)."""
    if kernel == "triton" and not bench.cuda:
        pytest.skip("the Triton kernel runs on the CPU only under Triton's interpreter: nothing to time there")
    if kernel != "triton" and launch == "plain":
        pytest.skip("only the Triton kernel has a cached launch")
    from paged.kernels import triton_launch

    monkeypatch.setattr(triton_launch, "ENABLED", launch == "cached")
    rounds = _rounds(bench)
    cache, ids = _cache(bench, batch, kernel, rounds)
    plan = cache.plan(ids, [1] * batch)
    gen, lay, dt = torch.Generator(device=bench.device).manual_seed(batch), _layout(bench), cache.spec.dtype
    q = torch.randn(batch, 1, lay["hq"], lay["d"], generator=gen, device=bench.device).to(dt)
    k, v = (torch.randn(batch, 1, lay["hkv"], lay["d"], generator=gen, device=bench.device).to(dt) for _ in "kv")

    def setup():
        plan.layers_run.clear()                                 # the same step again: same slots, same K/V
        if bench.cuda:
            torch.cuda.synchronize(bench.device)

    def target():
        cache.run(0, q, k, v)

    for _ in range(5):                                          # compiles (flex), JIT-compiles (Triton)
        setup()
        target()
    assert plan.kernel == kernel
    benchmark.extra_info.update(batch=batch, kernel=kernel, launch=launch, device=str(bench.device),
                                what="run() host time")
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
