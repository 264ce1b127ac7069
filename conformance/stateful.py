"""A Hypothesis RuleBasedStateMachine driving a backend and the oracle side by side.

Rules are the engine's operations; after every rule the invariants check memory against the page model
(paging backends) and every output has already been compared with the oracle by the step rules.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from conformance import budget
from conformance.contract import BackendFactory
from conformance.profiles import limits
from conformance.runner import ConformanceError, ReplayOptions, SideBySide, _check_memory
from conformance.traces import Admit, Finish, Fork, Step, Trace, configs


class _Rules(RuleBasedStateMachine):
    """The rules and invariants, bound to a backend by `machine_for` (which adds the initial rule and `factory`)."""

    seqs = Bundle("seqs")
    factory: BackendFactory

    def __init__(self) -> None:
        super().__init__()
        self.run: SideBySide | None = None
        self.next_id = 0

    def _live(self):
        return sorted(self.run.model.seqs)

    @rule(target=seqs)
    def admit(self):
        seq, self.next_id = self.next_id, self.next_id + 1
        self.run.apply(Admit(seq))
        return seq

    @precondition(lambda self: self.factory.has("fork"))
    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        if parent not in self.run.model.seqs:
            return self.admit()
        child, self.next_id = self.next_id, self.next_id + 1
        self.run.apply(Fork(parent, child))
        return child

    @rule(seq=consumes(seqs))
    def finish(self, seq):
        if seq in self.run.model.seqs:
            self.run.apply(Finish(seq))

    @rule(data=st.data())
    def step(self, data):
        lim, model = limits(), self.run.model
        max_len = self.run.trace.config.max_seq_len
        room = [s for s in self._live() if model.length(s) < max_len]
        if not room:
            return
        members = data.draw(st.lists(st.sampled_from(room), min_size=1, max_size=lim.max_batch, unique=True))
        q_lens = [min(max_len - model.length(s), data.draw(st.sampled_from([1, 1, lim.max_chunk]) |
                                                           st.integers(1, lim.max_chunk))) for s in members]
        self.run.apply(Step(tuple(members), tuple(q_lens)))

    @invariant()
    def memory_matches_model(self):
        if self.run is not None and self.run.opts.check_memory:
            _check_memory("a rule", self.run.backend, self.run.model)

    def teardown(self):
        if self.run is not None:
            self.run.finish_all()
            budget.after_trace()   # the machine's run is complete: under a time budget the check may end here


def machine_for(factory: BackendFactory, device: torch.device) -> type[RuleBasedStateMachine]:
    """A state machine class bound to one backend factory and device."""

    class PagedCacheMachine(_Rules):
        @initialize(config=configs(device.type), seed=st.integers(0, 2**31 - 1))
        def start(self, config, seed):
            trace = Trace(config, (), seed)
            self.run = SideBySide(trace, factory, device, ReplayOptions(check_memory=factory.has("paging")))

    PagedCacheMachine.factory = factory
    return PagedCacheMachine


__all__ = ["machine_for", "ConformanceError"]
