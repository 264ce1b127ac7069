"""Generation with IBM FMS models through the paged KV cache (the ``pagetable_flex`` attention op).

    from paged.fms.generate import PagedGenerator
    gen = PagedGenerator(model, token_budget=8192)            # cache spec read from the model
    outs = gen.generate([[1, 57, 300], [1, 9]], max_new_tokens=32, eos_token_id=2, max_batch=8)

Each forward pass is one cache step (see :mod:`paged.fms.op`): the driver plans the step once, the
model's attention layers store and attend through ``cache.run``. Prompts are prefilled (optionally in
chunks), then all running sequences decode together, one token each per step. A sequence that emits
EOS or reaches ``max_new_tokens`` is finished at once, which frees its pages; with ``max_batch`` (or
when the token budget is the limit) waiting prompts are admitted as running ones finish (continuous
batching). A prompt is admitted only when the pool can hold it at its longest (prompt +
max_new_tokens - 1 tokens), so no running sequence is ever preempted.

Also here:

* :func:`forward_logits`: one forward step over live sequences, the logits of every new position
  (for equivalence tests).
* :func:`fms_generate`: FMS's own ``fms.utils.generation.generate`` running on the paged cache. It
  works because FMS lets an op carry state in the attention kwargs: the first (prefill) step is
  planned before the call and passed in ``extra_kwargs`` (left-padded, as FMS's ``pad_input_ids``
  makes batches), and the op's ``update_attn_kwargs``, which ``generate`` calls before every later
  step, plans each decode step. ``generate`` forces ``past_key_value_states=None`` and feeds back
  whatever the op's store returns; the op never reads it (its state is the cache). What FMS's loop
  cannot do: finish a sequence before every row is done (its rows keep decoding after EOS until all
  have hit it, as on FMS's default path), admit new prompts while running, or chunk the prefill;
  use :class:`PagedGenerator` for those.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Literal, Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError, OutOfPagesError, SequenceTooLongError, UnsupportedConfigError
from paged.fms.op import PagedStep, attention_layers, bind, plan_step
from paged.spec import CacheSpec

__all__ = ["PagedGenerator", "StepEvent", "cache_spec_for", "fms_generate", "forward_logits", "prepare_fms_generate"]

_ids = itertools.count()


def cache_spec_for(
    model: torch.nn.Module,
    *,
    token_budget: int = 8192,
    page_size: int = 16,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CacheSpec:
    """The K/V cache spec an FMS model needs: one pool layer per attention layer.

    Layers, kv heads and head size are read from the model's ``MultiHeadAttention`` modules, the
    values FMS itself attends with (for Llama: ``nlayers``, ``kvheads`` or ``nheads`` when 0, and
    ``emb_dim // nheads``) and checked against ``model.config`` where it has them. dtype and device
    default to the model's parameters'. The pool holds ``token_budget`` tokens (rounded up to whole
    pages); ``max_seq_len`` defaults to the smaller of that and the model's ``max_expected_seq_len``
    (the length FMS's RoPE tables cover).
    """
    layers = attention_layers(model)
    if not layers:
        raise UnsupportedConfigError(f"{type(model).__name__} has no fms MultiHeadAttention modules")
    kvheads = {m.kvheads for m in layers}
    head_dims = {m.emb_kq_per_head for m in layers} | {m.emb_v_per_head for m in layers}
    if len(kvheads) != 1 or len(head_dims) != 1:
        raise UnsupportedConfigError(f"layers differ in kv heads {sorted(kvheads)} or head size {sorted(head_dims)}; "
                                     f"one cache spec needs them equal")
    config = getattr(model, "config", None)
    nlayers = getattr(config, "nlayers", None)
    if nlayers is not None and nlayers != len(layers):
        raise UnsupportedConfigError(f"config.nlayers={nlayers} but the model has {len(layers)} attention modules")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    if token_budget < 1 or page_size < 1:
        raise InvalidRequestError(f"token_budget and page_size must be positive, got {token_budget}, {page_size}")
    num_pages = math.ceil(token_budget / page_size)
    if max_seq_len is None:
        max_seq_len = num_pages * page_size
        model_max = getattr(config, "max_expected_seq_len", None)
        if model_max:
            max_seq_len = min(max_seq_len, model_max)
    return CacheSpec(num_layers=len(layers), num_kv_heads=kvheads.pop(), head_dim=head_dims.pop(),
                     page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len, dtype=dtype, device=device)


def _forward(model: torch.nn.Module, step: PagedStep, token_chunks: Sequence[Sequence[int]],
             pad_token_id: int = 0) -> torch.Tensor:
    """One forward pass of `model` over the step's rows (right-padded). Returns logits (B, L, V)."""
    length = step.plan.max_q_len
    ids = torch.full((len(token_chunks), length), pad_token_id, dtype=torch.long)
    for b, chunk in enumerate(token_chunks):
        ids[b, :len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
    ids = ids.to(step.cache.spec.device)
    with torch.no_grad():
        return model(ids, position_ids=step.position_ids(length), use_cache=False, **step.kwargs())


def forward_logits(
    model: torch.nn.Module,
    cache: PagedKVCache,
    seq_ids: Sequence[Hashable],
    token_chunks: Sequence[Sequence[int]],
    *,
    sliding_window: int | None = None,
) -> list[torch.Tensor]:
    """Append `token_chunks[i]` to live sequence `seq_ids[i]` in one forward step; return each one's logits.

    Returns a list of (len(token_chunks[i]), vocab) tensors: the logits at every new position, each
    position attending to its sequence's whole stored history (earlier steps included).
    """
    chunks = [list(map(int, c)) for c in token_chunks]
    if len(chunks) != len(seq_ids):
        raise InvalidRequestError(f"{len(seq_ids)} sequence ids but {len(chunks)} token chunks")
    bind(model)
    step = plan_step(cache, seq_ids, [len(c) for c in chunks], sliding_window=sliding_window)
    logits = _forward(model, step, chunks)
    return [logits[b, :len(c)] for b, c in enumerate(chunks)]


@dataclass(frozen=True)
class StepEvent:
    """What one generation step did; passed to ``generate(callback=...)`` after the step.

    Attributes:
        step: 0, 1, ... within this generate() call.
        kind: "prefill" (prompt tokens, possibly a chunk) or "decode" (one token per running request).
        requests: indices (into the prompts list) of the requests in the step, in batch-row order.
        new_tokens: request index -> token sampled this step (prefill rows only on their last chunk).
        finished: requests that stopped in this step; their pages are already free.
        cache: the cache, for inspecting memory (``cache.memory()``) between steps.
    """

    step: int
    kind: Literal["prefill", "decode"]
    requests: tuple[int, ...]
    new_tokens: dict[int, int]
    finished: tuple[int, ...]
    cache: PagedKVCache


@dataclass
class _Request:
    index: int
    prompt: list[int]
    seq_id: Hashable
    reserve: int                         # pages the request can grow to
    limit: int                           # max new tokens
    fed: int = 0                         # prompt tokens stored
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    rng: torch.Generator | None = None


class PagedGenerator:
    """Batched generation with an FMS model over a :class:`PagedKVCache`.

    Args:
        model: an FMS decoder (e.g. ``fms.models.llama.LLaMA``) in eval mode.
        spec: the cache spec; default built from the model by :func:`cache_spec_for` with the sizing
            arguments below.
        token_budget: pool size in tokens (all sequences together), rounded up to whole pages.
        page_size, max_seq_len, dtype, device: see :func:`cache_spec_for`.
        attention: "compiled" (fused FlexAttention) or "eager"; policy, kernel_options: see PagedKVCache.
        sliding_window: attend to the last `sliding_window` positions only (None: full causal). FMS's
            Llama and Mistral attend causally without a window, so leave it None to match them.
        pad_token_id: id written into padding positions (never attended, any valid id works).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: CacheSpec | None = None,
        *,
        token_budget: int = 8192,
        page_size: int = 16,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        attention: Literal["compiled", "eager"] = "compiled",
        policy: str = "lowest",
        kernel_options: dict | None = None,
        sliding_window: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model
        nlayers = bind(model)
        if spec is None:
            spec = cache_spec_for(model, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len,
                                  dtype=dtype, device=device)
        elif spec.num_layers != nlayers:
            raise UnsupportedConfigError(f"spec has {spec.num_layers} layers but the model has {nlayers}")
        self.spec = spec
        self.cache = PagedKVCache(spec, policy=policy, attention=attention, kernel_options=kernel_options)
        self.sliding_window = sliding_window
        self.pad_token_id = pad_token_id

    def forward_logits(self, seq_ids: Sequence[Hashable], token_chunks: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """:func:`forward_logits` on this generator's model and cache."""
        return forward_logits(self.model, self.cache, seq_ids, token_chunks, sliding_window=self.sliding_window)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
        prefill_chunk: int | None = None,
        max_batch: int | None = None,
        progress: bool | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        return_logits: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
        """Generate up to `max_new_tokens` tokens after each prompt.

        Args:
            prompts: token id lists (at least one token each), any lengths.
            max_new_tokens: most tokens to generate, for every prompt or (a list) per prompt.
            do_sample: sample from softmax(logits / temperature), restricted to the `top_k` most likely
                tokens if given; else greedy (argmax, first index on ties).
            seed: sampling seed. Each request draws from its own generator seeded from (seed, its index),
                so a request's tokens do not depend on what it was batched with. None: drawn from torch's
                global RNG.
            eos_token_id: a request stops after emitting it (it is included in the output).
            prefill_chunk: at most this many prompt tokens per request per prefill step (None: whole prompt).
            max_batch: at most this many requests running at once; others wait and are admitted as
                running ones finish.
            progress: tqdm progress bar over generated tokens: True, False, or None for long runs only
                (>= 1024 tokens) on a terminal.
            callback: called with a :class:`StepEvent` after every step.
            return_logits: also return, per request, the (n_new, vocab) float32 logits each new token was
                chosen from.
        Returns:
            per prompt, the new tokens (not the prompt); with return_logits, (tokens, logits).
        """
        prompts = [[int(t) for t in p] for p in prompts]
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self._check_args(prompts, limits, do_sample, temperature, top_k, prefill_chunk, max_batch)
        P, spec = self.spec.page_size, self.spec
        call = next(_ids)
        if do_sample and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        requests = []
        for i, (p, limit) in enumerate(zip(prompts, limits)):
            longest = len(p) + limit - 1                   # the last new token is never fed back
            if longest > spec.max_seq_len:
                raise SequenceTooLongError(f"prompt {i}: {len(p)} tokens + {limit} new needs {longest} "
                                           f"positions but max_seq_len is {spec.max_seq_len}")
            r = _Request(i, p, ("pagetable-generate", call, i), math.ceil(longest / P), limit)
            if r.reserve > spec.num_pages:
                raise OutOfPagesError(r.reserve, spec.num_pages, f"prompt {i} at its longest")
            if do_sample:
                r.rng = torch.Generator(device=spec.device).manual_seed((seed * 1_000_003 + i) % 2**63)
            requests.append(r)

        total = sum(limits)
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="tok", desc="generate", leave=False,
                   disable=(not progress) if progress is not None else (None if total >= 1024 else True))
        pending = [r for r in reversed(requests) if r.limit > 0]    # pop() takes the next prompt in order
        running: list[_Request] = []
        step_no = 0
        try:
            while pending or running:
                while pending and (max_batch is None or len(running) < max_batch) and self._fits(pending[-1], running):
                    r = pending.pop()
                    self.cache.admit(r.seq_id)
                    running.append(r)
                if not running:
                    r = pending[-1]
                    raise OutOfPagesError(r.reserve, self.cache.allocator.free_count, f"prompt {r.index} at its longest")
                prefilling = [r for r in running if r.fed < len(r.prompt)]
                if prefilling:
                    kind, rows = "prefill", prefilling
                    chunks = [r.prompt[r.fed:r.fed + (prefill_chunk or len(r.prompt))] for r in rows]
                else:
                    kind, rows = "decode", list(running)
                    chunks = [[r.out[-1]] for r in rows]
                step = plan_step(self.cache, [r.seq_id for r in rows], [len(c) for c in chunks],
                                 sliding_window=self.sliding_window)
                logits = _forward(self.model, step, chunks, self.pad_token_id)
                # Rows whose prompt is now fully stored (or decoding) pick a token from their last real position.
                picking = []
                for b, (r, c) in enumerate(zip(rows, chunks)):
                    if kind == "prefill":
                        r.fed += len(c)
                        if r.fed < len(r.prompt):
                            continue
                    picking.append((b, len(c) - 1, r))
                new_tokens, finished = {}, []
                if picking:
                    last = logits[[b for b, _, _ in picking], [j for _, j, _ in picking]].float()   # (k, V)
                    tokens = _choose(last, [r.rng for _, _, r in picking], do_sample, temperature, top_k)
                    for (_, _, r), tok, row_logits in zip(picking, tokens, last):
                        r.out.append(tok)
                        if return_logits:
                            r.logits.append(row_logits)
                        new_tokens[r.index] = tok
                        if tok == eos_token_id or len(r.out) == r.limit:
                            self.cache.finish(r.seq_id)        # pages free now, before the next step
                            running.remove(r)
                            finished.append(r.index)
                    bar.update(len(picking))
                if callback is not None:
                    callback(StepEvent(step_no, kind, tuple(r.index for r in rows), new_tokens, tuple(finished),
                                       self.cache))
                step_no += 1
        finally:
            bar.close()
            for r in running:                                  # an error mid-run leaks nothing
                if r.seq_id in self.cache:
                    self.cache.finish(r.seq_id)
        outs = [r.out for r in requests]
        if return_logits:
            return outs, [torch.stack(r.logits) if r.logits else torch.empty(0) for r in requests]
        return outs

    def _fits(self, r: _Request, running: list[_Request]) -> bool:
        """Whether the pool can hold `r` at its longest next to what running requests may still claim."""
        outstanding = sum(max(0, q.reserve - len(self.cache.pages(q.seq_id))) for q in running)
        return self.cache.allocator.free_count - outstanding >= r.reserve

    @staticmethod
    def _check_args(prompts, limits, do_sample, temperature, top_k, prefill_chunk, max_batch) -> None:
        if len(limits) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens")
        for n in limits:
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise InvalidRequestError(f"max_new_tokens must be ints >= 0, got {n!r}")
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidRequestError(f"prompt {i} is empty; a prompt needs at least one token")
        if do_sample and not temperature > 0:
            raise InvalidRequestError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1 or None, got {top_k}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InvalidRequestError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        if max_batch is not None and max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1 or None, got {max_batch}")


def _choose(logits: torch.Tensor, rngs: list[torch.Generator | None], do_sample: bool, temperature: float,
            top_k: int | None) -> list[int]:
    """Next token per row of (k, V) float32 logits: argmax, or a sample from each row's own generator."""
    if not do_sample:
        return logits.argmax(dim=-1).tolist()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=rng) for i, rng in enumerate(rngs)]
    return torch.cat(picks).tolist()


