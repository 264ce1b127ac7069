"""GPU-correct timing for pytest-benchmark, the card's copy bandwidth, and what every result records.

How a GPU step is timed (`measure`):

* Warm-up outside the measurement: `settings.warmup` calls (compilation happened before, when the outputs
  were cross-checked; the warm-up also settles clocks and caches). The number of compiled graphs
  (``torch._dynamo.utils.counters['stats']['unique_graphs']``) is read after the warm-up and again after the
  timed rounds: the difference is recorded as ``recompiles`` and must be 0.
* Each round is prepared by an untimed `setup` (pytest-benchmark ``pedantic``): it re-arms the step (host
  only), then enqueues an L2 flush (writes a buffer of max(2 x L2, 256 MiB), so no K/V byte of the previous
  round is still in L2: the cache is read from HBM, as in a real model where other layers run in between)
  and a spin kernel (``torch.cuda._sleep``) long enough to cover the host's launch of the step. The step is
  then enqueued between two CUDA events while the GPU is still spinning, so the events measure the device
  time of the step itself, not Python launch overhead (which is recorded separately as
  ``host_enqueue_ms``: a step whose host enqueue exceeds its device time is host-bound without CUDA graphs).
* The benchmark's timer is replaced by `DeviceClock`, a clock that advances by the CUDA-event time of each
  round (it synchronises once per round, after the step); pytest-benchmark then reports min/median/... of
  the device times. Report the median.

On the CPU nothing here is meant to be a meaningful timing: the default timer is kept and, with
``--benchmark-disable``, every benchmark runs its step exactly once (outputs are still cross-checked).

Planted slowdown (ONLY to demonstrate ``--benchmark-compare-fail``): with ``PAGED_BENCH_PLANTED_SLOWDOWN=0.2``
the paged decode benchmarks spin the GPU (CPU: busy-wait) for an extra 20% of their warm-up median inside
the timed region. Default off; scripts/gpu_bench.sh uses it to show that a comparison flags a regression.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

SLOWDOWN_ENV = "PAGED_BENCH_PLANTED_SLOWDOWN"


@dataclass
class BenchSettings:
    """Session-wide benchmark settings (from command-line options and PAGED_BENCH_* variables)."""

    device: torch.device
    grid: str = "small"
    rounds: int = 100
    warmup: int = 10
    pool_fraction: float = 0.05
    pool_uncapped: bool = False  # pools may exceed 2**31 elements (only the Triton decode kernel and FlashInfer run)
    results_dir: Path = Path(".benchmarks/results")
    kernel_options: dict | None = None
    planted_slowdown: float = 0.0
    benchmark_disabled: bool = False
    backends: tuple[str, ...] | None = None
    _copy_gbps: float | None = field(default=None, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def results_path(self, name: str) -> Path:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        return self.results_dir / name


def unique_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- device helpers
_FLUSH: dict[torch.device, torch.Tensor] = {}
_CYCLES_PER_S: dict[torch.device, float] = {}


def l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def flush_l2(device: torch.device) -> None:
    """Enqueue a write of max(2 x L2, 256 MiB) so that nothing read before stays in L2."""
    buf = _FLUSH.get(device)
    if buf is None:
        buf = _FLUSH[device] = torch.empty(max(2 * l2_bytes(device), 256 * 2**20) // 4, dtype=torch.int32,
                                           device=device)
    buf.zero_()


def spin_cycles_per_second(device: torch.device) -> float:
    """Clock cycles per second of `torch.cuda._sleep`, measured once per session with CUDA events."""
    if device not in _CYCLES_PER_S:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(10_000)
        rates = []
        for _ in range(3):
            start.record()
            torch.cuda._sleep(2_000_000)
            end.record()
            end.synchronize()
            rates.append(2_000_000 / (start.elapsed_time(end) / 1e3))
        _CYCLES_PER_S[device] = statistics.median(rates)
    return _CYCLES_PER_S[device]


def spin(device: torch.device, seconds: float) -> None:
    """Keep the GPU busy for about `seconds` (enqueued; returns at once)."""
    if seconds > 0:
        torch.cuda._sleep(max(1, int(seconds * spin_cycles_per_second(device))))


def measure_copy_bandwidth(device: torch.device) -> float:
    """The device-to-device copy bandwidth of `device` in GB/s (read + write bytes), measured now.

    CUDA: median of 10 copies of 1 GiB timed with CUDA events, outside any CUDA graph (a graph-captured copy read
    2767 GB/s on an H200 against ~4150 eagerly). CPU: median of 5 copies of 64 MiB (only so that the same fields
    exist; a CPU figure means little).
    """
    cuda = device.type == "cuda"
    n = 2**30 if cuda else 64 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(13):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(6):
            t = time.perf_counter()
            dst.copy_(src)
            if i:
                times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def copy_bandwidth(settings: BenchSettings) -> float:
    """The card's copy bandwidth in GB/s (`measure_copy_bandwidth`), measured once per session."""
    if settings._copy_gbps is None:
        settings._copy_gbps = measure_copy_bandwidth(settings.device)
    return settings._copy_gbps


