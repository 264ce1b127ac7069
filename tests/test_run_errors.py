"""Error paths of run() (no plan, bad layer, bad inputs, scale, grad) and of mods that fail, each leaving the
state exactly as before (see test_errors.py)."""

from __future__ import annotations

import pytest
import torch

from conformance.policy import compare
from oracle import ContiguousOracle
from paged import InvalidRequestError, PagedKVCache, PlanError
from tests.error_world import (World, both, error_class, make_spec, rand_qkv, rejects, state_equal,  # noqa: F401
                               world)


# -------------------------------------------------------------------------------------- run errors
@both
def test_run_without_plan(device, kind):
    spec = make_spec(device)
    cache = PagedKVCache(spec) if kind == "paged" else ContiguousOracle(spec)
    cache.admit("a")
    q, k, v = rand_qkv(torch.Generator().manual_seed(1), spec, 1, 3)
    before = cache.snapshot()
    with pytest.raises(error_class(kind, PlanError), match=r"run\(\) needs a current plan: call plan\(\)"):
        cache.run(0, q, k, v)
    assert state_equal(cache.snapshot(), before)
    cache.plan(["a"], [3])
    cache.admit("b")                                   # any change of the sequence set ends the step
    before = cache.snapshot()
    with pytest.raises(error_class(kind, PlanError), match=r"needs a current plan"):
        cache.run(0, q, k, v)
    assert state_equal(cache.snapshot(), before)


@both
def test_run_after_fork_or_finish_needs_a_new_plan(world, kind):
    """A plan none of whose layers ran is dropped by fork / finish (between the layers of a step, fork is refused:
    tests/test_reliability.py)."""
    world.run_layers(world.pending)
    cache = world.cache(kind)
    cache.plan(["a", "b"], [1, 1])
    cache.fork("a", "a2")
    q, k, v = world.inputs(2, 1)
    before = cache.snapshot()
    with pytest.raises(error_class(kind, PlanError), match=r"needs a current plan"):
        cache.run(0, q, k, v)
    assert state_equal(cache.snapshot(), before)
    cache.finish("a2")
    with pytest.raises(error_class(kind, PlanError), match=r"needs a current plan"):
        cache.run(0, q, k, v)
    assert cache.length("a") == 15


@both
@pytest.mark.parametrize("layer", [-1, 2, 7, "1", 1.0, None, False, True], ids=repr)
def test_layer_out_of_range(world, kind, layer):
    q, k, v = world.inputs(3, 2)
    rejects(world, kind, PlanError, rf"layer must be an int in \[0, 2\), got {layer!r}",
            lambda c: c.run(layer, q, k, v))


@both
def test_layer_run_twice(world, kind):
    q, k, v = world.inputs(3, 2)
    rejects(world, kind, PlanError, r"layer 0 already ran in this step", lambda c: c.run(0, q, k, v))


def _bad_inputs(world: World, what: str):
    """(q, k, v) for the step in flight (batch 3, max q_len 2) with one thing wrong."""
    B, L = 3, 2
    q, k, v = world.inputs(B, L)
    if what == "dtype":
        return q.to(torch.float16), k, v
    if what == "kv dtype":
        return q, k, v.to(torch.bfloat16)
    if what == "head dim":
        return world.inputs(B, L, d=8)
    if what == "kv head count":
        return q, world.inputs(B, L, hkv=3)[1], v
    if what == "Hq not a multiple of Hkv":
        return world.inputs(B, L, hq=3)[0], k, v
    if what == "batch":
        return world.inputs(B - 1, L)
    if what == "too short Lq":
        return world.inputs(B, L - 1)
    if what == "q, k, v lengths differ":
        return q, world.inputs(B, L + 1)[1], v
    if what == "3-d q":
        return q[:, :, 0], k, v
    if what == "not a tensor":
        return q.tolist(), k, v
    if what == "0 q heads":
        return q[:, :, :0], k, v
    raise AssertionError(what)


BAD_INPUTS = {
    "dtype": r"q has dtype torch.float16; the cache holds torch.float32",
    "kv dtype": r"v has dtype torch.bfloat16; the cache holds torch.float32",
    "head dim": r"q has shape \(3, 2, 4, 8\); expected \(3, >=2, heads, 16\)",
    "kv head count": r"k has 3 heads; the cache stores 2 kv heads",
    "Hq not a multiple of Hkv": r"q has 3 heads, not a (positive )?multiple of the cache's 2 kv heads",
    "batch": r"q has shape \(2, 2, 4, 16\); expected \(3, >=2, heads, 16\)",
    "too short Lq": r"q has shape \(3, 1, 4, 16\); expected \(3, >=2, heads, 16\)",
    "q, k, v lengths differ": r"q, k, v lengths differ: 2, 3, 2",
    "3-d q": r"q has shape \(3, 2, 16\)",
    "not a tensor": r"q must be a tensor, got list",
    "0 q heads": r"q has 0 heads, not a (positive )?multiple of the cache's 2 kv heads",
}


