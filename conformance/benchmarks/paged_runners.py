"""The runners over a plan/run paged backend: `paged` (and its FlexAttention-decode twin) and torch's PagedAttention peer."""

from __future__ import annotations

import math
import os
import random

import torch

from conformance.benchmarks.grid import Case
from conformance.benchmarks.harness import BenchSettings
from conformance.benchmarks.pools import PoolConfig
from conformance.benchmarks.runner import Runner, Unavailable, fill_plans, slots_of
from paged import PagedKVCache
from paged.kernels import choose, decode_kernel

#: Max batch rows of the peer's page table (a graph input shape): the grid's largest batch.
PEER_MAX_BATCH = 128


class PagedRunner(Runner):
    name = "paged"
    decode_kernel = "auto"

    def __init__(self, case: Case, lens: list[int], pool: PoolConfig, settings: BenchSettings):
        # The kernel the cache will run this case's step on: the same choice as the cache's (paged.kernels).
        kernel = choose(decode_kernel(self.decode_kernel, "compiled", settings.device), case.q_len)
        if pool.over_int32 and not kernel.LARGE_POOLS:
            raise Unavailable(f"the {kernel.NAME} kernel is not run over a pool of more than 2**31 elements")
        self.case, self.page = case, case.page
        # PAGED_BENCH_DECODE_FULL_BLOCKS=1 / 0 / auto overrides PagedKVCache's decode_full_blocks (see its docstring).
        layout = os.environ.get("PAGED_BENCH_DECODE_FULL_BLOCKS", "")
        layout_kw = {"decode_full_blocks": {"1": True, "0": False}.get(layout, layout)} if layout else {}
        # PAGED_BENCH_CHECK_OWNERSHIP=1 / 0 / auto overrides PagedKVCache's check_ownership (see its docstring):
        # 1 checks page ownership in the compiled mask too (the default before "auto").
        check_env = os.environ.get("PAGED_BENCH_CHECK_OWNERSHIP", "auto")
        check = {"1": True, "0": False}.get(check_env, check_env)
        self.cache = PagedKVCache(pool.spec(), policy="random", seed=case.seed, kernel_options=settings.kernel_options,
                                  check_ownership=check, decode_kernel=self.decode_kernel, **layout_kw)
        ids = list(range(case.batch))
        for i in ids:
            self.cache.admit(i)
        fill_plans(self.cache, ids, lens, 4096)
        self.plan = self.cache.plan(ids, [case.q_len] * case.batch)

    def fill(self, b: int, K: torch.Tensor, V: torch.Tensor) -> None:
        pages = torch.tensor(self.cache.pages(b), device=K.device)
        s = slots_of(pages, K.shape[0], self.page)
        self.cache.k_pool[0][:, s] = K.transpose(0, 1)
        self.cache.v_pool[0][:, s] = V.transpose(0, 1)

    def step(self, q, k, v):
        return self.cache.run(0, q, k, v)

    def rearm(self) -> None:
        # Run the same step again: the cache allows each layer once per plan; the rerun rewrites the same
        # slots with the same K/V and attends over the same state.
        self.plan.layers_run.clear()


class PagedFlexRunner(PagedRunner):
    name = "pagedflex"
    decode_kernel = "flex"

    def __init__(self, case: Case, lens: list[int], pool: PoolConfig, settings: BenchSettings):
        if not settings.cuda or case.kind != "decode":
            raise Unavailable("pagedflex differs from paged only in decode steps on CUDA")
        super().__init__(case, lens, pool, settings)


class TorchPARunner(Runner):
    name = "torchpa"

    def __init__(self, case: Case, lens: list[int], pool: PoolConfig, settings: BenchSettings):
        if pool.over_int32:
            raise Unavailable("FlexAttention is not run over a pool of more than 2**31 elements")
        try:
            from conformance.peers.torch_paged import TorchPagedAttentionBackend
        except Exception as exc:  # the peer adapter is written concurrently; skip it when it does not import
            raise Unavailable(f"peer adapter conformance.peers.torch_paged does not import: {exc!r}") from exc
        self.case, self.page = case, case.page
        attention = "compiled" if settings.cuda else "eager"
        self.backend = TorchPagedAttentionBackend(pool.spec(), attention=attention,
                                                  max_batch_size=max(PEER_MAX_BATCH, case.batch),
                                                  kernel_options=settings.kernel_options)
        random.Random(case.seed).shuffle(self.backend.peer.empty_pages)   # pages at random, like `paged`
        ids = list(range(case.batch))
        for i in ids:
            self.backend.admit(i)
        fill_plans(self.backend, ids, lens, 512)
        self.plan = self.backend.plan(ids, [case.q_len] * case.batch)

    def fill(self, b: int, K, V) -> None:
        row = self.backend.row(b)
        n_pages = math.ceil(K.shape[0] / self.page)
        pages = self.backend.peer.page_table[row, :n_pages]
        s = slots_of(pages, K.shape[0], self.page)
        self.backend.k_pool[0][:, s] = K.transpose(0, 1)
        self.backend.v_pool[0][:, s] = V.transpose(0, 1)

    def step(self, q, k, v):
        return self.backend.run(0, q, k, v)

    def rearm(self) -> None:
        self.plan.layers_run.clear()
