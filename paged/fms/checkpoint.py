"""Tiny random-weight Llama models for tests and examples, with no download.

- :func:`write_tiny_llama_checkpoint` writes an HF-format checkpoint (``config.json`` +
  ``model.safetensors``) that FMS loads through ``get_model("hf_pretrained", model_path=...)``.
- :func:`load_fms_llama` loads such a directory (or any local HF Llama) as an FMS model.
- :func:`tiny_llama` builds a seeded FMS ``LLaMA`` directly, for tests that need no files.

FMS's HF adapter reads only some of the HF Llama config: it derives the head size as
``hidden_size // num_attention_heads`` (ignoring ``head_dim``), always uses SiLU, reads
``rope_theta`` but maps no ``rope_type`` other than plain RoPE correctly, and computes the MLP
width as ``int(intermediate_size / hidden_size * hidden_size)``. The writer only produces
configs inside that set, and checks it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["IncompleteCheckpointError", "check_checkpoint_complete", "load_fms_llama", "tiny_llama",
           "write_tiny_llama_checkpoint"]


class IncompleteCheckpointError(ValueError):
    """A checkpoint whose tensors do not match its own config: missing, unexpected or misshapen names."""


def write_tiny_llama_checkpoint(
    directory: str | os.PathLike[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    rope_theta: float = 10_000.0,
    rms_norm_eps: float = 1e-5,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_path: str | os.PathLike[str] | None = None,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 3,
) -> Path:
    """Write a seeded random-weight HF Llama checkpoint into ``directory`` and return it.

    The same arguments always give the same weights (the global RNG is left untouched).
    ``tokenizer_path``, if given, is copied beside the weights as ``tokenizer.model``.
    The default special-token ids match :mod:`paged.fms.tokenizer`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    _check_fms_shape(hidden_size, num_heads, num_kv_heads, intermediate_size)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    _save_seeded(LlamaForCausalLM, config, seed, dtype, out)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


def _check_fms_shape(hidden_size: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Refuse a Llama shape FMS's HF adapter would not load back as written (ValueError)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            "need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, got "
            f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    # FMS rebuilds the MLP width from the float ratio intermediate/hidden; refuse a size
    # that does not survive the round trip rather than load mismatched shapes later.
    if int(intermediate_size / hidden_size * hidden_size) != intermediate_size:
        raise ValueError(f"intermediate_size={intermediate_size} does not round-trip through FMS")


def _save_seeded(model_class: type, config: object, seed: int, dtype: torch.dtype, out: Path) -> None:
    """Build `model_class(config)` with weights drawn from `seed` (global RNG untouched), save it to `out`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"transformers did not write {out / 'model.safetensors'}")


def load_fms_llama(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Load a local HF-format Llama directory as an FMS model in eval mode.

    Strict: the checkpoint's tensors must be exactly those its ``config.json`` implies (FMS itself would
    leave uninitialised weights where a tensor is missing); otherwise IncompleteCheckpointError names them.
    """
    from fms.models import get_model

    path = Path(path)
    if not (path / "config.json").is_file():
        # Without this check FMS treats a missing local path as a hub id and tries to download.
        raise FileNotFoundError(f"no HF checkpoint (config.json) in {path}")
    check_checkpoint_complete(path)
    model = get_model(
        "hf_pretrained",
        model_path=str(path),
        device_type=torch.device(device).type,
        data_type=dtype,
    )
    return model.eval()


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's ``*.safetensors`` (or ``*.bin``) files, read lazily."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes
    for f in sorted(path.glob("*.bin")):
        state = torch.load(f, map_location="meta", weights_only=True, mmap=True)
        shapes.update({name: tuple(t.shape) for name, t in state.items()})
    if not shapes:
        raise IncompleteCheckpointError(f"no weights (*.safetensors or *.bin) in {path}")
    return shapes


def _expected_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape the config implies, names that may be absent) for an HF checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    return expected, optional


def check_checkpoint_complete(path: str | os.PathLike[str]) -> None:
    """Raise IncompleteCheckpointError unless the checkpoint holds exactly the tensors its config implies.

    Names every missing, unexpected and misshapen tensor (first few of each, and the counts). Reads only
    the files' headers, and builds the expected model on the meta device (no memory, no weights).
    """
    path = Path(path)
    present = _checkpoint_shapes(path)
    expected, optional = _expected_shapes(path)
    missing = sorted(set(expected) - set(present) - optional)
    unexpected = sorted(set(present) - set(expected))
    misshapen = sorted(f"{n} {present[n]} (config implies {expected[n]})" for n in set(present) & set(expected)
                       if present[n] != expected[n])
    problems = [f"{len(items)} {what}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                if items]
    if problems:
        raise IncompleteCheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))


def tiny_llama(
    *,
    nheads: int = 4,
    kvheads: int = 2,
    emb_dim: int = 64,
    nlayers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_expected_seq_len: int = 512,
    hidden_grow_factor: float = 2.0,
) -> torch.nn.Module:
    """Build a seeded random-weight FMS ``LLaMA`` in eval mode (``kvheads < nheads`` is GQA).

    Weights are drawn on the CPU, so one seed gives the same model on every device.
    """
    from fms.models.llama import LLaMA, LLaMAConfig

    config = LLaMAConfig(
        src_vocab_size=vocab_size,
        emb_dim=emb_dim,
        nheads=nheads,
        kvheads=kvheads,
        nlayers=nlayers,
        max_expected_seq_len=max_expected_seq_len,
        hidden_grow_factor=hidden_grow_factor,
        multiple_of=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaMA(config)
        model.reset_parameters()
    model = model.to(device=device, dtype=dtype)
    # Recomputes the RoPE tables on the model's device.
    model.post_init()
    return model.eval()
