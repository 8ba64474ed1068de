"""pytest-benchmark timings of one CFG + DPM-Solver++(2M) step (not part of the test suite).

    python -m pytest benchmarks/ -q                          # every shape and implementation
    python -m pytest benchmarks/ -q -k "sd15 and not compile"
    python -m pytest benchmarks/ --benchmark-autosave        # keep a run; --benchmark-compare to diff

Groups are shapes, so pytest-benchmark's table lines the implementations up per shape. Runs on
torch's thread count (set OMP_NUM_THREADS or use benchmarks.step_bench --threads for others).
The implementations and the state they start from come from benchmarks/baselines.py, the same
code benchmarks.step_bench times.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import baselines as bl
from benchmarks.step_bench import SHAPES

pytest.importorskip("pytest_benchmark")

_problems = {}


@pytest.fixture(params=list(SHAPES), scope="module")
def problem(request):
    name = request.param
    if name not in _problems:
        _problems.clear()                     # keep one shape's tensors alive at a time (video: ~0.2 GB)
        _problems[name] = bl.make_problem(SHAPES[name])
    return name, _problems[name]


def _run(benchmark, name, fn):
    benchmark.group = name
    benchmark.extra_info["threads"] = torch.get_num_threads()
    return benchmark(fn)


def _run_in_place(benchmark, name, step: bl.FastdiffStep, numel: int):
    """A fastdiff step updates its state in place and repeating one step overflows it after a few
    hundred calls (see FastdiffStep): restore it, untimed, as needed before each round."""
    benchmark.group = name
    benchmark.extra_info["threads"] = torch.get_num_threads()
    rounds = max(20, min(2000, 20_000_000 // numel))
    benchmark.pedantic(step, setup=lambda: step.prepare(1), rounds=rounds, warmup_rounds=3)


@pytest.mark.parametrize("model_input", [False, True], ids=["step", "step+model_input"])
def test_fastdiff_cpu(benchmark, problem, model_input):
    name, p = problem
    step = bl.FastdiffStep(p, "cpu", model_input)
    _run_in_place(benchmark, name, step, p.numel)
    assert torch.isfinite(step.x).all() and step.bad_row.item() == 0


def test_fastdiff_cpu_fp16_model_output(benchmark, problem):
    name, p = problem
    step = bl.FastdiffStep(bl.with_model_dtype(p, torch.float16), "cpu", model_input=True)
    _run_in_place(benchmark, name, step, p.numel)
    assert torch.isfinite(step.x).all()


def test_fastdiff_reference(benchmark, problem):
    name, p = problem
    step = bl.FastdiffStep(p, "reference")
    _run_in_place(benchmark, name, step, p.numel)
    assert torch.isfinite(step.x).all()


def test_eager(benchmark, problem):
    name, p = problem
    x_next, _ = _run(benchmark, name, lambda: bl.eager_step(p.x, p.model_out, p.x0_prev, p.scalars))
    assert torch.isfinite(x_next).all()


def test_torch_compile(benchmark, problem):
    name, p = problem
    torch._dynamo.reset()
    fn = bl.compiled_step()
    # Compile, then recompile once for a second set of scalars (what a sampling loop triggers).
    fn(p.x, p.model_out, p.x0_prev, bl.step_scalars(p.scheduler, p.step_index - 1))
    fn(p.x, p.model_out, p.x0_prev, p.scalars)
    x_next, _ = _run(benchmark, name, lambda: fn(p.x, p.model_out, p.x0_prev, p.scalars))
    assert torch.isfinite(x_next).all()


def test_diffusers(benchmark, problem):
    name, p = problem
    step = bl.DiffusersStep(p)
    x_next = _run(benchmark, name, lambda: step(p.model_out, p.x))
    assert torch.isfinite(x_next).all()
