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


def sample_dpmpp_2s_ancestral_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                                     eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto") -> torch.Tensor:
    """ComfyUI's current form (not RF): the unconditional x0 drives both stages, the guidance
    vector denoised - uncond_denoised of the first evaluation is added at the end of the step."""
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    sigma_fn = lambda t: math.exp(-t)                      # noqa: E731
    t_fn = lambda sigma: -math.log(sigma)                  # noqa: E731
    y = oc.to_y(x, 0)
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        guidance_vector = denoised - uncond_denoised
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:                                # Euler method
            d = (y - uncond_denoised) / sigmas[i]
            y = y + d * (sigma_down - sigmas[i])
        else:                                              # DPM-Solver++(2S) on the unconditional x0
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            y_2 = (sigma_fn(s) / sigma_fn(t)) * y - math.expm1(-h * r) * uncond_denoised
            uncond_denoised_2 = ou.denoised_at_s(y_2, sigma_fn(s))    # (the guided one is computed, unused)
            y = (sigma_fn(t_next) / sigma_fn(t)) * y - math.expm1(-h) * uncond_denoised_2
        if sigmas[i + 1] > 0 and sigma_up * s_noise > 0:
            y = y + noise_at(noise, i) * s_noise * sigma_up
        y = y + guidance_vector
    return oc.to_x(y, grid.steps)


def sample_res_multistep_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                                eta: float = 0.0, s_noise: float = 1.0, ode_space: str = "auto") -> torch.Tensor:
    """ComfyUI res_multistep(..., cfg_pp=True): RES second-order multistep (arXiv 2308.02157) on
    the unconditional x0, the guidance vector added to the state before the exponential step."""
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    sigma_fn = lambda t: math.exp(-t)                      # noqa: E731
    t_fn = lambda sigma: -math.log(sigma)                  # noqa: E731
    phi1_fn = lambda t: math.expm1(t) / t                  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t             # noqa: E731
    y = oc.to_y(x, 0)
    old_denoised = old_sigma_down = None
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:        # Euler method (CFG++)
            d = (y - uncond_denoised) / sigmas[i]
            y = denoised + d * sigma_down
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = phi1_val - phi2_val / c2
            b2 = phi2_val / c2
            y = y + (denoised - uncond_denoised)
            y = sigma_fn(h) * y + h * (b1 * uncond_denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and sigma_up * s_noise != 0:
            y = y + noise_at(noise, i) * s_noise * sigma_up
        old_denoised, old_sigma_down = uncond_denoised, sigma_down
    return oc.to_x(y, grid.steps)


def sample_res_multistep_ancestral_cfg_pp(model, x, grid, prediction, noise=None, eta: float = 1.0,
                                          s_noise: float = 1.0, ode_space: str = "auto"):
    return sample_res_multistep_cfg_pp(model, x, grid, prediction, noise, eta=eta, s_noise=s_noise,
                                       ode_space=ode_space)


def sample_gradient_estimation_cfg_pp(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                                      ge_gamma: float = 2.0, ode_space: str = "auto") -> torch.Tensor:
    """ComfyUI sample_gradient_estimation(..., cfg_pp=True): d from the unconditional x0, the Euler
    step re-noised from the guided one, plus (ge_gamma - 1) times the change of d."""
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    y = oc.to_y(x, 0)
    old_d = None
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        d = (y - uncond_denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            y = denoised                                   # denoising step
        else:
            y = denoised + d * sigmas[i + 1]               # Euler (CFG++)
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)       # gradient estimation
                y = y + d_bar * dt
        old_d = d
    return oc.to_x(y, grid.steps)


CFG_PP_ORACLES = {
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
}
