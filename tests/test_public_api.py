"""The public surface: `import paged, oracle` stays light, `paged.__all__` is real and documented."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import oracle
import paged

# Never needed to use the cache: FMS and its stack, the test tooling, plotting, tokenizers, the suite.
HEAVY = ["fms", "transformers", "hypothesis", "pytest", "matplotlib", "sentencepiece", "conformance", "paged.fms"]

PROBE = """
import json, sys
import torch
after_torch = set(sys.modules)
import paged, oracle
print(json.dumps({"all": sorted(sys.modules), "added": sorted(set(sys.modules) - after_torch)}))
"""


def test_import_pulls_in_nothing_heavier_than_torch():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    mods = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = set(mods["all"])
    assert {"torch", "paged", "oracle"} <= loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"`import paged, oracle` imported {heavy}"
    # beyond what torch itself loads, only paged, oracle and the standard library
    foreign = sorted({m.split(".")[0] for m in mods["added"]} - {"paged", "oracle", "torch"}
                     - set(sys.stdlib_module_names))
    assert foreign == [], f"`import paged, oracle` imported third-party packages {foreign}"


@pytest.mark.parametrize("module", [paged, oracle], ids=lambda m: m.__name__)
def test_all_names_exist(module):
    assert module.__all__, "a public __all__"
    assert len(set(module.__all__)) == len(module.__all__), "no duplicates"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


def _public_objects(module):
    """Every class and function named in __all__, and the public functions of modules named there (paged.mods)."""
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            yield name, obj
            yield from ((f"{name}.{n}", f) for n, f in vars(obj).items()
                        if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == obj.__name__)
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


@pytest.mark.parametrize("module", [paged, oracle], ids=lambda m: m.__name__)
def test_public_classes_and_functions_have_docstrings(module):
    objs = dict(_public_objects(module))
    assert {"PagedKVCache", "mods.sliding_window"} <= set(objs) if module is paged else "ContiguousOracle" in objs
    # obj.__doc__, not inspect.getdoc: a class must document itself, not inherit its base's docstring; and a
    # dataclass without one gets its signature as __doc__, which does not count either
    undocumented = sorted(n for n, obj in objs.items()
                          if not (obj.__doc__ or "").strip() or obj.__doc__.startswith(f"{obj.__name__}("))
    assert undocumented == []


def test_top_level_names():
    for name in ("CacheSpec", "PagedKVCache", "PageAllocator", "POLICIES", "MemoryStats", "mods", "PagedError",
                 "OutOfPagesError", "UnknownSequenceError", "DuplicateSequenceError", "InvalidRequestError",
                 "SequenceTooLongError", "UnsupportedConfigError", "PlanError"):
        assert name in paged.__all__
    assert set(paged.POLICIES) == {"lowest", "lifo", "fifo", "random"}
    assert paged.__version__
    assert "ContiguousOracle" in oracle.__all__
