"""Textbook forms of the solver zoo (fastdiff.solvers.dpm_solver / multistep / edm / flow), step by
step on tensors in plain PyTorch, as the papers, diffusers and k-diffusion write them. They are the
oracles the coefficient programs are tested against: they import no solver, program or op.

Same signature as the rest of fastdiff.textbook: ``fn(model, x, grid, prediction, noise=None,
**options)`` with ``noise[i]`` (a list, or a callable ``i -> tensor``) the Gaussian draw of
step i; ``sample_dpmpp_sde`` takes two draws per step, ``noise[i] = (z_stage_1, z_stage_2)``.

Two families of forms:

* k-diffusion's samplers (sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral,
  sample_dpmpp_sde, sample_lms, sample_euler / sample_heun with churn) in its coordinates
  y = x/alpha, s = sigma/alpha (ODECoordinates), the code nearly line for line;
* the exponential integrators (DPM-Solver singlestep, multistep DPM-Solver(++) and its SDE form,
  DEIS, UniPC) in the schedule's own (alpha, sigma, lambda = log(alpha/sigma)), as diffusers'
  schedulers write their update functions (model outputs kept in a list, orders chosen by
  counters). Where diffusers' formula has no finite value at sigma = 0 the step returns its
  limit, alpha * x0 (commented where it happens).

``ZOO_ORACLES`` maps solver names to these functions.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, List, Sequence

import numpy as np
import torch
from numpy.polynomial import Polynomial

from ..schedules import Grid
from .common import ODECoordinates, denoise, log_snr, noise_at
from .ode import sample_euler, sample_heun
from .stochastic import get_ancestral_step


# ---------------------------------------------------------------------------------------------
# Helpers: the exponential integrators' view of the grid


class _ExpGrid:
    """alpha, sigma, lambda of the grid points and the model's x0 / eps at a point."""

    def __init__(self, model: Callable, grid: Grid, prediction: str):
        self.model, self.grid, self.prediction = model, grid, prediction
        self.alpha = [float(a) for a in grid.alpha]
        self.sigma = [float(s) for s in grid.sigma]
        self.lam = [log_snr(a, s) for a, s in zip(self.alpha, self.sigma)]

    def x0(self, x, i):
        return denoise(self.model, x, self.alpha[i], self.sigma[i], float(self.grid.model_t[i]), self.prediction)

    def eps(self, x, i):
        return (x - self.alpha[i] * self.x0(x, i)) / self.sigma[i]

    def at_lambda(self, lam: float):
        """(alpha, sigma, model_t) of the off-grid point with log-SNR lam."""
        _, a, s, mt = (float(v) for v in self.grid.point_at_ksigma(math.exp(-lam)))
        return a, s, mt

    def eps_at(self, x, a, s, mt):
        return (x - a * denoise(self.model, x, a, s, mt, self.prediction)) / s


def _ve(model, grid, prediction):
    return ODECoordinates(model, grid, prediction, "ve")


# ---------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022a), singlestep, noise prediction


def sample_dpm_solver(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                      order: int = 3) -> torch.Tensor:
    """Algorithm 1 (DPM-Solver-2, r1 = 1/2) and Algorithm 5 (DPM-Solver-3, r1 = 1/3, r2 = 2/3)."""
    g = _ExpGrid(model, grid, prediction)
    for i in range(grid.steps):
        a_s, s_s, a_t, s_t = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_t == 0.0:      # the limit of every order: DDIM to sigma = 0 returns alpha_t * x0
            x = a_t * g.x0(x, i)
            continue
        h = g.lam[i + 1] - g.lam[i]
        eps = g.eps(x, i)
        if order == 1:
            x = (a_t / a_s) * x - s_t * math.expm1(h) * eps
        elif order == 2:
            r1 = 0.5
            a1, s1, mt1 = g.at_lambda(g.lam[i] + r1 * h)
            u1 = (a1 / a_s) * x - s1 * math.expm1(r1 * h) * eps
            eps_1 = g.eps_at(u1, a1, s1, mt1)
            x = (a_t / a_s) * x - s_t * math.expm1(h) * eps - s_t / (2 * r1) * math.expm1(h) * (eps_1 - eps)
        else:
            r1, r2 = 1 / 3, 2 / 3
            a1, s1, mt1 = g.at_lambda(g.lam[i] + r1 * h)
            a2, s2, mt2 = g.at_lambda(g.lam[i] + r2 * h)
            u1 = (a1 / a_s) * x - s1 * math.expm1(r1 * h) * eps
            eps_1 = g.eps_at(u1, a1, s1, mt1)
            u2 = ((a2 / a_s) * x - s2 * math.expm1(r2 * h) * eps
                  - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps))
            eps_2 = g.eps_at(u2, a2, s2, mt2)
            x = ((a_t / a_s) * x - s_t * math.expm1(h) * eps
                 - s_t / r2 * (math.expm1(h) / h - 1) * (eps_2 - eps))
    return x


