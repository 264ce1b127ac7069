"""Compiled and CUDA-graphed decode steps (paged.fms.decode) give the tokens of the eager paged path, FMS's default
path and, in float32, HF transformers.

CPU: the traced path (`paged.ops` custom op inside torch.compile of the whole FMS forward), with the cheap
"aot_eager" backend for tracing properties and inductor once for the generated kernels. GPU: CUDA graphs per batch
bucket, under continuous batching (rows joining and leaving), with zero recompiles and captures after warm-up.

Compiles are shared (each whole-model compile costs tens of seconds on a CPU): one traced ("aot_eager") generator
serves the traced tests, one inductor-compiled float32 generator (the transformers checkpoint's model) serves the
compiled tests on the CPU, and the pool is the 256-token pool of tests/fms/test_fms_generate.py (same FlexAttention
shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters

from paged import PagedKVCache
from paged.errors import InvalidRequestError, PlanError, UnsupportedConfigError
from paged.fms.checkpoint import load_fms_llama, tiny_llama, write_tiny_llama_checkpoint
from paged.fms.decode import CompiledDecoder, FedTokens
from paged.fms.generate import PagedGenerator, cache_spec_for, forward_logits
from paged.fms.op import plan_step
from paged.fms.scheduler import ContinuousBatching, Work

VOCAB = 256
BUDGET = 256          # the pool of tests/fms/test_fms_generate.py: 16 pages of 16, no new FlexAttention shape


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(device):
    return tiny_llama(emb_dim=64, nlayers=2, vocab_size=VOCAB, nheads=4, kvheads=2, device=device,
                      dtype=dtype_for(device), seed=5)


def fms_default_tokens(model, prompt, n, device) -> list[int]:
    """Greedy tokens of FMS's default path (sdpa op, contiguous cache), one row."""
    ids, pos = torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)[None]
    past, tokens = None, []
    with torch.no_grad():
        for _ in range(n):
            out, past = model(ids, position_ids=pos, past_key_value_states=past, use_cache=True)
            tokens.append(int(out[0, -1].argmax()))
            ids, pos = torch.tensor([[tokens[-1]]], device=device), pos[:, -1:] + 1
    return tokens


# Continuous batching that moves through batch buckets: 6 prompts, at most 5 running, different lengths and limits,
# so rows leave at different steps and waiting prompts join (batches 5, 4, 3, 2, 1 and back up).
PROMPT_LENS = [3, 9, 5, 12, 7, 4]
LIMITS = [12, 5, 9, 3, 14, 8]


def continuous_batching(gen: PagedGenerator) -> list[list[int]]:
    return gen.generate(prompts_of(PROMPT_LENS, seed=2), LIMITS, max_batch=5)


@dataclass
class Traced:
    """The module's traced decode path and the eager paged path, after the continuous-batching run that traced it."""

    gen: PagedGenerator                         # decode steps traced with "aot_eager"
    eager: PagedGenerator                       # decode steps run eagerly (no decoder)
    traced_outs: list[list[int]]
    eager_outs: list[list[int]]
    graph_breaks: dict                          # torch._dynamo's graph-break counter while it was traced


