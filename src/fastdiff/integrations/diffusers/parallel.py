"""The parallel-in-time drop-ins: DDIMParallelScheduler and DDPMParallelScheduler.

    from fastdiff.integrations.diffusers import DDIMParallelScheduler
    pipe.scheduler = DDIMParallelScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' classes whose ``step`` is the DDIM / DDPM drop-in's (fastdiff ``ddim`` /
``ddpm``, one fused pass per call) and whose ``batch_step_no_noise`` (ParaDiGMS: a batch whose
samples sit at different timesteps, each stepped from t to t - T // N without noise) takes each
sample's row from the same solvers, on a one-step grid per distinct timestep, and applies the rows
sample by sample: x0 = A_x x + A_d output (clip_sample / thresholding on it, as diffusers),
x' = c_x x + c_h (q_y x + q_x0 x0) (+ c_e eps_raw for DDIM's raw noise estimate next to a clipped x0),
in one broadcast expression over the batch. As diffusers' batch step, a step below timestep 0 goes
to alpha_prod = 1 (not final_alpha_cumprod), and the result has the dtype of diffusers' arithmetic
(its coefficients are float32 tensors of the batch's shape: float32 at least).
"""
from __future__ import annotations

import math

import diffusers
import numpy as np
import torch

from ...solvers import get_solver
from .base import FastdiffScheduler, _guided, drop_in
from .schedulers import (DROP_INS, DDIMScheduler, DDPMScheduler, _f64, _StepIndexed, _vp_fold, _vp_grid, _vp_schedule,
                         _x0_transform)

__all__ = ["DDIMParallelScheduler", "DDPMParallelScheduler"]


class _BatchStep:
    """batch_step_no_noise from per-timestep solver rows (see the module docstring)."""

    def _batch_row(self, t: int, prev: int, acp: np.ndarray, raw_eps: bool):
        """(c_x, c_h, q_y, q_x0, c_e, (A_x, A_d), (e_x, e_d)) of one sample's step t -> prev."""
        a_t = float(acp[t])
        a_p = float(acp[prev]) if prev >= 0 else 1.0
        al, sg, al_p, sg_p = math.sqrt(a_t), math.sqrt(1.0 - a_t), math.sqrt(a_p), math.sqrt(1.0 - a_p)
        p = self.config.prediction_type
        fold = _vp_fold(p, al, sg, 0.0)
        eps_fold = {"epsilon": (0.0, 1.0), "sample": (1.0 / sg, -al / sg), "v_prediction": (sg, al)}[p]
        if raw_eps:                       # DDIM next to a clipped x0: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps_raw
            return 0.0, al_p, 0.0, 1.0, sg_p, fold, eps_fold
        grid = _vp_grid(_vp_schedule(self), [al, al_p], [sg, sg_p], [t, prev])
        row = self._batch_solver().rows(grid)[0]
        return row.out_x.x, row.out_x.h, row.q_y, row.q_x0, 0.0, fold, eps_fold

    def _batch(self, model_output, timesteps, sample, raw_eps: bool):
        if self.num_inference_steps is None and isinstance(self, DDIMParallelScheduler):
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        n = self.num_inference_steps or self.config.num_train_timesteps
        delta = self.config.num_train_timesteps // n
        acp = _f64(self.alphas_cumprod)
        ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if len(ts) != sample.shape[0]:
            raise ValueError(f"timesteps has {len(ts)} entries for a batch of {sample.shape[0]} samples")
        cache = {}
        coefs = np.array([cache.setdefault(t, _flat(self._batch_row(t, t - delta, acp, raw_eps))) for t in ts])
        dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
        c = torch.from_numpy(coefs).to(device=sample.device, dtype=dtype)
        col = lambda j: c[:, j].view(-1, *([1] * (sample.dim() - 1)))  # noqa: E731
        x, d = sample.to(dtype), model_output.to(dtype)
        x0 = col(5) * x + col(6) * d
        transform = _x0_transform(self.config)
        if transform is not None:
            x0 = transform(x0)
        out = (col(0) + col(1) * col(2)) * x + (col(1) * col(3)) * x0
        if raw_eps:
            out = out + col(4) * (col(7) * x + col(8) * d)
        return out


def _flat(r):
    c_x, c_h, q_y, q_x0, c_e, (a_x, a_d), (e_x, e_d) = r
    return [c_x, c_h, q_y, q_x0, c_e, a_x, a_d, e_x, e_d]


@drop_in(diffusers.DDIMParallelScheduler)
class DDIMParallelScheduler(_BatchStep, _StepIndexed, FastdiffScheduler, diffusers.DDIMParallelScheduler):
    """DDIMScheduler's drop-in (fastdiff ``ddim``), and its batch step without noise."""

    _returns_x0 = True
    _out_dtype = "promote"
    _check_config = DDIMScheduler._check_config
    _plan = DDIMScheduler._plan
    step = DDIMScheduler.step

    def _transform_step(self, run, k, E, cond, uncond, g):
        table, x0, pred = FastdiffScheduler._transform_step(self, run, k, E, cond, uncond, g)
        if run.program.plan.extra is not None:     # the raw noise estimate, before clipping (as DDIMScheduler's)
            e_x, e_d = run.program.plan.extra["eps_fold"][k]
            torch.add(e_x * E, _guided(cond, uncond, g), alpha=e_d, out=run.hist[0])
        return table, x0, pred

    def _batch_solver(self):
        return get_solver("ddim", eta=0.0)

    def batch_step_no_noise(self, model_output, timesteps, sample, eta=0.0, use_clipped_model_output=False):
        assert eta == 0.0                   # (diffusers' own check)
        raw = _x0_transform(self.config) is not None and not use_clipped_model_output
        return self._batch(model_output, timesteps, sample, raw)


@drop_in(diffusers.DDPMParallelScheduler)
class DDPMParallelScheduler(_BatchStep, _StepIndexed, FastdiffScheduler, diffusers.DDPMParallelScheduler):
    """DDPMScheduler's drop-in (fastdiff ``ddpm``), and its batch step without noise (the posterior mean)."""

    _needs_set_timesteps = False
    _returns_x0 = True
    _out_dtype = "promote"
    _LEARNED = DDPMScheduler._LEARNED
    _check_config = DDPMScheduler._check_config
    _plan = DDPMScheduler._plan
    step = DDPMScheduler.step

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        z = FastdiffScheduler._draw_noise(self, k, shape, dtype, device, generator, variance_noise)
        pv = getattr(self, "_fd_variance", None)
        if pv is None:
            return z
        v = self._get_variance(int(self.timesteps[self._step_index]), predicted_variance=pv)   # diffusers' own
        return (torch.exp(0.5 * v) if self.config.variance_type == "learned_range" else v ** 0.5) * z

    def _batch_solver(self):
        return get_solver("ddpm", variance="fixed_small")

    def batch_step_no_noise(self, model_output, timesteps, sample):
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in self._LEARNED:
            model_output = model_output[:, :sample.shape[1]]
        return self._batch(model_output, timesteps, sample, False)


DROP_INS[DDIMParallelScheduler.__name__] = DDIMParallelScheduler     # accelerate(pipe) finds them there
DROP_INS[DDPMParallelScheduler.__name__] = DDPMParallelScheduler
