"""Host-to-device staging (paged.transfer.StagedCopies) and the plan() copies that go through it."""

from __future__ import annotations

import pytest
import torch

from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache
from paged.transfer import StagedCopies


def test_staged_copies_write_through_on_the_cpu():
    dst = torch.zeros(6, dtype=torch.int32)
    stage = StagedCopies()
    stage.begin()
    assert stage.twin(dst) is dst
    stage.twin(dst)[:3] = torch.tensor([4, 5, 6])
    stage.copy(dst, 3)
    stage.end()
    assert dst.tolist() == [4, 5, 6, 0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staged_copies_wait_for_the_last_round_before_reusing_the_twins():
    """Round 2 writes the twins while the GPU is still busy with a sleep that holds round 1's copies back:
    begin() must wait, or round 1 would copy round 2's values."""
    first, second = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda")
    stage = StagedCopies()
    for value in (1.0, 2.0):
        stage.begin()
        torch.cuda._sleep(50_000_000)                     # ~25 ms of GPU time ahead of the copy
        stage.twin(first).fill_(value)
        stage.copy(first)
        if value == 1.0:
            second.copy_(first)                           # stream-ordered: sees round 1's copy
        stage.end()
    torch.cuda.synchronize()
    assert second.tolist() == [1.0] * 4 and first.tolist() == [2.0] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decode_kernel", ["flex", "triton"])
def test_plans_staged_while_the_gpu_lags_behind(decode_kernel, monkeypatch):
    """Steps planned and run while the GPU is far behind the host: each step's kernels must read that step's
    page table, lengths and slots, not the next plan's (which reuses the same pinned twins). Inputs are made on
    the GPU beforehand and the oracle runs afterwards, so that nothing in the loop waits for the GPU; the test
    checks that plan() really found the previous plan's copies still pending."""
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, num_pages=64, max_seq_len=256,
                     dtype=torch.float32, device=torch.device("cuda"))
    cache = PagedKVCache(spec, decode_kernel=decode_kernel)
    steps = [[20, 3, 17], [1, 1, 1], [1, 1, 1], [1, 1, 1], [15, 1, 1]]
    gen = torch.Generator(device="cuda").manual_seed(11)
    inputs = [[tuple(torch.randn(3, max(lens), h, 64, device="cuda", generator=gen) for h in (4, 2, 2))
               for _ in range(spec.num_layers)] for lens in steps]
    pending = []
    begin = StagedCopies.begin

    def spying_begin(self):
        pending.append(self._event is not None and not self._event.query())
        begin(self)

    monkeypatch.setattr(StagedCopies, "begin", spying_begin)
    ids = ["a", "b", "c"]
    for s in ids:
        cache.admit(s)
    outs = []
    for lens, layers in zip(steps, inputs):
        torch.cuda._sleep(20_000_000)                     # the GPU lags: this step's copies wait behind it
        cache.plan(ids, lens)
        outs.append([cache.run(layer, *qkv) for layer, qkv in enumerate(layers)])
    assert any(pending), "plan() never met a pending copy: the test did not exercise the race"
    oracle = ContiguousOracle(spec)
    for s in ids:
        oracle.admit(s)
    for lens, layers, step_outs in zip(steps, inputs, outs):
        oracle.plan(ids, lens)
        for layer, (qkv, out) in enumerate(zip(layers, step_outs)):
            ref = oracle.run(layer, *qkv)
            for b, n in enumerate(lens):
                assert (out[b, :n] - ref[b, :n]).abs().max().item() < 1e-4
