"""Inference benchmark of an FMS Llama: FMS's default cache, the paged op, and no cache, side by side.

    python -m paged.fms.bench --size micro --device cpu --batches 1,4 --seq-lens 64,256 --out bench_out/micro
    python -m paged.fms.bench --size 7b --device cuda --dtype bf16 --batches 1,8,32 --seq-lens 128,512,2048
    python -m paged.fms.bench --replot DIR          # rewrite DIR/results.md and the plots from DIR/results.json

A random-weight Llama built from FMS's own ``LLaMA``/``LLaMAConfig`` (``--size``: micro = FMS's llama
"micro" shape; tiny; 1b = Llama-3.2-1B-shaped; 7b = FMS's default ``LLaMAConfig()``, the Llama-2-7B shape) runs
through FMS's own ``fms.utils.generation.generate`` loop in three modes that differ only in attention and cache:

* ``sdpa``: FMS's default path, ``use_cache=True``: the "sdpa_causal" op and FMS's contiguous cache, which
  grows by ``torch.cat`` every step (a copy of the whole cache per layer per step).
* ``paged``: the ``pagetable_flex`` op (:mod:`paged.fms.op`) on a :class:`paged.PagedKVCache`, driven as
  :func:`paged.fms.generate.prepare_fms_generate` documents (the op's ``update_attn_kwargs`` plans every
  decode step inside FMS's loop). That the op really ran is checked, not assumed: every call of the cache's
  ``run`` (which the op's compute calls, once per layer per forward) is counted, and after each generate the
  calls must be ``layers x forwards`` and the cache must hold exactly ``batch x (prompt + new - 1)`` tokens;
  the op registered under that name must be ``paged.fms.op``'s. The result is in each run's ``paged_op``.
* ``nocache``: ``use_cache=False``: FMS re-feeds the whole sequence every step (the quadratic cost).

Per (mode, batch, prompt length): an untimed warm-up generate with the same shapes (this is where compiled
FlexAttention compiles; the pool is sized per configuration, so a configuration's shapes never change), then
``--repeats`` timed generates. A step is timed from one step's end to the next (``synchronize`` + a
``perf_counter`` stamp in FMS's ``post_iteration_hook``), so it covers the whole decode iteration: planning,
the forward, argmax and FMS's loop bookkeeping. Reported: the median (and p10/p90) decode step, i.e. the
per-token latency at that context, tokens/s = batch / median step, prefill time, graphs compiled during the
timed runs (must be 0), the peak memory of the decode phase (``torch.cuda.max_memory_allocated``, reset after
the prefill) and the K/V bytes each cache holds (``PagedKVCache.memory()`` / the contiguous cache's tensors).

Before anything is timed the greedy tokens of the three modes are compared on a short prefix (the shapes of
the first configuration, so no extra compile): fp32 must give identical tokens; bf16/fp16 may differ only at a
near-tie of a float64 (CPU) / float32 (GPU) copy of the model, and the logits of each mode must be within
``conformance.policy``'s ``FUDGE x`` (FMS default path's error) + ``FLOOR`` of that reference.

Writes ``results.json`` (after every run, so a cut-off run leaves what it measured), ``results.md`` and
``latency_vs_seq.png``, ``throughput_vs_batch.png``, ``memory.png`` under ``--out``. Exit status 0 when every
check held and no run failed, 1 otherwise (results are written either way), 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from conformance.benchmarks.harness import BenchSettings, copy_bandwidth, sync, unique_graphs

MODES = ("sdpa", "paged", "nocache")
MODE_LABELS = {"sdpa": "FMS default (sdpa, contiguous cache)", "paged": "paged (pagetable_flex)",
               "nocache": "no cache (recompute)"}

#: Model shapes (FMS LLaMAConfig fields). micro is FMS's registered llama "micro" shape; 7b is LLaMAConfig()'s
#: defaults (emb 4096, 32 heads, 32 layers, FFN 11008, vocab 32000: the Llama-2-7B shape).
SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(emb_dim=192, nheads=4, kvheads=0, nlayers=5, src_vocab_size=256),
    "tiny": dict(emb_dim=512, nheads=8, kvheads=2, nlayers=8, src_vocab_size=8192),
    "1b": dict(emb_dim=2048, nheads=32, kvheads=8, nlayers=16, src_vocab_size=128256, hidden_grow_factor=4.0,
               multiple_of=256, rope_theta=500_000.0, tie_heads=True),
    "7b": dict(),
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# Near-tie floor for greedy picks (as tests/fms/test_fms_generate.py): fp32 must match exactly.
TIE = {torch.float32: 0.0, torch.bfloat16: 0.1, torch.float16: 0.02}


# ============================================================================================ arguments
def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m paged.fms.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="micro", help="model shape (random weights)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batches", type=_ints, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32")
    p.add_argument("--seq-lens", type=_ints, default=[128, 512, 2048], help="prompt lengths, e.g. 128,512,2048")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="tokens generated per timed run (the first comes from the prefill: N-1 decode steps timed)")
    p.add_argument("--nocache-tokens", type=int, default=4, help="new tokens per timed run of the no-cache mode")
    p.add_argument("--warmup-tokens", type=int, default=2, help="new tokens of the untimed warm-up run (>= 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (steps pooled)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention", choices=("compiled", "eager"), default="compiled",
                   help="paged FlexAttention: compiled (the real thing) or eager (CPU smoke tests only)")
    p.add_argument("--kernel-options", default=None, help='JSON for compiled flex, e.g. \'{"num_stages": 3, "num_warps": 4}\'')
    p.add_argument("--agree-tokens", type=int, default=8, help="greedy tokens compared before timing")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; runs that would start later are recorded as skipped (0: no limit)")
    p.add_argument("--out", default=None, help="output directory (default bench_out/fms-SIZE-DEVICE)")
    p.add_argument("--replot", metavar="DIR", default=None, help="only rewrite DIR's results.md and plots")
    return p


# ============================================================================================ environment
def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        # The code that runs (new files included): changes elsewhere in the tree do not matter here.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "paged", "conformance"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()),
                    "changed": dirty.stdout.split("\n")[:20] if dirty.stdout.strip() else []}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, copy_gbps: float | None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ibm_fms": ver("ibm-fms"),
        "triton": ver("triton") or ver("pytorch-triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git": _git(),
        "copy_gbps": round(copy_gbps, 1) if copy_gbps else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, card_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["card"] = None
    return env


# ============================================================================================ model
def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int, max_len: int) -> torch.nn.Module:
    """A seeded random-weight FMS LLaMA of the given shape, built on the meta device and initialised in place.

    ``reset_parameters`` draws every parameter (on `device`, so a 7B model initialises in seconds on a GPU);
    RoPE tables cover at least `max_len` positions.
    """
    from fms.models.llama import LLaMA, LLaMAConfig

    fields = dict(SIZES[size])
    fields["max_expected_seq_len"] = max(4096, max_len)
    config = LLaMAConfig(**fields)
    with torch.device("meta"):
        model = LLaMA(config)
    model = model.to_empty(device=device)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.reset_parameters()
    model = model.to(dtype)
    model.post_init()      # RoPE tables on the device; ties the head for tie_heads configs
    return model.eval()


def model_info(model: torch.nn.Module, size: str) -> dict:
    from paged.fms.generate import cache_spec_for

    cfg = model.config
    spec = cache_spec_for(model, token_budget=16, page_size=16)
    params = {id(p): p for p in model.parameters()}        # tied weights once
    return {
        "size": size,
        "config": {k: getattr(cfg, k) for k in ("emb_dim", "nheads", "kvheads", "nlayers", "src_vocab_size",
                                                 "hidden_grow_factor", "multiple_of", "rope_theta", "tie_heads",
                                                 "max_expected_seq_len")},
        "ffn_hidden": model.base_model.layers[0].ff_sub_layer.hidden_dim,
        "head_dim": spec.head_dim,
        "kv_heads": spec.num_kv_heads,
        "params": sum(p.numel() for p in params.values()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "kv_bytes_per_token": spec.bytes_per_token,
    }


# ============================================================================================ one generate
def _sync(device: torch.device) -> None:
    sync(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class _StepClock:
    """FMS ``post_iteration_hook``: a synchronised time stamp at the end of every generate step.

    After the first (prefill) step it records the prefill's peak memory and resets the peak, so the peak read
    after generate is that of the decode phase. At the last step (after its stamp, so untimed) it reads the
    K/V bytes the cache holds. Optionally keeps each step's float32 logits (agreement check only).
    """

    def __init__(self, device: torch.device, last_pos: int, keep_logits: bool = False) -> None:
        self.device, self.last_pos, self.keep_logits = device, last_pos, keep_logits
        self.stamps: list[float] = []
        self.logits: list[torch.Tensor] = []
        self.prefill_peak: int | None = None
        self.kv: dict | None = None

    def __call__(self, token_pos, logits, next_val, kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if self.keep_logits:
            self.logits.append(logits.float().cpu())
        if len(self.stamps) == 1 and self.device.type == "cuda":
            self.prefill_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if token_pos == self.last_pos:
            self.kv = _kv_held(kwargs)
        return next_val, kwargs


def _kv_held(kwargs: dict) -> dict:
    """K/V bytes the mode's cache holds now: paged (pages in use / pool) or FMS's contiguous tensors."""
    from paged.fms.op import STEP_KWARG

    step = kwargs.get(STEP_KWARG)
    if step is not None:
        mem = step.cache.memory()
        pool = step.cache.k_pool.nbytes + step.cache.v_pool.nbytes
        return {"kv_bytes_reserved": mem.bytes_reserved, "kv_bytes_allocated": pool,
                "kv_tokens_stored": mem.tokens_stored, "pages_in_use": mem.pages_in_use,
                "waste_slots": mem.waste_slots}
    past = kwargs.get("past_key_value_states") or []
    tensors = {id(t): t for layer in past if layer is not None for t in layer}
    nbytes = sum(t.nbytes for t in tensors.values())
    tokens = past[0][0].shape[2] * past[0][0].shape[0] if past and past[0] is not None else 0
    return {"kv_bytes_reserved": nbytes, "kv_bytes_allocated": nbytes, "kv_tokens_stored": tokens}


class _RunCounter:
    """Wraps one PagedKVCache's ``run`` (the call the op's compute makes per layer): calls and tokens.

    Also keeps the host time of every ``run`` and ``plan`` call (no synchronisation: on a GPU this is the time
    to enqueue the work, i.e. the op's per-step host cost).
    """

    def __init__(self, cache) -> None:
        self.cache, self.inner, self.inner_plan = cache, cache.run, cache.plan
        self.reset()
        cache.run = self
        cache.plan = self._plan

    def __call__(self, layer, q, k, v, **kw):
        self.calls += 1
        self.tokens += sum(self.cache._plan.q_lens) if self.cache._plan is not None else 0
        t = time.perf_counter()
        out = self.inner(layer, q, k, v, **kw)
        self.run_s.append(time.perf_counter() - t)
        return out

    def _plan(self, *args, **kw):
        t = time.perf_counter()
        out = self.inner_plan(*args, **kw)
        self.plan_s.append(time.perf_counter() - t)
        return out

    def reset(self) -> None:
        self.calls = self.tokens = 0
        self.run_s: list[float] = []
        self.plan_s: list[float] = []


@dataclass
class Ctx:
    """What every run shares."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    nlayers: int
    vocab: int
    page_size: int
    attention: str
    kernel_options: dict | None
    pool_extra: int                     # new tokens the pool must hold beyond the prompt (max over runs)
    baseline_bytes: int | None = None   # allocated after the model was built (weights, RoPE tables): peaks are above it
    caches: dict = field(default_factory=dict)

    def paged_cache(self, batch: int, prompt: int):
        """The configuration's cache (same spec -> same compiled graphs): pool = batch x longest sequence."""
        from paged.cache import PagedKVCache
        from paged.fms.generate import cache_spec_for

        key = (batch, prompt)
        if key not in self.caches:
            self.caches.clear()                                   # one configuration's pool alive at a time
            per_seq = math.ceil((prompt + self.pool_extra - 1) / self.page_size) * self.page_size
            spec = cache_spec_for(self.model, token_budget=batch * per_seq, page_size=self.page_size,
                                  max_seq_len=per_seq, dtype=self.dtype, device=self.device)
            cache = PagedKVCache(spec, attention=self.attention, kernel_options=self.kernel_options)
            self.caches[key] = (cache, _RunCounter(cache))
        return self.caches[key]


def prompts_for(ctx: Ctx, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + length)
    return torch.randint(1, ctx.vocab, (batch, length), generator=g)


def generate_once(ctx: Ctx, mode: str, prompts: torch.Tensor, new_tokens: int, *, keep_logits: bool = False) -> dict:
    """One FMS ``generate()`` of `new_tokens` greedy tokens in `mode`; step stamps, tokens, memory, op checks."""
    from fms.modules.attention import get_attention_type
    from fms.utils.generation import generate

    from paged.fms import op as paged_op
    from paged.fms.generate import prepare_fms_generate

    device, (B, L) = ctx.device, tuple(prompts.shape)
    ids = prompts.to(device)
    clock = _StepClock(device, L + new_tokens - 1, keep_logits)
    seq_ids, counter, cache = [], None, None
    _sync(device)
    t0 = time.perf_counter()
    if mode == "paged":
        cache, counter = ctx.paged_cache(B, L)
        counter.reset()
        ids, extra, seq_ids = prepare_fms_generate(ctx.model, cache, prompts.tolist())
        use_cache = True
    else:
        extra = {"position_ids": torch.arange(L, device=device).expand(B, L)}
        use_cache = mode == "sdpa"
    extra["last_n_tokens"] = 1
    try:
        with torch.no_grad():
            out = generate(ctx.model, ids, max_seq_len=L + new_tokens, max_new_tokens=new_tokens, do_sample=False,
                           use_cache=use_cache, extra_kwargs=extra, post_iteration_hook=clock)
        result = {"t0": t0, "stamps": clock.stamps, "tokens": out[:, L:].cpu(), "logits": clock.logits,
                  "prefill_peak": clock.prefill_peak, "decode_peak": _peak(device), "kv": clock.kv or {}}
        if mode == "paged":
            mem = cache.memory()
            expected_tokens = B * (L + new_tokens - 1)          # the last new token is never fed back
            expected_calls = ctx.nlayers * new_tokens            # one forward per new token, every layer
            registered = get_attention_type(attn_name=paged_op.OP_NAME)["compute_prefill"]
            check = {
                "cache_run_calls": counter.calls, "expected_calls": expected_calls,
                "tokens_through_op_per_layer": counter.tokens / ctx.nlayers if ctx.nlayers else 0,
                "tokens_stored": mem.tokens_stored, "expected_tokens": expected_tokens,
                "live_sequences": mem.live_sequences,
                "registered_compute_is_paged_op": registered is paged_op._compute_op,
                # host time (no sync), decode steps only: the prefill is the first plan and first layer calls
                "plan_host_ms_median": statistics.median(counter.plan_s[1:]) * 1e3 if len(counter.plan_s) > 1 else None,
                "run_host_ms_median": (statistics.median(counter.run_s[ctx.nlayers:]) * 1e3
                                       if len(counter.run_s) > ctx.nlayers else None),
            }
            check["ok"] = bool(counter.calls == expected_calls and mem.tokens_stored == expected_tokens
                               and counter.tokens == ctx.nlayers * expected_tokens and mem.live_sequences == B
                               and check["registered_compute_is_paged_op"])
            result["paged_op"] = check
        return result
    finally:
        if cache is not None:
            for s in seq_ids:
                if s in cache:
                    cache.finish(s)


# ============================================================================================ agreement
def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)


