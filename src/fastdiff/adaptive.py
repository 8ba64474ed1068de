"""Adaptive step size: a step-size controller, kept separate from the solvers, and two drivers.

* ``sample_dpm_adaptive``: DPM-Solver-12 / DPM-Solver-23 (Lu et al. 2022, Algorithm 4), as
  k-diffusion's ``sample_dpm_adaptive``: each step computes a lower- and a higher-order
  solution that share their model evaluations, and their difference drives the controller.
* ``sample_step_doubling``: error control for any registered one-step deterministic solver:
  one full step against two half steps (optionally keeping the Richardson-extrapolated result).

Both step in lambda = -log(ksigma) (ksigma = sigma/alpha, k-diffusion's sigma) from
``ksigma_max`` down to ``ksigma_min`` and measure errors in k-diffusion's coordinates x/alpha, so
on any schedule they take the steps k-diffusion takes on the equivalent denoiser. Like
k-diffusion they stop at ``ksigma_min`` (no final denoising step).

Every step is a handful of ``Row`` s built on the host on the fly (from the solver's own
``rows()`` for step doubling) and executed by ``fastdiff.ops.fused_step``; only the
accept/reject decision reads a number back from the device (one ``error_norm`` per attempt).
The model evaluation at the start of a step is reused when the step is retried after a
rejection (k-diffusion evaluates it again), so NFE = model calls actually made.

Non-finite values (a NaN/Inf model output, a diverging state) raise ``FloatingPointError`` naming
the step and its noise levels, as soon as the error estimate of an attempt is not finite (which
reads no extra number back) and once at the end; k-diffusion's controller instead shrinks h to
NaN and never stops.

Models are ``model(x, t, **model_kwargs)`` as for ``fastdiff.sample``; for classifier-free
guidance wrap the two calls in one model (the drivers do not fuse CFG). ``backend`` selects the
fused step's backend; the error norm (a reduction) always dispatches automatically.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .ops.reductions import error_norm
from .parameterization import canonical_prediction
from .program import Point, Program, Row, compile_program
from .runtime import RowExecutor
from .sampler import _model_output
from .schedules import Grid, Schedule
from .solvers import Solver, get_solver
from .solvers.base import ancestral_step, check_eta, grid_point
from .solvers.dpm_solver import dpm_solver_pair_rows
from .solvers.stochastic import ancestral_noise_row

__all__ = ["PIDController", "RowRunner", "sample_dpm_adaptive", "sample_step_doubling", "dpm_solver_pair_rows"]


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return float(v)


class PIDController:
    """The PID step-size controller of k-diffusion's ``PIDStepSizeController`` (Söderlind's
    digital filters; pcoeff=0, icoeff=1, dcoeff=0 is the classic integral controller
    h <- h * (1/err)^(1/order)). ``order``: the local error estimate is O(h^order) (the
    embedded lower-order solution's order + 1: 3 for DPM-Solver-23, as k-diffusion passes;
    p + 1 for step doubling of an order-p method).

    ``propose(error)`` updates ``h`` and returns whether the step that produced ``error`` (a
    scaled norm, <= 1 means within tolerance) is accepted: the step-size factor, softened by
    the limiter 1 + atan(f - 1), must be at least ``accept_safety``."""

    def __init__(self, h: float, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 order: float = 1.0, accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = _positive("h_init", h)
        for name, c in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff)):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(float(c)):
                raise ValueError(f"{name} must be a finite number, got {c!r}")
        order = _positive("controller order", order)
        if not 0.0 < float(accept_safety) <= 1.0:
            raise ValueError(f"accept_safety must lie in (0, 1], got {accept_safety}")
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = float(accept_safety)
        self.eps = _positive("eps", eps)
        self.errs: List[float] = []

    @staticmethod
    def limiter(x: float) -> float:
        return 1 + math.atan(x - 1)

    def propose(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class RowRunner:
    """Executes rows of small programs built at run time, one fused step each, on buffers the
    caller owns; calls the model for the rows that need it and counts the calls (``nfe``).
    For drivers that decide their steps while sampling (adaptive, predictor-corrector)."""

    def __init__(self, model: Callable, like: torch.Tensor, prediction: str, *, model_kwargs=None,
                 model_dtype: Optional[torch.dtype] = None, backend: str = "auto", max_nfe: Optional[int] = None):
        self.model = model
        self.prediction = canonical_prediction(prediction)
        self.model_kwargs = dict(model_kwargs or {})
        self.shape = tuple(like.shape)
        self.state_dtype = like.dtype
        self.model_dtype = model_dtype or like.dtype
        self.time_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.device = like.device
        self.backend = backend
        self.max_nfe = max_nfe
        self.nfe = 0
        self._executors: Dict[tuple, RowExecutor] = {}

    def compile(self, rows: List[Row], num_slots: int) -> Tuple[Program, torch.Tensor]:
        prog = compile_program(rows, self.prediction, num_slots, steps=len({r.step for r in rows}))
        return prog, torch.from_numpy(prog.table).to(self.device)

    def evaluate(self, point: Point, E: torch.Tensor) -> torch.Tensor:
        """The model's output at state E and point ``point``."""
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise RuntimeError(f"reached max_nfe={self.max_nfe} model evaluations at noise level "
                               f"sigma/alpha={point.ksigma:.4g}; loosen rtol/atol or raise max_nfe")
        t = torch.full((self.shape[0],), float(point.model_t), dtype=self.time_dtype, device=self.device)
        out = _model_output(self.model(E.to(self.model_dtype), t, **self.model_kwargs))
        if tuple(out.shape) != self.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {self.shape} (its input's)")
        self.nfe += 1
        return out

    def step(self, table: torch.Tensor, i: int, row: Row, x: torch.Tensor, y=None, hist=None, D=None,
             noise=None, seed: int = 0, bad_row: Optional[torch.Tensor] = None, rows: Optional[List[Row]] = None) -> None:
        """Row ``i`` of ``table`` in place on x / y / hist, with model output D (None: no model).
        ``bad_row`` (int32 [1]): the kernel's non-finite flag, 1 + the first row that wrote NaN/Inf.
        ``rows``: the whole program ``table`` was compiled from (default: just ``row``, as row 0 of
        a one-row program)."""
        ex = self._executor(x, y, hist, bad_row, D)
        if rows is None:
            rows, table, i = [row], table[i:i + 1], 0
        if ex.table is not table or ex.rows is not rows:
            ex.bind(rows, table, 0 if hist is None else hist.shape[0])
        ex.run(i, D, None, noise, seed)

    def _executor(self, x, y, hist, bad_row, D) -> RowExecutor:
        """The executor bound to these buffers (drivers rotate a few state buffers: each keeps its
        executor, so the kernel is chosen and the buffers checked once, not at every row)."""
        key = tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype) for t in (x, y, hist, bad_row))
        key += (None if D is None else D.dtype,)
        ex = self._executors.pop(key, None)
        if ex is None:
            ex = RowExecutor(x, y=y, hist=hist, bad_row=bad_row, model_like=x if D is None else D,
                             backend=self.backend)
            if len(self._executors) >= 8:
                self._executors.pop(next(iter(self._executors)))
        self._executors[key] = ex          # (most recently used last)
        return ex

    def run(self, rows: List[Row], table: torch.Tensor, x, y=None, hist=None, first_output=None,
            start: int = 0, stop: Optional[int] = None) -> Optional[torch.Tensor]:
        """Rows start..stop-1 in order; the first model row uses ``first_output`` if given (an
        evaluation the caller already has). Returns that first model output."""
        first = None
        for i in range(start, len(rows) if stop is None else stop):
            r = rows[i]
            D = None
            if r.needs_model:
                if first is None and first_output is not None:
                    D = first_output
                else:
                    D = self.evaluate(r.point, y if r.eval_at == "y" else x)
                first = D if first is None else first
            self.step(table, i, r, x, y, hist, D, rows=rows)
        return first


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _point_at_lambda(schedule: Schedule, lam: float) -> Point:
    ks = np.float64(math.exp(-lam))
    t, a, s = (float(v) for v in schedule.point_at_ksigma(ks))
    return Point(t, a, s, float(schedule.model_time(t)))


