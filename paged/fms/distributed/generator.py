"""PagedGenerator on one rank of a tensor-parallel group: same arguments and same tokens on every rank, with
votes at the start, the end and on any error raised outside a plan."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from paged.fms.distributed.cache import DistributedPagedKVCache, agree_spec, tp_cache_spec
from paged.fms.distributed.errors import DistributedStepError
from paged.fms.distributed.group import DistContext
from paged.fms.distributed.vote import digest_of
from paged.fms.generate import PagedGenerator, StepEvent
from paged.spec import CacheSpec

__all__ = ["DistributedPagedGenerator"]


class DistributedPagedGenerator(PagedGenerator):
    """:class:`~paged.fms.generate.PagedGenerator` on one rank of a tensor-parallel group.

    Call it on every rank with the same arguments; every rank returns the same tokens. The model is this
    rank's shard (``load_tp_model``); the cache holds this rank's K/V heads. Extra args:

    Args:
        ctx: this rank's :class:`DistContext`.
        kv_budget_bytes: size the pool by bytes per rank instead of ``token_budget`` (see tp_cache_spec).
        check_pages: hash the page tables into every step's vote (see DistributedPagedKVCache).
    Progress bars show on rank 0 only.
    """

    def __init__(self, model: torch.nn.Module, ctx: DistContext, spec: CacheSpec | None = None, *,
                 token_budget: int = 8192, kv_budget_bytes: int | None = None, page_size: int = 16,
                 max_seq_len: int | None = None, dtype: torch.dtype | None = None, attention: str = "compiled",
                 policy: str = "lowest", kernel_options: dict | None = None, sliding_window: int | None = None,
                 pad_token_id: int = 0, check_pages: bool = False) -> None:
        if spec is None:
            spec = tp_cache_spec(model, ctx, token_budget=None if kv_budget_bytes else token_budget,
                                 kv_budget_bytes=kv_budget_bytes, page_size=page_size, max_seq_len=max_seq_len,
                                 dtype=dtype)
        else:
            agree_spec(spec, ctx)
        # Decode steps stay eager: a traced or graphed step would have to carry the ranks' collectives and the
        # cache's cross-rank vote (which runs on the host every plan) — not built, so not on by default.
        super().__init__(model, spec, attention=attention, policy=policy, kernel_options=kernel_options,
                         sliding_window=sliding_window, pad_token_id=pad_token_id, cuda_graphs=False,
                         compile_decode=False)
        # PagedGenerator built a plain cache; drop it before building the voting one, so the pools' memory
        # is reused (peak: one pool) rather than held twice.
        self.cache = None
        self.cache = DistributedPagedKVCache(spec, ctx, check_pages=check_pages, policy=policy, attention=attention,
                                             kernel_options=kernel_options)
        self.ctx = ctx

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 do_sample: bool = False, seed: int | None = None, callback: Callable[[StepEvent], None] | None = None,
                 progress: bool | None = None, **kwargs: Any):
        """PagedGenerator.generate on every rank at once (same arguments on every rank; see its doc)."""
        cache, ctx = self.cache, self.ctx
        if do_sample and seed is None:
            # torch's global RNG differs per process: rank 0 draws the seed and every rank uses it.
            box = [int(torch.randint(0, 2**62, (1,)).item()) if ctx.is_main else None]
            dist.broadcast_object_list(box, src=0, group=ctx.control)
            seed = box[0]
        if not ctx.is_main:
            progress = False
        # Everything the run depends on: different inputs on different ranks fail here, before any step.
        try:
            request = digest_of([list(map(int, p)) for p in prompts], max_new_tokens, do_sample, seed,
                              sorted((k, repr(v)) for k, v in kwargs.items()))
        except Exception as e:                  # e.g. a non-integer token: every rank votes it, all raise
            cache.control.vote("start", e)
            raise                                                           # pragma: no cover
        cache.control.vote("start", None, request, lambda: f"{len(prompts)} prompt(s), max_new_tokens={max_new_tokens}")

        def on_step(event: StepEvent) -> None:
            cache.fold_tokens(event.step, sorted(event.new_tokens.items()), event.finished)
            if callback is not None:
                callback(event)

        try:
            out = super().generate(prompts, max_new_tokens, do_sample=do_sample, seed=seed, callback=on_step,
                                   progress=progress, **kwargs)
        except DistributedStepError:
            raise
        except Exception as e:
            cache.control.vote("generate", e)
            raise                                                           # pragma: no cover
        tokens = out[0] if isinstance(out, tuple) else out
        cache.control.vote("end", None, digest_of(cache.history, tokens), lambda: f"tokens {tokens}")
        return out

