"""The contract every backend meets, as a structural `typing.Protocol`, and how a backend is described.

A backend is built from a `paged.CacheSpec` and serves a stream of requests against caller-chosen sequence
ids. Per step: `plan(seq_ids, q_lens)` once (reserve room, build whatever the step needs), then
`run(layer, q, k, v)` once per layer, which stores the new tokens' K/V and returns the new queries' attention
over everything their own sequence has stored (causal; GQA when Hq is a multiple of Hkv).

Failure is part of the contract: bad requests raise the `paged.errors` exception for their kind BEFORE any
state changes (`snapshot()` before and after must be equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence, runtime_checkable

import torch

from paged.spec import CacheSpec
from paged.stats import MemoryStats

#: Optional capabilities a backend may lack; checks that need one are skipped for backends without it.
CAPABILITIES = frozenset({
    "fork",          # fork(parent, child) with copy-on-write semantics
    "mods",          # user mask_mod / score_mod in logical positions
    "chunked_prefill",  # plan() with q_len > 1 for a sequence that already has tokens
    "mixed_steps",   # prefill chunks and decode tokens in one step
    "paging",        # memory() reports pages; fragmentation bounds apply
    "poison",        # poison_free_pages(value): isolation check by poisoning free memory
    "eager",         # an eager twin exists (make_eager) to compare against the compiled path
})


@runtime_checkable
class Backend(Protocol):
    """What the conformance suite drives. `paged.PagedKVCache` and `oracle.ContiguousOracle` satisfy it."""

    spec: CacheSpec

    def admit(self, seq_id: Hashable) -> None:
        """Start an empty sequence. DuplicateSequenceError if live."""

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start child_id with parent_id's history; later appends to either must not affect the other."""

    def finish(self, seq_id: Hashable) -> None:
        """End a sequence and return its memory at once. UnknownSequenceError if not live."""

    def plan(self, seq_ids: Sequence[Hashable], q_lens: Sequence[int], *, mask_mod: Callable | None = None,
             score_mod: Callable | None = None) -> Any:
        """Reserve room for q_lens[i] new tokens of seq_ids[i]; OutOfPagesError etc. leave state unchanged."""

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """q (B, Lq, Hq, D), k/v (B, Lq, Hkv, D) with row b's first q_lens[b] positions real -> (B, Lq, Hq, D)."""

    def memory(self) -> MemoryStats:
        """Pages/slots in use, tokens stored, capacity, waste."""

    def snapshot(self) -> Any:
        """A deep copy of all state (host and device), comparable with `conformance.snapshots.equal`."""


@dataclass(frozen=True)
class KnownDefect:
    """A known defect a check must find: reported as a strict expected failure, and only while the check fails
    with a conformance failure whose message matches `match` (a regex); a fix (the check passes) or a different
    failure is reported as a failure, never hidden."""

    reason: str
    match: str = ""

    @classmethod
    def of(cls, entry: "str | KnownDefect") -> "KnownDefect":
        return entry if isinstance(entry, KnownDefect) else cls(entry)


@dataclass(frozen=True)
class BackendFactory:
    """How the suite builds and judges one backend.

    Attributes:
        name: short name used on the command line and in reports.
        make: builds a fresh backend for a spec. May take keyword options (see `options`).
        capabilities: subset of CAPABILITIES the backend has.
        make_eager: builds the eager twin (capability "eager").
        expected_failures: check name -> KnownDefect (or just its reason), for known defects (reported as a strict
            xfail that must be a conformance failure matching the defect, never hidden).
        devices: device types the backend runs on.
    """

    name: str
    make: Callable[..., Backend]
    capabilities: frozenset[str] = CAPABILITIES
    make_eager: Callable[..., Backend] | None = None
    expected_failures: dict[str, "str | KnownDefect"] = field(default_factory=dict)
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    description: str = ""

    def has(self, capability: str) -> bool:
        return capability in self.capabilities
