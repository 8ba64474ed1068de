"""ComfyUI's samplers as its ``comfy/k_diffusion/sampling.py`` and ``deis.py`` write them, step by step on
tensors in plain PyTorch: the oracles of fastdiff.solvers.comfy. They import no solver, program or op.

The k-diffusion-style ones run in k-diffusion's coordinates y = x/alpha, s = sigma/alpha
(ODECoordinates 've'; on a k-diffusion grid that is ComfyUI's x and sigma); SEEDS, exp_heun_2_x0,
and ER-SDE in the grid's alpha, sigma and lambda = log(alpha/sigma), as ComfyUI's
``sigma_to_half_log_snr`` forms do.

Noise: ``noise[i]`` is step i's Gaussian draw; seeds_2 / seeds_3 draw at each stage, ``noise[i]`` a
tuple (one tensor per draw) or one tensor used for every draw of the step.
"""
from __future__ import annotations

import math
from typing import Callable, List

import torch

from ..schedules import Grid
from .common import ODECoordinates, denoise, log_snr, noise_at
from .stochastic import get_ancestral_step
from .zoo import sample_dpmpp_2m_sde, sample_unipc


def _draws(noise, i: int, k: int):
    z = noise_at(noise, i)
    if isinstance(z, (tuple, list)):
        return list(z)[:k]
    return [z] * k


# ---------------------------------------------------------------------------------------------
# res_multistep


def sample_res_multistep(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                         eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, "ve")
    sigmas = ode.s
    y = ode.to_y(x, 0)
    sigma_fn = lambda t: math.exp(-t)      # noqa: E731
    t_fn = lambda sigma: -math.log(sigma)  # noqa: E731
    phi1_fn = lambda t: math.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_denoised = old_sigma_down = None
    for i in range(grid.steps):
        denoised = ode.denoised(y, i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or old_denoised is None:
            d = (y - denoised) / sigmas[i]
            y = y + d * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = phi1_val - phi2_val / c2
            b2 = phi2_val / c2
            y = sigma_fn(h) * y + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and sigma_up * s_noise != 0:
            y = y + noise_at(noise, i) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return ode.to_x(y, grid.steps)


def sample_res_multistep_ancestral(model, x, grid, prediction, noise=None, eta: float = 1.0, s_noise: float = 1.0):
    return sample_res_multistep(model, x, grid, prediction, noise, eta=eta, s_noise=s_noise)


def sample_dpmpp_2m_sde_heun(model, x, grid, prediction, noise=None, eta=1.0, s_noise=1.0, solver_type="heun",
                             lower_order_final=False, euler_at_final=False):
    return sample_dpmpp_2m_sde(model, x, grid, prediction, noise, eta=eta, s_noise=s_noise, solver_type=solver_type,
                               lower_order_final=lower_order_final, euler_at_final=euler_at_final)


# ---------------------------------------------------------------------------------------------
# iPNDM-v, DEIS, gradient estimation (k-diffusion coordinates, a buffer of derivatives)


def sample_ipndm_v(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                   max_order: int = 4) -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, "ve")
    t_steps = ode.s
    x_next = ode.to_y(x, 0)
    buffer_model: List[torch.Tensor] = []
    for i in range(grid.steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        denoised = ode.denoised(x_cur, i)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n, h_n_1 = t_next - t_cur, t_cur - t_steps[i - 1]
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
        elif order == 3:
            h_n, h_n_1, h_n_2 = t_next - t_cur, t_cur - t_steps[i - 1], t_steps[i - 1] - t_steps[i - 2]
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2])
        else:
            h_n, h_n_1 = t_next - t_cur, t_cur - t_steps[i - 1]
            h_n_2, h_n_3 = t_steps[i - 1] - t_steps[i - 2], t_steps[i - 2] - t_steps[i - 3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2
                     + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
                * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 \
                - (1 + (h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 \
                + ((h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))
                   * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1]
                                                 + coeff3 * buffer_model[-2] + coeff4 * buffer_model[-3])
        if len(buffer_model) == max_order - 1 and buffer_model:
            buffer_model = buffer_model[1:] + [d_cur]
        elif max_order > 1:
            buffer_model.append(d_cur)
    return ode.to_x(x_next, grid.steps)


def _edm2t(sigma: float, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80.0) -> float:
    """zju-pi's edm2t: the time of the VP SDE through (eps_s, sigma_min) and (1, sigma_max)."""
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log(sigma ** 2 + 1)) - beta_min) / beta_d


