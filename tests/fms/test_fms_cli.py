"""`python -m paged.fms generate`: the checkpoint's own tokenizer (sentencepiece or HF tokenizer.json), refusals
with one-line errors (no tokenizer, vocabulary mismatch, missing model, too-long prompt), the model's EOS id,
and the --eager / --no-graphs flags (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paged.fms.__main__ import main
from paged.fms.checkpoint import write_tiny_llama_checkpoint
from paged.fms.tokenizer import default_corpus_path

BASE = ["generate", "--prompt", "The cache holds", "--eager", "--no-progress"]


def _hf_tokenizer_json(directory: Path, vocab_size: int = 300) -> Path:
    """A BPE tokenizer.json trained here from the shipped corpus with `tokenizers` (no network), plus its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(default_corpus_path())], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "pad_token": "<pad>", "unk_token": "<unk>"}))
    return directory / "tokenizer.json"


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    path = write_tiny_llama_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", vocab_size=512)
    _hf_tokenizer_json(path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*BASE, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_checkpoint_without_tokenizer_is_refused(tmp_path, capsys):
    path = write_tiny_llama_checkpoint(tmp_path / "ckpt")
    capsys.readouterr()                                   # the writer's progress bar
    code, out, err = _run(capsys, "--model-path", str(path), "--max-new-tokens", "2")
    assert code == 2 and out == ""
    assert "has no tokenizer.model (sentencepiece) or tokenizer.json (HF); pass --tokenizer PATH" in err
    assert len(err.strip().splitlines()) == 1


def test_hf_tokenizer_json_from_the_checkpoint(hf_checkpoint, capsys):
    code, out, err = _run(capsys, "--model-path", str(hf_checkpoint), "--max-new-tokens", "4", "--echo")
    assert code == 0, err
    assert out.startswith("The cache holds") and len(out.strip().splitlines()) == 1


def test_generation_stops_at_the_models_own_eos(hf_checkpoint, tmp_path, capsys):
    """The model's config.json eos_token_id (not the tokenizer's) ends generation."""
    from paged.fms.tokenizer import HFTokenizer

    tok = HFTokenizer(hf_checkpoint)
    code, free, _ = _run(capsys, "--model-path", str(hf_checkpoint), "--max-new-tokens", "6")
    assert code == 0
    first = tok.encode(free.rstrip("\n"), bos=False)[0]       # the first token greedy decoding emits
    stopping = tmp_path / "ckpt"
    stopping.mkdir()
    for f in hf_checkpoint.iterdir():
        (stopping / f.name).symlink_to(f) if f.name != "config.json" else None
    config = json.loads((hf_checkpoint / "config.json").read_text())
    (stopping / "config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    code, stopped, err = _run(capsys, "--model-path", str(stopping), "--max-new-tokens", "6")
    assert code == 0, err
    assert stopped == tok.decode([first]) + "\n" and len(stopped) < len(free)


def test_vocabulary_mismatch_is_refused(tmp_path, capsys):
    path = write_tiny_llama_checkpoint(tmp_path / "ckpt", vocab_size=256)
    code, out, err = _run(capsys, "--model-path", str(path), "--tokenizer", str(_hf_tokenizer_json(tmp_path / "t")),
                          "--max-new-tokens", "2")
    assert code == 2 and "vocabulary mismatch: the tokenizer" in err and "has 300 ids" in err and "has 256" in err


def test_missing_model_directory(tmp_path, capsys):
    code, out, err = _run(capsys, "--model-path", str(tmp_path / "nope"), "--max-new-tokens", "2")
    assert code == 2 and f"--model-path {tmp_path / 'nope'}: no such directory" in err


def test_incomplete_checkpoint_is_a_clean_error(hf_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "ckpt"
    broken.mkdir()
    for f in hf_checkpoint.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).symlink_to(f)
    state = load_file(hf_checkpoint / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, out, err = _run(capsys, "--model-path", str(broken), "--max-new-tokens", "2")
    assert code == 2 and "1 missing: model.layers.0.mlp.down_proj.weight" in err and "Traceback" not in err


def test_too_long_prompt_is_a_clean_error(capsys):
    code, out, err = _run(capsys, "--prompt", "word " * 200, "--token-budget", "64", "--max-new-tokens", "4")
    assert code == 2 and out == "" and "prompt lengths in tokens" in err and "--token-budget 64" in err


def test_no_graphs_passes_cuda_graphs_false(monkeypatch, capsys):
    import paged.fms.generate as generate

    seen = []
    real = generate.PagedGenerator

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "PagedGenerator", spy)
    assert _run(capsys, "--max-new-tokens", "1", "--no-graphs")[0] == 0
    assert _run(capsys, "--max-new-tokens", "1")[0] == 0
    assert seen[0]["cuda_graphs"] is False and seen[1]["cuda_graphs"] is None     # None: the generator's default


def test_help_documents_eager_and_no_graphs(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--eager run attention as uncompiled FlexAttention" in text and "--no-graphs do not replay" in text
