"""CFG++ (Chung et al. 2024, arXiv 2406.08070) as ComfyUI writes it (comfy/k_diffusion/sampling.py:
sample_euler_cfg_pp, sample_euler_ancestral_cfg_pp, sample_dpmpp_2m_cfg_pp), step by step in
k-diffusion's coordinates y = x/alpha, s = sigma/alpha.

CFG++ needs the conditional and the unconditional model apart: ``model`` is either a plain model
(no guidance: the unconditional prediction is the conditional one) or the callable
``fastdiff.textbook.guided(cond, uncond, scale, convention)``, whose parts (``cfg_parts``) these
oracles call one by one. ComfyUI obtains the unconditional denoised through a post-CFG hook;
here it is the uncond model's x0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import Grid
from .common import ODECoordinates, noise_at
from .stochastic import get_ancestral_step


def _parts(model: Callable):
    """(cond model, uncond model, g of D = u + g (c - u))."""
    parts = getattr(model, "cfg_parts", None)
    if parts is None:
        return model, model, 1.0
    cond, uncond, scale, convention = parts
    return cond, uncond, (scale if convention == "w" else 1.0 + scale)


def _coordinates(model, grid, prediction, ode_space):
    if ode_space not in ("auto", "ve"):
        raise ValueError(f"CFG++ is written in VE coordinates, got ode_space={ode_space!r}")
    cond, uncond, g = _parts(model)
    return ODECoordinates(cond, grid, prediction, "ve"), ODECoordinates(uncond, grid, prediction, "ve"), g


def sample_euler_ancestral_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                                  eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto") -> torch.Tensor:
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    y = oc.to_y(x, 0)
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        if sigmas[i + 1] == 0:
            y = denoised                                   # denoising step
        else:
            d = (y - uncond_denoised) / sigmas[i]          # to_d with the unconditional denoised
            sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            y = denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                y = y + noise_at(noise, i) * s_noise * sigma_up
    return oc.to_x(y, grid.steps)


def sample_euler_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                        ode_space: str = "auto") -> torch.Tensor:
    """x = denoised + d * sigma_next with d = to_d(x, sigma, uncond_denoised)."""
    return sample_euler_ancestral_cfg_pp(model, x, grid, prediction, noise=noise, eta=0.0, s_noise=0.0,
                                         ode_space=ode_space)


def sample_dpmpp_2m_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                           ode_space: str = "auto") -> torch.Tensor:
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    t_fn = lambda sigma: -math.log(sigma)                  # noqa: E731
    y = oc.to_y(x, 0)
    old_uncond_denoised = None
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        if sigmas[i + 1] == 0:
            y = denoised                                   # exp(-h) = 0: x = denoised
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            if old_uncond_denoised is None:
                denoised_mix = -math.exp(-h) * uncond_denoised
            else:
                h_last = t - t_fn(sigmas[i - 1])
                r = h_last / h
                denoised_mix = (-math.exp(-h) * uncond_denoised
                                - math.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond_denoised))
            y = denoised + denoised_mix + math.exp(-h) * y
        old_uncond_denoised = uncond_denoised
    return oc.to_x(y, grid.steps)


CFG_PP_ORACLES = {
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
}
