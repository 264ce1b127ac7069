"""Deliberately broken backends: the conformance suite must FAIL on every one (tests/test_teeth.py).

Each is `PagedKVCache` with one realistic bug injected, exposed as a zero-argument factory returning a
BackendFactory, so `--backend tests.broken_backends:NAME` selects it (`NAME_eager`: the same bug with eager
attention on the main path as well, for bugs in page bookkeeping). Add every bug met while building.
"""

from __future__ import annotations

from functools import partial

import torch

from conformance.contract import BackendFactory
from paged import PagedKVCache
from paged.errors import OutOfPagesError
from paged.mods import causal


class OffByOneOffset(PagedKVCache):
    """Writes each token one slot further into its page (wrapping), so reads find the wrong token."""

    def _build_plan(self, *args, **kwargs):
        plan = super()._build_plan(*args, **kwargs)
        P = self.spec.page_size
        plan.slot_mapping = plan.slot_mapping // P * P + (plan.slot_mapping + 1) % P
        return plan


class NoOwnershipCheck(PagedKVCache):
    """The mask_mod forgets page ownership: right when compiled (block lists), a leak on the eager path.

    Injected after plan() through the StepPlan's block masks only (not the cache's private helpers), so it
    survives refactors of how plans are built."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **{**kw, "decode_kernel": "flex"})  # a FlexAttention mask bug: keep flex decode

    def plan(self, seq_ids, q_lens, **kw):
        plan = super().plan(seq_ids, q_lens, **kw)
        if self.attention != "eager" or plan.block_mask is None:
            return plan
        buf, P, logical_mask = plan.buffers, self.spec.page_size, kw.get("mask_mod") or causal

        def leaky_mask(b, h, q_idx, kv_idx):
            logical_page = self.page_logical[kv_idx // P]
            kv_pos = logical_page * P + kv_idx % P
            q_pos = buf.q_start[b] + q_idx
            return ((logical_page >= 0) & (kv_pos < buf.q_start[b] + buf.q_len[b]) & (q_idx < buf.q_len[b])
                    & logical_mask(b, h, q_pos, kv_pos))

        for mask in {id(m): m for m in (plan.block_mask, getattr(plan, "checked_block_mask", None)) if m}.values():
            mask.mask_mod = leaky_mask
        return plan


class DoubleHandout(PagedKVCache):
    """The allocator hands out a page that another sequence still uses."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        alloc = self.allocator
        original = alloc.allocate

        def allocate(n, what="request"):
            pages = original(n, what)
            in_use = [p for p in range(alloc.num_pages) if alloc.refcount(p) > 0 and p not in pages]
            if pages and in_use:
                alloc.release([pages[0]])
                alloc.share([in_use[0]])
                pages[0] = in_use[0]
            return pages

        alloc.allocate = allocate


class ForkWithoutRefcount(PagedKVCache):
    """Fork shares the parent's pages without counting the child as an owner: a finished parent frees
    pages the child still reads."""

    def fork(self, parent_id, child_id):
        share = self.allocator.share
        self.allocator.share = lambda pages: None
        try:
            super().fork(parent_id, child_id)
        finally:
            self.allocator.share = share


class NoCopyOnWrite(PagedKVCache):
    """A fork shares its partly filled last page and then writes into it in place."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        real = self.allocator.refcount
        self.allocator.refcount = lambda page: min(real(page), 1)


class WrongGQAMapping(PagedKVCache):
    """Query head h reads kv head h % Hkv instead of h // (Hq / Hkv)."""

    def run(self, layer, q, k, v, *, scale=None):
        hq, hkv = q.shape[2], self.spec.num_kv_heads
        g = hq // hkv
        perm = torch.arange(hq).view(hkv, g).t().reshape(-1) if hq % hkv == 0 else torch.arange(hq)
        out = super().run(layer, q[:, :, perm], k, v, scale=scale)
        return out[:, :, torch.argsort(perm)]


class WrongScale(PagedKVCache):
    """Softmax scale 1/D instead of 1/sqrt(D)."""

    def run(self, layer, q, k, v, *, scale=None):
        return super().run(layer, q, k, v, scale=1.0 / q.shape[-1] if scale is None else scale)


