"""Decode traces: what a serving engine asks of a KV cache, as data, and Hypothesis strategies that make them.

A `Trace` is a cache configuration plus a list of operations (`Admit`, `Step`, `Fork`, `Finish`) and a seed
for the tensors. Its repr is valid Python: a failing trace printed by Hypothesis can be pasted into a
regression test (`from conformance.traces import *`).

`traces()` generates realistic serving traces: sequences admitted with prompts of different lengths,
prefilled whole or in chunks, decoded for varying numbers of steps in batches whose membership changes
every step, forked (parallel sampling, beam search), finished early, with pools sized so that they run
near and into exhaustion, and pages freed and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch
from hypothesis import strategies as st

from conformance import mod_specs
from conformance.mod_specs import ModSpec
from conformance.model import PageModel
from conformance.profiles import TraceLimits, limits
from paged.spec import CacheSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TraceConfig:
    """A cache configuration plus the query head count."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    max_seq_len: int
    dtype: str = "float32"

    def spec(self, device: torch.device | str = "cpu") -> CacheSpec:
        return CacheSpec(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                         page_size=self.page_size, num_pages=self.num_pages, max_seq_len=self.max_seq_len,
                         dtype=DTYPES[self.dtype], device=torch.device(device))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Admit:
    seq: int


@dataclass(frozen=True)
class Step:
    """One engine step: `q_lens[i]` new tokens for `seqs[i]` (1 = decode, more = a prefill chunk), and the
    step's attention modification as data (`conformance.mod_specs`: e.g. ("sliding_window", 5)), or None."""

    seqs: tuple[int, ...]
    q_lens: tuple[int, ...]
    mods: ModSpec | None = None


@dataclass(frozen=True)
class Fork:
    parent: int
    child: int


@dataclass(frozen=True)
class Finish:
    seq: int


Op = Union[Admit, Step, Fork, Finish]


@dataclass(frozen=True)
class Trace:
    config: TraceConfig
    ops: tuple[Op, ...]
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(isinstance(op, Step) for op in self.ops)


# ---------------------------------------------------------------- attention modifications used by traces
#: Trace steps carry a declarative ModSpec; the backend and the oracle interpret it separately (mod_specs).
MOD_NAMES = tuple(mod_specs.NAMED)


# ---------------------------------------------------------------- configurations
#: Few, small shapes for CPU profiles: every new shape costs a 1-5 s compile there.
CPU_CONFIGS = (
    TraceConfig(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4, num_pages=24, max_seq_len=48),
    TraceConfig(num_layers=1, num_q_heads=4, num_kv_heads=1, head_dim=32, page_size=8, num_pages=14, max_seq_len=48),
    TraceConfig(num_layers=2, num_q_heads=2, num_kv_heads=2, head_dim=16, page_size=4, num_pages=24, max_seq_len=48,
                dtype="bfloat16"),
)

#: GPU configurations: page sizes >= 16, power-of-two head dims, all three dtypes.
GPU_CONFIGS = (
    TraceConfig(2, 8, 2, 64, 16, 96, 512, "bfloat16"),
    TraceConfig(2, 8, 8, 128, 16, 96, 512, "float16"),
    TraceConfig(1, 32, 8, 128, 64, 24, 512, "bfloat16"),
    TraceConfig(2, 4, 1, 64, 32, 48, 512, "float32"),
    TraceConfig(1, 16, 4, 128, 128, 12, 512, "bfloat16"),
)


#: Indices into the device's fixed configuration list that `configs` draws from (`only_configs`); None: all.
_only: tuple[int, ...] | None = None


def only_configs(indices: tuple[int, ...] | None) -> None:
    """Draw configurations only from these indices of the fixed list (CPU_CONFIGS on the CPU, GPU_CONFIGS on CUDA
    under a small-configuration profile, in place of the profile's own `gpu_configs`), e.g. to aim a check at the
    shapes that can show a bug; None: the profile's. The plugin's `--configs` sets it for a session and clears it
    after. An index out of the list's range raises ValueError when a configuration is drawn."""
    global _only
    _only = tuple(indices) if indices is not None else None


def _fixed(configs_list: tuple[TraceConfig, ...], indices: tuple[int, ...]) -> tuple[TraceConfig, ...]:
    """configs_list at `indices` (all of it when there are none); ValueError naming the range otherwise."""
    if any(not 0 <= i < len(configs_list) for i in indices):
        raise ValueError(f"configuration indices {list(indices)} must be in 0..{len(configs_list) - 1}")
    return tuple(configs_list[i] for i in indices) or configs_list


