"""The Triton paged-decode kernel (paged.triton_decode): against float64 attention, and inside the cache.

On the CPU the kernel runs under Triton's interpreter (tests/conftest.py turns it on when no GPU is visible),
so these tests run the same kernel source as the GPU, with float32 products (the interpreter's bf16 `tl.dot`
is broken); on the GPU bf16 and fp16 go through the tensor cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.policy import compare
from paged import CacheSpec, PagedKVCache, mods
from paged.errors import InvalidRequestError, UnsupportedConfigError
from tests.test_eager_vs_compiled import Twins

triton_decode = pytest.importorskip("paged.triton_decode")
if triton_decode.triton is None:
    pytest.skip("Triton is not installed", allow_module_level=True)


def reference(q, k_pool, v_pool, table, lens, page, scale, dtype=torch.float64) -> torch.Tensor:
    """softmax(q K^T * scale) V over each row's first lens[b] keys, gathered through its page table, computed in
    `dtype` on the CPU: (B, Hq, D)."""
    B, Hq, D = q.shape
    Hkv = k_pool.shape[0]
    out = torch.zeros(B, Hq, D, dtype=dtype)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = table[b, pos // page].long().cpu() * page + pos % page
        K, V = k_pool.cpu()[:, slots].to(dtype), v_pool.cpu()[:, slots].to(dtype)   # (Hkv, n, D)
        qb = q[b].cpu().to(dtype).view(Hkv, Hq // Hkv, D)
        p = (torch.einsum("hgd,hnd->hgn", qb, K) * scale).softmax(-1)
        out[b] = torch.einsum("hgn,hnd->hgd", p, V).reshape(Hq, D)
    return out


# (batch, Hq, Hkv, D, page, splits, block_n): GQA groups 1, 2, 4 and 3 (not a power of two), head dims that are
# not powers of two, one split and several; pages a multiple of the key tile (one page lookup per tile), smaller
# than the tile, and larger but not a multiple (48 / 32, 24 / 16: tiles straddle pages, a lookup per key).
CASES = [
    (3, 8, 2, 32, 16, 1, 16),
    (3, 8, 2, 32, 4, 3, 16),
    (2, 4, 4, 16, 32, 2, 16),
    (4, 6, 2, 24, 8, 4, 32),
    (2, 16, 4, 64, 64, 5, 32),
    (2, 8, 2, 32, 48, 3, 32),
    (3, 4, 1, 16, 24, 2, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-P{}-S{}-N{}".format(*c))
def test_kernel_matches_float64_attention(kernel_device, dtype, case):
    """Pages scattered at random, an empty row, rows whose keys spread over every split, strided queries."""
    B, Hq, Hkv, D, page, splits, block_n = case
    if kernel_device.type == "cuda" and D & (D - 1):
        pytest.skip("CUDA caches take power-of-two head dims only")
    gen = torch.Generator().manual_seed(sum(case))
    num_pages = 64
    k_pool = torch.randn(Hkv, num_pages * page, D, generator=gen).to(dtype).to(kernel_device)
    v_pool = torch.randn(Hkv, num_pages * page, D, generator=gen).to(dtype).to(kernel_device)
    q_full = torch.randn(B, 3, Hq, D, generator=gen).to(dtype).to(kernel_device)
    q = q_full[:, 1]                                                 # (B, Hq, D), batch stride 3 * Hq * D
    cap = num_pages * page // B
    lens = [0] + [int(n) for n in torch.randint(1, cap, (B - 1,), generator=gen)]
    lens[-1] = cap                                                   # a long row: every split gets keys
    table = torch.full((B + 1, num_pages), -1, dtype=torch.int32)   # one padding row past the batch
    perm, used = torch.randperm(num_pages, generator=gen), 0
    for b, n in enumerate(lens):
        k = math.ceil(n / page)
        table[b, :k] = perm[used:used + k].int()
        used += k
    q_start = torch.tensor([max(n - 1, 0) for n in lens] + [0], dtype=torch.int32)
    q_len = torch.tensor([min(n, 1) for n in lens] + [0], dtype=torch.int32)
    scale = 0.7 / math.sqrt(D)
    out = triton_decode.paged_decode(q, k_pool, v_pool, table.to(kernel_device), q_start.to(kernel_device),
                                     q_len.to(kernel_device), page, scale, splits, block_n=block_n,
                                     min_split_keys=block_n)
    assert out.shape == (B, Hq, D) and out.dtype == dtype
    gold = reference(q, k_pool, v_pool, table, lens, page, scale)
    same_dtype = reference(q, k_pool, v_pool, table, lens, page, scale, dtype)
    result = compare(out, gold, same_dtype, dtype)      # the conformance suite's policy
    assert result.ok, result.describe()
    assert torch.all(out[0] == 0), "a row with no keys must come out 0"


def test_empty_splits_and_one_split_agree(kernel_device):
    """Short rows leave later splits empty; the merge must weigh them 0. Same answer for 1 and 7 even splits,
    and for 7 split slots with any keys per split: a long row then takes more slots than a short one; too few
    keys per split to cover a row with 7 slots fall back to the even split; 160 keys cover every row in one."""
    gen = torch.Generator().manual_seed(5)
    k_pool, v_pool = (torch.randn(2, 40 * 16, 32, generator=gen).to(kernel_device) for _ in range(2))
    q = torch.randn(3, 4, 32, generator=gen).to(kernel_device)
    table = torch.randperm(40, generator=gen)[:30].view(3, 10).int()
    lens = [1, 21, 151]
    q_start = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=kernel_device)
    q_len = torch.ones(3, dtype=torch.int32, device=kernel_device)
    gold = reference(q, k_pool, v_pool, table, lens, 16, 0.2).to(kernel_device)

    def decode(splits, keys=None, min_keys=32):
        keys = None if keys is None else torch.tensor([keys], device=kernel_device)
        return triton_decode.paged_decode(q, k_pool, v_pool, table.to(kernel_device), q_start, q_len, 16, 0.2,
                                          splits, block_n=16, min_split_keys=min_keys, split_keys=keys)

    one = decode(1)
    assert (one.double() - gold).abs().max().item() <= 1e-5
    for splits, keys in ((7, None), (7, 1), (7, 32), (7, 48), (7, 160)):
        assert (decode(splits, keys) - one).abs().max().item() <= 1e-6, (splits, keys)
    # 16-key slices over 7 slots cover 112 of the longest row's 151 keys: only the kernel's even-split floor
    # (ceil(151 / 7) -> 32 keys per slice) keeps its last 39 keys in.
    assert (decode(7, 16, min_keys=16) - one).abs().max().item() <= 1e-6
    # The slices really follow split_keys: one slice per row is the 1-split sum exactly; 7 even slices are not.
    assert torch.equal(decode(7, 160), one) and not torch.equal(decode(7), one)


def test_unused_split_slots_are_never_read(kernel_device, monkeypatch):
    """The split kernel writes no partial for a slot past a row's last slice, so the merge must not read one:
    with every partial buffer born NaN, a row that leaves slots unused must still come out right."""
    gen = torch.Generator().manual_seed(6)
    k_pool, v_pool = (torch.randn(2, 40 * 16, 32, generator=gen).to(kernel_device) for _ in range(2))
    q = torch.randn(4, 4, 32, generator=gen).to(kernel_device)
    table = torch.randperm(40, generator=gen)[:40].view(4, 10).int().to(kernel_device)
    lens = [0, 1, 40, 151]                                   # a padding row, then rows using 0-5 of 7 slots
    q_start = torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.int32, device=kernel_device)
    q_len = torch.tensor([min(n, 1) for n in lens], dtype=torch.int32, device=kernel_device)
    gold = reference(q, k_pool, v_pool, table.cpu(), lens, 16, 0.2).to(kernel_device)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    for keys in (None, 32):                                  # even slices, and balanced 32-key slices
        keys = None if keys is None else torch.tensor([keys], device=kernel_device)
        out = triton_decode.paged_decode(q, k_pool, v_pool, table, q_start, q_len, 16, 0.2, 7, block_n=16,
                                         min_split_keys=32, split_keys=keys)
        assert torch.isfinite(out).all(), "the merge read a partial no split wrote"
        assert (out.double() - gold).abs().max().item() <= 1e-5


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 40_000), min_size=1, max_size=64), kv_heads=st.sampled_from([1, 2, 8, 32]),
       num_splits=st.integers(1, triton_decode.MAX_SPLITS))
def test_split_keys_covers_every_row_and_never_lengthens_the_longest_slice(lengths, kv_heads, num_splits):
    """Every row fits its slots; no slice is shorter than MIN_SPLIT_KEYS; the longest row's slices (the step's
    critical path) are never longer than with the even split of CTAS_PER_SM x SMs CTAs over the rows."""
    cpu = torch.device("cpu")
    keys = triton_decode.split_keys(lengths, kv_heads, num_splits, cpu)
    longest = max(lengths)
    assert keys >= triton_decode.MIN_SPLIT_KEYS
    assert math.ceil(longest / keys) <= num_splits
    even = math.ceil(triton_decode.CTAS_PER_SM * triton_decode._sm_count(cpu) / (len(lengths) * kv_heads))
    assert keys <= max(triton_decode.MIN_SPLIT_KEYS, math.ceil(longest / min(even, num_splits)))


@pytest.mark.parametrize("splits", [1, 4])
def test_fused_write_stores_the_new_token_and_attends_to_it(kernel_device, splits):
    """k_new / v_new given: the pool gains exactly the new tokens' slots, and the output equals attending over a
    pool that already held them (the new token is the last key, inside the last non-empty split)."""
    gen = torch.Generator().manual_seed(9)
    B, Hq, Hkv, D, page = 3, 8, 2, 32, 16
    k_pool, v_pool = (torch.randn(Hkv, 30 * page, D, generator=gen).to(kernel_device) for _ in range(2))
    table = torch.randperm(30, generator=gen)[:27].view(B, 9).int().to(kernel_device)
    lens = [1, 40, 131]                                                # after the step; 1: the new token alone
    q_start = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=kernel_device)
    q_len = torch.ones(B, dtype=torch.int32, device=kernel_device)
    q = torch.randn(B, Hq, D, generator=gen).to(kernel_device)
    # Views with different strides, as FMS hands them over (V a slice of a fused projection, K fresh after RoPE).
    k_new = torch.randn(B, Hkv, D, generator=gen).to(kernel_device)
    v_new = torch.randn(B, 3, Hkv, D, generator=gen).to(kernel_device)[:, 1]
    slots = torch.stack([table[b, (n - 1) // page].long() * page + (n - 1) % page for b, n in enumerate(lens)])
    k_want, v_want = k_pool.clone(), v_pool.clone()
    k_want[:, slots], v_want[:, slots] = k_new.transpose(0, 1), v_new.transpose(0, 1)
    want = triton_decode.paged_decode(q, k_want, v_want, table, q_start, q_len, page, 0.3, splits, block_n=16,
                                      min_split_keys=16)
    got = triton_decode.paged_decode(q, k_pool, v_pool, table, q_start, q_len, page, 0.3, splits, k_new=k_new,
                                     v_new=v_new, block_n=16, min_split_keys=16)
    assert torch.equal(k_pool, k_want) and torch.equal(v_pool, v_want)
    assert (got - want).abs().max().item() <= 1e-6


def test_split_count_fills_the_device():
    cpu = torch.device("cpu")
    assert triton_decode.decode_splits(1, 1, 100_000, cpu) >= 2                # the merge is exercised on CPU
    assert triton_decode.decode_splits(1, 1, 100, cpu) == 1                     # never more splits than keys
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = torch.device("cuda")
        assert triton_decode.decode_splits(1, 8, 32768, cuda) * 8 >= triton_decode.CTAS_PER_SM * sms
        assert triton_decode.decode_splits(128, 8, 32768, cuda) == 1


def test_launch_options_follow_the_measured_rule():
    """Key tiles as measured on an H200 (launch_options' docstring): on Hopper 64 keys where an even split of
    CTAS_PER_SM x SMs CTAs over batch x kv heads has at most 4 splits and 4 CTAs per SM, else the largest tile
    whose pipeline fits the shared-memory budget."""
    cpu = torch.device("cpu")
    assert triton_decode.launch_options(torch.float32, 16, cpu)["block_n"] == 128
    assert triton_decode.launch_options(torch.bfloat16, 128, cpu, 32, 8)["block_n"] == 64   # 2 x 128 x 512 B > 96 KB


def test_launch_options_follow_the_measured_rule_on_hopper():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9):
        pytest.skip("the measured Hopper rule needs an sm_90 GPU")
    cuda = torch.device("cuda")
    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the batch boundaries below are those of a 132-SM H100 / H200")
    tiles = {(b, h): triton_decode.launch_options(torch.bfloat16, 128, cuda, b, h)["block_n"]
             for b, h in ((1, 8), (8, 8), (16, 8), (32, 8), (64, 8), (128, 8), (32, 32))}
    assert tiles == {(1, 8): 128, (8, 8): 128, (16, 8): 64, (32, 8): 64, (64, 8): 64, (128, 8): 128, (32, 32): 128}


def test_worklist_options_take_64_key_tiles_where_rows_leave_room_on_hopper():
    """The work-list kernel (the cache's decode steps): off Hopper `launch_options`' tiles; on a 132-SM Hopper card
    64-key tiles in 3 stages (two CTAs per SM) while batch x kv heads <= 4 per SM, else `launch_options`'."""
    cpu = torch.device("cpu")
    for b, h in ((1, 8), (64, 8), (128, 8)):
        assert triton_decode.worklist_options(torch.bfloat16, 128, cpu, b, h) == \
            triton_decode.launch_options(torch.bfloat16, 128, cpu, b, h)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9
            and torch.cuda.get_device_properties(0).multi_processor_count == 132):
        return
    cuda = torch.device("cuda")
    tiles = {(b, h): triton_decode.worklist_options(torch.bfloat16, 128, cuda, b, h)
             for b, h in ((1, 8), (8, 8), (64, 8), (128, 8), (8, 1), (32, 32))}
    small = {"block_n": 64, "num_warps": 4, "num_stages": 3}
    assert tiles[(1, 8)] == tiles[(8, 8)] == tiles[(64, 8)] == tiles[(8, 1)] == small
    assert tiles[(128, 8)] == tiles[(32, 32)] == triton_decode.launch_options(torch.bfloat16, 128, cuda, 128, 8)
    assert triton_decode.worklist_options(torch.bfloat16, 256, cuda, 8, 8)["block_n"] == 64  # 3 x 64 x 1 KB fits


def test_cache_decode_steps_match_the_oracle(kernel_device, dtype):
    """decode_kernel="triton": growth across pages, a fork sharing pages (copy-on-write), a finished sequence
    whose pages are reused, mixed steps (on the Triton mixed kernel); every output within the oracle policy."""
    page = 16 if kernel_device.type == "cuda" else 4                    # CUDA caches take pages >= 16
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=page, num_pages=64, max_seq_len=32 * page,
                     dtype=dtype, device=kernel_device)
    t = Twins(spec, seed=11, attentions=("compiled",), policy="random", decode_kernel="triton",
              poison_free_pages=True)
    cache = t.paged["compiled"]
    for s in "abc":
        t.do("admit", s)
    t.checked_step(["a", "b", "c"], [9, 4, 1])
    for _ in range(6):
        t.checked_step(["a", "b", "c"], [1, 1, 1])
        assert cache._plan.kernel == "triton" and cache._plan.block_mask is None
    t.do("fork", "b", "d")
    t.checked_step(["d", "b", "c"], [1, 1, 1])          # d and b copy-on-write their shared partial page
    t.do("finish", "a")                                  # a's pages are poisoned (NaN) and free
    t.do("admit", "e")
    t.checked_step(["e", "d"], [6, 1])                  # mixed step: the Triton mixed kernel
    assert cache._plan.kernel == "triton_mixed"
    for _ in range(5):
        t.checked_step(["e", "d", "b", "c"], [1, 1, 1, 1])


