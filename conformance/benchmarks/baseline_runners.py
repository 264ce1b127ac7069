"""The baselines without our paging: SDPA and FlexAttention over a padded contiguous cache, and FlashInfer's paged decode."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from conformance.benchmarks.grid import Case
from conformance.benchmarks.harness import BenchSettings
from conformance.benchmarks.pools import DTYPES, PoolConfig
from conformance.benchmarks.runner import Runner, Unavailable
from paged.attention import compiled_flex_attention, decode_kernel_defaults


class SdpaRunner(Runner):
    name = "sdpa"

    def __init__(self, case: Case, lens: list[int], device: torch.device):
        B, C, hkv, D = case.batch, case.q_len, case.hkv, case.head_dim
        self.hkv, self.g = hkv, case.hq // hkv
        dt = DTYPES[case.dtype]
        self.max_len = max_len = -(-(max(lens) + C) // 64) * 64
        self.k = torch.zeros(B, hkv, max_len, D, dtype=dt, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.tensor(lens, device=device)[:, None] + torch.arange(C, device=device)      # (B, C)
        self.bidx = torch.arange(B, device=device)[:, None].expand(B, C)
        visible = torch.arange(max_len, device=device)[None, None, :] <= self.pos[:, :, None]    # (B, C, S)
        if C == 1:
            visible = visible[:, None]                       # (B, 1, 1, S): broadcast over heads and g rows
        else:
            visible = visible[:, None, None].expand(B, 1, self.g, C, max_len).reshape(B, 1, self.g * C, max_len)
        self.mask = torch.zeros(visible.shape, dtype=dt, device=device).masked_fill_(~visible, float("-inf"))

    def fill(self, b: int, K, V) -> None:
        self.k[b, :, :K.shape[0]] = K.transpose(0, 1)
        self.v[b, :, :V.shape[0]] = V.transpose(0, 1)

    def step(self, q, k, v):
        B, C, Hq, D = q.shape
        self.k[self.bidx, :, self.pos] = k
        self.v[self.bidx, :, self.pos] = v
        qr = q.view(B, C, self.hkv, self.g, D).permute(0, 2, 3, 1, 4).reshape(B, self.hkv, self.g * C, D)
        o = F.scaled_dot_product_attention(qr, self.k, self.v, attn_mask=self.mask)
        return o.view(B, self.hkv, self.g, C, D).permute(0, 3, 1, 2, 4).reshape(B, C, Hq, D)


class FlexContiguousRunner(Runner):
    name = "flexcontig"

    def __init__(self, case: Case, lens: list[int], settings: BenchSettings):
        dev, B, C = settings.device, case.batch, case.q_len
        self.max_len = max_len = -(-(max(lens) + C) // 128) * 128
        self.k = torch.zeros(B, case.hkv, max_len, case.head_dim, dtype=DTYPES[case.dtype], device=dev)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(C, device=dev)           # (B, C)
        self.bidx = torch.arange(B, device=dev)[:, None].expand(B, C)
        pos = self.pos

        def causal_within_length(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b, q_idx]

        self.block_mask = create_block_mask(causal_within_length, B, None, C, max_len, device=dev)
        self.options = {**(decode_kernel_defaults(dev) if C == 1 else {}), **(settings.kernel_options or {})}

    def fill(self, b: int, K, V) -> None:
        self.k[b, :, :K.shape[0]] = K.transpose(0, 1)
        self.v[b, :, :V.shape[0]] = V.transpose(0, 1)

    def step(self, q, k, v):
        self.k[self.bidx, :, self.pos] = k
        self.v[self.bidx, :, self.pos] = v
        out = compiled_flex_attention()(q.transpose(1, 2), self.k, self.v, block_mask=self.block_mask,
                                        enable_gqa=q.shape[2] != self.k.shape[1], kernel_options=self.options)
        return out.transpose(1, 2)                                                                # (B, C, Hq, D)


class FlashInferRunner(Runner):
    name = "flashinfer"

    def __init__(self, case: Case, lens: list[int], pool: PoolConfig, settings: BenchSettings):
        if not settings.cuda:
            raise Unavailable("FlashInfer runs on CUDA only")
        if case.kind != "decode":
            raise Unavailable("FlashInfer is benchmarked through its decode wrapper only")
        try:
            import flashinfer
        except Exception as exc:
            raise Unavailable(f"import flashinfer failed: {exc!r}") from exc
        dev, P, dt = settings.device, case.page, DTYPES[case.dtype]
        self.page = P
        n_pages = [math.ceil((n + 1) / P) for n in lens]
        N = pool.num_pages
        if sum(n_pages) > N:
            raise Unavailable(f"needs {sum(n_pages)} pages, the pool has {N}")
        self.kv = torch.zeros(N, 2, P, case.hkv, case.head_dim, dtype=dt, device=dev)
        gen = torch.Generator().manual_seed(case.seed)
        perm = torch.randperm(N, generator=gen)[:sum(n_pages)].to(torch.int32)       # pages at random
        self.pages = list(torch.split(perm.to(dev), n_pages))
        indptr = torch.tensor([0] + n_pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        last = torch.tensor([(n + 1) - (m - 1) * P for n, m in zip(lens, n_pages)], dtype=torch.int32)
        self.new_page = torch.stack([p[n // P] for p, n in zip(self.pages, lens)]).long()
        self.new_off = torch.tensor([n % P for n in lens], device=dev)
        self.workspace = torch.zeros(128 * 2**20, dtype=torch.uint8, device=dev)
        # FlashInfer's tensor-core (prefill-style) decode kernel: its own advice for GQA groups >= 4, and on an H200
        # (torch 2.11, FlashInfer 0.6.13) 1.05-2.5x faster than its default on every case of the small grid, so
        # the baseline is FlashInfer at its best. PAGED_BENCH_FLASHINFER_TENSOR_CORES=0 restores its default.
        tensor_cores = os.environ.get("PAGED_BENCH_FLASHINFER_TENSOR_CORES", "1") != "0"
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD",
                                                                     use_tensor_cores=tensor_cores)
        self.wrapper.plan(indptr.to(dev), perm.to(dev), last.to(dev), case.hq, case.hkv, case.head_dim, P,
                          q_data_type=dt, kv_data_type=dt)
        self.version = getattr(flashinfer, "__version__", "?")

    def fill(self, b: int, K, V) -> None:
        t = torch.arange(K.shape[0], device=K.device)
        p, o = self.pages[b].long()[t // self.page], t % self.page
        self.kv[:, 0][p, o] = K
        self.kv[:, 1][p, o] = V

    def step(self, q, k, v):
        self.kv[:, 0][self.new_page, self.new_off] = k[:, 0]
        self.kv[:, 1][self.new_page, self.new_off] = v[:, 0]
        return self.wrapper.run(q[:, 0], self.kv)[:, None]
