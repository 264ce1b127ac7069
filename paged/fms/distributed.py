"""Tensor-parallel generation: FMS models sharded with FMS's own tensor parallelism, on the paged cache.

    torchrun --nproc-per-node 4 -m paged.fms.distributed generate --prompt "The cache" --max-new-tokens 32 \
        --model-path /models/llama --device cuda

or from code, on every rank::

    ctx = setup()                                         # torchrun env -> process group (gloo CPU, nccl CUDA)
    model = load_tp_model(path, ctx)                      # get_model(..., distributed_strategy="tp", group=...)
    gen = DistributedPagedGenerator(model, ctx, token_budget=8192)
    outs = gen.generate(prompts, max_new_tokens=32)       # same prompts on every rank, same outputs on every rank

What is sharded: FMS shards every attention layer by heads (each rank holds ``nheads / world`` query heads
and ``kvheads / world`` K/V heads, or ONE replicated K/V head when ``kvheads < world``) and the MLP by
columns/rows, and all-reduces twice per layer. The attention op on each rank sees only its local heads, so
each rank's :class:`~paged.PagedKVCache` is an ordinary cache whose spec is built from the rank-local model
(local ``kvheads``): it holds only the K/V heads that rank owns. No K/V, page or mask data crosses ranks.

Decisions are computed identically on every rank, not broadcast. Every decision a step makes (which
prompts are admitted, which sequences finish, how many pages a step takes, which physical pages the
allocator hands out) is a deterministic function of the prompts, the pool spec and the tokens chosen so
far; the tokens come from logits that are the same bytes on every rank by construction: FMS's TP head
computes one vocabulary shard per rank and all-gathers them, so every rank picks from the same tensor
(whatever rank-local rounding went into each shard). So identical inputs give
identical decisions with no communication in the data path; broadcasting them from rank 0 would cost a
device->host->network hop per step and would hide a divergence instead of detecting it. The one thing
that is not a function of the inputs, the seed of a sampling run without an explicit seed, is broadcast
from rank 0 once per ``generate`` call.

Cross-rank control plane (a separate gloo group, host tensors, never the model's NCCL stream):

* **Vote before commit** (in ``cache.plan``, just before pages are taken): every rank all-gathers
  ``[failed?, phase, vote no., digest]`` where the digest hashes the step's request (sequence ids, new
  tokens, stored lengths, pages wanted, free pages) and the tokens generated so far. If any rank failed
  validation or is out of pages, every rank raises the same :class:`DistributedStepError` (for an
  out-of-pages failure a :class:`DistributedOutOfPagesError`, also an ``OutOfPagesError``) and no rank
  changed its cache. Digests that differ raise :class:`RankDivergenceError` on every rank, also before any
  change, with each rank's view in the message.
* **Vote after commit**: the same 4 integers again, so a rank that fails while building the step
  (e.g. CUDA out of memory) stops every rank before the forward, where the others would wait in FMS's
  all-reduce; with ``check_pages=True`` this digest also covers every live sequence's physical page table.
* ``DistributedPagedGenerator.generate`` votes once at the start (hash of the prompts and arguments),
  once at the end (hash of every token), and once for any error raised on a rank outside a plan.

A rank that fails inside the model's forward (between the two FMS all-reduces) cannot be reached by a vote:
the others wait in FMS's collective until the process-group timeout (``setup(timeout_s=...)``); torchrun
also stops every worker when one exits with an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.distributed as dist

from paged.allocator import PageAllocator
from paged.cache import PagedKVCache
from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError, PlanError,
                          SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)
from paged.fms.generate import PagedGenerator, StepEvent, cache_spec_for
from paged.plan import StepPlan
from paged.spec import CacheSpec
from paged.stats import MemoryStats

__all__ = [
    "DistContext", "DistributedPagedGenerator", "DistributedPagedKVCache", "DistributedStepError",
    "DistributedOutOfPagesError", "GlobalMemory", "RankDivergenceError", "global_memory", "load_tp_model",
    "main", "setup", "teardown", "tp_cache_spec",
]

# ---------------------------------------------------------------------------------------------- errors


class DistributedStepError(PagedError):
    """Raised on EVERY rank, with the same message, when any rank failed a step (or a generate call).

    Attributes:
        phase: where the vote was: "start", "plan" (before any page was taken), "commit" (after the step
            was built), "generate" (elsewhere in generate) or "end".
        failures: {rank: (exception type name, message)} of the ranks that failed.
        world_size: ranks in the group.
    """

    def __init__(self, message: str, phase: str = "", failures: dict[int, tuple[str, str]] | None = None,
                 world_size: int = 1) -> None:
        self.phase, self.failures, self.world_size = phase, dict(failures or {}), world_size
        Exception.__init__(self, message)

    def __str__(self) -> str:  # KeyError-derived subclasses would repr() the message
        return str(self.args[0]) if self.args else ""


class DistributedOutOfPagesError(DistributedStepError, OutOfPagesError):
    """A rank ran out of pages; raised on every rank. ``needed``/``free`` are the first failing rank's."""

    needed: int | None = None
    free: int | None = None


