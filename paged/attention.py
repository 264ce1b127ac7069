"""The FlexAttention call over one layer's page pool, compiled or eager."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

AttentionMode = Literal["compiled", "eager"]

_compiled: Any = None
MAX_COMPILED_SHAPES = 256


def compiled_flex_attention() -> Any:
    """flex_attention compiled once per process with static shapes.

    `dynamic=False`: a dynamic batch disqualifies the FlexDecoding kernel on GPU and breaks the CPU
    template; the cache keeps every shape static instead (fixed pools, bucketed batch and query length).
    `fullgraph=True`: past dynamo's recompile limit (or at a graph break) the call raises instead of running
    eagerly, which would be 10-20x slower and would read the whole pool through a mask_mod that may trust the
    block lists (`PagedKVCache.check_ownership`).
    """
    global _compiled
    if _compiled is None:
        # Every (padded batch, padded query length, pool) bucket is one compiled graph; dynamo's default
        # limit of 8 per function would fail later buckets.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_SHAPES)
        _compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled


def own_call_is_compiled() -> bool:
    """Whether a call of `compiled_flex_attention()` made now runs inductor's kernel rather than eager FlexAttention.

    Eager FlexAttention evaluates the mask_mod over the whole pool, so a mask that trusts the block lists is right
    only when this holds. It does not when the call is traced by the caller's torch.compile (whose backend may be
    "eager" or "aot_eager"), when dynamo is disabled (TORCHDYNAMO_DISABLE=1 makes torch.compile return the
    function itself; `torch._dynamo.config.disable` at call time), when a stance other than "default"
    or "fail_on_recompile" or a forced backend is set (`torch.compiler.set_stance`: "force_eager",
    "eager_on_recompile", ...), or when dynamo's suppress_errors may run a failed frame eagerly. The recompile
    limit and graph breaks raise instead (fullgraph=True).
    """
    if torch.compiler.is_compiling() or compiled_flex_attention() is flex_attention:
        return False
    config = torch._dynamo.config
    if config.disable or config.suppress_errors:
        return False
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)  # private: unknown layouts count as not compiled
    return (stance is not None and getattr(stance, "stance", None) in ("default", "fail_on_recompile")
            and getattr(stance, "backend", "?") is None)


def prefill_tiles(padded_q_len: int, page_size: int) -> dict:
    """Tiles for compiled flex's non-decode GPU kernel: key tiles must divide the page, query tiles the Q block.

    Inductor's default tiles are 32-128 keys and rows, which leaves no valid config for pages or chunks smaller
    than that (NoValidChoicesError). The query block is min(padded_q_len, 128): from 128 rows on, every default
    BLOCK_M (a power of two <= 128) divides it, so the default stays (128 rows, 8 warps for bf16 / fp16 at head
    dim 128 on Hopper: 64 rows with those 8 warps took 2.2x contiguous flex's time for a 4k chunk, H200); below
    that the rows are capped at min(padded_q_len, 64).
    """
    tiles = {"BLOCK_N": min(page_size, 64)}
    if padded_q_len < 128:
        tiles["BLOCK_M"] = min(padded_q_len, 64)
    return tiles


def decode_kernel_defaults(device: torch.device) -> dict:
    """Kernel options for compiled flex decode on `device`: on Hopper, 3 stages and 4 warps.

    torch's sm_90 flex-decode heuristic ends at 1 stage, 2 warps; 3 stages, 4 warps was 1.2-2.2x faster on an
    H200 for the same data (FACTS.md, docs/decode-performance-notes.md). Measured on Hopper only, whose shared
    memory holds 3 stages of any tile (sm_9x only); other devices keep torch's choice.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return {"num_stages": 3, "num_warps": 4}
    return {}


def decode_splits_kv(padded_batch: int, kv_heads: int, device: torch.device) -> bool:
    """Whether FlexDecoding splits each (sequence, kv head) over several CTAs on `device`.

    Its heuristic (torch/_inductor/kernel/flex/flex_decoding.py, `get_split_k`) is
    max(num_SMs // (batch x kv heads) x 2, 1) splits: more than one exactly when batch x kv heads <= num_SMs.
    Always False off CUDA (the CPU template does not split).
    """
    if device.type != "cuda":
        return False
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return padded_batch * kv_heads <= sms


def attend(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_mask: BlockMask,
    score_mod: Any,
    scale: float | None,
    mode: AttentionMode = "compiled",
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attend padded queries over a layer's whole pool.

    Args:
        q: (Bp, Hq, Lqp, D) queries, Bp/Lqp the bucketed batch and query length.
        k_pool, v_pool: (1, Hkv, N * P, D) one layer's pool, broadcast over the batch.
        block_mask: maps each (row, query block) to the physical pages it may read.
    Returns:
        (Bp, Hq, Lqp, D); rows whose every key is masked are 0.
    """
    enable_gqa = q.shape[1] != k_pool.shape[1]
    if mode == "eager":
        # Eager flex ignores the block lists and reads only the mask_mod.
        return flex_attention(q, k_pool, v_pool, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa)
    return compiled_flex_attention()(q, k_pool, v_pool, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     enable_gqa=enable_gqa, kernel_options=kernel_options)