@st.composite
def configs(draw, device: str = "cpu", lim: TraceLimits | None = None) -> TraceConfig:
    """A cache configuration: a fixed short list on small profiles (narrowed by `only_configs`), drawn freely
    otherwise."""
    lim = lim or limits()
    if device != "cuda":
        return draw(st.sampled_from(_fixed(CPU_CONFIGS, _only or ())))
    if lim.small_configs:  # --configs overrides the profile's own choice
        return draw(st.sampled_from(_fixed(GPU_CONFIGS, _only or lim.gpu_configs)))
    page = draw(st.sampled_from([16, 32, 64, 128]))
    kv = draw(st.sampled_from([1, 2, 4, 8]))
    group = draw(st.sampled_from([1, 2, 4]))
    max_len = draw(st.sampled_from([256, 512, lim.max_seq_len]))
    per_seq = -(-max_len // page)
    pages = draw(st.integers(per_seq, per_seq * 4))
    return TraceConfig(num_layers=draw(st.integers(1, 2)), num_q_heads=kv * group, num_kv_heads=kv,
                       head_dim=draw(st.sampled_from([16, 32, 64, 128])), page_size=page, num_pages=pages,
                       max_seq_len=max_len, dtype=draw(st.sampled_from(sorted(DTYPES))))


# ---------------------------------------------------------------- traces
@st.composite
def traces(draw, device: str = "cpu", *, fork_weight: int = 1, use_mods: bool = True,
           lim: TraceLimits | None = None) -> Trace:
    """A serving trace over one configuration.

    Each operation is drawn from what an engine would do next given the live sequences: admit a request
    (its prompt then arrives in chunks), step a changing subset of sequences (prompt chunks and decode
    tokens mixed), fork a sequence (parallel sampling / beam search), or finish one. Pools are small enough
    that steps run into exhaustion; such steps stay in the trace (a correct backend must refuse them cleanly).
    """
    lim = lim or limits()
    config = draw(configs(device, lim))
    draft = _Draft(draw, lim, config, fork_weight, use_mods)
    for _ in range(draw(st.integers(lim.min_ops, lim.max_ops))):
        draft.next_op()
    # Pressure: often end by growing every live sequence as fast as steps allow, into exhaustion: the
    # backend must then refuse whole steps, and after finishes the freed pages must serve again.
    if draw(st.booleans()):
        draft.pressure()
    seed = draw(st.integers(0, 2**31 - 1))
    return Trace(config, tuple(draft.ops), seed)


class _Draft:
    """A trace being drawn: the operations so far and the page model they leave (steps that do not fit are kept
    in the trace but change nothing, as a correct backend must refuse them)."""

    def __init__(self, draw, lim: TraceLimits, config: TraceConfig, fork_weight: int, use_mods: bool) -> None:
        self.draw, self.lim, self.fork_weight, self.use_mods = draw, lim, fork_weight, use_mods
        self.max_len = min(config.max_seq_len, lim.max_seq_len)
        self.model = PageModel(config.num_pages, config.page_size)
        self.prompt_left: dict[int, int] = {}     # prompt tokens each sequence has still to store
        self.next_id = 0
        self.ops: list[Op] = []

    def _new_id(self) -> int:
        seq, self.next_id = self.next_id, self.next_id + 1
        return seq

    def _apply(self, seqs: list, q_lens: list[int], mod: object = None) -> bool:
        """Append the step; apply it to the model if its pages fit. Returns whether it did."""
        fits = self.model.pages_needed(seqs, q_lens) <= self.model.free_pages
        if fits:
            self.model.step(seqs, q_lens)
        self.ops.append(Step(tuple(seqs), tuple(q_lens), mod))
        return fits

    def next_op(self) -> None:
        """Draw what an engine would do next given the live sequences: admit, step, finish or fork."""
        draw, model, lim = self.draw, self.model, self.lim
        live = sorted(model.seqs)
        growable = [s for s in live if model.length(s) < self.max_len]
        kinds = ["admit"] * (3 if len(live) < lim.max_batch else 1)
        if growable:
            kinds += ["step"] * 6
        if live:
            kinds += ["finish"] + ["fork"] * self.fork_weight
        kind = draw(st.sampled_from(kinds))
        if kind == "admit":
            seq = self._new_id()
            self.prompt_left[seq] = draw(st.integers(1, self.max_len))
            model.admit(seq)
            self.ops.append(Admit(seq))
        elif kind == "finish":
            seq = draw(st.sampled_from(live))
            model.finish(seq)
            self.ops.append(Finish(seq))
        elif kind == "fork":
            parent = draw(st.sampled_from(live))
            child = self._new_id()
            self.prompt_left[child] = self.prompt_left.get(parent, 0)
            model.fork(parent, child)
            self.ops.append(Fork(parent, child))
        else:
            self._step(growable)

    def _step(self, growable: list) -> None:
        """A step of a drawn subset: prompt chunks for sequences with prompt left, else one decode token each."""
        draw, lim = self.draw, self.lim
        count = draw(st.integers(1, min(len(growable), lim.max_batch)))
        members = draw(st.permutations(growable))[:count]
        q_lens = []
        for s in members:
            room = self.max_len - self.model.length(s)
            want = self.prompt_left.get(s, 0) or 1
            chunk = min(want, room, draw(st.integers(1, lim.max_chunk)) if want > 1 else 1)
            q_lens.append(chunk)
        name = draw(st.sampled_from((None,) * 6 + lim.mods)) if self.use_mods and lim.mods else None
        mod = None if name is None else mod_specs.parse(name)
        if self._apply(members, q_lens, mod):
            for s, q in zip(members, q_lens):
                self.prompt_left[s] = max(0, self.prompt_left.get(s, 0) - q)

    def pressure(self) -> None:
        """Fill the batch, grow every live sequence by whole chunks into exhaustion, maybe finish one and step."""
        draw, model, lim, max_len = self.draw, self.model, self.lim, self.max_len
        for _ in range(lim.max_batch - len(model.seqs)):
            seq = self._new_id()
            model.admit(seq)
            self.ops.append(Admit(seq))
        for _ in range(draw(st.integers(2, 6))):
            live = [s for s in sorted(model.seqs) if model.length(s) < max_len][:lim.max_batch]
            if not live:
                break
            self._apply(live, [min(max_len - model.length(s), lim.max_chunk) for s in live])
        if model.seqs and draw(st.booleans()):
            victim = draw(st.sampled_from(sorted(model.seqs)))
            model.finish(victim)
            self.ops.append(Finish(victim))
            live = [s for s in sorted(model.seqs) if model.length(s) < max_len][:1]
            if live:
                self._apply(live, [min(max_len - model.length(live[0]), lim.max_chunk)])


def replay(trace: Trace) -> Iterator[tuple[object, PageModel, bool]]:
    """Each operation of `trace` with the page model after it and whether it was accepted (a step that does not fit
    is refused, as a backend must; admits, forks and finishes always are)."""
    model = PageModel(trace.config.num_pages, trace.config.page_size)
    for op in trace.ops:
        accepted = True
        if isinstance(op, Admit):
            model.admit(op.seq)
        elif isinstance(op, Finish):
            model.finish(op.seq)
        elif isinstance(op, Fork):
            model.fork(op.parent, op.child)
        elif model.pages_needed(op.seqs, op.q_lens) <= model.free_pages:
            model.step(op.seqs, op.q_lens)
        else:
            accepted = False
        yield op, model, accepted


def _model_after(trace: Trace) -> PageModel:
    """The page model after every operation of `trace`."""
    model = PageModel(trace.config.num_pages, trace.config.page_size)
    for _, model, _ in replay(trace):
        pass
    return model


def _next_id(ops: list) -> int:
    return 1 + max((op.seq if isinstance(op, Admit) else op.child for op in ops if isinstance(op, (Admit, Fork))),
                   default=-1)


def exhausted(trace: Trace) -> Trace:
    """`trace`, then sequences grown as far as the pool allows, ending with a step that asks for one page more than
    is free: a backend must refuse it and change nothing (a drawn trace may never run out of pages, as the GPU
    configurations' larger pools mostly do not)."""
    cfg, model, ops = trace.config, _model_after(trace), list(trace.ops)
    next_id, P = _next_id(ops), cfg.page_size
    for _ in range(2 * cfg.num_pages + 2):                  # an accepted step takes >= 1 page; an admit, none
        room = [s for s in model.seqs if model.length(s) + P <= cfg.max_seq_len]
        if not room:
            model.admit(next_id)
            ops.append(Admit(next_id))
            next_id += 1
            continue
        seq = room[-1]
        q = min(cfg.max_seq_len - model.length(seq), P * (model.free_pages + 1))
        ops.append(Step((seq,), (q,)))
        if model.pages_needed([seq], [q]) > model.free_pages:
            break                                           # refused: the trace ends on it
        model.step([seq], [q])
    return Trace(cfg, tuple(ops), trace.seed)


def recycled(trace: Trace, finish: frozenset, chunk: int = 3) -> Trace:
    """`trace`, then: finish the live sequences in `finish`, and fill the whole pool with fresh sequences grown
    `chunk` tokens per step (so their last pages are partly filled). Every page the finished sequences held is
    then handed to a new owner: what they left in it must not reach the new owners' outputs."""
    cfg, model, ops = trace.config, _model_after(trace), list(trace.ops)
    for seq in sorted(s for s in model.seqs if s in finish):
        model.finish(seq)
        ops.append(Finish(seq))
    next_id = _next_id(ops)
    fresh: list[int] = []
    for _ in range(4 * cfg.num_pages):
        growable = [s for s in fresh if model.length(s) < cfg.max_seq_len][:4]
        if not growable:
            if model.free_pages == 0:
                break
            model.admit(next_id)
            ops.append(Admit(next_id))
            fresh.append(next_id)
            next_id += 1
            continue
        q_lens = [min(chunk, cfg.max_seq_len - model.length(s)) for s in growable]
        if model.pages_needed(growable, q_lens) > model.free_pages:
            growable, q_lens = growable[:1], [1]
            if model.pages_needed(growable, q_lens) > model.free_pages:
                break
        model.step(growable, q_lens)
        ops.append(Step(tuple(growable), tuple(q_lens)))
    return Trace(cfg, tuple(ops), trace.seed)
