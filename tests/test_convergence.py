"""Convergence order of the ODE solvers on the analytic Gaussian mixture.

Each solver runs the probability-flow ODE from the first grid point to the last (final='none':
no jump to sigma = 0, which would end every solver with an Euler step) for a range of step
counts; the error is the max-norm distance to GaussianMixture.solve_ode (DOP853, rtol = atol =
1e-12). The slope of log(error) against log(steps), fitted over the range, must be within 0.3
of the order the solver reports (``solver.order``, stated by the solver and measured here). Step
ranges are where each solver is in its asymptotic regime (measured: midpoint's error has a large
third-order term and reaches slope 2 only from ~80 steps).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fastdiff import sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import ContinuousVP, FlowMatching, VESchedule, make_grid
from fastdiff.solvers import get_solver

SLOPE_TOL = 0.3
BATCH = 16

# (schedule, spacing, prediction, grid options)
SETUPS = {
    "ve-karras": (VESchedule, "karras", "sample", {}),
    "vp-logsnr": (ContinuousVP, "logsnr", "epsilon", {}),
    "vp-uniform": (ContinuousVP, "uniform", "v_prediction", {}),
    # flow from t = 0.99: the reference integrates in x/alpha, which needs alpha > 0
    "flow-uniform": (FlowMatching, "uniform", "flow", {"t_max": 0.99}),
}

# (setup, solver, step counts)
CASES = [
    ("ve-karras", "euler", (20, 40, 80, 160)),
    ("ve-karras", "ddim", (20, 40, 80, 160)),
    ("ve-karras", "heun", (20, 40, 80, 160)),
    ("ve-karras", "dpmpp_2m", (20, 40, 80, 160)),
    ("ve-karras", "midpoint", (80, 160, 320, 640)),
    ("ve-karras", "ralston", (40, 80, 160, 320)),
    ("ve-karras", "rk3", (40, 80, 160, 320)),
    ("ve-karras", "rk4", (10, 20, 40, 80)),
    ("vp-logsnr", "euler", (20, 40, 80, 160)),
    ("vp-logsnr", "ddim", (20, 40, 80, 160)),
    ("vp-logsnr", "heun", (20, 40, 80, 160)),
    ("vp-logsnr", "dpmpp_2m", (20, 40, 80, 160)),
    ("vp-logsnr", "rk3", (40, 80, 160, 320)),
    ("vp-logsnr", "rk4", (20, 40, 80, 160)),
    ("vp-uniform", "euler", (20, 40, 80, 160)),
    ("vp-uniform", "heun", (20, 40, 80, 160)),
    ("vp-uniform", "dpmpp_2m", (40, 80, 160, 320)),
    ("vp-uniform", "rk4", (40, 80, 160, 320)),
    ("flow-uniform", "euler", (10, 20, 40, 80)),
    ("flow-uniform", "heun", (20, 40, 80, 160)),
    ("flow-uniform", "dpmpp_2m", (10, 20, 40, 80)),
    ("flow-uniform", "rk4", (10, 20, 40, 80)),
]


@functools.lru_cache(maxsize=None)
def problem(setup: str):
    """(mixture, start noise, reference end state) of a setup; the grid's end points do not
    depend on the step count, so one reference serves every run."""
    schedule_cls, spacing, prediction, grid_options = SETUPS[setup]
    schedule = schedule_cls()
    mixture = GaussianMixture.default(schedule, dim=2, prediction=prediction)
    noise = torch.randn(BATCH, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = make_grid(schedule, 4, spacing, final="none", **grid_options)
    x_start = noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    reference = mixture.solve_ode(x_start, float(grid.ksigma[0]), float(grid.ksigma[-1]))
    return mixture, noise, reference


def errors(setup: str, solver: str, steps):
    schedule_cls, spacing, prediction, grid_options = SETUPS[setup]
    mixture, noise, reference = problem(setup)
    out = []
    for n in steps:
        grid = make_grid(mixture.schedule, n, spacing, final="none", **grid_options)
        x = sample(mixture, noise, solver=solver, grid=grid, prediction=prediction,
                   state_dtype=torch.float64, backend="reference", progress=False)
        out.append(float((x - reference).abs().max()))
    return np.array(out)


@pytest.mark.parametrize("setup, solver, steps", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_convergence_order(setup, solver, steps):
    err = errors(setup, solver, steps)
    assert np.all(np.diff(err) < 0), f"error does not fall with more steps: {err}"
    slope = -np.polyfit(np.log(steps), np.log(err), 1)[0]
    order = get_solver(solver).order
    assert abs(slope - order) <= SLOPE_TOL, (
        f"{solver} on {setup}: fitted order {slope:.2f}, expected {order} (solver.order) ± {SLOPE_TOL} "
        f"(steps {steps}, max errors {err})")


def test_reference_is_accurate():
    """The reference itself: a looser tolerance must give (nearly) the same answer, far below
    the smallest solver error the slopes are fitted to (~1e-9)."""
    mixture, noise, reference = problem("ve-karras")
    grid = make_grid(mixture.schedule, 4, "karras", final="none")
    x_start = noise * float(grid.sigma[0])
    loose = mixture.solve_ode(x_start, float(grid.ksigma[0]), float(grid.ksigma[-1]), rtol=1e-10, atol=1e-10)
    assert float((loose - reference).abs().max()) < 1e-8
