"""Request validation shared by every backend of the contract, so they reject bad input identically.

Each check raises a specific PagedError subclass and never changes anything.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from operator import add, attrgetter
from typing import Hashable, Mapping, Sequence

import torch

from paged.errors import (DuplicateSequenceError, InvalidRequestError, PlanError, SequenceTooLongError,
                          UnknownSequenceError)
from paged.spec import CacheSpec


def check_new_id(live: Mapping[Hashable, object], seq_id: Hashable) -> None:
    """A new sequence id must be hashable and not live."""
    try:
        hash(seq_id)
    except TypeError:
        raise InvalidRequestError(f"sequence ids must be hashable, got {type(seq_id).__name__}") from None
    if seq_id in live:
        raise DuplicateSequenceError(f"sequence {seq_id!r} is already live")


def lookup(live: Mapping[Hashable, object], seq_id: Hashable):
    """The live sequence's state, or UnknownSequenceError."""
    try:
        return live[seq_id]
    except (KeyError, TypeError):
        raise UnknownSequenceError(seq_id) from None


def check_step(
    live: Mapping[Hashable, object],
    seq_ids: Sequence[Hashable],
    q_lens: Sequence[int],
    max_seq_len: int,
    mask_mod: object,
    score_mod: object,
) -> tuple[tuple, tuple[int, ...], list]:
    """Validate one step's (sequence, new-token count) pairs; return them as tuples, and the sequences' states
    (`live`'s values: objects with `.length` and `.missing_layers`) in step order."""
    seq_ids, q_lens = tuple(seq_ids), tuple(q_lens)
    if not seq_ids:
        raise InvalidRequestError("a step needs at least one sequence")
    if len(seq_ids) != len(q_lens):
        raise InvalidRequestError(f"{len(seq_ids)} sequence ids but {len(q_lens)} query lengths")
    # A valid step (every step of a serving loop) passes these whole-batch checks, each one pass at C speed (plan()'s
    # host time is a per-step cost: issue 16); anything else takes the loops below, which name the first bad entry.
    try:
        states = [live[s] for s in seq_ids]
        valid = len(set(seq_ids)) == len(seq_ids)
    except (KeyError, TypeError):                             # an unknown or unhashable id
        valid = False
    if (valid and set(map(type, q_lens)) == {int} and min(q_lens) >= 1
            and max(map(add, map(_length, states), q_lens)) <= max_seq_len and not any(map(_missing, states))):
        check_mods(mask_mod, score_mod)
        return seq_ids, q_lens, states
    seen = set()
    for s in seq_ids:
        lookup(live, s)
        if s in seen:
            raise DuplicateSequenceError(f"sequence {s!r} appears twice in one step")
        seen.add(s)
    for s, q in zip(seq_ids, q_lens):
        if not isinstance(q, int) or isinstance(q, bool) or q < 1:
            raise InvalidRequestError(f"sequence {s!r}: new token count must be an int >= 1, got {q!r}")
        if live[s].length + q > max_seq_len:
            raise SequenceTooLongError(
                f"sequence {s!r}: {live[s].length} stored + {q} new tokens exceeds max_seq_len {max_seq_len}")
    for s in seq_ids:
        check_complete(s, live[s])
    check_mods(mask_mod, score_mod)
    return seq_ids, q_lens, [live[s] for s in seq_ids]


_length = attrgetter("length")
_missing = attrgetter("missing_layers")


# Mods already probed (by identity and equality, as the cache keys its wrappers): a serving loop passes the same
# pair every step, so the probe runs once per pair; bounded, so fresh mod objects each step hold no memory.
_probed: "OrderedDict[tuple, None]" = OrderedDict()
_PROBED_MAX = 16


def check_mods(mask_mod: object, score_mod: object) -> None:
    """Each mod is None or a hashable callable (the cache keys the step's compiled wrappers on the pair) that, called
    once on scalar tensors (b = h = q_idx = kv_idx = 0, score 0.0), returns a tensor (bool for a mask_mod, floating
    for a score_mod). A mod that raises or returns something else is refused here, before the step changes anything,
    instead of failing inside the attention call of `run()` after the pool was written."""
    for name, mod in (("mask_mod", mask_mod), ("score_mod", score_mod)):
        if mod is None:
            continue
        if not callable(mod):
            raise InvalidRequestError(f"{name} must be callable or None, got {type(mod).__name__}")
        try:
            hash(mod)
        except TypeError:
            raise InvalidRequestError(f"{name} must be hashable: a {type(mod).__name__} is not (define __hash__, "
                                      f"or pass a function)") from None
    if mask_mod is None and score_mod is None:
        return
    key = (mask_mod, score_mod)
    if key in _probed:
        _probed.move_to_end(key)
        return
    zero = torch.zeros((), dtype=torch.int32)
    for name, mod, args in (("mask_mod", mask_mod, (zero, zero, zero, zero)),
                            ("score_mod", score_mod, (torch.zeros(()), zero, zero, zero, zero))):
        if mod is None:
            continue
        try:
            with torch.no_grad():
                out = mod(*args)
        except Exception as e:
            raise InvalidRequestError(
                f"{name} raised {type(e).__name__}: {e} (called as {name}(" + ("score, " if name == "score_mod"
                else "") + "b, h, q_idx, kv_idx) on scalar int32 tensors 0)") from e
        want = "a bool tensor" if name == "mask_mod" else "a floating-point tensor"
        if not isinstance(out, torch.Tensor) or (out.dtype != torch.bool if name == "mask_mod"
                                                 else not out.dtype.is_floating_point) or out.numel() != 1:
            got = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                   else f"a {type(out).__name__}")
            raise InvalidRequestError(f"{name} must return {want} of the arguments' shape, got {got} for scalar "
                                      f"arguments")
    _probed[key] = None
    if len(_probed) > _PROBED_MAX:
        _probed.popitem(last=False)


