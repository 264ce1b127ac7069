"""Fresh prefill on SDPA (`paged.kernels.sdpa_prefill`): chosen exactly for fresh causal prefill steps, correct
against the float64 oracle (and so are the later steps that read the K/V it stored), blind to every other page.

The spec is tests/test_eager_vs_compiled.py's (4 query heads over 2 kv heads: SDPA's enable_gqa), so the compiled
FlexAttention shapes of the later steps are shared with it."""

from __future__ import annotations

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache, mods
from paged.errors import UnsupportedConfigError

HQ, HKV, D, P = 4, 2, 16, 16


def spec_for(device, dtype) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, page_size=P, num_pages=24, max_seq_len=128,
                     dtype=dtype, device=device)


def qkv(gen, B, L, dtype, device):
    return [torch.randn(B, L, h, D, generator=gen).to(dtype).to(device) for h in (HQ, HKV, HKV)]


def test_fresh_prefill_steps_and_only_they_run_on_sdpa(device):
    cache = PagedKVCache(spec_for(device, torch.float32))
    flex_only = PagedKVCache(spec_for(device, torch.float32), prefill_kernel="flex")
    assert cache.prefill_kernel == "sdpa_prefill" and flex_only.prefill_kernel == "flex"
    for c in (cache, flex_only):
        c.admit("a")
        c.admit("b")
    assert cache.plan(["a", "b"], [9, 4]).kernel == "sdpa_prefill"
    assert flex_only.plan(["a", "b"], [9, 4]).kernel == "flex"
    for layer in range(2):
        cache.run(layer, *qkv(torch.Generator().manual_seed(layer), 2, 9, torch.float32, device))
    second_chunk = "triton_mixed" if cache.decode_kernel == "triton" else "flex"   # Triton's cache: its mixed kernel
    assert cache.plan(["a", "b"], [3, 5]).kernel == second_chunk            # a second chunk reads the pool
    cache.admit("c")
    assert cache.plan(["c"], [7], mask_mod=mods.sliding_window(4)).kernel == "flex"   # a mod: FlexAttention
    assert PagedKVCache(spec_for(device, torch.float32), attention="eager").prefill_kernel == "flex"


def test_bad_prefill_kernel_choices_are_refused(device):
    with pytest.raises(UnsupportedConfigError, match="prefill_kernel must be"):
        PagedKVCache(spec_for(device, torch.float32), prefill_kernel="flash")
    with pytest.raises(UnsupportedConfigError, match="needs attention='compiled'"):
        PagedKVCache(spec_for(device, torch.float32), attention="eager", prefill_kernel="sdpa")


def test_sdpa_prefill_matches_the_oracle(device, dtype):
    """Rows of different lengths (right padding inside the step), then a decode step and a second chunk that read
    what it stored: outputs within the oracle policy, padding positions 0."""
    spec = spec_for(device, dtype)
    sdpa = PagedKVCache(spec, policy="random", seed=3)
    gold, ref = ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    for lens in ([13, 33, 5], [1, 1, 1], [4, 1, 2]):
        for c in (sdpa, gold, ref):
            if not c.seq_ids:
                for s in "abc":
                    c.admit(s)
            c.plan(list("abc"), lens)
        for layer in range(spec.num_layers):
            q, k, v = qkv(gen, 3, max(lens), dtype, device)
            out, g, r = sdpa.run(layer, q, k, v), gold.run(layer, q, k, v), ref.run(layer, q, k, v)
            for b, n in enumerate(lens):
                c = compare(out[b, :n], g[b, :n], r[b, :n], dtype)
                assert c.ok, f"step {lens}, layer {layer}, row {b}: {c.describe()}"
                assert not out[b, n:].any()


def test_sdpa_prefill_reads_no_other_page(device):
    """Every page but the step's own holds NaN and Inf (a finished sequence's leftovers, another live sequence's
    K/V): a fresh prefill's outputs stay finite and equal to those over a clean pool."""
    spec = spec_for(device, torch.float32)
    clean, dirty = PagedKVCache(spec), PagedKVCache(spec)
    dirty.k_pool[:, :, ::2] = float("nan")
    dirty.v_pool[:, :, 1::2] = float("inf")
    q, k, v = qkv(torch.Generator().manual_seed(1), 2, 20, torch.float32, device)
    outs = []
    for c in (clean, dirty):
        c.admit("x")
        c.admit("y")
        c.plan(["x", "y"], [20, 11])
        outs.append(c.run(0, q, k, v))
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])


def test_garbage_in_the_padding_reaches_no_real_output(device):
    """run()'s contract: positions past a row's q_len may hold anything. NaN and Inf there (queries, keys, values)
    leave the real outputs equal to those of zero padding, and the padding's outputs 0."""
    spec = spec_for(device, torch.float32)
    q, k, v = qkv(torch.Generator().manual_seed(2), 2, 20, torch.float32, device)
    dirty = [x.clone() for x in (q, k, v)]
    for x, value in zip(dirty, (float("nan"), float("inf"), float("-inf"))):
        x[1, 11:] = value
    outs = []
    for inputs in ((q, k, v), dirty):
        c = PagedKVCache(spec)
        c.admit("x")
        c.admit("y")
        c.plan(["x", "y"], [20, 11])
        outs.append(c.run(0, *inputs))
    assert torch.isfinite(outs[1]).all() and not outs[1][1, 11:].any()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
