"""`python -m conformance`: run the conformance suite against a backend and print/write the report.

    python -m conformance [--backend NAME|module:factory] [--device cpu|cuda] [--profile ci|dev|gpu|thorough]
                          [--json PATH] [--list] [-- extra pytest args]
Exit status 0 when every applicable check passes (known peer defects count as expected failures).
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest

from conformance.records import reset
from conformance.report import ReportPlugin, format_report, write_json
from conformance.selection import available_backends, resolve_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="backend under test (default: paged)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--profile", default=None,
                        help="Hypothesis profile (default: $HYPOTHESIS_PROFILE, else gpu on cuda, ci on cpu)")
    parser.add_argument("--json", default="conformance-report.json", help="where to write the JSON report")
    parser.add_argument("--list", action="store_true", help="list the backends that can be selected")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available_backends()))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The quick-start default: the bounded ci profile on a CPU, the gpu profile on a GPU.
    profile = args.profile or os.environ.get("HYPOTHESIS_PROFILE") or ("gpu" if device == "cuda" else "ci")
    factory = resolve_backend(args.backend)
    reset()
    plugin = ReportPlugin()
    code = pytest.main(["--pyargs", "conformance.suite", "--backend", args.backend or factory.name,
                        "--device", device, "--profile", profile, "-q", "-p", "no:cacheprovider",
                        *args.pytest_args], plugins=[plugin])
    report = plugin.build(factory.name, device, profile)
    print()
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    return 0 if report["passed"] and code in (0, pytest.ExitCode.OK) else 1


if __name__ == "__main__":
    sys.exit(main())
