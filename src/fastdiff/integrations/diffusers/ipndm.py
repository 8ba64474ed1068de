"""The IPNDMScheduler drop-in.

    from fastdiff.integrations.diffusers import IPNDMScheduler
    pipe.scheduler = IPNDMScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' ``IPNDMScheduler`` (config, ``set_timesteps`` with its sin^2 schedule,
``timesteps`` are diffusers' own) whose ``step`` runs one fused pass of fastdiff's ``plms`` solver
(fastdiff.solvers.plms): Adams-Bashforth of order 1, 2, 3, then 4 on the noise estimates
e = sigma x + alpha v (diffusers reads the model output as v on its schedule alpha = sqrt(1 -
sigma^2), sigma = diffusers' ``betas``), with the DDIM transfer between points. A run may begin
mid-schedule (``set_begin_index``); its history starts there, as diffusers' does.
"""
from __future__ import annotations

import diffusers
import numpy as np

from ...solvers import get_solver
from ...schedules import VESchedule
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import DROP_INS, _f64, _vp_grid

__all__ = ["IPNDMScheduler"]


@drop_in(diffusers.IPNDMScheduler)
class IPNDMScheduler(FastdiffScheduler, diffusers.IPNDMScheduler):
    """iPNDM as diffusers has it (fastdiff ``plms``, max_order 4)."""

    _out_dtype = "promote"
    _needs_set_timesteps = False       # diffusers' constructor runs set_timesteps(num_train_timesteps)

    def _plan(self, start: int) -> Plan:
        alpha, sigma = _f64(self.alphas), _f64(self.betas)
        n = len(self.timesteps)
        if len(alpha) != n + 1:
            raise ValueError(f"IPNDMScheduler: {len(alpha)} noise levels for {n} timesteps (trained_betas must have "
                             "num_inference_steps + 1 entries, as diffusers' step reads them)")
        t = np.append(_f64(self.timesteps), 0.0)
        grid = _vp_grid(VESchedule(), alpha[start:], sigma[start:], t[start:])
        solver = get_solver("plms", max_order=4)
        rows = solver.rows(grid)
        # e = sigma x + alpha v, exactly as diffusers forms it: the rows read eps = (x - alpha x0) / sigma,
        # so x0 = ((1 - sigma^2) / alpha) x - sigma v (alpha = sqrt(1 - sigma^2) is diffusers' definition)
        fold = [((1.0 - s * s) / a if a > 0 else 0.0, -s) for a, s in zip(grid.alpha[:-1], grid.sigma[:-1])]
        return Plan(rows, fold, solver.num_slots)

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


DROP_INS[IPNDMScheduler.__name__] = IPNDMScheduler      # accelerate(pipe) finds it there
