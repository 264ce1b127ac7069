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

* Errors. Requests are validated by the adapter's own `checks` before the peer is touched, and the pages a step
  needs are counted here (from the peer's `capacity` and `empty_pages`) and refused with OutOfPagesError
  up front: the peer raises a bare AssertionError from the one `reserve` that runs out, after the step's
  earlier `reserve` calls have already taken their pages.

* K/V writes. `assign(batch_idx, input_pos, ...)` writes B x S positions; positions past a row's reserved
  capacity index the page table's -1 and silently land in the pool's last page. The adapter therefore
  passes only real tokens (one `assign` row per new token: batch_idx = the token's page-table row,
  input_pos = its logical position), never a padded (B, max_q_len) block.

Known peer defects that the suite sees (listed in `expected_failures`, each reproduced in
tests/test_peer_torch_paged_defects.py):

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

What the adapter takes from `paged`, and why (a peer stands on paged's public API or on its own code, so that
the suite compares two implementations rather than one implementation with itself):

* public API, reused: `CacheSpec` (the shape every backend is built from), `MemoryStats` (the contract's memory
  report), the contract's errors (`OutOfPagesError`, `UnsupportedConfigError`, ...) and `paged.mods.causal`
  (the contract's default mask, a public mod). These are the contract's vocabulary, not paged's machinery.
* internals, not used: request validation (`paged.validation`), block lists and shape buckets (`paged.plan`),
  the FlexAttention call and its tile rule (`paged.attention`). The adapter has its own `checks`, its own
  logical block lists (`step`: the peer converts LOGICAL masks, whose page table is the identity, so they are
  simpler than paged's physical ones) and its own compiled flex_attention call (`backend`). A bug in paged's
  block lists or checks therefore cannot hide in the peer's results too.

Modules: `backend` (TorchPagedAttentionBackend: sequences, plan, run, memory), `step` (the step's logical block
mask, mods and token routes), `checks` (request validation), this file (the factory the suite uses).
"""

from __future__ import annotations

from functools import partial

from conformance.contract import CAPABILITIES, BackendFactory, KnownDefect
from conformance.peers.torch_paged.backend import OutOfBatchRowsError, TorchPagedAttentionBackend
from conformance.peers.torch_paged.step import PeerPlan, RowMode
from paged import CacheSpec

__all__ = ["NAME", "ERASE_BUG", "CAPABILITIES_OFFERED", "OutOfBatchRowsError", "PeerPlan", "RowMode",
           "TorchPagedAttentionBackend", "torch_paged_attention_factory"]

NAME = "torch-paged-attention"

ERASE_BUG = (
    "peer bug: PagedAttention.erase() leaves physical_to_logical set (it assigns into an advanced-indexing "
    "copy), so a sequence that later takes the same batch row inherits stale logical pages; eager "
    "flex_attention reads only the converted mask_mod and attends to pages the sequence does not own. "
    "Reproduced on torch 2.13 CPU: tests/test_peer_torch_paged_defects.py::test_peer_bug_erase_keeps_inverse_table "
    "and ::test_erase_bug_breaks_eager_twin")

CAPABILITIES_OFFERED = frozenset({"mods", "chunked_prefill", "mixed_steps", "paging", "poison", "eager"})
assert CAPABILITIES_OFFERED <= CAPABILITIES


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
