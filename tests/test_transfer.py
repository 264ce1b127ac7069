"""Host-to-device staging (paged.transfer.PackedStaging) and the plan() copies that go through it."""

from __future__ import annotations

import pytest
import torch

from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache
from paged.transfer import PackedStaging


FIELDS = [("a", (3,), torch.int32, 0), ("b", (2, 2), torch.long, -1), ("c", (5,), torch.float32, torch.arange(5.0))]


def test_packed_fields_are_aligned_views_of_one_buffer_initialised_as_asked():
    packed = PackedStaging(FIELDS, torch.device("cpu"))
    assert packed.host["a"] is packed.dev["a"]                             # the CPU writes straight through
    storage = packed.dev["a"].untyped_storage().data_ptr()
    for name, shape, dtype, _ in FIELDS:
        t = packed.dev[name]
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.untyped_storage().data_ptr() == storage                  # one buffer ...
        assert (t.data_ptr() - storage) % PackedStaging.ALIGN == 0 and t.data_ptr() % 16 == 0   # ... aligned
    assert packed.dev["a"].tolist() == [0, 0, 0] and packed.dev["b"].tolist() == [[-1, -1], [-1, -1]]
    assert packed.dev["c"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    packed.begin()
    packed.host["b"][1, 0] = 7
    packed.send(last="a")
    assert packed.dev["b"].tolist() == [[-1, -1], [7, -1]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_send_copies_the_fields_up_to_last_and_nothing_after():
    packed = PackedStaging(FIELDS, torch.device("cuda"))
    assert packed.host["a"].is_pinned() and packed.dev["a"].is_cuda
    assert packed.dev["b"].tolist() == [[-1, -1], [-1, -1]]                # initial values reach the device
    packed.begin()
    packed.host["a"][:] = torch.tensor([1, 2, 3])
    packed.host["b"].fill_(5)
    packed.host["c"].fill_(9.0)
    packed.send(last="b")
    torch.cuda.synchronize()
    assert packed.dev["a"].tolist() == [1, 2, 3] and packed.dev["b"].tolist() == [[5, 5], [5, 5]]
    assert packed.dev["c"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]           # after `last`: not sent
    packed.begin()
    packed.send()
    torch.cuda.synchronize()
    assert packed.dev["c"].tolist() == [9.0] * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_staging_waits_for_the_last_round_before_reusing_the_twin():
    """Round 2 writes the twin while the GPU is still busy with a sleep that holds round 1's copy back:
    begin() must wait, or round 1 would copy round 2's values."""
    packed = PackedStaging(FIELDS, torch.device("cuda"))
    seen = torch.zeros(3, dtype=torch.int32, device="cuda")
    for value in (1, 2):
        packed.begin()
        torch.cuda._sleep(50_000_000)                     # ~25 ms of GPU time ahead of the copy
        packed.host["a"].fill_(value)
        packed.send()
        if value == 1:
            seen.copy_(packed.dev["a"])                   # stream-ordered: sees round 1's copy
    torch.cuda.synchronize()
    assert seen.tolist() == [1] * 3 and packed.dev["a"].tolist() == [2] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decode_kernel", ["flex", "triton"])
def test_plans_staged_while_the_gpu_lags_behind(decode_kernel, monkeypatch):
    """Steps planned and run while the GPU is far behind the host: each step's kernels must read that step's
    page table, lengths and slots, not the next plan's (which reuses the same pinned twin). Inputs are made on
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
    begin = PackedStaging.begin

    def spying_begin(self):
        pending.append(self._event is not None and not self._event.query())
        begin(self)

    monkeypatch.setattr(PackedStaging, "begin", spying_begin)
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
