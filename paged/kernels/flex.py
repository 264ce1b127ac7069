"""FlexAttention as a `paged.kernels` kernel: every step (prefill chunks, mixed steps, mods, decode), compiled or
eager (`paged.attention.attend`).

Per bucket (once): kernel options. Per step (`plan`): the block lists of every (row, query block) computed on the
host and sent with the step's other buffers in one copy, the physical mask / score wrappers (built once per bucket
and mods), and the BlockMask over them. Per layer (`run`): the new K/V stored through the slot mapping, queries
padded to the bucket's shape, one FlexAttention call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from paged.attention import attend, decode_kernel_defaults, decode_splits_kv, own_call_is_compiled, prefill_tiles
from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.kernels.store import store_new_tokens, zero_padding
from paged.mods import causal
from paged.plan import StepBuffers, StepPlan, fill_block_lists, physical_mods

NAME = "flex"
#: Runs over pools of more than 2**31 elements: no (FlexAttention indexes the pool with 32-bit offsets).
LARGE_POOLS = False
#: Takes run() inputs of the bucket's padded batch: no (only the step's rows).
PADDED_BATCH = False
#: Stores the new K/V through `paged.kernels.store` (the step's device slots / token_rows).
FUSED_STORE = False


@dataclass
class FlexPlan(KernelPlan):
    """One step on FlexAttention.

    Attributes:
        block_mask: the BlockMask over (Bp, Lqp) queries and the whole pool, for the cache's own call.
        checked_block_mask: the same block lists for a call that may run FlexAttention eagerly (traced by the
            caller's torch.compile, dynamo disabled or forced eager: `attention.own_call_is_compiled`), with the
            ownership-checking mask unless check_ownership=False; may be block_mask itself.
        score_mod: the physical score_mod, or None.
        attention: "compiled" or "eager"; kernel_options: the bucket's compiled-flex options.
    """

    name: ClassVar[str] = NAME
    block_mask: BlockMask
    checked_block_mask: BlockMask
    score_mod: Callable | None
    attention: str
    kernel_options: dict | None


def kernel_options(settings: KernelSettings, padded_q_len: int) -> dict | None:
    """GPU kernel options: tiles the non-decode kernel can take, faster decode stages/warps; user options win."""
    spec = settings.spec
    if spec.device.type != "cuda":
        return settings.kernel_options
    if padded_q_len == 1:
        tiles = decode_kernel_defaults(spec.device)
    else:
        tiles = prefill_tiles(padded_q_len, spec.page_size)
    return {**tiles, **(settings.kernel_options or {})}


def decode_full_blocks(settings: KernelSettings, padded_batch: int) -> bool:
    """Whether a plain decode step lists its full pages as unmasked blocks (`PagedKVCache`'s decode_full_blocks)."""
    if settings.decode_full_blocks != "auto":
        return settings.decode_full_blocks
    split_kv = (settings.kernel_options or {}).get("SPLIT_KV")
    if split_kv is not None:
        return split_kv <= 1
    return not decode_splits_kv(padded_batch, settings.spec.num_kv_heads, settings.spec.device)


def _options(settings: KernelSettings, buffers: StepBuffers) -> dict | None:
    """The bucket's kernel options, computed on its first flex step."""
    if NAME not in buffers.kernel_state:
        buffers.kernel_state[NAME] = kernel_options(settings, buffers.padded_q_len)
    return buffers.kernel_state[NAME]


def plan(layout: StepLayout, buffers: StepBuffers) -> FlexPlan:
    """Block lists into the host buffers, one copy of every buffer, and the step's BlockMask."""
    settings, spec, host = layout.settings, layout.settings.spec, buffers.host
    Bp, max_q = buffers.padded_batch, layout.max_q_len
    num_pages = (host["page_table"] >= 0).sum(1)             # (Bp,) pages of each row (-1 past them; 0 for padding)
    decode_full = max_q == 1 and decode_full_blocks(settings, Bp)
    full_blocks = layout.mask_mod is None and (max_q > 1 or decode_full)
    lists = fill_block_lists(buffers, host["page_table"], num_pages, host["q_start"].long(), host["q_len"].long(),
                             spec.page_size, causal_default=full_blocks)
    for name, values in lists.items():
        host[name].copy_(values)
    buffers.packed.send()
    # FlexDecoding keys its split-KV tiling on whether full-block lists exist at all (not on their contents), so the
    # every-page-masked layout passes none on CUDA. The CPU template does not split, and its C++ codegen fails for
    # some shapes without full-block lists (torch 2.13): it gets all-zero lists.
    no_full = max_q == 1 and not decode_full and spec.device.type == "cuda"
    own_mask, caller_mask, score_mod = _masks(layout, buffers)
    block_mask = BlockMask.from_kv_blocks(
        buffers.kv_num_blocks, buffers.kv_indices, None if no_full else buffers.full_kv_num_blocks,
        None if no_full else buffers.full_kv_indices, BLOCK_SIZE=(buffers.q_block, spec.page_size),
        mask_mod=own_mask, seq_lengths=(buffers.padded_q_len, spec.num_pages * spec.page_size),
        compute_q_blocks=False)
    checked_block_mask = block_mask
    if caller_mask is not own_mask:
        checked_block_mask = copy.copy(block_mask)      # same block-list tensors, the other mask_mod
        checked_block_mask.mask_mod = caller_mask
    return FlexPlan(block_mask, checked_block_mask, score_mod, settings.attention, _options(settings, buffers))


#: Mod pairs whose wrappers a bucket keeps (least recently used dropped first). Reusing one mod object keeps its
#: compiled kernel; a new object per step is a new wrapper (and, compiled, a recompile) either way.
MAX_WRAPPED_MODS = 16


def _masks(layout: StepLayout, buffers: StepBuffers) -> tuple[Callable, Callable, Callable | None]:
    """(mask of the cache's own call, mask of a call that may run eagerly, physical score_mod): wrappers built
    once per (bucket, mods), so the compiled kernel sees the same functions, and so the same guards, every step."""
    settings = layout.settings
    key = (layout.mask_mod, layout.score_mod)
    wrapped = buffers.wrapped
    if key in wrapped:
        wrapped[key] = wrapped.pop(key)                       # most recently used last
    else:
        if len(wrapped) >= MAX_WRAPPED_MODS:                  # a fresh mod object every step must not grow it
            wrapped.pop(next(iter(wrapped)))
        wrapped[key] = physical_mods(buffers, layout.page_logical, settings.spec.page_size,
                                     layout.mask_mod or causal, layout.score_mod)
    checked_mask, listed_mask, paged_score = wrapped[key]
    compiled = settings.attention == "compiled"
    own_mask = listed_mask if compiled and settings.check_ownership is not True else checked_mask
    caller_mask = listed_mask if compiled and settings.check_ownership is False else checked_mask
    return own_mask, caller_mask, paged_score


def block_mask_for_call(kp: FlexPlan) -> BlockMask:
    """The plan's block mask for this call: the checked one unless the cache's own compiled call surely runs
    inductor's kernel, which visits only the listed pages (`own_call_is_compiled`)."""
    if kp.checked_block_mask is kp.block_mask:  # eager attention, check_ownership=True: nothing to decide
        return kp.block_mask
    return kp.block_mask if own_call_is_compiled() else kp.checked_block_mask


def run(step: StepPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: Pools,
        scale: float | None) -> torch.Tensor:
    """Store one layer's new K/V through the slot mapping and attend the padded queries over the pool.

    Args: q (B, Lq_in, Hq, D), k / v (B, Lq_in, Hkv, D), validated by the cache (Lq_in >= the step's max q_len).
    Returns: (B, Lq_in, Hq, D); positions past a row's q_len are 0.
    """
    kp, buf = step.kernel_plan, step.buffers
    B, Lq, Lq_in = step.batch, step.max_q_len, q.shape[1]
    D = k.shape[3]
    q, k, v = q[:, :Lq], k[:, :Lq], v[:, :Lq]
    dense = store_new_tokens(step, layer, k, v, pools)
    k_pool, v_pool = pools.k_layers[layer], pools.v_layers[layer]                    # (1, Hkv, N * P, D)
    # A fresh contiguous buffer whatever the caller's strides: compiled flex guards on them (dynamic=False).
    qp = q.new_zeros(buf.padded_batch, buf.padded_q_len, q.shape[2], D)             # (Bp, Lqp, Hq, D)
    qp[:B, :Lq] = q
    if kp.attention == "eager":
        k_pool, v_pool = own_pages_only(k_pool, v_pool, buf.page_table, pools.page_logical)   # (Bp, Hkv, N*P, D)
    out = attend(qp.transpose(1, 2), k_pool, v_pool, block_mask_for_call(kp), kp.score_mod, scale, kp.attention,
                 kp.kernel_options)
    out = out.transpose(1, 2)[:B, :Lq]                                               # (B, Lq, Hq, D)
    if not dense:  # unmasked (full) pages reach a short row's padding positions too: callers never see garbage
        out = zero_padding(out, buf.q_len)
    return out if Lq_in == Lq else F.pad(out, (0, 0, 0, 0, 0, Lq_in - Lq))         # (B, Lq_in, Hq, D)


def own_pages_only(k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                   page_logical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's copy of a layer's pool holding only its own pages (every other slot 0), for eager FlexAttention.

    Eager FlexAttention weighs every slot of the pool, masked ones with probability 0, and 0 x NaN = NaN: a NaN or
    Inf left in a free page, or stored by another live sequence, would reach every row (issue 17, defect 2). Its
    mask_mod still decides what a row sees; this only keeps what it must not see out of the arithmetic. Eager is
    the reference path (small pools): the per-row copy costs Bp x the pool's bytes.

    Args: k_pool, v_pool (1, Hkv, N * P, D); page_table (Bp, W) int32; page_logical (N,) int32 (-1: free).
    Returns: (Bp, Hkv, N * P, D) each.
    """
    n = page_logical.numel()
    page_size = k_pool.shape[2] // n
    logical = page_logical.long()                                                    # (N,)
    width = page_table.shape[1]
    listed = page_table.long().gather(1, logical.clamp(0, width - 1)[None].expand(page_table.shape[0], n))  # (Bp, N)
    owned = (logical >= 0) & (logical < width) & (listed == torch.arange(n, device=listed.device))  # (Bp, N)
    keep = owned.repeat_interleave(page_size, dim=1)[:, None, :, None]               # (Bp, 1, N * P, 1)
    return torch.where(keep, k_pool, 0), torch.where(keep, v_pool, 0)


FlexPlan.run = staticmethod(run)
