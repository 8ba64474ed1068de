"""Multistep consistency sampling as the papers and diffusers write it (the oracle of
fastdiff.solvers.consistency). Plain PyTorch on the schedule's native x = alpha x0 + sigma eps.

* ``sample_lcm``: Song et al. 2023 algorithm 1 with LCM's boundary scalings (diffusers'
  LCMScheduler.step): denoised = c_skip(t) x + c_out(t) x0; x' = alpha' denoised + sigma' z (a clean
  last point: denoised).
* ``sample_tcd``: Zheng et al. 2024 (diffusers' TCDScheduler.step): pred_noised_sample = alpha_s x0 +
  sigma_s eps at s = (1 - gamma) t' (or the given ``points``), then x' = sqrt(abar'/abar_s)
  pred_noised_sample + sqrt(1 - abar'/abar_s) z written for any (alpha, sigma); the last step
  returns pred_noised_sample.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..schedules import Grid
from .common import denoise, noise_at


def sample_lcm(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
               timestep_scaling: Optional[float] = None, sigma_data: float = 0.5) -> torch.Tensor:
    N = grid.steps
    for n in range(N):
        a, s, t = float(grid.alpha[n]), float(grid.sigma[n]), float(grid.model_t[n])
        x0 = denoise(model, x, a, s, t, prediction)
        if timestep_scaling is None:
            c_skip, c_out = 0.0, 1.0
        else:
            st = t * timestep_scaling
            c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
            c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if float(grid.sigma[n + 1]) == 0.0:
            x = float(grid.alpha[n + 1]) * denoised
        else:
            x = float(grid.alpha[n + 1]) * denoised + float(grid.sigma[n + 1]) * noise_at(noise, n)
    return x


def sample_tcd(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, gamma: float = 0.3,
               points: Optional[Sequence] = None) -> torch.Tensor:
    N = grid.steps
    for n in range(N):
        a, s, t = float(grid.alpha[n]), float(grid.sigma[n]), float(grid.model_t[n])
        x0 = denoise(model, x, a, s, t, prediction)
        eps = (x - a * x0) / s
        a1, s1 = float(grid.alpha[n + 1]), float(grid.sigma[n + 1])
        if points is not None:
            a_s, s_s = points[n].alpha, points[n].sigma
        elif gamma == 0.0 or s1 == 0.0:
            a_s, s_s = a1, s1
        else:
            a_s, s_s = (float(v) for v in grid.schedule.alpha_sigma((1.0 - gamma) * float(grid.t[n + 1])))
        pred_noised = a_s * x0 + s_s * eps
        if n == N - 1:
            return pred_noised
        r = a1 / a_s
        std = math.sqrt(max(s1 ** 2 - r * r * s_s ** 2, 0.0))
        x = r * pred_noised + (std * noise_at(noise, n) if std else 0.0)
    return x
