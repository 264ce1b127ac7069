"""python -m conformance.fms_bench: FMS + paged against HF transformers and FMS's default path, in one run.

    python -m conformance.fms_bench --size 1b --batches 1,8,64,128 --prompts 512,2048 --out DIR

Writes DIR/results.json (after every configuration, so a cut-off run keeps what it measured) and
DIR/results.md. See the package docstring for what each mode is and how a step is timed.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from conformance.benchmarks.harness import BenchSettings, copy_bandwidth, unique_graphs
from conformance.fms_bench import report
from conformance.fms_bench.models import SHAPES, build_pair
from conformance.fms_bench.runners import MODES, Clock, fms_default_runner, hf_runner, paged_runner
from conformance.fms_bench.timing import device_profile, host_profile, time_generation

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance.fms_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SHAPES), default="micro")
    p.add_argument("--batches", type=_ints, default=[1, 8])
    p.add_argument("--prompts", type=_ints, default=[512])
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per generate (N)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention", choices=("compiled", "eager"), default="compiled",
                   help="the paged cache's FlexAttention (eager: no compile, for CPU smoke runs)")
    p.add_argument("--prefill-kernel", choices=("auto", "flex", "sdpa"), default="auto",
                   help="the paged cache's kernel of a prompt's first chunk (PagedKVCache's prefill_kernel)")
    p.add_argument("--device-time", action="store_true", help="also sum kernel times per step (torch.profiler)")
    p.add_argument("--host-profile", action="store_true", help="cProfile one generate per paged mode")
    p.add_argument("--time-budget", type=float, default=None, help="skip configurations starting after S seconds")
    p.add_argument("--out", type=Path, required=True)
    return p


def environment(device: torch.device, copy_gbps: float) -> dict:
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "copy_gbps": copy_gbps,
           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import fms
        env["ibm_fms"] = getattr(fms, "__version__", "?")
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def run_config(runners: dict, gens: dict, clock, args, batch: int, prompt: int, pair, device,
               copy_gbps: float) -> dict:
    g = torch.Generator().manual_seed(batch * 1009 + prompt)
    prompts = torch.randint(1, pair.vocab, (batch, prompt), generator=g)
    kv_read = batch * (prompt + args.new_tokens / 2) * pair.kv_bytes_per_token     # mean context of the steps
    floor_ms = (pair.weight_bytes + kv_read) / (copy_gbps * 1e9) * 1e3
    config = {"batch": batch, "prompt": prompt, "floor_ms": floor_ms, "modes": {}}
    tokens = {}
    for mode, run in runners.items():
        try:
            warmup = 2 if mode in ("hf-static", "paged-graphs") else 1
            gen = gens.get(mode)

            def counts() -> tuple[int, int]:
                decoder = getattr(gen, "_decoder", None)
                return unique_graphs(), decoder.captures if decoder is not None else 0

            r = time_generation(run, prompts, args.new_tokens, args.repeats, warmup, device, clock, counts)
            tokens[mode] = r.pop("tokens").tolist()
            if args.device_time and device.type == "cuda":
                r.update(device_profile(run, prompts, args.new_tokens))
            if args.host_profile and mode.startswith("paged"):
                r["host_profile"] = host_profile(run, prompts, args.new_tokens)
        except Exception as e:  # noqa: BLE001  (recorded: one mode's failure must not hide the others' figures)
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
        config["modes"][mode] = r
        print(f"[bench] {args.size} b{batch} p{prompt} {mode}: " +
              (f"{r['step_ms']:.3f} ms/step, prefill {r['prefill_ms']:.1f} ms" if "step_ms" in r else r["error"]),
              flush=True)
    for mode, agree in report.agreement(tokens, "fms-default").items():
        config["modes"][mode]["agreement"] = agree
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.time()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    max_len = max(args.prompts) + args.new_tokens + 1
    pair = build_pair(args.size, device, dtype, max_len)
    copy_gbps = copy_bandwidth(BenchSettings(device=device))
    budget = max(args.batches) * -(-max_len // args.page_size) * args.page_size
    runners, gens, clock = {}, {}, Clock(device)
    for mode in args.modes:
        if mode in ("hf-eager", "hf-static"):
            runners[mode] = hf_runner(pair, device, mode == "hf-static", clock)
        elif mode == "fms-default":
            runners[mode] = fms_default_runner(pair, device, clock)
        elif mode in ("paged-eager", "paged-graphs"):
            if mode == "paged-graphs" and device.type != "cuda":
                continue
            runners[mode], gens[mode] = paged_runner(pair, device, mode == "paged-graphs", budget, max_len,
                                                     args.page_size, clock, args.attention, args.prefill_kernel)
        else:
            raise SystemExit(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    results = {"size": args.size, "dtype": args.dtype, "new_tokens": args.new_tokens, "modes": list(runners),
               "command": "python -m conformance.fms_bench " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
               "environment": environment(device, copy_gbps), "weight_bytes": pair.weight_bytes,
               "kv_bytes_per_token": pair.kv_bytes_per_token, "configs": [], "skipped": [],
               "paged_pool_bytes": {m: g.cache.k_pool.nbytes * 2 for m, g in gens.items()}}
    for prompt in args.prompts:
        for batch in args.batches:
            if args.time_budget is not None and time.time() - t0 > args.time_budget:
                results["skipped"].append({"batch": batch, "prompt": prompt})
                continue
            results["configs"].append(run_config(runners, gens, clock, args, batch, prompt, pair, device,
                                                 copy_gbps))
            report.write(results, args.out)
            gc.collect()
    report.write(results, args.out)
    if results["configs"]:
        report.plot(results, args.out)
    print(report.markdown(results))
    failed = [(c["batch"], c["prompt"], m) for c in results["configs"] for m, r in c["modes"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
