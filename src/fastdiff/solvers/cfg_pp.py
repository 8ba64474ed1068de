"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", arXiv 2406.08070), in the forms ComfyUI ships (comfy/k_diffusion/sampling.py):
``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2m_cfg_pp``, ``dpmpp_2s_ancestral_cfg_pp``,
``res_multistep_cfg_pp``, ``res_multistep_ancestral_cfg_pp``, ``gradient_estimation_cfg_pp`` and
``cfgpp_ud10_ab``.

CFG++ re-noises with the *unconditional* noise estimate: the guided x0 goes in one term, the
unconditional prediction in another. In k-diffusion's coordinates y = x/alpha, s = sigma/alpha
(the "ve" ODE space) with D the guided denoised and U the unconditional one:

* Euler (ancestral) CFG++:  y' = D + s_down (y - U) / s  [+ s_up s_noise z]   (y' = D at s' = 0)
* DPM++(2M) CFG++ (t = -log s, h = t' - t, r = h_last / h):
      y' = D - e^{-h} U + e^{-h} y - expm1(-h) / (2 r) (D - U_prev)       (first step: no last term)
  U is kept in one history slot for the next step.
* DPM++(2S) ancestral CFG++: both stages on U (the second evaluation's U_2), plus D - U of the first
  evaluation at the end of the step (two rows per step).
* RES multistep CFG++: y' = e^{-h} (y + D - U) + h (b1 U + b2 U_prev) (+ ancestral noise).
* Gradient estimation CFG++: y' = D + s' d + (gamma - 1)(s' - s)(d - d_prev), d = (y - U)/s.
* CFG++ UD10 AB: Euler CFG++ with an extrapolated unconditional derivative, lerped with an AB2 step,
  the last step extrapolating D to s = 0 (see CFGPPUD10AB).

Each model evaluation is one row of the fused step: the row's ``Out.h`` is the guided x0 and
``Out.hu`` the unconditional x0 (fastdiff.program), so CFG++ needs no kernel of its own. Without
guidance (no uncond pass) U = D and these reduce to Euler, Euler ancestral, DPM-Solver++(2M),
DPM-Solver++(2S) ancestral, res_multistep(_ancestral), gradient_estimation (and cfgpp_ud10_ab, with
its history weights 0 and no zero extrapolation, to Euler). The guidance scale is the user's
(ComfyUI's CFG++ nodes expect small scales, ~0.5-2).
"""
from __future__ import annotations

import math
from typing import List

from ..program import Out, Row
from ..schedules import Grid
from .base import (Solver, ancestral_step, check_space, grid_point, ode_scale, point_at_s, register, ring_write,
                   set_noise_options, step_geometry)


def _ve_geometry(grid: Grid, n: int):
    p0, _, s0, s1, c0, c1 = step_geometry(grid, n, "ve")
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
        set_noise_options(self, eta, s_noise, ode_space)

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


@register("dpmpp_2s_ancestral_cfg_pp")
class DPMpp2SAncestralCFGPP(_CFGPP):
    """ComfyUI sample_dpmpp_2s_ancestral_cfg_pp (comfyanonymous/ComfyUI 02159d8, not-RF branch): with
    G = D - U from the first evaluation, t = -log s, h = t(s_down) - t, s_mid = e^{-(t + h/2)},

        y_2 = (s_mid/s) y - expm1(-h/2) U,     U_2 = the unconditional x0 at (y_2, s_mid),
        y'  = (s_down/s) y - expm1(-h) U_2 + s_up s_noise z + G

    (s_down = 0: y' = U + s_up s_noise z + G). The guided output of the second evaluation is not used.
    Two rows per step: the first writes y_2 and the partial (s_down/s) y + G, the second adds the rest.
    (ComfyUI's earlier form re-noised y + G and used the guided D, D_2; this is the current one.)"""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto"):
        set_noise_options(self, eta, s_noise, ode_space)
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        self._check(grid)
        rows: List[Row] = []
        noise_id = 0
        for n in range(grid.steps):
            p0, s0, s1, c0, c1 = _ve_geometry(grid, n)
            sd, su = ancestral_step(s0, s1, self.eta)
            z = c1 * su * self.s_noise if s1 > 0 else 0.0
            nid = -1
            if z:
                nid, noise_id = noise_id, noise_id + 1
            if sd == 0.0:                                  # Euler to 0: U, then noise and G: D + noise
                rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, out_x=Out(h=c1, z=z),
                                noise_id=nid, next_eval="x"))
                continue
            h = math.log(s0) - math.log(sd)
            s_mid = math.exp(-(-math.log(s0) + 0.5 * h))
            pm = point_at_s(grid, "ve", s_mid)
            cm = ode_scale("ve", pm.alpha, pm.sigma)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=c1 * (sd / s0) / c0, h=c1, hu=-c1),
                            out_y=Out(x=cm * (s_mid / s0) / c0, hu=-cm * math.expm1(-0.5 * h)), next_eval="y"))
            rows.append(Row(step=n, eval_at="y", point=pm, q_y=0.0, q_x0=1.0,
                            out_x=Out(x=1.0, hu=-c1 * math.expm1(-h), z=z), noise_id=nid, next_eval="x"))
        return rows


@register("res_multistep_cfg_pp")
class ResMultistepCFGPP(_CFGPP):
    """ComfyUI res_multistep(cfg_pp=True) (eta = 0; res_multistep_ancestral_cfg_pp: eta = 1): with
    t = -log s, h = t(s_down) - t, c2 = (t(s_prev) - t(s_down_prev)) / h, b1 = phi1(-h) - phi2(-h)/c2,
    b2 = phi2(-h)/c2 and U_prev the previous step's unconditional x0 (one history slot):

        y' = e^{-h} (y + D - U) + h (b1 U + b2 U_prev)     (first step, s_down = 0: y' = D + s_down (y - U)/s)

    then noise of std s_up s_noise (get_ancestral_step(s, s_next, eta))."""

    num_slots = 1

    def __init__(self, eta: float = 0.0, s_noise: float = 1.0, ode_space: str = "auto"):
        set_noise_options(self, eta, s_noise, ode_space)
        self.order = 1 if self.stochastic else 2

    def rows(self, grid: Grid) -> List[Row]:
        self._check(grid)
        N = grid.steps
        rows: List[Row] = []
        noise_id, sd_prev = 0, None
        for n in range(N):
            p0, s0, s1, c0, c1 = _ve_geometry(grid, n)
            sd, su = ancestral_step(s0, s1, self.eta)
            if sd == 0.0 or n == 0:                        # Euler CFG++ to s_down
                out = Out(x=c1 * (sd / s0) / c0, h=c1, hu=-c1 * sd / s0)
            else:
                h = math.log(s0) - math.log(sd)
                c2 = (math.log(sd_prev) - math.log(grid.ksigma[n - 1])) / h
                phi1 = math.expm1(-h) / -h
                phi2 = (phi1 - 1.0) / -h
                b1, b2 = phi1 - phi2 / c2, phi2 / c2
                e = math.exp(-h)
                out = Out(x=c1 * e / c0, h=c1 * e, hu=c1 * (h * b1 - e), hist=((0, c1 * h * b2),))
            z = c1 * su * self.s_noise if s1 > 0 else 0.0
            nid = -1
            if z:
                nid, noise_id = noise_id, noise_id + 1
            out = Out(x=out.x, h=out.h, hu=out.hu, hist=out.hist, z=z)
            w = ring_write(n, N, 1)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, out_x=out, hist_write=w,
                            hist_out=Out(hu=1.0) if w >= 0 else None, noise_id=nid, next_eval="x"))
            sd_prev = sd
        return rows


