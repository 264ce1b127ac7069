"""Out of pages (all or nothing, the step in flight kept) and configurations refused up front, each leaving the
state exactly as before (see test_errors.py)."""

from __future__ import annotations

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import (CacheSpec, DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError,
                   PagedKVCache, PlanError, SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)
from tests.error_world import make_spec, rand_qkv, rejects, state_equal, world  # noqa: F401


# -------------------------------------------------------------------------------- out of pages
def _full_pool(device):
    """4 pages: a (13 tokens) and b (10) have room left on their page, c (16) is full, d (5) takes the last."""
    cache = PagedKVCache(make_spec(device, num_pages=4, max_seq_len=64), poison_free_pages=True)
    for s in "abcd":
        cache.admit(s)
    cache.plan(list("abcd"), [13, 10, 16, 5])
    assert cache.allocator.free_count == 0
    return cache


def test_out_of_pages_on_plan_when_only_the_last_sequence_needs_a_page(device):
    cache = _full_pool(device)
    before = cache.snapshot()
    with pytest.raises(OutOfPagesError, match=r"step of 3 sequence\(s\) needs 1 free page\(s\) but only 0 are free"
                       ) as info:
        cache.plan(["a", "b", "c"], [1, 1, 1])
    assert (info.value.needed, info.value.free) == (1, 0) and isinstance(info.value, MemoryError)
    assert state_equal(cache.snapshot(), before)
    assert [cache.length(s) for s in "abc"] == [13, 10, 16], "a and b were not committed"
    cache.finish("d")                                       # one page free: the same step now fits exactly
    cache.plan(["a", "b", "c"], [1, 1, 1])
    assert [cache.length(s) for s in "abc"] == [14, 11, 17] and cache.allocator.free_count == 0


def test_out_of_pages_for_several_pages(device):
    cache = _full_pool(device)
    cache.finish("c")
    before = cache.snapshot()
    with pytest.raises(OutOfPagesError, match=r"needs 3 free page\(s\) but only 1 are free"):
        cache.plan(["a", "d"], [3, 59])                     # a fits on its page; d needs 3 more
    assert state_equal(cache.snapshot(), before)


def test_out_of_pages_for_copy_on_write(device):
    cache = PagedKVCache(make_spec(device, num_pages=4, max_seq_len=64), poison_free_pages=True)
    cache.admit("a")
    cache.plan(["a"], [13])
    cache.fork("a", "b")
    cache.admit("c")
    cache.plan(["c"], [48])                                 # the other 3 pages
    shared = cache.pages("a")[0]
    before = cache.snapshot()
    with pytest.raises(OutOfPagesError, match=r"needs 1 free page\(s\) but only 0 are free"):
        cache.plan(["b"], [1])                              # fits on the page, but the page is shared: copy
    assert state_equal(cache.snapshot(), before)
    assert cache.allocator.refcount(shared) == 2 and cache.pages("b") == [shared]
    cache.finish("c")
    cache.plan(["b"], [1])
    assert cache.pages("b") != [shared] and cache.allocator.refcount(shared) == 1


def test_out_of_pages_keeps_the_step_in_flight(world):
    assert world.paged.allocator.free_count == 20
    err = rejects(world, "paged", OutOfPagesError,
                  r"step of 3 sequence\(s\) needs 24 free page\(s\) but only 20 are free",
                  lambda c: c.plan(["a", "b", "c"], [1, 200, 200]))
    assert (err.needed, err.free) == (24, 20)


