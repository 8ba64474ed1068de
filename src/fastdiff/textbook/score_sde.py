"""The reverse-diffusion predictor as Song et al. 2021 and diffusers' ScoreSdeVeScheduler.step_pred
write it, in the VE coordinates y = x / alpha (the oracle of fastdiff.solvers.score_sde): with the
score s(y) = (x0 - y) / s_n^2 and g^2 = s_n^2 - s_{n+1}^2, y' = y + g^2 s(y) + g z."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import Grid
from .common import denoise, noise_at


def sample_reverse_diffusion(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None) -> torch.Tensor:
    for n in range(grid.steps):
        a0, sg0 = float(grid.alpha[n]), float(grid.sigma[n])
        a1, sg1 = float(grid.alpha[n + 1]), float(grid.sigma[n + 1])
        x0 = denoise(model, x, a0, sg0, float(grid.model_t[n]), prediction)
        y, s0, s1 = x / a0, sg0 / a0, sg1 / a1
        score = (x0 - y) / s0 ** 2
        g2 = s0 ** 2 - s1 ** 2
        y = y + g2 * score + math.sqrt(g2) * noise_at(noise, n)
        x = a1 * y
    return x
