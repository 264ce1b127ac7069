"""Shared fixtures of the project's own tests. `device` comes from the conformance plugin (--device)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton decode kernel runs on the CPU only under Triton's interpreter, which must be on before Triton
    # is first imported (nothing has imported it yet: paged imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    """fp32 and bf16 on CPU; bf16, fp16 and fp32 on a GPU."""
    if device.type == "cuda":
        return [torch.bfloat16, torch.float16, torch.float32]
    return [torch.float32, torch.bfloat16]


@pytest.fixture(params=["float32", "bfloat16", "float16"])
def dtype(request, device) -> torch.dtype:
    """Each dtype the device supports (parametrised; unsupported ones are skipped)."""
    dt = getattr(torch, request.param)
    if dt not in dtypes_for(device):
        pytest.skip(f"{request.param} is exercised on the GPU only")
    return dt


@pytest.fixture
def kernel_device(device) -> torch.device:
    """`device`, where the Triton decode kernel can run (the CPU: under Triton's interpreter); else the test skips."""
    from paged.kernels import triton_sizing

    if not triton_sizing.available(device):
        pytest.skip(f"the Triton kernel cannot run on {device} here (CPU: TRITON_INTERPRET=1 before import)")
    return device
