"""A rank's PagedKVCache in a tensor-parallel group: the allocator that votes before it hands out pages, the cache
whose every plan() is agreed by all ranks, and the cache spec every rank must share."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

from paged.allocator import PageAllocator
from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError, OutOfPagesError, UnsupportedConfigError
from paged.fms.distributed.errors import DistributedStepError
from paged.fms.distributed.group import DistContext
from paged.fms.distributed.vote import Control, digest_of
from paged.fms.generate import cache_spec_for
from paged.plan import StepPlan
from paged.spec import CacheSpec

__all__ = ["VotingAllocator", "DistributedPagedKVCache", "tp_cache_spec", "agree_spec"]


class VotingAllocator(PageAllocator):
    """A PageAllocator for a tensor-parallel group: the named extension point through which a plan's page
    allocation is agreed by every rank before any rank takes pages.

    Inside ``with allocator.voting(callback):`` every ``allocate(n)`` first decides locally whether it can
    succeed, WITHOUT taking pages, and calls ``callback(n, error_or_None)`` (which votes across ranks and raises
    on every rank if any rank failed); only then are pages taken. It votes on every allocation of the block, not
    on "the" allocation: ranks share one history, so they allocate equally often and their votes pair up.
    ``votes`` counts the votes of the current block (0: the block failed before allocating).
    """

    def __init__(self, num_pages: int, policy: str = "lowest", seed: int = 0) -> None:
        super().__init__(num_pages, policy, seed)
        self._callback: Callable[[int, BaseException | None], None] | None = None
        self.votes = 0

    @contextlib.contextmanager
    def voting(self, callback: Callable[[int, BaseException | None], None]) -> Iterator["VotingAllocator"]:
        """Vote through `callback` before every allocation made inside the block."""
        self._callback, self.votes = callback, 0
        try:
            yield self
        finally:
            self._callback = None

    def allocate(self, n: int, what: str = "request") -> list[int]:
        if self._callback is not None:
            err: BaseException | None = None
            if not isinstance(n, int) or n < 0:
                err = InvalidRequestError(f"page count must be a non-negative int, got {n!r}")
            elif n > self.free_count:
                err = OutOfPagesError(n, self.free_count, what)
            self.votes += 1
            self._callback(n, err)
        return super().allocate(n, what)


class DistributedPagedKVCache(PagedKVCache):
    """A rank's PagedKVCache in a tensor-parallel group: same API, and every plan() is agreed by all ranks.

    Each rank holds its own pools (its local K/V heads); ``plan`` votes twice (see the module doc), so
    a request one rank rejects is rejected on every rank with the same error before any rank changed
    anything. ``admit``/``fork``/``finish`` do not communicate: they are deterministic, and their effect
    (the free page count, the sequences' lengths) is checked by the next plan's vote.

    Args:
        spec, policy, seed, attention, kernel_options, poison_free_pages: see PagedKVCache (same on every rank).
        ctx: this rank's :class:`DistContext`.
        check_pages: also hash every live sequence's physical page table into the post-commit vote (a debug
            and test aid: O(pages in use) host work per step). Ranks with the same history and a deterministic
            placement policy (all of them; "random" is seeded) have identical tables.
    """

    def __init__(self, spec: CacheSpec, ctx: DistContext, *, check_pages: bool = False, policy: str = "lowest",
                 seed: int = 0, **kwargs: Any) -> None:
        if not isinstance(policy, str):
            raise UnsupportedConfigError("a distributed cache takes a policy by name, so every rank builds the same "
                                         "one")
        super().__init__(spec, policy=policy, seed=seed, **kwargs)
        self.allocator = VotingAllocator(spec.num_pages, policy, seed)
        self.ctx = ctx
        self.control = Control(ctx)
        self.check_pages = check_pages
        self.history = 0                   # digest of every token folded in by the generator
        self._request: tuple | None = None

    def fold_tokens(self, *parts: object) -> None:
        """Fold what a step decided (e.g. its new tokens) into the digest the next vote compares."""
        self.history = digest_of(self.history, parts)

    def _state(self) -> str:
        seqs, q_lens = self._request or ((), ())
        return (f"step {list(zip(seqs, q_lens))}, lengths {[self.length(s) for s in seqs if s in self]}, "
                f"{self.allocator.free_count} free pages, {len(self.seq_ids)} live")

    def _pre_commit(self, n: int, err: BaseException | None) -> None:
        seqs, q_lens = self._request                      # validated by now: every id is live
        lengths = tuple(self.length(s) for s in seqs)
        digest = digest_of(seqs, q_lens, lengths, n, self.allocator.free_count, self.history)
        self.control.vote("plan", err, digest, self._state)

    def plan(self, seq_ids: Sequence[Hashable], q_lens: Sequence[int], **kwargs: Any) -> StepPlan:
        self._request = (tuple(seq_ids), tuple(q_lens))
        with self.allocator.voting(self._pre_commit) as allocator:
            try:
                plan = super().plan(seq_ids, q_lens, **kwargs)
            except DistributedStepError:
                raise
            except Exception as e:
                # Failed before allocating (validation): vote "plan"; after (building the step): "commit".
                self.control.vote("plan" if allocator.votes == 0 else "commit", e)
                raise                                                       # pragma: no cover (vote raised)
        digest = digest_of(self.page_tables()) if self.check_pages else 0
        self.control.vote("commit", None, digest, self._state)
        return plan

    def page_tables(self) -> tuple:
        """Every live sequence's (id, length, physical pages), in admission order (what check_pages hashes)."""
        return tuple((s, st.length, tuple(st.pages)) for s, st in self._seqs.items())

    def pool_bytes(self) -> int:
        """Bytes of this rank's K and V pools (all layers)."""
        return 2 * self.k_pool.numel() * self.k_pool.element_size()


def tp_cache_spec(model: torch.nn.Module, ctx: DistContext, *, token_budget: int | None = None,
                  kv_budget_bytes: int | None = None, page_size: int = 16, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> CacheSpec:
    """The cache spec of this rank's shard of `model` (local kv heads), checked equal on every rank.

    Give either ``token_budget`` (tokens per pool) or ``kv_budget_bytes`` (bytes of K+V per rank: the pool
    then holds ``bytes // bytes_per_token`` tokens, where one token costs ``2 * layers * local_kvheads *
    head_dim * itemsize``; sharding K/V heads over more ranks makes each token cheaper per rank). Every rank
    must arrive at the same spec; if not, every rank raises :class:`RankDivergenceError`.
    """
    if (token_budget is None) == (kv_budget_bytes is None):
        raise InvalidRequestError("give exactly one of token_budget and kv_budget_bytes")
    if kv_budget_bytes is not None:
        probe = cache_spec_for(model, token_budget=page_size, page_size=page_size, max_seq_len=page_size, dtype=dtype)
        token_budget = (int(kv_budget_bytes) // probe.bytes_per_token) // page_size * page_size
        if token_budget < page_size:
            raise InvalidRequestError(f"kv_budget_bytes={kv_budget_bytes} holds less than one page "
                                      f"({probe.bytes_per_token * page_size} bytes)")
    spec = cache_spec_for(model, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len, dtype=dtype,
                          device=ctx.device)
    agree_spec(spec, ctx)
    return spec


def agree_spec(spec: CacheSpec, ctx: DistContext) -> None:
    """Raise RankDivergenceError on every rank unless every rank has this spec (device aside)."""
    fields = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size, spec.num_pages, spec.max_seq_len,
              str(spec.dtype))
    Control(ctx).vote("spec", None, digest_of(fields), lambda: f"spec {fields}")

