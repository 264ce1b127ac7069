"""The @triton.jit source of the mixed prefill+decode kernel (`triton_mixed`): one tile of a row's new queries
against the row's history (through the page table) and its own new keys (from the inputs), with the tile's new K/V
stored into the pool in the same launch.

    grid (Hkv x SUB, NP)  CTA (h, sub, p) takes the section's tiles p, p + NP, p + 2NP, ... < used[SECTION] (a
                          persistent loop: the section's fixed length never costs idle CTAs). Tile i is row
                          Tiles[0, first_tile + i], queries [q0, q0 + TOKENS) of its new tokens, q0 = Tiles[1, ...].

The tile's M dimension packs (query token, query head) pairs of kv head h: M row r is token r // GROUP, head
h * GROUP + r % GROUP, for r in [sub * BLOCK_M, (sub + 1) * BLOCK_M) of TOKENS * GROUP (SUB sub-tiles when one
BLOCK_M cannot hold them). Group sizes need not be powers of two (7: 16 tokens x 7 heads = 112 of 128 rows used).

Keys of the tile, in order (online softmax, running max in log2 units, float32 statistics):
  history   logical positions [0, q_start) of the row, from the pool through its page-table row (`attend_pages`)
  new keys  the row's new tokens [0, diag) from KNew / VNew, every query sees them (no mask), then
            [diag, min(q0 + TOKENS, q_len)) with the causal mask (the diagonal tiles only); diag = q0 rounded
            down to BLOCK_N.
New keys are read from the inputs, never from the pool: the launch stores them (each tile its own TOKENS
tokens, sub-tile 0 of each kv head), so no CTA reads a slot another CTA writes. Padding positions of the inputs
(past q_len) are never loaded: they may hold NaN / Inf. Out is written at the tile's real tokens only.
"""

from __future__ import annotations

from paged.kernels.triton_sizing import triton
from paged.kernels.triton_tiles import attend_pages

