"""The reverse-diffusion predictor of Song et al. 2021 ("Score-Based Generative Modeling through
Stochastic Differential Equations", the predictor of their predictor-corrector sampler for the VE SDE,
diffusers' ScoreSdeVeScheduler.step_pred), in the VE coordinates y = x / alpha, s = sigma / alpha:

    y' = y + (s_n^2 - s_{n+1}^2) score + sqrt(s_n^2 - s_{n+1}^2) z,   score = (x0 - y) / s_n^2

then x' = alpha_{n+1} y' (alpha = 1 on VE schedules, where it is the paper's and diffusers' form with
the discrete variance difference as g^2). One model call and one draw per step; no history.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, grid_point, register


@register("reverse_diffusion")
class ReverseDiffusion(Solver):
    """Reverse-diffusion predictor (see the module docstring)."""

    stochastic = True

    def rows(self, grid: Grid) -> List[Row]:
        if not np.all(grid.alpha > 0):
            raise ValueError("reverse_diffusion steps in y = x / alpha and needs alpha > 0 at every grid point")
        rows = []
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            s0, s1 = p.sigma / p.alpha, q.sigma / q.alpha
            g2 = s0 * s0 - s1 * s1
            # h = score in y: (x0 - E / alpha) / s0^2
            rows.append(Row(step=n, eval_at="x", point=p, q_y=-1.0 / (p.alpha * s0 * s0), q_x0=1.0 / (s0 * s0),
                            out_x=Out(x=q.alpha / p.alpha, h=q.alpha * g2, z=q.alpha * math.sqrt(g2)),
                            noise_id=n if g2 > 0 else -1, next_eval="x"))
        return rows
