"""A Triton paged-decode kernel: one query token per sequence over its pages, split-KV, GQA-grouped.

Why it exists (docs/decode-performance-notes.md): FlexAttention over a paged pool cannot make a key tile larger
than a page (page 16 -> 16-key tiles, 2.1x FlashInfer on an H200) and splits KV over the pool instead of each
sequence's length at small batch. This kernel gathers any number of pages into one key tile (a per-key page
lookup) and splits each sequence's own length over a fixed number of CTAs. It serves plain causal decode steps
with no mods; FlexAttention keeps prefill, mods and the eager reference path.

Two launches (FlashInfer style: `decode_splits` once per bucket, `paged_decode` per layer):

    split kernel   grid (B, Hkv, S): CTA (b, h, s) attends the g = Hq / Hkv query heads of kv head h over the
                   s-th tile-aligned slice of row b's keys -> partial output and log-sum-exp. Slices are
                   `split_keys` long for every row (`split_keys()`, once per step from the host's lengths): a
                   long row takes more of its S slots than a short one, so that the longest row, the step's
                   critical path, is cut as short as the step's total work allows; an unused slot reads and
                   writes nothing.
    merge kernel   grid (B, Hq): weights the row's used partials by their log-sum-exp (it recounts the row's
                   slices as the split kernel cut them). Skipped when S == 1 (the split kernel then writes the
                   output itself).

Runs on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported) so
that the CPU test suite exercises the same kernel source (slowly: a test vehicle, never the CPU default).
Products run in float32 (IEEE) for float32 pools, and under the interpreter for every dtype: its bf16/fp16
`tl.dot` returns garbage (triton 3.8, CPU); the bf16/fp16 tensor-core path is tested on the GPU.
"""

from __future__ import annotations

import torch

