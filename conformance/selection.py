"""Find a backend by name: built-ins, the `paged.backends` entry-point group, or `module:factory`."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from conformance.adapters import BUILTIN
from conformance.contract import BackendFactory

ENV_VAR = "PAGED_CONFORMANCE_BACKEND"
ENTRY_POINT_GROUP = "paged.backends"


class BackendNotFound(LookupError):
    pass


def available_backends() -> list[str]:
    """Names `resolve_backend` accepts (besides module:factory)."""
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _as_factory(obj, name: str) -> BackendFactory:
    if isinstance(obj, BackendFactory):
        return obj
    if callable(obj):
        try:
            made = obj()
        except TypeError:
            made = None  # a callable that needs a spec: the backend class or a spec -> backend function
        if isinstance(made, BackendFactory):
            return made
        return BackendFactory(name=name, make=lambda spec, **_: obj(spec),
                              capabilities=frozenset({"fork", "chunked_prefill", "mixed_steps"}),
                              description=f"{name} (spec -> backend callable, optional capabilities off)")
    raise BackendNotFound(f"{name!r} is neither a BackendFactory nor a callable returning one")


def resolve_backend(spec: str | None = None) -> BackendFactory:
    """`spec`: a built-in or entry-point name, or "package.module:attribute"; default $PAGED_CONFORMANCE_BACKEND
    or "paged"."""
    spec = spec or os.environ.get(ENV_VAR) or "paged"
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendNotFound(f"cannot load backend {spec!r}: {exc}") from exc
        return _as_factory(obj, spec)
    if spec in BUILTIN:
        return BUILTIN[spec]()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return _as_factory(ep.load(), spec)
    raise BackendNotFound(f"unknown backend {spec!r}; available: {', '.join(available_backends())} "
                          f"or module:factory")
