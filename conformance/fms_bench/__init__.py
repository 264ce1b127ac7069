"""End-to-end generation speed inside FMS, timed in one run against its anchors (issue 16).

    python -m conformance.fms_bench --size 1b --batches 1,8,64 --prompts 512 --out results/fms-e2e

The same random weights (drawn once by transformers, converted in memory to FMS's layout with FMS's own HF
adapter) run greedy generation in five modes, side by side in one process:

| mode | what runs |
|---|---|
| `hf-eager` | transformers' `LlamaForCausalLM.generate`, its default dynamic cache, eager |
| `hf-static` | the same with `cache_implementation="static"`: transformers compiles the decode step itself (CUDA graphs) |
| `fms-default` | FMS's `generate()` with its default attention op and contiguous cache |
| `paged-eager` | `paged.fms.generate.PagedGenerator`, every step eager (the cache's kernels, FMS's modules) |
| `paged-graphs` | `PagedGenerator` on its default CUDA path: decode steps compiled, one CUDA graph per batch bucket |

A decode step's time is ``(generate(N + 1 new tokens) - generate(1 new token)) / N`` of wall-clock times taken
after a synchronize (median over repeats): host time included, the way a user feels it; the first new token's
generate is the prefill. The memory floor is the bytes a decode step must read at least (every weight once plus
every row's K/V) at the card's measured copy bandwidth.
"""
