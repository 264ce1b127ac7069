"""No recompiles: a long serving trace with a changing batch compiles nothing after one warm-up pass.

The trace (GPU: 1000 steps, batch wandering over 9..32; CPU: 200 steps over 2..4) admits and finishes
sequences every few steps and mixes prefill chunks (<= 16 tokens) with decode tokens. Warm-up is one pass
over the (batch bucket, query bucket) shapes the trace uses, on a scratch cache of the same spec; then the
trace is replayed on a fresh cache, one layer attended per step, and
``torch._dynamo.utils.counters['stats']['unique_graphs']`` must not move. The spec is the benchmarks' own
(page 64 / 32x8 / D128 pool on GPU, page 16 on CPU), so the decode graphs are shared with test_decode.
"""

from __future__ import annotations

import json

import torch

from conformance.benchmarks.pools import pool_config
from conformance.benchmarks.harness import sync, unique_graphs
from conformance.benchmarks.workload import churn_trace
from conformance.traces import Admit, Finish, Step
from paged import PagedKVCache
from paged.plan import bucket, padded_query_len

HQ, HKV, D = 32, 8, 128


def _inputs(gen, batch, q_len, dev, dtype):
    q = torch.randn(batch, q_len, HQ, D, generator=gen, device=dev).to(dtype)
    kv = torch.randn(2, batch, q_len, HKV, D, generator=gen, device=dev).to(dtype)
    return q, kv[0], kv[1]


def test_no_recompiles_over_long_trace(bench):
    dev = bench.device
    if bench.cuda:
        pool = pool_config(bench, 64, HQ, HKV, D)
        steps, lo, hi = 1000, 3, 24
    else:
        pool = pool_config(bench, 16, HQ, HKV, D)
        steps, lo, hi = 200, 2, 4
    # Outputs short enough that the batch wanders through the 4/8/16/32 buckets (long outputs pin it at `hi`).
    ops = churn_trace(steps, lo, hi, seed=1234, prompt_max=48 if bench.cuda else 16, chunk=16,
                      output=(5, 60) if bench.cuda else (3, 12))
    step_ops = [op for op in ops if isinstance(op, Step)]
    shapes = sorted({(bucket(len(op.seqs)), padded_query_len(max(op.q_lens))) for op in step_ops})
    batches = sorted({len(op.seqs) for op in step_ops})
    gen = torch.Generator(device=dev).manual_seed(0)

    # ---- warm-up: one pass over the buckets the trace uses, on a scratch cache of the same spec
    g_start = unique_graphs()
    _warm_up(bench, pool, shapes, gen)
    g_warm = unique_graphs()

    # ---- the trace, on a fresh cache
    cache = PagedKVCache(pool.spec(), policy="random", seed=2, kernel_options=bench.kernel_options)
    admits, finishes, finite = _replay(cache, ops, gen, dev, pool.dtype)
    sync(dev)
    new_graphs = unique_graphs() - g_warm

    record = {
        "device": str(dev), "steps": len(step_ops), "admits": admits, "finishes": finishes,
        "batch_sizes": batches, "shapes": shapes, "graphs_before_warmup": g_start,
        "graphs_compiled_in_warmup": g_warm - g_start, "graphs_after_warmup": new_graphs,
        "page_size": pool.page, "pool_pages": pool.num_pages,
    }
    bench.results_path("recompiles.json").write_text(json.dumps(record, indent=2))
    assert len(step_ops) >= (1000 if bench.cuda else 200)
    assert len(batches) >= 3 and len({bucket(b) for b in batches}) >= 2, f"the batch must change: {batches}"
    assert finite, "NaN/inf in the trace's outputs"
    assert new_graphs == 0, (f"{new_graphs} graph(s) compiled after warm-up over {shapes}: a shape or guard is not "
                             f"static (see {bench.results_path('recompiles.json')})")


def _warm_up(bench, pool, shapes: list[tuple[int, int]], gen: torch.Generator) -> None:
    """Compile every (padded batch, padded query length) of `shapes` on a scratch cache: a decode step, then (for
    a prefill shape) a step of that length over rows that are no longer empty. A step whose rows are all empty goes
    to the fresh-prefill kernel (`paged.kernels.choose`), which compiles nothing, while the trace's chunks over
    stored tokens take compiled FlexAttention."""
    for padded_batch, padded_q in shapes:
        scratch = PagedKVCache(pool.spec(), policy="random", seed=1, kernel_options=bench.kernel_options)
        ids = list(range(padded_batch))
        for i in ids:
            scratch.admit(i)
        for q_len in ((1,) if padded_q == 1 else (1, padded_q)):
            scratch.plan(ids, [q_len] * padded_batch)
            scratch.run(0, *_inputs(gen, padded_batch, q_len, bench.device, pool.dtype))
        del scratch
    sync(bench.device)


def _replay(cache: PagedKVCache, ops: list, gen: torch.Generator, dev: torch.device,
            dtype: torch.dtype) -> tuple[int, int, bool]:
    """Run the trace on `cache`, layer 0 attended per step; return (admits, finishes, every output finite)."""
    admits = finishes = 0
    finite = True
    for op in ops:
        if isinstance(op, Admit):
            cache.admit(op.seq)
            admits += 1
        elif isinstance(op, Finish):
            cache.finish(op.seq)
            finishes += 1
        else:
            cache.plan(op.seqs, op.q_lens)
            out = cache.run(0, *_inputs(gen, len(op.seqs), max(op.q_lens), dev, dtype))
            finite &= bool(torch.isfinite(out).all())
    return admits, finishes, finite
