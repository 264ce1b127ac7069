"""Issue 19's sweeps on one GPU: how the decode work list's slice length and launch options, and the mixed kernel's
chunk-tile size and options, move device time, each case next to the rule the cache uses now and FlashInfer, in
the same run. The data behind the sizing rules (not a benchmark of record: gpu_decode_classes / gpu_mixed_steps).

    python scripts/gpu_sweep19.py OUT [--budget-s 240] [--cpu-dry-run] [--only decode|mixed|sizing]
                                      [--cases NAME,NAME] [--no-flashinfer]

decode  per case of gpu_decode_classes (few rows, uniform, MQA, groups, skewed): the work list at forced slice
        lengths (the longest row in k = 1..64 slices) x launch options (key tile 128 / 64 / 32, stages 3 / 2),
        against `rule` (what `triton_decode.plan` picks) and FlashInfer's decode wrapper. Reported per point:
        items, CTAs (items x kv heads), CTAs per resident slot (waves, from the shared memory a CTA takes) and
        device time.
mixed   per headline case of gpu_mixed_steps: tiles of 16 / 32 / 64 queries x options (key tile, warps, stages,
        persistent CTAs per SM), against `rule` (the cache's own plan) and FlashInfer's prefill wrapper.
Timing: gpu_decode_classes.Timer (CUDA-graphed, L2 flushed, median). Every point's output is compared with the
rule's (max abs difference in the JSON): a configuration that computes something else is not a data point.
sizing  every case of the decode-classes grid under each SIZINGS rule (key tile x CTAs per SM the work list aims
        at), in one run, outputs cross-checked (the data behind `triton_sizing.worklist_options`).
Writes OUT/sweep19.json after each case and OUT/sweep19.md (the best point per case beside rule and FlashInfer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gpu_decode_classes as gdc   # this script's folder is on sys.path
import gpu_mixed_steps as gms
from paged import triton_decode as td
from paged.kernels import triton_mixed as tm
from paged.kernels.triton_sizing import _next_pow2

DECODE_CASES = ["u8x16384-P64", "B1x32768", "B8x4096-P16", "B3x8192", "mqa-32x1-B8x8192", "u32x4096-P64",
                "g6-12x2-B32x8192", "3rows-17..9000-P16", "mix-B8-256..65536", "g7-28x4-B16-mix-P16",
                "mqa-71x1-D64-B8-mix", "u128x4096-P64", "30k+47x256-P64"]
#: (key tile, warps, stages) of the decode sweep
DECODE_OPTIONS = [(128, 4, 3), (64, 4, 3), (64, 4, 2), (32, 4, 3)]
SLICES = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64]
MIXED_CASES = ["16x(chunk128+h1..8k)", "fresh2048,16dec", "chunk512+h4k,31dec", "chunk2048+h4k,63dec"]
#: (queries per tile, key tile, warps, stages, persistent CTAs per SM) of the mixed sweep
MIXED_OPTIONS = [(16, 64, 4, 3, 3), (16, 64, 4, 3, 2), (16, 64, 4, 2, 3), (16, 32, 4, 3, 3), (16, 64, 8, 3, 2),
                 (32, 64, 8, 3, 1), (32, 64, 8, 2, 2), (32, 32, 8, 3, 2), (32, 64, 4, 2, 2), (32, 128, 8, 2, 1),
                 (64, 64, 8, 2, 1), (64, 32, 8, 3, 2)]
SMEM_PER_SM = 228 * 1024


def resident(bn: int, stages: int, d: int, itemsize: int, block_m: int) -> int:
    """CTAs per SM that the shared memory admits (K and V stages + the query tile); registers not counted."""
    per_cta = stages * bn * 2 * _next_pow2(max(d, 16)) * itemsize + block_m * _next_pow2(max(d, 16)) * itemsize
    return max(1, SMEM_PER_SM // (per_cta + 1024))


def decode_case(c: dict, dev: torch.device, timer, dry: bool, t_end: float, no_fi: bool = False) -> dict:
    data = gdc.Data(gdc.shrink(c) if dry else c, dev)
    rule_fn, rule_out, info = data.new()
    rule_fn()
    row = dict(kind="decode", case=c["name"], B=data.B, hq=data.hq, hkv=data.hkv, d=data.d, mb=data.bytes / 1e6,
               rule=dict(info, options=data.opts), points=[])
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    if timer is not None:
        row["rule"]["us"] = timer.graphed(rule_fn) * 1e6
        if not no_fi:
            gdc._time_flashinfer(data, timer, rule_out, row)
    longest, group = int(data.lens.max()), data.hq // data.hkv
    least_items = td.max_items(data.Bp, data.hkv, dev)         # the bucket's M: unused items cost as in the cache
    for bn, warps, stages in (DECODE_OPTIONS[:2] if dry else DECODE_OPTIONS):
        slots = sms * resident(bn, stages, data.d, data.dtype.itemsize, max(16, _next_pow2(group)))
        seen = set()
        for k in (SLICES[:2] if dry else SLICES):
            chunk = max(-(-longest // (k * bn)) * bn, td.min_slice_keys(bn))
            if chunk in seen or time.time() > t_end:
                continue
            seen.add(chunk)
            M = max(least_items, int(((data.lens + chunk - 1) // chunk).sum()))
            fn, out, info = data.worklist(dict(block_n=bn, num_warps=warps, num_stages=stages), 1, M, chunk,
                                          min_keys=bn, merge=False)
            fn()
            p = dict(bn=bn, warps=warps, stages=stages, k=k, chunk=info["slice_keys"], items=info["items"],
                     ctas=info["items"] * data.hkv, waves=info["items"] * data.hkv / slots,
                     split_rows=info["split_rows"],
                     maxdiff=float((out[:data.B].float() - rule_out[:data.B].float()).abs().max()))
            if timer is not None:
                p["us"] = timer.graphed(fn) * 1e6
            row["points"].append(p)
    return row


#: (key tile, CTAs per SM the work list aims at) of the sizing sweep (--sizing); 0: `launch_options`' key tile
SIZINGS = [(0, 3), (64, 4), (64, 3), (64, 2), (128, 2), (64, 6), (128, 4)]


def sizing_case(c: dict, dev: torch.device, timer, dry: bool, t_end: float, no_fi: bool = True) -> dict:
    """One decode case under every SIZINGS rule: the work list at target ceil(CTAs per SM x SMs / Hkv) items with
    that key tile (3 stages, 4 warps; the tile halved until the stages fit, as the cache does)."""
    data = gdc.Data(gdc.shrink(c) if dry else c, dev)
    row = dict(kind="sizing", case=c["name"], B=data.B, Bp=data.Bp, hq=data.hq, hkv=data.hkv, d=data.d,
               mb=data.bytes / 1e6, points=[], rule={})
    sms = td._sm_count(dev)
    M = td.max_items(data.Bp, data.hkv, dev) + math.ceil(8 * sms / data.hkv)   # room for 6 per SM and more
    ref = None
    for bn, per_sm in (SIZINGS[:2] if dry else SIZINGS):
        if time.time() > t_end:
            break
        o = td.launch_options(data.dtype, data.d, dev, data.Bp, data.hkv) if bn == 0 else \
            dict(td.launch_options(data.dtype, data.d, dev, None, data.hkv), block_n=min(bn, td.launch_options(
                data.dtype, data.d, dev, None, data.hkv)["block_n"]))
        fn, out, info = data.worklist(o, math.ceil(per_sm * sms / data.hkv), M)
        fn()
        ref = out[:data.B].float().clone() if ref is None else ref
        p = dict(bn=o["block_n"], per_sm=per_sm, rule_bn=bn, items=info["items"], chunk=info["slice_keys"],
                 ctas=info["items"] * data.hkv,
                 maxdiff=float((out[:data.B].float() - ref).abs().max()))
        if timer is not None:
            p["us"] = timer.graphed(fn) * 1e6
            p["bw"] = data.bytes / (p["us"] * 1e-6) / 1e9
        row["points"].append(p)
    return row


def mixed_case(c: dict, dev: torch.device, timer, dry: bool, t_end: float, no_fi: bool = False) -> dict:
    s = gms.Step(gms.shrink(c) if dry else c, dev)
    rule_fn = s.triton()
    rule_out = s.ragged(rule_fn())
    flops, moved = gms.figures(s_case := (gms.shrink(c) if dry else c))
    row = dict(kind="mixed", case=c["name"], gflop=flops / 1e9, points=[], rule={})
    if timer is not None:
        row["rule"]["us"] = timer.graphed(rule_fn) * 1e6
    if timer is not None and not no_fi:
        try:
            fi_fn, fi_out = s.flashinfer()
            row["fi_us"] = timer.graphed(fi_fn) * 1e6
            row["fi_maxdiff"] = float((fi_out.float() - rule_out).abs().max())
        except Exception as exc:  # recorded, the sweep goes on
            row["fi_error"] = repr(exc)[:300]
    cache, plan = s.cache, s.plan
    buf, h = plan.buffers, plan.buffers.packed.host_np
    B, L = len(s.lens), s.q.shape[1]
    hq, hkv, d = s_case["hq"], s_case["hkv"], s_case["d"]
    pools = cache._pools
    for tokens, bn, warps, stages, per_sm in (MIXED_OPTIONS[::3] if dry else MIXED_OPTIONS):
        if time.time() > t_end:
            break
        cols = tm.chunk_columns(B, _next_pow2(L), tokens)
        tiles, used = np.zeros((2, cols), np.int32), np.zeros(1, np.int32)
        tm.fill_tiles(h["q_start"][:B], h["q_len"][:B], tiles, used, cols, tokens)
        state = tm.launch_state(s.dtype, dev, hq, hkv, d, cache.spec.page_size, tokens,
                                dict(block_n=bn, num_warps=warps, num_stages=stages), per_sm)
        t_dev, u_dev = torch.from_numpy(tiles).to(dev), torch.from_numpy(used).to(dev)
        counter = torch.zeros(2, dtype=torch.int32, device=dev)
        out = torch.empty_like(s.q).contiguous()

        def fn(state=state, t_dev=t_dev, u_dev=u_dev, out=out, counter=counter):
            tm.launch(state, s.q, pools.k_layers[0], pools.v_layers[0], s.k, s.v, buf.page_table, buf.q_start,
                      buf.q_len, t_dev, u_dev, counter, d ** -0.5, out)
        p = dict(tokens=tokens, bn=bn, warps=warps, stages=stages, ctas_per_sm=per_sm, tiles=int(used[0]))
        try:
            fn()
            p["maxdiff"] = float((s.ragged(out) - rule_out).abs().max())
            if timer is not None:
                p["us"] = timer.graphed(fn) * 1e6
                p["tflops"] = flops / p["us"] / 1e6
        except Exception as exc:  # e.g. out of shared memory at these options
            p["error"] = repr(exc)[:200]
            if dev.type == "cuda":
                torch.cuda.synchronize()
        row["points"].append(p)
    return row


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"# Issue 19 sweeps: {meta.get('gpu', '?')}, torch {meta['torch']}, triton {meta['triton']}, "
             f"FlashInfer {meta.get('flashinfer')}", "",
             "Device time per call (CUDA-graphed, L2 flushed, median), µs. best = fastest swept point whose output "
             "matches the rule's.", "",
             "| kind | case | rule µs | FlashInfer µs | best µs | best / FI | best point |", "|" + "---|" * 7]
    for r in rows:
        ok = [p for p in r["points"] if "us" in p and p.get("maxdiff", 1) < 0.05]
        best = min(ok, key=lambda p: p["us"]) if ok else None
        fi, rule = r.get("fi_us"), r["rule"].get("us")
        cells = [r["kind"], r["case"], f"{rule:.1f}" if rule else "-", f"{fi:.1f}" if fi else "-"]
        if best:
            cells += [f"{best['us']:.1f}", f"{best['us'] / fi:.2f}" if fi else "-",
                      ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()
                                if k not in ("us", "maxdiff", "tflops"))]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=240, help="no new point starts past this many seconds")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU's Triton interpreter")
    ap.add_argument("--only", choices=["decode", "mixed", "sizing"])
    ap.add_argument("--cases", help="comma-separated case names (default: the lists above)")
    ap.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer (its JIT compiles take the budget)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0, dry = time.time(), args.cpu_dry_run
    dev = torch.device("cpu" if dry else "cuda")
    meta = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=td.triton.__version__, dry_run=dry)
    timer, fi = None, dict(compiled=set())
    if not dry:
        timer = gdc.Timer(dev)
        meta.update(gpu=torch.cuda.get_device_name(dev), flashinfer=gdc._flashinfer_version())
    by_name = {c["name"]: c for c in gdc.cases()}
    mixed_by_name = {c["name"]: c for c in gms.cases()}
    chosen = args.cases.split(",") if args.cases else None
    dec_names = [n for n in DECODE_CASES if n in chosen] if chosen else DECODE_CASES[:2] if dry else DECODE_CASES
    mix_names = [n for n in MIXED_CASES if n in chosen] if chosen else MIXED_CASES[:1] if dry else MIXED_CASES
    dec = [("decode", by_name[n]) for n in dec_names] if args.only not in ("mixed", "sizing") else []
    if args.only == "sizing":                                # every case of the decode-classes grid
        dec = [("sizing", c) for c in gdc.cases() if not chosen or c["name"] in chosen][:2 if dry else None]
    mix = [("mixed", mixed_by_name[n]) for n in mix_names] if args.only in (None, "mixed") else []
    fi["skip"] = args.no_flashinfer
    order = []                                              # decode and mixed cases alternate: neither is starved
    for i in range(max(len(dec), len(mix))):
        order += dec[i:i + 1] + mix[i:i + 1]
    share = args.budget_s / max(1, len(order))
    rows = []
    try:
        for kind, c in order:
            if time.time() - t0 > args.budget_s:
                print(f"budget spent: stopped before {c['name']}", flush=True)
                break
            t_end = min(time.time() + 2 * share, t0 + args.budget_s)
            try:
                case_fn = {"decode": decode_case, "mixed": mixed_case, "sizing": sizing_case}[kind]
                row = case_fn(c, dev, timer, dry, t_end, fi["skip"])
            except Exception as exc:  # one case's failure is recorded, not fatal
                row = dict(kind=kind, case=c["name"], error=repr(exc)[:500], points=[], rule={})
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "points"}), f"{len(row['points'])} points",
                  f"({time.time() - t0:.0f}s)", flush=True)
            meta["seconds"] = time.time() - t0
            (args.out / "sweep19.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    finally:  # the table of what ran, also when a time limit interrupts the run
        (args.out / "sweep19.md").write_text(table([r for r in rows if "error" not in r], meta))
        print((args.out / "sweep19.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
