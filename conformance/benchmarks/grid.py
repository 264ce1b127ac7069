"""The benchmark cases: decode steps and prefill chunks over batch, context, page size, heads and head dim.

A `Case` is one shape of work; every backend runs it on the same data. Grids:

* ``small`` on a GPU: 11 decode cases and 2 prefill cases chosen so that compiled shapes are shared
  (one fixed pool per page size / head layout, batch buckets 1, 8, 32, 128): 7 compiled decode graphs and
  2 prefill graphs per FlexAttention backend.
* ``small`` on the CPU: the same kinds of case scaled down (tiny contexts, batch <= 4, page 16) so that the
  whole CPU smoke run compiles only 4 graphs.
* ``issue6``: issue 6's target grid as stated (24 decode cases: pages 16/128 x heads 32/8, 32/32 x batches
  8/32/128 x lengths uniform at random in [512, 4096) and [4096, 16384)) and the 4k prompt of its target 7.
  On the CPU, scaled down.
* ``full``: batch 1/8/32/128 x contexts 512..32k (uniform and mixed) x pages 16/64/128 x heads 32/8 and 32/32
  x head dim 128 and 64 (decode), and a prefill grid; cases that do not fit the pool or the card are skipped
  at run time. On the CPU, ``full`` is the GPU's small grid scaled down.

Ids read well in ``--benchmark-compare`` tables: ``B32-mix512-4096-P64-32x8-D128`` (batch 32, lengths spread
log-uniformly over 512..4096, page 64, 32 query / 8 kv heads, head dim 128, bf16 unless a dtype is named).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, replace
from itertools import product

DTYPE_SHORT = {"bfloat16": "", "float16": "-fp16", "float32": "-fp32"}


@dataclass(frozen=True)
class Ctx:
    """Context lengths of a batch: all `lo` ("u", uniform), spread log-uniformly over [lo, hi] ("mix"), or drawn
    uniformly at random from [lo, hi) ("rand": issue 6's target grid)."""

    kind: str
    lo: int
    hi: int

    @property
    def label(self) -> str:
        return f"u{self.lo}" if self.kind == "u" else f"{self.kind}{self.lo}-{self.hi}"

    def lengths(self, batch: int, seed: int) -> list[int]:
        """Seeded lengths; a mixed batch of >= 2 always holds both ends of its range (realistic spread)."""
        if self.kind == "u":
            return [self.lo] * batch
        rng = random.Random(seed)
        if self.kind == "rand":
            return [rng.randrange(self.lo, self.hi) for _ in range(batch)]
        lens = [int(round(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))) for _ in range(batch)]
        if batch >= 2:
            lens[0], lens[1] = self.lo, self.hi
            rng.shuffle(lens)
        return lens


def u(n: int) -> Ctx:
    return Ctx("u", n, n)


def mix(lo: int, hi: int) -> Ctx:
    return Ctx("mix", lo, hi)


