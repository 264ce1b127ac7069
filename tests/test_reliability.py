"""Regression tests of issue 17's defects 1 and 8 (the others are in tests/test_errors.py and tests/test_allocator.py).

1. A freed page keeps whatever its last owner wrote, NaN and Inf included (the real configuration,
   poison_free_pages=False). A partly filled page's unwritten slots are read with weight 0, and 0 x NaN = NaN, so
   the cache zeroes every page it hands out: the next owner must get exactly the oracle's answer.
8. admit/fork between the layers of a step are refused; finish() may abandon a step part-way, and the step's other
   sequences are then refused until finished; validation's probe cache of user mods stays bounded.
"""

from __future__ import annotations

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache, PlanError, mods
from tests.test_errors import state_equal

HQ, HKV, D, P = 4, 2, 16, 16


def make_spec(device, num_pages=24, max_seq_len=128) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, page_size=P, num_pages=num_pages,
                     max_seq_len=max_seq_len, device=device)


def qkv(gen, spec, B, Lq):
    return tuple(torch.randn(B, Lq, h, D, generator=gen).to(spec.device) for h in (HQ, HKV, HKV))


def leave_non_finite_pages(cache: PagedKVCache, gen: torch.Generator, tokens: int = 2 * P) -> list[int]:
    """A sequence stores `tokens` tokens with NaN and Inf in its K and V (every layer), then finishes: its pages
    are free and hold the non-finite values. Returns those pages."""
    cache.admit("bad")
    cache.plan(["bad"], [tokens])
    for layer in range(cache.spec.num_layers):
        q, k, v = qkv(gen, cache.spec, 1, tokens)
        for t in range(1, tokens, 3):            # every page: slots past the next owner's tokens included
            k[0, t, t % HKV, t % D] = float("nan") if t % 2 else float("inf")
            v[0, t, (t + 1) % HKV] = float("inf") if t % 2 else float("nan")
        cache.run(layer, q, k, v)
    pages = cache.pages("bad")
    cache.finish("bad")
    k_pool = cache.k_pool.view(cache.spec.num_layers, HKV, cache.spec.num_pages, P, D)
    assert not k_pool[:, :, pages].isfinite().all(), "the freed pages keep the non-finite values"
    return pages


@pytest.mark.parametrize("attention", ["compiled", "eager"])
def test_stale_non_finite_values_do_not_reach_the_next_owner(device, attention):
    """Prefill, a chunk onto a second (stale) page, decode steps, and a fork's copy-on-write into a stale page: every
    output agrees with the float64 oracle (before the fix every output of the next owner was NaN). Eager
    FlexAttention reads the whole pool: there every row also keeps other pages' values out of its arithmetic
    (defect 2, `test_a_live_sequence_s_non_finite_values_reach_nobody_else`)."""
    spec = make_spec(device)            # the pool of the other files' compiled steps (lowest-first: same page ids)
    cache = PagedKVCache(spec, attention=attention, decode_kernel="flex", prefill_kernel="flex", policy="lowest")
    gold = ContiguousOracle(spec)
    gen = torch.Generator().manual_seed(11)
    stale = leave_non_finite_pages(cache, gen, tokens=3 * P)                                       # pages 0, 1, 2

    def step(ids, lens):
        for c in (cache, gold):
            c.plan(ids, lens)
        for layer in range(spec.num_layers):
            q, k, v = qkv(gen, spec, len(ids), max(lens))
            out, want = cache.run(layer, q, k, v), gold.run(layer, q, k, v)
            for b, n in enumerate(lens):
                assert out[b, :n].isfinite().all(), f"step {lens}, layer {layer}, row {b}: stale NaN/Inf read"
                c = compare(out[b, :n], want[b, :n], want[b, :n].to(spec.dtype), spec.dtype)
                assert c.ok, f"step {lens}, layer {layer}, row {b}: {c.describe()}"

    for c in (cache, gold):
        c.admit("a")
    step(["a"], [5])                                                      # prefill into stale page 0
    assert cache.pages("a") == [stale[0]]
    step(["a"], [14])                                                     # 19 tokens: onto stale page 1
    step(["a"], [1])                                                      # decode
    for c in (cache, gold):
        c.fork("a", "b")
    step(["a", "b"], [1, 1])                                              # a copies page 1 into page 2
    assert cache.pages("a")[-1] == 2 and cache.pages("b")[-1] == 1
    assert stale[-1] == 2
    step(["b", "a"], [1, 1])


