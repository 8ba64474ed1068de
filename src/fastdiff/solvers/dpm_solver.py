"""The DPM-Solver family (Lu et al. 2022a, 2022b) and k-diffusion's samplers built on it.

Exponential integrators, written with (alpha, sigma, lambda = log(alpha/sigma)), exact for the
linear part of the probability-flow ODE and valid for any schedule:

* ``dpm_solver``            DPM-Solver-1/2/3, singlestep, noise prediction (Lu et al. 2022a,
                            Algorithms 1 and 5; k-diffusion DPMSolver.dpm_solver_{1,2,3}_step)
* ``dpm_solver_multistep``  multistep DPM-Solver / DPM-Solver++ of order 1-3, optionally SDE
                            (diffusers DPMSolverMultistepScheduler; k-diffusion sample_dpmpp_2m,
                            sample_dpmpp_2m_sde and sample_dpmpp_3m_sde), with aliases ``dpmpp_2m``,
                            ``dpmpp_3m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde`` that differ only in their
                            default options
* ``dpmpp_2s`` / ``dpmpp_2s_ancestral``, ``dpmpp_sde``, ``dpm_2`` / ``dpm_2_ancestral``:
                            k-diffusion's sample_* functions of those names, in its coordinates
                            y = x/alpha, s = sigma/alpha (exact on VE; on VP the same up to
                            the alpha scaling k-diffusion's model wrappers apply)

Noise: every Gaussian draw of a program gets its own ``noise_id``, numbered in the order the
k-diffusion sampler calls its noise_sampler (0, 1, 2, ...).

A step that ends at sigma = 0 is first order (it returns alpha*x0): the higher-order terms
degenerate there. diffusers does the same (``final_sigmas_type="zero"`` forces the first-order
final step); ``final_sigmas_type`` itself is the grid's ``final`` ('zero' / 'sigma_min').
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import (Solver, ancestral_step, check_choice, check_eta, check_order, check_space, derivative_quantity,
                   eps_quantity, grid_point, history_terms, ode_scale, ode_s, point_at_s, register, ring_write)
from .edm import Churn
from .exponential import X0_QUANTITY, check_finite_lambda, ddim_data, ddim_eps, half_log_snr, point_at_lambda

# The exponential-integrator math has its home in .exponential and the history helpers theirs in
# .base; callers that import them from this module (adaptive, the diffusers drop-ins, ipndm) still can.
__all__ = ["DPMSolverSinglestep", "DPMSolverMultistep", "DPMSolverPP2M", "DPMSolverPP3M", "DPMSolverPP2MSDE",
           "DPMSolverPP3MSDE", "DPMSolverPP2S", "DPMSolverPP2SAncestral", "DPMSolverPPSDE", "DPM2", "DPM2Ancestral",
           "multistep_order", "X0_QUANTITY", "check_finite_lambda", "check_order", "ddim_data", "ddim_eps",
           "half_log_snr", "history_terms", "point_at_lambda", "ring_write"]


# ---------------------------------------------------------------------------------------------
# DPM-Solver, singlestep, noise prediction


@register("dpm_solver")
class DPMSolverSinglestep(Solver):
    """DPM-Solver-k (Lu et al. 2022a), singlestep, on the noise prediction: each step of order k
    evaluates the model k times, at lambda_s + r_i h with r = (1/2) for k = 2 and (1/3, 2/3) for
    k = 3 (k-diffusion's dpm_solver_{1,2,3}_step). order=1 is DDIM.

    ``orders``: one order per step (as many as the grid has steps; overrides ``order``), for
    DPM-Solver-fast, which mixes orders to fit a budget of model calls (k-diffusion
    sample_dpm_fast). ``eta > 0``: ancestral steps in the noise levels sigma/alpha, as k-diffusion's
    dpm_solver_fast takes them: step n goes down to max(sigma_down, the grid's last level)
    (get_ancestral_step(s_n, s_{n+1}, eta)), then fresh noise of std
    sqrt(s_{n+1}^2 - that^2) * s_noise brings it to s_{n+1}."""

    num_slots = 1

    def __init__(self, order: int = 3, orders: Optional[Sequence[int]] = None, eta: float = 0.0,
                 s_noise: float = 1.0):
        self.order = check_order(order, (1, 2, 3))
        self.orders = None
        if orders is not None:
            if isinstance(orders, (str, bytes)) or not hasattr(orders, "__len__") or len(orders) == 0:
                raise ValueError(f"orders must be a non-empty sequence of step orders (1, 2 or 3), got {orders!r}")
            self.orders = tuple(check_order(k, (1, 2, 3), "each of orders") for k in orders)
            self.order = min(self.orders)
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        if self.stochastic:
            self.order = 1

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, "dpm_solver")
        if self.orders is not None and len(self.orders) != grid.steps:
            raise ValueError(f"orders has {len(self.orders)} entries but the grid has {grid.steps} steps")
        noise_ids = itertools.count()
        rows: List[Row] = []
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            k = self.orders[n] if self.orders is not None else self.order
            target, std = (q, 0.0) if not self.eta else self._ancestral_target(grid, n)
            step_rows = self._step_rows(grid, n, p, target, k)
            if std:   # x_{n+1} = alpha_{n+1} (x_target / alpha_target + std * s_noise * z)
                c, z = q.alpha / target.alpha, q.alpha * std * self.s_noise
                last = step_rows[-1]
                out = last.out_x
                step_rows[-1] = dataclasses.replace(
                    last, out_x=Out(x=c * out.x, y=c * out.y, h=c * out.h, z=z,
                                    hist=tuple((j, c * b) for j, b in out.hist)),
                    noise_id=next(noise_ids) if z else -1)
            rows.extend(step_rows)
        return rows

    def _ancestral_target(self, grid: Grid, n: int) -> Tuple[Point, float]:
        """(the point step n's deterministic part ends at, the std of the noise that follows)."""
        s, s_next, s_end = (float(grid.ksigma[i]) for i in (n, n + 1, grid.steps))
        s_down = max(ancestral_step(s, s_next, self.eta)[0], s_end)
        if s_down == s_next:
            return grid_point(grid, n + 1), 0.0
        target = grid_point(grid, grid.steps) if s_down == s_end else point_at_s(grid, "ve", s_down)
        return target, math.sqrt(s_next * s_next - s_down * s_down)

    @staticmethod
    def _step_rows(grid: Grid, n: int, p: Point, q: Point, order: int) -> List[Row]:
        """One DPM-Solver-``order`` step from p to q (first order when q is clean)."""
        a, b = ddim_eps(p, q)
        eps_p = eps_quantity(p)
        if order == 1 or q.sigma == 0.0:
            return [Row(step=n, eval_at="x", point=p, q_y=eps_p[0], q_x0=eps_p[1],
                        out_x=Out(x=a, h=b), next_eval="x")]
        lam_s = half_log_snr(p)
        h = half_log_snr(q) - lam_s
        em1 = math.expm1(h)
        if order == 2:
            r1 = 0.5
            p1 = point_at_lambda(grid, lam_s + r1 * h)
            # x_t = a x - sigma_t (e^h - 1) eps - sigma_t/(2 r1) (e^h - 1) (eps_1 - eps)
            c = q.sigma * em1 / (2.0 * r1)
            e1 = eps_quantity(p1)
            return [Row(step=n, eval_at="x", point=p, q_y=eps_p[0], q_x0=eps_p[1], hist_write=0,
                        out_y=Out(x=p1.alpha / p.alpha, h=-p1.sigma * math.expm1(r1 * h)), next_eval="y"),
                    Row(step=n, eval_at="y", point=p1, q_y=e1[0], q_x0=e1[1],
                        out_x=Out(x=a, h=-c, hist=((0, -q.sigma * em1 + c),)), next_eval="x")]
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        p1, p2 = point_at_lambda(grid, lam_s + r1 * h), point_at_lambda(grid, lam_s + r2 * h)
        # u2 = a2 x - sigma_2 (e^{r2 h} - 1) eps - sigma_2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) (eps_1 - eps)
        c2 = p2.sigma * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0)
        e1 = eps_quantity(p1)
        # x_t = a x - sigma_t (e^h - 1) eps - sigma_t / r2 ((e^h - 1)/h - 1) (eps_2 - eps)
        c3 = q.sigma / r2 * (em1 / h - 1.0)
        e2 = eps_quantity(p2)
        return [Row(step=n, eval_at="x", point=p, q_y=eps_p[0], q_x0=eps_p[1], hist_write=0,
                    out_y=Out(x=p1.alpha / p.alpha, h=-p1.sigma * math.expm1(r1 * h)), next_eval="y"),
                Row(step=n, eval_at="y", point=p1, q_y=e1[0], q_x0=e1[1],
                    out_y=Out(x=p2.alpha / p.alpha, h=-c2, hist=((0, -p2.sigma * math.expm1(r2 * h) + c2),)),
                    next_eval="y"),
                Row(step=n, eval_at="y", point=p2, q_y=e2[0], q_x0=e2[1],
                    out_x=Out(x=a, h=-c3, hist=((0, -q.sigma * em1 + c3),)), next_eval="x")]


# ---------------------------------------------------------------------------------------------
# Multistep DPM-Solver / DPM-Solver++ (ODE and SDE)

ALGORITHMS = ("dpmsolver", "dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
THIRD_ORDER_FORMULAS = ("diffusers", "taylor")


def multistep_order(n: int, steps: int, order: int, lower_order_final: bool, euler_at_final: bool,
                    ends_clean: bool) -> int:
    """diffusers' choice of the order of step n: warm-up (order <= n + 1), and the last steps
    lowered for stability (``lower_order_final`` with fewer than 15 steps, ``euler_at_final``, or
    a last step that ends at sigma = 0)."""
    short = lower_order_final and steps < 15
    if n == steps - 1 and (euler_at_final or short or ends_clean):
        return 1
    if n == steps - 2 and short:
        return min(order, n + 1, 2)
    return min(order, n + 1)


@register("dpm_solver_multistep")
class DPMSolverMultistep(Solver):
    """Multistep DPM-Solver (``algorithm_type='dpmsolver'``, noise prediction) and DPM-Solver++
    (``'dpmsolver++'``, data prediction) of order 1-3, as diffusers' DPMSolverMultistepScheduler.

    ``solver_type`` ('midpoint' / 'heun') picks the second-order formula (diffusers' option; at
    order 3 it only affects the warm-up step). ``eta > 0`` (data prediction only) makes it
    SDE-DPM-Solver++ as k-diffusion's sample_dpmpp_2m_sde / sample_dpmpp_3m_sde: the linear part
    decays by e^{-eta h} more and fresh noise of std sigma_t sqrt(1 - e^{-2 eta h}) s_noise is
    added; eta = 1 is diffusers' 'sde-dpmsolver++'. ``lower_order_final`` and ``euler_at_final``
    are diffusers' options (see multistep_order).

    ``third_order``: the formula of the order-3 steps. 'diffusers' is the one diffusers,
    k-diffusion (sample_dpmpp_3m_sde) and the DPM-Solver reference code use; its D2 term carries
    phi_3 where the Taylor expansion of the exponential integrator needs 2 phi_3 (D2 = (D1_0 -
    D1_1)/(r0 + r1) estimates h^2 x0''/2, not h^2 x0''), so it is not exact for a quadratic x0(lambda)
    and converges with order 2 (a smaller error constant than 2M). 'taylor' uses 2 phi_3: order 3."""

    def __init__(self, order: int = 2, algorithm_type: str = "dpmsolver", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, eta: float = 0.0,
                 s_noise: float = 1.0, third_order: str = "diffusers"):
        self.solver_order = check_order(order, (1, 2, 3))
        self.algorithm_type = check_choice(algorithm_type, ALGORITHMS, "algorithm_type")
        self.solver_type = check_choice(solver_type, SOLVER_TYPES, "solver_type")
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.third_order = check_choice(third_order, THIRD_ORDER_FORMULAS, "third_order")
        if self.eta and self.algorithm_type != "dpmsolver++":
            raise ValueError(f"eta > 0 (SDE-DPM-Solver++) needs algorithm_type='dpmsolver++', got "
                             f"{self.algorithm_type!r}")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else (2 if self.solver_order == 3 and self.third_order == "diffusers"
                                                 else self.solver_order)
        self.num_slots = self.solver_order - 1

    def _coefficients(self, k: int, h: float, r0: float, r1: float, p: Point, q: Point) -> Tuple[float, np.ndarray, float]:
        """(x coefficient, coefficients of m_n, m_{n-1}, m_{n-2}, noise std) of one step."""
        m = np.zeros(3)
        if self.algorithm_type == "dpmsolver++":
            a, m[0], std = ddim_data(p, q, self.eta)
            if k == 1:
                return a, m, std
            he = h * (1.0 + self.eta)
            phi_1 = -math.expm1(-he)                          # 1 - e^{-h_eta}
            phi_2 = math.expm1(-he) / he + 1.0
            c1, c2 = (q.alpha * 0.5 * phi_1 if self.solver_type == "midpoint" else q.alpha * phi_2), 0.0
            if k == 3:
                c1, c2 = q.alpha * phi_2, -q.alpha * (phi_2 / he - 0.5) * self._d2_factor
        else:
            a, m[0] = ddim_eps(p, q)
            std = 0.0
            if k == 1:
                return a, m, std
            em1 = math.expm1(h)
            c1 = -0.5 * q.sigma * em1 if self.solver_type == "midpoint" else -q.sigma * (em1 / h - 1.0)
            c2 = 0.0
            if k == 3:
                c1, c2 = -q.sigma * (em1 / h - 1.0), -q.sigma * ((em1 - h) / h ** 2 - 0.5) * self._d2_factor
        # D1 (and D2) as combinations of (m_n, m_{n-1}, m_{n-2}), as diffusers writes them.
        if k == 2:
            D1 = np.array([1.0, -1.0, 0.0]) / r0
            D2 = np.zeros(3)
        else:
            D1_0 = np.array([1.0, -1.0, 0.0]) / r0
            D1_1 = np.array([0.0, 1.0, -1.0]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
        return a, m + c1 * D1 + c2 * D2, std

    @property
    def _d2_factor(self) -> float:
        return 2.0 if self.third_order == "taylor" else 1.0

    def rows(self, grid: Grid) -> List[Row]:
        if self.algorithm_type == "dpmsolver":
            check_finite_lambda(grid, "dpm_solver_multistep with algorithm_type='dpmsolver'")
        lam = [half_log_snr(grid_point(grid, i)) for i in range(grid.steps + 1)]
        N, S = grid.steps, self.num_slots
        quantity = X0_QUANTITY if self.algorithm_type == "dpmsolver++" else None
        noise_ids = itertools.count()
        rows = []
        for n in range(N):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            k = multistep_order(n, N, self.solver_order, self.lower_order_final, self.euler_at_final,
                                q.sigma == 0.0)
            h = lam[n + 1] - lam[n]
            r0 = (lam[n] - lam[n - 1]) / h if k >= 2 else math.nan
            r1 = (lam[n - 1] - lam[n - 2]) / h if k >= 3 else math.nan
            a, coefs, std = self._coefficients(k, h, r0, r1, p, q)
            h_coef, hist = history_terms(n, coefs[:k], S)
            z = std * self.s_noise
            qy, qx0 = quantity or eps_quantity(p)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0,
                            out_x=Out(x=a, h=h_coef, hist=hist, z=z), hist_write=ring_write(n, N, S),
                            noise_id=next(noise_ids) if z else -1, next_eval="x"))
        return rows


@register("dpmpp_2m", "dpm_solver++_2m")
class DPMSolverPP2M(DPMSolverMultistep):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2; k-diffusion sample_dpmpp_2m): the multistep
    DPM-Solver++ of order 2 with the midpoint formula. The first step, and any step to sigma = 0,
    is first order; ``lower_order_final`` also makes the last step first order when steps < 15
    (diffusers' default; k-diffusion's is False)."""

    def __init__(self, lower_order_final: bool = False):
        super().__init__(order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                         lower_order_final=lower_order_final)


@register("dpmpp_3m")
class DPMSolverPP3M(DPMSolverMultistep):
    """DPM-Solver++(3M): diffusers DPMSolverMultistepScheduler(algorithm_type='dpmsolver++',
    solver_order=3) (equivalently k-diffusion sample_dpmpp_3m_sde with eta=0, solver_type='heun',
    lower_order_final=False)."""

    def __init__(self, solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 third_order: str = "diffusers"):
        super().__init__(order=3, algorithm_type="dpmsolver++", solver_type=solver_type,
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final, third_order=third_order)


@register("dpmpp_2m_sde")
class DPMSolverPP2MSDE(DPMSolverMultistep):
    """k-diffusion sample_dpmpp_2m_sde (eta, s_noise, solver_type 'midpoint' / 'heun'); with eta=1
    diffusers' algorithm_type='sde-dpmsolver++', solver_order=2 (with lower_order_final=True)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                 lower_order_final: bool = False, euler_at_final: bool = False):
        super().__init__(order=2, algorithm_type="dpmsolver++", solver_type=solver_type,
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final, eta=eta, s_noise=s_noise)


@register("dpmpp_3m_sde")
class DPMSolverPP3MSDE(DPMSolverMultistep):
    """k-diffusion sample_dpmpp_3m_sde (eta, s_noise); its warm-up second-order step is the 'heun'
    form."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, lower_order_final: bool = False,
                 euler_at_final: bool = False, third_order: str = "diffusers"):
        super().__init__(order=3, algorithm_type="dpmsolver++", solver_type="heun",
                         lower_order_final=lower_order_final, euler_at_final=euler_at_final, eta=eta, s_noise=s_noise,
                         third_order=third_order)


# ---------------------------------------------------------------------------------------------
# k-diffusion's singlestep samplers, in its coordinates y = x/alpha, s = sigma/alpha


def _ve_scale(p: Point) -> float:
    return ode_scale("ve", p.alpha, p.sigma)


def _check_ve(grid: Grid, name: str):
    if not np.all(np.isfinite(grid.ksigma[:-1])):
        raise ValueError(f"{name} works with the noise levels sigma/alpha and needs them finite at every evaluated "
                         "point; this grid starts at alpha = 0 (flow t = 1): pass t_max < 1 to make_grid")


@register("dpmpp_2s")
class DPMSolverPP2S(Solver):
    """DPM-Solver++(2S) (Lu et al. 2022b), singlestep, midpoint r = 1/2: k-diffusion
    sample_dpmpp_2s_ancestral with eta = 0. A step to sigma = 0 is an Euler (denoising) step."""

    order = 2
    eta = 0.0
    s_noise = 1.0

    def rows(self, grid: Grid) -> List[Row]:
        _check_ve(grid, self.name)
        noise_ids = itertools.count()
        rows: List[Row] = []
        for n in range(grid.steps):
            p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
            c0, c1 = _ve_scale(p0), _ve_scale(p1)
            s0, s1 = float(grid.ksigma[n]), float(grid.ksigma[n + 1])
            s_down, s_up = ancestral_step(s0, s1, self.eta)
            z = c1 * s_up * self.s_noise if s1 > 0 else 0.0
            noise_id = next(noise_ids) if z else -1
            if s_down == 0.0:  # Euler to s_down = 0: y' = x0
                qy, qx0 = derivative_quantity("ve", p0)
                rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                                out_x=Out(x=c1 / c0, h=c1 * (s_down - s0), z=z), noise_id=noise_id, next_eval="x"))
                continue
            t, t_next = -math.log(s0), -math.log(s_down)
            h = t_next - t
            s_mid = math.exp(-(t + 0.5 * h))
            pm = point_at_s(grid, "ve", s_mid)
            cm = _ve_scale(pm)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0,
                            out_y=Out(x=cm * (s_mid / s0) / c0, h=-cm * math.expm1(-0.5 * h)), next_eval="y"))
            rows.append(Row(step=n, eval_at="y", point=pm, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=c1 * (s_down / s0) / c0, h=-c1 * math.expm1(-h), z=z),
                            noise_id=noise_id, next_eval="x"))
        return rows


@register("dpmpp_2s_ancestral")
class DPMSolverPP2SAncestral(DPMSolverPP2S):
    """k-diffusion sample_dpmpp_2s_ancestral: DPM-Solver++(2S) down to sigma_down, then fresh noise
    of std sigma_up (get_ancestral_step(sigma, sigma_next, eta)) times s_noise."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 2


@register("dpmpp_sde")
class DPMSolverPPSDE(Solver):
    """k-diffusion sample_dpmpp_sde: a DPM-Solver++ singlestep with ancestral noise at both stages
    (intermediate point at lambda_s + r h). Its two draws per step have distinct noise_ids.

    ``brownian=True`` (default) couples them as k-diffusion's default BrownianTreeNoiseSampler (a
    Brownian motion in sigma) does: the second draw is the increment over [sigma_next, sigma], which
    contains the first one's over [sigma_mid, sigma]: z2 = a z1 + b z' with
    a = sqrt((sigma - sigma_mid) / (sigma - sigma_next)), a^2 + b^2 = 1 and z' fresh. The second row
    recovers z1 from what it reads (x2 = A x + B x0 + C z1 is its evaluation point, x0 its history
    slot), so the coupling needs no extra buffer. ``brownian=False``: independent draws (k-diffusion
    with noise_sampler=default_noise_sampler). The coupling matters: on the Gaussian mixture at 30
    steps the covariance error is ~0.01 with it and ~0.12 without (k-diffusion itself, both ways)."""

    num_slots = 1

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, brownian: bool = True):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.r = float(r)
        if not 0.0 < self.r <= 1.0:
            raise ValueError(f"r (where the intermediate stage sits, as a fraction of the step in lambda) must lie in "
                             f"(0, 1], got {r}")
        if not isinstance(brownian, bool):
            raise TypeError(f"brownian must be True or False, got {brownian!r}")
        self.brownian = brownian
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        _check_ve(grid, self.name)
        noise_ids = itertools.count()
        rows: List[Row] = []
        fac = 1.0 / (2.0 * self.r)
        for n in range(grid.steps):
            p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
            c0, c1 = _ve_scale(p0), _ve_scale(p1)
            s0, s1 = float(grid.ksigma[n]), float(grid.ksigma[n + 1])
            if s1 == 0.0:  # Euler (denoising) step
                qy, qx0 = derivative_quantity("ve", p0)
                rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                                out_x=Out(x=c1 / c0, h=-c1 * s0), next_eval="x"))
                continue
            t, t_next = -math.log(s0), -math.log(s1)
            h = t_next - t
            s_mid = math.exp(-(t + h * self.r))
            pm = point_at_s(grid, "ve", s_mid)
            cm = _ve_scale(pm)
            # Stage 1: ancestral DPM-Solver++(1) to the intermediate point: x2 = A x + B x0 + C z1.
            sd, su = ancestral_step(s0, s_mid, self.eta)
            A, B, C = cm * (sd / s0) / c0, -cm * math.expm1(_neg_log_ratio(sd, s0)), cm * su * self.s_noise
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, hist_write=0,
                            out_y=Out(x=A, h=B, z=C), noise_id=next(noise_ids) if C else -1, next_eval="y"))
            # Stage 2: from x with the mix (1 - fac) x0 + fac x0_2, then noise Z z2.
            sd, su = ancestral_step(s0, s1, self.eta)
            Z = c1 * su * self.s_noise
            e = -c1 * math.expm1(_neg_log_ratio(sd, s0))
            x_coef, y_coef, slot0, z_coef = c1 * (sd / s0) / c0, 0.0, e * (1.0 - fac), Z
            if self.brownian and C and Z:   # Z z2 = Z a (E - A x - B H0) / C + Z b z'
                a = math.sqrt((s0 - s_mid) / (s0 - s1))
                b = math.sqrt((s_mid - s1) / (s0 - s1))
                k = Z * a / C
                x_coef, y_coef, slot0, z_coef = x_coef - k * A, k, slot0 - k * B, Z * b
            rows.append(Row(step=n, eval_at="y", point=pm, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=x_coef, y=y_coef, h=e * fac, hist=((0, slot0),), z=z_coef),
                            noise_id=next(noise_ids) if z_coef else -1, next_eval="x"))
        return rows


