"""The consistency-model drop-ins: LCMScheduler, TCDScheduler, FlowMatchLCMScheduler and
CMStochasticIterativeScheduler.

    from fastdiff.integrations.diffusers import LCMScheduler
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' classes (config, ``set_timesteps`` with its LCM / TCD timestep schedule,
``timesteps``, ``add_noise`` are diffusers' own) whose ``step`` runs one fused pass of fastdiff's
``lcm`` / ``tcd`` solver (fastdiff.solvers.consistency) on diffusers' discrete alphas_cumprod:

* LCMScheduler: denoised = c_skip x + c_out x0 (diffusers' boundary scalings of the timestep),
  re-noised to the next timestep with fresh noise, the last step returning denoised; clip_sample /
  thresholding act on x0 before the boundary condition, as diffusers'.
* TCDScheduler(eta = gamma): DDIM to diffusers' floor((1 - gamma) t_prev), then the forward
  process to t_prev with fresh noise (none on the last step, none for gamma = 0).

* FlowMatchLCMScheduler: x0 = x - sigma v, re-noised to the next sigma (diffusers' shift, dynamic
  shifting, Karras / exponential / beta sigmas as its set_timesteps gives them; not its
  ``scale_factors`` upscaling, which changes the sample's shape).

* CMStochasticIterativeScheduler: the EDM-style boundary scalings as the x0 fold, re-noised to
  s_noise sqrt(sigma_next^2 - sigma_min^2) (consistency models' algorithm 1).

The second value of the step is diffusers': ``denoised`` (LCM) / ``pred_noised_sample`` (TCD), the
row's own quantity. Noise is drawn as diffusers draws it (``randn_tensor`` with the generator).
"""
from __future__ import annotations

import math

import diffusers
import numpy as np
import torch

from ...program import Point
from ...solvers import get_solver
from ...solvers.base import relabel, with_noise
from .base import FastdiffScheduler, Plan, drop_in
from ...guidance import ClipSample
from ...schedules import FlowMatching, VESchedule
from .schedulers import DROP_INS, _check_prediction, _f64, _unsupported, _vp_fold, _vp_grid, _vp_schedule, _x0_transform

__all__ = ["LCMScheduler", "TCDScheduler", "FlowMatchLCMScheduler", "CMStochasticIterativeScheduler"]


class _ConsistencyBase(FastdiffScheduler):
    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))

    def _x0_fold(self, run, k):
        """The row's quantity h = q_y E + q_x0 x0 (denoised / pred_noised_sample) in sample and output."""
        r, (a_x, a_d) = run.program.plan.rows[k], run.program.fold[k]
        return r.q_y + r.q_x0 * a_x, r.q_x0 * a_d

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        # diffusers draws in the dtype of denoised: the promotion of sample and model output
        dtype = torch.promote_types(self._fd_sample_dtype, dtype)
        return super()._draw_noise(k, shape, dtype, device, generator, variance_noise)

    def _consistency_step(self, model_output, timestep, sample, generator, return_dict, key=()):
        self._fd_sample_dtype = sample.dtype if isinstance(sample, torch.Tensor) else torch.float32
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict, key=key)

    def _timesteps(self):
        ts = [int(t) for t in self.timesteps.tolist()]
        if len(ts) != self.num_inference_steps:
            _unsupported(type(self).__name__, "timesteps", "<custom with strength < 1>",
                         f" ({len(ts)} timesteps of num_inference_steps={self.num_inference_steps}: diffusers then "
                         "adds noise on the last step, to the same timestep)")
        return ts

    def _point(self, acp, t: int) -> Point:
        a = float(acp[t]) if t >= 0 else float(self.final_alpha_cumprod)
        return Point(float(t), math.sqrt(a), math.sqrt(1.0 - a), float(t))


