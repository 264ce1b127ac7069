"""The "pagetable_flex" FMS attention op: registration, layer binding, one forward step against FMS's sdpa path.

Caches share one pool shape (256 slots, head size 16) with test_fms_generate.py, so compiled FlexAttention
compiles few shapes; checks that need their own mask (sliding window) or only test refusals run eager.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from fms.modules.attention import get_attention_type

from conformance.policy import CEILING, FLOOR, FUDGE
from paged import CacheSpec, PagedKVCache
from paged.errors import InvalidRequestError, PlanError, UnsupportedConfigError
from paged.fms import op
from paged.fms.checkpoint import tiny_llama
from paged.fms.generate import forward_logits
from paged.fms.op import OP_NAME, attention_layers, bind, is_bound, plan_step

VOCAB = 256
CONFIGS = {"mha": dict(nheads=4, kvheads=4, seed=0), "gqa": dict(nheads=4, kvheads=2, seed=1)}


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(name: str, device, dtype) -> torch.nn.Module:
    return tiny_llama(emb_dim=64, nlayers=2, vocab_size=VOCAB, device=device, dtype=dtype, **CONFIGS[name])


def new_cache(model, device, attention="compiled") -> PagedKVCache:
    kv = attention_layers(model)[0].kvheads
    spec = CacheSpec(num_layers=2, num_kv_heads=kv, head_dim=16, page_size=16, num_pages=16, max_seq_len=256,
                     dtype=next(model.parameters()).dtype, device=device)
    return PagedKVCache(spec, attention=attention)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, device):
    """(name, model on the device in its test dtype, float64 twin on the CPU)."""
    return (request.param, build(request.param, device, dtype_for(device)),
            build(request.param, torch.device("cpu"), torch.float64))


@pytest.fixture(scope="module")
def gqa(device):
    return build("gqa", device, dtype_for(device)), build("gqa", torch.device("cpu"), torch.float64)


def tokens(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def default_logits(model, seq, device, **kwargs) -> torch.Tensor:
    """Logits of every position of `seq` on FMS's default sdpa path (use_cache=True: the layout-safe branch)."""
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        out, _ = model(torch.tensor([seq], device=device), position_ids=torch.arange(len(seq), device=device)[None],
                       use_cache=True, **kwargs)
    return out[0].double().cpu()


def assert_close_to_default(ours, model, gold, seq, device, start=0, **kwargs) -> None:
    """conformance.policy's rule on logits: within FUDGE x the same-dtype sdpa path's error vs float64, plus FLOOR,
    under CEILING (slack scaled by |logits| ~2.5; the policy's attention outputs are ~1)."""
    dtype = dtype_for(device)
    g = default_logits(gold, seq, "cpu", **kwargs)[start:]
    ref = default_logits(model, seq, device, **kwargs)[start:]
    err, ref_err = float((ours.double().cpu() - g).abs().max()), float((ref - g).abs().max())
    scale = max(1.0, float(g.abs().max()))
    bound = min(FUDGE * ref_err + FLOOR[dtype] * scale, CEILING[dtype] * scale)
    assert err <= bound, f"logits off by {err:.3g} (sdpa path {ref_err:.3g}, bound {bound:.3g})"


# ------------------------------------------------------------------------------------------ registration
def test_op_is_registered_under_a_name_granite_swa_leaves_alone():
    assert "paged" not in OP_NAME and "sdpa" not in OP_NAME
    ops = get_attention_type(attn_name=OP_NAME)
    assert {"store", "compute_prefill", "update_attn_kwargs", "validate_attn_kwargs"} <= set(ops)


def test_registering_twice_is_harmless(gqa, device):
    model, gold = gqa
    op.register()
    op.register()
    saved = dict(vars(op))
    try:
        reloaded = importlib.reload(op)           # re-executes the module, including its registration
        reloaded.register()
        _check_registered_once(model, gold, reloaded, device)
    finally:
        # The reload made new classes (PagedStep, ...) under the same names; modules that imported the old ones
        # (prefill, decode) would no longer recognise the steps plan_step makes. Put the old namespace back.
        vars(op).clear()
        vars(op).update(saved)