class RankDivergenceError(DistributedStepError):
    """Ranks disagree on a step (different requests, pool state or tokens): raised on every rank before any change."""


def _subclass(base: type[PagedError]) -> type[DistributedStepError]:
    return type(f"Distributed{base.__name__}", (DistributedStepError, base), {"__module__": __name__})


# A failure of one of these kinds on the first failing rank raises its Distributed* twin on every rank, so
# `except OutOfPagesError` / `except InvalidRequestError` catch it the same way on every rank.
_TWINS: dict[str, type[DistributedStepError]] = {"OutOfPagesError": DistributedOutOfPagesError}
for _base in (SequenceTooLongError, InvalidRequestError, UnknownSequenceError, DuplicateSequenceError,
              UnsupportedConfigError, PlanError):
    _TWINS[_base.__name__] = _subclass(_base)
    globals()[f"Distributed{_base.__name__}"] = _TWINS[_base.__name__]

# ---------------------------------------------------------------------------------------------- setup


@dataclass
class DistContext:
    """This process's place in the tensor-parallel group.

    Attributes:
        rank, world_size, local_rank: from the process group (``local_rank`` from torchrun's LOCAL_RANK).
        device: where this rank's model and cache live (``cuda:<local_rank>`` or cpu).
        group: the process group the model is sharded over (passed to FMS ``get_model(group=...)``).
        control: a gloo group over the same ranks for the cache's votes (host tensors only).
        backend: "nccl" or "gloo".
        owns_group: whether :func:`setup` initialised the default group (then :func:`teardown` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any
    control: Any
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | torch.device | None = None, *, backend: str | None = None,
          timeout_s: float = 600.0) -> DistContext:
    """Join (or create) the process group torchrun describes in the environment; return this rank's context.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them. Without them (a
    plain ``python`` run) it makes a group of one. ``device`` defaults to CUDA when a GPU is visible;
    ``backend`` to nccl on CUDA and gloo on CPU. ``timeout_s`` bounds every collective (the model's and the
    votes'), so a rank that dies mid-step turns into an error on the others instead of a hang.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedConfigError("device cuda requested but no CUDA GPU is visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UnsupportedConfigError(f"device must be cpu or cuda, got {device}")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise UnsupportedConfigError(f"{', '.join(missing)} not set: launch with torchrun")
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            # A group of one (plain python): the same code path with no peers.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    group = dist.group.WORLD
    # The votes go over gloo on the host even when the model all-reduces over NCCL: a vote never waits
    # behind the GPU stream, and a rank stuck in a model collective cannot be mistaken for a vote.
    control = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, group, control, backend, owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def load_tp_model(model_path: str | os.PathLike[str], ctx: DistContext, *,
                  dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a local HF-format checkpoint sharded over ``ctx.group`` with FMS's tensor parallelism, in eval mode.

    Every rank reads the same checkpoint and keeps its own shard (``distributed_strategy="tp"``).
    FMS prints its loading chatter to stdout; it goes to stderr on rank 0 and nowhere on the others, so
    stdout carries the generated text only.
    """
    from fms.models import get_model

    path = Path(model_path)
    if not (path / "config.json").is_file():
        # Without this FMS treats a missing local path as a hub id and tries to download it.
        raise FileNotFoundError(f"no HF checkpoint (config.json) in {path}")
    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    sink = sys.stderr if ctx.is_main else io.StringIO()
    with contextlib.redirect_stdout(sink):
        model = get_model("hf_pretrained", model_path=str(path), device_type=ctx.device.type, data_type=dtype,
                          distributed_strategy="tp", group=ctx.group)
    return model.eval()


# ---------------------------------------------------------------------------------------------- votes


def _digest(*parts: object) -> int:
    """A signed 64-bit hash of the parts' reprs (rank-invariant, unlike Python's salted hash())."""
    raw = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little", signed=True)


_PHASES = ("start", "plan", "commit", "generate", "end", "spec")


class _Control:
    """The votes of one cache over the control group. Every rank must call vote() the same number of times."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.votes = 0

    def vote(self, phase: str, error: BaseException | None = None, digest: int = 0,
             describe: Callable[[], str] | None = None) -> None:
        """All ranks exchange a status; raise the same error on every rank if any failed or the digests differ.

        `describe` gives this rank's view (exchanged only when digests differ, for the message).
        """
        ctx = self.ctx
        self.votes += 1
        mine = torch.tensor([int(error is not None), _PHASES.index(phase), self.votes, digest], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(rows, mine, group=ctx.control)
        table = torch.stack(rows)
        failed = [r for r in range(ctx.world_size) if table[r, 0]]
        if failed:
            payload = None
            if error is not None:
                payload = (type(error).__name__, str(error), getattr(error, "needed", None),
                           getattr(error, "free", None))
            infos: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(infos, payload, group=ctx.control)
            raise _cluster_error(table, infos, ctx.world_size) from error
        if len({tuple(row) for row in table[:, 1:].tolist()}) > 1:      # phase, vote number, digest
            views: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(views, describe() if describe else "", group=ctx.control)
            lines = "; ".join(f"rank {r}: {_PHASES[int(table[r, 1])]} vote {int(table[r, 2])}, digest "
                              f"{int(table[r, 3]):#x}{' (' + views[r] + ')' if views[r] else ''}"
                              for r in range(ctx.world_size))
            at = _PHASES[int(table[0, 1])]          # rank 0's phase: every rank builds the same message
            changed = {"plan": "; no rank changed its cache", "start": "; nothing ran",
                       "spec": "; no cache was built"}.get(at, "")
            raise RankDivergenceError(
                f"ranks disagree at the {at} vote: {lines}. Every rank must get the same requests (prompts, "
                f"arguments, sequence ids), make the same calls and have the same pool{changed}",
                at, {}, ctx.world_size)


def _cluster_error(table: torch.Tensor, infos: list, world_size: int) -> DistributedStepError:
    """The one error every rank raises: built only from what every rank received, so it is identical."""
    failures = {r: (i[0], i[1]) for r, i in enumerate(infos) if i is not None}
    first = min(failures)
    kind, phase = infos[first][0], _PHASES[int(table[first, 1])]
    where = {"plan": "before any page was taken: no rank changed its cache",
             "commit": "after the step was built on the other ranks: finish the step's sequences",
             "start": "before generation started", "generate": "during generation",
             "end": "at the end of generation", "spec": "while building the cache"}[phase]
    same: dict[tuple[str, str], list[int]] = {}
    for r, tm in sorted(failures.items()):
        same.setdefault(tm, []).append(r)
    detail = "; ".join(f"rank {', '.join(map(str, rs))}: {t}: {m}" for (t, m), rs in same.items())
    ranks = ", ".join(map(str, sorted(failures)))
    message = (f"{kind} on rank {ranks} (world size {world_size}; {phase} vote {int(table[first, 2])}, {where}); "
               f"every rank raises this error. {detail}")
    cls = _TWINS.get(kind, DistributedStepError)
    err = cls(message, phase, failures, world_size)
    if cls is DistributedOutOfPagesError:
        err.needed, err.free = infos[first][2], infos[first][3]
    return err


# ---------------------------------------------------------------------------------------------- cache


class VotingAllocator(PageAllocator):
    """A PageAllocator for a tensor-parallel group: the named extension point through which a plan's page
    allocation is agreed by every rank before any rank takes pages.

    Inside ``with allocator.voting(callback):`` every ``allocate(n)`` first decides locally whether it can
    succeed, WITHOUT taking pages, and calls ``callback(n, error_or_None)`` (which votes across ranks and raises
    on every rank if any rank failed); only then are pages taken. It votes on every allocation of the block, not
    on "the" allocation: ranks share one history, so they allocate equally often and their votes pair up.
    ``votes`` counts the votes of the current block (0: the block failed before allocating).
    """

    def __init__(self, num_pages: int, policy: str = "lowest", seed: int = 0) -> None:
        super().__init__(num_pages, policy, seed)
        self._callback: Callable[[int, BaseException | None], None] | None = None
        self.votes = 0

    @contextlib.contextmanager
    def voting(self, callback: Callable[[int, BaseException | None], None]) -> Iterator["VotingAllocator"]:
        """Vote through `callback` before every allocation made inside the block."""
        self._callback, self.votes = callback, 0
        try:
            yield self
        finally:
            self._callback = None

    def allocate(self, n: int, what: str = "request") -> list[int]:
        if self._callback is not None:
            err: BaseException | None = None
            if not isinstance(n, int) or n < 0:
                err = InvalidRequestError(f"page count must be a non-negative int, got {n!r}")
            elif n > self.free_count:
                err = OutOfPagesError(n, self.free_count, what)
            self.votes += 1
            self._callback(n, err)
        return super().allocate(n, what)


class DistributedPagedKVCache(PagedKVCache):
    """A rank's PagedKVCache in a tensor-parallel group: same API, and every plan() is agreed by all ranks.

    Each rank holds its own pools (its local K/V heads); ``plan`` votes twice (see the module doc), so
    a request one rank rejects is rejected on every rank with the same error before any rank changed
    anything. ``admit``/``fork``/``finish`` do not communicate: they are deterministic, and their effect
    (the free page count, the sequences' lengths) is checked by the next plan's vote.

    Args:
        spec, policy, seed, attention, kernel_options, poison_free_pages: see PagedKVCache (same on every rank).
        ctx: this rank's :class:`DistContext`.
        check_pages: also hash every live sequence's physical page table into the post-commit vote (a debug
            and test aid: O(pages in use) host work per step). Ranks with the same history and a deterministic
            placement policy (all of them; "random" is seeded) have identical tables.
    """

    def __init__(self, spec: CacheSpec, ctx: DistContext, *, check_pages: bool = False, policy: str = "lowest",
                 seed: int = 0, **kwargs: Any) -> None:
        if not isinstance(policy, str):
            raise UnsupportedConfigError("a distributed cache takes a policy by name, so every rank builds the same "
                                         "one")
        super().__init__(spec, policy=policy, seed=seed, **kwargs)
        self.allocator = VotingAllocator(spec.num_pages, policy, seed)
        self.ctx = ctx
        self.control = _Control(ctx)
        self.check_pages = check_pages
        self.history = 0                   # digest of every token folded in by the generator
        self._request: tuple | None = None

    def fold_tokens(self, *parts: object) -> None:
        """Fold what a step decided (e.g. its new tokens) into the digest the next vote compares."""
        self.history = _digest(self.history, parts)

    def _state(self) -> str:
        seqs, q_lens = self._request or ((), ())
        return (f"step {list(zip(seqs, q_lens))}, lengths {[self.length(s) for s in seqs if s in self]}, "
                f"{self.allocator.free_count} free pages, {len(self.seq_ids)} live")

    def _pre_commit(self, n: int, err: BaseException | None) -> None:
        seqs, q_lens = self._request                      # validated by now: every id is live
        lengths = tuple(self.length(s) for s in seqs)
        digest = _digest(seqs, q_lens, lengths, n, self.allocator.free_count, self.history)
        self.control.vote("plan", err, digest, self._state)

    def plan(self, seq_ids: Sequence[Hashable], q_lens: Sequence[int], **kwargs: Any) -> StepPlan:
        self._request = (tuple(seq_ids), tuple(q_lens))
        with self.allocator.voting(self._pre_commit) as allocator:
            try:
                plan = super().plan(seq_ids, q_lens, **kwargs)
            except DistributedStepError:
                raise
            except Exception as e:
                # Failed before allocating (validation): vote "plan"; after (building the step): "commit".
                self.control.vote("plan" if allocator.votes == 0 else "commit", e)
                raise                                                       # pragma: no cover (vote raised)
        digest = _digest(self.page_tables()) if self.check_pages else 0
        self.control.vote("commit", None, digest, self._state)
        return plan

    def page_tables(self) -> tuple:
        """Every live sequence's (id, length, physical pages), in admission order (what check_pages hashes)."""
        return tuple((s, st.length, tuple(st.pages)) for s, st in self._seqs.items())

    def pool_bytes(self) -> int:
        """Bytes of this rank's K and V pools (all layers)."""
        return 2 * self.k_pool.numel() * self.k_pool.element_size()


def tp_cache_spec(model: torch.nn.Module, ctx: DistContext, *, token_budget: int | None = None,
                  kv_budget_bytes: int | None = None, page_size: int = 16, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> CacheSpec:
    """The cache spec of this rank's shard of `model` (local kv heads), checked equal on every rank.

    Give either ``token_budget`` (tokens per pool) or ``kv_budget_bytes`` (bytes of K+V per rank: the pool
    then holds ``bytes // bytes_per_token`` tokens, where one token costs ``2 * layers * local_kvheads *
    head_dim * itemsize``; sharding K/V heads over more ranks makes each token cheaper per rank). Every rank
    must arrive at the same spec; if not, every rank raises :class:`RankDivergenceError`.
    """
    if (token_budget is None) == (kv_budget_bytes is None):
        raise InvalidRequestError("give exactly one of token_budget and kv_budget_bytes")
    if kv_budget_bytes is not None:
        probe = cache_spec_for(model, token_budget=page_size, page_size=page_size, max_seq_len=page_size, dtype=dtype)
        token_budget = (int(kv_budget_bytes) // probe.bytes_per_token) // page_size * page_size
        if token_budget < page_size:
            raise InvalidRequestError(f"kv_budget_bytes={kv_budget_bytes} holds less than one page "
                                      f"({probe.bytes_per_token * page_size} bytes)")
    spec = cache_spec_for(model, token_budget=token_budget, page_size=page_size, max_seq_len=max_seq_len, dtype=dtype,
                          device=ctx.device)
    agree_spec(spec, ctx)
    return spec


def agree_spec(spec: CacheSpec, ctx: DistContext) -> None:
    """Raise RankDivergenceError on every rank unless every rank has this spec (device aside)."""
    fields = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.page_size, spec.num_pages, spec.max_seq_len,
              str(spec.dtype))
    _Control(ctx).vote("spec", None, _digest(fields), lambda: f"spec {fields}")


# ---------------------------------------------------------------------------------------------- generator


class DistributedPagedGenerator(PagedGenerator):
    """:class:`~paged.fms.generate.PagedGenerator` on one rank of a tensor-parallel group.

    Call it on every rank with the same arguments; every rank returns the same tokens. The model is this
    rank's shard (``load_tp_model``); the cache holds this rank's K/V heads. Extra args:

    Args:
        ctx: this rank's :class:`DistContext`.
        kv_budget_bytes: size the pool by bytes per rank instead of ``token_budget`` (see tp_cache_spec).
        check_pages: hash the page tables into every step's vote (see DistributedPagedKVCache).
    Progress bars show on rank 0 only.
    """

    def __init__(self, model: torch.nn.Module, ctx: DistContext, spec: CacheSpec | None = None, *,
                 token_budget: int = 8192, kv_budget_bytes: int | None = None, page_size: int = 16,
                 max_seq_len: int | None = None, dtype: torch.dtype | None = None, attention: str = "compiled",
                 policy: str = "lowest", kernel_options: dict | None = None, sliding_window: int | None = None,
                 pad_token_id: int = 0, check_pages: bool = False) -> None:
        if spec is None:
            spec = tp_cache_spec(model, ctx, token_budget=None if kv_budget_bytes else token_budget,
                                 kv_budget_bytes=kv_budget_bytes, page_size=page_size, max_seq_len=max_seq_len,
                                 dtype=dtype)
        else:
            agree_spec(spec, ctx)
        # Decode steps stay eager: a traced or graphed step would have to carry the ranks' collectives and the
        # cache's cross-rank vote (which runs on the host every plan) — not built, so not on by default.
        super().__init__(model, spec, attention=attention, policy=policy, kernel_options=kernel_options,
                         sliding_window=sliding_window, pad_token_id=pad_token_id, cuda_graphs=False,
                         compile_decode=False)
        # PagedGenerator built a plain cache; drop it before building the voting one, so the pools' memory
        # is reused (peak: one pool) rather than held twice.
        self.cache = None
        self.cache = DistributedPagedKVCache(spec, ctx, check_pages=check_pages, policy=policy, attention=attention,
                                             kernel_options=kernel_options)
        self.ctx = ctx

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                 do_sample: bool = False, seed: int | None = None, callback: Callable[[StepEvent], None] | None = None,
                 progress: bool | None = None, **kwargs: Any):
        """PagedGenerator.generate on every rank at once (same arguments on every rank; see its doc)."""
        cache, ctx = self.cache, self.ctx
        if do_sample and seed is None:
            # torch's global RNG differs per process: rank 0 draws the seed and every rank uses it.
            box = [int(torch.randint(0, 2**62, (1,)).item()) if ctx.is_main else None]
            dist.broadcast_object_list(box, src=0, group=ctx.control)
            seed = box[0]
        if not ctx.is_main:
            progress = False
        # Everything the run depends on: different inputs on different ranks fail here, before any step.
        try:
            request = _digest([list(map(int, p)) for p in prompts], max_new_tokens, do_sample, seed,
                              sorted((k, repr(v)) for k, v in kwargs.items()))
        except Exception as e:                  # e.g. a non-integer token: every rank votes it, all raise
            cache.control.vote("start", e)
            raise                                                           # pragma: no cover
        cache.control.vote("start", None, request, lambda: f"{len(prompts)} prompt(s), max_new_tokens={max_new_tokens}")

        def on_step(event: StepEvent) -> None:
            cache.fold_tokens(event.step, sorted(event.new_tokens.items()), event.finished)
            if callback is not None:
                callback(event)

        try:
            out = super().generate(prompts, max_new_tokens, do_sample=do_sample, seed=seed, callback=on_step,
                                   progress=progress, **kwargs)
        except DistributedStepError:
            raise
        except Exception as e:
            cache.control.vote("generate", e)
            raise                                                           # pragma: no cover
        tokens = out[0] if isinstance(out, tuple) else out
        cache.control.vote("end", None, _digest(cache.history, tokens), lambda: f"tokens {tokens}")
        return out


# ---------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class GlobalMemory:
    """Every rank's cache memory at one moment (from :func:`global_memory`).

    Attributes:
        per_rank: each rank's MemoryStats (bytes_per_slot counts only that rank's K/V heads).
        pool_bytes: each rank's K+V pool bytes.
    """

    per_rank: tuple[MemoryStats, ...]
    pool_bytes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.per_rank)

    @property
    def consistent(self) -> bool:
        """Whether every rank holds the same sequences in the same number of pages (it always should)."""
        first = self.per_rank[0]
        return all((m.live_sequences, m.tokens_stored, m.pages_in_use) ==
                   (first.live_sequences, first.tokens_stored, first.pages_in_use) for m in self.per_rank)

    @property
    def tokens_stored(self) -> int:
        """Logical tokens held (every rank holds all of them, each for its own heads)."""
        return self.per_rank[0].tokens_stored

    @property
    def bytes_reserved(self) -> int:
        """Bytes of pages in use, summed over ranks."""
        return sum(m.bytes_reserved for m in self.per_rank)

    @property
    def pool_bytes_total(self) -> int:
        return sum(self.pool_bytes)

    def as_dict(self) -> dict:
        return {"world_size": self.world_size, "consistent": self.consistent, "tokens_stored": self.tokens_stored,
                "bytes_reserved": self.bytes_reserved, "pool_bytes_total": self.pool_bytes_total,
                "per_rank": [dict(m.as_dict(), pool_bytes=b) for m, b in zip(self.per_rank, self.pool_bytes)]}


def global_memory(cache: DistributedPagedKVCache, ctx: DistContext | None = None) -> GlobalMemory:
    """Every rank's ``cache.memory()`` and pool bytes (an all-gather: call it on every rank)."""
    ctx = ctx or cache.ctx
    mine = (cache.memory(), cache.pool_bytes())
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine, group=ctx.control)
    return GlobalMemory(tuple(m for m, _ in everyone), tuple(b for _, b in everyone))


