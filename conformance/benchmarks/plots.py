"""Figures from benchmark results.

    python -m conformance.benchmarks.plots --results DIR --out docs/figures

Reads every ``*.json`` directly in DIR (not its subfolders, so pytest-benchmark's autosave storage and the
planted-slowdown run are left out): pytest-benchmark JSON (``--benchmark-json``) and the capacity,
peak-memory and strategy JSON that the tests write. Writes PNGs (matplotlib, Agg):

* decode_latency_vs_context.png   median decode-step time vs context length, per backend (+ share of copy bandwidth)
* decode_latency_vs_batch.png     median decode-step time vs batch size, per backend
* peak_memory_vs_context.png      peak GPU memory per step vs tokens stored, paged vs contiguous
* concurrent_sequences_vs_budget.png  sequences that fit a KV budget, paging (per page size) vs contiguous
* strategies.png                  waste / pages touched / contiguity (and decode time on GPU) per page size x policy
A figure whose data is missing is skipped with a message (a CPU smoke run writes no timings).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BACKEND_STYLE = {"paged": ("tab:blue", "o"), "pagedflex": ("tab:cyan", "D"), "sdpa": ("tab:gray", "s"), "flexcontig": ("tab:purple", "v"),
                 "torchpa": ("tab:orange", "^"),
                 "flashinfer": ("tab:green", "D")}


def load(results: Path) -> dict:
    """Benchmarks (flattened: extra_info + median) and the test JSON files found directly in `results`."""
    out = {"benchmarks": [], "machine": None, "capacity": None, "peak_memory": None, "strategies": None}
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "benchmarks" in data:
            out["machine"] = out["machine"] or data.get("machine_info")
            for b in data["benchmarks"]:
                info = dict(b.get("extra_info", {}))
                info["median_s"] = b["stats"]["median"]
                info["name"] = b.get("name")
                out["benchmarks"].append(info)
        elif path.name == "capacity.json":
            out["capacity"] = data
        elif path.name == "peak_memory.json":
            out["peak_memory"] = data
        elif path.name == "strategies.json":
            out["strategies"] = data
    return out


def _title(base: str, machine: dict | None) -> str:
    gpu = (machine or {}).get("gpu") or (machine or {}).get("cpu", {}).get("brand_raw") or ""
    return f"{base}\n{gpu} torch {(machine or {}).get('torch', '')}".strip()


def _pick_series(rows: list[dict], fixed: tuple[str, ...], x: str) -> tuple[tuple, list[dict]]:
    """Rows of the (fixed fields) group with the most distinct x values."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(f) for f in fixed)].append(r)
    if not groups:
        return (), []
    key = max(groups, key=lambda k: (len({r[x] for r in groups[k]}), len(groups[k])))
    return key, groups[key]


def _lines(ax, rows: list[dict], x: str, y, *, logx=True):
    by_backend = defaultdict(list)
    for r in rows:
        by_backend[r["backend"]].append(r)
    for backend, rs in sorted(by_backend.items()):
        rs.sort(key=lambda r: r[x])
        color, marker = BACKEND_STYLE.get(backend, (None, "x"))
        ax.plot([r[x] for r in rs], [y(r) for r in rs], marker=marker, color=color, label=backend)
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()


