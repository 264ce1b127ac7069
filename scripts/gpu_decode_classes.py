"""Issue 19's decode classes on one GPU: the work-list Triton decode kernel as the cache sizes it now against the same
kernel as the cache sized it before 2026-12-03b (same run: the A/B) and FlashInfer's decode wrapper, on the same
pages. (Up to 2026-12-03 the A/B column was the per-row split kernel the work list replaced.)

    python scripts/gpu_decode_classes.py OUT [--budget-s 180] [--cpu-dry-run]

Classes: skewed length mixes (one 30k row beside 47 of 256; 3 rows 17..9000 at page 16; log-uniform mixes), few
rows (1, 3, 8), MQA (1 kv head: 32 and 71 query heads), GQA groups that are not powers of two (28/4, 40/8, 12/2),
head dims 64 / 128 / 256, fp16 and bf16, uniform batches (32 x 4096, 128 x 4096, 8 x 16384). Lengths are keys
attended (the new token included); pages at random in a pool twice the live pages.

Kernels, each as the cache would run it at the case's padded batch (a power of two, padding rows without keys):
  new         the work list (`triton_partition.partition`) + item kernel + merge, with the fused K/V store, sized by
              `worklist_options` and `target_items`
  old         the same, sized as before: `launch_options`' key tile, a target of 3 CTAs per SM
  flashinfer  BatchDecodeWithPagedKVCacheWrapper (NHD, tensor cores), `run` only (no K/V store), where
              `import flashinfer` works; its JIT compile of a new (dtype, head dim) is skipped past half the budget
Timing: each kernel captured in a CUDA graph N times, an L2 flush (a 256 MB read) before each call; the graph of the
flushes alone is subtracted; median over replays. FlashInfer falls back to CUDA events around each flushed call
where its graph capture fails (column `fi_timing`). Copy bandwidth: a 1 GiB device-to-device copy, CUDA events,
outside a graph (a graph-captured copy measured a third less on an H200).
Writes OUT/decode_classes.json (every case, written after each) and OUT/decode_classes.md (the table).
--cpu-dry-run: tiny shapes on the CPU under Triton's interpreter (TRITON_INTERPRET=1), one call each, no timing:
checks that the script runs before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from conformance.benchmarks.grid import Ctx
from conformance.benchmarks.harness import measure_copy_bandwidth
from paged import triton_decode as td
from paged.plan import bucket

CALLS, REPLAYS = 10, 7


def _case(cls, name, lens, hq=32, hkv=8, d=128, page=64, dtype="bfloat16") -> dict:
    return dict(cls=cls, name=name, lens=lens, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype)


def _mix(batch: int, lo: int, hi: int, name: str) -> list[int]:
    return Ctx("mix", lo, hi).lengths(batch, zlib.crc32(name.encode()))


def cases() -> list[dict]:
    """The grid, headline cases first (the budget may stop the run before the last)."""
    return [
        _case("skew", "30k+47x256-P64", [30_000] + [256] * 47),
        _case("skew", "3rows-17..9000-P16", _mix(3, 17, 9000, "3rows"), page=16),
        _case("mqa", "mqa-32x1-B8x8192", [8192] * 8, hq=32, hkv=1),
        _case("uniform", "u32x4096-P64", [4096] * 32),
        _case("skew", "30k+47x256-P16", [30_000] + [256] * 47, page=16),
        _case("skew", "mix-B32-128..32768", _mix(32, 128, 32768, "m32")),
        _case("skew", "mix-B64-64..16384-P16-fp16", _mix(64, 64, 16384, "m64"), page=16, dtype="float16"),
        _case("skew", "mix-B8-256..65536", _mix(8, 256, 65536, "m8")),
        _case("few", "B1x32768", [32768]),
        _case("few", "B3x8192", [8192] * 3),
        _case("few", "B8x4096-P16", [4096] * 8, page=16),
        _case("mqa", "mqa-71x1-D64-B8-mix", _mix(8, 512, 8192, "falcon"), hq=71, hkv=1, d=64),
        _case("group", "g7-28x4-B16-mix-P16", _mix(16, 1024, 16384, "g7"), hq=28, hkv=4, page=16),
        _case("group", "g5-40x8-B32x4096", [4096] * 32, hq=40, hkv=8),
        _case("group", "g6-12x2-B32x8192", [8192] * 32, hq=12, hkv=2),
        _case("headdim", "D64-32x8-B32x8192", [8192] * 32, d=64),
        _case("headdim", "D256-16x8-B16x8192", [8192] * 16, hq=16, hkv=8, d=256),
        _case("headdim", "D256-8x4-B8-mix-P16-fp16", _mix(8, 512, 16384, "g2"), hq=8, hkv=4, d=256, page=16,
              dtype="float16"),
        _case("uniform", "u32x4096-P16-fp16", [4096] * 32, page=16, dtype="float16"),
        _case("uniform", "u128x4096-P64", [4096] * 128),
        _case("uniform", "u8x16384-P64", [16384] * 8),
    ]


def shrink(c: dict) -> dict:
    """The CPU dry run's version of a case: at most 4 rows, keys / 32 (long rows still split)."""
    return {**c, "lens": [max(1, n // 32) for n in c["lens"][:4]]}


class Data:
    """A case's pools, page table, lengths and inputs at its padded batch Bp (rows past B have no keys)."""

    def __init__(self, c: dict, dev: torch.device) -> None:
        gen = torch.Generator().manual_seed(zlib.crc32(c["name"].encode()))
        self.lens = np.array(c["lens"], dtype=np.int64)                                # (B,) keys attended
        B, P, hkv, hq, D = len(self.lens), c["page"], c["hkv"], c["hq"], c["d"]
        self.B, self.Bp, self.page, self.hq, self.hkv, self.d = B, bucket(B), P, hq, hkv, D
        self.dtype = getattr(torch, c["dtype"])
        need = [math.ceil(int(n) / P) for n in self.lens]
        self.num_pages = 2 * sum(need)
        perm = torch.randperm(self.num_pages, generator=gen)
        table = torch.zeros(self.Bp, max(need), dtype=torch.int32)
        used = 0
        for b, k in enumerate(need):
            table[b, :k] = perm[used:used + k].int()
            used += k
        self.table, self.need, self.dev = table.to(dev), need, dev
        self.k = torch.randn(hkv, self.num_pages * P, D, device=dev, dtype=self.dtype)
        self.v = torch.randn_like(self.k)
        self.q = torch.randn(self.Bp, hq, D, device=dev, dtype=self.dtype)
        self.k_new = torch.randn(self.Bp, hkv, D, device=dev, dtype=self.dtype)
        self.v_new = torch.randn_like(self.k_new)
        q_start = np.zeros(self.Bp, dtype=np.int32)
        q_start[:B] = self.lens - 1
        self.q_start = torch.from_numpy(q_start).to(dev)
        self.q_len = (torch.arange(self.Bp) < B).int().to(dev)
        self.bytes = int(self.lens.sum()) * hkv * D * 2 * self.dtype.itemsize            # K + V read
        self.opts = td.worklist_options(self.dtype, D, dev, self.Bp, hkv)
        self.opts_prev = td.launch_options(self.dtype, D, dev, self.Bp, hkv)

    def worklist(self, options: dict, target: int, num_items: int | None = None, chunk: int = 0,
                 min_keys: int | None = None, merge: bool = True) -> tuple:
        """The work-list kernel on this case at `options` (block_n, num_warps, num_stages): the work list for
        `target` items (`partition`; chunk > 0 forces the slice length; min_keys default `min_slice_keys`; merge:
        the merge's soft floor) in `num_items` columns (default the bucket's `max_items`), item kernel + merge.
        Returns (fn, out (Bp, Hq, D), info)."""
        bn = options["block_n"]
        M = num_items or td.max_items(self.Bp, self.hkv, self.dev)
        items = np.empty((3, M), dtype=np.int32)
        first, count = np.empty(self.Bp, dtype=np.int32), np.empty(self.Bp, dtype=np.int32)
        used, chunk = td.partition(self.lens, items, first, count, target, bn, min_keys or td.min_slice_keys(bn),
                                   td.merge_slice_keys(bn, self.hq // self.hkv) if merge else 0, chunk)
        work = [torch.from_numpy(a).to(self.dev) for a in (items, first, count)]
        meta = td.items_meta(self.dtype, self.dev, self.hq, self.hkv, self.d, self.page, bn, options["num_warps"],
                             options["num_stages"], M, write_new=True)
        parts = td.item_partials(M, self.hq, self.d, self.dev)
        out = torch.empty(self.Bp, self.hq, self.d, dtype=self.dtype, device=self.dev)

        def fn():
            td.launch_items(meta, self.q, self.k, self.v, self.k_new, self.v_new, self.table, self.q_start,
                            self.q_len, *work, self.d ** -0.5, out, *parts)
        info = dict(items=used, max_items=M, slice_keys=chunk, split_rows=int((count > 1).sum()), block_n=bn)
        return fn, out, info

    def new(self) -> tuple:
        """The cache's launch: `worklist_options` for the bucket, its target. Returns (fn, out, info)."""
        return self.worklist(self.opts, td.target_items(self.hkv, self.dev))

    def prev(self) -> tuple:
        """The work list as the cache sized it before 2026-12-03b (the same run's A/B): `launch_options`' key tile
        (128 unless the rows x kv heads x an even split of 3 CTAs per SM fit 4 per SM with at most 4 splits), the
        same target."""
        return self.worklist(self.opts_prev, td.target_items(self.hkv, self.dev))

    def flashinfer(self, graph: bool) -> tuple:
        """FlashInfer's decode wrapper over the same pages and K/V (copied to its NHD layout after our first call
        stored the new tokens). Returns (fn, out)."""
        import flashinfer

        N, P = self.num_pages, self.page
        kv = torch.empty(N, 2, P, self.hkv, self.d, dtype=self.dtype, device=self.dev)
        kv[:, 0] = self.k.view(self.hkv, N, P, self.d).permute(1, 2, 0, 3)
        kv[:, 1] = self.v.view(self.hkv, N, P, self.d).permute(1, 2, 0, 3)
        indices = torch.cat([self.table[b, :k] for b, k in enumerate(self.need)])
        indptr = torch.tensor([0] + self.need, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.dev)
        last = torch.tensor([int(n) - (k - 1) * P for n, k in zip(self.lens, self.need)], dtype=torch.int32,
                            device=self.dev)
        ws = torch.zeros(256 * 2**20, dtype=torch.uint8, device=self.dev)
        extra = dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
                     paged_kv_last_page_len_buffer=last) if graph else {}
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True, **extra)
        w.plan(indptr, indices, last, self.hq, self.hkv, self.d, P, q_data_type=self.dtype, kv_data_type=self.dtype)
        q = self.q[:self.B].contiguous()
        out = torch.empty(self.B, self.hq, self.d, dtype=self.dtype, device=self.dev)
        self._fi = (kv, ws, w)                                   # kept alive with the graph
        try:
            return (lambda: w.run(q, kv, out=out)), w.run(q, kv, out=out)
        except TypeError:                                        # a FlashInfer without run(out=)
            return (lambda: w.run(q, kv)), w.run(q, kv)


class Timer:
    """Device time per call: CALLS flushed calls in one CUDA graph minus CALLS flushes alone, median of REPLAYS."""

    def __init__(self, dev: torch.device) -> None:
        self.buf = torch.empty(64 * 2**20, dtype=torch.float32, device=dev)            # 256 MB > L2
        self.sink = torch.empty((), dtype=torch.float32, device=dev)
        self.flushes = self._graph(None)

    def flush(self) -> None:
        torch.sum(self.buf, dim=0, out=self.sink)

    def _graph(self, fn) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):                                              # warm up off the capture
            self.flush()
            if fn is not None:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(CALLS):
                self.flush()
                if fn is not None:
                    fn()
        return g

    @staticmethod
    def _replay(g: torch.cuda.CUDAGraph) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def graphed(self, fn) -> float:
        g = self._graph(fn)
        self._replay(g)
        with_fn, alone = [], []
        for _ in range(REPLAYS):
            with_fn.append(self._replay(g))
            alone.append(self._replay(self.flushes))
        return (statistics.median(with_fn) - statistics.median(alone)) / CALLS

    def events(self, fn) -> float:
        """Fallback: CUDA events around each call, an L2 flush enqueued before each."""
        fn()
        times = []
        for _ in range(CALLS * REPLAYS):
            self.flush()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)


def copy_bandwidth(dev: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write; `harness.measure_copy_bandwidth`: CUDA events,
    outside a graph: the graph-captured copy this script timed before read 2767 GB/s on an H200 against ~4150)."""
    return measure_copy_bandwidth(dev) * 1e9


def run_cases(cases: list[dict], run, error_row, out: Path, stem: str, meta: dict, table, budget_s: float,
              t0: float, dev: torch.device) -> int:
    """Run `run(case)` for each case until `budget_s` seconds past t0 are spent, one case's exception recorded as
    `error_row(case, exc)` (one shot on the GPU: a failure is not fatal); OUT/STEM.json after each case, then
    OUT/STEM.md from `table(rows, meta)`. Returns 1 if any case failed."""
    rows = []
    for c in cases:
        if time.time() - t0 > budget_s:
            print(f"budget spent: stopped before {c['name']}", flush=True)
            break
        try:
            row = run(c)
        except Exception as exc:
            row = error_row(c, exc)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        rows.append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
        meta["seconds"] = time.time() - t0
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    (out / f"{stem}.md").write_text(table([r for r in rows if "error" not in r], meta)
                                    + "".join(f"\nerror in {r['case']}: {r['error']}\n" for r in rows if "error" in r))
    print((out / f"{stem}.md").read_text())
    return 1 if any("error" in r for r in rows) else 0


def _flashinfer_version() -> str | None:
    try:
        import flashinfer
    except Exception as exc:  # not installed, or its import fails here: the column is skipped
        print(f"flashinfer unavailable: {exc!r}", flush=True)
        return None
    return getattr(flashinfer, "__version__", "?")


def _time_flashinfer(data: Data, timer: Timer, new_out: torch.Tensor, row: dict) -> None:
    """FlashInfer's time (graphed; events where its capture fails) and its largest difference from ours."""
    for graph in (True, False):
        try:
            fn, out = data.flashinfer(graph)
            t = timer.graphed(fn) if graph else timer.events(fn)
        except Exception as exc:  # recorded, then the other way is tried
            row[f"fi_error_{'graph' if graph else 'events'}"] = repr(exc)[:300]
            torch.cuda.synchronize()
            continue
        row.update(fi_us=t * 1e6, fi_timing="graph" if graph else "events",
                   fi_maxdiff=float((out.float() - new_out[:data.B].float()).abs().max()))
        return


def run_case(c: dict, dev: torch.device, timer: Timer | None, bw: float, fi: dict, budget_s: float,
             t0: float) -> dict:
    """One case: new and old kernels (checked against each other), their times, FlashInfer's where it runs."""
    data = Data(c, dev)
    row = dict(cls=c["cls"], case=c["name"], B=data.B, Bp=data.Bp, hq=data.hq, hkv=data.hkv, d=data.d,
               page=data.page, dtype=c["dtype"], mb=data.bytes / 1e6)
    new_fn, new_out, info = data.new()
    old_fn, old_out, old_info = data.prev()
    row.update(info, old=old_info)
    new_fn()
    old_fn()                                   # both store the same new tokens: the pools end the same
    row["new_vs_old_maxdiff"] = float((new_out[:data.B].float() - old_out[:data.B].float()).abs().max())
    if timer is None:                          # the CPU dry run
        return row
    for name, fn in (("new", new_fn), ("old", old_fn)):
        t = timer.graphed(fn)
        row[f"{name}_us"], row[f"{name}_bw"] = t * 1e6, data.bytes / t / bw
    key = (c["dtype"], c["d"])
    if fi.get("version") and (key in fi["compiled"] or time.time() - t0 < budget_s / 2):
        _time_flashinfer(data, timer, new_out, row)
        fi["compiled"].add(key)
    elif fi.get("version"):
        row["fi_skipped"] = "budget: a new FlashInfer JIT compile past half the budget"
    return row


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# Decode classes: {meta.get('gpu', '?')}, torch {meta['torch']}, triton {meta['triton']}, FlashInfer "
             f"{meta.get('flashinfer')}, copy {meta.get('copy_gbps', 0):.0f} GB/s", "",
             "new = work-list kernel as the cache sizes it, old = the same kernel as the cache sized it before "
             "2026-12-03b (3 CTAs per SM, 128-key tiles beyond 4 splits), both storing the new token's K/V; "
             "FlashInfer = its decode wrapper's run (tensor cores). Device time per call, L2 flushed, "
             "median. Padded batch Bp as the cache's CUDA graphs.", "",
             "| class | case | B | MB read | new µs | % copy BW | old µs | old % BW | new / old | FlashInfer µs | "
             "new / FI | items (split rows) | new vs old max diff |", "|" + "---|" * 13]
    for r in rows:
        if "new_us" not in r:
            lines.append(f"| {r['cls']} | {r['case']} | {r['B']} | {r['mb']:.1f} | " + "- | " * 7
                         + f"{r.get('items')} ({r.get('split_rows')}) | {r.get('new_vs_old_maxdiff', '-')} |")
            continue
        fi = r.get("fi_us")
        lines.append(
            f"| {r['cls']} | {r['case']} | {r['B']} | {r['mb']:.1f} | {r['new_us']:.1f} | {100 * r['new_bw']:.0f}% | "
            f"{r['old_us']:.1f} | {100 * r['old_bw']:.0f}% | {r['new_us'] / r['old_us']:.2f} | "
            + (f"{fi:.1f} | {r['new_us'] / fi:.2f} | " if fi else "- | - | ")
            + f"{r['items']} ({r['split_rows']}) | {r['new_vs_old_maxdiff']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=180, help="no new case starts past this many seconds")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU's Triton interpreter")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dry = args.cpu_dry_run
    dev = torch.device("cpu" if dry else "cuda")
    meta = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=td.triton.__version__, dry_run=dry)
    timer, bw, fi = None, 1.0, dict(compiled=set())
    if not dry:
        timer = Timer(dev)
        bw = copy_bandwidth(dev)
        fi["version"] = _flashinfer_version()
        meta.update(gpu=torch.cuda.get_device_name(dev), copy_gbps=bw / 1e9, flashinfer=fi["version"],
                    sms=torch.cuda.get_device_properties(dev).multi_processor_count)
    return run_cases(cases(), lambda c: run_case(shrink(c) if dry else c, dev, timer, bw, fi, args.budget_s, t0),
                     lambda c, exc: dict(cls=c["cls"], case=c["name"], B=len(c["lens"]), mb=0.0,
                                         error=repr(exc)[:500]),
                     args.out, "decode_classes", meta, table, args.budget_s, t0, dev)


if __name__ == "__main__":
    sys.exit(main())