def test_each_kind_of_step_takes_its_kernel(kernel_device):
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=16, max_seq_len=64,
                     device=kernel_device)
    cache = PagedKVCache(spec, decode_kernel="triton")
    cache.admit("a")
    assert cache.plan(["a"], [5]).kernel == "sdpa_prefill"                           # a fresh prefill: SDPA
    cache.run(0, *(torch.zeros(1, 5, 1, 16, device=kernel_device) for _ in range(3)))
    assert cache.plan(["a"], [4]).kernel == "triton_mixed"                           # a second chunk
    assert cache.plan(["a"], [1], mask_mod=mods.sliding_window(3)).kernel == "flex"  # a mask_mod
    assert cache.plan(["a"], [1], score_mod=mods.soft_cap(2.0)).kernel == "flex"     # a score_mod
    assert cache.plan(["a"], [1]).kernel == "triton"


def test_decode_kernel_choices_are_checked(device):
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=4, max_seq_len=64,
                     device=device)
    with pytest.raises(UnsupportedConfigError, match="decode_kernel must be"):
        PagedKVCache(spec, decode_kernel="cuda")
    with pytest.raises(UnsupportedConfigError, match="attention='compiled'"):
        PagedKVCache(spec, decode_kernel="triton", attention="eager")
    assert PagedKVCache(spec, decode_kernel="flex").decode_kernel == "flex"
    assert PagedKVCache(spec, attention="eager").decode_kernel == "flex"
    auto = "triton" if device.type == "cuda" else "flex"                 # the interpreter is never a default
    assert PagedKVCache(spec).decode_kernel == auto


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(triton_decode, "available", lambda device: False)
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=4, max_seq_len=64)
    with pytest.raises(UnsupportedConfigError, match="TRITON_INTERPRET=1"):
        PagedKVCache(spec, decode_kernel="triton")


