"""A Triton paged-decode kernel: one query token per sequence over its pages, split-KV, GQA-grouped.

Why it exists (docs/decode-performance-notes.md): FlexAttention over a paged pool cannot make a key tile larger
than a page (page 16 -> 16-key tiles, 2.1x FlashInfer on an H200) and splits KV over the pool instead of each
sequence's length at small batch. This kernel gathers any number of pages into one key tile (a per-key page
lookup) and splits each sequence's own length over a fixed number of CTAs. It serves plain causal decode steps
with no mods; FlexAttention keeps prefill, mods and the eager reference path.

Two launches (FlashInfer style: `decode_splits` once per bucket, `paged_decode` per layer):

    split kernel   grid (B, Hkv, S): CTA (b, h, s) attends the g = Hq / Hkv query heads of kv head h over the
                   s-th of S equal, tile-aligned slices of row b's keys -> partial output and log-sum-exp.
    merge kernel   grid (B, Hq): weights the S partials by their log-sum-exp. Skipped when S == 1 (the split
                   kernel then writes the output itself).

Runs on CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported) so
that the CPU test suite exercises the same kernel source (slowly: a test vehicle, never the CPU default). Products run in float32 (IEEE) for
float32 pools, and under the interpreter for every dtype: its bf16/fp16 `tl.dot` returns garbage (triton
3.8, CPU); the bf16/fp16 tensor-core path is tested on the GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; `available()` says so
    triton = None

#: Smallest slice of keys a split takes: below it the merge costs more than the extra parallelism gains.
MIN_SPLIT_KEYS = 256
#: At most this many splits per (sequence, kv head).
MAX_SPLITS = 64


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton, or the CPU with Triton's interpreter enabled.

    The interpreter must be on before Triton is first imported (TRITON_INTERPRET=1 in the environment): it
    swaps every @triton.jit function, Triton's own helpers included, at definition time.
    """
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and bool(triton.knobs.runtime.interpret)


def decode_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per (sequence, kv head) so that batch x kv heads x splits fills the GPU about twice over.

    Fixed per batch bucket (a CUDA graph freezes the grid); each split's slice follows the row's own length at
    run time, so short rows leave their last splits empty rather than spreading a few keys over many CTAs.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # interpreter: still exercise the merge
    want = math.ceil(2 * sms / (batch * kv_heads))
    most = max(1, math.ceil(max_seq_len / MIN_SPLIT_KEYS))
    return max(1, min(want, most, MAX_SPLITS))


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q, K, V, PageTable, QStart, QLen, Out, PartOut, PartLse,
        stride_qb, stride_qh, stride_kh, stride_ks, stride_pt,
        stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
        scale_log2e,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(QStart + b) + tl.load(QLen + b)             # keys of row b, new token included
        per_split = ((seq_len + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        per_split = tl.maximum(per_split, MIN_KEYS)
        start = split * per_split
        end = tl.minimum(start + per_split, seq_len)

        rows = tl.arange(0, GROUP_PAD)                                  # (G,) query heads of kv head h
        dims = tl.arange(0, D_PAD)                                      # (D,)
        row_ok = rows < GROUP
        dim_ok = dims < HEAD_DIM
        heads = h * GROUP + rows
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)   # (G, D)

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)            # running max (log2 units)
        l = tl.full([GROUP_PAD], 0.0, tl.float32)                           # running sum of exp2
        acc = tl.full([GROUP_PAD, D_PAD], 0.0, tl.float32)                  # running sum of p * v
        k_head = K + h.to(tl.int64) * stride_kh
        v_head = V + h.to(tl.int64) * stride_kh
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)                            # (N,) logical key positions
            key_ok = pos < end
            page = tl.load(PageTable + b * stride_pt + pos // PAGE, mask=key_ok, other=0)
            slot = page.to(tl.int64) * PAGE + pos % PAGE                # (N,) physical slots
            kv_off = slot[:, None] * stride_ks + dims[None, :]
            kv_ok = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_head + kv_off, mask=kv_ok, other=0.0)         # (N, D)
            v = tl.load(v_head + kv_off, mask=kv_ok, other=0.0)         # (N, D)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))                              # (G, N) fp32
            s = tl.where(key_ok[None, :], s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))                         # finite: every tile has a key
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if F32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new

        l_safe = tl.where(l > 0, l, 1.0)
        out = acc / l_safe[:, None]                                     # (G, D); 0 for an empty slice
        out_ok = row_ok[:, None] & dim_ok[None, :]
        if NUM_SPLITS == 1:
            tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     out.to(Out.dtype.element_ty), mask=out_ok)
        else:
            lse = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))  # (G,) log2 units
            base = b * stride_pb + heads * stride_ph + split * stride_ps
            tl.store(PartOut + base[:, None] * HEAD_DIM + dims[None, :], out, mask=out_ok)
            tl.store(PartLse + base, lse, mask=row_ok)

    @triton.jit
    def _merge_kernel(
        PartOut, PartLse, Out,
        stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        splits = tl.arange(0, S_PAD)
        dims = tl.arange(0, D_PAD)
        split_ok = splits < NUM_SPLITS
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


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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
    block_n: int = 64,
    min_split_keys: int = MIN_SPLIT_KEYS,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attend each row's one query token over keys [0, q_start[b] + q_len[b]) of its pages.

    Args:
        q: (B, Hq, D) queries, last dim contiguous (any batch / head strides).
        k_pool, v_pool: (Hkv, N * P, D) one layer's pool, contiguous.
        page_table: (>= B, W) int32, physical page of each logical page of row b.
        q_start, q_len: (>= B,) int32; row b holds q_start[b] + q_len[b] keys (its new token stored already).
        page_size: P.
        scale: softmax scale.
        num_splits: S, CTAs per (row, kv head) (`decode_splits`); fixed for a CUDA graph.
        block_n: keys per tile (a power of two >= 16, any page size); min_split_keys: fewest keys a split takes
            (a multiple of block_n); num_warps, num_stages: Triton launch options.
    Returns:
        (B, Hq, D) in q's dtype; 0 for a row with no keys.
    """
    B, Hq, D = q.shape
    Hkv = k_pool.shape[0]
    if min_split_keys % block_n:
        raise ValueError(f"min_split_keys {min_split_keys} must be a multiple of block_n {block_n}")
    group = Hq // Hkv
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if num_splits > 1:
        part_out = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel
    d_pad = _next_pow2(max(D, 16))
    # The merge indexes PartOut as (B, Hq, S) rows of D: strides in units of rows.
    sb, sh, ss = Hq * num_splits, num_splits, 1
    _split_kernel[(B, Hkv, num_splits)](
        q, k_pool, v_pool, page_table, q_start, q_len, out, part_out, part_lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), sb, sh, ss,
        scale * 1.4426950408889634,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=D, D_PAD=d_pad,
        PAGE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, MIN_KEYS=min_split_keys,
        F32_DOT=q.dtype == torch.float32 or q.device.type == "cpu", num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _merge_kernel[(B, Hq)](
            part_out, part_lse, out, sb, sh, ss, out.stride(0), out.stride(1),
            HEAD_DIM=D, D_PAD=d_pad, NUM_SPLITS=num_splits, S_PAD=_next_pow2(num_splits), num_warps=4)
    return out
