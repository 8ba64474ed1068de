"""Probability-flow ODE samplers in k-diffusion's form, dy/ds = d = (y - x0)/s (see
ODECoordinates): Euler (Karras et al. 2022 Alg. 2 without churn; k-diffusion sample_euler),
Heun (k-diffusion sample_heun), and the classical explicit Runge-Kutta methods written out
stage by stage. A step that ends at sigma = 0 is an Euler step (d is undefined there), as in
k-diffusion's sample_heun.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..schedules import Grid
from .common import ODECoordinates


def _ends_clean(grid: Grid, n: int) -> bool:
    return float(grid.sigma[n + 1]) == 0.0


def sample_euler(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                 ode_space: str = "auto") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        d = ode.d(y, i)
        dt = ode.s[i + 1] - ode.s[i]
        y = y + d * dt
    return ode.to_x(y, grid.steps)


def sample_heun(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                ode_space: str = "auto") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        d = ode.d(y, i)
        dt = ode.s[i + 1] - ode.s[i]
        if _ends_clean(grid, i):
            y = y + d * dt                      # Euler method
        else:
            y_2 = y + d * dt                    # Heun's method
            d_2 = ode.d(y_2, i + 1)
            d_prime = (d + d_2) / 2
            y = y + d_prime * dt
    return ode.to_x(y, grid.steps)


def sample_midpoint(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                    ode_space: str = "auto") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        s, h = ode.s[i], ode.s[i + 1] - ode.s[i]
        k1 = ode.d(y, i)
        if _ends_clean(grid, i):
            y = y + h * k1
            continue
        k2 = ode.d_at_s(y + h / 2 * k1, s + h / 2)
        y = y + h * k2
    return ode.to_x(y, grid.steps)


def sample_ralston(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                   ode_space: str = "auto") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        s, h = ode.s[i], ode.s[i + 1] - ode.s[i]
        k1 = ode.d(y, i)
        if _ends_clean(grid, i):
            y = y + h * k1
            continue
        k2 = ode.d_at_s(y + 2 * h / 3 * k1, s + 2 * h / 3)
        y = y + h * (k1 / 4 + 3 * k2 / 4)
    return ode.to_x(y, grid.steps)


def sample_rk3(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
               ode_space: str = "auto") -> torch.Tensor:
    """Kutta's third-order method."""
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        s, h = ode.s[i], ode.s[i + 1] - ode.s[i]
        k1 = ode.d(y, i)
        if _ends_clean(grid, i):
            y = y + h * k1
            continue
        k2 = ode.d_at_s(y + h / 2 * k1, s + h / 2)
        k3 = ode.d(y - h * k1 + 2 * h * k2, i + 1)
        y = y + h / 6 * (k1 + 4 * k2 + k3)
    return ode.to_x(y, grid.steps)


def sample_rk4(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
               ode_space: str = "auto") -> torch.Tensor:
    """The classical fourth-order Runge-Kutta method."""
    ode = ODECoordinates(model, grid, prediction, ode_space)
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        s, h = ode.s[i], ode.s[i + 1] - ode.s[i]
        k1 = ode.d(y, i)
        if _ends_clean(grid, i):
            y = y + h * k1
            continue
        k2 = ode.d_at_s(y + h / 2 * k1, s + h / 2)
        k3 = ode.d_at_s(y + h / 2 * k2, s + h / 2)
        k4 = ode.d(y + h * k3, i + 1)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return ode.to_x(y, grid.steps)
