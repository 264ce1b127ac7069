"""FMS tensor parallelism on the paged backend: gloo ranks on the CPU, each holding its own K/V heads.

Every world is one ``torchrun`` of THIS file (its ``__main__`` is the worker), on 127.0.0.1 with a free port,
bounded by a timeout that kills the whole process group, so a hang fails the test instead of hanging CI.
All ranks load ONE tiny HF checkpoint written here, through ``get_model("hf_pretrained", ...,
distributed_strategy="tp", group=...)``. A world runs every scenario of its size once (module-scoped
fixture) and writes each rank's results to a file; the tests read them:

* 2 ranks: GQA (4 query / 2 kv heads: one kv head per rank) with compiled FlexAttention, MHA eager;
  the failure protocol; the launcher's ``main`` (text on rank 0 only).
* 4 ranks: GQA with kvheads 2 < world 4 (one replicated kv head per rank) and MHA (one each), eager;
  FMS's own generate() loop on the distributed cache; a rank out of pages.

References, computed here in one process: the paged generator (eager) and FMS's default path on the
unsharded model, and the float64 model for the logit tolerance.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance.policy import CEILING, FLOOR, FUDGE

VOCAB = 512
BUDGET = 256                       # pool tokens of every generator (16 pages of 16): one pool shape per model
NEW = 6
PROMPT_LENGTHS = (5, 9)
MODELS = {"mha": dict(num_heads=4, num_kv_heads=4, seed=21), "gqa": dict(num_heads=4, num_kv_heads=2, seed=22)}
WORLD_TIMEOUT_S = 180              # one torchrun world, imports and compiles included (measured 15-30 s on 2 cores)
COLLECTIVE_TIMEOUT_S = 60          # inside a world: a rank that never votes turns into an error before that


def prompts_of(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


def default_greedy(model, prompt, n):
    """FMS's default path (its sdpa op, contiguous cache), step by step as its generate() runs: tokens, logits."""
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    past, tokens, logits = None, [], []
    with torch.no_grad():
        for _ in range(n):
            out, past = model(ids, position_ids=pos, past_key_value_states=past, use_cache=True)
            logits.append(out[0, -1].float())
            tokens.append(int(logits[-1].argmax()))
            ids, pos = torch.tensor([[tokens[-1]]]), pos[:, -1:] + 1
    return tokens, torch.stack(logits)


# ============================================================================================ worker (torchrun)
def _error(e: BaseException) -> dict:
    from paged.errors import OutOfPagesError
    from paged.fms.distributed import DistributedStepError

    return {"type": type(e).__name__, "message": str(e), "distributed": isinstance(e, DistributedStepError),
            "oop": isinstance(e, OutOfPagesError), "phase": getattr(e, "phase", None)}


def _expect_error(fn) -> dict:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every rank records what it raised; the test compares them
        return _error(e)
    return {"type": None}


def _generation(ctx, model, attention: str) -> dict:
    """Paged TP generation, FMS's default path on the same shards, and the cache's memory mid-run."""
    from paged.fms.distributed import DistributedPagedGenerator, global_memory

    gen = DistributedPagedGenerator(model, ctx, token_budget=BUDGET, attention=attention, check_pages=True)
    mem = []

    def after_prefill(event) -> None:
        if event.step == 0:
            mem.append(global_memory(gen.cache).as_dict())      # a collective inside the run, on every rank

    outs, logits = gen.generate(prompts_of(), NEW, return_logits=True, callback=after_prefill)
    default = [default_greedy(model, p, NEW) for p in prompts_of()]
    return {"tokens": outs, "logits": logits, "memory_after_prefill": mem[0],
            "memory_after": global_memory(gen.cache).as_dict(), "kvheads": gen.spec.num_kv_heads,
            "pool_bytes": gen.cache.pool_bytes(), "default_tokens": [t for t, _ in default],
            "default_logits": [lg for _, lg in default], "page_tables": gen.cache.page_tables()}


