"""Drives the torch PagedAttention peer adapter, the float64 oracle and the same-dtype oracle through the same
steps and compares outputs (the tests of the adapter and of the peer's defects share it)."""

from __future__ import annotations

import math

import torch

from conformance.peers.torch_paged import TorchPagedAttentionBackend
from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec

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


def erase_bug_scenario(spec: CacheSpec, page_tokens: int) -> None:
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
