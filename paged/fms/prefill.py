"""Compiled prefill steps of an FMS model over a PagedKVCache: the model code around attention fused by inductor.

    prefill = CompiledPrefill(model, cache)                    # on CUDA, what PagedGenerator uses by default
    step = plan_step(cache, seq_ids, [len(c) for c in chunks])
    logits = prefill(step, chunks, picks=[(0, 11), (1, 4)])    # (2, V): the head only where a token is picked

Why: an eager FMS forward spends a large share of a long prefill outside the matmuls. FMS's RoPE multiplies
float32 copies of q and k by a (B, L, H, D/2, 2, 2) broadcast of its rotation matrices, and RMSNorm, SiLU and the
residual adds each read and write the whole (B, L, E) activations. At 64 prompts of 2048 tokens every such pass
is a round trip through a gigabyte of HBM per layer. Compiled, each group of them is one kernel. Attention stays
the cache's own (`paged.ops` custom op: SDPA for a fresh prompt; later chunks on the Triton mixed kernel beside
the Triton decode kernel, else FlexAttention), opaque to the compiler. No CUDA graph: a prefill step is long enough
that launch gaps do not matter.

Shapes are dynamic: one graph serves every batch > 1 and every chunk length > 1, one more serves batch 1 (dynamo
specialises a size of 1). A chunk of one token runs eagerly instead of compiling a third graph for it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import PlanError
from paged.fms.decode import counting_backend
from paged.fms.forward import _inputs, _picked_logits
from paged.fms.op import CACHE_KWARG, OP_NAME, PagedStep, bind
from paged.ops import register

__all__ = ["CompiledPrefill"]


class CompiledPrefill:
    """Prefill (and chunked prefill) steps of an FMS model, compiled with dynamic batch and length.

    Args:
        model: an FMS decoder with a ``base_model`` and a ``head`` (Llama, Granite, Mistral, ...) in eval mode;
            other models run every step eagerly (`_picked_logits`).
        cache: the PagedKVCache its attention layers use.
        backend: torch.compile backend ("inductor"; "aot_eager" traces without generating kernels).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, backend: str = "inductor") -> None:
        bind(model)
        self.model, self.cache = model, cache
        self.handle = register(cache)
        self.compiles = 0                                     # graphs torch.compile made of the prefill forward
        self.eager_steps = 0                                  # steps that ran eagerly (one-token chunks, no head)
        base, head = getattr(model, "base_model", None), getattr(model, "head", None)
        self._traceable = isinstance(base, torch.nn.Module) and isinstance(head, torch.nn.Module)
        self._forward = torch.compile(self._traced_forward, backend=counting_backend(backend, self))

    def _traced_forward(self, ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor,
                        cols: torch.Tensor) -> torch.Tensor:
        """ids, position_ids (B, L) int64; rows, cols (k,) int64 -> logits (k, V) at positions (rows[i], cols[i])."""
        hidden, _ = self.model.base_model(ids, position_ids, None, False, attn_name=OP_NAME,
                                          **{CACHE_KWARG: self.handle})       # (B, L, E)
        return self.model.head(hidden[rows, cols])                             # (k, V)

    def __call__(self, step: PagedStep, token_chunks: Sequence[Sequence[int]], picks: Sequence[tuple[int, int]],
                 pad_token_id: int = 0) -> torch.Tensor:
        """Run the step (`token_chunks[i]`: row i's new tokens, right-padded to the longest) and return the logits
        (len(picks), V) at each picked (row, position)."""
        if not isinstance(step, PagedStep) or step.cache is not self.cache:
            raise PlanError("CompiledPrefill needs a PagedStep of its own cache (paged.fms.op.plan_step)")
        length = step.plan.max_q_len
        if not self._traceable or length == 1 or step.sliding_window is not None:
            self.eager_steps += 1
            return _picked_logits(self.model, step, token_chunks, picks, pad_token_id)
        ids = _inputs(step, token_chunks, pad_token_id)                         # (B, L)
        # At least two picks (the first repeated; its logits are dropped): k of 0 or 1 would be a graph of its own.
        padded = list(picks) + [picks[0] if picks else (0, 0)] * max(0, 2 - len(picks))
        where = torch.tensor(list(zip(*padded)), dtype=torch.long).to(ids.device)    # (2, k') rows, positions
        position_ids = step.position_ids(length)                                # (B, L)
        for t in (ids, position_ids):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 1)
        rows, cols = where[0], where[1]
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        torch._dynamo.maybe_mark_dynamic(cols, 0)
        with torch.no_grad():
            logits = self._forward(ids, position_ids, rows, cols)               # (k', V)
        return logits[:len(picks)]
