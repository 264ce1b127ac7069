"""The work-list Triton decode kernel (paged.kernels.triton_worklist) and its partition (triton_partition).

Kernel checks run under Triton's interpreter on the CPU (tests/conftest.py turns it on), float32 products, against
float64 attention on skewed length mixes; the partition is pure host code, checked by Hypothesis.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.policy import compare
from tests.test_triton_decode import _check_padded_step, _padded_caches, reference

triton_decode = pytest.importorskip("paged.triton_decode")
if triton_decode.triton is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
from paged.kernels import triton_partition as tp  # noqa: E402
from paged.kernels import triton_worklist  # noqa: E402
from paged.kernels.triton_worklist import decode_balanced, work_list  # noqa: E402


def _pages(lens: list[int], page: int, gen: torch.Generator, pad_rows: int = 1) -> tuple[torch.Tensor, int]:
    """A page table (B + pad_rows, W) with each row's pages at random in a pool of 8 spare pages; the pool's pages."""
    need = [math.ceil(n / page) for n in lens]
    num_pages = sum(need) + 8
    table = torch.full((len(lens) + pad_rows, max(need + [1])), -1, dtype=torch.int32)
    perm, used = torch.randperm(num_pages, generator=gen), 0
    for b, k in enumerate(need):
        table[b, :k] = perm[used:used + k].int()
        used += k
    return table, num_pages


# (name, lens (0: a q_len-0 row), Hq, Hkv, D, page, block_n, target items): one long row beside many short ones,
# a few rows of very different lengths, MQA, a GQA group of 7 (not a power of two), head dims 64 / 128 / 256.
CASES = [
    ("long+short", [700] + [3, 9, 17, 30, 0, 5, 12, 25], 8, 2, 32, 16, 16, 80),   # 44 items: 2 merge tiles
    ("3-rows-spread", [17, 230, 900], 8, 2, 64, 16, 32, 16),
    ("mqa", [150, 40, 400, 7, 90], 8, 1, 32, 8, 16, 20),
    ("group7", [300, 11, 64], 14, 2, 32, 24, 16, 12),
    ("d128-page-straddle", [260, 33], 4, 2, 128, 48, 32, 8),
    ("d256", [200, 9], 2, 1, 256, 16, 16, 6),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_float64_attention_on_skewed_mixes(kernel_device, dtype, case):
    """Pages at random, a q_len-0 row and a padding row past the batch, strided queries; the long rows are cut
    into many items (the merge runs), the short ones are one item each (written by the item kernel)."""
    _, lens, Hq, Hkv, D, page, block_n, target = case
    if kernel_device.type == "cuda" and page < 16:
        pytest.skip("CUDA caches take pages >= 16")
    gen = torch.Generator().manual_seed(sum(lens) + D)
    table, num_pages = _pages(lens, page, gen)
    k_pool = torch.randn(Hkv, num_pages * page, D, generator=gen).to(dtype).to(kernel_device)
    v_pool = torch.randn(Hkv, num_pages * page, D, generator=gen).to(dtype).to(kernel_device)
    q = torch.randn(len(lens), 2, Hq, D, generator=gen).to(dtype).to(kernel_device)[:, 1]   # batch stride 2 Hq D
    q_start = torch.tensor([max(n - 1, 0) for n in lens] + [0], dtype=torch.int32)
    q_len = torch.tensor([min(n, 1) for n in lens] + [0], dtype=torch.int32)
    _, _, count, _ = work_list(np.array(lens), len(lens), Hkv, Hq // Hkv, block_n, kernel_device, target=target,
                               min_keys=block_n)
    assert count.max() >= 5 and (count == 1).any(), "the case must split a row and leave others whole"
    out = decode_balanced(q, k_pool, v_pool, table.to(kernel_device), q_start.to(kernel_device),
                          q_len.to(kernel_device), page, 0.6 / math.sqrt(D), block_n=block_n, target=target,
                          min_keys=block_n)
    gold = reference(q, k_pool, v_pool, table, lens, page, 0.6 / math.sqrt(D))
    same_dtype = reference(q, k_pool, v_pool, table, lens, page, 0.6 / math.sqrt(D), dtype)
    result = compare(out, gold, same_dtype, dtype)
    assert result.ok, result.describe()
    assert all(torch.all(out[b] == 0) for b, n in enumerate(lens) if n == 0), "a row with no keys must come out 0"


def test_fused_write_on_a_split_row(kernel_device):
    """k_new / v_new given: the pool gains exactly the rows' new slots (the long row's in its last item), and the
    output equals attending over a pool that already held them."""
    gen = torch.Generator().manual_seed(3)
    lens, Hq, Hkv, D, page = [1, 333, 20, 64], 6, 2, 32, 16          # after the step; 1: the new token alone
    table, num_pages = _pages(lens, page, gen, pad_rows=0)
    table = table.to(kernel_device)
    k_pool, v_pool = (torch.randn(Hkv, num_pages * page, D, generator=gen).to(kernel_device) for _ in "kv")
    q_start = torch.tensor([n - 1 for n in lens], dtype=torch.int32, device=kernel_device)
    q_len = torch.ones(len(lens), dtype=torch.int32, device=kernel_device)
    q = torch.randn(len(lens), Hq, D, generator=gen).to(kernel_device)
    k_new = torch.randn(len(lens), Hkv, D, generator=gen).to(kernel_device)
    v_new = torch.randn(len(lens), 3, Hkv, D, generator=gen).to(kernel_device)[:, 1]     # a strided view
    slots = torch.stack([table[b, (n - 1) // page].long() * page + (n - 1) % page for b, n in enumerate(lens)])
    k_want, v_want = k_pool.clone(), v_pool.clone()
    k_want[:, slots], v_want[:, slots] = k_new.transpose(0, 1), v_new.transpose(0, 1)
    opts = dict(block_n=16, target=12, min_keys=16)
    want = decode_balanced(q, k_want, v_want, table, q_start, q_len, page, 0.3, **opts)
    got = decode_balanced(q, k_pool, v_pool, table, q_start, q_len, page, 0.3, k_new=k_new, v_new=v_new, **opts)
    assert torch.equal(k_pool, k_want) and torch.equal(v_pool, v_want)
    assert (got - want).abs().max().item() <= 1e-6


def test_partials_of_unsplit_rows_and_unused_items_are_never_read(kernel_device, monkeypatch):
    """Every float buffer born NaN: rows of one item, rows without keys and unused items write no partial, so the
    merge must read only the split rows' own items (4 at a time here: its last tile is partly past the row's)."""
    gen = torch.Generator().manual_seed(4)
    lens = [0, 1, 40, 400]
    table, num_pages = _pages(lens, 16, gen, pad_rows=0)
    k_pool, v_pool = (torch.randn(2, num_pages * 16, 32, generator=gen).to(kernel_device) for _ in "kv")
    q = torch.randn(4, 4, 32, generator=gen).to(kernel_device)
    q_start = torch.tensor([max(n - 1, 0) for n in lens], dtype=torch.int32, device=kernel_device)
    q_len = torch.tensor([min(n, 1) for n in lens], dtype=torch.int32, device=kernel_device)
    gold = reference(q, k_pool, v_pool, table, lens, 16, 0.2).to(kernel_device)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(triton_worklist, "ITEM_TILE", 4)
    out = decode_balanced(q, k_pool, v_pool, table.to(kernel_device), q_start, q_len, 16, 0.2, block_n=16,
                          target=10, min_keys=32, num_items=30)
    assert torch.isfinite(out).all(), "the merge read a partial no item wrote"
    assert (out.double() - gold).abs().max().item() <= 1e-5


def test_padded_cache_steps_with_a_split_row(kernel_device):
    """The cache's decode steps with one row long enough to be split (its partials merged) beside short rows, run
    padded and unpadded: the same outputs and pool writes, padding rows 0."""
    ids = list("abc")
    plain, padded = _padded_caches(kernel_device, ids, [200, 5, 9])
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _check_padded_step(plain, padded, ids, gen)
        counts = padded.current_plan.buffers.host["row_count"].tolist()
        assert counts[0] >= 2 and counts[1:] == [1, 1, 0], counts


# ------------------------------------------------------------------------------------------------ the partition
def _check_partition(lengths: np.ndarray, batch: int, M: int, target: int, block_n: int, min_keys: int,
                     merge_keys: int = 0):
    items = np.zeros((3, M), dtype=np.int32)
    first, count = np.full(batch, 7, dtype=np.int32), np.full(batch, 7, dtype=np.int32)
    used, chunk = tp.partition(lengths, items, first, count, target, block_n, min_keys, merge_keys)
    row, start, end = items
    assert (row[used:] == -1).all() and (start[used:] == 0).all() and (end[used:] == 0).all()
    row, start, end = row[:used], start[:used], end[:used]
    if used:
        assert chunk % block_n == 0 and chunk >= min_keys
        assert (start < end).all() and (end - start <= chunk).all() and (start % block_n == 0).all()
    for b, n in enumerate(lengths.tolist()):              # each row's keys exactly once, in its contiguous range
        mine = np.flatnonzero(row == b)
        assert mine.size == count[b] and (mine.size == 0 or list(mine) == list(range(first[b], first[b] + count[b])))
        covered = np.zeros(n, dtype=np.int64)
        for s, e in zip(start[mine], end[mine]):
            covered[s:e] += 1
        assert (covered == 1).all()
    assert (count[len(lengths):] == 0).all(), "padding rows get no item"
    return used, chunk, count


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 40_000), min_size=1, max_size=40), pad=st.integers(0, 24),
       kv_heads=st.sampled_from([1, 2, 4, 8, 32]), sms=st.sampled_from([2, 78, 132]),
       block_n=st.sampled_from([16, 64, 128]), group=st.integers(1, 72))
def test_partition_covers_every_key_once_within_the_bucket(lengths, pad, kv_heads, sms, block_n, group):
    """Every key of every row in exactly one item, items within the bucket's M, none longer than the slice, padding
    rows none, each row's items contiguous; the slice no longer than the target's, the merge's floor or the
    bucket's room ask for."""
    batch = len(lengths) + pad
    target = math.ceil(tp.CTAS_PER_SM * sms / kv_heads)
    M = target + batch                                           # max_items at that SM count
    min_keys, merge_keys = tp.min_slice_keys(block_n), tp.merge_slice_keys(block_n, group)
    lens = np.array(lengths, dtype=np.int64)
    used, chunk, count = _check_partition(lens, batch, M, target, block_n, min_keys, merge_keys)
    assert used <= M
    if lens.any():
        longest, total = int(lens.max()), int(lens.sum())
        wanted = max(math.ceil(longest / math.ceil(target * longest / total) / block_n) * block_n, min_keys)
        room = math.ceil(total / (M - len(lengths)) / block_n) * block_n       # what fits M at worst
        assert chunk <= max(wanted, merge_keys, room)


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 128), length=st.integers(1, 40_000), kv_heads=st.sampled_from([1, 2, 8, 32]),
       group=st.integers(1, 8), block_n=st.sampled_from([64, 128]))
