"""Issue 19's mixed prefill+decode steps on one GPU: the Triton mixed kernel (what a Triton cache runs now) against
FlexAttention's path in the same cache (the step's flex plan over the same pages) and FlashInfer's
BatchPrefillWithPagedKVCacheWrapper (causal, NHD, a copy of the same pages).

    python scripts/gpu_mixed_steps.py OUT [--budget-s 60] [--cpu-dry-run] [--no-flashinfer]

Cases (rows as history + new tokens; decode rows' histories log-uniform in 1k..8k; Hq/Hkv 32/8, D 128, page 64
unless named): one 512- or 2048-token chunk over a 4k history among 31 / 63 decode rows, a fresh 2048-token prompt
among 16 decode rows, 16 rows each a 128-token chunk over 1k..8k, fp16 and bf16, D 64 and D 256 once each. Headline
cases first: --budget-s stops the run before a case that would start past it.

Each case: a one-layer PagedKVCache(decode_kernel="triton"), its rows' histories prefilled one row per step, then the
mixed step planned once. Kernels, timed over that step (each stores the same new K/V, so repeats are idempotent):
  triton      the step's `triton_mixed` plan's run (one launch: tiles, then the output's padding zeroed)
  flex        `paged.kernels.flex.plan` of the same step and buffers, its run (K/V store, compiled FlexAttention,
              padding zeroed): the path the cache took for these steps before
  flashinfer  the prefill wrapper's run on ragged queries (no K/V store), where `import flashinfer` works; a new
              (dtype, head dim) JIT compile only in the first half of the budget
Timing as scripts/gpu_decode_classes.py (its Timer: CUDA-graphed, L2 flushed, median; CUDA events where capture
fails, column `*_timing`). Reported: max abs difference between kernels at the real positions, FLOPs (causal, 4 x
D per visible (query head, key)), the least bytes a step moves (K/V of every key attended once per kv head, q and out,
the new K/V written), TFLOP/s and % of the copy bandwidth (`copy_bandwidth`: CUDA events, outside a graph).
Writes OUT/mixed_steps.json (after each case) and OUT/mixed_steps.md.
--cpu-dry-run: tiny shapes on the CPU (Triton's interpreter, TRITON_INTERPRET=1), one call each, no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path

import torch

from conformance.benchmarks.grid import Ctx
from gpu_decode_classes import Timer, _flashinfer_version, copy_bandwidth, run_cases   # this script's folder is on sys.path
from paged import CacheSpec, PagedKVCache
from paged.kernels import StepLayout, flex


def _decode(n: int, name: str) -> list[tuple[int, int]]:
    return [(h, 1) for h in Ctx("mix", 1024, 8192).lengths(n, zlib.crc32(name.encode()))]


def _case(name, rows, hq=32, hkv=8, d=128, page=64, dtype="bfloat16") -> dict:
    return dict(name=name, rows=rows, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype)


def cases() -> list[dict]:
    """The grid, headline cases first."""
    c512, c2048 = [(4096, 512)] + _decode(31, "d31"), [(4096, 2048)] + _decode(63, "d63")
    fresh = [(0, 2048)] + _decode(16, "d16")
    chunks = [(h, 128) for h, _ in _decode(16, "c16")]
    return [
        _case("chunk512+h4k,31dec", c512), _case("chunk2048+h4k,63dec", c2048),
        _case("fresh2048,16dec", fresh), _case("16x(chunk128+h1..8k)", chunks),
        _case("chunk512+h4k,31dec-fp16", c512, dtype="float16"),
        _case("chunk2048+h4k,63dec-fp16", c2048, dtype="float16"),
        _case("fresh2048,16dec-fp16", fresh, dtype="float16"),
        _case("16x(chunk128+h1..8k)-fp16", chunks, dtype="float16"),
        _case("chunk512+h4k,31dec-D64", c512, d=64),
        _case("chunk512+h4k,31dec-D256-16x8", c512, hq=16, d=256),
    ]


def shrink(c: dict) -> dict:
    """The CPU dry run's case: 3 rows, lengths / 64, D 32, page 16."""
    rows = [(h // 64, max(1, n // 64)) for h, n in c["rows"][:3]]
    return {**c, "rows": rows, "hq": 4, "hkv": 2, "d": 32, "page": 16}


def figures(c: dict) -> tuple[float, float]:
    """(FLOPs, least bytes moved) of a case's step."""
    it = getattr(torch, c["dtype"]).itemsize
    hq, hkv, d = c["hq"], c["hkv"], c["d"]
    pairs = sum(n * h + n * (n + 1) // 2 for h, n in c["rows"])                   # (query, visible key) pairs
    keys, new = sum(h + n for h, n in c["rows"]), sum(n for _, n in c["rows"])
    return 4.0 * d * hq * pairs, float(it * d * (2 * hkv * keys + 2 * hq * new + 2 * hkv * new))


class Step:
    """A case's cache with its rows' histories stored, its mixed step planned, and the step's inputs."""

    def __init__(self, c: dict, dev: torch.device) -> None:
        gen = torch.Generator(device=dev).manual_seed(zlib.crc32(c["name"].encode()))
        self.dtype, self.rows = getattr(torch, c["dtype"]), c["rows"]
        P, hkv, hq, d = c["page"], c["hkv"], c["hq"], c["d"]
        pages = sum(-(-(h + n) // P) for h, n in self.rows)
        longest = max(h + n for h, n in self.rows)
        spec = CacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, page_size=P, num_pages=2 * pages + 8,
                         max_seq_len=-(-longest // P) * P, dtype=self.dtype, device=dev)
        self.cache = cache = PagedKVCache(spec, decode_kernel="triton", policy="random", seed=1)
        self.ids = [f"r{i}" for i in range(len(self.rows))]
        for sid, (h, _) in zip(self.ids, self.rows):
            cache.admit(sid)
            if h:
                cache.plan([sid], [h])
                cache.run(0, *self._inputs(gen, 1, h, hq, hkv, d))
        self.lens = [n for _, n in self.rows]
        self.plan = cache.plan(self.ids, self.lens)
        self.q, self.k, self.v = self._inputs(gen, len(self.rows), max(self.lens), hq, hkv, d)

    def _inputs(self, gen, b, n, hq, hkv, d):
        return tuple(torch.randn(b, n, h, d, generator=gen, device=gen.device, dtype=torch.float32).to(self.dtype)
                     for h in (hq, hkv, hkv))

    def triton(self):
        kp, pools = self.plan.kernel_plan, self.cache._pools
        assert kp.name == "triton_mixed", kp.name
        return lambda: kp.run(self.plan, 0, self.q, self.k, self.v, pools, None)

    def flex(self):
        """The step's FlexAttention plan over the same buffers (its block lists, sent with them)."""
        c = self.cache
        layout = StepLayout(c._settings, c.page_logical, tuple(self.ids), tuple(self.lens), self.plan.start_lens,
                            None, None)
        step = dataclasses.replace(self.plan, kernel_plan=flex.plan(layout, self.plan.buffers))
        return lambda: flex.run(step, 0, self.q, self.k, self.v, c._pools, None)

    def flashinfer(self):
        """FlashInfer's causal prefill wrapper over a NHD copy of the pages (after our kernel stored the new K/V);
        returns (fn, ragged out (sum q_len, Hq, D))."""
        import flashinfer

        c, dev = self.cache, self.q.device
        spec = c.spec
        N, P, hkv, d = spec.num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim
        k = c.k_pool[0].view(hkv, N, P, d).permute(1, 2, 0, 3).contiguous()              # (N, P, Hkv, D)
        v = c.v_pool[0].view(hkv, N, P, d).permute(1, 2, 0, 3).contiguous()
        pages = [c.pages(s) for s in self.ids]
        indices = torch.tensor([p for row in pages for p in row], dtype=torch.int32, device=dev)
        kv_indptr = torch.tensor([0] + [len(p) for p in pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        qo_indptr = torch.tensor([0] + self.lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        last = torch.tensor([c.length(s) - (len(p) - 1) * P for s, p in zip(self.ids, pages)], dtype=torch.int32)
        ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=dev)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr.to(dev), kv_indptr.to(dev), indices, last.to(dev), self.q.shape[2], hkv, d, P, causal=True,
               q_data_type=self.dtype, kv_data_type=self.dtype)
        q = torch.cat([self.q[b, :n] for b, n in enumerate(self.lens)])                 # (T, Hq, D)
        self._fi = (k, v, ws, w)                                                          # alive with the graph
        out = w.run(q, (k, v))
        return (lambda: w.run(q, (k, v))), out

    def ragged(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, Hq, D) -> (sum q_len, Hq, D) of the real positions, float32."""
        return torch.cat([out[b, :n] for b, n in enumerate(self.lens)]).float()


def _time(timer: Timer, fn) -> tuple[float, str]:
    try:
        return timer.graphed(fn), "graph"
    except Exception as exc:  # a kernel whose capture fails is timed with events
        print(f"graph capture failed ({exc!r:.200}): events", flush=True)
        torch.cuda.synchronize()
        return timer.events(fn), "events"


def run_case(c: dict, dev: torch.device, timer: Timer | None, bw: float, fi: dict, budget_s: float,
             t0: float) -> dict:
    """One case: every kernel once (checked against each other), then timed where a timer is given."""
    flops, moved = figures(c)
    row = dict(case=c["name"], B=len(c["rows"]), tokens=sum(n for _, n in c["rows"]), hq=c["hq"], hkv=c["hkv"],
               d=c["d"], page=c["page"], dtype=c["dtype"], gflop=flops / 1e9, mb=moved / 1e6)
    s = Step(c, dev)
    fns = {"triton": s.triton(), "flex": s.flex()}
    outs = {name: s.ragged(fn()) for name, fn in fns.items()}
    key = (c["dtype"], c["d"])
    if fi.get("version") and (key in fi["compiled"] or time.time() - t0 < budget_s / 2):
        try:
            fns["flashinfer"], out = s.flashinfer()
            outs["flashinfer"] = out.float()
            fi["compiled"].add(key)
        except Exception as exc:  # recorded; the other kernels still run
            row["fi_error"] = repr(exc)[:300]
    elif fi.get("version"):
        row["fi_skipped"] = "budget: a new FlashInfer JIT compile past half the budget"
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row[f"{a}_vs_{b}_maxdiff"] = float((outs[a] - outs[b]).abs().max())
    if timer is None:
        return row
    for name, fn in fns.items():
        t, how = _time(timer, fn)
        row.update({f"{name}_us": t * 1e6, f"{name}_timing": how, f"{name}_tflops": flops / t / 1e12,
                    f"{name}_bw": moved / t / bw})
    return row


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# Mixed steps: {meta.get('gpu', '?')}, torch {meta['torch']}, FlashInfer {meta.get('flashinfer')}, "
             f"copy {meta.get('copy_gbps', 0):.0f} GB/s", "",
             "triton = the mixed kernel (K/V store fused), flex = the cache's FlexAttention path (K/V store + "
             "attention + padding zeroed), FI = FlashInfer's paged prefill wrapper run (no store). Device time per "
             "step, one layer, L2 flushed, median. % BW: least bytes moved / time / copy bandwidth.", "",
             "| case | B | new tokens | GFLOP | MB | triton µs | TFLOP/s | % BW | flex µs | flex / triton | FI µs | "
             "FI / triton | max diff triton-flex | triton-FI |", "|" + "---|" * 14]
    for r in rows:
        t, f, fi = r.get("triton_us"), r.get("flex_us"), r.get("flashinfer_us")
        cell = (lambda x, fmt: format(x, fmt) if x is not None else "-")
        lines.append(f"| {r['case']} | {r['B']} | {r['tokens']} | {r['gflop']:.1f} | {r['mb']:.0f} | {cell(t, '.1f')} | "
                     f"{cell(r.get('triton_tflops'), '.0f')} | {cell(t and 100 * r['triton_bw'], '.0f')} | "
                     f"{cell(f, '.1f')} | {cell(t and f and f / t, '.2f')} | {cell(fi, '.1f')} | "
                     f"{cell(t and fi and fi / t, '.2f')} | {cell(r.get('triton_vs_flex_maxdiff'), '.2g')} | "
                     f"{cell(r.get('triton_vs_flashinfer_maxdiff'), '.2g')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=60, help="no new case starts past this many seconds")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU's Triton interpreter")
    ap.add_argument("--no-flashinfer", action="store_true", help="time only triton and flex")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0, dry = time.time(), args.cpu_dry_run
    dev = torch.device("cpu" if dry else "cuda")
    meta = dict(torch=torch.__version__, cuda=torch.version.cuda, dry_run=dry)
    timer, bw, fi = None, 1.0, dict(compiled=set())
    if not dry:
        timer = Timer(dev)
        bw = copy_bandwidth(dev)
        fi["version"] = None if args.no_flashinfer else _flashinfer_version()
        meta.update(gpu=torch.cuda.get_device_name(dev), copy_gbps=bw / 1e9, flashinfer=fi["version"])
    return run_cases(cases()[:2] if dry else cases(),
                     lambda c: run_case(shrink(c) if dry else c, dev, timer, bw, fi, args.budget_s, t0),
                     lambda c, exc: dict(case=c["name"], B=len(c["rows"]), error=repr(exc)[:500]),
                     args.out, "mixed_steps", meta, table, args.budget_s, t0, dev)


if __name__ == "__main__":
    sys.exit(main())
