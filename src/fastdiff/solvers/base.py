"""Solver base class, registry and the small pieces of math solvers share.

A solver turns a Grid into a list of ``Row`` s (fastdiff.program). It never touches a tensor:
the rows are float64 numbers computed once on the host, executed later by a fused kernel.

Conventions every solver follows:

* The state x lives in the schedule's native space, x = alpha*x0 + sigma*eps.
* ``h`` (the row's quantity, stored in history) is written as ``q_y * E + q_x0 * x0`` where E
  is the point the model was evaluated at.
* Runge-Kutta-type solvers (Euler, Heun, RK4, LMS, DPM-2) integrate the probability-flow ODE
  ``dy/ds = (y - x0) / s`` in coordinates y = x/c, s = sigma/c with c = alpha ("ve": k-diffusion
  and EDM) or c = alpha + sigma ("flow": rectified flow). Exponential integrators (DDIM, DPM-Solver,
  UniPC) are invariant to that choice and use (alpha, sigma, lambda) directly.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

from ..program import Out, Point, Row
from ..schedules import Grid

SOLVERS: Dict[str, Type["Solver"]] = {}
ODE_SPACES = ("ve", "flow")


def register(*names: str):
    def deco(cls):
        for n in names:
            if n in SOLVERS:
                raise RuntimeError(f"solver name {n!r} registered twice")
            SOLVERS[n] = cls
        cls.name = names[0]
        return cls
    return deco


def get_solver(name, **options) -> "Solver":
    """A solver by name (or an instance, returned as is)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError("options given together with a solver instance")
        return name
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(sorted(SOLVERS))}")
    cls = SOLVERS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        allowed = [p for p in params if p != "self"]
        raise ValueError(f"solver {name!r} has no option(s) {unknown}; its options: {allowed or 'none'}")
    return cls(**options)


class Solver:
    """Subclasses set ``order``, ``stochastic``, ``num_slots`` and implement ``rows(grid)``.

    ``order`` is the method's global order of accuracy on the probability-flow ODE: the slope the
    convergence tests measure (tests/test_convergence.py, tests/test_solver_zoo.py read it from
    here). It is not always a constructor option of the same name: UniPC's ``order`` option is the
    predictor's order p (diffusers' ``solver_order``) and its corrector makes the method order
    p + 1; diffusers' third-order DPM-Solver++ formula is order 2; stochastic samplers report 1.
    """

    name = "?"
    order = 1
    stochastic = False
    num_slots = 0

    def rows(self, grid: Grid) -> List[Row]:
        raise NotImplementedError

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


# ---------------------------------------------------------------------------------------------
# Shared math


def grid_point(grid: Grid, i: int) -> Point:
    return Point(float(grid.t[i]), float(grid.alpha[i]), float(grid.sigma[i]), float(grid.model_t[i]))


def ode_scale(space: str, alpha: float, sigma: float) -> float:
    """c of the ODE coordinates y = x/c, s = sigma/c."""
    return alpha if space == "ve" else alpha + sigma


def ode_s(space: str, alpha: float, sigma: float) -> float:
    return sigma / ode_scale(space, alpha, sigma)


def step_geometry(grid: Grid, n: int, space: str):
    """Step n's end points in the ODE coordinates of ``space``: (p0, p1, s0, s1, c0, c1)."""
    p0, p1 = grid_point(grid, n), grid_point(grid, n + 1)
    s0, s1 = ode_s(space, p0.alpha, p0.sigma), ode_s(space, p1.alpha, p1.sigma)
    c0, c1 = ode_scale(space, p0.alpha, p0.sigma), ode_scale(space, p1.alpha, p1.sigma)
    return p0, p1, s0, s1, c0, c1


def set_noise_options(solver: "Solver", eta: float, s_noise: float, ode_space: str = "auto") -> None:
    """The options of an ancestral (eta, s_noise) solver in ODE coordinates, checked; it is
    stochastic where both are > 0."""
    solver.eta = check_eta(eta)
    solver.s_noise = check_eta(s_noise, "s_noise")
    solver.ode_space = ode_space
    solver.stochastic = solver.eta > 0 and solver.s_noise > 0


def point_at_s(grid: Grid, space: str, s: float) -> Point:
    """The off-grid point whose ODE noise level (in ``space``) is s."""
    ks = s if space == "ve" else (math.inf if s >= 1.0 else s / (1.0 - s))
    t, a, sg, mt = grid.point_at_ksigma(np.float64(ks))
    return Point(float(t), float(a), float(sg), float(mt))


