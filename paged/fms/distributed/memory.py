"""Every rank's KV memory at one moment, gathered over the control group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from paged.fms.distributed.group import DistContext
from paged.stats import MemoryStats

if TYPE_CHECKING:
    from paged.fms.distributed.cache import DistributedPagedKVCache

__all__ = ["GlobalMemory", "global_memory"]


@dataclass(frozen=True)
class GlobalMemory:
    """Every rank's cache memory at one moment (from :func:`global_memory`).

    Attributes:
        per_rank: each rank's MemoryStats (bytes_per_slot counts only that rank's K/V heads).
        pool_bytes: each rank's K+V pool bytes.
    """

    per_rank: tuple[MemoryStats, ...]
    pool_bytes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.per_rank)

    @property
    def consistent(self) -> bool:
        """Whether every rank holds the same sequences in the same number of pages (it always should)."""
        first = self.per_rank[0]
        return all((m.live_sequences, m.tokens_stored, m.pages_in_use) ==
                   (first.live_sequences, first.tokens_stored, first.pages_in_use) for m in self.per_rank)

    @property
    def tokens_stored(self) -> int:
        """Logical tokens held (every rank holds all of them, each for its own heads)."""
        return self.per_rank[0].tokens_stored

    @property
    def bytes_reserved(self) -> int:
        """Bytes of pages in use, summed over ranks."""
        return sum(m.bytes_reserved for m in self.per_rank)

    @property
    def pool_bytes_total(self) -> int:
        return sum(self.pool_bytes)

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "consistent": self.consistent, "tokens_stored": self.tokens_stored,
                "bytes_reserved": self.bytes_reserved, "pool_bytes_total": self.pool_bytes_total,
                "per_rank": [dict(m.as_dict(), pool_bytes=b) for m, b in zip(self.per_rank, self.pool_bytes)]}


def global_memory(cache: DistributedPagedKVCache, ctx: DistContext | None = None) -> GlobalMemory:
    """Every rank's ``cache.memory()`` and pool bytes (an all-gather: call it on every rank)."""
    ctx = ctx or cache.ctx
    mine = (cache.memory(), cache.pool_bytes())
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine, group=ctx.control)
    return GlobalMemory(tuple(m for m, _ in everyone), tuple(b for _, b in everyone))

