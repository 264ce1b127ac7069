"""Generation with IBM FMS models through the paged KV cache (the ``pagetable_flex`` attention op).

    from paged.fms.generate import PagedGenerator
    gen = PagedGenerator(model, token_budget=8192)            # cache spec read from the model
    outs = gen.generate([[1, 57, 300], [1, 9]], max_new_tokens=32, eos_token_id=2, max_batch=8)

Each forward pass is one cache step (see :mod:`paged.fms.op`): the driver plans the step once, the model's
attention layers store and attend through ``cache.run``. Who runs when is the scheduler's choice
(:mod:`paged.fms.scheduler`; by default continuous batching: prompts are prefilled, optionally in chunks, then
every running sequence decodes one token per step; a sequence that emits EOS or reaches ``max_new_tokens`` is
finished as soon as no planned step holds it, freeing its pages (on the compiled decode path a row that emits EOS
rides the one step already planned after it), and waiting prompts join). On CUDA, decode steps run compiled and replayed as
CUDA graphs, one per batch bucket (:mod:`paged.fms.decode`); prefill steps run compiled, without graphs
(:mod:`paged.fms.prefill`).

Also here: :func:`forward_logits` and :func:`cache_spec_for` (from :mod:`paged.fms.forward`), and
:func:`fms_generate` (from :mod:`paged.fms.fms_loop`), FMS's own generation loop on the cache.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import OutOfPagesError, SequenceTooLongError, UnsupportedConfigError
from paged.fms.decode import CompiledDecoder
from paged.fms.fms_loop import fms_generate, prepare_fms_generate
from paged.fms.forward import _picked_logits, cache_spec_for, forward_logits
from paged.fms.op import PagedStep, bind, plan_step
from paged.fms.prefill import CompiledPrefill
from paged.fms.scheduler import Request, Scheduler, Work
from paged.fms.generate_args import check_args, default_scheduler, progress_bar
from paged.fms.steps import Ahead, Launched, Sampling, choose, feed
from paged.spec import CacheSpec

__all__ = ["PagedGenerator", "StepEvent", "cache_spec_for", "fms_generate", "forward_logits", "prepare_fms_generate"]

_ids = itertools.count()


@dataclass(frozen=True)
class StepEvent:
    """What one generation step did; passed to ``generate(callback=...)`` after the step.

    Attributes:
        step: 0, 1, ... within this generate() call.
        kind: "prefill" (prompt tokens, possibly a chunk) or "decode" (one token per running request).
        requests: indices (into the prompts list) of the requests in the step, in batch-row order.
        new_tokens: request index -> token sampled this step (prefill rows only on their last chunk).
        finished: requests that stopped in this step; their pages are free, or (a stopped row outside the step
            planned after this one, when the host chooses tokens: sampling, return_logits) freed once that step is
            launched.
        cache: the cache, for inspecting memory (``cache.memory()``) between steps; on the compiled greedy path the
            next step is already planned and launched when the event comes.
    """

    step: int
    kind: Literal["prefill", "decode"]
    requests: tuple[int, ...]
    new_tokens: dict[int, int]
    finished: tuple[int, ...]
    cache: PagedKVCache


class PagedGenerator:
    """Batched generation with an FMS model over a :class:`PagedKVCache`.

    Args:
        model: an FMS decoder (e.g. ``fms.models.llama.LLaMA``) in eval mode.
        spec: the cache spec; default built from the model by :func:`cache_spec_for` with the sizing
            arguments below.
        token_budget: pool size in tokens (all sequences together), rounded up to whole pages.
        page_size, max_seq_len, dtype, device: see :func:`cache_spec_for`.
        attention: "compiled" (fused FlexAttention) or "eager"; policy, kernel_options, prefill_kernel: see
            PagedKVCache (by default a prompt's first chunk attends through SDPA, later chunks through the Triton mixed kernel on
            CUDA, FlexAttention elsewhere).
        sliding_window: attend to the last `sliding_window` positions only (None: full causal). FMS's
            Llama and Mistral attend causally without a window, so leave it None to match them.
        pad_token_id: id written into padding positions (never attended, any valid id works).
        cuda_graphs: replay decode steps as CUDA graphs, one per batch bucket (:mod:`paged.fms.decode`);
            None: on for a CUDA cache with attention="compiled".
        compile_decode: trace decode steps with torch.compile (the model's forward, the cache as a custom
            op); None: as `cuda_graphs` resolved (on for CUDA, off on the CPU, where the first compile of a
            model takes tens of seconds).
        compile_prefill: run prefill steps (and prefill chunks) through torch.compile with dynamic shapes
            (:mod:`paged.fms.prefill`; never graphed); None: as `cuda_graphs` resolved.
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
        prefill_kernel: Literal["auto", "flex", "sdpa"] = "auto",
        sliding_window: int | None = None,
        pad_token_id: int = 0,
        cuda_graphs: bool | None = None,
        compile_decode: bool | None = None,
        compile_prefill: bool | None = None,
    ) -> None:
        self.model = model
        nlayers = bind(model)
        if spec is None:
            spec = cache_spec_for(model, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len,
                                  dtype=dtype, device=device)
        elif spec.num_layers != nlayers:
            raise UnsupportedConfigError(f"spec has {spec.num_layers} layers but the model has {nlayers}")
        self.spec = spec
        self.cache = PagedKVCache(spec, policy=policy, attention=attention, kernel_options=kernel_options,
                                  prefill_kernel=prefill_kernel)
        self.sliding_window = sliding_window
        self.pad_token_id = pad_token_id
        if cuda_graphs and (spec.device.type != "cuda" or attention != "compiled"):
            raise UnsupportedConfigError("cuda_graphs=True needs a CUDA cache with attention='compiled'")
        graphs_possible = spec.device.type == "cuda" and attention == "compiled" and sliding_window is None
        self.cuda_graphs = graphs_possible if cuda_graphs is None else bool(cuda_graphs)
        self.compile_decode = self.cuda_graphs if compile_decode is None else bool(compile_decode)
        self.compile_prefill = self.cuda_graphs if compile_prefill is None else bool(compile_prefill)
        self._decoder: CompiledDecoder | None = None
        self._prefiller: CompiledPrefill | None = None

    @property
    def decoder(self) -> CompiledDecoder | None:
        """The compiled / graphed decode path of this generator's cache, or None when decode steps run eagerly."""
        if not (self.cuda_graphs or self.compile_decode) or self.sliding_window is not None:
            return None
        if self._decoder is None or self._decoder.cache is not self.cache:
            self._decoder = CompiledDecoder(self.model, self.cache, cuda_graphs=self.cuda_graphs,
                                            compile=self.compile_decode)
        return self._decoder

    @property
    def prefiller(self) -> CompiledPrefill | None:
        """The compiled prefill path of this generator's cache, or None when prefill steps run eagerly."""
        if not self.compile_prefill or self.sliding_window is not None:
            return None
        if self._prefiller is None or self._prefiller.cache is not self.cache:
            self._prefiller = CompiledPrefill(self.model, self.cache)
        return self._prefiller

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
        scheduler: Scheduler | None = None,
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
            progress: tqdm bar over generated tokens: True, False, or None for long runs (>= 1024) on a terminal.
            callback: called with a :class:`StepEvent` after every step, once its tokens are known: on the
                compiled greedy path that is after the next step was planned and launched.
            return_logits: also return, per request, the (n_new, vocab) float32 logits each new token was
                chosen from.
            scheduler: the batching policy (:mod:`paged.fms.scheduler`); default
                ``ContinuousBatching(max_batch, prefill_chunk)``.
        Returns:
            per prompt, the new tokens (not the prompt); with return_logits, (tokens, logits).
        """
        prompts = [[int(t) for t in p] for p in prompts]
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        check_args(prompts, limits, do_sample, temperature, top_k, prefill_chunk, max_batch, seed)
        scheduler, requests = default_scheduler(scheduler, max_batch, prefill_chunk), self._requests(prompts, limits,
                                                                                              do_sample, seed)
        sampling = Sampling(do_sample, temperature, top_k, return_logits)
        bar = progress_bar(sum(limits), progress)
        running, retiring = [], []          # Requests running; stopped ones to finish in the cache once no plan waits
        try:
            self._run(scheduler, [r for r in requests if r.limit > 0], running, retiring, sampling, eos_token_id,
                      lambda n: bar.update(n), callback)
        finally:
            bar.close()
            self._retire(running + retiring)                   # an error mid-run leaks nothing
        outs = [r.out for r in requests]
        if return_logits:
            return outs, [torch.stack(r.logits) if r.logits else torch.empty(0) for r in requests]
        return outs

    def _run(self, scheduler: Scheduler, waiting: list[Request], running: list[Request], retiring: list[Request],
             sampling: Sampling, eos_token_id: int | None, progress: Callable[[int], None],
             callback: Callable[[StepEvent], None] | None) -> None:
        """Step until every request is done: admit, pick the step's work, launch it (`_launch`), record its tokens
        (`_record`).

        On the compiled decode path the next decode step is planned while the GPU runs this one (`_plan_ahead`), and
        a greedy step (no logits asked for) is fed its tokens on the device from the step before (`FedTokens`): the
        host reads step t's picks only after launching step t+1, so the GPU never waits for the host's bookkeeping.
        """
        record = functools.partial(self._record, sampling=sampling, eos_token_id=eos_token_id, running=running,
                                   retiring=retiring, progress=progress, callback=callback)
        ahead: Ahead | None = None        # the next decode step, planned while this one ran on the GPU
        unread: Launched | None = None    # a launched decode step whose picks the host has not read yet
        for step_no in itertools.count():
            if ahead is None:
                if unread is not None:
                    record(unread)
                    unread = None
                self._retire(retiring)
                if not (waiting or running):
                    return
                self._admit(scheduler, waiting, running)
                work = scheduler.next_step(running)
                step = plan_step(self.cache, [r.seq_id for r in work.rows], [len(c) for c in work.chunks],
                                 sliding_window=self.sliding_window)
            else:
                work, step = ahead.work(), ahead.step
            launched = self._launch(step_no, work, step, sampling, unread)
            self._retire(retiring)          # rows that stopped while this step's plan waited to launch
            if unread is not None:          # the step before: its picks are read while this one runs
                record(unread)
                unread = None
            ahead = self._plan_ahead(scheduler, work.rows, running, waiting) if launched.on_device else None
            if launched.lagging:
                unread = launched
            else:
                record(launched, planned=frozenset(ahead.rows) if ahead is not None else None)

    def _launch(self, step_no: int, work: Work, step: PagedStep, sampling: Sampling,
                unread: Launched | None) -> Launched:
        """Enqueue one planned step of `work`. On the decoder's path the model's step is only enqueued (picks and
        logits stay on the device); otherwise the picking rows' logits are computed (a prefill compiled when the
        prefiller is on, other steps eagerly) for `_record`."""
        decoder = self.decoder if work.kind == "decode" else None
        if decoder is not None:
            logits, picks = decoder(step, feed(work, unread))                      # (B, V), (B,) enqueued
            if sampling.do_sample or sampling.return_logits:   # read after planning ahead, before the next launch
                return Launched(step_no, work, work.rows, logits, None, None, on_device=True)
            pending = decoder.read_later(picks)
            return Launched(step_no, work, work.rows, None, picks, pending, on_device=True)
        rows = [(b, len(c) - 1, r) for b, (r, c) in enumerate(zip(work.rows, work.chunks))]
        if work.kind == "prefill":
            for _, j, r in rows:
                r.fed += j + 1
            rows = [x for x in rows if not x[2].prefilling]               # rows whose prompt is now stored
        prefill = self.prefiller if work.kind == "prefill" else None
        picks = [(b, j) for b, j, _ in rows]
        logits = (prefill(step, work.chunks, picks, self.pad_token_id) if prefill is not None
                  else _picked_logits(self.model, step, work.chunks, picks, self.pad_token_id))   # (k, V)
        return Launched(step_no, work, tuple(r for _, _, r in rows), logits, None, None, on_device=False)

    def _record(self, launched: Launched, *, sampling: Sampling, eos_token_id: int | None,
                running: list[Request], retiring: list[Request], progress: Callable[[int], None],
                callback: Callable[[StepEvent], None] | None, planned: frozenset[Request] | None = None) -> None:
        """Read (or sample) a launched step's tokens, append them, and finish the rows that stop (pages free now).
        Then progress and the step's event.

        `planned`: the rows of a step planned after this one and not launched yet (None: there is none). A stopped
        row of that step rides it (its extra token is dropped) and is finished after it: a plan cannot lose rows
        once made. Any other stopped row leaves `running` now, but `finish()` would drop that waiting plan, so it
        goes to `retiring`, finished once the plan is launched.
        """
        picking, logits = launched.picking, launched.logits
        new_tokens, finished = {}, []
        if picking:
            if launched.pending is not None:
                tokens = launched.pending.tolist()
            else:
                # A graph's static output is overwritten by the bucket's next replay, and .float() of a float32
                # tensor is that tensor: copy what return_logits keeps.
                logits = logits.to(torch.float32, copy=launched.on_device and sampling.return_logits)
                tokens = choose(logits, [r.rng for r in picking], sampling.do_sample, sampling.temperature,
                                sampling.top_k)
            for i, (r, tok) in enumerate(zip(picking, tokens)):
                if not r.done:
                    r.out.append(tok)
                    if sampling.return_logits:
                        r.logits.append(logits[i])
                    new_tokens[r.index] = tok
                    r.done = tok == eos_token_id or len(r.out) == r.limit
                if r.done and (planned is None or r not in planned) and r in running:
                    running.remove(r)
                    finished.append(r.index)
                    retiring.append(r)
        if planned is None:
            self._retire(retiring)
        progress(len(new_tokens))
        if callback is not None:
            work = launched.work
            callback(StepEvent(launched.step_no, work.kind, tuple(r.index for r in work.rows), new_tokens,
                               tuple(finished), self.cache))

    def _retire(self, retiring: list[Request]) -> None:
        """Finish the requests' sequences (those not finished already, when their last step was planned); clear the
        list."""
        for r in retiring:
            if r.seq_id in self.cache:
                self.cache.finish(r.seq_id)
        retiring.clear()

    def _requests(self, prompts: list[list[int]], limits: list[int], do_sample: bool,
                  seed: int | None) -> list[Request]:
        spec, call = self.spec, next(_ids)
        if do_sample and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        requests = []
        for i, (p, limit) in enumerate(zip(prompts, limits)):
            longest = len(p) + limit - 1                   # the last new token is never fed back
            if longest > spec.max_seq_len:
                raise SequenceTooLongError(f"prompt {i}: {len(p)} tokens + {limit} new needs {longest} "
                                           f"positions but max_seq_len is {spec.max_seq_len}")
            r = Request.make(i, p, ("pagetable-generate", call, i), limit, spec.page_size)
            if r.reserve > spec.num_pages:
                raise OutOfPagesError(r.reserve, spec.num_pages, f"prompt {i} at its longest")
            if do_sample:
                r.rng = torch.Generator(device=spec.device).manual_seed((seed * 1_000_003 + i) % 2**63)
            requests.append(r)
        return requests

    def _admit(self, scheduler: Scheduler, waiting: list[Request], running: list[Request]) -> None:
        if not waiting:
            return
        P = self.spec.page_size
        held = {r.seq_id: -(-self.cache.length(r.seq_id) // P) for r in running}     # pages each holds now
        for r in scheduler.admit(waiting, running, self.cache.allocator.free_count, held):
            waiting.remove(r)
            self.cache.admit(r.seq_id)
            running.append(r)
        if not running:
            r = waiting[0]
            raise OutOfPagesError(r.reserve, self.cache.allocator.free_count, f"prompt {r.index} at its longest")

    def _plan_ahead(self, scheduler: Scheduler, rows: Sequence[Request], running: list[Request],
                    waiting: list[Request]) -> Ahead | None:
        """Plan the decode step after the one of `rows` before its tokens are known, or None when the scheduler
        must see this step's outcome first: requests wait to be admitted (admission is the scheduler's call, made
        between steps), or it picks a prefill next.

        The scheduler is asked as between steps, over every running request, less the rows that stop with this
        step whatever their token (their limit, or EOS in a step already read).
        """
        if waiting:
            return None
        leaving = set(r for r in rows if r.done or len(r.out) + 1 >= r.limit)
        staying = [r for r in running if r not in leaving]
        if not staying:
            return None
        nxt = scheduler.next_step(staying)
        if nxt.kind != "decode":
            return None
        # Rows that stop with this step leave first: finish() drops the cache's current plan. Their pages may go to
        # the next step at once: every device op is stream-ordered after this step's kernels, the last to touch them.
        for r in leaving:
            if r.seq_id in self.cache:
                self.cache.finish(r.seq_id)
        step = plan_step(self.cache, [r.seq_id for r in nxt.rows], [1] * len(nxt.rows),
                         sliding_window=self.sliding_window)
        return Ahead(nxt.rows, step)
