"""Side-by-side runner: replay a trace on a backend and the oracle, checking every step as it goes.

For each `Step` the same random q/k/v (seeded by trace seed, step and layer) go to the backend, the float64
oracle (golden) and the same-dtype oracle (the plain reference of the correctness policy); every real
output position of every layer and sequence is compared. The page model says what memory a correct paged
backend must report and whether a step must be refused for lack of pages.

Any violation raises `ConformanceError` naming the operation, so Hypothesis shrinks the trace to a minimal
one and prints it as pasteable Python.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from conformance import budget
from conformance.contract import Backend, BackendFactory
from conformance.model import PageModel
from conformance.policy import compare_rows
from conformance.snapshots import first_difference
from conformance.mod_specs import backend_mods, oracle_mods
from conformance.traces import Admit, Finish, Fork, Step, Trace
from oracle import ContiguousOracle
from paged.errors import OutOfPagesError


class ConformanceError(AssertionError):
    """A backend broke the contract; the message names the operation and what was wrong."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        budget.note_failure()   # a check that failed never stops for the time budget (which would hide it)


@dataclass
class ReplayOptions:
    """Which checks a replay performs besides running every operation."""

    compare_outputs: bool = True
    check_memory: bool = False      # fragmentation bounds and exact page accounting after every operation
    poison: bool = False            # NaN-poison free pages after every operation (capability "poison")
    check_rejections: bool = True   # a step the pool cannot hold must raise OutOfPagesError, state unchanged
    eager: bool = False             # build the backend's eager twin instead
    before_op: Any = None           # hook(i, op, backend, model) called before each operation
    before_run: Any = None          # hook(i, op, backend, layer, q, k, v) called before each layer's run
    taint: frozenset = frozenset()  # sequences (and their forks) whose every new K/V value is NaN or +-Inf


@dataclass
class ReplayStats:
    """What a replay did and saw, for the report."""

    steps: int = 0
    refused_steps: int = 0
    skipped_steps: int = 0
    tokens: int = 0
    comparisons: int = 0
    worst_error: float = 0.0
    worst_ratio: float = 0.0        # worst error / its bound (< 1 passes)
    peak_pages: int = 0
    max_waste_fraction: float = 0.0
    outputs: list[torch.Tensor] = field(default_factory=list)  # kept when asked (determinism)

    def merge(self, other: "ReplayStats") -> None:
        for name in ("steps", "refused_steps", "skipped_steps", "tokens", "comparisons"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.worst_error = max(self.worst_error, other.worst_error)
        self.worst_ratio = max(self.worst_ratio, other.worst_ratio)
        self.peak_pages = max(self.peak_pages, other.peak_pages)
        self.max_waste_fraction = max(self.max_waste_fraction, other.max_waste_fraction)


def step_inputs(trace: Trace, step_index: int, layer: int, batch: int, q_len: int, device: torch.device):
    """q (B, Lq, Hq, D), k and v (B, Lq, Hkv, D) for one step and layer: seeded N(0, 1), never zeros."""
    c = trace.config
    gen = torch.Generator().manual_seed((trace.seed * 1_000_003 + step_index * 1009 + layer) % 2**63)
    q = torch.randn(batch, q_len, c.num_q_heads, c.head_dim, generator=gen)
    k = torch.randn(batch, q_len, c.num_kv_heads, c.head_dim, generator=gen)
    v = torch.randn(batch, q_len, c.num_kv_heads, c.head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=c.torch_dtype) for t in (q, k, v))


