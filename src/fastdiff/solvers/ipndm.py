"""iPNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator",
the improved PNDM of their appendix; the form of zju-pi/diff-sampler and ComfyUI's ``ipndm``).

Adams-Bashforth on the probability-flow ODE dy/ds = d = (y - x0)/s with the *fixed* coefficients
of equal steps, whatever the step sizes:

    y_{n+1} = y_n + (s_{n+1} - s_n) * sum_j w_j d_{n-j},   w = (1), (3, -1)/2, (23, -16, 5)/12,
                                                             (55, -59, 37, -9)/24

of order min(max_order, n + 1) at step n (the warm-up uses the history it has). A step that ends at
sigma = 0 returns the model's x0 (ComfyUI's denoising step), which is the order-1 step to s = 0.
Coordinates y = x/c, s = sigma/c as every ODE solver here ("ve": c = alpha, k-diffusion/ComfyUI).
"""
from __future__ import annotations

from typing import List

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, check_space, derivative_quantity, grid_point, ode_s, ode_scale, register
from .dpm_solver import check_order, history_terms, ring_write

# Adams-Bashforth weights of d_n, d_{n-1}, ... for equal steps, by order.
AB_WEIGHTS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


@register("ipndm")
class IPNDM(Solver):
    """iPNDM of ``max_order`` 1-4 (default 4, ComfyUI's); one model call per step."""

    def __init__(self, max_order: int = 4, ode_space: str = "auto"):
        self.order = check_order(max_order, (1, 2, 3, 4), "max_order")
        self.ode_space = ode_space
        self.num_slots = self.order - 1

    def rows(self, grid: Grid) -> List[Row]:
        space = check_space(self.ode_space, grid)
        N, S = grid.steps, self.num_slots
        points = [grid_point(grid, i) for i in range(N + 1)]
        rows = []
        for n in range(N):
            p0, p1 = points[n], points[n + 1]
            c0, c1 = ode_scale(space, p0.alpha, p0.sigma), ode_scale(space, p1.alpha, p1.sigma)
            s0, s1 = ode_s(space, p0.alpha, p0.sigma), ode_s(space, p1.alpha, p1.sigma)
            k = 1 if p1.sigma == 0.0 else min(self.order, n + 1)
            h_coef, hist = history_terms(n, [c1 * (s1 - s0) * w for w in AB_WEIGHTS[k]], S)
            qy, qx0 = derivative_quantity(space, p0)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=qy, q_x0=qx0,
                            out_x=Out(x=c1 / c0, h=h_coef, hist=hist), hist_write=ring_write(n, N, S),
                            next_eval="x"))
        return rows