@drop_in(diffusers.LCMScheduler)
class LCMScheduler(_ConsistencyBase, diffusers.LCMScheduler):
    """Latent Consistency Model multistep sampling (fastdiff ``lcm``)."""

    _x0_field = "denoised"

    def _plan(self, start: int) -> Plan:
        acp = _f64(self.alphas_cumprod)
        ts = self._timesteps()
        a = np.array([acp[t] for t in ts[start:]] + [1.0])   # the last step returns denoised: a clean end point
        grid = _vp_grid(_vp_schedule(self), np.sqrt(a), np.sqrt(1.0 - a), np.array(ts[start:] + [-1], dtype=np.float64))
        # diffusers' boundary scalings, as it computes them (float32, from the integer timestep)
        scalings = [tuple(float(v) for v in self.get_scalings_for_boundary_condition_discrete(t))
                    for t in self.timesteps[start:]]
        rows = get_solver("lcm", scalings=scalings).rows(grid)
        p = self.config.prediction_type
        fold = [_vp_fold(p, grid.alpha[n], grid.sigma[n], 0.0) for n in range(grid.steps)]
        return Plan(rows, fold, 0, draws=[n != self.num_inference_steps - 1 for n in range(start, len(ts))],
                    x0_transform=_x0_transform(self.config))

    def _transform_step(self, run, k, E, cond, uncond, g):
        table, x0, _ = super()._transform_step(run, k, E, cond, uncond, g)
        r = run.program.plan.rows[k]
        return table, x0, r.q_y * E + r.q_x0 * x0          # denoised from the clipped x0

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._consistency_step(model_output, timestep, sample, generator, return_dict)


@drop_in(diffusers.TCDScheduler)
class TCDScheduler(_ConsistencyBase, diffusers.TCDScheduler):
    """Trajectory Consistency Distillation's strategic stochastic sampling (fastdiff ``tcd``)."""

    _x0_field = "pred_noised_sample"

    def _plan(self, start: int, eta: float = 0.3) -> Plan:
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (gamma) must be in [0, 1], got {eta}")
        acp = _f64(self.alphas_cumprod)
        ts = self._timesteps()
        prev = ts[1:] + [0]                                 # diffusers: the last step goes to timestep 0
        a = np.array([acp[t] for t in ts[start:]] + [acp[0]])
        grid = _vp_grid(_vp_schedule(self), np.sqrt(a), np.sqrt(1.0 - a), np.array(ts[start:] + [0], dtype=np.float64),
                        hint=" (a custom schedule ending at timestep 0: TCD's last step goes to timestep 0)")
        # diffusers' intermediate timesteps floor((1 - eta) t_prev), in its float32 arithmetic
        s = torch.floor((1 - eta) * torch.tensor(prev)).to(torch.long).tolist()
        rows = get_solver("tcd", gamma=eta, points=[self._point(acp, int(v)) for v in s[start:]]).rows(grid)
        p = self.config.prediction_type
        fold = [_vp_fold(p, grid.alpha[n], grid.sigma[n], 0.0) for n in range(grid.steps)]
        draws = [eta > 0 and n != self.num_inference_steps - 1 for n in range(start, len(ts))]
        return Plan(rows, fold, 0, draws=draws)

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        return self._consistency_step(model_output, timestep, sample, generator, return_dict, (("eta", float(eta)),))


@drop_in(diffusers.FlowMatchLCMScheduler)
class FlowMatchLCMScheduler(FastdiffScheduler, diffusers.FlowMatchLCMScheduler):
    """Flow-matching LCM (fastdiff ``lcm``, f = x0 = x - sigma v): re-noised to the next sigma with
    fresh float32 noise at every step (drawn on the last step too, times 0, as diffusers draws it)."""

    _needs_set_timesteps = False
    _float_timesteps = True

    def _check_config(self):
        if self.config.invert_sigmas:
            _unsupported(type(self).__name__, "invert_sigmas", True, " (its noise levels rise to 1)")

    def _plan(self, start: int) -> Plan:
        if self._scale_factors and self._upscale_mode:
            _unsupported(type(self).__name__, "scale_factors", list(self._scale_factors),
                         " (x0 is resized between steps: the sample's shape changes)")
        sig = _f64(self.sigmas)[start:]
        grid = _vp_grid(FlowMatching(self.config.num_train_timesteps), 1.0 - sig, sig, sig)
        rows = get_solver("lcm").rows(grid)
        fold = [(1.0, -s) for s in grid.sigma[:-1]]                  # x0 = sample - sigma * v
        return Plan(rows, fold, 0, draws=[True] * len(rows))

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        # diffusers draws in x0's dtype: float32 (it upcasts the sample) promoted with the model output's
        dtype = torch.promote_types(torch.float32, dtype)
        return super()._draw_noise(k, shape, dtype, device, generator, variance_noise)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


