"""One greedy generation per mode: `runner(prompts (B, L) int64, new_tokens) -> (B, new_tokens) tokens` on the CPU.

Every runner returns only after the device finished (its tokens are copied to the host), so a wall-clock time
around a call is the whole generation, host time included.
"""

from __future__ import annotations

from typing import Callable

import torch

from conformance.fms_bench.models import ModelPair

Runner = Callable[[torch.Tensor, int], torch.Tensor]

MODES = ("hf-eager", "hf-static", "fms-default", "paged-eager", "paged-graphs")
LABELS = {
    "hf-eager": "HF transformers, eager (dynamic cache)",
    "hf-static": "HF transformers, static cache + torch.compile",
    "fms-default": "FMS default (sdpa, contiguous cache)",
    "paged-eager": "FMS + paged, eager",
    "paged-graphs": "FMS + paged, compiled + CUDA graphs",
}


def hf_runner(pair: ModelPair, device: torch.device, static: bool) -> Runner:
    """transformers' own generate(): its dynamic cache, or its static cache (which it compiles itself)."""
    extra = {"cache_implementation": "static"} if static else {}

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        ids = prompts.to(device)
        with torch.no_grad():
            out = pair.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **extra)
        return out[:, ids.shape[1]:].cpu()

    return run


def fms_default_runner(pair: ModelPair, device: torch.device) -> Runner:
    """FMS's generate() with its default attention op and its contiguous cache."""
    from fms.utils.generation import generate

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        B, L = prompts.shape
        ids = prompts.to(device)
        extra = {"position_ids": torch.arange(L, device=device).expand(B, L), "last_n_tokens": 1}
        with torch.no_grad():
            out = generate(pair.fms, ids, max_seq_len=L + new_tokens, max_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, extra_kwargs=extra)
        return out[:, L:].cpu()

    return run


def paged_runner(pair: ModelPair, device: torch.device, graphs: bool, token_budget: int, max_seq_len: int,
                 page_size: int, attention: str = "compiled") -> tuple[Runner, object]:
    """PagedGenerator over one cache for the whole run (one compile, one CUDA graph per batch bucket).

    Returns the runner and the generator (its `decoder` counts captures and replays)."""
    from paged.fms.generate import PagedGenerator

    gen = PagedGenerator(pair.fms, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len,
                         device=device, attention=attention, cuda_graphs=graphs, compile_decode=graphs)

    def run(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            out = gen.generate(prompts.tolist(), new_tokens)
        return torch.tensor(out, dtype=torch.long)

    return run, gen
