"""Speed benchmarks of fastdiff (run from the repository root; see benchmarks/README.md).

    python -m benchmarks.step_bench      the fused CFG + DPM-Solver++(2M) step vs eager, torch.compile, diffusers
    python -m benchmarks.scaling         step time vs tensor size (log-log plot)
    python -m benchmarks.loop_overhead   per-step cost of the whole sampling loop with a zero-cost model
    python -m pytest benchmarks/         the same step timings under pytest-benchmark
"""