# ---------------------------------------------------------------------------------------------
# Multistep DPM-Solver / DPM-Solver++ (diffusers DPMSolverMultistepScheduler), SDE as k-diffusion


def sample_dpm_solver_multistep(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                                order: int = 2, algorithm_type: str = "dpmsolver", solver_type: str = "midpoint",
                                lower_order_final: bool = True, euler_at_final: bool = False,
                                eta: float = 0.0, s_noise: float = 1.0, third_order: str = "diffusers") -> torch.Tensor:
    """diffusers' step(): model outputs (x0 for dpmsolver++, eps for dpmsolver) in a list, the order
    from lower_order_nums / lower_order_final / euler_at_final, then its first/second/third-order
    update. eta > 0: the SDE of k-diffusion's sample_dpmpp_{2,3}m_sde (diffusers' sde-dpmsolver++
    for eta = 1), with h_eta = (1 + eta) h in the phi functions. third_order='taylor' doubles the D2
    term (2 phi_3: the Taylor coefficient for D2 ~ h^2 x0''/2; diffusers' phi_3 makes 3M order 2)."""
    d2 = 2.0 if third_order == "taylor" else 1.0
    g = _ExpGrid(model, grid, prediction)
    N = grid.steps
    outputs: List[torch.Tensor] = []
    lower_order_nums = 0
    for i in range(N):
        last = i == N - 1
        ends_clean = g.sigma[i + 1] == 0.0
        lof = last and (euler_at_final or (lower_order_final and N < 15) or ends_clean)
        los = i == N - 2 and lower_order_final and N < 15
        m = g.x0(x, i) if algorithm_type == "dpmsolver++" else g.eps(x, i)
        outputs.append(m)
        if order == 1 or lower_order_nums < 1 or lof:
            k = 1
        elif order == 2 or lower_order_nums < 2 or los:
            k = 2
        else:
            k = 3
        a_t, s_t, a_s0, s_s0 = g.alpha[i + 1], g.sigma[i + 1], g.alpha[i], g.sigma[i]
        m0 = outputs[-1]
        if ends_clean:      # every formula's limit at sigma_t = 0 (k = 1 there): alpha_t * x0
            x = a_t * ((x - s_s0 * m0) / a_s0 if algorithm_type == "dpmsolver" else m0)
            lower_order_nums = min(lower_order_nums + 1, order)
            continue
        h = g.lam[i + 1] - g.lam[i]
        if k >= 2:
            m1 = outputs[-2]
            r0 = (g.lam[i] - g.lam[i - 1]) / h
        if k == 3:
            m2 = outputs[-3]
            r1 = (g.lam[i - 1] - g.lam[i - 2]) / h
            D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        elif k == 2:
            D1 = (1.0 / r0) * (m0 - m1)
        if algorithm_type == "dpmsolver++":
            h_eta = h * (1.0 + eta)
            decay = math.exp(-eta * h) if eta else 1.0      # (h = inf where alpha_s0 = 0)
            x_new = (s_t / s_s0 * decay) * x + (-a_t * math.expm1(-h_eta)) * m0
            phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if k == 2 and solver_type == "midpoint":
                x_new = x_new + 0.5 * (-a_t * math.expm1(-h_eta)) * D1
            elif k == 2:
                x_new = x_new + a_t * phi_2 * D1
            elif k == 3:
                phi_3 = phi_2 / h_eta - 0.5
                x_new = x_new + a_t * phi_2 * D1 - d2 * a_t * phi_3 * D2
            if eta and s_noise:
                x_new = x_new + s_t * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise * noise_at(noise, i)
        else:
            x_new = (a_t / a_s0) * x - (s_t * math.expm1(h)) * m0
            if k == 2 and solver_type == "midpoint":
                x_new = x_new - 0.5 * (s_t * math.expm1(h)) * D1
            elif k == 2:
                x_new = x_new - (s_t * (math.expm1(h) / h - 1.0)) * D1
            elif k == 3:
                x_new = (x_new - (s_t * (math.expm1(h) / h - 1.0)) * D1
                         - d2 * (s_t * ((math.expm1(h) - h) / h ** 2 - 0.5)) * D2)
        x = x_new
        lower_order_nums = min(lower_order_nums + 1, order)
    return x


