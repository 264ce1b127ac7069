"""Paged (compiled FlexAttention) vs the contiguous oracle on hand-written scenarios.

Every step runs on three caches in lockstep: the paged cache under test, the float64 golden oracle and the
same-dtype oracle (the honest-rounding reference). Every layer's output at every real token position is
checked with `conformance.policy.compare`, per sequence.

Compiled shapes are kept few (each new one costs a 5-10 s cold CPU compile, ~0.3 s from inductor's cache):
the core scenarios use `make_spec()` (page 16, head dim 16, 2 kv heads, 4 query heads, 2 layers) with a batch
of 3 (padded to 4) and chunks of at most 16 tokens, so they share two compiled graphs per dtype: the query
length padded to 16, and 1 (a pure decode step). The feature-variety scenarios (GQA ratios, head dims, page
sizes, mods, scale, batch 5) each add one graph on CPU, in float32 only (bf16 and fp16 on the GPU): on CPU
they decode inside mixed steps (padded to 16 like the prefill); on the GPU they also run pure decode steps,
because there a query length of 1 selects a different kernel (FlexDecoding).
"""

from __future__ import annotations

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle, reference_attention
from paged import CacheSpec, PagedKVCache, mods

HQ = 4


def make_spec(device, dtype, *, head_dim=16, page_size=16, num_pages=24, max_seq_len=128, num_kv_heads=2,
              num_layers=2) -> CacheSpec:
    return CacheSpec(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                     num_pages=num_pages, max_seq_len=max_seq_len, dtype=dtype, device=device)


def cpu_only(device, why: str) -> None:
    if device.type == "cuda":
        pytest.skip(f"CPU only: {why}")


class Harness:
    """One trace on PagedKVCache, the float64 oracle and the same-dtype oracle, checked step by step."""

    def __init__(self, spec: CacheSpec, num_heads: int = HQ, *, seed: int = 0, **paged_options) -> None:
        self.spec, self.num_heads = spec, num_heads
        self.paged = PagedKVCache(spec, **paged_options)
        self.gold = ContiguousOracle(spec)
        self.ref = ContiguousOracle(spec, compute_dtype=spec.dtype)
        self.gen = torch.Generator().manual_seed(seed)
        self.steps = 0

    @property
    def caches(self):
        return (self.paged, self.gold, self.ref)

    def admit(self, *ids) -> None:
        for c in self.caches:
            for s in ids:
                c.admit(s)

    def fork(self, parent, child) -> None:
        for c in self.caches:
            c.fork(parent, child)

    def finish(self, *ids) -> None:
        for c in self.caches:
            for s in ids:
                c.finish(s)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.spec.dtype).to(self.spec.device)

    def step(self, seq_ids, q_lens, *, mask_mod=None, score_mod=None, scale=None, extra_len: int = 0):
        """Plan and run one step on all three caches; assert every layer's output passes the policy.

        extra_len: pad the caller's q/k/v past the longest new chunk (random data there must be ignored).
        """
        spec, dtype = self.spec, self.spec.dtype
        for c in self.caches:
            c.plan(seq_ids, q_lens, mask_mod=mask_mod, score_mod=score_mod)
        B, Lq = len(seq_ids), max(q_lens) + extra_len
        for layer in range(spec.num_layers):
            q = self.randn(B, Lq, self.num_heads, spec.head_dim)
            k = self.randn(B, Lq, spec.num_kv_heads, spec.head_dim)
            v = self.randn(B, Lq, spec.num_kv_heads, spec.head_dim)
            out = self.paged.run(layer, q, k, v, scale=scale)
            gold = self.gold.run(layer, q, k, v, scale=scale)
            ref = self.ref.run(layer, q, k, v, scale=scale)
            assert out.dtype == dtype and out.device.type == spec.device.type
            assert gold.shape == q.shape
            assert out.shape == q.shape, f"run returned {tuple(out.shape)} for q of shape {tuple(q.shape)}"
            for b, (s, n) in enumerate(zip(seq_ids, q_lens)):
                c = compare(out[b, :n], gold[b, :n], ref[b, :n], dtype)
                assert c.ok, (f"step {self.steps}, layer {layer}, sequence {s!r} ({n} new tokens after "
                              f"{self.gold.length(s) - n}): {c.describe()}")
                assert (out[b, n:] == 0).all(), "positions past a row's new tokens are 0"
        for s in seq_ids:
            assert self.paged.length(s) == self.gold.length(s)
        self.steps += 1
        return out

    def pages(self, s) -> list[int]:
        return self.paged.pages(s)


