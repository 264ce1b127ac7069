"""The cached Triton launch (paged.kernels.triton_launch): the same results as Triton's own launch, a new Triton
launch whenever the arguments would specialize differently, and Triton's own path wherever the cached one must not
run (interpreter, launch hooks, switched off).

The cached path exists only on a GPU (a compiled kernel); on the CPU these tests check the fallback and the
launcher's contract.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_triton_decode import reference

triton_decode = pytest.importorskip("paged.triton_decode")
if triton_decode.triton is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
from paged.kernels import triton_launch  # noqa: E402
from paged.kernels.triton_launch import CachedLauncher  # noqa: E402
from paged.kernels.triton_worklist import (_merge_kernel, item_partials, items_meta, launch_items,  # noqa: E402
                                           work_list)


class _Case:
    """One decode step of 4 rows (one long enough to be split) over pages at random, with its launchers."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        gen = torch.Generator().manual_seed(7)
        self.lens, self.hq, self.hkv, self.d, self.page = [300, 17, 1, 64], 8, 2, 64, 16
        pages = [math.ceil(n / self.page) for n in self.lens]
        perm = torch.randperm(sum(pages) + 4, generator=gen).int()
        self.table = torch.full((len(self.lens), max(pages)), -1, dtype=torch.int32)
        for b, used in enumerate(np.cumsum([0] + pages)[:-1]):
            self.table[b, :pages[b]] = perm[used:used + pages[b]]
        slots = (sum(pages) + 4) * self.page
        self.k, self.v = (torch.randn(self.hkv, slots, self.d, generator=gen).to(dtype).to(device) for _ in "kv")
        self.q_all = torch.randn(len(self.lens), 3, self.hq, self.d, generator=gen).to(dtype).to(device)
        self.q_start = torch.tensor([n - 1 for n in self.lens], dtype=torch.int32, device=device)
        self.q_len = torch.ones(len(self.lens), dtype=torch.int32, device=device)
        items, first, count, _ = work_list(np.array(self.lens), len(self.lens), self.hkv, self.hq // self.hkv, 16,
                                           device, target=12, min_keys=16)
        assert count.max() > 1, "the case must split a row (the merge runs)"
        self.work = [torch.from_numpy(a).to(device) for a in (items, first, count)]
        M = items.shape[1]
        self.launchers = items_meta(dtype, device, self.hq, self.hkv, self.d, self.page, 16, 4, 2, M,
                                    write_new=False)
        self.partials = item_partials(M, self.hq, self.d, device)
        self.table = self.table.to(device)

    def run(self, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return launch_items(self.launchers, q, self.k, self.v, None, None, self.table, self.q_start, self.q_len,
                            *self.work, 0.125, out, *self.partials)

    def gold(self, q: torch.Tensor) -> torch.Tensor:
        return reference(q, self.k, self.v, self.table.cpu(), self.lens, self.page, 0.125)


@pytest.mark.gpu
def test_cached_launches_equal_tritons_own_and_respecialize(device):
    """Launch after launch on the same arguments skips Triton's binder; a query view that Triton specializes
    differently (another batch stride; an address off 16-byte alignment) takes a new launch through Triton, and
    every result equals Triton's own launch's, bit for bit, and float64 attention."""
    if device.type != "cuda":
        pytest.skip("the cached path needs a compiled kernel (CUDA)")
    case = _Case(device)
    item, merge = case.launchers
    views = {"stride 3": case.q_all[:, 1], "contiguous": case.q_all[:, 1].contiguous(),
             "misaligned": torch.empty(case.q_all[:, 1].numel() + 1, device=device)[1:].view_as(case.q_all[:, 1])}
    views["misaligned"].copy_(case.q_all[:, 1])
    assert views["misaligned"].data_ptr() % 16 != 0
    for name, q in views.items():
        triton_launch.ENABLED = False
        try:
            plain = case.run(q).clone()
        finally:
            triton_launch.ENABLED = True
        before = item.cached_launches
        first = case.run(q).clone()                             # a new key: through Triton, kept
        assert item.cached_launches == before, f"{name}: a launch of an unseen layout must go through Triton"
        again = [case.run(q).clone() for _ in range(3)]
        assert item.cached_launches == before + 3 and merge.cached_launches >= 3, name
        for out in (first, *again):
            assert torch.equal(out, plain), f"{name}: the cached launch differs from Triton's own"
        assert (plain.double().cpu() - case.gold(q)).abs().max().item() <= 1e-4, name
    assert len(item._runners) == len(views), "each layout must have its own runner"


@pytest.mark.gpu
def test_a_launch_hook_takes_tritons_path(device, monkeypatch):
    """With a launch hook set (a profiler), every launch goes through Triton, which calls the hook."""
    if device.type != "cuda":
        pytest.skip("the cached path needs a compiled kernel (CUDA)")
    from triton import knobs

    case = _Case(device)
    q = case.q_all[:, 1]
    case.run(q)
    seen = []
    hook = knobs.runtime.launch_enter_hook
    record = lambda *a: seen.append(1)                          # noqa: E731
    if hasattr(hook, "add"):                                    # Triton >= 3.5: a chain of hooks
        hook.add(record)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", record)
    before = case.launchers[0].cached_launches
    try:
        out = case.run(q)
    finally:
        if hasattr(hook, "remove"):
            hook.remove(record)
    assert case.launchers[0].cached_launches == before and len(seen) == 2, "both launches must call the hook"
    assert (out.double().cpu() - case.gold(q)).abs().max().item() <= 1e-4


def test_only_a_present_hook_counts_as_set(monkeypatch):
    """Triton >= 3.5 keeps an empty hook chain where earlier versions kept None: only a chain with calls, or a
    function, is a hook that the cached path would skip."""
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    monkeypatch.setattr(triton_launch, "INTERPRETED", False)
    for hook, plain in ((None, False), (Chain([]), False), (Chain([print]), True), (print, True)):
        monkeypatch.setattr(triton_launch, "_launch_hook", lambda hook=hook: hook)
        assert triton_launch._plain_only() is plain, hook
    monkeypatch.setattr(triton_launch, "INTERPRETED", True)
    assert triton_launch._plain_only()


def test_interpreted_launches_take_tritons_path(kernel_device):
    """Under Triton's interpreter there is no compiled kernel: every launch is Triton's own, and right."""
    if kernel_device.type != "cpu":
        pytest.skip("the interpreter runs on the CPU")
    case = _Case(kernel_device)
    q = case.q_all[:, 1]
    for _ in range(2):
        out = case.run(q)
        assert (out.double() - case.gold(q)).abs().max().item() <= 1e-4
    assert [launcher.cached_launches for launcher in case.launchers] == [0, 0]


def test_constexprs_must_be_the_last_parameters():
    """The cached path passes constexprs after the call's tensors and scalars: a launcher whose constexprs are not
    the kernel's last parameters is refused when it is made, not launched wrong."""
    with pytest.raises(ValueError, match="must be its last parameters"):
        CachedLauncher(_merge_kernel, dict(HEAD_DIM=64, D_PAD=64, num_q_heads=8), {})
    launcher = CachedLauncher(_merge_kernel, dict(HEAD_DIM=64, D_PAD=64, ITEMS=32), dict(num_warps=4))
    assert launcher._tail == (64, 64, 32)
