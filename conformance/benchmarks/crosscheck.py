"""The correctness gate before any timing: each backend's output against a float32 reference and the SDPA baseline.

``max|out - ref| <= 0.02 * max|ref| + 1e-3`` (twice that between two bf16 backends); see `backends`' docstring for
why that tolerance separates rounding from a wrong length, page or head."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from conformance.benchmarks.case_data import seq_kv
from conformance.benchmarks.grid import Case

if TYPE_CHECKING:
    from conformance.benchmarks.backends import Prepared

REL_TOL, ABS_TOL = 2e-2, 1e-3


def reference_rows(case: Case, lens: list[int], rows: list[int], q, k, v, device) -> dict[int, torch.Tensor]:
    """float32 attention of the new queries of `rows` over their whole (bf16-stored) history: (C, Hq, D) each."""
    g, C = case.hq // case.hkv, case.q_len
    out = {}
    for b in rows:
        K, V = seq_kv(case, b, lens[b], device)
        K = torch.cat([K, k[b]]).float()                                     # (S, Hkv, D)
        V = torch.cat([V, v[b]]).float()
        qb = q[b].float().view(C, case.hkv, g, case.head_dim)                # (C, Hkv, g, D)
        scores = torch.einsum("chgd,shd->hgcs", qb, K) / math.sqrt(case.head_dim)
        pos = lens[b] + torch.arange(C, device=device)
        visible = torch.arange(K.shape[0], device=device)[None, :] <= pos[:, None]   # (C, S)
        scores = scores.masked_fill(~visible, float("-inf"))
        o = torch.einsum("hgcs,shd->chgd", scores.softmax(-1), V)
        out[b] = o.reshape(C, case.hq, case.head_dim)
    return out


def _check(out: torch.Tensor, want: torch.Tensor, factor: float = 1.0) -> tuple[bool, float, float]:
    err = float((out.float() - want.float()).abs().max())
    tol = factor * (REL_TOL * float(want.float().abs().max()) + ABS_TOL)
    finite = bool(torch.isfinite(out).all())
    return finite and err <= tol, err, tol


def cross_check(prep: Prepared, outputs: dict[str, torch.Tensor]) -> None:
    """Each backend vs the float32 reference (first, last and longest rows) and vs SDPA (all rows)."""
    case, lens = prep.case, prep.lens
    B = case.batch
    rows = sorted({0, B - 1, max(range(B), key=lambda b: lens[b])})
    q, k, v = prep.inputs
    ref = reference_rows(case, lens, rows, q, k, v, q.device)
    base = outputs.get("sdpa")
    for name, out in outputs.items():
        if tuple(out.shape) != tuple(q.shape):
            prep.errors[name] = f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}"
            continue
        worst = 0.0
        for b in rows:
            ok, err, tol = _check(out[b], ref[b])
            worst = max(worst, err / tol)
            if not ok:
                prep.errors[name] = (f"row {b} (context {lens[b]}): max error {err:.3g} vs the float32 reference, "
                                     f"tolerance {tol:.3g}")
                break
        if name not in prep.errors and base is not None and name != "sdpa":
            ok, err, tol = _check(out, base, 2.0)
            worst = max(worst, err / tol)
            if not ok:
                prep.errors[name] = f"max difference {err:.3g} from the SDPA baseline over all rows, tolerance {tol:.3g}"
        prep.worst[name] = worst
