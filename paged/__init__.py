"""paged: a paged KV cache attended by FlexAttention.

Public API:
    CacheSpec       the cache's shape (layers, kv heads, head dim, page size, pool size, max length, dtype, device)
    PagedKVCache    admit / fork / finish sequences, plan() once per step, run() once per layer, memory()
    PageAllocator   reference-counted pages with swappable placement policies (POLICIES)
    MemoryStats     pages in use, tokens stored, waste
    mods            attention modifications in logical positions (causal, sliding_window, alibi, soft_cap, ...)
    errors          PagedError and its subclasses
    graphs          GraphedStep: one CUDA graph of a step's layers, replayed after each plan() (import paged.graphs)
"""

from paged import mods
from paged.allocator import POLICIES, PageAllocator, PlacementPolicy
from paged.cache import PagedKVCache
from paged.errors import (DuplicateSequenceError, InvalidRequestError, OutOfPagesError, PagedError, PlanError,
                          SequenceTooLongError, UnknownSequenceError, UnsupportedConfigError)
from paged.plan import StepPlan
from paged.spec import CacheSpec
from paged.stats import MemoryStats

__all__ = [
    "CacheSpec", "PagedKVCache", "PageAllocator", "PlacementPolicy", "POLICIES", "MemoryStats", "StepPlan", "mods",
    "PagedError", "OutOfPagesError", "UnknownSequenceError", "DuplicateSequenceError", "InvalidRequestError",
    "SequenceTooLongError", "UnsupportedConfigError", "PlanError",
]
__version__ = "0.1.0"
