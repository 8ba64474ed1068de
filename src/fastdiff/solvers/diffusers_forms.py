"""Step forms that exist only to match diffusers' schedulers to their last rounding.

The diffusers drop-ins (fastdiff.integrations.diffusers) map a scheduler's config to a grid, a
solver and its options; where diffusers' arithmetic is not one of fastdiff's solvers, the rows
come from here, so that no drop-in builds a ``Row`` itself:

* ``identity_row``: a zero-length step (a noise level repeated in diffusers' schedule) taken as
  the identity, the model still called; ``with_identity_steps`` / ``unipc_with_identity_steps``
  put such calls into the rows of a grid that left the repeated levels out.
* ``singlestep_dpm_rows``: diffusers' singlestep DPM-Solver, whose stages are the grid's own points.
* ``repaint_row`` / ``repaint_rows``: RePaint's DDIM(eta) posterior step with the known region's
  noise beside it.

(DDIM with its raw noise estimate in a history slot, which the DDIM, DDIM-inversion and RePaint
drop-ins share, is ``exponential.ddim_raw_eps_row``; LMS with diffusers' order rule is
``multistep.lms_rows``; UniPC's corrector alone is ``multistep.unic_rows``.)
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..program import Out, Point, Row
from ..schedules import Grid
from .base import eps_quantity, grid_point, history_terms, ring_write
from .exponential import X0_QUANTITY, ddim_data, ddim_eps, ddim_raw_eps_row, half_log_snr


def identity_row(step: int, point: Point) -> Row:
    """x' = x: a zero-length step as diffusers' first-order updates take it (the model is evaluated
    at ``point``, as diffusers calls it, and its output is not used: q_y = q_x0 = 0)."""
    return Row(step=step, eval_at="x", point=point, q_y=0.0, q_x0=0.0, out_x=Out(x=1.0), next_eval="x")


def with_identity_steps(rows: List[Row], repeats: Sequence[int]) -> List[Row]:
    """First-order ``rows`` of a grid that left out repeated noise levels, with the zero-length
    steps there taken as the identity, as diffusers' first-order updates take them (the model is
    still called, its output unused). ``repeats``: the calls (of the run) whose step is zero-length."""
    if not repeats:
        return rows
    out, real = [], iter(rows)
    pending = next(real)
    for call in range(len(rows) + len(repeats)):
        if call in repeats:
            out.append(identity_row(call, pending.point))
        else:
            out.append(replace(pending, step=call))
            pending = next(real, None)
    return out


def unipc_with_identity_steps(rows: List[Row], repeats: Sequence[int]) -> List[Row]:
    """First-order UniPC rows of a grid that left out repeated noise levels, with diffusers' calls
    there: at a zero-length step j diffusers applies the corrector of step j - 1 (with the model
    output of call j) and predicts the identity; call j + 1 corrects that by the identity (its
    step size is 0) and predicts the next step from the model output of call j + 1. So row j of
    the grid splits in two: its corrector (out_x, also written to y), then its predictor (out_y
    with the corrector taken out: out_y = a * out_x + b * D)."""
    if not repeats:
        return rows
    out, real = [], iter(rows)
    pending = next(real)
    calls = len(rows) + len(repeats)
    for call in range(calls):
        if call not in repeats:
            out.append(replace(pending, step=call))
            pending = next(real, None)
            continue
        r = pending
        corrected = r.out_x if r.out_x is not None else Out(x=1.0)      # (a disabled corrector: Out(y=1))
        ok = r.out_y is not None and r.next_eval == "y" and r.out_y.z == 0.0 and (corrected.x or corrected.y) \
            and call + 1 not in repeats
        if ok:
            a = r.out_y.x / corrected.x if corrected.x else r.out_y.y / corrected.y
            b = r.out_y.h - a * corrected.h
            close = lambda u, v: math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12)  # noqa: E731
            want = dict((j, a * v) for j, v in corrected.hist)
            ok = close(r.out_y.x, a * corrected.x) and close(r.out_y.y, a * corrected.y) and \
                all(close(v, want.get(j, 0.0)) for j, v in r.out_y.hist) and len(r.out_y.hist) >= len(want)
        if not ok:
            raise ValueError(f"this run's schedule repeats a noise level at call {call} (a zero-length step), which "
                             "fastdiff's UniPC does not take there; choose another number of steps or timestep spacing")
        out.append(replace(r, step=call, out_y=corrected, next_eval="y"))
        pending = replace(r, eval_at="y", out_x=Out(x=1.0), out_y=Out(x=a, h=b), next_eval="y")
    return out


def singlestep_dpm_rows(grid: Grid, orders: Sequence[int], algorithm: str, solver_type: str,
                        slots: int) -> List[Row]:
    """diffusers' singlestep DPM-Solver as a coefficient program: call n (effective order
    ``orders[n]``) steps from its group's start g = n - orders[n] + 1 (kept in x) to point n + 1,
    with the model quantities m of calls g..n (x0, or eps for 'dpmsolver'): a group's first call
    (order 1) is a first-order step from the sample itself, its later calls are evaluated at
    the previous call's estimate (y) and restart from x. A call writes y while its group
    continues, x when it ends. With h = lambda_{n+1} - lambda_g, r_0 = (lambda_n - lambda_g) / h
    (order 2; order 3: r_0 = (lambda_n - lambda_{n-2}) / h, r_1 = (lambda_{n-1} - lambda_{n-2}) / h):

        dpmsolver++      x' = sigma_q/sigma_g x - alpha_q (e^{-h} - 1) D0 + c1 D1 (+ c2 D2)
        dpmsolver        x' = alpha_q/alpha_g x - sigma_q (e^h - 1) D0 + ...
        sde-dpmsolver++  x' = sigma_q/sigma_g e^{-h} x + alpha_q (1 - e^{-2h}) D0 + ... + sigma_q sqrt(1 - e^{-2h}) z

    with D0 = m_g, D1 = (m_n - m_{n-1}) / r_0 (order 2), and diffusers' order-3 D1, D2 built from
    D1_0 = (m_{n-1} - m_{n-2}) / r_1, D1_1 = (m_n - m_{n-2}) / r_0; 'midpoint' takes c1 = 1/2 of
    the first-order coefficient on D1 (order 2) and c1 D1_1 without a D2 term (its third-order
    variant), 'heun' the phi-function coefficients c1, c2 (scheduling_dpmsolver_singlestep.py).
    The first-order calls are fastdiff's ``ddim_data`` / ``ddim_eps`` (exact at sigma_q = 0)."""
    points = [grid_point(grid, i) for i in range(len(grid.t))]
    lam = [half_log_snr(p) for p in points]
    eps = algorithm == "dpmsolver"
    sde = algorithm == "sde-dpmsolver++"
    N = len(orders)
    rows = []
    for n, k in enumerate(orders):
        p, q = points[n], points[n + 1]
        quantity = eps_quantity(p) if eps else X0_QUANTITY
        z = 0.0
        if k == 1:
            if eps:
                a, b = ddim_eps(p, q)
            else:
                a, b, z = ddim_data(p, q, 1.0 if sde else 0.0)
            m = [b]
        else:
            s = points[n - k + 1]
            h = lam[n + 1] - lam[n - k + 1]
            if eps:
                a = q.alpha / s.alpha
                c0, c1, c2 = -q.sigma * math.expm1(h), -q.sigma * (math.expm1(h) / h - 1.0), \
                    -q.sigma * ((math.expm1(h) - h) / h ** 2 - 0.5)
                c1_mid = -0.5 * q.sigma * math.expm1(h)
            elif sde:
                a = q.sigma / s.sigma * math.exp(-h)
                e2 = -math.expm1(-2.0 * h)                                     # 1 - e^{-2h}
                c0, c1, c2 = q.alpha * e2, q.alpha * (e2 / (-2.0 * h) + 1.0), \
                    q.alpha * ((e2 - 2.0 * h) / (4.0 * h * h) - 0.5)
                c1_mid = 0.5 * q.alpha * e2
                z = q.sigma * math.sqrt(e2)
            else:
                a = q.sigma / s.sigma
                c0, c1, c2 = -q.alpha * math.expm1(-h), q.alpha * (math.expm1(-h) / h + 1.0), \
                    -q.alpha * ((math.expm1(-h) + h) / h ** 2 - 0.5)
                c1_mid = -0.5 * q.alpha * math.expm1(-h)
            # D terms as combinations of (m_n, m_{n-1}, m_{n-2}), as diffusers writes them
            if k == 2:
                r0 = (lam[n] - lam[n - 1]) / h
                D0, D1 = np.array([0.0, 1.0, 0.0]), np.array([1.0, -1.0, 0.0]) / r0
                m = c0 * D0 + (c1_mid if solver_type == "midpoint" else c1) * D1
            else:
                r0, r1 = (lam[n] - lam[n - 2]) / h, (lam[n - 1] - lam[n - 2]) / h
                D0 = np.array([0.0, 0.0, 1.0])
                D1_0, D1_1 = np.array([0.0, 1.0, -1.0]) / r1, np.array([1.0, 0.0, -1.0]) / r0
                D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
                D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
                m = c0 * D0 + (c1 * D1_1 if solver_type == "midpoint" else c1 * D1 + c2 * D2)
        h_coef, hist = history_terms(n, list(m[:k]), slots)
        continues = n + 1 < N and orders[n + 1] > 1
        out = Out(x=a if k > 1 else 0.0, y=0.0 if k > 1 else a, h=h_coef, hist=hist, z=z)
        rows.append(Row(step=n, eval_at="x" if k == 1 else "y", point=p, q_y=quantity[0], q_x0=quantity[1],
                        out_x=None if continues else out, out_y=out if continues else None,
                        hist_write=ring_write(n, N, slots), noise_id=n if z else -1,
                        next_eval="y" if continues else "x"))
    return rows


