"""Launch a Triton kernel again with less host time than `kernel[grid](...)`.

`kernel[grid](*args, **constexprs)` binds and specializes every argument, builds a string key from them and looks
the compiled kernel up, on every call: tens of microseconds of Python per launch on a server host, paid twice per
layer by a decode step, whose launches specialize the same way step after step. `CachedLauncher` sends the first
launch of each *specialization key* through Triton (which compiles if it must and returns the compiled kernel) and
the later ones straight to that compiled kernel's launcher (`CompiledKernel[grid]`, Triton's own runner).

The key holds everything Triton specializes a launch on, read cheaply: every tensor's dtype and its address modulo 16
(Triton specializes pointers on 16-byte alignment), every int's value (Triton specializes ints on == 1, divisibility
by 16 and bit width: keying on the value is stricter), the grid and the current device. Floats are never specialized
(the key holds only that they are floats); constexprs and launch options are fixed per launcher.

The plain launch is used instead under Triton's interpreter (no compiled kernel), while a launch hook is set (a
profiler's: the cached path would not call it), when `PAGED_TRITON_CACHED_LAUNCH=0` was set before import or
`ENABLED` is False (the A/B of `conformance/benchmarks/test_host_overhead.py`).
"""

from __future__ import annotations

import os

import torch

from paged.kernels.triton_sizing import triton

#: Use the cached path where it applies (module switch; the env var sets its start value).
ENABLED = os.environ.get("PAGED_TRITON_CACHED_LAUNCH", "1") != "0"
#: Triton's interpreter is on (read once, as Triton does: it must be set before Triton is imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if triton is not None:
    from triton.runtime import driver
    try:
        from triton import knobs                                # Triton >= 3.3

        def _launch_hook():
            return knobs.runtime.launch_enter_hook
    except ImportError:
        from triton.compiler import CompiledKernel

        def _launch_hook():
            return getattr(CompiledKernel, "launch_enter_hook", None)


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of t's device (never on the CPU): launches a
    step would skip must then be recorded all the same, for the replays of later steps."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _plain_only() -> bool:
    """Whether this launch must go through Triton's own path: interpreter on, or a launch hook set (Triton >= 3.5
    keeps an always-present, usually empty `HookChain` there; earlier versions None or a function)."""
    if INTERPRETED:
        return True
    hook = _launch_hook()
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLauncher:
    """One Triton kernel with fixed constexprs and launch options, launched as `launcher(grid, tensors, scalars)`.

    The kernel's parameters must be its tensors first, then its scalars (ints, floats), then its constexprs: the
    order of `tensors` + `scalars` is the kernel's own. Runners are kept per key for the launcher's life (a decode
    bucket sees one or two keys: one per layout of q/k/v).
    """

    def __init__(self, kernel, constexprs: dict, options: dict) -> None:
        self.kernel = kernel
        self.constexprs = constexprs
        self.options = options
        names = list(kernel.arg_names)
        tail = names[len(names) - len(constexprs):]
        if sorted(tail) != sorted(constexprs):
            raise ValueError(f"{kernel.__name__}: the constexprs {sorted(constexprs)} must be its last parameters, "
                             f"not {tail}")
        self._tail = tuple(constexprs[n] for n in tail)         # constexprs in parameter order
        self._runners: dict[tuple, object] = {}
        self.cached_launches = 0                                 # launches that skipped Triton's binder (tests)
        #: Launched at least once (either path), so its binary is loaded: a caller that skips launches when they
        #: would do nothing must not skip one never launched, or its first launch may fall inside a CUDA graph
        #: capture, where loading a module is not permitted.
        self.launched = False

    def __call__(self, grid: tuple[int, ...], tensors: tuple[torch.Tensor, ...], scalars: tuple) -> None:
        if not ENABLED or _plain_only():
            self.kernel[grid](*tensors, *scalars, **self.constexprs, **self.options)
            self.launched = True
            return
        device = driver.active.get_current_device()
        key = (device, grid, *[(t.data_ptr() & 15, t.dtype) for t in tensors],
               *[float if type(s) is float else s for s in scalars])
        runner = self._runners.get(key)
        if runner is None:
            compiled = self.kernel[grid](*tensors, *scalars, **self.constexprs, **self.options)
            if hasattr(compiled, "result"):                     # Triton versions whose compiles may be futures
                compiled = compiled.result()
            self._runners[key] = compiled[tuple(grid) + (1,) * (3 - len(grid))]   # the runner reads grid[0..2]
            self.launched = True
            return
        runner(*tensors, *scalars, *self._tail, stream=driver.active.get_current_stream(device))
        self.cached_launches += 1
