"""The conformance report: per check outcome and figures, the device and versions; printed and as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conformance import budget
from conformance.records import RECORDS, TRACES


#: Said wherever the suite runs against the oracle itself.
SELF_TEST_NOTE = ("HARNESS SELF-TEST, not conformance evidence: backend 'oracle' is the oracle checked against itself "
                  "(errors are exactly 0 by construction); it shows the harness runs, not that any backend conforms.")


def environment() -> dict:
    """Device and versions the run used, so results from different machines are never confused."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("triton", "hypothesis", "fms", "flashinfer"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken optional packages are simply not reported
            env[name] = None
    return env


@dataclass
class CheckResult:
    name: str
    outcome: str = "not run"    # passed, failed, skipped, xfailed, xpassed
    detail: str = ""
    figures: dict = field(default_factory=dict)


class ReportPlugin:
    """pytest plugin collecting each check's outcome; figures come from conformance.records."""

    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}
        self._environment: dict | None = None

    def pytest_runtest_logreport(self, report) -> None:
        name = report.nodeid.split("::", 1)[-1].removeprefix("test_")
        result = self.results.setdefault(name, CheckResult(name))
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            if hasattr(report, "wasxfail"):
                result.outcome = "xfailed" if report.skipped else "xpassed"
                result.detail = report.wasxfail
            else:
                result.outcome = report.outcome
                if report.failed:
                    result.detail = str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                                        else report.longrepr)[:2000]
                elif report.skipped:
                    result.detail = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""

    def build(self, backend: str, device: str, profile: str, status: str = "complete") -> dict:
        """The report. `status`: "complete" (pytest finished), "running" (a checkpoint written while the checks run)
        or "interrupted" (SIGINT/SIGTERM): then it holds what completed, a check under way is listed with the traces
        it finished (each passed every comparison), and the run does not count as passed."""
        stopped = budget.stopped()
        under_way = CheckResult("", "interrupted" if status == "interrupted" else "running",
                                "under way when the report was written: its figures are those of the traces it finished")
        results = dict(self.results)
        for key in RECORDS:   # a check under way has figures but no outcome yet
            if results.get(key, CheckResult(key)).outcome == "not run":
                results[key] = CheckResult(key, under_way.outcome, under_way.detail)
        checks = [self._check(result, stopped) for result in results.values()]
        total_steps = sum(c.get("steps", 0) for c in checks)
        return {"backend": backend, "device": device, "profile": profile, "status": status,
                "total_steps": total_steps, "self_test": backend == "oracle", "time_budget_s": budget.seconds(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment": self.environment(), "checks": checks,
                "passed": status == "complete" and bool(checks)
                and all(c["outcome"] in ("passed", "skipped", "xfailed") for c in checks)}

    def environment(self) -> dict:
        if self._environment is None:   # imports optional packages: once per run, not per checkpoint
            self._environment = environment()
        return self._environment

    @staticmethod
    def _check(result: CheckResult, stopped: dict) -> dict:
        """One check's entry: outcome, detail, figures; a check the time budget stopped passed over the traces it ran."""
        key = result.name.split("[")[0]
        stats = RECORDS.get(key)
        if stats is not None:
            result.figures = {
                "traces": TRACES[key], "steps": stats.steps, "tokens": stats.tokens,
                "refused_steps": stats.refused_steps, "comparisons": stats.comparisons,
                "worst_error": stats.worst_error, "worst_error_over_bound": stats.worst_ratio,
                "peak_pages": stats.peak_pages, "max_waste_fraction": stats.max_waste_fraction,
            }
        entry = {"check": result.name, "outcome": result.outcome, "detail": result.detail, **result.figures}
        stop = stopped.get(key)
        if stop is not None and result.outcome == "skipped":
            entry.update(outcome="passed" if stop["traces"] else "skipped", detail=stop["reason"],
                         stopped_by_budget=True)
        return entry


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"conformance report: backend={report['backend']} device={report['device']} profile={report['profile']}"
             + (f" time budget {report['time_budget_s']:.0f} s" if report.get("time_budget_s") else ""),
             f"torch {env['torch']} cuda {env['cuda']} gpu {env['gpu']} triton {env['triton']} "
             f"hypothesis {env['hypothesis']}", ""]
    head = f"{'check':32} {'outcome':8} {'traces':>6} {'steps':>6} {'worst err':>10} {'err/bound':>9} {'peak pg':>7} {'max waste':>9}"
    lines += [head, "-" * len(head)]
    for c in report["checks"]:
        lines.append(f"{c['check'][:32]:32} {c['outcome']:8} {c.get('traces', ''):>6} {c.get('steps', ''):>6} "
                     f"{_fmt(c.get('worst_error')):>10} {_fmt(c.get('worst_error_over_bound')):>9} "
                     f"{c.get('peak_pages', ''):>7} {_pct(c.get('max_waste_fraction')):>9}")
        if (c["outcome"] != "passed" or c.get("stopped_by_budget")) and c["detail"]:
            lines.append(f"    {c['detail'].splitlines()[0][:150]}")
    lines += ["", f"trace steps over all checks: {report.get('total_steps', 0)}"]
    if report.get("self_test"):
        lines += [SELF_TEST_NOTE]
    if report.get("status", "complete") != "complete":
        lines += [f"STATUS {report['status'].upper()}: the run did not finish; the figures are those of the traces "
                  "that completed (each passed every comparison), and the run does not count as passed."]
    lines += ["", "PASSED" if report["passed"] else "FAILED"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2e}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def write_json(report: dict, path: str | Path) -> None:
    """Write the report atomically (a temporary file renamed over `path`): a run killed mid-write leaves the
    previous checkpoint, never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