def repaint_row(step: int, t: int, alpha_prod: float, alpha_prod_prev: float, eta: float) -> Row:
    """RePaint's step at training timestep t (diffusers' RePaintScheduler.step, its arithmetic):

        std   = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
        x'    = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps_raw + std z    (z only if t > 0)
        y'    = sqrt(1 - abar_prev) z                                             (the known part's noise)

    the DDIM(eta) posterior update with the raw noise estimate in history slot 0
    (``ddim_raw_eps_row``), the model evaluated at (alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)).
    Every call draws its noise (noise_id = step), as diffusers draws it also where it is unused."""
    variance = (1.0 - alpha_prod_prev) / (1.0 - alpha_prod) * (1.0 - alpha_prod / alpha_prod_prev)
    std = eta * math.sqrt(variance)
    rest = 1.0 - alpha_prod_prev - std * std
    if rest < 0.0:
        if rest < -1e-12:
            raise ValueError(f"eta={eta:g} is too large at timestep {t}: 1 - alpha_prod_prev - std^2 = {rest:.3g} < 0 "
                             "(diffusers' direction coefficient is its square root: NaN)")
        rest = 0.0
    point = Point(float(t), math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod), float(t))
    return ddim_raw_eps_row(step, point, math.sqrt(alpha_prod_prev), math.sqrt(rest),
                            noise_std=std if (t > 0 and eta > 0) else 0.0, noise_id=step,
                            out_y=Out(z=math.sqrt(1.0 - alpha_prod_prev)))


def repaint_rows(timesteps: Sequence[int], alpha_prods: Sequence[float], alpha_prods_prev: Sequence[float],
                 eta: float) -> List[Row]:
    """One ``repaint_row`` per call n at training timestep ``timesteps[n]`` (abar_t, abar_prev given
    per call). RePaint's jumps revisit timesteps (4,570 calls for 250 steps with jumps of 10 x 10):
    a revisit shares the first visit's outputs and point, so the program is built once per level."""
    first: Dict[Tuple[int, float, float], Row] = {}
    rows = []
    for n, key in enumerate(zip(timesteps, alpha_prods, alpha_prods_prev)):
        row = first.get(key)
        if row is None:
            first[key] = row = repaint_row(n, key[0], key[1], key[2], eta)
        else:
            row = Row(step=n, eval_at="x", point=row.point, q_y=0.0, q_x0=1.0, out_x=row.out_x, out_y=row.out_y,
                      noise_id=n, next_eval="x")
        rows.append(row)
    return rows
