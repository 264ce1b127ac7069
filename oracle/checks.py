"""The oracle's own request checks: the backend contract's rules, stated here without the backend's code.

Each check raises an `oracle.errors` exception and changes nothing. The wording follows the contract's
(README "Errors"), so a backend's message and the oracle's can be read side by side.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import torch

from oracle.errors import DuplicateSequenceError, InvalidRequestError, PlanError, SequenceTooLongError, \
    UnknownSequenceError


def new_id(live: Mapping[Hashable, object], seq_id: Hashable) -> None:
    """A new sequence id is hashable and not live."""
    try:
        hash(seq_id)
    except TypeError:
        raise InvalidRequestError(f"sequence ids must be hashable, got {type(seq_id).__name__}") from None
    if seq_id in live:
        raise DuplicateSequenceError(f"sequence {seq_id!r} is already live")


def live_entry(live: Mapping[Hashable, object], seq_id: Hashable):
    """The live sequence's entry, or UnknownSequenceError."""
    try:
        return live[seq_id]
    except (KeyError, TypeError):
        raise UnknownSequenceError(seq_id) from None


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def step(length: Callable[[Hashable], int], live: Mapping, seq_ids: Sequence, q_lens: Sequence, max_seq_len: int,
         mods: tuple) -> tuple[tuple, tuple[int, ...]]:
    """One step's (sequence, new tokens) pairs: non-empty, paired, live, distinct, counts >= 1, within
    max_seq_len; each mod None or a hashable callable. Returns them as tuples."""
    seq_ids, q_lens = tuple(seq_ids), tuple(q_lens)
    if not seq_ids:
        raise InvalidRequestError("a step needs at least one sequence")
    if len(seq_ids) != len(q_lens):
        raise InvalidRequestError(f"{len(seq_ids)} sequence ids but {len(q_lens)} query lengths")
    seen: set = set()
    for s in seq_ids:
        live_entry(live, s)
        if s in seen:
            raise DuplicateSequenceError(f"sequence {s!r} appears twice in one step")
        seen.add(s)
    for s, q in zip(seq_ids, q_lens):
        if not _is_count(q):
            raise InvalidRequestError(f"sequence {s!r}: new token count must be an int >= 1, got {q!r}")
        if length(s) + q > max_seq_len:
            raise SequenceTooLongError(
                f"sequence {s!r}: {length(s)} stored + {q} new tokens exceeds max_seq_len {max_seq_len}")
    for name, mod in zip(("mask_mod", "score_mod"), mods):
        if mod is not None and not callable(mod):
            raise InvalidRequestError(f"{name} must be callable or None, got {type(mod).__name__}")
        try:
            hash(mod)
        except TypeError:
            raise InvalidRequestError(f"{name} must be hashable: a {type(mod).__name__} is not") from None
    return seq_ids, q_lens


def layer_call(spec, has_plan: bool, layers_run: set, layer: object, scale: object) -> None:
    """run()'s layer and scale: a current plan, an int layer (not a bool) in range, not run yet this step,
    and a scale that is None or a positive finite number."""
    if not has_plan:
        raise PlanError("run() needs a current plan: call plan() for this step first")
    if type(layer) is not int or not 0 <= layer < spec.num_layers:
        raise PlanError(f"layer must be an int in [0, {spec.num_layers}), got {layer!r}")
    if layer in layers_run:
        raise PlanError(f"layer {layer} already ran in this step; plan() the next step first")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise InvalidRequestError(f"scale must be None or a positive finite number, got {scale!r}")


def tensors(spec, batch: int, max_q_len: int, q: object, k: object, v: object) -> None:
    """q (B, >=Lq, Hq, D) and k/v (B, same L, Hkv, D): tensors of the cache's dtype and device, Hq >= 1 a
    multiple of Hkv."""
    for name, t, heads in (("q", q, None), ("k", k, spec.num_kv_heads), ("v", v, spec.num_kv_heads)):
        if not isinstance(t, torch.Tensor):
            raise InvalidRequestError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != spec.dtype:
            raise InvalidRequestError(f"{name} has dtype {t.dtype}; the cache holds {spec.dtype}")
        want = torch.device(spec.device)
        if t.device.type != want.type or (want.index is not None and t.device.index not in (None, want.index)):
            raise InvalidRequestError(f"{name} is on {t.device}; the cache is on {spec.device}")
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] < max_q_len or t.shape[3] != spec.head_dim:
            raise InvalidRequestError(f"{name} has shape {tuple(t.shape)}; expected ({batch}, >={max_q_len}, heads, "
                                      f"{spec.head_dim}) for this step")
        if heads is not None and t.shape[2] != heads:
            raise InvalidRequestError(f"{name} has {t.shape[2]} heads; the cache stores {heads} kv heads")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise InvalidRequestError(f"q, k, v lengths differ: {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if q.shape[2] < 1 or q.shape[2] % spec.num_kv_heads:
        raise InvalidRequestError(
            f"q has {q.shape[2]} heads, not a multiple of the cache's {spec.num_kv_heads} kv heads (GQA)")
