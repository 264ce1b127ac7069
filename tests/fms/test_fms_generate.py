"""Generation through the paged FMS op gives what FMS's own default (sdpa) path gives.

Tiny random-weight Llamas (MHA and GQA), fp32 on CPU and bf16 on CUDA (the `device` fixture). Every
cache here has the same pool (256 slots of head size 16), so compiled FlexAttention compiles only a
few (batch bucket, query bucket) shapes for the whole file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from fms.utils.generation import generate as fms_default_generate

from conformance.policy import CEILING, FLOOR, FUDGE
from paged import PagedKVCache
from paged.errors import InvalidRequestError, SequenceTooLongError
from paged.fms.checkpoint import tiny_llama, write_tiny_llama_checkpoint
from paged.fms.generate import PagedGenerator, StepEvent, cache_spec_for, fms_generate

VOCAB = 256
BUDGET = 256          # pool tokens: 16 pages of 16, the same pool shape in every test (one compile per shape)
CONFIGS = {"mha": dict(nheads=4, kvheads=4, seed=0), "gqa": dict(nheads=4, kvheads=2, seed=1)}
# Greedy picks may differ only where the float64 model's top two logits are closer than this: fp32 must match
# exactly; bf16 logits of both paths sit ~2e-2 from float64 (measured), so a 0.1 gap can never flip.
TIE = {torch.float32: 0.0, torch.bfloat16: 0.1, torch.float16: 0.02}


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build(cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return tiny_llama(emb_dim=64, nlayers=2, vocab_size=VOCAB, device=device, dtype=dtype, **cfg)


@dataclass
class Llama:
    """A tiny model, its float64 twin on the CPU (the golden reference) and its kv head count."""

    kvheads: int
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    gold: torch.nn.Module
    attention: str = "compiled"

    @classmethod
    def random(cls, name: str, device: torch.device, attention: str = "compiled") -> Llama:
        cfg, dtype = CONFIGS[name], dtype_for(device)
        return cls(cfg["kvheads"], device, dtype, build(cfg, device, dtype), build(cfg, torch.device("cpu"), torch.float64),
                   attention)

    def generator(self, **kw) -> PagedGenerator:
        return PagedGenerator(self.model, token_budget=BUDGET, attention=self.attention, **kw)


# Single-prompt tests run GQA compiled and MHA eager (both FlexAttention paths, and two fewer compiled shapes);
# batch tests run both models compiled.
@pytest.fixture(scope="module", params=["gqa-compiled", "mha-eager"])
def llama(request, device) -> Llama:
    name, attention = request.param.split("-")
    return Llama.random(name, device, attention)


@pytest.fixture(scope="module", params=["gqa", "mha"])
def llama_batch(request, device) -> Llama:
    return Llama.random(request.param, device)


@pytest.fixture(scope="module")
def gqa(device) -> Llama:
    return Llama.random("gqa", device)


def prompts_of(lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ------------------------------------------------------------------------------------------------ references
def default_greedy(model, prompt, n, device):
    """FMS's default path (sdpa op, contiguous cache), as fms generate() drives it: tokens and float32 logits."""
    ids, pos = torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)[None]
    past, tokens, logits = None, [], []
    with torch.no_grad():
        for _ in range(n):
            out, past = model(ids, position_ids=pos, past_key_value_states=past, use_cache=True)
            logits.append(out[0, -1].float().cpu())
            tokens.append(int(logits[-1].argmax()))
            ids, pos = torch.tensor([[tokens[-1]]], device=device), pos[:, -1:] + 1
    return tokens, torch.stack(logits)


def gold_logits(gold, prompt, tokens) -> torch.Tensor:
    """float64 logits that chose each of `tokens` after `prompt` (teacher-forced, one pass)."""
    seq = prompt + tokens[:-1]
    with torch.no_grad():
        out, _ = gold(torch.tensor([seq]), position_ids=torch.arange(len(seq))[None], use_cache=True)
    return out[0, len(prompt) - 1:]


