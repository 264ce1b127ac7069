"""Run independent commands a few at a time and report each (tox's CPU env runs the suite's backends this way).

    python scripts/parallel.py [-j JOBS] "CMD 1" "CMD 2" ... [-- ARGS appended to every command]

Each command is split like a shell word list (no shell runs it). Its output is kept and printed whole once it ends,
under a header with its exit code and seconds, so outputs never interleave. The exit code is 0 only when every
command exited 0. On the 2-core CI machine two pytest sessions at once use both cores: most of a CPU session is
single-threaded compilation (dynamo, inductor), and the suite takes one --backend per session.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed


def _run(argv: list[str]) -> tuple[int, float, str]:
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:                                  # e.g. no such program: a failure of that command only
        return 127, time.monotonic() - t0, f"{exc}\n"
    return done.returncode, time.monotonic() - t0, done.stdout


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="commands at once (default: cores)")
    p.add_argument("commands", nargs="+", help="one quoted command line each")
    opts = p.parse_args(args)
    if opts.jobs < 1:
        p.error("--jobs must be >= 1")
    commands = [shlex.split(c) + extra for c in opts.commands]
    failed = []
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        running = {pool.submit(_run, c): shlex.join(c) for c in commands}
        for fut in as_completed(running):
            code, seconds, output = fut.result()
            print(f"===== {running[fut]}  (exit {code}, {seconds:.0f} s)", flush=True)
            print(output, end="" if output.endswith("\n") else "\n", flush=True)
            if code != 0:
                failed.append((code, running[fut]))
    for code, line in failed:
        print(f"FAILED (exit {code}): {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
