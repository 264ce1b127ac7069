"""Model shapes, and one set of random weights as a transformers model and as an FMS model.

The weights are drawn once, by transformers (`LlamaForCausalLM`, its own initialisation, on the target device),
and converted in memory to FMS's layout by FMS's own HF adapter (`load_state_dict_into_model(..., source="hf")`,
the path `get_model("hf_pretrained", ...)` takes): both models compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: transformers LlamaConfig fields per shape. 1b: the Llama-3.2-1B shape; 8b: the Llama-3-8B shape.
SHAPES: dict[str, dict[str, Any]] = {
    "micro": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
ROPE_THETA = 500_000.0


@dataclass
class ModelPair:
    """The same weights as a transformers model (`hf`) and an FMS model (`fms`), both in eval mode."""

    size: str
    hf: torch.nn.Module
    fms: torch.nn.Module
    weight_bytes: int            # every distinct parameter once (tied embeddings once)
    kv_bytes_per_token: int      # K + V of every layer for one token

    @property
    def vocab(self) -> int:
        return SHAPES[self.size]["vocab_size"]


def build_pair(size: str, device: torch.device, dtype: torch.dtype, max_len: int, seed: int = 0) -> ModelPair:
    """Random weights of shape `size` as both models, on `device` in `dtype`; RoPE tables cover `max_len`."""
    from fms.models.llama import LLaMA, LLaMAConfig
    from fms.utils import serialization
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[size]
    max_len = max(max_len, 4096)
    hf_config = LlamaConfig(**shape, max_position_embeddings=max_len, rope_theta=ROPE_THETA, rms_norm_eps=1e-5,
                            bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            hf = LlamaForCausalLM(hf_config).to(dtype).eval()
    hf.generation_config.eos_token_id = None          # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    fms_config = LLaMAConfig(
        src_vocab_size=shape["vocab_size"], emb_dim=shape["hidden_size"], nheads=shape["num_attention_heads"],
        kvheads=shape["num_key_value_heads"], nlayers=shape["num_hidden_layers"],
        hidden_grow_factor=shape["intermediate_size"] / shape["hidden_size"], multiple_of=1,
        max_expected_seq_len=max_len, rope_theta=ROPE_THETA, norm_eps=1e-5, tie_heads=shape["tie_word_embeddings"])
    with torch.device("meta"):
        fms = LLaMA(fms_config)
    fms = fms.to_empty(device=device).to(dtype)       # load_state_dict_into_model copies into the params' dtype
    serialization.load_state_dict_into_model(fms, dict(hf.state_dict()), architecture="llama", source="hf",
                                             dtype=dtype, initial_device=device)
    fms.post_init()
    fms.eval()
    wrong = {str(p.dtype) for p in fms.parameters()} - {str(dtype)}
    if wrong:
        raise RuntimeError(f"FMS model has parameters of dtype {wrong}, expected {dtype}")
    params = {p.data_ptr(): p for p in hf.parameters()}
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * dtype.itemsize
    return ModelPair(size, hf, fms, sum(p.numel() * p.element_size() for p in params.values()), kv)