class DropLastChunkToken(PagedKVCache):
    """The last token of every prefill chunk is never stored."""

    def _build_plan(self, buf, seq_ids, q_lens, *args, **kwargs):
        plan = super()._build_plan(buf, seq_ids, q_lens, *args, **kwargs)
        keep = torch.ones(plan.slot_mapping.numel(), dtype=torch.bool)
        ends = torch.tensor(q_lens).cumsum(0) - 1
        keep[ends[torch.tensor(q_lens) > 1]] = False
        keep = keep.to(plan.slot_mapping.device)
        plan.slot_mapping, plan.token_rows = plan.slot_mapping[keep], plan.token_rows[keep]
        return plan


class LeakOnFinish(PagedKVCache):
    """finish() keeps the last page of every sequence."""

    def finish(self, seq_id):
        pages = self._get(seq_id).pages
        if pages:
            self.allocator.share(pages[-1:])
        super().finish(seq_id)


class PartialAllocationOnFailure(PagedKVCache):
    """A step that runs out of pages keeps a page it grabbed before noticing (not all-or-nothing)."""

    def plan(self, seq_ids, q_lens, **kw):
        try:
            return super().plan(seq_ids, q_lens, **kw)
        except OutOfPagesError:
            self.allocator.allocate(min(1, self.allocator.free_count))
            raise


class MemoryReportCountsSharedTwice(PagedKVCache):
    """memory() counts a page shared by forks once per owner."""

    def memory(self):
        m = super().memory()
        shared = sum(len(st.pages) for st in self._seqs.values()) - m.pages_in_use
        return type(m)(**{**m.__dict__, "pages_in_use": m.pages_in_use + shared,
                          "slots_reserved": (m.pages_in_use + shared) * self.spec.page_size,
                          "waste_slots": m.waste_slots + shared * self.spec.page_size})


class PaddingRowsNotZero(PagedKVCache):
    """Returns garbage (not 0) past each row's q_len, which callers may read (met while building)."""

    def run(self, layer, q, k, v, *, scale=None):
        out = super().run(layer, q, k, v, scale=scale)
        return out + (out == 0).to(out.dtype)


class TritonDecodeReadsOneKeyTooMany(PagedKVCache):
    """The Triton decode kernel is told each row holds one key more than it does (decode steps on Triton): it
    stores the new token one slot late and attends over the slot before it, which holds no token."""

    def __init__(self, spec, **kw):
        if kw.get("attention", "compiled") == "compiled":
            kw["decode_kernel"] = "triton"  # on the CPU too (Triton's interpreter)
        super().__init__(spec, **kw)

    def run(self, layer, q, k, v, *, scale=None):
        plan = self._plan
        if plan is None or plan.kernel != "triton":
            return super().run(layer, q, k, v, scale=scale)
        q_start = plan.buffers.q_start
        q_start[:plan.batch] += 1
        try:
            return super().run(layer, q, k, v, scale=scale)
        finally:
            q_start[:plan.batch] -= 1


BROKEN = {
    "off_by_one_offset": OffByOneOffset,
    "no_ownership_check": NoOwnershipCheck,
    "page_handed_out_twice": DoubleHandout,
    "freed_page_still_referenced": ForkWithoutRefcount,
    "fork_writes_shared_page": NoCopyOnWrite,
    "gqa_heads_mapped_wrongly": WrongGQAMapping,
    "softmax_scale_wrong": WrongScale,
    "last_chunk_token_dropped": DropLastChunkToken,
    "pages_leak_on_finish": LeakOnFinish,
    "partial_allocation_on_failure": PartialAllocationOnFailure,
    "memory_counts_shared_twice": MemoryReportCountsSharedTwice,
    "padding_rows_not_zero": PaddingRowsNotZero,
    "triton_decode_reads_past_length": TritonDecodeReadsOneKeyTooMany,
}


def _factory(name: str) -> BackendFactory:
    cls = BROKEN[name]

    def make(spec, attention="compiled", **kw):
        return cls(spec, policy="random", attention=attention, **kw)

    return BackendFactory(name=f"broken:{name}", make=make, make_eager=partial(make, attention="eager"),
                          description=cls.__doc__ or "")


for _name in BROKEN:
    globals()[_name] = partial(_factory, _name)


def _eager_factory(name: str) -> BackendFactory:
    """The broken backend with eager attention on its main path too (`<name>_eager`): for bookkeeping bugs."""
    f = _factory(name)
    return BackendFactory(name=f"broken-eager:{name}", make=f.make_eager, make_eager=f.make_eager,
                          description=f.description)


for _name in BROKEN:
    globals()[_name + "_eager"] = partial(_eager_factory, _name)
