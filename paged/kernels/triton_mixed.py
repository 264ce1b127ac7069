"""The Triton mixed prefill+decode kernel as a `paged.kernels` kernel: causal steps with more than one new token in
some row and history in some row (continuous batching: a prompt chunk joins rows that decode), no mods, compiled
attention. A cache whose decode kernel is the Triton one runs these steps here (`paged.kernels.choose`).

Source: `triton_mixed_source` (the tile kernel: history through the page table, new keys from the inputs, the new
K/V stored in the same launch); reuses `triton_tiles.attend_pages`, `triton_sizing`, `triton_launch.CachedLauncher`.

A step is a host-built tile list (`fill_tiles`, numpy, once per step in `plan`), sent with the step's one copy:

    mixed_tiles (2, C) int32    (row, first query) of each tile of CHUNK_TOKENS queries, most keys first; a row of
                                one new token (decode) is a tile of one. C = Bp x ceil(Lqp / CHUNK_TOKENS) (every
                                row full), fixed per (padded batch, padded query length) bucket.
    mixed_used (1,) int32       tiles used this step

Per layer (`run`): one launch, about CTAS_PER_SM x SMs persistent CTAs drawing work units (the tiles per kv head,
then blocks of the output's padding to zero) from a counter the launch leaves at 0 (`_Bucket.counter`): tiles of
up to 128 packed (token, head) rows (a flash-attention tile on the tensor cores). Unused columns are never read, so
one CUDA graph per bucket serves every step of it.

Bounds: a decode row of a mixed step is one tile per kv head over its whole history (no split-KV, unlike plain
decode steps): a step's time is at least its longest tile (history + CHUNK_TOKENS-aligned prefix of its chunk) on one
SM. A chunk of c tokens over h history keys gives ceil(c / CHUNK_TOKENS) x Hkv tiles, each reading h + c keys: long
histories with short chunks are the case a split-KV would help. MHA (group 1) makes 16-row tiles (K/V read once per
16 queries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.kernels.triton_launch import CachedLauncher
from paged.kernels.triton_mixed_source import ZERO_ELEMS, ZERO_STORE, _mixed_kernel
from paged.kernels.triton_sizing import CTAS_PER_SM, _next_pow2, _sm_count, fit_key_tile, pipeline_budget
from paged.kernels.triton_sizing import triton

if triton is not None:
    from triton.runtime.errors import OutOfResources
else:  # never raised: the module only imports without Triton
    class OutOfResources(Exception):
        pass
from paged.plan import StepBuffers, StepPlan
from paged.spec import CacheSpec

NAME = "triton_mixed"
#: Runs over pools of more than 2**31 elements (64-bit slot offsets).
LARGE_POOLS = True
#: Takes run() inputs of the bucket's padded batch too (padding rows have no tiles and come back 0).
PADDED_BATCH = True
#: Stores the new K/V in its own launch: plan() sends no slots / token_rows.
FUSED_STORE = True
#: Queries (new tokens of one row) per chunk tile; x the GQA group = the tile's packed M rows.
CHUNK_TOKENS = 16
#: Packed (token, head) rows of a chunk tile at most (x head dim at most MAX_TILE_ELEMS).
MAX_BLOCK_M = 128
MAX_TILE_ELEMS = 128 * 128


def chunk_columns(padded_batch: int, padded_q_len: int, tokens: int = CHUNK_TOKENS) -> int:
    """C, the tiles of `tokens` queries a (padded batch, padded query length) bucket may need: every row full."""
    return padded_batch * -(-padded_q_len // tokens)


def step_fields(padded_batch: int, padded_q_len: int, spec: CacheSpec) -> list[tuple]:
    """The tile list's fields of a bucket with more than one query (`StepBuffers`): mixed_tiles (2, C),
    mixed_used (1,) int32; none for decode buckets."""
    if padded_q_len == 1:
        return []
    cols = chunk_columns(padded_batch, padded_q_len)
    return [("mixed_tiles", (2, cols), torch.int32, 0), ("mixed_used", (1,), torch.int32, 0)]


def fill_tiles(q_start: np.ndarray, q_len: np.ndarray, tiles: np.ndarray, used: np.ndarray, cols: int,
               tokens: int = CHUNK_TOKENS) -> None:
    """Fill the tile list (module docstring) in place for rows with q_start (B,) stored and q_len (B,) new tokens.

    Each row gets ceil(q_len / tokens) tiles (a decode row one), ordered by the keys they attend (most first:
    CTAs drawing them in that order end about together). Raises ValueError when the tiles do not fit `cols` (a row
    longer than its bucket)."""
    start, lens = q_start.astype(np.int64), q_len.astype(np.int64)
    live = np.flatnonzero(lens > 0)
    per = -(-lens[live] // tokens)                                          # (Bl,) tiles per row
    n = int(per.sum())
    if n > cols:
        raise ValueError(f"{n} tiles do not fit the bucket's {cols}")
    rows = np.repeat(live, per)                                             # (n,) row of each tile
    first = (np.arange(n) - np.repeat(np.cumsum(per) - per, per)) * tokens  # (n,) its first query
    order = np.argsort(-(start[rows] + first), kind="stable")
    tiles[0, :n], tiles[1, :n] = rows[order], first[order]
    used[0] = n


def mixed_options(dtype: torch.dtype, head_dim: int, device: torch.device, block_m: int) -> dict:
    """Key tile, warps and stages of a launch with `block_m` packed rows: 64-key tiles (32 past head dim 128), 8
    warps for 128 rows (else 4), 2 stages, the key tile halved until the stages and the Q tile fit the card's
    pipeline budget. On an H200 (scripts/gpu_sweep19.py --only mixed, results/h200-2026-12-03c): 2 stages were 2-3%
    faster than 3 on each of the four headline mixed steps, and no 32- or 64-query tile was faster than 16."""
    _, stages, budget = pipeline_budget(device)
    stages = min(stages, 2)
    d_pad = _next_pow2(max(head_dim, 16))
    block_n = fit_key_tile(64 if d_pad <= 128 else 32, head_dim, dtype, stages, budget,
                           fixed=block_m * d_pad * dtype.itemsize)                 # + the query tile
    return {"block_n": block_n, "num_warps": 8 if block_m >= 128 else 4, "num_stages": stages}


@dataclass
class _Bucket:
    """What the kernel fixes once per bucket: the tile columns C, the tile list's device fields, the launch's work
    counter (2,) int32 (at 0 between launches), and per query head count the launch state. The bucket's launches
    share the counter, so they must run one after another (one stream, or graph nodes in sequence): two at once
    would split one another's work units."""

    cols: int
    tiles: torch.Tensor                                                     # (2, C) int32, device
    used: torch.Tensor                                                      # (1,) int32, device
    counter: torch.Tensor                                                   # (2,) int32, device
    by_heads: dict[int, tuple] = field(default_factory=dict)               # Hq -> (launcher, grid)


