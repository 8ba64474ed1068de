"""Stochastic samplers reach the right distribution: on the 2-D Gaussian mixture, the mean and
covariance of 20000 samples (seeded, in-kernel Philox noise, float32 state) match the mixture's
exact moments.

Tolerance for each entry = 4 standard errors + the solver's discretisation bias at the step count:

* standard errors from the samples themselves: sqrt(var_i / n) for mean_i, and
  std((x_i - m_i)(x_j - m_j)) / sqrt(n) for cov_ij (both ~0.005 here; the variances are 0.46
  and 0.29);
* bias: at 200 steps, measured with 200000 samples per solver, the largest mean error was 0.0023
  and the largest covariance error 0.025 (DDPM fixed_small / DDIM eta=1 / Euler ancestral shrink
  the covariance, Euler-Maruyama / stochastic Heun widen it; the error halves from 100 to 200
  steps, as a weak first-order method's should). The allowances below add a margin of ~1.5x.

What this catches: a noise scale off by 10% (Euler ancestral with s_noise = 0.9 misses by 1.9x
the tolerance, see the last test), missing or doubled noise, noise reused across steps, a
biased drift.
"""
from __future__ import annotations

import pytest
import torch

from fastdiff import sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import DiscreteVP, VESchedule

N_SAMPLES = 20000
STEPS = 200
SE_MULTIPLE = 4.0
BIAS_MEAN = 0.004
BIAS_COV = 0.04

# DDPM and DDIM on the original DDPM schedule (linear betas), leading spacing; the samplers of
# the reverse SDE on EDM's noise levels. Both start where the data are negligible against the
# noise (alpha_T = 0.006 and sigma_max = 80), so the N(0, I) start is the right prior.
CASES = [
    ("ddpm", {"variance": "fixed_small"}, "ddpm-linear"),
    ("ddpm", {"variance": "fixed_large"}, "ddpm-linear"),
    ("ddim", {"eta": 1.0}, "ddpm-linear"),
    ("euler_maruyama", {}, "edm"),
    ("euler_ancestral", {}, "edm"),
    ("heun_sde", {}, "edm"),
]
SCHEDULES = {
    "ddpm-linear": (lambda: DiscreteVP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "leading"),
    "edm": (VESchedule, "karras"),
}


def moments_and_errors(x: torch.Tensor):
    x = x.to(torch.float64)
    n = x.shape[0]
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (n - 1)
    se_mean = centred.std(0) / n ** 0.5
    products = centred[:, :, None] * centred[:, None, :]            # [n, d, d]
    se_cov = products.std(0) / n ** 0.5
    return mean, cov, se_mean, se_cov


@pytest.mark.parametrize("solver, options, setup", CASES,
                         ids=[f"{s}-{'-'.join(map(str, o.values())) or 'default'}" for s, o, _ in CASES])
def test_sample_moments_match_the_mixture(solver, options, setup):
    make_schedule, spacing = SCHEDULES[setup]
    schedule = make_schedule()
    mixture = GaussianMixture.default(schedule, dim=2)
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(0))
    x = sample(mixture, noise, solver=solver, solver_options=options, schedule=schedule, steps=STEPS,
               spacing=spacing, seed=1234, progress=False)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    mean, cov, se_mean, se_cov = moments_and_errors(x)
    tol_mean = SE_MULTIPLE * se_mean + BIAS_MEAN
    tol_cov = SE_MULTIPLE * se_cov + BIAS_COV
    assert torch.all((mean - mixture.mean).abs() <= tol_mean), (
        f"mean {mean.tolist()} vs {mixture.mean.tolist()} (tolerance {tol_mean.tolist()})")
    assert torch.all((cov - mixture.cov).abs() <= tol_cov), (
        f"covariance {cov.tolist()} vs {mixture.cov.tolist()} (tolerance {tol_cov.tolist()})")


def test_the_tolerance_is_tight_enough_to_catch_a_wrong_noise_scale():
    """The same check fails for Euler ancestral with s_noise = 0.9 (10% too little noise per step)."""
    schedule = VESchedule()
    mixture = GaussianMixture.default(schedule, dim=2)
    noise = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(0))
    x = sample(mixture, noise, solver="euler_ancestral", solver_options={"s_noise": 0.9}, schedule=schedule,
               steps=STEPS, seed=1234, progress=False)
    mean, cov, se_mean, se_cov = moments_and_errors(x)
    assert torch.any((cov - mixture.cov).abs() > SE_MULTIPLE * se_cov + BIAS_COV)
