"""Fresh prefill on PyTorch's scaled_dot_product_attention: a step in which every row starts empty (no stored
history), causal, no mods.

Such a row attends only to the new tokens the step hands in, contiguous in the step's (B, Lq) layout: attention over
them needs no page table, so it is one causal SDPA call (FlashAttention on CUDA, whose key tiles are not bounded by the
page size as FlexAttention's are over a paged pool) beside the store of the new K/V into their pages. Rows are right
padded to the step's max q_len and the caller's padding may hold anything (NaN and Inf included): the padding K/V
are zeroed before the call (a causal tile reaching past a short row's end multiplies them by 0, and 0 x Inf = NaN),
and the padding's own outputs are zeroed after it. Reads nothing from the pool: no other sequence's memory.

GQA: with fp16/bf16 CUDA inputs and head dim <= 256 the call passes enable_gqa, which FlashAttention takes as is;
elsewhere (float32, the CPU, larger heads) the memory-efficient and math kernels would not, and the math kernel
would materialise (B, Hq, L, L) scores, so K/V are repeated to Hq heads first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from paged.kernels.base import KernelPlan, Pools, StepLayout
from paged.kernels.store import store_new_tokens, valid_positions, zero_padding
from paged.plan import StepBuffers, StepPlan

NAME = "sdpa_prefill"
#: Runs over pools of more than 2**31 elements (it indexes the pool only through int64 slots).
LARGE_POOLS = True
#: Takes run() inputs of the bucket's padded batch: no (only the step's rows).
PADDED_BATCH = False
#: Stores the new K/V through `paged.kernels.store` (the step's device slots / token_rows).
FUSED_STORE = False


@dataclass
class SdpaPrefillPlan(KernelPlan):
    """A fresh prefill step: nothing beyond the page bookkeeping every kernel reads from the StepPlan."""

    name: ClassVar[str] = NAME


def plan(layout: StepLayout, buffers: StepBuffers) -> SdpaPrefillPlan:
    """One copy of the fields run() and the page bookkeeping read (q_len, slots, token rows, new pages)."""
    buffers.packed.send(last="token_rows")
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
    if not dense:
        valid = valid_positions(step.batch, Lq, step.buffers.q_len, q.device)[:, :, None, None]   # (B, Lq, 1, 1)
        k, v = torch.where(valid, k, 0), torch.where(valid, v, 0)
    gqa = q.shape[2] != k.shape[2]
    if gqa and not _flash_takes_gqa(q):
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)        # (B, Lq, Hq, D)
        gqa = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=gqa)                      # (B, Hq, Lq, D)
    out = out.transpose(1, 2)                                                        # (B, Lq, Hq, D)
    if not dense:
        out = zero_padding(out, step.buffers.q_len)
    return out if Lq_in == Lq else F.pad(out, (0, 0, 0, 0, 0, Lq_in - Lq))


def _flash_takes_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA's FlashAttention kernel can serve this call with enable_gqa (fp16/bf16 on CUDA, head dim <= 256)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


SdpaPrefillPlan.run = staticmethod(run)
