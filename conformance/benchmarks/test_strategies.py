"""Paging strategies: page size x placement policy on the same serving trace -> waste, pages touched, decode time.

`test_strategy_figures` (any device; computed on the CPU with tiny head dims, it is about page bookkeeping):
one seeded continuous-batching trace (16 slots, chat-like requests, whole-prompt prefill) is replayed for each
page size (16, 64, 128) and placement policy ("lowest", "lifo", "fifo", "random"), recording per step:
waste (reserved slots holding no token / reserved), the distinct physical pages touched so far, and how
contiguous sequences are in the pool (share of logically adjacent pages that are physically adjacent).
Results: <results>/strategies.json.

`test_strategy_decode_time` (GPU benchmark): the same kind of trace (32 slots) on the benchmarks' real
deployment pool of that page size, then one decode step of the 32 live sequences timed like test_decode
(same harness: CUDA events, L2 flushed). Grouped by page size so tables compare the policies side by side.
"""

from __future__ import annotations

import json

import pytest
import torch

from conformance.benchmarks.pools import pool_config
from conformance.benchmarks.harness import measure
from conformance.benchmarks.workload import chat_requests, refill, serve
from paged import CacheSpec, PagedKVCache

PAGE_SIZES = (16, 64, 128)
POLICIES = ("lowest", "lifo", "fifo", "random")
MAX_LEN = 4096
COMBOS = [(p, pol) for p in PAGE_SIZES for pol in POLICIES]
IDS = [f"P{p}-{pol}" for p, pol in COMBOS]

_RESULTS: dict[str, dict] = {}


class Tracker:
    """Per-step page figures of a cache being driven by `serve`."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.touched: set[int] = set()
        self.waste: list[float] = []
        self.adjacent = self.pairs = 0
        self.bound_violations: list[tuple[int, int, int]] = []   # (step, waste slots, bound)
        self.steps = 0

    def on_step(self, step, ids, q_lens) -> None:
        mem = self.cache.memory()
        self.steps += 1
        self.waste.append(mem.waste_fraction)
        # Paging's bound, at every step whatever the placement: <= (P-1) wasted slots per live sequence.
        bound = (self.cache.spec.page_size - 1) * mem.live_sequences
        if mem.waste_slots > bound:
            self.bound_violations.append((step, mem.waste_slots, bound))
        for i in ids:
            pages = self.cache.pages(i)
            self.touched.update(pages)
            self.pairs += max(0, len(pages) - 1)
            self.adjacent += sum(b == a + 1 for a, b in zip(pages, pages[1:]))

    def figures(self) -> dict:
        mem = self.cache.memory()
        return {
            "mean_waste_fraction": sum(self.waste) / len(self.waste),
            "max_waste_fraction": max(self.waste),
            "pages_touched": len(self.touched),
            "pool_pages": mem.total_pages,
            "pages_touched_fraction": len(self.touched) / mem.total_pages,
            "physically_adjacent_fraction": self.adjacent / self.pairs if self.pairs else 1.0,
            "final_pages_in_use": mem.pages_in_use,
        }


def run_trace(cache: PagedKVCache, slots: int, steps: int, seed: int) -> tuple[Tracker, dict, list]:
    requests = chat_requests(slots * steps, seed=seed, max_len=MAX_LEN)
    tracker = Tracker(cache)
    counts = serve(cache, requests, slots, steps, on_step=tracker.on_step)
    return tracker, counts, requests


@pytest.mark.parametrize(("page", "policy"), COMBOS, ids=IDS)
def test_strategy_figures(bench, page, policy):
    slots, steps = 16, 400
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=page,
                     num_pages=slots * (MAX_LEN // page), max_seq_len=MAX_LEN)
    cache = PagedKVCache(spec, policy=policy, seed=11)
    tracker, counts, _ = run_trace(cache, slots, steps, seed=99)
    fig = tracker.figures()
    _RESULTS[f"P{page}-{policy}"] = {"page_size": page, "policy": policy, "slots": slots, **counts, **fig}
    _RESULTS[f"P{page}-{policy}"].pop("live", None)
    bench.results_path("strategies.json").write_text(json.dumps(
        {"trace": {"slots": slots, "steps": steps, "requests": "chat_requests(seed=99), whole-prompt prefill",
                   "max_len": MAX_LEN}, "results": _RESULTS}, indent=2))
    # Paging's waste bound holds at every step whatever the placement: <= (P-1) slots per live sequence.
    assert tracker.steps == steps, f"the bound was checked at {tracker.steps} of {steps} steps"
    assert not tracker.bound_violations, f"waste over (P-1) x live sequences at (step, waste, bound): " \
                                         f"{tracker.bound_violations[:5]}"
    assert counts["finished"] > slots, "the trace must recycle pages (sequences finishing and new ones admitted)"


@pytest.mark.parametrize(("page", "policy"), COMBOS, ids=IDS)
def test_strategy_decode_time(bench, benchmark, page, policy):
    if not bench.cuda:
        pytest.skip("decode time of a placement needs a GPU; the CPU records figures only (test_strategy_figures)")
    slots, steps = 32, 300
    pool = pool_config(bench, page, 32, 8, 128)
    cache = PagedKVCache(pool.spec(), policy=policy, seed=11, kernel_options=bench.kernel_options)
    tracker, counts, requests = run_trace(cache, slots, steps, seed=99)
    ids = refill(cache, requests, counts["admitted"], counts["live"], slots)
    plan = cache.plan(ids, [1] * slots)
    gen = torch.Generator(device=bench.device).manual_seed(5)
    q = torch.randn(slots, 1, 32, 128, generator=gen, device=bench.device).to(pool.dtype)
    kv = torch.randn(2, slots, 1, 8, 128, generator=gen, device=bench.device).to(pool.dtype)
    out = cache.run(0, q, kv[0], kv[1])              # compiles (if the decode grid did not already) + checks
    assert bool(torch.isfinite(out).all())
    plan.layers_run.clear()
    benchmark.group = f"strategy P{page}"
    lengths = [cache.length(i) for i in ids]
    info = {"backend": "paged", "kind": "strategy", "page": page, "policy": policy, "batch": slots,
            "ctx_mean": sum(lengths) / slots, "ctx_max": max(lengths), **tracker.figures()}
    measure(benchmark, bench, lambda: cache.run(0, q, kv[0], kv[1]), plan.layers_run.clear,
            kv_bytes=sum(lengths) * 8 * 128 * 2 * 2, extra_info=info)
