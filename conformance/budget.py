"""A wall-clock budget for one run of the checks (`python -m conformance --time-budget S`, pytest `--time-budget S`).

Each check gets an equal share of the time left when it starts (time left / checks not yet finished, so what an
early finisher leaves goes to the later ones). Once its share is spent, the check starts no new trace: the trace
under way finishes, then the check ends through `pytest.skip` with a reason starting `REASON` (Hypothesis ends a run
at once on a skip). The report counts such a check as passed over the traces that ran, and says it was stopped.

A check calls `before_trace()` right after drawing its trace, not before: Hypothesis requires a test case to draw
the same choices as any earlier case with the same prefix (else FlakyStrategyDefinition), and a case that stops
after its trace's fresh choices has no earlier twin, while one that stops before drawing anything has.

A failure is never hidden by a stop: once anything fails in a check (a `ConformanceError`, or any exception out of a
trace), the check no longer stops for the budget, so Hypothesis replays and reports the failing trace as the failure
it is. Without a budget (`start` not called) nothing here does anything.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
from hypothesis.errors import UnsatisfiedAssumption

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
    started: int = 0                                  # traces the running check has started
    stopped: dict[str, dict] = field(default_factory=dict)  # check -> {"reason", "traces_started"}


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


def begin_check(name: str) -> None:
    """A check starts: its share is the time left over the checks not yet finished (this one included)."""
    s = _STATE
    if not active():
        return
    s.pending.add(name)
    now = time.monotonic()
    s.check, s.failed, s.started = name, False, 0
    s.share = max(0.0, s.deadline - now) / len(s.pending)
    s.check_deadline = now + s.share


def end_check(name: str) -> None:
    _STATE.pending.discard(name)
    if _STATE.check == name:
        _STATE.check = None


def note_failure() -> None:
    """Something failed in the running check: it must not stop for the budget from now on."""
    _STATE.failed = True


def seconds() -> float | None:
    return _STATE.seconds


def stopped() -> dict[str, dict]:
    """Checks stopped by the budget so far: {"reason": why, "traces_started": traces it ran before stopping}."""
    return dict(_STATE.stopped)


def before_trace() -> None:
    """Called once a check has drawn a trace, before running it: ends the check (pytest.skip) once its share is
    spent, unless something in it failed."""
    s = _STATE
    if not active() or s.check is None or s.failed or time.monotonic() < s.check_deadline:
        s.started += 1
        return
    why = (f"{REASON}: this check's share ({s.share:.0f} s of {s.seconds:.0f} s) was spent after {s.started} "
           f"trace(s); no further trace was started")
    s.stopped[s.check] = {"reason": why, "traces_started": s.started}
    pytest.skip(why)


def budgeted(body: Callable) -> Callable:
    """Decorator for a check's per-trace body (under @given): any failure out of it is noted (`note_failure`)."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except UnsatisfiedAssumption:
            raise
        except Exception:
            note_failure()
            raise

    return run
