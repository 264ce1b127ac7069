"""What every attention kernel of `paged.kernels` is handed, and what it hands back.

A step is planned in two halves: `PagedKVCache.plan()` does the page bookkeeping (pages handed out, each row's
page-table row, lengths and slots written into the bucket's `StepBuffers`), describes the result as a
`StepLayout`, and asks the step's kernel (`paged.kernels.choose`) for its `KernelPlan`:

    kernel_plan = kernel.plan(layout, buffers)          # fills the kernel's own fields, sends the buffers
    out = kernel.run(step_plan, layer, q, k, v, pools, scale)   # per layer; kernel_plan is step_plan.kernel_plan

`run` takes the whole StepPlan (its kernel part is `step_plan.kernel_plan`) so that the page bookkeeping fields
every kernel may read (slots, token rows, buffers, batch) have one home.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Hashable, Literal, NamedTuple

import torch

from paged.mods import MaskMod, ScoreMod
from paged.spec import CacheSpec


@dataclass(frozen=True)
class KernelSettings:
    """A cache's kernel choices, fixed at construction (see `PagedKVCache`'s arguments of the same names)."""

    spec: CacheSpec
    attention: Literal["compiled", "eager"]
    kernel_options: dict | None
    decode_full_blocks: bool | Literal["auto"]
    check_ownership: bool | Literal["auto"]


class Pools(NamedTuple):
    """The cache's device state the kernels read and write.

    k, v: (num_layers, Hkv, N * P, D) the K/V pools; page_logical: (N,) int32 logical index of each physical page
    (-1 when free); k_layers, v_layers: each layer's (1, Hkv, N * P, D) view, made once (a view costs host time).
    """

    k: torch.Tensor
    v: torch.Tensor
    page_logical: torch.Tensor
    k_layers: tuple[torch.Tensor, ...]
    v_layers: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, page_logical: torch.Tensor) -> "Pools":
        return cls(k, v, page_logical, tuple(k.split(1)), tuple(v.split(1)))


@dataclass(frozen=True)
class StepLayout:
    """One step after its page bookkeeping, as a kernel's `plan()` sees it (host values).

    Attributes:
        settings: the cache's kernel settings.
        page_logical: (N,) int32 device table of each physical page's logical index (for mask wrappers).
        seq_ids, q_lens, start_lens: the step's rows: ids, new tokens, lengths before the step.
        mask_mod, score_mod: the step's logical mods, or None.
    The bucket's host buffers already hold q_start, q_len, page_table, slots, token_rows, new_pages/new_logical.
    """

    settings: KernelSettings
    page_logical: torch.Tensor
    seq_ids: tuple[Hashable, ...]
    q_lens: tuple[int, ...]
    start_lens: tuple[int, ...]
    mask_mod: MaskMod | None
    score_mod: ScoreMod | None

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens)


class KernelPlan:
    """Base of a kernel's plan of one step. Subclasses name their kernel and carry what their `run` reads.

    `run(step_plan, layer, q, k, v, pools, scale)` is the kernel module's run, bound as a method so the cache
    dispatches with one attribute lookup.
    """

    name: ClassVar[str] = "?"
    run: ClassVar[Callable[..., torch.Tensor]]
