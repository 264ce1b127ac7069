"""`python -m conformance --jobs N` (conformance.jobs): every check in its own process, one merged report."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from conformance import cli, jobs
from conformance.jobs import check_names, merge_reports
from tests.test_plugin import REPO

SUITE = Path(__file__).resolve().parents[1] / "conformance" / "suite" / "test_conformance.py"


def test_check_names_are_every_test_of_the_suite():
    """Read independently from the suite's source: a check added to the suite is run by --jobs too."""
    tree = ast.parse(SUITE.read_text())
    defined = [n.name.removeprefix("test_") for n in tree.body
               if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert check_names() == defined
    assert len(defined) >= 9 and "outputs_match_oracle" in defined and "isolation_nonfinite" in defined


def _report(checks: list[tuple[str, str, int]], status: str = "complete") -> dict:
    return {"backend": "paged", "device": "cpu", "profile": "ci", "status": status, "environment": {},
            "checks": [{"check": c, "outcome": o, "detail": "", "steps": s} for c, o, s in checks],
            "total_steps": sum(s for _, _, s in checks),
            "passed": status == "complete" and all(o == "passed" for _, o, _ in checks)}


def test_merge_passes_only_when_every_process_completed_and_passed():
    ok = merge_reports({"a": _report([("a", "passed", 10)]), "b": _report([("b", "passed", 5)])}, {"a": 0, "b": 0})
    assert ok["passed"] and ok["total_steps"] == 15 and [c["check"] for c in ok["checks"]] == ["a", "b"]
    failed = merge_reports({"a": _report([("a", "passed", 10)]), "b": _report([("b", "failed", 3)])},
                           {"a": 0, "b": 1})
    assert not failed["passed"] and failed["checks"][1]["outcome"] == "failed"
    running = merge_reports({"a": _report([("a", "passed", 10)]), "b": _report([("b", "passed", 2)], "running")},
                            {"a": 0, "b": -9})
    assert not running["passed"] and running["status"] == "running"


def test_merge_lists_a_check_whose_process_wrote_no_report_as_an_error():
    merged = merge_reports({"a": _report([("a", "passed", 10)]), "b": None}, {"a": 0, "b": 3})
    assert not merged["passed"] and merged["total_steps"] == 10
    assert merged["checks"][1] == {"check": "b", "outcome": "error",
                                   "detail": "its process exited with status 3 and wrote no report"}
    with pytest.raises(RuntimeError, match="no check's process wrote a report"):
        merge_reports({"a": None}, {"a": 3})


def test_jobs_run_each_check_in_its_own_process_and_merge_their_reports(tmp_path, monkeypatch, capsys):
    """End to end on the oracle (a harness self-test: cheap on the CPU), two checks in two processes (every check
    would cost nine interpreter starts on the 2-core CI machine; which checks run is pinned above): one merged JSON
    with each check once, its steps summed, each process's output printed whole."""
    monkeypatch.delenv("PAGED_REQUIRE_GPU", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH")))))
    monkeypatch.setattr(jobs, "check_names", lambda: ["determinism", "fragmentation"])
    out = tmp_path / "report.json"
    code = cli.main(["--backend", "oracle", "--device", "cpu", "--profile", "ci-lite", "--jobs", "2",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["status"] == "complete" and report["backend"] == "oracle"
    assert [c["check"] for c in report["checks"]] == ["determinism", "fragmentation"]
    assert report["total_steps"] == sum(c.get("steps", 0) for c in report["checks"]) > 0   # fragmentation: skipped
    assert printed.count(f"===== {sys.executable} -m conformance") == 2 and printed.rstrip().endswith(
        f"report written to {out}")


@pytest.mark.parametrize(("args", "says"), [
    (("--jobs", "2", "--time-budget", "30"), "--jobs and --time-budget cannot be combined"),
    (("--jobs", "0"), "--jobs must be at least 1, got 0"),
])
def test_jobs_usage_errors(tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.delenv("PAGED_REQUIRE_GPU", raising=False)
    code = cli.main(["--json", str(tmp_path / "report.json"), "--device", "cpu", *args])
    assert code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
