"""The attention kernels of the paged cache, one module each, and the one place where a step's kernel is chosen.

A kernel module provides:
    NAME: str                     its name ("flex", "triton"), also `StepPlan.kernel`
    LARGE_POOLS: bool             whether it runs over pools of more than 2**31 elements
    PADDED_BATCH: bool            whether run() also takes inputs of the bucket's padded batch
    FUSED_STORE: bool             whether run() stores the new K/V itself (plan() then never sends slots /
                                  token_rows, and the step's `slot_mapping` / `token_rows` are the host twins)
    plan(layout: StepLayout, buffers: StepBuffers) -> KernelPlan
                                  per step, after the cache's page bookkeeping: fills the kernel's fields of the
                                  bucket's host buffers, sends them, returns its typed plan (whose `run` is the
                                  module's run)
    run(step: StepPlan, layer, q, k, v, pools: Pools, scale) -> Tensor
                                  per layer, on inputs the cache validated
    step_fields(padded_batch, padded_q_len, spec) -> [(name, shape, dtype, fill)]     (optional, Triton kernels)
                                  the kernel's own per-step device fields, packed into every bucket's StepBuffers
                                  (so a step still costs one host->device copy); plan() fills `packed.host_np[name]`;
                                  the cache asks `step_fields` here (its decode kernel's, and its mixed kernel's)
Kernels: `flex` (FlexAttention: every step), `triton_decode` (plain causal decode steps, compiled attention),
`triton_mixed` (causal steps with history and more than one new token in some row, i.e. mixed prefill+decode and
later prefill chunks, in a cache whose decode kernel is `triton_decode`), `sdpa_prefill` (fresh causal prefill steps,
every row empty before the step, compiled attention). A further kernel is a module here plus its case in `choose`
(and a chooser like `decode_kernel`, if users may ask for it by name). The Triton kernels import Triton, so they
are imported only where they may run.
"""

from __future__ import annotations

from types import ModuleType

import torch

from paged.errors import UnsupportedConfigError
from paged.kernels import flex, sdpa_prefill
from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.mods import MaskMod, ScoreMod
from paged.spec import CacheSpec

__all__ = ["KernelPlan", "KernelSettings", "Pools", "StepLayout", "choose", "decode_kernel", "flex", "mixed_kernel",
           "prefill_kernel", "sdpa_prefill", "step_fields"]

DECODE_KERNELS = ("auto", "flex", "triton")
PREFILL_KERNELS = ("auto", "flex", "sdpa")


def _triton() -> ModuleType:
    from paged.kernels import triton_decode  # imports Triton: only where it may run

    return triton_decode


def mixed_kernel(decode: ModuleType) -> ModuleType | None:
    """The kernel module of a cache's mixed steps (more than one new token in some row, history in some row, no
    mods): `triton_mixed` beside the Triton decode kernel (which already settled that Triton runs here), else None
    (FlexAttention)."""
    if decode.NAME != "triton":
        return None
    from paged.kernels import triton_mixed  # imports Triton: only where it may run

    return triton_mixed


def step_fields(decode: ModuleType, padded_batch: int, padded_q_len: int, spec: CacheSpec) -> list[tuple]:
    """The kernels' own per-step device fields of a (padded batch, padded query length) bucket of a cache whose
    decode kernel is `decode`: the decode kernel's and the mixed kernel's `step_fields` (each empty for the other's
    buckets), for `StepBuffers`."""
    fields = []
    for kernel in (decode, mixed_kernel(decode)):
        of = getattr(kernel, "step_fields", None)
        if of is not None:
            fields += of(padded_batch, padded_q_len, spec)
    return fields


def decode_kernel(choice: str, attention: str, device: torch.device) -> ModuleType:
    """The kernel module of a cache's plain decode steps (one new token per row, no mods).

    Args:
        choice: "flex", "triton" or "auto" ("triton" on CUDA with compiled attention where Triton imports, else
            "flex"; the CPU's interpreter is never a default).
        attention: the cache's "compiled" or "eager".
    Raises UnsupportedConfigError for an unknown choice or one that cannot run here.
    """
    if choice not in DECODE_KERNELS:
        raise UnsupportedConfigError(f"decode_kernel must be 'auto', 'flex' or 'triton', got {choice!r}")
    if choice == "flex" or (choice == "auto" and (attention != "compiled" or device.type != "cuda")):
        return flex
    triton_decode = _triton()
    if choice == "auto":
        return triton_decode if triton_decode.available(device) else flex
    if attention != "compiled":
        raise UnsupportedConfigError("decode_kernel='triton' needs attention='compiled' (eager is FlexAttention's "
                                     "mask_mod-only reference path)")
    if not triton_decode.available(device):
        hint = ("Triton is not installed" if triton_decode.triton is None else
                "on the CPU it runs only under Triton's interpreter: set TRITON_INTERPRET=1 before Python starts")
        raise UnsupportedConfigError(f"decode_kernel='triton' cannot run on {device}: {hint}")
    return triton_decode


def prefill_kernel(choice: str, attention: str) -> ModuleType:
    """The kernel module of a cache's fresh prefill steps (every row empty before the step, causal, no mods).

    Args:
        choice: "flex", "sdpa" or "auto" ("sdpa" with compiled attention, else "flex": eager is FlexAttention's
            mask_mod-only reference path).
        attention: the cache's "compiled" or "eager".
    Raises UnsupportedConfigError for an unknown choice or one that cannot run here.
    """
    if choice not in PREFILL_KERNELS:
        raise UnsupportedConfigError(f"prefill_kernel must be 'auto', 'flex' or 'sdpa', got {choice!r}")
    if choice == "sdpa" and attention != "compiled":
        raise UnsupportedConfigError("prefill_kernel='sdpa' needs attention='compiled' (eager is FlexAttention's "
                                     "mask_mod-only reference path)")
    if choice == "sdpa" or (choice == "auto" and attention == "compiled"):
        return sdpa_prefill
    return flex


def choose(decode: ModuleType, max_q_len: int, mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,
           *, prefill: ModuleType = flex, fresh: bool = False) -> ModuleType:
    """The kernel module of one step: `decode` (from `decode_kernel`) for a plain causal decode step (every row one
    new token, no mods), `prefill` (from `prefill_kernel`) for a `fresh` step (every row empty before it) with more
    than one new token and no mods, `mixed_kernel(decode)` for any other step without mods (Triton's mixed kernel
    beside Triton's decode kernel), FlexAttention for everything else."""
    if mask_mod is None and score_mod is None:
        if max_q_len == 1:
            return decode
        if fresh:
            return prefill
        mixed = mixed_kernel(decode)
        if mixed is not None:
            return mixed
    return flex
