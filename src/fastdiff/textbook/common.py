"""What every textbook sampler shares: calling the model, the ODE coordinates, per-step noise.

Kept deliberately plain: one model call per evaluation, one tensor expression per formula,
nothing precomputed. Imports only the schedule (for grid values and off-grid points) and the
parameterization conversions, never the solvers or coefficient programs these oracles judge.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from ..parameterization import convert
from ..schedules import Grid

NoiseSource = Union[Sequence[torch.Tensor], Callable[[int], torch.Tensor], None]


def guided(cond_model: Callable, uncond_model: Callable, scale: float, convention: str = "w") -> Callable:
    """Classifier-free guidance as the papers write it, on the model outputs:
    ``'w'`` (diffusers, k-diffusion): u + w (c - u);  ``'1+w'`` (Ho & Salimans): (1 + w) c - w u."""
    if convention == "w":
        f = lambda x, t: uncond_model(x, t) + scale * (cond_model(x, t) - uncond_model(x, t))  # noqa: E731
    elif convention == "1+w":
        f = lambda x, t: (1.0 + scale) * cond_model(x, t) - scale * uncond_model(x, t)  # noqa: E731
    else:
        raise ValueError(f"unknown CFG convention {convention!r}; expected 'w' or '1+w'")
    f.cfg_parts = (cond_model, uncond_model, scale, convention)   # for samplers that need them apart (CFG++)
    return f


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), the oracles' one definition: +inf where sigma = 0, -inf where alpha = 0."""
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def noise_at(noise: NoiseSource, step: int) -> torch.Tensor:
    """The Gaussian draw of solver step ``step`` (each textbook sampler uses at most one per step)."""
    if noise is None:
        raise ValueError("this sampler is stochastic: pass noise=[z_0, z_1, ...] or noise=lambda step: z")
    return noise(step) if callable(noise) else noise[step]


def denoise(model: Callable, x: torch.Tensor, alpha: float, sigma: float, model_t: float,
            prediction: str) -> torch.Tensor:
    """x0 = E[x0 | x] from the model's output at a point of the schedule's native space."""
    t = torch.full((x.shape[0],), float(model_t), dtype=x.dtype, device=x.device)
    out = model(x, t)
    return convert(out.to(x.dtype), x, alpha, sigma, prediction, "sample")


class ODECoordinates:
    """The probability-flow ODE dy/ds = (y - x0)/s in y = x/c, s = sigma/c, with c = alpha
    ("ve": k-diffusion, EDM) or c = alpha + sigma ("flow": rectified flow). In these coordinates
    k-diffusion's ``to_d(x, sigma, denoised)`` is the derivative as written."""

    def __init__(self, model: Callable, grid: Grid, prediction: str, space: str = "auto"):
        self.space = grid.schedule.ode_space if space == "auto" else space
        if self.space not in ("ve", "flow"):
            raise ValueError(f"space must be 'auto', 've' or 'flow', got {space!r}")
        self.model, self.grid, self.prediction = model, grid, prediction
        self.s = [self._s(float(a), float(sg)) for a, sg in zip(grid.alpha, grid.sigma)]

    def _c(self, alpha: float, sigma: float) -> float:
        return alpha if self.space == "ve" else alpha + sigma

    def _s(self, alpha: float, sigma: float) -> float:
        return sigma / self._c(alpha, sigma)

    def c(self, n: int) -> float:
        return self._c(float(self.grid.alpha[n]), float(self.grid.sigma[n]))

    def to_y(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x / self.c(n)

    def to_x(self, y: torch.Tensor, n: int) -> torch.Tensor:
        return y * self.c(n)

    def denoised(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """x0 at grid point n, the model called at x = c_n y with the grid's model time."""
        g = self.grid
        a, sg = float(g.alpha[n]), float(g.sigma[n])
        return denoise(self.model, y * self._c(a, sg), a, sg, float(g.model_t[n]), self.prediction)

    def denoised_at_s(self, y: torch.Tensor, s: float) -> torch.Tensor:
        """x0 at an off-grid noise level s (a Runge-Kutta stage)."""
        ksigma = s if self.space == "ve" else (math.inf if s >= 1.0 else s / (1.0 - s))
        _, a, sg, mt = (float(v) for v in self.grid.point_at_ksigma(ksigma))
        return denoise(self.model, y * self._c(a, sg), a, sg, mt, self.prediction)

    def d(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """k-diffusion's to_d at grid point n."""
        return (y - self.denoised(y, n)) / self.s[n]

    def d_at_s(self, y: torch.Tensor, s: float) -> torch.Tensor:
        return (y - self.denoised_at_s(y, s)) / s
