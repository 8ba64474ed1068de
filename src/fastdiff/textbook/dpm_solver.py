"""DPM-Solver++(2M), Lu et al. (2022) Algorithm 2, in the schedule's own (alpha, sigma) with
lambda = log(alpha/sigma), h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1} / h_i:

    D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i

First order (D_i = x0_i) on the first step and on a step to sigma = 0, as in k-diffusion's
sample_dpmpp_2m; ``lower_order_final`` also on the last step when there are fewer than 15 steps
(diffusers' DPMSolverMultistepScheduler default).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import Grid
from .common import denoise, log_snr


def sample_dpmpp_2m(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                    lower_order_final: bool = False) -> torch.Tensor:
    alpha = [float(a) for a in grid.alpha]
    sigma = [float(s) for s in grid.sigma]
    lam = [log_snr(a, s) for a, s in zip(alpha, sigma)]
    N = grid.steps
    old_denoised = None
    for i in range(N):
        denoised = denoise(model, x, alpha[i], sigma[i], float(grid.model_t[i]), prediction)
        h = lam[i + 1] - lam[i]
        first_order = (old_denoised is None or sigma[i + 1] == 0.0
                       or (lower_order_final and i == N - 1 and N < 15))
        if first_order:
            D = denoised
        else:
            r = (lam[i] - lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * D
        old_denoised = denoised
    return x
