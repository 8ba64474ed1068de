"""CFG++ (Chung et al. 2024, arXiv 2406.08070) as ComfyUI writes it (comfy/k_diffusion/sampling.py:
sample_euler_cfg_pp, sample_euler_ancestral_cfg_pp, sample_dpmpp_2m_cfg_pp,
sample_dpmpp_2s_ancestral_cfg_pp, res_multistep(cfg_pp=True), sample_gradient_estimation(cfg_pp=True),
sample_cfgpp_ud10_ab), step by step in k-diffusion's coordinates y = x/alpha, s = sigma/alpha.

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


def _linear_multistep_coeff(order: int, t, i: int, j: int) -> float:
    """The integral over [t_i, t_{i+1}] of the Lagrange basis polynomial j on t_i, t_{i-1}, ..."""
    from scipy import integrate

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return integrate.quad(fn, t[i], t[i + 1], epsabs=0.0, epsrel=1e-13)[0]


def sample_cfgpp_history(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                         history_weight: float = 0.5, zero_weight=None, uncond_history_weight: float = 0.0,
                         ode_space: str = "auto") -> torch.Tensor:
    """ComfyUI's _sample_cfgpp_history (zero_order 1) on a non-flow model (alpha_s = alpha_t = 1 in
    its half-logSNR terms): Euler CFG++ with the unconditional derivative extrapolated from the last
    step's, lerped with a variable-step AB2 step, the final step to 0 lerped toward the linear
    extrapolation of the guided x0."""
    oc, ou, g = _coordinates(model, grid, prediction, ode_space)
    sigmas = oc.s
    y = oc.to_y(x, 0)
    derivatives, denoised_history = [], []
    old_uncond_d = None
    for i in range(grid.steps):
        cond_denoised, uncond_denoised = oc.denoised(y, i), ou.denoised(y, i)
        denoised = uncond_denoised + g * (cond_denoised - uncond_denoised)
        current_uncond_d = (y - uncond_denoised) / sigmas[i]
        uncond_d = current_uncond_d
        dt = sigmas[i + 1] - sigmas[i]
        if i > 0 and uncond_history_weight:
            step_ratio = dt / (sigmas[i] - sigmas[i - 1])
            uncond_d = uncond_d + uncond_history_weight * step_ratio * (current_uncond_d - old_uncond_d)
        euler_step = denoised + sigmas[i + 1] * uncond_d - y
        derivatives = (derivatives + [euler_step / dt])[-2:]
        if len(derivatives) == 1:
            step = euler_step
        else:
            coeffs = [_linear_multistep_coeff(2, sigmas, i, j) for j in range(2)]
            history_step = sum(cf * d for cf, d in zip(coeffs, reversed(derivatives)))
            step = torch.lerp(euler_step, history_step, history_weight)
        y = y + step
        if sigmas[i + 1] == 0 and zero_weight is not None and denoised_history:
            denoised_slope = (denoised - denoised_history[-1]) / (sigmas[i] - sigmas[i - 1])
            zero_prediction = denoised - sigmas[i] * denoised_slope
            y = torch.lerp(y, zero_prediction, zero_weight)
        denoised_history = (denoised_history + [denoised])[-2:]
        old_uncond_d = current_uncond_d
    return oc.to_x(y, grid.steps)


def sample_cfgpp_ud10_ab(model, x, grid, prediction, noise=None, history_weight: float = 0.25, zero_weight=1.0,
                         uncond_history_weight: float = 0.1, ode_space: str = "auto"):
    """ComfyUI sample_cfgpp_ud10_ab: history weight 0.25, zero weight 1.0, unconditional history 0.1."""
    return sample_cfgpp_history(model, x, grid, prediction, noise, history_weight=history_weight,
                                zero_weight=zero_weight, uncond_history_weight=uncond_history_weight,
                                ode_space=ode_space)


CFG_PP_ORACLES = {
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "cfgpp_ud10_ab": sample_cfgpp_ud10_ab,
}
