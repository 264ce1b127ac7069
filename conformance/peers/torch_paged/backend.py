"""The backend contract on top of torch's private PagedAttention (the package docstring says how and why)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from conformance.peers.torch_paged import checks
from conformance.peers.torch_paged.step import (PeerPlan, RowBuffers, RowMode, bucket, logical_block_lists,
                                                logical_mods, padded_query_len, token_routes)
from paged import CacheSpec, MemoryStats, OutOfPagesError, UnsupportedConfigError

__all__ = ["OutOfBatchRowsError", "TorchPagedAttentionBackend"]

#: Compiled shapes flex_attention may take: every (rows, padded query length, pool) bucket is one graph, and
#: dynamo's default of 8 per function would fail later buckets.
MAX_COMPILED_SHAPES = 256
_compiled: Any = None


def _compiled_flex() -> Any:
    """flex_attention compiled once per process, with static shapes (`dynamic=False`, as the peer's examples
    use it) and `fullgraph=True` (a graph break raises instead of silently running eager flex)."""
    global _compiled
    if _compiled is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_SHAPES)
        _compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled


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


class TorchPagedAttentionBackend:
    """The contract on top of torch's private PagedAttention (see the package docstring).

    Args:
        spec: cache shape; K/V pools are (num_layers, Hkv, num_pages * page_size, D) in spec.dtype on spec.device.
        attention: "compiled" (flex_attention compiled with dynamic=False) or "eager" (reads only the mask_mod).
        max_batch_size: rows of the peer's page table (default num_pages: never runs out).
        rows: "slots" (block-mask row == page-table row; correct) or "subset" (batch_idx as documented; #189).
        min_rows: smallest row bucket of a step's block mask (fewer distinct shapes, so fewer compiles).
        kernel_options: passed to compiled flex_attention.
        poison_free_pages: fill the pools with NaN at start and freed pages on finish (debug aid).
    """

    def __init__(self, spec: CacheSpec, *, attention: str = "compiled", max_batch_size: int | None = None,
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
        self._buffers: dict[int, RowBuffers] = {}
        self._plan: PeerPlan | None = None

    # ------------------------------------------------------------------ sequences
    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: Hashable) -> int:
        return checks.live(self._seqs, seq_id).length

    def row(self, seq_id: Hashable) -> int | None:
        """The peer's page-table row of a live sequence (None until it stores tokens)."""
        return checks.live(self._seqs, seq_id).row

    def admit(self, seq_id: Hashable) -> None:
        """Start an empty sequence; it takes a page-table row when it first stores tokens."""
        checks.admissible(self._seqs, seq_id)
        self._plan = None
        self._seqs[seq_id] = _Seq()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Not supported: the peer cannot share pages (see the package docstring). Ids are validated first."""
        checks.live(self._seqs, parent_id)
        checks.admissible(self._seqs, child_id)
        raise UnsupportedConfigError(
            "torch's PagedAttention has no page sharing; this adapter does not offer fork (capability 'fork')")

    def finish(self, seq_id: Hashable) -> None:
        """End a sequence: `erase` its page-table row (its pages go back to the peer's empty_pages)."""
        state = checks.live(self._seqs, seq_id)
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
             score_mod: Callable | None = None) -> PeerPlan:
        """Reserve room for the step through the peer and build the step's (converted) block mask.

        Raises (before any change): UnknownSequenceError, DuplicateSequenceError, InvalidRequestError,
            SequenceTooLongError, OutOfPagesError (OutOfBatchRowsError with a small max_batch_size).
        """
        seq_ids, q_lens = checks.step(self.length, self._seqs, seq_ids, q_lens, self.spec.max_seq_len, mask_mod,
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

    def _rows_for(self, rows: int) -> RowBuffers:
        if rows not in self._buffers:
            self._buffers[rows] = RowBuffers(rows, self.spec.device)
        return self._buffers[rows]

    def _build_plan(self, seq_ids, q_lens, start_lens, rows, mask_mod, score_mod) -> PeerPlan:
        P, dev = self.spec.page_size, self.spec.device
        B, max_q = len(seq_ids), max(q_lens)
        Lqp = padded_query_len(max_q)
        # The query block must be a multiple of the GPU kernels' row tile; FlexDecoding's is
        # max(16, next_pow2(GQA group)) even for one query row, so decode steps get a 128-row block too.
        q_block = 128 if Lqp == 1 else min(Lqp, 128)
        if self.rows_mode == "slots":
            # Block-mask row r IS page-table row r (the peer's mask_mod requires it: #189).
            R = min(bucket(max(rows) + 1, self.min_rows), self.max_batch_size)
            mask_rows = list(rows)
        else:
            R = bucket(B, self.min_rows)
            mask_rows = list(range(B))
        q_start = torch.zeros(R, dtype=torch.long)                                  # (R,) host
        q_len = torch.zeros(R, dtype=torch.long)
        step_row = torch.zeros(R, dtype=torch.long)
        for b, (r, s, q) in enumerate(zip(mask_rows, start_lens, q_lens)):
            q_start[r], q_len[r], step_row[r] = s, q, b
        lists = logical_block_lists(q_start, q_len, P, q_block, Lqp, self._logical_width,
                                    plain_causal=mask_mod is None)
        buf = self._rows_for(R)
        for dst, src in ((buf.q_start, q_start), (buf.q_len, q_len), (buf.kv_len, q_start + q_len),
                         (buf.step_row, step_row)):
            dst.copy_(src)
        logical_mask, logical_score = logical_mods(buf, mask_mod, score_mod)
        logical = BlockMask.from_kv_blocks(
            *(t.to(device=dev, dtype=torch.int32) for t in lists), BLOCK_SIZE=(q_block, P), mask_mod=logical_mask,
            seq_lengths=(Lqp, self._logical_width * P), compute_q_blocks=False)
        physical = self._convert(logical, buf, rows, R)
        physical_score = self.peer.get_score_mod(logical_score, buf.kv_len) if logical_score is not None else None
        routes = (t.to(dev) for t in token_routes(q_lens, rows, start_lens, max_q))
        return PeerPlan(seq_ids, q_lens, start_lens, max_q, torch.tensor(mask_rows, device=dev), *routes, R, Lqp,
                        physical, physical_score, set())

    def _convert(self, logical: BlockMask, buf: RowBuffers, rows: list[int], R: int) -> BlockMask:
        """The peer's physical block mask: rows as they are ("slots"), or through batch_idx ("subset", #189)."""
        if self.rows_mode == "slots":
            return self.peer.convert_logical_block_mask(logical, kv_len=buf.kv_len)
        batch_idx = torch.tensor(list(rows) + [rows[0]] * (R - len(rows)), device=self.spec.device)
        return self.peer.convert_logical_block_mask(logical, batch_idx=batch_idx, kv_len=buf.kv_len)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Store the layer's new K/V with the peer's `assign`, attend over the layer's pool.

        q (B, Lq, Hq, D), k/v (B, Lq, Hkv, D), row b's first q_lens[b] positions real -> (B, Lq, Hq, D),
        positions past a row's q_len are 0.
        """
        plan = self._plan
        checks.run_call(self.spec, plan, layer, q, k, v)
        B, Lq, H, D = len(plan.seq_ids), plan.max_q_len, self.spec.num_kv_heads, self.spec.head_dim
        q, k, v = q[:, :Lq], k[:, :Lq], v[:, :Lq]
        plan.layers_run.add(layer)
        k_pool, v_pool = self.k_pool[layer:layer + 1], self.v_pool[layer:layer + 1]

        # One assign row per real token: the peer writes every (row, position) it is given, reserved or not.
        k_new = k.reshape(B * Lq, H, D)[plan.token_rows][:, :, None]                 # (T, H, 1, D)
        v_new = v.reshape(B * Lq, H, D)[plan.token_rows][:, :, None]
        self.peer.assign(plan.token_batch, plan.token_pos, k_new, v_new, k_pool, v_pool)

        qp = q.new_zeros(plan.padded_rows, q.shape[2], plan.padded_q_len, D)
        qp[plan.mask_rows, :, :Lq] = q.transpose(1, 2)
        common = dict(score_mod=plan.score_mod, block_mask=plan.block_mask, scale=scale,
                      enable_gqa=q.shape[2] != H)
        if self.attention == "eager":                 # eager flex ignores the block lists: mask_mod only
            out = flex_attention(qp, k_pool, v_pool, **common)
        else:
            out = _compiled_flex()(qp, k_pool, v_pool, kernel_options=self._kernel_options(plan), **common)
        out = out[plan.mask_rows, :, :Lq].transpose(1, 2)                               # (B, Lq, Hq, D)
        return out * plan.valid[:, :, None, None].to(out.dtype)

    def _kernel_options(self, plan: PeerPlan) -> dict | None:
        """Tiles compiled flex's non-decode GPU kernel needs over this pool: key tiles that divide the page and
        query tiles no taller than the padded query (inductor's 32-128 defaults leave no valid config for small
        pages or chunks). A choice of the flex_attention caller, not of the peer. User options win."""
        if self.spec.device.type != "cuda":
            return self.kernel_options
        tiles = {}
        if plan.padded_q_len > 1:
            tiles["BLOCK_N"] = min(self.spec.page_size, 64)
            if plan.padded_q_len < 128:
                tiles["BLOCK_M"] = min(plan.padded_q_len, 64)
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
