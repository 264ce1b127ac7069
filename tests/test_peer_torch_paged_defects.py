"""Minimal reproductions of torch PagedAttention's defects against the peer itself (and, for the erase bug,
through the adapter), so every entry of the adapter's `expected_failures` and every documented work-around is
backed by evidence (conformance/peers/torch_paged/)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.experimental._paged_attention import PagedAttention
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from conformance.peers.torch_paged import TorchPagedAttentionBackend, torch_paged_attention_factory
from tests.peer_driver import Driver, cpu_spec, erase_bug_scenario, gpu_spec


@pytest.mark.gpu
def test_erase_bug_breaks_eager_twin_gpu():
    erase_bug_scenario(gpu_spec(torch.float32), page_tokens=16)


def _filled_peer(n_pages=8, page=4, rows=2, lengths=(6, 6), heads=1, dim=8, seed=0):
    """A PagedAttention with `lengths[r]` tokens reserved and assigned in row r; returns (peer, K, V, per-row kv)."""
    gen = torch.Generator().manual_seed(seed)
    peer = PagedAttention(n_pages, page, rows, device="cpu")
    k_cache = torch.zeros(1, heads, n_pages * page, dim)
    v_cache = torch.zeros_like(k_cache)
    per_row = []
    for r, n in enumerate(lengths):
        peer.reserve(torch.tensor([r]), torch.tensor([n]))
        k, v = torch.randn(1, heads, n, dim, generator=gen), torch.randn(1, heads, n, dim, generator=gen)
        peer.assign(torch.tensor([r]), torch.arange(n)[None], k, v, k_cache, v_cache)
        per_row.append((k, v))
    return peer, k_cache, v_cache, per_row


def _logical_mask(rows: int, n_blocks: int, page: int, q_pos: int) -> BlockMask:
    """One query per row at logical position q_pos; n_blocks logical pages, all masked (mask_mod consulted)."""
    num = torch.full((rows, 1, 1), n_blocks, dtype=torch.int32)
    idx = torch.arange(n_blocks, dtype=torch.int32).expand(rows, 1, 1, n_blocks).contiguous()
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(1, page),
                                    mask_mod=lambda b, h, q, kv: kv <= q_pos + q,
                                    seq_lengths=(1, n_blocks * page), compute_q_blocks=False)


def _attend(q, k, v):
    """Plain softmax attention of one query (H, D) over (H, S, D)."""
    w = torch.softmax(torch.einsum("hd,hsd->hs", q, k) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("hs,hsd->hd", w, v)


def test_peer_bug_189_batch_idx_subset_reads_the_wrong_row():
    """attention-gym #189: convert_logical_block_mask(batch_idx=...) gathers the block lists through
    page_table[batch_idx] but the converted mask_mod reads physical_to_logical[b] with the LOCAL row b.
    For a block mask over row 1 alone (batch_idx=[1]) the mask_mod answers for row 0: it masks every slot of
    row 1's pages (the pages compiled flex visits: output 0) and opens row 0's pages (what eager flex, which
    reads only the mask_mod, attends: another sequence's data). Over rows 0..1 (batch_idx = arange, what the
    adapter does) it is right."""
    peer, kc, vc, per_row = _filled_peer()
    q = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(1))
    want = _attend(q[0, :, 0], *(t[0] for t in per_row[1]))
    other = _attend(q[0, :, 0], *(t[0] for t in per_row[0]))

    subset = peer.convert_logical_block_mask(_logical_mask(1, 2, 4, 5), batch_idx=torch.tensor([1]))
    assert subset.kv_indices[0, 0, 0, :2].tolist() == peer.page_table[1, :2].tolist()   # lists: row 1's pages
    zero = torch.tensor(0)
    for page in peer.page_table[1, :2].tolist():                                         # mask: all closed
        assert not any(bool(subset.mask_mod(zero, zero, zero, torch.tensor(page * 4 + i))) for i in range(4))
    out = flex_attention(q, kc, vc, block_mask=subset)                                   # eager
    torch.testing.assert_close(out[0, :, 0], other, rtol=1e-5, atol=1e-5)               # row 0's data
    assert not torch.allclose(out[0, :, 0], want, atol=1e-3)

    whole = peer.convert_logical_block_mask(_logical_mask(2, 2, 4, 5))  # rows 0..1, batch_idx = arange
    out = flex_attention(q.expand(2, -1, -1, -1).contiguous(), kc, vc, block_mask=whole)
    torch.testing.assert_close(out[1, :, 0], want, rtol=1e-5, atol=1e-5)


def test_subset_rows_mode_shows_189_through_the_adapter():
    """The adapter's rows="subset" passes batch_idx as the peer documents it: a step over row 1 alone is wrong
    (its masked last page reads as empty); the default rows="slots" is right."""
    spec = cpu_spec()
    for rows, ok in (("subset", False), ("slots", True)):
        d = Driver(TorchPagedAttentionBackend(spec, attention="eager", rows=rows), spec, seed=7)
        d.admit("a", "b")
        assert d.step(["a", "b"], [5, 6]) == []         # batch_idx = arange(2) either way: right
        assert (d.step(["b"], [1]) == []) is ok         # row 1 alone


def test_peer_bug_erase_keeps_inverse_table():
    """erase(batch_idx) clears page_table, capacity and empty_pages but not physical_to_logical: it assigns
    into the copy that `physical_to_logical[batch_idx]` (advanced indexing) made. A 0-d index fails outright,
    after capacity and empty_pages were already changed."""
    peer, *_ = _filled_peer(lengths=(8, 3))
    pages = peer.page_table[0, :2].tolist()
    peer.erase(torch.tensor([0]))
    assert (peer.page_table[0] == -1).all() and int(peer.capacity[0]) == 0
    assert set(pages) <= set(peer.empty_pages)
    assert peer.physical_to_logical[0, pages].tolist() == [0, 1]       # stale: should be [-1, -1]

    free_before = len(peer.empty_pages)
    with pytest.raises(IndexError):
        peer.erase(torch.tensor(1))                                    # 0-d index
    assert int(peer.capacity[1]) == 0 and len(peer.empty_pages) == free_before + 1  # half done
    assert (peer.page_table[1] >= 0).any()


def test_peer_bug_erase_leaks_through_the_mask_mod():
    """The stale inverse entries make the converted mask_mod (all eager flex reads) show a row pages it no
    longer owns: after erase + reserve, row 0's new 1-token sequence attends to the old sequence's page."""
    peer, kc, vc, _ = _filled_peer(lengths=(8, 3))
    old = peer.page_table[0, :2].tolist()
    peer.erase(torch.tensor([0]))
    peer.reserve(torch.tensor([0]), torch.tensor([1]))                # takes one of the two freed pages
    new = int(peer.page_table[0, 0])
    stale = [p for p in old if p != new]
    assert stale and int(peer.physical_to_logical[0, stale[0]]) >= 0
    k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    peer.assign(torch.tensor([0]), torch.tensor([[0]]), k, v, kc, vc)
    q = torch.randn(2, 1, 1, 8)
    mask = peer.convert_logical_block_mask(_logical_mask(2, 1, 4, 0), kv_len=torch.tensor([1, 3]))
    out = flex_attention(q, kc, vc, block_mask=mask)                   # eager: reads only the mask_mod
    want = v[0, :, 0]                                                  # one visible token: its value
    assert not torch.allclose(out[0, :, 0], want, atol=1e-4)           # the stale page leaked in
    assert int(peer.physical_to_logical[0, stale[0]]) == 0             # the old sequence's first page
    assert bool(mask.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(stale[0] * 4)))


def test_erase_bug_breaks_eager_twin():
    """Backs expected_failures["eager_matches_compiled"]."""
    assert "eager_matches_compiled" in torch_paged_attention_factory().expected_failures
    erase_bug_scenario(cpu_spec(), page_tokens=4)


def test_peer_assign_past_reservation_writes_silently():
    """assign() at a position past the row's capacity gathers page_table's -1 and writes into the pool's last
    page, without an error. Not an expected failure: the adapter passes only reserved, real positions (one
    assign row per new token), never a padded (B, max_q_len) block."""
    peer, kc, vc, _ = _filled_peer(n_pages=4, lengths=(4, 4))         # one page each: rows own 2 of 4 pages
    assert 3 in peer.empty_pages                                      # the last page is free
    before = kc.clone()
    k = torch.full((1, 1, 1, 8), 7.0)
    peer.assign(torch.tensor([0]), torch.tensor([[4]]), k, k, kc, vc)  # position 4: capacity is 4
    changed = (kc != before).any(-1)[0, 0].nonzero().flatten().tolist()
    assert changed == [3 * 4]                                         # slot 0 of page 3, owned by no one


def test_peer_out_of_pages_is_a_bare_assertion_after_a_partial_step():
    """A step's reserve calls run one by one: the one that runs out raises AssertionError (not a typed error)
    and the earlier ones keep their pages. The adapter counts the step's pages first (test_errors_...)."""
    peer = PagedAttention(4, 4, 2, device="cpu")
    peer.reserve(torch.tensor([0]), torch.tensor([9]))                 # 3 pages: the step's first sequence
    with pytest.raises(AssertionError, match="empty pages"):
        peer.reserve(torch.tensor([1]), torch.tensor([8]))            # 2 pages, 1 free: the step's second
    assert int(peer.capacity[0]) == 12 and len(peer.empty_pages) == 1  # the first one was not rolled back
