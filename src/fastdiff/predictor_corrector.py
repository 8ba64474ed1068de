"""Predictor-corrector sampling (Song et al. 2021, score-SDE, Algorithms 4 and 5).

After each step of any fastdiff solver (the predictor) that lands at a noisy point, ``corrector_steps``
Langevin MCMC steps at that noise level pull the sample towards p_t:

    g = score = grad_x log p_t(x) = -eps / sigma          (from the model output)
    z ~ N(0, I)
    e = 2 a (snr * ||z|| / ||g||)^2                        (per sample)
    x <- x + e g + sqrt(2 e) z

``a`` is Algorithm 5's alpha_i = 1 - beta_i for VP schedules (the training betas of a
``DiscreteVP`` at the nearest integer time; for ``ContinuousVP`` the score-SDE code's N = 1000
discretisation, 1 - beta(t)/1000) and 1 for others (Algorithm 4, VE). The paper writes the
norms per sample; the score-SDE reference code averages both norms over the batch before the
ratio (``norm="batch"``). The state is the schedule's native x (VE: x = x0 + sigma eps; VP:
x = alpha x0 + sigma eps), as in the score-SDE code. No corrector runs at sigma = 0.

The predictor's rows run through ``fastdiff.ops.fused_step``; the corrector is a per-sample
reduction (``fastdiff.ops.reductions.per_sample_norm``) and one elementwise update. Non-finite
values raise ``FloatingPointError`` naming the first bad step (flags kept on the device, read
once at the end).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .adaptive import RowRunner, _initial_state
from .ops.reductions import per_sample_norm
from .parameterization import eps_coefficients
from .program import Point
from .schedules import ContinuousVP, DiscreteVP, Grid, Schedule, make_grid
from .solvers import Solver, get_solver
from .solvers.base import grid_point

__all__ = ["sample_pc", "langevin_step_size", "langevin_alpha"]

NORMS = ("sample", "batch")
#: Corrector draws use Philox noise ids from here on (solvers number their draws from 0).
CORRECTOR_NOISE_BASE = 1 << 31


def langevin_alpha(schedule: Schedule, point: Point) -> float:
    """Algorithm 5's alpha_i at a point (1.0 for non-VP schedules: Algorithm 4)."""
    if isinstance(schedule, DiscreteVP):
        i = int(np.clip(round(point.t), 0, schedule.num_train_timesteps - 1))
        return float(1.0 - schedule.betas[i])
    if isinstance(schedule, ContinuousVP):
        beta = schedule.beta_min + point.t * (schedule.beta_max - schedule.beta_min)
        return 1.0 - beta / 1000.0
    return 1.0


