"""SDE-DPM-Solver in noise prediction (Lu et al. 2022, "DPM-Solver++", section 5 and appendix:
SDE-DPM-Solver-1 and the multistep SDE-DPM-Solver-2M), as diffusers' DPMSolverMultistepScheduler
with ``algorithm_type='sde-dpmsolver'``. With h = lambda_t - lambda_s (lambda = log(alpha/sigma)):

    first order:  x_t = (alpha_t / alpha_s) x_s - 2 sigma_t (e^h - 1) eps_s + sigma_t sqrt(e^{2h} - 1) z
    second order: ... - 2 sigma_t (e^h - 1) D0 - sigma_t (e^h - 1) D1                 ('midpoint')
                  ... - 2 sigma_t (e^h - 1) D0 - 2 sigma_t ((e^h - 1)/h - 1) D1         ('heun')

D0 = eps_n, D1 = (eps_n - eps_{n-1}) / r0, r0 = h_{n-1} / h (diffusers' multistep form). Orders 1-2
(diffusers has no third-order formula for it) with diffusers' warm-up and ``lower_order_final`` /
``euler_at_final`` rules (fastdiff.solvers.dpm_solver.multistep_order). A step to sigma = 0 (which
diffusers refuses: it needs final_sigmas_type='sigma_min') is the first-order step's limit,
x_t = (alpha_t / alpha_s) (x_s - 2 sigma_s eps_s) + (alpha_t sigma_s / alpha_s) z.
Fresh noise on every step (one draw per step); history: the previous step's eps in one slot.
"""
from __future__ import annotations

import math
from typing import List

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, check_choice, check_order, eps_quantity, grid_point, history_terms, register, ring_write
from .dpm_solver import SOLVER_TYPES, multistep_order
from .exponential import check_finite_lambda, half_log_snr


@register("sde_dpmsolver")
class SDEDPMSolver(Solver):
    """SDE-DPM-Solver-1 / -2M in noise prediction (see the module docstring)."""

    stochastic = True

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False):
        self.solver_order = check_order(order, (1, 2))
        self.solver_type = check_choice(solver_type, SOLVER_TYPES, "solver_type")
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.num_slots = self.solver_order - 1

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, "sde_dpmsolver")
        N, S = grid.steps, self.num_slots
        P = [grid_point(grid, i) for i in range(N + 1)]
        lam = [half_log_snr(p) for p in P]
        rows = []
        for n in range(N):
            p, q = P[n], P[n + 1]
            k = multistep_order(n, N, self.solver_order, self.lower_order_final, self.euler_at_final, q.sigma == 0.0)
            a = q.alpha / p.alpha
            if q.sigma == 0.0:                                  # the limit h -> inf
                c0 = q.alpha * p.sigma / p.alpha
                b, std, coefs = -2.0 * c0, c0, [-2.0 * c0]
            else:
                h = lam[n + 1] - lam[n]
                em1 = math.expm1(h)
                b = -2.0 * q.sigma * em1
                std = q.sigma * math.sqrt(math.expm1(2.0 * h))
                coefs = [b]
                if k == 2:
                    r0 = (lam[n] - lam[n - 1]) / h
                    c1 = -q.sigma * em1 if self.solver_type == "midpoint" else -2.0 * q.sigma * (em1 / h - 1.0)
                    coefs = [b + c1 / r0, -c1 / r0]
            h_coef, hist = history_terms(n, coefs, S) if S else (coefs[0], ())
            qy, qx0 = eps_quantity(p)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0, out_x=Out(x=a, h=h_coef, hist=hist, z=std),
                            hist_write=ring_write(n, N, S), noise_id=n if std else -1, next_eval="x"))
        return rows
