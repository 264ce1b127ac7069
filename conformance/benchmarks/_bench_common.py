"""What the decode and prefill benchmark modules share: parametrisation and the body of one benchmark."""

from __future__ import annotations

import pytest

from conformance.benchmarks.backends import BACKENDS
from conformance.benchmarks.grid import Case, cases
from conformance.benchmarks.harness import measure


def parametrize(metafunc: pytest.Metafunc, kind: str, backends=BACKENDS) -> None:
    """Parametrise `case_id` x `backend` over the session's grid, case-major (a case's backends run together).

    Ids read ``<backend>-<case>``, e.g. ``paged-B32-mix512-4096-P64-32x8-D128``; each case is its own
    benchmark group, so tables show the backends of one case side by side.
    """
    if not {"case_id", "backend"} <= set(metafunc.fixturenames):
        return
    from conformance.benchmarks.conftest import settings_of

    s = settings_of(metafunc.config)
    grid = cases(kind, s.grid, s.device.type)
    metafunc.config._paged_cases = {**getattr(metafunc.config, "_paged_cases", {}), **{c.id: c for c in grid}}
    if s.backends:
        unknown = set(s.backends) - set(BACKENDS)
        if unknown:
            raise pytest.UsageError(f"--bench-backends: unknown {sorted(unknown)}; known: {', '.join(BACKENDS)}")
        backends = tuple(b for b in backends if b in s.backends)
    combos = [(c.id, b) for c in grid for b in backends]
    metafunc.parametrize(("case_id", "backend"), combos, ids=[f"{b}-{c}" for c, b in combos])


def case_info(case: Case, backend: str, lens: list[int]) -> dict:
    return dict(backend=backend, kind=case.kind, case=case.id, batch=case.batch, ctx=case.ctx.label,
                ctx_kind=case.ctx.kind, ctx_lo=case.ctx.lo, ctx_hi=case.ctx.hi,
                ctx_mean=round(sum(lens) / len(lens), 1), ctx_max=max(lens), page=case.page, hq=case.hq,
                hkv=case.hkv, head_dim=case.head_dim, dtype=case.dtype, q_len=case.q_len)


def run_case_benchmark(request, benchmark, bench, case_store, case_id: str, backend: str) -> None:
    case: Case = request.config._paged_cases[case_id]
    benchmark.group = f"{case.kind} {case.id}"
    prep = case_store.get(case)
    step, rearm = prep.step_fn(backend)          # skips an unavailable backend, fails a wrong one
    info = case_info(case, backend, prep.lens)
    info.update(worst_error_ratio=round(prep.worst.get(backend, 0.0), 4),
                compiled_graphs_first_run=prep.build_graphs.get(backend, 0))
    if backend == "paged" and bench.cuda:
        from conformance.benchmarks.pools import case_pool

        pool = case_pool(bench, case)
        info.update(pool_pages=pool.num_pages, pool_gib=round(pool.bytes / 2**30, 2), pool_capped=pool.capped,
                    kernel_options=bench.kernel_options)
    measure(benchmark, bench, step, rearm, kv_bytes=prep.kv_bytes, extra_info=info,
            planted=(backend == "paged" and case.kind == "decode"))