def langevin_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: float = 1.0,
                       norm: str = "sample") -> torch.Tensor:
    """e = 2 alpha (snr ||noise|| / ||score||)^2 as a [B] tensor (``norm="batch"``: the norms
    averaged over the batch first, as the score-SDE code does; every sample gets the same e)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    g_norm, z_norm = per_sample_norm(score), per_sample_norm(noise)
    if norm == "batch":
        g_norm, z_norm = g_norm.mean().expand_as(g_norm), z_norm.mean().expand_as(z_norm)
    return 2.0 * alpha * (snr * z_norm / g_norm) ** 2


@torch.no_grad()
def sample_pc(model: Callable, noise: torch.Tensor, *, predictor: Union[str, Solver] = "euler_maruyama",
              steps: int = 20, schedule: Optional[Schedule] = None, grid: Optional[Grid] = None,
              spacing: str = "auto", final: str = "zero", prediction: str = "epsilon", snr: float = 0.16,
              corrector_steps: int = 1, norm: str = "sample", solver_options: Optional[dict] = None,
              seed: Optional[int] = None, model_kwargs: Optional[dict] = None, backend: str = "auto",
              state_dtype: torch.dtype = torch.float32, model_dtype: Optional[torch.dtype] = None,
              x_init: Optional[torch.Tensor] = None, grid_options: Optional[dict] = None) -> Tuple[torch.Tensor, Dict]:
    """Sample with ``predictor`` (any fastdiff solver, with ``solver_options``) and Langevin
    corrector steps after every predictor step that ends at a noisy point.

    The grid arguments are those of ``fastdiff.sample``. ``snr`` is the signal-to-noise ratio r
    of the corrector (score-SDE: 0.16 for VE CIFAR-10), ``corrector_steps`` the number M of
    Langevin steps per noise level, ``norm`` 'sample' (the paper) or 'batch' (the score-SDE
    code). Noise is Philox from ``seed`` (predictor draws by their row's noise_id, corrector
    draws from CORRECTOR_NOISE_BASE on). Returns ``(x, info)`` with info['nfe'] (predictor +
    corrector model calls) and info['corrector_nfe']."""
    solver = get_solver(predictor, **(solver_options or {}))
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not (math.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be a finite number > 0, got {snr!r}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an int >= 0, got {corrector_steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if grid is None:
        schedule = DiscreteVP() if schedule is None else schedule
        grid = make_grid(schedule, steps, spacing, final=final, **(grid_options or {}))
    elif schedule is not None or grid_options:
        raise ValueError("pass either grid or (schedule, steps, spacing, ...), not both")
    schedule = grid.schedule

    x = _initial_state(noise, schedule, grid_point(grid, 0), state_dtype, x_init)
    runner = RowRunner(model, x, prediction, model_kwargs=model_kwargs, model_dtype=model_dtype, backend=backend)
    rows = solver.rows(grid)
    _, table = runner.compile(rows, solver.num_slots)
    y = torch.empty_like(x)
    K = solver.num_slots
    hist = torch.zeros((K,) + x.shape, dtype=x.dtype, device=x.device) if K else None
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    B = x.shape[0]
    bshape = (B,) + (1,) * (x.dim() - 1)
    # Non-finite values, flagged on the device (no host sync per step) and read once at the end:
    # the predictor's rows by the fused step's flag, the corrector's updates by the first step
    # after which x is not finite.
    bad_row = torch.zeros(1, dtype=torch.int32, device=x.device)
    bad_corrector = torch.zeros((), dtype=torch.int64, device=x.device)

    for i, r in enumerate(rows):
        D = runner.evaluate(r.point, y if r.eval_at == "y" else x) if r.needs_model else None
        runner.step(table, i, r, x, y, hist, D, seed=seed, bad_row=bad_row, rows=rows)
        if i + 1 < len(rows) and rows[i + 1].step == r.step:
            continue
        p = grid_point(grid, r.step + 1)
        if p.sigma == 0.0:
            continue
        E_x, E_d = (float(v) for v in eps_coefficients(runner.prediction, p.alpha, p.sigma))
        a = langevin_alpha(schedule, p)
        for j in range(corrector_steps):
            D = runner.evaluate(p, x).to(x.dtype)
            score = (E_x * x + E_d * D) * (-1.0 / p.sigma)
            z = ops.philox_normal(x.shape, seed, CORRECTOR_NOISE_BASE + r.step * corrector_steps + j,
                                  device=x.device).to(x.dtype)
            e = langevin_step_size(score, z, snr, a, norm).reshape(bshape)
            x += e * score + torch.sqrt(2.0 * e) * z
        if corrector_steps:
            bad_corrector = torch.where((bad_corrector == 0) & ~torch.isfinite(x).all(), r.step + 1, bad_corrector)
    _check_finite(rows, grid, int(bad_row.item()), int(bad_corrector.item()))
    info = {"nfe": runner.nfe, "corrector_nfe": runner.nfe - sum(r.needs_model for r in rows)}
    return x, info


def _check_finite(rows, grid: Grid, bad_row: int, bad_corrector: int) -> None:
    """FloatingPointError naming the first step that wrote NaN/Inf: ``bad_row`` is the fused
    step's flag (1 + row), ``bad_corrector`` 1 + the first step whose corrector left x non-finite."""
    if not bad_row and not bad_corrector:
        return
    inf = float("inf")
    pred = rows[bad_row - 1].step if bad_row else inf
    corr = bad_corrector - 1 if bad_corrector else inf
    step, part = (pred, "predictor") if pred <= corr else (corr, "Langevin corrector")
    raise FloatingPointError(
        f"non-finite values (NaN/Inf) in the sample at step {step} ({part}, noise level "
        f"sigma={float(grid.sigma[step + 1 if part != 'predictor' else step]):.4g}): the model output or the "
        "sampler diverged there; check the model at that noise level (or lower snr)")