@drop_in(diffusers.CMStochasticIterativeScheduler)
class CMStochasticIterativeScheduler(FastdiffScheduler, diffusers.CMStochasticIterativeScheduler):
    """Consistency models' multistep sampling (Song et al. 2023, algorithm 1; fastdiff ``lcm``): the
    model's denoised = c_skip x + c_out output (diffusers' boundary scalings, as the x0 fold; clamped
    to [-1, 1] with clip_denoised), then x' = denoised + s_noise sqrt(clamp(sigma_next)^2 - sigma_min^2) z:
    the grid's noise level at point n is s_noise sqrt(sigma_n^2 - sigma_min^2) (0 at the last point)."""

    _needs_set_timesteps = False
    _float_timesteps = True
    _out_dtype = "promote"

    def _plan(self, start: int) -> Plan:
        c = self.config
        sig = self.sigmas.detach().cpu().float()
        n = len(self.timesteps)
        nxt = [sig[i + 1] if i + 1 < c.num_train_timesteps else sig[-1] for i in range(n)]
        # (diffusers' float32 arithmetic for sigma_hat and the scalings)
        level = [0.0] + [float(((v.clamp(min=c.sigma_min, max=c.sigma_max) ** 2 - c.sigma_min ** 2) ** 0.5)
                               * c.s_noise) for v in nxt]
        level = np.array([float(((sig[0].clamp(min=c.sigma_min, max=c.sigma_max) ** 2 - c.sigma_min ** 2) ** 0.5)
                                * c.s_noise) + 1.0] + level[1:])      # (point 0's level is never read)
        level = level[start:]
        # (calls whose next noise level is sigma_min already, Karras' last sigmas: the same level again)
        tail = 0
        while len(level) - tail > 2 and level[-1 - tail] == level[-2 - tail]:
            tail += 1
        if c.s_noise <= 0 or not np.all(np.diff(level[:len(level) - tail]) < 0):
            _unsupported(type(self).__name__, "s_noise", c.s_noise, " (the re-noising levels must decrease)")
        keep = level[:len(level) - tail]
        grid = _vp_grid(VESchedule(), np.ones_like(keep), keep, np.arange(len(keep), dtype=np.float64)[::-1].copy())
        rows = get_solver("lcm").rows(grid)
        rows += [relabel(rows[-1], rows[-1].step + j + 1, noise_id=rows[-1].noise_id + j + 1 if rows[-1].noise_id >= 0
                         else -1) for j in range(tail)]
        if n == 1:                      # (diffusers' one-step sampling adds zeros)
            rows = [with_noise(r, 0.0, -1) for r in rows]
        fold = [tuple(float(v) for v in self.get_scalings_for_boundary_condition(sig[i])) for i in range(start, n)]
        return Plan(rows, fold, 0, draws=[n > 1] * len(rows), x0_transform=ClipSample(1.0) if c.clip_denoised else None)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


DROP_INS[LCMScheduler.__name__] = LCMScheduler          # accelerate(pipe) finds them there
DROP_INS[CMStochasticIterativeScheduler.__name__] = CMStochasticIterativeScheduler
DROP_INS[FlowMatchLCMScheduler.__name__] = FlowMatchLCMScheduler
DROP_INS[TCDScheduler.__name__] = TCDScheduler
