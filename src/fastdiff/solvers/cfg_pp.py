"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", arXiv 2406.08070), in the forms ComfyUI ships (comfy/k_diffusion/sampling.py:
``sample_euler_cfg_pp``, ``sample_euler_ancestral_cfg_pp``, ``sample_dpmpp_2m_cfg_pp``).

CFG++ re-noises with the *unconditional* noise estimate: the guided x0 goes in one term, the
unconditional prediction in another. In k-diffusion's coordinates y = x/alpha, s = sigma/alpha
(the "ve" ODE space) with D the guided denoised and U the unconditional one:

* Euler (ancestral) CFG++:  y' = D + s_down (y - U) / s  [+ s_up s_noise z]   (y' = D at s' = 0)
* DPM++(2M) CFG++ (t = -log s, h = t' - t, r = h_last / h):
      y' = D - e^{-h} U + e^{-h} y - expm1(-h) / (2 r) (D - U_prev)       (first step: no last term)
  U is kept in one history slot for the next step.

Each model evaluation is one row of the fused step: the row's ``Out.h`` is the guided x0 and
``Out.hu`` the unconditional x0 (fastdiff.program), so CFG++ needs no kernel of its own. Without
guidance (no uncond pass) U = D and these reduce to Euler, Euler ancestral and DPM-Solver++(2M).
The guidance scale is the user's (ComfyUI's CFG++ nodes expect small scales, ~0.5-2).
"""
from __future__ import annotations

import math
from typing import List

from ..program import Out, Row
from ..schedules import Grid
from .base import Solver, ancestral_step, check_eta, check_space, grid_point, ode_s, ode_scale, register


def _ve_geometry(grid: Grid, n: int):
    p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
    s0, s1 = ode_s("ve", p0.alpha, p0.sigma), ode_s("ve", p1.alpha, p1.sigma)
    c0, c1 = ode_scale("ve", p0.alpha, p0.sigma), ode_scale("ve", p1.alpha, p1.sigma)
    return p0, s0, s1, c0, c1


class _CFGPP(Solver):
    def _check(self, grid: Grid):
        space = check_space(self.ode_space, grid)
        if space != "ve":
            raise ValueError(f"{self.name} is defined in the 've' coordinates (x/alpha, sigma/alpha); "
                             "pass ode_space='ve' with a grid whose noise levels are finite")


@register("euler_ancestral_cfg_pp")
class EulerAncestralCFGPP(_CFGPP):
    """ComfyUI sample_euler_ancestral_cfg_pp: y' = D + s_down (y - U)/s + s_up s_noise z."""

    order = 1

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto"):
        self.eta = check_eta(eta)
        self.s_noise = check_eta(s_noise, "s_noise")
        self.ode_space = ode_space
        self.stochastic = self.eta > 0 and self.s_noise > 0

    def rows(self, grid: Grid) -> List[Row]:
        self._check(grid)
        rows = []
        for n in range(grid.steps):
            p0, s0, s1, c0, c1 = _ve_geometry(grid, n)
            if s1 == 0.0:                                  # the denoising step: y' = D
                out, z = Out(h=c1), 0.0
            else:
                s_down, s_up = ancestral_step(s0, s1, self.eta)
                z = c1 * s_up * self.s_noise if (self.eta > 0 and self.s_noise > 0) else 0.0
                out = Out(x=c1 * s_down / (s0 * c0), h=c1, hu=-c1 * s_down / s0, z=z)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, out_x=out,
                            noise_id=n if z else -1, next_eval="x"))
        return rows


@register("euler_cfg_pp")
class EulerCFGPP(EulerAncestralCFGPP):
    """ComfyUI sample_euler_cfg_pp: y' = D + s' (y - U)/s (Euler ancestral CFG++ with eta = 0)."""

    def __init__(self, ode_space: str = "auto"):
        super().__init__(eta=0.0, s_noise=0.0, ode_space=ode_space)

    def __repr__(self):
        return f"EulerCFGPP(ode_space={self.ode_space!r})"


@register("dpmpp_2m_cfg_pp")
class DPMpp2MCFGPP(_CFGPP):
    """ComfyUI sample_dpmpp_2m_cfg_pp (DPM-Solver++(2M) with the unconditional x0 re-noised and
    kept in history)."""

    order = 2
    num_slots = 1

    def __init__(self, ode_space: str = "auto"):
        self.ode_space = ode_space

    def rows(self, grid: Grid) -> List[Row]:
        self._check(grid)
        rows = []
        s_prev = None
        for n in range(grid.steps):
            p0, s0, s1, c0, c1 = _ve_geometry(grid, n)
            if s1 == 0.0:                                  # y' = D
                out = Out(h=c1)
            else:
                h = math.log(s0) - math.log(s1)            # t = -log s
                e = math.exp(-h)
                if s_prev is None:
                    out = Out(x=c1 * e / c0, h=c1, hu=-c1 * e)
                else:
                    r = (math.log(s_prev) - math.log(s0)) / h
                    b = -math.expm1(-h) / (2.0 * r)
                    out = Out(x=c1 * e / c0, h=c1 * (1.0 + b), hu=-c1 * e, hist=((0, -c1 * b),))
            last = n == grid.steps - 1
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, out_x=out,
                            hist_write=-1 if last else 0, hist_out=None if last else Out(hu=1.0),
                            next_eval="x"))
            s_prev = s0
        return rows
