"""Every solver's coefficient program equals its textbook formula (fastdiff.textbook).

Each registered solver runs through ``fastdiff.sample`` (float64 state, reference backend) and
through its textbook oracle on the same noise, over whole trajectories, and the two must agree to
1e-10 of the sample scale: the programs are exact rewritings, so anything larger is a wrong
coefficient, not rounding. The model is the analytic Gaussian mixture (any prediction type);
CFG runs with a cond/uncond pair of mixtures with different means.

A solver registered without an oracle fails ``test_every_solver_has_an_oracle``: add its
textbook form to fastdiff.textbook, or list it in COVERED_ELSEWHERE with the test that judges it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch

from fastdiff import Guidance, Sampler, sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import ContinuousVP, DiscreteVP, FlowMatching, VESchedule, make_grid
from fastdiff.solvers import SOLVERS
from fastdiff.textbook import ORACLES, guided
from fastdiff.textbook.comfy import MULTI_DRAW
from fastdiff.textbook.zoo import ZOO_ORACLES

#: Solvers judged against their textbook form by another test file: name -> where.
COVERED_ELSEWHERE: Dict[str, str] = {name: "tests/test_solver_zoo.py" for name in ZOO_ORACLES}
# ComfyUI's samplers that draw noise more than once per step: their oracles take a list of draws
# per step, which this file's harness does not feed (tests/test_comfy_samplers.py judges them).
COVERED_ELSEWHERE.update({name: "tests/test_comfy_samplers.py" for name in MULTI_DRAW})

TOL = 1e-10          # max |program - textbook| / max(1, max |textbook|), for well-conditioned grids
SHAPE = (3, 2, 3)    # a batch of 3 samples of 6 elements, not flat, to catch reshaping slips
STEPS = (1, 2, 5, 17)

# Option sets each solver is checked with (the defaults when a solver is not listed).
OPTIONS = {
    "ddim": ({"eta": 0.0}, {"eta": 0.5}, {"eta": 1.0}),
    "ddpm": ({"variance": "fixed_small"}, {"variance": "fixed_large"}),
    "euler_ancestral": ({}, {"eta": 0.5, "s_noise": 0.8}),
    "dpmpp_2m": ({}, {"lower_order_final": True}),
    "dpm_solver++_2m": ({"lower_order_final": True},),
}

# Which solvers can run on a grid that starts at alpha = 0 (zero terminal SNR, flow t = 1):
# the exponential integrators and the ODE solvers in flow coordinates; the stochastic samplers
# written in VE coordinates cannot (x / alpha).
STARTS_AT_ALPHA_0 = {"ddim", "ddpm", "dpmpp_2m", "dpm_solver++_2m"}
FLOW_SPACE = {"euler", "heun", "midpoint", "ralston", "rk3", "rk4"}
VE_ONLY = {"euler_ancestral", "euler_maruyama", "heun_sde"}


@dataclass(frozen=True)
class Case:
    id: str
    schedule: Callable
    spacing: str
    predictions: Tuple[str, ...]
    grid_options: dict = field(default_factory=dict)
    solvers: Tuple[str, ...] = ()   # empty: every solver

    def applies_to(self, solver: str) -> bool:
        return not self.solvers or solver in self.solvers


CASES = [
    Case("sd-leading", lambda: DiscreteVP(beta_schedule="scaled_linear"), "leading",
         ("epsilon", "v_prediction"), {"steps_offset": 1}),
    Case("sd-trailing", lambda: DiscreteVP(beta_schedule="scaled_linear"), "trailing", ("sample",)),
    Case("sd-karras", lambda: DiscreteVP(beta_schedule="scaled_linear"), "karras", ("epsilon",)),
    Case("cosine-linspace", lambda: DiscreteVP(beta_schedule="squaredcos_cap_v2"), "linspace",
         ("epsilon", "v_prediction")),
    Case("ztsnr-trailing", lambda: DiscreteVP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                              zero_terminal_snr=True),
         "trailing", ("v_prediction",), solvers=tuple(STARTS_AT_ALPHA_0)),
    Case("cvp-uniform", lambda: ContinuousVP(), "uniform", ("epsilon", "v_prediction")),
    Case("cvp-logsnr", lambda: ContinuousVP(), "logsnr", ("sample",)),
    Case("edm-karras", lambda: VESchedule(), "karras", ("sample", "epsilon")),
    Case("edm-exponential-to-sigma_min", lambda: VESchedule(), "exponential", ("score",), {"final": "none"}),
    Case("flow-shift3", lambda: FlowMatching(), "uniform", ("flow", "sample"), {"shift": 3.0},
         solvers=tuple(STARTS_AT_ALPHA_0 | FLOW_SPACE)),
]


def variants():
    """(solver name, options) of every registered solver that has an oracle."""
    return [(name, opts) for name in sorted(SOLVERS) if name in ORACLES for opts in OPTIONS.get(name, ({},))]


def variant_id(name, opts):
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def combinations(cases, steps=(None,)):
    return [pytest.param(name, opts, case, n, id=f"{variant_id(name, opts)}-{case.id}" + (f"-{n}" if n else ""))
            for name, opts in variants() for case in cases if case.applies_to(name) for n in steps]


def start_state(grid, noise):
    schedule = grid.schedule
    return noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))


def step_noise(steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(steps)]


def check_noise_ids(rows):
    """One Gaussian draw per solver step: rows of a step share a noise id, steps do not."""
    ids = {}
    for r in rows:
        if r.noise_id >= 0:
            assert ids.setdefault(r.step, r.noise_id) == r.noise_id, f"step {r.step} uses two noise draws"
    assert len(set(ids.values())) == len(ids), "two steps share a noise draw"


def run_both(name, opts, grid, prediction, model, oracle_model, guidance=None, run_kwargs=None, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    zs = step_noise(grid.steps, seed)
    sampler = Sampler.build(solver=name, grid=grid, prediction=prediction, guidance=guidance,
                            solver_options=opts, state_dtype=torch.float64)
    check_noise_ids(sampler.program.rows)
    noise_before = noise.clone()
    out = sampler(model, noise, noise_sampler=lambda row, x: zs[row.step], backend="reference",
                  progress=False, **(run_kwargs or {}))
    assert torch.equal(noise, noise_before)
    ref = ORACLES[name](oracle_model, start_state(grid, noise), grid, prediction, noise=zs, **opts)
    return out, ref


def tolerance(grid):
    """TOL, widened for grids that start at a huge noise level: in the ODE coordinates y = x/alpha
    the state is ~ksigma_max times the sample, so rounding grows with it (squaredcos_cap_v2 starts
    at ksigma ~2e4; the scaled-linear, EDM and continuous VP grids stay below ~150)."""
    ks = grid.ksigma[0]
    return TOL * max(1.0, ks / 100.0) if np.isfinite(ks) else TOL


def assert_close(out, ref, grid):
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert torch.isfinite(ref).all()
    scale = max(1.0, float(ref.abs().max()))
    err = float((out - ref).abs().max()) / scale
    tol = tolerance(grid)
    assert err < tol, f"program vs textbook: relative error {err:.3g} > {tol:.3g} (sample scale {scale:.3g})"


def test_every_solver_has_an_oracle():
    missing = sorted(n for n in SOLVERS if n not in ORACLES and n not in COVERED_ELSEWHERE)
    assert not missing, (f"solvers without a textbook oracle: {missing}; add one to fastdiff.textbook "
                         "(ORACLES) or list the test that covers them in COVERED_ELSEWHERE")


@pytest.mark.parametrize("name, opts, case, steps", combinations(CASES, STEPS))
def test_program_equals_textbook(name, opts, case, steps):
    schedule = case.schedule()
    grid_options = dict(case.grid_options)
    final = grid_options.pop("final", "zero")
    grid = make_grid(schedule, steps, case.spacing, final=final, **grid_options)
    for k, prediction in enumerate(case.predictions):
        model = GaussianMixture.default(schedule, dim=6, prediction=prediction)
        out, ref = run_both(name, opts, grid, prediction, model, model, seed=k)
        assert_close(out, ref, grid)


class LabelledPair:
    """model(x, t, label): the cond mixture where label = 1, the uncond mixture where label = 0."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def __call__(self, x, t, label):
        pick = label.reshape((-1,) + (1,) * (x.dim() - 1)).bool()
        return torch.where(pick, self.cond(x, t), self.uncond(x, t))


