"""Sizing of the Triton paged-decode kernel: where it can run, split-KV slots per bucket, keys per split per step,
and launch options (key tile, warps, stages). Pure host code: imports Triton only to ask whether it is there.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

try:
    import triton
except ImportError:  # the CPU-only install has no Triton; `available()` says so
    triton = None

#: Smallest slice of keys a split takes (rounded up to the key tile).
MIN_SPLIT_KEYS = 128
#: Splits aim at this many CTAs with work per SM (batch x kv heads x splits ~ CTAS_PER_SM x SMs).
CTAS_PER_SM = 3
#: The grid has this many times the even share of split slots per (row, kv head), for a mixed batch's long rows.
SPLIT_HEADROOM = 2
#: At most this many splits per (sequence, kv head).
MAX_SPLITS = 64


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton, or the CPU with Triton's interpreter enabled.

    The interpreter must be on before Triton is first imported (TRITON_INTERPRET=1 in the environment): it
    swaps every @triton.jit function, Triton's own helpers included, at definition time.
    """
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: still exercise the merge


def decode_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split slots per (sequence, kv head) of a batch bucket: SPLIT_HEADROOM x the even share of about
    CTAS_PER_SM x the SM count, at most one per MIN_SPLIT_KEYS keys of max_seq_len and MAX_SPLITS.

    Fixed per batch bucket (a CUDA graph freezes the grid); `split_keys` decides each step how many of them
    each row uses. Measured on an H200 (scripts/triton_decode_sweep.py): 2-3 CTAs per SM with work and slices
    of >= 128 keys were within 3% of the best even split count at batch 1, 8, 32 and 128.
    """
    want = math.ceil(SPLIT_HEADROOM * CTAS_PER_SM * _sm_count(device) / (batch * kv_heads))
    most = max(1, math.ceil(max_seq_len / MIN_SPLIT_KEYS))
    return max(1, min(want, most, MAX_SPLITS))


def split_keys(lengths: Sequence[int], kv_heads: int, num_splits: int, device: torch.device) -> int:
    """Keys per split for one step (the kernel rounds it up to its key tile).

    The longest row is cut into k = ceil(CTAS_PER_SM x SMs x longest / (kv_heads x total keys)) slices (at most
    num_splits), so that about CTAS_PER_SM x SMs CTAs have work in all and none has more than longest / k keys.
    Uniform lengths give the even split of CTAS_PER_SM x SMs CTAs over the rows; in a mixed batch short rows take
    fewer slices and the longest more.
    Args: lengths, each row's keys this step (its new token included); num_splits, the bucket's split slots.
    """
    longest, total = max(lengths, default=0), sum(lengths)
    if longest == 0:
        return MIN_SPLIT_KEYS
    k = math.ceil(CTAS_PER_SM * _sm_count(device) * longest / (kv_heads * total))
    return max(MIN_SPLIT_KEYS, math.ceil(longest / max(1, min(k, num_splits))))


#: Hopper: 64-key tiles when an even split has at most this many splits per (row, kv head) ...
SMALL_TILE_MAX_SPLITS = 4
#: ... and at most this many CTAs per SM (see `launch_options`).
SMALL_TILE_MAX_CTAS_PER_SM = 4


def pipeline_budget(device: torch.device) -> tuple[bool, int, int]:
    """(Hopper, pipeline stages, shared-memory bytes the stages may fill) of the Triton kernels on `device`:
    3 stages in ~200 KB on Hopper (measured, see `launch_options`), else 2 in ~96 KB (not measured)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return (hopper, 3, 200 * 1024) if hopper else (hopper, 2, 96 * 1024)


def fit_key_tile(block_n: int, head_dim: int, dtype: torch.dtype, stages: int, budget: int, fixed: int = 0) -> int:
    """`block_n` halved (down to 16) until `stages` stages of K and V tiles plus `fixed` bytes (a query tile) fit
    `budget` bytes of shared memory."""
    row_bytes = 2 * _next_pow2(max(head_dim, 16)) * dtype.itemsize         # one key's K + V
    while block_n > 16 and stages * block_n * row_bytes + fixed > budget:
        block_n //= 2
    return block_n