def _ksigma_range(schedule: Schedule, ksigma_min, ksigma_max) -> Tuple[float, float]:
    lo = schedule.ksigma_min if ksigma_min is None else ksigma_min
    hi = schedule.ksigma_max if ksigma_max is None else ksigma_max
    lo, hi = _positive("ksigma_min", lo), _positive("ksigma_max", hi)
    if not (math.isfinite(hi) and lo < hi):
        raise ValueError(f"need 0 < ksigma_min < ksigma_max < inf (noise levels sigma/alpha), got {lo}, {hi}")
    return lo, hi


def _initial_state(noise, schedule: Schedule, p0: Point, state_dtype, x_init) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a non-empty batch dimension, got shape {tuple(noise.shape)}")
    if state_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
    if x_init is not None:
        if tuple(x_init.shape) != tuple(noise.shape):
            raise ValueError(f"x_init must have the shape of noise {tuple(noise.shape)}, got {tuple(x_init.shape)}")
        return x_init.to(state_dtype).clone().contiguous()
    return (noise.to(state_dtype) * schedule.init_noise_scale(p0.alpha, p0.sigma)).contiguous()


def _check_common(rtol, atol, max_nfe):
    _positive("rtol", rtol)
    _positive("atol", atol)
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
        raise ValueError(f"max_nfe must be an int >= 1, got {max_nfe!r}")


