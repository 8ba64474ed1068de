"""Stochastic samplers in k-diffusion's coordinates y = x/alpha, s = sigma/alpha (VE form), each
taking one Gaussian draw ``noise[i]`` per step i.

* Euler ancestral: k-diffusion ``sample_euler_ancestral`` (``get_ancestral_step``, eta, s_noise).
* Euler-Maruyama on the reverse-time SDE of the VE process dy = sqrt(2 s) dW (Song et al. 2021):
  with g(s)^2 = 2 s the reverse step from s to s' < s is
      y' = y - g(s)^2 * score(y, s) * (s' - s) + g(s) * sqrt(s - s') * z,
  and the last step to s' = 0 is the noise-removal step y' = y + s^2 * score (Tweedie's formula).
* Stochastic Heun: an Euler-Maruyama predictor, then the average of the drifts at both ends with
  the same Brownian increment (the diffusion coefficient taken at the step's start).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import Grid
from .common import ODECoordinates, noise_at


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """k-diffusion: the noise level to step down to and the std of the fresh noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _ve(model, grid, prediction, ode_space):
    if ode_space not in ("auto", "ve"):
        raise ValueError(f"the textbook stochastic samplers are written in VE coordinates, got ode_space={ode_space!r}")
    return ODECoordinates(model, grid, prediction, "ve")


def sample_euler_ancestral(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                           eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto") -> torch.Tensor:
    ode = _ve(model, grid, prediction, ode_space)
    sigmas = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        denoised = ode.denoised(y, i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = (y - denoised) / sigmas[i]
        dt = sigma_down - sigmas[i]
        y = y + d * dt
        if sigmas[i + 1] > 0 and sigma_up * s_noise > 0:
            y = y + noise_at(noise, i) * s_noise * sigma_up
    return ode.to_x(y, grid.steps)


def _score(ode: ODECoordinates, y: torch.Tensor, i: int) -> torch.Tensor:
    """grad_y log p_s(y) = (x0 - y) / s^2 (Tweedie), in VE coordinates."""
    return (ode.denoised(y, i) - y) / ode.s[i] ** 2


def sample_euler_maruyama(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                          ode_space: str = "auto") -> torch.Tensor:
    ode = _ve(model, grid, prediction, ode_space)
    s = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        score = _score(ode, y, i)
        if s[i + 1] == 0.0:  # noise removal: the denoised estimate
            y = y + s[i] ** 2 * score
            continue
        g2 = 2.0 * s[i]
        y = y - g2 * score * (s[i + 1] - s[i]) + math.sqrt(g2 * (s[i] - s[i + 1])) * noise_at(noise, i)
    return ode.to_x(y, grid.steps)


def sample_heun_sde(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                    ode_space: str = "auto") -> torch.Tensor:
    ode = _ve(model, grid, prediction, ode_space)
    s = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        if s[i + 1] == 0.0:  # noise removal
            y = y + s[i] ** 2 * _score(ode, y, i)
            continue
        ds = s[i + 1] - s[i]
        dW = math.sqrt(s[i] - s[i + 1]) * noise_at(noise, i)
        g = math.sqrt(2.0 * s[i])
        drift = -2.0 * s[i] * _score(ode, y, i)
        y_pred = y + drift * ds + g * dW
        drift_pred = -2.0 * s[i + 1] * _score(ode, y_pred, i + 1)
        y = y + (drift + drift_pred) / 2 * ds + g * dW
    return ode.to_x(y, grid.steps)
