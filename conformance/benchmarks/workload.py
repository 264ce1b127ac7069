"""Seeded serving workloads: chat-like request lengths, a slot-based server, and a churning trace.

* `chat_requests`: prompt and output lengths drawn from lognormal distributions (prompts median 300,
  outputs median 200 by default), each request capped so that prompt + output <= max_len.
* `serve`: drives any cache with the contract's plan() (and optionally run()) like a continuous-batching
  server with a fixed number of slots: a finished sequence's slot is refilled at the next step; prompts are
  prefilled whole or in chunks, mixed with the other slots' decode tokens in one step.
* `churn_trace`: a long trace whose batch size wanders between `lo` and `hi` (admissions and finishes every few
  steps, prefill chunks <= `chunk`), as `conformance.traces` operations (Admit / Step / Finish).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

from conformance.traces import Admit, Finish, Step


@dataclass(frozen=True)
class Request:
    prompt: int
    output: int

    @property
    def total(self) -> int:
        return self.prompt + self.output


def chat_requests(n: int, seed: int = 0, *, max_len: int = 4096, prompt_median: float = 300,
                  output_median: float = 200, prompt_sigma: float = 1.0, output_sigma: float = 0.8) -> list[Request]:
    """`n` chat-like requests: lognormal prompt and output lengths, prompt + output <= max_len."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = min(max_len - 1, max(1, round(rng.lognormvariate(math.log(prompt_median), prompt_sigma))))
        output = min(max_len - prompt, max(1, round(rng.lognormvariate(math.log(output_median), output_sigma))))
        out.append(Request(prompt, output))
    return out


@dataclass
class _Live:
    req: Request
    prompt_left: int
    output_left: int


def serve(cache, requests: list[Request], slots: int, steps: int, *, chunk: int | None = None,
          on_step: Callable[[int, list, list], None] | None = None) -> dict:
    """Run a continuous-batching server for `steps` steps over `cache` (plan() only, unless on_step runs layers).

    Each step: empty slots take the next requests (admit), then one plan() covers every live sequence:
    a prefilling sequence sends its prompt (or the next `chunk` of it), a decoding one sends one token.
    A sequence that has produced all its output tokens finishes after the step.
    `on_step(step_index, seq_ids, q_lens)` is called after each plan() (e.g. to run the layers).
    Returns counts: admitted, finished, steps, tokens.
    """
    it = iter(enumerate(requests))
    live: dict[int, _Live] = {}
    admitted = finished = tokens = 0
    for s in range(steps):
        while len(live) < slots:
            nxt = next(it, None)
            if nxt is None:
                break
            i, req = nxt
            cache.admit(i)
            live[i] = _Live(req, req.prompt, req.output)
            admitted += 1
        if not live:
            break
        ids = list(live)
        q_lens = []
        for i in ids:
            st = live[i]
            q_lens.append(min(st.prompt_left, chunk or st.prompt_left) if st.prompt_left else 1)
        cache.plan(ids, q_lens)
        if on_step is not None:
            on_step(s, ids, q_lens)
        tokens += sum(q_lens)
        for i, q in zip(ids, q_lens):
            st = live[i]
            if st.prompt_left:
                st.prompt_left -= q
                if st.prompt_left == 0:
                    st.output_left -= 1        # the last prompt chunk yields the first output token
            else:
                st.output_left -= 1
            if st.output_left <= 0:
                cache.finish(i)
                del live[i]
                finished += 1
    return {"admitted": admitted, "finished": finished, "steps": s + 1, "tokens": tokens, "live": sorted(live)}


def refill(cache, requests: list[Request], start: int, live_ids: list, slots: int) -> list:
    """Admit and prefill (plan only) requests[start:] until `slots` sequences are live; return the live ids."""
    ids = list(live_ids)
    i = start
    while len(ids) < slots and i < len(requests):
        cache.admit(i)
        cache.plan([i], [requests[i].prompt])
        ids.append(i)
        i += 1
    return ids


def churn_trace(steps: int, lo: int, hi: int, seed: int, *, prompt_max: int, chunk: int, output: tuple[int, int]):
    """Operations of a serving trace whose batch wanders in [lo, hi]: admissions and finishes every few steps.

    Prompts of 1..prompt_max tokens arrive in chunks of <= `chunk`; outputs are drawn from `output` (inclusive).
    Every step includes every live sequence. Returns a list of Admit / Step / Finish.
    """
    rng = random.Random(seed)
    ops: list = []
    live: dict[int, list[int]] = {}                          # seq -> [prompt_left, output_left]
    next_id = 0
    target = (lo + hi) // 2
    for _ in range(steps):
        target = min(hi, max(lo, target + rng.choice((-2, -1, 0, 0, 1, 2))))
        while len(live) < target or (len(live) < hi and rng.random() < 0.15):
            live[next_id] = [rng.randint(1, prompt_max), rng.randint(*output)]
            ops.append(Admit(next_id))
            next_id += 1
        seqs = sorted(live)
        q_lens = tuple(min(chunk, live[s][0]) if live[s][0] else 1 for s in seqs)
        ops.append(Step(tuple(seqs), q_lens))
        for s, q in zip(seqs, q_lens):
            if live[s][0]:
                live[s][0] -= q
                if live[s][0] == 0:
                    live[s][1] -= 1
            else:
                live[s][1] -= 1
        done = [s for s in seqs if live[s][1] <= 0]
        for s in done:
            del live[s]
            ops.append(Finish(s))
        if len(live) > lo and rng.random() < 0.1:           # an early stop (user cancels), every ~10 steps
            s = rng.choice(sorted(live))
            del live[s]
            ops.append(Finish(s))
    return ops
