"""CacheSpec: the shape of a KV cache, shared by the paged backend, the oracle and the conformance suite."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from paged.errors import UnsupportedConfigError

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SLOTS = 2**31 - 1  # pool slots per layer and positions per sequence: int32 on the device


@dataclass(frozen=True)
class CacheSpec:
    """What a KV cache holds.

    Attributes:
        num_layers: transformer layers; each has its own K and V pool.
        num_kv_heads: Hkv, the key/value heads stored per token (queries may have Hq = g * Hkv heads).
        head_dim: D, the size of one head's key/value vector.
        page_size: P, tokens per page (the FlexAttention KV block size).
        num_pages: N, pages in the fixed pool; total capacity is N * P token slots per layer.
        max_seq_len: longest sequence any request may grow to.
        dtype: storage and compute dtype of K/V (float32, bfloat16 or float16).
        device: where the pools live.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    max_seq_len: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except (RuntimeError, TypeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedConfigError(f"device {self.device!r} is not a device here: {reason}") from None
        self.validate()

    @property
    def max_pages_per_seq(self) -> int:
        """Pages one sequence of `max_seq_len` tokens occupies."""
        return math.ceil(self.max_seq_len / self.page_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's K and V take over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def validate(self) -> None:
        """Raise UnsupportedConfigError for a configuration the kernel cannot take."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size", "num_pages", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UnsupportedConfigError(f"{name} must be a positive int, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedConfigError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        p = self.page_size
        if p & (p - 1):
            raise UnsupportedConfigError(
                f"page_size must be a power of two (it is FlexAttention's KV block size), got {p}")
        if self.device.type == "cuda":
            # Triton's flex kernels tile keys in blocks of at least 16 that must divide the KV block size.
            if p < 16:
                raise UnsupportedConfigError(f"page_size must be >= 16 on CUDA (the kernel's smallest key tile), got {p}")
            if self.head_dim < 16 or self.head_dim & (self.head_dim - 1):
                raise UnsupportedConfigError(
                    f"head_dim must be a power of two >= 16 for FlexAttention on CUDA, got {self.head_dim}")
        # Pool slots and positions are int32 on the device (FlexAttention's kv_idx, the logical positions computed
        # from the int32 page -> logical table, the plan's q_start): past 2**31 - 1 they would wrap.
        if self.num_pages * p > MAX_SLOTS:
            raise UnsupportedConfigError(
                f"num_pages * page_size = {self.num_pages * p} pool slots; at most {MAX_SLOTS} (2**31 - 1): slots are "
                f"int32 on the device")
        if self.max_seq_len > MAX_SLOTS:
            raise UnsupportedConfigError(f"max_seq_len must be at most {MAX_SLOTS} (2**31 - 1): positions are int32 "
                                         f"on the device, got {self.max_seq_len}")
        if self.max_pages_per_seq > self.num_pages:
            raise UnsupportedConfigError(
                f"max_seq_len {self.max_seq_len} needs {self.max_pages_per_seq} pages but the pool has only "
                f"{self.num_pages}")
