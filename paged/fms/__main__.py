"""Command line: generate text with an FMS Llama through the paged KV cache.

    python -m paged.fms generate --prompt "The cache" --max-new-tokens 20
    python -m paged.fms generate --prompt "a" --prompt "b" --model-path DIR --device cuda --do-sample --seed 0

Without ``--model-path`` a seeded random-weight tiny Llama is built (its output is gibberish, but it exercises the
whole path) with the built-in tokenizer (trained from the shipped corpus on first use). With ``--model-path DIR``
the tokenizer is ``--tokenizer PATH`` (a sentencepiece ``.model``, or a HF ``tokenizer.json`` or a directory
holding one), else the checkpoint's own ``tokenizer.model`` or ``tokenizer.json``; a checkpoint with neither is
refused (never the toy tokenizer), and so is a tokenizer with more ids than the model's vocabulary. Generation
stops at the model's own EOS id (``eos_token_id`` in its ``config.json``), else the tokenizer's.
Prints each prompt's continuation (with ``--echo``, the prompt followed by it), one per line. Errors (missing
model directory, incomplete checkpoint, a prompt longer than the cache can hold...) are one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


class CliError(Exception):
    """A request the command cannot serve; the message says what and what to do."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paged.fms", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text after one or more prompts")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--model-path", default=None, help="local HF-format Llama directory (default: random tiny model)")
    g.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model, or HF tokenizer.json (or its directory); default: the checkpoint's own")
    g.add_argument("--max-new-tokens", type=int, required=True)
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model and cache dtype (default float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed, and the random tiny model's weights")
    g.add_argument("--token-budget", type=int, default=4096, help="KV pool size in tokens")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-batch", type=int, default=None, help="most prompts running at once")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill step")
    g.add_argument("--eager", action="store_true",
                   help="run attention as uncompiled FlexAttention: no compile wait (useful on the CPU and for "
                        "debugging), slower per step and O(pool) memory per layer; same tokens as the default")
    g.add_argument("--no-graphs", action="store_true",
                   help="do not replay decode steps as CUDA graphs (on by default on CUDA; no effect on the CPU)")
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _tokenizer(args: argparse.Namespace):
    """The tokenizer: --tokenizer, else the checkpoint's own, else (no --model-path) the built-in one."""
    from paged.fms.tokenizer import Tokenizer, load_tokenizer

    if args.tokenizer:
        if not Path(args.tokenizer).exists():
            raise CliError(f"--tokenizer {args.tokenizer}: no such file or directory")
        return load_tokenizer(args.tokenizer)
    if not args.model_path:
        return Tokenizer()
    model_dir = Path(args.model_path)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (model_dir / name).is_file():
            return load_tokenizer(model_dir / name)
    raise CliError(f"{model_dir} has no tokenizer.model (sentencepiece) or tokenizer.json (HF); pass --tokenizer PATH "
                   f"(the built-in toy tokenizer would not match this model's vocabulary)")


def _checkpoint_config(model_path: str) -> dict[str, Any]:
    path = Path(model_path)
    if not path.is_dir():
        raise CliError(f"--model-path {model_path}: no such directory")
    if not (path / "config.json").is_file():
        raise CliError(f"--model-path {model_path}: no config.json there (not an HF-format checkpoint directory)")
    return json.loads((path / "config.json").read_text())


def _model_and_eos(args: argparse.Namespace, tokenizer, dtype) -> tuple[Any, int | None]:
    """The model, and the id generation stops at (the model's own EOS, else the tokenizer's, else None)."""
    from paged.fms.checkpoint import IncompleteCheckpointError, load_fms_llama, tiny_llama

    tok_eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    if not args.model_path:
        model = tiny_llama(vocab_size=tokenizer.vocab_size, nheads=4, kvheads=2, emb_dim=64, nlayers=2,
                           seed=args.seed, device=args.device, dtype=dtype)
        return model, tok_eos
    config = _checkpoint_config(args.model_path)
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        raise CliError(f"vocabulary mismatch: the tokenizer ({tokenizer.model_path}) has {tokenizer.vocab_size} ids "
                       f"but the model in {args.model_path} has {vocab}; pass the tokenizer that belongs to it")
    try:
        model = load_fms_llama(args.model_path, device=args.device, dtype=dtype)
    except IncompleteCheckpointError as exc:
        raise CliError(str(exc)) from None
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return model, eos if isinstance(eos, int) else tok_eos


def _generate(args: argparse.Namespace, model, prompts: list[list[int]], eos: int | None) -> list[list[int]]:
    from paged.errors import PagedError
    from paged.fms.generate import PagedGenerator

    try:
        gen = PagedGenerator(model, token_budget=args.token_budget, page_size=args.page_size,
                             attention="eager" if args.eager else "compiled",
                             cuda_graphs=False if args.no_graphs else None)
        return gen.generate(prompts, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed, eos_token_id=eos, prefill_chunk=args.prefill_chunk,
                            max_batch=args.max_batch, progress=False if args.no_progress else None)
    except PagedError as exc:
        raise CliError(f"{exc} (prompt lengths in tokens: {[len(p) for p in prompts]}; --token-budget "
                       f"{args.token_budget}, --max-new-tokens {args.max_new_tokens})") from None


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA GPU is visible")
    if args.max_new_tokens < 0:
        raise CliError("--max-new-tokens must be >= 0")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.model_path:
        _checkpoint_config(args.model_path)                 # a missing directory is reported before anything loads
    tokenizer = _tokenizer(args)
    model, eos = _model_and_eos(args, tokenizer, dtype)
    outs = _generate(args, model, [tokenizer.encode(p) for p in args.prompt], eos)
    for text, out in zip(args.prompt, outs):
        # A model whose vocabulary is larger than the tokenizer's may emit ids it cannot decode.
        known = [t for t in out if 0 <= t < tokenizer.vocab_size]
        if len(known) != len(out):
            print(f"note: dropped {len(out) - len(known)} id(s) outside the tokenizer's vocabulary", file=sys.stderr)
        completion = tokenizer.decode(known)
        print(text + completion if args.echo else completion)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CliError as exc:
        print(f"python -m paged.fms {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