class DeviceClock:
    """A pytest-benchmark timer that advances by the CUDA-event time of each round.

    The target records a (start, end) event pair into `pending`; the runner's closing timer() call waits for
    the end event and adds the elapsed time. The runner's opening call finds nothing pending and returns the
    running total, so each round's duration is exactly its event time.
    """

    __name__ = "cuda_event_clock"

    def __init__(self) -> None:
        self.total = 0.0
        self.pending: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def __call__(self) -> float:
        if self.pending is not None:
            start, end = self.pending
            end.synchronize()
            self.total += start.elapsed_time(end) / 1e3
            self.pending = None
        return self.total


# ---------------------------------------------------------------------------------------------- measure
@dataclass
class Measured:
    """What `measure` saw besides pytest-benchmark's statistics."""

    recompiles: int
    warm_median_s: float | None
    host_enqueue_ms: float | None
    median_s: float | None


def measure(
    benchmark,
    settings: BenchSettings,
    step: Callable[[], object],
    rearm: Callable[[], None],
    *,
    kv_bytes: int,
    extra_info: dict,
    planted: bool = False,
) -> Measured:
    """Time `step` (one decode step / prefill chunk of one backend) with `benchmark`; fill extra_info.

    Args:
        step: enqueues the work (stores the new tokens' K/V and attends); returns its output.
        rearm: host-only preparation that lets `step` run again on the same state (untimed).
        kv_bytes: K/V bytes the step must read at least once (sum over sequences of len * Hkv * D * 2 * itemsize).
        extra_info: case fields recorded with the result (backend, batch, context, page, heads, ...).
        planted: this is a benchmark the planted slowdown applies to (paged decode).
    Raises AssertionError (after recording) when graphs were compiled after the warm-up.
    """
    enabled = not settings.benchmark_disabled and getattr(benchmark, "enabled", True)
    slowdown = settings.planted_slowdown if planted else 0.0
    events = None
    if settings.cuda:
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # warm-up, outside the measurement (compiles already happened while outputs were checked)
    warm, host = _warm_up(settings, step, rearm, settings.warmup if enabled else 0, events)
    warm_median = statistics.median(warm) if warm else None
    host_median = statistics.median(host) if host else None
    graphs_before = unique_graphs()

    extra_s = slowdown * warm_median if (slowdown and warm_median) else 0.0
    timed_host: list[float] = []
    if settings.cuda and enabled:
        setup, target = _device_timed(benchmark, settings, step, rearm, events, host_median, extra_s, timed_host)
    else:
        setup, target = rearm, _host_timed(step, extra_s)
    benchmark.pedantic(target, setup=setup, rounds=settings.rounds, warmup_rounds=0, iterations=1)
    sync(settings.device)
    recompiles = unique_graphs() - graphs_before

    median = None
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and enabled:
        median = stats.stats.median
    _record(benchmark, settings, extra_info, kv_bytes=kv_bytes, recompiles=recompiles, median=median,
            host_times=timed_host or host, slowdown=slowdown)
    assert recompiles == 0, f"{recompiles} graph(s) compiled after warm-up: a shape or guard is not static"
    return Measured(recompiles, warm_median, host_median, median)


