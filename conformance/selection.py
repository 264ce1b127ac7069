"""Find a backend by name: built-ins, the `paged.backends` entry-point group, or `module:factory`."""

from __future__ import annotations

import importlib
import inspect
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


def _takes_no_arguments(obj) -> bool:
    """Whether `obj` can be called with no arguments (a factory), as opposed to a spec -> backend callable."""
    try:
        inspect.signature(obj).bind()
    except TypeError:
        return False
    except ValueError:           # no signature to read (some builtins): only a call can tell
        return True
    return True


def _as_factory(obj, name: str) -> BackendFactory:
    """`obj` as a BackendFactory: itself, what a zero-argument factory returns, or a spec -> backend callable
    wrapped with no optional capabilities. Anything else, or a factory that raises or exits, is BackendNotFound."""
    if isinstance(obj, BackendFactory):
        return obj
    if not callable(obj):
        raise BackendNotFound(f"backend {name!r} is a {type(obj).__name__}, neither a BackendFactory nor a callable "
                              f"returning one")
    if _takes_no_arguments(obj):
        try:
            made = obj()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of a user's factory is reported
            raise BackendNotFound(f"backend factory {name!r} raised {type(exc).__name__}({exc}) when called with "
                                  f"no arguments; it must return a conformance.contract.BackendFactory") from None
        if isinstance(made, BackendFactory):
            return made
        raise BackendNotFound(f"backend factory {name!r} returned a {type(made).__name__}, not a "
                              f"conformance.contract.BackendFactory")
    return BackendFactory(name=name, make=lambda spec, **_: obj(spec),
                          capabilities=frozenset({"fork", "chunked_prefill", "mixed_steps"}),
                          description=f"{name} (spec -> backend callable, optional capabilities off)")


def resolve_backend(spec: str | None = None) -> BackendFactory:
    """`spec`: a built-in or entry-point name, or "package.module:attribute"; default $PAGED_CONFORMANCE_BACKEND
    or "paged"."""
    spec = spec or os.environ.get(ENV_VAR) or "paged"
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendNotFound(f"cannot load backend {spec!r}: {type(exc).__name__}: {exc}. A module:factory "
                                  f"backend must be importable from here (is its package on sys.path?).") from None
        return _as_factory(obj, spec)
    if spec in BUILTIN:
        return BUILTIN[spec]()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            return _as_factory(ep.load(), spec)
    raise BackendNotFound(f"unknown backend {spec!r}; available: {', '.join(available_backends())}, or "
                          f"package.module:factory for your own (`python -m conformance --list` lists them).")
