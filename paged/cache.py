"""PagedKVCache: per-layer K/V page pools, a page table per sequence, and FlexAttention over them.

    cache = PagedKVCache(CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16,
                                   num_pages=64, max_seq_len=512))
    cache.admit("a"); cache.admit("b")
    cache.plan(["a", "b"], [5, 3])           # once per step: allocates pages, builds the block mask
    for layer in range(2):
        out = cache.run(layer, q, k, v)      # q (2, 5, Hq, D), k/v (2, 5, Hkv, D) -> (2, 5, Hq, D)

Every request is validated before anything changes; a rejected request leaves the cache exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Literal, Sequence

import torch

from paged.allocator import PageAllocator, PlacementPolicy
from paged.attention import AttentionMode
from paged.errors import InvalidRequestError, UnsupportedConfigError
from paged.host_table import HostPageTable
from paged.kernels import KernelSettings, Pools, StepLayout, choose, step_fields
from paged.kernels import decode_kernel as decode_kernel_for
from paged.kernels import prefill_kernel as prefill_kernel_for
from paged.mods import MaskMod, ScoreMod
from paged.plan import (StepBuffers, StepPlan, bucket, commit_pages, copies_needed, fill_step, padded_query_len,
                        page_growth)
from paged.spec import CacheSpec
from paged.stats import MemoryStats
from paged.transfer import to_device
from paged.validation import check_complete, check_new_id, check_run, check_step, check_step_done, lookup


@dataclass
class SequenceState:
    """Host bookkeeping of one live sequence: its pages in logical order and its stored length."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    row: int | None = None  # its row in the cache's HostPageTable (set by admit/fork)
    missing_layers: tuple[int, ...] = ()  # layers its last step never ran (abandoned by finish()): finish it