def rand(lo: int, hi: int) -> Ctx:
    return Ctx("rand", lo, hi)


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    Attributes:
        kind: "decode" (one new token per sequence) or "prefill" (a chunk of `chunk` new tokens per sequence
            appended to a stored context).
        batch, ctx: sequences in the step and their stored lengths before the step.
        page: page size (the paged backends' KV block size).
        hq, hkv, head_dim, dtype: query heads, kv heads, head dim, storage/compute dtype.
    """

    kind: str
    batch: int
    ctx: Ctx
    page: int
    hq: int = 32
    hkv: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    chunk: int = 1

    @property
    def id(self) -> str:
        s = f"B{self.batch}-{self.ctx.label}-P{self.page}-{self.hq}x{self.hkv}-D{self.head_dim}"
        if self.kind == "prefill":
            s += f"-C{self.chunk}"
        return s + DTYPE_SHORT[self.dtype]

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.kind}:{self.id}".encode())

    @property
    def q_len(self) -> int:
        return 1 if self.kind == "decode" else self.chunk

    def lengths(self) -> list[int]:
        return self.ctx.lengths(self.batch, self.seed)

    @property
    def pool_key(self) -> tuple:
        """Cases with the same key share one pool shape, so compiled graphs are shared across them."""
        return (self.page, self.hq, self.hkv, self.head_dim, self.dtype)


def _decode(batch, ctx, page=64, hq=32, hkv=8, d=128) -> Case:
    return Case("decode", batch, ctx, page, hq, hkv, d)


def _prefill(batch, ctx, chunk, page=64, hq=32, hkv=8, d=128) -> Case:
    return Case("prefill", batch, ctx, page, hq, hkv, d, chunk=chunk)


#: The GPU "small" grid: batch sweep, context sweep, page sweep, MHA; pools shared by page size and heads.
SMALL_DECODE = (
    # batch sweep at a realistic spread of lengths, page 64
    _decode(1, mix(512, 4096)), _decode(8, mix(512, 4096)), _decode(32, mix(512, 4096)), _decode(128, mix(512, 4096)),
    # context sweep at batch 32 (same compiled graph as B32 above: the pool shape is fixed)
    _decode(32, u(512)), _decode(32, u(2048)), _decode(32, u(8192)), _decode(32, u(32768)),
    # page sweep
    _decode(32, mix(512, 4096), page=16), _decode(32, mix(512, 4096), page=128),
    # multi-head (no GQA): 4x the K/V bytes per token
    _decode(32, mix(512, 4096), hkv=32),
)
SMALL_PREFILL = (
    _prefill(1, u(0), 4096),        # a 4k-token prompt into an empty cache (issue 6, target 7)
    _prefill(1, u(4096), 512),
    _prefill(8, mix(512, 4096), 512),
)

#: The CPU smoke grid: the same kinds of case, tiny (4 compiled graphs in all, shared with test_recompiles).
CPU_DECODE = (
    _decode(4, mix(8, 64), page=16),
    _decode(2, u(64), page=16),
)
CPU_PREFILL = (
    _prefill(2, u(32), 16, page=16),
    _prefill(1, u(0), 32, page=16),
)

#: Issue 6's target grid, as its text states it: bf16, 32/8 and 32/32 heads, head dim 128, pages 16 and 128,
#: batches 8/32/128, lengths uniform in [512, 4096) and in [4096, 16384). 24 decode cases; the 4k prompt of
#: target 7 is its prefill case. Cases that do not fit the pool are skipped at run time.
ISSUE6_DECODE = tuple(_decode(b, c, p, hq, hkv) for (hq, hkv), p, c, b in
                      product(((32, 8), (32, 32)), (16, 128), (rand(512, 4096), rand(4096, 16384)), (8, 32, 128)))
ISSUE6_PREFILL = (_prefill(1, u(0), 4096),)

FULL_BATCHES = (1, 8, 32, 128)
FULL_CONTEXTS = (u(512), u(2048), u(8192), u(32768), mix(512, 4096), mix(512, 32768))
FULL_PAGES = (16, 64, 128)
FULL_HEADS = ((32, 8), (32, 32))
FULL_DIMS = (128, 64)


def full_decode() -> tuple[Case, ...]:
    return tuple(_decode(b, c, p, hq, hkv, d) for d, (hq, hkv), p, c, b in
                 product(FULL_DIMS, FULL_HEADS, FULL_PAGES, FULL_CONTEXTS, FULL_BATCHES))


def full_prefill() -> tuple[Case, ...]:
    return tuple(_prefill(b, c, chunk, p, hq, hkv, d) for d, (hq, hkv), p, chunk, c, b in
                 product(FULL_DIMS, FULL_HEADS, FULL_PAGES, (256, 512), (u(2048), u(8192), mix(512, 4096)),
                         (1, 8, 32)))


def scale_for_cpu(case: Case) -> Case:
    """A GPU case shrunk for a CPU smoke run: contexts / 64, batch <= 8, page 16, chunk <= 16."""
    c = case.ctx
    ctx = Ctx(c.kind, max(4, c.lo // 64), max(4, c.hi // 64))
    return replace(case, batch=min(case.batch, 8), ctx=ctx, page=16, chunk=min(case.chunk, 16))


def _dedup(cases) -> tuple[Case, ...]:
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return tuple(out)


GRIDS = ("small", "issue6", "full")


def cases(kind: str, grid: str, device: str) -> tuple[Case, ...]:
    """The cases of one kind ("decode" or "prefill") in a grid (`GRIDS`) for a device type."""
    if grid not in GRIDS:
        raise ValueError(f"--bench-grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if device == "cuda":
        if grid == "small":
            return SMALL_DECODE if kind == "decode" else SMALL_PREFILL
        if grid == "issue6":
            return ISSUE6_DECODE if kind == "decode" else ISSUE6_PREFILL
        return full_decode() if kind == "decode" else full_prefill()
    if grid == "small":
        return CPU_DECODE if kind == "decode" else CPU_PREFILL
    if grid == "issue6":
        return _dedup(tuple(scale_for_cpu(c) for c in (ISSUE6_DECODE if kind == "decode" else ISSUE6_PREFILL)))
    small = SMALL_DECODE if kind == "decode" else SMALL_PREFILL
    base = CPU_DECODE if kind == "decode" else CPU_PREFILL
    return _dedup(base + tuple(scale_for_cpu(c) for c in small))
