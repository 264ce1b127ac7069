"""PageAllocator: refcounts, all-or-nothing allocation, error paths, placement policy orders, a state machine."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant, multiple,
                                 rule)

from paged import POLICIES, InvalidRequestError, OutOfPagesError, PageAllocator, UnsupportedConfigError

N = 12

policies = pytest.mark.parametrize("policy", sorted(POLICIES))
ORDERED = ("lowest", "lifo", "fifo")   # deterministic hand-out order (free_pages() is that order)


def free_set(a: PageAllocator) -> set[int]:
    return {p for p in range(a.num_pages) if a.refcount(p) == 0}


def check_consistent(a: PageAllocator) -> None:
    free = a.policy.free_pages()
    assert len(free) == len(set(free)) == a.free_count, "the policy holds each free page exactly once"
    assert set(free) == free_set(a), "the policy's free pages are exactly those with no owner"
    assert a.free_count + a.used_count == a.num_pages
    assert all(a.refcount(p) >= 0 for p in range(a.num_pages))


# ---------------------------------------------------------------------------------------------- basics
@policies
def test_allocate_share_release_refcounts(policy):
    a = PageAllocator(N, policy, seed=3)
    pages = a.allocate(3)
    assert len(set(pages)) == 3 and all(0 <= p < N for p in pages)
    assert [a.refcount(p) for p in pages] == [1, 1, 1]
    assert (a.free_count, a.used_count) == (N - 3, 3)

    a.share(pages[:2])                                       # a fork shares the first two pages
    assert [a.refcount(p) for p in pages] == [2, 2, 1]
    assert a.free_count == N - 3, "sharing takes no page"

    assert a.release(pages) == [pages[2]], "only the unshared page becomes free"
    assert [a.refcount(p) for p in pages] == [1, 1, 0]
    assert a.free_count == N - 2
    assert sorted(a.release(pages[:2])) == sorted(pages[:2])
    assert a.free_count == N and free_set(a) == set(range(N))
    check_consistent(a)


@policies
def test_release_same_page_twice_in_one_call_drops_two_owners(policy):
    a = PageAllocator(N, policy)
    (p,) = a.allocate(1)
    a.share([p])
    assert a.release([p, p]) == [p]
    assert a.refcount(p) == 0 and a.free_count == N
    check_consistent(a)


@policies
def test_allocate_zero_pages(policy):
    a = PageAllocator(N, policy)
    before = a.snapshot()
    assert a.allocate(0) == []
    assert a.snapshot() == before


# ------------------------------------------------------------------------------------ all-or-nothing
@policies
@pytest.mark.parametrize("used", [0, 5, N])
def test_k_pages_succeed_iff_k_free(policy, used):
    """No external fragmentation: any k <= free succeeds, k = free + 1 fails and changes nothing."""
    a = PageAllocator(N, policy, seed=1)
    held = a.allocate(used)
    # free pages scattered among used ones: release every other held page
    a.release(held[::2])
    free = a.free_count
    assert free == N - used + len(held[::2])

    before = a.snapshot()
    with pytest.raises(OutOfPagesError, match=rf"needs {free + 1} free page\(s\) but only {free} are free") as info:
        a.allocate(free + 1, what="test request")
    assert (info.value.needed, info.value.free) == (free + 1, free)
    assert "test request" in str(info.value) and "nothing was allocated" in str(info.value)
    assert a.snapshot() == before, "a failed allocation changes nothing (random policy: not even its RNG)"

    for k in range(free + 1):
        b = PageAllocator(N, policy, seed=1)
        h = b.allocate(used)
        b.release(h[::2])
        got = b.allocate(k)
        assert len(got) == len(set(got)) == k
        assert b.free_count == free - k
        check_consistent(b)


@policies
def test_out_of_pages_is_a_memory_error(policy):
    a = PageAllocator(N, policy)
    a.allocate(N)
    with pytest.raises(MemoryError):
        a.allocate(1)


@policies
@pytest.mark.parametrize("bad", [-1, 1.0, "2", None])
def test_bad_page_count_rejected_unchanged(policy, bad):
    a = PageAllocator(N, policy)
    a.allocate(2)
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match="non-negative int"):
        a.allocate(bad)
    assert a.snapshot() == before


# ------------------------------------------------------------------------------------- error paths
@policies
def test_release_free_page_rejected_unchanged(policy):
    a = PageAllocator(N, policy, seed=2)
    held = a.allocate(3)
    free_page = next(p for p in range(N) if p not in held)
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match=rf"page {free_page} is not allocated"):
        a.release([held[0], free_page])               # the valid first page must not be released either
    assert a.snapshot() == before
    assert a.refcount(held[0]) == 1


@policies
def test_double_free_rejected_unchanged(policy):
    a = PageAllocator(N, policy, seed=2)
    held = a.allocate(2)
    a.release([held[0]])
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match=rf"page {held[0]} is not allocated"):
        a.release([held[0]])
    assert a.snapshot() == before
    # releasing one owner twice in a single call is a double free too
    with pytest.raises(InvalidRequestError, match=rf"page {held[1]} released 2 times but has 1 owner"):
        a.release([held[1], held[1]])
    assert a.snapshot() == before and a.refcount(held[1]) == 1


@policies
@pytest.mark.parametrize("bad", [-1, N, N + 5])
def test_release_or_share_out_of_range_rejected_unchanged(policy, bad):
    a = PageAllocator(N, policy)
    held = a.allocate(2)
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match=rf"page {bad} is not allocated"):
        a.release([held[0], bad])
    with pytest.raises(InvalidRequestError, match=rf"page {bad} is not allocated"):
        a.share([held[0], bad])
    assert a.snapshot() == before


@policies
def test_share_free_page_rejected_unchanged(policy):
    a = PageAllocator(N, policy)
    held = a.allocate(1)
    free_page = next(p for p in range(N) if p not in held)
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match=rf"page {free_page} is not allocated"):
        a.share([held[0], free_page])
    assert a.snapshot() == before


def test_unknown_policy_rejected():
    with pytest.raises(UnsupportedConfigError, match=r"unknown placement policy 'best'.*'fifo'"):
        PageAllocator(N, "best")


@pytest.mark.parametrize("policy", [None, 5, 1.0, object()], ids=["None", "5", "1.0", "object"])
def test_a_policy_that_is_neither_a_name_nor_a_policy_object_is_rejected(policy):
    """Used to be accepted and fail at the first allocation with AttributeError."""
    with pytest.raises(UnsupportedConfigError, match=r"policy must be one of \['fifo', 'lifo', 'lowest', 'random'\] "
                                                     r"or a PlacementPolicy object"):
        PageAllocator(N, policy)


@pytest.mark.parametrize("num_pages", [0, -1, True, 4.0, None], ids=repr)
def test_num_pages_must_be_a_positive_int(num_pages):
    with pytest.raises(UnsupportedConfigError, match=rf"num_pages must be a positive int, got {num_pages!r}"):
        PageAllocator(num_pages)


@pytest.mark.parametrize("seed", [True, 1.5, "1", None], ids=repr)
def test_seed_must_be_an_int(seed):
    with pytest.raises(UnsupportedConfigError, match=rf"seed must be an int, got {seed!r}"):
        PageAllocator(N, "random", seed=seed)


@pytest.mark.parametrize("n", [True, False, 1.0], ids=repr)
def test_allocate_refuses_bools_and_floats(n):
    a = PageAllocator(N)
    before = a.snapshot()
    with pytest.raises(InvalidRequestError, match=rf"page count must be a non-negative int, got {n!r}"):
        a.allocate(n)
    assert a.snapshot() == before


def test_share_and_release_refuse_bool_pages():
    a = PageAllocator(N)
    a.allocate(2)                                       # pages 0 and 1: True would have passed as page 1
    before = a.snapshot()
    for op in (a.share, a.release):
        with pytest.raises(InvalidRequestError, match=r"page True is not allocated"):
            op([0, True])
    assert a.snapshot() == before


# ----------------------------------------------------------------------------------- policy orders
@pytest.mark.parametrize("policy", ORDERED)
def test_free_pages_is_the_hand_out_order(policy):
    a = PageAllocator(N, policy)
    a.allocate(7)
    a.release([5, 1, 6])
    a.release([3])
    for k in (1, 2, 3):
        expected = a.policy.free_pages()[:k]
        assert a.allocate(k) == expected


def test_lowest_gives_lowest_ids():
    a = PageAllocator(N, "lowest")
    assert a.allocate(3) == [0, 1, 2]
    a.allocate(4)                         # 3..6
    a.release([5, 1, 6, 2])
    assert a.allocate(2) == [1, 2]
    assert a.allocate(3) == [5, 6, 7]
    assert a.policy.free_pages() == sorted(a.policy.free_pages())


def test_lifo_reuses_the_last_freed():
    a = PageAllocator(N, "lifo")
    held = a.allocate(6)
    a.release([held[4]])
    a.release([held[1]])
    a.release([held[3]])
    assert a.allocate(1) == [held[3]], "the page freed last comes back first"
    assert a.allocate(2) == [held[1], held[4]]


def test_fifo_reuses_the_oldest_freed():
    a = PageAllocator(N, "fifo")
    held = a.allocate(N)                  # every page in use: the queue holds only freed pages
    a.release([held[4]])
    a.release([held[1]])
    a.release([held[3]])
    assert a.allocate(1) == [held[4]], "the page freed first comes back first"
    assert a.allocate(2) == [held[1], held[3]]


def test_fifo_hands_out_never_used_pages_before_freed_ones():
    a = PageAllocator(N, "fifo")
    first = a.allocate(3)
    a.release(first)
    assert a.allocate(N - 3) == list(range(3, N)), "freed pages join the back of the queue"
    assert a.allocate(3) == first


def test_random_is_seeded_reproducible_and_scatters():
    def trace(seed):
        a = PageAllocator(64, "random", seed=seed)
        got = [a.allocate(8)]
        a.release(got[0][::2])
        got.append(a.allocate(10))
        return got

    assert trace(7) == trace(7), "same seed, same placement"
    assert trace(7) != trace(8), "another seed, another placement"
    pages = trace(7)[0]
    assert pages != sorted(pages), "random placement is not monotone"
    assert pages != list(range(pages[0], pages[0] + 8)), "random placement is not contiguous"


def test_random_snapshot_includes_rng_state():
    a = PageAllocator(N, "random", seed=0)
    b = PageAllocator(N, "random", seed=1)
    assert a.snapshot() != b.snapshot(), "two seeds decide different futures, so their snapshots differ"


# ------------------------------------------------------------------------------------ state machine
class AllocatorMachine(RuleBasedStateMachine):
    """allocate / share / release against a model of owners; invariants after every step."""

    owned = Bundle("owned")   # one element per owner-reference of a page

    def __init__(self):
        super().__init__()
        self.alloc: PageAllocator | None = None
        self.model: dict[int, int] = {}

    @initialize(policy=st.sampled_from(sorted(POLICIES)), num_pages=st.integers(1, 10), seed=st.integers(0, 3))
    def init(self, policy, num_pages, seed):
        self.alloc = PageAllocator(num_pages, policy, seed=seed)
        self.model = {p: 0 for p in range(num_pages)}

    @rule(target=owned, n=st.integers(0, 4))
    def allocate(self, n):
        free = self.alloc.free_count
        if n > free:
            before = self.alloc.snapshot()
            with pytest.raises(OutOfPagesError):
                self.alloc.allocate(n)
            assert self.alloc.snapshot() == before
            return multiple()
        pages = self.alloc.allocate(n)
        assert len(pages) == len(set(pages)) == n
        for p in pages:
            assert self.model[p] == 0, f"page {p} handed out while in use"
            self.model[p] = 1
        return multiple(*pages)

    @rule(target=owned, page=owned)
    def share(self, page):
        self.alloc.share([page])
        self.model[page] += 1
        return page                     # the drawn entry stays: one bundle entry per owner

    @rule(page=consumes(owned))
    def release(self, page):
        freed = self.alloc.release([page])
        self.model[page] -= 1
        assert freed == ([page] if self.model[page] == 0 else [])

    @rule(page=st.integers(-1, 11))
    def release_unowned(self, page):
        if self.model.get(page, 0) > 0:
            return
        before = self.alloc.snapshot()
        with pytest.raises(InvalidRequestError):
            self.alloc.release([page])
        assert self.alloc.snapshot() == before

    @invariant()
    def counts_match(self):
        if self.alloc is None:
            return
        a = self.alloc
        used = {p for p, c in self.model.items() if c > 0}
        assert a.free_count + len(used) == a.num_pages
        assert all(a.refcount(p) == c >= 0 for p, c in self.model.items())
        check_consistent(a)


# consumes() on release and one new entry per share keep exactly one bundle entry per owner reference.
TestAllocatorMachine = AllocatorMachine.TestCase
