"""Checks and defaults of `PagedGenerator.generate()`'s arguments (:mod:`paged.fms.generate`)."""

from __future__ import annotations

import math

from paged.errors import InvalidRequestError
from paged.fms.scheduler import ContinuousBatching, Scheduler


def check_args(prompts: list[list[int]], limits: list[int], do_sample: bool, temperature: float, top_k: int | None,
               prefill_chunk: int | None, max_batch: int | None, seed: int | None) -> None:
    """Refuse bad generate() arguments with InvalidRequestError, before anything runs."""
    if len(limits) != len(prompts):
        raise InvalidRequestError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens")
    for n in limits:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidRequestError(f"max_new_tokens must be ints >= 0, got {n!r}")
    for i, p in enumerate(prompts):
        if not p:
            raise InvalidRequestError(f"prompt {i} is empty; a prompt needs at least one token")
    if do_sample and not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                          and math.isfinite(temperature) and temperature > 0):
        raise InvalidRequestError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    for name, value in (("top_k", top_k), ("prefill_chunk", prefill_chunk), ("max_batch", max_batch),
                        ("seed", seed)):
        if value is not None and (type(value) is not int or (value < 1 and name != "seed")):
            raise InvalidRequestError(f"{name} must be {'an int' if name == 'seed' else 'an int >= 1'} or None, "
                                      f"got {value!r}")


def default_scheduler(scheduler: Scheduler | None, max_batch: int | None, prefill_chunk: int | None) -> Scheduler:
    """`scheduler`, or continuous batching with generate()'s max_batch and prefill_chunk (not both)."""
    if scheduler is not None and (prefill_chunk is not None or max_batch is not None):
        raise InvalidRequestError("pass prefill_chunk and max_batch to your scheduler, not to generate()")
    return scheduler or ContinuousBatching(max_batch, prefill_chunk)


def progress_bar(total: int, progress: bool | None):
    """tqdm over generated tokens: shown when asked, or (None) for long runs (>= 1024 tokens) on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="generate", leave=False,
                disable=(not progress) if progress is not None else (None if total >= 1024 else True))