from paged.kernels.triton_sizing import MIN_SPLIT_KEYS, _next_pow2, launch_options, triton
from paged.kernels.triton_tiles import attend_new, attend_pages

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_slices(QStart, QLen, SplitKeys, b, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                    MIN_KEYS: tl.constexpr, BALANCED: tl.constexpr):
        """(keys of row b with its new token, keys per slice): the split kernel's slices and the merge's count."""
        seq_len = tl.load(QStart + b) + tl.load(QLen + b)
        per_split = (seq_len + NUM_SPLITS - 1) // NUM_SPLITS                    # even: every slot used
        if BALANCED:  # the step's slice length; never short of covering the row with the grid's slots
            per_split = tl.maximum(tl.load(SplitKeys).to(tl.int32), per_split)
        per_split = tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, MIN_KEYS)
        return seq_len, per_split

    @triton.jit
    def _split_kernel(
        Q, K, V, KNew, VNew, PageTable, QStart, QLen, SplitKeys, Out, PartOut, PartLse,
        stride_qb, stride_qh, stride_kh, stride_ks, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_pt,
        stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
        scale_log2e,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,
        F32_DOT: tl.constexpr, WRITE_NEW: tl.constexpr, BALANCED: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        seq_len, per_split = _row_slices(QStart, QLen, SplitKeys, b, NUM_SPLITS, BLOCK_N, MIN_KEYS, BALANCED)
        start = split * per_split
        end = tl.minimum(start + per_split, seq_len)
        # A slot past the row's last slice reads and writes nothing (its loads and stores are masked off): the
        # merge counts the row's slices itself and never reads that slot's partial.
        has_work = start < seq_len

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
        # WRITE_NEW: the new token (position seq_len - 1) comes from KNew / VNew, not the pool; the CTA whose slice
        # holds it also stores it into the pool. No CTA of this launch reads that slot, so there is no race.
        new_pos = seq_len - 1
        pool_end = tl.minimum(end, new_pos) if WRITE_NEW else end
        m, l, acc = attend_pages(q, k_head, v_head, row_pages, start, pool_end, stride_ks, dims, dim_ok, scale_log2e,
                                 GROUP_PAD, D_PAD, PAGE, BLOCK_N, F32_DOT)
        if WRITE_NEW:
            if (start <= new_pos) & (new_pos < end):
                m, l, acc = attend_new(q, m, l, acc, k_head, v_head, KNew + b * stride_knb + h * stride_knh,
                                       VNew + b * stride_vnb + h * stride_vnh, row_pages, new_pos, stride_ks, dims,
                                       dim_ok, scale_log2e, PAGE)

        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]                                     # (G, D); 0 for an empty slice
        out_ok = row_ok[:, None] & dim_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     out.to(Out.dtype.element_ty), mask=out_ok)
        else:
            lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))  # (G,) log2 units
            base = b * stride_pb + heads * stride_ph + split * stride_ps
            tl.store(PartOut + base[:, None] * HEAD_DIM + dims[None, :], out, mask=out_ok & has_work)
            tl.store(PartLse + base, lse, mask=row_ok & has_work)

    @triton.jit
    def _merge_kernel(
        PartOut, PartLse, Out, QStart, QLen, SplitKeys,
        stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr, BALANCED: tl.constexpr,
    ):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        seq_len, per_split = _row_slices(QStart, QLen, SplitKeys, b, NUM_SPLITS, BLOCK_N, MIN_KEYS, BALANCED)
        splits = tl.arange(0, S_PAD)
        dims = tl.arange(0, D_PAD)
        split_ok = (splits < NUM_SPLITS) & (splits * per_split < seq_len)   # (S,) the slots with a slice of the row
        dim_ok = dims < HEAD_DIM
        base = b * stride_pb + hq * stride_ph + splits * stride_ps      # (S,)
        lse = tl.load(PartLse + base, mask=split_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)                  # empty row: every weight 0
        w = tl.exp2(lse - top)                                          # (S,)
        parts = tl.load(PartOut + base[:, None] * HEAD_DIM + dims[None, :],
                        mask=split_ok[:, None] & dim_ok[None, :], other=0.0)   # (S, D)
        total = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + b * stride_ob + hq * stride_oh + dims, out.to(Out.dtype.element_ty), mask=dim_ok)


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    split_keys: torch.Tensor | None = None,
    block_n: int | None = None,
    min_split_keys: int = MIN_SPLIT_KEYS,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attend each row's one query token over keys [0, q_start[b] + q_len[b]) of its pages.

    Args:
        q: (B, Hq, D) queries, last dim contiguous (any batch / head strides).
        k_pool, v_pool: (Hkv, N * P, D) one layer's pool, contiguous.
        page_table: (>= B, W) int32, physical page of each logical page of row b.
        q_start, q_len: (>= B,) int32; row b holds q_start[b] + q_len[b] keys, its new token included (already in
            the pool, or given as k_new / v_new).
        page_size: P.
        scale: softmax scale.
        num_splits: S, CTAs per (row, kv head) (`decode_splits`); fixed for a CUDA graph.
        k_new, v_new: (B, Hkv, D) the new token of each row (last dims contiguous, other strides free and each
            its own: e.g. views into a fused QKV projection), or None when the pool already holds it. Given, the
            kernel stores them at position q_start[b] + q_len[b] - 1 (q_len must be 1) and attends to them from
            registers: the K/V write costs no launch of its own.
        split_keys: (1,) int tensor, keys per split for every row (`split_keys()`: a long row uses more of its
            num_splits slots than a short one; the kernel never lets a row's slices fall short of covering it),
            or None: each row's keys evenly over all num_splits slots.
        block_n: keys per tile (a power of two >= 16, any page size); min_split_keys: fewest keys a split takes
            (a multiple of block_n); num_warps, num_stages: Triton launch options. None: `launch_options`.
    Returns:
        (B, Hq, D) in q's dtype; 0 for a row with no keys.
    """
    B, Hq, D = q.shape
    Hkv = k_pool.shape[0]
    default = launch_options(q.dtype, D, q.device, B, Hkv)
    block_n = block_n or default["block_n"]
    min_split_keys = max(min_split_keys, block_n)
    if k_new is not None and (v_new is None or k_new.shape != (B, Hkv, D) or v_new.shape != (B, Hkv, D)):
        raise ValueError(f"k_new and v_new must both be (B, Hkv, D) = {(B, Hkv, D)}")
    if min_split_keys % block_n:
        raise ValueError(f"min_split_keys {min_split_keys} must be a multiple of block_n {block_n}")
    meta = launch_meta(q.dtype, q.device, Hq, Hkv, D, page_size, num_splits, block_n, min_split_keys,
                       num_warps or default["num_warps"], num_stages or default["num_stages"],
                       write_new=k_new is not None, balanced=split_keys is not None)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    parts = partials(B, Hq, D, num_splits, q.device)
    return launch(meta, q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, split_keys, scale, out, *parts)


def launch_meta(dtype: torch.dtype, device: torch.device, hq: int, hkv: int, head_dim: int, page_size: int,
                num_splits: int, block_n: int, min_split_keys: int, num_warps: int, num_stages: int, *,
                write_new: bool, balanced: bool) -> tuple[dict, dict | None]:
    """The compile-time constants and launch options of the split kernel, and of the merge (None when S == 1).

    Depends only on the bucket and the head layout: computed once (per bucket) and reused by every launch.
    """
    d_pad = _next_pow2(max(head_dim, 16))
    split = dict(GROUP=hq // hkv, GROUP_PAD=max(16, _next_pow2(hq // hkv)), HEAD_DIM=head_dim, D_PAD=d_pad,
                 PAGE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, MIN_KEYS=min_split_keys,
                 F32_DOT=dtype == torch.float32 or device.type == "cpu", WRITE_NEW=write_new, BALANCED=balanced,
                 num_warps=num_warps, num_stages=num_stages)
    merge = None if num_splits == 1 else dict(
        HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits, S_PAD=_next_pow2(num_splits), BLOCK_N=block_n,
        MIN_KEYS=min_split_keys, BALANCED=balanced, num_warps=4)
    return split, merge


def partials(batch: int, hq: int, head_dim: int, num_splits: int, device: torch.device) -> tuple:
    """(part_out (B, Hq, S, D), part_lse (B, Hq, S)) float32 scratch of the split-KV merge; (None, None) when S == 1."""
    if num_splits == 1:
        return None, None
    return (torch.empty(batch, hq, num_splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch, hq, num_splits, dtype=torch.float32, device=device))


def launch(meta: tuple[dict, dict | None], q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
           k_new: torch.Tensor | None, v_new: torch.Tensor | None, page_table: torch.Tensor, q_start: torch.Tensor,
           q_len: torch.Tensor, split_keys: torch.Tensor | None, scale: float, out: torch.Tensor,
           part_out: torch.Tensor | None, part_lse: torch.Tensor | None) -> torch.Tensor:
    """Launch the split kernel over q's B rows (and the merge when S > 1) with `launch_meta`'s constants.

    Shapes as `paged_decode`, except that the pools may also be (1, Hkv, N * P, D), and q, k_new, v_new and out
    (B, L, H, D) with the token at position 0 (only [:, 0] is read or written: no slicing on the host); out is
    written; part_out / part_lse (>= B, Hq, S, D) / (>= B, Hq, S) from `partials` (rows beyond B are left alone).
    Returns out.
    """
    split_meta, merge_meta = meta
    B, Hq = q.shape[0], q.shape[-2]
    S = split_meta["NUM_SPLITS"]
    if part_out is None:
        part_out = part_lse = out  # unused by the kernel
    # The merge indexes PartOut as (B, Hq, S) rows of D: strides in units of rows.
    sb, sh = Hq * S, S
    k_src, v_src = (q, q) if k_new is None else (k_new, v_new)  # unused when not writing
    keys = q_len if split_keys is None else split_keys
    _split_kernel[(B, k_pool.shape[-3], S)](
        q, k_pool, v_pool, k_src, v_src, page_table, q_start, q_len, keys, out, part_out, part_lse,
        q.stride(0), q.stride(-2), k_pool.stride(-3), k_pool.stride(-2), k_src.stride(0), k_src.stride(-2),
        v_src.stride(0), v_src.stride(-2), page_table.stride(0), out.stride(0), out.stride(-2), sb, sh, 1,
        scale * 1.4426950408889634, **split_meta)
    if merge_meta is not None:
        _merge_kernel[(B, Hq)](part_out, part_lse, out, q_start, q_len, keys, sb, sh, 1, out.stride(0),
                               out.stride(-2), **merge_meta)
    return out
