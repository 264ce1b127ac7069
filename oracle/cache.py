"""ContiguousOracle: one growing K/V tensor per sequence and layer, attention in float64.

The reference every backend is checked against. It serves the same contract as `paged.PagedKVCache`
(admit, fork, finish, plan, run, memory, snapshot) and raises the same kinds of exception (its own classes,
`oracle.errors`: it imports nothing from the backends it judges), but stores each sequence
contiguously (a fork copies its parent's tensors) and computes attention with plain matmul + softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from oracle import checks
from oracle.attention import reference_attention


@dataclass(frozen=True)
class ContiguousMemory:
    """What the oracle holds: the contract's memory figures (field names as every backend reports them)."""

    live_sequences: int
    tokens_stored: int
    slots_reserved: int
    waste_slots: int
    capacity_slots: int | None
    bytes_per_slot: int
    page_size: None = None
    total_pages: None = None
    pages_in_use: None = None
    free_pages: None = None

    @property
    def waste_fraction(self) -> float:
        return self.waste_slots / self.slots_reserved if self.slots_reserved else 0.0

    @property
    def bytes_reserved(self) -> int:
        return self.slots_reserved * self.bytes_per_slot


@dataclass
class _Sequence:
    length: int = 0
    k: list[torch.Tensor] = field(default_factory=list)   # per layer (S, Hkv, D), stored in the cache dtype
    v: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Step:
    seq_ids: tuple
    q_lens: tuple[int, ...]
    start_lens: tuple[int, ...]
    mask_mod: object
    score_mod: object
    layers_run: set = field(default_factory=set)


class ContiguousOracle:
    """The reference cache: contiguous per-sequence storage, float64 attention.

    Args:
        spec: the same cache spec the backend gets (any object with num_layers, num_kv_heads, head_dim,
            max_seq_len, dtype, device; the oracle reads nothing else); `max_seq_len` is what a contiguous cache reserves per
            sequence (page_size and num_pages are not used for storage).
        compute_dtype: float64 for the golden answer; the cache dtype gives the plain same-dtype reference
            that the correctness policy compares against.
    """

    def __init__(self, spec, *, compute_dtype: torch.dtype = torch.float64) -> None:
        self.spec = spec
        self.compute_dtype = compute_dtype
        self._seqs: dict[Hashable, _Sequence] = {}
        self._step: _Step | None = None

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def _get(self, seq_id: Hashable) -> _Sequence:
        return checks.live_entry(self._seqs, seq_id)

    def _empty(self) -> torch.Tensor:
        s = self.spec
        return torch.empty(0, s.num_kv_heads, s.head_dim, dtype=s.dtype, device=s.device)

    def admit(self, seq_id: Hashable) -> None:
        checks.new_id(self._seqs, seq_id)
        self._step = None
        layers = range(self.spec.num_layers)
        self._seqs[seq_id] = _Sequence(0, [self._empty() for _ in layers], [self._empty() for _ in layers])

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        parent = self._get(parent_id)
        checks.new_id(self._seqs, child_id)
        self._step = None
        self._seqs[child_id] = _Sequence(parent.length, [t.clone() for t in parent.k], [t.clone() for t in parent.v])

    def finish(self, seq_id: Hashable) -> None:
        self._get(seq_id)
        self._step = None
        del self._seqs[seq_id]

    def plan(self, seq_ids: Sequence[Hashable], q_lens: Sequence[int], *, mask_mod=None, score_mod=None) -> _Step:
        """Validate one step and commit the new lengths; `run` then stores K/V and attends, layer by layer."""
        seq_ids, q_lens = checks.step(self.length, self._seqs, seq_ids, q_lens, self.spec.max_seq_len,
                                      (mask_mod, score_mod))
        start = tuple(self._seqs[s].length for s in seq_ids)
        for s, q in zip(seq_ids, q_lens):
            self._seqs[s].length += q
        self._step = _Step(seq_ids, q_lens, start, mask_mod, score_mod)
        return self._step

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Append each row's new K/V to its sequence's layer tensors and attend (shapes as PagedKVCache.run).

        Returns (B, Lq, Hq, D) in compute_dtype; positions past a row's q_len are 0.
        """
        step, spec = self._step, self.spec
        checks.layer_call(spec, step is not None, step.layers_run if step else set(), layer, scale)
        checks.tensors(spec, len(step.seq_ids), max(step.q_lens), q, k, v)
        B = len(step.seq_ids)
        step.layers_run.add(layer)
        out = torch.zeros(B, q.shape[1], q.shape[2], spec.head_dim, dtype=self.compute_dtype, device=q.device)
        for b, (s, n, start) in enumerate(zip(step.seq_ids, step.q_lens, step.start_lens)):
            seq = self._seqs[s]
            seq.k[layer] = torch.cat([seq.k[layer], k[b, :n]])                  # (start + n, Hkv, D)
            seq.v[layer] = torch.cat([seq.v[layer], v[b, :n]])
            out[b, :n] = reference_attention(q[b, :n], seq.k[layer], seq.v[layer], start, b, scale=scale,
                                             mask_mod=step.mask_mod, score_mod=step.score_mod,
                                             compute_dtype=self.compute_dtype)
        return out

    def memory(self) -> ContiguousMemory:
        """A contiguous cache reserves max_seq_len per live sequence; everything past its length is waste."""
        live = len(self._seqs)
        stored = sum(s.length for s in self._seqs.values())
        reserved = live * self.spec.max_seq_len
        return ContiguousMemory(live_sequences=live, tokens_stored=stored, slots_reserved=reserved,
                           waste_slots=reserved - stored, capacity_slots=None,
                           bytes_per_slot=self._bytes_per_token())

    def _bytes_per_token(self) -> int:
        """K and V of one token over every layer."""
        s = self.spec
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.empty((), dtype=s.dtype).element_size()

    def snapshot(self) -> dict:
        return {s: (seq.length, [t.cpu().clone() for t in seq.k], [t.cpu().clone() for t in seq.v])
                for s, seq in self._seqs.items()}
