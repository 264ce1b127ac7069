"""Peer adapter: torch's private `torch.nn.attention.experimental._paged_attention.PagedAttention`.

The peer is used the way its docstrings and examples use it, so that what the suite measures is its real
behaviour: `reserve` hands out pages, `assign` writes K/V, `erase` returns a batch row's pages,
`convert_logical_block_mask` turns a LOGICAL block mask (logical page indices, a mask_mod over logical
positions) into a physical one whose mask_mod (`get_mask_mod`) and score_mod (`get_score_mod`) translate
physical pool slots back to logical positions; attention is (compiled, `dynamic=False`) flex_attention over
one layer's pool. The adapter owns only what the peer leaves to its user: the K/V pools, the query layout,
the logical block mask of each step, request validation, and which batch row of the peer's page table each
sequence id lives in.

Where the peer's API cannot express the contract:

* Sequence ids -> batch rows. The peer keys its page table by batch row (`max_batch_size` rows). A sequence
  takes the lowest free row when it first stores tokens (an admitted, empty sequence holds no row) and gives
  it back through `erase` on `finish`. Every sequence holding a row holds >= 1 page, so the default
  `max_batch_size = num_pages` rows can never run out; a smaller `max_batch_size` (the peer's two tables are
  `max_batch_size x num_pages` int64 each) raises `OutOfBatchRowsError` (an OutOfPagesError) when it does.

* Steps over a subset of the sequences (attention-gym #189, reproduced on torch 2.13). The converted
  mask_mod looks up `physical_to_logical[b]` with the block mask's LOCAL batch index `b`, while the block
  lists are gathered through `page_table[batch_idx]`. So with `convert_logical_block_mask(..., batch_idx=...)`,
  the documented way to convert "a block mask with smaller batch size than the page table", the mask_mod
  of local row b answers for page-table row b whenever `batch_idx != arange(B)`: compiled flex finds every
  slot of the sequence's masked (partly filled) pages closed, eager flex (mask_mod only) attends to another
  sequence's pages. The peer therefore requires block-mask row b == page-table row b. By default
  (`rows="slots"`) the adapter does exactly that: the step's block mask and query tensor have one row per
  page-table row 0..R-1 (R = the highest row in the step + 1, bucketed to a power of two >= `min_rows`), rows
  of sequences not in the step get no queries and no blocks, and `batch_idx` is left at its default. Cost:
  padded query rows (and, on the eager path, their dense mask evaluation) for sequences not in the step;
  the peer's own conversion cost (two `R x H x ROWS x num_pages` int32 index tensors per step) is paid
  either way. `rows="subset"` passes `batch_idx` as the peer documents it and shows the bug: kept for
  demonstration, never the default.

* fork: NOT offered (capability "fork" left out). The peer has no page sharing or reference counts. A fork
  could be emulated by reserving the child's own pages and copying the parent's K/V, which keeps the two
  isolated, but it is not the contract's fork: the copy takes ceil(len / P) extra pages, so the exact page
  accounting the suite checks (a shared page counts once; a step needing k pages succeeds iff k are free)
  would flag the emulation rather than the peer, and fork itself could fail for lack of pages. `fork()`
  validates its ids like every backend (UnknownSequenceError / DuplicateSequenceError) and then raises
  UnsupportedConfigError.

* Errors. Requests are validated with `paged.validation` before the peer is touched, and the pages a step
  needs are counted here (from the peer's `capacity` and `empty_pages`) and refused with OutOfPagesError
  up front: the peer raises a bare AssertionError from the one `reserve` that runs out, after the step's
  earlier `reserve` calls have already taken their pages.

* K/V writes. `assign(batch_idx, input_pos, ...)` writes B x S positions; positions past a row's reserved
  capacity index the page table's -1 and silently land in the pool's last page. The adapter therefore
  passes only real tokens (one `assign` row per new token: batch_idx = the token's page-table row,
  input_pos = its logical position), never a padded (B, max_q_len) block.

Known peer defects that the suite sees (listed in `expected_failures`, each reproduced in
tests/test_peer_torch_paged.py):

* `erase(batch_idx)` clears `page_table`, `capacity` and `empty_pages` but not `physical_to_logical`:
  `self.physical_to_logical[batch_idx][:, pages] = -1` assigns into the copy that advanced indexing made
  (a 0-d index fails outright, after capacity and empty_pages were already changed). The next sequence in
  that row inherits stale logical indices for pages it does not own. Compiled flex reads only the pages the
  block lists name, so it is unaffected; eager flex reads only the mask_mod, and the mask_mod then lets the
  new sequence read the previous owner's (or the current owner's) pages: "eager_matches_compiled" fails.
  Passing an undocumented `slice(row, row + 1)` as `batch_idx` would avoid the copy; the adapter does not,
  so the defect stays visible.

Capabilities: "mods" (user mask_mod / score_mod in logical positions through the peer's translating
get_mask_mod / get_score_mod; the adapter adds only the query offset and the step-row index), "chunked_prefill",
"mixed_steps", "paging" (memory() reads the peer's page table and `empty_pages`), "poison" (the peer's
`empty_pages` are the free pages; pages the peer hands out are zeroed by the adapter once poisoning was
used, because the adapter owns the K/V pools), "eager" (the same adapter on uncompiled flex_attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable, Hashable, Literal, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from conformance.contract import CAPABILITIES, BackendFactory, KnownDefect
from paged.attention import AttentionMode, attend, prefill_tiles
from paged.errors import OutOfPagesError, UnsupportedConfigError
from paged.mods import causal
from paged.plan import bucket, fill_block_lists, padded_query_len
from paged.spec import CacheSpec
from paged.stats import MemoryStats
from paged.validation import check_new_id, check_run, check_step, lookup

RowMode = Literal["slots", "subset"]

NAME = "torch-paged-attention"

ERASE_BUG = (
    "peer bug: PagedAttention.erase() leaves physical_to_logical set (it assigns into an advanced-indexing "
    "copy), so a sequence that later takes the same batch row inherits stale logical pages; eager "
    "flex_attention reads only the converted mask_mod and attends to pages the sequence does not own. "
    "Reproduced on torch 2.13 CPU: tests/test_peer_torch_paged.py::test_peer_bug_erase_keeps_inverse_table "
    "and ::test_erase_bug_breaks_eager_twin")

CAPABILITIES_OFFERED = frozenset({"mods", "chunked_prefill", "mixed_steps", "paging", "poison", "eager"})
assert CAPABILITIES_OFFERED <= CAPABILITIES


class OutOfBatchRowsError(OutOfPagesError):
    """Every row of the peer's page table is taken (only with a `max_batch_size` below `num_pages`)."""

    def __init__(self, needed: int, free: int, what: str = "request") -> None:
        self.needed, self.free = needed, free
        Exception.__init__(self, f"{what} needs {needed} free batch row(s) of the peer's page table but only "
                                 f"{free} are free; nothing was changed")


