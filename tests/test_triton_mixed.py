"""The Triton mixed prefill+decode kernel (paged.kernels.triton_mixed): against float64 attention, and in the cache.

On the CPU it runs under Triton's interpreter (tests/conftest.py), float32 products; tiny shapes keep it fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache, mods
from paged.kernels import choose, flex, sdpa_prefill

triton_mixed = pytest.importorskip("paged.kernels.triton_mixed")
if triton_mixed._mixed_kernel is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
from paged.kernels import triton_decode  # noqa: E402

NAN = float("nan")


def reference(q, k_new, v_new, k_pool, v_pool, table, starts, lens, page, scale, dtype) -> torch.Tensor:
    """Each row's new queries over its history (through its page table) and its new keys, causally, in `dtype` on
    the CPU: (B, L, Hq, D), 0 past each row's q_len."""
    B, L, Hq, D = q.shape
    Hkv = k_pool.shape[0]
    out = torch.zeros(B, L, Hq, D, dtype=dtype)
    for b, (s, n) in enumerate(zip(starts, lens)):
        if n == 0:
            continue
        pos = torch.arange(s)
        slots = table[b, pos // page].long().cpu() * page + pos % page
        K = torch.cat([k_pool.cpu()[:, slots], k_new[b, :n].cpu().transpose(0, 1)], 1).to(dtype)   # (Hkv, s+n, D)
        V = torch.cat([v_pool.cpu()[:, slots], v_new[b, :n].cpu().transpose(0, 1)], 1).to(dtype)
        qb = q[b, :n].cpu().to(dtype).view(n, Hkv, Hq // Hkv, D)
        scores = torch.einsum("jhgd,hkd->jhgk", qb, K) * scale                          # (n, Hkv, G, s+n)
        visible = torch.arange(s + n)[None, :] <= s + torch.arange(n)[:, None]           # (n, s+n)
        p = scores.masked_fill(~visible[:, None, None], -math.inf).softmax(-1)
        out[b, :n] = torch.einsum("jhgk,hkd->jhgd", p, V).reshape(n, Hq, D)
    return out


# (rows (history, new tokens), Hq, Hkv, D, page): GQA 7 and 5 (not powers of two), a GQA group whose 16 tokens
# take two 128-row sub-tiles (9), a head dim not a power of two, pages a multiple of the key tile (one lookup per
# tile) and smaller; a chunk of 70 tokens past its first key tile (the unmasked new-key loop), a fresh row, decode
# rows, a padding row (0 new tokens).
CASES = [
    ([(13, 70), (0, 5), (30, 1), (7, 1), (0, 0)], 14, 2, 64, 64),
    ([(40, 33), (17, 1), (0, 2)], 5, 1, 48, 16),
    ([(5, 17), (9, 1)], 9, 1, 16, 4),
]


def _pools(rows, hkv, d, page, dtype, device, gen):
    """Pools of NaN (free pages, and the unwritten slots of each row's own pages) with each row's history written;
    pages at random. Returns (k_pool, v_pool (Hkv, N * P, D), page table (B, W) int32)."""
    need = [math.ceil((s + n) / page) for s, n in rows]
    num_pages, width = sum(need) + 3, max(need) + 1
    k_pool = torch.full((hkv, num_pages * page, d), NAN, dtype=dtype)
    v_pool = k_pool.clone()
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    perm, used = torch.randperm(num_pages, generator=gen), 0
    for b, ((s, _), k) in enumerate(zip(rows, need)):
        table[b, :k] = perm[used:used + k].int()
        used += k
        pos = torch.arange(s)
        slots = table[b, pos // page].long() * page + pos % page
        k_pool[:, slots] = torch.randn(hkv, s, d, generator=gen).to(dtype)
        v_pool[:, slots] = torch.randn(hkv, s, d, generator=gen).to(dtype)
    return k_pool.to(device), v_pool.to(device), table.to(device)


def _inputs(rows, hq, hkv, d, dtype, device, gen):
    """q (B, L, Hq, D) (a strided view), k / v (B, L, Hkv, D), NaN past each row's new tokens."""
    B, L = len(rows), max(n for _, n in rows)
    q = torch.randn(B, L + 1, hq, d, generator=gen).to(dtype)[:, 1:]
    k, v = (torch.randn(B, L, hkv, d, generator=gen).to(dtype) for _ in "kv")
    for b, (_, n) in enumerate(rows):
        for x in (q, k, v):
            x[b, n:] = NAN
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "Hq{}-Hkv{}-D{}-P{}".format(*c[1:]))
def test_kernel_matches_float64_attention(kernel_device, dtype, case):
    """Outputs within the policy's relative gate, padding outputs exactly 0, NaN padding and poisoned slots never
    read, the new K/V at their slots and nothing else of the pools changed."""
    rows, hq, hkv, d, page = case
    if kernel_device.type == "cuda" and d & (d - 1):
        pytest.skip("CUDA caches take power-of-two head dims only")
    gen = torch.Generator().manual_seed(d + hq)
    k_pool, v_pool, table = _pools(rows, hkv, d, page, dtype, kernel_device, gen)
    q, k, v = _inputs(rows, hq, hkv, d, dtype, kernel_device, gen)
    starts, lens = [s for s, _ in rows], [n for _, n in rows]
    q_start, q_len = (torch.tensor(x, dtype=torch.int32, device=kernel_device) for x in (starts, lens))
    k_before, v_before = k_pool.clone(), v_pool.clone()
    scale = d ** -0.5
    out = triton_mixed.mixed_attention(q, k, v, k_pool, v_pool, table, q_start, q_len, page, scale)

    gold = reference(q, k, v, k_before, v_before, table, starts, lens, page, scale, torch.float64)
    ref = reference(q, k, v, k_before, v_before, table, starts, lens, page, scale, dtype)
    for b, n in enumerate(lens):
        assert not out[b, n:].ne(0).any(), f"row {b}: padding outputs not 0"
        c = compare(out[b, :n], gold[b, :n], ref[b, :n], dtype)
        assert c.ok, f"row {b}: {c.describe()}"
    for before, pool, new in ((k_before, k_pool, k), (v_before, v_pool, v)):
        expect = before.cpu()
        for b, (s, n) in enumerate(rows):
            pos = torch.arange(s, s + n)
            slots = table[b, pos // page].long().cpu() * page + pos % page
            expect[:, slots] = new[b, :n].cpu().transpose(0, 1)
        torch.testing.assert_close(pool.cpu(), expect, rtol=0, atol=0, equal_nan=True)


def test_tile_list():
    """Every row with new tokens gets ceil(q_len / tokens) tiles (a decode row one), most keys first; padding rows
    none; a bucket overflow refused."""
    q_start = np.array([100, 0, 7, 50, 3], np.int32)
    q_len = np.array([20, 40, 1, 1, 0], np.int32)
    cols = 8
    tiles, used = np.full((2, cols), -7, np.int32), np.zeros(1, np.int32)
    triton_mixed.fill_tiles(q_start, q_len, tiles, used, cols)
    assert used.tolist() == [7]
    assert sorted(zip(tiles[0, :7].tolist(), tiles[1, :7].tolist())) == [(0, 0), (0, 16), (1, 0), (1, 16), (1, 32),
                                                                        (2, 0), (3, 0)]
    keys = [q_start[r] + f for r, f in zip(tiles[0, :7], tiles[1, :7])]
    assert keys == sorted(keys, reverse=True) and keys[:3] == [116, 100, 50]
    assert tiles[:, 7].tolist() == [-7, -7]
    with pytest.raises(ValueError, match="do not fit"):
        triton_mixed.fill_tiles(q_start, q_len, tiles, used, 6)
    triton_mixed.fill_tiles(q_start, q_len, tiles, used, cols, tokens=32)       # the sweeps' larger tiles
    assert used.tolist() == [5]
    assert sorted(zip(tiles[0, :5].tolist(), tiles[1, :5].tolist())) == [(0, 0), (1, 0), (1, 32), (2, 0), (3, 0)]


def test_tile_options_and_grid_sizes_compute_the_same_attention(kernel_device):
    """The tile's query count and the persistent grid are parameters (scripts/gpu_sweep19.py): 32- and 64-query
    tiles, with one CTA drawing every unit and with more CTAs than units, give the default's outputs and pool writes
    (float32), and leave the work counter at 0. (Sub-tiles: CASES[2], a group of 9.)"""
    rows, hq, hkv, d, page = [(37, 70), (0, 45), (90, 1), (12, 33), (0, 0)], 4, 2, 32, 16
    gen = torch.Generator().manual_seed(5)
    k_pool, v_pool, table = _pools(rows, hkv, d, page, torch.float32, kernel_device, gen)
    q, k, v = _inputs(rows, hq, hkv, d, torch.float32, kernel_device, gen)
    q_start = torch.tensor([s for s, _ in rows], dtype=torch.int32, device=kernel_device)
    q_len = torch.tensor([n for _, n in rows], dtype=torch.int32, device=kernel_device)
    want = triton_mixed.mixed_attention(q, k, v, k_pool, v_pool, table, q_start, q_len, page, d ** -0.5)
    assert not want[4].ne(0).any() and not want[2, 1:].ne(0).any()
    pools = k_pool.clone(), v_pool.clone()
    B, L = len(rows), q.shape[1]
    sms = triton_mixed._sm_count(kernel_device)
    for tokens, ctas_per_sm in ((32, 1 / sms), (64, 200)):
        cols = triton_mixed.chunk_columns(B, L, tokens)
        tiles, used = np.zeros((2, cols), np.int32), np.zeros(1, np.int32)
        triton_mixed.fill_tiles(q_start.cpu().numpy(), q_len.cpu().numpy(), tiles, used, cols, tokens)
        state = triton_mixed.launch_state(torch.float32, kernel_device, hq, hkv, d, page, tokens=tokens,
                                          ctas_per_sm=ctas_per_sm)
        got, kp, vp = torch.full_like(q, NAN).contiguous(), k_pool.clone(), v_pool.clone()
        counter = torch.zeros(2, dtype=torch.int32, device=kernel_device)
        triton_mixed.launch(state, q, kp, vp, k, v, table, q_start, q_len, torch.from_numpy(tiles).to(kernel_device),
                            torch.from_numpy(used).to(kernel_device), counter, d ** -0.5, got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kp, pools[0], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(vp, pools[1], rtol=0, atol=0, equal_nan=True)
        assert counter.tolist() == [0, 0]


def test_padding_over_several_zero_blocks_is_zeroed_launch_after_launch(kernel_device):
    """Rows whose padding spans several zero units (L x Hq x D > ZERO_ELEMS), into a NaN-filled output, three
    launches on one counter (a cache's layers): every padding element 0, the real positions as the reference, the
    counter back at 0 after each launch."""
    from paged.kernels.triton_mixed_source import ZERO_ELEMS
    rows, hq, hkv, d, page = [(5, 40), (3, 1), (0, 0)], 8, 2, 64, 16
    L = 300
    assert ZERO_ELEMS < L * hq * d <= 2 * ZERO_ELEMS                                   # 2 zero blocks per row
    gen = torch.Generator().manual_seed(7)
    k_pool, v_pool, table = _pools(rows, hkv, d, page, torch.float32, kernel_device, gen)
    q, k, v = _inputs(rows, hq, hkv, d, torch.float32, kernel_device, gen)
    pad = (lambda x: torch.cat([x, torch.full((3, L - x.shape[1], *x.shape[2:]), NAN, device=x.device)], 1))
    q, k, v = pad(q), pad(k), pad(v)
    starts, lens = [s for s, _ in rows], [n for _, n in rows]
    q_start, q_len = (torch.tensor(x, dtype=torch.int32, device=kernel_device) for x in (starts, lens))
    gold = reference(q, k, v, k_pool, v_pool, table, starts, lens, page, d ** -0.5, torch.float64)
    cols = triton_mixed.chunk_columns(3, L)
    tiles, used = np.zeros((2, cols), np.int32), np.zeros(1, np.int32)
    triton_mixed.fill_tiles(np.array(starts, np.int32), np.array(lens, np.int32), tiles, used, cols)
    state = triton_mixed.launch_state(torch.float32, kernel_device, hq, hkv, d, page)
    counter = torch.zeros(2, dtype=torch.int32, device=kernel_device)
    for _ in range(3):
        out = torch.full(q.shape, NAN, device=kernel_device)
        triton_mixed.launch(state, q, k_pool, v_pool, k, v, table, q_start, q_len,
                            torch.from_numpy(tiles).to(kernel_device), torch.from_numpy(used).to(kernel_device),
                            counter, d ** -0.5, out)
        assert counter.tolist() == [0, 0]
        for b, n in enumerate(lens):
            assert out[b, n:].eq(0).all(), f"row {b}: padding not 0"
            torch.testing.assert_close(out[b, :n].double().cpu(), gold[b, :n], rtol=1e-4, atol=1e-4)


def test_launch_refuses_an_output_it_cannot_zero_by_rows(kernel_device):
    """The zero units write each position's (Hq, D) as one flat run: a strided output is refused up front."""
    state = triton_mixed.launch_state(torch.float32, kernel_device, 4, 2, 32, 16)
    q = torch.zeros(1, 4, 4, 32, device=kernel_device)
    out = torch.zeros(1, 4, 8, 32, device=kernel_device)[:, :, ::2]
    one = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    with pytest.raises(ValueError, match="contiguous per position"):
        triton_mixed.launch(state, q, q, q, q, q, one[None], one, one, one[None].expand(2, 1), one, one.repeat(2),
                            1.0, out)
    with pytest.raises(ValueError, match="does not fit this launch state"):
        triton_mixed.launch(state, q, q, q, q, q, one[None], one, one, one[None].expand(2, 1), one, one.repeat(2),
                            1.0, torch.zeros(1, 4, 2, 32, device=kernel_device))
    huge = torch.zeros(2 ** 31 // (4 * 32), 4, 32, device="meta")[None]                # a row of 2**31 elements
    with pytest.raises(ValueError, match="32-bit row offsets"):
        triton_mixed.launch(state, q, q, q, q, q, one[None], one, one, one[None].expand(2, 1), one, one.repeat(2),
                            1.0, huge)


def test_choose_sends_mixed_steps_to_the_mixed_kernel_beside_triton_decode():
    mixed = triton_mixed
    assert choose(triton_decode, 5, fresh=False) is mixed
    assert choose(triton_decode, 5, prefill=sdpa_prefill, fresh=True) is sdpa_prefill
    assert choose(triton_decode, 1) is triton_decode
    assert choose(triton_decode, 5, mods.causal) is flex
    assert choose(flex, 5) is flex


def _step(caches, ids, lens, spec, hq, gen, padded_to=None):
    """Plan and run one layer of one step on every cache with the same inputs (NaN padding; `padded_to` rows of
    garbage past the batch for the caches that take the padded batch). Returns the plans and outputs."""
    B, L = len(ids), max(lens)
    q, k, v = _inputs(list(zip([0] * B, lens)), hq, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.device, gen)
    plans = [c.plan(ids, lens) for c in caches]
    outs = []
    for c, p in zip(caches, plans):
        if padded_to and getattr(getattr(p, "kernel_plan", None), "padded_batch", None) == padded_to:
            extra = (padded_to - B, L)
            pad = [torch.randn(*extra, x.shape[2], x.shape[3], generator=gen).to(x) for x in (q, k, v)]
            out = c.run(0, *(torch.cat([x, y]) for x, y in zip((q, k, v), pad)))
            assert not out[B:].ne(0).any(), "padding rows not 0"
            outs.append(out[:B])
        else:
            outs.append(c.run(0, q, k, v))
    return plans, outs


def test_cache_runs_mixed_steps_on_the_mixed_kernel(kernel_device):
    """decode_kernel="triton": mixed steps (a row joining rows with history, a chunk after a fork, the bucket's
    padded batch) take `triton_mixed` and match the oracle in float64 terms and eager FlexAttention's cache."""
    spec = CacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=16, num_pages=24, max_seq_len=128,
                     device=kernel_device)
    hq = 6
    tri = PagedKVCache(spec, decode_kernel="triton", policy="random", seed=1, poison_free_pages=True)
    flx = PagedKVCache(spec, attention="eager", decode_kernel="flex", prefill_kernel="flex", policy="random", seed=2)
    gold, ref = ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=spec.dtype)
    everyone = (tri, flx, gold, ref)
    gen = torch.Generator().manual_seed(4)
    steps = [("admit", "a"), ("admit", "b"), (["a", "b"], [9, 20]), ("admit", "c"), (["a", "b", "c"], [1, 1, 21]),
             ("fork", "a", "d"), (["d", "c", "a"], [5, 1, 1]), ("finish", "b"), (["c", "a", "d"], [3, 2, 1]),
             (["c", "d"], [4, 3])]              # chunks only
    kernels = []
    for s in steps:
        if isinstance(s[0], str):
            for c in everyone:
                getattr(c, s[0])(*s[1:])
            continue
        ids, lens = s
        (plan, *_), (out, flex_out, g, r) = _step(everyone, ids, lens, spec, hq, gen, padded_to=4)
        kernels.append(plan.kernel)
        for b, n in enumerate(lens):
            assert not out[b, n:].ne(0).any()
            assert compare(out[b, :n], g[b, :n], r[b, :n], spec.dtype).ok, (ids, lens, b)
        torch.testing.assert_close(out, flex_out, rtol=1e-5, atol=1e-5)
    assert kernels == ["sdpa_prefill", "triton_mixed", "triton_mixed", "triton_mixed", "triton_mixed"]
