"""Request validation shared by every backend of the contract, so they reject bad input identically.

Each check raises a specific PagedError subclass and never changes anything.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

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
    lengths: Callable[[Hashable], int],
    live: Mapping[Hashable, object],
    seq_ids: Sequence[Hashable],
    q_lens: Sequence[int],
    max_seq_len: int,
    mask_mod: object,
    score_mod: object,
) -> tuple[tuple, tuple[int, ...]]:
    """Validate one step's (sequence, new-token count) pairs; return them as tuples."""
    seq_ids, q_lens = tuple(seq_ids), tuple(q_lens)
    if not seq_ids:
        raise InvalidRequestError("a step needs at least one sequence")
    if len(seq_ids) != len(q_lens):
        raise InvalidRequestError(f"{len(seq_ids)} sequence ids but {len(q_lens)} query lengths")
    # A valid step (every step of a serving loop) passes these few whole-batch checks; anything else takes the
    # loops below, which name the first bad entry.
    try:
        valid = len(set(seq_ids)) == len(seq_ids) and all(s in live for s in seq_ids)
    except TypeError:                                         # an unhashable id
        valid = False
    if valid and all(type(q) is int for q in q_lens) and min(q_lens) >= 1 and all(
            lengths(s) + q <= max_seq_len for s, q in zip(seq_ids, q_lens)):
        check_mods(mask_mod, score_mod)
        return seq_ids, q_lens
    seen = set()
    for s in seq_ids:
        lookup(live, s)
        if s in seen:
            raise DuplicateSequenceError(f"sequence {s!r} appears twice in one step")
        seen.add(s)
    for s, q in zip(seq_ids, q_lens):
        if not isinstance(q, int) or isinstance(q, bool) or q < 1:
            raise InvalidRequestError(f"sequence {s!r}: new token count must be an int >= 1, got {q!r}")
        if lengths(s) + q > max_seq_len:
            raise SequenceTooLongError(
                f"sequence {s!r}: {lengths(s)} stored + {q} new tokens exceeds max_seq_len {max_seq_len}")
    check_mods(mask_mod, score_mod)
    return seq_ids, q_lens


def check_mods(mask_mod: object, score_mod: object) -> None:
    """Each mod is None or a hashable callable (the cache keys the step's compiled wrappers on the pair)."""
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
) -> None:
    """Validate one layer's run() against the current plan: layer, shapes, dtypes, devices, GQA ratio."""
    if not has_plan:
        raise PlanError("run() needs a current plan: call plan() for this step first")
    if not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
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
    if q.shape[2] % spec.num_kv_heads:
        raise InvalidRequestError(
            f"q has {q.shape[2]} heads, not a multiple of the cache's {spec.num_kv_heads} kv heads (GQA)")
