"""Stochastic samplers in the ODE coordinates (y = x/c, s = sigma/c): Euler ancestral, and the
reverse SDE dy = 2 (y - x0)/s ds + sqrt(2 s) dW solved by Euler-Maruyama and by stochastic Heun.

For the SDE solvers the last step to s = 0 returns the denoised estimate x0 (Song et al.'s
"noise removal" step): the SDE's diffusion does not vanish there.
"""
from __future__ import annotations

import math
from typing import List

from ..program import Out, Row
from ..schedules import Grid
from .base import (Solver, ancestral_step, check_space, derivative_quantity, register, set_noise_options,
                   step_geometry)


class _ODESpaceSolver(Solver):
    stochastic = True

    def __init__(self, ode_space: str = "auto"):
        self.ode_space = ode_space

    def _space(self, grid: Grid) -> str:
        space = check_space(self.ode_space, grid)
        if space != "ve":
            raise ValueError(f"{self.name} is defined in the 've' coordinates (x/alpha, sigma/alpha); "
                             "pass ode_space='ve' with a grid whose noise levels are finite")
        return space

    @staticmethod
    def _noise_removal_row(n, space, p0, s0, c0, c1) -> Row:
        """The last step to s = 0 of the SDE solvers: y' = x0 = y - s d."""
        qy, qx0 = derivative_quantity(space, p0)
        return Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0, out_x=Out(x=c1 / c0, h=-c1 * s0),
                   next_eval="x")


@register("euler_ancestral")
class EulerAncestral(_ODESpaceSolver):
    """k-diffusion sample_euler_ancestral: Euler down to s_down, then fresh noise of std s_up."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto"):
        set_noise_options(self, eta, s_noise, ode_space)

    def rows(self, grid: Grid) -> List[Row]:
        space = self._space(grid)
        rows = []
        for n in range(grid.steps):
            p0, p1, s0, s1, c0, c1 = step_geometry(grid, n, space)
            s_down, s_up = ancestral_step(s0, s1, self.eta)
            qy, qx0 = derivative_quantity(space, p0)
            z = c1 * s_up * self.s_noise if s1 > 0 else 0.0
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                            out_x=Out(x=c1 / c0, h=c1 * (s_down - s0), z=z),
                            noise_id=n if z else -1, next_eval="x"))
        return rows


@register("euler_maruyama")
class EulerMaruyama(_ODESpaceSolver):
    """Euler-Maruyama on the reverse SDE: y' = y + 2 d ds + sqrt(2 s |ds|) z."""

    def rows(self, grid: Grid) -> List[Row]:
        space = self._space(grid)
        rows = []
        for n in range(grid.steps):
            p0, p1, s0, s1, c0, c1 = step_geometry(grid, n, space)
            if s1 == 0.0:
                rows.append(self._noise_removal_row(n, space, p0, s0, c0, c1))
                continue
            ds = s1 - s0
            qy, qx0 = derivative_quantity(space, p0)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                            out_x=Out(x=c1 / c0, h=2.0 * c1 * ds, z=c1 * math.sqrt(-2.0 * s0 * ds)),
                            noise_id=n, next_eval="x"))
        return rows


@register("heun_sde")
class HeunSDE(_ODESpaceSolver):
    """Stochastic Heun on the reverse SDE: an Euler-Maruyama predictor, then the average of the
    drifts at both ends with the same noise draw."""

    num_slots = 1

    def rows(self, grid: Grid) -> List[Row]:
        space = self._space(grid)
        rows = []
        for n in range(grid.steps):
            p0, p1, s0, s1, c0, c1 = step_geometry(grid, n, space)
            if s1 == 0.0:
                rows.append(self._noise_removal_row(n, space, p0, s0, c0, c1))
                continue
            qy, qx0 = derivative_quantity(space, p0)
            ds = s1 - s0
            g = math.sqrt(-2.0 * s0 * ds)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0, hist_write=0,
                            out_y=Out(x=c1 / c0, h=2.0 * c1 * ds, z=c1 * g), noise_id=n, next_eval="y"))
            qy1, qx01 = derivative_quantity(space, p1)
            rows.append(Row(step=n, eval_at="y", point=p1, q_y=qy1, q_x0=qx01,
                            out_x=Out(x=c1 / c0, h=c1 * ds, z=c1 * g, hist=((0, c1 * ds),)),
                            noise_id=n, next_eval="x"))
        return rows


def ancestral_noise_row(step: int, scale: float, noise_std: float) -> Row:
    """A model-free row x <- scale * x + noise_std * z with the step's own Gaussian draw
    (noise_id = step): the fresh-noise half of an ancestral step whose deterministic half ran on
    its own (fastdiff.adaptive's ancestral DPM-Solver steps)."""
    return Row(step=step, out_x=Out(x=scale, z=noise_std), noise_id=step)
