"""The pytest plugin: GPU requirement fails (never skips) without a GPU, backend selection, gpu marker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, entry_points, version

import pytest
import torch

from conformance import cli
from conformance.traces import CPU_CONFIGS

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plugin_installed() -> bool:
    """Whether the plugin comes in through its pytest11 entry point (an install), not only a source tree."""
    return any(ep.value == "conformance.plugin" for ep in entry_points(group="pytest11"))


@pytest.fixture
def run_pytest(pytester, monkeypatch):
    """Run pytest in-process (pytester) on a probe test file `body` with the plugin loaded as an install loads it.

    In-process: a subprocess per run (a fresh interpreter importing torch) cost 4-13 s each on the 2-core CI
    machine; what these tests check (exit codes, messages, outcomes) is the same either way. The `python -m
    conformance` tests below still start real processes.
    """

    def run(body: str, *args: str, env: dict | None = None):
        pytester.makepyfile(test_probe=textwrap.dedent(body))
        pytester.syspathinsert()
        for name in ("PAGED_REQUIRE_GPU", "PAGED_CONFORMANCE_BACKEND"):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        # From a source tree (the GPU scripts put the repo on PYTHONPATH) the plugin is named the way users without
        # an install would name it; test_plugin_is_registered_as_an_entry_point covers the installed route.
        load = () if _plugin_installed() else ("-p", "conformance.plugin")
        return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", *load, *args)

    return run


GPU_TEST = """
import pytest
@pytest.mark.gpu
def test_needs_gpu():
    assert True
def test_backend(backend_factory):
    print("BACKEND", backend_factory.name, sorted(backend_factory.capabilities))
"""

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a GPU")


@cpu_only
def test_required_gpu_fails_instead_of_skipping(run_pytest):
    done = run_pytest(GPU_TEST, env={"PAGED_REQUIRE_GPU": "1"})
    assert done.ret == pytest.ExitCode.USAGE_ERROR, done.stdout.str() + done.stderr.str()
    assert "CUDA GPU was required" in done.stderr.str()


@cpu_only
def test_device_cuda_without_gpu_fails(run_pytest):
    done = run_pytest(GPU_TEST, "--device", "cuda")
    assert done.ret == pytest.ExitCode.USAGE_ERROR, done.stdout.str() + done.stderr.str()


@cpu_only
def test_gpu_marked_tests_skip_cleanly_on_cpu(run_pytest):
    done = run_pytest(GPU_TEST, "-rs")
    out = done.stdout.str()
    assert done.ret == 0, out + done.stderr.str()
    assert "1 passed, 1 skipped" in out and "needs a CUDA GPU" in out


def test_unknown_backend_is_a_usage_error(run_pytest):
    done = run_pytest(GPU_TEST, "--backend", "no-such-backend", "-k", "backend")
    assert done.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown backend 'no-such-backend'" in done.stderr.str()


CONFIG_TEST = """
from hypothesis import given, settings
from conformance import traces
@settings(max_examples=25, database=None, derandomize=True)
@given(traces.configs())
def test_draws_only_the_second(config):
    assert config == traces.CPU_CONFIGS[1]
