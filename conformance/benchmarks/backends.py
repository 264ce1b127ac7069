"""The backends side by side on one benchmark case: same data, outputs cross-checked before any timing.

Backends (ids as they appear in benchmark names):

* ``paged``: `paged.PagedKVCache`, compiled FlexAttention, "random" page placement, one layer whose pool is
  sized for a real deployment (`BenchSettings.pool_fraction` of the card's memory; fixed per page size and
  head layout, so every case of that layout shares the pool shape and hence the compiled graphs).
* ``pagedflex``: ``paged`` with ``decode_kernel="flex"``: its decode steps on FlexAttention instead of the
  Triton decode kernel ``paged`` picks on CUDA (decode cases on CUDA only; elsewhere ``paged`` is FlexAttention).
* ``sdpa``: the contiguous baseline, what a user has without paging: a padded cache (B, Hkv, max_len, D)
  (max_len = the batch's longest sequence after the step, rounded up to 64) and
  `torch.nn.functional.scaled_dot_product_attention` with an additive length mask. GQA is expressed without
  copying K/V: the g = Hq / Hkv query heads of a kv head are laid out as g query rows of that head
  (enable_gqa=True together with a mask would drop to the unfused math kernel on CUDA).
* ``flexcontig``: compiled FlexAttention over the same padded contiguous cache as ``sdpa`` (max_len rounded up
  to 128, the KV block) with a causal-and-length block mask built once per case: what the paged kernel costs
  over FlexAttention without paging (issue 6, target 7, for a 4k prefill). Decode uses the same kernel
  options as ``paged``; prefill keeps torch's default tiles, which a contiguous cache allows (``paged``'s
  key tile must divide the page), so the prefill ratio includes that constraint.
* ``torchpa``: torch's private ``torch.nn.attention.experimental._paged_attention.PagedAttention`` through
  the peer adapter (`conformance.peers.torch_paged`), same pool size as ``paged``, its free list shuffled so
  that pages are placed at random too; compiled flex on CUDA, eager on the CPU (the CPU smoke run only checks
  the wiring; the adapter's compiled path is covered by the conformance suite). Skipped if it does not import.
* ``flashinfer``: ``flashinfer.BatchDecodeWithPagedKVCacheWrapper`` (NHD layout, same pool size, pages at
  random), planned once per case, `run` timed. Decode only; skipped where ``import flashinfer`` fails or on CPU.

Every backend's step stores the new tokens' K/V (ours and the peer's inside `run`; SDPA and FlashInfer with
one index_put each) and attends; the timed region is that step.

Correctness gate (before timing): every backend's output is compared with a float32 reference computed from
the same bf16 K/V on a few rows (first, last, longest), and with the SDPA baseline on all rows:
``max|out - ref| <= 0.02 * max|ref| + 1e-3`` (twice that between two bf16 backends). Why: bf16 keeps 8
significant bits, so rounding the output costs <= 0.4% of its size and the kernels' bf16 probabilities add
about as much again; a wrong length, page or head moves the output by a sizeable fraction of max|ref|.
"""

from __future__ import annotations

import gc
import math
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from conformance.benchmarks.grid import Case
from conformance.benchmarks.harness import BenchSettings, sync, unique_graphs
from paged import CacheSpec, PagedKVCache
from paged.attention import compiled_flex_attention, decode_kernel_defaults
from paged.kernels import choose, decode_kernel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BACKENDS = ("paged", "pagedflex", "sdpa", "flexcontig", "torchpa", "flashinfer")

#: CPU: a small fixed pool (the CPU kernel's block lists span the whole pool) and a short max length.
CPU_POOL_PAGES = 256
CPU_MAX_SEQ_LEN = 1024
#: GPU: every case's context + new tokens must fit; fixed so that the page-table width (a graph input shape)
#: is the same for every case of a pool.
GPU_MAX_SEQ_LEN = 32768 + 1024
#: Max batch rows of the peer's page table (a graph input shape): the grid's largest batch.
PEER_MAX_BATCH = 128

REL_TOL, ABS_TOL = 2e-2, 1e-3


class Unavailable(Exception):
    """A backend that cannot run here (not installed, wrong device, not offered for this kind of step)."""


# --------------------------------------------------------------------------------------------- pools
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


# --------------------------------------------------------------------------------------------- data
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


