"""An IBM FMS attention op backed by :class:`paged.PagedKVCache`, registered as ``"pagetable_flex"``.

Importing this module registers the op with ``fms.modules.attention.register_attention_op`` (once per
process: re-importing or reloading it is harmless). The name avoids "paged" and "sdpa", which FMS's
granite_swa model rewrites to its own ops.

One forward pass of an FMS model is one step of the cache::

    bind(model)                                     # once per model: gives every attention layer its index
    cache.admit("a"); cache.admit("b")
    step = plan_step(cache, ["a", "b"], [5, 3])     # once per forward: pages + block mask for all layers
    logits = model(ids, position_ids=step.position_ids(), **step.kwargs())   # ids (2, 5), right-padded

Design:

* **The plan is made once per forward by the driver** (:func:`plan_step` calls ``cache.plan``) and
  travels to every layer in the attention kwargs as ``paged_step`` (a :class:`PagedStep`: the cache,
  its plan, the sliding window the plan's mask was built with, and the padding side of the inputs).
* **The layer index** comes from the model itself: :func:`bind` puts a forward pre-hook on each
  ``MultiHeadAttention`` module (numbered in module order, i.e. layer order) that adds
  ``paged_layer=<index>`` to that module's kwargs, and only when ``attn_name`` is this op. FMS passes
  nothing per layer to an attention op, and a per-forward counter would silently mis-file K/V for any
  model that calls its attention modules in another order, twice, or not at all; the hook ties the
  index to the module, so a layer run twice in one step fails loudly (``PlanError`` from the cache)
  and an unbound model fails with a message that says to call :func:`bind`.
* **Storing and attending both happen in compute** (``cache.run``), so the op works with
  ``use_cache=True`` (FMS calls store, then compute) and ``use_cache=False`` (FMS skips store). The
  store op passes the new K/V through unchanged, so compute always receives them in FMS's layout
  ``(b, L, kvheads, d)``: the layout is known, never guessed from shapes (FMS's own sdpa op guesses
  and is wrong when ``L == kvheads``). As the "cache" FMS hands back (``past_key_value_states``) the
  store op returns the layer's pool views ``(kvheads, pages * page_size, d)``; the op never reads it.
* **Positions**: FMS's RoPE derives positions from the cache's dim 2 when ``position_ids`` is None,
  which is meaningless for a paged pool, so the op's validator refuses a forward without
  ``position_ids``. :meth:`PagedStep.position_ids` gives ``start_len + arange`` per row.
* **Sliding window**: a mask is part of the plan, so the window is chosen at :func:`plan_step`
  (``sliding_window=w`` -> ``paged.mods.sliding_window(w)``). FMS hands a window to attention only as
  ``MultiHeadAttention``'s ``sliding_window`` argument (granite_swa, gpt_oss; Llama and FMS's Mistral
  pass none). The hook forwards it to the op as ``paged_sliding_window``, and the op refuses a layer
  whose window differs from the plan's rather than attend with the wrong mask. Attention sinks
  (``sinks``) are refused: the cache has no sink term.
* **Padding**: the cache wants each row's real tokens first (right padding). FMS's ``pad_input_ids``
  pads on the left; a step planned with ``padding_side="left"`` moves each row's tokens to the front
  before ``cache.run`` and back after, so FMS's ``generate()`` (which reads ``logits[:, -1]``) works.
* **FMS generate()**: the op's ``update_attn_kwargs`` (which ``generate`` calls before every step
  after the first, replacing the kwargs) plans the next decode step, one token per sequence. See
  :func:`paged.fms.generate.fms_generate`.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable, Literal, Sequence

import torch
from fms.modules.attention import MultiHeadAttention, get_attention_type, register_attention_op

import paged.ops  # noqa: F401  (registers torch.ops.paged.attend, the traceable form of the op)
from paged.cache import PagedKVCache
from paged.errors import InvalidRequestError, PlanError, UnsupportedConfigError
from paged.mods import MaskMod, sliding_window as _sliding_window_mod
from paged.plan import StepPlan

__all__ = ["OP_NAME", "PagedStep", "attention_layers", "bind", "is_bound", "plan_step", "register"]

#: The registered FMS attention op name (no "paged"/"sdpa": granite_swa rewrites those).
OP_NAME = "pagetable_flex"

#: attention kwargs this op reads: the step (set by the driver) and the layer index (set by bind's hook).
STEP_KWARG = "paged_step"
LAYER_KWARG = "paged_layer"
WINDOW_KWARG = "paged_sliding_window"
#: the traceable form of a step (`paged.fms.decode`): the cache's `paged.ops` handle instead of a PagedStep; the
#: cache's current plan is the step.
CACHE_KWARG = "paged_cache"

PaddingSide = Literal["right", "left"]


@functools.lru_cache(maxsize=None)
def _window_mask(window: int) -> MaskMod:
    """One mask function per window: the cache compiles per mask-function identity, so reuse it."""
    return _sliding_window_mod(window)


@dataclass
class PagedStep:
    """One forward pass's view of the cache: the plan every layer of this forward attends with.

    Attributes:
        cache: the PagedKVCache.
        plan: the StepPlan ``cache.plan`` returned for this step (sequence order = batch row order).
        sliding_window: the window the plan's mask was built with (None: plain causal).
        padding_side: where each row's padding is in the model input: "right" (real tokens first, the
            cache's native layout) or "left" (real tokens last, as FMS's ``pad_input_ids`` makes them).
    """

    cache: PagedKVCache
    plan: StepPlan
    sliding_window: int | None = None
    padding_side: PaddingSide = "right"
    _gathers: dict = field(default_factory=dict, repr=False)

    @property
    def seq_ids(self) -> tuple[Hashable, ...]:
        return self.plan.seq_ids

    @property
    def q_lens(self) -> tuple[int, ...]:
        return self.plan.q_lens

    @property
    def start_lens(self) -> tuple[int, ...]:
        return self.plan.start_lens

    def kwargs(self) -> dict[str, Any]:
        """The attention kwargs to pass to the model's forward (with ``position_ids``)."""
        return {"attn_name": OP_NAME, STEP_KWARG: self}

    def position_ids(self, length: int | None = None) -> torch.Tensor:
        """(B, length) int64 logical positions of the step's input: start_len + arange for real tokens.

        Padding positions repeat a real position of their row (never past what RoPE has tables for).
        """
        length = self.plan.max_q_len if length is None else length
        if length < self.plan.max_q_len:
            raise InvalidRequestError(f"length {length} is shorter than the step's longest row ({self.plan.max_q_len})")
        rows = []
        for start, n in zip(self.plan.start_lens, self.plan.q_lens):
            real = torch.arange(start, start + n)
            pad = torch.full((length - n,), start, dtype=torch.long)
            rows.append(torch.cat((real, pad)) if self.padding_side == "right" else torch.cat((pad, real)))
        return torch.stack(rows).to(self.cache.spec.device)

    def next_decode(self) -> PagedStep:
        """Plan the next step: one new token per sequence, same sequences, same window (right padded)."""
        return plan_step(self.cache, self.plan.seq_ids, [1] * self.plan.batch, sliding_window=self.sliding_window)

    def _left_gathers(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Index tensors moving left-padded rows of `length` to the front and back, or None if not needed."""
        if self.padding_side == "right" or all(n == length for n in self.plan.q_lens):
            return None
        if length not in self._gathers:
            dev = self.cache.spec.device
            offset = length - torch.tensor(self.plan.q_lens, dtype=torch.long)[:, None]       # (B, 1) pads per row
            j = torch.arange(length)[None, :]                                                 # (1, L)
            to_front = (j + offset).clamp(max=length - 1)                                     # out[b, j] = x[b, j + off]
            to_back = (j - offset).clamp(min=0)                                               # out[b, j] = y[b, j - off]
            real = j >= offset
            self._gathers[length] = (to_front.to(dev), to_back.to(dev), real.to(dev))
        return self._gathers[length]


def plan_step(
    cache: PagedKVCache,
    seq_ids: Sequence[Hashable],
    q_lens: Sequence[int],
    *,
    sliding_window: int | None = None,
    padding_side: PaddingSide = "right",
) -> PagedStep:
    """Plan one forward pass (``cache.plan``) and return the step to pass in the model's attn kwargs.

    Args:
        seq_ids: live sequences, in batch-row order. q_lens: new tokens per sequence (its real tokens).
        sliding_window: attend only to the last `window` positions (``paged.mods.sliding_window``);
            None or 0 for plain causal attention.
        padding_side: where the model input's padding is (see :class:`PagedStep`).
    """
    if padding_side not in ("right", "left"):
        raise InvalidRequestError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    window = sliding_window or None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise InvalidRequestError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    mask_mod = None if window is None else _window_mask(window)
    plan = cache.plan(seq_ids, q_lens, mask_mod=mask_mod)
    return PagedStep(cache, plan, window, padding_side)


# ---------------------------------------------------------------------------------------------- layers
# module -> its layer index and hook handle (weak: binding never keeps a model alive).
# Kept across importlib.reload so a reloaded module does not hook every layer a second time.
_BOUND: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, Any]]" = globals().get("_BOUND") or weakref.WeakKeyDictionary()


def attention_layers(model: torch.nn.Module) -> list[MultiHeadAttention]:
    """The model's attention modules in module (= layer) order; each gets one K/V layer of the cache."""
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def _inject_layer(index: int, module: torch.nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("attn_name") != OP_NAME:
        return None
    kwargs = dict(kwargs)
    kwargs[LAYER_KWARG] = index
    if "sliding_window" in kwargs:
        # MultiHeadAttention consumes its `sliding_window` argument; hand it to the op under our name.
        kwargs[WINDOW_KWARG] = kwargs["sliding_window"]
    return args, kwargs


def bind(model: torch.nn.Module) -> int:
    """Number the model's attention layers for this op (idempotent). Returns the number of layers.

    Adds a forward pre-hook to every ``MultiHeadAttention`` that passes ``paged_layer=i`` to the op
    when (and only when) the forward uses this op; other attention ops see no change.
    """
    layers = attention_layers(model)
    if not layers:
        raise UnsupportedConfigError(f"{type(model).__name__} has no fms MultiHeadAttention modules")
    for i, module in enumerate(layers):
        bound = _BOUND.get(module)
        if bound is not None and bound[0] == i:
            continue
        if bound is not None:           # the module moved (e.g. a layer list was edited): renumber it
            bound[1].remove()
        handle = module.register_forward_pre_hook(functools.partial(_inject_layer, i), with_kwargs=True)
        _BOUND[module] = (i, handle)
    return len(layers)


def is_bound(model: torch.nn.Module) -> bool:
    """Whether every attention module of `model` carries its layer index."""
    layers = attention_layers(model)
    return bool(layers) and all(_BOUND.get(m, (None,))[0] == i for i, m in enumerate(layers))


# ---------------------------------------------------------------------------------------------- the op
def _step_of(attn_kwargs: dict) -> PagedStep:
    step = attn_kwargs.get(STEP_KWARG)
    if not isinstance(step, PagedStep):
        raise PlanError(f"attn_name={OP_NAME!r} needs {STEP_KWARG}=<PagedStep> in the attention kwargs "
                        f"(paged.fms.op.plan_step(cache, seq_ids, q_lens).kwargs()), got {type(step).__name__}")
    return step


def _traced_cache(attn_kwargs: dict) -> int | None:
    """The `paged.ops` handle of a traceable step (CACHE_KWARG), or None for an ordinary PagedStep."""
    handle = attn_kwargs.get(CACHE_KWARG)
    if handle is None:
        return None
    if STEP_KWARG in attn_kwargs or type(handle) is not int:
        raise PlanError(f"pass either {STEP_KWARG}=<PagedStep> or {CACHE_KWARG}=<paged.ops handle>, not both; "
                        f"got {CACHE_KWARG}={handle!r}")
    return handle


def _layer_of(attn_kwargs: dict) -> int:
    layer = attn_kwargs.get(LAYER_KWARG)
    if layer is None:
        raise PlanError(f"the attention layer index is missing: call paged.fms.op.bind(model) once before running "
                        f"the model with attn_name={OP_NAME!r}")
    return layer


def _store_op(keys: torch.Tensor, values: torch.Tensor, key_cache, value_cache, **attn_kwargs):
    """Pass the new K/V through to compute (layout (b, L, kvheads, d)); return the layer's pools as "the cache".

    Writing happens in compute (``cache.run`` stores and attends), so use_cache=False works too.
    """
    if _traced_cache(attn_kwargs) is not None:
        raise InvalidRequestError(f"{OP_NAME}: a traced step ({CACHE_KWARG}=...) runs with use_cache=False; the cache "
                                  f"is the paged pool, not FMS's past_key_value_states")
    step, layer = _step_of(attn_kwargs), _layer_of(attn_kwargs)
    cache = step.cache
    if not 0 <= layer < cache.spec.num_layers:
        raise PlanError(f"layer {layer} is outside the cache's {cache.spec.num_layers} layers")
    return keys, values, cache.k_pool[layer], cache.v_pool[layer]


def _compute_op(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, nheads: int, kvheads: int,
                p_dropout: float, scale_factor: float | None, **attn_kwargs) -> torch.Tensor:
    """Store this layer's new K/V in the step's pages and attend each row over its own history.

    query (b, L, nheads, d); keys/values (b, L, kvheads, d) exactly as FMS computed them (after RoPE).
    Returns (b, L, nheads, d); padding positions are 0.
    """
    layer = _layer_of(attn_kwargs)
    if attn_kwargs.get("sinks") is not None:
        raise UnsupportedConfigError(f"{OP_NAME}: attention sinks are not supported by the paged cache")
    if p_dropout:
        raise UnsupportedConfigError(f"{OP_NAME} is an inference op: attention dropout must be 0 (call model.eval())")
    handle = _traced_cache(attn_kwargs)
    if handle is not None:
        # The traceable path (paged.fms.decode): right-padded rows, no window; the cache validates the rest.
        if attn_kwargs.get(WINDOW_KWARG, attn_kwargs.get("sliding_window")):
            raise UnsupportedConfigError(f"{OP_NAME}: a traced step attends without a sliding window")
        return torch.ops.paged.attend(query, keys, values, layer, handle, scale_factor)
    step = _step_of(attn_kwargs)
    # A window the layer asks for (MultiHeadAttention's argument, via bind's hook; sinks models pass it
    # directly) must be the one the step's mask was planned with: the mask cannot change per layer.
    if WINDOW_KWARG in attn_kwargs or "sliding_window" in attn_kwargs:
        wanted = attn_kwargs.get(WINDOW_KWARG, attn_kwargs.get("sliding_window")) or None
        if wanted != step.sliding_window:
            raise PlanError(f"layer {layer} attends with sliding_window={wanted} but the step was planned with "
                            f"sliding_window={step.sliding_window}; pass it to plan_step")
    b, length = query.shape[:2]
    expected = (b, length, kvheads, query.shape[3])
    if query.shape[2] != nheads or tuple(keys.shape) != expected or tuple(values.shape) != expected:
        # The store op hands compute the new K/V unchanged, so anything else is a caller error.
        raise InvalidRequestError(f"{OP_NAME}: expected query (b, L, {nheads}, d) and keys/values {expected}, got "
                                  f"{tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    gathers = step._left_gathers(length)
    if gathers is not None:
        to_front = gathers[0][:, :, None, None]
        query = query.gather(1, to_front.expand_as(query))
        keys = keys.gather(1, to_front.expand_as(keys))
        values = values.gather(1, to_front.expand_as(values))
    out = step.cache.run(layer, query, keys, values, scale=scale_factor)     # (b, max_q_len, nheads, d)
    if out.shape[1] < length:
        out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, length - out.shape[1]))
    if gathers is not None:
        _, to_back, real = gathers
        out = out.gather(1, to_back[:, :, None, None].expand_as(out)) * real[:, :, None, None].to(out.dtype)
    return out.contiguous()


def _update_attn_kwargs(**attn_kwargs) -> dict:
    """FMS generate() calls this before every step after the first; its return replaces the kwargs.

    Plans the next decode step (one new token per sequence) and keeps every other kwarg.
    """
    if _traced_cache(attn_kwargs) is not None:
        raise InvalidRequestError(f"{OP_NAME}: a traced step ({CACHE_KWARG}=...) is driven by paged.fms.decode, not "
                                  f"by fms generate()")
    step = _step_of(attn_kwargs)
    if attn_kwargs.get("use_cache") is False:
        raise InvalidRequestError(f"{OP_NAME} under fms generate() needs use_cache=True (without it generate "
                                  f"re-feeds the whole sequence every step, which the cache already holds)")
    attn_kwargs[STEP_KWARG] = step.next_decode()
    return attn_kwargs


def _validate_attn_kwargs(input_ids: torch.Tensor, position_ids: torch.Tensor | None, past_key_value_states=None,
                          **attn_kwargs) -> None:
    if position_ids is None:
        raise InvalidRequestError(f"{OP_NAME} needs explicit position_ids (FMS would otherwise take positions from the "
                                  f"cache's shape); use PagedStep.position_ids()")
    if _traced_cache(attn_kwargs) is not None:
        return  # the cache checks the step's rows against its current plan in every layer
    step = _step_of(attn_kwargs)
    b, length = input_ids.shape[:2]
    if b != step.plan.batch or length < step.plan.max_q_len:
        raise InvalidRequestError(f"input of shape {tuple(input_ids.shape)} does not fit the step: {step.plan.batch} "
                                  f"rows, longest {step.plan.max_q_len} new tokens")
    if tuple(position_ids.shape[:2]) != (b, length):
        raise InvalidRequestError(f"position_ids has shape {tuple(position_ids.shape)}; input_ids has {(b, length)}")


for _f in (_store_op, _compute_op, _update_attn_kwargs, _validate_attn_kwargs):
    _f._pagetable_op = True  # type: ignore[attr-defined]


def register() -> None:
    """Register the op under OP_NAME unless this module already did (import and reload call it)."""
    try:
        existing = get_attention_type(attn_name=OP_NAME)
    except KeyError:
        register_attention_op(OP_NAME, _store_op, _compute_op, update_attn_kwargs_op=_update_attn_kwargs,
                              validate_attn_kwargs_op=_validate_attn_kwargs)
        return
    if not getattr(existing.get("compute_prefill"), "_pagetable_op", False):
        raise RuntimeError(f"another FMS attention op is already registered as {OP_NAME!r}")


register()