def _padded_inputs(gen, rows: int, hq: int, hkv: int, d: int, dtype, device):
    """Random q (rows, 1, Hq, D), k and v (rows, 1, Hkv, D): padding rows hold data too, so a store would show."""
    q = torch.randn(rows, 1, hq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(rows, 1, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(rows, 1, hkv, d, generator=gen).to(dtype).to(device)
    return q, k, v


def _grow(cache: PagedKVCache, ids: list, lens: list[int], gen, hq: int) -> None:
    """Prefill each sequence to its length (FlexAttention steps), with random K/V."""
    spec = cache.spec
    cache.plan(ids, lens)
    B, L = len(ids), max(lens)
    for layer in range(spec.num_layers):
        q = torch.randn(B, L, hq, spec.head_dim, generator=gen).to(spec.dtype).to(spec.device)
        k = torch.randn(B, L, spec.num_kv_heads, spec.head_dim, generator=gen).to(spec.dtype).to(spec.device)
        v = torch.randn(B, L, spec.num_kv_heads, spec.head_dim, generator=gen).to(spec.dtype).to(spec.device)
        cache.run(layer, q, k, v)


def _padded_caches(kernel_device, ids, lens):
    page = 4 if kernel_device.type == "cpu" else 16          # CUDA refuses pages below the kernel's 16-key tile
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=page, num_pages=96, max_seq_len=256,
                     device=kernel_device)
    caches = []
    for _ in range(2):                                  # twins: one run unpadded, one padded
        cache = PagedKVCache(spec, decode_kernel="triton", policy="random", seed=3)
        for s in ids:
            cache.admit(s)
        _grow(cache, ids, lens, torch.Generator().manual_seed(5), hq=4)
        caches.append(cache)
    return caches


def _check_padded_step(plain: PagedKVCache, padded: PagedKVCache, ids: list, gen) -> None:
    """One decode step of `ids` on both twins: the padded run's real rows equal the unpadded run's, its padding
    rows are 0, and the pools differ from before only in the real rows' new slots (the same in both twins)."""
    spec, hq = plain.spec, 4
    p1, p2 = plain.plan(ids, [1] * len(ids)), padded.plan(ids, [1] * len(ids))
    assert p2.kernel == "triton" and padded.current_plan is p2
    Bp = p2.buffers.padded_batch
    assert p2.bucket == (Bp, 1, "triton") and p1.bucket == p2.bucket
    before = padded.k_pool.clone(), padded.v_pool.clone()
    for layer in range(spec.num_layers):
        q, k, v = _padded_inputs(gen, Bp, hq, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.device)
        want = plain.run(layer, q[:len(ids)], k[:len(ids)], v[:len(ids)])            # (B, 1, Hq, D)
        got = padded.run(layer, q, k, v)                                              # (Bp, 1, Hq, D)
        assert got.shape == (Bp, 1, hq, spec.head_dim)
        torch.testing.assert_close(got[:len(ids)], want, rtol=0, atol=0)
        assert bool((got[len(ids):] == 0).all())
    real = p2.slot_mapping.cpu()
    for pool, old, twin in ((padded.k_pool, before[0], plain.k_pool), (padded.v_pool, before[1], plain.v_pool)):
        torch.testing.assert_close(pool, twin, rtol=0, atol=0, equal_nan=True)        # same writes as unpadded
        changed = ~((pool.cpu() == old.cpu()) | (pool.cpu().isnan() & old.cpu().isnan()))  # (L, Hkv, slots, D)
        assert set(changed.any(-1).any(1).any(0).nonzero().flatten().tolist()) <= set(real.tolist())


def test_padded_batch_run_matches_the_unpadded_run(kernel_device):
    """A decode step run with the bucket's padded batch: real rows as unpadded, padding rows 0 and stored nowhere;
    then the batch changes within the bucket (6 rows, one finishes, 5 rows) and padded runs stay right."""
    ids = list("abcdef")
    plain, padded = _padded_caches(kernel_device, ids, [5, 9, 3, 13, 7, 4])
    gen = torch.Generator().manual_seed(8)
    _check_padded_step(plain, padded, ids, gen)                       # 6 rows in bucket 8
    _check_padded_step(plain, padded, ids, gen)
    for cache in (plain, padded):
        cache.finish("b")
        assert cache.current_plan is None
    _check_padded_step(plain, padded, ["a", "c", "d", "e", "f"], gen)  # 5 rows, same bucket and buffers
    _check_padded_step(plain, padded, ["e", "a", "d"], gen)             # 3 rows in bucket 4
    # short rows: one item each, written by the item kernel; the padding row none (the merge writes its zeros)
    assert padded.current_plan.buffers.host["row_count"].tolist() == [1, 1, 1, 0]


def test_padded_batch_is_refused_on_flexattention_steps(kernel_device):
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=16, max_seq_len=64,
                     device=kernel_device)                     # CUDA caches take pages >= 16
    cache = PagedKVCache(spec, decode_kernel="triton", prefill_kernel="flex")
    for s in "abc":
        cache.admit(s)
    gen = torch.Generator().manual_seed(0)
    plan = cache.plan(list("abc"), [2, 1, 1])                      # a prefill step: FlexAttention
    assert plan.kernel == "flex"
    q, k, v = _padded_inputs(gen, 4, 2, 1, 16, spec.dtype, kernel_device)
    with pytest.raises(InvalidRequestError, match="expected \\(3,"):
        cache.run(0, q.expand(4, 2, 2, 16), k.expand(4, 2, 1, 16), v.expand(4, 2, 1, 16))
    cache.run(0, *(x[:3].expand(3, 2, -1, -1) for x in (q, k, v)))
    plan = cache.plan(list("abc"), [1, 1, 1])
    assert plan.kernel == "triton" and plan.buffers.padded_batch == 4
    with pytest.raises(InvalidRequestError, match="expected \\(4,"):  # padded q, unpadded k
        cache.run(0, q, k[:3], v[:3])
    with pytest.raises(InvalidRequestError):
        cache.run(0, q.to(torch.float64), k, v)
    cache.run(0, q, k, v)


