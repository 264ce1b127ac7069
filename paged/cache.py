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

import copy
from dataclasses import dataclass, field
from typing import Hashable, Literal, Sequence

import torch
import torch.nn.functional as F

from paged.allocator import PageAllocator, PlacementPolicy
from paged.attention import (AttentionMode, attend, decode_kernel_defaults, decode_splits_kv, own_call_is_compiled,
                             prefill_tiles)
from paged.errors import InvalidRequestError, UnsupportedConfigError
from paged.host_table import HostPageTable
from paged.mods import MaskMod, ScoreMod, causal
from paged.plan import StepBuffers, StepPlan, bucket, fill_block_lists, padded_query_len, physical_mods
from paged.spec import CacheSpec
from paged.stats import MemoryStats
from paged.transfer import to_device
from paged.validation import check_complete, check_new_id, check_run, check_step, check_step_done, lookup
from torch.nn.attention.flex_attention import BlockMask


@dataclass
class SequenceState:
    """Host bookkeeping of one live sequence: its pages in logical order and its stored length."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    row: int | None = None  # its row in the cache's HostPageTable (set by admit/fork)
    missing_layers: tuple[int, ...] = ()  # layers its last step never ran (abandoned by finish()): finish it


def _resolve_decode_kernel(choice: str, attention: str, device: torch.device) -> str:
    """"flex" or "triton" for plain decode steps; UnsupportedConfigError for a choice that cannot run here."""
    if choice not in ("auto", "flex", "triton"):
        raise UnsupportedConfigError(f"decode_kernel must be 'auto', 'flex' or 'triton', got {choice!r}")
    if choice == "flex" or (choice == "auto" and (attention != "compiled" or device.type != "cuda")):
        return "flex"
    from paged import triton_decode  # imports Triton: only where it may run

    if choice == "auto":
        return "triton" if triton_decode.available(device) else "flex"
    if attention != "compiled":
        raise UnsupportedConfigError("decode_kernel='triton' needs attention='compiled' (eager is FlexAttention's "
                                     "mask_mod-only reference path)")
    if not triton_decode.available(device):
        hint = ("Triton is not installed" if triton_decode.triton is None else
                "on the CPU it runs only under Triton's interpreter: set TRITON_INTERPRET=1 before Python starts")
        raise UnsupportedConfigError(f"decode_kernel='triton' cannot run on {device}: {hint}")
    return "triton"


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
            "triton" on CUDA where Triton imports, else "flex". Prefill, mods and attention="eager" always use
            FlexAttention. "triton" on the CPU runs Triton's interpreter (TRITON_INTERPRET=1 before Triton is
            imported): for tests only.

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
        self.decode_kernel = _resolve_decode_kernel(decode_kernel, attention, spec.device)
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
        # CPU codegen needs the block lists to span the whole pool; on GPU a sequence's pages suffice.
        self._table_width = N if spec.device.type == "cpu" else spec.max_pages_per_seq
        self._host_table = HostPageTable(self._table_width)
        self._buffers: dict[tuple[int, int], StepBuffers] = {}
        self._plan: StepPlan | None = None

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
        seq_ids, q_lens = check_step(self._length_of_live, self._seqs, seq_ids, q_lens, self.spec.max_seq_len,
                                     mask_mod, score_mod)
        P = self.spec.page_size
        states = [self._seqs[s] for s in seq_ids]

        buf = self._buffers_for(bucket(len(seq_ids)), padded_query_len(max(q_lens)))  # may allocate: before the commit

        # Pages to add, and shared partly filled last pages that must be copied before they are written.
        grow = [-(-(st.length + q) // P) - len(st.pages) for st, q in zip(states, q_lens)]
        cow = self._copies_needed(states)
        new_pages = self.allocator.allocate(sum(grow) + sum(cow), what=f"step of {len(seq_ids)} sequence(s)")

        # ---- from here on nothing can fail on bad input: commit
        self._plan = None
        start_lens = tuple(st.length for st in states)
        it = iter(new_pages)
        assigned, assigned_logical, assigned_rows, copies, freed = [], [], [], [], []
        for st, q, g, c in zip(states, q_lens, grow, cow):
            if c:
                old, fresh = st.pages[-1], next(it)
                copies.append((old, fresh))
                freed += self.allocator.release([old])
                st.pages[-1] = fresh
                assigned.append(fresh)
                assigned_logical.append(len(st.pages) - 1)
                assigned_rows.append(st.row)
            for _ in range(g):
                assigned.append(next(it))
                assigned_logical.append(len(st.pages))
                assigned_rows.append(st.row)
                st.pages.append(assigned[-1])
            st.length += q
        self._host_table.write(assigned_rows, assigned_logical, assigned)

        rounds = buf.packed.rounds
        try:
            plan = self._build_plan(buf, seq_ids, q_lens, start_lens, states, assigned, assigned_logical, mask_mod,
                                    score_mod)
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

    def _length_of_live(self, seq_id: Hashable) -> int:
        return self._seqs[seq_id].length

    def _kernel_options(self, buf: StepBuffers) -> dict | None:
        """GPU kernel options: tiles the non-decode kernel can take, faster decode stages/warps; user options win."""
        if self.spec.device.type != "cuda":
            return self.kernel_options
        if buf.padded_q_len == 1:
            tiles = decode_kernel_defaults(self.spec.device)
        else:
            tiles = prefill_tiles(buf.padded_q_len, self.spec.page_size)
        return {**tiles, **(self.kernel_options or {})}

    def _decode_full_blocks(self, padded_batch: int) -> bool:
        if self.decode_full_blocks != "auto":
            return self.decode_full_blocks
        split_kv = (self.kernel_options or {}).get("SPLIT_KV")
        if split_kv is not None:
            return split_kv <= 1
        return not decode_splits_kv(padded_batch, self.spec.num_kv_heads, self.spec.device)

    def _copies_needed(self, states: list[SequenceState]) -> list[bool]:
        """Which sequences must copy their shared, partly filled last page before writing into it.

        Writers are taken in step order; one whose page no longer has another owner (every other owner
        already copied it in this step) writes in place, so a page is never copied by all its owners.
        """
        if not self.allocator.shared_count:                 # no forks alive: nothing is shared
            return [False] * len(states)
        owners: dict[int, int] = {}
        cow = []
        for st in states:
            page = st.pages[-1] if st.length % self.spec.page_size else None
            if page is None:
                cow.append(False)
                continue
            left = owners.setdefault(page, self.allocator.refcount(page))
            cow.append(left > 1)
            owners[page] = left - 1 if left > 1 else left
        return cow

    def _buffers_for(self, padded_batch: int, padded_q: int) -> StepBuffers:
        key = (padded_batch, padded_q)
        if key not in self._buffers:
            # The query block must be a multiple of the GPU kernels' row tile: FlexDecoding's is
            # max(16, next_pow2(GQA group)) even for one query row, so decode steps get a 128-row block too.
            buf = StepBuffers(padded_batch, padded_q, 128 if padded_q == 1 else min(padded_q, 128),
                              self._table_width, self.spec.page_size, self.spec.device)
            buf.kernel_options = self._kernel_options(buf)  # once per bucket, not once per layer
            if padded_q == 1 and self.decode_kernel == "triton":
                from paged.triton_decode import decode_splits, launch_options

                buf.decode_splits = decode_splits(padded_batch, self.spec.num_kv_heads, self.spec.max_seq_len,
                                                  self.spec.device)
                buf.decode_launch = launch_options(self.spec.dtype, self.spec.head_dim, self.spec.device,
                                                   padded_batch, self.spec.num_kv_heads)
            self._buffers[key] = buf
        return self._buffers[key]

    def _build_plan(self, buf, seq_ids, q_lens, start_lens, states, assigned, assigned_logical, mask_mod,
                    score_mod) -> StepPlan:
        spec, P = self.spec, self.spec.page_size
        B, max_q = len(seq_ids), max(q_lens)
        Bp, host = buf.padded_batch, buf.host

        # Every tensor of the step goes into the bucket's pinned twin, then to the GPU in ONE copy that never
        # waits for it (transfer.PackedStaging); begin() waits only if the host is a whole round ahead.
        buf.packed.begin()
        pad = (0,) * (Bp - B)
        host["q_start"].copy_(torch.tensor(start_lens + pad, dtype=torch.int32))                   # (Bp,)
        host["q_len"].copy_(torch.tensor(q_lens + pad, dtype=torch.int32))                         # (Bp,)
        table = self._host_table.gather([st.row for st in states], Bp, out=host["page_table"])    # (Bp, W)
        if assigned:
            host["new_pages"][:len(assigned)] = torch.tensor(assigned)
            host["new_logical"][:len(assigned)] = torch.tensor(assigned_logical, dtype=torch.int32)

        # Slot of every new token, and its row in the caller's flattened (B * max_q) inputs.
        if max_q == 1:                      # decode: T = B, token_rows is the bucket's arange; one slot per row
            T = B
            host["slots"][:T] = torch.tensor([st.pages[n // P] * P + n % P for st, n in zip(states, start_lens)])
        else:
            lens = host["q_len"][:B].long()                                                       # (B,)
            owner = torch.repeat_interleave(torch.arange(B), lens)                                # (T,)
            offset = torch.arange(owner.numel()) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
            pos = host["q_start"][owner].long() + offset                                          # (T,)
            T = owner.numel()
            host["slots"][:T] = table[owner, torch.div(pos, P, rounding_mode="floor")].long() * P + pos % P
            host["token_rows"][:T] = owner * max_q + offset

        # The Triton decode kernel reads only the page table, lengths and split length: no block lists, no mask.
        triton_step = self.decode_kernel == "triton" and max_q == 1 and mask_mod is None and score_mod is None
        if triton_step:
            from paged.triton_decode import split_keys

            host["split_keys"][0] = split_keys([n + 1 for n in start_lens], spec.num_kv_heads, buf.decode_splits,
                                               spec.device)
            buf.packed.send(last="new_logical")
        else:
            num_pages = torch.tensor([len(st.pages) for st in states] + list(pad))
            decode_full = max_q == 1 and self._decode_full_blocks(Bp)
            full_blocks = mask_mod is None and (max_q > 1 or decode_full)
            lists = fill_block_lists(buf, table, num_pages, host["q_start"].long(), host["q_len"].long(), P,
                                     causal_default=full_blocks)
            for name, values in lists.items():
                host[name].copy_(values)
            buf.packed.send()

        if triton_step:
            return StepPlan(seq_ids, q_lens, start_lens, max_q, buf, buf.slots[:T], buf.token_rows[:T], None, None,
                            set(), kernel="triton")
        key = (mask_mod, score_mod)
        if key not in buf.wrapped:
            buf.wrapped[key] = physical_mods(buf, self.page_logical, P, mask_mod or causal, score_mod)
        checked_mask, listed_mask, paged_score = buf.wrapped[key]
        compiled = self.attention == "compiled"
        own_mask = listed_mask if compiled and self.check_ownership is not True else checked_mask
        caller_mask = listed_mask if compiled and self.check_ownership is False else checked_mask
        # FlexDecoding keys its split-KV tiling on whether full-block lists exist at all (not on their contents),
        # so the every-page-masked layout passes none on CUDA. The CPU template does not split, and its C++ codegen
        # fails for some shapes without full-block lists (torch 2.13): it gets all-zero lists.
        no_full = max_q == 1 and not decode_full and spec.device.type == "cuda"
        block_mask = BlockMask.from_kv_blocks(
            buf.kv_num_blocks, buf.kv_indices, None if no_full else buf.full_kv_num_blocks,
            None if no_full else buf.full_kv_indices,
            BLOCK_SIZE=(buf.q_block, P), mask_mod=own_mask,
            seq_lengths=(buf.padded_q_len, spec.num_pages * P), compute_q_blocks=False)
        checked_block_mask = block_mask
        if caller_mask is not own_mask:
            checked_block_mask = copy.copy(block_mask)      # same block-list tensors, the other mask_mod
            checked_block_mask.mask_mod = caller_mask
        return StepPlan(seq_ids, q_lens, start_lens, max_q, buf, buf.slots[:T], buf.token_rows[:T],
                        block_mask, paged_score, set(), checked_block_mask=checked_block_mask)

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
        batch = plan.batch if plan else 0
        if (plan is not None and plan.kernel == "triton" and isinstance(q, torch.Tensor) and q.dim() == 4
                and q.shape[0] == plan.buffers.padded_batch):
            batch = q.shape[0]  # the bucket's padded batch (k and v must match it too)
        check_run(self.spec, plan is not None, plan.layers_run if plan else set(), batch,
                  plan.max_q_len if plan else 0, layer, q, k, v, scale=scale)
        spec, B, Lq = self.spec, plan.batch, plan.max_q_len
        H, D = spec.num_kv_heads, spec.head_dim
        Lq_in = q.shape[1]
        q, k, v = q[:, :Lq], k[:, :Lq], v[:, :Lq]
        buf = plan.buffers  # the layer counts as run once its attention was launched: a raise allows a retry
        if plan.kernel == "triton":                                                    # plain decode: Lq == 1
            from paged.triton_decode import paged_decode

            # One launch (two with split-KV merging) stores the new K/V and attends over each row's pages. Padding
            # rows of a padded batch have q_len 0 and q_start 0: they store nothing and their output is 0.
            q1, k1, v1 = (x[:, 0] if x.stride(-1) == 1 else x[:, 0].contiguous() for x in (q, k, v))
            out = paged_decode(q1, self.k_pool[layer], self.v_pool[layer], buf.page_table, buf.q_start, buf.q_len,
                               spec.page_size, D ** -0.5 if scale is None else scale, buf.decode_splits,
                               k_new=k1, v_new=v1, split_keys=buf.split_keys,
                               **buf.decode_launch)                             # (B or Bp, Hq, D)
            plan.layers_run.add(layer)
            out = out[:, None]                                                 # (B or Bp, 1, Hq, D)
            return out if Lq_in == 1 else F.pad(out, (0, 0, 0, 0, 0, Lq_in - 1))

        # Every launch here repeats in every layer, so a step whose rows are all full (every decode step: T = B *
        # Lq) skips the identity gather of the new K/V and the row mask of the output.
        slots = plan.slot_mapping
        dense = slots.numel() == B * Lq
        k_new, v_new = k.reshape(B * Lq, H, D), v.reshape(B * Lq, H, D)                # (B * Lq, Hkv, D)
        if not dense:
            k_new, v_new = k_new[plan.token_rows], v_new[plan.token_rows]              # (T, Hkv, D)
        self.k_pool[layer][:, slots] = k_new.transpose(0, 1)
        self.v_pool[layer][:, slots] = v_new.transpose(0, 1)

        # A fresh contiguous buffer whatever the caller's strides: compiled flex guards on them (dynamic=False).
        qp = q.new_zeros(buf.padded_batch, buf.padded_q_len, q.shape[2], D)            # (Bp, Lqp, Hq, D)
        qp[:B, :Lq] = q
        out = attend(qp.transpose(1, 2), self.k_pool[layer:layer + 1], self.v_pool[layer:layer + 1],
                     self._block_mask(plan), plan.score_mod, scale, self.attention, buf.kernel_options)
        plan.layers_run.add(layer)
        out = out.transpose(1, 2)[:B, :Lq]                                             # (B, Lq, Hq, D)
        if not dense:
            # Unmasked (full) pages reach a short row's padding positions too: zero them so callers never see garbage.
            valid = torch.arange(Lq, device=q.device)[None, :] < buf.q_len[:B, None]  # (B, Lq)
            out = out * valid[:, :, None, None].to(out.dtype)
        return out if Lq_in == Lq else F.pad(out, (0, 0, 0, 0, 0, Lq_in - Lq))        # (B, Lq_in, Hq, D)

    @staticmethod
    def _block_mask(plan: StepPlan) -> BlockMask:
        """The plan's block mask for this call: the checked one unless the cache's own compiled call surely runs
        inductor's kernel, which visits only the listed pages (`own_call_is_compiled`)."""
        if plan.checked_block_mask is plan.block_mask:  # eager attention, check_ownership=True: nothing to decide
            return plan.block_mask
        return plan.block_mask if own_call_is_compiled() else plan.checked_block_mask

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