def _latency_and_bandwidth(rows: list, x: str, xlabel: str, title: str, path: Path, machine) -> Path:
    """Two panels over `x`: median decode step (ms, log) and K/V read rate (% of copy bandwidth)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines(a1, rows, x, lambda r: 1e3 * r["median_s"])
    a1.set_xlabel(xlabel)
    a1.set_ylabel("median decode step (ms)")
    a1.set_yscale("log")
    _lines(a2, rows, x, lambda r: 100 * r.get("copy_fraction", 0))
    a2.set_xlabel(xlabel)
    a2.set_ylabel("K/V read rate, % of measured copy bandwidth")
    fig.suptitle(_title(title, machine), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def decode_vs_context(data: dict, out: Path) -> Path | None:
    rows = [r for r in data["benchmarks"] if r.get("kind") == "decode" and r.get("ctx_kind") == "u"]
    key, rows = _pick_series(rows, ("batch", "page", "hq", "hkv", "head_dim", "dtype"), "ctx_lo")
    if len({r["ctx_lo"] for r in rows}) < 2:
        return None
    batch, page, hq, hkv, d, dt = key
    return _latency_and_bandwidth(
        rows, "ctx_lo", "context length (tokens, every sequence)",
        f"Decode step vs context: batch {batch}, page {page}, {hq}/{hkv} heads, D {d}, {dt}",
        out / "decode_latency_vs_context.png", data["machine"])


def decode_vs_batch(data: dict, out: Path) -> Path | None:
    rows = [r for r in data["benchmarks"] if r.get("kind") == "decode"]
    key, rows = _pick_series(rows, ("ctx", "page", "hq", "hkv", "head_dim", "dtype"), "batch")
    if len({r["batch"] for r in rows}) < 2:
        return None
    ctx, page, hq, hkv, d, dt = key
    return _latency_and_bandwidth(
        rows, "batch", "batch (sequences)",
        f"Decode step vs batch: contexts {ctx}, page {page}, {hq}/{hkv} heads, D {d}, {dt}",
        out / "decode_latency_vs_batch.png", data["machine"])


def peak_memory(data: dict, out: Path) -> Path | None:
    pm = data["peak_memory"]
    if not pm or not pm.get("per_step"):
        return None
    steps = sorted(pm["per_step"], key=lambda r: r["tokens"])
    gib = 2**30
    tokens = [r["tokens"] for r in steps]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(tokens, [r["paged_peak_bytes"] / gib for r in steps], ".", ms=3, color="tab:blue",
            label="paged: peak allocated (pool sized to the trace + step transients)")
    ax.plot(tokens, [r["paged_in_use_bytes"] / gib for r in steps], ".", ms=3, color="tab:cyan",
            label="paged: pages in use")
    ax.plot(tokens, [r["padded_dynamic_bytes"] / gib for r in steps], ".", ms=3, color="tab:orange",
            label="contiguous, padded to the longest sequence (computed)")
    ax.axhline(pm["contiguous_static_peak_bytes"] / gib, color="tab:gray",
               label=f"contiguous, {pm['slots']} x max_len {pm['max_len']} reserved (measured peak)")
    ax.set_xlabel("tokens stored in the batch")
    ax.set_ylabel("GiB (one layer)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(f"KV memory per step over a {pm['steps']}-step trace ({pm['heads']} heads, D {pm['head_dim']}, "
                        f"page {pm['page_size']})", data["machine"]), fontsize=10)
    fig.tight_layout()
    path = out / "peak_memory_vs_context.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def capacity(data: dict, out: Path) -> Path | None:
    cap = data["capacity"]
    if not cap:
        return None
    rows = cap["rows"]
    budgets = [r["budget_gib"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(budgets, [r["contiguous"]["sequences"] for r in rows], "s-", color="tab:gray",
            label=f"contiguous (reserves max_len {cap['max_len']})")
    a2.plot(budgets, [100 * r["contiguous"]["waste_fraction"] for r in rows], "s-", color="tab:gray",
            label="contiguous")
    for page in sorted(rows[0]["paged"], key=int):
        a1.plot(budgets, [r["paged"][page]["sequences"] for r in rows], "o-", label=f"paged, page {page}")
        a2.plot(budgets, [100 * r["paged"][page]["waste_fraction"] for r in rows], "o-", label=f"paged, page {page}")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (GiB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_yscale("log")
    a1.set_ylabel("concurrent sequences that fit")
    a2.set_ylabel("reserved memory holding no token (%)")
    d = cap["distribution"]
    fig.suptitle(f"Capacity at a fixed KV budget ({cap['model']})\nrequests: prompts {d['prompt']}, outputs "
                 f"{d['output']}, {d['cap']}", fontsize=9)
    fig.tight_layout()
    path = out / "concurrent_sequences_vs_budget.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def strategies(data: dict, out: Path) -> Path | None:
    st = data["strategies"]
    timed = [r for r in data["benchmarks"] if r.get("kind") == "strategy"]
    if not st and not timed:
        return None
    res = list((st or {}).get("results", {}).values())
    panels = [("mean_waste_fraction", "mean waste (%)", 100), ("pages_touched_fraction", "pool pages touched (%)", 100),
              ("physically_adjacent_fraction", "logically adjacent pages adjacent in the pool (%)", 100)]
    ncols = len(panels) + (1 if timed else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4))
    policies = ["lowest", "lifo", "fifo", "random"]
    pages = sorted({r["page_size"] for r in res} | {r["page"] for r in timed})
    width = 0.8 / max(1, len(policies))
    for ax, (field, label, scale) in zip(axes, panels):
        for j, pol in enumerate(policies):
            ys = [next((scale * r[field] for r in res if r["page_size"] == p and r["policy"] == pol), 0) for p in pages]
            ax.bar([i + j * width for i in range(len(pages))], ys, width, label=pol)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pages))], [f"page {p}" for p in pages])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    if timed:
        ax = axes[-1]
        for j, pol in enumerate(policies):
            ys = [next((1e3 * r["median_s"] for r in timed if r["page"] == p and r["policy"] == pol), 0) for p in pages]
            ax.bar([i + j * width for i in range(len(pages))], ys, width, label=pol)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pages))], [f"page {p}" for p in pages])
        ax.set_ylabel("decode step of 32 live sequences (ms)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title("Paging strategies on one serving trace", data["machine"]), fontsize=10)
    fig.tight_layout()
    path = out / "strategies.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="directory holding the JSON results")
    parser.add_argument("--out", default=Path("docs/figures"), type=Path, help="where to write the PNGs")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a directory")
    data = load(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(data['benchmarks'])} timed benchmark(s); capacity: {bool(data['capacity'])}; peak memory: "
          f"{bool(data['peak_memory'])}; strategies: {bool(data['strategies'])}")
    for make in (decode_vs_context, decode_vs_batch, peak_memory, capacity, strategies):
        path = make(data, args.out)
        print(f"  {make.__name__}: {path if path else 'no data, skipped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
