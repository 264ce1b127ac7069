"""Sweep the Triton paged-decode kernel's launch options on one GPU: device time per call, from CUDA graphs.

    python scripts/triton_decode_sweep.py OUT [--budget-s 300] [--long | --tiles | --balance]

Cases follow issue 6's targets: bf16, 32 query heads over 8 (and 32) kv heads, head dim 128, pages 16 and 128,
batch 1/8/32/128, lengths uniform in [512, 4096) and [4096, 16384), pages placed at random in a pool twice the
live size. Stage 1 times every (block_n, num_warps, num_stages) at the shipped split count; stage 2 times split
counts (CTA target x SMs, min keys per split) at each case's best stage-1 options, for the batches that split.
Each timing: 20 kernel calls captured in one CUDA graph, replayed 5 times after a warm-up, median per call; the
K/V bytes read over that time against the card's copy bandwidth (a 1 GiB device-to-device copy).
--long instead times the long-context cases where the kernel trailed FlashInfer most (batch 32, every row 8192
or 32768 keys, pages 16 and 64): more pipeline stages and smaller tiles (LONG_CONFIGS) in stage 1, split counts
1-16 in stage 2. --tiles times 128- against 64-key tiles (TILE_CONFIGS) over batch 8-128 at 8192 keys per row, and
at random lengths in [4096, 16384), page 64, at the shipped split counts (no stage 2). --balance times the even
split (each row's keys over all of ceil(CTAS_PER_SM x SMs / (B x Hkv)) splits, what shipped before) against the
shipped balanced slices (`split_keys`) over mixed batches (lengths log-uniform over a range, both ends present).
Options are (splits, block_n, num_warps, num_stages, min_split_keys, balanced); every mode but --balance times
balanced slices, as the cache runs them.
Writes OUT/sweep.json (every timing) and OUT/sweep.md (best options per case). Stops a stage when the budget
is spent, keeping what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from conformance.benchmarks.grid import Ctx
from paged import triton_decode

HQ, D = 32, 128
CALLS, REPLAYS = 20, 5
CONFIGS = list(itertools.product((32, 64, 128), (4, 8), (2, 3)))          # block_n, num_warps, num_stages
SPLIT_TARGETS = (1, 2, 4)                                                  # CTAs aimed at, x SMs
MIN_KEYS = (128, 256, 512)
# --long: deeper pipelines with smaller tiles (shared memory: stages x block_n x 512 B of K + V <= 227 KB).
LONG_CONFIGS = [(128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 4, 5),
                (64, 8, 3), (64, 8, 4), (32, 4, 3), (32, 4, 4), (32, 4, 5)]
LONG_SPLITS = (1, 2, 4, 8, 16)
TILE_CONFIGS = [(128, 4, 3), (64, 4, 3), (64, 4, 4), (128, 8, 3)]


def cases() -> list[dict]:
    out = []
    for page, (lo, hi), batch in itertools.product((16, 128), ((512, 4096), (4096, 16384)), (1, 8, 32, 128)):
        out.append(dict(page=page, lo=lo, hi=hi, batch=batch, hkv=8))
    for page in (16, 128):
        out.append(dict(page=page, lo=512, hi=4096, batch=32, hkv=32))
    return out


def long_cases() -> list[dict]:
    return [dict(page=page, lo=n, hi=n + 1, batch=32, hkv=8) for page in (64, 16) for n in (32768, 8192)]


def tile_cases() -> list[dict]:
    return ([dict(page=64, lo=8192, hi=8193, batch=b, hkv=8) for b in (8, 16, 32, 64, 128)]
            + [dict(page=64, lo=4096, hi=16384, batch=b, hkv=8) for b in (32, 128)])


def balance_cases() -> list[dict]:
    mixed = [dict(page=64, lo=512, hi=4096, batch=b, hkv=8, mix=True) for b in (8, 32, 64, 128)]
    return mixed + [dict(page=64, lo=4096, hi=16384, batch=32, hkv=8, mix=True),
                    dict(page=64, lo=512, hi=4096, batch=32, hkv=8), dict(page=64, lo=8192, hi=8193, batch=32, hkv=8)]


def case_id(c: dict) -> str:
    return f"B{c['batch']}-{'mix' if c.get('mix') else 'u'}{c['lo']}-{c['hi']}-P{c['page']}-{HQ}x{c['hkv']}"


class Data:
    """One case's pool, page table, lengths and queries on the GPU."""

    def __init__(self, c: dict, dev: torch.device) -> None:
        gen = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
        page, B, hkv = c["page"], c["batch"], c["hkv"]
        if c.get("mix"):  # log-uniform over [lo, hi], both ends present: the benchmark grid's mixed batches
            self.lens = torch.tensor(Ctx("mix", c["lo"], c["hi"]).lengths(B, zlib.crc32(case_id(c).encode())))
        else:
            self.lens = torch.randint(c["lo"], c["hi"], (B,), generator=gen)             # (B,) keys per row
        need = [math.ceil(int(n) / page) for n in self.lens]
        num_pages = 2 * sum(need)
        width = math.ceil(c["hi"] / page)
        perm = torch.randperm(num_pages, generator=gen)
        table = torch.zeros(B, width, dtype=torch.int32)
        used = 0
        for b, k in enumerate(need):
            table[b, :k] = perm[used:used + k].int()
            used += k
        self.k = torch.randn(hkv, num_pages * page, D, device=dev, dtype=torch.bfloat16)
        self.v = torch.randn_like(self.k)
        self.q = torch.randn(B, HQ, D, device=dev, dtype=torch.bfloat16)
        self.table = table.to(dev)
        self.q_start = (self.lens - 1).int().to(dev)
        self.q_len = torch.ones(B, dtype=torch.int32, device=dev)
        self.bytes = int(self.lens.sum()) * hkv * D * 2 * 2                              # K + V read
        self.page, self.hkv, self.dev = page, hkv, dev
        self.keys: dict[int, torch.Tensor] = {}                                          # splits -> split_keys

    def call(self, splits: int, block_n: int, warps: int, stages: int, min_keys: int, balanced: bool = True):
        keys = None
        if balanced:  # made on the first (uncaptured) call: no host->device copy inside a CUDA graph capture
            if splits not in self.keys:
                self.keys[splits] = torch.tensor(
                    [triton_decode.split_keys(self.lens.tolist(), self.hkv, splits, self.dev)], device=self.dev)
            keys = self.keys[splits]
        return triton_decode.paged_decode(self.q, self.k, self.v, self.table, self.q_start, self.q_len, self.page,
                                          D ** -0.5, splits, block_n=block_n, min_split_keys=min_keys,
                                          num_warps=warps, num_stages=stages, split_keys=keys)


