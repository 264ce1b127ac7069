"""Deep equality of backend snapshots (nested dicts/tuples/lists of tensors), NaN equal to NaN."""

from __future__ import annotations

from typing import Any

import torch


def first_difference(a: Any, b: Any, path: str = "snapshot") -> str | None:
    """Where two snapshots differ (a readable path), or None when they are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        if not bool(same.all()):
            return f"{path}: {int((~same).sum())} element(s) differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(repr, a))} vs {sorted(map(repr, b))}"
        for key in a:
            diff = first_difference(a[key], b[key], f"{path}[{key!r}]")
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def equal(a: Any, b: Any) -> bool:
    return first_difference(a, b) is None
