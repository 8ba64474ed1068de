"""Linear multistep solvers: LMS (k-diffusion), DEIS (Zhang & Chen 2023) and UniPC (Zhao et al. 2023).

Each step evaluates the model once and combines its output with those of earlier steps, kept in
history slots used as a ring buffer (the quantity of step m lives in slot m % num_slots).

* ``lms``   k-diffusion sample_lms: Adams-Bashforth on dy/ds = d in the ODE coordinates, the
            coefficients integrals of Lagrange polynomials in s (scipy.integrate.quad, as k-diffusion).
* ``deis``  diffusers DEISMultistepScheduler (algorithm 'deis', solver 'logrho'): the same idea
            on y = x/alpha, rho = sigma/alpha with the noise prediction interpolated in log(rho)
            (tAB-DEIS); the integrals are closed form.
* ``unipc`` diffusers UniPCMultistepScheduler: the UniP predictor and the UniC corrector (B(h) =
            h 'bh1' or e^h - 1 'bh2'). The corrector needs the model output at the predicted point
            and then predicts the next point from the corrected one, so one row writes both: x the
            corrected sample, y the next predicted point (where the next model call happens).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from numpy.polynomial import Polynomial

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import (Solver, check_choice, check_order, check_space, derivative_quantity, eps_quantity, grid_point,
                   history_terms, ode_scale, ode_s, register, ring_write)
from .dpm_solver import multistep_order
from .exponential import X0_QUANTITY, check_finite_lambda, ddim_data, ddim_eps, half_log_snr


def _lagrange_basis(nodes: Sequence[float], j: int):
    def basis(tau):
        prod = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                prod *= (tau - node) / (nodes[j] - node)
        return prod
    return basis


def lms_coefficients(s: Sequence[float], n: int, order: int) -> List[float]:
    """Weights of d_n, d_{n-1}, ... in y_{n+1} = y_n + sum_j w_j d_{n-j}: the integrals over
    [s_n, s_{n+1}] of the Lagrange basis on the nodes s_n, s_{n-1}, ... (k-diffusion's
    linear_multistep_coeff; the integrand is a polynomial of degree < 4, which quad's 21-point
    Gauss-Kronrod rule integrates exactly)."""
    nodes = [s[n - j] for j in range(order)]
    from scipy import integrate  # only LMS needs it; keeps `import fastdiff` free of scipy

    return [integrate.quad(_lagrange_basis(nodes, j), s[n], s[n + 1], epsabs=0.0, epsrel=1e-13)[0]
            for j in range(order)]


@register("lms")
class LMS(Solver):
    """k-diffusion sample_lms: linear multistep (Adams-Bashforth) of order 1-4 on the ODE
    dy/ds = (y - x0)/s; the first steps use the orders their history allows."""

    def __init__(self, order: int = 4, ode_space: str = "auto"):
        self.order = check_order(order, (1, 2, 3, 4))
        self.ode_space = ode_space
        self.num_slots = self.order - 1

    def step_weights(self, s: Sequence[float], n: int, points) -> List[float]:
        """Weights of d_n, d_{n-1}, ... in y_{n+1} = y_n + sum_j w_j d_{n-j} (``s``: the ODE noise levels)."""
        return lms_coefficients(s, n, min(n + 1, self.order))

    def rows(self, grid: Grid) -> List[Row]:
        space = check_space(self.ode_space, grid)
        N, S = grid.steps, self.num_slots
        points = [grid_point(grid, i) for i in range(N + 1)]
        s = [ode_s(space, p.alpha, p.sigma) for p in points]
        return [lms_row(n, points[n], points[n + 1], space, self.step_weights(s, n, points), S, N) for n in range(N)]


def lms_row(step: int, p: Point, q: Point, space: str, weights: Sequence[float], slots: int, steps: int) -> Row:
    """One linear multistep step p -> q in the ODE coordinates (y = x/c, s = sigma/c of ``space``):
    y_q = y_p + sum_j w_j d_{step-j}, i.e. x_q = (c_q/c_p) x_p + c_q sum_j w_j d_{step-j}, with
    d = (y - x0)/s this step's quantity (written to the ring of ``slots`` history slots, ``steps``
    the run's length) and the earlier ones read from it."""
    c0, c1 = ode_scale(space, p.alpha, p.sigma), ode_scale(space, q.alpha, q.sigma)
    h_coef, hist = history_terms(step, [c1 * wj for wj in weights], slots)
    qy, qx0 = derivative_quantity(space, p)
    return Row(step=step, eval_at="x", point=p, q_y=qy, q_x0=qx0, out_x=Out(x=c1 / c0, h=h_coef, hist=hist),
               hist_write=ring_write(step, steps, slots), next_eval="x")


