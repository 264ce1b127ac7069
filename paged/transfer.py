"""Host-to-device copies that never make the host wait for the GPU.

A plain `tensor.to("cuda")` or `dst.copy_(host)` from pageable memory synchronises the stream, so a `plan()`
issuing a dozen of them waits for the previous step's kernels a dozen times and the host can never run ahead
of the GPU. Staging through pinned memory with `non_blocking=True` enqueues the copy and returns at once.
Reusing the pinned staging memory is safe: PyTorch's caching host allocator records an event with each
non-blocking copy and hands the block out again only after that event has completed.

`PackedStaging` goes further for what a plan() sends every step: its device tensors are views of one buffer with
one pinned twin allocated once, so a step pays one copy and one event, no pinned allocation and no staging copy.
"""

from __future__ import annotations

import math
from typing import Sequence

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


class PackedStaging:
    """Device tensors refilled from the host every step, packed into ONE device buffer with ONE pinned twin, so
    that a step's host->device transfer is a single copy (each copy costs the host ~5-10 us of CUDA calls).

        packed = PackedStaging([("q_start", (B,), torch.int32, 0), ("page_table", (B, W), torch.int32, -1)], dev)
        packed.dev["q_start"]       # the device tensor: storage fixed for life (a CUDA graph may capture it)
        packed.begin()              # waits (rarely) until the last round's copy has left the twin
        packed.host["q_start"][:n] = values    # the pinned twin's view of it: write this round's values here
        packed.host_np["q_start"][:n] = values # the same memory as a numpy array (cheaper for small writes)
        packed.send(last="q_start") # ONE copy of every field up to `last` (default: all), then one event

    Fields are laid out in the given order at 256-byte aligned offsets (compiled kernels assume 16-byte aligned
    inputs), so a step that needs only the first fields copies only those. On the CPU `host` and `dev` are the
    same tensors and send() does nothing.
    """

    ALIGN = 256

    def __init__(self, fields: Sequence[tuple[str, tuple[int, ...], torch.dtype, int | torch.Tensor]],
                 device: torch.device) -> None:
        offsets, self._ends, end = {}, {}, 0
        for name, shape, dtype, _ in fields:
            offsets[name], self._ends[name] = end, end + math.prod(shape) * dtype.itemsize
            end += -(-(self._ends[name] - end) // self.ALIGN) * self.ALIGN
        self._cuda = device.type == "cuda"
        self._dev_raw = torch.empty(end, dtype=torch.uint8, device=device)
        self._host_raw = torch.empty(end, dtype=torch.uint8, pin_memory=True) if self._cuda else self._dev_raw
        def views(raw: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: raw[offsets[name]:self._ends[name]].view(dtype).view(shape)
                    for name, shape, dtype, _ in fields}

        self.dev: dict[str, torch.Tensor] = views(self._dev_raw)
        self.host: dict[str, torch.Tensor] = views(self._host_raw) if self._cuda else self.dev
        # numpy views of the same host memory: filling a few dozen ints through them costs ~1 us, through
        # torch.tensor() + copy_() several
        self.host_np = {name: t.numpy() for name, t in self.host.items()}
        for name, _, _, init in fields:
            self.host[name].copy_(init) if isinstance(init, torch.Tensor) else self.host[name].fill_(init)
        if self._cuda:
            self._dev_raw.copy_(self._host_raw)
        self._event: torch.cuda.Event | None = None
        self.rounds = 0  # send() calls so far (on the CPU too): tells whether a round got as far as its copy

    def begin(self) -> None:
        """Wait until the previous round's copy has read the twin (it has, unless the host is far ahead)."""
        if self._event is not None:
            self._event.synchronize()

    def send(self, last: str | None = None) -> None:
        """Enqueue one copy of the twin's fields up to and including `last` (default: all); returns at once."""
        self.rounds += 1
        if not self._cuda:
            return
        end = self._ends[last] if last is not None else self._host_raw.numel()
        self._dev_raw[:end].copy_(self._host_raw[:end], non_blocking=True)
        # On the buffer's device's current stream, where copy_ enqueued the copy, whatever the current device is.
        stream = torch.cuda.current_stream(self._dev_raw.device)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(stream)