def decode_lens(device, batch: int) -> list[int]:
    """A decode step of every row: pure (query length 1) on the GPU; on CPU one row takes 2 tokens so the step
    reuses the prefill graph (see the module docstring)."""
    return [1] * batch if device.type == "cuda" else [1] * (batch - 1) + [2]


@pytest.fixture
def spec(device, dtype) -> CacheSpec:
    return make_spec(device, dtype)


@pytest.fixture(params=["float32", "bfloat16", "float16"])
def lite_dtype(request, device) -> torch.dtype:
    """The dtypes of the feature-variety scenarios: float32 only on CPU (each dtype is one more 5-10 s compile
    there, and the core scenarios cover bf16), bf16 and fp16 on the GPU (float32 is covered by the core ones)."""
    wanted = ("bfloat16", "float16") if device.type == "cuda" else ("float32",)
    if request.param not in wanted:
        pytest.skip(f"feature-variety scenarios run in {'/'.join(wanted)} on {device.type}")
    return getattr(torch, request.param)


# ------------------------------------------------------------------------------------ core scenarios
def test_prefill_whole(spec):
    h = Harness(spec)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [13, 7, 16])
    assert [len(h.pages(s)) for s in "abc"] == [1, 1, 1]


def test_chunked_prefill(spec):
    """Chunks of different sizes (1 included) per sequence, crossing page boundaries mid-chunk."""
    h = Harness(spec, seed=1)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [5, 1, 9])
    h.step(["a", "b", "c"], [1, 13, 2])
    h.step(["a", "b", "c"], [16, 1, 7])
    h.step(["a", "b", "c"], [3, 16, 1])
    assert [h.paged.length(s) for s in "abc"] == [25, 31, 19]
    assert [len(h.pages(s)) for s in "abc"] == [2, 2, 2]


def test_batched_decode_of_different_lengths(spec):
    h = Harness(spec, seed=2)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [3, 16, 14])
    h.step(["a", "b", "c"], [1, 16, 1])                 # b: 32 (two full pages), c: 15
    for _ in range(3):                                  # c crosses a page boundary, b starts its third page
        h.step(["a", "b", "c"], [1, 1, 1])
    assert [h.paged.length(s) for s in "abc"] == [7, 35, 18]


def test_mixed_prefill_and_decode_steps(spec):
    h = Harness(spec, seed=3)
    h.admit("a", "b", "x")
    h.step(["a", "b", "x"], [16, 11, 2])
    h.finish("x")
    h.admit("c")
    h.step(["a", "c", "b"], [1, 9, 1])                   # decode, prefill chunk, decode
    h.step(["c", "a", "b"], [12, 1, 1])
    h.step(["b", "a", "c"], [5, 1, 1])


@pytest.mark.parametrize("prompt", [13, 16], ids=["fork-mid-page", "fork-at-page-boundary"])
def test_fork_then_diverge(spec, prompt):
    """Parent and child continue with different tokens; neither sees the other's (the oracle copies)."""
    h = Harness(spec, seed=4)
    h.admit("a", "x")
    h.step(["a", "x"], [prompt, 5])
    h.fork("a", "b")
    shared = h.pages("a")
    assert h.pages("b") == shared
    h.step(["a", "b", "x"], [1, 1, 1])                   # both write the shared page's next slot
    if prompt % spec.page_size:
        assert h.pages("a")[:-1] == h.pages("b")[:-1] and h.pages("a")[-1] != h.pages("b")[-1]
    else:
        assert h.pages("a")[:1] == h.pages("b")[:1] == shared and h.pages("a")[1] != h.pages("b")[1]
    h.step(["b", "a", "x"], [7, 1, 2])
    h.fork("b", "c")
    h.step(["c", "b", "a"], [1, 3, 1])
    h.finish("a")                                        # the children keep the shared prefix
    h.step(["c", "b", "x"], [1, 1, 1])
    h.step(["c", "x", "b"], [16, 1, 16])


