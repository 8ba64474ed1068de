"""Drop-in replacements for diffusers' schedulers: same names, same config, fastdiff's fused step.

    from fastdiff.integrations.diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

Each class subclasses diffusers' class of the same name (config, set_timesteps, timesteps,
sigmas, scale_model_input, add_noise, save/load are diffusers' own) and replaces ``step`` with one
fused pass of a fastdiff coefficient program (fastdiff.integrations.diffusers.base). Its ``_plan``
builds the run's grid from diffusers' own arrays after ``set_timesteps`` and asks a fastdiff
solver for the rows:

=================================  =====================  ==============================================
class                              sample space / grid    fastdiff solver
=================================  =====================  ==============================================
DDPMScheduler                      VP, alphas_cumprod     ddpm (fixed / learned variances)
DDIMScheduler                      VP, (t, t - T/N) pairs ddim(eta)
EulerDiscreteScheduler             VE (x / alpha)         euler
EulerAncestralDiscreteScheduler    VE                     euler_ancestral
HeunDiscreteScheduler              VE                     heun
LMSDiscreteScheduler               VE                     lms coefficients (diffusers' order rule)
KDPM2DiscreteScheduler             VE                     dpm_2
KDPM2AncestralDiscreteScheduler    VE                     dpm_2_ancestral
DPMSolverSDEScheduler              VE                     dpmpp_sde (r = 1/2, diffusers' Brownian noise)
DPMSolverMultistepScheduler        VP / flow              dpm_solver_multistep; sde_dpmsolver
DPMSolverSinglestepScheduler       VP / flow              diffusers' singlestep formulas (singlestep_dpm_rows)
UniPCMultistepScheduler            VP / flow              unipc; solver_p: UniC, then solver_p's drop-in
DEISMultistepScheduler             VP / flow              deis
EDMEulerScheduler                  VE, EDM precondition   euler (s_churn: edm_euler, churn row merged)
EDMDPMSolverMultistepScheduler     VE, EDM precondition   dpm_solver_multistep (dpmsolver++)
FlowMatchEulerDiscreteScheduler    flow                   flow_euler (stochastic_sampling: re-noising)
FlowMatchHeunDiscreteScheduler     flow                   flow_heun
=================================  =====================  ==============================================

One ``step`` call is one row: multi-stage methods (Heun, KDPM2, DPMSolverSDE, FlowMatchHeun)
take one call per model evaluation, on diffusers' interleaved timesteps. A run may begin at any
step (``set_begin_index`` or the first timestep, as img2img pipelines do); multistep solvers warm
up from there, as diffusers' do. Noise is drawn as diffusers draws it (``randn_tensor`` with the
given generator, same shape, dtype and order), so stochastic schedulers give the same samples
for the same generator. Options the drop-in cannot reproduce raise ``NotImplementedError``
naming the option, at construction (or at ``step`` for step arguments).

``step`` returns what diffusers' ``step`` returns: its own output class (``DDIMSchedulerOutput``,
``SchedulerOutput``, ...) or, with ``return_dict=False``, a plain tuple; prev_sample and
pred_original_sample have the dtypes diffusers' arithmetic gives (``_out_dtype`` / ``_x0_dtype``
per class, e.g. the model output's for the Euler family, the sample's for UniPC). Where diffusers
steps without ``set_timesteps`` (DDPM, the Euler family, flow Euler) so does the drop-in. A noise
level repeated inside the schedule (diffusers' 1000-step 'linspace' timesteps repeat 500) is a
zero-length step: at solver_order=1 both take it as the identity; at higher orders diffusers'
own result is NaN and the drop-in raises.

Not reproduced (NotImplementedError naming the option): Euler / flow Heun churn (``s_churn > 0``;
EDMEulerScheduler takes it), learned variances outside DDPM, flow ``invert_sigmas`` /
``per_token_timesteps``.

More drop-ins live in their own modules: ``pndm`` (PNDMScheduler), ``consistency`` (LCMScheduler,
TCDScheduler, FlowMatchLCMScheduler, CMStochasticIterativeScheduler: fastdiff ``lcm`` / ``tcd``),
``ipndm`` (IPNDMScheduler: ``plms``), ``inverse`` (DDIMInverseScheduler,
DPMSolverMultistepInverseScheduler: ``dpm_solver_multistep`` on an ascending grid), ``cosine``
(CosineDPMSolverMultistepScheduler), ``cogvideox`` (CogVideoXDDIMScheduler, CogVideoXDPMScheduler),
``parallel`` (DDIMParallelScheduler, DDPMParallelScheduler with ``batch_step_no_noise``), ``sasolver``
(SASolverScheduler: ``sasolver``), ``score_sde`` (ScoreSdeVeScheduler: ``reverse_diffusion`` predictor,
diffusers' corrector), ``repaint`` (RePaintScheduler: DDIM(eta) rows, the mask blend beside them);
each adds itself to ``DROP_INS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import diffusers
import numpy as np
import torch

from ...guidance import ClipSample, DynamicThresholding
from ...program import Point, Row
from ...schedules import DiscreteVP, FlowMatching, Grid, VESchedule
from ...solvers import get_solver
from ...solvers.base import grid_point, merge_churn, relabel, with_noise
from ...solvers.diffusers_forms import (identity_row, singlestep_dpm_rows, unipc_with_identity_steps,
                                         with_identity_steps)
from ...solvers.exponential import ddim_raw_eps_row
from ...solvers.multistep import ZeroStepError, lms_rows, unic_rows
from .base import FastdiffScheduler, Plan, _guided, _listing, _make_output, _Run, diffusers_output_class, drop_in

__all__ = [
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DROP_INS",
]


# ---------------------------------------------------------------------------------------------
# Grids and diffusers' model-output conversions


def _f64(t) -> np.ndarray:
    return (t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64))


@dataclass
class _DiffusersGrid(Grid):
    """A fastdiff Grid that may end with ``tail`` steps that do not lower the noise level.

    diffusers' Karras / exponential / beta / lu sigmas with ``final_sigmas_type='sigma_min'`` end
    with a step from sigma_min to sigma_min (to a hair above it, in float32, for EDM DPM-Solver),
    and its solvers take it as the identity, or nearly: the first-order steps of fastdiff's
    solvers do the same from these two points (a zero step size), so the grid keeps them. The
    noise levels before the tail strictly decrease, as fastdiff's Grid requires."""

    tail: int = 0
    #: calls j (of the run's calls) whose step goes to the same noise level (j -> j + 1, zero length):
    #: the grid leaves out point j + 1, and a first-order plan takes the call as the identity
    repeats: tuple = ()

    def __post_init__(self):
        n = len(self.t) - self.tail
        if n > 1:             # (a one-step schedule may be a single zero-length step)
            Grid(self.schedule, self.t[:n], self.alpha[:n], self.sigma[:n], self.model_t[:n])

    def without_tail(self) -> Grid:
        n = len(self.t) - self.tail
        return Grid(self.schedule, self.t[:n], self.alpha[:n], self.sigma[:n], self.model_t[:n])


