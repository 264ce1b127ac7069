"""CUDA graphs over the paged cache (paged.graphs.GraphedStep), and plan()/run() never waiting for the GPU.

A graph captured once replays the layers of every later decode step of the same shape while lengths grow,
pages are added, and sequences are replaced. Each replay must give exactly what the same kernels give when
launched one by one on a twin cache (same placement, same data, same compiled kernels: bitwise equal), and a
plan of another shape must be refused before the graph could write through stale slots.
"""

from __future__ import annotations

import pytest
import torch

from paged import CacheSpec, PagedKVCache, mods
from paged.errors import PlanError
from paged.graphs import GraphedStep, plan_signature

HQ, HKV, D, P, LAYERS = 4, 2, 64, 16, 3


def test_graphs_need_a_cuda_cache():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=P, num_pages=4, max_seq_len=64)
    with pytest.raises(PlanError, match="CUDA"):
        GraphedStep(PagedKVCache(spec), lambda: None)


def test_plan_signature_tells_apart_what_a_graph_cannot_follow():
    """Same shape and mods -> same signature (replay allowed); another batch, query length or mask -> refused."""
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=P, num_pages=16, max_seq_len=128)
    cache = PagedKVCache(spec)
    for s in "abc":
        cache.admit(s)
    window = mods.sliding_window(4)
    cache.plan(["a", "b"], [1, 1])
    causal = plan_signature(cache)
    cache.plan(["a", "b"], [1, 1])
    assert plan_signature(cache) == causal                      # lengths changed, nothing a graph depends on
    cache.plan(["a", "b"], [1, 1], mask_mod=window)
    windowed = plan_signature(cache)
    assert windowed != causal and windowed[:4] == causal[:4]   # same shapes and buffers, another mask
    cache.plan(["a", "b"], [1, 1], mask_mod=window)
    assert plan_signature(cache) == windowed
    cache.plan(["a", "b", "c"], [1, 1, 1])                      # another batch
    assert plan_signature(cache) != causal
    cache.plan(["a", "b"], [3, 1])
    assert plan_signature(cache) != causal
    cache.run(0, torch.zeros(2, 3, 1, 16), torch.zeros(2, 3, 1, 16), torch.zeros(2, 3, 1, 16))
    with pytest.raises(PlanError, match="already ran"):
        plan_signature(cache)


