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
from typing import Sequence

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


def judge(error: float, ref_error: float, finite: bool, dtype: torch.dtype) -> Comparison:
    """The verdict for one output from its measured errors (the policy's bound, in one place)."""
    bound = min(FUDGE * ref_error + FLOOR[dtype], CEILING[dtype])
    return Comparison(error if finite else float("inf"), ref_error, bound, finite)


def compare(out: torch.Tensor, gold: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Compare matching real positions of `out` (backend), `gold` (float64 oracle), `ref` (same-dtype oracle)."""
    out64, gold64, ref64 = out.double().cpu(), gold.double().cpu(), ref.double().cpu()
    finite = bool(torch.isfinite(out64).all())
    error = float((out64 - gold64).abs().max()) if out64.numel() and finite else 0.0
    ref_error = float((ref64 - gold64).abs().max()) if ref64.numel() else 0.0
    return judge(error, ref_error, finite, dtype)


def compare_rows(out: torch.Tensor, gold: torch.Tensor, ref: torch.Tensor, lengths: Sequence[int],
                 dtype: torch.dtype) -> list[tuple[bool, Comparison]]:
    """Per row b of (B, L, ...) outputs: (whether `out[b, lengths[b]:]` is all 0, `compare` of the first lengths[b]
    positions), computed on the outputs' device and brought to the host in ONE transfer (not 4 per row: on a GPU
    each is a device sync). Exactly `compare`'s figures: float64 differences and maxima are exact on any device."""
    if len(lengths) == 0 or out[0].numel() == 0:   # nothing per row to reduce over: the per-row path
        return [(not bool(out[b, n:].ne(0).any()), compare(out[b, :n], gold[b, :n], ref[b, :n], dtype))
                for b, n in enumerate(lengths)]
    B, L = out.shape[:2]
    n = torch.tensor(list(lengths), device=out.device)
    valid = (torch.arange(L, device=out.device)[None, :] < n[:, None]).view(B, L, *[1] * (out.dim() - 2))
    o, g, r = out.double(), gold.double(), ref.double()
    zero = torch.zeros((), dtype=torch.float64, device=out.device)
    padding_zero = ~(out.ne(0) & ~valid).flatten(1).any(1)
    finite = (torch.isfinite(o) | ~valid).flatten(1).all(1)
    error = torch.where(valid, (o - g).abs(), zero).flatten(1).amax(1)
    ref_error = torch.where(valid, (r - g).abs(), zero).flatten(1).amax(1)
    pad_ok, fin, err, ref_err = torch.stack([padding_zero.double(), finite.double(), error, ref_error]).cpu().tolist()
    return [(bool(p), judge(e, re, bool(f), dtype)) for p, f, e, re in zip(pad_ok, fin, err, ref_err)]