def _check_registered_once(model, gold, reloaded, device) -> None:
    assert get_attention_type(attn_name=OP_NAME)["compute_prefill"]._pagetable_op
    # Binding twice (and after the reload) hooks each attention module once.
    bind(model)
    hooks = [len(m._forward_pre_hooks) for m in attention_layers(model)]
    reloaded.bind(model)
    bind(model)
    assert [len(m._forward_pre_hooks) for m in attention_layers(model)] == hooks == [1, 1]
    assert is_bound(model)
    # The op still runs after the reload.
    seq = tokens([5])[0]
    cache = new_cache(model, device)
    cache.admit("a")
    (logits,) = forward_logits(model, cache, ["a"], [seq])
    assert_close_to_default(logits, model, gold, seq, device)


# ------------------------------------------------------------------------------------------ one step
def test_batch_prefill_matches_sdpa_path(pair, device):
    name, model, gold = pair
    check_batch_prefill(model, gold, CONFIGS[name]["kvheads"], device, "compiled")


def test_batch_prefill_matches_sdpa_path_eager(gqa, device):
    # Eager FlexAttention reads only the mask_mod (compiled trusts the block lists): both paths must be right.
    check_batch_prefill(*gqa, CONFIGS["gqa"]["kvheads"], device, "eager")


def check_batch_prefill(model, gold, kv, device, attention):
    seqs = tokens([7, kv, 1, 12], seed=1)          # one row's length equals kvheads (sdpa's layout pitfall)
    cache = new_cache(model, device, attention)
    for i in range(4):
        cache.admit(i)
    out = forward_logits(model, cache, range(4), seqs)
    for seq, logits in zip(seqs, out):
        assert logits.shape == (len(seq), VOCAB)
        assert_close_to_default(logits, model, gold, seq, device)
    assert [cache.length(i) for i in range(4)] == [len(s) for s in seqs]


def test_history_carries_across_steps(gqa, device):
    model, gold = gqa
    a, b = tokens([9, 4], seed=2)
    cache = new_cache(model, device)
    cache.admit("a"), cache.admit("b")
    forward_logits(model, cache, ["a", "b"], [a[:5], b[:3]])
    second = forward_logits(model, cache, ["b", "a"], [b[3:], a[5:]])      # another row order, too
    assert_close_to_default(second[1], model, gold, a, device, start=5)
    assert_close_to_default(second[0], model, gold, b, device, start=3)


def test_use_cache_true_and_false_agree(gqa, device):
    model, _ = gqa
    seq = tokens([6], seed=3)[0]
    results = []
    for use_cache in (False, True):
        cache = new_cache(model, device)
        cache.admit("s")
        step = plan_step(cache, ["s"], [len(seq)])
        with torch.no_grad():
            out = model(torch.tensor([seq], device=device), position_ids=step.position_ids(), use_cache=use_cache,
                        **step.kwargs())
        if use_cache:
            out, kv = out
            # What FMS gets back as "the cache" is each layer's pools (views, not copies).
            assert [(k.data_ptr(), v.data_ptr()) for k, v in kv] == [
                (cache.k_pool[i].data_ptr(), cache.v_pool[i].data_ptr()) for i in range(2)]
        results.append(out)
    assert torch.equal(results[0], results[1])


def test_left_padding_matches_right_padding(gqa, device):
    model, _ = gqa
    seqs = tokens([3, 8], seed=4)
    outs = {}
    for side in ("right", "left"):
        cache = new_cache(model, device)
        cache.admit(0), cache.admit(1)
        step = plan_step(cache, [0, 1], [3, 8], padding_side=side)
        ids = torch.zeros(2, 8, dtype=torch.long)
        ids[0, :3] = torch.tensor(seqs[0]) if side == "right" else 0
        if side == "left":
            ids[0, 5:] = torch.tensor(seqs[0])
        ids[1] = torch.tensor(seqs[1])
        with torch.no_grad():
            logits = model(ids.to(device), position_ids=step.position_ids(8), **step.kwargs())
        outs[side] = logits[0, :3] if side == "right" else logits[0, 5:], logits[1]
    assert torch.allclose(outs["left"][0], outs["right"][0], atol=1e-5, rtol=0)
    assert torch.equal(outs["left"][1], outs["right"][1])


