"""The oracle's own statement of position semantics: which keys a query sees, and how scores are adjusted.

Each rule is a small frozen dataclass that is also callable with FlexAttention's mod signature
(`mask(b, h, q_pos, kv_pos) -> bool`, `score(score, b, h, q_pos, kv_pos) -> score`) over broadcast index
tensors in LOGICAL positions (0 = a sequence's first token). They are written here, independently of the
backend's `paged.mods`, so the judge shares no code with what it judges; each one's truth table is pinned by
`tests/test_oracle_rules.py`. Score rules compute in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Causal:
    """Query at position q sees the keys at positions 0..q."""

    def __call__(self, b, h, q_pos, kv_pos):
        return kv_pos <= q_pos


@dataclass(frozen=True)
class SlidingWindow:
    """Query at q sees keys q - window + 1 .. q (the query itself counts as one of the `window`)."""

    window: int

    def __call__(self, b, h, q_pos, kv_pos):
        return (kv_pos <= q_pos) & (kv_pos > q_pos - self.window)


@dataclass(frozen=True)
class PrefixLM:
    """Every query sees the first `prefix_len` stored keys (in both directions), and causally after them."""

    prefix_len: int

    def __call__(self, b, h, q_pos, kv_pos):
        return (kv_pos < self.prefix_len) | (kv_pos <= q_pos)


@dataclass(frozen=True)
class ALiBi:
    """Score of head h (of num_heads) plus slope_h * (kv - q), slope_h = 2 ** (-8 * (h + 1) / num_heads)."""

    num_heads: int

    def slopes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / self.num_heads) for i in range(self.num_heads)],
                            dtype=torch.float64, device=device)

    def __call__(self, score, b, h, q_pos, kv_pos):
        distance = (kv_pos - q_pos).to(torch.float64)
        return score.to(torch.float64) + self.slopes(score.device)[h] * distance


@dataclass(frozen=True)
class SoftCap:
    """Logit soft cap: cap * tanh(score / cap)."""

    cap: float

    def __call__(self, score, b, h, q_pos, kv_pos):
        return self.cap * torch.tanh(score.to(torch.float64) / self.cap)
