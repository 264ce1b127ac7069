"""The Triton store-and-attend decode kernel as a `paged.kernels` kernel: plain causal decode steps (one new token
per row, no mods), compiled attention only.

Its source is `triton_source` (the @triton.jit kernels and `paged_decode`) and its sizing `triton_sizing`; both are
re-exported here, and `paged.triton_decode` is this module under its old name.

Per bucket (once): split slots (`decode_splits`), launch options (`launch_options` at the bucket's padded batch, so
every batch of a bucket launches alike and one CUDA graph per bucket is right), the kernel's constants. Per step
(`plan`): keys per split from the host's lengths, one copy of the buffers up to the new pages. Per layer (`run`):
one launch (two with split-KV merging) that stores the new token's K/V and attends over the row's pages. `run`
also takes the bucket's padded batch: padding rows have q_len 0, store nothing and come back 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.kernels.triton_sizing import (CTAS_PER_SM, MAX_SPLITS, MIN_SPLIT_KEYS, SMALL_TILE_MAX_CTAS_PER_SM,  # noqa: F401
                                         SMALL_TILE_MAX_SPLITS, SPLIT_HEADROOM, _next_pow2, _sm_count, available,
                                         decode_splits, launch_options, split_keys, triton)
from paged.kernels.triton_source import launch, launch_meta, paged_decode, partials  # noqa: F401
from paged.plan import StepBuffers, StepPlan

NAME = "triton"
#: Runs over pools of more than 2**31 elements (64-bit slot offsets).
LARGE_POOLS = True
#: Takes run() inputs of the bucket's padded batch too (padding rows store nothing and come back 0).
PADDED_BATCH = True


@dataclass
class _Bucket:
    """What the kernel fixes once per (padded batch) bucket: split slots, launch options and, per query head
    count, the launch constants and the split-KV scratch (persistent, so a CUDA graph may capture them)."""

    num_splits: int
    options: dict
    by_heads: dict[int, tuple] = field(default_factory=dict)   # Hq -> (meta, part_out, part_lse)


def _bucket(settings: KernelSettings, buffers: StepBuffers) -> _Bucket:
    state = buffers.kernel_state.get(NAME)
    if state is None:
        spec = settings.spec
        state = _Bucket(decode_splits(buffers.padded_batch, spec.num_kv_heads, spec.max_seq_len, spec.device),
                        launch_options(spec.dtype, spec.head_dim, spec.device, buffers.padded_batch,
                                       spec.num_kv_heads))
        buffers.kernel_state[NAME] = state
    return state


@dataclass
class TritonDecodePlan(KernelPlan):
    """One plain decode step on the Triton kernel.

    Attributes:
        bucket: the bucket's fixed launch state; page_size, head_dim, dtype, device: the cache's;
        scale_default: 1 / sqrt(head_dim).
    """

    name: ClassVar[str] = NAME
    bucket: _Bucket
    page_size: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale_default: float


def plan(layout: StepLayout, buffers: StepBuffers) -> TritonDecodePlan:
    """Keys per split for this step's lengths into the host buffers, then one copy of the fields the kernel reads
    (lengths, split length, page table; slots and new pages for the cache's page bookkeeping)."""
    spec = layout.settings.spec
    state = _bucket(layout.settings, buffers)
    buffers.host["split_keys"][0] = split_keys([n + 1 for n in layout.start_lens], spec.num_kv_heads,
                                               state.num_splits, spec.device)
    buffers.packed.send(last="new_logical")
    return TritonDecodePlan(state, spec.page_size, spec.head_dim, spec.dtype, layout.page_logical.device,
                            spec.head_dim ** -0.5)


def _launch_state(kp: TritonDecodePlan, buffers: StepBuffers, hq: int, hkv: int) -> tuple:
    """(meta, part_out, part_lse) for `hq` query heads, made on the bucket's first launch with them."""
    o = kp.bucket.options
    min_keys = max(MIN_SPLIT_KEYS, o["block_n"])
    meta = launch_meta(kp.dtype, kp.device, hq, hkv, kp.head_dim, kp.page_size, kp.bucket.num_splits,
                       o["block_n"], min_keys, o["num_warps"], o["num_stages"], write_new=True, balanced=True)
    state = (meta, *partials(buffers.padded_batch, hq, kp.head_dim, kp.bucket.num_splits, kp.device))
    kp.bucket.by_heads[hq] = state
    return state


def run(step: StepPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: Pools,
        scale: float | None) -> torch.Tensor:
    """Store row b's new K/V at its position and attend its query over its pages, for every row of q.

    Args: q (B or Bp, Lq, Hq, D), k / v (B or Bp, Lq, Hkv, D), validated by the cache; only position 0 is read
        (the kernel indexes the inputs through their strides: no slicing, no copy unless a last dim is strided).
    Returns: (B or Bp, Lq, Hq, D); positions past 0 and padding rows are 0.
    """
    kp = step.kernel_plan
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Lq, Hq, D = q.shape
    state = kp.bucket.by_heads.get(Hq) or _launch_state(kp, step.buffers, Hq, k.shape[2])
    out = torch.empty((B, 1, Hq, D), dtype=kp.dtype, device=kp.device)                  # (B, 1, Hq, D)
    buf = step.buffers
    launch(state[0], q, pools.k_layers[layer], pools.v_layers[layer], k, v, buf.page_table, buf.q_start, buf.q_len,
           buf.split_keys, kp.scale_default if scale is None else scale, out, state[1], state[2])
    return out if Lq == 1 else F.pad(out, (0, 0, 0, 0, 0, Lq - 1))


TritonDecodePlan.run = staticmethod(run)