CFG_CASES = [c for c in CASES if c.id in ("sd-leading", "edm-karras", "flow-shift3")]


@pytest.mark.parametrize("convention, scale", [("w", 3.5), ("1+w", 2.0)])
@pytest.mark.parametrize("name, opts, case, _", combinations(CFG_CASES))
def test_program_equals_textbook_with_cfg(name, opts, case, _, convention, scale):
    schedule = case.schedule()
    grid = make_grid(schedule, 5, case.spacing, **case.grid_options)
    prediction = case.predictions[0]
    base = GaussianMixture.default(schedule, dim=6, prediction=prediction)
    cond = GaussianMixture(schedule, base.means + 0.75, base.stds, base.weights, prediction=prediction)
    uncond = GaussianMixture(schedule, base.means - 0.5, base.stds * 1.3, base.weights, prediction=prediction)
    B = SHAPE[0]
    out, ref = run_both(name, opts, grid, prediction, LabelledPair(cond, uncond),
                        guided(cond, uncond, scale, convention),
                        guidance=Guidance(scale, convention=convention),
                        run_kwargs={"cond": {"label": torch.ones(B)}, "uncond": {"label": torch.zeros(B)}})
    assert_close(out, ref, grid)
    # guidance really changes the result: not the conditional sample alone
    alone, _ = run_both(name, opts, grid, prediction, cond, cond)
    assert float((out - alone).abs().max()) > 1e-3


