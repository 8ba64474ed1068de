"""SA-Solver as diffusers' SASolverScheduler.step writes it (the oracle of fastdiff.solvers.sa_solver):
stochastic Adams-Moulton corrector from the kept last sample and last noise, then the stochastic
Adams-Bashforth predictor with fresh noise. Plain PyTorch on x = alpha x0 + sigma eps; the
integrals by numerical quadrature (Gauss-Legendre), not by the closed forms the solver uses."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..schedules import Grid
from .common import denoise, log_snr, noise_at


def _integral(f, a: float, b: float, n: int = 40) -> float:
    x, w = np.polynomial.legendre.leggauss(n)
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    return float(half * sum(wi * f(mid + half * xi) for xi, wi in zip(x, w)))


def _coefficients(lams: List[float], a: float, b: float, tau: float, data: bool) -> List[float]:
    """g_i = int_a^b e^{(1+tau^2) l} L_i(l) dl (data) or int e^{-l} L_i(l) dl, L_i the Lagrange basis on lams."""
    def basis(i):
        return lambda l: float(np.prod([(l - lj) / (lams[i] - lj) for j, lj in enumerate(lams) if j != i]))
    w = (lambda l: math.exp((1 + tau * tau) * l)) if data else (lambda l: math.exp(-l))
    return [_integral(lambda l, i=i: w(l) * basis(i)(l), a, b) for i in range(len(lams))]


def sample_sa_solver(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None,
                     predictor_order: int = 2, corrector_order: int = 2, taus: Optional[Sequence[float]] = None,
                     tau: float = 1.0, algorithm_type: str = "data_prediction",
                     lower_order_final: bool = True) -> torch.Tensor:
    data = algorithm_type == "data_prediction"
    N = grid.steps
    A = [float(v) for v in grid.alpha]
    S = [float(v) for v in grid.sigma]
    lam = [log_snr(a, s) for a, s in zip(A, S)]
    K = max(predictor_order, corrector_order - 1)
    tau_of = (lambda n: taus[n]) if taus is not None else (lambda n: tau)
    ms: List[torch.Tensor] = []
    last_x = last_z = None
    c_order = None
    lower = 0

    def update(xs, s, t, m_list, order, tu, z, corrector):
        if S[t] == 0.0:                 # the first-order limit at sigma = 0
            if data:
                return A[t] * m_list[-1]
            return A[t] / A[s] * (xs - (1 + tu * tu) * S[s] * m_list[-1] + tu * S[s] * z)
        h = lam[t] - lam[s]
        top = t if corrector else s
        lams = [lam[top - i] for i in range(order)]
        g = _coefficients(lams, lam[s], lam[t], tu, data)
        if data and order == 2:
            c = 1 + tu * tu
            core = h * c - 1 + math.exp(-c * h)
            if corrector:
                mod = math.exp(c * lam[t]) * (h / 2 - core / (c * c * h))
            else:
                mod = math.exp(c * lam[t]) * (h * h / 2 - core / (c * c)) / (lam[s] - lam[s - 1])
            g[0] += mod
            g[1] -= mod
        grad = sum(((1 + tu * tu) * S[t] * math.exp(-tu * tu * lam[t]) if data else -(1 + tu * tu) * A[t])
                   * g[i] * m_list[-(i + 1)] for i in range(order))
        if data:
            return math.exp(-tu * tu * h) * S[t] / S[s] * xs + grad + S[t] * math.sqrt(1 - math.exp(-2 * tu * tu * h)) * z
        return A[t] / A[s] * xs + grad + tu * S[t] * math.sqrt(math.exp(2 * h) - 1) * z

    for n in range(N):
        x0 = denoise(model, x, A[n], S[n], float(grid.model_t[n]), prediction)
        m = x0 if data else (x - A[n] * x0) / S[n]
        if n > 0:
            x = update(last_x, n - 1, n, ms + [m], c_order, tau_of(n - 1), last_z, True)
        ms.append(m)
        z = noise_at(noise, n)
        po = min(predictor_order, N - n) if lower_order_final else predictor_order
        co = min(corrector_order, N - n + 1) if lower_order_final else corrector_order
        p_order, c_order = min(po, lower + 1), min(co, lower + 2)
        last_x, last_z = x, z
        x = update(x, n, n + 1, ms, p_order, tau_of(n), z, False)
        if lower < K:
            lower += 1
    return x
