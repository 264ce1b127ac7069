"""Figures the checks record while they run (traces, steps, worst error, memory), read by the report."""

from __future__ import annotations

from collections import defaultdict

from conformance.runner import ReplayStats

RECORDS: dict[str, ReplayStats] = defaultdict(ReplayStats)
TRACES: dict[str, int] = defaultdict(int)


def record(check: str, stats: ReplayStats) -> None:
    RECORDS[check].merge(stats)
    TRACES[check] += 1


def reset() -> None:
    RECORDS.clear()
    TRACES.clear()
