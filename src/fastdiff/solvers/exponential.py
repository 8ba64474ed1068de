"""The exponential-integrator family's shared math, and its first-order members DDIM(eta) and DDPM.

Exponential integrators are written with (alpha, sigma, lambda = log(alpha/sigma)): exact for the
linear part of the probability-flow ODE and invariant to rescaling x, so one formula serves VP, VE
and flow schedules alike. This module is the one home of the pieces they share: lambda
(``half_log_snr``), the point at a given lambda (``point_at_lambda``), the first-order steps on the
data and the noise prediction (``ddim_data``, ``ddim_eps``), DDIM's noise std, DDIM's row with its
raw noise estimate in a history slot (``ddim_raw_eps_row``: the diffusers DDIM, DDIM-inversion and
RePaint drop-ins). The multistep and singlestep DPM-Solvers (dpm_solver.py, including
DPM-Solver++(2M)), DEIS and UniPC (multistep.py) and the adaptive driver build on them.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import numpy as np

from ..program import Out, Point, Row
from ..schedules import Grid, Schedule
from .base import Solver, check_choice, check_eta, grid_point, register

X0_QUANTITY = (0.0, 1.0)   # (q_y, q_x0) of h = x0


# ---------------------------------------------------------------------------------------------
# Shared math


def half_log_snr(p: Point) -> float:
    """lambda = log(alpha / sigma); +inf at the clean end, -inf where alpha = 0."""
    if p.sigma == 0.0:
        return math.inf
    if p.alpha == 0.0:
        return -math.inf
    return math.log(p.alpha) - math.log(p.sigma)


def point_at_lambda(grid: Union[Grid, Schedule], lam: float) -> Point:
    """The (off-grid) point whose lambda is ``lam``, on a Grid or directly on a Schedule."""
    ks = np.float64(math.exp(-lam))
    if isinstance(grid, Grid):
        t, a, s, mt = grid.point_at_ksigma(ks)
        return Point(float(t), float(a), float(s), float(mt))
    t, a, s = (float(v) for v in grid.point_at_ksigma(ks))
    return Point(t, a, s, float(grid.model_time(t)))


def check_finite_lambda(grid: Grid, name: str):
    """Solvers that step in lambda from every grid point need alpha > 0 there."""
    if not np.all(grid.alpha[:-1] > 0):
        raise ValueError(f"{name} steps in log-SNR and needs alpha > 0 at every evaluated point; this grid starts "
                         "at alpha = 0 (flow t = 1): pass t_max < 1 to make_grid")


def ddim_data(p: Point, q: Point, eta: float = 0.0) -> Tuple[float, float, float]:
    """(a, b, std) of the first-order data-prediction step x_q = a x + b x0 + std z:
    a = sigma_q/sigma_p e^{-eta h}, b = alpha_q (1 - e^{-(1+eta) h}), std = sigma_q sqrt(1 - e^{-2 eta h})."""
    if q.sigma == 0.0:
        return 0.0, q.alpha, 0.0
    h = half_log_snr(q) - half_log_snr(p)
    a = q.sigma / p.sigma * (math.exp(-eta * h) if eta else 1.0)   # (h may be inf: alpha_p = 0)
    b = -q.alpha * math.expm1(-(1.0 + eta) * h)
    std = q.sigma * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta else 0.0
    return a, b, std


def ddim_eps(p: Point, q: Point) -> Tuple[float, float]:
    """(a, b) of the first-order noise-prediction step x_q = a x + b eps:
    a = alpha_q/alpha_p, b = -sigma_q (e^h - 1), written so that sigma_q = 0 stays finite."""
    a = q.alpha / p.alpha
    if q.sigma == 0.0:
        return a, -q.alpha * p.sigma / p.alpha      # sigma_q e^h = alpha_q sigma_p / alpha_p
    h = half_log_snr(q) - half_log_snr(p)
    return a, -q.sigma * math.expm1(h)


def ddim_noise_std(a_t, s_t, a_s, s_s, eta):
    """DDIM's sigma_eta for the step t -> s: eta * sqrt(posterior variance of q(x_s | x_t, x0))."""
    if eta == 0.0 or s_s == 0.0:
        return 0.0
    ratio = (a_t * s_s) / (a_s * s_t)  # ksigma_s / ksigma_t  (< 1)
    return eta * s_s * math.sqrt(max(1.0 - ratio * ratio, 0.0))


def ddim_raw_eps_row(step: int, point: Point, alpha_next: float, eps_coef: float, noise_std: float = 0.0,
                     noise_id: int = -1, out_y: Optional[Out] = None) -> Row:
    """DDIM's update with its noise estimate read from history slot 0 instead of derived from x0:

        x' = alpha_next x0 + eps_coef eps_raw + noise_std z        (h = x0)

    diffusers' DDIM keeps the model's raw noise estimate next to a clipped or thresholded x0 (and
    where the sample is clean, its eps is no function of x0): its driver fills slot 0 beside the
    pass. DDIM(eta) sampling has eps_coef = sqrt(sigma_next^2 - noise_std^2), DDIM inversion
    (eta = 0, up the schedule) eps_coef = sigma_next. ``out_y``: a second output written to y
    (RePaint: the known region's noise)."""
    return Row(step=step, eval_at="x", point=point, q_y=0.0, q_x0=1.0,
               out_x=Out(h=alpha_next, hist=((0, eps_coef),), z=noise_std), out_y=out_y,
               noise_id=noise_id, next_eval="x")


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