def _zero_length_tail(levels: np.ndarray) -> int:
    """How many steps at the end do not lower the noise level (equal within float32 rounding)."""
    r = 0
    while len(levels) - r >= 2 and abs(levels[-1 - r] - levels[-2 - r]) <= 5e-7 * levels[-2 - r]:
        r += 1
    return r


def _grid(schedule, t, alpha, sigma, levels, allow_repeats: bool = False, hint: str = "") -> _DiffusersGrid:
    """The run's grid; ``allow_repeats``: a noise level repeated inside the schedule (diffusers'
    1000-step 'linspace' timesteps repeat 500) is left out, its call recorded in ``repeats``."""
    levels = np.asarray(levels, dtype=np.float64)
    tail = _zero_length_tail(levels)
    n = len(levels) - tail
    d = np.diff(levels[:n])
    bad = np.nonzero(d >= 0)[0]
    repeats = ()
    if len(bad):
        if not (allow_repeats and np.all(d[bad] == 0)):
            j = int(bad[0])
            raise ValueError(f"this run's schedule repeats (or raises) a noise level: {levels[j]:.6g} at step {j}, "
                             f"then {levels[j + 1]:.6g} ({len(levels)} levels): a zero-length (or backward) step; "
                             f"fastdiff's solvers need decreasing levels{hint}; choose another number of steps or "
                             "timestep spacing")
        repeats = tuple(int(j) for j in bad)
    keep = np.ones(len(levels), dtype=bool)
    keep[[j + 1 for j in repeats]] = False
    t = np.asarray(t, dtype=np.float64)[keep]
    alpha, sigma = np.asarray(alpha, dtype=np.float64)[keep], np.asarray(sigma, dtype=np.float64)[keep]
    return _DiffusersGrid(schedule, t, alpha, sigma, t, tail=tail, repeats=repeats)


def _ve_grid(sigmas: np.ndarray) -> _DiffusersGrid:
    """The Euler family's sample space: x / alpha, i.e. a VE grid (alpha = 1, sigma = diffusers' sigma).
    The schedule only maps off-grid noise levels (stage midpoints) to (alpha, sigma) = (1, level)."""
    s = np.asarray(sigmas, dtype=np.float64)
    return _grid(VESchedule(), s, np.ones_like(s), s, s)


def _vp_grid(schedule, alpha, sigma, t=None, **kwargs) -> _DiffusersGrid:
    alpha, sigma = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    t = np.arange(len(alpha), dtype=np.float64)[::-1].copy() if t is None else t
    with np.errstate(divide="ignore"):
        return _grid(schedule, t, alpha, sigma, sigma / alpha, **kwargs)


def _identity_tail(rows: List[Row], grid: _DiffusersGrid) -> List[Row]:
    """The rows of ``grid.without_tail()`` followed by the tail's steps as the identity (the model
    is still called there, as diffusers calls it, and its output is not used)."""
    n = len(grid.t) - grid.tail - 1
    p = grid_point(grid, n)
    return rows + [identity_row(n + j, p) for j in range(grid.tail)]


def _ve_fold(prediction: str, sigma: float) -> Tuple[float, float]:
    """x0 = A_x * sample + A_d * model_output as the Euler family computes it (sample = x / alpha)."""
    if prediction == "epsilon":
        return 1.0, -sigma
    if prediction == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0                                        # "sample" / "original_sample"


def _vp_fold(prediction: str, alpha: float, sigma: float, ksigma: float) -> Tuple[float, float]:
    """x0 as DDIM / DPM-Solver / UniPC / DEIS compute it (note v: alpha x - sigma v, unnormalized;
    flow_prediction: x - sigmas[i] v with diffusers' own sigma)."""
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v_prediction":
        return alpha, -sigma
    if prediction == "flow_prediction":
        return 1.0, -ksigma
    return 0.0, 1.0                                        # "sample"


def _edm_fold(prediction: str, sigma: float, sigma_data: float) -> Tuple[float, float]:
    """EDM's precondition_outputs: x0 = c_skip * sample + c_out * model_output."""
    n = sigma * sigma + sigma_data * sigma_data
    c_out = sigma * sigma_data / math.sqrt(n)
    return sigma_data * sigma_data / n, (-c_out if prediction == "v_prediction" else c_out)


def _unsupported(cls_name: str, option: str, value, why: str = ""):
    raise NotImplementedError(f"fastdiff's {cls_name} does not support {option}={value!r}{why}; use diffusers' own "
                              f"diffusers.{cls_name} for this configuration")


def _check_prediction(self, allowed: Sequence[str]):
    p = self.config.prediction_type
    if p not in allowed:
        _unsupported(type(self).__name__, "prediction_type", p, f" (supported: {', '.join(allowed)})")


def _x0_transform(config) -> Optional[object]:
    """diffusers' thresholding (which wins over clip_sample) or clip_sample, as fastdiff transforms."""
    if config.get("thresholding", False):
        return DynamicThresholding(config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.get("clip_sample", False):
        return ClipSample(config.clip_sample_range)
    return None


def _vp_schedule(self):
    """A schedule object for VP grids (it is only asked about off-grid points, which the VP plans
    never visit); the flow sigmas of DPM/UniPC/DEIS are a flow-matching schedule."""
    if self.config.get("use_flow_sigmas", False):
        return FlowMatching(self.config.num_train_timesteps)
    return DiscreteVP(betas=_f64(self.betas))


def _ksigma_points(self):
    """(schedule, alpha, sigma, ksigma) of diffusers' ``self.sigmas`` via its _sigma_to_alpha_sigma_t."""
    ks = _f64(self.sigmas)
    if self.config.get("use_flow_sigmas", False):
        return _vp_schedule(self), 1.0 - ks, ks, ks
    alpha = 1.0 / np.sqrt(ks * ks + 1.0)
    return _vp_schedule(self), alpha, ks * alpha, ks


class _StepIndexed:
    """step_index / begin_index for the schedulers diffusers indexes by timestep value (DDIM, DDPM):
    the drop-in counts calls, so a run may also begin mid-schedule (set_begin_index or the first
    timestep found in ``timesteps``)."""

    def _fd_reset(self):
        super()._fd_reset()
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._fd_run = None
        self._begin_index = begin_index

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(t):g} is not one of this run's timesteps {self.timesteps.tolist()}")
        self._step_index = int(hits[0].item())


