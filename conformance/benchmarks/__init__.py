"""Benchmarks of the conformance suite: timings and memory, side by side with the contiguous baseline and peers.

Run (GPU, real timings; see docs/benchmarks.md and scripts/gpu_bench.sh):

    python -m pytest conformance/benchmarks --bench-grid small --benchmark-json=results/bench.json

Run (CPU smoke test: every benchmark once, outputs still cross-checked, tiny contexts, < 1 minute):

    python -m pytest conformance/benchmarks --benchmark-disable -q

Modules:
    grid          the benchmark cases (decode steps and prefill chunks) of the small / full grids
    harness       GPU-correct timing (CUDA events, L2 flush, launch hiding), copy bandwidth, extra_info
    backends      the backends side by side (paged, SDPA over a padded contiguous cache, torch's private
                  PagedAttention through the peer adapter, FlashInfer) filled with the same data and
                  cross-checked before anything is timed
    workload      chat-like length distributions and serving traces (seeded)
    plots         `python -m conformance.benchmarks.plots --results DIR --out docs/figures`
"""
