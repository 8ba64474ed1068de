"""The benchmark scripts run, write valid reports, and compare like with like.

Fast by construction: the tiny shape, 3 samples per measurement, no torch.compile (its cold
compile alone takes 5-40 s here; benchmarks/test_bench_step.py exercises it).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO  # noqa: E402

pytest.importorskip("diffusers")

from benchmarks import baselines as bl  # noqa: E402
from benchmarks import loop_overhead, scaling, step_bench  # noqa: E402
from fastdiff.ops.backends import BACKENDS  # noqa: E402

HAVE_CPU = BACKENDS["cpu"].unavailable_reason() is None
FAST = ["--min-samples", "3", "--min-time", "0", "--quiet"]
NO_COMPILE = "compile,compile_model_input"


@pytest.fixture(scope="module")
def problem():
    return bl.make_problem((2, 3, 5, 7))          # odd sizes, batch 2


@pytest.mark.parametrize("impl", ["cpu", "reference", "eager", "diffusers"])
def test_every_implementation_computes_the_same_step(problem, impl):
    if impl == "cpu" and not HAVE_CPU:
        pytest.skip(BACKENDS["cpu"].unavailable_reason())
    x_ref, x0_ref = bl.reference_result(problem)
    x_next, x0, _ = bl.one_step(problem, impl)
    scale = x_ref.abs().max().item()
    assert (x_next.double() - x_ref).abs().max().item() <= 2e-6 * scale
    assert (x0.double() - x0_ref).abs().max().item() <= 2e-6 * x0_ref.abs().max().item()


def test_problem_is_a_second_order_mid_run_state(problem):
    s = problem.scalars
    assert problem.step_index == bl.MID_STEP
    assert 0 < s.sigma_s < s.sigma_t and s.h > 0 and 0.5 < s.r < 2
    # The step is genuinely second order: the history term changes the result.
    no_history = bl.eager_step(problem.x, problem.model_out, torch.zeros_like(problem.x0_prev), s)[0]
    assert not torch.allclose(no_history, bl.eager_step(problem.x, problem.model_out, problem.x0_prev, s)[0])
    assert problem.model_out.shape[0] == 2 * problem.shape[0]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_model_input_epilogue_writes_the_new_x_into_both_halves(problem, backend):
    if backend == "cpu" and not HAVE_CPU:
        pytest.skip(BACKENDS["cpu"].unavailable_reason())
    x_next, _, model_in = bl.one_step(problem, backend, model_input=True)
    B = problem.shape[0]
    assert torch.equal(model_in[:B], x_next) and torch.equal(model_in[B:], x_next)


def test_diffusers_step_repeats_the_same_update(problem):
    step = bl.DiffusersStep(problem)
    first = step(problem.model_out, problem.x)
    second = step(problem.model_out, problem.x)
    assert torch.equal(first, second)


def test_bytes_moved_counts_reads_and_writes():
    assert step_bench.bytes_moved(10, torch.float32, False) == 10 * 24
    assert step_bench.bytes_moved(10, torch.float32, True) == 10 * 32
    assert step_bench.bytes_moved(10, torch.float16, True) == 10 * 24


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    skip = NO_COMPILE if HAVE_CPU else NO_COMPILE + ",fastdiff_cpu,fastdiff_cpu_model_input,fastdiff_cpu_fp16," \
        "fastdiff_cpu_fp16_model_input,fastdiff_public_op"
    argv = ["--shapes", "tiny", "--threads", "1,2", "--skip", skip, "--copy-mib", "4", "--json", str(out), *FAST]
    assert step_bench.main(argv) == 0
    return out


def test_step_bench_writes_a_valid_report(quick_report, capsys):
    report = json.loads(quick_report.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"] == torch.__version__
    assert report["machine"]["cpu"]
    impls = set(report["settings"]["impls"])
    assert "diffusers" in impls and "eager" in impls and not impls & set(NO_COMPILE.split(","))
    assert {(r["threads"], r["impl"]) for r in report["results"]} == {(t, i) for t in (1, 2) for i in impls}
    for r in report["results"]:
        assert r["shape"] == [1, 4, 8, 8] and r["numel"] == 256
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and r["iqr_s"] >= 0 and r["samples"] >= 3
        assert r["bytes"] == step_bench.bytes_moved(256, getattr(torch, r["model_dtype"]), r["model_input"])
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
    assert len(report["blocks"]) == 2 and all(b["copy"]["gbps"] > 0 for b in report["blocks"])
    table = step_bench.render_markdown(report)
    assert "threads=1" in table and "threads=2" in table and "diffusers CFG" in table


def test_compare_flags_a_slower_fastdiff_row(quick_report, tmp_path, capsys):
    report = json.loads(quick_report.read_text())
    base = copy.deepcopy(report)
    victim = next(r for r in base["results"] if r["impl"].startswith("fastdiff"))
    victim["median_s"] /= 3.0                     # the base was 3x faster: now is a regression
    doctored = tmp_path / "base.json"
    doctored.write_text(json.dumps(base))
    capsys.readouterr()
    assert step_bench.main(["--compare", str(doctored), "--current", str(quick_report), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "1 regression(s)" in out and victim["label"] in out
    # The same run compared with itself: no regression.
    assert step_bench.main(["--compare", str(quick_report), "--current", str(quick_report), "--quiet"]) == 0
    assert "No regressions." in capsys.readouterr().out


def test_compare_does_not_fail_on_a_slower_baseline(quick_report, tmp_path):
    base = json.loads(quick_report.read_text())
    for r in base["results"]:
        if r["impl"] == "diffusers":
            r["median_s"] /= 10.0
    doctored = tmp_path / "base.json"
    doctored.write_text(json.dumps(base))
    assert step_bench.main(["--compare", str(doctored), "--current", str(quick_report), "--quiet"]) == 0


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path, quick_report):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="not a step_bench report"):
        step_bench.main(["--compare", str(bad), "--current", str(quick_report), "--quiet"])


@pytest.mark.parametrize("argv", [["--shapes", "huge"], ["--threads", "0"], ["--current", "x.json"],
                                  ["--threshold", "-1"]])
def test_step_bench_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        step_bench.main(argv)
    assert e.value.code == 2


def test_loop_overhead_runs(tmp_path, capsys):
    out = tmp_path / "loop.json"
    assert loop_overhead.main(["--loops", "fastdiff_sampler,diffusers", "--fit-steps", "2,4", "--json", str(out),
                               *FAST]) == 0
    report = json.loads(out.read_text())
    rows = {r["loop"]: r for r in report["results"]}
    assert set(rows) == {"fastdiff_sampler", "diffusers"}
    for r in rows.values():
        assert r["per_step_s"] == pytest.approx(r["call_median_s"] / loop_overhead.STEPS)
        assert r["per_step_s"] > 0
    assert "fastdiff.Sampler" in capsys.readouterr().out


def test_loop_overhead_loops_reach_the_same_sample():
    """The two loops time the same sampling run: with a constant eps they land on the same x."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(loop_overhead.SHAPE, generator=gen)
    model = loop_overhead.zero_cost_model(0.1 * torch.randn((2,) + loop_overhead.SHAPE[1:], generator=gen))
    a = loop_overhead.fastdiff_sampler_loop(20, model, noise)()
    b = loop_overhead.diffusers_pipeline_loop(20, model, noise)()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_scaling_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    impls = "fastdiff_cpu,eager" if HAVE_CPU else "eager"
    stem = tmp_path / "scaling"
    assert scaling.main(["--sizes", "256,1024", "--threads", "1", "--impls", impls, "--copy-mib", "4",
                         "--out", str(stem), *FAST]) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    assert {(p["numel"], p["impl"]) for p in report["points"]} == {(n, i) for n in (256, 1024)
                                                                   for i in impls.split(",")}
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
