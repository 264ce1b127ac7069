"""Host-to-device copies that never make the host wait for the GPU.

A plain `tensor.to("cuda")` or `dst.copy_(host)` from pageable memory synchronises the stream, so a `plan()`
issuing a dozen of them waits for the previous step's kernels a dozen times and the host can never run ahead
of the GPU. Staging through pinned memory with `non_blocking=True` enqueues the copy and returns at once.
Reusing the pinned staging memory is safe: PyTorch's caching host allocator records an event with each
non-blocking copy and hands the block out again only after that event has completed.

`StagedCopies` goes one step further for the copies a plan() repeats every step into the same device tensors:
each destination has a pinned twin allocated once, and one event per round of copies says when the twins may
be written again, so a step pays no pinned allocation, no event per copy and no host-side staging copy.
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


class StagedCopies:
    """Rounds of host->device copies into fixed device tensors, each through a pinned twin allocated once.

        stage = StagedCopies()
        stage.begin()                       # waits (rarely) until the last round's copies left the twins
        stage.twin(dst)[:n] = values        # or write it any other way: a (dst.shape) pinned CPU tensor
        stage.copy(dst, n)                  # enqueue dst.view(-1)[:n] <- twin.view(-1)[:n]
        stage.end()                         # one event for the round

    On the CPU the twin is `dst` itself and copy() does nothing. Twins are keyed by the destination tensor, so
    `dst` must be the same (persistent) tensor every round.
    """

    def __init__(self) -> None:
        self._twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(dst) -> (dst, its pinned twin)
        self._event: torch.cuda.Event | None = None
        self._device: torch.device | None = None  # the destinations' GPU: its stream runs the copies

    def begin(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def twin(self, dst: torch.Tensor) -> torch.Tensor:
        """The tensor to write this round's values of `dst` into."""
        if dst.device.type != "cuda":
            return dst
        if self._device is None:
            self._device = dst.device
        elif dst.device != self._device:
            raise ValueError(f"one StagedCopies serves one GPU: {self._device}, not {dst.device}")
        entry = self._twins.get(id(dst))
        if entry is None or entry[0] is not dst:
            entry = self._twins[id(dst)] = (dst, torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True))
        return entry[1]

    def copy(self, dst: torch.Tensor, n: int | None = None) -> None:
        """Enqueue the copy of the twin's first n elements (default all) into `dst`; returns at once."""
        if dst.device.type != "cuda":
            return
        src = self.twin(dst)
        if n is None:
            dst.copy_(src, non_blocking=True)
        elif n:
            dst.view(-1)[:n].copy_(src.view(-1)[:n], non_blocking=True)

    def end(self) -> None:
        if self._device is not None:
            # On the destinations' device's current stream, where copy_ enqueued the copies, whatever the
            # current device is.
            with torch.cuda.device(self._device):
                if self._event is None:
                    self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(self._device))
