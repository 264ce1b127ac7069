"""CUDA-graph capture of a step's layers over a PagedKVCache, replayed after each new plan().

    step = GraphedStep(cache, forward)       # forward(): every layer's cache.run(...) on static inputs
    cache.plan(ids, [1] * B)
    out = step.capture()                     # records forward's launches, then replays them for this step
    for _ in range(n):
        cache.plan(ids, [1] * B)             # host work; refills the plan's persistent device buffers in place
        tokens.copy_(next_tokens)            # the caller refreshes forward's static inputs
        step.replay()                        # `out` now holds this step's outputs

Why this is sound: everything a step's kernels read lives in storage that never moves (the pools,
`page_logical`, and the per-bucket `StepBuffers`: page table, block lists, lengths, slots), and plan()
rewrites it in place with stream-ordered copies. What a graph cannot follow is a change of shape or of mods:
the captured launches are for one batch size and query length (one slot count T) and have the step's
mask_mod / score_mod compiled in, so `replay` refuses a plan that differs in any of these (PlanError) instead
of writing K/V through stale slots into another sequence's page or applying the wrong mask. Only `cache` is
checked: a `forward` that also runs other caches must keep their plans in step itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from paged.cache import PagedKVCache
from paged.errors import PlanError


def plan_signature(cache: PagedKVCache) -> tuple:
    """What a captured step depends on beyond the contents of the plan's buffers: the launch shapes (batch, max
    query length, tokens), the bucket's buffers, and the mask/score functions compiled into the kernels."""
    plan = cache.current_plan
    if plan is None:
        raise PlanError("no current plan: call cache.plan(...) for this step before capture() or replay()")
    if plan.layers_run:
        raise PlanError(f"layers {sorted(plan.layers_run)} of this plan already ran: plan the next step first")
    mask = None if plan.block_mask is None else id(plan.block_mask.mask_mod)
    return (plan.batch, plan.max_q_len, plan.num_tokens, id(plan.buffers), plan.kernel, mask, id(plan.score_mod))


class GraphedStep:
    """One CUDA graph of `forward` (which calls `cache.run` for each layer), replayable once per plan().

    Args:
        cache: a PagedKVCache on a CUDA device, attention="compiled".
        forward: a no-argument callable that runs every layer of one step on static input tensors and returns
            its outputs (static tensors too: replay() overwrites them in place).

    Compile outside the capture: run at least one step of the same shape eagerly before `capture()`.
    """

    def __init__(self, cache: PagedKVCache, forward: Callable[[], Any]) -> None:
        if cache.spec.device.type != "cuda":
            raise PlanError(f"CUDA graphs need a CUDA cache, this one is on {cache.spec.device}")
        self.cache, self.forward = cache, forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple | None = None
        self.outputs: Any = None

    def capture(self) -> Any:
        """Capture `forward` under the current plan, then replay it once (capture itself computes nothing).

        Returns forward's outputs: tensors that every later replay() overwrites.
        """
        shape = plan_signature(self.cache)
        plan = self.cache.current_plan
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.forward()
        except BaseException:
            plan.layers_run.clear()  # nothing ran: the step can still be captured again or run layer by layer
            raise
        self.graph, self.shape, self.outputs = graph, shape, outputs
        graph.replay()
        return outputs

    def replay(self) -> Any:
        """Run the captured layers for the current plan, which must have the captured plan's shape."""
        if self.graph is None:
            raise PlanError("nothing captured yet: call capture() first")
        shape = plan_signature(self.cache)
        if shape != self.shape:
            what = "kernel / mask_mod / score_mod" if shape[:4] == self.shape[:4] else \
                f"(batch, max q_len, tokens) {shape[:3]}, captured {self.shape[:3]},"
            raise PlanError(f"the current plan's {what} differ from the captured step's: capture a graph per "
                            "shape and mods")
        self.graph.replay()
        self.cache.current_plan.layers_run.update(range(self.cache.spec.num_layers))  # a run() now would be a second one
        return self.outputs