@register("res_multistep_ancestral_cfg_pp")
class ResMultistepAncestralCFGPP(ResMultistepCFGPP):
    """ComfyUI sample_res_multistep_ancestral_cfg_pp: res_multistep_cfg_pp with eta = 1 by default."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, ode_space: str = "auto"):
        super().__init__(eta=eta, s_noise=s_noise, ode_space=ode_space)


@register("gradient_estimation_cfg_pp")
class GradientEstimationCFGPP(_CFGPP):
    """ComfyUI sample_gradient_estimation(cfg_pp=True) (Permenter & Yuan 2024 with CFG++): with the
    unconditional derivative d = (y - U)/s (kept in one history slot),

        y' = D + s' d + (gamma - 1)(s' - s)(d - d_prev)      (first step: no last term; s' = 0: y' = D)."""

    num_slots = 1
    order = 1

    def __init__(self, ge_gamma: float = 2.0, ode_space: str = "auto"):
        self.ge_gamma = float(ge_gamma)
        if not math.isfinite(self.ge_gamma):
            raise ValueError(f"ge_gamma must be a finite number, got {ge_gamma}")
        self.ode_space = ode_space

    def rows(self, grid: Grid) -> List[Row]:
        self._check(grid)
        N = grid.steps
        rows: List[Row] = []
        for n in range(N):
            p0, s0, s1, c0, c1 = _ve_geometry(grid, n)
            if s1 == 0.0:
                out = Out(h=c1)
            else:
                a = s1 + ((self.ge_gamma - 1.0) * (s1 - s0) if n >= 1 else 0.0)     # weight of d
                hist = ((0, -c1 * (self.ge_gamma - 1.0) * (s1 - s0)),) if n >= 1 else ()
                out = Out(x=c1 * a / (s0 * c0), h=c1, hu=-c1 * a / s0, hist=hist)
            w = ring_write(n, N, 1)
            rows.append(Row(step=n, eval_at="x", point=p0, q_y=0.0, q_x0=1.0, out_x=out, hist_write=w,
                            hist_out=Out(x=1.0 / (s0 * c0), hu=-1.0 / s0) if w >= 0 else None, next_eval="x"))
        return rows


@register("cfgpp_ud10_ab")
class CFGPPUD10AB(_CFGPP):
    """ComfyUI sample_cfgpp_ud10_ab (its ``_sample_cfgpp_history`` with history_weight 0.25, zero_weight
    1.0, uncond_history_weight 0.1; zero_order 1): Euler CFG++ whose unconditional derivative
    cud = (y - U)/s is extrapolated from the previous step's, blended with a variable-step
    Adams-Bashforth-2 step on the step's derivatives, and a final step to s = 0 replaced (weight
    zero_weight) by the linear extrapolation of the guided x0 to s = 0. With dt = s' - s:

        ud   = cud + w_u dt/(s - s_prev) (cud - cud_prev)                      (first step: ud = cud)
        E    = D + s' ud - y,   d = E / dt
        y'   = y + lerp(E, c_0 d + c_1 d_prev, w_h)                            (first step: y + E)
        s' = 0: y' = lerp(y', D - s (D - D_prev)/(s - s_prev), w_0)

    (c_0, c_1: the AB2 weights, integrals over [s, s'] of the Lagrange basis on s, s_prev.) Every
    quantity is linear in y, D, U and the previous step's values, so each model evaluation is one
    row: from the second row on the state is in the y buffer (the model evaluates there), the x
    buffer holds cud_prev (or D_prev before a final step to s = 0) and one history slot d_prev.
    Written in the 've' coordinates: on k-diffusion noise levels (alpha = 1) exactly ComfyUI's
    formula for non-flow models."""

    num_slots = 1
    order = 1

    def __init__(self, history_weight: float = 0.25, zero_weight=1.0, uncond_history_weight: float = 0.1,
                 ode_space: str = "auto"):
        def finite(v, name):
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
            return v
        self.history_weight = finite(history_weight, "history_weight")
        self.zero_weight = None if zero_weight is None else finite(zero_weight, "zero_weight")
        self.uncond_history_weight = finite(uncond_history_weight, "uncond_history_weight")
        self.ode_space = ode_space

    def rows(self, grid: Grid) -> List[Row]:
        from .multistep import lms_coefficients

        self._check(grid)
        N = grid.steps
        s = [float(v) for v in grid.ksigma]
        points = [grid_point(grid, i) for i in range(N + 1)]
        c = [ode_scale("ve", p.alpha, p.sigma) for p in points]
        hw, zw, wu = self.history_weight, self.zero_weight, self.uncond_history_weight
        rows: List[Row] = []
        for i in range(N):
            ci, si, sn, cn = c[i], s[i], s[i + 1], c[i + 1]
            dt = sn - si
            last = i == N - 1
            E_in = "x" if i == 0 else "y"
            # E_i = eE * E + D + eU * U + eA * A   (E: the state buffer c_i y_i, A: the x buffer, cud_prev)
            k = wu * dt / (si - s[i - 1]) if (i > 0 and wu) else 0.0
            eE, eU, eA = sn * (1.0 + k) / (ci * si) - 1.0 / ci, -sn * (1.0 + k) / si, -sn * k
            if i == 0:
                m, hc = 1.0, 0.0                    # y' = y + E_i
            else:
                c0, c1 = lms_coefficients(s, i, 2)
                m, hc = (1.0 - hw) + hw * c0 / dt, hw * c1
            # y' = E/c_i + m E_i + hc d_prev
            yE, yD, yU, yA, yH = 1.0 / ci + m * eE, m, m * eU, m * eA, hc
            if sn == 0.0 and zw is not None and i > 0:       # A holds D_prev here
                r = si / (si - s[i - 1])
                yE, yD, yU, yA, yH = ((1.0 - zw) * yE, (1.0 - zw) * yD + zw * (1.0 - r), (1.0 - zw) * yU,
                                      (1.0 - zw) * yA + zw * r, (1.0 - zw) * yH)
            hist = ((0, cn * yH),) if yH else ()
            if i == 0:   # E is the x buffer: its coefficient goes in 'x' (the eval point is the state)
                state = Out(x=cn * yE, h=cn * yD, hu=cn * yU, hist=hist)
            else:
                state = Out(x=cn * yA, y=cn * yE, h=cn * yD, hu=cn * yU, hist=hist)
            if last:
                rows.append(Row(step=i, eval_at=E_in, point=points[i], q_y=0.0, q_x0=1.0, out_x=state,
                                next_eval="x"))
                continue
            next_is_zero = s[i + 2] == 0.0 and zw is not None
            if next_is_zero:
                aux = Out(h=1.0)                                         # D_i
            elif i == 0:
                aux = Out(x=1.0 / (ci * si), hu=-1.0 / si)               # cud_i
            else:
                aux = Out(y=1.0 / (ci * si), hu=-1.0 / si)
            if i == 0:
                d = Out(x=eE / dt, h=1.0 / dt, hu=eU / dt)
            else:
                d = Out(x=eA / dt, y=eE / dt, h=1.0 / dt, hu=eU / dt)
            rows.append(Row(step=i, eval_at=E_in, point=points[i], q_y=0.0, q_x0=1.0, out_x=aux, out_y=state,
                            hist_write=0, hist_out=d, next_eval="y"))
        return rows