@pytest.fixture(scope="module")
def traced(model, device) -> Traced:
    """One traced generator for the module: its first run (continuous batching over batches 5..1) traces every
    shape the traced tests use (batch 1 and one dynamic batch), so later tests trace nothing new."""
    counters.clear()
    gen = PagedGenerator(model, token_budget=BUDGET, cuda_graphs=False, compile_decode=True)
    gen._decoder = CompiledDecoder(model, gen.cache, cuda_graphs=False, backend="aot_eager")
    eager = PagedGenerator(model, token_budget=BUDGET, cuda_graphs=False, compile_decode=False)
    traced_outs = continuous_batching(gen)
    return Traced(gen, eager, traced_outs, continuous_batching(eager), dict(counters["graph_break"]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama written by transformers (float32)."""
    return write_tiny_llama_checkpoint(tmp_path_factory.mktemp("decode") / "ckpt", vocab_size=VOCAB, hidden_size=64,
                                       num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=11)


@pytest.fixture(scope="module")
def fp32_compiled(checkpoint, device) -> PagedGenerator:
    """The checkpoint's model loaded by FMS in float32, with compiled (on CUDA: graphed) decode steps."""
    return PagedGenerator(load_fms_llama(checkpoint, device=device, dtype=torch.float32), token_budget=BUDGET,
                          compile_decode=True)


@pytest.fixture(scope="module")
def compiled(model, device, fp32_compiled) -> PagedGenerator:
    """Compiled decode steps in the device's test dtype. On the CPU (float32) this is `fp32_compiled`: the module's
    one inductor compile of a whole model (a minute of a 2-core CPU); on CUDA the bf16 `model`'s own."""
    if dtype_for(device) == torch.float32:
        return fp32_compiled
    return PagedGenerator(model, token_budget=BUDGET, compile_decode=True)


def test_traced_decode_has_no_graph_break_and_matches_eager(traced):
    assert traced.eager.decoder is None and traced.gen.decoder is not None
    assert traced.traced_outs == traced.eager_outs
    assert [len(o) for o in traced.traced_outs] == LIMITS
    assert not traced.graph_breaks, traced.graph_breaks
    assert traced.gen.decoder.compiles >= 1
    assert traced.gen.cache.memory().pages_in_use == 0


def test_eos_inside_a_step_planned_ahead(traced):
    """A row that stops at EOS after the next step was already planned rides that step along; outputs, events
    and pages are those of the eager path, where every step is planned after its tokens are known."""
    eager, traced = traced.eager, traced.gen
    prompts = prompts_of([5, 7, 4], seed=9)
    free = eager.generate(prompts, 12)
    eos = free[1][4]                                     # row 1 stops at its 5th token (others may stop earlier)
    got, want = [], []
    outs = traced.generate(prompts, 12, eos_token_id=eos, callback=lambda e: got.append(e.new_tokens))
    ref = eager.generate(prompts, 12, eos_token_id=eos, callback=lambda e: want.append(e.new_tokens))
    assert outs == ref and outs[1][-1] == eos and len(outs[1]) <= 5
    assert [t for t in got if t] == [t for t in want if t]
    assert traced.cache.memory().pages_in_use == 0 and not traced.cache.seq_ids


def test_compiled_decode_matches_eager_and_fms_default(compiled, device):
    """Inductor's kernels around the custom op; a second run of other batches compiles nothing new."""
    gen = compiled
    assert gen.decoder is not None and gen.compile_decode
    prompts = prompts_of([6, 10], seed=4)
    outs = gen.generate(prompts, 7)
    assert outs == [fms_default_tokens(gen.model, p, 7, device) for p in prompts]
    again = gen.generate(prompts_of([6, 10, 3], seed=4), 7)
    assert again[:2] == outs
    compiles = gen.decoder.compiles
    assert gen.generate(prompts_of([6, 10, 3], seed=4), 7) == again
    assert gen.decoder.compiles == compiles


def test_float32_tokens_equal_hf_transformers(checkpoint, fp32_compiled, device):
    """A checkpoint written by transformers, loaded by FMS: compiled (on CUDA: graphed) paged decoding gives
    transformers' own greedy tokens in float32."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).to(device).eval()
    prompts = prompts_of([8, 5, 11], seed=6)
    gen = fp32_compiled
    assert gen.decoder is not None and gen.model.training is False
    ours = gen.generate(prompts, 10)
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o == out[0, len(p):].tolist()


def test_decoder_refuses_what_it_cannot_run(model, device):
    cache = PagedKVCache(cache_spec_for(model, token_budget=BUDGET))
    dec = CompiledDecoder(model, cache, cuda_graphs=False, compile=False)
    cache.admit("a")
    forward_logits(model, cache, ["a"], [[5, 6, 7]])
    with pytest.raises(PlanError):                                  # not a step
        dec(None, [1])
    stale = plan_step(cache, ["a"], [1])
    cache.admit("b")                                                # drops the current plan
    with pytest.raises(PlanError):
        dec(stale, [1])
    prefill = plan_step(cache, ["a"], [2])
    with pytest.raises(InvalidRequestError):                        # not a decode step
        dec(prefill, [1])
    step = plan_step(cache, ["a"], [1])
    with pytest.raises(InvalidRequestError):                        # one token per row
        dec(step, [1, 2])
    logits, picks = dec(step, [9])
    assert logits.shape == (1, VOCAB) and picks.shape == (1,)
    with pytest.raises(PlanError):                                  # a step runs once
        dec(step, [9])
    if device.type == "cpu":
        with pytest.raises(UnsupportedConfigError):
            CompiledDecoder(model, cache, cuda_graphs=True)


@pytest.mark.gpu
def test_graphed_decode_matches_eager_paged_and_fms_default(model, device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    # The CUDA default: compiled + graphs. A bare "cuda" (no index, as the benchmark passes it) must work too: the
    # device-fed step once compared the fed tokens' "cuda:0" with the spec's "cuda" and refused every step.
    graphed = PagedGenerator(model, token_budget=BUDGET, device=torch.device(device.type))
    assert graphed.cuda_graphs and graphed.compile_decode and graphed.compile_prefill
    eager = PagedGenerator(model, token_budget=BUDGET, cuda_graphs=False, compile_decode=False)
    ours = continuous_batching(graphed)
    assert ours == continuous_batching(eager)
    prompts = prompts_of(PROMPT_LENS, seed=2)
    assert ours == [fms_default_tokens(model, p, n, device) for p, n in zip(prompts, LIMITS)]
    assert graphed.decoder.captures >= 3 and graphed.decoder.replays > 0


@pytest.mark.gpu
def test_long_run_compiles_and_captures_nothing_after_warmup(model, device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    gen = PagedGenerator(model, token_budget=4096)
    continuous_batching(gen)                                          # warm-up: every bucket 1..8 seen twice
    continuous_batching(gen)
    compiles, captures, replays = gen.decoder.compiles, gen.decoder.captures, gen.decoder.replays
    assert compiles <= 2                                              # batch 1, and one dynamic batch
    for seed in range(5):                                             # 5 more runs, other prompts and limits
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(2, 20, (8,), generator=g).tolist()
        limits = torch.randint(1, 20, (8,), generator=g).tolist()
        gen.generate(prompts_of(lens, seed=seed), limits, max_batch=6)
    assert gen.decoder.compiles == compiles
    assert gen.decoder.captures == captures
    assert gen.decoder.replays > replays
    assert gen.cache.memory().pages_in_use == 0


class _SubsetDecode:
    """Continuous batching's admission and prefill; subclasses pick which running requests decode in a step."""

    def __init__(self) -> None:
        self.inner, self.turn = ContinuousBatching(), 0

    def admit(self, waiting, running, free_pages, pages_held):
        return self.inner.admit(waiting, running, free_pages, pages_held)


class HalfDecode(_SubsetDecode):
    """A scheduler that decodes only every other running request per step (alternating halves): on the traced path
    the step planned ahead must be the one it would pick between steps, over all running requests."""

    def next_step(self, running):
        work = self.inner.next_step(running)
        if work.kind == "prefill" or len(running) == 1:
            return work
        self.turn ^= 1
        rows = tuple(r for i, r in enumerate(running) if i % 2 == self.turn) or tuple(running)
        return Work("decode", rows, tuple((r.out[-1],) for r in rows))


def test_a_partial_decode_scheduler_gives_the_same_tokens_traced(traced):
    prompts = prompts_of([4, 6, 5], seed=12)
    events, eager_events = [], []
    outs = traced.gen.generate(prompts, [6, 4, 7], scheduler=HalfDecode(), callback=events.append)
    ref = traced.eager.generate(prompts, [6, 4, 7], scheduler=HalfDecode(), callback=eager_events.append)
    assert outs == ref == traced.eager.generate(prompts, [6, 4, 7])  # a request's tokens: not its batch-mates'
    steps = lambda evs: [(e.kind, e.requests, e.finished) for e in evs]                   # noqa: E731
    assert steps(events) == steps(eager_events)                        # the scheduler's own steps, planned ahead
    decodes = [e.requests for e in events if e.kind == "decode"]
    assert any(len(rows) < 3 for rows in decodes[:2])                # it really decoded a subset
    assert traced.gen.cache.memory().pages_in_use == 0


class SlidingPairs(_SubsetDecode):
    """A scheduler that decodes two of the running requests per step, sliding by one: (0, 1), (1, 2), (2, 0), ...
    Each step shares one row with the step before, so its input mixes a token fed on the device (a pick the host
    has not read yet) with one the host read a step earlier."""

    def next_step(self, running):
        work = self.inner.next_step(running)
        if work.kind == "prefill" or len(running) <= 2:
            return work
        n = len(running)
        rows = tuple(running[(self.turn + i) % n] for i in range(2))
        self.turn = (self.turn + 1) % n
        return Work("decode", rows, tuple((r.out[-1],) for r in rows))


def test_steps_fed_partly_from_the_device_give_the_eager_tokens(traced):
    prompts = prompts_of([4, 6, 5, 3], seed=13)
    outs = traced.gen.generate(prompts, [7, 5, 8, 6], scheduler=SlidingPairs())
    assert outs == traced.eager.generate(prompts, [7, 5, 8, 6], scheduler=SlidingPairs())
    assert outs == traced.eager.generate(prompts, [7, 5, 8, 6])
    assert traced.gen.cache.memory().pages_in_use == 0


class _Recording:
    """A CompiledDecoder seen through a log of launches and reads (the generator calls nothing else on it)."""

    def __init__(self, inner: CompiledDecoder, log: list) -> None:
        self.inner, self.cache, self.log = inner, inner.cache, log

    def __call__(self, step, tokens):
        self.log.append(("launch", step.plan.batch))
        return self.inner(step, tokens)

    def read_later(self, picks):
        pending, log, n = self.inner.read_later(picks), self.log, sum(1 for e in self.log if e[0] == "launch")

        class Logged:
            def tolist(self):
                log.append(("read", n))
                return pending.tolist()

        return Logged()


def test_greedy_steps_are_read_after_the_next_launch(traced):
    """The host reads a greedy decode step's picks only once the next step is launched (so the GPU never waits for
    the host between steps), except the last step of the run; tokens are unchanged."""
    gen, log = traced.gen, []
    inner = gen.decoder
    gen._decoder = _Recording(inner, log)
    try:
        outs = gen.generate(prompts_of([5, 3], seed=14), [6, 6])
    finally:
        gen._decoder = inner
    assert outs == traced.eager.generate(prompts_of([5, 3], seed=14), [6, 6])
    launches = [i for i, e in enumerate(log) if e[0] == "launch"]
    reads = [(i, e[1]) for i, e in enumerate(log) if e[0] == "read"]
    assert len(launches) == len(reads) == 5                       # 5 decode steps after the prefill
    for (at, step), nxt in zip(reads[:-1], launches[1:]):
        assert nxt < at, f"decode step {step} read before the next launch: {log}"


def test_fed_tokens_must_match_the_step(traced):
    gen = traced.gen
    gen.cache.admit("fed")
    try:
        forward_logits(gen.model, gen.cache, ["fed"], [[5, 6, 7]])
        step = plan_step(gen.cache, ["fed"], [1])
        dev = gen.cache.k_pool.device
        with pytest.raises(InvalidRequestError, match="tokens for a step of 1 rows"):
            gen.decoder(step, FedTokens(torch.zeros(2, dtype=torch.long, device=dev), [0, 1], [0, 0]))
        with pytest.raises(InvalidRequestError, match="host tokens"):
            gen.decoder(step, FedTokens(torch.zeros(2, dtype=torch.long, device=dev), [0], [0, 0]))
        with pytest.raises(InvalidRequestError, match="outside 0..1"):
            gen.decoder(step, FedTokens(torch.zeros(2, dtype=torch.long, device=dev), [2], [0]))
        with pytest.raises(InvalidRequestError, match="1-d int64"):
            gen.decoder(step, FedTokens(torch.zeros(2, dtype=torch.int32, device=dev), [0], [0]))
        with pytest.raises(InvalidRequestError, match=f"on {dev}, got .* on meta"):     # tokens on another device
            gen.decoder(step, FedTokens(torch.zeros(2, dtype=torch.long, device="meta"), [0], [0]))
        assert gen.cache.current_plan is step.plan and not step.plan.layers_run     # refused before anything ran
    finally:
        gen.cache.finish("fed")


@pytest.mark.parametrize("sampling", [dict(return_logits=True), dict(do_sample=True, seed=3, top_k=8)],
                         ids=["return_logits", "sampling"])
def test_host_chosen_tokens_with_a_subset_scheduler_and_eos(traced, sampling):
    """When the host chooses tokens (sampling, logits asked for), the next step is planned before this one's tokens
    are read; a row that stops outside that planned step must not drop its plan (finished once it is launched)."""
    prompts, limits = prompts_of([4, 6, 5, 3], seed=15), [9, 9, 9, 9]
    free = traced.eager.generate(prompts, limits, scheduler=SlidingPairs(), **sampling)
    free = free[0] if sampling.get("return_logits") else free
    # Row 2's 3rd token comes from the step (2, 3), after which (3, 0) is planned: row 2 stops outside the plan.
    eos = free[2][2]
    assert all(eos not in out[:3] for i, out in enumerate(free) if i != 2) and eos not in free[2][:2]
    got = traced.gen.generate(prompts, limits, scheduler=SlidingPairs(), eos_token_id=eos, **sampling)
    want = traced.eager.generate(prompts, limits, scheduler=SlidingPairs(), eos_token_id=eos, **sampling)
    if sampling.get("return_logits"):
        (got, got_logits), (want, want_logits) = got, want
        for g, w in zip(got_logits, want_logits):
            torch.testing.assert_close(g, w)
    assert got == want and eos in got[2]
    assert traced.gen.cache.memory().pages_in_use == 0 and not traced.gen.cache.seq_ids