def lms_rows(grid: Grid, order: int, start: int = 0, space: str = "ve") -> List[Row]:
    """LMS from step ``start`` of ``grid`` with diffusers' order rule (LMSDiscreteScheduler): the
    coefficients of step n are those of order min(n + 1, order) counted from the grid's start
    (``lms_coefficients`` on the nodes s_n, s_{n-1}, ...), of which a run begun at ``start`` uses
    the leading min(n - start + 1, order): the derivatives of the steps it took. Rows are numbered
    from the run's start; order - 1 history slots. ``start=0``: k-diffusion's ``lms``."""
    points = [grid_point(grid, i) for i in range(grid.steps + 1)]
    s = [ode_s(space, p.alpha, p.sigma) for p in points]
    N, S = grid.steps, order - 1
    return [lms_row(n - start, points[n], points[n + 1], space,
                    lms_coefficients(s, n, min(n + 1, order))[:min(n - start + 1, order)], S, N - start)
            for n in range(start, N)]


def deis_coefficients(rho: Sequence[float], n: int, order: int) -> List[float]:
    """Weights of eps_n, eps_{n-1}, ... in y_{n+1} = y_n + sum_j w_j eps_{n-j} (y = x/alpha):
    w_j = integral over rho in [rho_n, rho_{n+1}] of the Lagrange basis L_j(log rho) on the nodes
    log rho_n, log rho_{n-1}, ... With u = log rho, the integral of P(u) e^u du has the
    antiderivative e^u (P - P' + P'' - ...), which vanishes at rho = 0."""
    u = [math.log(rho[n - j]) for j in range(order)]

    def antiderivative(P: Polynomial, r: float) -> float:
        if r == 0.0:
            return 0.0
        lr = math.log(r)
        return r * sum((-1) ** i * P.deriv(i)(lr) for i in range(P.degree() + 1))

    weights = []
    for j in range(order):
        others = [u[k] for k in range(order) if k != j]
        P = Polynomial.fromroots(others) / np.prod([u[j] - uk for uk in others]) if others else Polynomial([1.0])
        weights.append(antiderivative(P, rho[n + 1]) - antiderivative(P, rho[n]))
    return weights


@register("deis")
class DEIS(Solver):
    """DEIS multistep of order 1-3 (diffusers DEISMultistepScheduler: algorithm 'deis', 'logrho'):
    order 1 is DDIM. ``lower_order_final`` lowers the last two steps when there are fewer than 15
    (diffusers' default). Unlike diffusers, a step to sigma = 0 keeps its order (its integral has a
    finite limit there)."""

    def __init__(self, order: int = 2, lower_order_final: bool = True):
        self.order = check_order(order, (1, 2, 3))
        self.lower_order_final = bool(lower_order_final)
        self.num_slots = self.order - 1

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, "deis")
        N, S = grid.steps, self.num_slots
        points = [grid_point(grid, i) for i in range(N + 1)]
        rho = [p.sigma / p.alpha for p in points]
        rows = []
        for n in range(N):
            p, q = points[n], points[n + 1]
            k = multistep_order(n, N, self.order, self.lower_order_final, False, False)
            w = deis_coefficients(rho, n, k)
            h_coef, hist = history_terms(n, [q.alpha * wj for wj in w], S)
            qy, qx0 = eps_quantity(p)
            rows.append(Row(step=n, eval_at="x", point=p, q_y=qy, q_x0=qx0,
                            out_x=Out(x=q.alpha / p.alpha, h=h_coef, hist=hist), hist_write=ring_write(n, N, S),
                            next_eval="x"))
        return rows


# ---------------------------------------------------------------------------------------------
# UniPC

Symbol = Union[str, int]     # 'x', 'y' (the buffers) or a lag j >= 0 (the model quantity of step n - j)


def _combine(*terms: Tuple[float, Dict[Symbol, float]]) -> Dict[Symbol, float]:
    out: Dict[Symbol, float] = {}
    for c, comb in terms:
        for k, v in comb.items():
            out[k] = out.get(k, 0.0) + c * v
    return out


def _as_out(comb: Dict[Symbol, float], n: int, slots: int) -> Out:
    lags = [comb.get(j, 0.0) for j in range(1 + max([k for k in comb if isinstance(k, int)], default=0))]
    h_coef, hist = history_terms(n, lags, slots)
    return Out(x=comb.get("x", 0.0), y=comb.get("y", 0.0), h=h_coef, hist=hist)


