"""Whole decode steps of a 32-layer Llama-3-8B-shaped model over the paged cache, with and without a CUDA graph.

Issue 6's target 5: the per-step plan (pages, block mask, slot mapping) is built once and costs < 5% of the
step; nothing inside the layers waits for the GPU; the step can be captured in a CUDA graph and replayed while
the lengths change. Each round is one real decode step (every sequence grows by one token):

    eager        plan() + the model's forward launched op by op (32 x cache.run) + synchronize
    graph        plan() + GraphedStep.replay() (the same forward, captured once) + synchronize
    graph-ahead  GraphedStep.replay() + plan() of the NEXT step while the GPU runs this one + synchronize
                 (plan() never waits for the GPU, so its host time can hide behind the replay)

pytest-benchmark times the whole round with the host clock (a serving loop reads its sampled tokens every
step, so the synchronize belongs to the step); extra_info adds the median host time of plan(), its share of
the step, the device time of the forward alone (CUDA events), weight + K/V bytes and their bandwidth.
One step of each mode first runs under ``torch.cuda.set_sync_debug_mode("error")``: any host-device
synchronisation in plan() or the layers fails the benchmark.

    python -m pytest conformance/benchmarks/test_step.py --benchmark-json=step.json     # GPU
    python -m pytest conformance/benchmarks/test_step.py --benchmark-disable            # CPU smoke (eager only)

Correctness of a replay against op-by-op launches is tests/test_cuda_graph.py's job (bitwise equal).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import pytest
import torch

from conformance.benchmarks.harness import copy_bandwidth, sync, unique_graphs
from conformance.benchmarks.model import LLAMA3_8B, TINY, PagedDecoder, decoder_cache_spec
from paged import PagedKVCache
from paged.graphs import GraphedStep
from paged.transfer import copy_into

GPU_BATCHES, CPU_BATCHES = (8, 32, 128), (2,)
MODES = ("eager", "graph", "graph-ahead")
CTX = (512, 4096)          # stored context per sequence, uniform (GPU); CPU: 8..40
WARMUP_STEPS = 3


class StepSetup:
    """One batch's model, cache and sequences, shared by the eager and graph benchmarks of that batch."""

    def __init__(self, bench, batch: int, rounds: int) -> None:
        dev, cuda = bench.device, bench.cuda
        self.shape, page, (lo, hi) = (LLAMA3_8B, 64, CTX) if cuda else (TINY, 16, (8, 40))
        gen = torch.Generator().manual_seed(batch)
        self.lens = torch.randint(lo, hi, (batch,), generator=gen)                # (B,) int64, host
        steps = len(MODES) * (rounds + WARMUP_STEPS + 4) + 8                       # every step any mode may take
        pages = sum(math.ceil((int(n) + steps) / page) for n in self.lens) + batch
        spec = decoder_cache_spec(self.shape, pages, page, hi + steps, torch.bfloat16 if cuda else torch.float32,
                                  dev)
        # PAGED_BENCH_DECODE_KERNEL=flex|triton overrides the cache's "auto" (Triton on CUDA).
        kernel = os.environ.get("PAGED_BENCH_DECODE_KERNEL", "auto")
        self.cache = PagedKVCache(spec, policy="random", seed=batch, decode_full_blocks="auto", decode_kernel=kernel)
        self.ids = list(range(batch))
        for i in self.ids:
            self.cache.admit(i)
        left = self.lens.clone()
        while int(left.max()) > 0:                                                 # reserve the contexts
            live = [i for i in self.ids if left[i] > 0]
            chunk = [min(4096, int(left[i])) for i in live]
            self.cache.plan(live, chunk)
            for i, n in zip(live, chunk):
                left[i] -= n
        for pool in (self.cache.k_pool, self.cache.v_pool):                        # stand-in contexts
            for layer in range(spec.num_layers):
                pool[layer].normal_(generator=torch.Generator(device=dev).manual_seed(layer))
        self.model = PagedDecoder(self.shape, self.cache, batch)
        self.model.tokens.copy_(torch.randint(0, self.shape.vocab, (batch,), generator=gen))
        self.item = spec.dtype.itemsize

    def plan(self) -> float:
        """Plan the next decode step and refresh the model's positions; returns plan()'s host seconds."""
        t = time.perf_counter()
        self.cache.plan(self.ids, [1] * len(self.ids))
        spent = time.perf_counter() - t
        copy_into(self.model.positions, torch.tensor([self.cache.length(i) - 1 for i in self.ids]))
        return spent

    def bytes_per_step(self) -> tuple[int, int]:
        """(weight bytes, K/V bytes) one decode step reads at least once: every weight but the embedding table,
        of which it gathers one row per sequence; every stored token's K and V in every layer."""
        s = self.shape
        weights = s.weight_params - s.vocab * s.hidden + len(self.ids) * s.hidden
        stored = sum(self.cache.length(i) for i in self.ids)
        return weights * self.item, stored * s.layers * 2 * s.hkv * s.head_dim * self.item


_current: dict[int, StepSetup] = {}


