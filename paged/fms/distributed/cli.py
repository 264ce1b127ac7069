"""The launcher: ``torchrun --nproc-per-node N -m paged.fms.distributed generate ...`` (flags in :func:`_parser`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from paged.fms.distributed.errors import DistributedStepError
from paged.fms.distributed.generator import DistributedPagedGenerator
from paged.fms.distributed.group import DistContext, load_tp_model, setup, teardown
from paged.fms.distributed.memory import GlobalMemory, global_memory

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m paged.fms.distributed",
                                     description="Tensor-parallel generation with an FMS Llama on the paged KV cache.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text after one or more prompts (text printed on rank 0)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--random-prompts", type=int, default=0, metavar="N",
                   help="add N seeded random-token prompts (for throughput runs; any checkpoint, no tokenizer needed)")
    g.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    g.add_argument("--model-path", default=None,
                   help="local HF-format Llama directory (default: a seeded random tiny Llama, written by rank 0)")
    g.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer.model (default: the checkpoint's, "
                                                     "else the built-in one)")
    g.add_argument("--max-new-tokens", type=int, required=True)
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when a GPU is visible")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and cache dtype (default float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed, and the random tiny model's weights")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--token-budget", type=int, default=None, help="KV pool size in tokens (default 4096)")
    size.add_argument("--kv-gib", type=float, default=None, help="KV pool size in GiB per rank")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-batch", type=int, default=None)
    g.add_argument("--prefill-chunk", type=int, default=None)
    g.add_argument("--eager", action="store_true", help="uncompiled FlexAttention (no compile wait)")
    g.add_argument("--check-pages", action="store_true", help="hash the page tables into every step's vote (debug)")
    g.add_argument("--timeout-s", type=float, default=600.0, help="collective timeout (a dead rank -> error)")
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument("--stats", action="store_true", help="print tokens/s and every rank's KV memory (JSON) to stderr")
    g.add_argument("--warmup", action="store_true", help="run the generation once untimed first (compiles kernels)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--tokens-out", default=None, metavar="FILE",
                   help="write every prompt's generated token ids as JSON (rank 0), to compare runs")
    return parser


def _tiny_checkpoint(vocab_size: int, world_size: int, seed: int, directory: Path) -> Path:
    """A seeded random Llama every rank writes identically (the heads split over up to `world_size` ranks)."""
    from paged.fms.checkpoint import write_tiny_llama_checkpoint

    nheads = max(4, world_size)
    return write_tiny_llama_checkpoint(directory, vocab_size=vocab_size, hidden_size=16 * nheads, num_layers=2,
                                       num_heads=nheads, num_kv_heads=2, intermediate_size=32 * nheads, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on this rank; 0 on success, 1 after a step failed on any rank, 2 on bad flags."""
    args = _parser().parse_args(argv)
    problem = _usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ctx = setup(args.device, timeout_s=args.timeout_s)
    try:
        return _generate(args, ctx)
    finally:
        teardown(ctx)


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.max_new_tokens < 0:
        return "--max-new-tokens must be >= 0"
    if not args.prompt and args.random_prompts < 1:
        return "give --prompt TEXT (repeatable) or --random-prompts N"
    return None


def _generate(args: argparse.Namespace, ctx: DistContext) -> int:
    """Load the model, generate on every rank, print on rank 0."""
    from paged.fms.tokenizer import Tokenizer

    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    tok_path = args.tokenizer
    if tok_path is None and args.model_path and (Path(args.model_path) / "tokenizer.model").is_file():
        tok_path = Path(args.model_path) / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    model = _load_model(args, ctx, tokenizer.vocab_size, dtype)
    if args.kv_gib is not None:
        sizing = {"kv_budget_bytes": int(args.kv_gib * 2**30)}
    else:
        sizing = {"token_budget": args.token_budget or 4096}
    prompts = _prompts(args, model, tokenizer)
    try:
        gen = DistributedPagedGenerator(model, ctx, page_size=args.page_size, dtype=dtype,
                                        attention="eager" if args.eager else "compiled",
                                        check_pages=args.check_pages, **sizing)
        eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
        outs, elapsed = _timed(args, ctx, gen, prompts, eos)
    except DistributedStepError as e:            # raised alike on every rank: report once
        if ctx.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 1
    mem = global_memory(gen.cache, ctx)       # collective: every rank
    if ctx.is_main:
        if args.tokens_out:
            Path(args.tokens_out).write_text(json.dumps({"world_size": ctx.world_size, "dtype": str(dtype),
                                                         "tokens": outs}))
        _print_outputs(args, outs, tokenizer)
        if args.stats:
            print(json.dumps(_stats(args, ctx, gen, prompts, outs, elapsed, mem)), file=sys.stderr)
    return 0


