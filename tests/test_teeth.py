"""Proof that the conformance suite has teeth: it FAILS on every deliberately broken backend (ci profile).

Each broken backend runs the whole suite in-process (compiled kernels are shared with the rest of the
session) until the first failing check (-x, no shrinking: only pass/fail matters here). The test also
records WHICH check caught it, and asserts the failure is a conformance failure, not a crash of the harness.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from tests.broken_backends import BROKEN

#: An uninstalled checkout (the offline GPU machine runs the tree as is) loads the plugin by name.
_PLUGIN = [] if any(e.name == "paged_conformance" for e in entry_points(group="pytest11")) else ["-p", "conformance.plugin"]


class _Outcomes:
    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []
        self.passed: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" and report.failed:
            self.failed.append((report.nodeid.split("::")[-1], str(report.longrepr)[-3000:]))
        elif report.when == "call" and report.passed:
            self.passed.append(report.nodeid.split("::")[-1])


#: Harness problems (not the backend's fault) that must never be what "catches" a broken backend.
HARNESS_ERRORS = ("ImportError", "AttributeError: module", "fixture", "NameError", "SyntaxError")


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_suite_fails_on_broken_backend(name, device, capsys):
    outcomes = _Outcomes()
    code = pytest.main([*_PLUGIN, "--pyargs", "conformance.suite", "--backend", f"tests.broken_backends:{name}",
                        "--device", device.type, "--profile", "ci", "--no-shrink", "-x", "-q",
                        "-p", "no:cacheprovider"], plugins=[outcomes])
    capsys.readouterr()
    assert code == pytest.ExitCode.TESTS_FAILED, f"suite did not fail on broken backend {name!r} (exit {code})"
    check, detail = outcomes.failed[0]
    assert not any(marker in detail for marker in HARNESS_ERRORS), f"{name}: failed for a harness reason:\n{detail}"
    print(f"{name}: caught by {check}")
