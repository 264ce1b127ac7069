"""The cross-rank control plane: every rank all-gathers ``[failed?, phase, vote no., digest]`` over a gloo group
and raises the same error when any rank failed or the digests differ (see the package docstring)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from paged.fms.distributed.errors import DistributedOutOfPagesError, DistributedStepError, RankDivergenceError, \
    twin_of
from paged.fms.distributed.group import DistContext

__all__ = ["Control", "digest_of", "PHASES"]


def digest_of(*parts: object) -> int:
    """A signed 64-bit hash of the parts' reprs (rank-invariant, unlike Python's salted hash())."""
    raw = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


PHASES = ("start", "plan", "commit", "generate", "end", "spec")


class Control:
    """The votes of one cache over the control group. Every rank must call vote() the same number of times."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.votes = 0

    def vote(self, phase: str, error: BaseException | None = None, digest: int = 0,
             describe: Callable[[], str] | None = None) -> None:
        """All ranks exchange a status; raise the same error on every rank if any failed or the digests differ.

        `describe` gives this rank's view (exchanged only when digests differ, for the message).
        """
        ctx = self.ctx
        self.votes += 1
        mine = torch.tensor([int(error is not None), PHASES.index(phase), self.votes, digest], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(rows, mine, group=ctx.control)
        table = torch.stack(rows)
        failed = [r for r in range(ctx.world_size) if table[r, 0]]
        if failed:
            payload = None
            if error is not None:
                payload = (type(error).__name__, str(error), getattr(error, "needed", None),
                           getattr(error, "free", None))
            infos: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(infos, payload, group=ctx.control)
            raise _cluster_error(table, infos, ctx.world_size) from error
        if len({tuple(row) for row in table[:, 1:].tolist()}) > 1:      # phase, vote number, digest
            views: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(views, describe() if describe else "", group=ctx.control)
            lines = "; ".join(f"rank {r}: {PHASES[int(table[r, 1])]} vote {int(table[r, 2])}, digest "
                              f"{int(table[r, 3]):#x}{' (' + views[r] + ')' if views[r] else ''}"
                              for r in range(ctx.world_size))
            at = PHASES[int(table[0, 1])]          # rank 0's phase: every rank builds the same message
            changed = {"plan": "; no rank changed its cache", "start": "; nothing ran",
                       "spec": "; no cache was built"}.get(at, "")
            raise RankDivergenceError(
                f"ranks disagree at the {at} vote: {lines}. Every rank must get the same requests (prompts, "
                f"arguments, sequence ids), make the same calls and have the same pool{changed}",
                at, {}, ctx.world_size)


def _cluster_error(table: torch.Tensor, infos: list, world_size: int) -> DistributedStepError:
    """The one error every rank raises: built only from what every rank received, so it is identical."""
    failures = {r: (i[0], i[1]) for r, i in enumerate(infos) if i is not None}
    first = min(failures)
    kind, phase = infos[first][0], PHASES[int(table[first, 1])]
    where = {"plan": "before any page was taken: no rank changed its cache",
             "commit": "after the step was built on the other ranks: finish the step's sequences",
             "start": "before generation started", "generate": "during generation",
             "end": "at the end of generation", "spec": "while building the cache"}[phase]
    same: dict[tuple[str, str], list[int]] = {}
    for r, tm in sorted(failures.items()):
        same.setdefault(tm, []).append(r)
    detail = "; ".join(f"rank {', '.join(map(str, rs))}: {t}: {m}" for (t, m), rs in same.items())
    ranks = ", ".join(map(str, sorted(failures)))
    message = (f"{kind} on rank {ranks} (world size {world_size}; {phase} vote {int(table[first, 2])}, {where}); "
               f"every rank raises this error. {detail}")
    cls = twin_of(kind)
    err = cls(message, phase, failures, world_size)
    if cls is DistributedOutOfPagesError:
        err.needed, err.free = infos[first][2], infos[first][3]
    return err

