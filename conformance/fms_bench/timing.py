"""Timing one configuration of one mode: decode step and prefill from whole generate() calls."""

from __future__ import annotations

import statistics
import time

import torch

from conformance.fms_bench.runners import Runner


def wall(run: Runner, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of one generate, from a synchronised start to its tokens on the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    tokens = run(prompts, new_tokens)
    return time.perf_counter() - t, tokens


def time_generation(run: Runner, prompts: torch.Tensor, new_tokens: int, repeats: int, warmup: int,
                    device: torch.device) -> dict:
    """ms per decode step = (median generate(N + 1) - median generate(1)) / N; prefill = median generate(1).

    Warm-up: `warmup` untimed generates of each length (compiles, captures). Returns the figures and the first
    warm-up's tokens (for the agreement check).
    """
    tokens = None
    for _ in range(warmup):
        _, out = wall(run, prompts, new_tokens + 1, device)
        tokens = out if tokens is None else tokens
        wall(run, prompts, 1, device)
    full, one = [], []
    for _ in range(repeats):
        full.append(wall(run, prompts, new_tokens + 1, device)[0])
        one.append(wall(run, prompts, 1, device)[0])
    step = (statistics.median(full) - statistics.median(one)) / new_tokens
    return {"step_ms": step * 1e3, "prefill_ms": statistics.median(one) * 1e3,
            "generate_ms": statistics.median(full) * 1e3, "generate_ms_all": [t * 1e3 for t in full],
            "prefill_ms_all": [t * 1e3 for t in one], "tokens": tokens}


def device_ms_per_step(run: Runner, prompts: torch.Tensor, new_tokens: int) -> float | None:
    """Summed CUDA kernel time of one generate(N + 1) minus one generate(1), per decode step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    def kernels_ms(n: int) -> float:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(prompts, n)
        return sum(e.device_time_total for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3

    try:
        return (kernels_ms(new_tokens + 1) - kernels_ms(1)) / new_tokens
    except RuntimeError:
        return None
