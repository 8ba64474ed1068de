"""Explicit Runge-Kutta methods on the probability-flow ODE, as data (a Butcher tableau) driving
one generic stepper: Euler, Heun, midpoint, Ralston, RK3, RK4.

Each stage is one row: the model is evaluated at the stage point, its derivative
d = (y - x0)/s is kept in a history slot, and the row writes the next stage point into y (or,
for the last stage, the new state into x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, check_space, derivative_quantity, grid_point, ode_scale, ode_s, point_at_s, register


@dataclass(frozen=True)
class ButcherTableau:
    a: Tuple[Tuple[float, ...], ...]   # a[j] = coefficients of stages 0..j-1 for stage j
    b: Tuple[float, ...]
    c: Tuple[float, ...]
    order: int

    def __post_init__(self):
        S = len(self.b)
        if len(self.c) != S or len(self.a) != S:
            raise ValueError("Butcher tableau: a, b and c must have one entry per stage")
        for j, row in enumerate(self.a):
            if len(row) != j:
                raise ValueError(f"Butcher tableau: explicit stage {j} needs {j} coefficients, got {len(row)}")
            if abs(sum(row) - self.c[j]) > 1e-12:
                raise ValueError(f"Butcher tableau: row {j} of a must sum to c[{j}]")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError("Butcher tableau: b must sum to 1 (consistency)")

    @property
    def stages(self) -> int:
        return len(self.b)


TABLEAUS = {
    "euler": ButcherTableau(a=((),), b=(1.0,), c=(0.0,), order=1),
    "heun": ButcherTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2),
    "midpoint": ButcherTableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5), order=2),
    "ralston": ButcherTableau(a=((), (2 / 3,)), b=(0.25, 0.75), c=(0.0, 2 / 3), order=2),
    "rk3": ButcherTableau(a=((), (0.5,), (-1.0, 2.0)), b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), order=3),
    "rk4": ButcherTableau(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
                          c=(0.0, 0.5, 0.5, 1.0), order=4),
}


class RungeKutta(Solver):
    """Explicit RK on dy/ds = (y - x0)/s. A step that ends at s = 0 is taken with Euler (the
    derivative is undefined there), as k-diffusion's Heun does."""

    tableau: ButcherTableau

    def __init__(self, ode_space: str = "auto"):
        self.ode_space = ode_space

    @property
    def order(self):
        return self.tableau.order

    @property
    def num_slots(self):
        return self.tableau.stages - 1

    def rows(self, grid: Grid) -> List[Row]:
        space = check_space(self.ode_space, grid)
        tab = self.tableau
        rows: List[Row] = []
        for n in range(grid.steps):
            p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
            s0, s1 = ode_s(space, p0.alpha, p0.sigma), ode_s(space, p1.alpha, p1.sigma)
            dt = s1 - s0
            c0, c1 = ode_scale(space, p0.alpha, p0.sigma), ode_scale(space, p1.alpha, p1.sigma)
            if p1.sigma == 0.0 or tab.stages == 1:
                qy, qx0 = derivative_quantity(space, p0)
                rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                                out_x=Out(x=c1 / c0, h=c1 * dt), next_eval="x"))
                continue
            points = [p0 if cj == 0.0 else p1 if cj == 1.0 else point_at_s(grid, space, s0 + cj * dt)
                      for cj in tab.c]
            for j in range(tab.stages):
                qy, qx0 = derivative_quantity(space, points[j])
                last = j == tab.stages - 1
                if last:
                    coefs, target = tab.b, p1
                else:
                    coefs, target = tab.a[j + 1] + (0.0,) * (j + 1 - len(tab.a[j + 1])), points[j + 1]
                ct = ode_scale(space, target.alpha, target.sigma)
                out = Out(x=ct / c0, h=ct * dt * coefs[j],
                          hist=tuple((l, ct * dt * coefs[l]) for l in range(j) if coefs[l] != 0.0))
                rows.append(Row(step=n, eval_at="x" if j == 0 else "y", point=points[j], q_y=qy, q_x0=qx0,
                                out_x=out if last else None, out_y=None if last else out,
                                hist_write=j if not last else -1, next_eval="x" if last else "y"))
        return rows


def _rk(name: str, doc: str):
    cls = type(name.capitalize(), (RungeKutta,), {"tableau": TABLEAUS[name], "__doc__": doc})
    return register(name)(cls)


Euler = _rk("euler", "Euler on the probability-flow ODE (k-diffusion sample_euler, diffusers EulerDiscrete).")
Heun = _rk("heun", "Heun's 2nd-order method (EDM Algorithm 1 without churn; k-diffusion sample_heun).")
Midpoint = _rk("midpoint", "Explicit midpoint, 2nd order.")
Ralston = _rk("ralston", "Ralston's 2nd-order method (minimum local error bound).")
RK3 = _rk("rk3", "Kutta's 3rd-order method.")
RK4 = _rk("rk4", "The classical 4th-order Runge-Kutta method.")