_mixed_kernel = None  # without Triton (the module then only imports)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _attend_inputs(q, m, l, acc, k_row, v_row, stride_kl, stride_vl, lo, hi, qidx, dims, dim_ok, scale_log2e,
                       BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr, CAUSAL: tl.constexpr):
        """Fold the row's new keys [lo, hi) (indices among its new tokens; k_row / v_row point at its first, rows
        stride_kl / stride_vl apart) into (m (M,), l (M,), acc (M, D)). CAUSAL: M row r sees key j iff
        j <= qidx[r]. lo is a multiple of BLOCK_N. A row that sees no key yet keeps m = -inf, l = 0, acc = 0."""
        for n0 in range(lo, hi, BLOCK_N):
            idx = n0 + tl.arange(0, BLOCK_N)                                # (N,) new-token indices
            key_ok = idx < hi
            kv_ok = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_row + idx[:, None] * stride_kl + dims[None, :], mask=kv_ok, other=0.0)   # (N, D)
            v = tl.load(v_row + idx[:, None] * stride_vl + dims[None, :], mask=kv_ok, other=0.0)   # (N, D)
            if F32_DOT:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))                                  # (M, N) fp32
            if CAUSAL:
                ok = key_ok[None, :] & (idx[None, :] <= qidx[:, None])       # (M, N)
            else:
                ok = key_ok[None, :] & (qidx[:, None] >= 0)
            s = tl.where(ok, s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)           # a row without keys so far: no NaN
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            l = l * alpha + tl.sum(p, 1)
            if F32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        return m, l, acc

    @triton.jit
    def _store_tokens(k_head, v_head, k_row, v_row, stride_kl, stride_vl, row_pages, start, q0, n, stride_ks, dims,
                      dim_ok, PAGE: tl.constexpr, TOKENS: tl.constexpr, TOK_PAD: tl.constexpr):
        """Store the row's new tokens [q0, q0 + TOKENS) (those < n) of one kv head at logical positions start + j."""
        t = tl.arange(0, TOK_PAD)
        j = q0 + t                                                          # (T,) new-token indices
        ok = (t < TOKENS) & (j < n)
        pos = start + j
        page = tl.load(row_pages + pos // PAGE, mask=ok, other=0)
        slot = page.to(tl.int64) * PAGE + pos % PAGE                        # (T,) physical slots
        io = ok[:, None] & dim_ok[None, :]
        kn = tl.load(k_row + j[:, None] * stride_kl + dims[None, :], mask=io, other=0.0)   # (T, D)
        vn = tl.load(v_row + j[:, None] * stride_vl + dims[None, :], mask=io, other=0.0)
        tl.store(k_head + slot[:, None] * stride_ks + dims[None, :], kn, mask=io)
        tl.store(v_head + slot[:, None] * stride_ks + dims[None, :], vn, mask=io)

    @triton.jit
    def _mixed_kernel(
        Q, K, V, KNew, VNew, PageTable, QStart, QLen, Tiles, Used, Out,
        stride_qb, stride_ql, stride_qh, stride_kh, stride_ks, stride_knb, stride_knl, stride_knh,
        stride_vnb, stride_vnl, stride_vnh, stride_pt, stride_ob, stride_ol, stride_oh, first_tile, tile_cols,
        scale_log2e,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr, TOK_PAD: tl.constexpr,
        SUB: tl.constexpr, SECTION: tl.constexpr, F32_DOT: tl.constexpr,
    ):
        h = tl.program_id(0) // SUB
        sub = tl.program_id(0) % SUB
        used = tl.load(Used + SECTION)
        r = sub * BLOCK_M + tl.arange(0, BLOCK_M)                           # (M,) packed (token, head) rows
        tok = r // GROUP                                                    # (M,) token of the tile
        heads = h * GROUP + r % GROUP                                       # (M,) query head
        dims = tl.arange(0, D_PAD)                                          # (D,)
        dim_ok = dims < HEAD_DIM
        k_head = K + h.to(tl.int64) * stride_kh
        v_head = V + h.to(tl.int64) * stride_kh
        for i in range(tl.program_id(1), used, tl.num_programs(1)):
            b = tl.load(Tiles + first_tile + i)
            q0 = tl.load(Tiles + tile_cols + first_tile + i)
            b64 = b.to(tl.int64)
            start = tl.load(QStart + b)
            n = tl.load(QLen + b)
            qidx = q0 + tok                                                 # (M,) new-token index of each row
            row_ok = (tok < TOKENS) & (qidx < n)
            io = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(Q + b64 * stride_qb + qidx[:, None] * stride_ql + heads[:, None] * stride_qh + dims[None, :],
                        mask=io, other=0.0)                                 # (M, D)
            row_pages = PageTable + b64 * stride_pt
            m, l, acc = attend_pages(q, k_head, v_head, row_pages, 0, start, stride_ks, dims, dim_ok, scale_log2e,
                                     BLOCK_M, D_PAD, PAGE, BLOCK_N, F32_DOT)
            k_row = KNew + b64 * stride_knb + h * stride_knh
            v_row = VNew + b64 * stride_vnb + h * stride_vnh
            diag = q0 // BLOCK_N * BLOCK_N
            m, l, acc = _attend_inputs(q, m, l, acc, k_row, v_row, stride_knl, stride_vnl, 0, diag, qidx, dims,
                                       dim_ok, scale_log2e, BLOCK_N, F32_DOT, False)
            m, l, acc = _attend_inputs(q, m, l, acc, k_row, v_row, stride_knl, stride_vnl, diag,
                                       tl.minimum(q0 + TOKENS, n), qidx, dims, dim_ok, scale_log2e, BLOCK_N, F32_DOT,
                                       True)
            if sub == 0:
                _store_tokens(k_head, v_head, k_row, v_row, stride_knl, stride_vnl, row_pages, start, q0, n,
                              stride_ks, dims, dim_ok, PAGE, TOKENS, TOK_PAD)
            out = acc / tl.where(l > 0, l, 1.0)[:, None]                    # (M, D)
            tl.store(Out + b64 * stride_ob + qidx[:, None] * stride_ol + heads[:, None] * stride_oh + dims[None, :],
                     out.to(Out.dtype.element_ty), mask=io)