def test_sliding_window_matches_masked_sdpa(gqa, device):
    model, gold = gqa
    window, seq = 4, tokens([12], seed=5)[0]
    cache = new_cache(model, device, attention="eager")          # a mask of its own: no extra compile
    cache.admit("w")
    (logits,) = forward_logits(model, cache, ["w"], [seq], sliding_window=window)
    i = torch.arange(len(seq))
    keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    mask = torch.where(keep, 0.0, float("-inf"))[None]
    assert_close_to_default(logits, model, gold, seq, device, mask=mask)
    # The window really matters here: plain causal logits differ.
    assert (default_logits(gold, seq, "cpu")[window:] - logits.double().cpu()[window:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ refusals
def test_unbound_model_fails_loudly(device):
    model = build("gqa", device, dtype_for(device))     # never bound
    cache = new_cache(model, device, attention="eager")
    cache.admit("x")
    step = plan_step(cache, ["x"], [3])
    with pytest.raises(PlanError, match="bind"):
        model(torch.tensor([[5, 6, 7]], device=device), position_ids=step.position_ids(), **step.kwargs())


def test_position_ids_are_required(gqa, device):
    model, _ = gqa
    cache = new_cache(model, device, attention="eager")
    cache.admit("x")
    step = plan_step(cache, ["x"], [3])
    with pytest.raises(InvalidRequestError, match="position_ids"):
        model(torch.tensor([[5, 6, 7]], device=device), **step.kwargs())
    with pytest.raises(PlanError, match="paged_step"):
        model(torch.tensor([[5, 6, 7]], device=device), position_ids=step.position_ids(), attn_name=OP_NAME)


def test_a_step_serves_one_forward_only(gqa, device):
    model, _ = gqa
    cache = new_cache(model, device, attention="eager")
    cache.admit("x")
    step = plan_step(cache, ["x"], [3])
    ids = torch.tensor([[5, 6, 7]], device=device)
    with torch.no_grad():
        model(ids, position_ids=step.position_ids(), **step.kwargs())
        with pytest.raises(PlanError, match="already ran"):
            model(ids, position_ids=step.position_ids(), **step.kwargs())


def test_layer_window_must_match_the_plan_and_sinks_are_refused(gqa, device):
    model, _ = gqa
    cache = new_cache(model, device, attention="eager")
    cache.admit("x")
    step = plan_step(cache, ["x"], [3])
    attn = model.base_model.layers[0].attn
    x = torch.zeros(1, 3, 64, device=device, dtype=dtype_for(device))
    pos = step.position_ids()
    with torch.no_grad():
        # A layer that asks MultiHeadAttention for a window the step was not planned with is refused.
        with pytest.raises(PlanError, match="sliding_window"):
            attn(x, position_ids=pos, sliding_window=5, **step.kwargs())
        compute = get_attention_type(attn_name=OP_NAME)["compute_prefill"]
        q, kv = torch.zeros(1, 3, 4, 16, dtype=x.dtype, device=device), torch.zeros(1, 3, 2, 16, dtype=x.dtype, device=device)
        with pytest.raises(UnsupportedConfigError, match="sinks"):
            compute(q, kv, kv, 4, 2, 0.0, None, sinks=torch.zeros(4), paged_layer=0, **step.kwargs())


def test_binding_leaves_other_attention_ops_alone(device):
    model = build("gqa", device, dtype_for(device))
    seq = tokens([6], seed=6)[0]
    before = default_logits(model, seq, device)
    bind(model)
    assert torch.equal(default_logits(model, seq, device), before)