def _raise_nonfinite(info: Dict, ks_from: float, ks_to: Optional[float], model_output=None):
    """FloatingPointError for non-finite values met at accepted step ``info['n_accept']`` (the
    step from noise level ``ks_from`` to ``ks_to``; None: the state after the last step). A NaN
    error estimate would otherwise make the controller shrink h to NaN and never finish."""
    if model_output is not None and not bool(torch.isfinite(model_output).all()):
        cause = "the model output is NaN/Inf"
    else:
        cause = "the solver's state diverged (or the model output is NaN/Inf)"
    where = (f"step {info['n_accept']} (attempt {info['steps'] + 1}, from noise level sigma/alpha={ks_from:.4g} "
             f"towards {ks_to:.4g})" if ks_to is not None
             else f"step {max(info['n_accept'] - 1, 0)} (the state at the end, noise level sigma/alpha={ks_from:.4g})")
    raise FloatingPointError(f"non-finite values (NaN/Inf) at adaptive {where}: {cause}; check the model at that "
                             "noise level (step-size control cannot step past a NaN)")


def _check_final(x: torch.Tensor, info: Dict, ks: float) -> None:
    if not bool(torch.isfinite(x).all()):
        _raise_nonfinite(info, ks, None)


# ---------------------------------------------------------------------------------------------
# DPM-Solver-12 / 23


