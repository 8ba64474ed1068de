"""The CogVideoX drop-ins: CogVideoXDDIMScheduler and CogVideoXDPMScheduler.

    from fastdiff.integrations.diffusers import CogVideoXDPMScheduler
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' classes (config with its SNR-shifted alphas_cumprod, ``set_timesteps``,
``timesteps`` are diffusers' own) whose ``step`` runs one fused pass of a fastdiff solver, each
call stepping from t to t - T // N as diffusers does:

* CogVideoXDDIMScheduler: DDIM with eta = 0 (fastdiff ``ddim``); diffusers' step ignores eta,
  clip_sample and use_clipped_model_output, and so does the drop-in.
* CogVideoXDPMScheduler: DPM-Solver++(2M) SDE, midpoint (fastdiff ``dpm_solver_multistep``,
  dpmsolver++, eta = 1): first order on the first call (``old_pred_original_sample=None``) and
  on the call that reaches prev_timestep < 0, second order in between with the previous call's x0,
  which the drop-in keeps itself (``old_pred_original_sample`` must be what its previous call
  returned, ``timestep_back`` the previous timestep; anything else raises). Noise as diffusers
  draws it: one draw per call, two on the second-order calls (diffusers discards the first).
"""
from __future__ import annotations

import math

import diffusers
import numpy as np
import torch

from ...solvers import get_solver
from ...solvers.base import relabel
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import (DROP_INS, _check_prediction, _f64, _StepIndexed, _unsupported, _vp_fold, _vp_grid,
                         _vp_schedule)

__all__ = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]


def _steps(self):
    """(t, prev, alphas_cumprod at t, at prev) of each call: diffusers' t -> t - T // N."""
    acp = _f64(self.alphas_cumprod)
    final = float(self.final_alpha_cumprod)
    delta = self.config.num_train_timesteps // self.num_inference_steps
    out = []
    for t in (int(t) for t in self.timesteps.tolist()):
        prev = t - delta
        out.append((t, prev, float(acp[t]), float(acp[prev]) if prev >= 0 else final))
    return out


@drop_in(diffusers.CogVideoXDDIMScheduler)
class CogVideoXDDIMScheduler(_StepIndexed, FastdiffScheduler, diffusers.CogVideoXDDIMScheduler):
    """DDIM, eta = 0 (fastdiff ``ddim``) from each timestep t to t - T // N."""

    _returns_x0 = True
    _out_dtype = "promote"
    _diffusers_output = diffusers.schedulers.scheduling_ddim_cogvideox.DDIMSchedulerOutput

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        solver, schedule, p = get_solver("ddim", eta=0.0), _vp_schedule(self), self.config.prediction_type
        rows, fold = [], []
        for n, (t, prev, a_t, a_p) in enumerate(_steps(self)[start:]):
            grid = _vp_grid(schedule, [math.sqrt(a_t), math.sqrt(a_p)], [math.sqrt(1 - a_t), math.sqrt(1 - a_p)],
                            [t, prev])
            rows.append(relabel(solver.rows(grid)[0], n))
            fold.append(_vp_fold(p, math.sqrt(a_t), math.sqrt(1 - a_t), 0.0))
        return Plan(rows, fold, 0)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


@drop_in(diffusers.CogVideoXDPMScheduler)
class CogVideoXDPMScheduler(_StepIndexed, FastdiffScheduler, diffusers.CogVideoXDPMScheduler):
    """DPM-Solver++(2M) SDE, midpoint (fastdiff ``dpm_solver_multistep``, eta = 1)."""

    _returns_x0 = True
    _out_dtype = "promote"
    _diffusers_output = diffusers.schedulers.scheduling_dpm_cogvideox.DDIMSchedulerOutput

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        # each call its own grid, as diffusers takes it: (t_back,) t, t - T // N; the second-order
        # step from the previous call's x0 (history slot 0, which every call but the last writes)
        steps = _steps(self)
        solver = get_solver("dpm_solver_multistep", order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                            lower_order_final=False, eta=1.0)
        schedule, p = _vp_schedule(self), self.config.prediction_type
        point = lambda a: (math.sqrt(a), math.sqrt(1.0 - a))  # noqa: E731
        rows, fold, orders = [], [], []
        for n in range(start, len(steps)):
            t, prev, a_t, a_p = steps[n]
            k = n - start
            order = 1 if k == 0 or prev < 0 else 2
            pts = [(steps[n - 1][0], steps[n - 1][2])] if order == 2 else []
            pts += [(t, a_t), (prev, a_p)]
            grid = _vp_grid(schedule, [point(a)[0] for _, a in pts], [point(a)[1] for _, a in pts],
                            [float(v) for v, _ in pts])
            row = solver.rows(grid)[order - 1]
            rows.append(relabel(row, k, hist_write=0 if n < len(steps) - 1 else -1, noise_id=k))
            fold.append(_vp_fold(p, *point(a_t), 0.0))
            orders.append(order)
        return Plan(rows, fold, 1, draws=[True] * len(rows), extra={"orders": orders})

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        from diffusers.utils.torch_utils import randn_tensor
        dtype = self._fd_sample_dtype
        z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if self._fd_run.program.plan.extra["orders"][k] == 2:     # diffusers draws again, and keeps the second
            z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return z

    def step(self, model_output, old_pred_original_sample, timestep, timestep_back, sample, eta=0.0,
             use_clipped_model_output=False, generator=None, variance_noise=None, return_dict=False):
        run = self._fd_run
        k = 0 if run is None or self._step_index is None else self._step_index - run.start
        first = run is None or self._step_index is None
        if first != (old_pred_original_sample is None) or (not first and timestep_back is None):
            raise NotImplementedError(
                f"fastdiff's {type(self).__name__} keeps the previous x0 itself: pass old_pred_original_sample=None "
                "and timestep_back=None on a run's first call only, and afterwards the pred_original_sample and "
                "timestep of the previous call (use diffusers' own class for other histories)")
        if not first and k < run.n and float(timestep_back) != run.timesteps[self._step_index - 1]:
            raise NotImplementedError(f"timestep_back={float(timestep_back):g} is not the previous timestep "
                                      f"{run.timesteps[self._step_index - 1]:g} of this run")
        self._fd_sample_dtype = sample.dtype if isinstance(sample, torch.Tensor) else torch.float32
        out = self._fd_step(model_output, timestep, sample, generator, None, False)
        orders = self._fd_run.program.plan.extra["orders"]
        if return_dict and orders[self._step_index - 1 - self._fd_run.start] == 2:
            return self._diffusers_output(prev_sample=out[0], pred_original_sample=out[1])
        return out                # (diffusers returns the tuple from its first-order calls whatever return_dict)


DROP_INS[CogVideoXDDIMScheduler.__name__] = CogVideoXDDIMScheduler     # accelerate(pipe) finds them there
DROP_INS[CogVideoXDPMScheduler.__name__] = CogVideoXDPMScheduler