def test_uniform_batches_get_the_even_split_of_the_per_row_kernel(batch, length, kv_heads, group, block_n):
    """Rows of one length: the same slices as the per-row split kernel (`decode_splits` / `split_keys`, what the
    cache ran before), wherever its MAX_SPLITS and slot caps did not cut them: the sizing fitted on an H200 holds."""
    sms, max_seq_len = 132, 40_000
    target = math.ceil(tp.CTAS_PER_SM * sms / kv_heads)
    want = math.ceil(tp.CTAS_PER_SM * sms * length / (kv_heads * length * batch))       # split_keys' k
    slots = min(math.ceil(2 * tp.CTAS_PER_SM * sms / (batch * kv_heads)), math.ceil(max_seq_len / 128), 64)
    if want > min(slots, triton_decode.MAX_SPLITS):
        return                                                   # the old caps bound: the new kernel cuts finer
    old_keys = max(triton_decode.MIN_SPLIT_KEYS, math.ceil(length / want), math.ceil(length / slots))
    old = max(math.ceil(old_keys / block_n) * block_n, max(triton_decode.MIN_SPLIT_KEYS, block_n))
    lens = np.full(batch, length, dtype=np.int64)
    _, chunk, count = _check_partition(lens, batch, target + batch, target, block_n, tp.min_slice_keys(block_n),
                                       tp.merge_slice_keys(block_n, group))
    assert chunk == old and (count == math.ceil(length / old)).all()


