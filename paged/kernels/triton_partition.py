"""The work list of the Triton decode kernel: a step's keys cut into slices ("items") balanced over the card.

Pure host code (numpy), run once per step in `plan()` from the host's lengths:

    items      (3, M) int32: item i is row items[0, i] (-1: unused), keys [items[1, i], items[2, i])
    row_first  (Bp,) int32: the row's first item (its items are contiguous)
    row_count  (Bp,) int32: the row's items (0: no keys, 1: no merge, > 1: merged)

M = `max_items` is fixed per (padded batch, kv heads) bucket, so the grid (Hkv, M) of a CUDA graph captured once
per bucket stays right; unused items do nothing. Every row is cut into slices of one length `chunk`: the longest
row takes k = ceil(target x longest / total) of them, so that the step's keys make about `target` items (about
CTAS_PER_SM x SMs CTAs over the kv heads) and no item is longer than longest / k. A long row beside short ones
is cut finely (all SMs stream it at once), a short row is one item; a batch of equal rows gets exactly the even
split of the earlier per-row kernel (ceil(CTAS_PER_SM x SMs / (B x Hkv)) slices per row). Rows are listed
longest first, so the longest items start first (the grid runs item by item, all kv heads of an item together).

The merge costs a split row's every slice a float32 partial of its G query heads written and read back: 8 x G x D
bytes per kv head against 4 x chunk x D of 16-bit K and V, i.e. 2G / chunk of the K/V read. Slices are therefore
at least MERGE_KEYS_PER_QHEAD x G keys long (merge traffic <= 1/4 of the read), unless that leaves fewer items
than one CTA per SM (target / CTAS_PER_SM): large MQA groups trade some merge traffic for the card's parallelism.
A row of one item is written by the item kernel itself and pays no merge.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from paged.kernels.triton_sizing import CTAS_PER_SM, MIN_SPLIT_KEYS, _sm_count

#: Slices are at least this many keys per query head of a kv head's group (the merge's traffic, above).
MERGE_KEYS_PER_QHEAD = 8


def target_items(kv_heads: int, device: torch.device) -> int:
    """Items a step aims at: about CTAS_PER_SM x SMs CTAs over the kv heads."""
    return math.ceil(CTAS_PER_SM * _sm_count(device) / kv_heads)


def max_items(padded_batch: int, kv_heads: int, device: torch.device) -> int:
    """M, the work list's fixed length for a bucket: the target plus one item per row (each row's last, partial
    slice). `partition` never needs more (it lengthens the slices where it would)."""
    return target_items(kv_heads, device) + padded_batch


def min_slice_keys(block_n: int) -> int:
    """Fewest keys a slice takes: MIN_SPLIT_KEYS rounded up to the key tile."""
    return -(-max(MIN_SPLIT_KEYS, block_n) // block_n) * block_n


def merge_slice_keys(block_n: int, group: int) -> int:
    """The slice length that keeps a GQA group of `group` query heads' merge traffic within 1/4 of the K/V read
    (MERGE_KEYS_PER_QHEAD x group, rounded up to the key tile); `partition` applies it softly."""
    return -(-MERGE_KEYS_PER_QHEAD * group // block_n) * block_n


def slice_keys(longest: int, total: int, target: int, block_n: int, min_keys: int) -> int:
    """The step's slice length: the longest row in ceil(target x longest / total) slices, rounded up to the key
    tile, at least min_keys. Args: the longest row's keys and all rows' keys (> 0)."""
    k = -(-target * longest // total)
    return max(-(-longest // (k * block_n)) * block_n, min_keys)


def partition(lengths: np.ndarray, items: np.ndarray, row_first: np.ndarray, row_count: np.ndarray, target: int,
              block_n: int, min_keys: int, merge_keys: int = 0, chunk: int = 0) -> tuple[int, int]:
    """Fill the work list for rows of `lengths` (B,) keys (int64; rows past B are padding): items (3, M),
    row_first and row_count (>= B,) in place, as the module docstring lays them out. min_keys: the shortest
    slice (`min_slice_keys`); merge_keys: the soft one (`merge_slice_keys`); chunk > 0: this slice length instead
    of the step's own (a multiple of block_n; sweeps), lengthened only where the list would overflow M.
    Returns (items used, slice length); (0, 0) when no row has keys. Vectorised: ~20 numpy calls whatever B."""
    B, M = lengths.shape[0], items.shape[1]
    longest = int(lengths.max()) if B else 0
    if row_count.shape[0] > B:
        row_first[B:], row_count[B:] = 0, 0
    if longest == 0:
        row_first[:], row_count[:] = 0, 0
        items[0], items[1:] = -1, 0
        return 0, 0
    total = int(lengths.sum())
    if chunk <= 0:
        chunk = slice_keys(longest, total, target, block_n, min_keys)
        if merge_keys > chunk:  # longer slices for the merge's sake, down to one CTA per SM
            floor = slice_keys(longest, total, -(-target // CTAS_PER_SM), block_n, min_keys)
            chunk = max(chunk, min(merge_keys, floor))
    if longest <= chunk:                                                # every row one item: no merge, no sort
        n = _whole_rows(lengths, items, row_first, row_count)
    else:
        counts = (lengths + (chunk - 1)) // chunk                       # (B,) slices per row
        if int(counts.sum()) > M:  # sum(ceil(n / chunk)) <= total / chunk + B <= M (M - B = the target >= 1)
            chunk = max(chunk, -(-total // ((M - B) * block_n)) * block_n)
            counts = (lengths + (chunk - 1)) // chunk
        n = _split_rows(lengths, counts, chunk, items, row_first, row_count)
    items[0, n:], items[1:, n:] = -1, 0
    return n, chunk


def _whole_rows(lengths: np.ndarray, items: np.ndarray, row_first: np.ndarray, row_count: np.ndarray) -> int:
    """One item per row, in row order (a row without keys gets none: its count is 0)."""
    B = lengths.shape[0]
    rows = np.arange(B)
    items[0, :B], items[1, :B], items[2, :B] = rows, 0, lengths
    row_first[:B] = rows
    row_count[:B] = lengths > 0
    if row_count[:B].all():
        return B
    keep = np.flatnonzero(lengths)                                      # drop the rows without keys
    n = keep.shape[0]
    items[0, :n], items[2, :n] = keep, lengths[keep]
    row_first[keep] = np.arange(n)
    return n


def _split_rows(lengths: np.ndarray, counts: np.ndarray, chunk: int, items: np.ndarray, row_first: np.ndarray,
                row_count: np.ndarray) -> int:
    """Rows of counts (B,) slices of `chunk` keys, longest rows first; returns the items used."""
    order = np.argsort(-counts, kind="stable")                          # longest rows first
    per = counts[order]
    first = per.cumsum() - per                                          # (B,) first item of each listed row
    n = int(first[-1] + per[-1])
    row = np.repeat(order, per)                                         # (n,) the row of each item
    start = (np.arange(n) - np.repeat(first, per)) * chunk              # (n,)
    items[0, :n], items[1, :n] = row, start
    np.minimum(start + chunk, lengths[row], out=start)
    items[2, :n] = start
    row_first[order] = first
    row_count[:lengths.shape[0]] = counts
    return n