def _bucket(settings: KernelSettings, buffers: StepBuffers) -> _Bucket:
    state = buffers.kernel_state.get(NAME)
    if state is None:
        dev = buffers.packed.dev
        state = _Bucket(chunk_columns(buffers.padded_batch, buffers.padded_q_len), dev["mixed_tiles"],
                        dev["mixed_used"], torch.zeros(2, dtype=torch.int32, device=settings.spec.device))
        buffers.kernel_state[NAME] = state
    return state


@dataclass
class TritonMixedPlan(KernelPlan):
    """One mixed step on the Triton kernel. Attributes: bucket (fixed launch state); page_size, head_dim, dtype,
    device: the cache's; padded_batch; scale_default 1 / sqrt(head_dim); tiles: used."""

    name: ClassVar[str] = NAME
    bucket: _Bucket
    page_size: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    padded_batch: int
    scale_default: float
    tiles: int = 0


def plan(layout: StepLayout, buffers: StepBuffers) -> TritonMixedPlan:
    """The step's tile list into the host buffers (from the lengths the page bookkeeping wrote there), then one
    copy of the fields run() and the page bookkeeping read (lengths, tiles, page table, new pages)."""
    spec = layout.settings.spec
    state = _bucket(layout.settings, buffers)
    h = buffers.packed.host_np
    B = len(layout.q_lens)
    fill_tiles(h["q_start"][:B], h["q_len"][:B], h["mixed_tiles"], h["mixed_used"], state.cols)
    buffers.packed.send(last="new_logical")
    return TritonMixedPlan(state, spec.page_size, spec.head_dim, spec.dtype, layout.page_logical.device,
                           buffers.padded_batch, spec.head_dim ** -0.5, int(h["mixed_used"][0]))