def sample_dpmpp_3m(model, x, grid, prediction, noise=None, solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, third_order="diffusers"):
    return sample_dpm_solver_multistep(model, x, grid, prediction, noise, order=3, algorithm_type="dpmsolver++",
                                       solver_type=solver_type, lower_order_final=lower_order_final,
                                       euler_at_final=euler_at_final, third_order=third_order)


def sample_dpmpp_2m_sde(model, x, grid, prediction, noise=None, eta=1.0, s_noise=1.0, solver_type="midpoint",
                        lower_order_final=False, euler_at_final=False):
    return sample_dpm_solver_multistep(model, x, grid, prediction, noise, order=2, algorithm_type="dpmsolver++",
                                       solver_type=solver_type, lower_order_final=lower_order_final,
                                       euler_at_final=euler_at_final, eta=eta, s_noise=s_noise)


def sample_dpmpp_3m_sde(model, x, grid, prediction, noise=None, eta=1.0, s_noise=1.0, lower_order_final=False,
                        euler_at_final=False, third_order="diffusers"):
    return sample_dpm_solver_multistep(model, x, grid, prediction, noise, order=3, algorithm_type="dpmsolver++",
                                       solver_type="heun", lower_order_final=lower_order_final,
                                       euler_at_final=euler_at_final, eta=eta, s_noise=s_noise, third_order=third_order)


# ---------------------------------------------------------------------------------------------
# k-diffusion's singlestep samplers (y = x/alpha, s = sigma/alpha)