# ------------------------------------------------------------------------------------ FMS generate()
def prepare_fms_generate(
    model: torch.nn.Module,
    cache: PagedKVCache,
    prompts: Sequence[Sequence[int]],
    *,
    sliding_window: int | None = None,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, dict, list[Hashable]]:
    """Admit `prompts` and plan their prefill for ``fms.utils.generation.generate``.

    Returns ``(input_ids, extra_kwargs, seq_ids)``: call ``generate(model, input_ids, use_cache=True,
    extra_kwargs=extra_kwargs, ...)``, then ``cache.finish`` every seq id (FMS's loop has no hook at its
    end). ``input_ids`` is left-padded by FMS's ``pad_input_ids``; its mask is not passed (the op masks
    from the plan) but its position_ids are.
    """
    from fms.utils.generation import pad_input_ids

    bind(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequestError("fms generate needs at least one prompt, each with at least one token")
    device = cache.spec.device
    input_ids, padding = pad_input_ids([torch.as_tensor(list(p), dtype=torch.long, device=device) for p in prompts],
                                       padding_side="left", pad_token_id=pad_token_id)
    call = next(_ids)
    seq_ids: list[Hashable] = [("pagetable-fms-generate", call, i) for i in range(len(prompts))]
    for s in seq_ids:
        cache.admit(s)
    try:
        step = plan_step(cache, seq_ids, [len(p) for p in prompts], sliding_window=sliding_window,
                         padding_side="left")
    except Exception:
        for s in seq_ids:
            cache.finish(s)
        raise
    return input_ids, {"position_ids": padding["position_ids"], **step.kwargs()}, seq_ids


def fms_generate(
    model: torch.nn.Module,
    cache: PagedKVCache,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    sliding_window: int | None = None,
    pad_token_id: int = 0,
    **generate_kwargs,
) -> list[list[int]]:
    """Run FMS's own ``generate()`` (use_cache=True) on the paged cache; return each prompt's new tokens.

    `generate_kwargs` go to ``fms.utils.generation.generate`` (temperature, top_k, eos_token_id, hooks...).
    FMS's loop semantics apply: every row decodes until all rows hit EOS (or max_new_tokens), and
    sampling draws from torch's global RNG. The sequences are finished (pages freed) on return.
    """
    from fms.utils.generation import generate

    if generate_kwargs.get("timing"):
        raise InvalidRequestError("timing is not supported here; call fms generate() with prepare_fms_generate()")
    if generate_kwargs.pop("use_cache", True) is not True:
        raise InvalidRequestError("the paged op needs use_cache=True under fms generate()")
    input_ids, extra, seq_ids = prepare_fms_generate(model, cache, prompts, sliding_window=sliding_window,
                                                     pad_token_id=pad_token_id)
    extra.update(generate_kwargs.pop("extra_kwargs", None) or {})
    try:
        with torch.no_grad():
            out = generate(model, input_ids, max_seq_len=input_ids.shape[1] + max_new_tokens,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True, extra_kwargs=extra,
                           **generate_kwargs)
    finally:
        for s in seq_ids:
            if s in cache:
                cache.finish(s)
    return [row[input_ids.shape[1]:].tolist() for row in out]
