"""pytest plugin (entry point `pytest11`): backend selection, device, Hypothesis profile, GPU marker.

Options:
    --backend NAME|module:factory   backend under test (default $PAGED_CONFORMANCE_BACKEND or "paged")
    --device cpu|cuda               where caches live (default $PAGED_DEVICE or cpu)
    --profile ci|dev|gpu|thorough|soak   Hypothesis profile (default $HYPOTHESIS_PROFILE, ci under CI, else dev)
    --time-budget S                 wall-clock budget of the checks: each gets an equal share of the time left when
                                    it starts and starts no new trace once it is spent (`conformance.budget`)
    --configs I,J,...               draw trace configurations only from these indices of the fixed list
                                    (`conformance.traces.CPU_CONFIGS` on the CPU, GPU_CONFIGS on CUDA)
Tests marked `gpu` are skipped without a CUDA GPU, unless PAGED_REQUIRE_GPU=1 (tox -e gpu), which fails them.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import Phase, settings

from conformance import budget, traces
from conformance.contract import KnownDefect
from conformance.report import SELF_TEST_NOTE
from conformance.profiles import check_profile, default_profile, register_profiles
from conformance.selection import BackendNotFound, resolve_backend


_DEFECT = pytest.StashKey[KnownDefect]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("paged-conformance")
    group.addoption("--backend", default=None, help="backend under test: NAME or module:factory")
    group.addoption("--device", default=None, choices=("cpu", "cuda"), help="device for caches (default cpu)")
    group.addoption("--profile", default=None, help="Hypothesis profile: ci, dev, gpu, thorough, soak")
    group.addoption("--time-budget", type=float, default=None, metavar="S",
                    help="wall-clock seconds for the checks; a check whose share is spent starts no new trace")
    group.addoption("--no-shrink", action="store_true",
                    help="stop at the first failing trace without shrinking it (for pass/fail-only runs)")
    group.addoption("--configs", default=None, metavar="I,J",
                    help="draw trace configurations only from these indices of the fixed list (CPU_CONFIGS on the "
                         "CPU, GPU_CONFIGS on CUDA)")


def gpu_required() -> bool:
    return os.environ.get("PAGED_REQUIRE_GPU", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "check(name, needs=()): a conformance check and the capabilities it needs")
    register_profiles()
    profile = config.getoption("--profile") or default_profile()
    try:
        check_profile(profile)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    settings.load_profile(profile)
    if config.getoption("--no-shrink"):
        settings.register_profile(f"{profile}-noshrink", parent=settings.get_profile(profile),
                                  phases=[Phase.explicit, Phase.reuse, Phase.generate])
        settings.load_profile(f"{profile}-noshrink")
    device = config.getoption("--device") or os.environ.get("PAGED_DEVICE", "cpu")
    if (device == "cuda" or gpu_required()) and not torch.cuda.is_available():
        raise pytest.UsageError("a CUDA GPU was required (--device cuda or PAGED_REQUIRE_GPU=1) but none is visible")
    config._paged_device = device
    _factory(config)  # an unknown backend is a usage error before anything is collected
    seconds = config.getoption("--time-budget")
    if seconds is not None and not seconds > 0:
        raise pytest.UsageError(f"--time-budget must be a positive number of seconds, got {seconds}")
    budget.start(seconds)
    traces.only_configs(_config_indices(config.getoption("--configs"), device))


def _config_indices(option: str | None, device: str) -> tuple[int, ...] | None:
    """--configs I,J as indices checked against the device's fixed configuration list (a usage error if not)."""
    if option is None:
        return None
    fixed = traces.GPU_CONFIGS if device == "cuda" else traces.CPU_CONFIGS
    try:
        indices = tuple(int(i) for i in option.split(","))
    except ValueError:
        indices = ()
    if not indices or any(not 0 <= i < len(fixed) for i in indices):
        raise pytest.UsageError(f"--configs takes indices in 0..{len(fixed) - 1} separated by commas, got {option!r}")
    return indices