def _neg_log_ratio(s_to: float, s_from: float) -> float:
    """t_from - t_to with t = -log s (= log(s_to / s_from)); -inf for s_to = 0."""
    return -math.inf if s_to == 0.0 else math.log(s_to) - math.log(s_from)


@register("dpm_2")
class DPM2(Solver):
    """k-diffusion sample_dpm_2: a DPM-Solver-2-like midpoint step in the ODE coordinates (model at
    the geometric mean of the two noise levels), with EDM churn (s_churn, s_tmin, s_tmax, s_noise).
    The step to 0 is Euler."""

    num_slots = 0

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                 ode_space: str = "auto"):
        self.churn = Churn(float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        self.ode_space = ode_space
        self.stochastic = self.churn.active and self.churn.s_noise > 0
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        space = check_space(self.ode_space, grid)
        self.churn.check_space(space)
        noise_ids = itertools.count()
        rows: List[Row] = []
        for n in range(grid.steps):
            churn_row, p_hat, s_hat = self.churn.begin_step(grid, n, space, noise_ids)
            if churn_row is not None:
                rows.append(churn_row)
            p1 = grid_point(grid, n + 1)
            s1 = ode_s(space, p1.alpha, p1.sigma)
            rows.extend(_dpm_2_step(grid, n, space, p_hat, s_hat, p1, s1))
        return rows


def _dpm_2_step(grid: Grid, n: int, space: str, p0: Point, s0: float, p1: Point, s_target: float,
                z: float = 0.0, noise_id: int = -1) -> List[Row]:
    """DPM-2 from (p0, s0) to the noise level s_target <= s(p1), the state then scaled as at p1
    (an ancestral step fills the gap with the noise z)."""
    c0, c1 = ode_scale(space, p0.alpha, p0.sigma), ode_scale(space, p1.alpha, p1.sigma)
    qy, qx0 = derivative_quantity(space, p0)
    if s_target == 0.0:  # Euler
        return [Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                    out_x=Out(x=c1 / c0, h=c1 * (s_target - s0), z=z), noise_id=noise_id, next_eval="x")]
    log_s0 = math.log(s0)
    s_mid = math.exp(log_s0 + 0.5 * (math.log(s_target) - log_s0))   # torch.lerp(log s0, log s1, 0.5)
    pm = point_at_s(grid, space, s_mid)
    cm = ode_scale(space, pm.alpha, pm.sigma)
    qym, qx0m = derivative_quantity(space, pm)
    return [Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                out_y=Out(x=cm / c0, h=cm * (s_mid - s0)), next_eval="y"),
            Row(step=n, eval_at="y", point=pm, q_y=qym, q_x0=qx0m,
                out_x=Out(x=c1 / c0, h=c1 * (s_target - s0), z=z), noise_id=noise_id, next_eval="x")]


