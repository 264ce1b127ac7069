"""A small sentencepiece tokenizer for examples and tests, trained locally from a shipped corpus.

Nothing is downloaded: the default model is trained from ``paged/fms/data/corpus.txt`` on first
use and cached under ``$PAGED_CACHE_DIR`` (or ``~/.cache/paged``), keyed by a hash of the corpus
and the training options, so an edited corpus or changed option trains a new model.

Command line::

    python -m paged.fms.tokenizer encode "some text"      # prints token ids
    python -m paged.fms.tokenizer decode 1 57 300          # prints text
    python -m paged.fms.tokenizer train --corpus c.txt --out my.model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

__all__ = [
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "HFTokenizer",
    "Tokenizer",
    "cache_dir",
    "load_tokenizer",
    "default_corpus_path",
    "default_tokenizer_path",
    "train_tokenizer",
]

# Llama's convention for the first ids; pad gets an explicit id so batches can be padded.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

DEFAULT_VOCAB_SIZE = 512
_SEED = 0


def _trainer_options(vocab_size: int, byte_fallback: bool = False) -> dict[str, object]:
    """Training options; everything that can change the model is here, so it enters the cache key."""
    return {
        "vocab_size": vocab_size,
        "model_type": "bpe",
        "character_coverage": 1.0,
        # Byte fallback would make any text round-trip but costs 256 of the 512 ids; without
        # it, printable ASCII plus newline and tab round-trip and other characters map to <unk>.
        "byte_fallback": byte_fallback,
        "user_defined_symbols": ["\n", "\t"],
        "split_digits": True,
        # Identity normalisation and kept whitespace make decode(encode(s)) == s exact.
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "unk_piece": "<unk>",
        "bos_piece": "<s>",
        "eos_piece": "</s>",
        "pad_piece": "<pad>",
        # Bounded and unshuffled: the same lines are used in the same order every time.
        "input_sentence_size": 1_000_000,
        "shuffle_input_sentence": False,
        "num_threads": 1,
        "max_sentence_length": 16384,
    }


def default_corpus_path() -> Path:
    """Path of the corpus shipped with the package."""
    return Path(__file__).resolve().parent / "data" / "corpus.txt"


def cache_dir() -> Path:
    """Directory for trained tokenizer models: ``$PAGED_CACHE_DIR`` or ``~/.cache/paged``."""
    env = os.environ.get("PAGED_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "paged"


def train_tokenizer(
    corpus_path: str | os.PathLike[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    byte_fallback: bool = False,
) -> Path:
    """Train a BPE sentencepiece model on ``corpus_path``; returns ``<model_prefix>.model``.

    Deterministic for a given corpus, vocab size and sentencepiece version (fixed seed, one
    thread, no shuffling). Also writes ``<model_prefix>.vocab``. Raises FileNotFoundError if the
    corpus does not exist.
    """
    corpus = Path(corpus_path)
    if not corpus.is_file():
        raise FileNotFoundError(f"tokenizer corpus not found: {corpus}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(_SEED)
    # minloglevel, not logstream=: logstream needs sys.stderr.fileno(), which pytest's capture
    # and notebooks do not provide.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        minloglevel=2,
        **_trainer_options(vocab_size, byte_fallback),
    )
    return prefix.with_name(prefix.name + ".model")


def _cache_key(corpus: Path, vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(corpus.read_bytes())
    h.update(json.dumps(_trainer_options(vocab_size), sort_keys=True).encode())
    h.update(spm.__version__.encode())
    return h.hexdigest()[:16]


def default_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Path of the default model, training it from the shipped corpus on first use.

    The shipped corpus covers every printable ASCII character, so ASCII text (plus newlines
    and tabs) decodes back exactly. Safe when several processes race: each trains in its own temporary directory and moves
    the finished file into place with an atomic ``os.replace``.
    """
    corpus = default_corpus_path()
    target = cache_dir() / f"tokenizer-v{vocab_size}-{_cache_key(corpus, vocab_size)}.model"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-train-", dir=target.parent))
    try:
        model = train_tokenizer(corpus, tmp / "tokenizer", vocab_size)
        os.replace(model, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Tokenizer:
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    ``model_path=None`` uses the default model trained from the shipped corpus; any
    sentencepiece ``tokenizer.model`` file (for example one shipped with a Llama checkpoint)
    is accepted too.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None) -> None:
        if model_path is None:
            path = default_tokenizer_path()
        else:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"sentencepiece model not found: {path} "
                    "(pass an existing tokenizer.model, or None for the built-in default)"
                )
        self.model_path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of pieces, including the special ones."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (-1 if the model defines none)."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (-1 if the model defines none)."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id (-1 if the model defines none)."""
        return self._sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS prepended (and EOS appended) when asked."""
        return _with_specials(self._sp.encode(text), self.bos_id if bos else -1, self.eos_id if eos else -1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control ids (BOS, EOS, pad) decode to nothing. Accepts tensors."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(model_path={str(self.model_path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (what HF checkpoints ship) through transformers, with the same interface
    as :class:`Tokenizer`. Special ids come from the ``tokenizer_config.json`` beside it when there is one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"HF tokenizer not found: {file}")
        self.model_path = file
        special = {}
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            raw = json.loads(config.read_text())
            special = {k: raw[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if isinstance(raw.get(k), str)}
        self._tok = PreTrainedTokenizerFast(tokenizer_file=str(file), **special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self._tok)

    def _id(self, value: int | None) -> int:
        return -1 if value is None else int(value)

    @property
    def bos_id(self) -> int:
        return self._id(self._tok.bos_token_id)

    @property
    def eos_id(self) -> int:
        return self._id(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        return self._id(self._tok.pad_token_id)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no template), with BOS prepended (and EOS appended) when asked and defined."""
        return _with_specials(self._tok.encode(text, add_special_tokens=False), self.bos_id if bos else -1,
                              self.eos_id if eos else -1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer(model_path={str(self.model_path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | HFTokenizer:
    """A sentencepiece ``.model`` file, or a HF ``tokenizer.json`` (the file, or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        return HFTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Tokenizer(path)



def _with_specials(ids: list[int], bos_id: int, eos_id: int) -> list[int]:
    """`ids` with `bos_id` before and `eos_id` after, each only when >= 0 (asked for and defined)."""
    return ([bos_id] if bos_id >= 0 else []) + list(ids) + ([eos_id] if eos_id >= 0 else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m paged.fms.tokenizer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encode", help="print the token ids of TEXT")
    enc.add_argument("text")
    enc.add_argument("--model", default=None, help="sentencepiece model (default: built-in)")
    enc.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    dec = sub.add_parser("decode", help="print the text of IDS")
    dec.add_argument("ids", nargs="+", type=int)
    dec.add_argument("--model", default=None, help="sentencepiece model (default: built-in)")
    tr = sub.add_parser("train", help="train a model from a corpus")
    tr.add_argument("--corpus", default=str(default_corpus_path()))
    tr.add_argument("--out", required=True, help="output .model path (or prefix)")
    tr.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    if args.cmd == "encode":
        ids = Tokenizer(args.model).encode(args.text, bos=not args.no_bos)
        print(" ".join(map(str, ids)))
    elif args.cmd == "decode":
        print(Tokenizer(args.model).decode(args.ids))
    else:
        out = Path(args.out)
        prefix = out.with_suffix("") if out.suffix == ".model" else out
        print(train_tokenizer(args.corpus, prefix, args.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
