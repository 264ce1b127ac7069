"""The world the error tests run in: a paged cache and the oracles mid-trace, exact state equality, and `rejects`
(a request must raise its error, change nothing, and leave a trace that still agrees with the oracle)."""

from __future__ import annotations

import pytest
import torch

import oracle.errors
from conformance.policy import compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedError, PagedKVCache

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