# ----------------------------------------------------------------------------- configurations
@pytest.mark.parametrize("change,match", [
    (dict(page_size=12), r"page_size must be a power of two .* got 12"),
    (dict(page_size=0), r"page_size must be a positive int, got 0"),
    (dict(num_layers=0), r"num_layers must be a positive int, got 0"),
    (dict(num_kv_heads=-2), r"num_kv_heads must be a positive int, got -2"),
    (dict(head_dim=True), r"head_dim must be a positive int, got True"),
    (dict(num_pages=8.0), r"num_pages must be a positive int, got 8.0"),
    (dict(max_seq_len=16 * 8 + 1), r"max_seq_len 129 needs 9 pages but the pool has only 8"),
    (dict(dtype=torch.float64), r"dtype must be one of .* got torch.float64"),
    (dict(dtype=torch.int32), r"dtype must be one of .* got torch.int32"),
    (dict(device="cuda", page_size=8), r"page_size must be >= 16 on CUDA .* got 8"),
    (dict(device="cuda", head_dim=24), r"head_dim must be a power of two >= 16 for FlexAttention on CUDA, got 24"),
    (dict(device="cuda", head_dim=8), r"head_dim must be a power of two >= 16 .* got 8"),
    (dict(num_pages=2**27), r"num_pages \* page_size = 2147483648 pool slots; at most 2147483647"),
    (dict(page_size=2**31, num_pages=1, max_seq_len=16), r"num_pages \* page_size = 2147483648 pool slots"),
    (dict(max_seq_len=2**31), r"max_seq_len must be at most 2147483647 .* got 2147483648"),
    (dict(num_layers=False), r"num_layers must be a positive int, got False"),
    (dict(page_size=True), r"page_size must be a positive int, got True"),
    (dict(device="nope"), r"device 'nope' is not a device here"),
], ids=["page12", "page0", "layers0", "kvheads-2", "headdim-bool", "pages-float", "maxlen-beyond-pool", "float64",
        "int32", "cuda-page8", "cuda-headdim24", "cuda-headdim8", "pool-2**31-slots", "page-2**31",
        "maxlen-2**31", "layers-bool", "page-bool", "device-unknown"])
def test_bad_cache_spec(change, match):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, page_size=16, num_pages=8, max_seq_len=128)
    CacheSpec(**args)                                       # the base is valid; each change alone breaks it
    with pytest.raises(UnsupportedConfigError, match=match):
        CacheSpec(**{**args, **change})


def test_cuda_spec_needs_no_gpu():
    spec = CacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=16, num_pages=8, max_seq_len=128,
                     device="cuda")
    assert spec.device == torch.device("cuda")


def test_largest_pool_within_int32_is_accepted():
    CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=2**27 - 1, max_seq_len=2**31 - 16)


def test_bad_cache_options(device):
    spec = make_spec(device)
    with pytest.raises(UnsupportedConfigError, match=r"attention must be 'compiled' or 'eager', got 'fused'"):
        PagedKVCache(spec, attention="fused")
    with pytest.raises(UnsupportedConfigError, match=r"unknown placement policy 'best'; expected one of "
                                                     r"\['fifo', 'lifo', 'lowest', 'random'\]"):
        PagedKVCache(spec, policy="best")
    with pytest.raises(UnsupportedConfigError, match=r"check_ownership must be True, False or 'auto', got 'yes'"):
        PagedKVCache(spec, check_ownership="yes")


class _NotAPolicy:
    name = "half"

    def take(self, n):
        return []


@pytest.mark.parametrize("option,value,match", [
    ("policy", None, r"policy must be one of \['fifo', 'lifo', 'lowest', 'random'\] or a PlacementPolicy object"),
    ("policy", 5, r"policy must be one of .* got int 5"),
    ("policy", _NotAPolicy(), r"policy must be one of .* got _NotAPolicy"),
    ("seed", True, r"seed must be an int, got True"),
    ("seed", 1.5, r"seed must be an int, got 1.5"),
    ("check_ownership", 1, r"check_ownership must be True, False or 'auto', got 1"),
    ("check_ownership", 0, r"check_ownership must be True, False or 'auto', got 0"),
    ("check_ownership", None, r"check_ownership must be True, False or 'auto', got None"),
    ("decode_full_blocks", 1, r"decode_full_blocks must be True, False or 'auto', got 1"),
    ("decode_full_blocks", "yes", r"decode_full_blocks must be True, False or 'auto', got 'yes'"),
    ("poison_free_pages", 1, r"poison_free_pages must be True or False, got 1"),
    ("poison_free_pages", "auto", r"poison_free_pages must be True or False, got 'auto'"),
    ("kernel_options", [("num_warps", 4)], r"kernel_options must be a dict or None, got list"),
], ids=["policy-None", "policy-5", "policy-object-without-give", "seed-True", "seed-1.5", "check_ownership-1",
        "check_ownership-0", "check_ownership-None", "decode_full_blocks-1", "decode_full_blocks-yes", "poison-1",
        "poison-auto", "kernel_options-list"])
