"""The oracle's exceptions, one per kind of bad request the backend contract names.

The oracle shares no code with the backends it judges, so it has its own classes; each is named like the
contract's kind (`paged.errors` has the same names), and `conformance.adapters` maps one onto the other by name
when the oracle itself is run as a backend of the contract.
"""

from __future__ import annotations


class OracleError(Exception):
    """Base class of every error the oracle raises for a request it cannot serve (nothing has changed)."""


class UnknownSequenceError(OracleError, KeyError):
    """A sequence id that is not live (never admitted, or already finished); `seq_id` names it."""

    def __init__(self, seq_id: object) -> None:
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id!r} is not live in this cache (never admitted, or already finished)")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateSequenceError(OracleError, ValueError):
    """A sequence id already live, or repeated within one step."""


class InvalidRequestError(OracleError, ValueError):
    """Shapes, dtypes, devices, lengths or arguments that do not fit the cache."""


class SequenceTooLongError(InvalidRequestError):
    """An append past max_seq_len."""


class PlanError(OracleError, RuntimeError):
    """run() without a current plan, with a bad layer, or twice for one layer."""


KINDS = (UnknownSequenceError, DuplicateSequenceError, InvalidRequestError, SequenceTooLongError, PlanError)
