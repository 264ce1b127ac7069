"""Who runs next: the batching policy of :class:`paged.fms.generate.PagedGenerator`, as a swappable piece.

A scheduler sees requests (a prompt, how many tokens it may still generate, what it has stored) and the pool's
free pages; it decides which waiting requests are admitted and what the next step computes. The generator does
the rest (planning the step, running the model, sampling, finishing requests).

    scheduler = ContinuousBatching(max_batch=8, prefill_chunk=512)
    admitted = scheduler.admit(waiting, running, free_pages)    # requests to start now, in order
    work = scheduler.next_step(running)                         # Work("prefill" | "decode", rows, chunks)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Literal, Protocol, Sequence

import torch

__all__ = ["ContinuousBatching", "Request", "Scheduler", "Work"]


@dataclass(eq=False)
class Request:
    """One prompt's generation.

    Attributes:
        index: its position in the prompts list. prompt: its token ids. seq_id: its cache sequence.
        limit: most new tokens. reserve: pages it needs at its longest (prompt + limit - 1 tokens: the last new
            token is never fed back). fed: prompt tokens stored so far. out: tokens generated so far.
        logits: per new token, the (V,) float32 logits it was chosen from (when asked for). rng: its sampler.
        done: it has stopped (EOS or its limit); the generator finishes it once no planned step holds it.
    """

    index: int
    prompt: list[int]
    seq_id: Hashable
    limit: int
    reserve: int
    fed: int = 0
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    rng: torch.Generator | None = None
    done: bool = False

    @classmethod
    def make(cls, index: int, prompt: list[int], seq_id: Hashable, limit: int, page_size: int) -> Request:
        return cls(index, prompt, seq_id, limit, math.ceil((len(prompt) + limit - 1) / page_size))

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    def pages_to_come(self, pages_held: int) -> int:
        """Pages it may still claim, holding `pages_held` now."""
        return max(0, self.reserve - pages_held)


@dataclass(frozen=True)
class Work:
    """One step's work: `kind`, its rows (requests, in batch-row order) and each row's new tokens."""

    kind: Literal["prefill", "decode"]
    rows: tuple[Request, ...]
    chunks: tuple[tuple[int, ...], ...]


class Scheduler(Protocol):
    """A batching policy. Both methods see the running requests in admission order."""

    def admit(self, waiting: Sequence[Request], running: Sequence[Request], free_pages: int,
              pages_held: dict[Hashable, int]) -> list[Request]:
        """Which of `waiting` (in arrival order) to admit now; must never overcommit the pool."""

    def next_step(self, running: Sequence[Request]) -> Work:
        """The next step's work over the running requests (at least one)."""


class ContinuousBatching:
    """Admit in arrival order while a request fits; prefill whatever is prefilling, else decode every row.

    A request is admitted only when the pool can hold it at its longest next to what every running request may
    still claim, so no running request is ever preempted; at most `max_batch` run at once. Prefill steps (all
    prefilling rows, `prefill_chunk` prompt tokens each at most) go before decode steps; a decode step gives
    every running request one token. Requests that finish free their pages at once, so waiting ones join at the
    next step (continuous batching).
    """

    def __init__(self, max_batch: int | None = None, prefill_chunk: int | None = None) -> None:
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk

    def admit(self, waiting: Sequence[Request], running: Sequence[Request], free_pages: int,
              pages_held: dict[Hashable, int]) -> list[Request]:
        room = free_pages - sum(r.pages_to_come(pages_held.get(r.seq_id, 0)) for r in running)
        admitted = []
        for r in waiting:
            if self.max_batch is not None and len(running) + len(admitted) >= self.max_batch:
                break
            if r.reserve > room:
                break                       # arrival order: nobody overtakes the first that does not fit
            admitted.append(r)
            room -= r.reserve
        return admitted

    def next_step(self, running: Sequence[Request]) -> Work:
        prefilling = [r for r in running if r.prefilling]
        if prefilling:
            chunks = tuple(tuple(r.prompt[r.fed:r.fed + (self.prefill_chunk or len(r.prompt))]) for r in prefilling)
            return Work("prefill", tuple(prefilling), chunks)
        return Work("decode", tuple(running), tuple((r.out[-1],) for r in running))
