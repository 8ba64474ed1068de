"""PLMS from the first step as diffusers' IPNDMScheduler writes it (the oracle of
fastdiff.solvers.plms): e_n the model's noise prediction at x_n, e the Adams-Bashforth
combination of the predictions so far (fixed equal-step weights, order up to ``max_order``),
pred = (x - sigma e) / alpha (0 where alpha = 0), x' = alpha' pred + sigma' e."""
from __future__ import annotations

from typing import Callable, List

import torch

from ..schedules import Grid
from .common import denoise

_W = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                max_order: int = 4) -> torch.Tensor:
    ets: List[torch.Tensor] = []
    for n in range(grid.steps):
        a, s, t = float(grid.alpha[n]), float(grid.sigma[n]), float(grid.model_t[n])
        x0 = denoise(model, x, a, s, t, prediction)
        ets.append((x - a * x0) / s)
        w = _W[min(len(ets), max_order)]
        e = sum(c * ets[-1 - j] for j, c in enumerate(w))
        pred = (x - s * e) / a if a != 0.0 else torch.zeros_like(x)
        x = float(grid.alpha[n + 1]) * pred + float(grid.sigma[n + 1]) * e
    return x