@both
@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_run_inputs(world, kind, what):
    q, k, v = _bad_inputs(world, what)
    rejects(world, kind, InvalidRequestError, BAD_INPUTS[what], lambda c: c.run(1, q, k, v))


@both
@pytest.mark.parametrize("scale", ["0.5", float("nan"), float("inf"), -0.25, 0.0, 0, True, torch.tensor(0.25), [1.0]],
                         ids=repr)
def test_bad_scale(world, kind, scale):
    """Refused before the layer's K/V are stored (a bad scale used to fail inside the attention call, after)."""
    q, k, v = world.inputs(3, 2)
    rejects(world, kind, InvalidRequestError, r"scale must be None or a positive finite number, got",
            lambda c: c.run(1, q, k, v, scale=scale))


@pytest.mark.parametrize("kind", ["paged"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_inputs_requiring_grad_are_refused(world, kind, which):
    """paged is an inference cache: an input that requires grad (with grad mode on) would make the pool join the
    autograd graph, and every later run() failed. Refused before anything changes; later runs work (carry_on)."""
    q, k, v = world.inputs(3, 2)
    inputs = {"q": q, "k": k, "v": v}
    inputs[which] = inputs[which].requires_grad_()
    rejects(world, kind, InvalidRequestError,
            rf"{which} require\(s\) grad: paged is an inference cache .* torch.no_grad\(\) or torch.inference_mode",
            lambda c: c.run(1, *inputs.values()))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inputs_requiring_grad_are_fine_without_grad_mode(world, context):
    """Under no_grad / inference_mode nothing is recorded: the same inputs are accepted and the pool stays a plain
    tensor."""
    q, k, v = world.inputs(3, 2)
    k.requires_grad_()
    with getattr(torch, context)():
        out = world.paged.run(1, q, k, v)
        gold = world.gold.run(1, q, k, v)
    assert not world.paged.k_pool.requires_grad and not out.requires_grad
    for b, n in enumerate(world.lens):
        assert compare(out[b, :n], gold[b, :n], gold[b, :n].to(out.dtype), world.spec.dtype).ok
    world.pending = []
    world.carry_on()


def _raising_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx.nonexistent


def _raising_score(score, b, h, q_idx, kv_idx):
    raise ZeroDivisionError("no score today")


def _bool_mask(b, h, q_idx, kv_idx):
    return True


def _int_mask(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def _int_score(score, b, h, q_idx, kv_idx):
    return q_idx


def _three_args(b, h, q_idx):
    return q_idx >= 0


MOD_FAULTS = {
    "mask raises": (dict(mask_mod=_raising_mask), r"mask_mod raised AttributeError: .*nonexistent"),
    "score raises": (dict(score_mod=_raising_score), r"score_mod raised ZeroDivisionError: no score today"),
    "wrong arity": (dict(mask_mod=_three_args), r"mask_mod raised TypeError: .*argument"),
    "python bool": (dict(mask_mod=_bool_mask), r"mask_mod must return a bool tensor .* got a bool"),
    "int mask": (dict(mask_mod=_int_mask), r"mask_mod must return a bool tensor .* got a torch.int32 tensor"),
    "int score": (dict(score_mod=_int_score), r"score_mod must return a floating-point tensor .* got a torch.int32"),
}


@pytest.mark.parametrize("kind", ["paged"])
@pytest.mark.parametrize("fault", list(MOD_FAULTS))
def test_mod_that_fails_is_refused_by_plan(world, kind, fault):
    """A mod that raises (or returns no tensor of the right kind) used to pass plan() and fail inside run()'s
    attention call after the pool was written; check_mods calls each new mod once on scalars, before the commit."""
    kwargs, match = MOD_FAULTS[fault]
    rejects(world, kind, InvalidRequestError, match, lambda c: c.plan(["a", "c"], [1, 2], **kwargs))


@both
def test_wrong_device(world, kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type: CUDA is not available")
    other = torch.device("cpu") if world.spec.device.type == "cuda" else torch.device("cuda")
    q, k, v = world.inputs(3, 2)
    rejects(world, kind, InvalidRequestError, rf"k is on {other.type}.*; the cache is on {world.spec.device}",
            lambda c: c.run(1, q, k.to(other), v))
