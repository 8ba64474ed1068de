"""Issue 13, "Speed": every new sampler runs one fused kernel call per model evaluation.

Counted at run time (benchmarks/call_count.py's counters: the model wrapped, the step function
``ops.prepare_fused_step`` returns wrapped): for each of ComfyUI's sampler names of issue 13 that is
a fastdiff solver (default options; CFG++ ones with guidance and a cond/uncond pair), a whole
sampling run makes exactly as many fused-step calls as model calls (= the program's NFE), prepares
the step function once, and has no row without a model call. The documented exception: heunpp2
with EDM churn adds one noise-only row (a fused call, no model call) on each churned step.
"""
from __future__ import annotations

import pytest

from benchmarks.call_count import CFG_PP, ISSUE13, count_calls
from fastdiff.schedules import VESchedule, make_grid
from fastdiff.solvers import SOLVERS

STEPS = 7


def _param(name):
    marks = [pytest.mark.skip(reason=f"{ISSUE13[name]} is not a fastdiff solver yet")] \
        if ISSUE13[name] not in SOLVERS else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_param(n) for n in ISSUE13])
def test_one_fused_call_per_model_call(name):
    c = count_calls(name, steps=STEPS)
    assert c["finite"]
    assert c["prepared"] == 1
    assert c["model_calls"] == c["program_nfe"] >= STEPS
    assert c["fused_calls"] == c["model_calls"], c
    assert c["noise_only_rows"] == 0
    if name in CFG_PP:
        assert c["guidance"] is not None     # cond and uncond in one batched call per evaluation


@pytest.mark.parametrize("options", [{"deis_mode": "rhoab"}, {"max_order": 2}], ids=["rhoab", "order2"])
def test_deis_variants(options):
    c = count_calls("deis", options, steps=STEPS)
    assert c["fused_calls"] == c["model_calls"] == c["program_nfe"]


@pytest.mark.parametrize("name, options", [("er_sde", {"solver_type": "ODE"}), ("sa_solver", {"eta": 0.0}),
                                           ("sa_solver_pece", {"eta": 0.0}), ("seeds_3", {"eta": 0.0})])
def test_deterministic_forms(name, options):
    c = count_calls(name, options, steps=STEPS)
    assert c["fused_calls"] == c["model_calls"] == c["program_nfe"]


def test_heunpp2_churn_adds_one_noise_row_per_churned_step():
    """The documented exception (and a control: the counters see a fused call without a model call)."""
    opts = {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.007}
    c = count_calls("heunpp2", opts, steps=STEPS)
    grid = make_grid(VESchedule(0.002, 80.0), STEPS, "karras")
    churned = sum(1 for n in range(grid.steps) if opts["s_tmin"] <= float(grid.sigma[n]) <= opts["s_tmax"])
    assert churned > 0
    assert c["fused_calls"] - c["model_calls"] == c["noise_only_rows"] == churned
    assert c["model_calls"] == c["program_nfe"]
