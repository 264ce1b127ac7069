"""The batching policy on its own (`paged.fms.scheduler.ContinuousBatching`, no model), and one swap of it inside
`PagedGenerator` that changes the steps but not any request's greedy tokens.

Unit tests build `Request`s by hand; the pool is a number of free pages, and `pages_held` says what each running
request holds now. A small pool simulator (`simulate`) drives the scheduler the way the generator does (admit, one
step, store, pick, finish) and checks that the pool is never overcommitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from paged.fms.checkpoint import tiny_llama
from paged.fms.generate import PagedGenerator, StepEvent
from paged.fms.scheduler import ContinuousBatching, Request, Scheduler, Work

P = 16                                      # page size of every hand-built request


def req(index: int, prompt_len: int, limit: int, *, fed: int = 0, out: tuple[int, ...] = ()) -> Request:
    """A request whose prompt is `prompt_len` distinct tokens (index * 1000 + position)."""
    r = Request.make(index, [index * 1000 + j for j in range(prompt_len)], ("seq", index), limit, P)
    r.fed, r.out = fed, list(out)
    return r


def decoding(index: int, prompt_len: int, limit: int, generated: int = 1) -> Request:
    """A running request past its prompt with `generated` tokens out (the last one not yet stored)."""
    return req(index, prompt_len, limit, fed=prompt_len, out=tuple(range(7, 7 + generated)))


def held(r: Request) -> int:
    """Pages a request holds now: its stored tokens are the prompt fed so far plus every output but the last."""
    stored = r.fed + max(0, len(r.out) - 1)
    return math.ceil(stored / P)


def held_map(running) -> dict:
    return {r.seq_id: held(r) for r in running}


# ------------------------------------------------------------------------------------------------ Request
def test_request_reserve_counts_prompt_and_all_but_the_last_new_token():
    assert Request.make(0, [1] * 16, "a", 1, 16).reserve == 1          # 16 + 1 - 1 = 16 tokens: one page
    assert Request.make(0, [1] * 16, "a", 2, 16).reserve == 2          # 17 tokens
    assert Request.make(0, [1], "a", 1, 16).reserve == 1
    assert Request.make(0, [1] * 5, "a", 28, 16).reserve == 2          # 32 tokens
    r = Request.make(0, [1] * 5, "a", 29, 16)                          # 33 tokens
    assert r.reserve == 3 and r.pages_to_come(0) == 3 and r.pages_to_come(2) == 1
    assert r.pages_to_come(3) == 0 and r.pages_to_come(5) == 0          # never negative
    assert r.prefilling
    r.fed = 5
    assert not r.prefilling


# ------------------------------------------------------------------------------------------------ admit
def test_admits_in_arrival_order_while_they_fit():
    waiting = [req(0, 20, 5), req(1, 3, 2), req(2, 40, 10), req(3, 1, 1)]      # reserves 2, 1, 4, 1
    assert [r.reserve for r in waiting] == [2, 1, 4, 1]
    s = ContinuousBatching()
    assert s.admit(waiting, [], 100, {}) == waiting                  # the same objects, the same order
    assert s.admit(waiting, [], 7, {}) == waiting[:3]                # 2 + 1 + 4 = 7: the last does not fit
    assert s.admit(waiting, [], 8, {}) == waiting
    assert s.admit(waiting, [], 0, {}) == []
    assert s.admit([], [], 10, {}) == []


def test_nobody_overtakes_the_first_request_that_does_not_fit():
    big, small, tiny = req(0, 60, 20), req(1, 2, 2), req(2, 1, 1)      # reserves 5, 1, 1
    s = ContinuousBatching()
    assert s.admit([big, small, tiny], [], 4, {}) == []               # small and tiny would fit, but wait
    assert s.admit([small, big, tiny], [], 4, {}) == [small]           # stops at big even though tiny fits
    assert s.admit([small, big, tiny], [], 6, {}) == [small, big]


def test_max_batch_counts_running_requests():
    running = [decoding(0, 4, 8), decoding(1, 4, 8)]
    waiting = [req(2, 3, 3), req(3, 3, 3), req(4, 3, 3)]
    assert ContinuousBatching(max_batch=3).admit(waiting, running, 100, held_map(running)) == waiting[:1]
    assert ContinuousBatching(max_batch=2).admit(waiting, running, 100, held_map(running)) == []
    assert ContinuousBatching(max_batch=1).admit(waiting, [], 100, {}) == waiting[:1]
    assert ContinuousBatching(max_batch=10).admit(waiting, running, 100, held_map(running)) == waiting
    assert ContinuousBatching().admit(waiting, running, 100, held_map(running)) == waiting


def test_room_is_free_pages_minus_what_running_requests_may_still_claim():
    # Running: 20 prompt tokens + 45 new at its longest = 64 tokens = 4 pages; it holds 2 now (prompt stored,
    # one token out), so 2 more may come. Free pages 5: room for 3 more, not 5.
    running = [decoding(0, 20, 45)]
    assert running[0].reserve == 4 and held(running[0]) == 2
    three, four = req(1, 40, 9), req(2, 50, 15)                          # 48 tokens = 3 pages, 64 = 4 pages
    assert (three.reserve, four.reserve) == (3, 4)
    s = ContinuousBatching()
    assert s.admit([four], running, 5, held_map(running)) == []
    assert s.admit([three], running, 5, held_map(running)) == [three]
    # A request admitted but not yet stepped holds nothing: all of its reserve is still to come.
    fresh = req(3, 30, 3)                                                # 32 tokens = 2 pages
    assert s.admit([three], running + [fresh], 5, {**held_map(running), fresh.seq_id: 0}) == []
    assert s.admit([three], running + [fresh], 7, {**held_map(running), fresh.seq_id: 0}) == [three]
    # A missing entry in pages_held counts as holding nothing (the conservative side).
    assert s.admit([three], running, 5, {}) == []


@st.composite
def pools(draw):
    """Running requests (each holding some of its reserve), free pages that can honour them, waiting requests."""
    running = []
    for i in range(draw(st.integers(0, 6))):
        prompt_len, limit = draw(st.integers(1, 80)), draw(st.integers(1, 40))
        r = req(i, prompt_len, limit)
        if draw(st.booleans()):                       # prefilling: some prompt stored, nothing out
            r.fed = draw(st.integers(0, prompt_len - 1))
        else:                                         # decoding: whole prompt stored, some tokens out
            r.fed, r.out = prompt_len, list(range(draw(st.integers(1, limit))))
        running.append(r)
    pages_held = {r.seq_id: held(r) for r in running}
    to_come = sum(r.pages_to_come(pages_held[r.seq_id]) for r in running)
    free = to_come + draw(st.integers(0, 30))         # the generator's invariant: what is promised is free
    waiting = [req(100 + j, draw(st.integers(1, 120)), draw(st.integers(1, 60)))
               for j in range(draw(st.integers(0, 8)))]
    max_batch = draw(st.none() | st.integers(1, 10))
    return running, pages_held, free, waiting, max_batch


@given(pools())
def test_admission_never_overcommits_and_admits_the_longest_fitting_prefix(pool):
    running, pages_held, free, waiting, max_batch = pool
    admitted = ContinuousBatching(max_batch=max_batch).admit(waiting, running, free, pages_held)
    assert admitted == waiting[:len(admitted)]                               # arrival order, nobody skipped
    to_come = sum(r.pages_to_come(pages_held[r.seq_id]) for r in running)
    claim = to_come + sum(r.reserve for r in admitted)
    assert claim <= free                                                     # never overcommits
    if max_batch is not None:
        assert len(running) + len(admitted) <= max(max_batch, len(running))
    if len(admitted) < len(waiting):                                         # it stopped for a reason
        batch_full = max_batch is not None and len(running) + len(admitted) >= max_batch
        assert batch_full or waiting[len(admitted)].reserve > free - claim


# ------------------------------------------------------------------------------------------------ next_step
def test_prefill_goes_before_decode_and_takes_only_prefilling_rows():
    a, b, c, d = decoding(0, 4, 5), req(1, 10, 3), decoding(2, 7, 5, generated=3), req(3, 3, 3, fed=1)
    work = ContinuousBatching().next_step([a, b, c, d])
    assert work.kind == "prefill"
    assert work.rows == (b, d)                                              # admission order kept
    assert work.chunks == (tuple(b.prompt), tuple(d.prompt[1:]))             # the rest of each prompt


def test_decode_gives_every_running_request_its_last_token():
    rows = [decoding(0, 4, 5, generated=1), decoding(1, 9, 8, generated=4), decoding(2, 1, 2, generated=1)]
    rows[1].out = [11, 12, 13, 14]
    work = ContinuousBatching(prefill_chunk=4).next_step(rows)
    assert work == Work("decode", tuple(rows), ((7,), (14,), (7,)))
    assert all(len(c) == 1 for c in work.chunks)


@pytest.mark.parametrize("chunk, sizes", [(None, [10]), (4, [4, 4, 2]), (5, [5, 5]), (10, [10]), (64, [10]),
                                          (1, [1] * 10)])
def test_prefill_chunks_cover_the_prompt_in_order(chunk, sizes):
    s = ContinuousBatching(prefill_chunk=chunk)
    r, other = req(0, 10, 3), req(1, 3, 3)
    seen, other_seen = [], []
    while r.prefilling:
        work = s.next_step([r, other] if other.prefilling else [r])
        assert work.kind == "prefill" and work.rows[0] is r
        seen.append(work.chunks[0])
        if other.prefilling:
            other_seen.append(work.chunks[1])
            other.fed += len(work.chunks[1])
        r.fed += len(work.chunks[0])
    assert [len(c) for c in seen] == sizes
    assert [t for c in seen for t in c] == r.prompt                         # every token once, in order
    assert [t for c in other_seen for t in c] == other.prompt
    assert all(len(c) <= (chunk or 10) for c in seen + other_seen)


# ------------------------------------------------------------------------------------------------ a whole run
@dataclass
class Trace:
    steps: list[Work]
    running: list[tuple[tuple[Request, bool], ...]]    # per step: (running request, prefilling) when it was chosen
    peak_pages: int


def simulate(scheduler: Scheduler, requests: list[Request], num_pages: int, eos: dict[int, int] | None = None,
             max_steps: int = 10_000) -> Trace:
    """Drive `scheduler` as PagedGenerator does, with pages instead of a model: every step stores its chunks,
    a row that finishes its prompt or decodes picks token 7 (or stops at its step in `eos`), finished rows free
    their pages at once. Fails on overcommit (a step needing pages that are not free) or a stall."""
    eos = eos or {}
    waiting, running, steps, seen, peak = list(requests), [], [], [], 0
    stored: dict = {}
    for _ in range(max_steps):
        if not (waiting or running):
            return Trace(steps, seen, peak)
        in_use = sum(math.ceil(n / P) for n in stored.values())
        admitted = scheduler.admit(waiting, running, num_pages - in_use, {r.seq_id: math.ceil(stored[r.seq_id] / P)
                                                                           for r in running})
        for r in admitted:
            waiting.remove(r)
            running.append(r)
            stored[r.seq_id] = 0
        assert running, "nothing runs and nothing can be admitted"
        work = scheduler.next_step(running)
        steps.append(work)
        seen.append(tuple((r, r.prefilling) for r in running))
        assert set(work.rows) <= set(running) and len(work.rows) == len(work.chunks) >= 1
        for r, c in zip(work.rows, work.chunks):
            stored[r.seq_id] += len(c)
            assert stored[r.seq_id] <= len(r.prompt) + r.limit - 1             # within what it reserved
        in_use = sum(math.ceil(n / P) for n in stored.values())
        assert in_use <= num_pages, f"step {len(steps) - 1} needs {in_use} pages of {num_pages}"
        peak = max(peak, in_use)
        for r, c in zip(work.rows, work.chunks):
            if work.kind == "prefill":
                r.fed += len(c)
                if r.prefilling:
                    continue
            r.out.append(7)
            if len(r.out) == r.limit or eos.get(r.index) == len(r.out):
                running.remove(r)
                del stored[r.seq_id]
    raise AssertionError("no progress")


@given(st.lists(st.tuples(st.integers(1, 100), st.integers(1, 40)), min_size=1, max_size=10),
       st.integers(8, 40), st.none() | st.integers(1, 6), st.none() | st.integers(1, 48), st.data())
def test_a_whole_run_never_overcommits_and_finishes_everyone(sizes, num_pages, max_batch, chunk, data):
    requests = [req(i, n, limit) for i, (n, limit) in enumerate(sizes)]
    requests = [r for r in requests if r.reserve <= num_pages]            # the generator refuses the others
    eos = {r.index: data.draw(st.integers(1, r.limit)) for r in requests if data.draw(st.booleans())}
    trace = simulate(ContinuousBatching(max_batch=max_batch, prefill_chunk=chunk), requests, num_pages, eos)
    assert trace.peak_pages <= num_pages
    for r in requests:
        assert not r.prefilling and len(r.out) == eos.get(r.index, r.limit)
    for w, running in zip(trace.steps, trace.running):
        prefilling = tuple(r for r, pre in running if pre)
        if prefilling:                  # prefill before decode: every prefilling row, in admission order
            assert w.kind == "prefill" and w.rows == prefilling
        else:                           # then every running row decodes
            assert w.kind == "decode" and w.rows == tuple(r for r, _ in running)
        if max_batch is not None:
            assert len(w.rows) <= max_batch
        if chunk is not None:
            assert all(len(c) <= chunk for c in w.chunks)
    # Arrival order: requests start (first appear in a step) in index order.
    first = {}
    for i, w in enumerate(trace.steps):
        for r in w.rows:
            first.setdefault(r.index, i)
    starts = [first[r.index] for r in requests]
    assert starts == sorted(starts)


def test_finished_requests_make_room_for_waiting_ones_at_the_next_step():
    # Pool of 4 pages; each request needs 2 at its longest (20 + 10 - 1 = 29 tokens): two run at once.
    requests = [req(i, 20, 10) for i in range(3)]
    trace = simulate(ContinuousBatching(), requests, 4, eos={0: 2})
    kinds = [(w.kind, [r.index for r in w.rows]) for w in trace.steps]
    assert kinds[:3] == [("prefill", [0, 1]), ("decode", [0, 1]), ("prefill", [2])]   # 0 stopped at step 1
    assert trace.peak_pages == 4


# ------------------------------------------------------------------------------------------------ in PagedGenerator
class OneAtATime(ContinuousBatching):
    """Continuous batching that admits at most one new request per step."""

    def admit(self, waiting, running, free_pages, pages_held):
        return super().admit(waiting, running, free_pages, pages_held)[:1]


class ShortestFirstDecodeFirst:
    """Admits the shortest waiting prompt first (while it fits) and decodes before it prefills."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    def admit(self, waiting, running, free_pages, pages_held):
        room = free_pages - sum(r.pages_to_come(pages_held.get(r.seq_id, 0)) for r in running)
        admitted = []
        for r in sorted(waiting, key=lambda r: (len(r.prompt), r.index)):
            if len(running) + len(admitted) >= self.max_batch or r.reserve > room:
                break
            admitted.append(r)
            room -= r.reserve
        return admitted

    def next_step(self, running):
        ready = [r for r in running if not r.prefilling]
        if ready:
            return Work("decode", tuple(ready), tuple((r.out[-1],) for r in ready))
        return Work("prefill", tuple(running), tuple(tuple(r.prompt[r.fed:r.fed + 8]) for r in running))


