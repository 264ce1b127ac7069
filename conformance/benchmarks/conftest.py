"""Options, settings and pytest-benchmark hooks of the benchmark package.

Options (each also settable through an environment variable):
    --bench-grid small|issue6|full  grid of cases (PAGED_BENCH_GRID; default small)
    --bench-rounds N              timed rounds per benchmark (PAGED_BENCH_ROUNDS; default 100 on GPU, 3 on CPU)
    --bench-warmup N              untimed warm-up calls (PAGED_BENCH_WARMUP; default 10 on GPU, 1 on CPU)
    --bench-pool-fraction F       share of the card's memory for the benchmarked layer's page pool
                                  (PAGED_BENCH_POOL_FRACTION; default 0.05, ~7 GB on an H200)
    --bench-pool-uncapped         no cap of 2**31 elements per pool tensor (PAGED_BENCH_POOL_UNCAPPED=1): for
                                  cases that need more (issue6's batch 128 x 4k-16k x 32 kv heads); over the
                                  cap only paged's Triton decode kernel and FlashInfer run
    --bench-results DIR           where capacity/strategy/recompile/memory JSON goes (PAGED_BENCH_RESULTS;
                                  default .benchmarks/results)
    --bench-kernel-options JSON   FlexAttention kernel_options for paged and the torch peer
                                  (PAGED_BENCH_KERNEL_OPTIONS; default none: the library's defaults)
    --bench-backends LIST         backends to benchmark, comma-separated (PAGED_BENCH_BACKENDS; default all:
                                  paged,pagedflex,sdpa,flexcontig,torchpa,flashinfer); sdpa is always built to cross-check outputs
Device: the conformance plugin's --device if given, else $PAGED_DEVICE, else cuda when a GPU is visible.
PAGED_BENCH_PLANTED_SLOWDOWN=0.2 slows the paged decode benchmarks by 20% (demonstration only, see harness).
PAGED_BENCH_DEADLINE=<unix time>: tests starting after it are skipped, so a time-boxed run (scripts/gpu_bench.sh)
still ends its session normally and writes its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
from pathlib import Path

import pytest
import torch

from conformance.benchmarks.grid import GRIDS
from conformance.benchmarks.harness import SLOWDOWN_ENV, BenchSettings, env_float


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("paged-benchmarks")
    group.addoption("--bench-grid", default=None, choices=GRIDS, help="benchmark grid (default small)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark")
    group.addoption("--bench-warmup", type=int, default=None, help="untimed warm-up calls per benchmark")
    group.addoption("--bench-pool-fraction", type=float, default=None,
                    help="share of the card's memory given to the benchmarked layer's page pool")
    group.addoption("--bench-pool-uncapped", action="store_true", default=None,
                    help="let a pool tensor exceed 2**31 elements (FlexAttention backends are then not run on it)")
    group.addoption("--bench-results", default=None, help="directory for capacity/strategy/memory JSON")
    group.addoption("--bench-kernel-options", default=None, help="JSON kernel_options for FlexAttention")
    group.addoption("--bench-backends", default=None,
                    help="comma-separated backends to benchmark (default all)")


def _opt(config: pytest.Config, name: str):
    try:
        return config.getoption(name)
    except (ValueError, AttributeError):
        return None


def bench_device(config: pytest.Config) -> torch.device:
    name = _opt(config, "--device") or os.environ.get("PAGED_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_settings(config: pytest.Config) -> BenchSettings:
    dev = bench_device(config)
    cuda = dev.type == "cuda"
    grid = _opt(config, "--bench-grid") or os.environ.get("PAGED_BENCH_GRID") or "small"
    rounds = _opt(config, "--bench-rounds") or int(env_float("PAGED_BENCH_ROUNDS", 100 if cuda else 3))
    warmup = _opt(config, "--bench-warmup")
    warmup = warmup if warmup is not None else int(env_float("PAGED_BENCH_WARMUP", 10 if cuda else 1))
    fraction = _opt(config, "--bench-pool-fraction") or env_float("PAGED_BENCH_POOL_FRACTION", 0.05)
    results = _opt(config, "--bench-results") or os.environ.get("PAGED_BENCH_RESULTS") or \
        str(Path(str(config.rootpath)) / ".benchmarks" / "results")
    ko = _opt(config, "--bench-kernel-options") or os.environ.get("PAGED_BENCH_KERNEL_OPTIONS") or ""
    disabled = bool(_opt(config, "benchmark_disable")) or not _benchmark_enabled(config)
    backends = _opt(config, "--bench-backends") or os.environ.get("PAGED_BENCH_BACKENDS") or ""
    backends = tuple(b.strip() for b in backends.split(",") if b.strip())
    return BenchSettings(device=dev, grid=grid, rounds=max(1, rounds), warmup=max(0, warmup),
                         backends=backends or None, pool_fraction=fraction, results_dir=Path(results),
                         pool_uncapped=bool(_opt(config, "--bench-pool-uncapped")
                                            or os.environ.get("PAGED_BENCH_POOL_UNCAPPED") == "1"),
                         kernel_options=json.loads(ko) if ko.strip() else None,
                         planted_slowdown=env_float(SLOWDOWN_ENV, 0.0), benchmark_disabled=disabled)


def _benchmark_enabled(config: pytest.Config) -> bool:
    bs = getattr(config, "_benchmarksession", None)
    return not getattr(bs, "disabled", False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: long-running")
    config._paged_bench = make_settings(config)
    if os.environ.get("PAGED_BENCH_DEADLINE") and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # A time-boxed run may be stopped with SIGINT (timeout -s INT): let it end the session cleanly even when
        # started from a non-interactive background shell, which ignores SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_setup(item: pytest.Item) -> None:
    deadline = os.environ.get("PAGED_BENCH_DEADLINE", "").strip()
    if deadline and time.time() > float(deadline):
        pytest.skip("PAGED_BENCH_DEADLINE passed: this run's time budget is spent")


def settings_of(config: pytest.Config) -> BenchSettings:
    if not hasattr(config, "_paged_bench"):
        config._paged_bench = make_settings(config)
    return config._paged_bench


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> BenchSettings:
    """The session's benchmark settings (device, grid, rounds, pool fraction, results dir, ...)."""
    s = settings_of(pytestconfig)
    s.benchmark_disabled = s.benchmark_disabled or not _benchmark_enabled(pytestconfig)
    return s


