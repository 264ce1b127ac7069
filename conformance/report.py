"""The conformance report: per check outcome and figures, the device and versions; printed and as JSON."""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    def build(self, backend: str, device: str, profile: str) -> dict:
        checks = []
        for name, result in self.results.items():
            key = name.split("[")[0]
            stats = RECORDS.get(key)
            if stats is not None:
                result.figures = {
                    "traces": TRACES[key], "steps": stats.steps, "tokens": stats.tokens,
                    "refused_steps": stats.refused_steps, "comparisons": stats.comparisons,
                    "worst_error": stats.worst_error, "worst_error_over_bound": stats.worst_ratio,
                    "peak_pages": stats.peak_pages, "max_waste_fraction": stats.max_waste_fraction,
                }
            checks.append({"check": name, "outcome": result.outcome, "detail": result.detail,
                           **result.figures})
        total_steps = sum(c.get("steps", 0) for c in checks)
        return {"backend": backend, "device": device, "profile": profile, "total_steps": total_steps,
                "self_test": backend == "oracle",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment": environment(), "checks": checks,
                "passed": all(c["outcome"] in ("passed", "skipped", "xfailed") for c in checks) and bool(checks)}


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"conformance report: backend={report['backend']} device={report['device']} profile={report['profile']}",
             f"torch {env['torch']} cuda {env['cuda']} gpu {env['gpu']} triton {env['triton']} "
             f"hypothesis {env['hypothesis']}", ""]
    head = f"{'check':32} {'outcome':8} {'traces':>6} {'steps':>6} {'worst err':>10} {'err/bound':>9} {'peak pg':>7} {'max waste':>9}"
    lines += [head, "-" * len(head)]
    for c in report["checks"]:
        lines.append(f"{c['check'][:32]:32} {c['outcome']:8} {c.get('traces', ''):>6} {c.get('steps', ''):>6} "
                     f"{_fmt(c.get('worst_error')):>10} {_fmt(c.get('worst_error_over_bound')):>9} "
                     f"{c.get('peak_pages', ''):>7} {_pct(c.get('max_waste_fraction')):>9}")
        if c["outcome"] not in ("passed",) and c["detail"]:
            lines.append(f"    {c['detail'].splitlines()[0][:150]}")
    lines += ["", f"trace steps over all checks: {report.get('total_steps', 0)}"]
    if report.get("self_test"):
        lines += [SELF_TEST_NOTE]
    lines += ["", "PASSED" if report["passed"] else "FAILED"]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2e}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
