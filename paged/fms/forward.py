"""One forward pass of an FMS model over a PagedKVCache step, and the cache spec a model needs.

- :func:`cache_spec_for`: the K/V cache spec of an FMS model (layers, kv heads, head size read from the model).
- :func:`forward_logits`: one forward step over live sequences, the logits of every new position (for
  equivalence tests).
- ``_picked_logits``: a forward pass whose LM head runs only where a token is picked (the generator's prefill).
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError, UnsupportedConfigError
from paged.fms.op import PagedStep, attention_layers, bind, plan_step
from paged.spec import CacheSpec
from paged.transfer import to_device

__all__ = ["cache_spec_for", "forward_logits"]


def cache_spec_for(
    model: torch.nn.Module,
    *,
    token_budget: int = 8192,
    page_size: int = 16,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CacheSpec:
    """The K/V cache spec an FMS model needs: one pool layer per attention layer.

    Layers, kv heads and head size are read from the model's ``MultiHeadAttention`` modules, the
    values FMS itself attends with (for Llama: ``nlayers``, ``kvheads`` or ``nheads`` when 0, and
    ``emb_dim // nheads``) and checked against ``model.config`` where it has them. dtype and device
    default to the model's parameters'. The pool holds ``token_budget`` tokens (rounded up to whole
    pages); ``max_seq_len`` defaults to the smaller of that and the model's ``max_expected_seq_len``
    (the length FMS's RoPE tables cover).
    """
    layers = attention_layers(model)
    if not layers:
        raise UnsupportedConfigError(f"{type(model).__name__} has no fms MultiHeadAttention modules")
    kvheads = {m.kvheads for m in layers}
    head_dims = {m.emb_kq_per_head for m in layers} | {m.emb_v_per_head for m in layers}
    if len(kvheads) != 1 or len(head_dims) != 1:
        raise UnsupportedConfigError(f"layers differ in kv heads {sorted(kvheads)} or head size {sorted(head_dims)}; "
                                     f"one cache spec needs them equal")
    config = getattr(model, "config", None)
    nlayers = getattr(config, "nlayers", None)
    if nlayers is not None and nlayers != len(layers):
        raise UnsupportedConfigError(f"config.nlayers={nlayers} but the model has {len(layers)} attention modules")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    if token_budget < 1 or page_size < 1:
        raise InvalidRequestError(f"token_budget and page_size must be positive, got {token_budget}, {page_size}")
    num_pages = math.ceil(token_budget / page_size)
    if max_seq_len is None:
        max_seq_len = num_pages * page_size
        model_max = getattr(config, "max_expected_seq_len", None)
        if model_max:
            max_seq_len = min(max_seq_len, model_max)
    return CacheSpec(num_layers=len(layers), num_kv_heads=kvheads.pop(), head_dim=head_dims.pop(),
                     page_size=page_size, num_pages=num_pages, max_seq_len=max_seq_len, dtype=dtype, device=device)


def _inputs(step: PagedStep, token_chunks: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """(B, L) right-padded token ids of the step's rows, on the cache's device."""
    length = step.plan.max_q_len
    ids = torch.full((len(token_chunks), length), pad_token_id, dtype=torch.long)
    for b, chunk in enumerate(token_chunks):
        ids[b, :len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
    return to_device(ids, step.cache.spec.device)


def _forward(model: torch.nn.Module, step: PagedStep, token_chunks: Sequence[Sequence[int]],
             pad_token_id: int = 0) -> torch.Tensor:
    """One forward pass of `model` over the step's rows (right-padded). Returns logits (B, L, V)."""
    ids = _inputs(step, token_chunks, pad_token_id)
    with torch.no_grad():
        return model(ids, position_ids=step.position_ids(ids.shape[1]), use_cache=False, **step.kwargs())


def _picked_logits(model: torch.nn.Module, step: PagedStep, token_chunks: Sequence[Sequence[int]],
                   picks: Sequence[tuple[int, int]], pad_token_id: int = 0) -> torch.Tensor:
    """One forward pass whose LM head runs only at `picks` [(row, position)]: logits (len(picks), V).

    A prefill step needs one position's logits per row that finishes its prompt; the head over every position
    (B x L x V, 8 GB for 64 prompts of 512 tokens at vocab 128256 in bf16) would cost more than the whole model.
    FMS decoders with a ``base_model`` and a ``head`` (Llama, Granite, Mistral, ...) take this path; others run
    the whole forward and index it.
    """
    base, head = getattr(model, "base_model", None), getattr(model, "head", None)
    if base is None or head is None:
        logits = _forward(model, step, token_chunks, pad_token_id)
        return logits[[b for b, _ in picks], [j for _, j in picks]]
    ids = _inputs(step, token_chunks, pad_token_id)
    with torch.no_grad():
        hidden, _ = base(ids, step.position_ids(ids.shape[1]), None, False, **step.kwargs())   # (B, L, E)
        if not picks:
            return hidden.new_empty(0, 0)
        return head(hidden[[b for b, _ in picks], [j for _, j in picks]])                      # (k, V)


def forward_logits(
    model: torch.nn.Module,
    cache: PagedKVCache,
    seq_ids: Sequence[Hashable],
    token_chunks: Sequence[Sequence[int]],
    *,
    sliding_window: int | None = None,
) -> list[torch.Tensor]:
    """Append `token_chunks[i]` to live sequence `seq_ids[i]` in one forward step; return each one's logits.

    Returns a list of (len(token_chunks[i]), vocab) tensors: the logits at every new position, each
    position attending to its sequence's whole stored history (earlier steps included).
    """
    chunks = [list(map(int, c)) for c in token_chunks]
    if len(chunks) != len(seq_ids):
        raise InvalidRequestError(f"{len(seq_ids)} sequence ids but {len(chunks)} token chunks")
    bind(model)
    step = plan_step(cache, seq_ids, [len(c) for c in chunks], sliding_window=sliding_window)
    logits = _forward(model, step, chunks)
    return [logits[b, :len(c)] for b, c in enumerate(chunks)]