def derivative_quantity(space: str, p: Point):
    """(q_y, q_x0) of d = (y - x0)/s = E/sigma - (c/sigma) x0 at point p."""
    c = ode_scale(space, p.alpha, p.sigma)
    return 1.0 / p.sigma, -c / p.sigma


def eps_quantity(p: Point):
    """(q_y, q_x0) of eps = (E - alpha x0) / sigma."""
    return 1.0 / p.sigma, -p.alpha / p.sigma


def check_space(space: str, grid: Grid) -> str:
    if space == "auto":
        space = grid.schedule.ode_space
    if space not in ODE_SPACES:
        raise ValueError(f"ode_space must be 'auto', 've' or 'flow', got {space!r}")
    if space == "ve" and not np.all(np.isfinite(grid.ksigma[:-1])):
        raise ValueError("ode_space='ve' needs finite noise levels (alpha > 0) at every evaluated point; "
                         "this grid starts at alpha = 0 (e.g. flow t = 1): use ode_space='flow' or t_max < 1")
    return space


def ancestral_step(s: float, s_next: float, eta: float = 1.0):
    """k-diffusion's get_ancestral_step: (s_down, s_up) splitting the step into a deterministic
    part down to s_down and fresh noise of std s_up."""
    if not eta:
        return s_next, 0.0
    s_up = min(s_next, eta * math.sqrt(max(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2, 0.0)))
    s_down = math.sqrt(max(s_next ** 2 - s_up ** 2, 0.0))
    return s_down, s_up


def check_eta(eta: float, name: str = "eta") -> float:
    eta = float(eta)
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"{name} must be a finite number >= 0, got {eta}")
    return eta


def check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def history_terms(n: int, coefs: Sequence[float], size: int) -> Tuple[float, Tuple[Tuple[int, float], ...]]:
    """A combination sum_j coefs[j] * m_{n-j} of this step's quantity (j = 0: the row's h) and
    earlier ones, kept in ``size`` history slots used as a ring buffer (m_k lives in slot k % size).
    Returns (h coefficient, Out.hist)."""
    hist = tuple(((n - j) % size, float(c)) for j, c in enumerate(coefs) if j > 0 and c != 0.0)
    return float(coefs[0]), hist


def ring_write(n: int, steps: int, size: int) -> int:
    """The slot step n writes its quantity into (none after the last step)."""
    return n % size if size and n < steps - 1 else -1


def check_order(order, allowed: Sequence[int], name: str = "order") -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {order!r}")
    return int(order)


# ---------------------------------------------------------------------------------------------
# Rows edited for a host library's conventions (the diffusers drop-ins): every Row is built here,
# in fastdiff.solvers, never by a caller.

def relabel(row: Row, step: int, *, noise_id: Optional[int] = None, hist_write: Optional[int] = None) -> Row:
    """``row`` as step ``step`` of another program (a solver's one-step grid placed in a longer
    run), with its noise draw and history slot renamed where given; coefficients unchanged."""
    return dataclasses.replace(row, step=step, noise_id=row.noise_id if noise_id is None else noise_id,
                               hist_write=row.hist_write if hist_write is None else hist_write)


def with_noise(row: Row, z: float, noise_id: int) -> Row:
    """``row`` whose new x takes ``z`` times the standard normal draw ``noise_id`` (z = 0 and
    noise_id = -1: no noise), e.g. a host library's own variance or its noiseless final step."""
    return dataclasses.replace(row, out_x=dataclasses.replace(row.out_x, z=float(z)), noise_id=noise_id)


def merge_churn(churn: Optional[Row], step: Row, x0_fold: Tuple[float, float]) -> Row:
    """One row for a churn row (y = a x + c z) and the step row after it (x' = o.x y + o.h h,
    h = q_y y + q_x0 x0, x0 = A_x y + A_d D, ``x0_fold`` = (A_x, A_d)), the model evaluated at the
    unchurned x (as diffusers' EDMEulerScheduler evaluates it): with T = o.x + o.h (q_y + q_x0 A_x),
    x' = T (a x + c z) + o.h q_x0 A_d D, i.e. the same h read at x, x coefficient
    T a - o.h (q_y + q_x0 A_x) and noise coefficient T c. ``churn`` None: ``step`` itself."""
    if churn is None:
        return step
    a, c = churn.out_x.x, churn.out_x.z
    o = step.out_x
    dh = o.h * (step.q_y + step.q_x0 * x0_fold[0])
    return dataclasses.replace(step, out_x=dataclasses.replace(o, x=(o.x + dh) * a - dh, z=(o.x + dh) * c),
                               noise_id=churn.noise_id)