def launch_state(dtype: torch.dtype, device: torch.device, hq: int, hkv: int, head_dim: int, page_size: int,
                 tokens: int = CHUNK_TOKENS, options: dict | None = None,
                 ctas_per_sm: float = CTAS_PER_SM) -> tuple[CachedLauncher, tuple[int]]:
    """(launcher, grid) for `hq` query heads: tiles of `tokens` queries (as `fill_tiles` was given), launch options
    (default `mixed_options`), ctas_per_sm x SMs persistent CTAs. Fixed per bucket and query head count."""
    group = hq // hkv
    d_pad = _next_pow2(max(head_dim, 16))
    block_m = min(MAX_BLOCK_M, MAX_TILE_ELEMS // d_pad, _next_pow2(max(16, tokens * group)))
    options = options or mixed_options(dtype, head_dim, device, block_m)
    consts = dict(GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, PAGE=page_size, BLOCK_M=block_m,
                  BLOCK_N=options["block_n"], TOKENS=tokens, TOK_PAD=max(16, _next_pow2(tokens)),
                  SUB=-(-tokens * group // block_m), HKV=hkv,
                  F32_DOT=dtype == torch.float32 or device.type == "cpu", ZERO_ELEMS=ZERO_ELEMS,
                  ZERO_STORE=ZERO_STORE)
    launcher = CachedLauncher(_mixed_kernel, consts,
                              dict(num_warps=options["num_warps"], num_stages=options["num_stages"]))
    return launcher, (max(1, math.ceil(ctas_per_sm * _sm_count(device))),)


def launch(state: tuple, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, page_table: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
           tiles: torch.Tensor, used: torch.Tensor, counter: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """Launch the tile list with `launch_state`'s state. Shapes: q (B, L, Hq, D), k_new / v_new (B, L, Hkv, D), last
    dims contiguous; out (B, L, Hq, D) with (Hq, D) contiguous per position (every element written); pools
    (Hkv, N * P, D) or (1, Hkv, N * P, D); page_table (>= B, W), q_start / q_len (>= B,) int32, q_len 0 for rows
    without tiles; tiles (2, C), used (1,) int32 (`fill_tiles`, rows < B); counter (2,) int32, 0 (left at 0)."""
    B, L, Hq, D = out.shape
    launcher, grid = state
    c = launcher.constexprs
    if (Hq, D) != (c["GROUP"] * c["HKV"], c["HEAD_DIM"]) or q_len.numel() < B:
        raise ValueError(f"out {tuple(out.shape)} does not fit this launch state ({c['GROUP'] * c['HKV']} query "
                         f"heads of {c['HEAD_DIM']}) or its {q_len.numel()} row lengths")
    if out.stride(3) != 1 or out.stride(2) != D or out.stride(1) != Hq * D:
        raise ValueError(f"out's (Hq, D) must be contiguous per position, not strides {out.stride()}")
    if L * Hq * D + ZERO_ELEMS >= 2 ** 31:      # the kernel's offsets within a row are 32-bit
        raise ValueError(f"a row of {L} positions x {Hq * D} elements is past the kernel's 32-bit row offsets")
    zero_blocks = -(-L * Hq * D // ZERO_ELEMS)
    tensors = (q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, tiles, used, counter, out)
    scalars = (q.stride(0), q.stride(1), q.stride(2), k_pool.stride(-3), k_pool.stride(-2), k_new.stride(0),
               k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
               page_table.stride(0), out.stride(0), out.stride(1), out.stride(2), tiles.stride(0), B, L, zero_blocks,
               scale * 1.4426950408889634)
    _call(launcher, grid, tensors, scalars)


def _call(launcher: CachedLauncher, grid: tuple, tensors: tuple, scalars: tuple) -> None:
    """Launch; a first launch whose stages do not fit the card's shared memory (three pipelined key loops) is
    compiled again with one stage fewer, down to one."""
    try:
        launcher(grid, tensors, scalars)
    except OutOfResources:
        if launcher.options["num_stages"] <= 1:
            raise
        launcher.options["num_stages"] -= 1
        _call(launcher, grid, tensors, scalars)


def mixed_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, page_table: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                    page_size: int, scale: float) -> torch.Tensor:
    """The kernel without a cache (a test and benchmark entry point; its tile list is made here from q_start and
    q_len, read back to the host): store row b's q_len[b] new K/V at positions q_start[b] + j of its pages and
    attend each new query causally over the row's keys.

    Args: q (B, L, Hq, D), k_new / v_new (B, L, Hkv, D) right padded (L >= max q_len; padding never read);
        pools (Hkv, N * P, D); page_table (>= B, W) int32 covering each row's q_start + q_len keys; q_start,
        q_len (>= B,) int32 on q's device.
    Returns: (B, L, Hq, D), 0 past each row's q_len.
    """
    B, L, Hq, D = q.shape
    if k_new.shape != v_new.shape or k_new.shape[:2] != (B, L) or Hq % k_new.shape[2]:
        raise ValueError(f"k_new / v_new {tuple(k_new.shape)} / {tuple(v_new.shape)} do not fit q {tuple(q.shape)}")
    cols = chunk_columns(B, _next_pow2(L))
    tiles, used = np.zeros((2, cols), np.int32), np.zeros(1, np.int32)
    fill_tiles(q_start[:B].cpu().numpy(), q_len[:B].cpu().numpy(), tiles, used, cols)
    state = launch_state(q.dtype, q.device, Hq, k_new.shape[2], D, page_size)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch(state, q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, torch.from_numpy(tiles).to(q.device),
           torch.from_numpy(used).to(q.device), torch.zeros(2, dtype=torch.int32, device=q.device), scale, out)
    return out


def run(step: StepPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: Pools,
        scale: float | None) -> torch.Tensor:
    """Store each row's new K/V into its pages and attend its new queries causally over its history and them.

    Args: q (B or Bp, Lq, Hq, D), k / v (B or Bp, Lq, Hkv, D), validated by the cache (Lq >= the step's max q_len;
        row b's first q_lens[b] positions real, the rest never read).
    Returns: (B or Bp, Lq, Hq, D); positions past a row's q_len, and padding rows, are 0 (written by the launch).
    """
    kp = step.kernel_plan
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bucket = kp.bucket
    state = bucket.by_heads.get(q.shape[2])
    if state is None:
        state = bucket.by_heads[q.shape[2]] = launch_state(kp.dtype, kp.device, q.shape[2], k.shape[2], kp.head_dim,
                                                           kp.page_size)
    out = torch.empty(q.shape, dtype=kp.dtype, device=kp.device)                      # (B, Lq, Hq, D)
    buf = step.buffers
    launch(state, q, pools.k_layers[layer], pools.v_layers[layer], k, v, buf.page_table, buf.q_start, buf.q_len,
           bucket.tiles, bucket.used, bucket.counter, kp.scale_default if scale is None else scale, out)
    return out


TritonMixedPlan.run = staticmethod(run)