# ---------------------------------------------------------------------------------------------
# DDPM, DDIM


@drop_in(diffusers.DDPMScheduler)
class DDPMScheduler(_StepIndexed, FastdiffScheduler, diffusers.DDPMScheduler):
    """DDPM ancestral sampling (fastdiff ``ddpm``): fixed_small(_log) / fixed_large variances, and
    the learned ones ('learned', 'learned_range': the model output carries twice the sample's
    channels, the second half the variance): there the step's noise term is diffusers' own
    std(predicted variance) * z, formed beside the fused pass (it is not linear in the model
    output), which adds it with coefficient 1."""
    _fd_cacheable = True

    _needs_set_timesteps = False     # diffusers: the constructor's 1000-step schedule, t -> t - 1

    _returns_x0 = True
    _out_dtype = "promote"

    _LEARNED = ("learned", "learned_range")

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))
        v = self.config.variance_type
        if v not in ("fixed_small", "fixed_small_log", "fixed_large") + self._LEARNED:
            _unsupported("DDPMScheduler", "variance_type", v)

    def _plan(self, start: int) -> Plan:
        acp = _f64(self.alphas_cumprod)
        ts = [int(t) for t in self.timesteps.tolist()]
        a = np.array([acp[t] for t in ts] + [1.0])           # previous_timestep of the last is -1: alpha_prod = 1
        grid = _vp_grid(_vp_schedule(self), np.sqrt(a), np.sqrt(1.0 - a), ts + [-1])
        variance = "fixed_large" if self.config.variance_type == "fixed_large" else "fixed_small"
        rows = get_solver("ddpm", variance=variance).rows(grid)
        draws = [t > 0 for t in ts]
        if variance == "fixed_large" and ts[-1] > 0:
            # diffusers adds noise of variance beta_t = 1 - abar_t also on its last step (to abar = 1, sigma = 0)
            rows[-1] = with_noise(rows[-1], math.sqrt(1.0 - a[-2]), len(ts) - 1)
        if self.config.variance_type in self._LEARNED:      # the noise arrives scaled (_draw_noise)
            rows = [with_noise(r, 1.0, n) if d else r
                    for n, (r, d) in enumerate(zip(rows, draws))]
        p = self.config.prediction_type
        fold = [_vp_fold(p, grid.alpha[n], grid.sigma[n], 0.0) for n in range(len(ts))]
        return Plan(rows, fold, 0, draws=draws, x0_transform=_x0_transform(self.config)).sliced(start)

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        z = super()._draw_noise(k, shape, dtype, device, generator, variance_noise)
        pv = getattr(self, "_fd_variance", None)
        if pv is None:
            return z
        v = self._get_variance(int(self.timesteps[self._step_index]), predicted_variance=pv)   # diffusers' own
        return (torch.exp(0.5 * v) if self.config.variance_type == "learned_range" else v ** 0.5) * z

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.config.variance_type not in self._LEARNED:
            return self._fd_step(model_output, timestep, sample, generator, None, return_dict)
        if not (isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor) and sample.dim() > 1
                and model_output.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1]):
            raise ValueError(f"variance_type={self.config.variance_type!r} needs a model output with twice the sample's "
                             f"channels (the second half the predicted variance), got "
                             f"{tuple(getattr(model_output, 'shape', ()))} for a sample of {tuple(getattr(sample, 'shape', ()))}")
        c = sample.shape[1]
        self._fd_variance = model_output[:, c:]
        try:
            return self._fd_step(model_output[:, :c], timestep, sample, generator, None, return_dict)
        finally:
            self._fd_variance = None


