"""ComfyUI's samplers (``comfy/k_diffusion/sampling.py``, ``deis.py``; ComfyUI's KSAMPLER_NAMES) that
k-diffusion 0.1.1 does not have, as coefficient programs.

Coordinates. ComfyUI writes most of them in k-diffusion's noise levels s = sigma/alpha on the state
y = x/alpha (``to_d``, ``t = -log s``); here they run in those coordinates ("ve", c = alpha), so on a
k-diffusion grid (alpha = 1) the rows are ComfyUI's formulas as written and on any other schedule they
are the same method in y. The exponential samplers that ComfyUI writes with (alpha, sigma,
half-logSNR) -- SEEDS, exp_heun_2_x0, ER-SDE -- use the grid's own alpha, sigma and
lambda = log(alpha/sigma) (for a flow model that is ComfyUI's logit form of the half-logSNR).

* ``res_multistep`` / ``res_multistep_ancestral``  RES second-order multistep exponential integrator
  (Zhang et al. 2023, arXiv 2308.02157) in ComfyUI's form: phi_1/phi_2 weights on the current and
  previous denoised, ancestral noise (eta) on top; first step and steps to sigma_down = 0 are Euler.
* ``dpmpp_2m_sde_heun``  dpmpp_2m_sde with solver_type='heun' (ComfyUI's alias).
* ``ipndm_v``  iPNDM with variable-step Adams-Bashforth weights (zju-pi diff-sampler, ComfyUI).
* ``deis_comfy``  ComfyUI's DEIS (zju-pi): 'tab' interpolates d in the time tau of a fixed VP SDE
  (sigma_min 0.002, sigma_max 80, eps_s 1e-3) and integrates over sigma; 'rhoab' interpolates in sigma
  (Adams-Bashforth in sigma, k-diffusion's LMS). Integrals in float64 quadrature (ComfyUI: a float32
  10000-point sum).
* ``gradient_estimation``  Permenter & Yuan (ICML 2024): Euler with d + (gamma - 1)(d - d_prev).
* ``heunpp2``  Heun++ (sd-webui-samplers-scheduler via ComfyUI): up to three stages per step, the
  derivatives weighted by sigma / (k sigma_0).
* ``seeds_2`` / ``seeds_3``  SEEDS (Gonzalez et al. 2023, arXiv 2305.14267), data prediction, noise
  at every stage (eta); ``exp_heun_2_x0`` / ``exp_heun_2_x0_sde``: seeds_2 with r = 1, 'phi_2'.
* ``er_sde``  ER-SDE-Solver-3 (Cui et al. 2023, arXiv 2309.06169) with its noise scaler and ComfyUI's
  200-point Riemann sums; types 'ER-SDE', 'Reverse-time SDE' (scaler x^(eta+1)), 'ODE'.
* (``lcm`` is fastdiff.solvers.consistency's, with timestep_scaling=None: ComfyUI's sample_lcm on
  sigmas that end at 0.)
* ``sa_solver`` / ``sa_solver_pece``  SA-Solver (Xue et al. 2023, arXiv 2309.05019), data prediction:
  stochastic Adams predictor and corrector in lambda with noise tau(sigma) inside a window; the
  model at the predicted point (PECE: again at the corrected one). The corrector re-adds the
  predictor's draw, recovered from the predicted point, so each step draws once.
* ``uni_pc`` / ``uni_pc_bh2``  ComfyUI's UniPC (order 3, data prediction, lower order at the end,
  B(h) 'bh1' / 'bh2'): fastdiff's ``unipc`` with those options (ComfyUI also moves a final sigma = 0
  to 0.001, which is the grid's business: see fastdiff.integrations.comfy_samplers).

Where a stage adds noise that a later stage scales again (SEEDS), the later row recovers the earlier
draw from what it reads (its evaluation point minus that point's deterministic part), so each row
still makes one fresh draw; SEEDS makes 2 (seeds_2) or 3 (seeds_3) draws per step with eta > 0.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, List, Optional

from ..program import Out, Row
from ..schedules import Grid
from .base import (Solver, ancestral_step, check_choice, check_eta, check_order, check_space, derivative_quantity,
                   grid_point, history_terms, ode_scale, register, ring_write)
from .dpm_solver import DPMSolverPP2MSDE
from .exponential import X0_QUANTITY, check_finite_lambda, ddim_data, half_log_snr, point_at_lambda
from .multistep import UniPC, lms_coefficients


def _ve_geometry(grid: Grid):
    """Grid points, c = alpha and s = sigma/alpha of every grid point (ve coordinates)."""
    points = [grid_point(grid, i) for i in range(grid.steps + 1)]
    c = [ode_scale("ve", p.alpha, p.sigma) for p in points]
    s = [float(grid.ksigma[i]) for i in range(grid.steps + 1)]
    return points, c, s


def _denoise_row(n: int, p, c0: float, s0: float, c1: float, **kw) -> Row:
    """The step to s = 0 (ComfyUI: x = denoised), written with the derivative d: y - s0 d = x0."""
    qy, qx0 = derivative_quantity("ve", p)
    return Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0, out_x=Out(x=c1 / c0, h=-c1 * s0), next_eval="x", **kw)


def _check_r(value, name: str) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} (where the intermediate stage sits, as a fraction of the step in lambda) must lie in "
                         f"(0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# RES multistep


@register("res_multistep")
class ResMultistep(Solver):
    """ComfyUI res_multistep (eta = 0) / res_multistep_ancestral: with t = -log s, h = t(s_down) - t(s),
    c2 = (t(s_prev) - t(s_down_prev)) / h,

        y' = e^{-h} y + h (b1 x0 + b2 x0_prev),  b1 = phi1(-h) - phi2(-h)/c2,  b2 = phi2(-h)/c2,

    then noise of std s_up * s_noise (get_ancestral_step(s, s_next, eta)). Order 2 without noise."""

    num_slots = 1

    def __init__(self, eta: float = 0.0, s_noise: float = 1.0):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        check_space("ve", grid)
        points, c, s = _ve_geometry(grid)
        N = grid.steps
        noise_ids = itertools.count()
        rows, sd_prev = [], None
        for n in range(N):
            p0 = points[n]
            sd, su = ancestral_step(s[n], s[n + 1], self.eta)
            k = c[n + 1] / c[n]
            if sd == 0.0 or n == 0:       # Euler to s_down: y' = (sd/s) y + (1 - sd/s) x0
                out = Out(x=k * sd / s[n], h=c[n + 1] * (1.0 - sd / s[n]))
            else:
                h = math.log(s[n]) - math.log(sd)
                c2 = (math.log(sd_prev) - math.log(s[n - 1])) / h
                phi1 = math.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1, b2 = phi1 - phi2 / c2, phi2 / c2
                h_coef, hist = history_terms(n, [c[n + 1] * h * b1, c[n + 1] * h * b2], 1)
                out = Out(x=k * math.exp(-h), h=h_coef, hist=hist)
            z = c[n + 1] * su * self.s_noise if s[n + 1] > 0 else 0.0
            out = Out(x=out.x, h=out.h, hist=out.hist, z=z)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1], out_x=out,
                            hist_write=ring_write(n, N, 1), noise_id=next(noise_ids) if z else -1, next_eval="x"))
            sd_prev = sd
        return rows


@register("res_multistep_ancestral")
class ResMultistepAncestral(ResMultistep):
    """ComfyUI res_multistep_ancestral: res_multistep with eta = 1 by default."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        super().__init__(eta=eta, s_noise=s_noise)