def check_complete(seq_id: Hashable, state: object) -> None:
    """A sequence whose last step was abandoned part-way (finish() of another sequence of that step while some of
    its layers had not run) lacks K/V in those layers for its last tokens: it can only be finished."""
    missing = getattr(state, "missing_layers", None)
    if missing:
        raise PlanError(f"sequence {seq_id!r} lacks its last step's K/V in layers {list(missing)} (the step was "
                        f"abandoned by finish() before those layers ran): finish it")


def check_step_done(plan: object, num_layers: int, what: str) -> None:
    """`what` (admit / fork) may not run between the layers of a step: a plan that has run some but not all layers
    would be dropped while its tokens count as stored, without K/V in the layers not yet run. A plan with no layer
    run yet is dropped as before (its tokens still count as stored, with K/V in no layer: plan a step only when its
    layers will run). `plan` is the current plan or None; its `layers_run` is the set of layers already run."""
    done = getattr(plan, "layers_run", None) if plan is not None else None
    if done and len(done) < num_layers:
        left = sorted(set(range(num_layers)) - set(done))
        raise PlanError(f"{what}() between the layers of a step: layers {left} of the current step have not run; "
                        f"run them first (or finish() the step's sequences to abandon it)")


def check_scale(scale: object) -> None:
    """None (1/sqrt(head_dim)) or a positive finite number (an int or a float, not a bool)."""
    if scale is None:
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InvalidRequestError(f"scale must be None or a positive finite number, got {type(scale).__name__} "
                                  f"{scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidRequestError(f"scale must be None or a positive finite number, got {scale!r}")


def check_run(
    spec: CacheSpec,
    has_plan: bool,
    layers_run: set[int],
    batch: int,
    max_q_len: int,
    layer: object,
    q: object,
    k: object,
    v: object,
    scale: object = None,
) -> None:
    """Validate one layer's run() against the current plan: layer, shapes, dtypes, devices, GQA ratio, scale, and
    that no input requires grad where autograd would record the pool writes (the pool would join the graph)."""
    if not has_plan:
        raise PlanError("run() needs a current plan: call plan() for this step first")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < spec.num_layers:
        raise PlanError(f"layer must be an int in [0, {spec.num_layers}), got {layer!r}")
    if layer in layers_run:
        raise PlanError(f"layer {layer} already ran in this step; plan() the next step first")
    for name, t, heads in (("q", q, None), ("k", k, spec.num_kv_heads), ("v", v, spec.num_kv_heads)):
        if not isinstance(t, torch.Tensor):
            raise InvalidRequestError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != spec.dtype:
            raise InvalidRequestError(f"{name} has dtype {t.dtype}; the cache holds {spec.dtype}")
        if t.device.type != spec.device.type or (
                spec.device.index is not None and t.device.index not in (None, spec.device.index)):
            raise InvalidRequestError(f"{name} is on {t.device}; the cache is on {spec.device}")
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] < max_q_len or t.shape[3] != spec.head_dim:
            raise InvalidRequestError(
                f"{name} has shape {tuple(t.shape)}; expected ({batch}, >={max_q_len}, heads, {spec.head_dim}) "
                f"for this step")
        if heads is not None and t.shape[2] != heads:
            raise InvalidRequestError(f"{name} has {t.shape[2]} heads; the cache stores {heads} kv heads")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise InvalidRequestError(f"q, k, v lengths differ: {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if q.shape[2] < 1 or q.shape[2] % spec.num_kv_heads:
        raise InvalidRequestError(
            f"q has {q.shape[2]} heads, not a positive multiple of the cache's {spec.num_kv_heads} kv heads (GQA)")
    check_scale(scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        which = ", ".join(n for n, t in (("q", q), ("k", k), ("v", v)) if t.requires_grad)
        raise InvalidRequestError(
            f"{which} require(s) grad: paged is an inference cache (its pools would join the autograd graph); "
            f"call under torch.no_grad() or torch.inference_mode(), or pass detached tensors")
