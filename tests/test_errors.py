"""Every error path: the specific paged.errors exception, a message that says what was wrong, and a state that
is exactly as before (`snapshot()` compared bit for bit, NaN == NaN), for PagedKVCache and, where the error
applies, the ContiguousOracle. After each rejected request the trace continues, and the paged cache must still
agree with the oracle (the pending layer of the step in flight, then one more step).

This file: bad sequence ids and step shapes at plan(). Errors of run() and mods: test_run_errors.py; out of
pages and bad configurations: test_config_errors.py; the shared world: error_world.py.
"""

from __future__ import annotations

import pytest
import torch

from paged import DuplicateSequenceError, InvalidRequestError, SequenceTooLongError, UnknownSequenceError
from tests.error_world import both, error_class, rejects, state_equal, world  # noqa: F401  (world: a fixture)


def test_state_equal_sees_nan_as_equal_and_catches_one_bit():
    x = torch.tensor([1.0, float("nan")])
    assert state_equal({"k": (x, [1])}, {"k": (x.clone(), [1])})
    assert not state_equal({"k": (x, [1])}, {"k": (x.clone(), [2])})
    y = x.clone()
    y[0] = torch.nextafter(y[0], torch.tensor(2.0))
    assert not state_equal(x, y)
    assert not state_equal(x, x.to(torch.float64))



# ------------------------------------------------------------------------------------ sequence ids
@both
@pytest.mark.parametrize("op", ["plan", "finish", "fork", "length"])
def test_unknown_sequence_id(world, kind, op):
    calls = {
        "plan": lambda c: c.plan(["a", "nope", "b"], [1, 1, 1]),
        "finish": lambda c: c.finish("nope"),
        "fork": lambda c: c.fork("nope", "child"),
        "length": lambda c: c.length("nope"),
    }
    err = rejects(world, kind, UnknownSequenceError, r"sequence 'nope' is not live", calls[op])
    assert err.seq_id == "nope" and isinstance(err, KeyError)


def test_unknown_sequence_id_for_pages(world):
    rejects(world, "paged", UnknownSequenceError, r"'nope' is not live", lambda c: c.pages("nope"))


@both
def test_unhashable_sequence_id(world, kind):
    rejects(world, kind, UnknownSequenceError, r"not live", lambda c: c.plan([["a"]], [1]))
    rejects(world, kind, InvalidRequestError, r"hashable, got list", lambda c: c.admit(["x"]))
    rejects(world, kind, InvalidRequestError, r"hashable, got dict", lambda c: c.fork("a", {}))


@both
def test_duplicate_admit(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'b' is already live", lambda c: c.admit("b"))


@both
def test_duplicate_fork_target(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'c' is already live", lambda c: c.fork("a", "c"))
    rejects(world, kind, DuplicateSequenceError, r"sequence 'a' is already live", lambda c: c.fork("a", "a"))


@both
def test_sequence_twice_in_one_step(world, kind):
    rejects(world, kind, DuplicateSequenceError, r"sequence 'a' appears twice in one step",
            lambda c: c.plan(["a", "b", "a"], [1, 1, 1]))


# ------------------------------------------------------------------------------------- step shape
@both
def test_empty_step(world, kind):
    rejects(world, kind, InvalidRequestError, r"at least one sequence", lambda c: c.plan([], []))


@both
def test_mismatched_lengths(world, kind):
    rejects(world, kind, InvalidRequestError, r"2 sequence ids but 1 query lengths", lambda c: c.plan(["a", "b"], [1]))
    rejects(world, kind, InvalidRequestError, r"1 sequence ids but 2 query lengths", lambda c: c.plan(["a"], [1, 1]))


@both
@pytest.mark.parametrize("bad", [0, -1, True, 1.0, None, "2"], ids=repr)
def test_bad_query_length(world, kind, bad):
    # the bad count is on the last sequence: the valid ones before it must not be committed
    rejects(world, kind, InvalidRequestError, rf"sequence 'c': new token count must be an int >= 1, got {bad!r}",
            lambda c: c.plan(["a", "b", "c"], [1, 1, bad]))


@both
def test_length_past_max_seq_len(world, kind):
    room = world.spec.max_seq_len - 18                 # b holds 16 + 2 tokens (the step in flight)
    err = rejects(world, kind, SequenceTooLongError,
                  rf"sequence 'b': 18 stored \+ {room + 1} new tokens exceeds max_seq_len {world.spec.max_seq_len}",
                  lambda c: c.plan(["a", "b"], [1, room + 1]))
    assert isinstance(err, error_class(kind, InvalidRequestError))


@both
@pytest.mark.parametrize("which", ["mask_mod", "score_mod"])
def test_non_callable_mod(world, kind, which):
    rejects(world, kind, InvalidRequestError, rf"{which} must be callable or None, got int",
            lambda c: c.plan(["a"], [1], **{which: 3}))


class UnhashableCausal:
    """A callable mask that defines __eq__ and so has no hash."""

    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def __eq__(self, other):
        return isinstance(other, UnhashableCausal)


@both
@pytest.mark.parametrize("which", ["mask_mod", "score_mod"])
def test_unhashable_mod(world, kind, which):
    """The cache keys its compiled wrappers on the mods: an unhashable one must be refused before the commit,
    not fail half-way through it."""
    rejects(world, kind, InvalidRequestError, rf"{which} must be hashable: a UnhashableCausal is not",
            lambda c: c.plan(["a"], [1], **{which: UnhashableCausal()}))


@both
def test_several_faults_report_the_same_one_as_ever(world, kind):
    """Validation order: ids and lengths before the mods (every backend shares it, so they agree)."""
    rejects(world, kind, UnknownSequenceError, "nope", lambda c: c.plan(["nope"], [1], mask_mod=3))


@both
def test_a_rejected_plan_keeps_the_step_in_flight(world, kind):
    """Nothing about the current plan changes either: its pending layer still runs (and agrees)."""
    cache = world.cache(kind)
    with pytest.raises(error_class(kind, UnknownSequenceError)):
        cache.plan(["nope"], [1])
    with pytest.raises(error_class(kind, InvalidRequestError)):
        cache.plan(["a"], [0])
    with pytest.raises(error_class(kind, SequenceTooLongError)):
        cache.plan(["a"], [world.spec.max_seq_len])
    world.carry_on()
