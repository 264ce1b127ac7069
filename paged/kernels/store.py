"""The store half of store-and-attend, shared by the kernels that keep it apart from attention (FlexAttention, SDPA
prefill): one layer's new K/V written into the pool through the step's slot mapping."""

from __future__ import annotations

import torch

from paged.kernels.base import Pools
from paged.plan import StepPlan


def store_new_tokens(step: StepPlan, layer: int, k: torch.Tensor, v: torch.Tensor, pools: Pools) -> bool:
    """Write the step's new K/V of `layer` into its pool slots.

    Args: k, v (B, Lq, Hkv, D) with Lq = the step's max q_len, row b's first q_lens[b] positions real.
    Returns whether every position is real (T = B * Lq, every decode step): then no row needs its padding masked.
    """
    B, Lq, H, D = k.shape
    slots = step.slot_mapping                                                        # (T,) physical slots
    dense = slots.numel() == B * Lq
    k_new, v_new = k.reshape(B * Lq, H, D), v.reshape(B * Lq, H, D)                 # (B * Lq, Hkv, D)
    if not dense:  # skipped when dense: every launch here repeats in every layer
        k_new, v_new = k_new[step.token_rows], v_new[step.token_rows]                # (T, Hkv, D)
    pools.k_layers[layer][0, :, slots] = k_new.transpose(0, 1)
    pools.v_layers[layer][0, :, slots] = v_new.transpose(0, 1)
    return dense


def valid_positions(batch: int, q_len_max: int, q_len: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, Lq) bool: position j of row b is one of its q_len[b] new tokens (q_len (>= B,) int32 on `device`)."""
    return torch.arange(q_len_max, device=device)[None, :] < q_len[:batch, None]


def zero_padding(out: torch.Tensor, q_len: torch.Tensor) -> torch.Tensor:
    """out (B, Lq, Hq, D) with its positions past each row's q_len (q_len (>= B,) int32 on out's device) set to 0."""
    valid = valid_positions(out.shape[0], out.shape[1], q_len, out.device)          # (B, Lq)
    return torch.where(valid[:, :, None, None], out, 0)   # not a product: 0 x NaN of a garbage padding row is NaN