def _failures(ctx, model) -> dict:
    """The failure protocol: one rank fails, every rank raises the same error; nothing hangs or leaks."""
    from paged.fms.distributed import DistributedPagedGenerator, DistributedPagedKVCache, tp_cache_spec
    from paged.fms.generate import forward_logits

    last = ctx.rank == ctx.world_size - 1
    res = {}

    # 1. forward_logits on a rank whose pool is shorter (3 of its 4 pages held by someone else): out of pages.
    cache = DistributedPagedKVCache(tp_cache_spec(model, ctx, token_budget=64), ctx, attention="eager")
    ballast = cache.allocator.allocate(3) if last else []      # not armed by plan: a plain, local allocation
    cache.admit("x")
    res["oop"] = _expect_error(lambda: forward_logits(model, cache, ["x"], [prompts_of([20])[0]]))
    res["oop_after"] = (cache.length("x"), cache.allocator.free_count)

    # 2. with the pools equal again, a failure while the step is built (after the pre-commit vote) on the
    # last rank: every rank stops at the post-commit vote, before the forward.
    if last:
        cache.allocator.release(ballast)
        def boom(*args, **kwargs):
            raise RuntimeError("injected failure while building the step")
        cache._build_plan = boom
    res["commit"] = _expect_error(lambda: forward_logits(model, cache, ["x"], [[5, 6, 7]]))
    cache.finish("x")
    res["commit_after"] = cache.allocator.free_count

    # 3. the generator: the prompt fits every pool but the last rank's, which cannot admit it.
    gen = DistributedPagedGenerator(model, ctx, token_budget=64, attention="eager", check_pages=True)
    ballast = gen.cache.allocator.allocate(3) if last else []
    prompt = prompts_of([20], seed=5)[0]
    res["gen_oop"] = _expect_error(lambda: gen.generate([prompt], 4))
    res["gen_oop_after"] = (len(gen.cache.seq_ids), gen.cache.allocator.free_count)

    # 4. different prompts on different ranks: refused at the start vote.
    res["diverge"] = _expect_error(lambda: gen.generate([[5, 6, 7 + ctx.rank]], 3))

    # 5. the group is still usable and the cache clean: the same request now runs everywhere.
    if last:
        gen.cache.allocator.release(ballast)
    res["recovered"] = gen.generate([prompt], 4)
    res["recovered_free"] = gen.cache.allocator.free_count
    return res


def _launcher(path: str, out_dir: Path) -> dict:
    """The launcher's main() on every rank of the running group; only rank 0 may print or write files."""
    import contextlib
    import io

    from paged.fms.distributed import main

    out = io.StringIO()
    tokens_out = out_dir / "launcher_tokens.json"
    with contextlib.redirect_stdout(out):
        rc = main(["generate", "--prompt", "The cache", "--prompt", "Pages", "--max-new-tokens", "4", "--model-path",
                   path, "--device", "cpu", "--token-budget", str(BUDGET), "--eager", "--no-progress", "--echo",
                   "--check-pages", "--tokens-out", str(tokens_out)])
    return {"rc": rc, "stdout": out.getvalue(), "tokens_out": str(tokens_out)}


def _fms_loop(ctx, model) -> dict:
    """FMS's own generate() loop (left-padded batch, op-driven decode plans) on a distributed cache."""
    from paged.fms.distributed import DistributedPagedKVCache, tp_cache_spec
    from paged.fms.generate import fms_generate

    cache = DistributedPagedKVCache(tp_cache_spec(model, ctx, token_budget=BUDGET), ctx, attention="eager",
                                    check_pages=True)
    return {"tokens": fms_generate(model, cache, prompts_of(), NEW), "live": len(cache.seq_ids)}


