"""PageAllocator: a fixed pool of page ids with reference counts and a swappable placement policy.

Allocation is all-or-nothing: a request for k pages succeeds if and only if k pages are free (pages are
interchangeable, so there is no external fragmentation), and a failed request changes nothing.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from typing import Iterable, Protocol

from paged.errors import InvalidRequestError, OutOfPagesError, UnsupportedConfigError


class PlacementPolicy(Protocol):
    """Decides which free page is handed out next. Holds exactly the free pages."""

    name: str

    def take(self, n: int) -> list[int]:
        """Remove and return n free pages (the caller has checked that n are free)."""

    def give(self, pages: Iterable[int]) -> None:
        """Return pages to the free set."""

    def free_pages(self) -> list[int]:
        """The free pages in the order this policy would hand them out (for snapshots and tests)."""


class LowestFirst:
    """Lowest page id first: keeps the live set compact at the start of the pool."""

    name = "lowest"

    def __init__(self, num_pages: int) -> None:
        self._heap = list(range(num_pages))

    def take(self, n: int) -> list[int]:
        return [heapq.heappop(self._heap) for _ in range(n)]

    def give(self, pages: Iterable[int]) -> None:
        for p in pages:
            heapq.heappush(self._heap, p)

    def free_pages(self) -> list[int]:
        return sorted(self._heap)


class MostRecentlyFreed:
    """LIFO: the page freed last is reused first (its lines may still be in cache)."""

    name = "lifo"

    def __init__(self, num_pages: int) -> None:
        self._stack = list(range(num_pages - 1, -1, -1))

    def take(self, n: int) -> list[int]:
        taken = self._stack[len(self._stack) - n:][::-1]
        del self._stack[len(self._stack) - n:]
        return taken

    def give(self, pages: Iterable[int]) -> None:
        self._stack.extend(pages)

    def free_pages(self) -> list[int]:
        return self._stack[::-1]


class LeastRecentlyFreed:
    """FIFO: the page freed longest ago is reused first (spreads wear and scatters sequences)."""

    name = "fifo"

    def __init__(self, num_pages: int) -> None:
        self._queue = deque(range(num_pages))

    def take(self, n: int) -> list[int]:
        return [self._queue.popleft() for _ in range(n)]

    def give(self, pages: Iterable[int]) -> None:
        self._queue.extend(pages)

    def free_pages(self) -> list[int]:
        return list(self._queue)


class RandomPlacement:
    """Uniformly random free page (seeded): the worst case for locality, pages scattered non-monotonically."""

    name = "random"

    def __init__(self, num_pages: int, seed: int = 0) -> None:
        self._free = list(range(num_pages))
        self._rng = random.Random(seed)

    def take(self, n: int) -> list[int]:
        taken = []
        for _ in range(n):
            i = self._rng.randrange(len(self._free))
            self._free[i], self._free[-1] = self._free[-1], self._free[i]
            taken.append(self._free.pop())
        return taken

    def give(self, pages: Iterable[int]) -> None:
        self._free.extend(pages)

    def free_pages(self) -> list[int]:
        return list(self._free)


POLICIES = {cls.name: cls for cls in (LowestFirst, MostRecentlyFreed, LeastRecentlyFreed, RandomPlacement)}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def make_policy(name: str, num_pages: int, seed: int = 0) -> PlacementPolicy:
    """Build a placement policy by name: one of `POLICIES` ("lowest", "lifo", "fifo", "random")."""
    if not isinstance(name, str) or name not in POLICIES:
        raise UnsupportedConfigError(f"unknown placement policy {name!r}; expected one of {sorted(POLICIES)} or a "
                                     f"PlacementPolicy object (take, give, free_pages)")
    if not _is_int(seed):
        raise UnsupportedConfigError(f"seed must be an int, got {seed!r}")
    return RandomPlacement(num_pages, seed) if name == "random" else POLICIES[name](num_pages)


def resolve_policy(policy: object, num_pages: int, seed: int = 0) -> PlacementPolicy:
    """A policy name (`make_policy`) or a PlacementPolicy object holding exactly the pages 0..num_pages-1 (a fresh
    pool's free set); anything else is an UnsupportedConfigError naming the valid choices."""
    if isinstance(policy, str):
        return make_policy(policy, num_pages, seed)
    if not _is_int(seed):
        raise UnsupportedConfigError(f"seed must be an int, got {seed!r}")
    if not all(callable(getattr(policy, m, None)) for m in ("take", "give", "free_pages")):
        raise UnsupportedConfigError(f"policy must be one of {sorted(POLICIES)} or a PlacementPolicy object (take, "
                                     f"give, free_pages), got {type(policy).__name__} {policy!r}")
    free = policy.free_pages()
    if sorted(free) != list(range(num_pages)):
        raise UnsupportedConfigError(f"a PlacementPolicy object must start holding exactly the free pages "
                                     f"0..{num_pages - 1} of a fresh pool (one object per allocator); it holds "
                                     f"{len(free)} page(s)")
    return policy


class PageAllocator:
    """Reference-counted pages 0..num_pages-1.

    A page is free when its count is 0. `allocate` hands out pages with count 1; `share` adds an owner
    (a fork); `release` drops one owner per page and frees the pages whose count reaches 0.
    """

    def __init__(self, num_pages: int, policy: str | PlacementPolicy = "lowest", seed: int = 0) -> None:
        if not _is_int(num_pages) or num_pages < 1:
            raise UnsupportedConfigError(f"num_pages must be a positive int, got {num_pages!r}")
        self.num_pages = num_pages
        self.policy = resolve_policy(policy, num_pages, seed)
        self._refcount = [0] * num_pages
        self._free = num_pages
        self._shared = 0  # pages with more than one owner

    @property
    def free_count(self) -> int:
        return self._free

    @property
    def used_count(self) -> int:
        return self.num_pages - self._free

    @property
    def shared_count(self) -> int:
        """Pages with more than one owner (0 unless some sequence was forked)."""
        return self._shared

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    def allocate(self, n: int, what: str = "request") -> list[int]:
        """Hand out n pages, each with one owner, or raise OutOfPagesError and change nothing."""
        if not _is_int(n) or n < 0:
            raise InvalidRequestError(f"page count must be a non-negative int, got {n!r}")
        if n > self._free:
            raise OutOfPagesError(n, self._free, what)
        pages = self.policy.take(n)
        for p in pages:
            assert self._refcount[p] == 0, f"policy handed out page {p} that is in use"
            self._refcount[p] = 1
        self._free -= n
        return pages

    def _check_live(self, pages: list[int]) -> None:
        for p in pages:
            if not _is_int(p) or not 0 <= p < self.num_pages or self._refcount[p] == 0:
                raise InvalidRequestError(f"page {p} is not allocated")

    def share(self, pages: Iterable[int]) -> None:
        """Add one owner to each (allocated) page."""
        pages = list(pages)
        self._check_live(pages)
        for p in pages:
            self._refcount[p] += 1
            self._shared += self._refcount[p] == 2

    def release(self, pages: Iterable[int]) -> list[int]:
        """Drop one owner from each page; return the pages that became free."""
        pages = list(pages)
        self._check_live(pages)
        drops: dict[int, int] = {}
        for p in pages:
            drops[p] = drops.get(p, 0) + 1
        for p, d in drops.items():
            if d > self._refcount[p]:
                raise InvalidRequestError(f"page {p} released {d} times but has {self._refcount[p]} owner(s)")
        freed = []
        for p in pages:
            self._refcount[p] -= 1
            self._shared -= self._refcount[p] == 1
            if self._refcount[p] == 0:
                freed.append(p)
        self.policy.give(freed)
        self._free += len(freed)
        return freed

    def snapshot(self) -> tuple:
        """Everything that decides future behaviour: counts and the policy's free order."""
        rng_state = getattr(getattr(self.policy, "_rng", None), "getstate", lambda: None)()
        return (tuple(self._refcount), self._free, tuple(self.policy.free_pages()), rng_state)
