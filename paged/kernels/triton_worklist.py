"""The Triton decode kernel over a work list: a step's keys as slices ("items") balanced over the whole card.

The cache's decode steps run this (`triton_decode`); `triton_source`'s per-row split kernel (S slices of every row)
is kept as the standalone `paged_decode` and as the reference this kernel is measured against.

    item kernel    grid (Hkv, M): CTA (h, i) attends the g = Hq / Hkv query heads of kv head h over item i's keys
                   (its row, key start, key end: `triton_partition.partition`, from the host's lengths each step).
                   A row of one item writes its output; a split row writes a float32 partial and log-sum-exp at
                   item i. An unused item (row -1) reads and writes nothing. M is fixed per bucket (CUDA graphs).
    merge kernel   grid (Bp, Hq): combines the partials of a split row's items (row_first, row_count), ITEM_TILE at
                   a time; writes 0 for a row without items (padding); does nothing for a row of one item.

Runs on CUDA, and on the CPU under Triton's interpreter (float32 products there, as `triton_source`).
"""

from __future__ import annotations

import numpy as np
import torch

from paged.kernels.triton_partition import merge_slice_keys, min_slice_keys, partition, target_items
from paged.kernels.triton_launch import CachedLauncher
from paged.kernels.triton_sizing import _next_pow2, triton, worklist_options
from paged.kernels.triton_tiles import attend_new, attend_pages

#: The merge reads this many items' partials per step of its loop (at most).
ITEM_TILE = 32

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _item_kernel(
        Q, K, V, KNew, VNew, PageTable, QStart, QLen, Items, RowCount, Out, PartOut, PartLse,
        stride_qb, stride_qh, stride_kh, stride_ks, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_pt,
        stride_ob, stride_oh, num_items, num_q_heads,
        scale_log2e,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr, WRITE_NEW: tl.constexpr,
    ):
        h = tl.program_id(0)
        i = tl.program_id(1)
        row = tl.load(Items + i)
        start = tl.load(Items + num_items + i)
        end = tl.load(Items + 2 * num_items + i)                        # start == end == 0 for an unused item
        has_work = row >= 0
        b = tl.maximum(row, 0)
        count = tl.load(RowCount + b)
        seq_len = tl.load(QStart + b) + tl.load(QLen + b)

        rows = tl.arange(0, GROUP_PAD)                                  # (G,) query heads of kv head h
        dims = tl.arange(0, D_PAD)                                      # (D,)
        row_ok = rows < GROUP
        dim_ok = dims < HEAD_DIM
        heads = h * GROUP + rows
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :] & has_work, other=0.0)   # (G, D)

        k_head = K + h.to(tl.int64) * stride_kh
        v_head = V + h.to(tl.int64) * stride_kh
        row_pages = PageTable + b * stride_pt
        # WRITE_NEW: the new token (position seq_len - 1) comes from KNew / VNew, not the pool; the CTA whose item
        # holds it also stores it into the pool. No CTA of this launch reads that slot, so there is no race.
        new_pos = seq_len - 1
        pool_end = tl.minimum(end, new_pos) if WRITE_NEW else end
        m, l, acc = attend_pages(q, k_head, v_head, row_pages, start, pool_end, stride_ks, dims, dim_ok, scale_log2e,
                                 GROUP_PAD, D_PAD, PAGE, BLOCK_N, F32_DOT)
        if WRITE_NEW:
            if has_work & (start <= new_pos) & (new_pos < end):
                m, l, acc = attend_new(q, m, l, acc, k_head, v_head, KNew + b * stride_knb + h * stride_knh,
                                       VNew + b * stride_vnb + h * stride_vnh, row_pages, new_pos, stride_ks, dims,
                                       dim_ok, scale_log2e, PAGE)

        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]                                     # (G, D)
        out_ok = row_ok[:, None] & dim_ok[None, :]
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=out_ok & has_work & (count == 1))
        split = has_work & (count > 1)
        lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))      # (G,) log2 units
        base = i * num_q_heads + heads                                  # (G,) rows of the (M, Hq) partials
        tl.store(PartOut + base[:, None] * HEAD_DIM + dims[None, :], out, mask=out_ok & split)
        tl.store(PartLse + base, lse, mask=row_ok & split)

    @triton.jit
    def _merge_kernel(
        PartOut, PartLse, Out, RowFirst, RowCount, stride_ob, stride_oh, num_q_heads,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ITEMS: tl.constexpr,
    ):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        first = tl.load(RowFirst + b)
        count = tl.load(RowCount + b)
        dims = tl.arange(0, D_PAD)
        dim_ok = dims < HEAD_DIM
        tiles = tl.where(count > 1, (count + ITEMS - 1) // ITEMS, 0)    # a row of one item was written already
        m = tl.max(tl.full([ITEMS], float("-inf"), tl.float32), 0)     # running max of the lse (log2 units)
        l = tl.sum(tl.zeros([ITEMS], tl.float32), 0)                   # running sum of weights
        acc = tl.zeros([D_PAD], tl.float32)
        for t in range(0, tiles):
            idx = first + t * ITEMS + tl.arange(0, ITEMS)               # (T,) the row's items
            ok = idx < first + count
            base = idx * num_q_heads + hq
            lse = tl.load(PartLse + base, mask=ok, other=float("-inf"))
            parts = tl.load(PartOut + base[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None] & dim_ok[None, :],
                            other=0.0)                                  # (T, D)
            m_new = tl.maximum(m, tl.max(lse, 0))
            top = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp2(lse - top)                                      # (T,)
            alpha = tl.exp2(m - top)
            l = l * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(parts * w[:, None], 0)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)                             # 0 for a row without items
        tl.store(Out + b * stride_ob + hq * stride_oh + dims, out.to(Out.dtype.element_ty),
                 mask=dim_ok & (count != 1))