# ---------------------------------------------------------------------------------------------
# dpmpp_2m_sde_heun


@register("dpmpp_2m_sde_heun")
class DPMSolverPP2MSDEHeun(DPMSolverPP2MSDE):
    """ComfyUI sample_dpmpp_2m_sde_heun: dpmpp_2m_sde with solver_type='heun' (an alias)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "heun",
                 lower_order_final: bool = False, euler_at_final: bool = False):
        super().__init__(eta=eta, s_noise=s_noise, solver_type=solver_type, lower_order_final=lower_order_final,
                         euler_at_final=euler_at_final)


# ---------------------------------------------------------------------------------------------
# Linear multistep on d in the ve coordinates: iPNDM-v, DEIS (ComfyUI), gradient estimation


def ipndm_v_weights(s: List[float], n: int, order: int) -> List[float]:
    """iPNDM-v's weights of d_n, d_{n-1}, ... (times s_{n+1} - s_n) for the step n of ``order``."""
    h = s[n + 1] - s[n]
    if order == 1:
        return [1.0]
    h1 = s[n] - s[n - 1]
    if order == 2:
        return [(2.0 + h / h1) / 2.0, -(h / h1) / 2.0]
    h2 = s[n - 1] - s[n - 2]
    t1 = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0
    if order == 3:
        return [(2.0 + h / h1) / 2.0 + t1, -(h / h1) / 2.0 - (1.0 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = s[n - 2] - s[n - 3]
    t2 = ((1.0 - h / (3.0 * (h + h1))) / 2.0 + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    r = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2.0 + h / h1) / 2.0 + t1 + t2,
            -(h / h1) / 2.0 - (1.0 + h1 / h2) * t1 - (1.0 + h1 / h2 + r) * t2,
            t1 * h1 / h2 + (h1 / h2 + r * (1.0 + h2 / h3)) * t2,
            -t2 * r * h1 / h2]      # ComfyUI's last factor is h1/h2 (as written there)


class _DerivativeMultistep(Solver):
    """y_{n+1} = y_n + sum_j w_j d_{n-j} in the ve coordinates; a step to s = 0 returns x0."""

    def _weights(self, s: List[float], n: int) -> List[float]:
        raise NotImplementedError

    def rows(self, grid: Grid) -> List[Row]:
        check_space("ve", grid)
        points, c, s = _ve_geometry(grid)
        N, S = grid.steps, self.num_slots
        self._prepare(s)
        rows = []
        for n in range(N):
            p0 = points[n]
            if s[n + 1] == 0.0:
                rows.append(_denoise_row(n, p0, c[n], s[n], c[n + 1], hist_write=ring_write(n, N, S)))
                continue
            h_coef, hist = history_terms(n, [c[n + 1] * w for w in self._weights(s, n)], S)
            qy, qx0 = derivative_quantity("ve", p0)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                            out_x=Out(x=c[n + 1] / c[n], h=h_coef, hist=hist), hist_write=ring_write(n, N, S),
                            next_eval="x"))
        return rows

    def _prepare(self, s: List[float]) -> None:
        pass


@register("ipndm_v")
class IPNDMV(_DerivativeMultistep):
    """ComfyUI sample_ipndm_v: iPNDM whose Adams-Bashforth weights follow the step sizes (orders
    min(max_order, n + 1)); a step to sigma = 0 returns x0."""

    def __init__(self, max_order: int = 4):
        self.max_order = check_order(max_order, (1, 2, 3, 4), "max_order")
        # max_order 4: ComfyUI's fourth weight ends in h_{n-1}/h_{n-2} where the weights summing to 1 on
        # uneven steps needs h_{n-2}/h_{n-3}; the inconsistency is O(step ratio - 1), so the method is
        # first order on a grid whose steps vary (measured: tests/test_comfy_samplers.py).
        self.order = 1 if self.max_order == 4 else self.max_order
        self.num_slots = self.max_order - 1

    def _weights(self, s, n):
        k = min(self.max_order, n + 1)
        return [(s[n + 1] - s[n]) * w for w in ipndm_v_weights(s, n, k)]


