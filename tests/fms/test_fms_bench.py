"""Smoke test of the end-to-end FMS benchmark (conformance.fms_bench), in-process on the CPU.

Micro shape, tiny settings, eager FlexAttention, the modes that need no compile (hf-static and paged-graphs compile; the GPU run
covers them). Checks every mode ran, decoded in fp32 the same greedy tokens as FMS's default path (the same
weights in both libraries), and that the report and plot were written. Timings on the CPU mean nothing and are
not checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from conformance.fms_bench.__main__ import main

MODES = ["hf-eager", "fms-default", "paged-eager"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fms_bench")
    argv = ["--size", "micro", "--device", "cpu", "--dtype", "fp32", "--batches", "1,3", "--prompts", "9",
            "--new-tokens", "3", "--repeats", "1", "--modes", ",".join(MODES), "--attention", "eager",
            "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, out, json.loads((out / "results.json").read_text())


def test_every_mode_ran_and_agreed(results):
    rc, _, res = results
    assert rc == 0
    assert res["command"].startswith("python -m conformance.fms_bench --size micro")
    assert [(c["batch"], c["prompt"]) for c in res["configs"]] == [(1, 9), (3, 9)]
    for c in res["configs"]:
        assert sorted(c["modes"]) == sorted(MODES)
        for mode, r in c["modes"].items():
            assert "error" not in r, r
            assert r["prefill_ms"] > 0 and len(r["generate_ms_all"]) == 1
            assert r["step_ms"] > 0 and r["step_intervals"] == 2     # 4 tokens: the last two of 3 decode steps
            assert r["compiles_timed"] == 0 and r["captures_timed"] == 0
            if mode != "fms-default":        # fp32, same weights: the same greedy tokens as FMS's default path
                assert r["agreement"]["rows_equal"] == c["batch"], (mode, r["agreement"])
        assert c["floor_ms"] > 0


def test_report_and_plot_written(results):
    _, out, res = results
    md = (out / "results.md").read_text()
    assert "FMS + paged, eager" in md and "HF transformers, eager" in md
    assert (out / "step_vs_batch.png").stat().st_size > 1000
    assert res["environment"]["torch"] == torch.__version__