class SideBySide:
    """A backend, the float64 oracle, the same-dtype oracle and the page model, driven in lockstep.

    `apply(op)` performs one operation on all of them and checks the backend (per `options`).
    """

    def __init__(self, trace: Trace, factory: BackendFactory, device: torch.device | str,
                 options: ReplayOptions | None = None, keep_outputs: bool = False) -> None:
        with _noting_failures():
            self._build(trace, factory, device, options, keep_outputs)

    def _build(self, trace, factory, device, options, keep_outputs) -> None:
        self.opts = options or ReplayOptions()
        self.device = torch.device(device)
        self.trace, self.factory, self.keep_outputs = trace, factory, keep_outputs
        spec = trace.config.spec(self.device)
        make = factory.make_eager if self.opts.eager else factory.make
        if make is None:
            raise ValueError(f"backend {factory.name} has no eager twin")
        self.backend: Backend = make(spec)
        self.gold = ContiguousOracle(spec)
        self.ref = ContiguousOracle(spec, compute_dtype=spec.dtype)
        self.model = PageModel(spec.num_pages, spec.page_size)
        self.paging = factory.has("paging")
        self.stats = ReplayStats()
        self.ops_done = 0
        self.tainted = set(self.opts.taint)   # their outputs are not compared; everyone else's must stay right

    def apply(self, op: Any) -> None:
        """Perform `op` on the backend, the oracles and the model, and check the backend."""
        with _noting_failures():
            self._apply(op)

    def _apply(self, op: Any) -> None:
        i, opts, backend, model = self.ops_done, self.opts, self.backend, self.model
        self.ops_done += 1
        if opts.before_op:
            opts.before_op(i, op, backend, model)
        if isinstance(op, Admit):
            for x in (backend, self.gold, self.ref):
                x.admit(op.seq)
            model.admit(op.seq)
        elif isinstance(op, Finish):
            for x in (backend, self.gold, self.ref):
                x.finish(op.seq)
            model.finish(op.seq)
        elif isinstance(op, Fork):
            if not self.factory.has("fork"):
                self.stats.skipped_steps += 1
                return
            for x in (backend, self.gold, self.ref):
                x.fork(op.parent, op.child)
            model.fork(op.parent, op.child)
            if op.parent in self.tainted:
                self.tainted.add(op.child)
        elif isinstance(op, Step):
            _run_step(i, op, self.trace, backend, self.gold, self.ref, model, self.factory, self.paging, opts,
                      self.stats, self.keep_outputs, self.device, frozenset(self.tainted))
        if opts.poison:
            backend.poison_free_pages(float("nan"))
        if opts.check_memory and self.paging:
            _check_memory(f"op {i} ({op!r})", backend, model)
        if self.paging:
            mem = backend.memory()
            self.stats.peak_pages = max(self.stats.peak_pages, mem.pages_in_use or 0)
            self.stats.max_waste_fraction = max(self.stats.max_waste_fraction, mem.waste_fraction)

    def finish_all(self) -> None:
        """Finish every live sequence; with memory checks on, nothing may remain in use (no leak)."""
        with _noting_failures():
            self._finish_all()

    def _finish_all(self) -> None:
        for seq in list(self.model.seqs):
            self.backend.finish(seq)
            self.model.finish(seq)
        if self.opts.check_memory:
            mem = self.backend.memory()
            if mem.live_sequences != 0 or mem.tokens_stored != 0 or (self.paging and mem.pages_in_use != 0):
                raise ConformanceError(f"after finishing every sequence the backend still holds memory (leak): {mem}")


@contextlib.contextmanager
def _noting_failures():
    """Anything failing inside turns the running check's time-budget stop off (`conformance.budget`), so the
    failing trace is replayed and reported, never hidden behind a stop."""
    try:
        yield
    except BaseException as exc:
        budget.note_failure_of(exc)
        raise


def replay(trace: Trace, factory: BackendFactory, device: torch.device | str,
           options: ReplayOptions | None = None, keep_outputs: bool = False) -> ReplayStats:
    """Run every operation of `trace` on a fresh backend and the oracles; raise ConformanceError on a violation."""
    run = SideBySide(trace, factory, device, options, keep_outputs)
    for op in trace.ops:
        run.apply(op)
    if run.opts.check_memory:
        run.finish_all()
    return run.stats


def taint_rows(k: torch.Tensor, v: torch.Tensor, seqs, q_lens, tainted) -> None:
    """Overwrite every new K and V value of the tainted rows with NaN, +Inf and -Inf in turn (in place)."""
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=k.dtype, device=k.device)
    for b, (seq, n) in enumerate(zip(seqs, q_lens)):
        if seq in tainted:
            for t, shift in ((k, 0), (v, 1)):
                count = t[b, :n].numel()
                t[b, :n] = bad[(torch.arange(count, device=t.device) + shift) % 3].view_as(t[b, :n])


