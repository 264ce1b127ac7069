"""Host-to-device copies that never make the host wait for the GPU.

A plain `tensor.to("cuda")` or `dst.copy_(host)` from pageable memory synchronises the stream, so a `plan()`
issuing a dozen of them waits for the previous step's kernels a dozen times and the host can never run ahead
of the GPU. Staging through pinned memory with `non_blocking=True` enqueues the copy and returns at once.
Reusing the pinned staging memory is safe: PyTorch's caching host allocator records an event with each
non-blocking copy and hands the block out again only after that event has completed.
"""

from __future__ import annotations

import torch


def _staged(host: torch.Tensor) -> torch.Tensor:
    return host if host.is_pinned() else host.pin_memory()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of CPU tensor `host`, enqueued without waiting for the GPU (a no-op on CPU)."""
    if device.type != "cuda":
        return host.to(device)
    return _staged(host).to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, host: torch.Tensor) -> None:
    """dst.copy_(host) for a CPU `host`, enqueued without waiting for the GPU when `dst` is on one.

    `host` is converted to dst's dtype on the host (no conversion kernel on the GPU). An already pinned `host`
    of that dtype is copied from directly, so the caller must not change it until the copy has run.
    """
    if dst.device.type != "cuda":
        dst.copy_(host)
    else:
        dst.copy_(_staged(host.to(dst.dtype)), non_blocking=True)