def _deis_tab(sigmas: List[float], i: int, order: int) -> List[float]:
    """The integral over sigma in [sigma_i, sigma_{i+1}] of the Lagrange basis in tau(sigma) on the
    nodes tau_i, tau_{i-1}, ... (the substitution sigma = sigma(tau) of zju-pi's integral over tau)."""
    from scipy import integrate

    nodes = [_edm2t(sigmas[i - k]) for k in range(order)]

    def poly(j, sigma):
        tau, p = _edm2t(sigma), 1.0
        for k in range(order):
            if k != j:
                p *= (tau - nodes[k]) / (nodes[j] - nodes[k])
        return p

    return [integrate.quad(lambda sg, j=j: poly(j, sg), sigmas[i], sigmas[i + 1], epsabs=0.0, epsrel=1e-13,
                           limit=200)[0] for j in range(order)]


def _deis_rhoab(sigmas: List[float], i: int, order: int) -> List[float]:
    """zju-pi's analytic Adams-Bashforth integrals in sigma on ``order`` nodes sigma_i, sigma_{i-1}, ..."""
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    prev_t = [sigmas[i - k] for k in range(order)]

    def get_def_intergral_2(a, b, start, end, c):
        coeff = (end ** 3 - start ** 3) / 3 - (end ** 2 - start ** 2) * (a + b) / 2 + (end - start) * a * b
        return coeff / ((c - a) * (c - b))

    def get_def_intergral_3(a, b, c, start, end, d):
        coeff = (end ** 4 - start ** 4) / 4 - (end ** 3 - start ** 3) * (a + b + c) / 3 \
            + (end ** 2 - start ** 2) * (a * b + a * c + b * c) / 2 - (end - start) * a * b * c
        return coeff / ((d - a) * (d - b) * (d - c))

    if order == 2:
        return [((t_next - prev_t[1]) ** 2 - (t_cur - prev_t[1]) ** 2) / (2 * (t_cur - prev_t[1])),
                (t_next - t_cur) ** 2 / (2 * (prev_t[1] - t_cur))]
    if order == 3:
        return [get_def_intergral_2(prev_t[1], prev_t[2], t_cur, t_next, t_cur),
                get_def_intergral_2(t_cur, prev_t[2], t_cur, t_next, prev_t[1]),
                get_def_intergral_2(t_cur, prev_t[1], t_cur, t_next, prev_t[2])]
    return [get_def_intergral_3(prev_t[1], prev_t[2], prev_t[3], t_cur, t_next, t_cur),
            get_def_intergral_3(t_cur, prev_t[2], prev_t[3], t_cur, t_next, prev_t[1]),
            get_def_intergral_3(t_cur, prev_t[1], prev_t[3], t_cur, t_next, prev_t[2]),
            get_def_intergral_3(t_cur, prev_t[1], prev_t[2], t_cur, t_next, prev_t[3])]