# DEIS 'tab': the VP SDE zju-pi's edm2t maps the EDM noise levels onto (fixed constants).
DEIS_VP_EPS_S, DEIS_VP_SIGMA_MIN, DEIS_VP_SIGMA_MAX = 1e-3, 0.002, 80.0


def deis_vp_constants():
    """(beta_d, beta_min) of edm2t's VP SDE: sigma(tau)^2 = exp(beta_d tau^2 / 2 + beta_min tau) - 1."""
    lo, hi, e = math.log1p(DEIS_VP_SIGMA_MIN ** 2), math.log1p(DEIS_VP_SIGMA_MAX ** 2), DEIS_VP_EPS_S
    beta_d = 2.0 * (lo / e - hi) / (e - 1.0)
    return beta_d, hi - 0.5 * beta_d


def deis_tau(sigma: float) -> float:
    """edm2t: the VP time tau of the noise level sigma."""
    beta_d, beta_min = deis_vp_constants()
    return (math.sqrt(beta_min ** 2 + 2.0 * beta_d * math.log1p(sigma * sigma)) - beta_min) / beta_d


def deis_tab_coefficients(taus: List[float], n: int, order: int) -> List[float]:
    """w_j = integral over tau in [tau_n, tau_{n+1}] of L_j(tau) dsigma/dtau, L_j the Lagrange basis on
    tau_n, tau_{n-1}, ... (zju-pi's ``cal_intergrand`` is dsigma/dtau = -1/2 dlog(alpha)/dtau /
    sqrt(alpha (1 - alpha)))."""
    from scipy import integrate

    beta_d, beta_min = deis_vp_constants()

    def dsigma_dtau(tau):
        e = math.exp(0.5 * beta_d * tau * tau + beta_min * tau)
        return (beta_d * tau + beta_min) * e / (2.0 * math.sqrt(e - 1.0))

    nodes = [taus[n - j] for j in range(order)]

    def basis(j):
        def f(tau):
            prod = 1.0
            for k, node in enumerate(nodes):
                if k != j:
                    prod *= (tau - node) / (nodes[j] - node)
            return prod * dsigma_dtau(tau)
        return f

    return [integrate.quad(basis(j), taus[n], taus[n + 1], epsabs=0.0, epsrel=1e-13, limit=200)[0]
            for j in range(order)]


@register("deis_comfy")
class DEISComfy(_DerivativeMultistep):
    """ComfyUI sample_deis (zju-pi diff-sampler's DEIS), orders min(max_order, n + 1), Euler on a step to
    sigma = 0 (which returns x0). ``deis_mode='tab'``: d interpolated in the time tau of edm2t's fixed
    VP SDE, integrated over sigma; ``'rhoab'``: d interpolated in sigma (Adams-Bashforth in sigma, as
    k-diffusion's LMS). ComfyUI's 'rhoab' table holds one node more than its sampler unpacks from step
    n = max_order on (ComfyUI raises there); here every step uses min(max_order, n + 1) nodes, the
    table ComfyUI uses on the steps it runs."""

    def __init__(self, max_order: int = 3, deis_mode: str = "tab"):
        self.max_order = check_order(max_order, (1, 2, 3, 4), "max_order")
        self.deis_mode = check_choice(deis_mode, ("tab", "rhoab"), "deis_mode")
        self.order = self.max_order
        self.num_slots = self.max_order - 1

    def _prepare(self, s):
        self._taus = [deis_tau(v) for v in s] if self.deis_mode == "tab" else None

    def _weights(self, s, n):
        k = min(self.max_order, n + 1)
        if k == 1:
            return [s[n + 1] - s[n]]
        if self.deis_mode == "tab":
            return deis_tab_coefficients(self._taus, n, k)
        return lms_coefficients(s, n, k)


@register("gradient_estimation")
class GradientEstimation(_DerivativeMultistep):
    """ComfyUI sample_gradient_estimation (Permenter & Yuan 2024): y' = y + (s' - s)(d + (gamma - 1)(d - d_prev))
    (d alone on the first step); a step to sigma = 0 returns x0."""

    num_slots = 1

    def __init__(self, ge_gamma: float = 2.0):
        self.ge_gamma = float(ge_gamma)
        if not math.isfinite(self.ge_gamma):
            raise ValueError(f"ge_gamma must be a finite number, got {ge_gamma}")
        self.order = 1      # an Euler step plus a multiple of the last change of d (measured)

    def _weights(self, s, n):
        dt = s[n + 1] - s[n]
        return [dt] if n == 0 else [dt * self.ge_gamma, dt * (1.0 - self.ge_gamma)]


# ---------------------------------------------------------------------------------------------
# Heun++