def items_meta(dtype: torch.dtype, device: torch.device, hq: int, hkv: int, head_dim: int, page_size: int,
               block_n: int, num_warps: int, num_stages: int, num_items: int, *,
               write_new: bool) -> tuple[CachedLauncher, CachedLauncher]:
    """The launchers of the item kernel and of the merge, with their compile-time constants and launch options
    (per bucket and query head count)."""
    d_pad = _next_pow2(max(head_dim, 16))
    split = dict(GROUP=hq // hkv, GROUP_PAD=max(16, _next_pow2(hq // hkv)), HEAD_DIM=head_dim, D_PAD=d_pad,
                 PAGE=page_size, BLOCK_N=block_n, F32_DOT=dtype == torch.float32 or device.type == "cpu",
                 WRITE_NEW=write_new)
    merge = dict(HEAD_DIM=head_dim, D_PAD=d_pad, ITEMS=min(ITEM_TILE, _next_pow2(num_items)))
    return (CachedLauncher(_item_kernel, split, dict(num_warps=num_warps, num_stages=num_stages)),
            CachedLauncher(_merge_kernel, merge, dict(num_warps=4)))


def item_partials(num_items: int, hq: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(part_out (M, Hq, D), part_lse (M, Hq)) float32 scratch of the merge, indexed by item."""
    return (torch.empty(num_items, hq, head_dim, dtype=torch.float32, device=device),
            torch.empty(num_items, hq, dtype=torch.float32, device=device))


def launch_items(launchers: tuple[CachedLauncher, CachedLauncher], q: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None, page_table: torch.Tensor,
                 q_start: torch.Tensor, q_len: torch.Tensor, items: torch.Tensor, row_first: torch.Tensor,
                 row_count: torch.Tensor, scale: float, out: torch.Tensor, part_out: torch.Tensor,
                 part_lse: torch.Tensor, merge: bool = True) -> torch.Tensor:
    """Launch the item kernel over the work list and (unless merge=False) the merge over q's B rows.

    Shapes: q (B, Hq, D) or (B, L, Hq, D) with the token at position 0 (out likewise; only [:, 0] is read or
    written), last dims contiguous; pools (Hkv, N * P, D) or (1, Hkv, N * P, D); k_new / v_new (B, [L,] Hkv, D)
    or None (the pool holds the new token); page_table (>= B, W) int32; q_start, q_len, row_first, row_count
    (>= B,) int32; items (3, M) int32 (`partition`, rows < B); part_out / part_lse from `item_partials(M, ...)`.
    merge=False skips the merge: right only when every one of the B rows is a row of one item (no split row, no
    padding row, which the merge zeroes). Returns out.
    """
    item_launcher, merge_launcher = launchers
    B, Hq = q.shape[0], q.shape[-2]
    M = items.shape[1]
    k_src, v_src = (q, q) if k_new is None else (k_new, v_new)  # unused when not writing
    item_launcher((k_pool.shape[-3], M),
                  (q, k_pool, v_pool, k_src, v_src, page_table, q_start, q_len, items, row_count, out, part_out,
                   part_lse),
                  (q.stride(0), q.stride(-2), k_pool.stride(-3), k_pool.stride(-2), k_src.stride(0), k_src.stride(-2),
                   v_src.stride(0), v_src.stride(-2), page_table.stride(0), out.stride(0), out.stride(-2), M, Hq,
                   scale * 1.4426950408889634))
    if merge:
        merge_launcher((B, Hq), (part_out, part_lse, out, row_first, row_count), (out.stride(0), out.stride(-2), Hq))
    return out


def work_list(lengths: np.ndarray, batch: int, kv_heads: int, group: int, block_n: int, device: torch.device,
              num_items: int | None = None, target: int | None = None,
              min_keys: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A fresh work list for `lengths` (B,) keys per row in a batch of `batch` >= B rows: (items (3, M), row_first
    (batch,), row_count (batch,) int32, slice length). Unless given: the target `target_items(kv_heads)`, M the
    target + batch (`max_items`), the shortest slice `min_slice_keys(block_n)` (a multiple of block_n) with the
    merge's soft floor `merge_slice_keys(block_n, group)` (none when min_keys is given)."""
    target = target or target_items(kv_heads, device)
    M = num_items or target + batch                                 # = max_items(batch, kv_heads) by default
    items = np.empty((3, M), dtype=np.int32)
    first, count = np.empty(batch, dtype=np.int32), np.empty(batch, dtype=np.int32)
    merge = 0 if min_keys else merge_slice_keys(block_n, group)
    _, chunk = partition(lengths.astype(np.int64), items, first, count, target, block_n,
                         min_keys or min_slice_keys(block_n), merge)
    return items, first, count, chunk


def decode_balanced(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                    q_start: torch.Tensor, q_len: torch.Tensor, page_size: int, scale: float, *,
                    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    num_items: int | None = None, target: int | None = None,
                    min_keys: int | None = None) -> torch.Tensor:
    """`paged_decode`'s contract (q (B, Hq, D) -> (B, Hq, D)) on the work-list kernel, its work list made here from
    q_start + q_len (read back to the host: a test and benchmark entry point; the cache plans it per step).
    num_items, target, min_keys: as `work_list`."""
    B, Hq, D = q.shape
    Hkv = k_pool.shape[-3]
    o = worklist_options(q.dtype, D, q.device, B, Hkv)
    block_n = block_n or o["block_n"]
    lengths = (q_start[:B].long() + q_len[:B].long()).cpu().numpy()
    items, first, count, _ = work_list(lengths, B, Hkv, Hq // Hkv, block_n, q.device, num_items, target, min_keys)
    M = items.shape[1]
    meta = items_meta(q.dtype, q.device, Hq, Hkv, D, page_size, block_n, num_warps or o["num_warps"],
                      num_stages or o["num_stages"], M, write_new=k_new is not None)
    dev = [torch.from_numpy(a).to(q.device) for a in (items, first, count)]
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    return launch_items(meta, q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, *dev, scale, out,
                        *item_partials(M, Hq, D, q.device))
