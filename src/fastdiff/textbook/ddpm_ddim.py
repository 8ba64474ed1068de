"""DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021) as diffusers' DDPMScheduler
and DDIMScheduler write their ``step`` (without clipping or thresholding), in terms of
alpha_bar = alphas_cumprod.

Those formulas are stated for variance-preserving x = sqrt(abar) x0 + sqrt(1 - abar) eps. For any
other schedule the same process in VP coordinates is x_vp = x / sqrt(alpha^2 + sigma^2) with
abar = alpha^2 / (alpha^2 + sigma^2): x0 and eps are unchanged, so we step there and scale back.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..parameterization import convert
from ..schedules import Grid
from .common import noise_at


def _vp(grid: Grid, n: int):
    """(alpha_bar, 1 - alpha_bar, scale) of grid point n, with x = scale * x_vp. 1 - alpha_bar is
    taken from sigma rather than by subtraction, so it is exact where alpha_bar = 0 (zero SNR)."""
    a, s = float(grid.alpha[n]), float(grid.sigma[n])
    scale = math.hypot(a, s)
    return (a / scale) ** 2, (s / scale) ** 2, scale


def _model_x0_eps(model, x, grid, n, prediction):
    a, s = float(grid.alpha[n]), float(grid.sigma[n])
    t = torch.full((x.shape[0],), float(grid.model_t[n]), dtype=x.dtype, device=x.device)
    out = model(x, t).to(x.dtype)
    return convert(out, x, a, s, prediction, "sample"), convert(out, x, a, s, prediction, "epsilon")


def sample_ddpm(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                variance: str = "fixed_small") -> torch.Tensor:
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    for i in range(grid.steps):
        pred_original_sample, _ = _model_x0_eps(model, x, grid, i, prediction)
        alpha_prod_t, beta_prod_t, scale_t = _vp(grid, i)
        alpha_prod_t_prev, beta_prod_t_prev, scale_prev = _vp(grid, i + 1)
        sample = x / scale_t
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # Ho et al. eq. (7): the mean of q(x_{t-1} | x_t, x_0)
        pred_original_sample_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
        last = float(grid.sigma[i + 1]) == 0.0        # diffusers: no noise on the step to the data
        if not last:
            if variance == "fixed_small":
                var = max(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
            else:
                var = current_beta_t
            prev_sample = prev_sample + var ** 0.5 * noise_at(noise, i)
        x = prev_sample * scale_prev
    return x


def sample_ddim(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                eta: float = 0.0) -> torch.Tensor:
    for i in range(grid.steps):
        pred_original_sample, pred_epsilon = _model_x0_eps(model, x, grid, i, prediction)
        alpha_prod_t, beta_prod_t, _ = _vp(grid, i)
        alpha_prod_t_prev, beta_prod_t_prev, scale_prev = _vp(grid, i + 1)
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)  # eq. (16)
        std_dev_t = eta * variance ** 0.5
        pred_sample_direction = max(beta_prod_t_prev - std_dev_t ** 2, 0.0) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        if std_dev_t > 0:
            prev_sample = prev_sample + std_dev_t * noise_at(noise, i)
        x = prev_sample * scale_prev
    return x
