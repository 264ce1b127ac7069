"""The fixed K/V pool of a page size / head layout that every pool backend of a benchmark case uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conformance.benchmarks.grid import Case
from conformance.benchmarks.harness import BenchSettings
from paged import CacheSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: CPU: a small fixed pool (the CPU kernel's block lists span the whole pool) and a short max length.
CPU_POOL_PAGES = 256
CPU_MAX_SEQ_LEN = 1024
#: GPU: every case's context + new tokens must fit; fixed so that the page-table width (a graph input shape)
#: is the same for every case of a pool.
GPU_MAX_SEQ_LEN = 32768 + 1024


@dataclass(frozen=True)
class PoolConfig:
    page: int
    hq: int
    hkv: int
    head_dim: int
    dtype: torch.dtype
    num_pages: int
    max_seq_len: int
    device: torch.device
    capped: bool = False

    def spec(self, num_pages: int | None = None) -> CacheSpec:
        return CacheSpec(num_layers=1, num_kv_heads=self.hkv, head_dim=self.head_dim, page_size=self.page,
                         num_pages=num_pages or self.num_pages, max_seq_len=self.max_seq_len, dtype=self.dtype,
                         device=self.device)

    @property
    def over_int32(self) -> bool:
        """A pool tensor holds more elements than a 32-bit index reaches (only with --bench-pool-uncapped)."""
        return self.num_pages * self.page * self.hkv * self.head_dim > 2**31 - 1

    @property
    def bytes(self) -> int:
        """K + V bytes of one pool."""
        return 2 * self.num_pages * self.page * self.hkv * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def pool_config(settings: BenchSettings, page: int, hq: int, hkv: int, head_dim: int,
                dtype: str | torch.dtype = "bfloat16") -> PoolConfig:
    """The fixed pool of a page size / head layout: a fraction of the card's memory on CUDA, small on CPU."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    dev = settings.device
    if not settings.cuda:
        return PoolConfig(page, hq, hkv, head_dim, dt, CPU_POOL_PAGES, CPU_MAX_SEQ_LEN, dev)
    item = torch.empty((), dtype=dt).element_size()
    total = torch.cuda.get_device_properties(dev).total_memory
    pages = int(settings.pool_fraction * total) // (2 * page * hkv * head_dim * item)
    # Keep each pool tensor under 2**31 elements: kernels may index it with 32-bit offsets (unless uncapped).
    limit = (2**31 - 1) // (page * hkv * head_dim)
    if settings.pool_uncapped:
        limit = max(limit, pages)
    capped = pages > limit
    pages = max(min(pages, limit), math.ceil(GPU_MAX_SEQ_LEN / page))
    return PoolConfig(page, hq, hkv, head_dim, dt, pages, GPU_MAX_SEQ_LEN, dev, capped)


def case_pool(settings: BenchSettings, case: Case) -> PoolConfig:
    return pool_config(settings, case.page, case.hq, case.hkv, case.head_dim, case.dtype)
