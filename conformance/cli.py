"""`python -m conformance`: run the conformance suite against a backend and print/write the report.

    python -m conformance [--backend NAME|module:factory] [--device cpu|cuda] [--profile ci|dev|gpu|thorough|soak]
                          [--json PATH] [--list] [-- extra pytest args]
Exit status 0 when every applicable check passes (known defects count as expected failures); 1 when a check
fails; 2 for a bad command line (unknown backend or profile, no GPU for --device cuda), with a one-paragraph
error and no report; 3 when pytest itself could not run the suite (no report either).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

import pytest

from conformance.profiles import SOAK_MIN_STEPS
from conformance.records import reset
from conformance.report import ReportPlugin, format_report, write_json
from conformance.selection import BackendNotFound, available_backends, resolve_backend

PLUGIN_MODULE = "conformance.plugin"


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
    reset()
    plugin = ReportPlugin()
    code = pytest.main([*plugin_args(), "--pyargs", "conformance.suite", "--backend", args.backend or factory.name,
                        "--device", device, "--profile", profile, "-q", "-p", "no:cacheprovider",
                        *args.pytest_args], plugins=[plugin])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not plugin.results:
        print(f"python -m conformance: error: pytest could not run the suite (exit status {int(code)}: "
              f"{getattr(code, 'name', code)}); its own message is above. No check ran, so no report was written.",
              file=sys.stderr)
        return 3
    report = plugin.build(factory.name, device, profile)
    print()
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    if profile == "soak" and report["total_steps"] < SOAK_MIN_STEPS and "PAGED_SOAK_EXAMPLES" not in os.environ:
        print(f"soak: only {report['total_steps']} trace steps, fewer than the {SOAK_MIN_STEPS} a soak run must reach")
        return 1
    return 0 if report["passed"] and code == pytest.ExitCode.OK else 1


if __name__ == "__main__":
    sys.exit(main())