def _warm_up(settings: BenchSettings, step: Callable[[], object], rearm: Callable[[], None], rounds: int,
             events: tuple | None) -> tuple[list[float], list[float]]:
    """Run `rounds` untimed steps; return the device times of the second half (all of them on the CPU) and the
    host enqueue times (CUDA only), in seconds."""
    dev = settings.device
    warm: list[float] = []
    host: list[float] = []
    for i in range(rounds):
        rearm()
        if settings.cuda:
            ev0, ev1 = events
            flush_l2(dev)
            if host and i >= rounds // 2:  # second half: launch hidden, as in the timed rounds
                spin(dev, 2 * statistics.median(host) + 200e-6)
            ev0.record()
            t = time.perf_counter()
            step()
            host.append(time.perf_counter() - t)
            ev1.record()
            ev1.synchronize()
            if i >= rounds // 2:
                warm.append(ev0.elapsed_time(ev1) / 1e3)
        else:
            t = time.perf_counter()
            step()
            warm.append(time.perf_counter() - t)
    return warm, host


def _device_timed(benchmark, settings: BenchSettings, step: Callable[[], object], rearm: Callable[[], None],
                  events: tuple, host_median: float | None, extra_s: float,
                  timed_host: list[float]) -> tuple[Callable[[], None], Callable[[], object]]:
    """The (setup, target) pair of a CUDA round: L2 flushed and the launch hidden behind a spin; the round's time
    is its CUDA-event time (a DeviceClock installed as the benchmark's timer). Host enqueue times go to
    `timed_host`."""
    dev = settings.device
    ev0, ev1 = events
    clock = DeviceClock()
    benchmark._timer = clock  # pytest-benchmark's per-fixture timer (pedantic uses it for each round)
    lead = 2 * (host_median or 0.0) + 200e-6

    def setup():
        rearm()
        flush_l2(dev)
        spin(dev, lead)

    def target():
        ev0.record()
        t = time.perf_counter()
        out = step()
        timed_host.append(time.perf_counter() - t)
        if extra_s:
            spin(dev, extra_s)
        ev1.record()
        clock.pending = (ev0, ev1)
        return out

    return setup, target


def _host_timed(step: Callable[[], object], extra_s: float) -> Callable[[], object]:
    """The target of a CPU round (or of a disabled benchmark): the step, then a busy wait of `extra_s`."""

    def target():
        out = step()
        if extra_s:
            deadline = time.perf_counter() + extra_s
            while time.perf_counter() < deadline:
                pass
        return out

    return target


def _record(benchmark, settings: BenchSettings, extra_info: dict, *, kv_bytes: int, recompiles: int,
            median: float | None, host_times: list[float], slowdown: float) -> None:
    """Fill the benchmark's extra_info: the case fields, bytes, recompiles, host time and achieved bandwidth."""
    copy = copy_bandwidth(settings)
    info = dict(extra_info)
    info.update(
        kv_bytes=kv_bytes,
        recompiles=recompiles,
        copy_gbps=round(copy, 1),
        host_enqueue_ms=round(1e3 * statistics.median(host_times), 4) if host_times else None,
        timing="cuda-events, L2 flushed, launch hidden" if settings.cuda else "cpu perf_counter (not meaningful)",
        planted_slowdown=slowdown,
    )
    if median:
        gbps = kv_bytes / median / 1e9
        info.update(gbps=round(gbps, 2), copy_fraction=round(gbps / copy, 4))
    benchmark.extra_info.update(info)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default
