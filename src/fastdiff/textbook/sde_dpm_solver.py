"""SDE-DPM-Solver-1 / -2M in noise prediction as diffusers' DPMSolverMultistepScheduler writes it
(``algorithm_type='sde-dpmsolver'``): the oracle of fastdiff.solvers.sde_dpm_solver. Plain
PyTorch on x = alpha x0 + sigma eps; a step to sigma = 0 takes the first-order formula's limit."""
from __future__ import annotations

import math
from typing import Callable, List

import torch

from ..schedules import Grid
from .common import denoise, log_snr, noise_at


def sample_sde_dpmsolver(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, order: int = 2,
                         solver_type: str = "midpoint", lower_order_final: bool = True,
                         euler_at_final: bool = False) -> torch.Tensor:
    N = grid.steps
    eps: List[torch.Tensor] = []
    lam = [log_snr(float(grid.alpha[i]), float(grid.sigma[i])) for i in range(N + 1)]
    for n in range(N):
        a_s, s_s, t = float(grid.alpha[n]), float(grid.sigma[n]), float(grid.model_t[n])
        a_t, s_t = float(grid.alpha[n + 1]), float(grid.sigma[n + 1])
        x0 = denoise(model, x, a_s, s_s, t, prediction)
        eps.append((x - a_s * x0) / s_s)
        short = lower_order_final and N < 15
        k = min(order, n + 1)
        if n == N - 1 and (euler_at_final or short or s_t == 0.0):
            k = 1
        elif n == N - 2 and short:
            k = min(k, 2)
        z = noise_at(noise, n)
        if s_t == 0.0:
            x = (a_t / a_s) * (x - 2.0 * s_s * eps[-1]) + (a_t * s_s / a_s) * z
            continue
        h = lam[n + 1] - lam[n]
        x_new = (a_t / a_s) * x - 2.0 * (s_t * (math.exp(h) - 1.0)) * eps[-1] \
            + s_t * math.sqrt(math.exp(2 * h) - 1.0) * z
        if k == 2:
            r0 = (lam[n] - lam[n - 1]) / h
            D1 = (1.0 / r0) * (eps[-1] - eps[-2])
            if solver_type == "midpoint":
                x_new = x_new - (s_t * (math.exp(h) - 1.0)) * D1
            else:
                x_new = x_new - 2.0 * (s_t * ((math.exp(h) - 1.0) / h - 1.0)) * D1
        x = x_new
    return x
