"""`python -m conformance`: run the conformance suite against a backend and print/write the report.

    python -m conformance [--backend NAME|module:factory] [--device cpu|cuda] [--profile ci|dev|gpu|thorough|soak]
                          [--json PATH] [--time-budget S] [--jobs N] [--list] [-- extra pytest args]
Exit status 0 when every applicable check passes (known defects count as expected failures); 1 when a check
fails (or a soak reaches fewer than 10^4 trace steps); 2 for a bad command line (unknown backend or profile, no GPU
for --device cuda), with a one-paragraph error and no report; 3 when pytest itself could not run the suite (no
report either); 4 when the run was interrupted (SIGINT or SIGTERM) after some trace completed: the report is
written with status "interrupted", holds the traces that completed, and does not count as passed.

--time-budget S: the checks share S seconds of wall clock; each gets an equal share of the time left when it
starts and starts no new trace once its share is spent (the trace under way finishes), then the report is written
as usual: a stopped check passed over the traces it ran and says so, and the soak's 10^4-step minimum is judged
on those. Under a budget a failing trace is reported as found, without shrinking (--no-shrink). While the checks
run, the --json report is rewritten (status "running") after each completed trace, at most every
CHECKPOINT_SECONDS, so even a run killed outright (SIGKILL) leaves the figures of what completed.

--jobs N: every check in its own process, N at a time, one merged report (`conformance.jobs`; not with
--time-budget). For a many-core machine: a GPU run is mostly host-side compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from importlib.metadata import entry_points

import pytest

from conformance.profiles import SOAK_MIN_STEPS
from conformance.records import LISTENERS, RECORDS, reset
from conformance.report import ReportPlugin, format_report, write_json
from conformance.selection import BackendNotFound, available_backends, resolve_backend

PLUGIN_MODULE = "conformance.plugin"
#: Least time between two checkpoint reports written while the checks run.
CHECKPOINT_SECONDS = 5.0


class UsageProblem(Exception):
    """A command line the suite cannot run with; the message is the whole explanation."""


def plugin_args() -> list[str]:
    """`-p conformance.plugin` when pytest will not load the plugin through its entry point by itself: a source
    checkout without `pip install`, or PYTEST_DISABLE_PLUGIN_AUTOLOAD set."""
    autoload = os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    installed = any(ep.value == PLUGIN_MODULE for ep in entry_points(group="pytest11"))
    return [] if autoload and installed else ["-p", PLUGIN_MODULE]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="backend under test (default: paged)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--profile", default=None,
                        help="Hypothesis profile: ci, dev, gpu, thorough or soak (default: $HYPOTHESIS_PROFILE, "
                             "else gpu on cuda, ci on cpu)")
    parser.add_argument("--json", default="conformance-report.json", help="where to write the JSON report")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="wall-clock seconds for the checks: each gets an equal share of the time left when it "
                             "starts and starts no new trace once it is spent; the report covers what ran (failing "
                             "traces are not shrunk under a budget)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run each check in its own process, N at a time, and merge their reports")
    parser.add_argument("--list", action="store_true", help="list the backends that can be selected")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser


def _settle(args: argparse.Namespace):
    """(factory, device, profile) for the command line, or UsageProblem saying what is wrong and what to do."""
    import torch

    from conformance.profiles import check_profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageProblem("--device cuda was given but no CUDA GPU is visible to torch "
                           f"(torch {torch.__version__}); run on a GPU machine or use --device cpu.")
    # The quick-start default: the bounded ci profile on a CPU, the gpu profile on a GPU.
    profile = args.profile or os.environ.get("HYPOTHESIS_PROFILE") or ("gpu" if device == "cuda" else "ci")
    if args.time_budget is not None and not args.time_budget > 0:
        raise UsageProblem(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if args.jobs < 1:
        raise UsageProblem(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and args.time_budget is not None:
        raise UsageProblem("--jobs and --time-budget cannot be combined: the budget is shared by the checks of one "
                           "process; run with --jobs 1 (the default) for a budgeted run")
    try:
        check_profile(profile)
        factory = resolve_backend(args.backend)
    except (ValueError, BackendNotFound) as exc:
        raise UsageProblem(str(exc)) from None
    return factory, device, profile


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        print("\n".join(available_backends()))
        return 0
    try:
        factory, device, profile = _settle(args)
    except UsageProblem as exc:
        message = str(exc).rstrip().rstrip(".")
        print(f"python -m conformance: error: {message}. Nothing was run and no report was written.", file=sys.stderr)
        return 2
    if args.jobs > 1:
        return _run_jobs(args, factory.name, device, profile)
    reset()
    plugin = ReportPlugin()
    budget_args = [] if args.time_budget is None else ["--time-budget", str(args.time_budget), "--no-shrink"]
    plugin.environment()   # imports optional packages (seconds): before the checks' time budget starts
    checkpoint = _Checkpoint(plugin, args.json, (factory.name, device, profile))
    LISTENERS.append(checkpoint)
    try:
        with checkpoint.interruptible():
            code = pytest.main([*plugin_args(), "--pyargs", "conformance.suite", "--backend", args.backend or factory.name,
                                "--device", device, "--profile", profile, "-q", "-p", "no:cacheprovider", *budget_args,
                                *args.pytest_args], plugins=[plugin])
    finally:
        LISTENERS.remove(checkpoint)
    interrupted = code == pytest.ExitCode.INTERRUPTED
    if interrupted and (plugin.results or RECORDS):
        _report(plugin.build(factory.name, device, profile, status="interrupted"), args.json)
        print("python -m conformance: interrupted; the report holds what completed before the interruption.",
              file=sys.stderr)
        return 4
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not plugin.results:
        what = "no trace completed" if interrupted else "no check ran"
        print(f"python -m conformance: error: pytest could not run the suite (exit status {int(code)}: "
              f"{getattr(code, 'name', code)}); its own message is above. {what.capitalize()}, so no report was "
              "written.", file=sys.stderr)
        return 3
    report = plugin.build(factory.name, device, profile)
    _report(report, args.json)
    shortfall = soak_shortfall(report, os.environ)
    if shortfall:
        print(shortfall)
        return 1
    return 0 if report["passed"] and code == pytest.ExitCode.OK else 1


def _run_jobs(args: argparse.Namespace, backend: str, device: str, profile: str) -> int:
    """--jobs N: each check in its own process (`conformance.jobs`), the merged report printed and written."""
    from conformance.jobs import run_checks

    forward = ["--backend", args.backend or backend, "--device", device, "--profile", profile]
    report, code = run_checks(forward, args.pytest_args, args.jobs)
    _report(report, args.json)
    shortfall = soak_shortfall(report, os.environ)
    if shortfall:
        print(shortfall)
    return 0 if code == 0 and report["passed"] and not shortfall else max(code, 1)


def soak_shortfall(report: dict, environ) -> str | None:
    """Why a soak run does not count (fewer than SOAK_MIN_STEPS trace steps over the checks that ran, a time budget
    or not), or None; PAGED_SOAK_EXAMPLES (a deliberately brief soak) lifts the minimum."""
    if report["profile"] != "soak" or report["total_steps"] >= SOAK_MIN_STEPS or "PAGED_SOAK_EXAMPLES" in environ:
        return None
    return f"soak: only {report['total_steps']} trace steps, fewer than the {SOAK_MIN_STEPS} a soak run must reach"


def _report(report: dict, path: str | None) -> None:
    """Print the report and write it to `path` (if any)."""
    print()
    print(format_report(report))
    if path:
        write_json(report, path)
        print(f"report written to {path}")


class _Checkpoint:
    """Rewrites the report (status "running") after the first completed trace, then at most every CHECKPOINT_SECONDS.

    Also where a lost interruption is delivered: a KeyboardInterrupt raised by the signal handler inside a gc callback
    or a __del__ is swallowed by Python, so the handler also sets `signalled`, and the next completed trace raises it.
    """

    def __init__(self, plugin: ReportPlugin, path: str | None, run: tuple[str, str, str]) -> None:
        self.plugin, self.path, self.run = plugin, path, run
        self.last = -CHECKPOINT_SECONDS   # the first completed trace is written at once
        self.signalled: int | None = None

    def __call__(self) -> None:
        if self.signalled is not None:
            raise KeyboardInterrupt(f"signal {self.signalled}")
        if not self.path or time.monotonic() - self.last < CHECKPOINT_SECONDS:
            return
        write_json(self.plugin.build(*self.run, status="running"), self.path)
        self.last = time.monotonic()

    @contextlib.contextmanager
    def interruptible(self):
        """SIGINT and SIGTERM (`timeout`'s default) interrupt the run, so pytest ends the session and the report is
        written with status "interrupted"."""
        def interrupt(signum, frame):
            self.signalled = signum
            raise KeyboardInterrupt(f"signal {signum}")

        try:
            previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:   # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
