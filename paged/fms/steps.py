"""The generation loop's records of steps in flight, and how the next token is chosen.

`PagedGenerator` (:mod:`paged.fms.generate`) launches a step, plans the next one while the GPU runs it, and reads a
greedy step's picks only after the next step is launched: `Ahead` is a step planned before its tokens were known,
`Launched` a step whose tokens are not recorded yet, `feed` the next step's input tokens (from the device where the
host has not read them). `Sampling` and `choose` pick tokens on the host (sampling, or logits asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from paged.fms.decode import FedTokens, PendingTokens
from paged.fms.op import PagedStep
from paged.fms.scheduler import Request, Work


@dataclass(frozen=True)
class Ahead:
    """A decode step planned before its tokens were known: its rows and the plan."""

    rows: tuple[Request, ...]
    step: PagedStep

    def work(self) -> Work:
        # A row fed from the device (`feed`) gets its token there: its entry here may be a step old.
        return Work("decode", self.rows, tuple((r.out[-1],) for r in self.rows))


@dataclass(frozen=True)
class Launched:
    """A launched step whose tokens are not recorded yet.

    Attributes:
        step_no, work: the step. picking: the rows that pick a token (every decode row; prefill rows whose prompt
            is now stored). logits: (k, V) the picking rows' logits, when the host chooses (eager path, sampling,
            return_logits); None when the picks come from the device. picks: (B,) the device's greedy picks, or
            None. pending: their copy to the host, or None. on_device: the decoder ran it (the GPU may still be
            running it).
    """

    step_no: int
    work: Work
    picking: tuple[Request, ...]
    logits: torch.Tensor | None
    picks: torch.Tensor | None
    pending: PendingTokens | None
    on_device: bool

    @property
    def lagging(self) -> bool:
        """Its picks are read after the next step is launched (greedy picks on their way to the host)."""
        return self.pending is not None


def feed(work: Work, unread: Launched | None) -> Sequence[int] | FedTokens:
    """A decode step's input tokens: from the device for rows of the `unread` step (their picks not read yet), the
    host's last token for the others."""
    host = [c[0] for c in work.chunks]
    if unread is None:
        return host
    where = {r: i for i, r in enumerate(unread.picking)}
    return FedTokens(unread.picks, [where.get(r) for r in work.rows], host)


@dataclass(frozen=True)
class Sampling:
    """A generate() call's sampling arguments (see `PagedGenerator.generate`)."""

    do_sample: bool
    temperature: float
    top_k: int | None
    return_logits: bool


def choose(logits: torch.Tensor, rngs: list[torch.Generator | None], do_sample: bool, temperature: float,
           top_k: int | None) -> list[int]:
    """Next token per row of (k, V) float32 logits: argmax, or a sample from each row's own generator."""
    if not do_sample:
        return logits.argmax(dim=-1).tolist()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=rng) for i, rng in enumerate(rngs)]
    return torch.cat(picks).tolist()
