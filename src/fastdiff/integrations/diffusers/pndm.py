"""The PNDMScheduler drop-in (the default scheduler of Stable Diffusion 1.x checkpoints).

    from fastdiff.integrations.diffusers import PNDMScheduler
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' ``PNDMScheduler`` (config, ``set_timesteps``, ``timesteps``,
``add_noise`` are diffusers' own) whose ``step`` runs one fused pass of fastdiff's ``pndm``
solver (fastdiff.solvers.pndm): the pseudo Runge-Kutta warm-up (three steps of four calls, on
diffusers' interleaved ``prk_timesteps``) then PLMS, or with ``skip_prk_steps`` diffusers' pseudo
Heun first step then Adams-Bashforth of order 2, 3, 4. ``v_prediction`` combines the v
predictions and converts them at each step's start, as diffusers does.

diffusers steps from each timestep t to t - T // N (whatever the next timestep is): the drop-in
runs the schedules where these are the next timesteps (``timestep_spacing='leading'``, the default
and SD's, and 'trailing' when T // N divides T) and raises NotImplementedError naming
``timestep_spacing`` otherwise. A run begins at the first timestep (diffusers' PNDM counts calls,
so a run begun later, as img2img begins, applies the warm-up to whatever timesteps follow).
"""
from __future__ import annotations

import math
from typing import List

import diffusers
import numpy as np

from ...program import Point
from ...solvers import get_solver
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import DROP_INS, _check_prediction, _f64, _StepIndexed, _unsupported, _vp_fold, _vp_grid, _vp_schedule

__all__ = ["PNDMScheduler"]


@drop_in(diffusers.PNDMScheduler)
class PNDMScheduler(_StepIndexed, FastdiffScheduler, diffusers.PNDMScheduler):
    """PNDM / PLMS (fastdiff ``pndm``: warmup 'prk', or 'skip' with ``skip_prk_steps``)."""

    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        name = type(self).__name__
        if start:
            raise NotImplementedError(
                f"fastdiff's {name} runs a schedule from its first timestep; this run begins at call {start} "
                f"(img2img / set_begin_index), where diffusers' PNDMScheduler applies its warm-up to the later "
                f"timesteps by call count: use diffusers.PNDMScheduler for it")
        acp = _f64(self.alphas_cumprod)
        final = float(self.final_alpha_cumprod)
        T, N = self.config.num_train_timesteps, self.num_inference_steps
        delta = T // N
        ts = [int(t) for t in np.asarray(self._timesteps)[::-1]]          # the steps' starts, descending
        if any(a - delta != b for a, b in zip(ts, ts[1:])):
            _unsupported(name, "timestep_spacing", self.config.timestep_spacing,
                         f" with {N} steps (diffusers steps from t to t - {T} // {N} = t - {delta}, which is not the "
                         f"next timestep of {ts[:6]}...; 'leading' spacing has no such gap)")

        def abar(t: int) -> float:
            return float(acp[t]) if t >= 0 else final

        def point(t: int) -> Point:
            a = abar(t)
            return Point(float(t), math.sqrt(a), math.sqrt(1.0 - a), float(t))

        steps = ts + [ts[-1] - delta]
        a = np.array([abar(t) for t in steps])
        grid = _vp_grid(_vp_schedule(self), np.sqrt(a), np.sqrt(1.0 - a), np.array(steps, dtype=np.float64))
        prediction = self.config.prediction_type
        skip = bool(self.config.skip_prk_steps)
        half = delta // 2
        midpoints = None if skip else [(point(t - half), point(t - delta + half)) for t in ts[:3]]
        solver = get_solver("pndm", warmup="skip" if skip else "prk",
                            quantity="v" if prediction == "v_prediction" else "eps", midpoints=midpoints)
        # (the whole grid: a last step that does not lower the noise level, from t = 0 to
        # final_alpha_cumprod = alphas_cumprod[0], is a step of the method, the identity)
        rows: List = solver.rows(grid)
        fold = [_vp_fold(prediction, r.point.alpha, r.point.sigma, 0.0) for r in rows]
        return Plan(rows, fold, solver.num_slots)

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


DROP_INS[PNDMScheduler.__name__] = PNDMScheduler      # accelerate(pipe) finds it there
