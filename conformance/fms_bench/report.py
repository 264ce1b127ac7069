"""results.json and results.md of an end-to-end run: per configuration, every mode's figures and the ratios."""

from __future__ import annotations

import json
from pathlib import Path

from conformance.fms_bench.runners import LABELS, MODES


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token rows differ (None: equal)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(tokens: dict[str, list[list[int]]], anchor: str) -> dict[str, dict]:
    """Per mode: rows whose greedy tokens equal the anchor mode's, and the earliest divergence."""
    ref = tokens.get(anchor)
    out = {}
    for mode, rows in tokens.items():
        if ref is None or mode == anchor:
            continue
        diffs = [first_difference(a, b) for a, b in zip(rows, ref)]
        out[mode] = {"rows_equal": sum(d is None for d in diffs), "rows": len(diffs),
                     "first_difference": min((d for d in diffs if d is not None), default=None)}
    return out


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))


def plot(results: dict, out: Path) -> Path:
    """ms per decode step against batch, one panel per prompt length, one line per mode (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = sorted({c["prompt"] for c in results["configs"]})
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 4.2), squeeze=False)
    for ax, prompt in zip(axes[0], prompts):
        configs = [c for c in results["configs"] if c["prompt"] == prompt]
        for mode in results["modes"] + ["floor"]:
            pts = [(c["batch"], c["floor_ms"] if mode == "floor" else c["modes"].get(mode, {}).get("step_ms"))
                   for c in configs]
            pts = [(b, y) for b, y in pts if y]
            if pts:
                ax.plot(*zip(*pts), "k--" if mode == "floor" else "o-", label=LABELS.get(mode, "memory floor"))
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step",
               title=f"{results['size']}, prompt {prompt}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "step_vs_batch.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# FMS end to end, {results['size']} shape ({env.get('card')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, transformers {env.get('transformers')}, {env.get('date')})", "",
             f"`{results['command']}`", "",
             "ms per decode step: the median interval between consecutive tokens of generate(N + 1) (host clock, "
             "a synchronize at every token: host time included); prefill = generate(1 new token).", "",
             "| batch | prompt | " + " | ".join(LABELS[m] for m in results["modes"]) +
             " | floor | paged-graphs / hf-static | paged-graphs / floor |",
             "|---|---|" + "---|" * (len(results["modes"]) + 3)]
    for c in results["configs"]:
        cells = [_cell(c["modes"].get(m, {}).get("step_ms")) for m in results["modes"]]
        g, s = c["modes"].get("paged-graphs", {}).get("step_ms"), c["modes"].get("hf-static", {}).get("step_ms")
        lines.append(f"| {c['batch']} | {c['prompt']} | " + " | ".join(cells) + f" | {_cell(c['floor_ms'])} | "
                     f"{_cell(g / s if g and s else None)} | {_cell(g / c['floor_ms'] if g else None)} |")
    lines += ["", "Prefill (ms):", "", "| batch | prompt | " + " | ".join(results["modes"]) + " |",
              "|---|---|" + "---|" * len(results["modes"])]
    for c in results["configs"]:
        cells = [_cell(c["modes"].get(m, {}).get("prefill_ms"), 1) for m in results["modes"]]
        lines.append(f"| {c['batch']} | {c['prompt']} | " + " | ".join(cells) + " |")
    lines += ["", "Device time per decode step (summed kernel time, torch.profiler; where measured), "
              "compiles and graph captures, greedy agreement with FMS default:", ""]
    for c in results["configs"]:
        for m in results["modes"]:
            r = c["modes"].get(m, {})
            if r.get("error"):
                lines.append(f"- {c['batch']} x {c['prompt']} {m}: ERROR {r['error']}")
            elif "step_ms" in r:
                peak = r.get("peak_extra_bytes")
                lines.append(f"- {c['batch']} x {c['prompt']} {m}: device {_cell(r.get('device_ms'))} ms/step, "
                             f"compiles / CUDA graph captures in the timed repeats {r.get('compiles_timed')} / "
                             f"{r.get('captures_timed')} (warm-up {r.get('compiles_warmup')} / "
                             f"{r.get('captures_warmup')}), "
                             f"peak memory above the model {_cell(peak / 2**30 if peak else None)} GiB, "
                             f"agreement {r.get('agreement', '-')}")
                for name, ms, n in r.get("kernels", [])[:8]:
                    lines.append(f"    - {ms:.3f} ms, {n:g} launches/step: `{name}`")
    return "\n".join(lines) + "\n"