@pytest.mark.parametrize("attention", ["compiled", "eager"])
def test_a_live_sequence_s_non_finite_values_reach_nobody_else(device, attention):
    """Issue 17 defect 2: with eager FlexAttention one NaN/Inf anywhere in the pool (here: a live sequence's own K/V,
    and the NaN poison of free pages) made every sequence's output NaN. Each row must see only its own pages."""
    spec = make_spec(device)
    cache = PagedKVCache(spec, attention=attention, decode_kernel="flex", prefill_kernel="flex", policy="lowest",
                         poison_free_pages=True)
    gold = ContiguousOracle(spec)
    gen = torch.Generator().manual_seed(5)
    for c in (cache, gold):
        c.admit("bad")
        c.admit("good")
    for lens in ([P + 3, 7], [1, 1]):                  # a prefill, then a decode step, both beside the bad row
        for c in (cache, gold):
            c.plan(["bad", "good"], lens)
        for layer in range(spec.num_layers):
            q, k, v = qkv(gen, spec, 2, max(lens))
            k[0, :, 0, 0], v[0, :, 1, 2] = float("nan"), float("inf")
            out, want = cache.run(layer, q, k, v), gold.run(layer, q, k, v)
            n = lens[1]
            assert out[1, :n].isfinite().all(), f"{attention}: row 'good' read another row's NaN/Inf"
            c = compare(out[1, :n], want[1, :n], want[1, :n].to(spec.dtype), spec.dtype)
            assert c.ok, c.describe()


def test_handed_out_pages_are_zeroed_in_every_layer(device):
    """The real configuration: a page handed out by plan() is all zeros in every layer of both pools before the step
    writes into it, whatever its last owner left there (one index_fill per pool, no poison option needed)."""
    spec = make_spec(device, num_pages=4, max_seq_len=64)
    cache = PagedKVCache(spec, attention="eager", policy="lowest")
    leave_non_finite_pages(cache, torch.Generator().manual_seed(3), tokens=2 * P)
    assert not cache.poison
    cache.admit("a")
    cache.plan(["a"], [P + 3])                                            # pages 0 and 1: one full, one partial
    for pool in (cache.k_pool, cache.v_pool):
        pages = pool.view(spec.num_layers, HKV, spec.num_pages, P, D)[:, :, cache.pages("a")]
        assert (pages == 0).all(), "a handed-out page still holds its last owner's values"


def test_zeroing_is_one_index_fill_per_pool_and_only_for_steps_that_hand_out_pages(device, monkeypatch):
    """Host cost: steps that hand out no page do nothing more; a step that hands out pages adds one
    index_fill_ per pool for all of them (no per-page launches, no host sync)."""
    spec = make_spec(device)
    cache = PagedKVCache(spec, attention="eager")
    calls = []
    real = torch.Tensor.index_fill_

    def counting(self, dim, index, value):
        calls.append((tuple(self.shape), index.numel(), float(value)))
        return real(self, dim, index, value)

    for s in "abc":
        cache.admit(s)
    monkeypatch.setattr(torch.Tensor, "index_fill_", counting)
    cache.plan(["a", "b", "c"], [P + 1, 3, 2 * P - 1])                    # 2 + 1 + 2 pages
    fills = [c for c in calls if len(c[0]) == 5]
    assert fills == [((2, HKV, spec.num_pages, P, D), 5, 0.0)] * 2, calls
    calls.clear()
    cache.plan(["a", "b", "c"], [1, 1, 1])                               # no page handed out
    assert calls == []


