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
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from conformance.benchmarks.baseline_runners import FlashInferRunner, FlexContiguousRunner, SdpaRunner
from conformance.benchmarks.case_data import kv_bytes, seq_kv, step_inputs
from conformance.benchmarks.crosscheck import cross_check
from conformance.benchmarks.grid import Case
from conformance.benchmarks.harness import BenchSettings, sync, unique_graphs
from conformance.benchmarks.paged_runners import PagedFlexRunner, PagedRunner, TorchPARunner
from conformance.benchmarks.pools import DTYPES, PoolConfig, case_pool, pool_config
from conformance.benchmarks.runner import Runner, Unavailable

__all__ = [
    "BACKENDS", "POOL_BACKENDS", "CaseStore", "Prepared", "build", "estimate_bytes",
    # re-exported from the modules that hold them
    "DTYPES", "PoolConfig", "pool_config", "case_pool", "Runner", "Unavailable", "PagedRunner", "PagedFlexRunner",
    "TorchPARunner", "SdpaRunner", "FlexContiguousRunner", "FlashInferRunner", "cross_check",
]

BACKENDS = ("paged", "pagedflex", "sdpa", "flexcontig", "torchpa", "flashinfer")


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
