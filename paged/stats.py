"""MemoryStats: what a KV cache holds and wastes, in a form every backend (paged or not) can report."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryStats:
    """A snapshot of a cache's memory use, in token slots (one slot = one token's K/V in every layer).

    Attributes:
        live_sequences: sequences admitted and not finished.
        tokens_stored: distinct token slots that hold data (a page shared by a fork counts once).
        slots_reserved: slots set aside for live sequences (pages in use * page size, or max_len per
            sequence for a contiguous cache).
        waste_slots: slots_reserved - tokens_stored.
        capacity_slots: every slot the cache owns (None for a cache without a fixed budget).
        page_size, total_pages, pages_in_use, free_pages: paging figures, None for a non-paged cache.
        bytes_per_slot: bytes one slot takes over all layers (K and V).
    """

    live_sequences: int
    tokens_stored: int
    slots_reserved: int
    waste_slots: int
    capacity_slots: int | None
    bytes_per_slot: int
    page_size: int | None = None
    total_pages: int | None = None
    pages_in_use: int | None = None
    free_pages: int | None = None

    @property
    def waste_fraction(self) -> float:
        """Share of the reserved slots that hold no token (0 when nothing is reserved)."""
        return self.waste_slots / self.slots_reserved if self.slots_reserved else 0.0

    @property
    def bytes_reserved(self) -> int:
        return self.slots_reserved * self.bytes_per_slot

    def as_dict(self) -> dict:
        return {**asdict(self), "waste_fraction": self.waste_fraction, "bytes_reserved": self.bytes_reserved}