class PagedKVCache:
    """A paged KV cache attended by FlexAttention. The `paged` backend.

    Args:
        spec: the cache's shape (layers, kv heads, head dim, page size, pool pages, max length, dtype, device).
        policy: page placement policy name ("lowest", "lifo", "fifo", "random") or a PlacementPolicy.
        seed: seed of the "random" policy.
        attention: "compiled" (fused FlexAttention kernels) or "eager" (reads only the mask_mod; for checks).
        kernel_options: passed to compiled flex_attention (e.g. {"num_stages": 3, "num_warps": 4}).
        poison_free_pages: debug aid: fill pages with NaN when they are freed, so any read of memory a sequence
            does not own turns its output into NaN (handed-out pages are zeroed in any case, see below).
        decode_full_blocks: on plain causal decode steps, pass the fully filled pages as unmasked "full"
            blocks (the mask_mod then runs on the last page only): True, False, or "auto". FlexDecoding sizes
            its split-KV tiles from the K/V tensor's length when full blocks are present, i.e. from the whole
            pool, so when padded batch x kv heads is at most the GPU's SM count (where it splits each sequence)
            one split does all the work; False lists every page as masked and passes no full-block lists
            (CUDA), so the tiles follow each sequence's length. "auto", the default, uses full blocks only
            where FlexDecoding does not split (padded batch x kv heads > SMs; always on CPU). Same outputs
            (docs/decode-performance-notes.md).
        check_ownership: where the FlexAttention mask_mod checks, per element, that a slot's page belongs to the
            row's sequence. Eager FlexAttention reads nothing but the mask_mod, over the whole pool, so there it
            must; an inductor-compiled kernel visits only the pages listed for the row, so there the check is a
            second gather per masked element for nothing (prefill 12-35% slower on an H200). "auto", the
            default: checked in every call but the cache's own compiled call when that surely runs inductor's
            kernel (`attention.own_call_is_compiled`: not traced by your torch.compile, whose backend may run
            FlexAttention eagerly; dynamo not disabled, not forced eager by `torch.compiler.set_stance`, not
            suppressing errors; compiled with fullgraph=True, so its recompile limit raises instead of running
            eagerly). True: checked in every call. False: checked only with attention="eager" (right with
            inductor; a leak of other sequences' pages wherever FlexAttention runs eagerly).
        decode_kernel: the kernel of plain causal decode steps (one new token per row, no mods): "flex"
            (FlexAttention, as every other step), "triton" (`paged.triton_decode`: key tiles across pages,
            split-KV over each row's own length, longer rows in more slices), or "auto", the default:
            "triton" on CUDA where Triton imports, else "flex". With "triton", steps with history and more than
            one new token in some row (later prefill chunks, chunks beside decode rows) run on the Triton mixed
            kernel (`paged.kernels.triton_mixed`, the K/V store fused); with "flex" on FlexAttention. Mods and
            attention="eager" always use FlexAttention. "triton" on the CPU runs Triton's interpreter
            (TRITON_INTERPRET=1 before Triton is imported): for tests only.
        prefill_kernel: the kernel of fresh prefill steps (every row empty before the step, more than one new token,
            no mods): "sdpa" (`paged.kernels.sdpa_prefill`: one causal scaled_dot_product_attention over the step's
            own new K/V, which it also stores into their pages; FlashAttention on CUDA, key tiles not bounded by the
            page size), "flex" (FlexAttention over the pool, as every other prefill), or "auto", the default: "sdpa"
            with attention="compiled", else "flex". Chunks after the first follow decode_kernel; mods and
            attention="eager" always use FlexAttention.

    Pools: `k_pool`, `v_pool` of shape (num_layers, Hkv, N * P, D), allocated once; their shapes never change.
    A freed page keeps what its last owner wrote (NaN/Inf included); every page plan() hands out is zeroed in all
    layers of both pools (one stream-ordered index_fill per pool per step, over the step's already-copied page
    indices: no host sync, nothing for steps that add no page), because a partly filled page's unwritten slots are
    read with weight 0 and 0 x NaN = NaN. Cost: pages handed out x num_layers x 2 x Hkv*P*D*itemsize device bytes
    per step, i.e. what one full page's K/V store costs: exact for decode (each new page is partly filled), at
    most the step's K/V bytes again for a prefill.

    Steps: admit() and fork() between the layers of a step (some but not all layers run) raise PlanError;
    finish() there abandons the step, and its other sequences, which lack the last step's K/V in the layers not
    run, are refused by plan() and fork() until finished. admit / fork / finish right after plan() (no layer run)
    drop the plan as before, its tokens counting as stored with K/V in no layer: plan a step when its layers run.
    """

    def __init__(
        self,
        spec: CacheSpec,
        *,
        policy: str | PlacementPolicy = "lowest",
        seed: int = 0,
        attention: AttentionMode = "compiled",
        kernel_options: dict | None = None,
        poison_free_pages: bool = False,
        decode_full_blocks: bool | Literal["auto"] = "auto",
        check_ownership: bool | Literal["auto"] = "auto",
        decode_kernel: Literal["auto", "flex", "triton"] = "auto",
        prefill_kernel: Literal["auto", "flex", "sdpa"] = "auto",
    ) -> None:
        if attention not in ("compiled", "eager"):
            raise UnsupportedConfigError(f"attention must be 'compiled' or 'eager', got {attention!r}")
        for name, value in (("decode_full_blocks", decode_full_blocks), ("check_ownership", check_ownership)):
            if type(value) is not bool and not (isinstance(value, str) and value == "auto"):  # not 1, 0, None
                raise UnsupportedConfigError(f"{name} must be True, False or 'auto', got {value!r}")
        if type(poison_free_pages) is not bool:
            raise UnsupportedConfigError(f"poison_free_pages must be True or False, got {poison_free_pages!r}")
        if kernel_options is not None and not isinstance(kernel_options, dict):
            raise UnsupportedConfigError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
        self.spec = spec
        self._decode = decode_kernel_for(decode_kernel, attention, spec.device)  # the kernel module of plain decode steps
        self.decode_kernel = self._decode.NAME
        self._prefill = prefill_kernel_for(prefill_kernel, attention)  # the kernel module of fresh prefill steps
        self.prefill_kernel = self._prefill.NAME
        self.allocator = PageAllocator(spec.num_pages, policy, seed)
        self.attention = attention
        self.kernel_options = kernel_options
        self.poison = poison_free_pages
        self.decode_full_blocks = decode_full_blocks
        self.check_ownership = check_ownership
        L, H, N, P, D = spec.num_layers, spec.num_kv_heads, spec.num_pages, spec.page_size, spec.head_dim
        # Zero-filled: uninitialised memory may hold NaN, and masked slots of a partly filled page are read.
        self.k_pool = torch.zeros(L, H, N * P, D, dtype=spec.dtype, device=spec.device)
        self.v_pool = torch.zeros_like(self.k_pool)
        if self.poison:
            self.k_pool.fill_(float("nan"))
            self.v_pool.fill_(float("nan"))
        # Logical page index of every physical page (-1 when free). Forks share only prefixes, so a shared
        # page has the same logical index in every owner: one global table serves all sequences.
        self.page_logical = torch.full((N,), -1, dtype=torch.int32, device=spec.device)
        self._seqs: dict[Hashable, SequenceState] = {}
        # Page tables are as wide as a longest sequence's pages; CPU codegen needs the block lists to span the whole
        # pool, on GPU a sequence's pages suffice.
        self._table_width = spec.max_pages_per_seq
        self._block_width = N if spec.device.type == "cpu" else spec.max_pages_per_seq
        self._host_table = HostPageTable(self._table_width)
        self._buffers: dict[tuple[int, int], StepBuffers] = {}
        self._plan: StepPlan | None = None
        self._settings = KernelSettings(spec, attention, kernel_options, decode_full_blocks, check_ownership)
        self._pools = Pools.of(self.k_pool, self.v_pool, self.page_logical)
        self._expect = (L, spec.dtype, self.k_pool.device, H, D)  # what run() checks its inputs against (StepPlan.fits)

    # ------------------------------------------------------------------ sequences
    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    @property
    def current_plan(self) -> StepPlan | None:
        """The plan made by the last plan(), or None once admit / fork / finish (or a failed plan()) invalidated it."""
        return self._plan

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: Hashable) -> int:
        """Tokens stored for a live sequence."""
        return self._get(seq_id).length

    def pages(self, seq_id: Hashable) -> list[int]:
        """Physical pages of a live sequence, in logical order."""
        return list(self._get(seq_id).pages)

    def _get(self, seq_id: Hashable) -> SequenceState:
        return lookup(self._seqs, seq_id)

    def admit(self, seq_id: Hashable) -> None:
        """Start an empty sequence. It takes no pages until tokens are appended."""
        check_new_id(self._seqs, seq_id)
        check_step_done(self._plan, self.spec.num_layers, "admit")
        self._plan = None
        self._seqs[seq_id] = SequenceState(row=self._host_table.acquire())

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of `parent_id`'s history, sharing its pages (copy-on-write)."""
        parent = self._get(parent_id)
        check_new_id(self._seqs, child_id)
        check_step_done(self._plan, self.spec.num_layers, "fork")
        check_complete(parent_id, parent)
        self._plan = None
        self.allocator.share(parent.pages)
        self._seqs[child_id] = SequenceState(list(parent.pages), parent.length,
                                             self._host_table.acquire(copy_of=parent.row))

    def finish(self, seq_id: Hashable) -> None:
        """End a sequence; pages no other sequence shares are free at once. Between the layers of a step it abandons
        the step: the step's other sequences lack the K/V of the layers not run and can then only be finished."""
        state = self._get(seq_id)
        plan, L = self._plan, self.spec.num_layers
        if plan is not None and 0 < len(plan.layers_run) < L:
            missing = tuple(sorted(set(range(L)) - plan.layers_run))
            for s in plan.seq_ids:
                if s != seq_id and s in self._seqs:
                    self._seqs[s].missing_layers = missing
        self._plan = None
        del self._seqs[seq_id]
        self._host_table.release(state.row)
        freed = self.allocator.release(state.pages)
        if freed:
            self._mark_free(freed)

    def _mark_free(self, pages: list[int]) -> None:
        idx = to_device(torch.tensor(pages), self.spec.device)
        # Not `[idx] = -1`: that copies the Python scalar to the GPU synchronously.
        self.page_logical.index_fill_(0, idx, -1)
        if self.poison:
            self._fill_pages(idx, float("nan"))

    def _fill_pages(self, pages: torch.Tensor, value: float) -> None:
        L, H, N, P, D = (self.spec.num_layers, self.spec.num_kv_heads, self.spec.num_pages,
                         self.spec.page_size, self.spec.head_dim)
        for pool in (self.k_pool, self.v_pool):
            pool.view(L, H, N, P, D).index_fill_(2, pages, value)

    # ------------------------------------------------------------------ plan / run
    def plan(
        self,
        seq_ids: Sequence[Hashable],
        q_lens: Sequence[int],
        *,
        mask_mod: MaskMod | None = None,
        score_mod: ScoreMod | None = None,
    ) -> StepPlan:
        """Reserve room for one step's new tokens and build the step's block mask (once for all layers).

        Args:
            seq_ids: live sequences taking part in this step, each at most once.
            q_lens: new tokens per sequence: 1 for a decode token, more for a prefill chunk.
            mask_mod, score_mod: optional FlexAttention mods in LOGICAL positions (see `paged.mods`);
                `mask_mod` replaces the default causal mask.
        Raises (before any change): UnknownSequenceError, DuplicateSequenceError, InvalidRequestError,
            SequenceTooLongError, OutOfPagesError.
        """
        seq_ids, q_lens, states = check_step(self._seqs, seq_ids, q_lens, self.spec.max_seq_len, mask_mod, score_mod)
        P, max_q = self.spec.page_size, max(q_lens)

        buf = self._buffers_for(bucket(len(seq_ids)), padded_query_len(max_q))  # may allocate: before the commit

        # Pages to add, and shared partly filled last pages that must be copied before they are written.
        start_lens = tuple([st.length for st in states])
        grow = page_growth(start_lens, q_lens, P)
        cow = copies_needed(states, self.allocator, P)
        new_pages = self.allocator.allocate(sum(grow) + sum(cow), what=f"step of {len(seq_ids)} sequence(s)")

        # ---- from here on nothing can fail on bad input: commit
        self._plan = None
        assigned, assigned_logical, assigned_rows, copies, freed = commit_pages(states, q_lens, grow, cow, new_pages,
                                                                              self.allocator)
        self._host_table.write(assigned_rows, assigned_logical, assigned)

        rounds = buf.packed.rounds
        try:
            plan = self._build_plan(buf, seq_ids, q_lens, max_q, start_lens, states, assigned, assigned_logical,
                                    mask_mod, score_mod)
        finally:  # also when building the plan failed: the device must follow the committed host state
            sent = buf.packed.rounds != rounds
            self._update_device_pages(buf if sent else None, assigned, assigned_logical, copies, freed)
        self._plan = plan
        return plan

    def _update_device_pages(self, sent: StepBuffers | None, assigned: list[int], assigned_logical: list[int],
                             copies: list[tuple[int, int]], freed: list[int]) -> None:
        """The device side of a step's page changes, stream-ordered after the step's copy: the new pages' logical
        indices (from the step's packed buffers `sent`, or copied on their own when the step was never sent),
        then their slots zeroed in every layer (a freed page keeps its last owner's values, NaN/Inf included, and a
        partly filled page's unwritten slots are read with weight 0), then copy-on-write copies into them (a copy
        overwrites the whole page: its zeroing is wasted, but fork steps are rare and one index list serves all),
        then the freed pages."""
        P = self.spec.page_size
        if assigned:
            if sent is not None:
                idx, logical = sent.new_pages[:len(assigned)], sent.new_logical[:len(assigned)]
            else:
                idx = to_device(torch.tensor(assigned), self.spec.device)
                logical = to_device(torch.tensor(assigned_logical, dtype=torch.int32), self.spec.device)
            self.page_logical.index_put_((idx,), logical)
            self._fill_pages(idx, 0.0)
        for old, fresh in copies:
            for pool in (self.k_pool, self.v_pool):
                pool[:, :, fresh * P:(fresh + 1) * P] = pool[:, :, old * P:(old + 1) * P]
        if freed:
            self._mark_free(freed)

    def _buffers_for(self, padded_batch: int, padded_q: int) -> StepBuffers:
        key = (padded_batch, padded_q)
        if key not in self._buffers:
            # The query block must be a multiple of the GPU kernels' row tile: FlexDecoding's is
            # max(16, next_pow2(GQA group)) even for one query row, so decode steps get a 128-row block too.
            buf = StepBuffers(padded_batch, padded_q, 128 if padded_q == 1 else min(padded_q, 128),
                              self._table_width, self.spec.page_size, self.spec.device, self._block_width,
                              step_fields(self._decode, padded_batch, padded_q, self.spec))  # the kernels' own
            self._buffers[key] = buf
        return self._buffers[key]

    def _build_plan(self, buf, seq_ids, q_lens, max_q, start_lens, states, assigned, assigned_logical, mask_mod,
                    score_mod) -> StepPlan:
        """The step's page bookkeeping into the bucket's host buffers, then ONE kernel plan (which sends them)."""
        T = fill_step(buf, self._host_table, [st.row for st in states], q_lens, max_q, start_lens, assigned,
                      assigned_logical, self.spec.page_size)
        kernel = choose(self._decode, max_q, mask_mod, score_mod, prefill=self._prefill, fresh=not any(start_lens))
        layout = StepLayout(self._settings, self.page_logical, seq_ids, q_lens, start_lens, mask_mod, score_mod)
        batches = (len(seq_ids), buf.padded_batch) if kernel.PADDED_BATCH else (len(seq_ids),)
        rows = buf.packed.host if kernel.FUSED_STORE else buf.packed.dev    # what the step's one copy holds
        return StepPlan(seq_ids, q_lens, start_lens, max_q, buf, rows["slots"][:T], rows["token_rows"][:T],
                        kernel.plan(layout, buf), set(), self._expect + (batches,))

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Store one layer's new K/V and attend the new queries over each sequence's whole history.

        Args:
            layer: 0 <= layer < num_layers; each layer once per plan.
            q: (B, Lq, Hq, D) queries, row b's first q_lens[b] positions real (Lq >= max q_len; Hq % Hkv == 0).
                On a plain decode step run by the Triton kernel (`plan.kernel == "triton"`) B may also be the
                bucket's padded batch `plan.buffers.padded_batch`: rows >= plan.batch are padding, store nothing
                and come back 0 (one CUDA graph per bucket then serves every batch of the bucket).
            k, v: (B, Lq, Hkv, D) the new tokens' keys and values, same row layout.
            scale: softmax scale, default 1/sqrt(D).
        Returns:
            (B, Lq, Hq, D) attention output; positions past a row's q_len are 0.
        """
        plan = self._plan
        if plan is None or not plan.fits(layer, q, k, v, scale):  # the few checks of the common case, else all
            batch = plan.batch if plan else 0
            if plan is not None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[0] in plan.expect[-1]:
                batch = q.shape[0]  # the bucket's padded batch, where the kernel takes it (k and v must match)
            check_run(self.spec, plan is not None, plan.layers_run if plan else set(), batch,
                      plan.max_q_len if plan else 0, layer, q, k, v, scale=scale)
        out = plan.kernel_plan.run(plan, layer, q, k, v, self._pools, scale)
        plan.layers_run.add(layer)  # once its kernel was launched: a raise before allows a retry
        return out

    # ------------------------------------------------------------------ memory
    def memory(self) -> MemoryStats:
        """Pages in use, distinct tokens stored and waste (a page shared by forks counts once)."""
        P = self.spec.page_size
        filled: dict[int, int] = {}
        for st in self._seqs.values():
            for i, page in enumerate(st.pages):
                filled[page] = max(filled.get(page, 0), min(P, st.length - i * P))
        used = self.allocator.used_count
        stored = sum(filled.values())
        return MemoryStats(
            live_sequences=len(self._seqs), tokens_stored=stored, slots_reserved=used * P,
            waste_slots=used * P - stored, capacity_slots=self.spec.capacity_tokens,
            bytes_per_slot=self.spec.bytes_per_token, page_size=P, total_pages=self.spec.num_pages,
            pages_in_use=used, free_pages=self.allocator.free_count)

    def poison_free_pages(self, value: float = float("nan")) -> None:
        """Fill every free page of every layer with `value`, and keep doing so as pages are freed.

        A debug aid for isolation checks: a read of a page no live sequence owns then shows up as NaN.
        """
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidRequestError(f"value must be a float, got {type(value).__name__} {value!r}")
        self.poison = True  # from now on freed pages are poisoned and handed-out pages scrubbed
        free = self.allocator.policy.free_pages()
        if free:
            self._fill_pages(torch.tensor(free, device=self.spec.device), value)

    def snapshot(self) -> dict:
        """A full copy of the cache's state, for checking that a rejected request changed nothing."""
        return {
            "sequences": {s: (tuple(st.pages), st.length) for s, st in self._seqs.items()},
            "allocator": self.allocator.snapshot(),
            "page_logical": self.page_logical.cpu().clone(),
            "host_page_table": (self._host_table.rows.clone(), tuple(self._host_table._free)),
            "k_pool": self.k_pool.cpu().clone(),
            "v_pool": self.v_pool.cpu().clone(),
        }