@functools.lru_cache(maxsize=None)  # called once per layer: no device query on the hot path
def launch_options(dtype: torch.dtype, head_dim: int, device: torch.device, batch: int | None = None,
                   kv_heads: int = 1) -> dict:
    """Key tile, warps and pipeline stages of the split kernel for a launch over `batch` rows of `kv_heads` kv heads.
    The cache passes its bucket's padded batch, so every batch of a bucket launches alike (one CUDA graph per
    bucket); `paged_decode` called without options uses its own row count.

    Hopper, measured on an H200 (bf16, 32/8 heads, D 128; scripts/triton_decode_sweep.py, results/h200-2026-11-29c):
    128-key tiles, 4 warps, 3 stages (the largest tile whose 3 stages of K and V fit in ~200 KB of shared memory)
    were within 4% of the best of 12 options at batch 1, 8 and 128 and with 32 kv heads (64-key tiles 4-18%
    slower there); at batch 16-64, where an even split of CTAS_PER_SM x SMs has 1-4 splits and 448-512 CTAs
    (at most SMALL_TILE_MAX_CTAS_PER_SM per SM), 64-key tiles were 5-15% faster with 8k-32k keys per row, so
    such a batch gets 64-key tiles. The rule is fitted to those measurements, not derived. Elsewhere (not
    measured): 2 stages within ~96 KB.
    """
    hopper, stages, budget = pipeline_budget(device)
    block_n = 128
    if hopper and batch is not None:
        sms = _sm_count(device)
        even = math.ceil(CTAS_PER_SM * sms / (batch * kv_heads))
        if even <= SMALL_TILE_MAX_SPLITS and batch * kv_heads * even <= SMALL_TILE_MAX_CTAS_PER_SM * sms:
            block_n = 64
    return {"block_n": fit_key_tile(block_n, head_dim, dtype, stages, budget), "num_warps": 4, "num_stages": stages}


@functools.lru_cache(maxsize=None)
def worklist_options(dtype: torch.dtype, head_dim: int, device: torch.device, batch: int, kv_heads: int) -> dict:
    """Key tile, warps and stages of the work-list kernel (the cache's decode steps) for a bucket of `batch` rows.

    Hopper: 64-key tiles in 3 stages (two CTAs fit an SM's shared memory, so one CTA's first loads overlap the
    other's stream) unless the rows alone make more than SMALL_TILE_MAX_CTAS_PER_SM CTAs per SM (each row then is
    one item: `launch_options`' 128-key tiles). Chosen on an H200 from a sweep of 7 sizing rules over 21 decode
    cases (scripts/gpu_sweep19.py --only sizing), then measured as the cache runs it against the previous sizing in
    one run (scripts/gpu_decode_classes.py, results/h200-2026-12-03b call4; 32/8 heads, D 128 unless named):
    8 x 16384 keys 132.5 vs 153.8 us, 8 x 4096 (page 16) 43.9 vs 47.2, 12/2 heads 32 x 8192 73.3 vs 82.3,
    1 x 32768 43.2 vs 45.3; 13 cases within 1%; the one loss: 8 rows of 256..65536 keys, 104.0 vs 100.7. (A target
    of 4 CTAs per SM helped some few-row cases and lost 18% on 32 x 4096: not taken.)
    """
    hopper, stages, budget = pipeline_budget(device)
    if not (hopper and batch * kv_heads <= SMALL_TILE_MAX_CTAS_PER_SM * _sm_count(device)):
        return launch_options(dtype, head_dim, device, batch, kv_heads)
    return {"block_n": fit_key_tile(64, head_dim, dtype, stages, budget), "num_warps": 4, "num_stages": stages}


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