def sample_dpmpp_2s_ancestral(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                              eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    ode = _ve(model, grid, prediction)
    sigmas = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        denoised = ode.denoised(y, i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            d = (y - denoised) / sigmas[i]       # Euler method
            y = y + d * (sigma_down - sigmas[i])
        else:                                    # DPM-Solver++(2S)
            t, t_next = -math.log(sigmas[i]), -math.log(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            y_2 = (math.exp(-s) / math.exp(-t)) * y - math.expm1(-h * r) * denoised
            denoised_2 = ode.denoised_at_s(y_2, math.exp(-s))
            y = (math.exp(-t_next) / math.exp(-t)) * y - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0 and sigma_up * s_noise > 0:
            y = y + noise_at(noise, i) * s_noise * sigma_up
    return ode.to_x(y, grid.steps)


def sample_dpmpp_2s(model, x, grid, prediction, noise=None):
    return sample_dpmpp_2s_ancestral(model, x, grid, prediction, noise, eta=0.0)


def sample_dpmpp_sde(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 1 / 2, brownian: bool = True) -> torch.Tensor:
    """noise[i] = (z_1, z_2) of step i; with ``brownian`` the second draw k-diffusion's Brownian
    tree would give is the increment over [sigma_next, sigma], built from z_1 (over
    [sigma_mid, sigma]) and the independent z_2 (over [sigma_next, sigma_mid])."""
    ode = _ve(model, grid, prediction)
    sigmas = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        denoised = ode.denoised(y, i)
        if sigmas[i + 1] == 0:                   # Euler method
            d = (y - denoised) / sigmas[i]
            y = y + d * (sigmas[i + 1] - sigmas[i])
            continue
        z_1, z_2 = (None, None) if not (eta and s_noise) else noise_at(noise, i)
        t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        if brownian and z_1 is not None:
            sigma, sigma_mid, sigma_next = sigmas[i], math.exp(-s), sigmas[i + 1]
            w_1 = math.sqrt(sigma - sigma_mid) * z_1              # W(sigma_mid) - W(sigma), up to sign
            w_2 = math.sqrt(sigma_mid - sigma_next) * z_2
            z_2 = (w_1 + w_2) / math.sqrt(sigma - sigma_next)     # the increment over the whole step
        fac = 1 / (2 * r)
        # Step 1
        sd, su = get_ancestral_step(math.exp(-t), math.exp(-s), eta)
        s_ = -math.log(sd) if sd > 0 else math.inf
        y_2 = (sd / math.exp(-t)) * y - math.expm1(t - s_) * denoised
        if su * s_noise > 0:
            y_2 = y_2 + z_1 * s_noise * su
        denoised_2 = ode.denoised_at_s(y_2, math.exp(-s))
        # Step 2
        sd, su = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
        t_next_ = -math.log(sd) if sd > 0 else math.inf
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        y = (sd / math.exp(-t)) * y - math.expm1(t - t_next_) * denoised_d
        if su * s_noise > 0:
            y = y + z_2 * s_noise * su
    return ode.to_x(y, grid.steps)


def _churn_gamma(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _edm(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise, s_churn: float, s_tmin: float,
         s_tmax: float, s_noise: float, ode_space: str, second_order: str) -> torch.Tensor:
    """Karras et al. (2022) Algorithm 2 (k-diffusion sample_euler / sample_heun / sample_dpm_2):
    churn to sigma_hat, then an Euler, Heun or DPM-2 step; the step to 0 is Euler."""
    ode = ODECoordinates(model, grid, prediction, ode_space)
    sigmas = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        gamma = _churn_gamma(float(grid.ksigma[i]), grid.steps, s_churn, s_tmin, s_tmax)
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            y = y + noise_at(noise, i) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        d = ode.d_at_s(y, sigma_hat) if gamma > 0 else ode.d(y, i)
        if sigmas[i + 1] == 0 or second_order == "euler":
            y = y + d * (sigmas[i + 1] - sigma_hat)
        elif second_order == "heun":
            dt = sigmas[i + 1] - sigma_hat
            y_2 = y + d * dt
            d_2 = ode.d(y_2, i + 1)
            y = y + (d + d_2) / 2 * dt
        else:  # DPM-Solver-2
            sigma_mid = math.exp(math.log(sigma_hat) + 0.5 * (math.log(sigmas[i + 1]) - math.log(sigma_hat)))
            y_2 = y + d * (sigma_mid - sigma_hat)
            d_2 = ode.d_at_s(y_2, sigma_mid)
            y = y + d_2 * (sigmas[i + 1] - sigma_hat)
    return ode.to_x(y, grid.steps)


def sample_edm_euler(model, x, grid, prediction, noise=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                     s_noise=1.0, ode_space="auto"):
    return _edm(model, x, grid, prediction, noise, s_churn, s_tmin, s_tmax, s_noise, ode_space, "euler")


def sample_edm_heun(model, x, grid, prediction, noise=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                    s_noise=1.0, ode_space="auto"):
    return _edm(model, x, grid, prediction, noise, s_churn, s_tmin, s_tmax, s_noise, ode_space, "heun")


def sample_dpm_2(model, x, grid, prediction, noise=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                 s_noise=1.0, ode_space="auto"):
    return _edm(model, x, grid, prediction, noise, s_churn, s_tmin, s_tmax, s_noise, ode_space, "dpm_2")


def sample_dpm_2_ancestral(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    ode = _ve(model, grid, prediction)
    sigmas = ode.s
    y = ode.to_y(x, 0)
    for i in range(grid.steps):
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = ode.d(y, i)
        if sigma_down == 0:                      # Euler method
            y = y + d * (sigma_down - sigmas[i])
        else:                                    # DPM-Solver-2
            sigma_mid = math.exp(math.log(sigmas[i]) + 0.5 * (math.log(sigma_down) - math.log(sigmas[i])))
            y_2 = y + d * (sigma_mid - sigmas[i])
            d_2 = ode.d_at_s(y_2, sigma_mid)
            y = y + d_2 * (sigma_down - sigmas[i])
            if sigma_up * s_noise > 0:
                y = y + noise_at(noise, i) * s_noise * sigma_up
    return ode.to_x(y, grid.steps)


def sample_lms(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, order: int = 4,
               ode_space: str = "auto") -> torch.Tensor:
    """k-diffusion sample_lms; the Lagrange integrals taken exactly with numpy polynomials."""
    ode = ODECoordinates(model, grid, prediction, ode_space)
    t = ode.s
    y = ode.to_y(x, 0)
    ds: List[torch.Tensor] = []
    for i in range(grid.steps):
        ds.append(ode.d(y, i))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = []
        for j in range(cur_order):
            others = [t[i - k] for k in range(cur_order) if k != j]
            basis = Polynomial.fromroots(others) / np.prod([t[i - j] - o for o in others]) if others \
                else Polynomial([1.0])
            F = basis.integ()
            coeffs.append(F(t[i + 1]) - F(t[i]))
        y = y + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return ode.to_x(y, grid.steps)


# ---------------------------------------------------------------------------------------------
# DEIS (diffusers DEISMultistepScheduler, 'deis' / 'logrho')


def _xlogy_guard(t: float, value: Callable[[], float]) -> float:
    """diffusers' ind_fn is t * (polynomial in log t): its limit at t = 0 is 0."""
    return 0.0 if t == 0.0 else value()


def sample_deis(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, order: int = 2,
                lower_order_final: bool = True) -> torch.Tensor:
    g = _ExpGrid(model, grid, prediction)
    N = grid.steps
    outputs: List[torch.Tensor] = []
    lower_order_nums = 0
    rho = [s / a for a, s in zip(g.alpha, g.sigma)]
    for i in range(N):
        lof = i == N - 1 and lower_order_final and N < 15
        los = i == N - 2 and lower_order_final and N < 15
        outputs.append(g.eps(x, i))
        a_t, a_s0 = g.alpha[i + 1], g.alpha[i]
        rho_t, rho_s0 = rho[i + 1], rho[i]
        if order == 1 or lower_order_nums < 1 or lof:
            # diffusers writes DDIM, (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps; in rho that is:
            x = a_t * (x / a_s0 + (rho_t - rho_s0) * outputs[-1])
        elif order == 2 or lower_order_nums < 2 or los:
            m0, m1 = outputs[-1], outputs[-2]
            rho_s1 = rho[i - 1]

            def ind_fn(t, b, c):
                # Integrate[(log(t) - log(c)) / (log(b) - log(c)), {t}]
                return _xlogy_guard(t, lambda: t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c)))

            coef1 = ind_fn(rho_t, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s0, rho_s1)
            coef2 = ind_fn(rho_t, rho_s1, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s0)
            x = a_t * (x / a_s0 + coef1 * m0 + coef2 * m1)
        else:
            m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
            rho_s1, rho_s2 = rho[i - 1], rho[i - 2]

            def ind_fn(t, b, c, d):
                # Integrate[(log(t) - log(c))(log(t) - log(d)) / (log(b) - log(c))(log(b) - log(d)), {t}]
                def value():
                    numerator = t * (np.log(c) * (np.log(d) - np.log(t) + 1) - np.log(d) * np.log(t) + np.log(d)
                                     + np.log(t) ** 2 - 2 * np.log(t) + 2)
                    return numerator / ((np.log(b) - np.log(c)) * (np.log(b) - np.log(d)))
                return _xlogy_guard(t, value)

            coef1 = ind_fn(rho_t, rho_s0, rho_s1, rho_s2) - ind_fn(rho_s0, rho_s0, rho_s1, rho_s2)
            coef2 = ind_fn(rho_t, rho_s1, rho_s2, rho_s0) - ind_fn(rho_s0, rho_s1, rho_s2, rho_s0)
            coef3 = ind_fn(rho_t, rho_s2, rho_s0, rho_s1) - ind_fn(rho_s0, rho_s2, rho_s0, rho_s1)
            x = a_t * (x / a_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)
        lower_order_nums = min(lower_order_nums + 1, order)
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (diffusers UniPCMultistepScheduler)


def _unipc_R_b(rks: torch.Tensor, hh: float, B_h: float, order: int):
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.tensor(b, dtype=torch.float64)


def sample_unipc(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, order: int = 2,
                 solver_type: str = "bh2", predict_x0: bool = True, use_corrector: bool = True,
                 disable_corrector: Sequence[int] = (), lower_order_final: bool = True) -> torch.Tensor:
    g = _ExpGrid(model, grid, prediction)
    N = grid.steps
    model_outputs: List[torch.Tensor] = []       # converted outputs, newest last
    last_sample = None
    this_order = 0
    lower_order_nums = 0

    def B(hh):
        return hh if solver_type == "bh1" else math.expm1(hh)

    def convert(x_, i):
        return g.x0(x_, i) if predict_x0 else g.eps(x_, i)

    def uni_p(m0, x_, i, order_):
        a_t, s_t, a_s0, s_s0 = g.alpha[i + 1], g.sigma[i + 1], g.alpha[i], g.sigma[i]
        if s_t == 0.0:   # first order here; its limit is alpha_t * x0 (diffusers: NaN for bh1 / eps)
            return a_t * (m0 if predict_x0 else (x_ - s_s0 * m0) / a_s0)
        h = g.lam[i + 1] - g.lam[i]
        rks, D1s = [], []
        for k in range(1, order_):
            mi = model_outputs[-(k + 1)]
            rk = (g.lam[i - k] - g.lam[i]) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        rks = torch.tensor(rks + [1.0], dtype=torch.float64)
        hh = -h if predict_x0 else h
        h_phi_1 = math.expm1(hh)
        B_h = B(hh)
        R, b = _unipc_R_b(rks, hh, B_h, order_)
        if predict_x0:
            x_t = s_t / s_s0 * x_ - a_t * h_phi_1 * m0
        else:
            x_t = a_t / a_s0 * x_ - s_t * h_phi_1 * m0
        if D1s:
            rhos_p = torch.tensor([0.5], dtype=torch.float64) if order_ == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            pred_res = sum(rhos_p[k] * D1s[k] for k in range(len(D1s)))
            x_t = x_t - (a_t if predict_x0 else s_t) * B_h * pred_res
        return x_t

    def uni_c(model_t, last_sample_, this_sample, i, order_):
        """Corrects the sample at grid point i, predicted from last_sample_ at i - 1."""
        m0 = model_outputs[-1]
        a_t, s_t, a_s0, s_s0 = g.alpha[i], g.sigma[i], g.alpha[i - 1], g.sigma[i - 1]
        h = g.lam[i] - g.lam[i - 1]
        rks, D1s = [], []
        for k in range(1, order_):
            mi = model_outputs[-(k + 1)]
            rk = (g.lam[i - 1 - k] - g.lam[i - 1]) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        rks = torch.tensor(rks + [1.0], dtype=torch.float64)
        hh = -h if predict_x0 else h
        h_phi_1 = math.expm1(hh)
        B_h = B(hh)
        R, b = _unipc_R_b(rks, hh, B_h, order_)
        rhos_c = torch.tensor([0.5], dtype=torch.float64) if order_ == 1 else torch.linalg.solve(R, b)
        if predict_x0:
            x_t_ = s_t / s_s0 * last_sample_ - a_t * h_phi_1 * m0
        else:
            x_t_ = a_t / a_s0 * last_sample_ - s_t * h_phi_1 * m0
        corr_res = sum(rhos_c[k] * D1s[k] for k in range(len(D1s))) if D1s else 0
        D1_t = model_t - m0
        return x_t_ - (a_t if predict_x0 else s_t) * B_h * (corr_res + rhos_c[-1] * D1_t)

    for i in range(N):
        use_c = use_corrector and i > 0 and (i - 1) not in disable_corrector and last_sample is not None
        m = convert(x, i)
        if use_c:
            x = uni_c(m, last_sample, x, i, this_order)
        model_outputs.append(m)
        this_order = min(order, N - i) if lower_order_final else order
        this_order = min(this_order, lower_order_nums + 1)
        if g.sigma[i + 1] == 0.0:
            this_order = 1
        last_sample = x
        x = uni_p(m, x, i, this_order)
        lower_order_nums = min(lower_order_nums + 1, order)
    return x


# ---------------------------------------------------------------------------------------------

ZOO_ORACLES = {
    "dpm_solver": sample_dpm_solver,
    "dpm_solver_multistep": sample_dpm_solver_multistep,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "deis": sample_deis,
    "unipc": sample_unipc,
    "edm_euler": sample_edm_euler,
    "edm_heun": sample_edm_heun,
    # FlowMatchEuler/HeunDiscreteScheduler.step are Euler / Heun in flow coordinates (x and t
    # for rectified flow, where the derivative is the model's velocity).
    "flow_euler": partial(sample_euler, ode_space="flow"),
    "flow_heun": partial(sample_heun, ode_space="flow"),
}