"""


@cpu_only
def test_configs_option_narrows_the_drawn_configurations_for_one_session(run_pytest):
    """--configs 1 draws only CPU_CONFIGS[1]; without it the same test sees the others; the narrowing ends with the
    session (test_teeth runs sessions in-process: a leftover would narrow the caller's draws)."""
    from conformance import traces

    assert run_pytest(CONFIG_TEST, "--configs", "1").ret == pytest.ExitCode.OK
    assert traces._only is None
    assert run_pytest(CONFIG_TEST).ret == pytest.ExitCode.TESTS_FAILED


@cpu_only
@pytest.mark.parametrize("value", ["9", "a", "0,", "-1"])
def test_configs_option_refuses_what_is_not_an_index(run_pytest, value):
    done = run_pytest(GPU_TEST, "--configs", value)
    assert done.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--configs takes indices in 0..{len(CPU_CONFIGS) - 1}" in done.stderr.str()


def test_backend_by_module_path_and_env_var(run_pytest, capfd):
    # -s: the probe prints through the in-process run's real stdout, which capfd reads
    run_pytest(GPU_TEST, "--backend", "oracle.cache:ContiguousOracle", "-k", "backend", "-s")
    by_option = capfd.readouterr().out
    assert "BACKEND oracle.cache:ContiguousOracle" in by_option, by_option
    run_pytest(GPU_TEST, "-k", "backend", "-s", env={"PAGED_CONFORMANCE_BACKEND": "conformance.adapters:oracle_backend"})
    by_env = capfd.readouterr().out
    assert "BACKEND oracle ['chunked_prefill', 'fork', 'mixed_steps', 'mods']" in by_env, by_env


def test_plugin_is_registered_as_an_entry_point():
    """`pip install` of the project makes `pytest --backend ...` work with no `-p` flag."""
    try:
        version("paged")
    except PackageNotFoundError:
        pytest.skip("the project is used from a source tree here, not installed")
    assert _plugin_installed(), "pyproject.toml must register conformance.plugin under the pytest11 entry point"


# ------------------------------------------------------------------ python -m conformance: errors and a bare checkout
def run_cli(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m conformance ARGS` from `tmp_path` with the repo on PYTHONPATH, its report in tmp_path."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PAGED_REQUIRE_GPU", "PAGED_CONFORMANCE_BACKEND")}
    full_env.update(PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH")))), **(env or {}))
    return subprocess.run([sys.executable, "-m", "conformance", "--json", str(tmp_path / "report.json"), *args],
                          capture_output=True, text=True, env=full_env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize(("args", "says"), [
    (("--backend", "no-such-backend"), "unknown backend 'no-such-backend'; available: oracle, paged"),
    (("--profile", "nope"), "unknown Hypothesis profile 'nope'; the suite's profiles are ci, dev"),
    (("--backend", "sys:exit"), "backend factory 'sys:exit' raised SystemExit"),
    (("--backend", "os:sep"), "backend 'os:sep' is a str"),
    (("--backend", "no_such_module:factory"), "cannot load backend 'no_such_module:factory': ModuleNotFoundError"),
], ids=["unknown-backend", "unknown-profile", "factory-exits", "not-callable", "not-importable"])
def test_cli_usage_errors_are_one_paragraph_and_nonzero(tmp_path, monkeypatch, capsys, args, says):
    """Issue 17: each used to end in a traceback, an INTERNALERROR with an empty report, or exit 0.

    In-process (`conformance.cli.main`, what `python -m conformance` calls): an escaping exception would fail the
    test as a traceback would have shown. The two tests below run `python -m conformance` as a process."""
    for name in ("PAGED_REQUIRE_GPU", "PAGED_CONFORMANCE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main(["--json", str(tmp_path / "report.json"), *args])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert says in err and "Traceback" not in err + out, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "report.json").exists(), "a run that did not happen must not write a report"


def test_cli_works_without_the_plugin_entry_point(tmp_path):
    """A source checkout without `pip install` (no pytest11 entry point; simulated by disabling plugin autoload)
    used to fail every run with 'unrecognized arguments: --backend'; the CLI now loads the plugin itself."""
    done = run_cli(tmp_path, "--backend", "oracle", "--profile", "ci", "--", "-k", "determinism",
                   env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "determinism" in done.stdout and "PASSED" in done.stdout
    assert (tmp_path / "report.json").is_file()


def test_cli_pytest_failure_to_run_is_an_error_without_report(tmp_path):
    done = run_cli(tmp_path, "--backend", "oracle", "--", "--no-such-pytest-option")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "pytest could not run the suite" in done.stderr and not (tmp_path / "report.json").exists()


# ------------------------------------------------------------------ known defects: strict, and only the defect itself
KNOWN_DEFECT_TESTS = """
import pytest
from conformance.contract import BackendFactory, KnownDefect
from oracle import ContiguousOracle

def factory():
    return BackendFactory(name="probe", make=lambda spec, **_: ContiguousOracle(spec),
                          expected_failures={name: KnownDefect("known bug", match="stale page read")
                                             for name in ("matching", "different", "fixed", "crash")})

@pytest.mark.check("matching")
def test_matching():
    raise AssertionError("op 3: stale page read in row 1")

@pytest.mark.check("different")
def test_different():
    raise AssertionError("op 3: memory report wrong")

@pytest.mark.check("fixed")
def test_fixed():
    pass

@pytest.mark.check("crash")
def test_crash():
    raise TypeError("stale page read, but a crash, not a conformance failure")
"""


def test_known_defects_are_strict_and_must_match(run_pytest):
    """Issue 17: expected failures were xfail(strict=False): a fixed defect or a different failure went unnoticed."""
    done = run_pytest(KNOWN_DEFECT_TESTS, "--backend", "test_probe:factory", "-rxXf")
    out = done.stdout.str()
    assert "1 failed" not in out and "3 failed, 1 xfailed" in out, out + done.stderr.str()
    assert "XFAIL test_probe.py::test_matching - known bug" in out
    for name in ("test_different", "test_fixed", "test_crash"):
        assert f"FAILED test_probe.py::{name}" in out, out
    assert "did not match 'stale page read'" in out and "[XPASS(strict)]" in out