@register("heunpp2")
class HeunPP2(Solver):
    """ComfyUI sample_heunpp2, with EDM churn (s_churn, s_tmin, s_tmax, s_noise: a row of noise to s_hat
    before the step, as edm_heun / dpm_2): with s_end the grid's last level and s_0 its first,
    a step ending at s_end is Euler; one ending the step before is Heun with weights
    (1 - w2, w2), w2 = s_{n+1} / (2 s_0); any other step evaluates also at s_{n+1} (x_2 = y + d dt)
    and s_{n+2} (x_3 = x_2 + d_2 dt_2) and takes d' = w1 d + w2 d_2 + w3 d_3,
    w2 = s_{n+1}/(3 s_0), w3 = s_{n+2}/(3 s_0)."""

    num_slots = 2
    order = 1

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
        from .edm import Churn
        self.churn = Churn(float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        self.stochastic = self.churn.active and self.churn.s_noise > 0

    def rows(self, grid: Grid) -> List[Row]:
        check_space("ve", grid)
        points, c, s = _ve_geometry(grid)
        N, s_end = grid.steps, s[-1]
        noise_ids = itertools.count()
        rows = []
        for n in range(N):
            churn_row, p0, s_hat = self.churn.begin_step(grid, n, "ve", noise_ids)   # EDM churn to s_hat
            if churn_row is not None:
                rows.append(churn_row)
            c0 = ode_scale("ve", p0.alpha, p0.sigma)
            dt = s[n + 1] - s_hat
            qy, qx0 = derivative_quantity("ve", p0)
            if s[n + 1] == s_end:            # Euler
                rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                                out_x=Out(x=c[n + 1] / c0, h=c[n + 1] * dt), next_eval="x"))
                continue
            p1 = points[n + 1]
            qy1, qx01 = derivative_quantity("ve", p1)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0, hist_write=0,
                            out_y=Out(x=c[n + 1] / c0, h=c[n + 1] * dt), next_eval="y"))
            if s[n + 2] == s_end:            # Heun
                w2 = s[n + 1] / (2.0 * s[0])
                rows.append(Row(step=n, eval_at="y", point=p1, q_y=qy1, q_x0=qx01,
                                out_x=Out(x=c[n + 1] / c0, h=c[n + 1] * dt * w2,
                                          hist=((0, c[n + 1] * dt * (1.0 - w2)),)), next_eval="x"))
                continue
            p2 = points[n + 2]             # Heun++
            dt2 = s[n + 2] - s[n + 1]
            qy2, qx02 = derivative_quantity("ve", p2)
            rows.append(Row(step=n, eval_at="y", point=p1, q_y=qy1, q_x0=qx01, hist_write=1,
                            out_y=Out(y=c[n + 2] / c[n + 1], h=c[n + 2] * dt2), next_eval="y"))
            w2, w3 = s[n + 1] / (3.0 * s[0]), s[n + 2] / (3.0 * s[0])
            w1 = 1.0 - w2 - w3
            rows.append(Row(step=n, eval_at="y", point=p2, q_y=qy2, q_x0=qx02,
                            out_x=Out(x=c[n + 1] / c0, h=c[n + 1] * dt * w3,
                                      hist=((0, c[n + 1] * dt * w1), (1, c[n + 1] * dt * w2))), next_eval="x"))
        return rows


# ---------------------------------------------------------------------------------------------
# SEEDS and the exponential Heun


def _ei_h_phi_1(h: float) -> float:
    return math.expm1(h)


def _ei_h_phi_2(h: float) -> float:
    return (math.expm1(h) - h) / h


class _Seeds(Solver):
    """Shared by SEEDS-2/-3: stage points at lambda_s + r h, data prediction, noise eta."""

    def _stage_point(self, grid: Grid, n: int, lam_s: float, h: float, r: float):
        if r == 1.0:
            return grid_point(grid, n + 1)
        return point_at_lambda(grid, lam_s + r * h)

    @staticmethod
    def _final_row(n, p, q) -> Row:
        return Row(step=n, eval_at="x", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                   out_x=Out(h=q.alpha), next_eval="x")


@register("seeds_2")
class Seeds2(_Seeds):
    """ComfyUI sample_seeds_2 (SEEDS-2, data prediction): with h = lambda_t - lambda_s, H = (1 + eta) h,
    stage 1 at lambda_s + r h: x_2 = (sigma_1/sigma_s) e^{-r h eta} x + alpha_1 (1 - e^{-r H}) x0 + noise;
    'phi_1': x' = (sigma_t/sigma_s) e^{-h eta} x + alpha_t (1 - e^{-H}) ((1 - 1/(2r)) x0 + x0_2/(2r));
    'phi_2': x' = ... - alpha_t (b1 x0 + b2 x0_2), b2 = phi_2-term(-H)/r, b1 = expm1(-H) - b2; noise
    of the stage carried on (times e^{(r - 1) h eta}) plus a fresh part. A step to sigma = 0 returns
    x0 (times alpha there)."""

    num_slots = 1

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, solver_type: str = "phi_1"):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.r = _check_r(r, "r")
        self.solver_type = check_choice(solver_type, ("phi_1", "phi_2"), "solver_type")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, self.name)
        noise_ids = itertools.count()
        rows: List[Row] = []
        r, eta = self.r, self.eta
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            if q.sigma == 0.0:
                rows.append(self._final_row(n, p, q))
                continue
            lam_s = half_log_snr(p)
            h = half_log_snr(q) - lam_s
            H = h * (eta + 1.0)
            p1 = self._stage_point(grid, n, lam_s, h, r)
            a1, b1, std1 = ddim_data(p, p1, eta)
            c1 = std1 * self.s_noise if self.stochastic else 0.0
            rows.append(Row(step=n, eval_at="x", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1], hist_write=0,
                            out_y=Out(x=a1, h=b1, z=c1), noise_id=next(noise_ids) if c1 else -1, next_eval="y"))
            a = q.sigma / p.sigma * math.exp(-h * eta)
            if self.solver_type == "phi_1":
                fac = 1.0 / (2.0 * r)
                coef = -q.alpha * math.expm1(-H)
                c_x0, c_x02 = coef * (1.0 - fac), coef * fac
            else:
                b2 = _ei_h_phi_2(-H) / r
                c_x0, c_x02 = -q.alpha * (_ei_h_phi_1(-H) - b2), -q.alpha * b2
            x_c, y_c, z = a, 0.0, 0.0
            if c1:   # the stage's noise N1 = E - a1 x - b1 x0, carried on; then a fresh draw
                sf = (r - 1.0) * h * eta
                K = q.sigma / p1.sigma * math.exp(sf)
                x_c, y_c, c_x0 = a - K * a1, K, c_x0 - K * b1
                z = q.sigma * self.s_noise * math.sqrt(-math.expm1(2.0 * sf))
            rows.append(Row(step=n, eval_at="y", point=p1, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                            out_x=Out(x=x_c, y=y_c, h=c_x02, hist=((0, c_x0),), z=z),
                            noise_id=next(noise_ids) if z else -1, next_eval="x"))
        return rows


