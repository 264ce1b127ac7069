"""The conformance checks. Each test replays Hypothesis-generated serving traces on the backend under test
(--backend) and the oracle side by side; a failure prints the minimal trace as pasteable Python.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance.bad_requests import request_errors, run_errors
from conformance.policy import CEILING
from conformance.profiles import active_profile
from conformance.records import record
from conformance.runner import ConformanceError, ReplayOptions, replay
from conformance.snapshots import first_difference
from conformance.traces import Admit, Step, exhausted, recycled, traces
from paged.errors import OutOfPagesError


def _forks(factory, weight: int = 1) -> int:
    """Forks appear in traces only for backends that have them."""
    return weight if factory.has("fork") else 0


@given(trace=st.data())
@pytest.mark.check("outputs_match_oracle")
def test_outputs_match_oracle(backend_factory, device, trace):
    """Every output of every step, layer and sequence matches the float64 oracle (correctness policy)."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory)), label="trace")
    record("outputs_match_oracle", replay(t, backend_factory, device, ReplayOptions()))


@pytest.mark.check("fragmentation", needs=("paging",))
@given(trace=st.data())
def test_fragmentation(backend_factory, device, trace):
    """Pages in use == pages the live sequences need (shared once); waste <= (P-1) per sequence; a step
    needing k pages succeeds iff k are free (no external fragmentation) and a refusal changes nothing (every trace
    ends by running the pool out: `exhausted`); after everything finishes, no page is in use (no leak)."""
    t = exhausted(trace.draw(traces(device.type, fork_weight=_forks(backend_factory), use_mods=False), label="trace"))
    record("fragmentation", replay(t, backend_factory, device, ReplayOptions(compare_outputs=False, check_memory=True)))


@pytest.mark.check("isolation_poison", needs=("poison",))
@given(trace=st.data())
def test_isolation_poison(backend_factory, device, trace):
    """Free pages are NaN-poisoned after every operation; no output is ever NaN or wrong."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory), use_mods=False), label="trace")
    record("isolation_poison", replay(t, backend_factory, device, ReplayOptions(poison=True)))


@pytest.mark.check("isolation_nonfinite")
@given(trace=st.data())
def test_isolation_nonfinite(backend_factory, device, trace):
    """The real configuration (no debug zeroing or poisoning): some sequences store only NaN/+-Inf K/V (as a
    broken fp16 request would). While they live, and after they finish and their pages hold those values for
    the next owner, every other sequence's output is finite and matches the oracle."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory)), label="trace")
    admitted = sorted(op.seq for op in t.ops if isinstance(op, Admit))
    taint = trace.draw(st.sets(st.sampled_from(admitted), min_size=1, max_size=max(1, len(admitted) // 2)),
                       label="sequences with non-finite K/V")
    t = recycled(t, frozenset(taint))   # then every page they held goes to a new owner
    record("isolation_nonfinite", replay(t, backend_factory, device, ReplayOptions(taint=frozenset(taint))))


@pytest.mark.check("isolation_fork", needs=("fork",))
@given(trace=st.data())
def test_isolation_fork(backend_factory, device, trace):
    """Fork-heavy traces (parallel sampling, beam search): a fork and its parent never see each other's
    later tokens (the oracle copies on fork; every output is compared)."""
    t = trace.draw(traces(device.type, fork_weight=5, use_mods=False), label="trace")
    record("isolation_fork", replay(t, backend_factory, device, ReplayOptions(check_memory=backend_factory.has("paging"))))


@pytest.mark.check("eager_matches_compiled", needs=("eager",))
@given(trace=st.data())
def test_eager_matches_compiled(backend_factory, device, trace):
    """The eager twin (which reads only the mask_mod) matches the oracle and the compiled backend."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory)), label="trace")
    eager = replay(t, backend_factory, device, ReplayOptions(eager=True), keep_outputs=True)
    compiled = replay(t, backend_factory, device, ReplayOptions(), keep_outputs=True)
    ceiling = CEILING[t.config.torch_dtype]
    for i, (a, b) in enumerate(zip(eager.outputs, compiled.outputs)):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        if not diff <= ceiling:
            raise ConformanceError(f"output {i}: eager and compiled differ by {diff:.3g} (> {ceiling:.3g})")
    record("eager_matches_compiled", eager)


@pytest.mark.check("errors_leave_state_unchanged")
@given(trace=st.data(), choice=st.data())
def test_errors_leave_state_unchanged(backend_factory, device, trace, choice):
    """Bad requests injected mid-trace raise their specific exception and leave snapshot() unchanged."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory), use_mods=False), label="trace")
    paging = backend_factory.has("paging")

    def expect(bad, target):
        before = target.snapshot()
        with pytest.raises(bad.expected) as info:
            bad.call(target)
        assert str(info.value), f"{bad.name}: exception without a message"
        diff = first_difference(before, target.snapshot())
        if diff:
            raise ConformanceError(f"{bad.name}: raised {type(info.value).__name__} but changed state: {diff}")

    def before_op(i, op, target, model):
        bad = request_errors(model, t.config.max_seq_len, paging)
        expect(choice.draw(st.sampled_from(bad), label=f"bad request before op {i}"), target)
        for oom in (b for b in bad if b.expected is OutOfPagesError):  # all-or-nothing, whenever it applies
            expect(oom, target)

    def before_run(i, op: Step, target, layer, q, k, v):
        bad = run_errors(layer, q, k, v, t.config.num_layers)
        expect(choice.draw(st.sampled_from(bad), label=f"bad run before op {i} layer {layer}"), target)

    record("errors_leave_state_unchanged",
           replay(t, backend_factory, device, ReplayOptions(before_op=before_op, before_run=before_run)))


@pytest.mark.check("determinism")
@given(trace=st.data())
def test_determinism(backend_factory, device, trace):
    """The same trace twice on fresh backends gives bit-identical outputs."""
    t = trace.draw(traces(device.type, fork_weight=_forks(backend_factory)), label="trace")
    first = replay(t, backend_factory, device, ReplayOptions(compare_outputs=False), keep_outputs=True)
    second = replay(t, backend_factory, device, ReplayOptions(compare_outputs=False), keep_outputs=True)
    for i, (a, b) in enumerate(zip(first.outputs, second.outputs)):
        if not torch.equal(a, b):
            raise ConformanceError(f"output {i} differs between two runs of the same trace "
                                   f"(max diff {float((a.double() - b.double()).abs().max()):.3g})")
    record("determinism", first)


@pytest.mark.check("stateful")
def test_stateful(backend_factory, device):
    """A RuleBasedStateMachine over admit / step / fork / finish with every check as an invariant."""
    from hypothesis import settings
    from hypothesis.stateful import run_state_machine_as_test

    from conformance.stateful import machine_for

    steps = 200 if active_profile() == "soak" else 12
    run_state_machine_as_test(machine_for(backend_factory, device),
                              settings=settings(settings.default, stateful_step_count=steps))