def worker(argv: list[str]) -> None:
    scenario, out_dir, ckpts = argv[0], Path(argv[1]), json.loads(argv[2])
    from paged.fms.distributed import DistributedPagedKVCache, load_tp_model, setup, teardown, tp_cache_spec
    from paged.fms.generate import forward_logits

    ctx = setup("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    gqa, mha = load_tp_model(ckpts["gqa"], ctx), load_tp_model(ckpts["mha"], ctx)
    torch.manual_seed(1000 + ctx.rank)          # different global RNG per rank: nothing may depend on it
    res: dict = {"rank": ctx.rank, "world_size": ctx.world_size}
    if scenario == "world2":
        res["gqa"] = _generation(ctx, gqa, "compiled")
        res["mha"] = _generation(ctx, mha, "eager")
        res["failures"] = _failures(ctx, gqa)
        res["launcher"] = _launcher(ckpts["gqa"], out_dir)
    elif scenario == "world4":
        res["gqa"] = _generation(ctx, gqa, "eager")
        res["mha"] = _generation(ctx, mha, "eager")
        res["fms_loop"] = _fms_loop(ctx, gqa)
        cache = DistributedPagedKVCache(tp_cache_spec(gqa, ctx, token_budget=64), ctx, attention="eager")
        if ctx.rank == 3:
            cache.allocator.allocate(4)                # the last rank's pool is full
        cache.admit("y")
        res["oop"] = _expect_error(lambda: forward_logits(gqa, cache, ["y"], [[5, 6, 7]]))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    torch.save(res, out_dir / f"rank{ctx.rank}.pt")
    teardown(ctx)


# ============================================================================================ test side
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(nproc: int, scenario: str, ckpts: dict[str, str], out_dir: Path) -> list[dict]:
    """torchrun this file with `nproc` gloo ranks on 127.0.0.1; return every rank's results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in range(2):                      # the free port can be taken between probe and bind: retry once
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(Path(__file__).resolve()),
               scenario, str(out_dir), json.dumps(ckpts)]
        # Its own session: on timeout the whole group (torchrun and its workers) is killed, nothing left behind.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=WORLD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{nproc}-rank world did not finish in {WORLD_TIMEOUT_S} s (a hang):\n{output[-4000:]}")
        if proc.returncode == 0 or "address already in use" not in output.lower():
            break
    assert proc.returncode == 0, f"{nproc}-rank world failed (rc {proc.returncode}):\n{output[-6000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    from paged.fms.checkpoint import write_tiny_llama_checkpoint

    root = tmp_path_factory.mktemp("tp-ckpt")
    return {name: str(write_tiny_llama_checkpoint(root / name, vocab_size=VOCAB, hidden_size=64, num_layers=2,
                                                  intermediate_size=128, **cfg))
            for name, cfg in MODELS.items()}


@pytest.fixture(scope="module")
def references(ckpts) -> dict[str, dict]:
    """Single-process runs of each checkpoint: the paged generator, FMS's default path, float64 logits."""
    from paged.fms.checkpoint import load_fms_llama
    from paged.fms.generate import PagedGenerator

    refs = {}
    for name, path in ckpts.items():
        model = load_fms_llama(path)
        gold = load_fms_llama(path, dtype=torch.float64)
        paged, paged_logits = PagedGenerator(model, token_budget=BUDGET, attention="eager").generate(
            prompts_of(), NEW, return_logits=True)
        default = [default_greedy(model, p, NEW)[0] for p in prompts_of()]
        golds = []
        for p, toks in zip(prompts_of(), default):
            seq = p + toks[:-1]
            with torch.no_grad():
                out, _ = gold(torch.tensor([seq]), position_ids=torch.arange(len(seq))[None], use_cache=True)
            golds.append(out[0, len(p) - 1:])
        refs[name] = {"paged": paged, "paged_logits": paged_logits, "default": default, "gold": golds}
    return refs


@pytest.fixture(scope="module")
def world2(ckpts, tmp_path_factory) -> list[dict]:
    return run_world(2, "world2", ckpts, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(ckpts, tmp_path_factory) -> list[dict]:
    return run_world(4, "world4", ckpts, tmp_path_factory.mktemp("world4"))


def check_generation(ranks: list[dict], name: str, refs: dict) -> None:
    ref = refs[name]
    first = ranks[0][name]
    for r in ranks:
        got = r[name]
        # Same greedy tokens on every rank, as the single-process paged run and FMS's default path give.
        assert got["tokens"] == ref["paged"] == ref["default"], (r["rank"], got["tokens"], ref["paged"], ref["default"])
        # FMS's default attention on the same shards agrees too.
        assert got["default_tokens"] == ref["default"]
        # Every rank decides from the same bits: FMS ends with an all-gather of the vocabulary shards.
        assert all(torch.equal(a, b) for a, b in zip(got["logits"], first["logits"]))
        # Identical page tables (same history, deterministic placement), consistent memory everywhere.
        assert got["page_tables"] == first["page_tables"]
        assert got["memory_after_prefill"] == first["memory_after_prefill"]
    mem = first["memory_after_prefill"]
    assert mem["consistent"] and mem["world_size"] == len(ranks)
    assert mem["tokens_stored"] == sum(PROMPT_LENGTHS)
    assert all(m["pages_in_use"] == sum(math.ceil(n / 16) for n in PROMPT_LENGTHS) for m in mem["per_rank"])
    assert first["memory_after"]["tokens_stored"] == 0 and first["memory_after"]["per_rank"][0]["pages_in_use"] == 0
    for t, gold in enumerate(ref["gold"]):
        ours, fms_tp = first["logits"][t].double(), first["default_logits"][t].double()
        err, ref_err = float((ours - gold).abs().max()), float((fms_tp - gold).abs().max())
        scale = max(1.0, float(gold.abs().max()))
        # conformance.policy on logits: the same-dtype reference is FMS's own TP run (its all-reduce adds per-rank
        # partial sums, so rounding differs from one process); FLOOR/CEILING scaled by |logits| as in test_fms_generate.
        bound = min(FUDGE * ref_err + FLOOR[torch.float32] * scale, CEILING[torch.float32] * scale)
        assert err <= bound, f"{name} prompt {t}: logits off by {err:.3g} (FMS TP {ref_err:.3g}, bound {bound:.3g})"


def kv_heads_per_rank(name: str, world: int) -> int:
    kv = MODELS[name]["num_kv_heads"]
    return kv // world if kv >= world else 1          # FMS replicates one kv head per rank when kv < world


# --------------------------------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_two_ranks_generate_like_one_process(world2, references, name):
    check_generation(world2, name, references)
    assert all(r[name]["kvheads"] == kv_heads_per_rank(name, 2) for r in world2)


@pytest.mark.slow  # a 4-rank world on a 2-core CI machine: `tox -e slow`
def test_each_rank_holds_only_its_kv_heads(world2, world4):
    # A rank's pool holds its local heads: the 2-rank MHA pool is half the 1-rank size, the 4-rank GQA pool
    # (one replicated head per rank) as large as the 2-rank one.
    one_rank = 2 * 2 * MODELS["mha"]["num_kv_heads"] * 16 * BUDGET * 4       # K+V, layers, heads, dim, slots, fp32
    assert world2[0]["mha"]["pool_bytes"] == one_rank // 2
    assert world4[0]["mha"]["pool_bytes"] == one_rank // 4
    assert world4[0]["gqa"]["pool_bytes"] == world2[0]["gqa"]["pool_bytes"] == one_rank // 4


def test_a_rank_out_of_pages_fails_every_rank_alike(world2):
    fails = [r["failures"] for r in world2]
    oop = [f["oop"] for f in fails]
    assert all(o == oop[0] for o in oop), oop                      # same type, same message, on every rank
    assert oop[0]["type"] == "DistributedOutOfPagesError" and oop[0]["oop"] and oop[0]["distributed"]
    assert oop[0]["phase"] == "plan" and "on rank 1 (world size 2" in oop[0]["message"]
    assert "needs 2 free page(s) but only 1 are free" in oop[0]["message"]
    # Refused before any page was taken: nothing changed on any rank.
    assert [f["oop_after"] for f in fails] == [(0, 4), (0, 1)]


def test_a_failure_while_building_a_step_stops_every_rank(world2):
    errs = [r["failures"]["commit"] for r in world2]
    assert all(e == errs[0] for e in errs)
    assert errs[0]["type"] == "DistributedStepError" and errs[0]["phase"] == "commit"
    assert "injected failure" in errs[0]["message"]
    assert [r["failures"]["commit_after"] for r in world2] == [4, 4]


def test_generator_out_of_pages_on_one_rank_then_recovers(world2):
    fails = [r["failures"] for r in world2]
    errs = [f["gen_oop"] for f in fails]
    assert all(e == errs[0] for e in errs) and errs[0]["oop"] and errs[0]["distributed"]
    assert "on rank 1 (world size 2" in errs[0]["message"]
    assert [f["gen_oop_after"] for f in fails] == [(0, 4), (0, 1)]    # nothing left running; rank 1 keeps its ballast
    div = [f["diverge"] for f in fails]
    assert all(d == div[0] for d in div) and div[0]["type"] == "RankDivergenceError" and div[0]["phase"] == "start"
    assert fails[0]["recovered"] == fails[1]["recovered"] and len(fails[0]["recovered"][0]) == 4
    assert all(f["recovered_free"] == 4 for f in fails)


def test_launcher_prints_on_rank_zero_only(world2, ckpts):
    from paged.fms.checkpoint import load_fms_llama
    from paged.fms.tokenizer import Tokenizer

    rank0, rank1 = (r["launcher"] for r in world2)
    assert rank0["rc"] == rank1["rc"] == 0
    lines = rank0["stdout"].splitlines()
    assert len(lines) == 2 and lines[0].startswith("The cache") and lines[1].startswith("Pages")
    assert rank1["stdout"] == ""
    written = json.loads(Path(rank0["tokens_out"]).read_text())      # --tokens-out: what scripts/gpu_tp.sh compares
    assert written["world_size"] == 2 and [len(t) for t in written["tokens"]] == [4, 4]
    # The generated tokens themselves, not only the echoed prompt: FMS's default path in one process agrees.
    model, tok = load_fms_llama(ckpts["gqa"]), Tokenizer()
    assert written["tokens"] == [default_greedy(model, tok.encode(p), 4)[0] for p in ("The cache", "Pages")]


# --------------------------------------------------------------------------------------------- 4 ranks
@pytest.mark.slow  # a 4-rank world on a 2-core CI machine: `tox -e slow`
@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_four_ranks_generate_like_one_process(world4, references, name):
    # gqa: kvheads 2 < world 4, so FMS gives every rank one replicated kv head; its pool holds that one head.
    check_generation(world4, name, references)
    assert all(r[name]["kvheads"] == 1 for r in world4)


@pytest.mark.slow  # a 4-rank world on a 2-core CI machine: `tox -e slow`
def test_fms_generate_loop_on_four_ranks(world4, references):
    for r in world4:
        assert r["fms_loop"]["tokens"] == references["gqa"]["default"] and r["fms_loop"]["live"] == 0


@pytest.mark.slow  # a 4-rank world on a 2-core CI machine: `tox -e slow`
def test_four_ranks_out_of_pages_on_the_last(world4):
    errs = [r["oop"] for r in world4]
    assert all(e == errs[0] for e in errs) and errs[0]["type"] == "DistributedOutOfPagesError"
    assert "on rank 3 (world size 4" in errs[0]["message"]


if __name__ == "__main__":
    worker(sys.argv[1:])
