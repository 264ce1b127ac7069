"""PagedKVCache bookkeeping: lengths, pages per sequence, memory figures, forks, copy-on-write, page reuse,
and the page_logical table, checked after every operation.

Most checks need only plan() (it commits lengths and pages); the copy-on-write tests also run() so that the
pools hold data, and check the outputs against the oracle with the correctness policy. They use the same
cache geometry and batch of 3 as tests/test_scenarios.py, so compiled graphs are shared.
"""

from __future__ import annotations

import math

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache

HQ = 4
P = 16


def make_spec(device, dtype=torch.float32, num_pages=24) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=P, num_pages=num_pages, max_seq_len=128,
                     dtype=dtype, device=device)


def check_invariants(cache: PagedKVCache) -> None:
    """Host bookkeeping, its page-table mirror, the allocator and the device page_logical table agree."""
    spec, alloc = cache.spec, cache.allocator
    owners: dict[int, int] = {}
    logical = cache.page_logical.cpu().tolist()
    rows_in_use = [cache._seqs[s].row for s in cache.seq_ids]
    assert len(set(rows_in_use)) == len(rows_in_use), "two live sequences share a page-table row"
    for s in cache.seq_ids:
        pages, length = cache.pages(s), cache.length(s)
        mirror = cache._host_table.rows[cache._seqs[s].row].tolist()
        assert mirror == pages + [-1] * (len(mirror) - len(pages)), f"{s!r}: host page-table row out of date"
        assert len(pages) == math.ceil(length / spec.page_size), f"{s!r}: {len(pages)} pages for {length} tokens"
        assert len(set(pages)) == len(pages)
        for i, page in enumerate(pages):
            owners[page] = owners.get(page, 0) + 1
            assert logical[page] == i, f"page_logical[{page}] = {logical[page]}, but it is {s!r}'s page {i}"
    for page in range(spec.num_pages):
        assert alloc.refcount(page) == owners.get(page, 0), f"page {page}: refcount vs owning sequences"
        if page not in owners:
            assert logical[page] == -1, f"free page {page} still maps to logical page {logical[page]}"
    assert alloc.free_count == spec.num_pages - len(owners)
    assert alloc.shared_count == sum(n > 1 for n in owners.values()), "shared-page count out of date"
    assert sorted(alloc.policy.free_pages()) == sorted(set(range(spec.num_pages)) - set(owners))


def check_memory(cache: PagedKVCache) -> None:
    """memory() against figures recomputed from pages() and length()."""
    m, spec = cache.memory(), cache.spec
    filled: dict[int, int] = {}
    for s in cache.seq_ids:
        for i, page in enumerate(cache.pages(s)):
            filled[page] = max(filled.get(page, 0), min(P, cache.length(s) - i * P))
    live = len(cache.seq_ids)
    assert m.live_sequences == live
    assert m.pages_in_use == len(filled) == spec.num_pages - m.free_pages
    assert m.free_pages == cache.allocator.free_count
    assert m.tokens_stored == sum(filled.values())
    assert m.slots_reserved == m.pages_in_use * P
    assert m.waste_slots == m.slots_reserved - m.tokens_stored
    assert 0 <= m.waste_slots <= (P - 1) * live, "paging wastes at most a partial last page per live sequence"
    assert m.capacity_slots == spec.num_pages * P and m.total_pages == spec.num_pages and m.page_size == P
    assert m.bytes_per_slot == spec.bytes_per_token == 2 * 2 * 2 * 16 * spec.dtype.itemsize


