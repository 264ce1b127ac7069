"""Smoke test of the FMS inference benchmark CLI (paged.fms.bench), in-process on the CPU.

Micro Llama, tiny settings, eager FlexAttention for the paged op (no compile wait): checks the results have
every mode, that the paged op really ran (the benchmark's own op-call and tokens-stored checks), that the
greedy-token comparison was made and recorded, and that the report and plots were written. Timings on the CPU
mean nothing and are not checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from paged.fms import bench


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fms_bench")
    argv = ["--size", "micro", "--device", "cpu", "--dtype", "fp32", "--batches", "1,2", "--seq-lens", "17",
            "--new-tokens", "3", "--nocache-tokens", "2", "--warmup-tokens", "2", "--agree-tokens", "3",
            "--attention", "eager", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):        # the benchmark seeds torch's global RNG
            rc = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, out, json.loads((out / "results.json").read_text())


def test_cli_succeeds_and_records_the_command(results):
    rc, out, res = results
    assert rc == 0
    assert res["command"].startswith("python -m paged.fms.bench --size micro")
    env = res["env"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["ibm_fms"]
    assert res["model"]["size"] == "micro" and res["model"]["config"]["nlayers"] == 5


def test_every_mode_and_configuration_ran(results):
    _, _, res = results
    runs = res["runs"]
    assert {(r["mode"], r["batch"], r["seq_len"]) for r in runs} == {
        (m, b, 17) for m in ("sdpa", "paged", "nocache") for b in (1, 2)}
    for r in runs:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["decode_steps"] == (1 if r["mode"] == "nocache" else 2)
        assert r["recompiles_timed"] == 0
    # K/V held: the contiguous cache holds exactly batch x (prompt + new - 1) tokens; the pages hold the same
    # tokens in whole pages; no cache holds nothing.
    kv = res["model"]["kv_bytes_per_token"]
    for r in runs:
        if r["mode"] == "sdpa":
            assert r["kv_bytes_reserved"] == r["batch"] * (17 + 3 - 1) * kv
        if r["mode"] == "paged":
            assert r["kv_tokens_stored"] == r["batch"] * (17 + 3 - 1)
            assert r["kv_bytes_reserved"] == r["batch"] * 32 * kv          # 19 tokens -> 2 pages of 16
        if r["mode"] == "nocache":
            assert r["kv_bytes_reserved"] == 0


def test_paged_runs_really_used_the_paged_op(results):
    _, _, res = results
    checks = res["checks"]
    assert checks["paged_op_used"] is True and checks["complete"] and checks["no_recompile_limit_fallbacks"]
    nlayers = res["model"]["config"]["nlayers"]
    for r in (r for r in res["runs"] if r["mode"] == "paged"):
        op = r["paged_op"]
        assert op["ok"] and op["runs_checked"] == 2              # the warm-up and the timed run
        last = op["last"]
        assert last["cache_run_calls"] == last["expected_calls"] == nlayers * 3
        assert last["tokens_stored"] == last["expected_tokens"] == r["batch"] * (17 + 3 - 1)
        assert last["registered_compute_is_paged_op"]


def test_token_agreement_recorded(results):
    _, _, res = results
    agree = res["agreement"]
    assert agree["ok"] is True and res["checks"]["agreement_ok"] is True
    assert agree["gold_dtype"] == "float64" and agree["dtype"] == "float32"
    assert set(agree["modes"]) == {"sdpa", "paged", "nocache"}
    # fp32: identical greedy tokens in every mode.
    assert all(v["identical"] for v in agree["modes"].values())
    assert agree["tokens"]["paged"] == agree["tokens"]["sdpa"]
    assert all(len(row) == 3 for row in agree["tokens"]["paged"])


def test_report_and_plots_written(results):
    _, out, res = results
    md = (out / "results.md").read_text()
    assert "paged / sdpa" in md and res["command"] in md
    for name in ("latency_vs_seq.png", "throughput_vs_batch.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not (out / "plots_error.txt").exists()


def test_replot_rewrites_report(results):
    _, out, _ = results
    (out / "memory.png").unlink()
    assert bench.main(["--replot", str(out)]) == 0
    assert (out / "memory.png").is_file()
