"""Every error path: the specific paged.errors exception, a message that says what was wrong, and a state that
is exactly as before (`snapshot()` compared bit for bit, NaN == NaN), for PagedKVCache and, where the error
applies, the ContiguousOracle. After each rejected request the trace continues, and the paged cache must still
agree with the oracle (the pending layer of the step in flight, then one more step).
"""

from __future__ import annotations

import pytest
import torch

import oracle.errors
from conformance.policy import compare
from oracle import ContiguousOracle
from paged import (CacheSpec, DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError,
                   PagedKVCache, PlanError, SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)

HQ, HKV, D, P = 4, 2, 16, 16


def make_spec(device, num_pages=24, max_seq_len=128, dtype=torch.float32) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, page_size=P, num_pages=num_pages,
                     max_seq_len=max_seq_len, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ exact state equality
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that NaN == NaN and -0.0 != 0.0."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bits(a.cpu()), _bits(b.cpu())))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_state_equal_sees_nan_as_equal_and_catches_one_bit():
    x = torch.tensor([1.0, float("nan")])
    assert state_equal({"k": (x, [1])}, {"k": (x.clone(), [1])})
    assert not state_equal({"k": (x, [1])}, {"k": (x.clone(), [2])})
    y = x.clone()
    y[0] = torch.nextafter(y[0], torch.tensor(2.0))
    assert not state_equal(x, y)
    assert not state_equal(x, x.to(torch.float64))


def rand_qkv(gen, spec, B, Lq, hq=HQ, hkv=HKV, d=D, dtype=None, device=None):
    dtype, device = dtype or spec.dtype, device or spec.device
    return tuple(torch.randn(B, Lq, h, d, generator=gen).to(dtype).to(device) for h in (hq, hkv, hkv))


# ------------------------------------------------------------------------------------------- world
class World:
    """A paged cache (free pages poisoned with NaN) and the float64 / same-dtype oracles, mid-trace:
    a, b, c hold 13, 16 and 5 tokens, and a second step ([1, 2, 1] new tokens) has run layer 0 only."""

    def __init__(self, device, **paged_options) -> None:
        # max_seq_len 256 (16 pages): one sequence can ask for more than the 20 free pages. On CPU the compiled
        # shapes depend on the pool only, so this reuses the graphs of the other test files.
        self.spec = make_spec(device, max_seq_len=256)
        self.paged = PagedKVCache(self.spec, poison_free_pages=True, **paged_options)
        self.gold = ContiguousOracle(self.spec)
        self.ref = ContiguousOracle(self.spec, compute_dtype=self.spec.dtype)
        self.gen = torch.Generator().manual_seed(0)
        for s in "abc":
            self.all("admit", s)
        self.step(["a", "b", "c"], [13, 16, 5])
        self.step(["a", "b", "c"], [1, 2, 1], layers=[0])
        self.pending = [1]

    def all(self, op, *args):
        for c in (self.paged, self.gold, self.ref):
            getattr(c, op)(*args)

    def inputs(self, B, Lq, **kw):
        return rand_qkv(self.gen, self.spec, B, Lq, **kw)

    def step(self, ids, lens, layers=None):
        for c in (self.paged, self.gold, self.ref):
            c.plan(ids, lens)
        self.ids, self.lens = ids, lens
        self.run_layers(layers if layers is not None else range(self.spec.num_layers))

    def run_layers(self, layers):
        for layer in layers:
            q, k, v = self.inputs(len(self.ids), max(self.lens))
            out = self.paged.run(layer, q, k, v)
            gold, ref = self.gold.run(layer, q, k, v), self.ref.run(layer, q, k, v)
            for b, n in enumerate(self.lens):
                c = compare(out[b, :n], gold[b, :n], ref[b, :n], self.spec.dtype)
                assert c.ok, f"after the rejected request, layer {layer}, row {b}: {c.describe()}"

    def carry_on(self):
        """Finish the step in flight (layer 1), then one more step: everything still agrees with the oracle."""
        self.run_layers(self.pending)
        self.pending = []
        self.step(["c", "a", "b"], [2, 1, 1])

    def cache(self, kind):
        return self.paged if kind == "paged" else self.gold


@pytest.fixture
def world(device) -> World:
    return World(device)


both = pytest.mark.parametrize("kind", ["paged", "oracle"])


def error_class(kind: str, exc: type[Exception]) -> type[Exception]:
    """The class `kind` raises for paged's `exc`: the oracle has its own (oracle.errors), named alike."""
    return exc if kind == "paged" else getattr(oracle.errors, exc.__name__)


def rejects(world: World, kind: str, exc: type[Exception], match: str, call):
    """call(cache) must raise exc (a PagedError; for the oracle, its oracle.errors namesake) matching `match`,
    leave snapshot() exactly equal; then the trace carries on correctly."""
    cache = world.cache(kind)
    before = cache.snapshot()
    with pytest.raises(error_class(kind, exc), match=match) as info:
        call(cache)
    assert isinstance(info.value, PagedError if kind == "paged" else oracle.errors.OracleError)
    assert state_equal(cache.snapshot(), before), "a rejected request changed the state"
    world.carry_on()
    return info.value