def pytest_unconfigure(config: pytest.Config) -> None:
    traces.only_configs(None)  # a session run in-process (pytest.main) must not narrow the caller's draws


def pytest_collection_finish(session: pytest.Session) -> None:
    """The checks that will run (after -k and deselection) share the time budget."""
    budget.select([name for name in map(_runnable_check, session.items) if name])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _runnable_check(item: pytest.Item) -> str | None:
    """The item's check name if it is a check this backend and device will run, else None."""
    marker = item.get_closest_marker("check")
    if marker is None:
        return None
    factory = _factory(item.config)
    if any(not factory.has(c) for c in marker.kwargs.get("needs", ())):
        return None
    return marker.args[0] if item.config._paged_device in factory.devices else None


def _self_test(config: pytest.Config) -> bool:
    return getattr(config, "_paged_factory", None) is not None and config._paged_factory.name == "oracle"


def pytest_report_header(config: pytest.Config) -> list[str]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = [f"paged: backend={_factory(config).name} device={config._paged_device} "
             f"profile={settings._current_profile} torch={torch.__version__} gpu={gpu}"]
    return lines + ([SELF_TEST_NOTE] if _self_test(config) else [])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Repeat, under the results, that a run against the oracle is a harness self-test."""
    if _self_test(config):
        terminalreporter.write_line(SELF_TEST_NOTE, yellow=True, bold=True)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device the caches under test live on (--device)."""
    return torch.device(pytestconfig._paged_device)


def _factory(config: pytest.Config):
    if not hasattr(config, "_paged_factory"):
        try:
            config._paged_factory = resolve_backend(config.getoption("--backend"))
        except BackendNotFound as exc:
            raise pytest.UsageError(str(exc)) from exc
    return config._paged_factory


@pytest.fixture(scope="session")
def backend_factory(pytestconfig: pytest.Config):
    """The BackendFactory selected with --backend / $PAGED_CONFORMANCE_BACKEND."""
    return _factory(pytestconfig)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Conformance checks (marked `check`): skip what the backend lacks a capability or device for, and mark
    the backend's known defects as expected failures. Done here, not in a fixture, so Hypothesis tests use
    only session-scoped fixtures."""
    marker = item.get_closest_marker("check")
    if marker is None:
        return
    factory = _factory(item.config)
    missing = [c for c in marker.kwargs.get("needs", ()) if not factory.has(c)]
    if missing:
        pytest.skip(f"backend {factory.name} lacks {', '.join(missing)}")
    if item.config._paged_device not in factory.devices:
        pytest.skip(f"backend {factory.name} does not run on {item.config._paged_device}")
    name = marker.args[0]
    if name in factory.expected_failures:
        defect = KnownDefect.of(factory.expected_failures[name])
        # strict: a check that passes is reported as a failure (the defect is gone: update expected_failures);
        # raises=AssertionError: only a conformance failure (ConformanceError) counts, never a crash.
        item.add_marker(pytest.mark.xfail(reason=defect.reason, strict=True, raises=AssertionError))
        item.stash[_DEFECT] = defect
    budget.begin_check(name)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    marker = item.get_closest_marker("check")
    if marker is not None:
        budget.end_check(marker.args[0])


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """An expected failure whose message does not match its KnownDefect.match is a real failure."""
    outcome = yield
    report = outcome.get_result()
    defect = item.stash.get(_DEFECT, None)
    if defect is None or call.when != "call" or not hasattr(report, "wasxfail") or call.excinfo is None:
        return
    message = str(call.excinfo.value)
    if defect.match and not re.search(defect.match, message):
        del report.wasxfail
        report.outcome = "failed"
        report.longrepr = (f"expected failure ({defect.reason}) did not match {defect.match!r}; the check failed "
                           f"differently:\n{message}")
