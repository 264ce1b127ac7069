"""Tests for paged.fms.tokenizer: training, caching, round trips, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from paged.fms import tokenizer as tk

REPO_ROOT = Path(__file__).resolve().parents[2]

SENTENCES = [
    "The scheduler protects latency when a long prompt arrives.",
    "A paged cache stores keys and values in fixed-size blocks.",
    "My grandmother insisted that the soup needs garlic, and she was rarely wrong.",
    "In 1450 the printing press changed how people shared ideas; 12 pages, 256 tokens.",
    "Unseen words like zygomorphic or Quetzalcoatl still round-trip.",
    '"Quoted," she said (twice), and then: why not?',
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PAGED_CACHE_DIR", str(d))
    return d


@pytest.fixture
def default_tok(cache: Path) -> tk.Tokenizer:
    return tk.Tokenizer()


def _pieces(path: Path) -> list[tuple[str, float]]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_default_trains_into_cache_dir(cache: Path, default_tok: tk.Tokenizer) -> None:
    assert default_tok.model_path.parent == cache
    assert default_tok.model_path.is_file()
    # Only the finished model is left behind, no temporary training directories.
    assert [p.name for p in cache.iterdir()] == [default_tok.model_path.name]


def test_vocab_and_special_ids(default_tok: tk.Tokenizer) -> None:
    assert default_tok.vocab_size == 512
    assert (default_tok.bos_id, default_tok.eos_id, default_tok.pad_id) == (1, 2, 3)
    assert default_tok._sp.unk_id() == 0


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(default_tok: tk.Tokenizer, text: str) -> None:
    ids = default_tok.encode(text)
    assert ids[0] == default_tok.bos_id
    assert all(0 <= i < default_tok.vocab_size for i in ids)
    assert default_tok.decode(ids) == text


def test_round_trip_whitespace_and_ascii(default_tok: tk.Tokenizer) -> None:
    # Identity normalisation keeps runs of spaces; newline and tab are pieces of their own.
    text = "  two  spaces,\ta tab,\nnew line; " + "".join(chr(c) for c in range(32, 127)) + " "
    ids = default_tok.encode(text, bos=False)
    assert 0 not in ids  # no <unk>
    assert default_tok.decode(ids) == text


def test_non_ascii_maps_to_unk(default_tok: tk.Tokenizer) -> None:
    # No byte fallback (it would take 256 of the 512 ids): unseen characters become <unk>.
    ids = default_tok.encode("café", bos=False)
    assert 0 in ids
    assert default_tok.decode(ids).startswith("caf")


def test_bos_eos_flags(default_tok: tk.Tokenizer) -> None:
    plain = default_tok.encode("hello there", bos=False)
    assert default_tok.encode("hello there") == [1, *plain]
    assert default_tok.encode("hello there", bos=False, eos=True) == [*plain, 2]
    # Control ids decode to nothing.
    assert default_tok.decode([1, *plain, 2, 3, 3]) == "hello there"


def test_subwords_are_learned(default_tok: tk.Tokenizer) -> None:
    # A trained vocabulary should need far fewer tokens than characters on in-domain text.
    text = " ".join(SENTENCES[:3])
    assert len(default_tok.encode(text, bos=False)) < len(text) / 2


def test_cache_is_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_train = tk.train_tokenizer

    def counting_train(*args, **kwargs):
        calls.append(args)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tk, "train_tokenizer", counting_train)
    first = tk.default_tokenizer_path()
    mtime = first.stat().st_mtime_ns
    second = tk.default_tokenizer_path()
    tk.Tokenizer()
    assert first == second
    assert len(calls) == 1
    assert second.stat().st_mtime_ns == mtime


def test_concurrent_first_use(cache: Path) -> None:
    """Processes racing to train the default model all end up with one valid file."""
    env = dict(os.environ, PAGED_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Load the module file directly: importing the `paged` package would pull in torch (~1 s).
    code = (
        "import importlib.util as u, sys; "
        f"s = u.spec_from_file_location('tok', {str(Path(tk.__file__))!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.Tokenizer().model_path)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    paths = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert [p.name for p in cache.iterdir()] == [Path(paths.pop()).name]


def test_edited_corpus_retrains(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tk.default_tokenizer_path()
    edited = tmp_path / "corpus.txt"
    edited.write_text(tk.default_corpus_path().read_text() + "\nA brand new closing line.\n")
    monkeypatch.setattr(tk, "default_corpus_path", lambda: edited)
    second = tk.default_tokenizer_path()
    assert second != first and second.is_file() and first.is_file()


def test_training_is_deterministic(tmp_path: Path) -> None:
    a = tk.train_tokenizer(tk.default_corpus_path(), tmp_path / "a" / "tok")
    b = tk.train_tokenizer(tk.default_corpus_path(), tmp_path / "b" / "tok")
    # The files differ only in the recorded output prefix; the vocabularies must match.
    assert _pieces(a) == _pieces(b)


def test_user_model_path(tmp_path: Path) -> None:
    corpus = tmp_path / "small.txt"
    corpus.write_text(tk.default_corpus_path().read_text()[:30_000])
    model = tk.train_tokenizer(corpus, tmp_path / "user" / "tokenizer", vocab_size=300)
    tok = tk.Tokenizer(model)
    assert tok.vocab_size == 300
    assert tok.model_path == model
    text = "A garden needs patience."
    assert tok.decode(tok.encode(text)) == text
    assert tk.Tokenizer(str(model)).encode(text) == tok.encode(text)


def test_missing_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        tk.Tokenizer(missing)


def test_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tk.train_tokenizer(tmp_path / "absent.txt", tmp_path / "out")


def _cli(*args: str, cache: Path) -> str:
    env = dict(os.environ, PAGED_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "paged.fms.tokenizer", *args],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )
    return proc.stdout


def test_cli_encode_decode_subprocess(cache: Path, default_tok: tk.Tokenizer) -> None:
    text = SENTENCES[0]
    ids = _cli("encode", text, cache=cache).split()
    assert [int(i) for i in ids] == default_tok.encode(text)
    assert _cli("decode", *ids, cache=cache) == text + "\n"


def test_cli_train_and_model_option(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process through main(): the subprocess test above already covers `python -m`.
    out = tmp_path / "cli" / "mine.model"
    assert tk.main(["train", "--out", str(out), "--vocab-size", "400"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out and out.is_file()
    mine = tk.Tokenizer(out)
    assert mine.vocab_size == 400
    tk.main(["encode", "--model", str(out), "--no-bos", "hi there"])
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == mine.encode("hi there", bos=False)
    tk.main(["decode", "--model", str(out), *ids])
    assert capsys.readouterr().out == "hi there\n"