class Pair:
    """A graphed cache and its twin run layer by layer, fed the same inputs."""

    def __init__(self, dtype: torch.dtype, decode_kernel: str, decode_full_blocks) -> None:
        spec = CacheSpec(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, page_size=P, num_pages=96,
                         max_seq_len=512, dtype=dtype, device=torch.device("cuda"))
        self.caches = [PagedKVCache(spec, policy="random", seed=7, decode_kernel=decode_kernel,
                                    decode_full_blocks=decode_full_blocks) for _ in range(2)]
        self.gen = torch.Generator(device="cuda").manual_seed(0)
        self.dtype = dtype

    def inputs(self, batch: int, q_len: int) -> list[torch.Tensor]:
        """(LAYERS, batch, q_len, H, D) queries, keys, values."""
        return [torch.randn(LAYERS, batch, q_len, h, D, generator=self.gen, device="cuda").to(self.dtype)
                for h in (HQ, HKV, HKV)]

    def eager_step(self, ids, q_lens, cache_index=None) -> list[torch.Tensor]:
        """plan + run every layer on both caches (or one); returns the outputs, (LAYERS, B, Lq, HQ, D) each."""
        q, k, v = self.inputs(len(ids), max(q_lens))
        outs = []
        for i, cache in enumerate(self.caches):
            if cache_index is None or i == cache_index:
                cache.plan(ids, q_lens)
                outs.append(torch.stack([cache.run(layer, q[layer], k[layer], v[layer]) for layer in range(LAYERS)]))
        return outs

    def do(self, op, *args) -> None:
        for cache in self.caches:
            getattr(cache, op)(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_kernel,decode_full_blocks", [("flex", True), ("flex", False), ("flex", "auto"),
                                                              ("triton", "auto")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_graph_replay_equals_layer_by_layer_launches(dtype, decode_kernel, decode_full_blocks):
    pair = Pair(dtype, decode_kernel, decode_full_blocks)
    graphed, twin = pair.caches
    ids = ["a", "b", "c"]
    for s in ids:
        pair.do("admit", s)
    pair.eager_step(ids, [20, 5, 33])                        # prefill
    pair.eager_step(ids, [1, 1, 1])                          # decode once eagerly: compiles outside the capture

    static = pair.inputs(3, 1)                               # forward's static inputs, refreshed every step
    step = GraphedStep(graphed, lambda: torch.stack([graphed.run(layer, *(x[layer] for x in static))
                                                     for layer in range(LAYERS)]))

    def decode_and_compare(n_steps: int, capture: bool = False) -> None:
        for i in range(n_steps):
            new = pair.inputs(3, 1)
            for buf, x in zip(static, new):
                buf.copy_(x)
            twin.plan(ids, [1, 1, 1])
            want = torch.stack([twin.run(layer, *(x[layer] for x in new)) for layer in range(LAYERS)])
            graphed.plan(ids, [1, 1, 1])
            got = step.capture() if capture and i == 0 else step.replay()
            assert torch.equal(got, want), f"step {i}: graph replay differs from layer-by-layer launches"

    decode_and_compare(20, capture=True)                     # lengths 22..41 etc.: crosses page boundaries
    # Replace a sequence (new member, new pages, different length) without changing the shape: replay still fits.
    pair.do("finish", "b")
    pair.do("admit", "d")
    pair.eager_step(["d"], [7])
    ids[1] = "d"
    decode_and_compare(20)
    # A fork shares pages; its first decode token copies the shared partial page (copy-on-write) inside plan().
    pair.do("finish", "c")
    pair.do("fork", "a", "e")
    ids[2] = "e"
    decode_and_compare(3)
    assert graphed.snapshot()["sequences"] == twin.snapshot()["sequences"]
    assert torch.equal(graphed.k_pool, twin.k_pool) and torch.equal(graphed.v_pool, twin.v_pool)

    # Other mods: refused (the captured kernels have the causal mask compiled in).
    graphed.plan(ids, [1, 1, 1], mask_mod=mods.sliding_window(8))
    with pytest.raises(PlanError, match="mask_mod"):
        step.replay()
    # Another shape: refused before the graph can write through the captured slots.
    graphed.plan(["a", "d"], [1, 1])
    before = graphed.k_pool.clone()
    with pytest.raises(PlanError, match="differ from the captured"):
        step.replay()
    assert torch.equal(before, graphed.k_pool)
    graphed.run(0, *(x[0, :2] for x in static))              # the refused plan is still usable layer by layer
    with pytest.raises(PlanError, match="already ran"):
        step.replay()


@pytest.mark.gpu
@pytest.mark.parametrize("decode_kernel", ["flex", "triton"])
def test_decode_steps_never_wait_for_the_gpu(decode_kernel):
    """plan() and run() enqueue only: under sync debug mode "error" any host-device synchronisation raises."""
    pair = Pair(torch.bfloat16, decode_kernel, "auto")
    ids = ["a", "b", "c", "d"]
    for s in ids:
        pair.do("admit", s)
    pair.eager_step(ids, [40, 3, 17, 16], cache_index=0)     # prefill, compiles
    pair.eager_step(ids, [1, 1, 1, 1], cache_index=0)        # decode, compiles
    pair.eager_step(ids, [1, 1, 1, 5], cache_index=0)        # mixed (a chunk beside decode tokens), compiles
    cache = pair.caches[0]
    decode, mixed = pair.inputs(4, 1), pair.inputs(4, 5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(40):                                  # crosses page boundaries: pages are added
            q_lens, (q, k, v) = ([1, 1, 1, 5], mixed) if i % 10 == 9 else ([1, 1, 1, 1], decode)
            cache.plan(ids, q_lens)
            for layer in range(LAYERS):
                cache.run(layer, q[layer], k[layer], v[layer])
        cache.finish("b")                                    # frees pages (a device write of page_logical)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_one_graph_per_bucket_follows_the_batch_within_the_bucket():
    """Triton decode with the bucket's padded batch: one graph captured at 5 rows of bucket 8 replays steps of 5,
    6, 7 and 8 rows (rows join and leave; padding rows store nothing) exactly as eager unpadded runs do."""
    pair = Pair(torch.bfloat16, "triton", "auto")
    graphed, twin = pair.caches
    ids = [f"s{i}" for i in range(8)]
    for s in ids:
        pair.do("admit", s)
    pair.eager_step(ids, [40, 3, 17, 16, 9, 33, 1, 20])                 # prefill
    static = [x.clone() for x in pair.inputs(8, 1)]                   # (LAYERS, 8, 1, H, D), the graph's inputs
    for cache in (graphed, twin):                                     # warm-up outside the capture: padded / not
        cache.plan(ids[:5], [1] * 5)
        rows = 8 if cache is graphed else 5
        for layer in range(LAYERS):
            cache.run(layer, *(x[layer, :rows] for x in static))
    graphed.plan(ids[:5], [1] * 5)
    assert graphed.current_plan.bucket == (8, 1, "triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.stack([graphed.run(layer, static[0][layer], static[1][layer], static[2][layer])
                           for layer in range(LAYERS)])               # (LAYERS, 8, 1, HQ, D)
    graph.replay()
    twin.plan(ids[:5], [1] * 5)
    want = torch.stack([twin.run(layer, *(x[layer, :5] for x in static)) for layer in range(LAYERS)])
    assert torch.equal(out[:, :5], want) and not out[:, 5:].any()
    for rows in ([0, 1, 2, 3, 4, 5], [0, 2, 3, 4, 5, 6, 7], ids, [7, 1, 6, 3, 0]):
        step = [ids[r] if isinstance(r, int) else r for r in rows]
        new = pair.inputs(8, 1)
        for x, y in zip(static, new):
            x.copy_(y)
        for cache in (graphed, twin):
            cache.plan(step, [1] * len(step))
        assert graphed.current_plan.bucket == (8, 1, "triton")
        graphed.current_plan.layers_run.update(range(LAYERS))
        graph.replay()
        want = torch.stack([twin.run(layer, *(x[layer, :len(step)] for x in static)) for layer in range(LAYERS)])
        assert torch.equal(out[:, :len(step)], want) and not out[:, len(step):].any()
        assert torch.equal(graphed.k_pool, twin.k_pool) and torch.equal(graphed.v_pool, twin.v_pool)


@pytest.mark.gpu
def test_a_warm_up_without_split_rows_still_loads_the_merge_before_the_capture():
    """run() skips the merge on a step with no split row, but never a merge launcher's first launch: Triton loads
    a kernel's binary at its first launch, which a CUDA graph capture refuses. Here the eager warm-up step has one
    short row (no split), the capture follows, and replays carry the row past one slice (split: the merge runs
    in the graph), each equal to a twin run layer by layer. Head dim 32, used by no other GPU test, so that the
    merge's binary is not already loaded by another test in the same process."""
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=P, num_pages=32, max_seq_len=512,
                     dtype=torch.bfloat16, device=torch.device("cuda"))
    graphed, twin = (PagedKVCache(spec, policy="random", seed=3, decode_kernel="triton") for _ in range(2))
    gen = torch.Generator(device="cuda").manual_seed(1)

    def inputs(q_len: int) -> list[torch.Tensor]:       # (layers, 1, q_len, H, 32) queries, keys, values
        return [torch.randn(2, 1, q_len, h, 32, generator=gen, device="cuda").to(torch.bfloat16) for h in (4, 2, 2)]

    static = inputs(1)
    prompt = inputs(20)
    for cache in (graphed, twin):
        cache.admit("a")
        cache.plan(["a"], [20])                          # fresh prefill
        for layer in range(2):
            cache.run(layer, *(x[layer] for x in prompt))
        cache.plan(["a"], [1])                           # 21 keys: one item, no split
        assert not cache.current_plan.kernel_plan.split
        for layer in range(2):
            cache.run(layer, *(x[layer] for x in static))
    step = GraphedStep(graphed, lambda: torch.stack([graphed.run(layer, *(x[layer] for x in static))
                                                     for layer in range(2)]))
    split_seen = False
    for i in range(200):                                 # 22 .. 221 keys: slices of >= 128 keys split the row
        for buf, x in zip(static, inputs(1)):
            buf.copy_(x)
        twin.plan(["a"], [1])
        want = torch.stack([twin.run(layer, *(x[layer] for x in static)) for layer in range(2)])
        graphed.plan(["a"], [1])
        split_seen |= graphed.current_plan.kernel_plan.split
        got = step.capture() if i == 0 else step.replay()
        assert torch.equal(got, want), f"step {i}: graph replay differs from layer-by-layer launches"
    assert split_seen, "the row never split: the merge in the graph was not exercised"