def test_a_step_without_split_rows_skips_the_merge_and_stays_right(kernel_device, monkeypatch):
    """The merge launch runs only for a step with a split row (or padding rows), for a merge never launched yet (its
    first launch loads its binary: it must not fall inside a later CUDA graph capture), and while a graph is
    captured; otherwise a step of one-item rows is written by the item kernel alone. Both kinds of step, in
    float32, against the oracle; the merge counted per layer."""
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16, num_pages=32, max_seq_len=320,
                     device=kernel_device)
    t = Twins(spec, seed=5, attentions=("compiled",), policy="random", decode_kernel="triton")
    cache = t.paged["compiled"]
    merges = []
    real_launch = triton_decode.launch_items
    monkeypatch.setattr(triton_decode, "launch_items", lambda *a: (merges.append(a[-1]), real_launch(*a))[1])
    for s in "ab":
        t.do("admit", s)
    t.checked_step(["a", "b"], [3, 200])                      # fresh prefill (not this kernel)
    t.checked_step(["a"], [1])                                # 4 keys, one item: the merge's first launch only
    assert not cache._plan.kernel_plan.split and merges == [True, False]
    t.checked_step(["a", "b"], [1, 1])                        # b's 201 keys: split (slices of >= 128 keys)
    assert cache._plan.kernel_plan.split and merges[2:] == [True, True]
    t.do("finish", "b")
    t.checked_step(["a"], [1])                                # one item again: no merge
    assert merges[4:] == [False, False]
    monkeypatch.setattr(triton_decode, "capturing", lambda t: True)   # as under a CUDA graph capture
    t.checked_step(["a"], [1])
    assert merges[6:] == [True, True]