@torch.no_grad()
def sample_dpm_adaptive(model: Callable, noise: torch.Tensor, *, schedule: Schedule, prediction: str = "epsilon",
                        ksigma_min: Optional[float] = None, ksigma_max: Optional[float] = None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                        icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                        s_noise: float = 1.0, noise_sampler: Optional[Callable] = None, seed: Optional[int] = None,
                        max_nfe: int = 1000, model_kwargs: Optional[dict] = None, backend: str = "auto",
                        state_dtype: torch.dtype = torch.float32, model_dtype: Optional[torch.dtype] = None,
                        x_init: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict]:
    """DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) with adaptive steps, as
    k-diffusion's ``sample_dpm_adaptive`` (same defaults, controller and accept/reject rule).

    ``noise`` is standard normal (scaled like ``fastdiff.sample`` does; or pass ``x_init``);
    ``ksigma_min``/``ksigma_max`` the noise levels sigma/alpha to integrate between (default:
    the schedule's range). ``eta > 0``: ancestral steps (DPM-Solver to sigma_down, then fresh
    noise; Philox noise from ``seed``, or ``noise_sampler(row, x) -> tensor`` where
    ``row.step`` counts the accepted steps). Returns ``(x at ksigma_min, info)`` with info keys
    ``nfe`` (model calls made), ``n_accept``, ``n_reject``, ``steps`` (attempts) and
    ``ksigmas`` (the accepted noise levels, starting with ksigma_max)."""
    if order not in (2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    _check_common(rtol, atol, max_nfe)
    eta = check_eta(eta)
    s_noise = check_eta(s_noise, "s_noise")
    ks_min, ks_max = _ksigma_range(schedule, ksigma_min, ksigma_max)
    lam, lam_end = -math.log(ks_max), -math.log(ks_min)
    p0 = _point_at_lambda(schedule, lam)
    x = _initial_state(noise, schedule, p0, state_dtype, x_init)
    runner = RowRunner(model, x, prediction, model_kwargs=model_kwargs, model_dtype=model_dtype, backend=backend,
                       max_nfe=max_nfe)
    pid = PIDController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    if eta and noise_sampler is None and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    from .ops import as_int
    seed = 0 if seed is None else as_int("seed", seed, 0, 2 ** 64)

    K = order - 1
    y, hist = torch.empty_like(x), torch.zeros((K,) + x.shape, dtype=x.dtype, device=x.device)
    x_prev = x / p0.alpha                        # k-diffusion: the previous lower-order solution, x/alpha
    spare, low = torch.empty_like(x), torch.empty_like(x)
    D0 = None                                    # the model output at (x, lam), kept across rejections
    info = {"nfe": 0, "n_accept": 0, "n_reject": 0, "steps": 0, "ksigmas": [ks_max]}
    while lam < lam_end - 1e-5:
        lam_t = min(lam_end, lam + pid.h)
        if eta:
            sd, su = ancestral_step(math.exp(-lam), math.exp(-lam_t), eta)
            lam_d = min(lam_end, -math.log(sd)) if sd > 0 else lam_end
            su = math.sqrt(max(math.exp(-2 * lam_t) - math.exp(-2 * lam_d), 0.0))
        else:
            lam_d, su = lam_t, 0.0
        grid = Grid.from_ksigmas(schedule, [math.exp(-lam), math.exp(-lam_d)])
        pd = grid_point(grid, 1)
        rows = dpm_solver_pair_rows(grid, order)
        _, table = runner.compile(rows, K)
        x_high = spare.copy_(x)                  # (two state buffers in turn: their executors are reused)
        D0 = runner.run(rows, table, x_high, y, hist, first_output=D0, stop=len(rows) - 1)
        x_low = low.copy_(x)
        runner.run(rows, table, x_low, y, start=len(rows) - 1, hist=hist)
        # The error in k-diffusion's coordinates x/alpha.
        low_k, high_k = x_low / pd.alpha, x_high / pd.alpha
        error = float(error_norm(low_k, high_k, x_prev, rtol, atol))
        if not math.isfinite(error):
            _raise_nonfinite(info, math.exp(-lam), math.exp(-lam_t), D0)
        info["steps"] += 1
        if pid.propose(error):
            x_prev = low_k
            if su > 0:
                pt = _point_at_lambda(schedule, lam_t)
                noise_row = ancestral_noise_row(info["n_accept"], pt.alpha / pd.alpha, pt.alpha * su * s_noise)
                _, ntable = runner.compile([noise_row], 0)
                z = None
                if noise_sampler is not None:
                    z = noise_sampler(noise_row, x_high)
                    if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(x.shape):
                        raise ValueError(f"noise_sampler must return a tensor of shape {tuple(x.shape)}")
                runner.step(ntable, 0, noise_row, x_high, noise=z, seed=seed)
            x, spare, lam, D0 = x_high, x, lam_t, None
            info["n_accept"] += 1
            info["ksigmas"].append(math.exp(-lam))
        else:
            info["n_reject"] += 1
    info["nfe"] = runner.nfe
    _check_final(x, info, math.exp(-lam))
    return x, info


# ---------------------------------------------------------------------------------------------
# Step doubling


def carries_history(solver: Solver, schedule: Schedule) -> bool:
    """Whether ``solver``'s steps read history written by earlier steps (a multistep method),
    which a restart at every adaptive step would silently degrade to its starting method."""
    hi = schedule.ksigma_max if math.isfinite(schedule.ksigma_max) else 80.0
    rows = solver.rows(Grid.from_ksigmas(schedule, np.geomspace(hi, schedule.ksigma_min, 4)))
    written: Dict[int, set] = {}
    for r in rows:
        mine = written.setdefault(r.step, set())
        for out in (r.out_x, r.out_y):
            if out is not None and any(j not in mine for j in out.slots):
                return True
        mine.update(j for j, _ in r.writes)
    return False


@torch.no_grad()
def sample_step_doubling(model: Callable, noise: torch.Tensor, *, schedule: Schedule, solver="heun",
                         solver_options: Optional[dict] = None, prediction: str = "epsilon",
                         ksigma_min: Optional[float] = None, ksigma_max: Optional[float] = None,
                         rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                         icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                         extrapolate: bool = False, max_nfe: int = 1000, model_kwargs: Optional[dict] = None,
                         backend: str = "auto", state_dtype: torch.dtype = torch.float32,
                         model_dtype: Optional[torch.dtype] = None,
                         x_init: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict]:
    """Adaptive steps for a one-step deterministic solver by step doubling: each attempt takes
    one step of size h and two of size h/2 (halves in lambda), the difference of the two results
    is the error estimate (RMS norm with tolerance max(atol, rtol * max(|x_full|, |x|)), in the
    coordinates x/alpha), and the controller (order p + 1 for a solver of order p) accepts or
    shrinks. The first model evaluation is shared by both paths and kept across rejections.
    ``extrapolate=True`` keeps the Richardson extrapolation x_half + (x_half - x_full)/(2^p - 1)
    (local extrapolation: one order higher, its error no longer estimated).

    Returns ``(x at ksigma_min, info)`` like ``sample_dpm_adaptive``."""
    solver = get_solver(solver, **(solver_options or {}))
    if solver.stochastic:
        raise ValueError(f"step doubling needs a deterministic solver; {solver.name!r} is stochastic")
    if carries_history(solver, schedule):
        raise ValueError(f"step doubling needs a one-step solver; {solver.name!r} reads history from earlier "
                         "steps (a multistep method), which restarting every step would degrade")
    _check_common(rtol, atol, max_nfe)
    p = int(solver.order)
    ks_min, ks_max = _ksigma_range(schedule, ksigma_min, ksigma_max)
    lam, lam_end = -math.log(ks_max), -math.log(ks_min)
    ps = _point_at_lambda(schedule, lam)
    x = _initial_state(noise, schedule, ps, state_dtype, x_init)
    runner = RowRunner(model, x, prediction, model_kwargs=model_kwargs, model_dtype=model_dtype, backend=backend,
                       max_nfe=max_nfe)
    pid = PIDController(h_init, pcoeff, icoeff, dcoeff, p + 1, accept_safety)
    K = solver.num_slots
    y = torch.empty_like(x)
    hist = torch.zeros((K,) + x.shape, dtype=x.dtype, device=x.device) if K else None

    D0 = None
    full_buf, spare = torch.empty_like(x), torch.empty_like(x)
    info = {"nfe": 0, "n_accept": 0, "n_reject": 0, "steps": 0, "ksigmas": [ks_max]}
    while lam < lam_end - 1e-5:
        lam_t = min(lam_end, lam + pid.h)
        ks = [math.exp(-lam), math.exp(-0.5 * (lam + lam_t)), math.exp(-lam_t)]
        full, halves = Grid.from_ksigmas(schedule, [ks[0], ks[2]]), Grid.from_ksigmas(schedule, ks)
        x_full, x_half = full_buf.copy_(x), spare.copy_(x)   # (rotating buffers: executors reused)
        for grid, buf in ((full, x_full), (halves, x_half)):
            rows = solver.rows(grid)
            _, table = runner.compile(rows, K)
            D0 = runner.run(rows, table, buf, y, hist, first_output=D0)
        a_s, a_t = float(full.alpha[0]), float(full.alpha[1])
        error = float(error_norm(x_full / a_t, x_half / a_t, x / a_s, rtol, atol))
        if not math.isfinite(error):
            _raise_nonfinite(info, math.exp(-lam), math.exp(-lam_t), D0)
        info["steps"] += 1
        if pid.propose(error):
            if extrapolate:
                x_half += (x_half - x_full) / (2 ** p - 1)
            x, spare, lam, D0 = x_half, x, lam_t, None
            info["n_accept"] += 1
            info["ksigmas"].append(math.exp(-lam))
        else:
            info["n_reject"] += 1
    info["nfe"] = runner.nfe
    _check_final(x, info, math.exp(-lam))
    return x, info