def check_against_default(llama: Llama, prompt, ours, ours_logits, n) -> None:
    """Same greedy tokens as the default path (up to a float64 near-tie), logits within policy tolerance."""
    ref, ref_logits = default_greedy(llama.model, prompt, n, llama.device)
    gold = gold_logits(llama.gold, prompt, ref)
    upto = len(ref)
    for t, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            gap = abs(float(gold[t, b] - gold[t, a]))
            assert gap <= TIE[llama.dtype], f"token {t}: paged {a} vs default {b}, float64 gap {gap:.3g}"
            upto = t + 1                    # same context up to here; the continuations may differ after
            break
    else:
        assert ours == ref, f"paged {ours} vs default {ref}"
    ours_logits = ours_logits[:upto].cpu().double()
    err = float((ours_logits - gold[:upto]).abs().max())
    ref_err = float((ref_logits[:upto].double() - gold[:upto]).abs().max())
    scale = max(1.0, float(gold.abs().max()))
    # conformance.policy's rule, on logits: no worse than FMS's own same-dtype path (FUDGE x its error vs float64)
    # plus FLOOR, under CEILING; both slack terms scaled by |logits| (~2.5 here; the policy's outputs are ~1).
    bound = min(FUDGE * ref_err + FLOOR[llama.dtype] * scale, CEILING[llama.dtype] * scale)
    assert err <= bound, f"logits off by {err:.3g} (default path {ref_err:.3g}, bound {bound:.3g})"


# ------------------------------------------------------------------------------------------------ tests
def test_single_prompt_matches_fms_generate(llama):
    prompt = prompts_of([11])[0]
    gen = llama.generator()
    ours, logits = gen.generate([prompt], 8, return_logits=True)
    # The literal FMS generate() on its default path gives the same tokens...
    with torch.no_grad():
        out = fms_default_generate(llama.model, torch.tensor([prompt], device=llama.device), max_new_tokens=8,
                                   do_sample=False, use_cache=True,
                                   extra_kwargs={"position_ids": torch.arange(len(prompt), device=llama.device)[None]})
    if llama.dtype == torch.float32:
        assert ours[0] == out[0, len(prompt):].tolist()
    # ...and the logits agree with it within tolerance.
    check_against_default(llama, prompt, ours[0], logits[0], 8)
    assert gen.cache.memory().pages_in_use == 0


def test_batch_of_different_lengths_matches_each_alone(llama_batch):
    llama = llama_batch
    prompts = prompts_of([6, 1, 13, llama.kvheads], seed=1)
    gen = llama.generator()
    outs, logits = gen.generate(prompts, 7, return_logits=True)
    for p, o, lg in zip(prompts, outs, logits):
        check_against_default(llama, p, o, lg, 7)
    assert gen.cache.memory().pages_in_use == 0


def test_prompt_length_equal_to_kvheads(llama):
    # FMS's sdpa op guesses the K/V layout from shapes and is wrong without a cache when L == kvheads;
    # the paged op never guesses (its K/V always arrive as (b, L, kvheads, d)).
    prompt = prompts_of([llama.kvheads], seed=2)[0]
    ours, logits = llama.generator().generate([prompt], 6, return_logits=True)
    check_against_default(llama, prompt, ours[0], logits[0], 6)


def test_two_runs_in_a_row_leak_nothing(llama):
    prompt = prompts_of([9], seed=3)[0]
    gen = llama.generator()
    first, first_logits = gen.generate([prompt], 8, return_logits=True)
    mem = gen.cache.memory()
    assert mem.pages_in_use == 0 and mem.live_sequences == 0
    second, second_logits = gen.generate([prompt], 8, return_logits=True)
    assert second == first
    assert torch.equal(second_logits[0], first_logits[0])
    assert gen.cache.memory().pages_in_use == 0


def test_continuous_batching_matches_each_alone(gqa):
    prompts = prompts_of([5, 12, 3, 20, 8], seed=4)
    limits = [3, 9, 5, 2, 6]
    gen = gqa.generator()
    alone = [gen.generate([p], n, prefill_chunk=8)[0] for p, n in zip(prompts, limits)]
    events: list[StepEvent] = []
    together = gen.generate(prompts, limits, max_batch=2, prefill_chunk=8, callback=events.append)
    assert together == alone
    assert [len(o) for o in together] == limits
    assert max(len(e.requests) for e in events) <= 2
    # Requests joined while others were still running (not one static batch after another).
    first_step = {i: min(e.step for e in events if i in e.requests) for i in range(5)}
    done_step = {i: e.step for e in events for i in e.finished}
    assert first_step[2] < done_step[1], "request 2 should start as soon as request 0 finishes"
    assert gen.cache.memory().pages_in_use == 0