def test_a_forced_slice_length_is_kept_unless_the_list_would_overflow():
    """partition(chunk=) (the sweeps): the given slice length, every key once; lengthened only past M."""
    lens = np.array([500, 100, 0, 64], dtype=np.int64)
    used, chunk, count = _check_partition_forced(lens, 6, 20, 192)
    assert (used, chunk) == (5, 192) and count.tolist()[:4] == [3, 1, 0, 1]
    used, chunk, count = _check_partition_forced(lens, 6, 8, 64)      # 11 items > M = 8: lengthened
    assert used <= 8 and chunk > 64 and chunk % 64 == 0


def _check_partition_forced(lengths, batch, M, chunk):
    items = np.zeros((3, M), dtype=np.int32)
    first, count = np.zeros(batch, dtype=np.int32), np.zeros(batch, dtype=np.int32)
    used, got = tp.partition(lengths, items, first, count, 1, 64, 64, 0, chunk)
    for b, n in enumerate(lengths.tolist()):
        mine = np.flatnonzero(items[0, :used] == b)
        covered = np.zeros(n, dtype=np.int64)
        for s, e in zip(items[1, mine], items[2, mine]):
            covered[s:e] += 1
        assert (covered == 1).all() and mine.size == count[b]
    return used, got, count


def test_large_groups_take_longer_slices_down_to_one_cta_per_sm():
    """The merge's cost per slice grows with the GQA group: MQA with 32 query heads wants 256-key slices, and gets
    them for 8 rows of 8192 (the even split would cut 64-key ones); 71 query heads would want 640, but that leaves
    fewer items than SMs, so the slices stop at about one CTA per SM."""
    assert tp.merge_slice_keys(64, 4) == 64 and tp.merge_slice_keys(128, 32) == 256
    target, lens = tp.CTAS_PER_SM * 132, np.full(8, 8192, dtype=np.int64)
    _, chunk, _ = _check_partition(lens, 8, target + 8, target, 64, 128, tp.merge_slice_keys(64, 32))
    assert chunk == 256
    used, chunk, _ = _check_partition(lens, 8, target + 8, target, 64, 128, tp.merge_slice_keys(64, 71))
    assert (chunk, used) == (512, 128)                          # 8192 keys / ceil(132 / 8) slices, tile-rounded


def test_a_long_row_beside_short_ones_fills_the_card():
    """Issue 19's skewed batch on a 132-SM card (30k keys beside 47 rows of 256, 8 kv heads, bucket 64): the long
    row in >= 30 slices of <= 1024 keys (the per-row kernel: 2), each short row one item, within M."""
    lens = np.array([30_000] + [256] * 47, dtype=np.int64)
    target = math.ceil(tp.CTAS_PER_SM * 132 / 8)
    used, chunk, count = _check_partition(lens, 64, target + 64, target, 64, tp.min_slice_keys(64),
                                          tp.merge_slice_keys(64, 4))
    assert count[0] >= 30 and chunk <= 1024 and (count[1:48] == 1).all()
