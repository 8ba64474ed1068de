"""PNDM as the paper writes it (Liu et al. 2022, algorithm 1 and eq. 9-13) and diffusers' variants
(``skip_prk_steps``; v_prediction combined before its conversion to noise). Plain PyTorch on the
schedule's native x = alpha x0 + sigma eps; imports no solver, program or op (the oracle of
fastdiff.solvers.pndm).

The transfer phi is eq. 9, x_b = sqrt(abar_b / abar_a) x_a - (abar_b - abar_a) e /
(sqrt(abar_a) (sqrt((1 - abar_b) abar_a) + sqrt((1 - abar_a) abar_b))), written for a VP schedule;
for any other (alpha, sigma) the sample is mapped to the VP schedule of the same noise level
(x / sqrt(alpha^2 + sigma^2)), where the formula holds as written, and back.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..schedules import Grid
from .common import denoise

Pt = Tuple[float, float, float]                       # (alpha, sigma, model time)


def _phi(x: torch.Tensor, e: torch.Tensor, a: Pt, b: Pt) -> torch.Tensor:
    """Eq. 9 from point a to point b (e: the noise estimate)."""
    ra, rb = math.hypot(a[0], a[1]), math.hypot(b[0], b[1])
    abar_a, abar_b = (a[0] / ra) ** 2, (b[0] / rb) ** 2
    xv = x / ra
    den = math.sqrt(abar_a) * (math.sqrt((1 - abar_b) * abar_a) + math.sqrt((1 - abar_a) * abar_b))
    return rb * (math.sqrt(abar_b / abar_a) * xv - (abar_b - abar_a) / den * e)


def sample_pndm(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, warmup: str = "prk",
                quantity: str = "eps", midpoints: Optional[Sequence] = None) -> torch.Tensor:
    N = grid.steps
    pts = [(float(grid.alpha[i]), float(grid.sigma[i]), float(grid.model_t[i])) for i in range(N + 1)]

    def mid(n) -> Tuple[Pt, Pt]:
        """Where the first stage steps to; where the second and third evaluate and step to."""
        if midpoints is not None:
            m = midpoints[n]
            m = (m, m) if hasattr(m, "alpha") else m
            return tuple((p.alpha, p.sigma, p.model_t) for p in m)
        t = 0.5 * (float(grid.t[n]) + float(grid.t[n + 1]))
        a, s = (float(v) for v in grid.schedule.alpha_sigma(t))
        return (a, s, t), (a, s, t)

    def pred(xx: torch.Tensor, p: Pt) -> torch.Tensor:
        """The model's eps (or its v, for quantity='v') at xx, point p."""
        x0 = denoise(model, xx, p[0], p[1], p[2], prediction)
        if quantity == "eps":
            return (xx - p[0] * x0) / p[1]
        return (p[0] * xx - x0) / p[1]

    def step(xx: torch.Tensor, m: torch.Tensor, a: Pt, b: Pt) -> torch.Tensor:
        if quantity == "v":     # diffusers: the combined v made a noise estimate at the step's start
            m = a[0] * m + a[1] * xx
        return _phi(xx, m, a, b)

    ets: List[torch.Tensor] = []
    warm = min(3, N - 1) if warmup == "prk" else 0
    for n in range(N):
        a, b = pts[n], pts[n + 1]
        if n < warm:
            pm0, pm = mid(n)
            e1 = pred(x, a)
            ets.append(e1)
            x1 = step(x, e1, a, pm0)
            e2 = pred(x1, pm)
            x2 = step(x, e2, a, pm)
            e3 = pred(x2, pm)
            x3 = step(x, e3, a, b)
            e4 = pred(x3, b)
            x = step(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, a, b)
        elif n == 0 and warmup == "skip" and N > 1:
            e0 = pred(x, a)
            ets.append(e0)
            x1 = step(x, e0, a, b)
            x = step(x, (e0 + pred(x1, b)) / 2, a, b)
        else:
            ets.append(pred(x, a))
            k = min(len(ets), 4)
            if k == 1:
                m = ets[-1]
            elif k == 2:
                m = (3 * ets[-1] - ets[-2]) / 2
            elif k == 3:
                m = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                m = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
            x = step(x, m, a, b)
    return x
