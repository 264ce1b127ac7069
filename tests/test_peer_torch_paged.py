"""The torch PagedAttention peer adapter (conformance/peers/torch_paged/) and the peer defects it records.

Two kinds of tests:
* the adapter serves hand-written steps (prefill, decode, steps over a subset of the sequences, mixed steps,
  a finished sequence's row reused) and matches the float64 oracle under the correctness policy; its
  rejected requests leave snapshot() unchanged;
* minimal reproductions of the peer's defects against `PagedAttention` itself, so every entry of the
  factory's `expected_failures` (and every documented work-around) is backed by evidence: those are in
  test_peer_torch_paged_defects.py; the driver both use is tests/peer_driver.py.

CPU runtime is dominated by compiles: the compiled tests share two shapes (8 rows x query length 16 or 1,
fp32); everything else runs eager flex_attention. Compiled mods and bf16 are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from conformance.contract import CAPABILITIES, Backend
from conformance.peers.torch_paged import (NAME, OutOfBatchRowsError, TorchPagedAttentionBackend,
                                           torch_paged_attention_factory)
from conformance.snapshots import first_difference
from paged import mods
from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PlanError,
                          SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)
from tests.peer_driver import HQ, Driver, cpu_spec, gpu_spec, serve


CHECKS = {"outputs_match_oracle", "fragmentation", "isolation_poison", "isolation_nonfinite", "isolation_fork",
          "eager_matches_compiled", "errors_leave_state_unchanged", "determinism", "stateful"}


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
