"""Fresh prefill on PyTorch's scaled_dot_product_attention: a step in which every row starts empty (no stored
history), causal, no mods.

Such a row attends only to the new tokens the step hands in, contiguous in the step's (B, Lq) layout: attention over
them needs no page table, so it is one causal SDPA call (FlashAttention on CUDA, whose key tiles are not bounded by the
page size as FlexAttention's are over a paged pool) beside the store of the new K/V into their pages. Rows are right
padded to the step's max q_len; real position i attends to positions <= i, all real, so a row's padding never reaches
its real outputs (the padding's own outputs are zeroed). Reads nothing from the pool: no other sequence's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from paged.kernels.base import KernelPlan, Pools, StepLayout
from paged.kernels.store import store_new_tokens, zero_padding
from paged.plan import StepBuffers, StepPlan

NAME = "sdpa_prefill"
#: Runs over pools of more than 2**31 elements (it indexes the pool only through int64 slots).
LARGE_POOLS = True
#: Takes run() inputs of the bucket's padded batch: no (only the step's rows).
PADDED_BATCH = False


@dataclass
class SdpaPrefillPlan(KernelPlan):
    """A fresh prefill step: nothing beyond the page bookkeeping every kernel reads from the StepPlan."""

    name: ClassVar[str] = NAME


def fits(layout: StepLayout) -> bool:
    """Whether a step is a fresh causal prefill: every row starts empty, more than one new token somewhere, no mods."""
    return (layout.mask_mod is None and layout.score_mod is None and layout.max_q_len > 1
            and not any(layout.start_lens))


def plan(layout: StepLayout, buffers: StepBuffers) -> SdpaPrefillPlan:
    """One copy of the fields run() and the page bookkeeping read (q_len, slots, token rows, new pages)."""
    buffers.packed.send(last="new_logical")
    return SdpaPrefillPlan()


def run(step: StepPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: Pools,
        scale: float | None) -> torch.Tensor:
    """Store one layer's new K/V into their pages and attend each row's queries causally over its own new tokens.

    Args: q (B, Lq_in, Hq, D), k / v (B, Lq_in, Hkv, D), validated by the cache (Lq_in >= the step's max q_len).
    Returns: (B, Lq_in, Hq, D); positions past a row's q_len are 0.
    """
    Lq, Lq_in = step.max_q_len, q.shape[1]
    q, k, v = q[:, :Lq], k[:, :Lq], v[:, :Lq]
    dense = store_new_tokens(step, layer, k, v, pools)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])   # (B, Hq, Lq, D)
    out = out.transpose(1, 2)                                                        # (B, Lq, Hq, D)
    if not dense:
        out = zero_padding(out, step.buffers.q_len)
    return out if Lq_in == Lq else F.pad(out, (0, 0, 0, 0, 0, Lq_in - Lq))


SdpaPrefillPlan.run = staticmethod(run)