@pytest.fixture(scope="module")
def generator() -> PagedGenerator:
    # The GQA model and pool of tests/fms/test_fms_generate.py (same seed, 16 pages of 16): no new compiled shape.
    model = tiny_llama(emb_dim=64, nlayers=2, vocab_size=256, nheads=4, kvheads=2, seed=1)
    return PagedGenerator(model, token_budget=256)


def test_a_custom_scheduler_changes_the_steps_not_the_tokens(generator):
    g = torch.Generator().manual_seed(4)
    lengths, limits = [5, 12, 3, 8], [3, 9, 5, 6]         # at most 4 rows: batch buckets 1, 2, 4
    prompts = [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]

    def run(**kw) -> tuple[list[list[int]], list[StepEvent]]:
        events: list[StepEvent] = []
        outs = generator.generate(prompts, limits, callback=events.append, **kw)
        assert generator.cache.memory().pages_in_use == 0 and generator.cache.memory().live_sequences == 0
        return outs, events

    ref, ref_events = run(prefill_chunk=8)
    one, one_events = run(scheduler=OneAtATime(prefill_chunk=8))
    short, short_events = run(scheduler=ShortestFirstDecodeFirst(max_batch=2))
    assert one == ref and short == ref
    assert [len(o) for o in ref] == limits

    steps = lambda events: [(e.kind, e.requests) for e in events]                       # noqa: E731
    assert steps(ref_events)[0] == ("prefill", (0, 1, 2, 3))
    # One admission per step: requests 0..3 each start in their own prefill step, in arrival order.
    starts = [min(e.step for e in one_events if i in e.requests) for i in range(4)]
    assert starts == sorted(starts) and len(set(starts)) == 4
    assert steps(one_events)[:2] == [("prefill", (0,)), ("prefill", (1,))]
    # Shortest first, two at a time, decoding before prefilling: prompts 3 (index 2) and 5 (index 0) go first,
    # and nobody is prefilled while a running request could decode.
    assert steps(short_events)[0] == ("prefill", (2, 0))
    assert steps(short_events)[1] == ("decode", (2, 0))
    assert max(len(e.requests) for e in short_events) <= 2
    assert steps(one_events) != steps(ref_events) != steps(short_events)


def test_generate_refuses_batching_arguments_next_to_a_scheduler(generator):
    from paged.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="scheduler"):
        generator.generate([[5, 6]], 2, max_batch=2, scheduler=ContinuousBatching())
    assert generator.cache.memory().live_sequences == 0
