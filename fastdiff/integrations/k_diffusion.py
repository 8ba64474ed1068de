"""k-diffusion's sampler API, executed by fastdiff's solvers and fused step.

    from fastdiff.integrations import k_diffusion as K

    sigmas = K.get_sigmas_karras(20, 0.0292, 14.6146)
    x = K.sample_dpmpp_2m(denoiser, torch.randn(shape) * sigmas[0], sigmas, extra_args={"cond": c})

The functions have the names and signatures of their namesakes in ``k_diffusion.sampling``;
``model(x, sigma, **extra_args)`` is a k-diffusion denoiser: it returns the denoised sample
(x0) for a batch ``x`` at the noise levels ``sigma`` (a tensor [B]).

How it maps onto fastdiff: the given ``sigmas`` become a ``fastdiff.Grid`` on a VE schedule
(alpha = 1, sigma = the k-diffusion noise level, model time = sigma), so the denoiser is a
fastdiff model with ``prediction="sample"`` and ``x`` (already scaled by ``sigmas[0]``) is the
initial state. A final ``sigmas[-1] == 0`` is the clean end point of the grid. The solver
(euler, heun, euler_ancestral, dpmpp_2m) computes its float64 coefficient program once, and
``fastdiff.Sampler`` runs it, one fused op per stage; nothing here repeats a solver's math.

Where the results differ from k-diffusion's, and why:

* Coefficients are computed in float64 from the sigma values, whatever the dtype of ``sigmas``
  (k-diffusion does that arithmetic in the dtype of ``sigmas``). The state is float64 for
  float64 ``x`` and float32 otherwise: for fp16/bf16 ``x`` the model sees ``x.dtype`` inputs
  (and sigmas), the solver keeps float32, and the result is cast back to ``x.dtype``.
* ``noise_sampler=None`` uses fastdiff's in-kernel Philox noise, seeded from torch's global
  RNG: ``torch.manual_seed`` makes runs reproducible, but the values are not the ones
  k-diffusion's ``torch.randn_like`` draws. Pass ``noise_sampler=default_noise_sampler(x)``
  for k-diffusion's stream. A given ``noise_sampler(sigma, sigma_next)`` (called with the
  0-d tensors ``sigmas[i]``, ``sigmas[i + 1]``) is called only for steps that add noise;
  k-diffusion also calls it, and discards the result, when ``eta == 0`` or ``s_noise == 0``.
* ``callback`` is called when k-diffusion calls it: right after the first model evaluation of
  step ``i``, before the step, with ``{'x': a copy of the state the model saw, 'i': i,
  'sigma': sigmas[i], 'sigma_hat': the noise level the model saw (sigmas[i] unless churned),
  'denoised': the model's output}``. ``x`` is a copy because the buffer the model reads is
  reused by the next step.
* Non-finite values in the sample raise ``FloatingPointError`` at the end of the run (one
  device-flag read), naming the step; k-diffusion returns the NaNs.
* ``s_churn > 0`` (EDM's stochastic churn in ``sample_euler`` / ``sample_heun``) runs fastdiff's
  ``edm_euler`` / ``edm_heun`` solvers; the churn noise is fastdiff's in-kernel Philox noise
  seeded from torch's global RNG (k-diffusion draws ``torch.randn_like(x)`` at every step).
  Without those solvers registered, churn raises ``NotImplementedError``.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, List, Mapping, Optional

import numpy as np
import torch

from ..program import Row
from ..sampler import Sampler
from ..schedules import ContinuousVP, Grid, VESchedule, exponential_ksigmas, karras_ksigmas
from ..solvers import SOLVERS
from ..solvers.base import ancestral_step

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
    "append_zero", "to_d", "get_ancestral_step", "default_noise_sampler",
]


# ---------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2)."""
    solver, options = _with_churn("euler", sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return _run(solver, options, model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps: down to sigma_down, then fresh noise of std sigma_up."""
    return _run("euler_ancestral", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback,
                disable, noise_sampler)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun steps (Karras et al. 2022, Algorithm 2); the step to sigma = 0 is Euler."""
    solver, options = _with_churn("heun", sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return _run(solver, options, model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M); the first step and the step to sigma = 0 are first order."""
    return _run("dpmpp_2m", {}, model, x, sigmas, extra_args, callback, disable)


def _run(solver: str, solver_options: dict, model, x, sigmas, extra_args, callback, disable,
         noise_sampler=None) -> torch.Tensor:
    _check_run_inputs(model, x, extra_args, callback, noise_sampler)
    grid = _grid_from_sigmas(sigmas)
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sampler = Sampler.build(solver=solver, solver_options=solver_options, grid=grid, prediction="sample",
                            device=x.device, state_dtype=state_dtype)
    denoiser = _Denoiser(model, sampler.program.rows, sigmas, grid, callback, x.dtype)
    adapted_noise = None
    if noise_sampler is not None:
        def adapted_noise(row: Row, state: torch.Tensor) -> torch.Tensor:
            return noise_sampler(sigmas[row.step], sigmas[row.step + 1])
    out = sampler(denoiser, x, x_init=x, model_kwargs=dict(extra_args or {}), noise_sampler=adapted_noise,
                  progress=_show_progress(disable), model_dtype=x.dtype)
    return out.to(x.dtype)


class _Denoiser:
    """The k-diffusion denoiser as a fastdiff model (prediction="sample"); fires the k-diffusion
    callback at the first model evaluation of each step, which is where k-diffusion fires it."""

    def __init__(self, model: Callable, rows: List[Row], sigmas: torch.Tensor, grid: Grid,
                 callback: Optional[Callable], sigma_dtype: torch.dtype):
        self.model, self.sigmas, self.callback, self.sigma_dtype = model, sigmas, callback, sigma_dtype
        # For the k-th model call of the run: its step if it is the step's first call, else -1.
        evals = [r for r in rows if r.needs_model]
        self.callback_step = [r.step if k == 0 or evals[k - 1].step != r.step else -1 for k, r in enumerate(evals)]
        self.calls = 0
        # sigma_hat of each step: sigmas[i], or the churned level the step's first call is made at.
        self.sigma_hat = {}
        if callback is not None:
            for k, r in enumerate(evals):
                i = self.callback_step[k]
                if i >= 0:
                    churned = r.point.ksigma != float(grid.ksigma[i])
                    self.sigma_hat[i] = sigmas.new_tensor(r.point.ksigma) if churned else sigmas[i]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        # k-diffusion passes sigmas[i] * x.new_ones(B), i.e. sigma in x's dtype (fp16 models too).
        if sigma.dtype != self.sigma_dtype:
            sigma = sigma.to(self.sigma_dtype)
        denoised = self.model(x, sigma, **extra_args)
        step = self.callback_step[self.calls]
        self.calls += 1
        if self.callback is not None and step >= 0:
            self.callback({'x': x.clone(), 'i': step, 'sigma': self.sigmas[step], 'sigma_hat': self.sigma_hat[step],
                           'denoised': denoised})
        return denoised


def _check_run_inputs(model, x, extra_args, callback, noise_sampler):
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor (the initial noise scaled by sigmas[0]), got "
                        + (f"a tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model or None, "
                        f"got {type(extra_args).__name__}")
    for name, fn in (("callback", callback), ("noise_sampler", noise_sampler)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")


def _grid_from_sigmas(sigmas) -> Grid:
    """The fastdiff grid visiting exactly ``sigmas`` (strictly decreasing, >= 0) on a VE schedule."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor of noise levels, got {type(sigmas).__name__}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 noise levels (1 step), got shape {tuple(sigmas.shape)}")
    ks = sigmas.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.all(np.isfinite(ks)) or np.any(ks < 0):
        raise ValueError(f"sigmas must be finite and >= 0, got {ks}")
    if np.any(np.diff(ks) >= 0):
        raise ValueError(f"sigmas must strictly decrease (from the noisiest level to the cleanest), got {ks}")
    positive = ks[ks > 0]
    lo, hi = float(positive.min()), float(positive.max())
    # The VE schedule's t range is bookkeeping here (the grid is given); it only has to be valid.
    schedule = VESchedule(sigma_min=lo, sigma_max=hi if hi > lo else math.nextafter(lo, math.inf))
    return Grid.from_ksigmas(schedule, ks)


def _with_churn(method: str, sigmas, s_churn, s_tmin, s_tmax, s_noise):
    """(solver name, options) for k-diffusion's Euler/Heun: the plain RK solver, or fastdiff's EDM
    solver when churn applies (s_churn > 0 at some step with s_tmin <= sigmas[i] <= s_tmax)."""
    s_churn = float(s_churn)
    if not (s_churn >= 0.0 and math.isfinite(s_churn)):
        raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn}")
    if s_churn == 0.0 or not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1:
        return method, {}  # no churn; bad sigmas are reported by _grid_from_sigmas
    levels = sigmas[:-1].detach().to(device="cpu", dtype=torch.float64)
    if not bool(((levels >= float(s_tmin)) & (levels <= float(s_tmax))).any()):
        return method, {}
    edm = f"edm_{method}"
    if edm not in SOLVERS:
        raise NotImplementedError(f"sample_{method} with s_churn > 0 (EDM stochastic churn) needs fastdiff's "
                                  f"{edm!r} solver, which is not registered. Use s_churn=0, or "
                                  "sample_euler_ancestral for a stochastic sampler.")
    return edm, {"s_churn": s_churn, "s_tmin": float(s_tmin), "s_tmax": float(s_tmax), "s_noise": float(s_noise)}


def _show_progress(disable) -> bool:
    """tqdm's meaning of ``disable``: True hides the bar, False shows it, None hides it off a TTY."""
    if disable is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return not disable


# ---------------------------------------------------------------------------------------------
# Noise schedules: float64 values from fastdiff.schedules, rounded once to the default dtype
# (k-diffusion computes them in the default dtype, so float32 values can differ in the last bits).


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """The noise schedule of Karras et al. (2022), with a final 0."""
    _check_sigma_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    return _sigmas_tensor(karras_ksigmas(n, float(sigma_min), float(sigma_max), float(rho)), device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Noise levels uniform in log sigma, with a final 0."""
    _check_sigma_range(n, sigma_min, sigma_max)
    return _sigmas_tensor(exponential_ksigmas(n, float(sigma_min), float(sigma_max)), device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """log sigma a polynomial (power rho) in the step, with a final 0; rho = 1 is exponential."""
    _check_sigma_range(n, sigma_min, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    ramp = np.linspace(1.0, 0.0, n) ** float(rho)
    return _sigmas_tensor(np.exp(ramp * (hi - lo) + lo), device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The noise levels of the continuous VP-SDE (linear beta) at times linspace(1, eps_s, n), with a final 0."""
    _check_count(n)
    schedule = ContinuousVP(beta_min=beta_min, beta_max=beta_min + beta_d, t_min=eps_s, t_max=1.0)
    return _sigmas_tensor(schedule.ksigma(np.linspace(1.0, eps_s, n)), device)


def _check_count(n):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of noise levels before the final 0) must be an integer >= 1, got {n!r}")


def _check_sigma_range(n, sigma_min, sigma_max):
    _check_count(n)
    if not (0 < float(sigma_min) <= float(sigma_max) < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _sigmas_tensor(values: np.ndarray, device) -> torch.Tensor:
    return append_zero(torch.from_numpy(np.asarray(values, dtype=np.float64)).to(torch.get_default_dtype())).to(device)


# ---------------------------------------------------------------------------------------------
# Helpers with k-diffusion's names


def append_zero(x):
    """``x`` with a 0 appended (a 1-D tensor of noise levels gains its clean end point)."""
    return torch.cat([x, x.new_zeros([1])])


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma = (x - denoised) / sigma, sigma per sample ([B] or scalar)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dim() > x.dim():
        raise ValueError(f"sigma has {sigma.dim()} dims but x only {x.dim()}; expected sigma of shape [B] or a scalar")
    return (x - denoised) / sigma[(...,) + (None,) * (x.dim() - sigma.dim())]


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up): the deterministic step down to sigma_down, then noise of std sigma_up
    (as Python floats; k-diffusion returns the type it was given)."""
    return ancestral_step(float(sigma_from), float(sigma_to), float(eta))


def default_noise_sampler(x):
    """k-diffusion's default noise: ``torch.randn_like(x)`` from torch's global RNG at every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)