# ------------------------------------------------------------------------------------ sequence ids
@both
@pytest.mark.parametrize("op", ["plan", "finish", "fork", "length"])
def test_unknown_sequence_id(world, kind, op):
    calls = {
        "plan": lambda c: c.plan(["a", "nope", "b"], [1, 1, 1]),
        "finish": lambda c: c.finish("nope"),
        "fork": lambda c: c.fork("nope", "child"),
        "length": lambda c: c.length("nope"),
    }
    err = rejects(world, kind, UnknownSequenceError, r"sequence 'nope' is not live", calls[op])
    assert err.seq_id == "nope" and isinstance(err, KeyError)


def test_unknown_sequence_id_for_pages(world):
    rejects(world, "paged", UnknownSequenceError, r"'nope' is not live", lambda c: c.pages("nope"))


@both
def test_unhashable_sequence_id(world, kind):
    rejects(world, kind, UnknownSequenceError, r"not live", lambda c: c.plan([["a"]], [1]))
    rejects(world, kind, InvalidRequestError, r"hashable, got list", lambda c: c.admit(["x"]))
    rejects(world, kind, InvalidRequestError, r"hashable, got dict", lambda c: c.fork("a", {}))


@both
def test_duplicate_admit(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'b' is already live", lambda c: c.admit("b"))


@both
def test_duplicate_fork_target(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'c' is already live", lambda c: c.fork("a", "c"))
    rejects(world, kind, DuplicateSequenceError, r"sequence 'a' is already live", lambda c: c.fork("a", "a"))


@both
def test_sequence_twice_in_one_step(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'a' appears twice in one step",
            lambda c: c.plan(["a", "b", "a"], [1, 1, 1]))


# ------------------------------------------------------------------------------------- step shape
@both
def test_empty_step(world, kind):
    rejects(world, kind, InvalidRequestError, r"at least one sequence", lambda c: c.plan([], []))


@both
def test_mismatched_lengths(world, kind):
    rejects(world, kind, InvalidRequestError, r"2 sequence ids but 1 query lengths", lambda c: c.plan(["a", "b"], [1]))
    rejects(world, kind, InvalidRequestError, r"1 sequence ids but 2 query lengths", lambda c: c.plan(["a"], [1, 1]))


@both
@pytest.mark.parametrize("bad", [0, -1, True, 1.0, None, "2"], ids=repr)
def test_bad_query_length(world, kind, bad):
    # the bad count is on the last sequence: the valid ones before it must not be committed
    rejects(world, kind, InvalidRequestError, rf"sequence 'c': new token count must be an int >= 1, got {bad!r}",
            lambda c: c.plan(["a", "b", "c"], [1, 1, bad]))


@both
def test_length_past_max_seq_len(world, kind):
    room = world.spec.max_seq_len - 18                 # b holds 16 + 2 tokens (the step in flight)
    err = rejects(world, kind, SequenceTooLongError,
                  rf"sequence 'b': 18 stored \+ {room + 1} new tokens exceeds max_seq_len {world.spec.max_seq_len}",
                  lambda c: c.plan(["a", "b"], [1, room + 1]))
    assert isinstance(err, error_class(kind, InvalidRequestError))


@both
@pytest.mark.parametrize("which", ["mask_mod", "score_mod"])
def test_non_callable_mod(world, kind, which):
    rejects(world, kind, InvalidRequestError, rf"{which} must be callable or None, got int",
            lambda c: c.plan(["a"], [1], **{which: 3}))


class UnhashableCausal:
    """A callable mask that defines __eq__ and so has no hash."""

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def __eq__(self, other):
        return isinstance(other, UnhashableCausal)


@both
@pytest.mark.parametrize("which", ["mask_mod", "score_mod"])
def test_unhashable_mod(world, kind, which):
    """The cache keys its compiled wrappers on the mods: an unhashable one must be refused before the commit,
    not fail half-way through it."""
    rejects(world, kind, InvalidRequestError, rf"{which} must be hashable: a UnhashableCausal is not",
            lambda c: c.plan(["a"], [1], **{which: UnhashableCausal()}))


@both
def test_several_faults_report_the_same_one_as_ever(world, kind):
    """Validation order: ids and lengths before the mods (every backend shares it, so they agree)."""
    rejects(world, kind, UnknownSequenceError, "nope", lambda c: c.plan(["nope"], [1], mask_mod=3))


@both
def test_a_rejected_plan_keeps_the_step_in_flight(world, kind):
    """Nothing about the current plan changes either: its pending layer still runs (and agrees)."""
    cache = world.cache(kind)
    with pytest.raises(error_class(kind, UnknownSequenceError)):
        cache.plan(["nope"], [1])
    with pytest.raises(error_class(kind, InvalidRequestError)):
        cache.plan(["a"], [0])
    with pytest.raises(error_class(kind, SequenceTooLongError)):
        cache.plan(["a"], [world.spec.max_seq_len])
    world.carry_on()


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
