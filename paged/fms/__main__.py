"""Command line: generate text with an FMS Llama through the paged KV cache.

    python -m paged.fms generate --prompt "The cache" --max-new-tokens 20
    python -m paged.fms generate --prompt "a" --prompt "b" --model-path DIR --device cuda --do-sample --seed 0

Without ``--model-path`` a seeded random-weight tiny Llama is built (its output is gibberish, but it
exercises the whole path). The tokenizer is ``--tokenizer PATH``, else the checkpoint's
``tokenizer.model``, else the built-in one (trained from the shipped corpus on first use).
Prints each prompt's continuation (with ``--echo``, the prompt followed by it), one per line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paged.fms", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text after one or more prompts")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--model-path", default=None, help="local HF-format Llama directory (default: random tiny model)")
    g.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer.model (default: see above)")
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
    g.add_argument("--eager", action="store_true", help="uncompiled FlexAttention (no compile wait)")
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from paged.fms.checkpoint import load_fms_llama, tiny_llama
    from paged.fms.generate import PagedGenerator
    from paged.fms.tokenizer import Tokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)

    tok_path = args.tokenizer
    if tok_path is None and args.model_path and (Path(args.model_path) / "tokenizer.model").is_file():
        tok_path = Path(args.model_path) / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)

    if args.model_path:
        model = load_fms_llama(args.model_path, device=args.device, dtype=dtype)
    else:
        model = tiny_llama(vocab_size=tokenizer.vocab_size, nheads=4, kvheads=2, emb_dim=64, nlayers=2,
                           seed=args.seed, device=args.device, dtype=dtype)

    prompts = [tokenizer.encode(p) for p in args.prompt]
    gen = PagedGenerator(model, token_budget=args.token_budget, page_size=args.page_size,
                         attention="eager" if args.eager else "compiled")
    outs = gen.generate(prompts, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, eos_token_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
                        prefill_chunk=args.prefill_chunk, max_batch=args.max_batch,
                        progress=False if args.no_progress else None)
    for text, out in zip(args.prompt, outs):
        # A model whose vocabulary is larger than the tokenizer's may emit ids it cannot decode.
        known = [t for t in out if 0 <= t < tokenizer.vocab_size]
        if len(known) != len(out):
            print(f"note: dropped {len(out) - len(known)} id(s) outside the tokenizer's vocabulary", file=sys.stderr)
        completion = tokenizer.decode(known)
        print(text + completion if args.echo else completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
