"""A wall-clock budget for one run of the checks (`python -m conformance --time-budget S`, pytest `--time-budget S`).

Each check gets an equal share of the time left when it starts (time left / checks not yet finished, so what an
early finisher leaves goes to the later ones). A check that finds the whole budget spent when it starts is skipped
before running anything. Otherwise, at the end of each trace (`after_trace`: from `records.record`, and from a
stateful machine's teardown), a check whose share is spent ends through `pytest.skip` with a reason starting
`REASON`: so no trace starts once the share is spent, and the trace under way when it ran out completes and counts.
The report counts such a check as passed over the traces that ran, and says it was stopped.

Why at the end of a trace: a skip ends Hypothesis's run at once, but Hypothesis requires each test case to draw the
same choices as any earlier case with the same prefix (else FlakyStrategyDefinition). A case that stops after all
its draws is an ordinary complete case; one that stops earlier (before its trace is drawn, or before a check's later
draws, or in a stateful machine's first rule) can have an earlier twin that drew further. Nothing here is in the
checks' own source either: Hypothesis derandomizes (the ci profile) from a digest of each test function's source.

A failure is never hidden by a stop: once anything fails in a check (a `ConformanceError`, or any exception out of
a replay, `note_failure_of`), the check no longer stops for the budget, so Hypothesis replays and reports the
failing trace as the failure it is. Without a budget (`start(None)`) nothing here does anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from hypothesis.errors import StopTest, UnsatisfiedAssumption

#: Start of the skip reason of a check stopped by the budget (the report recognises it).
REASON = "time budget"


@dataclass
class _Budget:
    """The run's budget and the running check's share of it."""

    seconds: float | None = None
    deadline: float = 0.0
    pending: set[str] = field(default_factory=set)   # checks selected and not yet finished
    check: str | None = None
    check_deadline: float = 0.0
    share: float = 0.0
    failed: bool = False
    traces: int = 0                                  # traces the running check completed
    stopped: dict[str, dict] = field(default_factory=dict)  # check -> {"reason", "traces"}


_STATE = _Budget()


def start(seconds: float | None) -> None:
    """Start the run's budget of `seconds` from now (None: no budget)."""
    global _STATE
    _STATE = _Budget(seconds=seconds, deadline=time.monotonic() + (seconds or 0.0))


def select(checks: list[str]) -> None:
    """The checks that will run: each gets its share of the time left when it starts."""
    _STATE.pending = set(checks)


def active() -> bool:
    return _STATE.seconds is not None


def seconds() -> float | None:
    return _STATE.seconds


def begin_check(name: str) -> None:
    """A check starts: its share is the time left over the checks not yet finished (this one included). With
    nothing left, it is skipped here, before any trace (outside Hypothesis)."""
    s = _STATE
    if not active():
        return
    s.pending.add(name)
    now = time.monotonic()
    s.check, s.failed, s.traces = name, False, 0
    s.share = max(0.0, s.deadline - now) / len(s.pending)
    s.check_deadline = now + s.share
    if s.share <= 0:
        _stop(f"{REASON}: the whole budget ({s.seconds:.0f} s) was spent before this check started; it ran nothing")


def end_check(name: str) -> None:
    _STATE.pending.discard(name)
    if _STATE.check == name:
        _STATE.check = None


def note_failure() -> None:
    """Something failed in the running check: it must not stop for the budget from now on."""
    _STATE.failed = True


def note_failure_of(exc: BaseException) -> None:
    """`note_failure` unless `exc` is control flow (an interruption, a skip, Hypothesis's own StopTest/assume)."""
    if not isinstance(exc, (KeyboardInterrupt, SystemExit, StopTest, UnsatisfiedAssumption, pytest.skip.Exception)):
        note_failure()


def stopped() -> dict[str, dict]:
    """Checks stopped by the budget so far: {"reason": why, "traces": traces it completed}."""
    return dict(_STATE.stopped)


def after_trace() -> None:
    """A trace of the running check completed (passed): end the check (pytest.skip) if its share is spent, unless
    something in it failed."""
    s = _STATE
    if not active() or s.check is None:
        return
    s.traces += 1
    if s.failed or time.monotonic() < s.check_deadline:
        return
    _stop(f"{REASON}: this check's share ({s.share:.0f} s of {s.seconds:.0f} s) was spent after {s.traces} "
          f"trace(s); no further trace was started")


def _stop(why: str) -> None:
    _STATE.stopped[_STATE.check] = {"reason": why, "traces": _STATE.traces}
    pytest.skip(why)