def reference_rows(case: Case, lens: list[int], rows: list[int], q, k, v, device) -> dict[int, torch.Tensor]:
    """float32 attention of the new queries of `rows` over their whole (bf16-stored) history: (C, Hq, D) each."""
    g, C = case.hq // case.hkv, case.q_len
    out = {}
    for b in rows:
        K, V = seq_kv(case, b, lens[b], device)
        K = torch.cat([K, k[b]]).float()                                     # (S, Hkv, D)
        V = torch.cat([V, v[b]]).float()
        qb = q[b].float().view(C, case.hkv, g, case.head_dim)                # (C, Hkv, g, D)
        scores = torch.einsum("chgd,shd->hgcs", qb, K) / math.sqrt(case.head_dim)
        pos = lens[b] + torch.arange(C, device=device)
        visible = torch.arange(K.shape[0], device=device)[None, :] <= pos[:, None]   # (C, S)
        scores = scores.masked_fill(~visible, float("-inf"))
        o = torch.einsum("hgcs,shd->chgd", scores.softmax(-1), V)
        out[b] = o.reshape(C, case.hq, case.head_dim)
    return out


def _slots(pages: torch.Tensor, n: int, page: int) -> torch.Tensor:
    t = torch.arange(n, device=pages.device)
    return pages.long()[t // page] * page + t % page


def _fill_plans(backend, ids: list[int], lens: list[int], chunk: int) -> None:
    """Reserve the stored contexts through plan() in chunks (bounded block-mask sizes), without attending."""
    left = dict(zip(ids, lens))
    while any(left.values()):
        step = [i for i in ids if left[i]]
        q = [min(chunk, left[i]) for i in step]
        backend.plan(step, q)
        for i, n in zip(step, q):
            left[i] -= n


# --------------------------------------------------------------------------------------------- runners
class Runner:
    """One backend prepared for a case: `step(q, k, v)` -> (B, C, Hq, D); `rearm()` makes it repeatable."""

    name = ""

    def step(self, q, k, v) -> torch.Tensor:
        raise NotImplementedError

    def rearm(self) -> None:
        pass

    def close(self) -> None:
        pass


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
        _fill_plans(self.cache, ids, lens, 4096)
        self.plan = self.cache.plan(ids, [case.q_len] * case.batch)

    def fill(self, b: int, K: torch.Tensor, V: torch.Tensor) -> None:
        pages = torch.tensor(self.cache.pages(b), device=K.device)
        s = _slots(pages, K.shape[0], self.page)
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
        _fill_plans(self.backend, ids, lens, 512)
        self.plan = self.backend.plan(ids, [case.q_len] * case.batch)

    def fill(self, b: int, K, V) -> None:
        row = self.backend.row(b)
        n_pages = math.ceil(K.shape[0] / self.page)
        pages = self.backend.peer.page_table[row, :n_pages]
        s = _slots(pages, K.shape[0], self.page)
        self.backend.k_pool[0][:, s] = K.transpose(0, 1)
        self.backend.v_pool[0][:, s] = V.transpose(0, 1)

    def step(self, q, k, v):
        return self.backend.run(0, q, k, v)

    def rearm(self) -> None:
        self.plan.layers_run.clear()


class SdpaRunner(Runner):
    name = "sdpa"

    def __init__(self, case: Case, lens: list[int], device: torch.device):
        B, C, hkv, D = case.batch, case.q_len, case.hkv, case.head_dim
        self.hkv, self.g = hkv, case.hq // hkv
        dt = DTYPES[case.dtype]
        self.max_len = max_len = -(-(max(lens) + C) // 64) * 64
        self.k = torch.zeros(B, hkv, max_len, D, dtype=dt, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.tensor(lens, device=device)[:, None] + torch.arange(C, device=device)      # (B, C)
        self.bidx = torch.arange(B, device=device)[:, None].expand(B, C)
        visible = torch.arange(max_len, device=device)[None, None, :] <= self.pos[:, :, None]    # (B, C, S)
        if C == 1:
            visible = visible[:, None]                       # (B, 1, 1, S): broadcast over heads and g rows
        else:
            visible = visible[:, None, None].expand(B, 1, self.g, C, max_len).reshape(B, 1, self.g * C, max_len)
        self.mask = torch.zeros(visible.shape, dtype=dt, device=device).masked_fill_(~visible, float("-inf"))

    def fill(self, b: int, K, V) -> None:
        self.k[b, :, :K.shape[0]] = K.transpose(0, 1)
        self.v[b, :, :V.shape[0]] = V.transpose(0, 1)

    def step(self, q, k, v):
        B, C, Hq, D = q.shape
        self.k[self.bidx, :, self.pos] = k
        self.v[self.bidx, :, self.pos] = v
        qr = q.view(B, C, self.hkv, self.g, D).permute(0, 2, 3, 1, 4).reshape(B, self.hkv, self.g * C, D)
        o = F.scaled_dot_product_attention(qr, self.k, self.v, attn_mask=self.mask)
        return o.view(B, self.hkv, self.g, C, D).permute(0, 3, 1, 2, 4).reshape(B, C, Hq, D)


class FlexContiguousRunner(Runner):
    name = "flexcontig"

    def __init__(self, case: Case, lens: list[int], settings: BenchSettings):
        dev, B, C = settings.device, case.batch, case.q_len
        self.max_len = max_len = -(-(max(lens) + C) // 128) * 128
        self.k = torch.zeros(B, case.hkv, max_len, case.head_dim, dtype=DTYPES[case.dtype], device=dev)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(C, device=dev)           # (B, C)
        self.bidx = torch.arange(B, device=dev)[:, None].expand(B, C)
        pos = self.pos

        def causal_within_length(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b, q_idx]

        self.block_mask = create_block_mask(causal_within_length, B, None, C, max_len, device=dev)
        self.options = {**(decode_kernel_defaults(dev) if C == 1 else {}), **(settings.kernel_options or {})}

    def fill(self, b: int, K, V) -> None:
        self.k[b, :, :K.shape[0]] = K.transpose(0, 1)
        self.v[b, :, :V.shape[0]] = V.transpose(0, 1)

    def step(self, q, k, v):
        self.k[self.bidx, :, self.pos] = k
        self.v[self.bidx, :, self.pos] = v
        out = compiled_flex_attention()(q.transpose(1, 2), self.k, self.v, block_mask=self.block_mask,
                                        enable_gqa=q.shape[2] != self.k.shape[1], kernel_options=self.options)
        return out.transpose(1, 2)                                                                # (B, C, Hq, D)


class FlashInferRunner(Runner):
    name = "flashinfer"

    def __init__(self, case: Case, lens: list[int], pool: PoolConfig, settings: BenchSettings):
        if not settings.cuda:
            raise Unavailable("FlashInfer runs on CUDA only")
        if case.kind != "decode":
            raise Unavailable("FlashInfer is benchmarked through its decode wrapper only")
        try:
            import flashinfer
        except Exception as exc:
            raise Unavailable(f"import flashinfer failed: {exc!r}") from exc
        dev, P, dt = settings.device, case.page, DTYPES[case.dtype]
        self.page = P
        n_pages = [math.ceil((n + 1) / P) for n in lens]
        N = pool.num_pages
        if sum(n_pages) > N:
            raise Unavailable(f"needs {sum(n_pages)} pages, the pool has {N}")
        self.kv = torch.zeros(N, 2, P, case.hkv, case.head_dim, dtype=dt, device=dev)
        gen = torch.Generator().manual_seed(case.seed)
        perm = torch.randperm(N, generator=gen)[:sum(n_pages)].to(torch.int32)       # pages at random
        self.pages = list(torch.split(perm.to(dev), n_pages))
        indptr = torch.tensor([0] + n_pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        last = torch.tensor([(n + 1) - (m - 1) * P for n, m in zip(lens, n_pages)], dtype=torch.int32)
        self.new_page = torch.stack([p[n // P] for p, n in zip(self.pages, lens)]).long()
        self.new_off = torch.tensor([n % P for n in lens], device=dev)
        self.workspace = torch.zeros(128 * 2**20, dtype=torch.uint8, device=dev)
        # FlashInfer's tensor-core (prefill-style) decode kernel: its own advice for GQA groups >= 4, and on an H200
        # (torch 2.11, FlashInfer 0.6.13) 1.05-2.5x faster than its default on every case of the small grid, so
        # the baseline is FlashInfer at its best. PAGED_BENCH_FLASHINFER_TENSOR_CORES=0 restores its default.
        tensor_cores = os.environ.get("PAGED_BENCH_FLASHINFER_TENSOR_CORES", "1") != "0"
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD",
                                                                     use_tensor_cores=tensor_cores)
        self.wrapper.plan(indptr.to(dev), perm.to(dev), last.to(dev), case.hq, case.hkv, case.head_dim, P,
                          q_data_type=dt, kv_data_type=dt)
        self.version = getattr(flashinfer, "__version__", "?")

    def fill(self, b: int, K, V) -> None:
        t = torch.arange(K.shape[0], device=K.device)
        p, o = self.pages[b].long()[t // self.page], t % self.page
        self.kv[:, 0][p, o] = K
        self.kv[:, 1][p, o] = V

    def step(self, q, k, v):
        self.kv[:, 0][self.new_page, self.new_off] = k[:, 0]
        self.kv[:, 1][self.new_page, self.new_off] = v[:, 0]
        return self.wrapper.run(q[:, 0], self.kv)[:, None]


# --------------------------------------------------------------------------------------------- one case
@dataclass
class Prepared:
    """A case with every backend built, filled with the same data, run once and cross-checked."""

    case: Case
    lens: list[int]
    kv_bytes: int
    inputs: tuple
    runners: dict[str, Runner] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)    # backend -> why it is skipped
    errors: dict[str, str] = field(default_factory=dict)         # backend -> why it fails
    build_graphs: dict[str, int] = field(default_factory=dict)   # graphs compiled by each backend's first run
    worst: dict[str, float] = field(default_factory=dict)        # backend -> worst error / tolerance

    def runner(self, backend: str) -> Runner:
        import pytest

        if backend in self.unavailable:
            pytest.skip(self.unavailable[backend])
        if backend in self.errors:
            pytest.fail(f"{backend} on {self.case.id}: {self.errors[backend]}", pytrace=False)
        return self.runners[backend]

    def step_fn(self, backend: str) -> tuple[Callable, Callable]:
        r = self.runner(backend)
        q, k, v = self.inputs
        return (lambda: r.step(q, k, v)), r.rearm

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        self.runners.clear()


POOL_BACKENDS = ("paged", "pagedflex", "torchpa", "flashinfer")


def estimate_bytes(case: Case, pool: PoolConfig, backends: set[str] = frozenset(BACKENDS)) -> int:
    """Device bytes a case needs with `backends` built (pools, padded cache, masks, inputs)."""
    item = torch.empty((), dtype=pool.dtype).element_size()
    lens = case.lengths()
    max_len = max(lens) + case.q_len + 64
    sdpa = 2 * case.batch * case.hkv * max_len * case.head_dim * item
    rows = (case.hq // case.hkv) * case.q_len if case.q_len > 1 else 1
    mask = case.batch * rows * max_len * item
    kinds = POOL_BACKENDS if case.kind == "decode" else ("paged", "torchpa")
    if pool.over_int32:                                         # the FlexAttention runners refuse such a pool
        kinds = tuple(k for k in kinds if k not in ("pagedflex", "torchpa"))
    pools = pool.bytes * max(1, sum(b in backends for b in kinds))
    return pools + sdpa + mask + 2 * max(lens) * case.hkv * case.head_dim * 4 + 2**30


class CaseStore:
    """Holds the one case being benchmarked (all its backends alive at once), building the next on demand."""

    def __init__(self, settings: BenchSettings, selected: dict[str, set[str]] | None = None):
        self.settings = settings
        self.selected = selected or {}
        self.current: Prepared | None = None
        self.skipped: dict[str, str] = {}

    def get(self, case: Case) -> Prepared:
        import pytest

        if case.id in self.skipped:
            pytest.skip(self.skipped[case.id])
        if self.current is not None and self.current.case == case:
            return self.current
        self.release()
        wanted = self.selected.get(case.id, set(BACKENDS)) | {"sdpa"}
        reason = self.fits(case, wanted)
        if reason:
            self.skipped[case.id] = reason
            pytest.skip(reason)
        try:
            self.current = build(case, self.settings, tuple(b for b in BACKENDS if b in wanted))
        except torch.cuda.OutOfMemoryError as exc:
            self.release()
            self.skipped[case.id] = f"{case.id} does not fit the card: {exc}"
            pytest.skip(self.skipped[case.id])
        return self.current

    def fits(self, case: Case, backends: set[str] = frozenset(BACKENDS)) -> str | None:
        pool = case_pool(self.settings, case)
        pages = sum(math.ceil((n + case.q_len) / case.page) for n in case.lengths())
        if pages > pool.num_pages:
            return f"{case.id} needs {pages} pages; the pool holds {pool.num_pages}"
        if max(case.lengths()) + case.q_len > pool.max_seq_len:
            return f"{case.id} is longer than the pool's max_seq_len {pool.max_seq_len}"
        if self.settings.cuda:
            free, _ = torch.cuda.mem_get_info(self.settings.device)
            need = estimate_bytes(case, pool, backends)
            if need > 0.9 * free:
                return f"{case.id} needs about {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"
        return None

    def release(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
            gc.collect()
            if self.settings.cuda:
                torch.cuda.empty_cache()


def build(case: Case, settings: BenchSettings, backends=BACKENDS) -> Prepared:
    """Build every backend for `case`, fill the same contexts, run the step once each, cross-check outputs."""
    dev = settings.device
    pool = case_pool(settings, case)
    lens = case.lengths()
    prep = Prepared(case, lens, kv_bytes(case, lens), step_inputs(case, dev))
    makers = {
        "paged": lambda: PagedRunner(case, lens, pool, settings),
        "pagedflex": lambda: PagedFlexRunner(case, lens, pool, settings),
        "sdpa": lambda: SdpaRunner(case, lens, dev),
        "flexcontig": lambda: FlexContiguousRunner(case, lens, settings),
        "torchpa": lambda: TorchPARunner(case, lens, pool, settings),
        "flashinfer": lambda: FlashInferRunner(case, lens, pool, settings),
    }
    for name in backends:
        try:
            prep.runners[name] = makers[name]()
        except Unavailable as exc:
            prep.unavailable[name] = str(exc)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:
            prep.errors[name] = "could not be built:\n" + traceback.format_exc(limit=6)
    # Same contexts for all, one sequence at a time (bounded extra memory).
    for b, n in enumerate(lens):
        K, V = seq_kv(case, b, n, dev)
        for name, r in list(prep.runners.items()):
            try:
                r.fill(b, K, V)
            except Exception:
                prep.errors[name] = "could not be filled:\n" + traceback.format_exc(limit=6)
                prep.runners.pop(name).close()
    q, k, v = prep.inputs
    outputs = {}
    for name, r in list(prep.runners.items()):
        g0 = unique_graphs()
        try:
            outputs[name] = r.step(q, k, v)
            sync(dev)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:
            prep.errors[name] = "first run failed:\n" + traceback.format_exc(limit=8)
            prep.runners.pop(name).close()
            continue
        finally:
            prep.build_graphs[name] = unique_graphs() - g0
        r.rearm()
    cross_check(prep, outputs)
    return prep


def _check(out: torch.Tensor, want: torch.Tensor, factor: float = 1.0) -> tuple[bool, float, float]:
    err = float((out.float() - want.float()).abs().max())
    tol = factor * (REL_TOL * float(want.float().abs().max()) + ABS_TOL)
    finite = bool(torch.isfinite(out).all())
    return finite and err <= tol, err, tol


def cross_check(prep: Prepared, outputs: dict[str, torch.Tensor]) -> None:
    """Each backend vs the float32 reference (first, last and longest rows) and vs SDPA (all rows)."""
    case, lens = prep.case, prep.lens
    B = case.batch
    rows = sorted({0, B - 1, max(range(B), key=lambda b: lens[b])})
    q, k, v = prep.inputs
    ref = reference_rows(case, lens, rows, q, k, v, q.device)
    base = outputs.get("sdpa")
    for name, out in outputs.items():
        if tuple(out.shape) != tuple(q.shape):
            prep.errors[name] = f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}"
            continue
        worst = 0.0
        for b in rows:
            ok, err, tol = _check(out[b], ref[b])
            worst = max(worst, err / tol)
            if not ok:
                prep.errors[name] = (f"row {b} (context {lens[b]}): max error {err:.3g} vs the float32 reference, "
                                     f"tolerance {tol:.3g}")
                break
        if name not in prep.errors and base is not None and name != "sdpa":
            ok, err, tol = _check(out, base, 2.0)
            worst = max(worst, err / tol)
            if not ok:
                prep.errors[name] = f"max difference {err:.3g} from the SDPA baseline over all rows, tolerance {tol:.3g}"
        prep.worst[name] = worst