# ---------------------------------------------------------------------------------------------- launcher


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m paged.fms.distributed",
                                     description="Tensor-parallel generation with an FMS Llama on the paged KV cache.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text after one or more prompts (text printed on rank 0)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--random-prompts", type=int, default=0, metavar="N",
                   help="add N seeded random-token prompts (for throughput runs; any checkpoint, no tokenizer needed)")
    g.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    g.add_argument("--model-path", default=None,
                   help="local HF-format Llama directory (default: a seeded random tiny Llama, written by rank 0)")
    g.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer.model (default: the checkpoint's, "
                                                     "else the built-in one)")
    g.add_argument("--max-new-tokens", type=int, required=True)
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and cache dtype (default float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed, and the random tiny model's weights")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--token-budget", type=int, default=None, help="KV pool size in tokens (default 4096)")
    size.add_argument("--kv-gib", type=float, default=None, help="KV pool size in GiB per rank")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-batch", type=int, default=None)
    g.add_argument("--prefill-chunk", type=int, default=None)
    g.add_argument("--eager", action="store_true", help="uncompiled FlexAttention (no compile wait)")
    g.add_argument("--check-pages", action="store_true", help="hash the page tables into every step's vote (debug)")
    g.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout (a dead rank -> error)")
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument("--stats", action="store_true", help="print tokens/s and every rank's KV memory (JSON) to stderr")
    g.add_argument("--warmup", action="store_true", help="run the generation once untimed first (compiles kernels)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--tokens-out", default=None, metavar="FILE",
                   help="write every prompt's generated token ids as JSON (rank 0), to compare runs")
    return parser


def _tiny_checkpoint(vocab_size: int, world_size: int, seed: int, directory: Path) -> Path:
    """A seeded random Llama every rank writes identically (the heads split over up to `world_size` ranks)."""
    from paged.fms.checkpoint import write_tiny_llama_checkpoint

    nheads = max(4, world_size)
    return write_tiny_llama_checkpoint(directory, vocab_size=vocab_size, hidden_size=16 * nheads, num_layers=2,
                                       num_heads=nheads, num_kv_heads=2, intermediate_size=32 * nheads, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from paged.fms.tokenizer import Tokenizer

    if args.max_new_tokens < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    if not args.prompt and args.random_prompts < 1:
        print("error: give --prompt TEXT (repeatable) or --random-prompts N", file=sys.stderr)
        return 2
    ctx = setup(args.device, timeout_s=args.timeout_s)
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
        tok_path = args.tokenizer
        if tok_path is None and args.model_path and (Path(args.model_path) / "tokenizer.model").is_file():
            tok_path = Path(args.model_path) / "tokenizer.model"
        tokenizer = Tokenizer(tok_path)
        if args.model_path:
            model = load_tp_model(args.model_path, ctx, dtype=dtype)
        else:
            # One checkpoint for all ranks (single host): rank 0 writes it, every rank loads it.
            with tempfile.TemporaryDirectory(prefix="paged-tp-") as tmp:
                box = [str(_tiny_checkpoint(tokenizer.vocab_size, ctx.world_size, args.seed, Path(tmp)))
                       if ctx.is_main else None]
                dist.broadcast_object_list(box, src=0, group=ctx.control)
                model = load_tp_model(box[0], ctx, dtype=dtype)
                dist.barrier(group=ctx.control)          # rank 0 removes the files only after every rank read them
        if args.kv_gib is not None:
            sizing = {"kv_budget_bytes": int(args.kv_gib * 2**30)}
        else:
            sizing = {"token_budget": args.token_budget or 4096}
        prompts = [tokenizer.encode(p) for p in args.prompt]
        if args.random_prompts:
            # Seeded on the CPU: the same ids on every rank. Ids 4.. skip the special tokens.
            g = torch.Generator().manual_seed(args.seed)
            vocab = model.config.src_vocab_size if hasattr(model.config, "src_vocab_size") else tokenizer.vocab_size
            prompts += torch.randint(4, vocab, (args.random_prompts, args.prompt_len), generator=g).tolist()
        try:
            gen = DistributedPagedGenerator(model, ctx, page_size=args.page_size, dtype=dtype,
                                            attention="eager" if args.eager else "compiled",
                                            check_pages=args.check_pages, **sizing)

            def run() -> list[list[int]]:
                return gen.generate(prompts, args.max_new_tokens, do_sample=args.do_sample,
                                    temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                    max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                                    eos_token_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
                                    progress=False if args.no_progress else None)

            if args.warmup:
                run()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            outs = run()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        except DistributedStepError as e:            # raised alike on every rank: report once
            if ctx.is_main:
                print(f"error: {e}", file=sys.stderr)
            return 1
        mem = global_memory(gen.cache, ctx)       # collective: every rank
        if ctx.is_main and args.tokens_out:
            Path(args.tokens_out).write_text(json.dumps({"world_size": ctx.world_size, "dtype": str(dtype),
                                                         "tokens": outs}))
        if ctx.is_main:
            if args.random_prompts:
                print(f"{args.random_prompts} random prompt(s) of {args.prompt_len} tokens: "
                      f"{sum(len(o) for o in outs[len(args.prompt):])} new tokens", file=sys.stderr)
            for text, out in zip(args.prompt, outs):
                known = [t for t in out if 0 <= t < tokenizer.vocab_size]
                completion = tokenizer.decode(known)
                print(text + completion if args.echo else completion)
            if args.stats:
                new = sum(len(o) for o in outs)
                stats = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                         "new_tokens": new, "seconds": round(elapsed, 4),
                         "tokens_per_s": round(new / elapsed, 2) if elapsed > 0 else None,
                         "kv_pool_bytes_per_rank": list(mem.pool_bytes),
                         "kv_bytes_per_token_per_rank": gen.spec.bytes_per_token,
                         "pool_tokens": gen.spec.capacity_tokens,
                         # requests like the longest of these that fit the pool at once (each reserved at its longest)
                         "concurrent_sequences_at_longest": gen.spec.num_pages // max(1, *(
                             math.ceil((len(p) + args.max_new_tokens - 1) / gen.spec.page_size) for p in prompts)),
                         "memory": mem.as_dict()}
                print(json.dumps(stats), file=sys.stderr)
        return 0
    finally:
        teardown(ctx)


if __name__ == "__main__":
    sys.exit(main())