@pytest.mark.parametrize("name", sorted(VE_ONLY))
def test_ve_only_solvers_reject_a_grid_starting_at_alpha_0(name):
    grid = make_grid(FlowMatching(), 5, "uniform")
    with pytest.raises(ValueError, match="ve"):
        Sampler.build(solver=name, grid=grid, prediction="flow")


# ---------------------------------------------------------------------------------------------
# The oracles themselves agree with the code users run (k-diffusion, diffusers)


@pytest.mark.parametrize("name, kd_name, opts", [
    ("euler", "sample_euler", {}), ("heun", "sample_heun", {}), ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.7, "s_noise": 0.9})])
def test_oracles_agree_with_k_diffusion(name, kd_name, opts):
    from kdiffusion_loader import load_kdiffusion_sampling
    kd = load_kdiffusion_sampling()
    grid = make_grid(VESchedule(), 9, "karras")
    model = GaussianMixture.default(grid.schedule, dim=6, prediction="sample")  # a denoiser D(x, sigma)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    zs = step_noise(grid.steps, seed=4)
    draws = iter(zs)
    kd_opts = dict(opts, noise_sampler=lambda sigma, sigma_next: next(draws)) if "eta" in opts else opts
    ref = getattr(kd, kd_name)(model, x.clone(), torch.from_numpy(grid.sigma), disable=True, **kd_opts)
    ours = ORACLES[name](model, x.clone(), grid, "sample", noise=zs, **opts)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name, opts", [("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}),
                                        ("ddpm", {"variance": "fixed_small"}), ("ddpm", {"variance": "fixed_large"})])
def test_oracles_agree_with_diffusers(name, opts, prediction):
    """diffusers' DDIMScheduler / DDPMScheduler.step loop (float32 tables, hence 1e-5)."""
    import diffusers
    steps, seed = 12, 5
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  prediction_type=prediction)
    if name == "ddim":
        scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, steps_offset=1, **config)
    else:
        scheduler = diffusers.DDPMScheduler(variance_type=opts["variance"], **config)
    scheduler.set_timesteps(steps)
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    grid = make_grid(schedule, steps, "leading", steps_offset=1 if name == "ddim" else 0)
    model = GaussianMixture.default(schedule, dim=6, prediction=prediction)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # DDPMScheduler draws its noise from the generator on every step but the last (t = 0)
    draws = torch.Generator().manual_seed(seed)
    zs = [torch.randn(SHAPE, dtype=torch.float64, generator=draws) for _ in range(steps)]
    generator = torch.Generator().manual_seed(seed)
    ref = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        out = model(ref, torch.full((SHAPE[0],), float(t), dtype=torch.float64))
        if name == "ddim":
            ref = scheduler.step(out, t, ref, eta=opts["eta"], variance_noise=zs[i]).prev_sample
        else:
            ref = scheduler.step(out, t, ref, generator=generator).prev_sample
    ours = ORACLES[name](model, x.clone(), grid, prediction, noise=zs, **opts)
    torch.testing.assert_close(ours, ref.to(torch.float64), rtol=1e-5, atol=1e-5)
