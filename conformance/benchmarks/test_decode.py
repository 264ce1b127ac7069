"""Decode-step benchmarks: one new token per sequence, every backend on the same stored contexts.

    python -m pytest conformance/benchmarks/test_decode.py --benchmark-json=decode.json        # GPU
    python -m pytest conformance/benchmarks/test_decode.py --benchmark-disable                 # CPU smoke
"""

from __future__ import annotations

from conformance.benchmarks._bench_common import parametrize, run_case_benchmark


def pytest_generate_tests(metafunc):
    parametrize(metafunc, "decode")


def test_decode(request, benchmark, bench, case_store, case_id, backend):
    """Time one decode step (store the new token's K/V, attend over the whole history) of `backend`."""
    run_case_benchmark(request, benchmark, bench, case_store, case_id, backend)
