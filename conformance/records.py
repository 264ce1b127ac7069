"""Figures the checks record while they run (traces, steps, worst error, memory), read by the report."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from conformance import budget
from conformance.runner import ReplayStats

RECORDS: dict[str, ReplayStats] = defaultdict(ReplayStats)
TRACES: dict[str, int] = defaultdict(int)
#: Called after each recorded trace (`python -m conformance` writes its checkpoint report from here).
LISTENERS: list[Callable[[], None]] = []


def record(check: str, stats: ReplayStats) -> None:
    """A trace of `check` passed: add its figures; under a time budget the check may end here (`budget.after_trace`)."""
    RECORDS[check].merge(stats)
    TRACES[check] += 1
    for listener in LISTENERS:
        listener()
    budget.after_trace()


def reset() -> None:
    RECORDS.clear()
    TRACES.clear()
