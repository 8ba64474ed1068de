"""The inversion drop-ins: DDIMInverseScheduler and DPMSolverMultistepInverseScheduler.

    from fastdiff.integrations.diffusers import DDIMInverseScheduler
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)

Subclasses of diffusers' classes (config, ``set_timesteps`` with its ascending timesteps,
``timesteps`` / ``sigmas`` are diffusers' own) whose ``step`` runs one fused pass of a fastdiff
solver on an *ascending* grid: the noise level rises from call to call, from a (nearly) clean
latent to noise, with the same formulas the sampling direction uses (fastdiff's
``dpm_solver_multistep``, whose first order in noise-prediction form is DDIM with eta = 0; its
steps are written for any pair of points, in either direction):

* DDIMInverseScheduler: call n goes from alphas_cumprod[t - T // N] (``initial_alpha_cumprod``
  below 0) to alphas_cumprod[t], x0 converted at the lower level, as diffusers does (each call its
  own one-step grid). Where diffusers keeps its raw noise estimate next to a clipped x0
  (``clip_sample``, its default) or starts from a clean level (``set_alpha_to_one``: the noise
  estimate is not a function of x0 there), the step reads that estimate from a history slot
  the call fills, as fastdiff's DDIMScheduler does.
* DPMSolverMultistepInverseScheduler: multistep DPM-Solver / DPM-Solver++ of order 1-3 up
  diffusers' ascending ``sigmas`` (lower_order_final / euler_at_final as diffusers'; a last step
  of zero length, which diffusers' Karras / exponential / beta sigmas and 'trailing' spacing end
  with, is the identity, as diffusers takes it at orders 1 and 2; at order 3 diffusers' is NaN).

Not reproduced (NotImplementedError naming the option): the SDE variants of the inverse
DPM-Solver (its noise formula has no meaning for a rising noise level), learned variances.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import diffusers
import numpy as np
import torch

from ...guidance import ClipSample
from ...program import Point
from ...schedules import Grid
from ...solvers import get_solver
from ...solvers.base import relabel
from ...solvers.diffusers_forms import identity_row
from ...solvers.exponential import ddim_raw_eps_row
from .base import FastdiffScheduler, Plan, _guided, _Run, drop_in
from .schedulers import (DROP_INS, _check_prediction, _DiffusersGrid, _dpm_rows, _f64, _ksigma_points, _StepIndexed,
                         _unsupported, _vp_fold, _vp_schedule, _x0_transform, _zero_length_tail)

__all__ = ["DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"]


@dataclass
class AscendingGrid(Grid):
    """A grid whose noise levels strictly *increase* (an inversion's): index 0 the cleanest point.
    fastdiff's first-order and multistep exponential integrators take it as they take a sampling
    grid (their step formulas hold for either sign of the log-SNR step)."""

    def __post_init__(self):
        n = len(self.t)
        for name in ("alpha", "sigma", "model_t"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"AscendingGrid.{name} has {len(getattr(self, name))} points, t has {n}")
        if n < 2:
            raise ValueError("a grid needs at least 2 points (1 step)")
        ks = self.ksigma
        if not np.all(ks[1:] > ks[:-1]):
            raise ValueError(f"an inversion's noise levels must strictly increase, got ksigma={ks}")


@dataclass
class _AscendingDiffusersGrid(_DiffusersGrid):
    """An ascending grid that may end with ``tail`` steps of zero length (schedulers._DiffusersGrid)."""

    def __post_init__(self):
        n = len(self.t) - self.tail
        if n > 1:
            AscendingGrid(self.schedule, self.t[:n], self.alpha[:n], self.sigma[:n], self.model_t[:n])

    def without_tail(self) -> Grid:
        n = len(self.t) - self.tail
        return AscendingGrid(self.schedule, self.t[:n], self.alpha[:n], self.sigma[:n], self.model_t[:n])


def _ascending(schedule, alpha, sigma, t) -> AscendingGrid:
    f = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    return AscendingGrid(schedule, f(t), f(alpha), f(sigma), f(t))


@drop_in(diffusers.DDIMInverseScheduler)
class DDIMInverseScheduler(_StepIndexed, FastdiffScheduler, diffusers.DDIMInverseScheduler):
    """DDIM inversion (DDIM, eta = 0, in noise-prediction form: fastdiff's ``dpm_solver_multistep``
    of order 1, algorithm 'dpmsolver', up diffusers' ascending timesteps)."""

    _returns_x0 = True
    _out_dtype = "promote"
    _diffusers_output = diffusers.schedulers.scheduling_ddim_inverse.DDIMSchedulerOutput     # (its module names it so)

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        acp = _f64(self.alphas_cumprod)
        initial = float(self.initial_alpha_cumprod)
        T, N = self.config.num_train_timesteps, self.num_inference_steps
        p = self.config.prediction_type
        schedule = _vp_schedule(self)
        # DDIM (eta = 0) in its noise-prediction form, DPM-Solver's first order: x_t = (alpha_t /
        # alpha_s) x_s + (sigma_t - alpha_t sigma_s / alpha_s) eps, as diffusers forms it from the
        # model's eps (the data form recomputes eps from x and x0, which going up in noise multiplies
        # the rounding of x0 by sigma_t / sigma_s: 34 for SD's first step)
        solver = get_solver("dpm_solver_multistep", order=1, algorithm_type="dpmsolver")
        pairs = []
        for t in (int(t) for t in self.timesteps.tolist()[start:]):
            cur = min(t - T // N, T - 1)                     # diffusers' "timestep": where the sample is
            pairs.append((cur, acp[cur] if cur >= 0 else initial, t, acp[t]))
        clip = bool(self.config.clip_sample)
        raw_eps = clip or any(a_c >= 1.0 for _, a_c, _, _ in pairs)
        rows, fold, eps_fold = [], [], []
        for n, (cur, a_c, t, a_t) in enumerate(pairs):
            al, sg = math.sqrt(a_c), math.sqrt(1.0 - a_c)
            fold.append(_vp_fold(p, al, sg, 0.0))
            if a_t == a_c and not raw_eps:                   # (a zero-length step: diffusers' is the identity)
                eps_fold.append((0.0, 0.0))
                rows.append(identity_row(n, Point(float(cur), al, sg, float(t))))
                continue
            if raw_eps:     # prev = sqrt(a_t) x0 (clipped) + sqrt(1 - a_t) eps_raw, eps_raw in slot 0
                row = ddim_raw_eps_row(n, Point(float(cur), al, sg, float(t)), math.sqrt(a_t), math.sqrt(1.0 - a_t))
                eps_fold.append({"epsilon": (0.0, 1.0), "v_prediction": (sg, al),
                                 "sample": (1.0 / sg if sg else math.inf, -al / sg if sg else -math.inf)}[p])
            else:
                grid = _ascending(schedule, [al, math.sqrt(a_t)], [sg, math.sqrt(1.0 - a_t)], [cur, t])
                row = relabel(solver.rows(grid)[0], n)
            rows.append(row)
        transform = ClipSample(self.config.clip_sample_range) if clip else (_identity if raw_eps else None)
        return Plan(rows, fold, 1 if raw_eps else 0, x0_transform=transform,
                    extra={"eps_fold": eps_fold} if raw_eps else None)

    def _transform_step(self, run: _Run, k, E, cond, uncond, g):
        table, x0, pred = super()._transform_step(run, k, E, cond, uncond, g)
        e_x, e_d = run.program.plan.extra["eps_fold"][k]      # the raw noise estimate, before clipping
        if e_x == 0.0:
            torch.mul(_guided(cond, uncond, g), e_d, out=run.hist[0])
        else:
            torch.add(e_x * E, _guided(cond, uncond, g), alpha=e_d, out=run.hist[0])
        return table, x0, pred

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


def _identity(x0):
    return x0


@drop_in(diffusers.DPMSolverMultistepInverseScheduler)
class DPMSolverMultistepInverseScheduler(FastdiffScheduler, diffusers.DPMSolverMultistepInverseScheduler):
    """Multistep DPM-Solver(++) inversion (fastdiff ``dpm_solver_multistep`` up diffusers' sigmas)."""

    def _result_dtypes(self, sample_dtype, model_dtype):
        """As DPMSolverMultistepScheduler's: the dtype of the converted model output."""
        c = self.config
        identity = (c.prediction_type == "sample" and c.algorithm_type != "dpmsolver") or \
            (c.prediction_type == "epsilon" and c.algorithm_type == "dpmsolver" and not c.thresholding)
        dtype = model_dtype if identity else torch.promote_types(sample_dtype, model_dtype)
        return dtype, dtype

    @property
    def set_begin_index(self):
        """diffusers' class has none (pipelines test for it with hasattr): neither has the drop-in."""
        raise AttributeError(f"{type(self).__name__} has no set_begin_index (diffusers' has none)")

    def _check_config(self):
        c = self.config
        if c.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            _unsupported(type(self).__name__, "algorithm_type", c.algorithm_type,
                         " (the SDE's noise term is not defined for a rising noise level)")
        if c.variance_type is not None:
            _unsupported(type(self).__name__, "variance_type", c.variance_type)
        allowed = ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if c.algorithm_type != "dpmsolver" else ())
        _check_prediction(self, allowed)

    def _plan(self, start: int) -> Plan:
        c = self.config
        n_calls = len(self.timesteps)
        schedule, alpha, sigma, ks = _ksigma_points(self)
        alpha, sigma, ks = alpha[:n_calls + 1], sigma[:n_calls + 1], ks[:n_calls + 1]
        p = c.prediction_type
        fold = [_vp_fold(p, alpha[n], sigma[n], ks[n]) for n in range(start, n_calls)]
        t = np.arange(len(alpha), dtype=np.float64)
        grid = _AscendingDiffusersGrid(schedule, t[start:], alpha[start:], sigma[start:], t[start:],
                                       tail=_zero_length_tail(sigma[start:] / alpha[start:]))
        # (as the sampling drop-in: a zero-length last step, which diffusers' Karras / exponential /
        # beta sigmas and its 'trailing' spacing end with, is the identity)
        solver, rows = _dpm_rows(lambda lof, eaf: get_solver(
            "dpm_solver_multistep", order=c.solver_order,
            algorithm_type="dpmsolver" if c.algorithm_type == "dpmsolver" else "dpmsolver++", solver_type=c.solver_type,
            lower_order_final=lof, euler_at_final=eaf), grid, bool(c.lower_order_final and n_calls < 15),
            c.euler_at_final)
        return Plan(rows, fold, solver.num_slots, x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, variance_noise, return_dict)


DROP_INS[DDIMInverseScheduler.__name__] = DDIMInverseScheduler     # accelerate(pipe) finds them there
DROP_INS[DPMSolverMultistepInverseScheduler.__name__] = DPMSolverMultistepInverseScheduler
