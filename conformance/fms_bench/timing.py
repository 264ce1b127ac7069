"""Timing one configuration of one mode: decode step and prefill from whole generate() calls."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from conformance.fms_bench.runners import Clock, Runner


def wall(run: Runner, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of one generate, from a synchronised start to its tokens on the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    tokens = run(prompts, new_tokens)
    return time.perf_counter() - t, tokens


def time_generation(run: Runner, prompts: torch.Tensor, new_tokens: int, repeats: int, warmup: int,
                    device: torch.device, clock: Clock, counts: Callable[[], tuple[int, int]]) -> dict:
    """Decode step and prefill of one mode at one configuration.

    step_ms: the median interval between consecutive per-token stamps of the timed generate(N + 1) calls (steady
    state, host time included). step_ms_by_difference: (median generate(N + 1) - median generate(1)) / N, the
    figure FACTS.md's anchors were taken with (noisy when the prefill dwarfs N steps). prefill_ms: median
    generate(1). Warm-up: `warmup` untimed generates of each length (compiles, captures). `counts()` gives
    (graphs compiled, CUDA graphs captured) so far: recorded for the warm-up and, apart, for the timed repeats
    (both must stay 0 there). Returns the figures and the first warm-up's tokens (for the agreement check).
    """
    before = counts()
    tokens = None
    for _ in range(warmup):
        _, out = wall(run, prompts, new_tokens + 1, device)
        tokens = out if tokens is None else tokens
        wall(run, prompts, 1, device)
    warm = counts()
    full, one, intervals = [], [], []
    peak = None
    for i in range(repeats):
        if i == 0 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        clock.stamps = []
        full.append(wall(run, prompts, new_tokens + 1, device)[0])
        intervals += [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:])]   # stamp 0 ends the prefill
        if i == 0 and device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        one.append(wall(run, prompts, 1, device)[0])
    done = counts()
    step = (statistics.median(full) - statistics.median(one)) / new_tokens
    return {"compiles_warmup": warm[0] - before[0], "captures_warmup": warm[1] - before[1],
            "compiles_timed": done[0] - warm[0], "captures_timed": done[1] - warm[1],"step_ms": statistics.median(intervals) * 1e3 if intervals else None,
            "step_ms_by_difference": step * 1e3, "step_intervals": len(intervals),
            "prefill_ms": statistics.median(one) * 1e3, "peak_extra_bytes": peak,
            "generate_ms": statistics.median(full) * 1e3, "generate_ms_all": [t * 1e3 for t in full],
            "prefill_ms_all": [t * 1e3 for t in one], "tokens": tokens}


def _kernels(run: Runner, prompts: torch.Tensor, n: int) -> dict[str, tuple[float, int]]:
    """Per CUDA kernel name: (total ms, calls) over one generate of `n` new tokens (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(prompts, n)
    return {e.key: (e.device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA}


def device_profile(run: Runner, prompts: torch.Tensor, new_tokens: int, top: int = 12) -> dict:
    """Device time per decode step (kernels of generate(N + 1) minus those of generate(1), over N) and the
    `top` kernels by time per step: [(name, ms per step, launches per step)]."""
    full, one = _kernels(run, prompts, new_tokens + 1), _kernels(run, prompts, 1)
    per_step = {k: ((ms - one.get(k, (0.0, 0))[0]) / new_tokens, (n - one.get(k, (0.0, 0))[1]) / new_tokens)
                for k, (ms, n) in full.items()}
    table = sorted(per_step.items(), key=lambda kv: -kv[1][0])[:top]
    return {"device_ms": sum(ms for ms, _ in per_step.values()),
            "kernels": [(name[:90], round(ms, 4), round(n, 2)) for name, (ms, n) in table]}


def host_profile(run: Runner, prompts: torch.Tensor, new_tokens: int, top: int = 25) -> list[str]:
    """cProfile of one generate(N + 1): the `top` functions by cumulative time (where the host's time goes)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run, prompts, new_tokens + 1)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1:]