def unipc_system(rks: np.ndarray, hh: float, B_h: float, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """UniPC's order conditions R rho = b, built as diffusers builds them: for i = 1..k the row
    R[i-1] = rks^(i-1) and b[i-1] = i! hh phi_{i+1}(hh) / B(h), with phi_j(z) = (e^z - sum_{m<j} z^m/m!) / z^j."""
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    R, b = [], []
    for i in range(1, k + 1):
        R.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(R), np.array(b)


@register("unipc")
class UniPC(Solver):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler: UniP-k predictor (order 1-3),
    UniC corrector (``use_corrector``; ``disable_corrector`` lists the steps whose predictions are
    not corrected, diffusers' option), B(h) by ``solver_type`` 'bh1' / 'bh2', on the data
    prediction (``predict_x0=True``) or the noise prediction. ``lower_order_final`` lowers the
    order to the number of steps left (diffusers' default); a step to sigma = 0 is first order.

    ``order`` (the option, kept as ``solver_order``) is the predictor's order k, as diffusers'
    ``solver_order``; the solver's ``order`` attribute is the method's: k + 1 with the corrector
    (Zhao et al. 2023, Theorem 3.3; measured by tests/test_solver_zoo.py), k without it."""

    def __init__(self, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True, use_corrector: bool = True,
                 disable_corrector: Sequence[int] = (), lower_order_final: bool = True):
        self.solver_order = check_order(order, (1, 2, 3))
        self.solver_type = check_choice(solver_type, ("bh1", "bh2"), "solver_type")
        self.predict_x0 = bool(predict_x0)
        self.use_corrector = bool(use_corrector)
        if isinstance(disable_corrector, (str, bytes)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices (ints >= 0), got {disable_corrector!r}")
        self.disable_corrector = tuple(int(i) for i in disable_corrector)
        if self.disable_corrector and not self.use_corrector:
            raise ValueError("disable_corrector lists steps to leave uncorrected, but use_corrector=False already "
                             "disables the corrector everywhere; pass one or the other")
        self.lower_order_final = bool(lower_order_final)
        self.order = self.solver_order + (1 if self.use_corrector else 0)
        # The corrector of order k reads the k previous outputs; the predictor the k - 1 previous ones.
        self.num_slots = self.solver_order if self.use_corrector else self.solver_order - 1

    def _step_order(self, n: int, N: int, ends_clean: bool) -> int:
        k = min(self.solver_order, N - n) if self.lower_order_final else self.solver_order
        k = min(k, n + 1)
        return 1 if ends_clean else k

    def _first_order(self, p, q) -> Tuple[float, float, float, float]:
        """(x coefficient, m coefficient, hh, the scale of the B(h) terms) of the step p -> q."""
        h = half_log_snr(q) - half_log_snr(p)
        if self.predict_x0:
            a, b, _ = ddim_data(p, q)
            return a, b, -h, q.alpha
        a, b = ddim_eps(p, q)
        return a, b, h, q.sigma

    def _B(self, hh: float) -> float:
        return hh if self.solver_type == "bh1" else math.expm1(hh)

    def _predictor(self, lam, points, n: int, k: int) -> Dict[Symbol, float]:
        """x~_{n+1} = a * sample + sum over lags j < k of c_j m_{n-j}; the sample is the symbol 's'."""
        p, q = points[n], points[n + 1]
        a, b, hh, scale = self._first_order(p, q)
        comb: Dict[Symbol, float] = {"s": a, 0: b}
        if k == 1:
            return comb
        h = lam[n + 1] - lam[n]
        rks = np.array([(lam[n - i] - lam[n]) / h for i in range(1, k)] + [1.0])
        B_h = self._B(hh)
        R, bvec = unipc_system(rks, hh, B_h, k)
        rhos = np.array([0.5]) if k == 2 else np.linalg.solve(R[:-1, :-1], bvec[:-1])
        for i in range(1, k):   # - scale B(h) rho_i (m_{n-i} - m_n) / r_i
            c = -scale * B_h * rhos[i - 1] / rks[i - 1]
            comb[i] = comb.get(i, 0.0) + c
            comb[0] -= c
        return comb

    def _corrector(self, lam, points, n: int, k: int) -> Dict[Symbol, float]:
        """x^c_n from x^c_{n-1} (symbol 'x'), m_{n-1}, ..., and the new output m_n (lag 0); UniC-k."""
        p, q = points[n - 1], points[n]
        a, b, hh, scale = self._first_order(p, q)
        comb: Dict[Symbol, float] = {"x": a, 1: b}
        h = lam[n] - lam[n - 1]
        rks = np.array([(lam[n - 1 - i] - lam[n - 1]) / h for i in range(1, k)] + [1.0])
        B_h = self._B(hh)
        if k == 1:
            rhos = np.array([0.5])
        else:
            R, bvec = unipc_system(rks, hh, B_h, k)
            rhos = np.linalg.solve(R, bvec)
        for i in range(1, k):   # - scale B(h) rho_i (m_{n-1-i} - m_{n-1}) / r_i
            c = -scale * B_h * rhos[i - 1] / rks[i - 1]
            comb[1 + i] = comb.get(1 + i, 0.0) + c
            comb[1] -= c
        c = -scale * B_h * rhos[-1]               # - scale B(h) rho_k (m_n - m_{n-1})
        comb[0] = comb.get(0, 0.0) + c
        comb[1] -= c
        return comb

    def rows(self, grid: Grid) -> List[Row]:
        check_finite_lambda(grid, "unipc")
        N, S = grid.steps, self.num_slots
        points = [grid_point(grid, i) for i in range(N + 1)]
        lam = [half_log_snr(p) for p in points]
        rows = []
        prev_order = 0
        for n in range(N):
            p = points[n]
            k = self._step_order(n, N, points[n + 1].sigma == 0.0)
            correct = n > 0 and self.use_corrector and (n - 1) not in self.disable_corrector
            if n == 0:
                sample = {"x": 1.0}                      # x_0 is where the model is evaluated
            elif correct:
                sample = self._corrector(lam, points, n, prev_order)
            else:
                sample = {"y": 1.0}                      # the prediction itself
            pred = self._predictor(lam, points, n, k)
            a = pred.pop("s")
            predicted = _combine((a, sample), (1.0, pred))
            last = n == N - 1
            qy, qx0 = X0_QUANTITY if self.predict_x0 else eps_quantity(p)
            out_x = _as_out(predicted if last else sample, n, S)
            rows.append(Row(step=n, eval_at="x" if n == 0 else "y", point=p, q_y=qy, q_x0=qx0,
                            out_x=None if (n == 0 and not last) else out_x,
                            out_y=None if last else _as_out(predicted, n, S),
                            hist_write=ring_write(n, N, S), next_eval="x" if last else "y"))
            prev_order = k
        return rows


class ZeroStepError(ValueError):
    """A corrector that divides by a zero step in log-SNR (a noise level repeated in the schedule)."""

    def __init__(self, call: int, order: int):
        super().__init__(f"UniPC's corrector of order {order} at call {call} divides by a zero step in log-SNR")
        self.call, self.order = call, order


def unic_rows(solver: UniPC, points: Sequence[Point], predictor_orders: Sequence[int],
              uncorrected: Sequence[int] = ()) -> List[Row]:
    """UniPC's corrector alone (UniC), one row per call: "solver_p + UniC", another solver predicts.

    Call n evaluates at y (the sample it is given, E; call 0 at x), keeps the last corrected sample
    c_{n-1} in x and writes c_n to x (the next call's ``last_sample``) and to y, which it returns:
    c_n = UniC-k(c_{n-1}; m_{n-1}, ..., m_n) (``UniPC._corrector``, k = ``predictor_orders[n - 1]``,
    the order the predictor of call n - 1 used, lambda = half_log_snr of ``points``), its
    model quantity m_n (x0, or eps without ``predict_x0``) going to a ring of ``solver_order``
    slots. c_0 is the sample itself; a call listed in ``uncorrected`` takes the sample as it is.
    Raises ``ZeroStepError`` where the corrector divides by a zero step in log-SNR."""
    lam = [half_log_snr(p) for p in points]
    calls, S = len(points), solver.solver_order
    rows = []
    for n, p in enumerate(points):
        last = n == calls - 1
        if n == 0:
            corrected = Out(x=1.0)                       # (x is the sample itself)
        elif n in uncorrected:
            corrected = Out(y=1.0)
        else:
            k = predictor_orders[n - 1]
            try:
                with np.errstate(divide="raise", invalid="raise"):
                    comb = solver._corrector(lam, points, n, k)
                ok = all(math.isfinite(v) for v in comb.values())
            except (ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError):
                ok = False
            if not ok:
                raise ZeroStepError(n, k)
            corrected = _as_out(comb, n, S)
        qy, qx0 = X0_QUANTITY if solver.predict_x0 else eps_quantity(p)
        rows.append(Row(step=n, eval_at="x" if n == 0 else "y", point=p, q_y=qy, q_x0=qx0,
                        out_x=None if (n == 0 and not last) else corrected,
                        out_y=None if last else corrected,
                        hist_write=ring_write(n, calls, S), next_eval="x" if last else "y"))
    return rows
