"""GPU kernel choices: non-decode tiles divide the BlockMask's blocks (else NoValidChoicesError); the decode block
layout follows FlexDecoding's split-KV heuristic."""

from __future__ import annotations

import pytest
import torch

from paged import CacheSpec, PagedKVCache
from paged.attention import prefill_tiles
from paged.errors import UnsupportedConfigError
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
        assert page_size % tiles["BLOCK_N"] == 0 and tiles["BLOCK_N"] >= 16, (chunk, tiles)   # tl.dot needs >= 16
        if "BLOCK_M" in tiles:
            assert q_block % tiles["BLOCK_M"] == 0 and tiles["BLOCK_M"] >= 16, (chunk, tiles)
        else:  # inductor's default BLOCK_M is a power of two <= 128 (its tables): it divides only a 128-row block
            assert q_block == 128, (chunk, tiles)


def _decode_layout(device, batch: int, kv_heads: int, **options) -> bool:
    """Whether a decode step of `batch` sequences passes full-block lists (True) or lists every page as masked."""
    spec = CacheSpec(num_layers=1, num_kv_heads=kv_heads, head_dim=16, page_size=16, num_pages=4 * batch,
                     max_seq_len=64, dtype=torch.float32, device=device)
    cache = PagedKVCache(spec, decode_kernel="flex", **options)
    for i in range(batch):
        cache.admit(i)
    cache.plan(list(range(batch)), [20] * batch)
    return cache.plan(list(range(batch)), [1] * batch).block_mask.full_kv_num_blocks is not None


def _block_counts(device, batch: int, **options) -> tuple[list[int], list[int]]:
    """(full, masked) block counts per row (the mask has one head) of a decode step of `batch` rows holding 21 tokens (page 16)."""
    spec = CacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, page_size=16, num_pages=4 * batch,
                     max_seq_len=64, dtype=torch.float32, device=device)
    cache = PagedKVCache(spec, decode_kernel="flex", **options)
    for i in range(batch):
        cache.admit(i)
    cache.plan(list(range(batch)), [20] * batch)
    mask = cache.plan(list(range(batch)), [1] * batch).block_mask
    full = mask.full_kv_num_blocks
    return ([] if full is None else full[:batch].flatten().tolist()), mask.kv_num_blocks[:batch].flatten().tolist()


def test_decode_full_blocks_auto_follows_flexdecoding_splits(device):
    """"auto" passes full blocks exactly where FlexDecoding gives each (sequence, kv head) one split:
    padded batch x kv heads > SMs on CUDA; always off CUDA (no split there)."""
    if device.type != "cuda":
        # Off CUDA "auto" always means full blocks: each row's full page listed as full (1) and only its partial
        # last page as masked (1), at small and large batches alike; False lists both pages as masked (0 full).
        for batch in (1, 2, 64):
            auto, forced = _block_counts(device, batch, decode_full_blocks="auto"), _block_counts(
                device, batch, decode_full_blocks=True)
            assert auto == forced == ([1] * batch, [1] * batch), (batch, auto, forced)
        assert _block_counts(device, 2, decode_full_blocks=False) == ([0] * 2, [2] * 2)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        small = 1 << ((sms // 2).bit_length() - 1)           # largest power of two <= sms / 2: x 2 heads <= sms
        assert not _decode_layout(device, small, 2, decode_full_blocks="auto")
        big = 2 * small                                        # x 2 heads > sms
        assert _decode_layout(device, big, 2, decode_full_blocks="auto")
        assert _decode_layout(device, 1, 2, decode_full_blocks="auto", kernel_options={"SPLIT_KV": 1})
    assert _decode_layout(device, 2, 2, decode_full_blocks=True)
    if device.type == "cuda":                          # the CPU always gets (all-zero) full-block lists
        assert not _decode_layout(device, 2, 2, decode_full_blocks=False)


def test_decode_full_blocks_rejects_other_values():
    spec = CacheSpec(num_layers=1, num_kv_heads=1, head_dim=16, page_size=16, num_pages=4, max_seq_len=64)
    with pytest.raises(UnsupportedConfigError, match="decode_full_blocks"):
        PagedKVCache(spec, decode_full_blocks="always")