def _load_model(args: argparse.Namespace, ctx: DistContext, vocab_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """--model-path sharded over the group, or (without one) a seeded random tiny Llama."""
    if args.model_path:
        return load_tp_model(args.model_path, ctx, dtype=dtype)
    # One checkpoint for all ranks (single host): rank 0 writes it, every rank loads it.
    with tempfile.TemporaryDirectory(prefix="paged-tp-") as tmp:
        box = [str(_tiny_checkpoint(vocab_size, ctx.world_size, args.seed, Path(tmp))) if ctx.is_main else None]
        dist.broadcast_object_list(box, src=0, group=ctx.control)
        model = load_tp_model(box[0], ctx, dtype=dtype)
        dist.barrier(group=ctx.control)          # rank 0 removes the files only after every rank read them
    return model


def _prompts(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> list[list[int]]:
    """The --prompt texts' token ids, then the --random-prompts (seeded on the CPU: the same ids on every rank)."""
    prompts = [tokenizer.encode(p) for p in args.prompt]
    if args.random_prompts:
        # Ids 4.. skip the special tokens.
        g = torch.Generator().manual_seed(args.seed)
        vocab = model.config.src_vocab_size if hasattr(model.config, "src_vocab_size") else tokenizer.vocab_size
        prompts += torch.randint(4, vocab, (args.random_prompts, args.prompt_len), generator=g).tolist()
    return prompts


def _timed(args: argparse.Namespace, ctx: DistContext, gen: DistributedPagedGenerator, prompts: list[list[int]],
           eos: int | None) -> tuple[list[list[int]], float]:
    """Generate (after an untimed warm-up run with --warmup); return the tokens and the seconds taken."""

    def run() -> list[list[int]]:
        return gen.generate(prompts, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, max_batch=args.max_batch,
                            prefill_chunk=args.prefill_chunk, eos_token_id=eos,
                            progress=False if args.no_progress else None)

    if args.warmup:
        run()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    outs = run()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return outs, time.perf_counter() - started


def _print_outputs(args: argparse.Namespace, outs: list[list[int]], tokenizer: Any) -> None:
    """Rank 0: a line about the random prompts (stderr), then each text prompt's continuation (stdout)."""
    if args.random_prompts:
        print(f"{args.random_prompts} random prompt(s) of {args.prompt_len} tokens: "
              f"{sum(len(o) for o in outs[len(args.prompt):])} new tokens", file=sys.stderr)
    for text, out in zip(args.prompt, outs):
        known = [t for t in out if 0 <= t < tokenizer.vocab_size]
        completion = tokenizer.decode(known)
        print(text + completion if args.echo else completion)


def _stats(args: argparse.Namespace, ctx: DistContext, gen: DistributedPagedGenerator, prompts: list[list[int]],
           outs: list[list[int]], elapsed: float, mem: GlobalMemory) -> dict:
    """The --stats record: throughput, pool sizes and every rank's KV memory."""
    new = sum(len(o) for o in outs)
    # requests like the longest of these that fit the pool at once (each reserved at its longest)
    longest_pages = max(1, *(math.ceil((len(p) + args.max_new_tokens - 1) / gen.spec.page_size) for p in prompts))
    return {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
            "new_tokens": new, "seconds": round(elapsed, 4),
            "tokens_per_s": round(new / elapsed, 2) if elapsed > 0 else None,
            "kv_pool_bytes_per_rank": list(mem.pool_bytes),
            "kv_bytes_per_token_per_rank": gen.spec.bytes_per_token,
            "pool_tokens": gen.spec.capacity_tokens,
            "concurrent_sequences_at_longest": gen.spec.num_pages // longest_pages,
            "memory": mem.as_dict()}