def step_setup(bench, batch: int) -> StepSetup:
    if batch not in _current:
        _current.clear()                       # one batch's model and cache on the card at a time
        sync(bench.device)
        if bench.cuda:
            torch.cuda.empty_cache()
        _current[batch] = StepSetup(bench, batch, bench.rounds)
    return _current[batch]


def _batches(bench) -> tuple[int, ...]:
    return GPU_BATCHES if bench.cuda else CPU_BATCHES


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        from conformance.benchmarks.conftest import settings_of

        combos = [(b, m) for b in _batches(settings_of(metafunc.config)) for m in MODES]
        metafunc.parametrize(("batch", "mode"), combos, ids=[f"{m}-B{b}" for b, m in combos])


def test_model_decode_step(benchmark, bench, batch, mode):
    """Time whole decode steps of the 32-layer model (`mode`: op-by-op launches, or one CUDA graph)."""
    if mode != "eager" and not bench.cuda:
        pytest.skip("CUDA graphs need a GPU")
    setup = step_setup(bench, batch)
    benchmark.group = f"model decode step B{batch}"
    run = _warmed_step(bench, setup, mode)

    graphs_before = unique_graphs()
    weight_bytes, kv_bytes = setup.bytes_per_step()
    plan_s: list[float] = []
    device_s: list[float] = []
    one_step = _timed_step(bench, setup, run, mode == "graph-ahead", plan_s, device_s)
    logits = benchmark.pedantic(one_step, rounds=bench.rounds, warmup_rounds=0, iterations=1)
    recompiles = unique_graphs() - graphs_before
    assert torch.isfinite(logits.float()).all(), "the model produced non-finite logits"

    stats = getattr(benchmark, "stats", None)
    step_s = stats.stats.median if stats is not None and getattr(stats, "stats", None) is not None else None
    plan_med = statistics.median(plan_s)
    info = dict(batch=batch, mode=mode, layers=setup.shape.layers, hidden=setup.shape.hidden,
                hq=setup.shape.hq, hkv=setup.shape.hkv, head_dim=setup.shape.head_dim, page=setup.cache.spec.page_size,
                ctx_mean=round(float(setup.lens.float().mean()), 1), weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                plan_ms=round(plan_med * 1e3, 4), recompiles=recompiles,
                decode_full_blocks=setup.cache.decode_full_blocks, host_syncs_in_step=0 if bench.cuda else None)
    if device_s:
        info["device_ms"] = round(statistics.median(device_s) * 1e3, 4)
    if step_s:
        copy = copy_bandwidth(bench)
        gbps = (weight_bytes + kv_bytes) / step_s / 1e9
        info.update(step_ms=round(step_s * 1e3, 4), plan_fraction=round(plan_med / step_s, 4),
                    tokens_per_s=round(batch / step_s, 1), gbps=round(gbps, 1), copy_gbps=round(copy, 1),
                    copy_fraction=round(gbps / copy, 4))
    benchmark.extra_info.update(info)
    assert recompiles == 0, f"{recompiles} graph(s) compiled during the timed steps"


def _warmed_step(bench, setup: StepSetup, mode: str) -> Callable[[], torch.Tensor]:
    """The step of `mode` (the model's forward, or the replay of its CUDA graph), compiled (and captured) and run
    WARMUP_STEPS times; on CUDA one more step runs with host-device syncs raising."""
    model = setup.model
    if mode == "eager":
        run = model.forward
    else:
        setup.plan()
        model.forward()                                                            # compiles outside the capture
        graphed = GraphedStep(setup.cache, model.forward)
        setup.plan()
        graphed.capture()
        run = graphed.replay
    for _ in range(WARMUP_STEPS):                                                  # compiles outside the timing
        setup.plan()
        run()
    sync(bench.device)
    if bench.cuda:                                                                 # no host-device sync anywhere
        torch.cuda.set_sync_debug_mode("error")
        try:
            setup.plan()
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync(bench.device)
    return run


def _timed_step(bench, setup: StepSetup, run: Callable[[], torch.Tensor], ahead: bool, plan_s: list[float],
                device_s: list[float]) -> Callable[[], torch.Tensor]:
    """One benchmark round: plan + `run` + synchronize (with `ahead`, `run` then the NEXT step's plan). Appends
    plan()'s host seconds to `plan_s` and, on CUDA, the device seconds of `run` to `device_s`."""
    dev = bench.device
    ev0 = ev1 = None
    if bench.cuda:
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if ahead:
        setup.plan()                                  # the first timed step's plan; each round plans the next

    def one_step() -> torch.Tensor:
        if not ahead:
            plan_s.append(setup.plan())
        if ev0 is not None:
            ev0.record()
        logits = run()
        if ev1 is not None:
            ev1.record()
        if ahead:
            plan_s.append(setup.plan())               # stream-ordered after this step's kernels: safe to refill
        sync(dev)
        if ev0 is not None:
            device_s.append(ev0.elapsed_time(ev1) / 1e3)
        return logits

    return one_step