def _run_step(i, op: Step, trace, backend, gold, ref, model: PageModel, factory, paging, opts, stats, keep_outputs,
              device, tainted: frozenset = frozenset()) -> None:
    if op.mods is not None and not factory.has("mods"):
        stats.skipped_steps += 1
        return
    if max(op.q_lens) > 1 and not factory.has("chunked_prefill") and any(model.length(s) for s in op.seqs):
        stats.skipped_steps += 1
        return
    needed, free = model.pages_needed(op.seqs, op.q_lens), model.free_pages
    mask_mod, score_mod = backend_mods(op.mods, trace.config.num_q_heads)
    mask_rule, score_rule = oracle_mods(op.mods, trace.config.num_q_heads)  # the judge's own semantics
    if needed > free:
        stats.refused_steps += 1
        if not (paging and opts.check_rejections):
            return
        before = backend.snapshot()
        try:
            backend.plan(op.seqs, op.q_lens, mask_mod=mask_mod, score_mod=score_mod)
        except OutOfPagesError:
            diff = first_difference(before, backend.snapshot())
            if diff:
                raise ConformanceError(f"op {i} ({op!r}): refused for lack of pages but changed state: {diff}")
            return
        raise ConformanceError(f"op {i} ({op!r}) needs {needed} pages with {free} free, yet plan() accepted it")

    try:
        backend.plan(op.seqs, op.q_lens, mask_mod=mask_mod, score_mod=score_mod)
    except OutOfPagesError as exc:
        raise ConformanceError(
            f"op {i} ({op!r}) needs {needed} pages with {free} free, yet plan() refused it: {exc} "
            f"(external fragmentation or a leak)") from exc
    gold.plan(op.seqs, op.q_lens, mask_mod=mask_rule, score_mod=score_rule)
    ref.plan(op.seqs, op.q_lens, mask_mod=mask_rule, score_mod=score_rule)
    model.step(op.seqs, op.q_lens)
    stats.steps += 1
    stats.tokens += sum(op.q_lens)
    batch, q_len = len(op.seqs), max(op.q_lens)
    for layer in range(trace.config.num_layers):
        q, k, v = step_inputs(trace, i, layer, batch, q_len, device)
        if tainted:
            taint_rows(k, v, op.seqs, op.q_lens, tainted)
        if opts.before_run:
            opts.before_run(i, op, backend, layer, q, k, v)
        out = backend.run(layer, q, k, v)
        if keep_outputs:
            stats.outputs.append(out.detach().cpu().clone())
        if not opts.compare_outputs:
            continue
        _compare_layer(i, op, layer, out, gold.run(layer, q, k, v), ref.run(layer, q, k, v), q, model, trace,
                       stats, tainted)


def _compare_layer(i, op: Step, layer: int, out, want, plain, q, model: PageModel, trace, stats, tainted) -> None:
    """One layer's output against the float64 oracle (`want`) and the same-dtype oracle (`plain`), row by row, in
    row order (padding first, then values); rows of tainted sequences are not judged. The figures of every row
    come to the host in one transfer (`compare_rows`)."""
    if tuple(out.shape) != tuple(q.shape):
        raise ConformanceError(f"op {i} ({op!r}) layer {layer}: output shape {tuple(out.shape)}, "
                               f"expected {tuple(q.shape)}")
    rows = [b for b, seq in enumerate(op.seqs) if seq not in tainted]  # tainted: own K/V non-finite, not judged
    if not rows:
        return
    if len(rows) < len(op.seqs):
        index = torch.tensor(rows, device=out.device)
        out, want, plain = (t.index_select(0, index) for t in (out, want, plain))
    verdicts = compare_rows(out, want, plain, [op.q_lens[b] for b in rows], trace.config.torch_dtype)
    for b, (padding_zero, c) in zip(rows, verdicts):
        seq, n = op.seqs[b], op.q_lens[b]
        if not padding_zero:
            raise ConformanceError(f"op {i} ({op!r}) layer {layer}, sequence {seq}: output rows past its "
                                   f"{n} new token(s) are not 0 (padding must read as zeros)")
        stats.comparisons += 1
        stats.worst_error = max(stats.worst_error, c.error)
        stats.worst_ratio = max(stats.worst_ratio, c.error / c.bound if c.bound else 0.0)
        if not c.ok:
            raise ConformanceError(
                f"op {i} ({op!r}) layer {layer}, sequence {seq} (row {b}, {n} new token(s) at positions "
                f"{model.length(seq) - n}..{model.length(seq) - 1}): {c.describe()}")


def _check_memory(where: str, backend, model: PageModel) -> None:
    mem = backend.memory()
    P = model.page_size
    expect = {"live_sequences": len(model.seqs), "pages_in_use": model.pages_in_use,
              "free_pages": model.free_pages, "tokens_stored": model.tokens_stored}
    for name, want in expect.items():
        got = getattr(mem, name)
        if got != want:
            raise ConformanceError(f"after {where}: memory().{name} = {got}, a correct paged cache has {want}")
    if mem.waste_slots > (P - 1) * len(model.seqs):
        raise ConformanceError(f"after {where}: {mem.waste_slots} wasted slots exceed (page_size - 1) * live "
                               f"sequences = {(P - 1) * len(model.seqs)}")
    if mem.slots_reserved != mem.pages_in_use * P or mem.waste_slots != mem.slots_reserved - mem.tokens_stored:
        raise ConformanceError(f"after {where}: inconsistent memory report {mem}")
