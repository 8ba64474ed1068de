"""EDM samplers (Karras et al. 2022, Algorithm 2): Euler or Heun steps with "churn".

Churn raises the noise level of step n from s to s_hat = s (1 + gamma) by adding fresh noise of
std sqrt(s_hat^2 - s^2) before the step, with gamma = min(s_churn / N, sqrt(2) - 1) for noise
levels in [s_tmin, s_tmax] (k-diffusion's sample_euler / sample_heun / sample_dpm_2, same
arguments). In the program that is a row without a model call (``point=None``) that writes
x + noise; the step then starts from the off-grid point s_hat.

Churn is only correct in the VE coordinates y = x/alpha, s = sigma/alpha (there y = x0 + s*eps,
so adding independent noise moves y to the marginal at s_hat), so churn needs ode_space 've'.
Without churn (s_churn = 0) edm_euler / edm_heun produce exactly the programs of euler / heun.
On discrete schedules a churned noise level above the largest trained one is clamped when it is
turned into the model's timestep, as k-diffusion's DiscreteSchedule does.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import (Solver, check_eta, check_space, derivative_quantity, grid_point, ode_scale, ode_s, point_at_s,
                   register)

MAX_GAMMA = math.sqrt(2.0) - 1.0   # EDM: more churn than this would add more noise than the step removes


@dataclass(frozen=True)
class Churn:
    """EDM's stochasticity settings (Algorithm 2: S_churn, S_tmin, S_tmax, S_noise)."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        check_eta(self.s_churn, "s_churn")
        check_eta(self.s_noise, "s_noise")
        if not (self.s_tmin >= 0.0 and self.s_tmax >= self.s_tmin):
            raise ValueError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={self.s_tmin}, s_tmax={self.s_tmax}")

    @property
    def active(self) -> bool:
        return self.s_churn > 0.0

    def gamma(self, ksigma: float, steps: int) -> float:
        if not (self.active and self.s_tmin <= ksigma <= self.s_tmax):
            return 0.0
        return min(self.s_churn / steps, MAX_GAMMA)

    def check_space(self, space: str):
        if self.active and space != "ve":
            raise ValueError("churn (s_churn > 0) adds noise in the VE coordinates x/alpha; pass ode_space='ve' "
                             "(on flow schedules also t_max < 1, so that the noise levels are finite)")

    def begin_step(self, grid: Grid, n: int, space: str, noise_ids: Iterator[int]) -> Tuple[Optional[Row], Point, float]:
        """(churn row or None, the point the step starts from, its ODE noise level s_hat)."""
        p = grid_point(grid, n)
        s = ode_s(space, p.alpha, p.sigma)
        gamma = self.gamma(float(grid.ksigma[n]), grid.steps)
        if gamma == 0.0:
            return None, p, s
        s_hat = s * (1.0 + gamma)
        p_hat = point_at_s(grid, space, s_hat)
        c, c_hat = ode_scale(space, p.alpha, p.sigma), ode_scale(space, p_hat.alpha, p_hat.sigma)
        std = math.sqrt(s_hat * s_hat - s * s) * self.s_noise
        row = Row(step=n, eval_at="x", point=None, out_x=Out(x=c_hat / c, z=c_hat * std),
                  noise_id=next(noise_ids) if std else -1, next_eval="x")
        return row, p_hat, s_hat


class _EDMSampler(Solver):
    stages = 1

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 ode_space: str = "auto"):
        self.churn = Churn(float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        self.ode_space = ode_space
        self.stochastic = self.churn.active and self.churn.s_noise > 0

    @property
    def order(self):
        return 1 if self.stochastic else self.stages

    @property
    def num_slots(self):
        return self.stages - 1

    def rows(self, grid: Grid) -> List[Row]:
        space = check_space(self.ode_space, grid)
        self.churn.check_space(space)
        noise_ids = itertools.count()
        rows: List[Row] = []
        for n in range(grid.steps):
            churn_row, p_hat, s_hat = self.churn.begin_step(grid, n, space, noise_ids)
            if churn_row is not None:
                rows.append(churn_row)
            p1 = grid_point(grid, n + 1)
            s1 = ode_s(space, p1.alpha, p1.sigma)
            c_hat, c1 = ode_scale(space, p_hat.alpha, p_hat.sigma), ode_scale(space, p1.alpha, p1.sigma)
            dt = s1 - s_hat
            qy, qx0 = derivative_quantity(space, p_hat)
            if self.stages == 1 or p1.sigma == 0.0:   # Euler (EDM and k-diffusion end with an Euler step to 0)
                rows.append(Row(step=n, eval_at="x", point=p_hat, q_y=qy, q_x0=qx0,
                                out_x=Out(x=c1 / c_hat, h=c1 * dt), next_eval="x"))
                continue
            # Heun: Euler predictor into y, then the trapezoidal corrector from x.
            rows.append(Row(step=n, eval_at="x", point=p_hat, q_y=qy, q_x0=qx0, hist_write=0,
                            out_y=Out(x=c1 / c_hat, h=c1 * dt), next_eval="y"))
            qy1, qx01 = derivative_quantity(space, p1)
            rows.append(Row(step=n, eval_at="y", point=p1, q_y=qy1, q_x0=qx01,
                            out_x=Out(x=c1 / c_hat, h=0.5 * c1 * dt, hist=((0, 0.5 * c1 * dt),)), next_eval="x"))
        return rows


@register("edm_euler")
class EDMEuler(_EDMSampler):
    """EDM Algorithm 2 with Euler steps (k-diffusion sample_euler, with its churn options)."""

    stages = 1


@register("edm_heun")
class EDMHeun(_EDMSampler):
    """EDM Algorithm 2: Heun steps with churn (k-diffusion sample_heun); the step to 0 is Euler."""

    stages = 2
