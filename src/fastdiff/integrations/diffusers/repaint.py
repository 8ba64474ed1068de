"""The RePaintScheduler drop-in (RePaint inpainting, Lugmayr et al. 2022; diffusers' RePaintPipeline).

    from fastdiff.integrations.diffusers import RePaintScheduler
    pipe.scheduler = RePaintScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' ``RePaintScheduler`` (config, ``set_timesteps`` with its jumps,
``timesteps``, ``eta``, ``scale_model_input`` are diffusers' own). ``step(model_output, t, sample,
original_image, mask, generator)`` is diffusers' arithmetic:

    unknown = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z   (DDIM(eta); z only if t > 0)
    known   = sqrt(abar_prev) original_image + sqrt(1 - abar_prev) z        (the same z)
    prev    = mask * known + (1 - mask) * unknown

with x0 = (sample - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to [-1, 1] by ``clip_sample``
(the raw eps stays in the direction term, as diffusers keeps it), std = eta sqrt(variance) and
abar_prev the level T // N below t. x0 is formed as diffusers forms it (its float32 coefficients
and operation order: at high noise levels its rounding is large next to x0, and this keeps it
diffusers' own), the raw eps goes to a history slot; the unknown part is then DDIM(eta)'s
posterior update in one fused pass, which also writes sqrt(1 - abar_prev) z; the known part and
the blend are two passes beside it (add original_image; ``lerp`` by the mask, which takes mask 0
and 1 to the two parts exactly, as diffusers' formula does). The noise is drawn as diffusers draws it: one
``randn_tensor`` of the model output's shape and dtype per call, also where eta = 0 or t = 0
(where it only enters the known part).

``undo_step`` (the re-noising jumps back up the schedule) is diffusers' own loop, bit for bit (the
same draws, coefficients and operation order), without its temporaries. The step is stateless:
a call at any timestep of the schedule (the pipeline's loop calls ``step`` where t goes down and
``undo_step`` where it goes up) takes that timestep's row of the run's program. (That row is found
from the timestep's value: a timestep tensor on a GPU is read back once per call, as diffusers'
own step reads it. The program has one row per entry of ``timesteps``, jumps included, as the
drop-in machinery wants one per position: 4,570 rows for RePaint's 250 steps with jumps of 10 x
10, compiled at the first call in about 0.5 s here.)

Input checks (before anything changes, the generator included): ``original_image`` and ``mask``
must broadcast to the sample's shape without changing it (diffusers' pipeline passes a mask of
shape (B, 1, H, W)), be floating point and on the sample's device.
"""
from __future__ import annotations

import functools
import math

import diffusers
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ...solvers.diffusers_forms import repaint_rows
from .base import FastdiffScheduler, Plan, _guided, _listing, _make_output, _Run, diffusers_output_class, drop_in
from .schedulers import DROP_INS, _f64

__all__ = ["RePaintScheduler"]


