"""Eager and compiled FlexAttention over the paged cache: both correct, and in agreement.

They read different things (FACTS.md, FlexAttention): compiled flex trusts the block lists and skips every page
not listed; eager flex ignores the block lists and reads only the mask_mod, over the whole pool. So the
mask_mod must be right on its own (page ownership + length + causality); the last test shows that dropping
the ownership check leaks other sequences' pages on the eager path while the compiled path hides the bug.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import paged.attention
import paged.kernels.flex
from conformance.policy import CEILING, compare
from oracle import ContiguousOracle
from paged import CacheSpec, PagedKVCache, mods
from paged.kernels.flex import block_mask_for_call

HQ = 4
P = 16

# |eager - compiled| allowed per element: eps(dtype) * (|out| + max|v|) + 1e-5. Both read the same stored K/V.
# Eager flex (torch's math_attention) computes scores and softmax in float32, then casts the probabilities to
# the input dtype before P @ V: each probability moves by <= eps/2 relative, so the output by <= eps/2 * max|v|
# (allowing the same for the compiled kernel: eps * max|v|). Each side rounds its output once (<= eps/2 * |out|
# each). Float32 summation order and the online softmax's rescaling add noise measured <= 5e-7 on CPU: 1e-5.
AGREE_ABS = 1e-5


def make_spec(device, dtype, num_pages=24) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, page_size=P, num_pages=num_pages, max_seq_len=128,
                     dtype=dtype, device=device)


class Twins:
    """The same trace on an eager and a compiled PagedKVCache, next to the float64 and same-dtype oracles."""

    def __init__(self, spec: CacheSpec, seed: int = 0, attentions=("eager", "compiled"), **options) -> None:
        self.spec = spec
        options.setdefault("decode_kernel", "flex")  # this module is about FlexAttention; Triton decode has its own
        options.setdefault("prefill_kernel", "flex")  # ... and so has SDPA prefill (tests/test_sdpa_prefill.py)
        self.paged = {a: PagedKVCache(spec, attention=a, **options) for a in attentions}
        self.gold, self.ref = ContiguousOracle(spec), ContiguousOracle(spec, compute_dtype=spec.dtype)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_excess = -1.0  # max over elements of |eager - compiled| - allowed; must stay <= 0
        self.vmax = 0.0         # largest |v| stored so far (bounds every output)

    def do(self, op: str, *args) -> None:
        for c in (*self.paged.values(), self.gold, self.ref):
            getattr(c, op)(*args)

    def step(self, ids, lens, **mods_) -> dict[str, list]:
        """Run one step; return, per attention mode, the policy Comparison of every (layer, sequence)."""
        spec, dtype = self.spec, self.spec.dtype
        for c in (*self.paged.values(), self.gold, self.ref):
            c.plan(ids, lens, **mods_)
        B, Lq = len(ids), max(lens)
        results: dict[str, list] = {a: [] for a in self.paged}
        for layer in range(spec.num_layers):
            q, k, v = (torch.randn(B, Lq, h, spec.head_dim, generator=self.gen).to(dtype).to(spec.device)
                       for h in (HQ, spec.num_kv_heads, spec.num_kv_heads))
            outs = {a: c.run(layer, q, k, v) for a, c in self.paged.items()}
            gold, ref = self.gold.run(layer, q, k, v), self.ref.run(layer, q, k, v)
            for a, out in outs.items():
                results[a] += [compare(out[b, :n], gold[b, :n], ref[b, :n], dtype) for b, n in enumerate(lens)]
            if len(outs) == 2:
                e, c = outs["eager"].double(), outs["compiled"].double()
                self.vmax = max(self.vmax, v.abs().max().item())
                allowed = torch.finfo(dtype).eps * (torch.maximum(e.abs(), c.abs()) + self.vmax) + AGREE_ABS
                self.max_excess = max(self.max_excess, ((e - c).abs() - allowed).max().item())
        return results

    def checked_step(self, ids, lens, **mods_) -> None:
        for a, comparisons in self.step(ids, lens, **mods_).items():
            for c in comparisons:
                assert c.ok, f"{a} flex, step {ids} {lens}: {c.describe()}"
        assert self.max_excess <= 0, f"eager and compiled differ by {self.max_excess:.3g} more than allowed"


def test_eager_and_compiled_agree(device, dtype):
    t = Twins(make_spec(device, dtype), seed=1, policy="random")
    for s in "abc":
        t.do("admit", s)
    t.checked_step(["a", "b", "c"], [13, 16, 5])
    t.checked_step(["a", "b", "c"], [1, 1, 1])
    t.do("fork", "a", "d")
    t.checked_step(["d", "a", "c"], [1, 9, 1])
    t.do("finish", "b")
    t.do("admit", "e")
    t.checked_step(["e", "d", "a"], [7, 1, 1])
    t.checked_step(["e", "d", "a"], [1, 1, 1])
    for cache in t.paged.values():
        assert cache.snapshot()["sequences"] == t.paged["eager"].snapshot()["sequences"]


@pytest.mark.parametrize("full_blocks", [False, True], ids=["every-page-masked", "full-blocks"])
def test_decode_block_layouts(device, dtype, full_blocks):
    """Both decode layouts "auto" chooses between: full pages as full blocks (the mask_mod on the last page only),
    or every page listed as masked and no full-block lists (FlexDecoding's split-KV tiles then follow each
    sequence). The compiled kernel must read exactly each sequence's own pages in both."""
    t = Twins(make_spec(device, dtype), seed=3, policy="random", decode_full_blocks=full_blocks)
    for s in "abc":
        t.do("admit", s)
    t.checked_step(["a", "b", "c"], [16, 13, 5])
    t.checked_step(["a", "b", "c"], [1, 1, 1])          # a's 16 tokens fill a page: the next token opens one
    plan = t.paged["compiled"]._plan
    if full_blocks:
        assert int(plan.buffers.full_kv_num_blocks[:3].sum()) == 1 and int(plan.buffers.kv_num_blocks.sum()) == 3
    else:
        assert int(plan.buffers.full_kv_num_blocks.sum()) == 0 and int(plan.buffers.kv_num_blocks.sum()) == 4
        if device.type == "cuda":                          # no full-block lists at all: FlexDecoding tiles per row
            assert plan.block_mask.full_kv_num_blocks is None
    t.do("fork", "b", "d")
    t.checked_step(["d", "b", "c"], [1, 1, 1])          # copy-on-write of b's shared partial page
    t.do("finish", "a")
    t.checked_step(["d", "b", "c"], [1, 1, 1])


