"""The Triton store-and-attend decode kernel as a `paged.kernels` kernel: plain causal decode steps (one new token
per row, no mods), compiled attention only.

Its source is `triton_worklist` (the work-list kernel the cache runs), `triton_source` (the per-row split kernel,
the standalone `paged_decode`), `triton_tiles` (what both share); its sizing `triton_sizing` and
`triton_partition`. They are re-exported here, and `paged.triton_decode` is this module under its old name.

Per bucket (once): the work list's length M (`max_items`) and its fields in the bucket's packed buffers
(`step_fields`), launch options (`worklist_options` at the bucket's padded batch, so every batch of a bucket
launches alike and one CUDA graph per bucket is right), the kernel's constants. Per step (`plan`): the work list
from the host's lengths (`triton_partition.partition`: a long row in many slices, a short one in one), sent with the
step's one copy. Per layer (`run`): the item kernel (stores the new token's K/V, attends each item's keys) and the
merge of the split rows. `run` also takes the bucket's padded batch: padding rows have q_len 0 and no items, store
nothing and come back 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.kernels.triton_launch import capturing
from paged.kernels.triton_partition import (MERGE_KEYS_PER_QHEAD, max_items, merge_slice_keys,  # noqa: F401
                                            min_slice_keys, partition, target_items)
from paged.kernels.triton_sizing import (CTAS_PER_SM, MAX_SPLITS, MIN_SPLIT_KEYS, SMALL_TILE_MAX_CTAS_PER_SM,  # noqa: F401
                                         SMALL_TILE_MAX_SPLITS, SPLIT_HEADROOM, _next_pow2, _sm_count, available,
                                         decode_splits, launch_options, split_keys, triton, worklist_options)
from paged.kernels.triton_source import launch, launch_meta, paged_decode, partials  # noqa: F401
from paged.kernels.triton_worklist import (decode_balanced, item_partials, items_meta, launch_items,  # noqa: F401
                                           work_list)
from paged.plan import StepBuffers, StepPlan
from paged.spec import CacheSpec

NAME = "triton"
#: Runs over pools of more than 2**31 elements (64-bit slot offsets).
LARGE_POOLS = True
#: Takes run() inputs of the bucket's padded batch too (padding rows store nothing and come back 0).
PADDED_BATCH = True
#: Stores the new K/V in its own launch: plan() sends no slots / token_rows.
FUSED_STORE = True


def step_fields(padded_batch: int, padded_q_len: int, spec: CacheSpec) -> list[tuple]:
    """The work list's fields of a decode bucket's packed buffers (`StepBuffers`), none for other buckets:
    work_items (3, M), row_first (Bp,), row_count (Bp,) int32 (`triton_partition`)."""
    if padded_q_len != 1:
        return []
    M = max_items(padded_batch, spec.num_kv_heads, spec.device)
    i32 = torch.int32
    return [("work_items", (3, M), i32, -1), ("row_first", (padded_batch,), i32, 0),
            ("row_count", (padded_batch,), i32, 0)]


@dataclass
class _Bucket:
    """What the kernel fixes once per (padded batch) bucket: launch options, the work list's length and target,
    the shortest slice, and, per query head count, the launch constants and the merge's scratch (persistent, so
    a CUDA graph may capture them). merge_keys follows the last query head count run (plan() precedes the first
    run of a bucket, which therefore plans without it)."""

    options: dict
    num_items: int
    target: int
    min_keys: int
    merge_keys: int
    work: tuple[torch.Tensor, ...]                               # device work_items, row_first, row_count
    by_heads: dict[int, tuple] = field(default_factory=dict)   # Hq -> (meta, part_out, part_lse)


def _bucket(settings: KernelSettings, buffers: StepBuffers) -> _Bucket:
    state = buffers.kernel_state.get(NAME)
    if state is None:
        spec = settings.spec
        options = worklist_options(spec.dtype, spec.head_dim, spec.device, buffers.padded_batch, spec.num_kv_heads)
        dev = buffers.packed.dev
        state = _Bucket(options, dev["work_items"].shape[1], target_items(spec.num_kv_heads, spec.device),
                        min_slice_keys(options["block_n"]), 0, (dev["work_items"], dev["row_first"], dev["row_count"]))
        buffers.kernel_state[NAME] = state
    return state


@dataclass
class TritonDecodePlan(KernelPlan):
    """One plain decode step on the Triton kernel.

    Attributes:
        bucket: the bucket's fixed launch state; page_size, head_dim, dtype, device: the cache's;
        scale_default: 1 / sqrt(head_dim); items: work-list items used this step; split: whether a row of the step
        is split over several items (its partials need the merge).
    """

    name: ClassVar[str] = NAME
    bucket: _Bucket
    page_size: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    scale_default: float
    items: int = 0
    split: bool = True


def plan(layout: StepLayout, buffers: StepBuffers) -> TritonDecodePlan:
    """The step's work list from its lengths into the host buffers, then one copy of the fields the kernel reads
    (lengths, work list, page table; new pages and their logical indices for the cache's page bookkeeping)."""
    spec = layout.settings.spec
    state = _bucket(layout.settings, buffers)
    h = buffers.packed.host_np
    lengths = h["q_start"][:len(layout.q_lens)].astype(np.int64) + 1        # (B,) keys with the new token
    used, chunk = partition(lengths, h["work_items"], h["row_first"], h["row_count"], state.target,
                            state.options["block_n"], state.min_keys, state.merge_keys)
    buffers.packed.send(last="new_logical")
    return TritonDecodePlan(state, spec.page_size, spec.head_dim, spec.dtype, layout.page_logical.device,
                            spec.head_dim ** -0.5, used, bool(len(lengths)) and int(lengths.max()) > chunk)


def _launch_state(kp: TritonDecodePlan, hq: int, hkv: int) -> tuple:
    """(meta, part_out, part_lse) for `hq` query heads, made on the bucket's first launch with them."""
    o, bucket = kp.bucket.options, kp.bucket
    meta = items_meta(kp.dtype, kp.device, hq, hkv, kp.head_dim, kp.page_size, o["block_n"], o["num_warps"],
                      o["num_stages"], bucket.num_items, write_new=True)
    state = (meta, *item_partials(bucket.num_items, hq, kp.head_dim, kp.device))
    bucket.by_heads[hq] = state
    bucket.merge_keys = merge_slice_keys(o["block_n"], hq // hkv)
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
    state = kp.bucket.by_heads.get(Hq) or _launch_state(kp, Hq, k.shape[2])
    out = torch.empty((B, 1, Hq, D), dtype=kp.dtype, device=kp.device)                  # (B, 1, Hq, D)
    buf = step.buffers
    # The merge only combines split rows and zeroes padding rows: a step with neither skips its launch, unless a
    # CUDA graph is being captured (its replays serve later steps of the bucket, which may split) or the merge was
    # never launched (its first launch, which loads its binary, must not fall inside a later capture).
    merge = kp.split or B != step.batch or not state[0][1].launched or capturing(q)
    launch_items(state[0], q, pools.k_layers[layer], pools.v_layers[layer], k, v, buf.page_table, buf.q_start,
                 buf.q_len, *kp.bucket.work, kp.scale_default if scale is None else scale, out, state[1], state[2],
                 merge)
    return out if Lq == 1 else F.pad(out, (0, 0, 0, 0, 0, Lq - 1))


TritonDecodePlan.run = staticmethod(run)