@drop_in(diffusers.RePaintScheduler)
class RePaintScheduler(FastdiffScheduler, diffusers.RePaintScheduler):
    """RePaint: the DDIM(eta) posterior step as one fastdiff row per timestep, plus diffusers' known-region blend."""

    _returns_x0 = True
    _out_dtype = "promote"

    @property
    def set_begin_index(self):
        """diffusers' class has none (pipelines test for it with hasattr): neither has the drop-in."""
        raise AttributeError(f"{type(self).__name__} has no set_begin_index (diffusers' has none)")

    def _fd_reset(self):
        super()._fd_reset()
        self._fd_entries = None            # timestep value -> its first index in self.timesteps

    def _init_index(self, timestep) -> int:
        return 0                           # (a run's program covers every entry of the timesteps)

    # ------------------------------------------------------------------------------------------
    # The program: one row per entry of the timesteps (rows depend on the timestep value only)

    def _plan(self, start: int, eta: float = 0.0) -> Plan:
        acp = _f64(self.alphas_cumprod)
        final = float(self.final_alpha_cumprod)
        delta = self.config.num_train_timesteps // self.num_inference_steps
        ts = [int(t) for t in self.timesteps.tolist()[start:]]
        prev = [_alpha_prev(t, acp, final, delta) for t in ts]
        rows = repaint_rows(ts, [float(acp[t]) for t in ts], prev, eta)
        fold = [(1.0 / r.point.alpha, -r.point.sigma / r.point.alpha) for r in rows]      # eps -> x0
        sqrt_prev = [math.sqrt(a) for a in prev]
        # (x0 is always formed beside the pass, as diffusers forms it: _transform_step)
        return Plan(rows, fold, 1, draws=[True] * len(rows), x0_transform=_formed_beside,
                    extra={"sqrt_prev": sqrt_prev, "t": ts})

    def _transform_step(self, run: _Run, k, E, cond, uncond, g):
        """x0 with diffusers' operations (its float32 coefficients, its order: the same rounding,
        which at high noise levels is large next to x0: (sample - sqrt(1 - abar) eps) / sqrt(abar)),
        clipped by clip_sample; the raw eps into history slot 0, which the direction term reads."""
        eps = _guided(cond, uncond, g)
        alpha_prod_t = self.alphas_cumprod[run.program.plan.extra["t"][k]]
        x0 = (E - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t ** 0.5
        if self.config.clip_sample:
            x0.clamp_(-1, 1)
        run.hist[0].copy_(eps)
        return run.x0_table, x0, x0

    # ------------------------------------------------------------------------------------------
    # step / undo_step

    def step(self, model_output, timestep, sample, original_image, mask, generator=None, return_dict=True):
        i = self._entry_of(timestep)
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point torch.Tensor, got "
                            f"{sample.dtype if isinstance(sample, torch.Tensor) else type(sample).__name__}")
        model_dtype = getattr(model_output, "dtype", None)
        if model_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"model_output must be a floating-point torch.Tensor, got "
                            f"{model_dtype if model_dtype is not None else type(model_output).__name__}")
        _check_part("original_image", original_image, sample)
        _check_part("mask", mask, sample)
        prev_dtype = _prev_dtype(mask.dtype, original_image.dtype, sample.dtype, model_dtype)
        eta = float(self.eta)
        saved = getattr(self, "_step_index", None)
        self._step_index = i
        try:
            unknown, pred_x0 = self._fd_step(model_output, timestep, sample, generator, None, False,
                                             key=(("eta", eta),))
        except BaseException:
            self._step_index = saved
            raise
        run = self._fd_run
        # y = sqrt(1 - abar_prev) z from the same pass; the known part, then the blend
        run.y.add_(original_image, alpha=run.program.plan.extra["sqrt_prev"][i - run.start])
        weight = mask if mask.dtype == torch.float32 else mask.float()
        if prev_dtype == torch.float32 and unknown.dtype == torch.float32:
            prev = torch.lerp(run.x, run.y, weight, out=unknown)
        else:
            prev = torch.lerp(run.x, run.y, weight).to(prev_dtype)
        if not return_dict:
            return prev, pred_x0
        return _make_output(diffusers_output_class(type(self)), prev_sample=prev, pred_original_sample=pred_x0)

    def undo_step(self, sample, timestep, generator=None):
        """diffusers' re-noising from ``timestep`` up T // N training steps: for each,
        sample = sqrt(1 - beta) sample + sqrt(beta) z, with its draws and rounding."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.undo_step() called before set_timesteps(); call "
                             "set_timesteps(num_inference_steps) first")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point torch.Tensor, got "
                            f"{sample.dtype if isinstance(sample, torch.Tensor) else type(sample).__name__}")
        n = self.config.num_train_timesteps // self.num_inference_steps
        t = _integer(timestep, "timestep")
        if not 0 <= t <= len(self.betas) - n:
            raise ValueError(f"undo_step() re-noises from timestep t through t + {n - 1}, which must lie in "
                             f"[0, {len(self.betas) - 1}]; got t = {t}")
        out = None
        for j in range(n):
            beta = self.betas[t + j]
            if sample.device.type == "mps":             # (as diffusers: drawn on the CPU there)
                noise = randn_tensor(sample.shape, dtype=sample.dtype, generator=generator).to(sample.device)
            else:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            keep, add = (1 - beta) ** 0.5, beta ** 0.5     # (float32 0-dim tensors, as diffusers')
            # (the 0-dim float32 factor first, as diffusers' ``keep * sample``: x.mul_(keep) on a
            # float16 x rounds the factor to float16 first, a different result)
            out = torch.mul(keep, sample) if out is None else torch.mul(keep, out, out=out)
            out.add_(torch.mul(add, noise, out=noise))
        return sample if out is None else out

    # ------------------------------------------------------------------------------------------

    def _entry_of(self, timestep) -> int:
        """The index in ``timesteps`` of a step at ``timestep`` (its first occurrence: the rows of
        equal timesteps are equal)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step() called before set_timesteps(); call "
                             "set_timesteps(num_inference_steps) first")
        if self._fd_entries is None:
            entries = {}
            for j, t in enumerate(self.timesteps.tolist()):
                entries.setdefault(int(t), j)
            self._fd_entries = entries
        t = _integer(timestep, "timestep")
        if t not in self._fd_entries:
            raise ValueError(f"step() got timestep {t}, which is not one of this run's timesteps "
                             f"{_listing(sorted(self._fd_entries, reverse=True))}")
        return self._fd_entries[t]


def _formed_beside(x0):
    return x0


def _alpha_prev(t: int, acp: np.ndarray, final: float, delta: int) -> float:
    """diffusers' alpha_prod_t_prev: the level T // N below t, final_alpha_cumprod (1) below 0."""
    return float(acp[t - delta]) if t - delta >= 0 else final


def _integer(value, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() and value.item() != int(value.item()):
            raise ValueError(f"{what} must be one integer timestep, got a tensor of shape {tuple(value.shape)}")
        return int(value.item())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise TypeError(f"{what} must be an integer timestep, got {value!r}")


def _check_part(what: str, value, sample: torch.Tensor):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{what} must be a floating-point torch.Tensor, got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    try:
        shape = torch.broadcast_shapes(value.shape, sample.shape)
    except RuntimeError:
        shape = None
    if shape != sample.shape:
        example = (sample.shape[0], 1) + tuple(sample.shape[2:]) if sample.dim() > 1 else (1,)
        raise ValueError(f"{what} has shape {tuple(value.shape)}, which does not broadcast to the sample's shape "
                         f"{tuple(sample.shape)} (expected that shape, or one with 1 in place of dimensions, e.g. "
                         f"a mask of shape {example})")
    if value.device != sample.device:
        raise ValueError(f"{what} must be on the sample's device {sample.device}, got {value.device}")


@functools.lru_cache(maxsize=None)
def _prev_dtype(mask, original, sample, model) -> torch.dtype:
    """prev_sample's dtype as diffusers' expression gives it for these input dtypes."""
    one = lambda d: torch.zeros(1, dtype=d)  # noqa: E731
    c = torch.tensor(0.5)                                   # (its coefficients: 0-dim float32 tensors)
    unknown = c * (one(sample) - c * one(model)) + c * one(model) + c * one(model)
    known = c * one(original) + c * one(model)
    m = one(mask)
    return (m * known + (1.0 - m) * unknown).dtype


DROP_INS[RePaintScheduler.__name__] = RePaintScheduler      # accelerate(pipe) finds it there
