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
import sys

from conformance.jobs import run_commands


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
    codes = run_commands(commands, opts.jobs)
    for code, command in zip(codes, commands):
        if code != 0:
            print(f"FAILED (exit {code}): {shlex.join(command)}", flush=True)
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
