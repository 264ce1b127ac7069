"""Compiled prefill steps (paged.fms.prefill) give the tokens and logits of the eager prefill, with few compiles.

CPU: traced with the cheap "aot_eager" backend (the op path, dynamic shapes and graph breaks are the compiler's
front end; inductor's kernels are exercised on the GPU, where the generator compiles prefill by default).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from paged.errors import PlanError
from paged.fms.checkpoint import tiny_llama
from paged.fms.generate import PagedGenerator
from paged.fms.op import plan_step
from paged.fms.prefill import CompiledPrefill

VOCAB = 256
BUDGET = 256          # the pool of tests/fms/test_fms_generate.py: no new FlexAttention shape


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return tiny_llama(emb_dim=64, nlayers=2, vocab_size=VOCAB, nheads=4, kvheads=2, device=device, dtype=dtype,
                      seed=7)


def generators(model, device) -> tuple[PagedGenerator, PagedGenerator]:
    """(compiled prefill, eager prefill); decode steps eager in both, so only the prefill differs."""
    fast = PagedGenerator(model, token_budget=BUDGET, cuda_graphs=False, compile_decode=False, compile_prefill=True)
    if device.type != "cuda":
        fast._prefiller = CompiledPrefill(model, fast.cache, backend="aot_eager")
    slow = PagedGenerator(model, token_budget=BUDGET, cuda_graphs=False, compile_decode=False, compile_prefill=False)
    return fast, slow


@pytest.fixture(scope="module")
def pair(model, device):
    counters.clear()
    fast, slow = generators(model, device)
    # Whole prompts of batch 1 and batch 3 (one graph each), then chunked prefill with a one-token last chunk.
    fast.generate(prompts_of([9]), 2)
    fast.generate(prompts_of([5, 12, 7], seed=1), 2)
    return fast, slow, dict(counters["graph_break"])


def test_compiled_prefill_is_the_default_on_cuda_only(model, device):
    gen = PagedGenerator(model, token_budget=BUDGET)
    assert gen.compile_prefill == (device.type == "cuda")
    assert (gen.prefiller is not None) == (device.type == "cuda")
    windowed = PagedGenerator(model, token_budget=BUDGET, sliding_window=4, compile_prefill=True)
    assert windowed.prefiller is None                     # the traced op attends without a window


def test_tokens_and_logits_equal_the_eager_prefill(pair, device):
    fast, slow, graph_breaks = pair
    assert not graph_breaks, graph_breaks
    compiles = fast.prefiller.compiles
    assert 1 <= compiles <= 2                             # batch 1, and one graph for every batch > 1
    prompts = prompts_of([3, 17, 8, 1, 11], seed=3)
    for chunk in (None, 5):                               # whole prompts; chunks of 5 (later chunks see history)
        outs, logits = fast.generate(prompts, 6, prefill_chunk=chunk, max_batch=4, return_logits=True)
        ref, ref_logits = slow.generate(prompts, 6, prefill_chunk=chunk, max_batch=4, return_logits=True)
        assert outs == ref
        tol = dict(atol=2e-2, rtol=2e-2) if device.type == "cuda" else dict(atol=1e-5, rtol=1e-5)
        for got, want in zip(logits, ref_logits):
            torch.testing.assert_close(got, want, **tol)
    eager_steps = fast.prefiller.eager_steps
    one = prompts_of([1], seed=4)                         # a step of one-token chunks only runs eagerly
    assert fast.generate(one, 3) == slow.generate(one, 3)
    assert fast.prefiller.eager_steps == eager_steps + 1
    assert fast.prefiller.compiles == compiles            # other batches and lengths: no new graph
    assert fast.cache.memory().pages_in_use == 0


def test_prefill_refuses_a_step_of_another_cache(pair, model):
    fast, slow, _ = pair
    slow.cache.admit("x")
    try:
        step = plan_step(slow.cache, ["x"], [3])
        with pytest.raises(PlanError):
            fast.prefiller(step, [[5, 6, 7]], [(0, 2)])
    finally:
        slow.cache.finish("x")
