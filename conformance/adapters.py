"""Factories for the backends this project ships or knows: `paged`, its eager twin, the oracle, and peers.

Each returns a `BackendFactory`. Third parties offer theirs through the `paged.backends` entry-point group
or `--backend module:factory` (a zero-argument callable returning a BackendFactory, or a callable
spec -> backend, which is wrapped with no optional capabilities but the ones it obviously has).
"""

from __future__ import annotations

import functools
from functools import partial

from conformance.contract import CAPABILITIES, BackendFactory
from oracle import ContiguousOracle, OracleError
from paged import PagedKVCache, errors


def _contract_error(exc: OracleError) -> errors.PagedError:
    """The contract's (paged.errors) exception of the same kind and message as an oracle exception."""
    cls = getattr(errors, type(exc).__name__, errors.PagedError)
    made = cls.__new__(cls)
    Exception.__init__(made, *exc.args)
    made.__dict__.update(exc.__dict__)           # e.g. UnknownSequenceError.seq_id
    return made


def _in_contract_terms(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OracleError as exc:
            raise _contract_error(exc) from exc
    return wrapper


class OracleBackend(ContiguousOracle):
    """The oracle as a backend of the contract: its own exceptions (oracle.errors) re-raised as the contract's
    paged.errors of the same name and message, so the suite's error checks apply to it unchanged."""

    admit = _in_contract_terms(ContiguousOracle.admit)
    fork = _in_contract_terms(ContiguousOracle.fork)
    finish = _in_contract_terms(ContiguousOracle.finish)
    plan = _in_contract_terms(ContiguousOracle.plan)
    run = _in_contract_terms(ContiguousOracle.run)
    length = _in_contract_terms(ContiguousOracle.length)


def _make_paged(spec, *, attention="compiled", policy="random", seed=0, **options):
    # "random" placement scatters pages non-monotonically: the hardest case for the page table.
    return PagedKVCache(spec, policy=policy, seed=seed, attention=attention, **options)


def paged_backend() -> BackendFactory:
    """The FlexAttention paged backend, compiled kernels."""
    return BackendFactory(
        name="paged", make=_make_paged, make_eager=partial(_make_paged, attention="eager"),
        description="paged.PagedKVCache, compiled FlexAttention (fresh prefill on SDPA), random page placement")


def paged_triton_backend() -> BackendFactory:
    """The paged backend with every plain decode step on the Triton kernel (`paged.triton_decode`).

    On a GPU this is what `paged` does by default ("auto"); on the CPU it runs Triton's interpreter, which needs
    TRITON_INTERPRET=1 in the environment before Python starts (tox sets it).
    """
    return BackendFactory(
        name="paged-triton", make=partial(_make_paged, decode_kernel="triton"),
        make_eager=partial(_make_paged, attention="eager"),
        description="paged.PagedKVCache, decode steps on the Triton paged-decode kernel, steps with history and "
                    "chunks on the Triton mixed kernel, random page placement")


def paged_flex_backend() -> BackendFactory:
    """The paged backend with every step on FlexAttention: decode steps (what `paged` does off CUDA) and fresh
    prefill steps (which `paged` runs on SDPA)."""
    return BackendFactory(
        name="paged-flex", make=partial(_make_paged, decode_kernel="flex", prefill_kernel="flex"),
        make_eager=partial(_make_paged, attention="eager"),
        description="paged.PagedKVCache, every step on compiled FlexAttention, random page placement")


def paged_eager_backend() -> BackendFactory:
    """The paged backend on uncompiled FlexAttention (reads only the mask_mod)."""
    return BackendFactory(
        name="paged-eager", make=partial(_make_paged, attention="eager"),
        capabilities=CAPABILITIES - {"eager"},
        description="paged.PagedKVCache, eager FlexAttention (mask_mod only; each row's own pages only)")


def oracle_backend() -> BackendFactory:
    """The oracle itself: the suite must pass on it."""
    return BackendFactory(
        name="oracle", make=lambda spec, **_: OracleBackend(spec),
        capabilities=CAPABILITIES - {"paging", "poison", "eager"},
        description="oracle.ContiguousOracle, float64 contiguous reference")


def torch_paged_attention_backend() -> BackendFactory:
    """torch's private torch.nn.attention.experimental._paged_attention.PagedAttention, as a peer."""
    from conformance.peers.torch_paged import torch_paged_attention_factory

    return torch_paged_attention_factory()


BUILTIN = {
    "paged": paged_backend,
    "paged-triton": paged_triton_backend,
    "paged-flex": paged_flex_backend,
    "paged-eager": paged_eager_backend,
    "oracle": oracle_backend,
    "torch-paged-attention": torch_paged_attention_backend,
}
