"""PLMS from the first step: the pseudo linear multistep of PNDM (Liu et al. 2022, eq. 12) with
the fixed Adams-Bashforth weights of equal steps, of order min(n + 1, 4) at step n (the warm-up
uses the history it has, no Runge-Kutta steps): diffusers' ``IPNDMScheduler``.

    e = sum_j w_j eps_{n-j},  w = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24
    x_{n+1} = alpha_{n+1} (x_n - sigma_n e) / alpha_n + sigma_{n+1} e          (the DDIM transfer)

with eps_k the model's noise prediction at x_k. Unlike fastdiff's ``ipndm`` (the same weights on
the ODE derivative in y = x/alpha) its last step to sigma = 0 keeps the full order. Where a step
starts at alpha = 0 (pure noise: diffusers' IPNDM schedule starts at sin^2(pi/2) = 1) the sample
carries no signal and the transfer's x0 term (x - sigma e)/alpha is taken as 0, as diffusers' is
(its x - sigma e vanishes there, divided by max(alpha, 1e-8)): x_{n+1} = sigma_{n+1} e.

History: eps_k in a ring of min(3, N - 1) slots (eps_k in slot k % size).
"""
from __future__ import annotations

from typing import List, Tuple

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import Solver, check_order, eps_quantity, grid_point, history_terms, register, ring_write

#: equal-step Adams-Bashforth weights of eps_n, eps_{n-1}, ... by order
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer(a: Point, b: Point) -> Tuple[float, float]:
    """(A, B) of the DDIM transfer x_b = A x_a + B e; at alpha_a = 0 the x0 term is 0."""
    if a.alpha == 0.0:
        return 0.0, b.sigma
    return b.alpha / a.alpha, b.sigma - b.alpha * a.sigma / a.alpha


@register("plms")
class PLMS(Solver):
    """PNDM's pseudo linear multistep from the first step (orders ramp 1, 2, 3 to ``max_order``)."""

    def __init__(self, max_order: int = 4):
        self.order = check_order(max_order, (1, 2, 3, 4), "max_order")

    def rows(self, grid: Grid) -> List[Row]:
        N = grid.steps
        S = min(self.order - 1, N - 1)
        self.num_slots = S
        P = [grid_point(grid, i) for i in range(N + 1)]
        rows = []
        for n in range(N):
            A, B = transfer(P[n], P[n + 1])
            w = AB_WEIGHTS[min(n + 1, self.order)]
            h_coef, hist = history_terms(n, [B * c for c in w], S) if S else (B * w[0], ())
            qy, qx0 = eps_quantity(P[n])
            rows.append(Row(step=n, eval_at="x", point=P[n], q_y=qy, q_x0=qx0, out_x=Out(x=A, h=h_coef, hist=hist),
                            hist_write=ring_write(n, N, S), next_eval="x"))
        return rows
