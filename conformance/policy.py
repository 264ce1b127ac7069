"""The correctness policy: how close a backend's output must be to the float64 oracle.

A backend's output `out` (its own dtype) is compared with the float64 golden `gold` and with `ref`, the
plain same-dtype reference (the oracle computing in the backend's dtype). It passes when

    max|out - gold| <= FUDGE * max|ref - gold| + FLOOR[dtype]     (no worse than honest rounding)
    max|out - gold| <= CEILING[dtype]                               (never loose enough for a wrong page)
    and no NaN/inf anywhere.

Measured on CPU (torch 2.13, random N(0,1) data, D=32): FlexAttention's error is 0.3-1.5x the plain
reference's in fp32, bf16 and fp16. A wrong page, a wrong head or a wrong scale moves outputs by 0.05-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Headroom over the plain reference: FlexAttention's online softmax rounds differently, measured <= 1.5x.
FUDGE = 2.0
#: Absolute slack where the reference happens to be exact (e.g. a query that sees one key): a few ulps at |out| ~ 1.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}
#: Hard ceiling, far below what a misplaced page or head does (>= 0.05), above any honest rounding seen (bf16 1.3e-2).
CEILING = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float64: 1e-9}


@dataclass(frozen=True)
class Comparison:
    """Result of comparing one output tensor with the oracle."""

    error: float        # max |out - gold|
    ref_error: float    # max |ref - gold|
    bound: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.error <= self.bound

    def describe(self) -> str:
        if not self.finite:
            return "output has NaN/inf"
        return f"max error {self.error:.3g} vs bound {self.bound:.3g} (same-dtype reference {self.ref_error:.3g})"


def compare(out: torch.Tensor, gold: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Compare matching real positions of `out` (backend), `gold` (float64 oracle), `ref` (same-dtype oracle)."""
    out64, gold64, ref64 = out.double().cpu(), gold.double().cpu(), ref.double().cpu()
    finite = bool(torch.isfinite(out64).all())
    error = float((out64 - gold64).abs().max()) if out64.numel() and finite else (0.0 if finite else float("inf"))
    ref_error = float((ref64 - gold64).abs().max()) if ref64.numel() else 0.0
    bound = min(FUDGE * ref_error + FLOOR[dtype], CEILING[dtype])
    return Comparison(error, ref_error, bound, finite)