def check_agreement(ctx: Ctx, modes: Sequence[str], batch: int, prompt_len: int, n: int, seed: int) -> dict:
    """Greedy tokens and logits of every mode against FMS's default path and a higher-precision copy.

    The reference ("gold") is the same weights in float64 on the CPU run / float32 on a GPU run, teacher-forced
    on the default path's tokens. Per row, tokens are compared up to the first difference; a difference is
    accepted only for bf16/fp16 and only where the gold's logits of the two picks are within
    max(TIE, 2 x (both modes' logit errors at that step)) (a flip needs at least that much error). Logits over
    the common prefix must be within FUDGE x the default path's error + FLOOR x scale (conformance.policy).
    """
    from conformance.policy import FLOOR, FUDGE

    prompts = prompts_for(ctx, batch, prompt_len, seed + 7)
    runs = {m: generate_once(ctx, m, prompts, n, keep_logits=True) for m in modes}
    ref_mode = "sdpa" if "sdpa" in runs else next(iter(runs))
    ref = runs[ref_mode]
    ref_tokens = ref["tokens"].tolist()

    gold_dtype = torch.float64 if ctx.device.type == "cpu" else torch.float32
    gold_model = copy.deepcopy(ctx.model).to(gold_dtype)
    gold_model.post_init()
    seq = torch.cat([prompts, ref["tokens"][:, :-1]], dim=1).to(ctx.device)
    with torch.no_grad():
        gold, _ = gold_model(seq, position_ids=torch.arange(seq.shape[1], device=ctx.device).expand_as(seq),
                             use_cache=True, last_n_tokens=n)
    gold = gold.double().cpu()                                             # (B, n, V): the logits of each pick
    del gold_model
    _free(ctx.device)

    def logits_of(run):
        return torch.stack(run["logits"], dim=1).double()                  # (B, n, V)

    ref_logits = logits_of(ref)
    scale = max(1.0, float(gold.abs().max()))
    report = {"reference_mode": ref_mode, "gold_dtype": str(gold_dtype).replace("torch.", ""),
              "dtype": str(ctx.dtype).replace("torch.", ""), "batch": batch, "prompt_len": prompt_len,
              "new_tokens": n, "tokens": {m: r["tokens"].tolist() for m, r in runs.items()}, "modes": {}}
    for mode, run in runs.items():
        toks, lg = run["tokens"].tolist(), logits_of(run)
        rows, ok = [], True
        for b in range(batch):
            t = _first_diff(toks[b], ref_tokens[b])
            upto = n if t is None else t + 1
            err_t = float((lg[b, :upto] - gold[b, :upto]).abs().max())
            ref_err = float((ref_logits[b, :upto] - gold[b, :upto]).abs().max())
            bound = FUDGE * ref_err + FLOOR[ctx.dtype] * scale
            row = {"row": b, "first_diff": t, "logits_err": err_t, "ref_logits_err": ref_err, "bound": bound,
                   "logits_ok": err_t <= bound}
            if t is not None:
                a, r = toks[b][t], ref_tokens[b][t]
                gap = abs(float(gold[b, t, a] - gold[b, t, r]))
                step_err = float((lg[b, t] - gold[b, t]).abs().max()) + float((ref_logits[b, t] - gold[b, t]).abs().max())
                tol = 0.0 if ctx.dtype == torch.float32 else max(TIE[ctx.dtype], 2 * step_err)
                row.update(gold_gap=gap, tie_tolerance=tol, near_tie=gap <= tol)
            row["ok"] = row["logits_ok"] and (t is None or row["near_tie"])
            ok &= row["ok"]
            rows.append(row)
        report["modes"][mode] = {"identical": toks == ref_tokens, "ok": ok, "rows": rows}
    report["ok"] = all(v["ok"] for v in report["modes"].values())
    return report


