"""Exceptions raised by paged backends (and the oracle), one class per kind of bad request.

Every error is raised before any state changes: after catching one, the cache, the allocator and every
sequence are exactly as they were.
"""

from __future__ import annotations


class PagedError(Exception):
    """Base class of every error a paged backend raises for a request it cannot serve."""


class OutOfPagesError(PagedError, MemoryError):
    """The pool has fewer free pages than the request needs (nothing was allocated)."""

    def __init__(self, needed: int, free: int, what: str = "request") -> None:
        self.needed, self.free = needed, free
        super().__init__(f"{what} needs {needed} free page(s) but only {free} are free; nothing was allocated")


class UnknownSequenceError(PagedError, KeyError):
    """A sequence id that is not live in this cache."""

    def __init__(self, seq_id: object) -> None:
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id!r} is not live in this cache (never admitted, or already finished)")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateSequenceError(PagedError, ValueError):
    """A sequence id that is already live (admit or fork target), or repeated within one step."""


class InvalidRequestError(PagedError, ValueError):
    """A request whose shapes, dtypes, devices or lengths do not fit the cache."""


class SequenceTooLongError(InvalidRequestError):
    """An append that would take a sequence past the configured maximum length."""


class UnsupportedConfigError(PagedError, ValueError):
    """A cache configuration the attention kernel cannot take (page size, head dim, GQA ratio...)."""


class PlanError(PagedError, RuntimeError):
    """`run` called without a current plan, with a layer out of range, or twice for the same layer."""
