"""Proof that the conformance suite has teeth: each deliberately broken backend is caught by the check named for
it, with a conformance failure (ConformanceError, a failed assertion or pytest.raises), never a crash (ci profile).

Each broken backend runs only its named check in-process (compiled kernels are shared with the rest of the
session), without shrinking: only which check fails, and how, matters here.
"""

from __future__ import annotations

import pytest
import torch

from conformance.cli import plugin_args
from tests.broken_backends import BROKEN

#: broken backend -> the check that must catch it.
CAUGHT_BY = {
    "off_by_one_offset": "outputs_match_oracle",
    "no_ownership_check": "eager_matches_compiled",
    "page_handed_out_twice": "fragmentation",
    "freed_page_still_referenced": "isolation_fork",
    "fork_writes_shared_page": "isolation_fork",
    "gqa_heads_mapped_wrongly": "outputs_match_oracle",
    "softmax_scale_wrong": "outputs_match_oracle",
    "last_chunk_token_dropped": "outputs_match_oracle",
    "pages_leak_on_finish": "fragmentation",
    "partial_allocation_on_failure": "fragmentation",
    "memory_counts_shared_twice": "fragmentation",
    "padding_rows_not_zero": "outputs_match_oracle",
    "triton_decode_reads_past_length": "outputs_match_oracle",
}

#: Broken backends whose bug shows only in some trace configurations: the check draws only those (--configs).
#: A wrong GQA mapping needs 2+ kv heads and 2+ query heads per kv head: CPU_CONFIGS[0] (4/2), GPU_CONFIGS[0] (8/2).
ONLY_CONFIGS = {"gqa_heads_mapped_wrongly": "0"}

#: Bugs in page bookkeeping, not in attention, whose checks draw traces of shapes no other unit test compiles: their
#: broken backend attends eagerly (`<name>_eager`), which the check's verdict does not depend on. On 2 CPU cores
#: with a cold compile cache, memory_counts_shared_twice took 81-108 s compiled and ~9 s eager; the other two ~18 s
#: compiled and ~9 s eager.
EAGER = {"memory_counts_shared_twice", "fork_writes_shared_page", "last_chunk_token_dropped"}


class _Outcomes:
    """Which tests failed, and whether each failure was a conformance failure (not a crash of anything)."""

    def __init__(self) -> None:
        self.failed: dict[str, tuple[bool, str]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if call.when == "call" and report.failed and call.excinfo is not None:
            conformance = call.excinfo.errisinstance((AssertionError, pytest.fail.Exception))
            self.failed[item.name] = (conformance, f"{call.excinfo.typename}: {str(call.excinfo.value)[:2000]}")


def test_every_broken_backend_names_its_check():
    assert set(CAUGHT_BY) == set(BROKEN)
    assert EAGER <= set(BROKEN) and set(ONLY_CONFIGS) <= set(BROKEN)


#: Holes found by naming the check, with the device type where each shows: a strict expected failure there (fixing
#: the hole makes this test say so).
NOT_CAUGHT_YET = {
    "triton_decode_reads_past_length": (
        "cpu", "outputs_match_oracle passes under the ci profile (12 traces) on the CPU (Triton's interpreter) although "
               "the injected bug changes a decode output by 0.25 when run directly: its traces reach no Triton decode "
               "step that shows it; found 2026-12-02, open. Caught on CUDA since the work-list kernel (H200, "
               "2026-12-02)"),
}


def _slow_where_not_caught(name: str):
    """A hole known on the CPU runs its whole check without a failure to stop it (12 traces under Triton's
    interpreter: 8 s warm, 25 s with a cold compile cache on 2 cores), only to confirm that it is still open: `slow`
    there (`tox -e slow`); on a GPU, where it is caught, it always runs."""
    hole = NOT_CAUGHT_YET.get(name)
    if hole is not None and hole[0] == "cpu" and not torch.cuda.is_available():
        return pytest.param(name, marks=pytest.mark.slow)
    return name


@pytest.mark.parametrize("name", [_slow_where_not_caught(n) for n in sorted(BROKEN)])
def test_suite_fails_on_broken_backend(name, device, capsys, request):
    hole = NOT_CAUGHT_YET.get(name)
    if hole is not None and device.type == hole[0]:
        request.applymarker(pytest.mark.xfail(reason=hole[1], strict=True))
    check = CAUGHT_BY[name]
    outcomes = _Outcomes()
    only = ["--configs", ONLY_CONFIGS[name]] if name in ONLY_CONFIGS else []
    backend = f"tests.broken_backends:{name}" + ("_eager" if name in EAGER else "")
    code = pytest.main([*plugin_args(), "--pyargs", "conformance.suite", "--backend", backend, "--device",
                        device.type, "--profile", "ci", "--no-shrink",
                        "-q", "-p", "no:cacheprovider", "-k", f"test_{check}", *only], plugins=[outcomes])
    capsys.readouterr()
    assert code == pytest.ExitCode.TESTS_FAILED, f"check {check} did not fail on broken backend {name!r} (exit {code})"
    assert f"test_{check}" in outcomes.failed, f"{name}: {check} did not fail; failures: {list(outcomes.failed)}"
    conformance, detail = outcomes.failed[f"test_{check}"]
    assert conformance, f"{name}: {check} failed with a crash, not a conformance failure:\n{detail}"
