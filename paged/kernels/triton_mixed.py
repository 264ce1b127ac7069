"""The Triton mixed prefill+decode kernel as a `paged.kernels` kernel: causal steps with more than one new token in
some row and history in some row (continuous batching: a prompt chunk joins rows that decode), no mods, compiled
attention. A cache whose decode kernel is the Triton one runs these steps here (`paged.kernels.choose`).

Source: `triton_mixed_source` (the tile kernel: history through the page table, new keys from the inputs, the new
K/V stored in the same launch); reuses `triton_tiles.attend_pages`, `triton_sizing`, `triton_launch.CachedLauncher`.

A step is a host-built tile list (`fill_tiles`, numpy, once per step in `plan`), sent with the step's one copy:

    mixed_tiles (2, C + Bp) int32    columns [0, C): chunk tiles (row, first query), CHUNK_TOKENS queries each, most
                                     keys first; columns [C, C + Bp): decode tiles (row, 0), one per row of one new
                                     token, longest history first. C = Bp x ceil(Lqp / CHUNK_TOKENS) (the bucket's
                                     worst case), fixed per (padded batch, padded query length) bucket.
    mixed_used (2,) int32            chunk tiles and decode tiles used this step

Per layer (`run`): two launches of the same kernel, chunk tiles (BLOCK_M = up to 128 packed (token, head) rows: a
flash-attention tile on the tensor cores) over a persistent grid of about CTAS_PER_SM x SMs CTAs, and decode tiles
(BLOCK_M = the GQA group padded to 16, the decode kernel's tile) one CTA per (row, kv head). Unused columns are
never read (each launch loops to its `mixed_used` count), so one CUDA graph per bucket serves every step of it.

Bounds, not yet measured: a decode row of a mixed step is one CTA per kv head over its whole history (no split-KV,
unlike plain decode steps): a step's time is at least its longest decode row's read by one SM, and at least its
longest chunk tile (history + CHUNK_TOKENS-aligned prefix of its chunk) on one SM. A chunk of c tokens over h history
keys gives ceil(c / CHUNK_TOKENS) x Hkv CTAs, each reading h + c keys: long histories with short chunks are the
case a split-KV would help. MHA (group 1) makes 16-row tiles (K/V read once per 16 queries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from paged.kernels.base import KernelPlan, KernelSettings, Pools, StepLayout
from paged.kernels.triton_launch import CachedLauncher, capturing
from paged.kernels.triton_mixed_source import _mixed_kernel
from paged.kernels.triton_sizing import (CTAS_PER_SM, _next_pow2, _sm_count, fit_key_tile, launch_options,
                                         pipeline_budget)
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
    """C, the chunk tiles of `tokens` queries a (padded batch, padded query length) bucket may need: every row
    full."""
    return padded_batch * -(-padded_q_len // tokens)


def step_fields(padded_batch: int, padded_q_len: int, spec: CacheSpec) -> list[tuple]:
    """The tile list's fields of a bucket with more than one query (`StepBuffers`): mixed_tiles (2, C + Bp),
    mixed_used (2,) int32; none for decode buckets."""
    if padded_q_len == 1:
        return []
    cols = chunk_columns(padded_batch, padded_q_len) + padded_batch
    return [("mixed_tiles", (2, cols), torch.int32, 0), ("mixed_used", (2,), torch.int32, 0)]


def fill_tiles(q_start: np.ndarray, q_len: np.ndarray, tiles: np.ndarray, used: np.ndarray, chunk_cols: int,
               tokens: int = CHUNK_TOKENS) -> None:
    """Fill the tile list (module docstring) in place for rows with q_start (B,) stored and q_len (B,) new tokens.

    Rows of more than one new token get ceil(q_len / tokens) chunk tiles, ordered by the keys they attend
    (most first, so a persistent CTA's round-robin share ends about when the others' do); rows of one get a
    decode tile. Raises ValueError when the chunk tiles do not fit chunk_cols (a row longer than its bucket)."""
    start, lens = q_start.astype(np.int64), q_len.astype(np.int64)
    big = np.flatnonzero(lens > 1)
    per = -(-lens[big] // tokens)                                           # (Bc,) tiles per chunk row
    n = int(per.sum())
    if n > chunk_cols:
        raise ValueError(f"{n} chunk tiles do not fit the bucket's {chunk_cols}")
    rows = np.repeat(big, per)                                              # (n,) row of each tile
    first = (np.arange(n) - np.repeat(np.cumsum(per) - per, per)) * tokens  # (n,) its first query
    order = np.argsort(-(start[rows] + first), kind="stable")
    tiles[0, :n], tiles[1, :n] = rows[order], first[order]
    small = np.flatnonzero(lens == 1)
    small = small[np.argsort(-start[small], kind="stable")]                 # longest history first
    k = small.shape[0]
    tiles[0, chunk_cols:chunk_cols + k], tiles[1, chunk_cols:chunk_cols + k] = small, 0
    used[0], used[1] = n, k


def mixed_options(dtype: torch.dtype, head_dim: int, device: torch.device, block_m: int) -> dict:
    """Key tile, warps and stages of a chunk launch with `block_m` packed rows: 64-key tiles (32 past head dim
    128), 8 warps for 128 rows (else 4), Hopper 3 stages in ~200 KB of shared memory (else 2 in ~96 KB), the key
    tile halved until the stages and the Q tile fit. Not measured yet (scripts/gpu_mixed_steps.py)."""
    _, stages, budget = pipeline_budget(device)
    d_pad = _next_pow2(max(head_dim, 16))
    block_n = fit_key_tile(64 if d_pad <= 128 else 32, head_dim, dtype, stages, budget,
                           fixed=block_m * d_pad * dtype.itemsize)                 # + the query tile
    return {"block_n": block_n, "num_warps": 8 if block_m >= 128 else 4, "num_stages": stages}


@dataclass
class _Bucket:
    """What the kernel fixes once per bucket: the chunk columns C, the tile list's device fields, the decode
    launch options (`launch_options` at the bucket's batch: one CTA per row and kv head), and per query head count
    the launch state."""

    chunk_cols: int
    decode_options: dict
    tiles: torch.Tensor                                                     # (2, C + Bp) int32, device
    used: torch.Tensor                                                      # (2,) int32, device
    by_heads: dict[int, tuple] = field(default_factory=dict)               # Hq -> ((launcher, grid, first) x 2)


def _bucket(settings: KernelSettings, buffers: StepBuffers) -> _Bucket:
    state = buffers.kernel_state.get(NAME)
    if state is None:
        spec = settings.spec
        dev = buffers.packed.dev
        state = _Bucket(chunk_columns(buffers.padded_batch, buffers.padded_q_len),
                        launch_options(spec.dtype, spec.head_dim, spec.device, buffers.padded_batch,
                                       spec.num_kv_heads), dev["mixed_tiles"], dev["mixed_used"])
        buffers.kernel_state[NAME] = state
    return state


@dataclass
class TritonMixedPlan(KernelPlan):
    """One mixed step on the Triton kernel. Attributes: bucket (fixed launch state); page_size, head_dim, dtype,
    device: the cache's; padded_batch; scale_default 1 / sqrt(head_dim); chunk_tiles, decode_tiles: used."""

    name: ClassVar[str] = NAME
    bucket: _Bucket
    page_size: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    padded_batch: int
    scale_default: float
    chunk_tiles: int = 0
    decode_tiles: int = 0


def plan(layout: StepLayout, buffers: StepBuffers) -> TritonMixedPlan:
    """The step's tile list into the host buffers (from the lengths the page bookkeeping wrote there), then one
    copy of the fields run() and the page bookkeeping read (lengths, tiles, page table, new pages)."""
    spec = layout.settings.spec
    state = _bucket(layout.settings, buffers)
    h = buffers.packed.host_np
    B = len(layout.q_lens)
    fill_tiles(h["q_start"][:B], h["q_len"][:B], h["mixed_tiles"], h["mixed_used"], state.chunk_cols)
    buffers.packed.send(last="new_logical")
    used = h["mixed_used"]
    return TritonMixedPlan(state, spec.page_size, spec.head_dim, spec.dtype, layout.page_logical.device,
                           buffers.padded_batch, spec.head_dim ** -0.5, int(used[0]), int(used[1]))


def _section(dtype: torch.dtype, device: torch.device, group: int, head_dim: int, page_size: int, tokens: int,
             block_m: int, options: dict, section: int) -> CachedLauncher:
    """The launcher of one section of the tile list (0: chunk tiles, 1: decode tiles) for a GQA group."""
    consts = dict(GROUP=group, HEAD_DIM=head_dim, D_PAD=_next_pow2(max(head_dim, 16)), PAGE=page_size,
                  BLOCK_M=block_m, BLOCK_N=options["block_n"], TOKENS=tokens, TOK_PAD=max(16, _next_pow2(tokens)),
                  SUB=-(-tokens * group // block_m), SECTION=section,
                  F32_DOT=dtype == torch.float32 or device.type == "cpu")
    return CachedLauncher(_mixed_kernel, consts, dict(num_warps=options["num_warps"], num_stages=options["num_stages"]))


def launch_state(dtype: torch.dtype, device: torch.device, hq: int, hkv: int, head_dim: int, page_size: int,
                 chunk_cols: int, padded_batch: int, decode_options: dict | None = None, tokens: int = CHUNK_TOKENS,
                 chunk_options: dict | None = None) -> tuple:
    """((launcher, grid, first column) of the chunk tiles, the same of the decode tiles) for `hq` query heads in a
    bucket of `chunk_cols` chunk columns and `padded_batch` rows; decode_options: the decode tiles' launch options
    (default `launch_options` at padded_batch); tokens: queries per chunk tile (as `fill_tiles` was given);
    chunk_options: the chunk tiles' (default `mixed_options`). Fixed per bucket and query head count."""
    group = hq // hkv
    d_pad = _next_pow2(max(head_dim, 16))
    block_m = min(MAX_BLOCK_M, MAX_TILE_ELEMS // d_pad, _next_pow2(max(16, tokens * group)))
    sub = -(-tokens * group // block_m)
    programs = min(chunk_cols, math.ceil(CTAS_PER_SM * _sm_count(device) / (hkv * sub)))
    chunk = _section(dtype, device, group, head_dim, page_size, tokens, block_m,
                     chunk_options or mixed_options(dtype, head_dim, device, block_m), 0)
    decode_options = decode_options or launch_options(dtype, head_dim, device, padded_batch, hkv)
    decode = _section(dtype, device, group, head_dim, page_size, 1, max(16, _next_pow2(group)), decode_options, 1)
    return (chunk, (hkv * sub, programs), 0), (decode, (hkv, padded_batch), chunk_cols)


def _launch_state(kp: TritonMixedPlan, hq: int, hkv: int) -> tuple:
    """`launch_state` of the plan's bucket for `hq` query heads, made on the bucket's first launch with them."""
    state = launch_state(kp.dtype, kp.device, hq, hkv, kp.head_dim, kp.page_size, kp.bucket.chunk_cols,
                         kp.padded_batch, kp.bucket.decode_options)
    kp.bucket.by_heads[hq] = state
    return state


def launch(state: tuple, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, page_table: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
           tiles: torch.Tensor, used: torch.Tensor, scale: float, out: torch.Tensor, sections: tuple = (0, 1)) -> None:
    """Launch the given sections of the tile list with `launch_state`'s state. Shapes: q / out (B, L, Hq, D),
    k_new / v_new (B, L, Hkv, D), last dims contiguous; pools (Hkv, N * P, D) or (1, Hkv, N * P, D); page_table
    (>= B, W), q_start / q_len (>= B,) int32; tiles (2, C + Bp), used (2,) int32 (`fill_tiles`, rows < B)."""
    tensors = (q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, tiles, used, out)
    strides = (q.stride(0), q.stride(1), q.stride(2), k_pool.stride(-3), k_pool.stride(-2), k_new.stride(0),
               k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
               page_table.stride(0), out.stride(0), out.stride(1), out.stride(2))
    for section in sections:
        launcher, grid, first = state[section]
        _call(launcher, grid, tensors, (*strides, first, tiles.stride(0), scale * 1.4426950408889634))


def _call(launcher: CachedLauncher, grid: tuple, tensors: tuple, scalars: tuple) -> None:
    """Launch; a first launch whose stages do not fit the card's shared memory (the sizing is not measured yet:
    three pipelined key loops) is compiled again with one stage fewer, down to one."""
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
    tiles, used = np.zeros((2, cols + B), np.int32), np.zeros(2, np.int32)
    fill_tiles(q_start[:B].cpu().numpy(), q_len[:B].cpu().numpy(), tiles, used, cols)
    state = launch_state(q.dtype, q.device, Hq, k_new.shape[2], D, page_size, cols, B)
    out = torch.zeros_like(q)
    launch(state, q, k_pool, v_pool, k_new, v_new, page_table, q_start, q_len, torch.from_numpy(tiles).to(q.device),
           torch.from_numpy(used).to(q.device), scale, out)
    return out


def run(step: StepPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: Pools,
        scale: float | None) -> torch.Tensor:
    """Store each row's new K/V into its pages and attend its new queries causally over its history and them.

    Args: q (B or Bp, Lq, Hq, D), k / v (B or Bp, Lq, Hkv, D), validated by the cache (Lq >= the step's max q_len;
        row b's first q_lens[b] positions real, the rest never read).
    Returns: (B or Bp, Lq, Hq, D); positions past a row's q_len, and padding rows, are 0.
    """
    kp = step.kernel_plan
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    Hq = q.shape[2]
    bucket = kp.bucket
    state = bucket.by_heads.get(Hq) or _launch_state(kp, Hq, k.shape[2])
    out = torch.zeros(q.shape, dtype=kp.dtype, device=kp.device)                      # (B, Lq, Hq, D)
    buf = step.buffers
    # A section without tiles is skipped, unless a CUDA graph is being captured (replays serve later steps) or its
    # launcher never ran (its first launch loads its binary, which must not fall inside a later capture).
    graph = capturing(q)
    sections = tuple(s for s, n in enumerate((kp.chunk_tiles, kp.decode_tiles))
                     if n or graph or not state[s][0].launched)
    launch(state, q, pools.k_layers[layer], pools.v_layers[layer], k, v, buf.page_table, buf.q_start, buf.q_len,
           bucket.tiles, bucket.used, kp.scale_default if scale is None else scale, out, sections)
    return out


TritonMixedPlan.run = staticmethod(run)
