"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models"), as diffusers' SASolverScheduler: a stochastic Adams-Bashforth predictor of order
``predictor_order`` and a stochastic Adams-Moulton corrector of order ``corrector_order`` on the
SDE with stochasticity tau (per step: ``taus[n]``, diffusers' tau_func of the step's timestep).

In data prediction (``algorithm_type='data_prediction'``), from point s to point t with
h = lambda_t - lambda_s and model quantities m_j (x0 at the points lambda_j):

    x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + sum_j (1 + tau^2) sigma_t e^{-tau^2 lambda_t} g_j m_j
          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z

g_j = int_{lambda_s}^{lambda_t} e^{(1 + tau^2) lambda} l_j(lambda) dlambda with l_j the Lagrange basis
on the points used (closed forms up to order 4), plus diffusers' order-2 modification (as UniPC's).
In noise prediction: x_t = (alpha_t / alpha_s) x_s - sum_j (1 + tau^2) alpha_t g_j eps_j +
tau sigma_t sqrt(e^{2h} - 1) z, g_j = int e^{-lambda} l_j.

The corrector of step n - 1 -> n uses the same x_{n-1}, tau and noise z_{n-1} as the predictor that
produced x_n, plus the model quantity at x_n; its x and noise terms are the predictor's, so the
corrected sample is x_n + sum_j (C_j - P_j) m_j: one row per call, reading the predicted sample,
writing the next prediction. (diffusers keeps x_{n-1} and z_{n-1} instead: the same numbers, unless
the sample is edited between calls, which then enters the corrector.) Orders follow diffusers'
warm-up and ``lower_order_final``; a last step to sigma = 0 (diffusers' ends at sigma_min) is the
first-order limit, x0 (data) or (alpha_t / alpha_s)(x - (1 + tau^2) sigma_s eps + tau sigma_s z) (noise). History: a ring of max(predictor_order, corrector_order - 1) slots.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, check_choice, check_order, eps_quantity, grid_point, register
from .exponential import half_log_snr

ALGORITHMS = ("data_prediction", "noise_prediction")


def _expo_positive(k: int, a: float, b: float, tau: float) -> float:
    """int_a^b e^{(1 + tau^2) l} l^k dl, diffusers' closed form (times (1 + tau^2) normalization as it writes it)."""
    c = 1.0 + tau * tau
    ec, sc = c * b, c * a
    d = math.exp(-(ec - sc))
    if k == 0:
        return math.exp(ec) * (1.0 - d) / c
    if k == 1:
        return math.exp(ec) * ((ec - 1.0) - (sc - 1.0) * d) / c ** 2
    if k == 2:
        return math.exp(ec) * ((ec * ec - 2.0 * ec + 2.0) - (sc * sc - 2.0 * sc + 2.0) * d) / c ** 3
    return math.exp(ec) * ((ec ** 3 - 3.0 * ec ** 2 + 6.0 * ec - 6.0) - (sc ** 3 - 3.0 * sc ** 2 + 6.0 * sc - 6.0) * d) / c ** 4


def _expo_negative(k: int, a: float, b: float) -> float:
    """int_a^b e^{-l} l^k dl, diffusers' closed form."""
    e = math.exp(-b)
    r = math.exp(b - a)
    if k == 0:
        return e * (r - 1.0)
    if k == 1:
        return e * ((a + 1.0) * r - (b + 1.0))
    if k == 2:
        return e * ((a * a + 2.0 * a + 2.0) * r - (b * b + 2.0 * b + 2.0))
    return e * ((a ** 3 + 3.0 * a ** 2 + 6.0 * a + 6.0) * r - (b ** 3 + 3.0 * b ** 2 + 6.0 * b + 6.0))


def _lagrange(lams: Sequence[float]) -> List[List[float]]:
    """Coefficients of the Lagrange basis polynomials on ``lams``, highest power first."""
    out = []
    for i, li in enumerate(lams):
        others = [lj for j, lj in enumerate(lams) if j != i]
        den = float(np.prod([li - lj for lj in others])) if others else 1.0
        poly = np.poly(others) if others else np.array([1.0])        # prod (l - lj), highest power first
        out.append([float(c) / den for c in poly])
    return out


@register("sasolver")
class SASolver(Solver):
    """SA-Solver predictor-corrector as diffusers has it (see the module docstring; ComfyUI's form is
    fastdiff.solvers.comfy's ``sa_solver``)."""

    stochastic = True

    def __init__(self, predictor_order: int = 2, corrector_order: int = 2, taus: Optional[Sequence[float]] = None,
                 tau: float = 1.0, algorithm_type: str = "data_prediction", lower_order_final: bool = True):
        self.predictor_order = check_order(predictor_order, (1, 2, 3, 4), "predictor_order")
        self.corrector_order = check_order(corrector_order, (1, 2, 3, 4), "corrector_order")
        self.taus = None if taus is None else tuple(float(t) for t in taus)
        self.tau = float(tau)
        self.algorithm_type = check_choice(algorithm_type, ALGORITHMS, "algorithm_type")
        self.lower_order_final = bool(lower_order_final)
        self.num_slots = max(self.predictor_order, self.corrector_order - 1)
        self.order = 1

    def _tau(self, n: int) -> float:
        return self.taus[n] if self.taus is not None else self.tau

    def _gradient(self, lam: List[float], s: int, t: int, order: int, tau: float, P, corrector: bool) -> List[float]:
        """Coefficients of m at points t - i (corrector) or s - i (predictor), i < order."""
        data = self.algorithm_type == "data_prediction"
        top = t if corrector else s
        lams = [lam[top - i] for i in range(order)]
        basis = _lagrange(lams)
        a, b = lam[s], lam[t]
        g = []
        for i in range(order):
            v = 0.0
            for j in range(order):
                k = order - 1 - j
                v += basis[i][j] * (_expo_positive(k, a, b, tau) if data else _expo_negative(k, a, b))
            g.append(v)
        if data and order == 2:       # diffusers' modification (as UniPC's)
            c = 1.0 + tau * tau
            h = b - a
            core = h * c - 1.0 + math.exp(-c * h)
            if corrector:
                m = math.exp(c * b) * (h / 2.0 - core / (c * c * h))
            else:
                m = math.exp(c * b) * (h * h / 2.0 - core / (c * c)) / (a - lam[s - 1])
            g[0] += m
            g[1] -= m
        q = P[t]
        if data:
            f = (1.0 + tau * tau) * q.sigma * math.exp(-tau * tau * b)
        else:
            f = -(1.0 + tau * tau) * q.alpha
        return [f * v for v in g]

    def rows(self, grid: Grid) -> List[Row]:
        N, K = grid.steps, self.num_slots
        P = [grid_point(grid, i) for i in range(N + 1)]
        lam = [half_log_snr(p) for p in P]
        if not all(math.isfinite(v) for v in lam[:-1]) or lam[-1] == -math.inf:
            raise ValueError("sasolver needs alpha > 0 at every grid point and sigma > 0 before the last")
        clean = P[N].sigma == 0.0
        data = self.algorithm_type == "data_prediction"
        p_ord, c_ord = [], []
        for n in range(N):
            lo = min(n, K)
            po = min(self.predictor_order, N - n) if self.lower_order_final else self.predictor_order
            co = min(self.corrector_order, N - n + 1) if self.lower_order_final else self.corrector_order
            p_ord.append(min(po, lo + 1))
            c_ord.append(min(co, lo + 2))
        pred = []                     # predictor coefficients of each step, by lag
        for n in range(N):
            if clean and n == N - 1:  # (a last step to sigma = 0: the first-order limit)
                p, q, tau = P[n], P[n + 1], self._tau(n)
                pred.append([q.alpha] if data else [-(1.0 + tau * tau) * q.alpha * p.sigma / p.alpha])
                continue
            pred.append(self._gradient(lam, n, n + 1, p_ord[n], self._tau(n), P, False))
        rows = []
        for n in range(N):
            p, q = P[n], P[n + 1]
            tau, h = self._tau(n), lam[n + 1] - lam[n]
            if q.sigma == 0.0:
                a = 0.0 if data else q.alpha / p.alpha
                std = 0.0 if data else tau * q.alpha * p.sigma / p.alpha
            elif data:
                a = math.exp(-tau * tau * h) * q.sigma / p.sigma
                std = q.sigma * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
            else:
                a = q.alpha / p.alpha
                std = tau * q.sigma * math.sqrt(math.expm1(2.0 * h))
            coef = {lag: a_ for lag, a_ in enumerate(pred[n])}          # lag j: m_{n - j}
            if n > 0:                 # the corrector of step n - 1 -> n, with the noise read back from x_n
                corr = self._gradient(lam, n - 1, n, c_ord[n - 1], self._tau(n - 1), P, True)
                for j, v in enumerate(corr):
                    coef[j] = coef.get(j, 0.0) + a * v
                for j, v in enumerate(pred[n - 1]):
                    coef[j + 1] = coef.get(j + 1, 0.0) - a * v
            hist = tuple(((n - j) % K, float(v)) for j, v in sorted(coef.items()) if j > 0 and v != 0.0)
            qy, qx0 = (0.0, 1.0) if data else eps_quantity(p)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0,
                            out_x=Out(x=a, h=coef.get(0, 0.0), hist=hist, z=std),
                            hist_write=n % K if n < N - 1 else -1, noise_id=n if std else -1, next_eval="x"))
        return rows
