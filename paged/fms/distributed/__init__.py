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

Modules (one job each): ``group`` (DistContext, setup/teardown, load_tp_model), ``errors`` (the errors every
rank raises alike), ``vote`` (the control plane's votes), ``cache`` (VotingAllocator, DistributedPagedKVCache,
tp_cache_spec), ``generator`` (DistributedPagedGenerator), ``memory`` (GlobalMemory), ``cli`` (the launcher
behind ``python -m paged.fms.distributed``).
"""

from __future__ import annotations

from paged.fms.distributed.cache import DistributedPagedKVCache, VotingAllocator, agree_spec, tp_cache_spec
from paged.fms.distributed.cli import main
from paged.fms.distributed.errors import (DistributedDuplicateSequenceError, DistributedInvalidRequestError,
                                          DistributedOutOfPagesError, DistributedPlanError,
                                          DistributedSequenceTooLongError, DistributedStepError,
                                          DistributedUnknownSequenceError, DistributedUnsupportedConfigError,
                                          RankDivergenceError)
from paged.fms.distributed.generator import DistributedPagedGenerator
from paged.fms.distributed.group import DistContext, load_tp_model, setup, teardown
from paged.fms.distributed.memory import GlobalMemory, global_memory

__all__ = [
    "DistContext", "DistributedPagedGenerator", "DistributedPagedKVCache", "DistributedStepError",
    "DistributedOutOfPagesError", "GlobalMemory", "RankDivergenceError", "global_memory", "load_tp_model",
    "main", "setup", "teardown", "tp_cache_spec",
]
