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
def test_plans_staged_while_the_gpu_lags_behind(decode_kernel):
    """Steps planned and run while the GPU is far behind the host: each step's kernels must read that step's
    page table, lengths and slots, not the next plan's (which reuses the same pinned twins)."""
    spec = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, num_pages=64, max_seq_len=256,
                     dtype=torch.float32, device=torch.device("cuda"))
    cache, oracle = PagedKVCache(spec, decode_kernel=decode_kernel), ContiguousOracle(spec)
    gen = torch.Generator().manual_seed(11)
    ids = ["a", "b", "c"]
    for c in (cache, oracle):
        for s in ids:
            c.admit(s)
    outs, refs = [], []
    for lens in ([20, 3, 17], [1, 1, 1], [1, 1, 1], [1, 1, 1], [15, 1, 1]):
        torch.cuda._sleep(20_000_000)                     # the GPU lags: this step's copies wait behind it
        for c in (cache, oracle):
            c.plan(ids, lens)
        for layer in range(spec.num_layers):
            q, k, v = (torch.randn(3, max(lens), h, 64, generator=gen).cuda() for h in (4, 2, 2))
            outs.append((cache.run(layer, q, k, v), lens))
            refs.append(oracle.run(layer, q, k, v))
    for (out, lens), ref in zip(outs, refs):
        for b, n in enumerate(lens):
            assert (out[b, :n] - ref[b, :n]).abs().max().item() < 1e-4