@dataclass
class _Seq:
    row: int | None = None   # the peer's batch row, taken when the sequence first stores tokens
    length: int = 0


@dataclass
class _Plan:
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


class _RowBuffers:
    """Per-(rows, padded query length) tensors the logical mods read, refilled in place every step."""

    def __init__(self, rows: int, device: torch.device) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        self.q_start = torch.zeros(rows, **i64)   # logical position of the row's first new token
        self.q_len = torch.zeros(rows, **i64)     # new tokens of the row (0: not in the step)
        self.kv_len = torch.zeros(rows, **i64)    # stored length after the step (the peer's upper bound)
        self.step_row = torch.zeros(rows, **i64)  # row of the sequence in the caller's step (the mods' b)
        self.logical_mods: dict[tuple, tuple[Callable, Callable | None]] = {}


class TorchPagedAttentionBackend:
    """The contract on top of torch's private PagedAttention (see the module docstring).

    Args:
        spec: cache shape; K/V pools are (num_layers, Hkv, num_pages * page_size, D) in spec.dtype on spec.device.
        attention: "compiled" (flex_attention compiled with dynamic=False) or "eager" (reads only the mask_mod).
        max_batch_size: rows of the peer's page table (default num_pages: never runs out).
        rows: "slots" (block-mask row == page-table row; correct) or "subset" (batch_idx as documented; #189).
        min_rows: smallest row bucket of a step's block mask (fewer distinct shapes, so fewer compiles).
        kernel_options: passed to compiled flex_attention.
        poison_free_pages: fill the pools with NaN at start and freed pages on finish (debug aid).
    """

    def __init__(self, spec: CacheSpec, *, attention: AttentionMode = "compiled", max_batch_size: int | None = None,
                 rows: RowMode = "slots", min_rows: int = 8, kernel_options: dict | None = None,
                 poison_free_pages: bool = False) -> None:
        from torch.nn.attention.experimental._paged_attention import PagedAttention

        if attention not in ("compiled", "eager"):
            raise UnsupportedConfigError(f"attention must be 'compiled' or 'eager', got {attention!r}")
        if rows not in ("slots", "subset"):
            raise UnsupportedConfigError(f"rows must be 'slots' or 'subset', got {rows!r}")
        max_batch_size = spec.num_pages if max_batch_size is None else max_batch_size
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UnsupportedConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.spec = spec
        self.attention = attention
        self.rows_mode = rows
        self.kernel_options = kernel_options
        self.max_batch_size = max_batch_size
        self.min_rows = min_rows
        self.peer = PagedAttention(spec.num_pages, spec.page_size, max_batch_size, device=spec.device)
        L, H, N, P, D = spec.num_layers, spec.num_kv_heads, spec.num_pages, spec.page_size, spec.head_dim
        # Zero-filled: the masked tail of a partly filled page is read, and 0 * NaN = NaN.
        self.k_pool = torch.zeros(L, H, N * P, D, dtype=spec.dtype, device=spec.device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self._poison_on_finish = poison_free_pages
        self._zero_new_pages = poison_free_pages
        if poison_free_pages:
            self.k_pool.fill_(float("nan"))
            self.v_pool.fill_(float("nan"))
        self._seqs: dict[Hashable, _Seq] = {}
        self._free_rows: list[int] = list(range(max_batch_size))   # kept sorted: lowest row first
        self._logical_width = spec.max_pages_per_seq
        self._buffers: dict[int, _RowBuffers] = {}
        self._plan: _Plan | None = None

    # ------------------------------------------------------------------ sequences
    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: Hashable) -> int:
        return lookup(self._seqs, seq_id).length

    def row(self, seq_id: Hashable) -> int | None:
        """The peer's page-table row of a live sequence (None until it stores tokens)."""
        return lookup(self._seqs, seq_id).row

    def admit(self, seq_id: Hashable) -> None:
        """Start an empty sequence; it takes a page-table row when it first stores tokens."""
        check_new_id(self._seqs, seq_id)
        self._plan = None
        self._seqs[seq_id] = _Seq()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Not supported: the peer cannot share pages (see the module docstring). Ids are validated first."""
        lookup(self._seqs, parent_id)
        check_new_id(self._seqs, child_id)
        raise UnsupportedConfigError(
            "torch's PagedAttention has no page sharing; this adapter does not offer fork (capability 'fork')")

    def finish(self, seq_id: Hashable) -> None:
        """End a sequence: `erase` its page-table row (its pages go back to the peer's empty_pages)."""
        state = lookup(self._seqs, seq_id)
        self._plan = None
        del self._seqs[seq_id]
        if state.row is None:
            return
        table = self.peer.page_table[state.row]
        freed = table[table >= 0]
        self.peer.erase(torch.tensor([state.row], device=self.spec.device))
        self._free_rows.append(state.row)
        self._free_rows.sort()
        if self._poison_on_finish and freed.numel():
            self._fill_pages(freed, float("nan"))

    # ------------------------------------------------------------------ plan / run
    def plan(self, seq_ids: Sequence[Hashable], q_lens: Sequence[int], *, mask_mod: Callable | None = None,
             score_mod: Callable | None = None) -> _Plan:
        """Reserve room for the step through the peer and build the step's (converted) block mask.

        Raises (before any change): UnknownSequenceError, DuplicateSequenceError, InvalidRequestError,
            SequenceTooLongError, OutOfPagesError (OutOfBatchRowsError with a small max_batch_size).
        """
        seq_ids, q_lens = check_step(self.length, self._seqs, seq_ids, q_lens, self.spec.max_seq_len, mask_mod,
                                     score_mod)
        P, dev = self.spec.page_size, self.spec.device
        states = [self._seqs[s] for s in seq_ids]
        capacity = self.peer.capacity.tolist()
        need = [max(0, math.ceil((st.length + q) / P) - (capacity[st.row] // P if st.row is not None else 0))
                for st, q in zip(states, q_lens)]
        new_rows = sum(st.row is None for st in states)
        what = f"step of {len(seq_ids)} sequence(s)"
        if new_rows > len(self._free_rows):
            raise OutOfBatchRowsError(new_rows, len(self._free_rows), what)
        if sum(need) > len(self.peer.empty_pages):
            raise OutOfPagesError(sum(need), len(self.peer.empty_pages), what)

        # ---- from here on nothing can fail on bad input: commit
        self._plan = None
        start_lens = tuple(st.length for st in states)
        for st, q, n in zip(states, q_lens, need):
            if st.row is None:
                st.row = self._free_rows.pop(0)
            if n:
                first = capacity[st.row] // P
                self.peer.reserve(torch.tensor([st.row], device=dev), torch.tensor([st.length + q], device=dev))
                if self._zero_new_pages:
                    self._fill_pages(self.peer.page_table[st.row, first:first + n], 0.0)
            st.length += q
        self._plan = self._build_plan(seq_ids, q_lens, start_lens, [st.row for st in states], mask_mod, score_mod)
        return self._plan

    def _rows_for(self, rows: int) -> _RowBuffers:
        if rows not in self._buffers:
            self._buffers[rows] = _RowBuffers(rows, self.spec.device)
        return self._buffers[rows]

    def _logical_mods(self, buf: _RowBuffers, mask_mod, score_mod) -> tuple[Callable, Callable | None]:
        """The step's mods over (block-mask row, padded query index, LOGICAL kv position), as the peer expects.

        The peer translates physical kv slots to logical ones (and checks `kv < kv_len[b]`); the adapter
        adds the query's logical position and the sequence's row in the caller's step.
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

    def _build_plan(self, seq_ids, q_lens, start_lens, rows, mask_mod, score_mod) -> _Plan:
        spec, P, dev = self.spec, self.spec.page_size, self.spec.device
        B, max_q = len(seq_ids), max(q_lens)
        Lqp = padded_query_len(max_q)
        # As paged.PagedKVCache: the query block must be a multiple of the GPU kernels' row tile; FlexDecoding's
        # is max(16, next_pow2(GQA group)) even for one query row, so decode steps get a 128-row block too.
        q_block = 128 if Lqp == 1 else min(Lqp, 128)
        if self.rows_mode == "slots":
            # Block-mask row r IS page-table row r (the peer's mask_mod requires it: #189).
            R = min(bucket(max(rows) + 1, self.min_rows), self.max_batch_size)
            mask_rows = list(rows)
        else:
            R = bucket(B, self.min_rows)
            mask_rows = list(range(B))
        q_start = torch.zeros(R, dtype=torch.long)
        q_len = torch.zeros(R, dtype=torch.long)
        step_row = torch.zeros(R, dtype=torch.long)
        for b, (r, s, q) in enumerate(zip(mask_rows, start_lens, q_lens)):
            q_start[r], q_len[r], step_row[r] = s, q, b
        kv_len = q_start + q_len
        W = self._logical_width
        logical_table = torch.arange(W, dtype=torch.int32).expand(R, W)
        lists = fill_block_lists(SimpleNamespace(q_block=q_block, padded_q_len=Lqp, block_width=W), logical_table,
                                 torch.div(kv_len + P - 1, P, rounding_mode="floor"), q_start, q_len, P,
                                 causal_default=mask_mod is None)
        buf = self._rows_for(R)
        buf.q_start.copy_(q_start)
        buf.q_len.copy_(q_len)
        buf.kv_len.copy_(kv_len)
        buf.step_row.copy_(step_row)
        logical_mask, logical_score = self._logical_mods(buf, mask_mod, score_mod)
        as_dev = {name: t.to(device=dev, dtype=torch.int32) for name, t in lists.items()}
        logical = BlockMask.from_kv_blocks(
            as_dev["kv_num_blocks"], as_dev["kv_indices"], as_dev["full_kv_num_blocks"], as_dev["full_kv_indices"],
            BLOCK_SIZE=(q_block, P), mask_mod=logical_mask, seq_lengths=(Lqp, W * P), compute_q_blocks=False)
        if self.rows_mode == "slots":
            physical = self.peer.convert_logical_block_mask(logical, kv_len=buf.kv_len)
        else:
            batch_idx = torch.tensor(list(rows) + [rows[0]] * (R - B), device=dev)
            physical = self.peer.convert_logical_block_mask(logical, batch_idx=batch_idx, kv_len=buf.kv_len)
        physical_score = self.peer.get_score_mod(logical_score, buf.kv_len) if logical_score is not None else None

        token_rows = torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(q_lens)])
        token_batch = torch.cat([torch.full((q,), r) for r, q in zip(rows, q_lens)])
        token_pos = torch.cat([torch.arange(s, s + q) for s, q in zip(start_lens, q_lens)])[:, None]
        valid = torch.arange(max_q)[None, :] < torch.tensor(q_lens)[:, None]
        return _Plan(seq_ids, q_lens, start_lens, max_q, torch.tensor(mask_rows, device=dev), token_rows.to(dev),
                     token_batch.to(dev), token_pos.to(dev), valid.to(dev), R, Lqp, physical, physical_score, set())

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Store the layer's new K/V with the peer's `assign`, attend over the layer's pool.

        q (B, Lq, Hq, D), k/v (B, Lq, Hkv, D), row b's first q_lens[b] positions real -> (B, Lq, Hq, D),
        positions past a row's q_len are 0.
        """
        plan = self._plan
        check_run(self.spec, plan is not None, plan.layers_run if plan else set(), len(plan.seq_ids) if plan else 0,
                  plan.max_q_len if plan else 0, layer, q, k, v)
        spec, B, Lq = self.spec, len(plan.seq_ids), plan.max_q_len
        H, D = spec.num_kv_heads, spec.head_dim
        q, k, v = q[:, :Lq], k[:, :Lq], v[:, :Lq]
        plan.layers_run.add(layer)

        # One assign row per real token: the peer writes every (row, position) it is given, reserved or not.
        k_new = k.reshape(B * Lq, H, D)[plan.token_rows][:, :, None]                 # (T, H, 1, D)
        v_new = v.reshape(B * Lq, H, D)[plan.token_rows][:, :, None]
        self.peer.assign(plan.token_batch, plan.token_pos, k_new, v_new,
                         self.k_pool[layer:layer + 1], self.v_pool[layer:layer + 1])

        qp = q.new_zeros(plan.padded_rows, q.shape[2], plan.padded_q_len, D)
        qp[plan.mask_rows, :, :Lq] = q.transpose(1, 2)
        out = attend(qp, self.k_pool[layer:layer + 1], self.v_pool[layer:layer + 1], plan.block_mask,
                     plan.score_mod, scale, self.attention, self._kernel_options(plan))
        out = out[plan.mask_rows, :, :Lq].transpose(1, 2)                               # (B, Lq, Hq, D)
        return out * plan.valid[:, :, None, None].to(out.dtype)

    def _kernel_options(self, plan: _Plan) -> dict | None:
        """The non-decode tiles paged.PagedKVCache passes (`paged.attention.prefill_tiles`): a choice of the
        flex_attention caller, not of the peer, without which small pages or chunks have no valid GPU config.
        User options win."""
        if self.spec.device.type != "cuda":
            return self.kernel_options
        tiles = {} if plan.padded_q_len == 1 else prefill_tiles(plan.padded_q_len, self.spec.page_size)
        return {**tiles, **(self.kernel_options or {})} or None

    # ------------------------------------------------------------------ memory
    def _fill_pages(self, pages: torch.Tensor, value: float) -> None:
        L, H, N, P, D = (self.spec.num_layers, self.spec.num_kv_heads, self.spec.num_pages,
                         self.spec.page_size, self.spec.head_dim)
        pages = pages.to(device=self.spec.device, dtype=torch.long)
        for pool in (self.k_pool, self.v_pool):
            pool.view(L, H, N, P, D)[:, :, pages] = value

    def memory(self) -> MemoryStats:
        """Paging figures read from the peer: pages in use from its page table, free pages from empty_pages."""
        P = self.spec.page_size
        used = int((self.peer.page_table >= 0).sum())
        stored = sum(st.length for st in self._seqs.values())
        return MemoryStats(
            live_sequences=len(self._seqs), tokens_stored=stored, slots_reserved=used * P,
            waste_slots=used * P - stored, capacity_slots=self.spec.capacity_tokens,
            bytes_per_slot=self.spec.bytes_per_token, page_size=P, total_pages=self.spec.num_pages,
            pages_in_use=used, free_pages=len(self.peer.empty_pages))

    def poison_free_pages(self, value: float = float("nan")) -> None:
        """Fill the peer's empty pages of every layer with `value`; pages it hands out later are zeroed first."""
        self._zero_new_pages = True
        if self.peer.empty_pages:
            self._fill_pages(torch.tensor(self.peer.empty_pages), value)

    def snapshot(self) -> dict:
        """Deep copy of the peer's tables, the adapter's bookkeeping and the K/V pools."""
        return {
            "peer": {
                "page_table": self.peer.page_table.cpu().clone(),
                "capacity": self.peer.capacity.cpu().clone(),
                "empty_pages": list(self.peer.empty_pages),
                "physical_to_logical": self.peer.physical_to_logical.cpu().clone(),
            },
            "sequences": {s: (st.row, st.length) for s, st in self._seqs.items()},
            "free_rows": list(self._free_rows),
            "k_pool": self.k_pool.cpu().clone(),
            "v_pool": self.v_pool.cpu().clone(),
        }


def _make(spec: CacheSpec, **options) -> TorchPagedAttentionBackend:
    return TorchPagedAttentionBackend(spec, **options)


def torch_paged_attention_factory() -> BackendFactory:
    """The peer as the suite sees it: compiled flex, an eager twin, no fork, and its known defects."""
    return BackendFactory(
        name=NAME,
        make=_make,
        capabilities=CAPABILITIES_OFFERED,
        make_eager=partial(_make, attention="eager"),
        expected_failures={"eager_matches_compiled": KnownDefect(
            ERASE_BUG, match=r"eager and compiled differ|max error .* vs bound|output has NaN/inf")},
        devices=frozenset({"cpu", "cuda"}),
        description="torch.nn.attention.experimental._paged_attention.PagedAttention (private), compiled "
                    "flex_attention over its converted block masks; fork not offered")