# ---------------------------------------------------------------------------------- defect 8
def _mid_step(device):
    """a, b, c live; a step of a and b has run layer 0 of 2; c is not in it."""
    spec = make_spec(device)
    cache = PagedKVCache(spec, attention="eager")
    gen = torch.Generator().manual_seed(5)
    for s in "abc":
        cache.admit(s)
    cache.plan(["a", "b", "c"], [5, 3, 2])
    for layer in range(2):
        cache.run(layer, *qkv(gen, spec, 3, 5))
    cache.plan(["a", "b"], [1, 1])
    cache.run(0, *qkv(gen, spec, 2, 1))
    return cache, gen


@pytest.mark.parametrize("op", ["admit", "fork"])
def test_admit_or_fork_between_the_layers_of_a_step_is_refused(device, op):
    cache, gen = _mid_step(device)
    before = cache.snapshot()
    call = {"admit": lambda: cache.admit("d"), "fork": lambda: cache.fork("c", "d")}[op]
    with pytest.raises(PlanError, match=rf"{op}\(\) between the layers of a step: layers \[1\] of the current step "
                                        r"have not run; run them first"):
        call()
    assert state_equal(cache.snapshot(), before)
    cache.run(1, *qkv(gen, cache.spec, 2, 1))                            # the step goes on
    call()                                                                # and then it is fine
    assert "d" in cache


def test_finish_between_the_layers_abandons_the_step(device):
    """finish() mid-step is the way out (a model that raised mid-forward): the step is dropped, and its other
    sequence b, whose last token has no K/V in layer 1, is refused by plan() and fork() until finished; c, not in
    the step, goes on."""
    cache, gen = _mid_step(device)
    cache.finish("a")
    with pytest.raises(PlanError, match="needs a current plan"):
        cache.run(1, *qkv(gen, cache.spec, 2, 1))
    for call in (lambda: cache.plan(["b"], [1]), lambda: cache.plan(["c", "b"], [1, 1]), lambda: cache.fork("b", "e")):
        before = cache.snapshot()
        with pytest.raises(PlanError, match=r"sequence 'b' lacks its last step's K/V in layers \[1\].*finish it"):
            call()
        assert state_equal(cache.snapshot(), before)
    cache.plan(["c"], [1])
    for layer in range(2):
        cache.run(layer, *qkv(gen, cache.spec, 1, 1))
    cache.finish("b")
    cache.admit("b")                                                      # a new b is a new sequence
    cache.plan(["b", "c"], [2, 1])


def test_a_plan_with_no_layer_run_may_still_be_dropped(device):
    """Documented: admit/fork/finish right after plan() (no layer run) end the step as before."""
    cache, gen = _mid_step(device)
    cache.run(1, *qkv(gen, cache.spec, 2, 1))
    cache.plan(["a", "c"], [1, 1])
    cache.admit("d")
    cache.fork("a", "e")
    cache.finish("e")
    with pytest.raises(PlanError, match="needs a current plan"):
        cache.run(0, *qkv(gen, cache.spec, 2, 1))
    cache.plan(["a", "d"], [1, 4])


def test_mod_probe_cache_is_bounded():
    """check_mods probes each new (mask_mod, score_mod) pair once; a fresh mod object every step must not grow it."""
    from paged import validation

    for i in range(3 * validation._PROBED_MAX):
        validation.check_mods(mods.sliding_window(8 + i), None)
    assert len(validation._probed) <= validation._PROBED_MAX


def test_fresh_mod_objects_each_step_do_not_grow_the_cache(device):
    spec = make_spec(device)
    cache = PagedKVCache(spec, attention="eager")
    cache.admit("a")
    for i in range(40):
        cache.plan(["a"], [1], mask_mod=mods.sliding_window(4 + i))
    assert sum(len(b.wrapped) for b in cache._buffers.values()) <= 16