@register("exp_heun_2_x0")
class ExpHeun2X0(Seeds2):
    """ComfyUI sample_exp_heun_2_x0: seeds_2 with eta = 0, r = 1 (stage at the step's end), 'phi_2'."""

    def __init__(self, solver_type: str = "phi_2"):
        super().__init__(eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


@register("exp_heun_2_x0_sde")
class ExpHeun2X0SDE(Seeds2):
    """ComfyUI sample_exp_heun_2_x0_sde: seeds_2 with r = 1, 'phi_2' and noise eta (one draw per step:
    with r = 1 the second draw has weight 0)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "phi_2"):
        super().__init__(eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)


@register("seeds_3")
class Seeds3(_Seeds):
    """ComfyUI sample_seeds_3 (SEEDS-3, data prediction): stages at lambda_s + r_1 h and lambda_s + r_2 h,
    x_3 from x0 and x0_2 with the phi_2 weights (r_2/r_1), the step from x0 and x0_3 (b3 = phi_2-term/r_2);
    noise as in seeds_2, carried from stage to stage."""

    num_slots = 2

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1.0 / 3, r_2: float = 2.0 / 3):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.r_1, self.r_2 = _check_r(r_1, "r_1"), _check_r(r_2, "r_2")
        if not self.r_1 < self.r_2:
            raise ValueError(f"r_1 must be smaller than r_2, got r_1={r_1}, r_2={r_2}")
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = 1 if self.stochastic else 3

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, self.name)
        noise_ids = itertools.count()
        rows: List[Row] = []
        r1, r2, eta = self.r_1, self.r_2, self.eta
        for n in range(grid.steps):
            p, q = grid_point(grid, n), grid_point(grid, n + 1)
            if q.sigma == 0.0:
                rows.append(self._final_row(n, p, q))
                continue
            lam_s = half_log_snr(p)
            h = half_log_snr(q) - lam_s
            H = h * (eta + 1.0)
            ps1, ps2 = self._stage_point(grid, n, lam_s, h, r1), self._stage_point(grid, n, lam_s, h, r2)
            # stage 1: x_2 = A2 x + B2 x0 + N2
            A2, B2, std2 = ddim_data(p, ps1, eta)
            N2 = std2 * self.s_noise if self.stochastic else 0.0
            rows.append(Row(step=n, eval_at="x", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1], hist_write=0,
                            out_y=Out(x=A2, h=B2, z=N2), noise_id=next(noise_ids) if N2 else -1, next_eval="y"))
            # stage 2: x_3 = A3 x + C31 x0 + C32 x0_2 + N3, N3 = K2 N2 + fresh
            a32 = r2 / r1 * _ei_h_phi_2(-r2 * H)
            a31 = _ei_h_phi_1(-r2 * H) - a32
            A3 = ps2.sigma / p.sigma * math.exp(-r2 * h * eta)
            C31, C32 = -ps2.alpha * a31, -ps2.alpha * a32
            x_c, y_c, h0_c, z3 = A3, 0.0, C31, 0.0
            if N2:
                sf = (r1 - r2) * h * eta
                K = ps2.sigma / ps1.sigma * math.exp(sf)
                x_c, y_c, h0_c = A3 - K * A2, K, C31 - K * B2
                z3 = ps2.sigma * self.s_noise * math.sqrt(-math.expm1(2.0 * sf))
            rows.append(Row(step=n, eval_at="y", point=ps1, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1], hist_write=1,
                            out_y=Out(x=x_c, y=y_c, h=C32, hist=((0, h0_c),), z=z3),
                            noise_id=next(noise_ids) if z3 else -1, next_eval="y"))
            # step: x' = a x + alpha_t (-(b1 x0 + b3 x0_3)) + K3 N3 + fresh, N3 = E - A3 x - C31 x0 - C32 x0_2
            b3 = _ei_h_phi_2(-H) / r2
            b1 = _ei_h_phi_1(-H) - b3
            a = q.sigma / p.sigma * math.exp(-h * eta)
            x_c, y_c, h0_c, h1_c, z = a, 0.0, -q.alpha * b1, 0.0, 0.0
            if N2:
                sf = (r2 - 1.0) * h * eta
                K = q.sigma / ps2.sigma * math.exp(sf)
                x_c, y_c, h0_c, h1_c = a - K * A3, K, h0_c - K * C31, -K * C32
                z = q.sigma * self.s_noise * math.sqrt(-math.expm1(2.0 * sf))
            rows.append(Row(step=n, eval_at="y", point=ps2, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                            out_x=Out(x=x_c, y=y_c, h=-q.alpha * b3, hist=((0, h0_c), (1, h1_c)), z=z),
                            noise_id=next(noise_ids) if z else -1, next_eval="x"))
        return rows


# ---------------------------------------------------------------------------------------------
# ER-SDE-Solver-3


def er_sde_default_noise_scaler(x: float) -> float:
    """ER-SDE-Solver's default noise scaler x (e^{x^0.3} + 10)."""
    return x * (math.exp(x ** 0.3) + 10.0)


ER_SDE_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")


@register("er_sde")
class ERSDE(Solver):
    """ComfyUI sample_er_sde with its SamplerER_SDE node's types: with l = sigma/alpha, f the noise scaler
    and r = f(l_t)/f(l_s),

        x' = (alpha_t/alpha_s) r x + alpha_t (1 - r) x0
             + alpha_t (dl + S f(l_t)) Dx0                                   (stage 2)
             + alpha_t (dl^2/2 + S_u f(l_t)) D2x0                            (stage 3)
             + alpha_t s_noise sqrt(l_t^2 - l_s^2 r^2) z,

    S and S_u the ``num_integration_points``-point left Riemann sums of 1/f and (l - l_s)/f over
    [l_t, l_s] (ComfyUI: 200 points; None: exact, by quadrature), Dx0, D2x0 the divided differences of x0 in l (stage
    min(max_stage, n + 1)). As ComfyUI's SamplerER_SDE node: 'ER-SDE' takes f = ``noise_scaler``, by default
    x (e^{x^0.3} + 10)^eta (= x^(1-eta) times the ER-SDE scaler to the eta), 'Reverse-time SDE'
    f = x^(eta + 1), 'ODE' (or eta = 0, any type) f = x without noise."""

    def __init__(self, solver_type: str = "ER-SDE", max_stage: int = 3, eta: float = 1.0, s_noise: float = 1.0,
                 noise_scaler: Optional[Callable[[float], float]] = None, num_integration_points: int = 200):
        self.solver_type = check_choice(solver_type, ER_SDE_TYPES, "solver_type")
        self.max_stage = check_order(max_stage, (1, 2, 3), "max_stage")
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        if noise_scaler is not None and not callable(noise_scaler):
            raise ValueError(f"noise_scaler must be a callable float -> float or None, got {noise_scaler!r}")
        if noise_scaler is not None and solver_type != "ER-SDE":
            raise ValueError("noise_scaler applies to solver_type='ER-SDE' only (the other types fix it)")
        self.noise_scaler = noise_scaler
        if num_integration_points is not None and (isinstance(num_integration_points, bool) or not isinstance(
                num_integration_points, int) or num_integration_points < 1):
            raise ValueError(f"num_integration_points must be an integer >= 1 or None (exact integrals), got "
                             f"{num_integration_points!r}")
        self.num_integration_points = num_integration_points
        if solver_type == "ODE" or self.eta == 0.0:       # ComfyUI's node: eta = 0 is the ODE, any type
            self._eta, self._s_noise = 0.0, 0.0
        else:
            self._eta, self._s_noise = self.eta, self.s_noise
        self.num_slots = self.max_stage - 1
        self.stochastic = self._s_noise > 0
        # Without noise: order min(max_stage, 2) -- the stage-3 term is third order but the first divided
        # difference Dx0 (backward, not centred) is a first-order estimate of dx0/dl (measured).
        self.order = 1 if self.stochastic else min(self.max_stage, 2)

    def scaler(self, x: float) -> float:
        if self.solver_type == "ODE" or self._eta == 0.0:
            return x
        if self.solver_type == "ER-SDE":
            if self.noise_scaler is not None:
                return self.noise_scaler(x)
            return x * (math.exp(x ** 0.3) + 10.0) ** self._eta      # x^(1-eta) (default scaler)^eta
        return x ** (self._eta + 1.0)

    def _integrals(self, f, lt: float, ls: float, stage: int):
        """(S, S_u): the integrals over [l_t, l_s] of 1/f and (l - l_s)/f; ComfyUI's left Riemann sums on
        ``num_integration_points`` points, or (None) adaptive quadrature."""
        P = self.num_integration_points
        if P is None:
            from scipy import integrate
            s2 = integrate.quad(lambda v: 1.0 / f(v), lt, ls, epsabs=0.0, epsrel=1e-13, limit=200)[0]
            su = integrate.quad(lambda v: (v - ls) / f(v), lt, ls, epsabs=0.0, epsrel=1e-13, limit=200)[0] \
                if stage >= 3 else 0.0
            return s2, su
        step = (ls - lt) / P
        pos = [lt + k * step for k in range(P)]
        fs = [f(v) for v in pos]
        return sum(1.0 / v for v in fs) * step, sum((v - ls) / fv for v, fv in zip(pos, fs)) * step

    def rows(self, grid: Grid) -> List[Row]:
        check_space("ve", grid)
        points, alpha, lam = _ve_geometry(grid)
        N, S = grid.steps, self.num_slots
        f = self.scaler
        noise_ids = itertools.count()
        rows = []
        for n in range(N):
            p = points[n]
            if lam[n + 1] == 0.0:
                rows.append(Row(step=n, eval_at="x", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                                out_x=Out(h=alpha[n + 1]), hist_write=ring_write(n, N, S), next_eval="x"))
                continue
            ls, lt, at = lam[n], lam[n + 1], alpha[n + 1]
            r = f(lt) / f(ls)
            coefs = [at * (1.0 - r), 0.0, 0.0]
            stage = min(self.max_stage, n + 1)
            if stage >= 2:
                dl = lt - ls
                s2, su = self._integrals(f, lt, ls, stage)
                c2 = at * (dl + s2 * f(lt)) / (ls - lam[n - 1])
                coefs[0] += c2
                coefs[1] -= c2
                if stage >= 3:
                    c3 = at * (dl * dl / 2.0 + su * f(lt)) / ((ls - lam[n - 2]) / 2.0)
                    d1, d0 = ls - lam[n - 1], lam[n - 1] - lam[n - 2]
                    coefs[0] += c3 / d1
                    coefs[1] -= c3 / d1 + c3 / d0
                    coefs[2] += c3 / d0
            h_coef, hist = history_terms(n, coefs[:stage], S) if S else (coefs[0], ())
            z = 0.0
            if self._s_noise > 0:
                v = lt * lt - ls * ls * r * r
                z = at * self._s_noise * math.sqrt(v) if v > 0 else 0.0
            rows.append(Row(step=n, eval_at="x", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                            out_x=Out(x=at / alpha[n] * r, h=h_coef, hist=hist, z=z), hist_write=ring_write(n, N, S),
                            noise_id=next(noise_ids) if z else -1, next_eval="x"))
        return rows


# ---------------------------------------------------------------------------------------------
# ComfyUI's UniPC


@register("uni_pc")
class ComfyUniPC(UniPC):
    """ComfyUI's uni_pc (comfy/extra_samplers/uni_pc.py, the UniPC authors' code): UniPC-3 with the
    corrector, data prediction, B(h) = h ('bh1'), lower orders at the end -- fastdiff's ``unipc`` with
    these options (the same update as diffusers' port)."""

    def __init__(self, order: int = 3, solver_type: str = "bh1", lower_order_final: bool = True):
        super().__init__(order=order, solver_type=solver_type, predict_x0=True, use_corrector=True,
                         lower_order_final=lower_order_final)


@register("uni_pc_bh2")
class ComfyUniPCBH2(ComfyUniPC):
    """ComfyUI's uni_pc_bh2: uni_pc with B(h) = e^h - 1."""

    def __init__(self, order: int = 3, solver_type: str = "bh2", lower_order_final: bool = True):
        super().__init__(order=order, solver_type=solver_type, lower_order_final=lower_order_final)


# ---------------------------------------------------------------------------------------------
# SA-Solver


def _exp_poly_integrals(h: float, k: float, degree: int) -> List[float]:
    """I_p = integral over u in [-h, 0] of e^{k u} u^p du, p = 0..degree, from the series
    int_0^h e^{-k v} v^p dv = e^{-k h} p! / k^{p+1} sum_{m > p} (k h)^m / m! (all terms positive)."""
    kh = k * h
    out = []
    for p in range(degree + 1):
        term = kh ** (p + 1) / math.factorial(p + 1)
        total, m = 0.0, p + 1
        while True:
            total += term
            m += 1
            term *= kh / m
            if term < 1e-17 * total or m > 2000:
                break
        out.append((-1) ** p * math.exp(-kh) * math.factorial(p) / k ** (p + 1) * total)
    return out


def sa_solver_b(alpha_t: float, lam_s: float, lam_t: float, nodes: List[float], tau: float,
                simple_order_2: bool = False, corrector: bool = False) -> List[float]:
    """SA-Solver's b_j (data prediction) on the half-logSNR ``nodes`` (oldest first):
    alpha_t (1 + tau^2) int_{lam_s}^{lam_t} e^{-(1 + tau^2)(lam_t - l)} L_j(l) dl, L_j the Lagrange basis;
    ``simple_order_2`` with two nodes: the paper's simplified order-2 pair (ComfyUI's option)."""
    k = 1.0 + tau * tau
    h = lam_t - lam_s
    if simple_order_2 and len(nodes) == 2:
        if corrector:
            b_new = alpha_t * 0.5 * k * h
            return [alpha_t * -math.expm1(-h * k) - b_new, b_new]
        b_old = alpha_t * 0.5 * k * h * h / (nodes[0] - lam_s)
        return [b_old, alpha_t * -math.expm1(-h * k) - b_old]
    import numpy as np
    from numpy.polynomial import Polynomial
    u = [v - lam_t for v in nodes]               # nodes as u = lambda - lambda_t in [-h', 0]
    I = _exp_poly_integrals(h, k, len(nodes) - 1)
    b = []
    for j in range(len(nodes)):
        others = [u[m] for m in range(len(nodes)) if m != j]
        P = Polynomial.fromroots(others) / np.prod([u[j] - o for o in others]) if others else Polynomial([1.0])
        b.append(alpha_t * k * float(sum(c * I[p] for p, c in enumerate(P.coef))))
    return b


def sa_tau_window(grid: Grid, eta: float, interval=None):
    """tau of each step's predictor: eta where its target noise level lies in the window, else 0.
    ``interval`` = (start, end) noise levels sigma/alpha (start >= end); None: ComfyUI's default window,
    the schedule's points at 20% and 80% of its time range from the noisy end (percent_to_sigma(0.2),
    percent_to_sigma(0.8))."""
    if interval is None:
        sch = grid.schedule
        t0, t1 = float(sch.t_max), float(sch.t_min)
        start, end = (float(sch.ksigma(t0 + p * (t1 - t0))) for p in (0.2, 0.8))
    else:
        start, end = (float(v) for v in interval)
    return [eta if (eta > 0 and start >= float(grid.ksigma[i + 1]) >= end) else 0.0 for i in range(grid.steps)]


@register("sa_solver")
class SASolver(Solver):
    """ComfyUI sample_sa_solver (SA-Solver, Xue et al. 2023, arXiv 2309.05019), data prediction:
    stochastic Adams predictor of ``predictor_order`` (<= 3) and corrector of ``corrector_order`` (<= 4)
    in the half-logSNR lambda, noise tau(sigma) (``eta`` inside the window ``tau_interval``, 0 outside;
    ``taus``: one value per step instead), ``s_noise``; lower orders near the end when the grid ends at
    sigma = 0. The model is evaluated at the predicted point; the corrected state carries on (with
    ``use_pece`` the model is evaluated again at the corrected state, whose output replaces the
    predicted one: sa_solver_pece). The corrector re-adds the predictor's noise draw, recovered from
    the predicted point it reads, so each step makes one draw; no host sync anywhere."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4,
                 use_pece: bool = False, simple_order_2: bool = False, tau_interval=None, taus=None):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.predictor_order = check_order(predictor_order, (1, 2, 3, 4, 5, 6), "predictor_order")
        self.corrector_order = check_order(corrector_order, (0, 1, 2, 3, 4, 5, 6), "corrector_order")
        self.use_pece = bool(use_pece)
        self.simple_order_2 = bool(simple_order_2)
        if tau_interval is not None:
            try:
                lo_hi = tuple(float(v) for v in tau_interval)
            except (TypeError, ValueError):
                lo_hi = ()
            if len(lo_hi) != 2 or not (lo_hi[0] >= lo_hi[1] >= 0):
                raise ValueError(f"tau_interval must be (start, end) noise levels with start >= end >= 0, "
                                 f"got {tau_interval!r}")
            tau_interval = lo_hi
        self.tau_interval = tau_interval
        if taus is not None:
            taus = tuple(check_eta(v, "each of taus") for v in taus)
        self.taus = taus
        self.stochastic = self.s_noise > 0 and (any(taus) if taus is not None else self.eta > 0)
        # Without noise: the predictor's order p, p + 1 with a corrector of order >= p + 1 (measured: p = 3,
        # c = 4 gives 4; p = 2, c = 3 gives 3)
        p, c = self.predictor_order, self.corrector_order
        self.order = 1 if self.stochastic else (p if c == 0 else min(p + 1, max(p, c)))
        # lags: the predictor reads p - 1 earlier outputs, the corrector c - 1, the recovered predictor noise p
        self.num_slots = max(self.corrector_order - 1, self.predictor_order, 1)

    def _taus(self, grid: Grid) -> List[float]:
        if self.taus is not None:
            if len(self.taus) != grid.steps:
                raise ValueError(f"taus has {len(self.taus)} values but the grid has {grid.steps} steps")
            return list(self.taus)
        return sa_tau_window(grid, self.eta, self.tau_interval)

    def rows(self, grid: Grid) -> List[Row]:
        from .multistep import _as_out, _combine
        check_finite_lambda(grid, self.name)
        N, S = grid.steps, self.num_slots
        points = [grid_point(grid, i) for i in range(N + 1)]
        lam = [half_log_snr(p) for p in points]
        taus = self._taus(grid)
        noise = self.s_noise > 0
        lower_to_end = points[N].sigma == 0.0
        max_used = max(self.predictor_order, self.corrector_order)
        noise_ids = itertools.count()
        rows: List[Row] = []
        prev_pred = None       # the previous predictor: {'x': a, lag j: b_j} (lags from this step) and its std
        for i in range(N):
            p = points[i]
            have = min(i + 1, max_used)
            k_p = min(self.predictor_order, have)
            k_c = 0 if i == 0 or (points[i + 1].sigma == 0.0 and not self.use_pece) else min(self.corrector_order, have)
            if lower_to_end:
                k_p = min(k_p, N - 1 - i)
                k_c = min(k_c, N - i)
            # Corrector: x_c = (sigma_i/sigma_{i-1}) e^{-tau^2 h} x + sum b D (nodes i-k_c+1..i) + N_prev
            if k_c > 0:
                q0, tau = points[i - 1], taus[i - 1]
                h = lam[i] - lam[i - 1]
                b = sa_solver_b(p.alpha, lam[i - 1], lam[i], lam[i - k_c + 1:i + 1], tau, self.simple_order_2, True)
                corr = {"x": p.sigma / q0.sigma * math.exp(-tau * tau * h)}
                corr = _combine((1.0, corr), (1.0, {k_c - 1 - j: b[j] for j in range(k_c)}))
                if prev_pred is not None and prev_pred[1]:     # + N_prev = E - (a x + sum b D)
                    corr = _combine((1.0, corr), (1.0, {"y": 1.0}), (-1.0, prev_pred[0]))
            else:
                corr = {"x": 1.0} if i == 0 else {"y": 1.0}
            eval_at = "x" if i == 0 else "y"
            if self.use_pece and k_c > 0:
                # Row A: the corrected state into x; Row B evaluates there and its output replaces D_i
                rows.append(Row(step=i, eval_at="y", point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1],
                                out_x=_as_out(corr, i, S), next_eval="x"))
                corr, eval_at = {"x": 1.0}, "x"
            # Predictor (or the denoising step)
            last = i == N - 1
            z, pred = 0.0, None
            if points[i + 1].sigma == 0.0:
                pred = {0: points[i + 1].alpha}
                prev_pred = None
            else:
                q, tau = points[i + 1], taus[i]
                h = lam[i + 1] - lam[i]
                b = sa_solver_b(q.alpha, lam[i], lam[i + 1], lam[i - k_p + 1:i + 1], tau, self.simple_order_2, False)
                a = q.sigma / p.sigma * math.exp(-tau * tau * h)
                pred = _combine((a, corr), (1.0, {k_p - 1 - j: b[j] for j in range(k_p)}))
                if tau > 0 and noise:
                    z = q.sigma * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) * self.s_noise
                # for the next step's corrector: the same predictor in the next step's lags (x = x_c)
                prev_pred = ({"x": a, **{k_p - j: b[j] for j in range(k_p)}}, z)
            out_pred = _as_out(pred, i, S)
            out_pred = Out(x=out_pred.x, y=out_pred.y, h=out_pred.h, hist=out_pred.hist, z=z)
            if last:
                out_x, out_y = out_pred, None
            else:
                out_x = None if eval_at == "x" and corr == {"x": 1.0} else _as_out(corr, i, S)
                out_y = out_pred
            rows.append(Row(step=i, eval_at=eval_at, point=p, q_y=X0_QUANTITY[0], q_x0=X0_QUANTITY[1], out_x=out_x,
                            out_y=out_y, hist_write=ring_write(i, N, S), noise_id=next(noise_ids) if z else -1,
                            next_eval="x" if last else "y"))
        return rows


@register("sa_solver_pece")
class SASolverPECE(SASolver):
    """ComfyUI sample_sa_solver_pece: sa_solver with use_pece=True (two model calls per step after the
    first: at the predicted and at the corrected state)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, predictor_order: int = 3, corrector_order: int = 4,
                 use_pece: bool = True, simple_order_2: bool = False, tau_interval=None, taus=None):
        super().__init__(eta=eta, s_noise=s_noise, predictor_order=predictor_order, corrector_order=corrector_order,
                         use_pece=use_pece, simple_order_2=simple_order_2, tau_interval=tau_interval, taus=taus)
