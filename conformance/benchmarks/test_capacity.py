"""Memory capacity: how many chat-like sequences fit a KV budget with paging vs a contiguous cache.

`test_concurrent_sequences` (any device; runs on the CPU with tiny head dims, it is about counting pages):
for KV budgets of 1..16 GiB of a Llama-3-8B-like model (32 layers x 8 kv heads x 128 dims x bf16 = 128 KiB
per token), chat-like requests (lognormal prompts, median 300; outputs, median 200; prompt + output <= 4096)
are admitted into a `PagedKVCache` with the budget's pages, each at its full length (the memory it holds just
before it finishes), until the cache raises OutOfPagesError; a contiguous cache that reserves max_len = 4096
per sequence fits budget // 4096 sequences. Waste = reserved slots that hold no token / reserved slots.
vLLM reported 60-80% waste before paging and < 4% with it; here paging wastes at most page_size - 1 slots per
sequence (checked exactly). Results: <results>/capacity.json.

`test_peak_memory_per_step` (GPU only): a long continuous-batching trace (32 slots, prompts prefilled in
16-token chunks) over a paged cache whose pool is sized to the trace's peak need, recording
torch.cuda.max_memory_allocated() per step, the bytes of the pages in use, and tokens stored; against the
contiguous baseline that reserves 32 x max_len (measured once: its allocation is static) and a padded dynamic
contiguous cache (B x longest sequence, computed). Results: <results>/peak_memory.json.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conformance.benchmarks.baseline_runners import SdpaRunner
from conformance.benchmarks.grid import Case, u
from conformance.benchmarks.harness import sync
from conformance.benchmarks.workload import chat_requests, serve
from conformance.model import PageModel
from paged import CacheSpec, OutOfPagesError, PagedKVCache

MAX_LEN = 4096
#: Llama-3-8B-like: 32 layers x 8 kv heads x 128 dims x 2 (K, V) x 2 bytes.
BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
BUDGETS_GIB = (1, 2, 4, 8, 16)
PAGE_SIZES = (16, 64, 128)


def count_paged(budget_tokens: int, page: int, requests) -> dict:
    """Admit requests at full length into a PagedKVCache of `budget_tokens` slots until it is out of pages."""
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, page_size=page, num_pages=budget_tokens // page,
                     max_seq_len=MAX_LEN)
    cache = PagedKVCache(spec, policy="lowest")
    admitted = 0
    for i, req in enumerate(requests):
        cache.admit(i)
        try:
            cache.plan([i], [req.total])
        except OutOfPagesError:
            cache.finish(i)
            break
        admitted += 1
    else:
        raise AssertionError("the request list ran out before the budget: draw more requests")
    mem = cache.memory()
    return {"sequences": admitted, "tokens": mem.tokens_stored, "reserved_slots": mem.slots_reserved,
            "waste_slots": mem.waste_slots, "waste_fraction": mem.waste_fraction, "pages_in_use": mem.pages_in_use,
            "free_pages": mem.free_pages}


def count_contiguous(budget_tokens: int, requests) -> dict:
    n = budget_tokens // MAX_LEN
    tokens = sum(r.total for r in requests[:n])
    reserved = n * MAX_LEN
    return {"sequences": n, "tokens": tokens, "reserved_slots": reserved, "waste_slots": reserved - tokens,
            "waste_fraction": 1 - tokens / reserved if reserved else 0.0}


def test_concurrent_sequences(bench):
    requests = chat_requests(4000, seed=2024, max_len=MAX_LEN)
    totals = sorted(r.total for r in requests)
    rows = []
    for gib in BUDGETS_GIB:
        budget_tokens = gib * 2**30 // BYTES_PER_TOKEN
        contiguous = count_contiguous(budget_tokens, requests)
        row = {"budget_gib": gib, "budget_tokens": budget_tokens, "contiguous": contiguous, "paged": {}}
        for page in PAGE_SIZES:
            paged = count_paged(budget_tokens, page, requests)
            row["paged"][str(page)] = paged
            # Exact fragmentation bound: only the last page of each sequence is partly empty.
            assert paged["waste_slots"] <= paged["sequences"] * (page - 1)
            assert paged["waste_slots"] == sum(math.ceil(r.total / page) * page - r.total
                                               for r in requests[:paged["sequences"]])
            # No external fragmentation: it stopped only because the next request did not fit.
            assert paged["free_pages"] < math.ceil(requests[paged["sequences"]].total / page)
            assert paged["sequences"] >= contiguous["sequences"]
        rows.append(row)
    record = {
        "model": "Llama-3-8B-like: 32 layers x 8 kv heads x 128 dims, bf16", "bytes_per_token": BYTES_PER_TOKEN,
        "max_len": MAX_LEN,
        "distribution": {"prompt": "lognormal median 300 sigma 1.0", "output": "lognormal median 200 sigma 0.8",
                         "cap": f"prompt + output <= {MAX_LEN}", "seed": 2024,
                         "median_total": totals[len(totals) // 2], "mean_total": sum(totals) / len(totals)},
        "rows": rows,
    }
    bench.results_path("capacity.json").write_text(json.dumps(record, indent=2))
    # The published picture: contiguous reservation wastes most memory, paging a few percent at page 16.
    big = rows[-1]
    assert big["contiguous"]["waste_fraction"] > 0.6
    assert big["paged"]["16"]["waste_fraction"] < 0.04


class _DryRun:
    """The page model driven like a cache: finds a trace's peak page need without touching a device."""

    def __init__(self, page: int) -> None:
        self.model, self.peak = PageModel(10**9, page), 0

    def admit(self, seq) -> None:
        self.model.admit(seq)

    def finish(self, seq) -> None:
        self.model.finish(seq)

    def plan(self, ids, q_lens) -> None:
        self.model.step(ids, q_lens)
        self.peak = max(self.peak, self.model.pages_in_use)