@pytest.mark.parametrize("check_ownership", ["auto", True, False])
def test_compiled_mask_with_and_without_the_ownership_check(device, dtype, check_ownership):
    """"auto" (the default) and False drop the ownership check from the cache's own compiled kernel's mask_mod
    (it visits only the row's listed pages; eager keeps the check), True keeps it: same answers, with a user mask
    and across a fork too."""
    t = Twins(make_spec(device, dtype), seed=4, policy="random", check_ownership=check_ownership)
    for s in "abc":
        t.do("admit", s)
    t.checked_step(["a", "b", "c"], [16, 13, 5])
    t.checked_step(["a", "b", "c"], [1, 1, 1])
    t.do("fork", "b", "d")
    t.checked_step(["d", "b", "c"], [2, 1, 1], mask_mod=mods.sliding_window(6))
    t.checked_step(["d", "b", "c"], [1, 1, 1])


@pytest.mark.parametrize("mask_name,score_name", [("sliding_window", "alibi"), ("prefix_lm", "soft_cap")])
def test_eager_mask_mods_alone_are_right(device, mask_name, score_name):
    """Eager reads nothing but the mask_mod: this checks the physical->logical mods on their own."""
    kw = {"mask_mod": {"sliding_window": mods.sliding_window(5), "prefix_lm": mods.prefix_lm(6)}[mask_name],
          "score_mod": {"alibi": mods.alibi(HQ), "soft_cap": mods.soft_cap(1.0)}[score_name]}
    t = Twins(make_spec(device, torch.float32), seed=2, attentions=("eager",), policy="random")
    for s in "abc":
        t.do("admit", s)
    t.checked_step(["a", "b", "c"], [13, 3, 16], **kw)
    t.checked_step(["a", "b", "c"], [1, 9, 1], **kw)
    t.do("fork", "a", "d")
    t.checked_step(["d", "a", "c"], [1, 1, 1], **kw)