def sample_deis_comfy(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, max_order: int = 3,
                      deis_mode: str = "tab") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, "ve")
    sigmas = ode.s
    x_next = ode.to_y(x, 0)
    buffer_model: List[torch.Tensor] = []
    for i in range(grid.steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = ode.denoised(x_cur, i)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            coeffs = (_deis_tab if deis_mode == "tab" else _deis_rhoab)(sigmas, i, order)
            x_next = x_cur + coeffs[0] * d_cur
            for k in range(1, order):
                x_next = x_next + coeffs[k] * buffer_model[-k]
        if len(buffer_model) == max_order - 1 and buffer_model:
            buffer_model = buffer_model[1:] + [d_cur]
        elif max_order > 1:
            buffer_model.append(d_cur)
    return ode.to_x(x_next, grid.steps)


def sample_gradient_estimation(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                               ge_gamma: float = 2.0) -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, "ve")
    sigmas = ode.s
    y = ode.to_y(x, 0)
    old_d = None
    for i in range(grid.steps):
        denoised = ode.denoised(y, i)
        d = (y - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            y = denoised
        else:
            y = y + d * dt
            if i >= 1:
                d_bar = (ge_gamma - 1) * (d - old_d)
                y = y + d_bar * dt
        old_d = d
    return ode.to_x(y, grid.steps)


def sample_heunpp2(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, s_churn: float = 0.0,
                   s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, "ve")
    sigmas = ode.s
    s_end = sigmas[-1]
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            y = y + noise_at(noise, i) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
            denoised = ode.denoised_at_s(y, sigma_hat)
        else:
            denoised = ode.denoised(y, i)
        d = (y - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            y = y + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = y + d * dt
            d_2 = (x_2 - ode.denoised(x_2, i + 1)) / sigmas[i + 1]
            w = 2 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w1 = 1 - w2
            y = y + (d * w1 + d_2 * w2) * dt
        else:
            x_2 = y + d * dt
            d_2 = (x_2 - ode.denoised(x_2, i + 1)) / sigmas[i + 1]
            dt_2 = sigmas[i + 2] - sigmas[i + 1]
            x_3 = x_2 + d_2 * dt_2
            d_3 = (x_3 - ode.denoised(x_3, i + 2)) / sigmas[i + 2]
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            y = y + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return ode.to_x(y, grid.steps)


# ---------------------------------------------------------------------------------------------
# SEEDS, exp_heun_2_x0 (the grid's alpha, sigma, lambda)


class _HalfLogSNR:
    def __init__(self, model, grid: Grid, prediction: str):
        self.model, self.grid, self.prediction = model, grid, prediction
        self.alpha = [float(a) for a in grid.alpha]
        self.sigmas = [float(s) for s in grid.sigma]
        self.lam = [log_snr(a, s) for a, s in zip(self.alpha, self.sigmas)]

    def denoised(self, x, i):
        return denoise(self.model, x, self.alpha[i], self.sigmas[i], float(self.grid.model_t[i]), self.prediction)

    def at(self, lam: float, i_end: int, r: float):
        """(alpha, sigma, denoiser) at lambda (the grid point i_end itself when r = 1)."""
        if r == 1.0:
            return self.alpha[i_end], self.sigmas[i_end], lambda x: self.denoised(x, i_end)
        _, a, s, mt = (float(v) for v in self.grid.point_at_ksigma(math.exp(-lam)))
        return a, s, lambda x: denoise(self.model, x, a, s, mt, self.prediction)


def _ei_h_phi_1(h):
    return math.expm1(h)


def _ei_h_phi_2(h):
    return (math.expm1(h) - h) / h


def sample_seeds_2(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, eta: float = 1.0,
                   s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1") -> torch.Tensor:
    g = _HalfLogSNR(model, grid, prediction)
    sigmas = g.sigmas
    inject_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(grid.steps):
        denoised = g.denoised(x, i)
        if sigmas[i + 1] == 0:
            x = g.alpha[i + 1] * denoised
            continue
        lambda_s, lambda_t = g.lam[i], g.lam[i + 1]
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = lambda_s + r * (lambda_t - lambda_s)
        alpha_s_1, sigma_s_1, model_s_1 = g.at(lambda_s_1, i + 1, r)
        alpha_t = g.alpha[i + 1]
        if inject_noise:
            z1, z2 = _draws(noise, i, 2)
        x_2 = sigma_s_1 / sigmas[i] * math.exp(-r * h * eta) * x - alpha_s_1 * _ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = math.sqrt(-math.expm1(-2 * r * h * eta)) * z1
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model_s_1(x_2)
        if solver_type == "phi_1":
            denoised_d = denoised + fac * (denoised_2 - denoised)
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h * eta) * x - alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _ei_h_phi_2(-h_eta) / r
            b1 = _ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h * eta) * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * math.exp(segment_factor)
            sde_noise = sde_noise + math.sqrt(-math.expm1(2 * segment_factor)) * z2
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def sample_exp_heun_2_x0(model, x, grid, prediction, noise=None, solver_type: str = "phi_2"):
    return sample_seeds_2(model, x, grid, prediction, noise, eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


def sample_exp_heun_2_x0_sde(model, x, grid, prediction, noise=None, eta: float = 1.0, s_noise: float = 1.0,
                             solver_type: str = "phi_2"):
    return sample_seeds_2(model, x, grid, prediction, noise, eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)


def sample_seeds_3(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, eta: float = 1.0,
                   s_noise: float = 1.0, r_1: float = 1.0 / 3, r_2: float = 2.0 / 3) -> torch.Tensor:
    g = _HalfLogSNR(model, grid, prediction)
    sigmas = g.sigmas
    inject_noise = eta > 0 and s_noise > 0
    for i in range(grid.steps):
        denoised = g.denoised(x, i)
        if sigmas[i + 1] == 0:
            x = g.alpha[i + 1] * denoised
            continue
        lambda_s, lambda_t = g.lam[i], g.lam[i + 1]
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        alpha_s_1, sigma_s_1, model_s_1 = g.at(lambda_s + r_1 * h, i + 1, r_1)
        alpha_s_2, sigma_s_2, model_s_2 = g.at(lambda_s + r_2 * h, i + 1, r_2)
        alpha_t = g.alpha[i + 1]
        if inject_noise:
            z1, z2, z3 = _draws(noise, i, 3)
        x_2 = sigma_s_1 / sigmas[i] * math.exp(-r_1 * h * eta) * x - alpha_s_1 * _ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = math.sqrt(-math.expm1(-2 * r_1 * h * eta)) * z1
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model_s_1(x_2)
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * math.exp(-r_2 * h * eta) * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * math.exp(segment_factor)
            sde_noise = sde_noise + math.sqrt(-math.expm1(2 * segment_factor)) * z2
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model_s_2(x_3)
        b3 = _ei_h_phi_2(-h_eta) / r_2
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * math.exp(-h * eta) * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * math.exp(segment_factor)
            sde_noise = sde_noise + math.sqrt(-math.expm1(2 * segment_factor)) * z3
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# ---------------------------------------------------------------------------------------------
# ER-SDE-Solver-3


def sample_er_sde(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                  solver_type: str = "ER-SDE", max_stage: int = 3, eta: float = 1.0, s_noise: float = 1.0,
                  noise_scaler=None, num_integration_points: int = 200) -> torch.Tensor:
    # ComfyUI's SamplerER_SDE node: which noise scaler and noise each type takes
    if solver_type == "ODE" or eta == 0:
        s_noise, solver_type = 0.0, "ODE"
    if solver_type == "ER-SDE":
        noise_scaler = noise_scaler or (lambda v, e=eta: v * (math.exp(v ** 0.3) + 10.0) ** e)
    elif solver_type == "Reverse-time SDE":
        noise_scaler = (lambda v, e=eta: v ** (e + 1))
    else:
        noise_scaler = (lambda v: v)
    g = _HalfLogSNR(model, grid, prediction)
    sigmas = g.sigmas
    er_lambdas = [math.exp(-lam) for lam in g.lam]          # sigma / alpha
    P = None if num_integration_points is None else float(num_integration_points)
    old_denoised = old_denoised_d = None
    for i in range(grid.steps):
        denoised = g.denoised(x, i)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = g.alpha[i + 1] * denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = g.alpha[i], g.alpha[i + 1]
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                if num_integration_points is None:     # the integrals themselves (trapezoid-free: quad)
                    from scipy import integrate
                    s = integrate.quad(lambda v: 1 / noise_scaler(v), er_lambda_t, er_lambda_s, epsabs=0.0,
                                       epsrel=1e-13, limit=200)[0]
                    s_u = integrate.quad(lambda v: (v - er_lambda_s) / noise_scaler(v), er_lambda_t, er_lambda_s,
                                         epsabs=0.0, epsrel=1e-13, limit=200)[0]
                else:
                    lambda_step_size = -dt / P
                    lambda_pos = [er_lambda_t + k * lambda_step_size for k in range(num_integration_points)]
                    scaled_pos = [noise_scaler(v) for v in lambda_pos]
                    s = sum(1 / v for v in scaled_pos) * lambda_step_size
                    s_u = sum((p - er_lambda_s) / v for p, v in zip(lambda_pos, scaled_pos)) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                var = er_lambda_t ** 2 - er_lambda_s ** 2 * r ** 2
                if var > 0:
                    x = x + alpha_t * noise_at(noise, i) * s_noise * math.sqrt(var)
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------
# ComfyUI's UniPC


def sample_uni_pc(model, x, grid, prediction, noise=None, order=3, solver_type="bh1", lower_order_final=True):
    return sample_unipc(model, x, grid, prediction, noise, order=order, solver_type=solver_type, predict_x0=True,
                        use_corrector=True, lower_order_final=lower_order_final)


def sample_uni_pc_bh2(model, x, grid, prediction, noise=None, order=3, solver_type="bh2", lower_order_final=True):
    return sample_uni_pc(model, x, grid, prediction, noise, order=order, solver_type=solver_type,
                         lower_order_final=lower_order_final)


# ---------------------------------------------------------------------------------------------
# SA-Solver (ComfyUI's sample_sa_solver / sa_solver.py)


def _sa_b(sigma_next, alpha_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2, is_corrector_step):
    """b_i = alpha_t (1 + tau^2) int_{lambda_s}^{lambda_t} e^{-(1 + tau^2)(lambda_t - l)} L_i(l) dl by adaptive
    quadrature (ComfyUI: the exponential-polynomial integrals and a Vandermonde solve)."""
    tau_mul = 1 + tau_t ** 2
    h = lambda_t - lambda_s
    if simple_order_2 and len(curr_lambdas) == 2:
        if is_corrector_step:
            b_1 = alpha_next * (0.5 * tau_mul * h)
            b_2 = alpha_next * -math.expm1(-h * tau_mul) - b_1
        else:
            b_2 = alpha_next * (0.5 * tau_mul * h ** 2) / (curr_lambdas[-2] - lambda_s)
            b_1 = alpha_next * -math.expm1(-h * tau_mul) - b_2
        return [b_2, b_1]
    from scipy import integrate

    def lagrange(j, v):
        out = 1.0
        for k, node in enumerate(curr_lambdas):
            if k != j:
                out *= (v - node) / (curr_lambdas[j] - node)
        return out

    return [alpha_next * tau_mul * integrate.quad(lambda v, j=j: math.exp(-tau_mul * (lambda_t - v)) * lagrange(j, v),
                                                  lambda_s, lambda_t, epsabs=0.0, epsrel=1e-13)[0]
            for j in range(len(curr_lambdas))]


def _sa_taus(grid: Grid, eta: float, tau_interval=None):
    """ComfyUI's get_tau_interval_func(percent_to_sigma(0.2), percent_to_sigma(0.8), eta) at each sigma_{i+1}
    (in noise levels sigma/alpha; the percents of the schedule's time range from its noisy end)."""
    if tau_interval is None:
        sch = grid.schedule
        start = float(sch.ksigma(sch.t_max - 0.2 * (sch.t_max - sch.t_min)))
        end = float(sch.ksigma(sch.t_max - 0.8 * (sch.t_max - sch.t_min)))
    else:
        start, end = tau_interval
    return lambda ks: (eta if start >= ks >= end else 0.0) if eta > 0 else 0.0


def sample_sa_solver(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, eta: float = 1.0,
                     s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4, use_pece: bool = False,
                     simple_order_2: bool = False, tau_interval=None, taus=None) -> torch.Tensor:
    g = _HalfLogSNR(model, grid, prediction)
    sigmas, lambdas, alphas = g.sigmas, g.lam, g.alpha
    ks = [float(v) for v in grid.ksigma]
    if taus is not None:
        tau_of_step = lambda i: taus[i]                                      # noqa: E731
    else:
        f = _sa_taus(grid, eta, tau_interval)
        tau_of_step = lambda i: f(ks[i + 1])                                 # noqa: E731
    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h, tau_t, noise_prev = 0.0, 0.0, 0.0
    pred_list = []
    lower_order_to_end = sigmas[-1] == 0
    for i in range(grid.steps):
        denoised = g.denoised(x_pred, i)
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            b = _sa_b(sigmas[i], alphas[i], lambdas[i - corrector_order_used + 1:i + 1], lambdas[i - 1], lambdas[i],
                      tau_t, simple_order_2, True)
            corr_res = sum(bj * d for bj, d in zip(b, pred_list[-corrector_order_used:]))
            x = sigmas[i] / sigmas[i - 1] * math.exp(-(tau_t ** 2) * h) * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise_prev
            if use_pece:
                denoised = g.denoised(x, i)
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = alphas[i + 1] * denoised
        else:
            tau_t = tau_of_step(i)
            b = _sa_b(sigmas[i + 1], alphas[i + 1], lambdas[i - predictor_order_used + 1:i + 1], lambdas[i],
                      lambdas[i + 1], tau_t, simple_order_2, False)
            pred_res = sum(bj * d for bj, d in zip(b, pred_list[-predictor_order_used:]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * math.exp(-(tau_t ** 2) * h) * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise_prev = noise_at(noise, i) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_t ** 2 * h)) * s_noise
                x_pred = x_pred + noise_prev
    return x_pred


def sample_sa_solver_pece(model, x, grid, prediction, noise=None, eta=1.0, s_noise=1.0, predictor_order=3,
                          corrector_order=4, use_pece=True, simple_order_2=False, tau_interval=None, taus=None):
    return sample_sa_solver(model, x, grid, prediction, noise, eta=eta, s_noise=s_noise,
                            predictor_order=predictor_order, corrector_order=corrector_order, use_pece=use_pece,
                            simple_order_2=simple_order_2, tau_interval=tau_interval, taus=taus)


COMFY_ORACLES = {
    "res_multistep": sample_res_multistep,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "ipndm_v": sample_ipndm_v,
    "deis_comfy": sample_deis_comfy,
    "gradient_estimation": sample_gradient_estimation,
    "heunpp2": sample_heunpp2,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "er_sde": sample_er_sde,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
}

#: The samplers that draw more than one Gaussian per step (with eta > 0 and s_noise > 0).
MULTI_DRAW = ("seeds_2", "seeds_3")
