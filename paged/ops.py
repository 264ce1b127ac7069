"""`torch.ops.paged.attend`: one layer's `PagedKVCache.run` as a PyTorch custom op, so torch.compile can trace it.

A model that attends through the cache cannot be traced as it is: `run()` keeps Python state (the current plan,
the layers already run), which dynamo would guard on and recompile for every step. As a custom op the cache is
opaque to the compiler: the traced graph holds one `paged.attend` call per layer, with the cache named by a small
integer handle, and the op's real body, `cache.run`, runs (or is captured into a CUDA graph) as it is.

    handle = register(cache)                       # once per cache
    out = torch.ops.paged.attend(q, k, v, layer, handle, None)   # == cache.run(layer, q, k, v)

The op declares no mutated arguments although it writes the new K/V into the cache's pools: the pools are never
inputs of the traced graph (only the handle is), so no functionalisation copies them, and nothing else in the
graph reads them; each layer's call depends on the previous layer's output, which keeps the calls in order.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from paged.cache import PagedKVCache
from paged.errors import PlanError

__all__ = ["attend", "register"]

_caches: "weakref.WeakValueDictionary[int, PagedKVCache]" = weakref.WeakValueDictionary()
_handles: "weakref.WeakKeyDictionary[PagedKVCache, int]" = weakref.WeakKeyDictionary()
_next = itertools.count(1)


def register(cache: PagedKVCache) -> int:
    """The cache's handle for `paged.attend` (the same handle every call; the op never keeps the cache alive)."""
    if cache not in _handles:
        handle = next(_next)
        _handles[cache], _caches[handle] = handle, cache
    return _handles[cache]


def _cache(handle: int) -> PagedKVCache:
    cache = _caches.get(handle)
    if cache is None:
        raise PlanError(f"paged.attend: no live cache has handle {handle} (register it with paged.ops.register)")
    return cache


@torch.library.custom_op("paged::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: int,
           scale: float | None = None) -> torch.Tensor:
    """`PagedKVCache.run(layer, q, k, v, scale=scale)` of the cache with handle `cache`.

    q (B, Lq, Hq, D), k/v (B, Lq, Hkv, D) -> (B, Lq, Hq, D), contiguous (the traced graph assumes the fake's
    strides). B may be the plan's padded batch on a Triton decode step (`PagedKVCache.run`).
    """
    return _cache(cache).run(layer, q, k, v, scale=scale).contiguous()


@attend.register_fake
def _attend_fake(q, k, v, layer, cache, scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