# ============================================================================================ timing
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _limit_fallbacks() -> int:
    """Frames dynamo gave up on at its recompile limit (it then runs them eagerly, silently: a slow path)."""
    from torch._dynamo.utils import counters

    return sum(n for key, n in counters["unimplemented"].items() if "recompile" in key.lower() and "limit" in key.lower())


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def time_config(ctx: Ctx, mode: str, batch: int, prompt_len: int, new_tokens: int, warmup_tokens: int,
                repeats: int, seed: int, weights_bytes: int, copy_gbps: float | None, kv_per_token: int) -> dict:
    """Warm up, then time `repeats` generates of one (mode, batch, prompt length)."""
    prompts = prompts_for(ctx, batch, prompt_len, seed)
    rec: dict[str, Any] = {"mode": mode, "batch": batch, "seq_len": prompt_len, "new_tokens": new_tokens}
    _free(ctx.device)
    fallbacks = _limit_fallbacks()
    t = time.perf_counter()
    warm = generate_once(ctx, mode, prompts, warmup_tokens)
    rec["warmup_s"] = round(time.perf_counter() - t, 3)             # includes compiles
    checks = [warm["paged_op"]] if "paged_op" in warm else []
    del warm

    steps, prefill, peaks, prefill_peaks = [], [], [], []
    baseline = ctx.baseline_bytes
    graphs = unique_graphs()
    last = None
    for _ in range(repeats):
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        last = generate_once(ctx, mode, prompts, new_tokens)
        stamps = last["stamps"]
        prefill.append(stamps[0] - last["t0"])
        steps += [b - a for a, b in zip(stamps, stamps[1:])]
        peaks.append(last["decode_peak"])
        prefill_peaks.append(last["prefill_peak"])
        if "paged_op" in last:
            checks.append(last["paged_op"])
    rec["recompiles_timed"] = unique_graphs() - graphs
    rec["recompile_limit_fallbacks"] = _limit_fallbacks() - fallbacks
    med = statistics.median(steps)
    rec.update(
        decode_steps=len(steps), step_ms=[round(s * 1e3, 4) for s in steps],
        median_ms=med * 1e3, p10_ms=_percentile(steps, 0.1) * 1e3, p90_ms=_percentile(steps, 0.9) * 1e3,
        min_ms=min(steps) * 1e3, mean_ms=statistics.fmean(steps) * 1e3,
        tokens_per_s=batch / med, decode_tokens_per_s=batch * len(steps) / sum(steps),
        prefill_ms=statistics.median(prefill) * 1e3,
        decode_context=[prompt_len + 1, prompt_len + new_tokens - 1],
        weights_bytes=weights_bytes, baseline_bytes=baseline,
        peak_bytes_decode=max(peaks) if peaks[0] is not None else None,
        peak_bytes_prefill=max(prefill_peaks) if prefill_peaks[0] is not None else None,
        **{k: v for k, v in last["kv"].items()},
    )
    if mode == "nocache":
        rec.update(kv_bytes_reserved=0, kv_bytes_allocated=0, kv_tokens_stored=0)
    if rec["peak_bytes_decode"] is not None and baseline is not None:
        rec["peak_above_weights_decode"] = rec["peak_bytes_decode"] - baseline
    if mode != "nocache" and copy_gbps:
        # Bytes a decode step must read at least: every weight once + every sequence's K/V at the median context.
        ctx_len = prompt_len + new_tokens // 2
        need = weights_bytes + batch * ctx_len * kv_per_token
        rec["min_bytes_per_step"] = need
        rec["achieved_gbps"] = need / med / 1e9
        rec["copy_fraction"] = rec["achieved_gbps"] / copy_gbps
    if checks:
        rec["paged_op"] = {"ok": all(c["ok"] for c in checks), "runs_checked": len(checks), "last": checks[-1]}
        timed = checks[-repeats:]
        plans = [c["plan_host_ms_median"] for c in timed if c["plan_host_ms_median"] is not None]
        runs_ = [c["run_host_ms_median"] for c in timed if c["run_host_ms_median"] is not None]
        if plans and runs_:
            # The op's own host cost per decode step: one plan + one cache.run per layer (enqueue time on a GPU).
            rec["op_host_ms_per_step"] = statistics.median(plans) + ctx.nlayers * statistics.median(runs_)
            rec["plan_host_ms"] = statistics.median(plans)
    rec["status"] = "ok"
    return rec