@pytest.mark.gpu
def test_peak_memory_per_step(bench):
    if not bench.cuda:
        pytest.skip("peak GPU memory per step needs a CUDA device")
    dev = bench.device
    slots, steps, chunk, page = 32, 400, 16, 16
    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    requests = chat_requests(2000, seed=7, max_len=MAX_LEN)
    # Size the pool to this trace's peak need (a dry run on the page model).
    dry = _DryRun(page)
    serve(dry, requests, slots, steps, chunk=chunk)
    num_pages = max(dry.peak, math.ceil(MAX_LEN / page))

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    spec = CacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, page_size=page, num_pages=num_pages,
                     max_seq_len=MAX_LEN, dtype=dtype, device=dev)
    cache = PagedKVCache(spec, policy="random", seed=3, kernel_options=bench.kernel_options)
    gen = torch.Generator(device=dev).manual_seed(0)
    per_step = []

    def on_step(s, ids, q_lens):
        B, Lq = len(ids), max(q_lens)
        q = torch.randn(B, Lq, hq, d, generator=gen, device=dev).to(dtype)
        kv = torch.randn(2, B, Lq, hkv, d, generator=gen, device=dev).to(dtype)
        torch.cuda.reset_peak_memory_stats(dev)
        cache.run(0, q, kv[0], kv[1])
        sync(dev)
        mem = cache.memory()
        longest = max(cache.length(i) for i in ids)
        per_step.append({
            "step": s, "batch": B, "tokens": mem.tokens_stored,
            "paged_peak_bytes": torch.cuda.max_memory_allocated(dev) - base,
            "paged_in_use_bytes": mem.pages_in_use * page * hkv * d * 2 * 2,
            "padded_dynamic_bytes": 2 * B * hkv * longest * d * 2,
        })

    serve(cache, requests, slots, steps, chunk=chunk, on_step=on_step)
    del cache
    torch.cuda.synchronize()
    torch.cuda.empty_cache()

    contiguous_peak = _contiguous_peak(dev, slots, page, hq, hkv, d, dtype)

    record = {
        "slots": slots, "steps": len(per_step), "page_size": page, "pool_pages": num_pages, "max_len": MAX_LEN,
        "heads": f"{hq}x{hkv}", "head_dim": d, "dtype": "bfloat16", "layers": 1,
        "contiguous_static_peak_bytes": contiguous_peak, "per_step": per_step,
    }
    bench.results_path("peak_memory.json").write_text(json.dumps(record, indent=2))
    paged_peak = max(r["paged_peak_bytes"] for r in per_step)
    assert paged_peak < contiguous_peak, (paged_peak, contiguous_peak)


def _contiguous_peak(dev: torch.device, slots: int, page: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> int:
    """Peak bytes of the contiguous baseline: `slots` x MAX_LEN reserved up front, plus one decode step's transient
    memory (its allocation is static, so one step measures it)."""
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    case = Case("decode", slots, u(MAX_LEN - 1), page, hq, hkv, d)
    sdpa = SdpaRunner(case, [MAX_LEN - 64] * slots, dev)
    q = torch.randn(slots, 1, hq, d, device=dev, dtype=dtype)
    k = torch.randn(slots, 1, hkv, d, device=dev, dtype=dtype)
    sdpa.step(q, k, k)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del sdpa
    return peak
