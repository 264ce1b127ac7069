"""`python -m conformance --jobs N`: every check of the suite in its own process, N at a time, one merged report.

A GPU run of the suite is mostly compilation on the host (dynamo, inductor, Triton) while the GPU idles; one process
per check lets a many-core GPU machine compile for several checks at once (`tox -e gpu` runs the suite this way).
Each check's process is `python -m conformance` itself with the same backend, device and profile, restricted with
`-k test_<check>`, writing its own JSON report; the merged report lists every check and passes only when each
process ran to completion and passed. A check whose process wrote no report (it crashed, or pytest could not run it)
is listed as an error with the process's exit status.

`run_commands` is also the runner of `scripts/parallel.py` (tox's CPU env runs the suite's backends with it).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def _run(argv: list[str]) -> tuple[int, float, str]:
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:                                  # e.g. no such program: a failure of that command only
        return 127, time.monotonic() - t0, f"{exc}\n"
    return done.returncode, time.monotonic() - t0, done.stdout


def run_commands(commands: list[list[str]], jobs: int) -> list[int]:
    """Run `commands` (argument lists, no shell) `jobs` at a time; print each one's output whole, under a header
    with its exit status and seconds, as it ends (outputs never interleave). Returns the exit statuses in the
    order of `commands`."""
    codes = [0] * len(commands)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        running = {pool.submit(_run, c): i for i, c in enumerate(commands)}
        for fut in as_completed(running):
            i = running[fut]
            codes[i], seconds, output = fut.result()
            print(f"===== {shlex.join(commands[i])}  (exit {codes[i]}, {seconds:.0f} s)", flush=True)
            print(output, end="" if output.endswith("\n") else "\n", flush=True)
    return codes


def check_names() -> list[str]:
    """The suite's checks, in the order the suite defines them (test_outputs_match_oracle -> outputs_match_oracle)."""
    from conformance.suite import test_conformance as suite

    return [name.removeprefix("test_") for name, fn in vars(suite).items()
            if name.startswith("test_") and getattr(fn, "__module__", None) == suite.__name__]


def merge_reports(reports: dict[str, dict | None], codes: dict[str, int]) -> dict:
    """One report from each check's own (None where its process wrote none): checks in order, steps summed, passed
    only when every process completed and passed."""
    written = [r for r in reports.values() if r is not None]
    if not written:
        raise RuntimeError("no check's process wrote a report")
    merged = dict(written[0], checks=[], total_steps=0)
    for name, report in reports.items():
        if report is None:
            merged["checks"].append({"check": name, "outcome": "error",
                                     "detail": f"its process exited with status {codes[name]} and wrote no report"})
            continue
        merged["checks"] += report["checks"]
        merged["total_steps"] += report["total_steps"]
        if report["status"] != "complete" and merged["status"] == "complete":
            merged["status"] = report["status"]
    merged["passed"] = all(r is not None and r["passed"] for r in reports.values())
    return merged


def run_checks(forward: list[str], pytest_args: list[str], jobs: int) -> tuple[dict, int]:
    """Run each check as `python -m conformance *forward --json TMP -- *pytest_args -k test_<check>`, `jobs` at a
    time. Returns (the merged report, the worst exit status)."""
    names = check_names()
    with tempfile.TemporaryDirectory(prefix="conformance-jobs-") as tmp:
        paths = {name: Path(tmp) / f"{name}.json" for name in names}
        commands = [[sys.executable, "-m", "conformance", *forward, "--json", str(paths[name]), "--", *pytest_args,
                     "-k", f"test_{name}"] for name in names]
        codes = dict(zip(names, run_commands(commands, jobs)))
        reports = {name: json.loads(p.read_text()) if p.exists() else None for name, p in paths.items()}
    return merge_reports(reports, codes), max(codes.values())
