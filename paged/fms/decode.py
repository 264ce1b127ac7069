"""Fast decode steps of an FMS model over a PagedKVCache: traced by torch.compile once, replayed as CUDA graphs.

    decoder = CompiledDecoder(model, cache)            # CUDA graphs by default on a CUDA cache
    step = plan_step(cache, seq_ids, [1] * B)          # host: pages and the step's tensors, one packed copy
    logits, picks = decoder(step, last_tokens)         # (B, V) logits of the new position, (B,) their argmax
    tokens = decoder.read_later(picks)                 # their copy to the host, enqueued
    step2 = plan_step(cache, seq_ids, [1] * B)         # the next step, planned while the GPU runs this one
    decoder(step2, FedTokens(picks, range(B), [0] * B))   # fed from the device: no wait for the host
    tokens.tolist()                                    # the first step's picks, read while the second runs

How a step runs. The model's forward is compiled with the attention op in its traceable form (`paged.ops`:
`cache.run` as a custom op named by the cache's handle), so inductor fuses everything around attention and the
graph never depends on per-step Python objects. With CUDA graphs, each batch bucket (the plan's padded batch, a
power of two) gets one graph over the padded batch, captured at the bucket's second step (its first step runs the
compiled forward: it compiles) and replayed at every later step of the bucket: `plan()` rewrites the bucket's
static tensors in place (page table, lengths, split sizes), the decoder copies the step's tokens into the bucket's
static input, and the replay stores each layer's new K/V and attends, padding rows storing nothing. Rows join and
leave freely: a step of 5 rows and one of 7 replay the same bucket-8 graph. Only plain decode steps on the
Triton decode kernel are graphed (the kernel a CUDA cache uses for them); any other step runs the compiled
forward on its real rows, without a graph.

Feeding a step from the device. A greedy decode step's input tokens are the picks of the step before: passed as
`FedTokens`, they are gathered on the device (one copy of the row map, one index_select), so the host can launch
step t+1 before it has read step t's picks, and read them (`read_later`) while step t+1 runs. The GPU then never
waits for the host's per-step work (sampling bookkeeping, the next plan), as long as that work is shorter than a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError, PlanError, UnsupportedConfigError
from paged.fms.op import CACHE_KWARG, OP_NAME, PagedStep, bind
from paged.ops import register
from paged.transfer import PackedStaging

__all__ = ["CompiledDecoder", "FedTokens", "PendingTokens", "counting_backend"]


def counting_backend(backend: str, owner):
    """torch.compile backend `backend`, adding 1 to `owner.compiles` per graph it compiles (a recompile after
    warm-up is a slow step, and the tests count them)."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)

    def compile_and_count(graph_module, example_inputs):
        owner.compiles += 1
        return inner(graph_module, example_inputs)

    return compile_and_count


@dataclass(frozen=True)
class FedTokens:
    """A decode step's input tokens, some of them still on the device.

    Row i's token is `source[index[i]]` where `index[i]` is not None (the pick of an earlier step, which the host has
    not read), else `host[i]`. source: (n,) int64 on the cache's device; index, host: one entry per row of the step.
    """

    source: torch.Tensor
    index: Sequence[int | None]
    host: Sequence[int]


def _check_fed(tokens: FedTokens, rows: int, device: torch.device) -> None:
    """Host checks of FedTokens (an index out of range would be a device-side assert on CUDA, poisoning the context)."""
    src = tokens.source
    if not isinstance(src, torch.Tensor) or src.dim() != 1 or src.dtype != torch.long or src.device != device:
        raise InvalidRequestError(f"FedTokens.source must be a 1-d int64 tensor on {device}, got "
                                  f"{getattr(src, 'dtype', type(src).__name__)} {tuple(getattr(src, 'shape', ()))} "
                                  f"on {getattr(src, 'device', '?')}")
    if len(tokens.host) != rows:
        raise InvalidRequestError(f"FedTokens: {len(tokens.host)} host tokens for {rows} rows")
    bad = [j for j in tokens.index if j is not None and not (type(j) is int and 0 <= j < src.shape[0])]
    if bad:
        raise InvalidRequestError(f"FedTokens: source rows {bad[:4]} outside 0..{src.shape[0] - 1}")