# ============================================================================================ driver
def _plan_configs(batches, seq_lens) -> list[tuple[int, int]]:
    """(batch, prompt) ordered by cost, so that a time budget cuts the most expensive configurations."""
    return sorted(((b, s) for b in batches for s in seq_lens), key=lambda c: (c[0] * c[1], c[1]))


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> tuple[dict, Path]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    modes = [m for m in MODES if m in {x.strip() for x in args.modes.split(",")}]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    copy_gbps = copy_bandwidth(BenchSettings(device=device))
    _free(device)
    pool_extra = max(args.new_tokens, args.warmup_tokens)
    max_len = max(args.seq_lens) + max(pool_extra, args.nocache_tokens)
    model = build_model(args.size, device, dtype, args.seed, max_len)
    from paged.fms.op import attention_layers, bind

    bind(model)
    info = model_info(model, args.size)
    _free(device)
    ctx = Ctx(model, device, dtype, len(attention_layers(model)), model.config.src_vocab_size, args.page_size,
              args.attention, json.loads(args.kernel_options) if args.kernel_options else None, pool_extra,
              torch.cuda.memory_allocated(device) if device.type == "cuda" else None)

    results: dict[str, Any] = {
        "schema": "paged.fms.bench/1",
        "command": "python -m paged.fms.bench " + shlex.join(list(argv)),
        "argv": list(argv),
        "python_executable": sys.executable,
        "cwd": os.getcwd(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": environment(device, copy_gbps),
        "model": {**info, "dtype": str(dtype).replace("torch.", "")},
        "settings": {"modes": modes, "batches": args.batches, "seq_lens": args.seq_lens,
                     "new_tokens": args.new_tokens, "nocache_tokens": args.nocache_tokens,
                     "warmup_tokens": args.warmup_tokens, "repeats": args.repeats, "page_size": args.page_size,
                     "attention": args.attention, "kernel_options": ctx.kernel_options, "seed": args.seed,
                     "time_budget_s": args.time_budget, "pool": "per configuration: batch x ceil((prompt + "
                     f"{pool_extra} - 1) / page) pages",
                     "timing": ("per decode step: synchronize + perf_counter at the end of every FMS generate step "
                                "(post_iteration_hook); median over steps; warm-up generate (compiles) untimed")},
        "agreement": None,
        "runs": [],
    }
    _write(results, out)

    first_b, first_l = _plan_configs(args.batches, args.seq_lens)[0]
    n_agree = min(args.agree_tokens, pool_extra)
    print(f"[bench] {args.size} on {device} ({results['env'].get('card') or results['env']['cpu']}), {dtype}; "
          f"agreement: batch {first_b}, prompt {first_l}, {n_agree} tokens", flush=True)
    try:
        results["agreement"] = check_agreement(ctx, modes, first_b, first_l, n_agree, args.seed)
    except Exception as exc:                                         # recorded; the timings still run
        results["agreement"] = {"ok": False, "error": _err(exc)}
    ctx.caches.clear()
    _free(device)
    print(f"[bench] agreement ok={results['agreement']['ok']}", flush=True)
    _write(results, out)

    for batch, prompt_len in _plan_configs(args.batches, args.seq_lens):
        for mode in modes:
            n = args.nocache_tokens if mode == "nocache" else args.new_tokens
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                rec = {"mode": mode, "batch": batch, "seq_len": prompt_len, "status": "skipped",
                       "error": f"time budget {args.time_budget}s spent"}
            else:
                try:
                    rec = time_config(ctx, mode, batch, prompt_len, n, args.warmup_tokens, args.repeats, args.seed,
                                      info["weights_bytes"], copy_gbps, info["kv_bytes_per_token"])
                except torch.cuda.OutOfMemoryError as exc:
                    rec = {"mode": mode, "batch": batch, "seq_len": prompt_len, "status": "oom", "error": _err(exc)}
                except Exception as exc:
                    rec = {"mode": mode, "batch": batch, "seq_len": prompt_len, "status": "error", "error": _err(exc)}
                ctx.caches.clear()        # this run's pool must not count in the next run's peak
                _free(device)
            results["runs"].append(rec)
            print(f"[bench] {mode:8s} B={batch:<4d} L={prompt_len:<6d} " + (
                f"{rec['median_ms']:9.3f} ms/step {rec['tokens_per_s']:10.1f} tok/s"
                if rec["status"] == "ok" else rec["status"] + ": " + str(rec.get("error", ""))[:200]), flush=True)
            _write(results, out)

    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["checks"] = summarize_checks(results)
    _write(results, out)
    write_report(results, out)
    return results, out


def summarize_checks(results: dict) -> dict:
    runs = results["runs"]
    paged = [r for r in runs if r["mode"] == "paged" and r["status"] == "ok"]
    return {
        "paged_op_used": bool(paged) and all(r.get("paged_op", {}).get("ok") for r in paged),
        "paged_runs_checked": len(paged),
        "agreement_ok": bool(results.get("agreement") and results["agreement"].get("ok")),
        "no_recompiles_in_timed_runs": all(r.get("recompiles_timed", 0) == 0 for r in runs if r["status"] == "ok"),
        "no_recompile_limit_fallbacks": all(r.get("recompile_limit_fallbacks", 0) == 0 for r in runs),
        "complete": results.get("wall_s") is not None,
        "runs_ok": sum(r["status"] == "ok" for r in runs),
        "runs_failed": sum(r["status"] in ("error",) for r in runs),
        "runs_oom": sum(r["status"] == "oom" for r in runs),
        "runs_skipped": sum(r["status"] == "skipped" for r in runs),
    }


def _err(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return (f"{type(exc).__name__}: {exc}"[:1000] + "\n" + "".join(tb[-3:])[-2000:]).strip()


def _write(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")


# ============================================================================================ report
def _gib(x: float | None) -> str:
    return "" if x is None else f"{x / 2**30:.3f}"


def _mib(x: float | None) -> str:
    return "" if x is None else f"{x / 2**20:.1f}"


def write_report(results: dict, out: Path) -> None:
    """results.md and the three plots."""
    (out / "results.md").write_text(markdown(results))
    try:
        plots(results, out)
    except Exception as exc:                 # a plotting problem must not lose the measurements
        (out / "plots_error.txt").write_text(_err(exc))


def markdown(results: dict) -> str:
    env, model, st = results["env"], results["model"], results["settings"]
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    where = (f"{env['card']} ({env.get('card_memory_gib')} GiB, driver {env.get('driver')}), CUDA {env['cuda']}"
             if env["device"] == "cuda" else f"CPU: {env['cpu']}, {env.get('cpu_count')} cores, torch threads "
             f"{env['cpu_threads']}, load average at start {env.get('load_avg_at_start')}")
    cfg = model["config"]
    lines = [
        f"# FMS inference benchmark: {model['size']} on {env['device'].upper()}",
        "",
        f"- **Device**: {where}",
        f"- **Versions**: torch {env['torch']}, ibm-fms {env['ibm_fms']}, triton {env.get('triton')}, "
        f"python {env['python']}; repo {(env['git'] or {}).get('commit')} (uncommitted changes in paged/ or "
        f"conformance/: {(env['git'] or {}).get('dirty')})",
        f"- **Command**: `{results['command']}`",
        f"- **Model**: FMS LLaMA, random weights, {model['params'] / 1e6:.1f} M params, {model['dtype']}; emb "
        f"{cfg['emb_dim']}, {cfg['nheads']} heads ({model['kv_heads']} kv heads, head dim {model['head_dim']}), "
        f"{cfg['nlayers']} layers, FFN {model['ffn_hidden']}, vocab {cfg['src_vocab_size']}; K/V "
        f"{model['kv_bytes_per_token'] / 1024:.1f} KiB per token",
        f"- **Settings**: {st['new_tokens']} new tokens per timed run ({st['nocache_tokens']} without cache), "
        f"{st['repeats']} repeat(s), warm-up {st['warmup_tokens']} tokens, page {st['page_size']}, paged attention "
        f"{st['attention']}, kernel options {st['kernel_options']}; copy bandwidth {env.get('copy_gbps')} GB/s",
        f"- **Timing**: {st['timing']}",
        f"- **Started** {results['started_utc']}, wall {results.get('wall_s')} s",
        "",
    ]
    checks = results.get("checks") or summarize_checks(results)
    agree = results.get("agreement") or {}
    lines += ["## Checks", "",
              f"- paged op really used (cache.run calls = layers x forwards, tokens stored = batch x (prompt + new "
              f"- 1), registered op is paged.fms.op's): **{checks['paged_op_used']}** over "
              f"{checks['paged_runs_checked']} paged configuration(s)",
              f"- greedy tokens vs FMS default path: **{checks['agreement_ok']}**"]
    if "modes" in agree:
        for mode, v in agree["modes"].items():
            diffs = [r["first_diff"] for r in v["rows"] if r["first_diff"] is not None]
            errs = max(r["logits_err"] for r in v["rows"])
            lines.append(f"  - {mode}: identical {v['identical']}, ok {v['ok']}, first differences {diffs or 'none'}, "
                         f"max logit error vs {agree['gold_dtype']} {errs:.3g} (batch {agree['batch']}, prompt "
                         f"{agree['prompt_len']}, {agree['new_tokens']} tokens, {agree['dtype']})")
    elif agree.get("error"):
        lines.append(f"  - error: {agree['error'].splitlines()[0]}")
    lines += [f"- graphs compiled during timed runs: none = **{checks['no_recompiles_in_timed_runs']}**; dynamo never "
              f"hit its recompile limit (silent eager fallback): **{checks.get('no_recompile_limit_fallbacks')}**",
              f"- runs: {checks['runs_ok']} ok, {checks['runs_failed']} failed, {checks['runs_oom']} out of memory, "
              f"{checks['runs_skipped']} skipped"]
    if not checks.get("complete", True):
        lines.append("- **INCOMPLETE**: the process ended before its last configuration (report rebuilt with --replot)")
    lines.append("")

    modes = [m for m in st["modes"] if any(r["mode"] == m for r in runs)]
    by = {(r["mode"], r["batch"], r["seq_len"]): r for r in runs}
    keys = sorted({(r["batch"], r["seq_len"]) for r in runs})
    extra = (["paged / sdpa"] if {"paged", "sdpa"} <= set(modes) else []) + \
        (["paged op host ms/step"] if "paged" in modes else [])
    lines += ["## Decode step latency (ms per step = per token of each sequence; median, [p10, p90])", "",
              "| batch | prompt | " + " | ".join(modes + extra) + " |", "|---|---|" + "---|" * len(modes + extra)]
    for b, s in keys:
        cells = []
        for m in modes:
            r = by.get((m, b, s))
            cells.append(f"{r['median_ms']:.3f} [{r['p10_ms']:.3f}, {r['p90_ms']:.3f}]" if r else "")
        if "paged / sdpa" in extra:
            both = ("paged", b, s) in by and ("sdpa", b, s) in by
            cells.append(f"{by[('paged', b, s)]['median_ms'] / by[('sdpa', b, s)]['median_ms']:.2f}x" if both else "")
        if "paged op host ms/step" in extra:
            host = by.get(("paged", b, s), {}).get("op_host_ms_per_step")
            cells.append(f"{host:.3f}" if host is not None else "")
        lines.append(f"| {b} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "paged op host ms/step: host time of one `plan` plus one `cache.run` per layer (no synchronisation; "
              "on a GPU, the time to enqueue the op's work; on the CPU, its whole cost), median over decode steps.", ""]
    gpu = env["device"] == "cuda"
    cached = [m for m in modes if m != "nocache"]
    bw = [f"{m} % of copy BW" for m in cached] if gpu else []
    lines += ["## Throughput (tokens/s = batch / median step) and prefill", "",
              "| batch | prompt | " + " | ".join([f"{m} tok/s" for m in modes] + [f"{m} prefill ms" for m in modes] + bw)
              + " |", "|---|---|" + "---|" * (2 * len(modes) + len(bw))]
    for b, s in keys:
        tp = [f"{by[(m, b, s)]['tokens_per_s']:.1f}" if (m, b, s) in by else "" for m in modes]
        pf = [f"{by[(m, b, s)]['prefill_ms']:.1f}" if (m, b, s) in by else "" for m in modes]
        fr = [f"{100 * by[(m, b, s)]['copy_fraction']:.0f}%" if by.get((m, b, s), {}).get("copy_fraction") else ""
              for m in cached] if gpu else []
        lines.append(f"| {b} | {s} | " + " | ".join(tp + pf + fr) + " |")
    if gpu:
        lines += ["", "% of copy BW: (weights + every sequence's K/V) bytes per median step, over the card's measured "
                  "device-to-device copy bandwidth: how close a decode step is to the memory-bound floor."]
    lines += ["", "## Memory (MiB)" + (": K/V held at the end of the timed run; peak allocated during decode (after "
                                       "the prefill) minus what was allocated once the model was built (weights)"
                                       if gpu else
                                       ": K/V held at the end of the timed run (no allocator peak on CPU)"), "",
              "| batch | prompt | " + " | ".join(f"{m} K/V" for m in modes if m != "nocache") + " | paged pool |"
              + (" " + " | ".join(f"{m} peak" for m in modes) + " |" if gpu else ""),
              "|---|---|" + "---|" * (len([m for m in modes if m != "nocache"]) + 1 + (len(modes) if gpu else 0))]
    for b, s in keys:
        kv = [_mib(by[(m, b, s)].get("kv_bytes_reserved")) if (m, b, s) in by else "" for m in modes if m != "nocache"]
        pool = _mib(by[("paged", b, s)].get("kv_bytes_allocated")) if ("paged", b, s) in by else ""
        row = f"| {b} | {s} | " + " | ".join(kv) + f" | {pool} |"
        if gpu:
            row += " " + " | ".join(_mib(by[(m, b, s)].get("peak_above_weights_decode")) if (m, b, s) in by else ""
                                    for m in modes) + " |"
        lines.append(row)
    bad = [r for r in results["runs"] if r["status"] != "ok"]
    if bad:
        lines += ["", "## Runs without a result", ""]
        lines += [f"- {r['mode']} batch {r['batch']} prompt {r['seq_len']}: {r['status']}: "
                  f"{str(r.get('error', '')).splitlines()[0][:300]}" for r in bad]
    lines += ["", "Plots: `latency_vs_seq.png`, `throughput_vs_batch.png`, `memory.png`. Every number: `results.json`.", ""]
    return "\n".join(lines)


def _ticks(ax, values) -> None:
    """Label the x axis at the measured values (a log axis with 2-3 points otherwise shows none)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(v) for v in values])


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["status"] == "ok"]
    modes = [m for m in results["settings"]["modes"] if any(r["mode"] == m for r in runs)]
    batches = sorted({r["batch"] for r in runs})
    seqs = sorted({r["seq_len"] for r in runs})
    env, model = results["env"], results["model"]
    where = env.get("card") or "CPU"
    title = f"FMS {model['size']} ({model['dtype']}) on {where}, torch {env['torch']}"
    styles = {"sdpa": dict(color="tab:blue", marker="o"), "paged": dict(color="tab:red", marker="s"),
              "nocache": dict(color="tab:gray", marker="^", linestyle="--")}

    def grid(n):
        fig, axes = plt.subplots(1, max(n, 1), figsize=(4.2 * max(n, 1), 3.6), squeeze=False)
        return fig, axes[0]

    def finish(fig, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    def curves(ax, x: str, y, keep) -> None:
        """One line per mode: (r[x], y(r)) over the runs `keep` accepts."""
        for m in modes:
            pts = sorted((r[x], y(r)) for r in runs if r["mode"] == m and keep(r))
            if pts:
                ax.plot(*zip(*pts), label=MODE_LABELS[m], **styles[m])

    def axes_done(ax, ticks, **labels) -> None:
        ax.set(xscale="log", yscale="log", **labels)
        _ticks(ax, ticks)
        ax.grid(True, which="both", alpha=0.3)

    fig, axes = grid(len(batches))
    for ax, b in zip(axes, batches):
        curves(ax, "seq_len", lambda r: r["median_ms"], lambda r: r["batch"] == b)
        axes_done(ax, seqs, xlabel="prompt length (tokens)", ylabel="ms per decode step", title=f"batch {b}")
    axes[0].legend(fontsize=7)
    finish(fig, "latency_vs_seq.png")

    fig, axes = grid(len(seqs))
    for ax, s in zip(axes, seqs):
        curves(ax, "batch", lambda r: r["tokens_per_s"], lambda r: r["seq_len"] == s)
        axes_done(ax, batches, xlabel="batch", ylabel="decode tokens/s", title=f"prompt {s}")
    axes[0].legend(fontsize=7)
    finish(fig, "throughput_vs_batch.png")

    gpu = env["device"] == "cuda"
    key = "peak_above_weights_decode" if gpu else "kv_bytes_reserved"
    fig, axes = grid(len(seqs))
    for ax, s in zip(axes, seqs):
        # Without a GPU there is no peak to read; the K/V held by each cache is plotted instead (none without one).
        curves(ax, "batch", lambda r: (r.get(key) or 0) / 2**20,
               lambda r: r["seq_len"] == s and (gpu or r["mode"] != "nocache"))
        if not gpu:
            pts = sorted((r["batch"], r["kv_bytes_allocated"] / 2**20) for r in runs
                         if r["mode"] == "paged" and r["seq_len"] == s)
            if pts:
                ax.plot(*zip(*pts), label="paged pool (allocated)", color="tab:red", linestyle=":", marker="s",
                        fillstyle="none")
        axes_done(ax, batches, xlabel="batch", title=f"prompt {s}",
                  ylabel="peak MiB above weights (decode)" if gpu else "K/V MiB held")
    axes[0].legend(fontsize=7)
    finish(fig, "memory.png")


# ============================================================================================ CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        results = json.loads((out / "results.json").read_text())
        results["checks"] = summarize_checks(results)
        write_report(results, out)
        print(f"[bench] rewrote {out / 'results.md'} and plots")
        return 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.new_tokens < 2 or args.nocache_tokens < 2 or args.warmup_tokens < 2:
        print("error: --new-tokens, --nocache-tokens and --warmup-tokens must be >= 2 (one prefill + decode steps)",
              file=sys.stderr)
        return 2
    if args.repeats < 1 or args.page_size < 1 or args.agree_tokens < 1:
        print("error: --repeats, --page-size and --agree-tokens must be >= 1", file=sys.stderr)
        return 2
    unknown = {x.strip() for x in args.modes.split(",")} - set(MODES)
    if unknown:
        print(f"error: unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    args.out = args.out or f"bench_out/fms-{args.size}-{args.device}"
    results, out = run_benchmark(args, argv)
    checks = results["checks"]
    print((out / "results.md").read_text())
    print(f"[bench] wrote {out}/results.json, results.md, latency_vs_seq.png, throughput_vs_batch.png, memory.png")
    good = checks["paged_op_used"] or "paged" not in results["settings"]["modes"]
    good = (good and checks["agreement_ok"] and checks["runs_failed"] == 0 and checks["no_recompiles_in_timed_runs"]
            and checks["no_recompile_limit_fallbacks"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
