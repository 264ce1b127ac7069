"""The @triton.jit source of the mixed prefill+decode kernel (`triton_mixed`): tiles of a row's new queries against
the row's history (through the page table) and its own new keys (from the inputs), the tiles' new K/V stored into
the pool and the output's padding zeroed, all in one launch.

    grid (NP,)  persistent CTAs that take work units from a shared counter (`Counter[0]`, one atomic add per unit)
                until none is left, so a CTA that drew short tiles takes more of them: the tiles come longest first,
                and grabbing them in that order places them as a longest-first greedy schedule would (a fixed
                round-robin share left CTAs idle for up to 1.3x the mean work at 16 rows of 128-token chunks).
                Units, in order:
      tiles     u < used x HKV x SUB: tile u // (HKV x SUB) of the list (row Tiles[0, i], its new tokens
                [q0, q0 + TOKENS), q0 = Tiles[1, i]) for kv head h and sub-tile s of u % (HKV x SUB) = h x SUB + s
      zeros     the rest, rows x zero_blocks: block j of ZERO_ELEMS elements of row b's output past its q_len
    The last CTA to finish (`Counter[1]`) sets both counters back to 0 for the next launch.

The tile's M dimension packs (query token, query head) pairs of kv head h: M row r is token r // GROUP, head
h * GROUP + r % GROUP, for r in [sub * BLOCK_M, (sub + 1) * BLOCK_M) of TOKENS * GROUP (SUB sub-tiles when one
BLOCK_M cannot hold them; a sub-tile past the tile's real tokens does nothing). Group sizes need not be powers of
two (7: 16 tokens x 7 heads = 112 of 128 rows used). A row of one new token (a decode row) is a tile of one token.

Keys of the tile, in order (online softmax, running max in log2 units, float32 statistics):
  history   logical positions [0, q_start) of the row, from the pool through its page-table row (`attend_pages`)
  new keys  the row's new tokens [0, diag) from KNew / VNew, every query sees them (no mask), then
            [diag, min(q0 + TOKENS, q_len)) with the causal mask (the diagonal tiles only); diag = q0 rounded
            down to BLOCK_N.
New keys are read from the inputs, never from the pool: the launch stores them (each tile its own TOKENS
tokens, sub-tile 0 of each kv head), so no CTA reads a slot another CTA writes. Padding positions of the inputs
(past q_len) are never loaded: they may hold NaN / Inf. Out is written at the tile's real tokens by the tiles and
past them by the zero units (Out's (Hq, D) per position contiguous): every element once.
"""

from __future__ import annotations

from paged.kernels.triton_sizing import triton
from paged.kernels.triton_tiles import attend_pages

_mixed_kernel = None  # without Triton (the module then only imports)
#: Output elements a zero unit covers (256 KB at 2 bytes), and per store.
ZERO_ELEMS = 1 << 17
ZERO_STORE = 2048

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
    def _tile(Q, K, V, KNew, VNew, PageTable, QStart, QLen, Tiles, Out, i, h, sub,
              stride_qb, stride_ql, stride_qh, stride_kh, stride_ks, stride_knb, stride_knl, stride_knh,
              stride_vnb, stride_vnl, stride_vnh, stride_pt, stride_ob, stride_ol, stride_oh, tile_cols, scale_log2e,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr, TOK_PAD: tl.constexpr,
              F32_DOT: tl.constexpr):
        """Tile i of the list for kv head h, sub-tile sub (module docstring)."""
        b = tl.load(Tiles + i)
        q0 = tl.load(Tiles + tile_cols + i)
        b64 = b.to(tl.int64)
        start = tl.load(QStart + b)
        n = tl.load(QLen + b)
        if sub * BLOCK_M < (tl.minimum(q0 + TOKENS, n) - q0) * GROUP:      # the sub-tile holds real queries
            r = sub * BLOCK_M + tl.arange(0, BLOCK_M)                       # (M,) packed (token, head) rows
            tok = r // GROUP                                                # (M,) token of the tile
            heads = h * GROUP + r % GROUP                                   # (M,) query head
            dims = tl.arange(0, D_PAD)                                      # (D,)
            dim_ok = dims < HEAD_DIM
            k_head = K + h.to(tl.int64) * stride_kh
            v_head = V + h.to(tl.int64) * stride_kh
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

    @triton.jit
    def _zero(Out, QLen, b, j, stride_ob, stride_ol, out_len, ZERO_ELEMS: tl.constexpr,
              ZERO_STORE: tl.constexpr):
        """Zero block j (ZERO_ELEMS elements; a position is stride_ol of them) of row b's output past its q_len.
        (Starting the stores on a ZERO_STORE boundary, for vector-wide stores, was 0.5-2.3% slower in each of 13
        same-call comparisons, results/h200-2026-12-03c call4, on steps without padding too.)"""
        n = tl.load(QLen + b)
        lo = tl.maximum(j * ZERO_ELEMS, n * stride_ol)
        hi = tl.minimum((j + 1) * ZERO_ELEMS, out_len * stride_ol)
        row = Out + b.to(tl.int64) * stride_ob
        for e in range(lo, hi, ZERO_STORE):
            idx = e + tl.arange(0, ZERO_STORE)
            tl.store(row + idx, tl.zeros([ZERO_STORE], Out.dtype.element_ty), mask=idx < hi)

    @triton.jit
    def _mixed_kernel(
        Q, K, V, KNew, VNew, PageTable, QStart, QLen, Tiles, Used, Counter, Out,
        stride_qb, stride_ql, stride_qh, stride_kh, stride_ks, stride_knb, stride_knl, stride_knh,
        stride_vnb, stride_vnl, stride_vnh, stride_pt, stride_ob, stride_ol, stride_oh, tile_cols,
        out_rows, out_len, zero_blocks, scale_log2e,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr, TOK_PAD: tl.constexpr,
        SUB: tl.constexpr, HKV: tl.constexpr, F32_DOT: tl.constexpr, ZERO_ELEMS: tl.constexpr,
        ZERO_STORE: tl.constexpr,
    ):
        tile_units = tl.load(Used) * (HKV * SUB)
        units = tile_units + out_rows * zero_blocks
        u = tl.atomic_add(Counter, 1)
        while u < units:
            if u < tile_units:
                hs = u % (HKV * SUB)
                _tile(Q, K, V, KNew, VNew, PageTable, QStart, QLen, Tiles, Out, u // (HKV * SUB), hs // SUB,
                      hs % SUB, stride_qb, stride_ql, stride_qh, stride_kh, stride_ks, stride_knb, stride_knl,
                      stride_knh, stride_vnb, stride_vnl, stride_vnh, stride_pt, stride_ob, stride_ol, stride_oh,
                      tile_cols, scale_log2e, GROUP, HEAD_DIM, D_PAD, PAGE, BLOCK_M, BLOCK_N, TOKENS, TOK_PAD,
                      F32_DOT)
            else:
                z = u - tile_units
                _zero(Out, QLen, z // zero_blocks, z % zero_blocks, stride_ob, stride_ol, out_len, ZERO_ELEMS,
                      ZERO_STORE)
            u = tl.atomic_add(Counter, 1)
        # Every CTA has drawn its last unit before it counts itself done: the last one resets both counters.
        if tl.atomic_add(Counter + 1, 1) == tl.num_programs(0) - 1:
            tl.atomic_xchg(Counter, 0)
            tl.atomic_xchg(Counter + 1, 0)