@drop_in(diffusers.DDIMScheduler)
class DDIMScheduler(_StepIndexed, FastdiffScheduler, diffusers.DDIMScheduler):
    """DDIM(eta) (fastdiff ``ddim``) from each timestep t to t - T // N, as diffusers steps.

    With clip_sample / thresholding diffusers keeps the model's raw noise estimate next to the
    clipped x0 unless ``use_clipped_model_output``; the plan then reads that estimate from a
    history slot the step fills."""
    _fd_cacheable = True

    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction"))

    def _plan(self, start: int, eta: float = 0.0, use_clipped_model_output: bool = False) -> Plan:
        acp = _f64(self.alphas_cumprod)
        final = float(self.final_alpha_cumprod)
        T, N = self.config.num_train_timesteps, self.num_inference_steps
        solver = get_solver("ddim", eta=eta)
        transform = _x0_transform(self.config)
        raw_eps = transform is not None and not use_clipped_model_output
        schedule = _vp_schedule(self)
        p = self.config.prediction_type
        rows, fold, eps_fold = [], [], []
        for n, t in enumerate(int(t) for t in self.timesteps.tolist()[start:]):
            prev = t - T // N
            a_t, a_p = acp[t], (acp[prev] if prev >= 0 else final)
            grid = _vp_grid(schedule, [math.sqrt(a_t), math.sqrt(a_p)], [math.sqrt(1 - a_t), math.sqrt(1 - a_p)],
                            [t, prev])
            row = relabel(solver.rows(grid)[0], n)
            if raw_eps:   # prev = sqrt(a_p) x0_clipped + c_eps eps_raw + std z, eps_raw in slot 0
                std = row.out_x.z
                c_eps = math.sqrt(max(1.0 - a_p - std * std, 0.0))
                row = ddim_raw_eps_row(n, row.point, math.sqrt(a_p), c_eps, noise_std=std, noise_id=row.noise_id)
                eps_fold.append({"epsilon": (0.0, 1.0), "sample": (1 / math.sqrt(1 - a_t), -math.sqrt(a_t / (1 - a_t))),
                                 "v_prediction": (math.sqrt(1 - a_t), math.sqrt(a_t))}[p])
            rows.append(row)
            fold.append(_vp_fold(p, math.sqrt(a_t), math.sqrt(1 - a_t), 0.0))
        return Plan(rows, fold, 1 if raw_eps else 0, draws=[eta > 0] * len(rows), x0_transform=transform,
                    extra={"eps_fold": eps_fold} if raw_eps else None)

    def _transform_step(self, run: _Run, k, E, cond, uncond, g):
        table, x0, pred = super()._transform_step(run, k, E, cond, uncond, g)
        extra = run.program.plan.extra
        if extra is not None:     # the raw noise estimate, before clipping
            e_x, e_d = extra["eps_fold"][k]
            torch.add(e_x * E, _guided(cond, uncond, g), alpha=e_d, out=run.hist[0])
        return table, x0, pred

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` "
                             "or `variance_noise` stays `None`.")
        key = _DDIM_DEFAULT_KEY if eta == 0.0 and use_clipped_model_output is False else \
            (("eta", float(eta)), ("use_clipped_model_output", bool(use_clipped_model_output)))
        return self._fd_step(model_output, timestep, sample, generator, variance_noise, return_dict, key=key)


# (the step options of a default DDIM call, built once: the key is compared on every call)
_DDIM_DEFAULT_KEY = (("eta", 0.0), ("use_clipped_model_output", False))


# ---------------------------------------------------------------------------------------------
# The Euler family (sample space x / alpha: a VE grid)


@drop_in(diffusers.EulerDiscreteScheduler)
class EulerDiscreteScheduler(FastdiffScheduler, diffusers.EulerDiscreteScheduler):
    """Euler on the probability-flow ODE (fastdiff ``euler``)."""
    _fd_cacheable = True

    _x0_dtype = "promote_f32"         # diffusers upcasts the sample to float32 first
    _needs_set_timesteps = False

    _returns_x0 = True
    _float_timesteps = True

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction", "sample", "original_sample"))

    def _plan(self, start: int) -> Plan:
        # the steps go through sigmas[: len(timesteps) + 1] (with interpolation_type='log_linear'
        # diffusers' sigmas have one more entry, which no step reaches)
        grid = _ve_grid(_f64(self.sigmas)[:len(self.timesteps) + 1])
        rows = get_solver("euler", ode_space="ve").rows(grid)
        p = self.config.prediction_type
        return Plan(rows, [_ve_fold(p, s) for s in grid.sigma[:-1]], 0).sliced(start)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if s_churn:
            _unsupported(type(self).__name__, "s_churn", s_churn, " (diffusers' churned Euler step)")
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


@drop_in(diffusers.EulerAncestralDiscreteScheduler)
class EulerAncestralDiscreteScheduler(FastdiffScheduler, diffusers.EulerAncestralDiscreteScheduler):
    """Euler ancestral (fastdiff ``euler_ancestral``, eta = 1); noise at every step, as diffusers."""
    _fd_cacheable = True

    _x0_dtype = "promote_f32"         # diffusers upcasts the sample to float32 first
    _needs_set_timesteps = False

    _returns_x0 = True
    _float_timesteps = True

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        grid = _ve_grid(_f64(self.sigmas))
        rows = get_solver("euler_ancestral", ode_space="ve").rows(grid)
        p = self.config.prediction_type
        return Plan(rows, [_ve_fold(p, s) for s in grid.sigma[:-1]], 0, draws=[True] * len(rows)).sliced(start)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


def _stage_fold(prediction, rows: List[Row], fold=_ve_fold):
    """The conversion at each row's own evaluation point (a stage's midpoint, or the next grid point)."""
    return [fold(prediction, r.point.sigma) for r in rows]


def _unique_sigmas(self) -> np.ndarray:
    """The grid of the two-stage schedulers, whose ``sigmas`` repeat the inner points."""
    return _f64(torch.unique_consecutive(self.sigmas.detach().cpu()))


@drop_in(diffusers.HeunDiscreteScheduler)
class HeunDiscreteScheduler(FastdiffScheduler, diffusers.HeunDiscreteScheduler):
    """Heun (fastdiff ``heun``): two calls per step, the last step Euler."""
    _fd_cacheable = True

    _needs_set_timesteps = False

    _stage_flag = "dt"

    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction", "sample"))

    def _plan(self, start: int) -> Plan:
        rows = get_solver("heun", ode_space="ve").rows(_ve_grid(_unique_sigmas(self)))
        return Plan(rows, _stage_fold(self.config.prediction_type, rows), 1,
                    x0_transform=_x0_transform(self.config)).sliced(start)

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


@drop_in(diffusers.LMSDiscreteScheduler)
class LMSDiscreteScheduler(FastdiffScheduler, diffusers.LMSDiscreteScheduler):
    """Linear multistep (fastdiff's LMS coefficients) with diffusers' order rule: the order of
    step n is min(n + 1, order) counted from the schedule's start, using the derivatives of the
    steps this run took (so a run begun mid-schedule uses the leading coefficients only)."""
    _fd_cacheable = True

    _needs_set_timesteps = False

    _returns_x0 = True
    _float_timesteps = False
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction", "sample"))

    def _plan(self, start: int, order: int = 4) -> Plan:
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        rows = lms_rows(_ve_grid(_f64(self.sigmas)), order, start)
        return Plan(rows, _stage_fold(self.config.prediction_type, rows), order - 1)

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict, key=(("order", order),))


@drop_in(diffusers.KDPM2DiscreteScheduler)
class KDPM2DiscreteScheduler(FastdiffScheduler, diffusers.KDPM2DiscreteScheduler):
    """DPM-Solver-2 in k-diffusion's form (fastdiff ``dpm_2``): model at the geometric mean of the
    step's noise levels; two calls per step, the last step Euler."""
    _fd_cacheable = True

    _needs_set_timesteps = False

    _stage_flag = "sample"

    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        rows = get_solver("dpm_2", ode_space="ve").rows(_ve_grid(_unique_sigmas(self)))
        return Plan(rows, _stage_fold(self.config.prediction_type, rows), 0).sliced(start)

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


@drop_in(diffusers.KDPM2AncestralDiscreteScheduler)
class KDPM2AncestralDiscreteScheduler(FastdiffScheduler, diffusers.KDPM2AncestralDiscreteScheduler):
    """DPM-2 ancestral (fastdiff ``dpm_2_ancestral``): noise in each step's second call."""
    _fd_cacheable = True

    _needs_set_timesteps = False

    _stage_flag = "sample"

    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        rows = get_solver("dpm_2_ancestral").rows(_ve_grid(_unique_sigmas(self)))
        return Plan(rows, _stage_fold(self.config.prediction_type, rows), 0,
                    draws=[r.eval_at == "y" for r in rows]).sliced(start)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


@drop_in(diffusers.DPMSolverSDEScheduler)
class DPMSolverSDEScheduler(FastdiffScheduler, diffusers.DPMSolverSDEScheduler):
    """DPM-Solver++ SDE (fastdiff ``dpmpp_sde`` with r = 1/2 and independent draws per stage), its
    noise taken from diffusers' own Brownian-tree noise sampler at diffusers' query points."""

    _needs_set_timesteps = False

    _stage_flag = "sample"

    _returns_x0 = True
    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int, s_noise: float = 1.0) -> Plan:
        rows = get_solver("dpmpp_sde", r=0.5, s_noise=s_noise, brownian=False).rows(_ve_grid(_unique_sigmas(self)))
        sig = self.sigmas.detach().cpu().float()
        queries, draws = [], []
        for c, r in enumerate(rows):                         # c: the call index in diffusers' arrays
            first = r.eval_at == "x"
            sigma, sigma_next = (sig[c], sig[c + 1]) if first else (sig[c - 1], sig[c])
            t, t_next = sigma.log().neg(), sigma_next.log().neg()      # diffusers' float32 arithmetic
            t_target = t + (t_next - t) * 0.5 if first else t_next
            queries.append((t.neg().exp(), t_target.neg().exp()))
            draws.append(bool(sigma_next != 0))
        plan = Plan(rows, _stage_fold(self.config.prediction_type, rows), 1, draws=draws).sliced(start)
        plan.extra = {"queries": queries[start:]}
        return plan

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        return self.noise_sampler(*self._fd_run.program.plan.extra["queries"][k])

    def _set_stage(self, k, second_next, sample):
        super()._set_stage(k, second_next, sample)
        # the midpoint's noise level, as diffusers computed it (its scale_model_input reads it)
        self.mid_point_sigma = self._fd_run.program.plan.extra["queries"][k][1] if second_next else None

    def step(self, model_output, timestep, sample, return_dict=True, s_noise=1.0):
        created = self.noise_sampler is None
        if created:     # diffusers' tree over the run's noise levels, seeded as diffusers seeds it
            from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
            if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
                raise TypeError(f"sample must be a floating-point torch.Tensor, got {type(sample).__name__}")
            min_sigma, max_sigma = self.sigmas[self.sigmas > 0].min(), self.sigmas.max()
            self.noise_sampler = BrownianTreeNoiseSampler(sample, min_sigma.item(), max_sigma.item(),
                                                          self.noise_sampler_seed)
        try:
            return self._fd_step(model_output, timestep, sample, None, None, return_dict, key=(("s_noise", s_noise),))
        except BaseException:
            if created:                    # a rejected call changes nothing
                self.noise_sampler = None
            raise


# ---------------------------------------------------------------------------------------------
# Multistep exponential integrators (sample space: VP, or flow with use_flow_sigmas)


def _dpm_rows(make_solver, grid: _DiffusersGrid, lower_order_final: bool, euler_at_final: bool):
    """(solver, rows) of multistep DPM-Solver with diffusers' final-step options. A zero-length
    final step that diffusers takes at order >= 2 (no final order lowering) computes 0 * inf
    there: the identity at order 2, NaN at order 3; fastdiff takes it as the identity, after the
    steps before it, which then have no final lowering either."""
    solver = make_solver(lower_order_final, euler_at_final)
    try:
        return solver, solver.rows(grid)
    except ZeroDivisionError:
        if not grid.tail:
            raise
    solver = make_solver(False, False)
    return solver, _identity_tail(solver.rows(grid.without_tail()), grid)


_REPEAT_HINT = (" (diffusers' own result there is NaN at solver_order >= 2; at solver_order=1 both take the step "
                "as the identity)")


def _multistep_grid(self, start: int, first_order: bool = False, hint: str = _REPEAT_HINT):
    """(grid, fold) of the calls from ``start``; ``first_order``: the plan takes zero-length steps
    inside the schedule as the identity (``with_identity_steps``)."""
    schedule, alpha, sigma, ks = _ksigma_points(self)
    t = np.arange(len(alpha), dtype=np.float64)[::-1].copy()
    grid = _vp_grid(schedule, alpha[start:], sigma[start:], t[start:], allow_repeats=first_order, hint=hint)
    p = self.config.prediction_type
    fold = [_vp_fold(p, alpha[n], sigma[n], ks[n]) for n in range(start, len(alpha) - 1)]
    return grid, fold


@drop_in(diffusers.DPMSolverMultistepScheduler)
class DPMSolverMultistepScheduler(FastdiffScheduler, diffusers.DPMSolverMultistepScheduler):
    """Multistep DPM-Solver / DPM-Solver++ (fastdiff ``dpm_solver_multistep``), orders 1-3, ODE or
    SDE (sde-dpmsolver++: eta = 1), with diffusers' lower_order_final / euler_at_final rules."""
    _fd_cacheable = True

    def _result_dtypes(self, sample_dtype, model_dtype):
        """diffusers casts its result to the dtype of the converted model output: the model output's
        where the conversion is the identity (x0 = output for dpmsolver++ 'sample' prediction,
        eps = output for dpmsolver 'epsilon' without thresholding), else the promotion."""
        c = self.config
        eps = c.algorithm_type in ("dpmsolver", "sde-dpmsolver")
        identity = (c.prediction_type == "sample" and not eps) or \
            (c.prediction_type == "epsilon" and eps and not c.thresholding)
        dtype = model_dtype if identity else torch.promote_types(sample_dtype, model_dtype)
        return dtype, dtype

    def _check_config(self):
        c = self.config
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            _unsupported(type(self).__name__, "solver_order", 3, " with algorithm_type='sde-dpmsolver' (diffusers' "
                         "third-order step has no formula for it and fails)")
        if c.variance_type is not None:
            _unsupported(type(self).__name__, "variance_type", c.variance_type)
        allowed = ("epsilon", "sample", "v_prediction") + \
            (("flow_prediction",) if c.algorithm_type not in ("dpmsolver", "sde-dpmsolver") else ())
        _check_prediction(self, allowed)

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid, fold = _multistep_grid(self, start, first_order=c.solver_order == 1)
        if c.algorithm_type == "sde-dpmsolver":      # (noise prediction: fastdiff's sde_dpmsolver)
            solver, rows = _dpm_rows(lambda lof, eaf: get_solver(
                "sde_dpmsolver", order=c.solver_order, solver_type=c.solver_type, lower_order_final=lof,
                euler_at_final=eaf), grid, bool(c.lower_order_final and len(self.timesteps) < 15), c.euler_at_final)
            rows = with_identity_steps(rows, grid.repeats)
            return Plan(rows, fold, solver.num_slots, draws=[True] * len(rows), noise_dtype=torch.float32,
                        x0_transform=_x0_transform(c))
        sde = c.algorithm_type == "sde-dpmsolver++"
        solver, rows = _dpm_rows(lambda lof, eaf: get_solver(
            "dpm_solver_multistep", order=c.solver_order,
            algorithm_type="dpmsolver" if c.algorithm_type == "dpmsolver" else "dpmsolver++", solver_type=c.solver_type,
            lower_order_final=lof, euler_at_final=eaf, eta=1.0 if sde else 0.0),
            grid, bool(c.lower_order_final and len(self.timesteps) < 15), c.euler_at_final)
        rows = with_identity_steps(rows, grid.repeats)
        return Plan(rows, fold, solver.num_slots, draws=[sde] * len(rows), noise_dtype=torch.float32 if sde else None,
                    x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, variance_noise, return_dict)


def _unipc_corrector_plan(self, start: int) -> Plan:
    """UniPC with ``solver_p``: the rows of UniPC's own corrector alone (UniC), one per call.

    diffusers' step with solver_p corrects the sample it is given with UniC (its own model
    outputs, its own sigmas and order rule, as without solver_p) and hands the corrected sample
    to ``solver_p.step`` as the predictor. Call n (of the run) evaluates at y (the sample, E), keeps
    the last corrected sample c_{n-1} in x, writes c_n to x (the next call's ``last_sample``) and
    to y, which it returns; its converted model output goes to the ring of history slots, as
    UniPC's ``model_outputs``. The first call has no corrector (diffusers' ``last_sample`` is None
    after set_timesteps): c_0 is the sample itself."""
    c = self.config
    name = type(self).__name__
    _, alpha, sigma, ks = _ksigma_points(self)
    n_total = len(self.timesteps)
    calls = n_total - start
    points = [Point(float(i), float(alpha[i]), float(sigma[i]), float(i)) for i in range(start, n_total)]
    solver = get_solver("unipc", order=c.solver_order, solver_type=c.solver_type, predict_x0=c.predict_x0)

    def predictor_order(n: int) -> int:         # diffusers' this_order of call n (absolute index start + n)
        k = min(c.solver_order, n_total - (start + n)) if c.lower_order_final else c.solver_order
        return min(k, n + 1)

    disabled = [int(d) for d in c.disable_corrector]
    try:
        rows = unic_rows(solver, points, [predictor_order(n) for n in range(calls)],
                         [n for n in range(1, calls) if start + n - 1 in disabled])
    except ZeroStepError as e:
        i, k = start + e.call, e.order
        raise ValueError(f"{name} with solver_p: UniPC's corrector of order {k} at call {e.call} divides by a "
                         f"zero step in log-SNR (a noise level repeated in this schedule: sigmas "
                         f"{_listing(ks[max(i - k - 1, 0):i + 1])}); diffusers' result there is NaN. "
                         "Choose another number of steps or timestep spacing") from None
    fold = [_vp_fold(c.prediction_type, alpha[i], sigma[i], ks[i]) for i in range(start, n_total)]
    return Plan(rows, fold, c.solver_order, x0_transform=_x0_transform(c) if c.predict_x0 else None)


@drop_in(diffusers.UniPCMultistepScheduler)
class UniPCMultistepScheduler(FastdiffScheduler, diffusers.UniPCMultistepScheduler):
    """UniPC (fastdiff ``unipc``): UniP predictor and UniC corrector, bh1 / bh2, orders 1-3.
    Where diffusers' bh1 or noise-prediction UniPC gives NaN on a final step to sigma = 0, this
    gives the first-order step.

    ``solver_p`` (another scheduler as the predictor, "solver_p + UniC"): as diffusers, each call
    corrects the sample with UniC and then returns ``solver_p.step(model_output, timestep,
    corrected).prev_sample``, solver_p stepping through its own timesteps from the one it finds at
    its first call (``_predictor_timestep``). Both run fused: the corrector is one pass of this
    class's program (``_unipc_corrector_plan``), the predictor one pass of solver_p's fastdiff
    drop-in, which the constructor makes from the given diffusers scheduler (same class and config;
    the object given is left as it is, ``config.solver_p`` keeps it; each has its own
    ``fastdiff_backend``). One pass cannot do both: the corrector reads UniPC's model outputs converted at the
    sample as given, the predictor solver_p's converted at the corrected sample, two histories
    where a row writes one."""
    _fd_cacheable = True

    _out_dtype = "sample"              # diffusers casts its result to the sample's dtype

    def _check_config(self):
        c = self.config
        allowed = ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if c.predict_x0 else ())
        _check_prediction(self, allowed)
        if self.solver_p is not None:
            self.solver_p = _fastdiff_predictor(type(self).__name__, self.solver_p)

    def _plan(self, start: int) -> Plan:
        c = self.config
        if self.solver_p is not None:
            return _unipc_corrector_plan(self, start)
        grid, fold = _multistep_grid(self, start, first_order=c.solver_order == 1)
        disabled = [int(d) - start for d in c.disable_corrector if int(d) >= start]
        # (on a grid without repeated levels: steps after a zero-length one move down; the
        # corrector of a zero-length step is the identity anyway)
        disabled = [d - sum(j < d for j in grid.repeats) for d in disabled if d not in grid.repeats]
        solver = get_solver("unipc", order=c.solver_order, solver_type=c.solver_type, predict_x0=c.predict_x0,
                            disable_corrector=disabled, lower_order_final=c.lower_order_final)
        try:
            rows = unipc_with_identity_steps(solver.rows(grid), grid.repeats)
        except ZeroDivisionError:
            if not grid.tail:
                raise
            raise ValueError("this schedule ends with a zero-length step (final_sigmas_type='sigma_min' with Karras/"
                             "exponential/beta sigmas), which UniPC with lower_order_final=False takes at order >= 2, "
                             "dividing by its zero step size; use lower_order_final=True or final_sigmas_type='zero'")
        return Plan(rows, fold, solver.num_slots, x0_transform=_x0_transform(c) if c.predict_x0 else None)

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.solver_p is None:
            return self._fd_step(model_output, timestep, sample, None, None, return_dict)
        predictor = self.solver_p
        predictor_timestep = self._predictor_timestep(predictor, timestep)     # (checks before anything changes)
        run = self._fd_run
        saved = (run, self._step_index)
        # Checked above, solver_p can still fail where this call starts its run (its plan): then
        # the corrector's buffers are put back (a run this call starts is simply dropped).
        starts = not isinstance(predictor, FastdiffScheduler) or getattr(predictor, "_fd_run", None) is None
        buffers = (run.x.clone(), None if run.hist is None else run.hist.clone()) if starts and run is not None \
            else None
        corrected = self._fd_step(model_output, timestep, sample, None, None, False)[0]
        try:
            prev_sample = predictor.step(model_output, predictor_timestep, corrected).prev_sample   # diffusers' call
        except BaseException:
            self._fd_run, self._step_index = saved
            if buffers is not None:
                run.x.copy_(buffers[0])
                if buffers[1] is not None:
                    run.hist.copy_(buffers[1])
            raise
        if not return_dict:
            return (prev_sample,)
        return _make_output(diffusers_output_class(type(self)), prev_sample=prev_sample)

    def _predictor_timestep(self, predictor, timestep):
        """The timestep to hand solver_p, as diffusers' call means it: solver_p finds its start from
        the timestep of its first call and then counts calls through its own timesteps (the DPM-Solver
        family reads the timestep only there). The drop-in checks the timestep of every call, so it
        gets its own from then on; where solver_p's step reads the value itself, the two must agree."""
        if not isinstance(predictor, FastdiffScheduler):
            return timestep          # (a scheduler assigned to .solver_p later: diffusers' call as it is)
        name, pname = type(self).__name__, type(predictor).__name__
        run = self._fd_run
        if run is not None and self._step_index is not None and self._step_index < run.n + run.start:
            mine = run.timesteps[self._step_index]
        else:                                                    # (a run's first call: its timestep)
            try:
                mine = float(timestep)
            except (TypeError, ValueError, RuntimeError):
                return timestep                                  # (this class's step refuses it first)
        theirs = _host_timesteps(predictor)
        index = getattr(predictor, "_step_index", None)
        if index is None:                                        # solver_p's first call: it looks the timestep up
            if getattr(predictor, "begin_index", None) is None and mine not in theirs:
                raise ValueError(f"{name}: solver_p ({pname}) starts where it finds the first call's timestep "
                                 f"{mine:g} among its own timesteps {_listing(theirs)}, and it has none; give it the "
                                 "timestep options of this scheduler")
            return timestep
        if index >= len(theirs):
            raise ValueError(f"{name}: solver_p ({pname}) has stepped through all of its {len(theirs)} timesteps; "
                             "call set_timesteps() on this scheduler (it sets solver_p's too)")
        if theirs[index] == mine:
            return timestep
        if pname not in _INDEX_STEPPED:
            raise ValueError(f"{name}: solver_p ({pname}) is at its timestep {theirs[index]:g}, this call at {mine:g}; "
                             f"{pname}'s step computes with the timestep it is given, which fastdiff's drop-in takes "
                             "only at its own: give solver_p the timestep options of this scheduler")
        return predictor.timesteps[index]


#: solver_p classes whose diffusers step reads the given timestep only to find its first step
#: (then counts steps through its own sigmas)
_INDEX_STEPPED = frozenset(("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                            "DEISMultistepScheduler"))


def _host_timesteps(scheduler) -> List[float]:
    run = getattr(scheduler, "_fd_run", None)
    return run.timesteps if run is not None else [float(t) for t in scheduler.timesteps.tolist()]


def _fastdiff_predictor(owner: str, solver_p):
    """The fastdiff drop-in for a diffusers scheduler given as UniPC's ``solver_p`` (same config);
    a fastdiff drop-in as it is."""
    if isinstance(solver_p, FastdiffScheduler):
        return solver_p
    name = type(solver_p).__name__
    cls = DROP_INS.get(name)
    if cls is None or type(solver_p) is not getattr(diffusers, name, None):
        _unsupported(owner, "solver_p", name, f" (fastdiff has no drop-in for {type(solver_p).__module__}.{name}; "
                     f"solver_p can be any of {', '.join(sorted(DROP_INS))})")
    config = {k: v for k, v in solver_p.config.items() if k != "_use_default_values"}
    return cls.from_config(config)


@drop_in(diffusers.DEISMultistepScheduler)
class DEISMultistepScheduler(FastdiffScheduler, diffusers.DEISMultistepScheduler):
    """DEIS (fastdiff ``deis``, log-rho), orders 1-3; its schedule ends at sigma_min, as diffusers'."""
    _fd_cacheable = True

    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "sample", "v_prediction", "flow_prediction"))

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid, fold = _multistep_grid(self, start, first_order=c.solver_order == 1)
        solver = get_solver("deis", order=c.solver_order, lower_order_final=bool(c.lower_order_final and len(self.timesteps) < 15))
        rows = with_identity_steps(solver.rows(grid), grid.repeats)
        return Plan(rows, fold, solver.num_slots, x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._fd_step(model_output, timestep, sample, None, None, return_dict)


@drop_in(diffusers.DPMSolverSinglestepScheduler)
class DPMSolverSinglestepScheduler(FastdiffScheduler, diffusers.DPMSolverSinglestepScheduler):
    """diffusers' singlestep DPM-Solver (orders 1-3 by its order list, dpmsolver / dpmsolver++ /
    sde-dpmsolver++, midpoint / heun): its intermediate stages are the grid's own points, which
    fastdiff's ``dpm_solver`` (stages at r = 1/2, 1/3, 2/3 of a step) does not take, so the
    coefficients are diffusers' formulas (fastdiff.solvers.diffusers_forms.singlestep_dpm_rows)."""

    _out_dtype = "promote"

    def _check_config(self):
        c = self.config
        if c.variance_type is not None:
            _unsupported(type(self).__name__, "variance_type", c.variance_type)
        allowed = ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if c.algorithm_type != "dpmsolver" else ())
        _check_prediction(self, allowed)

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid, fold = _multistep_grid(self, start, first_order=c.solver_order == 1)
        orders, made = [], 0
        for o in self.order_list[start:]:           # diffusers lowers an order its stored outputs cannot support
            orders.append(min(int(o), made + 1))
            made += 1
        S = c.solver_order - 1
        orders = orders[:len(orders) - len(grid.repeats)]      # (all 1 where the grid has repeats)
        rows = with_identity_steps(singlestep_dpm_rows(grid, orders, c.algorithm_type, c.solver_type, S),
                                   grid.repeats)
        sde = c.algorithm_type == "sde-dpmsolver++"
        return Plan(rows, fold, S, draws=[sde] * len(rows), x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


# ---------------------------------------------------------------------------------------------
# EDM (VE sample space with EDM's preconditioning)


@drop_in(diffusers.EDMEulerScheduler)
class EDMEulerScheduler(FastdiffScheduler, diffusers.EDMEulerScheduler):
    """EDM Euler (fastdiff ``edm_euler`` on EDM's sigmas, x0 by EDM's c_skip / c_out), with churn.

    Churn (``s_churn > 0``): fastdiff's ``edm_euler`` gives a churn row (x + std z, up to sigma_hat)
    and the Euler step from sigma_hat; diffusers calls the model *before* the churn (on the
    unchurned sample) and preconditions its output with sigma_hat on the churned sample, so the two
    rows are one call: the churn's noise is carried through EDM's c_skip into the step's noise
    term (``_merge_churn``), and pred_original_sample gets its c_skip * std * z."""
    _fd_cacheable = True

    _x0_dtype = "promote_f32"         # diffusers upcasts the sample to float32 first
    _needs_set_timesteps = False

    _returns_x0 = True

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
              s_noise: float = 1.0) -> Plan:
        grid = _ve_grid(_f64(self.sigmas))
        p, sd = self.config.prediction_type, self.config.sigma_data
        if not s_churn:
            rows = get_solver("euler", ode_space="ve").rows(grid)
            return Plan(rows, [_edm_fold(p, s, sd) for s in grid.sigma[:-1]], 0).sliced(start)
        solver_rows = get_solver("edm_euler", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                                 ode_space="ve").rows(grid)
        rows, fold, draws, x0_noise = [], [], [], []
        pending = None
        for r in solver_rows:
            if r.point is None:                       # the churn row of the next step
                pending = r
                continue
            f = _edm_fold(p, r.point.sigma, sd)       # at sigma_hat
            std = pending.out_x.z if pending is not None else 0.0
            rows.append(merge_churn(pending, relabel(r, len(rows)), f))
            fold.append(f)
            draws.append(pending is not None)
            x0_noise.append(f[0] * std)               # pred_original_sample's noise: c_skip * std * z
            pending = None
        plan = Plan(rows, fold, 0, draws=draws).sliced(start)
        plan.extra = {"x0_noise": x0_noise[start:]}
        return plan

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        noise = super()._draw_noise(k, shape, dtype, device, generator, variance_noise)
        self._fd_noise = noise
        return noise

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, pred_original_sample=None):
        if not s_churn:
            return self._fd_step(model_output, timestep, sample, generator, None, return_dict,
                                 x0=pred_original_sample)
        if pred_original_sample is not None:
            _unsupported(type(self).__name__, "pred_original_sample", "<tensor>", " together with s_churn > 0")
        key = (("s_churn", float(s_churn)), ("s_tmin", float(s_tmin)), ("s_tmax", float(s_tmax)),
               ("s_noise", float(s_noise)))
        self._fd_noise = None
        out = self._fd_step(model_output, timestep, sample, generator, None, return_dict, key=key)
        c = self._fd_run.program.plan.extra["x0_noise"][self._step_index - 1 - self._fd_run.start]
        if c and self._fd_noise is not None:          # the churned sample's part of x0
            x0 = out[1]
            x0 = (x0.float() + c * self._fd_noise.float()).to(x0.dtype) if x0.dtype != torch.float64 \
                else x0 + c * self._fd_noise.double()
            if return_dict:
                out.pred_original_sample = x0
            else:
                out = (out[0], x0)
        self._fd_noise = None
        return out


@drop_in(diffusers.EDMDPMSolverMultistepScheduler)
class EDMDPMSolverMultistepScheduler(FastdiffScheduler, diffusers.EDMDPMSolverMultistepScheduler):
    """DPM-Solver++ multistep (ODE or SDE) on EDM's sigmas with EDM's preconditioning."""
    _fd_cacheable = True

    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid = _ve_grid(_f64(self.sigmas)[start:])
        sde = c.algorithm_type == "sde-dpmsolver++"
        solver, rows = _dpm_rows(lambda lof, eaf: get_solver(
            "dpm_solver_multistep", order=c.solver_order, algorithm_type="dpmsolver++", solver_type=c.solver_type,
            lower_order_final=lof, euler_at_final=eaf, eta=1.0 if sde else 0.0),
            grid, bool(c.lower_order_final and len(self.timesteps) < 15), c.euler_at_final)
        fold = [_edm_fold(c.prediction_type, s, c.sigma_data) for s in grid.sigma[:-1]]
        return Plan(rows, fold, solver.num_slots, draws=[sde] * len(rows), x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


# ---------------------------------------------------------------------------------------------
# Flow matching (sample space: x = (1 - t) x0 + t eps)


def _flow_grid(self, sigmas: np.ndarray) -> Grid:
    return _vp_grid(FlowMatching(self.config.num_train_timesteps), 1.0 - sigmas, sigmas, sigmas)


@drop_in(diffusers.FlowMatchEulerDiscreteScheduler)
class FlowMatchEulerDiscreteScheduler(FastdiffScheduler, diffusers.FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler (fastdiff ``flow_euler``): shift, dynamic shifting (mu), custom sigmas or
    timesteps, karras/exponential/beta sigmas, shift_terminal: whatever diffusers' set_timesteps
    gives. ``stochastic_sampling``: x0 = x - sigma v re-noised to the next level with fresh noise."""
    _fd_cacheable = True

    _needs_set_timesteps = False

    _float_timesteps = True

    def _check_config(self):
        if self.config.invert_sigmas:
            _unsupported(type(self).__name__, "invert_sigmas", True, " (its noise levels rise to 1)")

    def _plan(self, start: int) -> Plan:
        grid = _flow_grid(self, _f64(self.sigmas))
        fold = [(1.0, -s) for s in grid.sigma[:-1]]                  # x0 = sample - sigma * v
        if not self.config.stochastic_sampling:
            return Plan(get_solver("flow_euler").rows(grid), fold, 0).sliced(start)
        rows = get_solver("lcm").rows(grid)    # x0 re-noised: alpha_{n+1} x0 + sigma_{n+1} z
        return Plan(rows, fold, 0, draws=[True] * len(rows), noise_dtype=torch.float32).sliced(start)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        if per_token_timesteps is not None:
            _unsupported(type(self).__name__, "per_token_timesteps", "<tensor>")
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


@drop_in(diffusers.FlowMatchHeunDiscreteScheduler)
class FlowMatchHeunDiscreteScheduler(FastdiffScheduler, diffusers.FlowMatchHeunDiscreteScheduler):
    """Flow-matching Heun (fastdiff ``flow_heun``): two calls per step, the last step Euler."""
    _fd_cacheable = True

    _stage_flag = "dt"

    _float_timesteps = True

    def _plan(self, start: int) -> Plan:
        grid = _flow_grid(self, _unique_sigmas(self))
        rows = get_solver("flow_heun").rows(grid)
        return Plan(rows, [(1.0, -r.point.sigma) for r in rows], 1).sliced(start)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if s_churn:
            _unsupported(type(self).__name__, "s_churn", s_churn)
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


#: diffusers' scheduler class name -> the drop-in
DROP_INS = {cls.__name__: cls for cls in (
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
    LMSDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DPMSolverSDEScheduler,
    DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, EDMEulerScheduler,
    EDMDPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
    DPMSolverSinglestepScheduler)}
