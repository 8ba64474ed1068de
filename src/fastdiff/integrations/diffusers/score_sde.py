"""The ScoreSdeVeScheduler drop-in (Song et al. 2021's predictor-corrector sampler for the VE SDE).

    from fastdiff.integrations.diffusers import ScoreSdeVeScheduler
    pipe.scheduler = ScoreSdeVeScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class (config, ``set_timesteps``, ``set_sigmas``, ``discrete_sigmas`` are
diffusers' own) whose predictor ``step_pred`` runs one fused pass of fastdiff's
``reverse_diffusion`` solver (fastdiff.solvers.score_sde) from diffusers' discrete sigma of the
timestep to the one below it (0 below the first), the model output read as the score; it returns
``SdeVeOutput(prev_sample, prev_sample_mean)`` as diffusers does, with noise drawn as diffusers draws
it. The Langevin corrector ``step_correct`` is diffusers' own: its step size comes from the norms of
the model output and of the noise it draws (2 (snr |z| / |score|)^2), a value of the data, not a
coefficient a program can hold.
"""
from __future__ import annotations

import math

import diffusers
import numpy as np
import torch

from ...schedules import VESchedule
from ...solvers import get_solver
from ...solvers.base import relabel
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import DROP_INS, _StepIndexed, _vp_grid

__all__ = ["ScoreSdeVeScheduler"]


@drop_in(diffusers.ScoreSdeVeScheduler)
class ScoreSdeVeScheduler(_StepIndexed, FastdiffScheduler, diffusers.ScoreSdeVeScheduler):
    """Reverse-diffusion predictor on the fused step (fastdiff ``reverse_diffusion``); diffusers' corrector."""

    _returns_x0 = True
    _x0_field = "prev_sample_mean"
    _diffusers_output = diffusers.schedulers.scheduling_sde_ve.SdeVeOutput
    _needs_set_timesteps = False            # (the constructor sets its schedule)
    _float_timesteps = False

    def set_sigmas(self, *args, **kwargs):
        super().set_sigmas(*args, **kwargs)
        self._fd_reset()

    def _result_dtypes(self, sample_dtype, model_dtype):
        # diffusers' sigmas are float32 tensors of the batch's shape: float32 at least
        dtype = torch.promote_types(torch.promote_types(sample_dtype, model_dtype), torch.float32)
        return dtype, dtype

    def _plan(self, start: int) -> Plan:
        ts = self.timesteps.detach().cpu()
        ds = self.discrete_sigmas.detach().cpu()
        solver = get_solver("reverse_diffusion")
        rows, fold = [], []
        for n in range(start, len(ts)):
            idx = int((ts[n] * torch.ones(1) * (len(ts) - 1)).long())     # diffusers' index, in its float32
            s_a, s_b = float(ds[idx]), float(ds[idx - 1]) if idx > 0 else 0.0
            if not s_a > s_b:
                raise ValueError(f"ScoreSdeVeScheduler: timestep {float(ts[n]):g} maps to sigma {s_a:g}, which does not "
                                 f"lie above the next ({s_b:g}); call set_sigmas() with this run's number of steps")
            grid = _vp_grid(VESchedule(), [1.0, 1.0], [s_a, s_b], [float(ts[n]), float(ts[n]) - 1.0])
            rows.append(relabel(solver.rows(grid)[0], n - start, noise_id=n - start))
            fold.append((1.0, s_a * s_a))                                    # the score: x0 = x + sigma^2 score
        return Plan(rows, fold, 0, draws=[True] * len(rows))

    def _x0_fold(self, run, k):
        """prev_sample_mean = sample + g^2 score: the step without its noise."""
        r, (a_x, a_d) = run.program.plan.rows[k], run.program.fold[k]
        o = r.out_x
        return o.x + o.h * (r.q_y + r.q_x0 * a_x), o.h * r.q_x0 * a_d

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        from diffusers.utils.torch_utils import randn_tensor
        return randn_tensor(shape, generator=generator, device=device, dtype=self._fd_sample_dtype)

    def step_pred(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.timesteps is None:
            raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")
        self._fd_sample_dtype = sample.dtype if isinstance(sample, torch.Tensor) else torch.float32
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


DROP_INS[ScoreSdeVeScheduler.__name__] = ScoreSdeVeScheduler      # accelerate(pipe) finds it there
