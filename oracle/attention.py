"""Reference attention: plain matmul + softmax with an explicit mask. No FlexAttention, no SDPA."""

from __future__ import annotations

import math
from typing import Callable

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    row: int,
    *,
    scale: float | None = None,
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Attention of one sequence's new queries over its whole stored history.

    Args:
        q: (Lq, Hq, D) the new tokens' queries, at logical positions q_start .. q_start + Lq - 1.
        k, v: (S, Hkv, D) every stored token of the sequence (the new ones included), positions 0 .. S-1.
        row: the sequence's row in the step (the `b` that mods receive).
        mask_mod, score_mod: FlexAttention-style mods in logical positions; mask_mod defaults to causal.
        compute_dtype: float64 for the golden answer; the backend's dtype for the plain same-dtype reference.
    Returns:
        (Lq, Hq, D) in compute_dtype. A query that may see no key gets 0 (as FlexAttention does).
    """
    Lq, Hq, D = q.shape
    S, Hkv, _ = k.shape
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh = q.to(compute_dtype).transpose(0, 1)                                   # (Hq, Lq, D)
    kh = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)   # (Hq, S, D): query head h reads kv head h // group
    vh = v.to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)   # (Hq, S, D)
    scores = (qh @ kh.transpose(1, 2)) * scale                                 # (Hq, Lq, S)

    dev = scores.device
    b = torch.tensor(row, device=dev)
    h = torch.arange(Hq, device=dev)[:, None, None]                            # (Hq, 1, 1)
    q_pos = torch.arange(q_start, q_start + Lq, device=dev)[None, :, None]     # (1, Lq, 1)
    kv_pos = torch.arange(S, device=dev)[None, None, :]                        # (1, 1, S)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_pos, kv_pos).to(compute_dtype)  # mods may promote (e.g. ALiBi slopes)
    keep = (kv_pos <= q_pos) if mask_mod is None else mask_mod(b, h, q_pos, kv_pos)
    keep = torch.broadcast_to(keep, scores.shape)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                      # all-masked rows -> 0
    return (probs @ vh).transpose(0, 1)                                        # (Lq, Hq, D)
