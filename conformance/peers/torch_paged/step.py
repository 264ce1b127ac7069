"""One step of the adapter: the LOGICAL block mask the peer converts, the mods over logical positions, and the
index tensors that route the step's tokens to the peer's `assign` and the queries to block-mask rows.

Shapes: R = block-mask rows (page-table rows 0..R-1 in "slots" mode, bucketed), Lqp = padded query length,
Qb = query blocks of the mask, W = logical pages of the longest sequence (spec.max_pages_per_seq), P = page size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch.nn.attention.flex_attention import BlockMask

from paged.mods import causal

RowMode = Literal["slots", "subset"]

__all__ = ["PeerPlan", "RowBuffers", "RowMode", "bucket", "padded_query_len", "logical_block_lists",
           "logical_mods", "token_routes"]


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): fewer distinct shapes, so fewer compiles."""
    return 1 << (max(n, minimum) - 1).bit_length()


def padded_query_len(max_q_len: int) -> int:
    """1 for a pure decode step (FlexDecoding's shape), else a power of two >= 16."""
    return 1 if max_q_len == 1 else bucket(max_q_len, 16)


@dataclass
class PeerPlan:
    """What plan() built for the step's run() calls (B = sequences in the step, T = their new tokens)."""

    seq_ids: tuple
    q_lens: tuple[int, ...]
    start_lens: tuple[int, ...]
    max_q_len: int
    mask_rows: torch.Tensor        # (B,) block-mask row of each step row
    token_rows: torch.Tensor       # (T,) row of each new token in the caller's flattened (B * max_q_len) inputs
    token_batch: torch.Tensor      # (T,) page-table row of each new token (assign's batch_idx)
    token_pos: torch.Tensor        # (T, 1) logical position of each new token (assign's input_pos)
    valid: torch.Tensor            # (B, max_q_len) real query positions
    padded_rows: int
    padded_q_len: int
    block_mask: BlockMask
    score_mod: Callable | None
    layers_run: set


class RowBuffers:
    """Per-row-count (R,) int64 tensors the logical mods read, refilled in place every step."""

    def __init__(self, rows: int, device: torch.device) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        self.q_start = torch.zeros(rows, **i64)   # logical position of the row's first new token
        self.q_len = torch.zeros(rows, **i64)     # new tokens of the row (0: not in the step)
        self.kv_len = torch.zeros(rows, **i64)    # stored length after the step (the peer's upper bound)
        self.step_row = torch.zeros(rows, **i64)  # row of the sequence in the caller's step (the mods' b)
        self.logical_mods: dict[tuple, tuple[Callable, Callable | None]] = {}


def logical_mods(buf: RowBuffers, mask_mod: Callable | None,
                 score_mod: Callable | None) -> tuple[Callable, Callable | None]:
    """The step's mods over (block-mask row, padded query index, LOGICAL kv position), as the peer expects.

    The peer translates physical kv slots to logical ones (and checks `kv < kv_len[b]`); the adapter adds the
    query's logical position and the sequence's row in the caller's step. Cached per mod pair, so a serving
    loop passes compiled flex the same functions every step.
    """
    key = (mask_mod, score_mod)
    if key not in buf.logical_mods:
        user_mask = mask_mod or causal
        q_start, q_len, step_row = buf.q_start, buf.q_len, buf.step_row

        def logical_mask(b, h, q_idx, kv_idx):
            return (q_idx < q_len[b]) & user_mask(step_row[b], h, q_start[b] + q_idx, kv_idx)

        logical_score = None
        if score_mod is not None:
            def logical_score(score, b, h, q_idx, kv_idx):
                return score_mod(score, step_row[b], h, q_start[b] + q_idx, kv_idx)

        buf.logical_mods[key] = (logical_mask, logical_score)
    return buf.logical_mods[key]


def logical_block_lists(q_start: torch.Tensor, q_len: torch.Tensor, page_size: int, q_block: int,
                        padded_q_len: int, width: int, plain_causal: bool) -> tuple[torch.Tensor, ...]:
    """`BlockMask.from_kv_blocks`' four tensors over LOGICAL pages (page j of a row is its j-th page).

    q_start, q_len: (R,) int64 host. Returns kv_num_blocks (R, 1, Qb), kv_indices (R, 1, Qb, W),
    full_kv_num_blocks (R, 1, Qb), full_kv_indices (R, 1, Qb, W). A query block lists the pages its queries may
    read: with `plain_causal`, pages wholly at or before its first query are full (unmasked) and pages after its
    last query are left out; with a user mask every stored page is listed as masked. Blocks with no query list
    nothing.
    """
    stored = torch.div(q_start + q_len + page_size - 1, page_size, rounding_mode="floor")[:, None]   # (R, 1)
    top = torch.arange(0, padded_q_len, q_block)[None, :]                        # (1, Qb) first row of each block
    bottom = torch.minimum(top + q_block, q_len[:, None]) - 1                    # (R, Qb) last real row
    if plain_causal:
        whole = torch.div(q_start[:, None] + top + 1, page_size, rounding_mode="floor")
        reach = torch.minimum(torch.div(q_start[:, None] + bottom, page_size, rounding_mode="floor") + 1, stored)
    else:
        whole = torch.zeros_like(bottom)
        reach = stored.expand_as(bottom)
    has_queries = top < q_len[:, None]
    whole = whole * has_queries
    partial = (reach - whole) * has_queries                                      # (R, Qb) masked pages
    page = torch.arange(width)[None, None, :]                                    # (1, 1, W)
    masked_pages = torch.where(page < partial[..., None], whole[..., None] + page, 0)
    full_pages = torch.where(page < whole[..., None], page, 0)
    return partial[:, None], masked_pages[:, None], whole[:, None], full_pages[:, None]


def token_routes(q_lens: tuple[int, ...], rows: list[int], start_lens: tuple[int, ...],
                 max_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host index tensors of the step's T real tokens: their rows in the caller's flattened (B * max_q) inputs
    (T,), their page-table rows (T,) and logical positions (T, 1) for `assign`, and the (B, max_q) mask of real
    query positions."""
    token_rows = torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(q_lens)])
    token_batch = torch.cat([torch.full((q,), r) for r, q in zip(rows, q_lens)])
    token_pos = torch.cat([torch.arange(s, s + q) for s, q in zip(start_lens, q_lens)])[:, None]
    valid = torch.arange(max_q)[None, :] < torch.tensor(q_lens)[:, None]
    return token_rows, token_batch, token_pos, valid
