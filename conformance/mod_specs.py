"""Attention modifications in traces, as data that the backend side and the oracle side interpret separately.

A trace step carries a `ModSpec`, e.g. `("sliding_window", 5)`, `("prefix_lm", 6)`, `("alibi",)`,
`("soft_cap", 2.0)`. `backend_mods` turns it into the backend's FlexAttention mods (`paged.mods`);
`oracle_mods` into the oracle's own rules (`oracle.rules`), written without the backend's code. So a wrong
mask or rule in either shows up as a mismatch instead of being applied identically on both sides.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from oracle import rules
from paged import mods

ModSpec = tuple  # (kind,) or (kind, parameter)

KINDS = ("sliding_window", "prefix_lm", "alibi", "soft_cap")

#: Profile names (conformance.profiles.TraceLimits.mods) -> their description.
NAMED = {"sliding_window_5": ("sliding_window", 5), "prefix_lm_6": ("prefix_lm", 6), "alibi": ("alibi",),
         "soft_cap_2": ("soft_cap", 2.0)}


def parse(name_or_spec: str | ModSpec) -> ModSpec:
    """A profile's mod name (or a ModSpec already) as a ModSpec; ValueError for anything unknown."""
    spec = NAMED.get(name_or_spec, name_or_spec) if isinstance(name_or_spec, str) else tuple(name_or_spec)
    if not isinstance(spec, tuple) or not spec or spec[0] not in KINDS:
        raise ValueError(f"unknown attention modification {name_or_spec!r}; known kinds: {', '.join(KINDS)}")
    return spec


@lru_cache(maxsize=None)
def backend_mods(spec: ModSpec | None, num_q_heads: int) -> tuple[Callable | None, Callable | None]:
    """(mask_mod, score_mod) from `paged.mods` for the backend under test. Cached: the same objects every step."""
    if spec is None:
        return None, None
    kind, *arg = spec
    if kind == "sliding_window":
        return mods.sliding_window(arg[0]), None
    if kind == "prefix_lm":
        return mods.prefix_lm(arg[0]), None
    if kind == "alibi":
        return None, mods.alibi(num_q_heads)
    return None, mods.soft_cap(arg[0])


def oracle_mods(spec: ModSpec | None, num_q_heads: int) -> tuple[Callable | None, Callable | None]:
    """(mask rule, score rule) from `oracle.rules`, for the oracles that judge."""
    if spec is None:
        return None, None
    kind, *arg = spec
    if kind == "sliding_window":
        return rules.SlidingWindow(arg[0]), None
    if kind == "prefix_lm":
        return rules.PrefixLM(arg[0]), None
    if kind == "alibi":
        return None, rules.ALiBi(num_q_heads)
    return None, rules.SoftCap(float(arg[0]))