def test_finish_then_reuse_pages(spec):
    """LIFO placement hands a finished sequence's pages to the next one; stale K/V in them is never read."""
    h = Harness(spec, policy="lifo", seed=5)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [16, 13, 7])
    h.step(["a", "b", "c"], [9, 1, 1])
    freed = h.pages("a")
    h.finish("a")
    h.admit("d")
    h.step(["d", "b", "c"], [5, 1, 1])                   # d takes one of a's pages, partly filled: stale tail
    assert h.pages("d")[0] in freed
    h.step(["d", "b", "c"], [14, 1, 1])
    assert set(h.pages("d")) == set(freed), "LIFO reused exactly the finished sequence's pages"
    h.finish("b")
    h.admit("e")
    h.step(["e", "d", "c"], [3, 1, 1])


def test_pages_scattered_non_monotonically(spec):
    h = Harness(spec, policy="random", seed=6)
    h.admit("a", "b", "c")
    for _ in range(3):
        h.step(["a", "b", "c"], [16, 15, 13])
    h.step(["a", "b", "c"], [1, 1, 1])
    lists = [h.pages(s) for s in "abc"]
    assert any(p != sorted(p) for p in lists), f"random placement should scatter pages: {lists}"
    assert all(len(p) == 3 or len(p) == 4 for p in lists)


def test_sequence_ending_exactly_on_a_page_boundary(spec):
    P = spec.page_size
    h = Harness(spec, seed=7)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [P, P - 1, 3])               # a ends exactly on the boundary
    assert len(h.pages("a")) == 1
    h.step(["a", "b", "c"], [1, 1, 1])                   # a starts page 2; b fills page 1 exactly
    assert len(h.pages("a")) == 2 and len(h.pages("b")) == 1
    h.step(["a", "b", "c"], [P - 1, 1, 1])               # a ends on the boundary again (2P), b crosses
    assert h.paged.length("a") == 2 * P and len(h.pages("a")) == 2
    h.step(["a", "b", "c"], [1, 1, 1])
    assert len(h.pages("a")) == 3


def test_prompt_length_equals_num_kv_heads(spec):
    """L == Hkv makes (B, L, Hkv, D) and (B, Hkv, L, D) the same shape: FMS's layout pitfall."""
    h = Harness(spec, seed=8)
    L = spec.num_kv_heads
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [L, L, L])
    h.step(["a", "b", "c"], [1, L, 1])


@pytest.mark.parametrize("batch", [3, 5])
def test_batch_sizes_and_query_lengths_not_powers_of_two(device, lite_dtype, batch):
    h = Harness(make_spec(device, lite_dtype), seed=9)
    ids = [f"s{i}" for i in range(batch)]
    h.admit(*ids)
    h.step(ids, [3, 5, 7, 13, 11][:batch])
    h.step(ids, decode_lens(device, batch))
    h.step(ids[::-1], [1, 9, 3, 1, 7][:batch])


def test_longer_query_tensor_than_needed(spec):
    """q/k/v may be longer than the longest chunk (Lq >= max q_len); the extra positions are ignored."""
    h = Harness(spec, seed=10)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [5, 3, 7], extra_len=2)
    h.step(["a", "b", "c"], [1, 1, 1], extra_len=0)


# ------------------------------------------------------------------------------ feature variety
@pytest.mark.parametrize("group", [1, 2, 4], ids=["MHA", "GQA2", "GQA4"])
def test_gqa(device, lite_dtype, group):
    spec = make_spec(device, lite_dtype)
    h = Harness(spec, num_heads=group * spec.num_kv_heads, seed=11)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [13, 7, 3])
    h.step(["a", "b", "c"], decode_lens(device, 3))
    h.step(["a", "b", "c"], [1, 12, 1])


@pytest.mark.parametrize("head_dim,page_size", [(64, 16), (24, 16), (16, 4)], ids=["D64", "D24", "P4"])
def test_head_dims_and_page_sizes(device, lite_dtype, head_dim, page_size):
    if head_dim & (head_dim - 1) or page_size < 16:
        cpu_only(device, "the CUDA kernel needs a power-of-two head dim and pages of >= 16 tokens")
    spec = make_spec(device, lite_dtype, head_dim=head_dim, page_size=page_size, num_pages=48)
    h = Harness(spec, policy="random", seed=12)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [13, 7, 16])
    h.fork("a", "d")
    h.step(["a", "b", "d"], decode_lens(device, 3))
    h.step(["d", "a", "c"], [1, 5, 1])
    if page_size == 4:
        assert len(h.pages("b")) == 2 and any(p != sorted(p) for p in map(h.pages, "abcd"))


