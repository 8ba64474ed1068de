"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

The pseudo numerical step moves a sample from point a to point b with the transfer part of DDIM
(the paper's eq. 9, written here in alpha and sigma, which is the same for VP schedules and also
serves VE / flow grids):

    phi(x, e, a -> b) = alpha_b / alpha_a * x + (sigma_b - alpha_b * sigma_a / alpha_a) * e

and the gradient part e is a combination of noise predictions:

* ``warmup='prk'`` (the paper's PNDM): the first min(3, N - 1) steps (the last step never
  evaluates the model at its end point, which may be noise-free) are pseudo Runge-Kutta (four
  model calls each: at x_n, twice at the time midpoint, once at the end, e = (e1 + 2 e2 + 2 e3 + e4)/6),
  then pseudo linear multistep (PLMS): e = (55 e_n - 59 e_{n-1} + 37 e_{n-2} - 9 e_{n-3}) / 24
  with e_k the prediction at x_k (the first one of each Runge-Kutta step).
* ``warmup='skip'`` (diffusers' ``skip_prk_steps``): step 0 is a pseudo Heun step (predict with e_0,
  evaluate there, e = (e_0 + e_pred)/2), then Adams-Bashforth of order 2, 3, then 4.

``quantity='v'`` is diffusers' PNDMScheduler with v_prediction: the combination is taken of the
v predictions and converted to noise at the step's start, e = alpha_a * v + sigma_a * x_a (so it is
not the noise-space method). ``midpoints``: the Runge-Kutta midpoints, one per warm-up step, each a
``Point`` or a pair of them (where the first stage steps to, where the second and third stages
evaluate and step to: diffusers' discrete t - h and t - delta + h, h = T // N // 2, which differ by one
when delta = T // N is odd); default the schedule at the time midpoint.

History: the multistep predictions e_k in a ring of min(3, N - 1) slots (e_k in slot k % size),
plus two slots for a Runge-Kutta step's middle stages.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import Solver, check_choice, eps_quantity, grid_point, register

#: equal-step Adams-Bashforth weights of e_n, e_{n-1}, ... by order
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def transfer(a: Point, b: Point, quantity: str = "eps") -> Tuple[float, float]:
    """(A, B) with phi = A * x_a + B * m, m the combined ``quantity`` (eps, or v as diffusers)."""
    c_x = b.alpha / a.alpha
    c_e = b.sigma - b.alpha * a.sigma / a.alpha
    if quantity == "eps":
        return c_x, c_e
    return c_x + c_e * a.sigma, c_e * a.alpha            # e = alpha_a v + sigma_a x_a


def quantity_of(p: Point, quantity: str) -> Tuple[float, float]:
    """(q_y, q_x0) of the model's eps, or of its v = (alpha E - x0) / sigma, at p."""
    if quantity == "eps":
        return eps_quantity(p)
    return p.alpha / p.sigma, -1.0 / p.sigma


@register("pndm")
class PNDM(Solver):
    """PNDM: pseudo Runge-Kutta warm-up ('prk') or diffusers' pseudo Heun start ('skip'), then
    pseudo linear multistep of order 4 (see the module docstring)."""

    order = 4

    def __init__(self, warmup: str = "prk", quantity: str = "eps", midpoints: Optional[Sequence[Point]] = None):
        self.warmup = check_choice(warmup, ("prk", "skip"), "warmup")
        self.quantity = check_choice(quantity, ("eps", "v"), "quantity")
        if midpoints is not None:
            midpoints = tuple(m if isinstance(m, Point) else tuple(m) for m in midpoints)
            if not all(isinstance(m, Point) or (len(m) == 2 and all(isinstance(p, Point) for p in m))
                       for m in midpoints):
                raise TypeError("midpoints must be a sequence of fastdiff.program.Point or of pairs of them")
        self.midpoints = midpoints

    def _midpoints(self, grid: Grid, n: int) -> Tuple[Point, Point]:
        if self.midpoints is not None:
            if n >= len(self.midpoints):
                raise ValueError(f"midpoints gives {len(self.midpoints)} points; the warm-up needs one for step {n}")
            m = self.midpoints[n]
            return (m, m) if isinstance(m, Point) else m
        t = 0.5 * (float(grid.t[n]) + float(grid.t[n + 1]))
        alpha, sigma = (float(v) for v in grid.schedule.alpha_sigma(t))
        return (Point(t, alpha, sigma, t),) * 2

    def slots(self, steps: int) -> Tuple[int, int]:
        """(ring size of the multistep history, total slots)."""
        if self.warmup == "prk":
            ring = max(1, min(3, steps - 1))
            return ring, ring + 2
        ring = min(3, steps - 1)
        return ring, ring

    def rows(self, grid: Grid) -> List[Row]:
        N, q = grid.steps, self.quantity
        ring, K = self.slots(N)
        self.num_slots = K
        P = [grid_point(grid, i) for i in range(N + 1)]
        rows: List[Row] = []
        warm = min(3, N - 1) if self.warmup == "prk" else 0
        for n in range(N):
            qy, qx0 = quantity_of(P[n], q)
            A, B = transfer(P[n], P[n + 1], q)
            if n < warm:                                            # pseudo Runge-Kutta
                pm0, pm = self._midpoints(grid, n)
                A0, B0 = transfer(P[n], pm0, q)
                Am, Bm = transfer(P[n], pm, q)
                e0, e1, e2 = n % ring, ring, ring + 1
                rows.append(Row(step=n, eval_at="x", point=P[n], q_y=qy, q_x0=qx0, out_y=Out(x=A0, h=B0),
                                hist_write=e0, next_eval="y"))
                my, mx0 = quantity_of(pm, q)
                rows.append(Row(step=n, eval_at="y", point=pm, q_y=my, q_x0=mx0, out_y=Out(x=Am, h=Bm),
                                hist_write=e1, next_eval="y"))
                rows.append(Row(step=n, eval_at="y", point=pm, q_y=my, q_x0=mx0, out_y=Out(x=A, h=B),
                                hist_write=e2, next_eval="y"))
                ey, ex0 = quantity_of(P[n + 1], q)
                rows.append(Row(step=n, eval_at="y", point=P[n + 1], q_y=ey, q_x0=ex0,
                                out_x=Out(x=A, h=B / 6, hist=((e0, B / 6), (e1, B / 3), (e2, B / 3))),
                                next_eval="x"))
            elif n == 0 and self.warmup == "skip" and N > 1:       # pseudo Heun
                rows.append(Row(step=0, eval_at="x", point=P[0], q_y=qy, q_x0=qx0, out_y=Out(x=A, h=B),
                                hist_write=0, next_eval="y"))
                py, px0 = quantity_of(P[1], q)
                rows.append(Row(step=0, eval_at="y", point=P[1], q_y=py, q_x0=px0,
                                out_x=Out(x=A, h=B / 2, hist=((0, B / 2),)), next_eval="x"))
            else:                                                   # pseudo linear multistep
                w = AB_WEIGHTS[min(n + 1, 4)]
                hist = tuple(((n - j) % ring, B * w[j]) for j in range(1, len(w)))
                rows.append(Row(step=n, eval_at="x", point=P[n], q_y=qy, q_x0=qx0,
                                out_x=Out(x=A, h=B * w[0], hist=hist),
                                hist_write=n % ring if ring and n < N - 1 else -1, next_eval="x"))
        return rows