class PendingTokens:
    """A step's picks on their way to the host: `picks` (B,) copied into pinned memory (enqueued, no wait);
    `tolist()` waits for that copy only, not for work enqueued after it. On the CPU the picks themselves."""

    def __init__(self, picks: torch.Tensor, pinned: torch.Tensor | None) -> None:
        self._event = None
        if pinned is None:
            self._host = picks
            return
        self._host = pinned[:picks.shape[0]]
        self._host.copy_(picks, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(picks.device))

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class _Bucket:
    """One padded batch's static decode input and, once captured, its CUDA graph and static outputs."""

    def __init__(self, padded_batch: int, device: torch.device) -> None:
        self.staging = PackedStaging([("ids", (padded_batch, 1), torch.long, 0),
                                      ("index", (padded_batch,), torch.long, 0)], device)
        self.ids = self.staging.dev["ids"]                    # (Bp, 1) the graph's input tokens
        self.index = self.staging.dev["index"]                # (Bp,) FedTokens' source row of each row (-1: host)
        self.steps = 0                                        # steps of this bucket so far
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None   # (Bp, V) logits, (Bp,) picks

    def load(self, tokens: Sequence[int]) -> None:
        """Enqueue the step's tokens into `ids` (padding rows 0), without waiting for the GPU."""
        self.staging.begin()
        host = self.staging.host["ids"]
        host.zero_()
        host[:len(tokens), 0] = torch.as_tensor(tokens, dtype=torch.long)
        self.staging.send(last="ids")

    def load_fed(self, tokens: FedTokens) -> None:
        """Enqueue `ids` from the device source (and the host's tokens of rows that have none there)."""
        self.staging.begin()
        ids, index = self.staging.host_np["ids"][:, 0], self.staging.host_np["index"]
        ids[:] = 0
        index[:] = 0                                          # padding rows: any valid source row
        fed = [(i, j) for i, j in enumerate(tokens.index) if j is not None]
        for i, j in fed:
            index[i] = j
        if len(fed) == len(tokens.index):                     # every row from the device: one gather
            self.staging.send()
            torch.index_select(tokens.source, 0, self.index, out=self.ids.view(-1))
            return
        for i, j in enumerate(tokens.index):
            if j is None:
                index[i], ids[i] = -1, tokens.host[i]
        self.staging.send()
        picked = tokens.source.index_select(0, self.index.clamp(min=0))        # (Bp,)
        self.ids.view(-1).copy_(torch.where(self.index >= 0, picked, self.ids.view(-1)))