MODS = {
    "sliding_window": dict(mask_mod=mods.sliding_window(5)),
    "prefix_lm": dict(mask_mod=mods.prefix_lm(6)),
    "alibi": dict(score_mod=mods.alibi(HQ)),
    "soft_cap": dict(score_mod=mods.soft_cap(1.0)),   # scores are ~N(0, 1): a cap of 1 bends most of them
}
# Each mask/score combination is one more compiled graph: pair every mask_mod with a score_mod.
MOD_PAIRS = [("sliding_window", "alibi"), ("prefix_lm", "soft_cap")]


@pytest.mark.parametrize("mask_name,score_name", MOD_PAIRS, ids=["+".join(p) for p in MOD_PAIRS])
def test_user_mods(device, lite_dtype, mask_name, score_name):
    """The oracle applies the same mod functions in logical positions (b, h, q_pos, kv_pos)."""
    h = Harness(make_spec(device, lite_dtype), seed=13)
    kw = {**MODS[mask_name], **MODS[score_name]}
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [13, 3, 16], **kw)
    h.step(["a", "b", "c"], [1, 9, 1], **kw)            # decode rows + a prefill chunk that starts mid-history
    h.fork("a", "d")
    h.step(["a", "d", "c"], decode_lens(device, 3), **kw)
    h.step(["d", "a", "c"], [7, 1, 1], **kw)


def test_mods_change_the_answer():
    """The mods above are not no-ops on these traces (else test_user_mods would prove nothing)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(13, HQ, 16, generator=g), torch.randn(13, 2, 16, generator=g)
    plain = reference_attention(q, k, k, 0, 0)
    for name, kw in MODS.items():
        modded = reference_attention(q, k, k, 0, 0, **kw)
        assert (modded - plain).abs().max() > 0.05, name   # far above any tolerance of the policy
    for mask_name, score_name in MOD_PAIRS:                 # neither half of a pair hides the other
        both = reference_attention(q, k, k, 0, 0, **MODS[mask_name], **MODS[score_name])
        for name in (mask_name, score_name):
            assert (both - reference_attention(q, k, k, 0, 0, **MODS[name])).abs().max() > 0.05, name


def test_custom_scale(device, lite_dtype):
    h = Harness(make_spec(device, lite_dtype), seed=14)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [13, 7, 3], scale=0.5)       # 2x the default 1/sqrt(16)
    h.step(["a", "b", "c"], decode_lens(device, 3), scale=0.5)


# ------------------------------------------------------------------------------------- poisoning
def test_outputs_stay_finite_after_poisoning_free_pages(spec):
    """NaN in every free page: a read of memory a sequence does not own would turn its output into NaN."""
    h = Harness(spec, policy="fifo", seed=15)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [16, 13, 5])
    h.finish("b")
    h.paged.poison_free_pages()
    assert torch.isnan(h.paged.k_pool).any() and torch.isnan(h.paged.v_pool).any()
    h.admit("d")
    h.step(["a", "c", "d"], [1, 1, 9])                   # d gets freshly poisoned pages
    h.step(["a", "c", "d"], [16, 11, 1])
    h.paged.poison_free_pages()
    h.fork("d", "e")
    h.step(["d", "e", "c"], [1, 1, 1])                   # copy-on-write into a poisoned page
    h.step(["d", "e", "a"], [1, 1, 1])


def test_poison_free_pages_option(spec):
    """poison_free_pages=True: freed pages are NaN at once, handed-out pages are zeroed."""
    h = Harness(spec, policy="lifo", seed=16, poison_free_pages=True)
    h.admit("a", "b", "c")
    h.step(["a", "b", "c"], [16, 13, 5])
    h.step(["a", "b", "c"], [1, 1, 1])
    a_pages = h.paged.pages("a")
    h.finish("a")
    P, N = spec.page_size, spec.num_pages
    for pool in (h.paged.k_pool, h.paged.v_pool):
        assert pool.unflatten(2, (N, P))[:, :, a_pages].isnan().all(), "freed pages must be NaN at once"
    h.admit("d")
    h.step(["d", "b", "c"], [7, 1, 1])
    first = h.paged.pages("d")[0]
    assert first in a_pages                                  # lifo: d reuses one of a's pages
    for pool in (h.paged.k_pool, h.paged.v_pool):
        assert pool.unflatten(2, (N, P))[:, :, first, 7:].eq(0).all(), "handed-out pages must be zeroed"
    h.step(["d", "b", "c"], [16, 1, 1])
