"""Errors of a tensor-parallel step: raised on every rank alike, each also the single-rank error of its kind."""

from __future__ import annotations

from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError, PlanError,
                          SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)

__all__ = [
    "DistributedStepError", "DistributedOutOfPagesError", "RankDivergenceError", "DistributedSequenceTooLongError",
    "DistributedInvalidRequestError", "DistributedUnknownSequenceError", "DistributedDuplicateSequenceError",
    "DistributedUnsupportedConfigError", "DistributedPlanError", "twin_of",
]


class DistributedStepError(PagedError):
    """Raised on EVERY rank, with the same message, when any rank failed a step (or a generate call).

    Attributes:
        phase: where the vote was: "start", "plan" (before any page was taken), "commit" (after the step
            was built), "generate" (elsewhere in generate) or "end".
        failures: {rank: (exception type name, message)} of the ranks that failed.
        world_size: ranks in the group.
    """

    def __init__(self, message: str, phase: str = "", failures: dict[int, tuple[str, str]] | None = None,
                 world_size: int = 1) -> None:
        self.phase, self.failures, self.world_size = phase, dict(failures or {}), world_size
        Exception.__init__(self, message)

    def __str__(self) -> str:  # KeyError-derived subclasses would repr() the message
        return str(self.args[0]) if self.args else ""


class DistributedOutOfPagesError(DistributedStepError, OutOfPagesError):
    """A rank ran out of pages; raised on every rank. ``needed``/``free`` are the first failing rank's."""

    needed: int | None = None
    free: int | None = None


class RankDivergenceError(DistributedStepError):
    """Ranks disagree on a step (different requests, pool state or tokens): raised on every rank before any change."""


def _subclass(base: type[PagedError]) -> type[DistributedStepError]:
    return type(f"Distributed{base.__name__}", (DistributedStepError, base), {"__module__": __name__})


DistributedSequenceTooLongError = _subclass(SequenceTooLongError)
DistributedInvalidRequestError = _subclass(InvalidRequestError)
DistributedUnknownSequenceError = _subclass(UnknownSequenceError)
DistributedDuplicateSequenceError = _subclass(DuplicateSequenceError)
DistributedUnsupportedConfigError = _subclass(UnsupportedConfigError)
DistributedPlanError = _subclass(PlanError)

# A failure of one of these kinds on the first failing rank raises its Distributed* twin on every rank, so
# `except OutOfPagesError` / `except InvalidRequestError` catch it the same way on every rank.
_TWINS: dict[str, type[DistributedStepError]] = {
    base.__name__: twin for base, twin in (
        (OutOfPagesError, DistributedOutOfPagesError), (SequenceTooLongError, DistributedSequenceTooLongError),
        (InvalidRequestError, DistributedInvalidRequestError), (UnknownSequenceError, DistributedUnknownSequenceError),
        (DuplicateSequenceError, DistributedDuplicateSequenceError),
        (UnsupportedConfigError, DistributedUnsupportedConfigError), (PlanError, DistributedPlanError))
}


def twin_of(kind: str) -> type[DistributedStepError]:
    """The Distributed* class raised on every rank for a failure of type name `kind` (DistributedStepError if none)."""
    return _TWINS.get(kind, DistributedStepError)
