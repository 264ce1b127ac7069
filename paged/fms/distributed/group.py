"""This process's place in the tensor-parallel group: joining it (torchrun or a group of one), leaving it, and
loading the model sharded over it."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from paged.errors import UnsupportedConfigError

__all__ = ["DistContext", "setup", "teardown", "load_tp_model"]


@dataclass
class DistContext:
    """This process's place in the tensor-parallel group.

    Attributes:
        rank, world_size, local_rank: from the process group (``local_rank`` from torchrun's LOCAL_RANK).
        device: where this rank's model and cache live (``cuda:<local_rank>`` or cpu).
        group: the process group the model is sharded over (passed to FMS ``get_model(group=...)``).
        control: a gloo group over the same ranks for the cache's votes (host tensors only).
        backend: "nccl" or "gloo".
        owns_group: whether :func:`setup` initialised the default group (then :func:`teardown` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any
    control: Any
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | torch.device | None = None, *, backend: str | None = None,
          timeout_s: float = 600.0) -> DistContext:
    """Join (or create) the process group torchrun describes in the environment; return this rank's context.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them. Without them (a
    plain ``python`` run) it makes a group of one. ``device`` defaults to CUDA when a GPU is visible;
    ``backend`` to nccl on CUDA and gloo on CPU. ``timeout_s`` bounds every collective (the model's and the
    votes'), so a rank that dies mid-step turns into an error on the others instead of a hang.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedConfigError("device cuda requested but no CUDA GPU is visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UnsupportedConfigError(f"device must be cpu or cuda, got {device}")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise UnsupportedConfigError(f"{', '.join(missing)} not set: launch with torchrun")
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            # A group of one (plain python): the same code path with no peers.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    group = dist.group.WORLD
    # The votes go over gloo on the host even when the model all-reduces over NCCL: a vote never waits
    # behind the GPU stream, and a rank stuck in a model collective cannot be mistaken for a vote.
    control = dist.new_group(backend="gloo", timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, group, control, backend, owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def load_tp_model(model_path: str | os.PathLike[str], ctx: DistContext, *,
                  dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a local HF-format checkpoint sharded over ``ctx.group`` with FMS's tensor parallelism, in eval mode.

    Every rank reads the same checkpoint and keeps its own shard (``distributed_strategy="tp"``).
    FMS prints its loading chatter to stdout; it goes to stderr on rank 0 and nowhere on the others, so
    stdout carries the generated text only.
    """
    from fms.models import get_model

    path = Path(model_path)
    if not (path / "config.json").is_file():
        # Without this FMS treats a missing local path as a hub id and tries to download it.
        raise FileNotFoundError(f"no HF checkpoint (config.json) in {path}")
    dtype = dtype or (torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    sink = sys.stderr if ctx.is_main else io.StringIO()
    with contextlib.redirect_stdout(sink):
        model = get_model("hf_pretrained", model_path=str(path), device_type=ctx.device.type, data_type=dtype,
                          distributed_strategy="tp", group=ctx.group)
    return model.eval()

