"""PageModel: the abstract truth about what a paged cache must hold after any sequence of operations.

It tracks, per live sequence, its length and its pages as abstract ids (a fork shares its parent's ids; a
write into a shared, partly filled last page replaces that page with a fresh id: copy-on-write). From that
follow the exact figures a correct paged backend must report: distinct pages in use, free pages, tokens
stored, and how many new pages a step needs (so whether it must fail for lack of pages).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass
class _Seq:
    length: int = 0
    pages: list[int] = field(default_factory=list)


class PageModel:
    """Page accounting of an ideal paged cache with `num_pages` pages of `page_size` tokens."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.seqs: dict[Hashable, _Seq] = {}
        self._ids = itertools.count()

    def _owners(self) -> dict[int, int]:
        owners: dict[int, int] = {}
        for s in self.seqs.values():
            for p in s.pages:
                owners[p] = owners.get(p, 0) + 1
        return owners

    @property
    def pages_in_use(self) -> int:
        return len(self._owners())

    @property
    def free_pages(self) -> int:
        return self.num_pages - self.pages_in_use

    @property
    def tokens_stored(self) -> int:
        """Distinct token slots holding data (a shared page's slots count once)."""
        filled: dict[int, int] = {}
        for s in self.seqs.values():
            for i, p in enumerate(s.pages):
                filled[p] = max(filled.get(p, 0), min(self.page_size, s.length - i * self.page_size))
        return sum(filled.values())

    def length(self, seq: Hashable) -> int:
        return self.seqs[seq].length

    def admit(self, seq: Hashable) -> None:
        self.seqs[seq] = _Seq()

    def fork(self, parent: Hashable, child: Hashable) -> None:
        p = self.seqs[parent]
        self.seqs[child] = _Seq(p.length, list(p.pages))

    def finish(self, seq: Hashable) -> None:
        del self.seqs[seq]

    def pages_needed(self, seqs: Sequence[Hashable], q_lens: Sequence[int]) -> int:
        """New pages a step needs: pages to grow into, plus a copy of each shared partly filled last page."""
        owners = self._owners()
        need = 0
        for seq, q in zip(seqs, q_lens):
            s = self.seqs[seq]
            need += math.ceil((s.length + q) / self.page_size) - len(s.pages)
            if s.length % self.page_size and owners[s.pages[-1]] > 1:
                owners[s.pages[-1]] -= 1  # a later writer of the same page may then write in place
                need += 1
        return need

    def step(self, seqs: Sequence[Hashable], q_lens: Sequence[int]) -> None:
        """Apply a step that fits (check `pages_needed` <= `free_pages` first)."""
        owners = self._owners()
        for seq, q in zip(seqs, q_lens):
            s = self.seqs[seq]
            if s.length % self.page_size and owners[s.pages[-1]] > 1:
                owners[s.pages[-1]] -= 1
                s.pages[-1] = next(self._ids)
                owners[s.pages[-1]] = 1
            while len(s.pages) < math.ceil((s.length + q) / self.page_size):
                s.pages.append(next(self._ids))
                owners[s.pages[-1]] = 1
            s.length += q
