"""Attention modifications written in LOGICAL token positions, usable on the paged cache and the oracle.

FlexAttention calls a `mask_mod(b, h, q_idx, kv_idx) -> bool` and a `score_mod(score, b, h, q_idx, kv_idx)
-> score` per element. Here `q_idx` and `kv_idx` are positions inside the sequence (0 = its first token),
and `b` is the sequence's row in the step, exactly as if each sequence had its own contiguous cache. The
paged backend translates physical pool slots to these positions before calling them; the oracle calls them
with broadcast index tensors in float64. Write them with tensor operations only (no Python branching on
values), as FlexAttention requires.

Masks returned here already include causality; a custom mask_mod passed to `PagedKVCache.plan` REPLACES the
default causal mask, so combine it with `causal` (see `and_masks`) unless you mean it.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A token sees itself and everything before it."""
    return kv_idx <= q_idx


def and_masks(*masks: MaskMod) -> MaskMod:
    """A mask that keeps an element only where every given mask keeps it."""

    def combined(b, h, q_idx, kv_idx):
        keep = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            keep = keep & m(b, h, q_idx, kv_idx)
        return keep

    return combined


def sliding_window(window: int) -> MaskMod:
    """Causal attention to the last `window` tokens (the query itself included), as Mistral/FMS do."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return sliding_window_mask


def prefix_lm(prefix_len: int) -> MaskMod:
    """Bidirectional over the first `prefix_len` stored tokens, causal after them."""

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix_len)

    return prefix_lm_mask


def alibi(num_heads: int) -> ScoreMod:
    """ALiBi: add slope_h * (kv - q) to each score, slope_h = 2^(-8 (h+1) / num_heads)."""

    def alibi_score(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-8.0 * (h + 1) / num_heads)
        return score + slope * (kv_idx - q_idx)

    return alibi_score


def soft_cap(cap: float) -> ScoreMod:
    """Gemma-2 style logit soft-capping: cap * tanh(score / cap)."""

    def soft_cap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return soft_cap_score
