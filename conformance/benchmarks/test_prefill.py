"""Prefill-chunk benchmarks: a chunk of new tokens per sequence appended to stored contexts (causal).

FlashInfer is benchmarked through its decode wrapper only, so it is skipped here.
"""

from __future__ import annotations

from conformance.benchmarks._bench_common import parametrize, run_case_benchmark


def pytest_generate_tests(metafunc):
    parametrize(metafunc, "prefill", backends=("paged", "sdpa", "flexcontig", "torchpa"))


def test_prefill(request, benchmark, bench, case_store, case_id, backend):
    """Time one prefill chunk (store the chunk's K/V, attend causally over history + chunk) of `backend`."""
    run_case_benchmark(request, benchmark, bench, case_store, case_id, backend)