@pytest.fixture(scope="session")
def case_store(request, bench):
    """Builds each case's backends once (only those whose benchmarks were selected, plus sdpa)."""
    from conformance.benchmarks.backends import CaseStore

    selected: dict[str, set[str]] = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case_id" in params and "backend" in params:
            selected.setdefault(params["case_id"], set()).add(params["backend"])
    store = CaseStore(bench, selected)
    yield store
    store.release()


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = settings_of(config)
    return [f"paged benchmarks: device={s.device} grid={s.grid} rounds={s.rounds} warmup={s.warmup} "
            f"pool_fraction={s.pool_fraction} results={s.results_dir}"
            + (f" PLANTED SLOWDOWN {s.planted_slowdown:.0%}" if s.planted_slowdown else "")]


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """pytest-benchmark's machine id has no GPU in it: add the GPU and versions.

    Only stable facts go here: a figure measured in the run (the copy bandwidth, in each result's extra_info)
    would make every saved run look like another machine to `--benchmark-compare`.
    """
    s = settings_of(config)
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["triton"] = _version("triton") or _version("pytorch-triton")
    machine_info["flashinfer"] = _version("flashinfer-python") or _version("flashinfer")
    machine_info["python_impl"] = platform.python_implementation()
    machine_info["bench_device"] = str(s.device)
    machine_info["bench_pool_fraction"] = s.pool_fraction
    if s.cuda:
        props = torch.cuda.get_device_properties(s.device)
        machine_info["gpu"] = props.name
        machine_info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        machine_info["gpu_l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    else:
        machine_info["gpu"] = None
