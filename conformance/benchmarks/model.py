"""A Llama-shaped decoder over a PagedKVCache, decode steps only, random weights: the whole-step benchmark's model.

gpt-fast style: plain tensors, one short file: the kernel-level whole-step timing, with nothing but the model around
the cache. (FMS's own LLaMA over the paged op, compiled and graphed, is timed end to end by `conformance.fms_bench`.)
Per layer: RMSNorm, fused QKV projection, rotary embedding,
paged attention (`cache.run`), output projection, RMSNorm, SwiGLU MLP; then a final norm and the LM head.
Its inputs are static tensors (`tokens`, `positions`) that the caller refreshes before each step, so a step
can be captured once in a CUDA graph and replayed (`paged.graphs.GraphedStep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paged import CacheSpec, PagedKVCache


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    hq: int
    hkv: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def weight_params(self) -> int:
        """Every parameter: layers, final norm, embedding table and LM head (vocab x hidden each)."""
        per_layer = self.hidden * (self.hq + 2 * self.hkv) * self.head_dim + self.hq * self.head_dim * self.hidden \
            + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


LLAMA3_8B = ModelShape(layers=32, hidden=4096, hq=32, hkv=8, head_dim=128, ffn=14336, vocab=128256)
TINY = ModelShape(layers=2, hidden=64, hq=4, hkv=2, head_dim=16, ffn=128, vocab=256)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., hidden) normalised by its root mean square (in float32), times weight (hidden,)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split layout: x (B, H, D), cos/sin (B, 1, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class PagedDecoder:
    """Random-weight decoder whose attention is a PagedKVCache (one pool per layer).

    Static inputs, refreshed by the caller before each step:
        tokens: (B,) int64, each sequence's newest token.
        positions: (B,) int64, its position (= the sequence's length before the step).
    `forward()` -> logits (B, vocab); the cache must hold a plan of B single-token (decode) rows.
    """

    def __init__(self, shape: ModelShape, cache: PagedKVCache, batch: int, *, seed: int = 0) -> None:
        spec = cache.spec
        assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (shape.layers, shape.hkv, shape.head_dim)
        self.shape, self.cache = shape, cache
        dev, dt = spec.device, spec.dtype
        gen = torch.Generator(device=dev).manual_seed(seed)

        def weight(*size: int) -> torch.Tensor:
            # N(0, 1/fan_in): activations keep unit scale through every layer, so nothing overflows in bf16.
            return (torch.randn(*size, generator=gen, device=dev, dtype=dt) / size[0] ** 0.5)

        H, D, F_ = shape.hidden, shape.head_dim, shape.ffn
        self.embed = torch.randn(shape.vocab, H, generator=gen, device=dev, dtype=dt)
        self.wqkv = [weight(H, (shape.hq + 2 * shape.hkv) * D) for _ in range(shape.layers)]
        self.wo = [weight(shape.hq * D, H) for _ in range(shape.layers)]
        self.w13 = [weight(H, 2 * F_) for _ in range(shape.layers)]
        self.w2 = [weight(F_, H) for _ in range(shape.layers)]
        self.norms = torch.ones(2 * shape.layers + 1, H, device=dev, dtype=dt)
        self.lm_head = weight(H, shape.vocab)
        self.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))   # (D/2,)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)

    def forward(self) -> torch.Tensor:
        s = self.shape
        B, D = self.tokens.shape[0], s.head_dim
        angles = self.positions[:, None].float() * self.inv_freq                   # (B, D/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]                    # (B, 1, D/2)
        x = self.embed[self.tokens]                                                # (B, H)
        for layer in range(s.layers):
            h = rms_norm(x, self.norms[2 * layer])
            qkv = h @ self.wqkv[layer]                                             # (B, (Hq + 2 Hkv) D)
            q, k, v = qkv.split([s.hq * D, s.hkv * D, s.hkv * D], dim=-1)
            q = rotate(q.view(B, s.hq, D), cos, sin)                               # (B, Hq, D)
            k = rotate(k.view(B, s.hkv, D), cos, sin)                              # (B, Hkv, D)
            v = v.reshape(B, s.hkv, D)
            att = self.cache.run(layer, q[:, None], k[:, None], v[:, None])        # (B, 1, Hq, D)
            x = x + att.reshape(B, s.hq * D) @ self.wo[layer]                      # (B, H)
            h = rms_norm(x, self.norms[2 * layer + 1])
            gate, up = (h @ self.w13[layer]).chunk(2, dim=-1)                      # (B, F) each
            x = x + (F.silu(gate) * up) @ self.w2[layer]                           # (B, H)
        return rms_norm(x, self.norms[-1]) @ self.lm_head                          # (B, vocab)


def decoder_cache_spec(shape: ModelShape, num_pages: int, page: int, max_seq_len: int,
                       dtype: torch.dtype, device: torch.device) -> CacheSpec:
    return CacheSpec(num_layers=shape.layers, num_kv_heads=shape.hkv, head_dim=shape.head_dim, page_size=page,
                     num_pages=num_pages, max_seq_len=max_seq_len, dtype=dtype, device=device)