def test_token_budget_limits_admission(gqa):
    # Each request needs 70 + 20 - 1 = 89 tokens = 6 pages at its longest: two fit the 16-page pool, not three.
    prompts = prompts_of([70, 70, 70], seed=5)
    gen = gqa.generator()
    alone = [gen.generate([p], 20, prefill_chunk=16)[0] for p in prompts]
    peak = []
    together = gen.generate(prompts, 20, prefill_chunk=16,
                            callback=lambda e: peak.append((len(e.requests), e.cache.memory().pages_in_use)))
    assert together == alone
    assert max(n for n, _ in peak) == 2 and max(p for _, p in peak) <= gen.spec.num_pages


def test_eos_frees_pages_at_once(gqa):
    long_prompt, short_prompt = prompts_of([40, 5], seed=6)
    gen = gqa.generator()
    free_run = gen.generate([long_prompt], 6, prefill_chunk=16)[0]       # chunks of 16: no new compiled shape
    eos = free_run[2]
    assert eos not in free_run[:2]
    short_alone = gen.generate([short_prompt], 10, eos_token_id=eos)[0]

    seen = []

    def on_step(event: StepEvent) -> None:
        mem = event.cache.memory()
        if 0 in event.finished:
            # The long prompt (3 pages) is gone the moment it emits EOS; only the short one's page remains.
            assert mem.live_sequences == 1
            assert mem.pages_in_use == math.ceil(mem.tokens_stored / gen.spec.page_size) == 1
        seen.append((event.step, event.finished, mem.pages_in_use))

    outs = gen.generate([long_prompt, short_prompt], 10, eos_token_id=eos, prefill_chunk=16, callback=on_step)
    assert outs[0] == free_run[:3]                         # stops right after EOS, which is included
    assert outs[1] == short_alone
    assert any(0 in f for _, f, _ in seen)
    assert seen[2][2] == 4                                  # after prefill: 40 tokens in 3 pages + 5 in 1
    assert gen.cache.memory().pages_in_use == 0


def test_sampling_with_a_seed_is_reproducible(gqa):
    prompts = prompts_of([7, 3, 10], seed=7)
    gen = gqa.generator()
    kw = dict(do_sample=True, temperature=0.9, top_k=40)
    a = gen.generate(prompts, 8, seed=1234, **kw)
    b = gen.generate(prompts, 8, seed=1234, **kw)
    one_at_a_time = gen.generate(prompts, 8, seed=1234, max_batch=1, **kw)
    other = gen.generate(prompts, 8, seed=99, **kw)
    assert a == b == one_at_a_time          # each request has its own seeded generator: batching does not matter
    assert other != a
    greedy = gen.generate(prompts, 8)
    assert a != greedy
    assert gen.cache.memory().pages_in_use == 0


def test_hf_checkpoint_generates_like_default_path(tmp_path, device):
    from fms.models import get_model

    dtype = dtype_for(device)
    path = write_tiny_llama_checkpoint(tmp_path / "ckpt", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                                       num_heads=4, num_kv_heads=2, intermediate_size=128, seed=3)
    model = get_model("hf_pretrained", model_path=str(path), device_type=device.type, data_type=dtype).eval()
    gold = get_model("hf_pretrained", model_path=str(path), device_type="cpu", data_type=torch.float64).eval()
    llama = Llama(2, device, dtype, model, gold)
    prompts = prompts_of([9, 4], seed=8)
    outs, logits = PagedGenerator(model, token_budget=BUDGET).generate(prompts, 6, return_logits=True)
    for p, o, lg in zip(prompts, outs, logits):
        check_against_default(llama, p, o, lg, 6)