def test_options_of_the_wrong_type_are_refused(device, option, value, match):
    """Each used to be accepted: policy None or 5 failed later with AttributeError, the others were ignored or
    read as truthy."""
    with pytest.raises(UnsupportedConfigError, match=match):
        PagedKVCache(make_spec(device), **{option: value})


def test_a_policy_object_must_hold_a_fresh_pools_pages(device):
    from paged.allocator import LowestFirst

    used = LowestFirst(24)
    PagedKVCache(make_spec(device), policy=used)            # a fresh one is fine
    with pytest.raises(UnsupportedConfigError, match=r"start holding exactly the free pages 0..23"):
        PagedKVCache(make_spec(device), policy=LowestFirst(8))
    used.take(1)
    with pytest.raises(UnsupportedConfigError, match=r"one object per allocator\); it holds 23 page\(s\)"):
        PagedKVCache(make_spec(device), policy=used)


def test_poison_value_is_checked_before_anything_changes(device):
    cache = PagedKVCache(make_spec(device))
    before = cache.snapshot()
    with pytest.raises(InvalidRequestError, match=r"value must be a float, got str 'nan'"):
        cache.poison_free_pages("nan")
    assert not cache.poison and state_equal(cache.snapshot(), before)


def test_every_error_is_a_paged_error_with_the_builtin_base():
    assert issubclass(OutOfPagesError, MemoryError) and issubclass(UnknownSequenceError, KeyError)
    for cls, base in [(DuplicateSequenceError, ValueError), (InvalidRequestError, ValueError),
                      (SequenceTooLongError, InvalidRequestError), (UnsupportedConfigError, ValueError),
                      (PlanError, RuntimeError)]:
        assert issubclass(cls, PagedError) and issubclass(cls, base)
    assert str(UnknownSequenceError("x")).startswith("sequence 'x'"), "no KeyError repr quoting"


def test_a_layer_whose_attention_raises_can_be_run_again(device, monkeypatch):
    """A failure inside the attention call (a kernel error, dynamo's recompile limit) leaves the layer not run:
    the same call again stores the same K/V and attends, and gives the oracle's answer."""
    import paged.kernels.flex

    spec = make_spec(device)
    cache, oracle = PagedKVCache(spec, decode_kernel="flex", prefill_kernel="flex"), ContiguousOracle(spec)
    for c in (cache, oracle):
        c.admit("a")
        c.plan(["a"], [5])
    q, k, v = rand_qkv(torch.Generator().manual_seed(3), spec, 1, 5)

    def broken(*args, **kwargs):
        raise RuntimeError("the kernel failed")

    real = paged.kernels.flex.attend
    monkeypatch.setattr(paged.kernels.flex, "attend", broken)
    with pytest.raises(RuntimeError, match="the kernel failed"):
        cache.run(0, q, k, v)
    monkeypatch.setattr(paged.kernels.flex, "attend", real)
    out = cache.run(0, q, k, v)
    gold = oracle.run(0, q, k, v)[0]
    result = compare(out[0], gold, gold, spec.dtype)
    assert result.ok, result.describe()
    with pytest.raises(PlanError, match="layer 0 already ran"):
        cache.run(0, q, k, v)
