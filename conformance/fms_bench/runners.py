"""One greedy generation per mode: `runner(prompts (B, L) int64, new_tokens) -> (B, new_tokens) tokens` on the CPU.

Every runner returns only after the device finished (its tokens are copied to the host), so a wall-clock time
around a call is the whole generation, host time included. Each also stamps `Clock.stamps` once per new token
from its library's own per-step hook, once the device has finished that token's step: the intervals between
consecutive stamps are the decode steps. transformers' and FMS's hooks are handed the step's tokens on the device,
so they synchronize first; PagedGenerator calls its callback only after the step's tokens reached the host, so its
stamp does not (a synchronize there would also wait for the next step, which the graphed path has already launched).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from conformance.fms_bench.models import ModelPair

Runner = Callable[[torch.Tensor, int], torch.Tensor]


class Clock:
    """Per-token host stamps (`clock()` synchronizes first, `clock.stamp()` does not); `stamps` is reset by the caller
    before a generate."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, *_, **__) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamp()

    def stamp(self, *_, **__) -> None:
        """A stamp without a synchronize: for hooks called once the step's tokens are on the host."""
        self.stamps.append(time.perf_counter())


def _hf_stopping(clock: Clock):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        """transformers calls its stopping criteria once per generated token: stamp, never stop."""

        def __call__(self, input_ids, scores, **kwargs):
            clock()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stamp()])

MODES = ("hf-eager", "hf-static", "fms-default", "paged-eager", "paged-graphs")
LABELS = {
    "hf-eager": "HF transformers, eager (dynamic cache)",
    "hf-static": "HF transformers, static cache + torch.compile",
    "fms-default": "FMS default (sdpa, contiguous cache)",
    "paged-eager": "FMS + paged, eager",
    "paged-graphs": "FMS + paged, compiled + CUDA graphs",
}


def hf_runner(pair: ModelPair, device: torch.device, static: bool, clock: Clock) -> Runner:
    """transformers' own generate(): its dynamic cache, or its static cache (which it compiles itself)."""
    extra = {"cache_implementation": "static"} if static else {}
    extra["stopping_criteria"] = _hf_stopping(clock)

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        ids = prompts.to(device)
        with torch.no_grad():
            out = pair.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **extra)
        return out[:, ids.shape[1]:].cpu()

    return run


def fms_default_runner(pair: ModelPair, device: torch.device, clock: Clock) -> Runner:
    """FMS's generate() with its default attention op and its contiguous cache."""
    from fms.utils.generation import generate

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        B, L = prompts.shape
        ids = prompts.to(device)
        extra = {"position_ids": torch.arange(L, device=device).expand(B, L), "last_n_tokens": 1}
        with torch.no_grad():
            out = generate(pair.fms, ids, max_seq_len=L + new_tokens, max_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, extra_kwargs=extra, post_iteration_hook=_fms_hook(clock))
        return out[:, L:].cpu()

    return run


def _fms_hook(clock: Clock):
    def hook(token_pos, logits, next_val, kwargs):
        clock()
        return next_val, kwargs

    return hook


def paged_runner(pair: ModelPair, device: torch.device, graphs: bool, token_budget: int, max_seq_len: int,
                 page_size: int, clock: Clock, attention: str = "compiled",
                 prefill_kernel: str = "auto") -> tuple[Runner, object]:
    """PagedGenerator over one cache for the whole run (one compile, one CUDA graph per batch bucket).

    Returns the runner and the generator (its `decoder` counts captures and replays)."""
    from paged.fms.generate import PagedGenerator

    gen = PagedGenerator(pair.fms, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len,
                         device=device, attention=attention, cuda_graphs=graphs, compile_decode=graphs,
                         prefill_kernel=prefill_kernel)

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            out = gen.generate(prompts.tolist(), new_tokens, callback=clock.stamp)
        return torch.tensor(out, dtype=torch.long)

    return run, gen