class Lockstep:
    """The paged cache next to the float64 and same-dtype oracles; run() keeps the inputs for pool checks."""

    def __init__(self, spec: CacheSpec, seed: int = 0, **options) -> None:
        self.spec = spec
        self.paged = PagedKVCache(spec, **options)
        self.gold, self.ref = ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=spec.dtype)
        self.gen = torch.Generator().manual_seed(seed)

    def do(self, op: str, *args) -> None:
        for c in (self.paged, self.gold, self.ref):
            getattr(c, op)(*args)
        check_invariants(self.paged)
        check_memory(self.paged)

    def step(self, ids, lens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One step through every layer; returns each layer's (k, v) inputs."""
        spec, kv = self.spec, []
        for c in (self.paged, self.gold, self.ref):
            c.plan(ids, lens)
        check_invariants(self.paged)
        check_memory(self.paged)
        B, Lq = len(ids), max(lens)
        for layer in range(spec.num_layers):
            q, k, v = (torch.randn(B, Lq, h, spec.head_dim, generator=self.gen).to(spec.dtype).to(spec.device)
                       for h in (HQ, spec.num_kv_heads, spec.num_kv_heads))
            out = self.paged.run(layer, q, k, v)
            gold, ref = self.gold.run(layer, q, k, v), self.ref.run(layer, q, k, v)
            for b, (s, n) in enumerate(zip(ids, lens)):
                c = compare(out[b, :n], gold[b, :n], ref[b, :n], spec.dtype)
                assert c.ok, f"layer {layer}, sequence {s!r}: {c.describe()}"
            kv.append((k, v))
        return kv

    def page_data(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(page * P, (page + 1) * P)
        return self.paged.k_pool[:, :, sl].clone(), self.paged.v_pool[:, :, sl].clone()


# ------------------------------------------------------------------------------ lengths and memory
def test_lengths_pages_and_memory_follow_the_tokens(device):
    cache = PagedKVCache(make_spec(device))
    for s in "abc":
        cache.admit(s)
    assert cache.seq_ids == ["a", "b", "c"] and "a" in cache and "z" not in cache
    assert [cache.length(s) for s in "abc"] == [0, 0, 0] and cache.pages("a") == []
    check_memory(cache)
    assert cache.memory().pages_in_use == 0 and cache.memory().tokens_stored == 0
    expected = {"a": 0, "b": 0, "c": 0}
    for lens in ([1, 16, 15], [15, 1, 1], [16, 16, 1], [1, 33, 17]):
        cache.plan(["a", "b", "c"], lens)
        for s, n in zip("abc", lens):
            expected[s] += n
        assert {s: cache.length(s) for s in "abc"} == expected
        assert [len(cache.pages(s)) for s in "abc"] == [math.ceil(expected[s] / P) for s in "abc"]
        check_invariants(cache)
        check_memory(cache)
    m = cache.memory()
    assert m.pages_in_use == sum(math.ceil(n / P) for n in expected.values())
    assert m.tokens_stored == sum(expected.values())
    assert m.waste_fraction == m.waste_slots / m.slots_reserved
    assert m.bytes_reserved == m.slots_reserved * m.bytes_per_slot
    assert m.as_dict()["waste_slots"] == m.waste_slots


def test_waste_is_zero_when_every_sequence_ends_on_a_page_boundary(device):
    cache = PagedKVCache(make_spec(device))
    for s in "ab":
        cache.admit(s)
    cache.plan(["a", "b"], [P, 2 * P])
    m = cache.memory()
    assert (m.pages_in_use, m.tokens_stored, m.waste_slots) == (3, 3 * P, 0)
    cache.plan(["a"], [1])
    assert cache.memory().waste_slots == P - 1, "one token on a fresh page wastes P - 1 slots"


def test_oracle_memory_reserves_max_len_per_sequence(device):
    spec = make_spec(device)
    o = ContiguousOracle(spec)
    o.admit("a")
    o.admit("b")
    o.plan(["a", "b"], [5, 9])
    m = o.memory()
    assert (m.live_sequences, m.tokens_stored, m.slots_reserved) == (2, 14, 2 * spec.max_seq_len)
    assert m.waste_slots == 2 * spec.max_seq_len - 14 and m.pages_in_use is None


# ------------------------------------------------------------------------------------------ forks
def test_fork_shares_pages_with_refcounts(device):
    cache = PagedKVCache(make_spec(device))
    cache.admit("a")
    cache.plan(["a"], [2 * P + 5])
    before = cache.memory()
    cache.fork("a", "b")
    cache.fork("b", "c")
    assert cache.pages("a") == cache.pages("b") == cache.pages("c")
    assert cache.length("c") == 2 * P + 5
    assert [cache.allocator.refcount(p) for p in cache.pages("a")] == [3, 3, 3]
    after = cache.memory()
    assert (after.pages_in_use, after.tokens_stored) == (before.pages_in_use, before.tokens_stored), \
        "a fork takes no page and stores no token"
    check_invariants(cache)
    check_memory(cache)
    cache.finish("a")
    assert [cache.allocator.refcount(p) for p in cache.pages("b")] == [2, 2, 2]
    assert cache.memory().pages_in_use == 3, "pages stay while any owner lives"
    check_invariants(cache)


@pytest.mark.parametrize("first", ["parent", "child"])
def test_copy_on_write_of_a_shared_partial_page(device, first):
    """The first append of either side copies the shared partly filled last page; the other keeps its data."""
    h = Lockstep(make_spec(device), seed=1)
    for s in ("a", "x", "y"):
        h.do("admit", s)
    h.step(["a", "x", "y"], [13, 3, 5])
    h.step(["a", "x", "y"], [P, 1, 1])                               # a: 29 tokens, last page holds 13
    h.do("fork", "a", "b")
    shared = h.paged.pages("a")
    last = shared[-1]
    kept_k, kept_v = h.page_data(last)
    writer, other = ("a", "b") if first == "parent" else ("b", "a")

    kv = h.step([writer, "x", "y"], [1, 1, 1])
    new_last = h.paged.pages(writer)[-1]
    assert new_last != last and h.paged.pages(writer)[:-1] == shared[:-1]
    assert h.paged.pages(other) == shared, "the other side keeps the original page"
    assert h.paged.allocator.refcount(last) == 1 and h.paged.allocator.refcount(shared[0]) == 2
    # the original page is bit-for-bit unchanged
    k_now, v_now = h.page_data(last)
    assert torch.equal(k_now, kept_k) and torch.equal(v_now, kept_v)
    # the copy holds the 13 shared tokens, then the writer's new token
    k_new, v_new = h.page_data(new_last)
    assert torch.equal(k_new[:, :, :13], kept_k[:, :, :13]) and torch.equal(v_new[:, :, :13], kept_v[:, :, :13])
    for layer, (k, v) in enumerate(kv):
        assert torch.equal(k_new[layer, :, 13], k[0, 0]) and torch.equal(v_new[layer, :, 13], v[0, 0])

    # both continue; the oracle (which copies on fork) agrees with each
    h.step([other, writer, "x"], [1, 1, 1])
    assert h.paged.pages(other)[-1] != h.paged.pages(writer)[-1]
    h.step([writer, other, "y"], [5, 3, 1])


def test_fork_on_a_page_boundary_shares_no_partial_page(device):
    h = Lockstep(make_spec(device), seed=2)
    for s in ("a", "x", "y"):
        h.do("admit", s)
    h.step(["a", "x", "y"], [P, 3, 5])
    h.step(["a", "x", "y"], [P, 1, 1])                               # a: exactly two full pages
    h.do("fork", "a", "b")
    shared = h.paged.pages("a")
    used = h.paged.memory().pages_in_use
    data = [h.page_data(p) for p in shared]
    h.step(["a", "b", "x"], [1, 1, 1])
    assert h.paged.pages("a")[:2] == h.paged.pages("b")[:2] == shared, "full pages stay shared: no copy"
    assert h.paged.pages("a")[2] != h.paged.pages("b")[2]
    assert [h.paged.allocator.refcount(p) for p in shared] == [2, 2]
    assert h.paged.memory().pages_in_use == used + 2, "one fresh page each, nothing copied"
    for p, (k, v) in zip(shared, data):
        k_now, v_now = h.page_data(p)
        assert torch.equal(k_now, k) and torch.equal(v_now, v)
    h.step(["b", "a", "y"], [3, 1, 1])


def test_copy_on_write_by_both_sides_in_one_step(device):
    """Parent and child both append into their shared partial page in one step: only the first copies it,
    the second (its last other owner gone) writes in place; one new page, not two."""
    cache = PagedKVCache(make_spec(device), poison_free_pages=True)
    cache.admit("a")
    cache.plan(["a"], [5])
    cache.fork("a", "b")
    (old,) = cache.pages("a")
    free_before = cache.allocator.free_count
    cache.plan(["a", "b"], [1, 1])
    assert cache.pages("b") == [old] and cache.pages("a") != [old], "the first writer copies, the last keeps it"
    assert cache.allocator.refcount(old) == 1
    assert cache.allocator.free_count == free_before - 1, "exactly one page copied"
    assert cache.memory().pages_in_use == 2
    check_invariants(cache)


# --------------------------------------------------------------------------- finish and page reuse
def test_finish_frees_pages_and_they_are_reused(device):
    cache = PagedKVCache(make_spec(device), policy="lowest")
    for s in "abc":
        cache.admit(s)
    cache.plan(["a", "b", "c"], [2 * P, P + 1, 3])
    pages_b = cache.pages("b")
    free_before = cache.allocator.free_count
    cache.finish("b")
    assert "b" not in cache and cache.seq_ids == ["a", "c"]
    assert cache.allocator.free_count == free_before + 2
    assert all(cache.allocator.refcount(p) == 0 for p in pages_b)
    assert (cache.page_logical[pages_b] == -1).all()
    check_invariants(cache)
    check_memory(cache)
    cache.admit("d")
    cache.plan(["d"], [2 * P])
    assert cache.pages("d") == pages_b, "the lowest free pages are b's old ones"
    check_invariants(cache)
    cache.admit("b")                                                  # a finished id may be admitted again
    assert cache.length("b") == 0 and cache.pages("b") == []


def test_finish_of_a_forked_parent_keeps_shared_pages(device):
    cache = PagedKVCache(make_spec(device))
    cache.admit("a")
    cache.plan(["a"], [P + 3])
    cache.fork("a", "b")
    cache.plan(["a"], [P])                                            # a copies its last page, then grows
    only_a = [p for p in cache.pages("a") if p not in cache.pages("b")]
    assert len(only_a) == 2
    cache.finish("a")
    assert cache.memory().pages_in_use == 2, "b's pages stay, a's own pages are freed"
    assert all(cache.allocator.refcount(p) == 0 for p in only_a)
    assert [cache.allocator.refcount(p) for p in cache.pages("b")] == [1, 1]
    check_invariants(cache)
    check_memory(cache)


@pytest.mark.parametrize("kernel, fails_in", [("flex", "fill_block_lists"), ("flex", "physical_mods"),
                                              ("triton_mixed", "fill_tiles")])
def test_a_plan_that_fails_after_its_commit_still_updates_the_device(device, kernel, fails_in, monkeypatch):
    """plan() commits pages on the host before it builds the step's device tensors. If building them fails (out
    of memory, an interrupt; injected here before the step's copy, in flex's fill_block_lists or the mixed kernel's
    fill_tiles, or after it, in flex's physical_mods) the device page -> logical table, the poison and the
    copy-on-write copy must still follow."""
    import importlib

    from paged.kernels import triton_sizing

    if kernel == "triton_mixed" and not triton_sizing.available(device):
        pytest.skip(f"the Triton kernels cannot run on {device} here (CPU: TRITON_INTERPRET=1 before import)")
    module = importlib.import_module(f"paged.kernels.{kernel}")
    cache = PagedKVCache(make_spec(device), poison_free_pages=True,
                         decode_kernel="triton" if kernel == "triton_mixed" else "flex")
    cache.admit("a")
    cache.plan(["a"], [20])                                 # 20 tokens: the second page holds 4
    for pool in (cache.k_pool, cache.v_pool):               # stand-in K/V for them
        for i in range(20):
            page = cache.pages("a")[i // P]
            pool[:, :, page * P + i % P] = 1.0 + i
    cache.fork("a", "b")                                    # b shares both pages, the second partly filled

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(module, fails_in, boom)
    with pytest.raises(RuntimeError, match="injected"):
        cache.plan(["a", "b"], [1, 5])                      # a copies the shared page first, b writes in place
    assert cache.current_plan is None
    monkeypatch.undo()
    check_invariants(cache)
    free = [p for p in range(cache.spec.num_pages) if cache.allocator.refcount(p) == 0]
    for pool in (cache.k_pool, cache.v_pool):
        assert pool.unflatten(2, (cache.spec.num_pages, P))[:, :, free].isnan().all(), "free pages lost their poison"
    copied = cache.pages("a")[1]
    assert copied not in cache.pages("b"), "a's write must have copied the shared page"
    for pool in (cache.k_pool, cache.v_pool):
        assert pool[:, :, copied * P:copied * P + 4].cpu().eq(
            torch.arange(17.0, 21.0)[None, None, :, None]).all(), "the copied page lost a's tokens"


def test_invariants_through_a_long_mixed_history(device):
    """plan / fork / finish / admit interleaved under every policy; invariants checked after each operation."""
    for policy in ("lowest", "lifo", "fifo", "random"):
        cache = PagedKVCache(make_spec(device, num_pages=16), policy=policy, seed=3)
        ops = [("admit", "a"), ("admit", "b"), ("plan", ["a", "b"], [13, 16]), ("fork", "a", "c"),
               ("plan", ["c", "b"], [1, 1]), ("fork", "b", "d"), ("plan", ["d", "a"], [20, 4]),
               ("finish", "a"), ("admit", "e"), ("plan", ["e", "c", "d"], [17, 2, 1]), ("finish", "b"),
               ("finish", "d"), ("fork", "c", "f"), ("plan", ["f"], [16]), ("finish", "c"),
               ("plan", ["e", "f"], [15, 1]), ("finish", "e"), ("finish", "f")]
        for op, *args in ops:
            getattr(cache, op)(*args)
            check_invariants(cache)
            check_memory(cache)
        assert cache.allocator.free_count == 16 and cache.memory().tokens_stored == 0
        assert (cache.page_logical == -1).all()