class CompiledDecoder:
    """Decode steps of an FMS model, compiled, and on CUDA replayed as one CUDA graph per batch bucket.

    Args:
        model: an FMS decoder in eval mode (bound to the op: `paged.fms.op.bind`, done here).
        cache: the PagedKVCache its attention layers use.
        cuda_graphs: capture and replay decode steps (CUDA only); None: on for a CUDA cache.
        backend: torch.compile backend ("inductor"; "aot_eager" or "eager" trace without generating kernels).
        compile: False runs the traceable forward eagerly (the same op path, no compiler).
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, cuda_graphs: bool | None = None,
                 backend: str = "inductor", compile: bool = True) -> None:
        on_cuda = cache.spec.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise UnsupportedConfigError(f"CUDA graphs need a CUDA cache; this one is on {cache.spec.device}")
        if self.cuda_graphs and cache.attention != "compiled":
            raise UnsupportedConfigError("CUDA graphs replay compiled kernels: the cache needs attention='compiled'")
        bind(model)
        self.model, self.cache = model, cache
        self.handle = register(cache)
        self.compiles = 0                                     # graphs torch.compile made of the decode forward
        self.captures = 0                                     # CUDA graphs captured so far (one per bucket)
        self.replays = 0
        self._forward = (torch.compile(self._traced_forward, backend=counting_backend(backend, self)) if compile
                         else self._traced_forward)
        self._buckets: dict[int, _Bucket] = {}
        self._pinned: list[torch.Tensor | None] = [None, None]   # read_later's two alternating host buffers
        self._reads = 0

    def read_later(self, picks: torch.Tensor) -> PendingTokens:
        """Start copying a step's picks (B,) to the host; `.tolist()` on the result waits for them.

        Two pinned buffers alternate: read a step's picks before calling this a second time after it."""
        if picks.device.type != "cuda":
            return PendingTokens(picks, None)
        slot, self._reads = self._reads % 2, self._reads + 1
        buf = self._pinned[slot]
        if buf is None or buf.numel() < picks.shape[0]:     # this slot only: the other one may still be read
            buf = self._pinned[slot] = torch.empty(max(picks.shape[0], 64), dtype=torch.long, pin_memory=True)
        return PendingTokens(picks, buf)

    def _traced_forward(self, ids: torch.Tensor, q_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 1) int64, q_start (B,) int32 (each row's stored length = its new token's position) ->
        logits (B, V) and their argmax (B,)."""
        position_ids = q_start[:, None].long()                                  # (B, 1)
        logits = self.model(ids, position_ids=position_ids, use_cache=False, attn_name=OP_NAME,
                            **{CACHE_KWARG: self.handle})                       # (B, 1, V)
        logits = logits[:, -1]                                                  # (B, V)
        return logits, logits.argmax(-1)

    def __call__(self, step: PagedStep, tokens: Sequence[int] | FedTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decode step: `tokens[i]` is the new token of row i of `step` (one per sequence), or FedTokens.

        Returns (logits (B, V), picks (B,)) on the cache's device. With CUDA graphs they are views of the bucket's
        static outputs: read (or copy) them before the next step.
        """
        with torch.no_grad():
            return self._step(step, tokens)

    def _step(self, step: PagedStep, tokens: Sequence[int] | FedTokens) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._check(step, tokens)
        graphed = self.cuda_graphs and plan.bucket[2] == "triton"
        B = plan.batch
        bucket = self._bucket(plan.buffers.padded_batch if graphed else B)
        bucket.load_fed(tokens) if isinstance(tokens, FedTokens) else bucket.load(tokens)
        if not graphed:
            torch._dynamo.maybe_mark_dynamic(bucket.ids, 0)
            return self._forward(bucket.ids, plan.buffers.q_start[:B])
        logits, picks = self._graphed(bucket, plan)
        return logits[:B], picks[:B]

    def _graphed(self, bucket: _Bucket, plan) -> tuple[torch.Tensor, torch.Tensor]:
        bucket.steps += 1
        q_start = plan.buffers.q_start                                          # (Bp,) the bucket's static lengths
        if bucket.graph is None and bucket.steps == 1:        # warm-up: compiles, and is this step's real run
            torch._dynamo.maybe_mark_dynamic(bucket.ids, 0)
            torch._dynamo.maybe_mark_dynamic(q_start, 0)
            return self._forward(bucket.ids, q_start)
        if bucket.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outputs = self._forward(bucket.ids, q_start)
            except BaseException:
                plan.layers_run.clear()   # capture computed nothing: the step can still run
                raise
            bucket.graph, bucket.outputs = graph, outputs
            self.captures += 1
        bucket.graph.replay()
        self.replays += 1
        plan.layers_run.update(range(self.cache.spec.num_layers))   # a run() of this plan now would be a second one
        return bucket.outputs

    def _bucket(self, padded_batch: int) -> _Bucket:
        if padded_batch not in self._buckets:
            self._buckets[padded_batch] = _Bucket(padded_batch, self.cache.spec.device)
        return self._buckets[padded_batch]

    def _check(self, step: PagedStep, tokens: Sequence[int] | FedTokens):
        if not isinstance(step, PagedStep) or step.cache is not self.cache:
            raise PlanError("CompiledDecoder needs a PagedStep of its own cache (paged.fms.op.plan_step)")
        plan = step.plan
        if plan is not self.cache.current_plan or plan.layers_run:
            raise PlanError("the step is not the cache's current, unrun plan: plan_step() this step first")
        if plan.max_q_len != 1 or step.sliding_window is not None:
            raise InvalidRequestError("CompiledDecoder runs plain decode steps: one new token per row, no window")
        n = len(tokens.index) if isinstance(tokens, FedTokens) else len(tokens)
        if n != plan.batch:
            raise InvalidRequestError(f"{n} tokens for a step of {plan.batch} rows")
        if isinstance(tokens, FedTokens):
            _check_fed(tokens, n, self.cache.k_pool.device)     # the pools' device: "cuda:0", never bare "cuda"
        return plan