@pytest.mark.parametrize("decode_kernel", ["auto", "triton"])
def test_fms_generate_runs_on_the_paged_op(llama_batch, decode_kernel):
    """decode_kernel="triton" on the CPU too (Triton's interpreter): FMS hands K and V over as views of different
    strides (V a slice of the fused projection), which a first fused-write kernel misread on the GPU."""
    llama = llama_batch
    if decode_kernel == "triton":
        triton_decode = pytest.importorskip("paged.triton_decode")
        if not triton_decode.available(llama.device):
            pytest.skip("the Triton decode kernel cannot run here (CPU: TRITON_INTERPRET=1 before import)")
    # FMS's own generate() loop, left-padded batch, driven through the op's update_attn_kwargs.
    prompts = prompts_of([6, 2, 11], seed=9)
    cache = PagedKVCache(cache_spec_for(llama.model, token_budget=BUDGET), decode_kernel=decode_kernel)
    outs = fms_generate(llama.model, cache, prompts, 6)
    assert cache.memory().pages_in_use == 0 and cache.memory().live_sequences == 0
    for p, o in zip(prompts, outs):
        ref, _ = default_greedy(llama.model, p, 6, llama.device)
        if llama.dtype == torch.float32:
            assert o == ref
        else:
            assert o[:2] == ref[:2]
    with pytest.raises(InvalidRequestError, match="use_cache"):
        fms_generate(llama.model, cache, prompts, 3, use_cache=False)
    assert cache.memory().live_sequences == 0


def test_cache_spec_from_model(device):
    dtype = dtype_for(device)
    gqa = build(CONFIGS["gqa"], device, dtype)
    spec = cache_spec_for(gqa, token_budget=100, page_size=16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)
    assert spec.num_pages == 7 and spec.max_seq_len == 112 and spec.dtype == dtype and spec.device.type == device.type
    # kvheads=0 in an FMS LLaMAConfig means one kv head per query head.
    mha = tiny_llama(nheads=4, kvheads=0, emb_dim=64, nlayers=3, vocab_size=VOCAB, device=device, dtype=dtype)
    spec = cache_spec_for(mha, token_budget=4096)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_seq_len) == (3, 4, 16, 512)


def test_bad_requests_leave_the_cache_empty(gqa):
    gen = gqa.generator()
    with pytest.raises(InvalidRequestError):
        gen.generate([[5, 6], []], 3)
    with pytest.raises(SequenceTooLongError):
        gen.generate([[5] * 10, [6] * 250], 10)
    with pytest.raises(InvalidRequestError):
        gen.generate([[5]], [1, 2])
    for bad in (dict(top_k=True), dict(prefill_chunk=True), dict(max_batch=True), dict(max_batch=0),
                dict(seed=True, do_sample=True), dict(seed=1.5), dict(do_sample=True, temperature=float("nan")),
                dict(do_sample=True, temperature=True)):
        with pytest.raises(InvalidRequestError):
            gen.generate([[5, 6]], 2, **bad)
    assert gen.generate([[5, 6]], 0) == [[]]
    assert gen.cache.memory().live_sequences == 0 and gen.cache.memory().pages_in_use == 0


def test_progress_bar(gqa, capsys):
    gen = gqa.generator()
    quiet = gen.generate([[5, 6, 7]], 4, progress=False)
    assert "tok" not in capsys.readouterr().err
    assert gen.generate([[5, 6, 7]], 4, progress=True) == quiet
    assert "generate" in capsys.readouterr().err


def test_cli_generates_text(capsys, device):
    from paged.fms.__main__ import main

    from paged.fms.tokenizer import Tokenizer

    # Token budget 256: the same pool shape as the other tests, so no new compile. float32: the tokens must equal
    # those of FMS's default path on the same model (the CLI's random tiny Llama, seed 0), exactly.
    prompts = ["The cache", "Pages"]
    argv = ["generate", "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "5", "--device",
            device.type, "--token-budget", "256", "--no-progress", "--echo", "--dtype", "float32", "--seed", "0"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    tok = Tokenizer()
    model = tiny_llama(vocab_size=tok.vocab_size, nheads=4, kvheads=2, emb_dim=64, nlayers=2, seed=0, device=device,
                       dtype=torch.float32)
    expected = []
    for text in prompts:
        tokens = default_greedy(model, tok.encode(text), 5, device)[0]
        if tok.eos_id in tokens:                                   # the CLI stops at EOS (and keeps it)
            tokens = tokens[:tokens.index(tok.eos_id) + 1]
        expected.append(text + tok.decode(tokens))
    assert lines == expected