def physical_mods_without_ownership(buffers, page_logical, page_size, mask_mod, score_mod):
    """paged.plan.physical_mods minus the ownership check: any live page with the right LOGICAL index passes,
    whichever sequence owns it (the bug FACTS.md describes)."""
    q_start, q_len = buffers.q_start, buffers.q_len

    def to_logical(b, kv_idx):
        logical_page = page_logical[kv_idx // page_size]
        return logical_page >= 0, logical_page * page_size + kv_idx % page_size   # no page_table[b, ...] check

    def paged_mask(b, h, q_idx, kv_idx):
        live, kv_pos = to_logical(b, kv_idx)
        q_pos = q_start[b] + q_idx
        return live & (kv_pos < q_start[b] + q_len[b]) & (q_idx < q_len[b]) & mask_mod(b, h, q_pos, kv_pos)

    assert score_mod is None
    return paged_mask, paged_mask, None


def test_ownership_check_matters_on_the_eager_path(device, monkeypatch):
    """Without the ownership check, eager flex reads other live sequences' pages; compiled flex hides it.

    No poison here: the other sequences' pages hold real, finite data, so the leak shows as a wrong answer.
    """
    # The FlexAttention kernel looks physical_mods up in paged.kernels.flex (imported from paged.plan): patch it there.
    monkeypatch.setattr(paged.kernels.flex, "physical_mods", physical_mods_without_ownership)
    t = Twins(make_spec(device, torch.float32), seed=3, policy="lowest")
    for s in "abc":
        t.do("admit", s)
    results = t.step(["a", "b", "c"], [16, 16, 5])          # every sequence owns a logical page 0
    results2 = t.step(["a", "b", "c"], [1, 2, 1])           # ... and a, b now a logical page 1
    eager = results["eager"] + results2["eager"]
    assert not all(c.ok for c in eager), "the broken mask must be caught on the eager path"
    assert max(c.error for c in eager) > 10 * CEILING[torch.float32], "a leak is a gross error, not rounding"
    assert all(c.finite for c in eager)
    for c in results["compiled"] + results2["compiled"]:
        assert c.ok, f"compiled flex skips unlisted pages, so it stays right: {c.describe()}"


def _two_rows_on_logical_page_0(cache, ids="ab"):
    """Admit two sequences and plan a step in which both own a (different) logical page 0."""
    for s in ids:
        cache.admit(s)
    return cache.plan(list(ids), [16, 5])


@pytest.mark.parametrize("attention,check_ownership,own,caller", [
    ("compiled", "auto", "listed", "checked"), ("compiled", True, "checked", "checked"),
    ("compiled", False, "listed", "listed"), ("eager", "auto", "checked", "checked"),
    ("eager", False, "checked", "checked")])
def test_which_mask_each_call_gets(device, attention, check_ownership, own, caller):
    """The mask without the ownership check goes only where the block lists are honoured: the cache's own
    compiled call (unless check_ownership=True), and a caller's compile only with check_ownership=False; dynamo's
    suppress_errors (failed frames run eagerly) gets the checked one. The two masks differ exactly there: at a
    slot of b's page 0 asked for row a (which owns another page 0) only the mask without the check says yes."""
    cache = PagedKVCache(make_spec(device, torch.float32), attention=attention, check_ownership=check_ownership,
                         decode_kernel="flex", prefill_kernel="flex")
    plan = _two_rows_on_logical_page_0(cache)
    checked, listed, _ = plan.buffers.wrapped[(None, None)]
    masks = {"checked": checked, "listed": listed}
    assert plan.block_mask.mask_mod is masks[own] and plan.checked_block_mask.mask_mod is masks[caller]
    assert block_mask_for_call(plan.kernel_plan) is plan.block_mask
    with torch._dynamo.config.patch(suppress_errors=True):
        assert block_mask_for_call(plan.kernel_plan) is plan.checked_block_mask
    page_b = cache.snapshot()["sequences"]["b"][0][0]                              # (pages, length)
    args = [torch.tensor(x, device=device) for x in (0, 0, 15, page_b * P + 2)]   # row a, head 0, query 15
    assert not checked(*args) and listed(*args)


def test_own_compiled_call_fails_at_the_recompile_limit(device):
    """Past dynamo's recompile limit the cache's compiled FlexAttention raises rather than run eagerly (which
    would read the whole pool through a mask_mod that trusts the block lists)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from paged.attention import compiled_flex_attention
    flex = compiled_flex_attention()
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(FailOnRecompileLimitHit):
        for n in (3, 5, 7):                   # shapes no other test uses: each a new graph
            x = torch.randn(1, 1, 16 * n, 16, device=device)
            flex(x, x, x)


#: Ways a call of the cache's compiled FlexAttention ends up evaluating the mask_mod densely over the whole pool.
EAGER_ROUTES = ["caller_compile_eager", "caller_compile_aot_eager", "stance_force_eager", "stance_forced_eager_backend",
                "dynamo_disabled_at_compile"]


@pytest.mark.parametrize("check_ownership", ["auto", True, False])
@pytest.mark.parametrize("route", EAGER_ROUTES)
def test_ownership_is_checked_wherever_flex_may_run_eagerly(device, monkeypatch, check_ownership, route):
    """`run` reached through a route where FlexAttention evaluates the mask_mod alone over the whole pool: the
    caller's torch.compile with backend "eager" / "aot_eager", `torch.compiler.set_stance("force_eager")` or a
    forced "eager" backend, or dynamo disabled when the cache's flex was compiled (TORCHDYNAMO_DISABLE=1 makes
    torch.compile return flex_attention itself; simulated). "auto" and True hand all of them the checked mask:
    right. False hands them the mask without the ownership check: it reads the other row's page 0 (the leak its
    docstring warns of), which also shows that each route really runs eagerly and that this test sees a leak."""
    spec = make_spec(device, torch.float32)
    cache = PagedKVCache(spec, check_ownership=check_ownership, decode_kernel="flex", prefill_kernel="flex")
    oracle = ContiguousOracle(spec)
    gen = torch.Generator().manual_seed(5)
    run, context = (lambda q, k, v: cache.run(0, q, k, v)), contextlib.nullcontext()
    if route.startswith("caller_compile_"):
        run = torch.compile(run, backend=route.removeprefix("caller_compile_"))
    elif route == "stance_force_eager":
        context = torch.compiler.set_stance("force_eager")
    elif route == "stance_forced_eager_backend":
        context = torch.compiler.set_stance("default", force_backend="eager")
    else:
        monkeypatch.setattr(paged.attention, "_compiled", flex_attention)
    errors = []
    with context:
        for step, lens in enumerate(([16, 5], [1, 2])):
            for c in (cache, oracle):
                if step == 0:
                    _two_rows_on_logical_page_0(c)
                else:
                    c.plan(["a", "b"], lens)
            q, k, v = (torch.randn(2, max(lens), h, spec.head_dim, generator=gen).to(device) for h in (HQ, 2, 2))
            out, ref = run(q, k, v), oracle.run(0, q, k, v)
            errors += [(out[b, :n] - ref[b, :n]).abs().max().item() for b, n in enumerate(lens)]
    if check_ownership is False:
        assert max(errors) > 0.1, f"the mask without the check must leak here: errors {errors}"
    else:
        assert max(errors) < 1e-5, f"errors {errors}"
