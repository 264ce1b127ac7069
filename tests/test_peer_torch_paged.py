"""The torch PagedAttention peer adapter (conformance/peers/torch_paged.py) and the peer defects it records.

Two kinds of tests:
* the adapter serves hand-written steps (prefill, decode, steps over a subset of the sequences, mixed steps,
  a finished sequence's row reused) and matches the float64 oracle under the correctness policy; its
  rejected requests leave snapshot() unchanged;
* minimal reproductions of the peer's defects against `PagedAttention` itself, so every entry of the
  factory's `expected_failures` (and every documented work-around) is backed by evidence.

CPU runtime is dominated by compiles: the compiled tests share two shapes (8 rows x query length 16 or 1,
fp32); everything else runs eager flex_attention. Compiled mods and bf16 are marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.experimental._paged_attention import PagedAttention
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from conformance.contract import CAPABILITIES, Backend
from conformance.peers.torch_paged import (NAME, OutOfBatchRowsError, TorchPagedAttentionBackend,
                                           torch_paged_attention_factory)
from conformance.policy import compare
from conformance.snapshots import first_difference
from oracle import ContiguousOracle
from paged import CacheSpec, mods
from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PlanError,
                          SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)

CHECKS = {"outputs_match_oracle", "fragmentation", "isolation_poison", "isolation_nonfinite", "isolation_fork",
          "eager_matches_compiled", "errors_leave_state_unchanged", "determinism", "stateful"}
HQ = 4  # query heads (GQA over 2 kv heads)


def cpu_spec(dtype=torch.float32) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, num_pages=16, max_seq_len=32,
                     dtype=dtype)


def gpu_spec(dtype) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, page_size=16, num_pages=24, max_seq_len=128,
                     dtype=dtype, device="cuda")


class Driver:
    """Runs the same operations on a backend, the float64 oracle and the same-dtype oracle; compares outputs."""

    def __init__(self, backend, spec: CacheSpec, seed: int = 0) -> None:
        self.backend, self.spec = backend, spec
        self.gold, self.ref = ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=spec.dtype)
        self.gen = torch.Generator().manual_seed(seed)
        self.worst = 0.0

    def admit(self, *ids) -> None:
        for s in ids:
            for x in (self.backend, self.gold, self.ref):
                x.admit(s)

    def finish(self, *ids) -> None:
        for s in ids:
            for x in (self.backend, self.gold, self.ref):
                x.finish(s)

    def step(self, ids, q_lens, mask_mod=None, score_mod=None) -> list[str]:
        """One step over every layer; returns the failures (empty when every output is within the policy)."""
        for x in (self.backend, self.gold, self.ref):
            x.plan(ids, q_lens, mask_mod=mask_mod, score_mod=score_mod)
        B, L, s = len(ids), max(q_lens), self.spec
        failures = []
        for layer in range(s.num_layers):
            q, k, v = (torch.randn(B, L, h, s.head_dim, generator=self.gen).to(s.device, s.dtype)
                       for h in (HQ, s.num_kv_heads, s.num_kv_heads))
            out = self.backend.run(layer, q, k, v)
            gold, ref = self.gold.run(layer, q, k, v), self.ref.run(layer, q, k, v)
            assert out.shape == q.shape
            for b, n in enumerate(q_lens):
                c = compare(out[b, :n], gold[b, :n], ref[b, :n], s.dtype)
                self.worst = max(self.worst, c.error)
                if not c.ok:
                    failures.append(f"step {list(ids)} {list(q_lens)} layer {layer} seq {ids[b]}: {c.describe()}")
                if L > n:
                    assert not out[b, n:].any(), "padding positions must be 0"
        return failures

    def check_memory(self) -> None:
        P = self.spec.page_size
        mem = self.backend.memory()
        lengths = [self.gold.length(s) for s in self.gold.seq_ids]
        pages = sum(math.ceil(n / P) for n in lengths)
        assert mem.live_sequences == len(lengths)
        assert mem.tokens_stored == sum(lengths)
        assert mem.pages_in_use == pages
        assert mem.free_pages == self.spec.num_pages - pages
        assert mem.slots_reserved == pages * P
        assert mem.waste_slots == pages * P - sum(lengths) <= (P - 1) * len(lengths)


def serve(d: Driver, poison: bool = False) -> list[str]:
    """Prefill, mixed, decode over a subset, decode over all, finish + row reuse; returns failures."""
    failures = []

    def op(fn, *args):
        out = fn(*args)
        if poison:
            d.backend.poison_free_pages(float("nan"))
        if isinstance(out, list):
            failures.extend(out)
        d.check_memory()

    op(d.admit, "a", "b", "c")
    op(d.step, ["a", "b"], [5, 3])                 # prefill two sequences
    op(d.step, ["a", "c", "b"], [1, 6, 4])         # decode + prefill + chunked prefill in one step
    op(d.step, ["c"], [1])                         # decode of one sequence that is not row 0 (#189)
    op(d.step, ["b", "a", "c"], [1, 1, 1])         # decode of all, rows out of order
    op(d.finish, "a")
    op(d.admit, "d")
    op(d.step, ["d", "c"], [7, 1])                 # new sequence in the freed row, mixed with a decode
    op(d.step, ["d", "b"], [1, 1])
    return failures


# ------------------------------------------------------------------ the factory
def test_factory_describes_the_peer():
    f = torch_paged_attention_factory()
    assert f.name == NAME == "torch-paged-attention"
    assert f.capabilities <= CAPABILITIES
    assert "fork" not in f.capabilities              # the peer cannot share pages: no copy emulation
    assert {"mods", "paging", "poison", "eager", "chunked_prefill", "mixed_steps"} <= f.capabilities
    assert set(f.expected_failures) <= CHECKS
    assert all(reason for reason in f.expected_failures.values())
    backend = f.make(cpu_spec())
    assert isinstance(backend, Backend)
    assert f.make_eager(cpu_spec()).attention == "eager"


# ------------------------------------------------------------------ correctness
def test_compiled_matches_oracle_cpu():
    d = Driver(TorchPagedAttentionBackend(cpu_spec()), cpu_spec())
    assert serve(d) == []
    assert d.worst > 0  # real comparisons happened


def test_compiled_with_poisoned_free_pages_cpu():
    """Free pages NaN after every operation (the peer's empty_pages): nothing reads them."""
    d = Driver(TorchPagedAttentionBackend(cpu_spec()), cpu_spec(), seed=1)
    assert serve(d, poison=True) == []


@pytest.mark.parametrize("mask_mod,score_mod", [
    (mods.sliding_window(5), mods.soft_cap(2.0)),
    (mods.prefix_lm(6), mods.alibi(HQ)),
], ids=["sliding_window+soft_cap", "prefix_lm+alibi"])
def test_eager_mods_match_oracle(mask_mod, score_mod):
    """User mods in logical positions through the peer's get_mask_mod / get_score_mod (eager; one shape)."""
    spec = cpu_spec()
    d = Driver(TorchPagedAttentionBackend(spec, attention="eager"), spec, seed=2)
    d.admit("a", "b", "c")
    assert d.step(["a", "b"], [9, 3], mask_mod, score_mod) == []
    assert d.step(["c", "a"], [7, 1], mask_mod, score_mod) == []
    assert d.step(["b", "c"], [2, 1], mask_mod, score_mod) == []


def test_eager_matches_oracle_without_row_reuse():
    """The eager twin is right as long as no row is reused (see test_erase_bug_breaks_eager_twin)."""
    spec = cpu_spec()
    d = Driver(TorchPagedAttentionBackend(spec, attention="eager"), spec, seed=3)
    d.admit("a", "b", "c")
    for ids, q_lens in ((["a", "b"], [5, 3]), (["a", "c", "b"], [1, 6, 4]), (["c"], [1]), (["b", "a", "c"], [1, 1, 1])):
        assert d.step(ids, q_lens) == []


@pytest.mark.slow
@pytest.mark.parametrize("mask_mod,score_mod", [(mods.sliding_window(5), None), (None, mods.alibi(HQ))])
def test_compiled_mods_match_oracle(mask_mod, score_mod):
    spec = cpu_spec()
    d = Driver(TorchPagedAttentionBackend(spec), spec, seed=4)
    d.admit("a", "b")
    assert d.step(["a", "b"], [9, 3], mask_mod, score_mod) == []
    assert d.step(["b", "a"], [2, 1], mask_mod, score_mod) == []


@pytest.mark.slow
def test_compiled_matches_oracle_cpu_bf16():
    spec = cpu_spec(torch.bfloat16)
    d = Driver(TorchPagedAttentionBackend(spec), spec, seed=5)
    assert serve(d) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_matches_oracle_gpu(dtype):
    spec = gpu_spec(dtype)
    d = Driver(TorchPagedAttentionBackend(spec), spec, seed=6)
    d.admit("a", "b", "c")
    for ids, q_lens in ((["a", "b"], [40, 17]), (["a", "c", "b"], [1, 70, 16]), (["c"], [1]), (["b", "a", "c"], [1, 1, 1])):
        assert d.step(ids, q_lens) == []
        d.backend.poison_free_pages(float("nan"))
    d.finish("a")
    d.admit("d")
    assert d.step(["d", "c"], [33, 1], mods.sliding_window(5)) == []
    assert d.step(["d", "b"], [1, 1], None, mods.alibi(HQ)) == []
    d.check_memory()


@pytest.mark.gpu
def test_erase_bug_breaks_eager_twin_gpu():
    _erase_bug_scenario(gpu_spec(torch.float32), page_tokens=16)


# ------------------------------------------------------------------ errors
def test_errors_leave_state_unchanged():
    spec = cpu_spec()
    backend = TorchPagedAttentionBackend(spec, attention="eager")
    d = Driver(backend, spec)
    d.admit("a", "b", "c", "empty")
    d.step(["a", "b"], [9, 3])
    d.step(["c"], [12])        # 3 + 1 + 3 = 7 of 16 pages in use
    before = backend.snapshot()

    def rejects(exc, fn, *args, **kwargs):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
        assert str(info.value)
        assert first_difference(before, backend.snapshot()) is None, (exc, args)

    rejects(UnknownSequenceError, backend.finish, "zzz")
    rejects(UnknownSequenceError, backend.plan, ["a", "zzz"], [1, 1])
    rejects(DuplicateSequenceError, backend.admit, "a")
    rejects(InvalidRequestError, backend.admit, ["unhashable"])
    rejects(DuplicateSequenceError, backend.plan, ["a", "a"], [1, 1])
    rejects(InvalidRequestError, backend.plan, [], [])
    rejects(InvalidRequestError, backend.plan, ["a"], [0])
    rejects(InvalidRequestError, backend.plan, ["a"], [1.5])
    rejects(InvalidRequestError, backend.plan, ["a"], [])
    rejects(SequenceTooLongError, backend.plan, ["a"], [spec.max_seq_len - 9 + 1])
    rejects(UnknownSequenceError, backend.fork, "zzz", "child")
    rejects(DuplicateSequenceError, backend.fork, "a", "b")
    rejects(UnsupportedConfigError, backend.fork, "a", "child")
    # All or nothing: "a" needs 1 page, "b" 5, "c" 4, "empty" 1: 11 > 9 free. The peer alone would have
    # reserved "a" and "b" before its AssertionError (test_peer_out_of_pages_is_a_bare_assertion_...).
    rejects(OutOfPagesError, backend.plan, ["a", "b", "c", "empty"], [4, 19, 16, 1])
    # run() against the current plan
    backend.plan(["a", "b"], [2, 1])
    before = backend.snapshot()
    q, k, v = torch.randn(2, 2, HQ, 16), torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    rejects(PlanError, backend.run, 2, q, k, v)
    rejects(InvalidRequestError, backend.run, 0, q[:1], k[:1], v[:1])
    rejects(InvalidRequestError, backend.run, 0, q, k[:, :, :1], v[:, :, :1])
    rejects(InvalidRequestError, backend.run, 0, q.double(), k, v)
    rejects(InvalidRequestError, backend.run, 0, q[:, :, :3], k, v)
    backend.run(0, q, k, v)
    before = backend.snapshot()
    rejects(PlanError, backend.run, 0, q, k, v)


def test_out_of_batch_rows_is_refused_cleanly():
    """With fewer page-table rows than pages, running out of rows is an OutOfPagesError, state unchanged."""
    backend = TorchPagedAttentionBackend(cpu_spec(), attention="eager", max_batch_size=2)
    for s in "abc":
        backend.admit(s)        # admitted sequences hold no row until they store tokens
    backend.plan(["a", "b"], [1, 1])
    before = backend.snapshot()
    with pytest.raises(OutOfBatchRowsError, match="batch row"):
        backend.plan(["c"], [1])
    assert first_difference(before, backend.snapshot()) is None
    backend.finish("a")
    backend.plan(["c"], [1])
    assert backend.row("c") == 0


# ------------------------------------------------------------------ peer defects, reproduced on the peer itself
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


def _erase_bug_scenario(spec: CacheSpec, page_tokens: int) -> None:
    """Through the adapter: "a" fills two pages of row 0 and finishes; "b" takes row 0 and one of those pages
    back; the eager twin shows "b" the other (stale) page, the compiled backend does not."""
    results = {}
    for attention in ("eager", "compiled"):
        d = Driver(TorchPagedAttentionBackend(spec, attention=attention), spec, seed=8)
        d.admit("a", "x")
        assert d.step(["a", "x"], [2 * page_tokens, 3]) == []
        d.finish("a")
        d.admit("b")
        results[attention] = d.step(["b"], [page_tokens // 2]) + d.step(["b", "x"], [1, 1])
        assert d.backend.row("b") == 0
    assert results["compiled"] == []
    assert results["eager"], "the eager twin should read the stale page (erase bug)"


def test_erase_bug_breaks_eager_twin():
    """Backs expected_failures["eager_matches_compiled"]."""
    assert "eager_matches_compiled" in torch_paged_attention_factory().expected_failures
    _erase_bug_scenario(cpu_spec(), page_tokens=4)


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
