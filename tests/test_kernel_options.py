"""The GPU tile choice for non-decode steps divides the blocks the BlockMask uses (else: NoValidChoicesError)."""

from __future__ import annotations

import pytest
import torch

from paged import CacheSpec, PagedKVCache
from paged.attention import prefill_tiles
from paged.plan import padded_query_len


@pytest.mark.parametrize("page_size", [16, 32, 64, 128, 256])
def test_prefill_tiles_divide_the_query_block_and_the_page(page_size):
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=page_size, num_pages=1024 // page_size,
                     max_seq_len=1024, dtype=torch.float32, device="cpu")
    cache = PagedKVCache(spec)
    for chunk in range(2, 600):
        padded = padded_query_len(chunk)
        q_block = cache._buffers_for(1, padded).q_block            # the BlockMask's query block for this step
        tiles = prefill_tiles(padded, page_size)
        assert q_block % tiles["BLOCK_M"] == 0 and page_size % tiles["BLOCK_N"] == 0, (chunk, tiles)
        assert tiles["BLOCK_M"] >= 16 and tiles["BLOCK_N"] >= 16      # tl.dot needs 16 on both sides
