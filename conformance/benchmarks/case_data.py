"""A case's data, the same for every backend: stored contexts, the step's new tokens, and their size."""

from __future__ import annotations

import torch

from conformance.benchmarks.grid import Case
from conformance.benchmarks.pools import DTYPES


def seq_kv(case: Case, index: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored context of sequence `index`: K, V (length, Hkv, D), N(0, 1), seeded by case and sequence."""
    gen = torch.Generator(device=device).manual_seed(case.seed * 7919 + index)
    kv = torch.randn(2, length, case.hkv, case.head_dim, generator=gen, device=device, dtype=torch.float32)
    dt = DTYPES[case.dtype]
    return kv[0].to(dt), kv[1].to(dt)


def step_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's new tokens: q (B, C, Hq, D), k and v (B, C, Hkv, D)."""
    gen = torch.Generator(device=device).manual_seed(case.seed + 1)
    B, C, D = case.batch, case.q_len, case.head_dim
    dt = DTYPES[case.dtype]
    q = torch.randn(B, C, case.hq, D, generator=gen, device=device).to(dt)
    k = torch.randn(B, C, case.hkv, D, generator=gen, device=device).to(dt)
    v = torch.randn(B, C, case.hkv, D, generator=gen, device=device).to(dt)
    return q, k, v


def kv_bytes(case: Case, lens: list[int]) -> int:
    """K/V bytes the step reads at least once: sum over sequences of (len after the step) * Hkv * D * 2 * itemsize."""
    item = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return sum(n + case.q_len for n in lens) * case.hkv * case.head_dim * 2 * item
