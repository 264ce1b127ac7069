"""The @triton.jit pieces the Triton decode kernels (and the mixed kernel's history pass) share: attend a slice of
one row's pages, and store and attend the row's new token. Running softmax state is (m, l, acc): max (log2 units),
sum of exp2, sum of p * v.

Products run in float32 (IEEE) when F32_DOT (float32 pools, and every dtype under the CPU interpreter, whose
bf16/fp16 `tl.dot` is broken); otherwise q and k go through the tensor cores in their own dtype.
"""

from __future__ import annotations

from paged.kernels.triton_sizing import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def attend_pages(q, k_head, v_head, row_pages, start, end, stride_ks, dims, dim_ok, scale_log2e,
                     GROUP_PAD: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                     F32_DOT: tl.constexpr):
        """Attend q (G, D) over the row's logical keys [start, end), read from the pool through its page-table
        row `row_pages` (a pointer); start is a multiple of BLOCK_N. Returns (m (G,), l (G,), acc (G, D))."""
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.full([GROUP_PAD], 0.0, tl.float32)
        acc = tl.full([GROUP_PAD, D_PAD], 0.0, tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)                            # (N,) logical key positions
            key_ok = pos < end
            if PAGE % BLOCK_N == 0:  # tiles are aligned, so each lies in one page: one lookup, contiguous slots
                page = tl.load(row_pages + n0 // PAGE)
                slot = page.to(tl.int64) * PAGE + n0 % PAGE + tl.arange(0, BLOCK_N)   # (N,) physical slots
            else:                # the tile spans pages: a lookup per key
                page = tl.load(row_pages + pos // PAGE, mask=key_ok, other=0)
                slot = page.to(tl.int64) * PAGE + pos % PAGE
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
        return m, l, acc

    @triton.jit
    def attend_new(q, m, l, acc, k_head, v_head, k_new_ptr, v_new_ptr, row_pages, new_pos, stride_ks, dims, dim_ok,
                   scale_log2e, PAGE: tl.constexpr):
        """Store the row's new token (k_new_ptr / v_new_ptr: its (D,) K and V) at logical position new_pos of the
        pool and fold it into (m, l, acc) from registers. Returns the updated (m, l, acc)."""
        k_new = tl.load(k_new_ptr + dims, mask=dim_ok, other=0.0)   # (D,)
        v_new = tl.load(v_new_ptr + dims, mask=dim_ok, other=0.0)
        page = tl.load(row_pages + new_pos // PAGE)
        slot = page.to(tl.int64) * PAGE + new_pos % PAGE
        tl.store(k_head + slot * stride_ks + dims, k_new, mask=dim_ok)
        tl.store(v_head + slot * stride_ks + dims, v_new, mask=dim_ok)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2e   # (G,)
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp2(m - m_new)
        p_new = tl.exp2(s_new - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        return m_new, l, acc