def device_time(fn) -> float:
    """Median device seconds per fn() call: CALLS calls in one CUDA graph, replayed REPLAYS times."""
    fn()                                                                                # compile
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / CALLS)
    return statistics.median(times)


def copy_bandwidth(dev) -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = device_time(lambda: y.copy_(x))
    return 2 * x.numel() / t


def splits_for(batch: int, hkv: int, target: int, min_keys: int, hi: int, sms: int) -> int:
    want = math.ceil(target * sms / (batch * hkv))
    return max(1, min(want, math.ceil(hi / min_keys), triton_decode.MAX_SPLITS))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--long", action="store_true", help="the long-context cases, deeper pipelines, splits 1-16")
    ap.add_argument("--tiles", action="store_true", help="128- vs 64-key tiles over batch 8-128")
    ap.add_argument("--balance", action="store_true", help="even splits vs balanced slices over mixed batches")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    t0 = time.time()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev)
    rows, best = [], {}
    for stage in (1, 2):
        for c in (long_cases() if args.long else tile_cases() if args.tiles else balance_cases() if args.balance
                  else cases()):
            if time.time() - t0 > args.budget_s * (0.6 if stage == 1 else 1.0):
                print(f"stage {stage}: budget spent at {case_id(c)}", flush=True)
                break
            data = Data(c, dev)
            splits = triton_decode.decode_splits(c["batch"], c["hkv"], c["hi"], dev)
            if args.balance:
                if stage == 2:
                    continue
                o = triton_decode.launch_options(torch.bfloat16, D, dev, c["batch"], c["hkv"])
                even = min(math.ceil(triton_decode.CTAS_PER_SM * sms / (c["batch"] * c["hkv"])),
                           math.ceil(c["hi"] / triton_decode.MIN_SPLIT_KEYS), triton_decode.MAX_SPLITS)
                min_keys = max(o["block_n"], triton_decode.MIN_SPLIT_KEYS)
                shipped = (o["block_n"], o["num_warps"], o["num_stages"], min_keys)
                trials = [(even, *shipped, False), (splits, *shipped, True)]
            elif stage == 1:
                configs = LONG_CONFIGS if args.long else TILE_CONFIGS if args.tiles else CONFIGS
                trials = [(splits, bn, w, s, max(bn, triton_decode.MIN_SPLIT_KEYS)) for bn, w, s in configs]
            elif args.tiles:
                continue
            elif args.long:
                if case_id(c) not in best:
                    continue
                _, bn, w, s, mk = best[case_id(c)]["options"]
                trials = [(n, bn, w, s, mk) for n in LONG_SPLITS]
            else:
                if case_id(c) not in best or c["batch"] * c["hkv"] > 2 * sms:
                    continue
                _, bn, w, s, _ = best[case_id(c)]["options"]
                trials = sorted({(splits_for(c["batch"], c["hkv"], t, mk, c["hi"], sms), bn, w, s, mk)
                                 for t, mk in itertools.product(SPLIT_TARGETS, MIN_KEYS) if mk % bn == 0})
            for opts in trials:
                try:
                    t = device_time(lambda: data.call(*opts))
                except Exception as exc:  # a config that does not compile (shared memory) is recorded, not fatal
                    rows.append(dict(case=case_id(c), stage=stage, options=opts, error=repr(exc)[:300]))
                    continue
                row = dict(case=case_id(c), stage=stage, options=opts, ms=t * 1e3, gbps=data.bytes / t / 1e9,
                           copy_fraction=data.bytes / t / bw)
                rows.append(row)
                if case_id(c) not in best or row["ms"] < best[case_id(c)]["ms"]:
                    best[case_id(c)] = row
            print(f"stage {stage} {case_id(c)}: best {best.get(case_id(c), {}).get('options')} "
                  f"{best.get(case_id(c), {}).get('ms', float('nan')):.4f} ms ({time.time() - t0:.0f}s)", flush=True)
            del data
            torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(dev), sms=sms, torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton_decode.triton.__version__, copy_gbps=bw / 1e9, seconds=time.time() - t0)
    (args.out / "sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    def shipped(r: dict) -> tuple:  # the launch options paged_decode picks by default for this row's batch
        b, hkv = (int(x) for x in (r["case"].split("-")[0][1:], r["case"].rsplit("x", 1)[1]))
        o = triton_decode.launch_options(torch.bfloat16, D, dev, b, hkv)
        return o["block_n"], o["num_warps"], o["num_stages"]

    default = {r["case"]: r for r in rows if r.get("stage") == 1 and "ms" in r and
               tuple(r["options"][1:4]) == shipped(r) and (len(r["options"]) < 6 or r["options"][5])}
    lines = [f"# Triton decode sweep: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, triton "
             f"{meta['triton']}, copy {meta['copy_gbps']:.0f} GB/s", "",
             "options = (splits, block_n, num_warps, num_stages, min_split_keys, balanced); device time per call, CUDA "
             "graphs",
             "", "| case | best options | best ms | best % copy BW | shipped options | shipped ms |",
             "|---|---|---|---|---|---|"]
    for cid, r in best.items():
        d = default.get(cid)
        lines.append(f"| {cid} | {r['options']} | {r['ms']:.4f} | {100 * r['copy_fraction']:.0f}% | "
                     + (f"{tuple(d['options'][1:4])} | {d['ms']:.4f} |" if d else "- | - |"))
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
