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

from typing import List, Sequence

from .base import check_order, register
from .multistep import LMS

# Adams-Bashforth weights of d_n, d_{n-1}, ... for equal steps, by order.
AB_WEIGHTS = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


@register("ipndm")
class IPNDM(LMS):
    """iPNDM of ``max_order`` 1-4 (default 4, ComfyUI's); one model call per step. It is LMS with
    the equal-step weights in place of the integrated Lagrange ones."""

    def __init__(self, max_order: int = 4, ode_space: str = "auto"):
        self.order = check_order(max_order, (1, 2, 3, 4), "max_order")
        self.ode_space = ode_space
        self.num_slots = self.order - 1

    def step_weights(self, s: Sequence[float], n: int, points) -> List[float]:
        k = 1 if points[n + 1].sigma == 0.0 else min(self.order, n + 1)
        return [(s[n + 1] - s[n]) * w for w in AB_WEIGHTS[k]]
