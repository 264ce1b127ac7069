"""The adapter's request checks: the contract's rules (README "Errors"), stated in the adapter's own code.

torch's PagedAttention checks nothing, so the adapter refuses a bad request here, before the peer is touched.
The checks are the adapter's own rather than `paged`'s internal validation: a peer stands on paged's public API
(the contract's error types) and its own code, so that a mistake in paged's checks cannot hide in the peer too.
Each check raises the contract's exception (from `paged`'s public API) and changes nothing.
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import torch

from paged import (CacheSpec, DuplicateSequenceError, InvalidRequestError, PlanError, SequenceTooLongError,
                   UnknownSequenceError)

__all__ = ["admissible", "live", "step", "run_call"]


def admissible(seqs: Mapping[Hashable, object], seq_id: Hashable) -> None:
    """A new id: hashable (InvalidRequestError) and not live (DuplicateSequenceError)."""
    try:
        taken = seq_id in seqs
    except TypeError:
        raise InvalidRequestError(f"sequence ids must be hashable, got {type(seq_id).__name__}") from None
    if taken:
        raise DuplicateSequenceError(f"sequence {seq_id!r} is already live")


def live(seqs: Mapping[Hashable, object], seq_id: Hashable):
    """The live sequence's state, or UnknownSequenceError."""
    try:
        return seqs[seq_id]
    except (KeyError, TypeError):
        raise UnknownSequenceError(seq_id) from None


def step(length: Callable[[Hashable], int], seqs: Mapping[Hashable, object], seq_ids: Sequence[Hashable],
         q_lens: Sequence[int], max_seq_len: int, mask_mod: object, score_mod: object) -> tuple[tuple, tuple]:
    """A step's (sequence, new tokens) pairs: non-empty and paired, every id live and once, every count an int
    >= 1 that keeps the sequence within max_seq_len; each mod None or a hashable callable that runs on scalar
    index tensors. Returns (seq_ids, q_lens) as tuples."""
    seq_ids, q_lens = tuple(seq_ids), tuple(q_lens)
    if not seq_ids or len(seq_ids) != len(q_lens):
        raise InvalidRequestError("a step needs at least one sequence" if not seq_ids else
                                  f"{len(seq_ids)} sequence ids but {len(q_lens)} query lengths")
    for i, s in enumerate(seq_ids):
        live(seqs, s)
        if s in seq_ids[:i]:
            raise DuplicateSequenceError(f"sequence {s!r} appears twice in one step")
    for s, q in zip(seq_ids, q_lens):
        if not isinstance(q, int) or isinstance(q, bool) or q < 1:
            raise InvalidRequestError(f"sequence {s!r}: new token count must be an int >= 1, got {q!r}")
        if length(s) + q > max_seq_len:
            raise SequenceTooLongError(f"sequence {s!r}: {length(s)} stored + {q} new tokens exceeds max_seq_len "
                                       f"{max_seq_len}")
    _mod("mask_mod", mask_mod, torch.bool)
    _mod("score_mod", score_mod, None)
    return seq_ids, q_lens


def _mod(name: str, mod: object, want: torch.dtype | None) -> None:
    """None, or a hashable callable returning a one-element tensor (bool for a mask_mod, floating for a
    score_mod) on scalar arguments: a mod that fails would otherwise fail in run(), after the peer's `assign`
    wrote the pool."""
    if mod is None:
        return
    if not callable(mod):
        raise InvalidRequestError(f"{name} must be callable or None, got {type(mod).__name__}")
    try:
        hash(mod)
    except TypeError:
        raise InvalidRequestError(f"{name} must be hashable: a {type(mod).__name__} is not") from None
    index = torch.zeros((), dtype=torch.int32)
    args = (index,) * 4 if want is torch.bool else (torch.zeros(()),) + (index,) * 4
    try:
        with torch.no_grad():
            out = mod(*args)
    except Exception as e:
        raise InvalidRequestError(f"{name} raised {type(e).__name__} on scalar arguments: {e}") from e
    ok = isinstance(out, torch.Tensor) and out.numel() == 1 and (
        out.dtype == want if want is not None else out.dtype.is_floating_point)
    if not ok:
        raise InvalidRequestError(f"{name} must return a one-element {'bool' if want else 'floating-point'} tensor "
                                  f"on scalar arguments, got {out!r}")


def run_call(spec: CacheSpec, plan: object, layer: object, q: object, k: object, v: object) -> None:
    """run() against the current plan: a plan exists, `layer` is an int in range not yet run this step, and q
    (B, >=Lq, Hq, D), k/v (B, same, Hkv, D) are tensors of the pool's dtype and device, Hq a multiple of Hkv."""
    if plan is None:
        raise PlanError("run() needs a current plan: call plan() for this step first")
    if type(layer) is not int or not 0 <= layer < spec.num_layers:
        raise PlanError(f"layer must be an int in [0, {spec.num_layers}), got {layer!r}")
    if layer in plan.layers_run:
        raise PlanError(f"layer {layer} already ran in this step; plan() the next step first")
    batch, max_q = len(plan.seq_ids), plan.max_q_len
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InvalidRequestError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != spec.dtype or t.device.type != spec.device.type or (
                spec.device.index is not None and t.device.index not in (None, spec.device.index)):
            raise InvalidRequestError(f"{name} is {t.dtype} on {t.device}; the pool is {spec.dtype} on {spec.device}")
        if t.dim() != 4 or t.shape[0] != batch or t.shape[1] < max_q or t.shape[3] != spec.head_dim:
            raise InvalidRequestError(f"{name} has shape {tuple(t.shape)}; this step takes ({batch}, >={max_q}, "
                                      f"heads, {spec.head_dim})")
    if k.shape != v.shape or k.shape[2] != spec.num_kv_heads or k.shape[1] != q.shape[1]:
        raise InvalidRequestError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the pool's "
                                  f"{spec.num_kv_heads} kv heads and q's length {q.shape[1]}")
    if q.shape[2] < 1 or q.shape[2] % spec.num_kv_heads:
        raise InvalidRequestError(f"q has {q.shape[2]} heads, not a multiple of the {spec.num_kv_heads} kv heads")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise InvalidRequestError("q, k or v requires grad: the adapter writes them into its pools; call under "
                                  "torch.no_grad() or pass detached tensors")
