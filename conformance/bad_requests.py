"""Bad requests the suite throws at a backend mid-trace, each with the exception it must raise.

Each `BadRequest` is built from the live state at that moment; calling it must raise `expected` and leave
`snapshot()` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from conformance.model import PageModel
from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError, PlanError,
                          SequenceTooLongError, UnknownSequenceError)

UNKNOWN = 10**9  # an id no trace admits


@dataclass(frozen=True)
class BadRequest:
    name: str
    call: Callable[[object], object]
    expected: type[PagedError]


def request_errors(model: PageModel, max_seq_len: int, paging: bool) -> list[BadRequest]:
    """Bad admit/fork/finish/plan requests that apply to the live state `model` describes."""
    live = sorted(model.seqs)
    bad = [
        BadRequest("finish unknown sequence", lambda b: b.finish(UNKNOWN), UnknownSequenceError),
        BadRequest("fork from unknown sequence", lambda b: b.fork(UNKNOWN, UNKNOWN + 1), UnknownSequenceError),
        BadRequest("step with unknown sequence", lambda b: b.plan([UNKNOWN], [1]), UnknownSequenceError),
        BadRequest("empty step", lambda b: b.plan([], []), InvalidRequestError),
        BadRequest("unhashable sequence id", lambda b: b.admit([1]), InvalidRequestError),
    ]
    if not live:
        return bad
    s = live[0]
    bad += [
        BadRequest("admit a live sequence", lambda b: b.admit(s), DuplicateSequenceError),
        BadRequest("fork onto a live sequence", lambda b: b.fork(s, s), DuplicateSequenceError),
        BadRequest("sequence twice in one step", lambda b: b.plan([s, s], [1, 1]), DuplicateSequenceError),
        BadRequest("zero new tokens", lambda b: b.plan([s], [0]), InvalidRequestError),
        BadRequest("negative new tokens", lambda b: b.plan([s], [-2]), InvalidRequestError),
        BadRequest("lengths list too short", lambda b: b.plan([s], []), InvalidRequestError),
        BadRequest("non-integer token count", lambda b: b.plan([s], [1.5]), InvalidRequestError),
        BadRequest("past max_seq_len", lambda b: b.plan([s], [max_seq_len - model.length(s) + 1]),
                   SequenceTooLongError),
        BadRequest("unknown sequence after a valid one", lambda b: b.plan([s, UNKNOWN], [1, 1]), UnknownSequenceError),
    ]
    if paging:
        # A step that grows every sequence as far as it may: when together they need more pages than are
        # free (and some are free, so a partial allocation would show), it must be refused whole.
        room = [x for x in live if model.length(x) < max_seq_len]
        lens = [max_seq_len - model.length(x) for x in room]
        if room and model.free_pages and model.pages_needed(room, lens) > model.free_pages:
            bad.append(BadRequest(f"step needing more pages than the {model.free_pages} free",
                                  lambda b: b.plan(room, lens), OutOfPagesError))
    return bad


def run_errors(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_layers: int) -> list[BadRequest]:
    """Bad run() calls against the current plan (the real call for `layer` follows them)."""
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    other = torch.float16 if q.dtype != torch.float16 else torch.float32
    return [
        BadRequest("layer out of range", lambda b: b.run(num_layers, q, k, v), PlanError),
        BadRequest("negative layer", lambda b: b.run(-1, q, k, v), PlanError),
        BadRequest("wrong dtype", lambda b: b.run(layer, q.to(other), k.to(other), v.to(other)), InvalidRequestError),
        BadRequest("wrong head dim", lambda b: b.run(layer, q[..., :-1], k[..., :-1], v[..., :-1]), InvalidRequestError),
        BadRequest("wrong kv head count", lambda b: b.run(layer, q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1)),
                   InvalidRequestError),
        BadRequest("wrong batch", lambda b: b.run(layer, q[:0], k[:0], v[:0]), InvalidRequestError),
        BadRequest("too few query positions", lambda b: b.run(layer, q[:, :0], k[:, :0], v[:, :0]), InvalidRequestError),
        BadRequest("k and v shapes differ", lambda b: b.run(layer, q, k, v[:, :, :, :-1]), InvalidRequestError),
        BadRequest("not a tensor", lambda b: b.run(layer, q.tolist(), k, v), InvalidRequestError),
    ] + ([BadRequest("layer run twice", lambda b: b.run(layer - 1, q, k, v), PlanError)] if layer > 0 else []) + (
        [BadRequest("query heads not a multiple of kv heads",
                    lambda b: b.run(layer, torch.cat([q, q[:, :, :1]], 2), k, v), InvalidRequestError)]
        if Hkv > 1 else [])
