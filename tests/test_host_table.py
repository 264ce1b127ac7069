"""HostPageTable: the host rows plan() gathers its page table from."""

from __future__ import annotations

import torch

from paged import CacheSpec, PagedKVCache
from paged.host_table import HostPageTable


def test_rows_grow_copy_release_and_gather_in_order():
    t = HostPageTable(width=4, initial_rows=2)
    a, b = t.acquire(), t.acquire()
    t.write([a, a, b], [0, 1, 0], [7, 3, 9])
    c = t.acquire(copy_of=a)                           # a third row: the table doubles
    assert t.rows.shape == (4, 4) and len({a, b, c}) == 3
    assert t.rows[c].tolist() == [7, 3, -1, -1]
    t.write([c], [1], [5])                             # the copy changes alone
    assert t.rows[a].tolist() == [7, 3, -1, -1]
    assert t.gather([c, b], padded_rows=4).tolist() == [[7, 5, -1, -1], [9, -1, -1, -1], [-1] * 4, [-1] * 4]
    t.release(a)
    assert t.rows[a].tolist() == [-1] * 4 and t.acquire() == a     # a released row is clean when reused


def test_cache_past_the_initial_rows():
    """More live sequences than the table's first rows: plan() still sees every sequence's own pages."""
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=4, num_pages=400, max_seq_len=32,
                     dtype=torch.float32, device="cpu")
    cache = PagedKVCache(spec, policy="random", seed=3)
    ids = list(range(100))
    for i in ids:
        cache.admit(i)
    plan = cache.plan(ids, [1 + i % 7 for i in ids])
    expected = [cache.pages(i)[t // 4] * 4 + t % 4 for i in ids for t in range(1 + i % 7)]
    assert plan.slot_mapping.tolist() == expected                       # chunked prefill: T = sum(q_lens)
    assert plan.token_rows.tolist() == [i * 7 + t for i in ids for t in range(1 + i % 7)]
    for i in ids[::9]:
        cache.finish(i)
    live = [i for i in ids if i in cache]
    plan = cache.plan(live, [1] * len(live))
    table = plan.buffers.page_table.cpu()
    for b, i in enumerate(live):
        pages = cache.pages(i)
        assert table[b, :len(pages)].tolist() == pages and (table[b, len(pages):] == -1).all()
    expected = [cache.pages(i)[(cache.length(i) - 1) // 4] * 4 + (cache.length(i) - 1) % 4 for i in live]
    assert plan.slot_mapping.tolist() == expected                       # decode: T = B
