"""FMS's own generation loop, ``fms.utils.generation.generate``, running on the paged cache.

It works because FMS lets an op carry state in the attention kwargs: the first (prefill) step is planned before
the call and passed in ``extra_kwargs`` (left-padded, as FMS's ``pad_input_ids`` makes batches), and the op's
``update_attn_kwargs``, which ``generate`` calls before every later step, plans each decode step. ``generate``
forces ``past_key_value_states=None`` and feeds back whatever the op's store returns; the op never reads it (its
state is the cache). What FMS's loop cannot do: finish a sequence before every row is done (its rows keep decoding
after EOS until all have hit it, as on FMS's default path), admit new prompts while running, chunk the prefill, or
replay CUDA graphs; use :class:`paged.fms.generate.PagedGenerator` for those.
"""

from __future__ import annotations

import itertools
from typing import Hashable, Sequence

import torch

from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError
from paged.fms.op import bind, plan_step

__all__ = ["fms_generate", "prepare_fms_generate"]

_ids = itertools.count()


def prepare_fms_generate(
    model: torch.nn.Module,
    cache: PagedKVCache,
    prompts: Sequence[Sequence[int]],
    *,
    sliding_window: int | None = None,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, dict, list[Hashable]]:
    """Admit `prompts` and plan their prefill for ``fms.utils.generation.generate``.

    Returns ``(input_ids, extra_kwargs, seq_ids)``: call ``generate(model, input_ids, use_cache=True,
    extra_kwargs=extra_kwargs, ...)``, then ``cache.finish`` every seq id (FMS's loop has no hook at its
    end). ``input_ids`` is left-padded by FMS's ``pad_input_ids``; its mask is not passed (the op masks
    from the plan) but its position_ids are.
    """
    from fms.utils.generation import pad_input_ids

    bind(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequestError("fms generate needs at least one prompt, each with at least one token")
    device = cache.spec.device
    input_ids, padding = pad_input_ids([torch.as_tensor(list(p), dtype=torch.long, device=device) for p in prompts],
                                       padding_side="left", pad_token_id=pad_token_id)
    call = next(_ids)
    seq_ids: list[Hashable] = [("pagetable-fms-generate", call, i) for i in range(len(prompts))]
    for s in seq_ids:
        cache.admit(s)
    try:
        step = plan_step(cache, seq_ids, [len(p) for p in prompts], sliding_window=sliding_window,
                         padding_side="left")
    except Exception:
        for s in seq_ids:
            cache.finish(s)
        raise
    return input_ids, {"position_ids": padding["position_ids"], **step.kwargs()}, seq_ids


def fms_generate(
    model: torch.nn.Module,
    cache: PagedKVCache,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    sliding_window: int | None = None,
    pad_token_id: int = 0,
    **generate_kwargs,
) -> list[list[int]]:
    """Run FMS's own ``generate()`` (use_cache=True) on the paged cache; return each prompt's new tokens.

    `generate_kwargs` go to ``fms.utils.generation.generate`` (temperature, top_k, eos_token_id, hooks...).
    FMS's loop semantics apply: every row decodes until all rows hit EOS (or max_new_tokens), and
    sampling draws from torch's global RNG. The sequences are finished (pages freed) on return.
    """
    from fms.utils.generation import generate

    if generate_kwargs.get("timing"):
        raise InvalidRequestError("timing is not supported here; call fms generate() with prepare_fms_generate()")
    if generate_kwargs.pop("use_cache", True) is not True:
        raise InvalidRequestError("the paged op needs use_cache=True under fms generate()")
    input_ids, extra, seq_ids = prepare_fms_generate(model, cache, prompts, sliding_window=sliding_window,
                                                     pad_token_id=pad_token_id)
    extra.update(generate_kwargs.pop("extra_kwargs", None) or {})
    try:
        with torch.no_grad():
            out = generate(model, input_ids, max_seq_len=input_ids.shape[1] + max_new_tokens,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True, extra_kwargs=extra,
                           **generate_kwargs)
    finally:
        for s in seq_ids:
            if s in cache:
                cache.finish(s)
    return [row[input_ids.shape[1]:].tolist() for row in out]
