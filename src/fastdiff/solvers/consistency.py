"""Multistep consistency sampling: denoise, then re-noise to the next point with fresh noise.

* ``lcm`` (Song et al. 2023, "Consistency Models", algorithm 1, in the form of Luo et al. 2023,
  "Latent Consistency Models", and diffusers' LCMScheduler): at point n the consistency function
  f = c_skip(t) x + c_out(t) x0 with the boundary-condition scalings of the discrete timestep
  t (the point's model time) scaled by ``timestep_scaling``: c_skip = sd^2 / ((s t)^2 + sd^2),
  c_out = s t / sqrt((s t)^2 + sd^2), sd = ``sigma_data``; ``timestep_scaling=None``: f = x0;
  ``scalings``: the (c_skip, c_out) of each step, given (diffusers' float32 values).
  Then x_{n+1} = alpha_{n+1} f + sigma_{n+1} z: a clean last point (sigma = 0, alpha = 1) returns
  f itself (LCM's last step; consistency models' grids may end a hair above it).
* ``tcd`` (Zheng et al. 2024, "Trajectory Consistency Distillation", strategic stochastic
  sampling, as diffusers' TCDScheduler): at point n, DDIM from t_n to an intermediate point s_n
  (default the schedule at time (1 - gamma) t_{n+1}; ``points`` gives them, e.g. diffusers'
  floor((1 - gamma) t) on a discrete schedule), x_s = alpha_s x0 + sigma_s eps, then the forward
  process from s_n to t_{n+1}: x_{n+1} = (alpha_{n+1}/alpha_s) x_s + sqrt(sigma_{n+1}^2 -
  (alpha_{n+1}/alpha_s)^2 sigma_s^2) z. gamma = 0 is DDIM. The last step returns x_s (no noise).

Each row's quantity h is f (lcm) or x_s (tcd): the value diffusers returns beside prev_sample
(``denoised`` / ``pred_noised_sample``). No history.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import Solver, check_eta, grid_point, register


def boundary_scalings(model_t: float, timestep_scaling: Optional[float], sigma_data: float = 0.5) -> Tuple[float, float]:
    """(c_skip, c_out) of the consistency function at model time ``model_t`` (LCM's discrete form)."""
    if timestep_scaling is None:
        return 0.0, 1.0
    st = model_t * timestep_scaling
    n = st * st + sigma_data * sigma_data
    return sigma_data * sigma_data / n, st / math.sqrt(n)


def renoise(s: Point, q: Point) -> Tuple[float, float]:
    """(a, std) of the forward process from s to the noisier q: x_q = a x_s + std z."""
    a = q.alpha / s.alpha
    return a, math.sqrt(max(q.sigma ** 2 - a * a * s.sigma ** 2, 0.0))


@register("lcm")
class LatentConsistency(Solver):
    """Multistep consistency sampling (LCM's boundary scalings; see the module docstring)."""

    stochastic = True

    def __init__(self, timestep_scaling: Optional[float] = None, sigma_data: float = 0.5,
                 scalings: Optional[Sequence[Tuple[float, float]]] = None):
        self.timestep_scaling = None if timestep_scaling is None else float(timestep_scaling)
        self.sigma_data = check_eta(sigma_data, "sigma_data")
        self.scalings = None if scalings is None else tuple((float(a), float(b)) for a, b in scalings)

    def _scalings(self, n: int, p: Point) -> Tuple[float, float]:
        if self.scalings is None:
            return boundary_scalings(p.model_t, self.timestep_scaling, self.sigma_data)
        if n >= len(self.scalings):
            raise ValueError(f"scalings gives {len(self.scalings)} pairs; step {n} needs one")
        return self.scalings[n]

    def rows(self, grid: Grid) -> List[Row]:
        N = grid.steps
        rows = []
        for n in range(N):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            c_skip, c_out = self._scalings(n, p)
            out = Out(h=q.alpha, z=q.sigma)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=c_skip, q_x0=c_out, out_x=out,
                            noise_id=n if out.z else -1, next_eval="x"))
        return rows


@register("tcd")
class TrajectoryConsistency(Solver):
    """TCD's strategic stochastic sampling with ``gamma`` in [0, 1] (see the module docstring)."""

    def __init__(self, gamma: float = 0.3, points: Optional[Sequence[Point]] = None):
        self.gamma = check_eta(gamma, "gamma")
        if self.gamma > 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if points is not None:
            points = tuple(points)
            if not all(isinstance(p, Point) for p in points):
                raise TypeError("points must be a sequence of fastdiff.program.Point")
        self.points = points
        self.stochastic = self.gamma > 0

    def _s(self, grid: Grid, n: int) -> Point:
        if self.points is not None:
            if n >= len(self.points):
                raise ValueError(f"points gives {len(self.points)} points; step {n} needs one")
            return self.points[n]
        q = grid_point(grid, n + 1)
        if self.gamma == 0.0 or q.sigma == 0.0:
            return q
        t = (1.0 - self.gamma) * q.t
        alpha, sigma = (float(v) for v in grid.schedule.alpha_sigma(t))
        return Point(t, alpha, sigma, float(grid.schedule.model_time(t)))

    def rows(self, grid: Grid) -> List[Row]:
        N = grid.steps
        rows = []
        for n in range(N):
            p, q, s = grid_point(grid, n), grid_point(grid, n + 1), self._s(grid, n)
            # x_s = alpha_s x0 + sigma_s eps, eps = (E - alpha_t x0) / sigma_t
            qy, qx0 = s.sigma / p.sigma, s.alpha - s.sigma * p.alpha / p.sigma
            a, std = (1.0, 0.0) if n == N - 1 else renoise(s, q)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0, out_x=Out(h=a, z=std),
                            noise_id=n if std else -1, next_eval="x"))
        return rows
