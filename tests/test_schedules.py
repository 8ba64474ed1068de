"""Schedules, spacings and parameterizations against the libraries users run today.

diffusers builds its tables in float32 and fastdiff in float64, so comparisons with diffusers use
float32-sized tolerances (stated per test); k-diffusion's sigma schedules likewise (torch float32).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import assert_close_to_peer, nudge_tolerance, peer_tolerance
from fastdiff.parameterization import PREDICTIONS, convert
from fastdiff.schedules import (SPACINGS, ContinuousVP, DiscreteVP, FlowMatching, Grid, VESchedule, make_grid,
                                time_shift)

diffusers = pytest.importorskip("diffusers")

F32_RTOL = 1e-5       # float32 tables: a few ulp, a little more after cumulative products


# ---------------------------------------------------------------------------------------------
# DiscreteVP vs diffusers' DDPMScheduler


@pytest.mark.parametrize("beta_schedule, beta_start, beta_end", [
    ("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_discrete_vp_tables_equal_diffusers(beta_schedule, beta_start, beta_end, zero_snr):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                                  rescale_betas_zero_snr=zero_snr)
    ours = DiscreteVP(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end, zero_terminal_snr=zero_snr)
    # diffusers' own precision: the same tables from its float32 betas, carried on in float64
    # (its zero-SNR rescale recovers betas from ratios of nearby alpha_bar, which float32 blurs).
    base = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end).betas
    betas64 = rescale_zero_terminal_snr(base.double()) if zero_snr else base.double()
    assert_close_to_peer(ours.betas, ref.betas, peer_tolerance(ref.betas, betas64), "betas")
    def cumprod(b):
        return torch.cumprod(1.0 - b, 0)

    tol = peer_tolerance(ref.alphas_cumprod, cumprod(betas64)) + nudge_tolerance(cumprod, betas64)
    assert_close_to_peer(ours.alphas_cumprod, ref.alphas_cumprod, tol, "alphas_cumprod")
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0.0 and ours.betas[-1] == 1.0
    a, s = ours.alpha_sigma(np.arange(1000.0))
    np.testing.assert_allclose(a ** 2, ours.alphas_cumprod, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, rtol=1e-12)


def test_discrete_vp_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteVP(beta_schedule="quadratic")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DiscreteVP(betas=[0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        DiscreteVP(betas=[0.1])


# ---------------------------------------------------------------------------------------------
# Timestep spacings vs diffusers' DDIMScheduler


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 333, 999])
@pytest.mark.parametrize("spacing, steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_discrete_timesteps_equal_diffusers_ddim(spacing, steps_offset, steps):
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=True)
    ref.set_timesteps(steps)
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    grid = make_grid(schedule, steps, spacing, steps_offset=steps_offset)
    np.testing.assert_array_equal(grid.t[:-1], ref.timesteps.numpy().astype(np.float64))
    np.testing.assert_array_equal(grid.model_t[:-1], ref.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose(grid.alpha[:-1] ** 2, ref.alphas_cumprod[ref.timesteps].double().numpy(), rtol=F32_RTOL)
    # final='zero' is set_alpha_to_one: the last step lands on the data
    assert grid.alpha[-1] == 1.0 and grid.sigma[-1] == 0.0


def test_karras_on_a_discrete_schedule_equals_diffusers_euler():
    """EulerDiscreteScheduler(use_karras_sigmas=True) over the full range (linspace spacing):
    the same sigmas, and the model times from diffusers' log-sigma interpolation (_sigma_to_t)."""
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           timestep_spacing="linspace", use_karras_sigmas=True)
    ref.set_timesteps(25)
    grid = make_grid(DiscreteVP(beta_schedule="scaled_linear"), 25, "karras")
    np.testing.assert_allclose(grid.ksigma, ref.sigmas.double().numpy(), rtol=2e-4)  # sigma_min from float32 abar
    np.testing.assert_allclose(grid.model_t[:-1], ref.timesteps.double().numpy(), rtol=1e-4, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Karras / exponential noise levels vs k-diffusion


@pytest.fixture(scope="module")
def kdiff():
    from kdiffusion_loader import load_kdiffusion_sampling
    return load_kdiffusion_sampling()


@pytest.mark.parametrize("steps", [1, 2, 10, 40])
@pytest.mark.parametrize("sigma_min, sigma_max, rho", [(0.002, 80.0, 7.0), (0.03, 14.6, 7.0), (0.1, 10.0, 3.0)])
def test_karras_and_exponential_equal_k_diffusion(kdiff, steps, sigma_min, sigma_max, rho):
    schedule = VESchedule(sigma_min, sigma_max)
    karras = make_grid(schedule, steps, "karras", rho=rho)
    expo = make_grid(schedule, steps, "exponential")
    ref_karras = kdiff.get_sigmas_karras(steps, sigma_min, sigma_max, rho=rho).double().numpy()
    ref_expo = kdiff.get_sigmas_exponential(steps, sigma_min, sigma_max).double().numpy()
    if steps == 1:  # k-diffusion's linspace(0, 1, 1) = [0]: one step from sigma_max, as ours
        assert ref_karras[0] == pytest.approx(sigma_max, rel=1e-6)
    np.testing.assert_allclose(karras.sigma, ref_karras, rtol=F32_RTOL)
    np.testing.assert_allclose(expo.sigma, ref_expo, rtol=F32_RTOL)
    assert np.all(karras.alpha == 1.0)


def test_logsnr_spacing_is_uniform_in_log_snr():
    grid = make_grid(ContinuousVP(), 12, "logsnr", final="none")
    np.testing.assert_allclose(np.diff(grid.lam), np.diff(grid.lam)[0], rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Continuous VP


def test_continuous_vp_t_from_ksigma_inverts_ksigma():
    schedule = ContinuousVP()
    t = np.linspace(schedule.t_min, schedule.t_max, 101)
    np.testing.assert_allclose(schedule.t_from_ksigma(schedule.ksigma(t)), t, rtol=1e-12, atol=1e-15)
    # and matches k-diffusion's VP noise levels sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)
    np.testing.assert_allclose(schedule.ksigma(t), np.sqrt(np.expm1(19.9 * t ** 2 / 2 + 0.1 * t)), rtol=1e-12)


def test_continuous_vp_off_grid_points_are_consistent():
    schedule = ContinuousVP()
    ks = np.geomspace(0.02, 100.0, 17)
    t, a, s = schedule.point_at_ksigma(ks)
    a2, s2 = schedule.alpha_sigma(t)
    np.testing.assert_allclose(a2, a, rtol=1e-12)
    np.testing.assert_allclose(s2, s, rtol=1e-12)


@pytest.mark.parametrize("schedule", [DiscreteVP(), DiscreteVP(beta_schedule="squaredcos_cap_v2"), VESchedule(),
                                      FlowMatching()], ids=["sd", "cosine", "ve", "flow"])
def test_t_from_ksigma_inverts_ksigma(schedule):
    t = np.linspace(schedule.t_min, schedule.t_max * 0.99, 37)
    if isinstance(schedule, DiscreteVP):
        t = np.round(t)  # exact at integer steps (between them log ksigma is interpolated)
    np.testing.assert_allclose(schedule.t_from_ksigma(schedule.ksigma(t)), t, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Flow matching vs diffusers' FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_static_shift_equals_diffusers(steps):
    """diffusers shifts its smallest time 1/T in __init__ and the whole grid again in
    set_timesteps, so its grid is ours with t_min = shift(1/T) (see fastdiff.solvers.flow)."""
    shift = 3.0
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    schedule = FlowMatching(t_min=float(time_shift(1 / 1000, shift)))
    grid = make_grid(schedule, steps, "uniform", shift=shift)
    np.testing.assert_allclose(grid.sigma, ref.sigmas.double().numpy(), rtol=F32_RTOL, atol=1e-7)
    np.testing.assert_allclose(grid.model_t[:-1], ref.timesteps.double().numpy(), rtol=F32_RTOL)


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_flow_dynamic_shift_equals_diffusers(mu):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(20, mu=mu)
    grid = make_grid(FlowMatching(), 20, "uniform", mu=mu)
    np.testing.assert_allclose(grid.sigma, ref.sigmas.double().numpy(), rtol=F32_RTOL, atol=1e-7)


@pytest.mark.parametrize("schedule, spacing, kw", [
    (DiscreteVP(), "karras", {"shift": 3.0}), (DiscreteVP(), "leading", {"mu": 0.5}),
    (ContinuousVP(), "uniform", {"shift": 2.0}), (FlowMatching(t_max=0.99), "karras", {"shift": 3.0})])
def test_shift_is_rejected_where_it_would_be_ignored(schedule, spacing, kw):
    with pytest.raises(ValueError, match="shift/mu apply to FlowMatching"):
        make_grid(schedule, 10, spacing, **kw)


# ---------------------------------------------------------------------------------------------
# Grids


SCHEDULES = {"discrete": DiscreteVP(), "continuous": ContinuousVP(), "ve": VESchedule(), "flow": FlowMatching()}
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")


# final='none' is left out for the discrete spacings: diffusers' timesteps are the `steps` model
# calls, and the final point is what follows them.
@pytest.mark.parametrize("schedule, spacing, final", [
    pytest.param(schedule, spacing, final, id=f"{name}-{spacing}-{final}")
    for name, schedule in SCHEDULES.items() for spacing in SPACINGS for final in ("zero", "none")
    if not (spacing in DISCRETE_SPACINGS and final == "none")])
def test_every_spacing_builds_a_valid_grid_of_any_length(schedule, spacing, final):
    discrete_only = spacing in DISCRETE_SPACINGS
    finite_top = spacing not in ("karras", "exponential", "logsnr") or np.isfinite(schedule.ksigma_max)
    for steps in (1, 2, 13):
        if discrete_only and not isinstance(schedule, DiscreteVP):
            with pytest.raises(ValueError, match="discrete"):
                make_grid(schedule, steps, spacing, final=final)
            continue
        if not finite_top:
            with pytest.raises(ValueError, match="finite"):
                make_grid(schedule, steps, spacing, final=final)
            continue
        grid = make_grid(schedule, steps, spacing, final=final)
        assert grid.steps == steps
        assert np.all(np.diff(grid.ksigma) < 0)
        if final == "zero":
            assert grid.sigma[-1] == 0.0 and grid.alpha[-1] == 1.0


def test_grid_rejects_noise_levels_that_do_not_decrease():
    schedule = VESchedule()
    ones = np.ones(3)
    with pytest.raises(ValueError, match="strictly decrease"):
        Grid(schedule, np.array([1.0, 2.0, 0.5]), ones, np.array([1.0, 2.0, 0.5]), np.array([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="strictly decrease"):
        Grid(schedule, np.array([2.0, 1.0, 1.0]), ones, np.array([2.0, 1.0, 1.0]), np.array([2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2"):
        Grid(schedule, np.array([1.0]), np.ones(1), np.array([1.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="points"):
        Grid(schedule, np.array([2.0, 1.0]), ones, np.array([2.0, 1.0]), np.array([2.0, 1.0]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(steps=True), "steps"),
    (dict(steps=5, spacing="geometric"), "spacing"), (dict(steps=5, final="sigma_max"), "final"),
    (dict(steps=1001, spacing="leading"), "num_train_timesteps"),
    (dict(steps=5, t_min=500.0, t_max=100.0), "t_min"),
])
def test_make_grid_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_grid(DiscreteVP(), **kwargs)


# ---------------------------------------------------------------------------------------------
# Parameterizations


POINTS = [(0.8, 0.6), (1.0, 3.0), (0.25, 0.75), (0.999, 0.0447)]  # VP, VE, flow, nearly clean


@pytest.mark.parametrize("alpha, sigma", POINTS)
@pytest.mark.parametrize("src, dst", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_conversions_are_exact_and_round_trip(alpha, sigma, src, dst):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(5, 3, dtype=torch.float64, generator=g)
    x = alpha * x0 + sigma * eps
    by_definition = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0,
                     "flow": eps - x0, "score": -eps / sigma}
    out = convert(by_definition[src], x, alpha, sigma, src, dst)
    torch.testing.assert_close(out, by_definition[dst], rtol=1e-12, atol=1e-12)
    back = convert(out, x, alpha, sigma, dst, src)
    torch.testing.assert_close(back, by_definition[src], rtol=1e-12, atol=1e-12)


def test_unknown_prediction_is_rejected():
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(torch.zeros(2), torch.zeros(2), 1.0, 0.5, "noise", "sample")
