"""What a benchmark backend is (`Runner`), how it says it cannot run here, and helpers the pool backends share."""

from __future__ import annotations

import torch


class Unavailable(Exception):
    """A backend that cannot run here (not installed, wrong device, not offered for this kind of step)."""


class Runner:
    """One backend prepared for a case: `step(q, k, v)` -> (B, C, Hq, D); `rearm()` makes it repeatable."""

    name = ""

    def step(self, q, k, v) -> torch.Tensor:
        raise NotImplementedError

    def rearm(self) -> None:
        pass

    def close(self) -> None:
        pass


def slots_of(pages: torch.Tensor, n: int, page: int) -> torch.Tensor:
    """The pool slots (n,) of a sequence's first n tokens, given its pages in order."""
    t = torch.arange(n, device=pages.device)
    return pages.long()[t // page] * page + t % page


def fill_plans(backend, ids: list[int], lens: list[int], chunk: int) -> None:
    """Reserve the stored contexts through plan() in chunks (bounded block-mask sizes), without attending."""
    left = dict(zip(ids, lens))
    while any(left.values()):
        step = [i for i in ids if left[i]]
        q = [min(chunk, left[i]) for i in step]
        backend.plan(step, q)
        for i, n in zip(step, q):
            left[i] -= n
