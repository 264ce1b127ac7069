"""Hypothesis profiles for the suite, registered in code and chosen by --profile or HYPOTHESIS_PROFILE.

    ci        bounded and derandomized: the whole CPU suite in a few minutes on 2 cores (loaded under CI=true)
    ci-lite   the ci traces with a third of the examples: CI's run of backends whose CPU path another CI run
              already covers or that are slow on the CPU (paged-flex, paged-eager)
    dev       a few more examples, random, for local work
    gpu       more and larger traces (bigger pools, batches, prompts), for the GPU
    thorough  nightly-sized
    soak      long traces (200-400 operations) for one long run: >= 10^4 trace steps over the checks on the
              GPU (`python -m conformance --device cuda --profile soak --time-budget S`, scripts/gpu_soak.sh);
              PAGED_SOAK_EXAMPLES=N sets the examples per check (e.g. 1 for a brief CPU run), default 60. On
              the GPU it draws one configuration and the gpu profile's two mods: every (configuration, padded
              batch, padded query length, mod) is one FlexAttention compile (~5 s on an H200), and the five
              configurations with four mods reach ~250 of them in 10^4 steps (21 minutes of compiling, and
              the recompile limit of 256); one configuration with two mods reaches ~32. Shape coverage is
              the gpu and thorough profiles' job; the soak's is length (pool exhaustion, reuse, forks).
Trace sizes per profile live in `TRACE_LIMITS` and are read by `conformance.traces`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


@dataclass(frozen=True)
class TraceLimits:
    """How big generated traces and configurations may get under a profile."""

    max_ops: int          # operations per trace
    max_batch: int        # sequences per step
    max_chunk: int        # tokens per prefill chunk
    max_seq_len: int      # longest sequence
    small_configs: bool   # draw configurations from a short fixed list (few compiled shapes on CPU)
    mods: tuple[str, ...] = ("sliding_window_5", "prefix_lm_6", "alibi", "soft_cap_2")  # attention mods drawn
    min_ops: int = 3      # fewest operations per trace (a soak wants every trace long, its first one included)
    gpu_configs: tuple[int, ...] = ()   # indices of traces.GPU_CONFIGS drawn from on CUDA (small_configs); () = all


TRACE_LIMITS = {
    "ci": TraceLimits(max_ops=14, max_batch=4, max_chunk=12, max_seq_len=48, small_configs=True,
                     mods=("sliding_window_5", "alibi")),
    "dev": TraceLimits(max_ops=20, max_batch=4, max_chunk=16, max_seq_len=64, small_configs=True),
    # Sized so the whole suite runs in a few minutes on one H200, compiles included (~5 s per new shape).
    "gpu": TraceLimits(max_ops=30, max_batch=8, max_chunk=32, max_seq_len=512, small_configs=True,
                       mods=("sliding_window_5", "alibi")),
    "thorough": TraceLimits(max_ops=80, max_batch=32, max_chunk=128, max_seq_len=2048, small_configs=False),
    "soak": TraceLimits(max_ops=400, max_batch=8, max_chunk=32, max_seq_len=512, small_configs=True, min_ops=200,
                       mods=("sliding_window_5", "alibi"), gpu_configs=(0,)),
}
TRACE_LIMITS["ci-lite"] = TRACE_LIMITS["ci"]

EXAMPLES = {"ci": 12, "ci-lite": 4, "dev": 30, "gpu": 20, "thorough": 500,
            "soak": int(os.environ.get("PAGED_SOAK_EXAMPLES", "60"))}
#: What one soak run must reach (summed over the checks) to count as a soak.
SOAK_MIN_STEPS = 10_000


def register_profiles() -> None:
    settings.register_profile("ci", max_examples=EXAMPLES["ci"], derandomize=True, deadline=None,
                              suppress_health_check=_SLOW_OK, print_blob=True, database=None)
    settings.register_profile("ci-lite", parent=settings.get_profile("ci"), max_examples=EXAMPLES["ci-lite"])
    settings.register_profile("soak", max_examples=EXAMPLES["soak"], deadline=None, suppress_health_check=_SLOW_OK,
                              print_blob=True, database=None, stateful_step_count=200)
    settings.register_profile("dev", max_examples=EXAMPLES["dev"], deadline=None, suppress_health_check=_SLOW_OK,
                              print_blob=True)
    settings.register_profile("gpu", max_examples=EXAMPLES["gpu"], deadline=None, suppress_health_check=_SLOW_OK,
                              print_blob=True, derandomize=True, database=None)
    settings.register_profile("thorough", max_examples=EXAMPLES["thorough"], deadline=None,
                              suppress_health_check=_SLOW_OK, print_blob=True,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


def check_profile(name: str) -> None:
    """ValueError naming the known profiles unless `name` is one (register_profiles() first)."""
    register_profiles()
    try:
        settings.get_profile(name)
    except Exception:  # noqa: BLE001 - hypothesis raises InvalidArgument
        raise ValueError(f"unknown Hypothesis profile {name!r}; the suite's profiles are "
                         f"{', '.join(TRACE_LIMITS)}.") from None


def default_profile() -> str:
    """HYPOTHESIS_PROFILE if set, else `ci` under CI, else `dev`."""
    return os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")


def active_profile() -> str:
    name = settings._current_profile.removesuffix("-noshrink")  # set by load_profile
    return name if name in TRACE_LIMITS else "dev"


def limits() -> TraceLimits:
    return TRACE_LIMITS[active_profile()]