@register("dpm_2_ancestral")
class DPM2Ancestral(Solver):
    """k-diffusion sample_dpm_2_ancestral: DPM-2 down to sigma_down, then noise of std sigma_up
    (no noise when sigma_down = 0: that step is Euler, as in k-diffusion)."""

    num_slots = 0

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        _check_ve(grid, self.name)
        noise_ids = itertools.count()
        rows: List[Row] = []
        for n in range(grid.steps):
            p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
            s0, s1 = float(grid.ksigma[n]), float(grid.ksigma[n + 1])
            s_down, s_up = ancestral_step(s0, s1, self.eta)
            z = _ve_scale(p1) * s_up * self.s_noise if s_down > 0 else 0.0
            rows.extend(_dpm_2_step(grid, n, "ve", p0, s0, p1, s_down, z, next(noise_ids) if z else -1))
        return rows


# ---------------------------------------------------------------------------------------------
# Adaptive step size (fastdiff.adaptive): a step and its embedded lower-order solution


def dpm_solver_pair_rows(grid: Grid, order: int) -> List[Row]:
    """One step of DPM-Solver-``order`` over the 1-step ``grid`` (the registered ``dpm_solver``
    solver's rows: singlestep, noise prediction, r1 = 1/2 for order 2 and r1 = 1/3, r2 = 2/3
    for order 3), followed by one model-free row with the embedded lower-order solution from the
    same model evaluations (Lu et al. 2022, Algorithm 4): DPM-Solver-1 for order 2, DPM-Solver-2
    with r1 = 1/3 for order 3. With h = lambda_t - lambda_s, in native coordinates:

        x_1 = (a_t/a_s) x - s_t (e^h - 1) eps
        x_2 = x_1 - s_t/(2 r1) (e^h - 1) (eps_1 - eps)

    eps is kept in history slot 0 by the solver's first row; for order 3 the second row also
    keeps eps_1 in slot 1 (2 slots). The last row writes its result into x as the solver's last
    row does: run it on a copy of the starting state."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    if grid.steps != 1:
        raise ValueError(f"dpm_solver_pair_rows takes a 1-step grid, got {grid.steps} steps")
    rows = DPMSolverSinglestep(order).rows(grid)
    ps, pt = grid_point(grid, 0), grid_point(grid, 1)
    h = half_log_snr(pt) - half_log_snr(ps)
    x_coef, eps_coef = ddim_eps(ps, pt)                    # x_1 = x_coef x + eps_coef eps
    if order == 2:
        low = Out(x=x_coef, hist=((0, eps_coef),))
    else:
        rows[1] = dataclasses.replace(rows[1], hist_write=1)
        b = pt.sigma * math.expm1(h) / (2.0 * (1.0 / 3.0))
        low = Out(x=x_coef, hist=((0, eps_coef + b), (1, -b)))
    return rows + [Row(step=rows[-1].step, out_x=low)]
