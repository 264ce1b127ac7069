"""StepPlan: everything one step's attention needs, built ONCE per step and reused by every layer.

FlashInfer's plan/run split: `PagedKVCache.plan` decides where the new tokens go (allocating pages) and
fills the step's device tensors here; `PagedKVCache.run` is then called once per layer and only reads them.

Shapes are bucketed (batch and query length to powers of two) and the tensors of a bucket are reused in
place every step, so compiled FlexAttention sees the same shapes and the same mask function each time and
never recompiles as sequences grow, join or leave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from paged.mods import MaskMod, ScoreMod
from paged.transfer import PackedStaging

if TYPE_CHECKING:
    from paged.allocator import PageAllocator
    from paged.cache import SequenceState
    from paged.host_table import HostPageTable
    from paged.kernels.base import KernelPlan


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def padded_query_len(max_q_len: int) -> int:
    """1 for a pure decode step (FlexDecoding's shape), else a power of two >= 16."""
    return 1 if max_q_len == 1 else bucket(max_q_len, 16)


class StepBuffers:
    """Device tensors of one (padded batch, padded query length) bucket, refilled in place each step.

    Attributes (Bp = padded batch, W = page-table width, Wb = block-list width (>= W: the CPU kernel needs the whole
    pool), Qb = query blocks, Lqp = padded query length):
        q_start: (Bp,) int32, logical position of each row's first new token (its length before the step).
        q_len: (Bp,) int32, new tokens per row (0 for padding rows).
        kernel fields: those the cache's kernels declare (`paged.kernels.step_fields`), e.g. the Triton decode
            kernel's work list, the mixed kernel's tile list; read them as `packed.dev[name]` (host: `host[name]`, `packed.host_np[name]`).
        page_table: (Bp, W) int32, physical page of each logical page, -1 past the sequence's pages.
        slots, token_rows: (Bp * Lqp,) int64; a step's slot mapping and token rows are their first T entries.
        new_pages, new_logical: (Bp * (ceil(Lqp / P) + 1),) int64 / int32: the pages a step hands out and their
            logical indices, for the device's page -> logical table (a step adds at most ceil(q / P) pages per
            row, plus one copied on write).
        kv_num_blocks, full_kv_num_blocks: (Bp, 1, Qb) int32, masked / unmasked pages per query block.
        kv_indices, full_kv_indices: (Bp, 1, Qb, Wb) int32, those pages, left-aligned.
        host: the pinned twins of all of these (on the CPU the tensors themselves): plan() writes a step's values
            there and `send()`s them in one copy (`transfer.PackedStaging`); a Triton decode or mixed step sends
            only the fields up to new_logical (its kernel stores the new K/V itself: the device's slots and
            token_rows are not this step's; read the host twins), a step storing through `paged.kernels.store`
            up to token_rows.
    Every tensor keeps its storage for the cache's lifetime, so a CUDA graph captured over `run()` calls
    reads the next step's plan when replayed after the next `plan()` (same batch and query length).
    """

    def __init__(self, padded_batch: int, padded_q_len: int, q_block: int, width: int, page_size: int,
                 device: torch.device, block_width: int | None = None, kernel_fields: Sequence[tuple] = ()):
        self.padded_batch, self.padded_q_len, self.q_block, self.width = padded_batch, padded_q_len, q_block, width
        self.block_width = bw = block_width or width
        Bp, Qb, T = padded_batch, -(-padded_q_len // q_block), padded_batch * padded_q_len
        new = Bp * (-(-padded_q_len // page_size) + 1)
        i32, i64 = torch.int32, torch.long
        self.packed = PackedStaging([
            ("q_start", (Bp,), i32, 0), ("q_len", (Bp,), i32, 0), *kernel_fields,   # sent with a decode step's prefix
            ("page_table", (Bp, width), i32, -1),
            ("new_pages", (new,), i64, 0), ("new_logical", (new,), i32, -1),       # a fused-store step's last
            ("slots", (T,), i64, 0), ("token_rows", (T,), i64, torch.arange(T)),   # decode buckets keep arange
            ("kv_num_blocks", (Bp, 1, Qb), i32, 0), ("full_kv_num_blocks", (Bp, 1, Qb), i32, 0),
            ("kv_indices", (Bp, 1, Qb, bw), i32, 0), ("full_kv_indices", (Bp, 1, Qb, bw), i32, 0),
        ], device)
        self.host = self.packed.host
        dev = self.packed.dev
        self.q_start, self.q_len = dev["q_start"], dev["q_len"]
        self.page_table, self.slots, self.token_rows = dev["page_table"], dev["slots"], dev["token_rows"]
        self.new_pages, self.new_logical = dev["new_pages"], dev["new_logical"]
        self.kv_num_blocks, self.kv_indices = dev["kv_num_blocks"], dev["kv_indices"]
        self.full_kv_num_blocks, self.full_kv_indices = dev["full_kv_num_blocks"], dev["full_kv_indices"]
        # The physical->logical wrappers are built once per (bucket, user mods) so the compiled kernel
        # sees the same functions, and so the same guards, every step.
        self.wrapped: dict[tuple, tuple[Callable, Callable, Callable | None]] = {}
        # What each kernel fixes once per bucket (kernel options, split slots, launch constants), by kernel name:
        # set by the kernel (`paged.kernels`) on its first step in the bucket.
        self.kernel_state: dict[str, Any] = {}


def physical_mods(
    buffers: StepBuffers,
    page_logical: torch.Tensor,
    page_size: int,
    mask_mod: MaskMod,
    score_mod: ScoreMod | None,
) -> tuple[Callable, Callable, Callable | None]:
    """Wrap logical mods into FlexAttention mods over physical pool slots.

    Returns (checked_mask, listed_mask, score_mod):
        checked_mask: right on its own (eager FlexAttention reads nothing else, over the whole pool): a slot is
            visible to a query only if its page belongs to the query's sequence (ownership), the query row is
            real, and the user's logical mask keeps (query position, key position). Keys past the sequence's
            stored length are never visible because a causal or prefix mask only reaches positions that exist
            (checked via `kv < kv_len`).
        listed_mask: the same minus the ownership check: right only in a kernel that visits nothing but the pages
            listed for the row, which are that row's own (inductor's FlexAttention kernels, which also skip the
            mask on full pages). One gather per masked element instead of two.
        score_mod: the user's score_mod at logical positions, or None.
    `torch.compiler.is_compiling()` cannot choose between them inside the mask: eager FlexAttention is itself a
    dynamo trace (torch >= 2.5 compiles it with backend="eager"), so the caller chooses (`PagedKVCache.run`).
    """
    page_table, q_start, q_len = buffers.page_table, buffers.q_start, buffers.q_len

    def logical_pos(kv_idx):
        logical_page = page_logical[kv_idx // page_size]  # same logical index for every owner (forks share prefixes)
        return logical_page, logical_page * page_size + kv_idx % page_size

    def visible(b, h, q_idx, kv_pos):
        q_pos = q_start[b] + q_idx
        return (kv_pos < q_start[b] + q_len[b]) & (q_idx < q_len[b]) & mask_mod(b, h, q_pos, kv_pos)

    def listed_mask(b, h, q_idx, kv_idx):
        return visible(b, h, q_idx, logical_pos(kv_idx)[1])

    def checked_mask(b, h, q_idx, kv_idx):
        logical_page, kv_pos = logical_pos(kv_idx)
        owned = (logical_page >= 0) & (page_table[b, logical_page.clamp(min=0)] == kv_idx // page_size)
        return owned & visible(b, h, q_idx, kv_pos)

    if score_mod is None:
        return checked_mask, listed_mask, None

    def paged_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_start[b] + q_idx, logical_pos(kv_idx)[1])

    return checked_mask, listed_mask, paged_score


@dataclass
class StepPlan:
    """One step's plan: which sequences, how many new tokens each, where they go, and its kernel's plan.

    Attributes:
        seq_ids: the step's sequences, in row order.
        q_lens: new tokens per sequence (1 for decode, more for a prefill chunk).
        start_lens: each sequence's length before the step (= logical position of its first new token).
        slot_mapping: (T,) int64, pool slot (page * P + offset) of each new token, T = sum(q_lens).
        token_rows: (T,) int64, row of each new token in the caller's flattened (B * max_q_len) inputs.
            It is the identity exactly when T == B * max_q_len (every row full), and `run` relies on that.
            Both are views of the bucket's device buffers, except on a step whose kernel stores the new K/V
            itself (`FUSED_STORE`: Triton decode and mixed steps), which never sends them: there they are views of
            the host twins (pinned CPU memory on CUDA), valid until the bucket's next plan().
        kernel_plan: the step's kernel's typed plan (`paged.kernels`: `FlexPlan`, `TritonDecodePlan`,
            `TritonMixedPlan`, `SdpaPrefillPlan`), set by
            plan() after the page bookkeeping; `kernel` is its name.
        layers_run: the layers run so far under this plan.
        expect: (num_layers, dtype, device, Hkv, D, accepted batch sizes) for `fits`, set by the cache.
    The tensors are views of the bucket's persistent StepBuffers: the next plan() of the same bucket overwrites
    them, so a plan is valid only until the next plan() (the cache only ever runs its current one).
    """

    seq_ids: tuple[Hashable, ...]
    q_lens: tuple[int, ...]
    start_lens: tuple[int, ...]
    max_q_len: int
    buffers: StepBuffers
    slot_mapping: torch.Tensor
    token_rows: torch.Tensor
    kernel_plan: KernelPlan
    layers_run: set[int]
    expect: tuple = ()

    def fits(self, layer: object, q: object, k: object, v: object, scale: object) -> bool:
        """Whether one layer's run() inputs surely pass `validation.check_run` under this plan: a few comparisons
        with values fixed at plan time (the common case). False lets check_run decide: it raises the precise error,
        or accepts an unusual valid call (e.g. an input requiring grad under no_grad, an int scale)."""
        layers, dtype, device, hkv, d, batches = self.expect
        if type(layer) is not int or not 0 <= layer < layers or layer in self.layers_run:
            return False
        if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
            return False
        if scale is not None and not (type(scale) is float and 0.0 < scale < math.inf):
            return False
        qs, ks = q.shape, k.shape
        return (q.dtype is dtype and k.dtype is dtype and v.dtype is dtype and len(qs) == 4 and ks == v.shape
                and qs[0] in batches and qs[1] >= self.max_q_len and qs[3] == d and ks[0] == qs[0]
                and ks[1] == qs[1] and ks[2] == hkv and ks[3] == d and qs[2] > 0 and qs[2] % hkv == 0
                and q.device == device and k.device == device and v.device == device
                and not (q.requires_grad or k.requires_grad or v.requires_grad))

    @property
    def kernel(self) -> str:
        """The step's kernel: "flex" (FlexAttention), "triton" (the Triton decode kernel), "triton_mixed" (the Triton
        mixed prefill+decode kernel) or "sdpa_prefill" (fresh prefill on SDPA)."""
        return self.kernel_plan.name

    @property
    def block_mask(self) -> BlockMask | None:
        """FlexAttention's BlockMask for the cache's own call; None on a step of a kernel without one."""
        return getattr(self.kernel_plan, "block_mask", None)

    @block_mask.setter
    def block_mask(self, value: BlockMask) -> None:
        self.kernel_plan.block_mask = value

    @property
    def checked_block_mask(self) -> BlockMask | None:
        """The block mask for a call that may run FlexAttention eagerly (`paged.kernels.flex.FlexPlan`)."""
        return getattr(self.kernel_plan, "checked_block_mask", None)

    @property
    def score_mod(self) -> Callable | None:
        """The physical score_mod of a FlexAttention step, else None."""
        return getattr(self.kernel_plan, "score_mod", None)

    @property
    def batch(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def bucket(self) -> tuple[int, int, str]:
        """(padded batch, padded query length, kernel): the shape a compiled or graphed step is specialised on."""
        return self.buffers.padded_batch, self.buffers.padded_q_len, self.kernel


def copies_needed(states: Sequence[SequenceState], allocator: PageAllocator, page_size: int) -> list[bool]:
    """Which of a step's sequences must copy their shared, partly filled last page before writing into it.

    Writers are taken in step order; one whose page no longer has another owner (every other owner
    already copied it in this step) writes in place, so a page is never copied by all its owners.
    """
    if not allocator.shared_count:                          # no forks alive: nothing is shared
        return [False] * len(states)
    owners: dict[int, int] = {}
    cow = []
    for st in states:
        page = st.pages[-1] if st.length % page_size else None
        if page is None:
            cow.append(False)
            continue
        left = owners.setdefault(page, allocator.refcount(page))
        cow.append(left > 1)
        owners[page] = left - 1 if left > 1 else left
    return cow


def page_growth(start_lens: Sequence[int], q_lens: Sequence[int], page_size: int) -> list[int]:
    """Pages each row of a step adds: ceil((start + q) / P) - ceil(start / P) (a sequence of n stored tokens holds
    exactly ceil(n / P) pages), written with floors: ceil(n / P) = (n - 1) // P + 1 for n >= 0."""
    P = page_size
    return [(n + q - 1) // P - (n - 1) // P for n, q in zip(start_lens, q_lens)]


def commit_pages(states: Sequence[SequenceState], q_lens: Sequence[int], grow: Sequence[int], cow: Sequence[bool],
                 new_pages: list[int], allocator: PageAllocator) -> tuple[list, list, list, list, list]:
    """Hand a step's freshly allocated pages to its sequences (copies on write first, then growth) and advance
    their lengths. grow: the pages each row adds (`page_growth`). Returns (pages, their logical indices, their
    host-table rows, (old, fresh) copies, freed pages). Only rows that take a page are visited one by one.
    """
    it = iter(new_pages)
    assigned, assigned_logical, assigned_rows, copies, freed = [], [], [], [], []
    busy = [i for i, g in enumerate(grow) if g] if not any(cow) else [i for i, c in enumerate(cow) if c or grow[i]]
    for i in busy:                                                                      # in step order
        st = states[i]
        if cow[i]:
            old, fresh = st.pages[-1], next(it)
            copies.append((old, fresh))
            freed += allocator.release([old])
            st.pages[-1] = fresh
            assigned.append(fresh)
            assigned_logical.append(len(st.pages) - 1)
            assigned_rows.append(st.row)
        for _ in range(grow[i]):
            assigned.append(next(it))
            assigned_logical.append(len(st.pages))
            assigned_rows.append(st.row)
            st.pages.append(assigned[-1])
    for st, q in zip(states, q_lens):
        st.length += q
    return assigned, assigned_logical, assigned_rows, copies, freed


def fill_step(buffers: StepBuffers, table: HostPageTable, rows: list[int], q_lens: tuple[int, ...], max_q: int,
              start_lens: tuple[int, ...], assigned: list[int], assigned_logical: list[int], page_size: int) -> int:
    """Write a step's page bookkeeping into the bucket's host buffers (its pinned twin on CUDA; the step's kernel
    plan sends them): lengths, page table (from `table`'s `rows`, which already hold the step's new pages), the
    new pages and their logical indices, and the slot and input row of every new token. max_q = max(q_lens).
    Returns T = sum(q_lens).
    """
    P, B = page_size, len(q_lens)
    h = buffers.packed.host_np
    # Every tensor of the step goes into the bucket's pinned twin, then to the GPU in ONE copy that never
    # waits for it (transfer.PackedStaging); begin() waits only if the host is a whole round ahead.
    buffers.packed.begin()
    q_start, q_len, page_table = h["q_start"], h["q_len"], h["page_table"]   # (Bp,), (Bp,), (Bp, W)
    q_start[:B], q_start[B:] = start_lens, 0
    q_len[:B], q_len[B:] = (1 if max_q == 1 else q_lens), 0
    table.gather_np(rows, page_table)
    if assigned:
        h["new_pages"][:len(assigned)] = assigned
        h["new_logical"][:len(assigned)] = assigned_logical
    if max_q == 1:                      # decode: T = B, token_rows is the bucket's arange; one slot per row
        start = q_start[:B].astype(np.int64)
        h["slots"][:B] = page_table[np.arange(B), start // P] * np.int64(P) + start % P
        return B
    lens = q_len[:B].astype(np.int64)                                                      # (B,)
    owner = np.repeat(np.arange(B), lens)                                                  # (T,)
    T = owner.size
    offset = np.arange(T) - np.repeat(np.cumsum(lens) - lens, lens)                        # (T,)
    pos = q_start[owner].astype(np.int64) + offset                                         # (T,)
    h["slots"][:T] = page_table[owner, pos // P] * np.int64(P) + pos % P
    h["token_rows"][:T] = owner * max_q + offset
    return T


def fill_block_lists(
    buffers: StepBuffers,
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    page_size: int,
    causal_default: bool,
) -> dict[str, torch.Tensor]:
    """Compute the block lists of every (row, query block) on the host.

    Args:
        page_table: (Bp, W) int32 host page table; num_pages, q_start, q_len: (Bp,) int64 host.
        causal_default: the mask is plain causality, so pages wholly before a query block are FULL (no mask
            needed: every query of the block sees every slot) and pages wholly after it are skipped. With
            a user mask every stored page is listed as masked.
    Returns the host tensors for kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices (the index lists
    padded with 0 to the buffers' block width).
    """
    bp, width = page_table.shape
    qb = buffers.q_block
    num_q_blocks = -(-buffers.padded_q_len // qb)
    block = torch.arange(num_q_blocks)                                   # (Qb,)
    first_row = block * qb                                               # (Qb,)
    last_row = torch.minimum((block + 1) * qb, q_len[:, None]) - 1       # (Bp, Qb)
    live = first_row[None, :] < q_len[:, None]                           # (Bp, Qb) block has real queries
    if causal_default:
        first_pos = q_start[:, None] + first_row[None, :]
        last_pos = q_start[:, None] + last_row
        n_full = torch.div(first_pos + 1, page_size, rounding_mode="floor")      # pages ending <= first query
        n_visible = torch.div(last_pos, page_size, rounding_mode="floor") + 1    # pages starting <= last query
    else:
        n_full = torch.zeros(bp, num_q_blocks, dtype=torch.long)
        n_visible = num_pages[:, None].expand(bp, num_q_blocks)
    n_full = torch.where(live, n_full, 0)
    n_visible = torch.where(live, torch.minimum(n_visible, num_pages[:, None]), 0)
    col = torch.arange(width)                                            # (W,)
    table = page_table.long()[:, None, :].expand(bp, num_q_blocks, width)
    src = (n_full[..., None] + col).clamp(max=width - 1)                 # (Bp, Qb, W)
    masked_ok = col < (n_visible - n_full)[..., None]
    kv_indices = torch.where(masked_ok, table.gather(2, src), 0)
    full_indices = torch.where(col < n_full[..., None], table, 0)
    pad = (0, buffers.block_width - width)
    return {
        "kv_num_blocks": (n_visible - n_full)[:, None, :],
        "kv_indices": torch.nn.functional.pad(kv_indices, pad)[:, None],
        "full_kv_num_blocks": n_full[:, None, :],
        "full_kv_indices": torch.nn.functional.pad(full_indices, pad)[:, None],
    }
