"""Exponential-integrator family, written with (alpha, sigma, lambda = log(alpha/sigma)): DDIM(eta),
DDPM ancestral sampling, and DPM-Solver++(2M). These are exact for the linear part of the ODE and
invariant to rescaling x, so one formula serves VP, VE and flow schedules alike.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, check_choice, check_eta, grid_point, register


def _lambda(alpha: float, sigma: float) -> float:
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def ddim_noise_std(a_t, s_t, a_s, s_s, eta):
    """DDIM's sigma_eta for the step t -> s: eta * sqrt(posterior variance of q(x_s | x_t, x0))."""
    if eta == 0.0 or s_s == 0.0:
        return 0.0
    ratio = (a_t * s_s) / (a_s * s_t)  # ksigma_s / ksigma_t  (< 1)
    return eta * s_s * math.sqrt(max(1.0 - ratio * ratio, 0.0))


@register("ddim")
class DDIM(Solver):
    """Song et al. (2021): x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta z.
    eta = 0 is the deterministic DDIM (first-order on the probability-flow ODE); eta = 1 is DDPM."""

    def __init__(self, eta: float = 0.0):
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0

    def rows(self, grid: Grid) -> List[Row]:
        rows = []
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            std = ddim_noise_std(p.alpha, p.sigma, q.alpha, q.sigma, self.eta)
            c_eps = math.sqrt(max(q.sigma ** 2 - std ** 2, 0.0))
            # eps = (x - alpha_t x0) / sigma_t
            rows.append(Row(step=n, eval_at="x", point=p, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=c_eps / p.sigma, h=q.alpha - c_eps * p.alpha / p.sigma, z=std),
                            noise_id=n if std else -1, next_eval="x"))
        return rows


@register("ddpm")
class DDPM(Solver):
    """Ho et al. (2020) ancestral sampling: the posterior mean of q(x_s | x_t, x0) plus noise of
    variance 'fixed_small' (the posterior variance) or 'fixed_large' (beta_t = sigma_{t|s}^2 for VP
    schedules; other schedules take the step in their VP form x / sqrt(alpha^2 + sigma^2))."""

    stochastic = True

    def __init__(self, variance: str = "fixed_small"):
        self.variance = check_choice(variance, ("fixed_small", "fixed_large"), "variance")

    def rows(self, grid: Grid) -> List[Row]:
        rows = []
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            a_ts = p.alpha / q.alpha
            var_ts = p.sigma ** 2 - a_ts ** 2 * q.sigma ** 2          # sigma_{t|s}^2 (= beta_t for VP)
            coef_x0 = q.alpha * var_ts / p.sigma ** 2
            coef_xt = a_ts * q.sigma ** 2 / p.sigma ** 2
            if q.sigma == 0.0:
                std = 0.0
            elif self.variance == "fixed_small":
                std = math.sqrt(max(var_ts * q.sigma ** 2 / p.sigma ** 2, 0.0))
            else:
                # beta_t is a variance in VP coordinates x / sqrt(alpha^2 + sigma^2); carried to
                # the scale of x_s (not x_t), so the step stays invariant to rescaling x (VE, flow).
                std = math.sqrt(max(var_ts, 0.0)) * math.hypot(q.alpha, q.sigma) / math.hypot(p.alpha, p.sigma)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=coef_xt, h=coef_x0, z=std), noise_id=n if std else -1, next_eval="x"))
        return rows


@register("dpmpp_2m", "dpm_solver++_2m")
class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; k-diffusion sample_dpmpp_2m): a multistep
    second-order method on the data prediction. The first step, and any step to sigma = 0, is
    first order; ``lower_order_final`` also makes the last step first order when steps < 15
    (diffusers' default)."""

    order = 2
    num_slots = 1

    def __init__(self, lower_order_final: bool = False):
        self.lower_order_final = bool(lower_order_final)

    def rows(self, grid: Grid) -> List[Row]:
        rows = []
        lam = [_lambda(float(a), float(s)) for a, s in zip(grid.alpha, grid.sigma)]
        N = grid.steps
        for n in range(N):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            h = lam[n + 1] - lam[n]
            phi = -math.expm1(-h)                 # 1 - e^{-h}
            x_coef = q.sigma / p.sigma
            first_order = (n == 0 or q.sigma == 0.0 or (self.lower_order_final and n == N - 1 and N < 15))
            if first_order:
                out = Out(x=x_coef, h=q.alpha * phi)
            else:
                r = (lam[n] - lam[n - 1]) / h
                out = Out(x=x_coef, h=q.alpha * phi * (1.0 + 0.5 / r), hist=((0, -q.alpha * phi * 0.5 / r),))
            rows.append(Row(step=n, eval_at="x", point=p, q_y=0.0, q_x0=1.0, out_x=out,
                            hist_write=0 if n < N - 1 else -1, next_eval="x"))
        return rows
