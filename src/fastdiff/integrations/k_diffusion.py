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
initial state. A final ``sigmas[-1] == 0`` is the clean end point of the grid. The solver computes
its float64 coefficient program once, and ``fastdiff.Sampler`` runs it, one fused op per stage;
nothing here repeats a solver's math:

    sample_euler / _heun / _dpm_2      euler / heun / dpm_2 (edm_euler / edm_heun / dpm_2 with churn)
    sample_euler_ancestral             euler_ancestral
    sample_dpm_2_ancestral             dpm_2_ancestral
    sample_lms                         lms (order 1-4)
    sample_dpmpp_2s_ancestral          dpmpp_2s_ancestral
    sample_dpmpp_sde                   dpmpp_sde
    sample_dpmpp_2m / _2m_sde / _3m_sde  dpmpp_2m / dpmpp_2m_sde / dpmpp_3m_sde
    sample_dpm_fast                    dpm_solver (singlestep) with per-step ``orders`` and ``eta``
    sample_dpm_adaptive                fastdiff.adaptive.sample_dpm_adaptive (DPM-Solver-12/23)
    sample_euler_cfg_pp / _euler_ancestral_cfg_pp / _dpmpp_2m_cfg_pp / _dpmpp_2s_ancestral_cfg_pp /
    _res_multistep_cfg_pp / _res_multistep_ancestral_cfg_pp / _gradient_estimation_cfg_pp /
    sample_cfgpp_ud10_ab
                                       the CFG++ solvers of the same names (ComfyUI's forms, not in
                                       k-diffusion); their model returns (denoised, uncond_denoised)

Where the results differ from k-diffusion's, and why:

* Coefficients are computed in float64 from the sigma values, whatever the dtype of ``sigmas``
  (k-diffusion does that arithmetic in the dtype of ``sigmas``). The state is float64 for
  float64 ``x`` and float32 otherwise: for fp16/bf16 ``x`` the model sees ``x.dtype`` inputs
  (and sigmas), the solver keeps float32, and the result is cast back to ``x.dtype``.
* **Same seed, different samples (the stochastic samplers), unless you ask for k-diffusion's noise.**
  By default (``noise="philox"``) a sampler that adds noise draws fastdiff's in-kernel Philox
  noise, seeded from torch's global RNG: ``torch.manual_seed`` makes runs reproducible, and the
  noise has the right law, but the values are not the ones k-diffusion draws, so the images of
  sample_euler_ancestral, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde,
  sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_dpm_fast / _adaptive with eta > 0, and of
  churn (s_churn > 0) differ from k-diffusion's for the same seed. For k-diffusion's values pass
  ``noise="torch"`` (every sampler takes it, keyword-only): the ancestral samplers, dpm_fast,
  dpm_adaptive and churn then draw ``torch.randn_like(x)`` exactly where and in the order
  k-diffusion does (also the draws it discards, so torch's RNG ends in the same state), and the
  SDE samplers build k-diffusion's default ``BrownianTreeNoiseSampler`` (seeded from torch's
  global RNG as k-diffusion seeds it). Same seed, same result, to float64 rounding (tested
  against k-diffusion 0.1.1). Or pass k-diffusion's noise sampler yourself:
  ``noise_sampler=default_noise_sampler(x)`` or ``BrownianTreeNoiseSampler(x, sigma_min,
  sigma_max, seed=...)`` (this module's, on torchsde, or k-diffusion's). Without either, the
  Philox noise of dpmpp_sde has the Brownian tree's law: independent across steps, and the
  second draw of a step contains the first, as the tree's nested intervals do (the solver's
  ``brownian`` option).
* A given ``noise_sampler(sigma, sigma_next)`` is called with the 0-d tensors k-diffusion passes
  (``sigmas[i]``, ``sigmas[i + 1]``; dpmpp_sde's stage levels computed as k-diffusion computes
  them), in k-diffusion's order, but only for draws that add noise: k-diffusion also calls it,
  and discards the result, when ``eta == 0`` or ``s_noise == 0`` (and at dpm_fast's last step).
* ``callback`` is called when k-diffusion calls it: right after the first model evaluation of
  step ``i``, before the step, with ``{'x': a copy of the state the model saw, 'i': i,
  'sigma': sigmas[i], 'sigma_hat': the noise level the model saw (sigmas[i] unless churned),
  'denoised': the model's output}``. ``x`` is a copy because the buffer the model reads is
  reused by the next step.
* Non-finite values in the sample raise ``FloatingPointError`` at the end of the run (one
  device-flag read), naming the step; k-diffusion returns the NaNs. Every sampler takes a
  keyword-only ``check_finite``: 'end' (default), 'step' (raise at the bad step, one read per
  step) or 'off' (return the NaNs, as k-diffusion does). ``sample_dpm_adaptive`` always raises,
  at the first step whose error estimate is not finite (k-diffusion's controller loops forever).
* ``s_churn > 0`` (EDM's stochastic churn in ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2``)
  runs fastdiff's ``edm_euler`` / ``edm_heun`` / ``dpm_2`` solvers; the churn noise is fastdiff's
  in-kernel Philox noise seeded from torch's global RNG (k-diffusion draws ``torch.randn_like(x)``
  at every step; ``noise="torch"`` does the same). Without those solvers registered, churn raises
  ``NotImplementedError``.
* With float32 ``sigmas``, k-diffusion's ``get_ancestral_step`` rounds sigma_down to 0 when
  sigma_next / sigma < ~2.4e-4 (e.g. a 2-step schedule from 80 to 0.02); sample_dpm_2_ancestral
  and sample_dpmpp_2s_ancestral then take an Euler step where fastdiff's float64 value asks for a
  second-order one (the result of k-diffusion with float64 sigmas).
* k-diffusion 0.1.1's sample_dpmpp_2m_sde / _3m_sde raise UnboundLocalError on a single step to
  sigma = 0; here that step returns the denoised sample (their denoising step).
* sample_dpm_fast / sample_dpm_adaptive: see their docstrings (levels, nfe, what is unsupported).
"""
from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Callable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .. import adaptive
from ..program import Row
from ..sampler import Sampler
from ..schedules import ContinuousVP, Grid, VESchedule, exponential_ksigmas, karras_ksigmas
from ..solvers import SOLVERS
from ..solvers.base import ancestral_step

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_lms",
    "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
    "get_sigmas_simple", "get_sigmas_sgm_uniform", "get_sigmas_normal", "get_sigmas_ddim_uniform", "get_sigmas_beta",
    "get_sigmas_linear_quadratic", "get_sigmas_kl_optimal", "get_sigmas_laplace", "get_sigmas_sd_turbo",
    "get_sigmas_align_your_steps", "get_sigmas_gits", "get_sigmas_optimal_steps", "get_sigmas_flux", "get_sigmas_flux2",
    "append_zero", "to_d", "get_ancestral_step", "default_noise_sampler",
    "BatchedBrownianTree", "BrownianTreeNoiseSampler",
]


# ---------------------------------------------------------------------------------------------
# Samplers on a given list of noise levels


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, noise='philox', check_finite='end'):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2)."""
    solver, options = _with_churn("euler", "edm_euler", sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return _run(solver, options, model, x, sigmas, extra_args, callback, disable, noise=noise, kd_draws='every',
                check_finite=check_finite)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, noise='philox', check_finite='end'):
    """Ancestral sampling with Euler steps: down to sigma_down, then fresh noise of std sigma_up."""
    return _run("euler_ancestral", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback,
                disable, noise_sampler, noise=noise, kd_draws='next_positive', check_finite=check_finite)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., *, noise='philox', check_finite='end'):
    """Heun steps (Karras et al. 2022, Algorithm 2); the step to sigma = 0 is Euler."""
    solver, options = _with_churn("heun", "edm_heun", sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return _run(solver, options, model, x, sigmas, extra_args, callback, disable, noise=noise, kd_draws='every',
                check_finite=check_finite)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, noise='philox', check_finite='end'):
    """DPM-Solver-2-like midpoint steps (model at the geometric mean of the two noise levels),
    with EDM churn; the step to sigma = 0 is Euler."""
    solver, options = _with_churn("dpm_2", "dpm_2", sigmas, s_churn, s_tmin, s_tmax, s_noise)
    return _run(solver, options, model, x, sigmas, extra_args, callback, disable, noise=noise, kd_draws='every',
                check_finite=check_finite)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, noise='philox', check_finite='end'):
    """Ancestral sampling with DPM-2 steps: down to sigma_down, then fresh noise of std sigma_up
    (a step whose sigma_down is 0 is Euler and adds no noise)."""
    return _run("dpm_2_ancestral", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback,
                disable, noise_sampler, noise=noise, kd_draws='sigma_down', check_finite=check_finite)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *, noise='philox',
               check_finite='end'):
    """Linear multistep (Adams-Bashforth in sigma) of order 1-4; the first steps use the orders
    their history allows."""
    return _run("lms", {"order": order}, model, x, sigmas, extra_args, callback, disable, noise=noise,
                check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, noise='philox', check_finite='end'):
    """Ancestral sampling with DPM-Solver++(2S) steps; the step to sigma_down = 0 is Euler."""
    return _run("dpmpp_2s_ancestral", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback,
                disable, noise_sampler, noise=noise, kd_draws='next_positive', check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, noise='philox', check_finite='end'):
    """DPM-Solver++ (stochastic): two ancestral stages per step, the second at lambda + r h.

    ``noise_sampler`` is called as k-diffusion calls it, with (sigma, sigma at the stage) and
    then (sigma, sigma_next), the levels computed as k-diffusion computes them. Without one,
    fastdiff draws Philox noise with the coupling of k-diffusion's default
    BrownianTreeNoiseSampler (the second draw contains the first): the same distribution, not
    the same values; pass ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=...)`` for those."""
    noise_args = None
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1:
        def noise_args(row: Row):
            # k-diffusion: t = -log sigma, s = t + r h; the draws over [sigma_fn(s), sigma_fn(t)]
            # (first stage, the row that writes the stage point y) and [sigma_fn(t_next), sigma_fn(t)].
            t, t_next = sigmas[row.step].log().neg(), sigmas[row.step + 1].log().neg()
            end = t + (t_next - t) * r if row.out_y is not None else t_next
            return t.neg().exp(), end.neg().exp()
    noise_sampler = _tree_noise(noise, noise_sampler, x, sigmas)
    options = {"eta": eta, "s_noise": s_noise, "r": r, "brownian": noise_sampler is None}
    return _run("dpmpp_sde", options, model, x, sigmas, extra_args, callback, disable, noise_sampler, noise_args,
                noise=noise, check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, noise='philox',
                    check_finite='end'):
    """DPM-Solver++(2M); the first step and the step to sigma = 0 are first order."""
    return _run("dpmpp_2m", {}, model, x, sigmas, extra_args, callback, disable, noise=noise,
                check_finite=check_finite)


# ---- CFG++ (Chung et al. 2024; ComfyUI's sample_*_cfg_pp)
#
# CFG++ needs the unconditional denoised beside the guided one (ComfyUI gets it through a post-CFG
# hook). The contract here: ``model(x, sigma, **extra_args)`` returns the pair
# ``(denoised, uncond_denoised)``: the guided x0 (CFG applied by the model wrapper, at the scale
# the user chose) and the unconditional x0 of the same call. fastdiff's solvers of the same names
# (fastdiff.solvers.cfg_pp) run it, one fused step per call, the pair passed to
# the step as (cond, uncond) at g = 1 (so D = denoised exactly, and the uncond term is its own).

@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, check_finite='end'):
    """Euler CFG++: x = denoised + sigma_next * (x - uncond_denoised) / sigma. ``model`` returns
    ``(denoised, uncond_denoised)`` (see above)."""
    return _run_cfg_pp("euler_cfg_pp", {}, model, x, sigmas, extra_args, callback, disable,
                       check_finite=check_finite)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                                  noise_sampler=None, *, noise='philox', check_finite='end'):
    """Euler ancestral CFG++: x = denoised + sigma_down * (x - uncond_denoised) / sigma, then fresh
    noise of std sigma_up. ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("euler_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args,
                       callback, disable, noise_sampler, noise=noise,
                       kd_draws='next_positive' if eta > 0 and s_noise > 0 else None, check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, check_finite='end'):
    """DPM-Solver++(2M) CFG++ (the unconditional denoised re-noised and kept for the next step).
    ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("dpmpp_2m_cfg_pp", {}, model, x, sigmas, extra_args, callback, disable,
                       check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                                     noise_sampler=None, *, noise='philox', check_finite='end'):
    """DPM-Solver++(2S) ancestral CFG++ (ComfyUI's current, not-RF form): both stages on the
    unconditional denoised, the guidance vector denoised - uncond_denoised of the step's first call
    added at its end. Two model calls per step (one where sigma_down = 0). ``model`` returns
    ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("dpmpp_2s_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args,
                       callback, disable, noise_sampler, noise=noise, kd_draws='next_positive',
                       check_finite=check_finite)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                                noise_sampler=None, *, noise='philox', check_finite='end'):
    """RES second-order multistep CFG++ (ComfyUI's res_multistep with cfg_pp=True, eta = 0):
    x + (denoised - uncond_denoised) advanced by the exponential step on the unconditional
    denoised (and the previous one). ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("res_multistep_cfg_pp", {"eta": 0.0, "s_noise": s_noise}, model, x, sigmas, extra_args,
                       callback, disable, noise_sampler, noise=noise, kd_draws='next_positive',
                       check_finite=check_finite)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                          s_noise=1., noise_sampler=None, *, noise='philox', check_finite='end'):
    """res_multistep_cfg_pp down to sigma_down, then noise of std sigma_up (get_ancestral_step, eta).
    ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("res_multistep_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise}, model, x, sigmas,
                       extra_args, callback, disable, noise_sampler, noise=noise, kd_draws='next_positive',
                       check_finite=check_finite)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2., *,
                                      check_finite='end'):
    """Gradient estimation CFG++ (ComfyUI's sample_gradient_estimation with cfg_pp=True): d from the
    unconditional denoised, x = denoised + sigma_next d + (ge_gamma - 1)(sigma_next - sigma)(d - d_prev).
    ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("gradient_estimation_cfg_pp", {"ge_gamma": ge_gamma}, model, x, sigmas, extra_args, callback,
                       disable, check_finite=check_finite)


@torch.no_grad()
def sample_cfgpp_ud10_ab(model, x, sigmas, extra_args=None, callback=None, disable=None, *, check_finite='end'):
    """ComfyUI's CFG++ UD10 AB: Euler CFG++ with the unconditional derivative extrapolated from the
    last step's (weight 0.1), lerped (0.25) with a variable-step AB2 step, and the final step to
    sigma = 0 replaced by the linear extrapolation of the denoised to 0 (ComfyUI's non-flow form).
    ``model`` returns ``(denoised, uncond_denoised)``."""
    return _run_cfg_pp("cfgpp_ud10_ab", {}, model, x, sigmas, extra_args, callback, disable,
                       check_finite=check_finite)


def _run_cfg_pp(solver, solver_options, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, *,
                noise='philox', kd_draws=None, check_finite='end') -> torch.Tensor:
    """``_run`` for a CFG++ sampler: ``model`` returns (denoised, uncond_denoised), which the run
    takes as the two halves of a CFG call."""
    return _run(solver, solver_options, model, x, sigmas, extra_args, callback, disable, noise_sampler,
                noise=noise, kd_draws=kd_draws, check_finite=check_finite, pair=True)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', *, noise='philox', check_finite='end'):
    """DPM-Solver++(2M) SDE (``solver_type`` 'midpoint' or 'heun'); eta = 0 is the ODE solver.
    Without a noise_sampler the noise is Philox: independent standard normal draws per step,
    which is the law of k-diffusion's default BrownianTreeNoiseSampler over disjoint steps."""
    noise_sampler = _tree_noise(noise, noise_sampler, x, sigmas)
    return _run("dpmpp_2m_sde", {"eta": eta, "s_noise": s_noise, "solver_type": solver_type}, model, x, sigmas,
                extra_args, callback, disable, noise_sampler, noise=noise, check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, noise='philox', check_finite='end'):
    """DPM-Solver++(3M) SDE; eta = 0 is the ODE solver. Default noise as sample_dpmpp_2m_sde."""
    noise_sampler = _tree_noise(noise, noise_sampler, x, sigmas)
    return _run("dpmpp_3m_sde", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback, disable,
                noise_sampler, noise=noise, check_finite=check_finite)


# ---------------------------------------------------------------------------------------------
# DPM-Solver between two noise levels: fixed steps (fast) and adaptive


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, *, noise='philox', check_finite='end'):
    """DPM-Solver-fast (Lu et al. 2022): ``n`` model calls in floor(n/3) + 1 steps uniform in
    log sigma, all of order 3 but the last ones (orders [3, ..., 3, n % 3], or [3, ..., 3, 2, 1]
    when 3 divides n). ``eta > 0``: ancestral steps (noise_sampler(sigma, sigma_next) per step).

    The levels are k-diffusion's: ``torch.linspace`` in torch's default dtype between
    -log(sigma_max) and -log(sigma_min). Only the denoising direction (sigma_min < sigma_max) is
    supported. ``callback`` receives k-diffusion's keys (x, i, t, t_up, sigma, sigma_hat, denoised)."""
    _check_run_inputs(model, x, extra_args, callback, noise_sampler)
    _check_noise_mode(noise)
    _check_sigma_bounds(sigma_min, sigma_max)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the number of model evaluations) must be an integer >= 1, got {n!r}")
    steps = n // 3 + 1
    orders = [3] * (steps - 2) + [2, 1] if n % 3 == 0 else [3] * (steps - 1) + [n % 3]
    # k-diffusion's t = -log sigma: of torch.tensor(sigma_max / sigma_min), then linspace in the default dtype.
    ts = torch.linspace(torch.as_tensor(sigma_max).log().neg(), torch.as_tensor(sigma_min).log().neg(), steps + 1,
                        device=x.device)
    levels = torch.stack([t.neg().exp() for t in ts])   # k-diffusion's sigma(t), one 0-d tensor at a time

    def callback_fields(i: int, point) -> dict:
        return {'i': i, 't': ts[i], 't_up': ts[i], 'sigma': levels[i], 'sigma_hat': levels[i]}

    return _sample(_grid_from_sigmas(levels), "dpm_solver", {"orders": orders, "eta": eta, "s_noise": s_noise},
                   model, x, extra_args, callback, callback_fields, disable, noise_sampler,
                   lambda row: (levels[row.step], levels[row.step + 1]), check_finite=check_finite,
                   # k-diffusion draws at every step, also with eta = 0 (and uses none of those draws)
                   torch_draws=_TorchDraws(x, list(range(steps))) if noise == "torch" and noise_sampler is None
                   else None)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, *, noise='philox'):
    """DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) with adaptive steps in log sigma
    from sigma_max to sigma_min (no final denoising step), run by ``fastdiff.adaptive``: the same
    controller, accept/reject rule and error norm as k-diffusion, so the same steps. The step
    sizes are float64 (k-diffusion computes them in the dtype of ``torch.tensor(sigma_min)``).

    Differences: the model output at the start of a rejected step is reused, so
    ``info['nfe']`` (with ``return_info=True``) counts the model calls made (k-diffusion counts
    ``order`` per attempt); info also lists the accepted levels (``'ksigmas'``). With ``eta > 0``
    the noise is Philox, seeded from torch's global RNG, or with ``noise="torch"`` k-diffusion's
    own ``torch.randn_like(x)`` at each accepted step. Not supported (NotImplementedError):
    ``callback``, and a ``noise_sampler`` with ``eta > 0`` (fastdiff.adaptive does not pass a
    step's noise levels to it); the progress bar is never shown. A NaN/Inf raises
    FloatingPointError naming the step (k-diffusion's controller loops forever)."""
    _check_run_inputs(model, x, extra_args, callback, noise_sampler)
    _check_noise_mode(noise)
    lo, hi = _check_sigma_bounds(sigma_min, sigma_max)
    if callback is not None:
        raise NotImplementedError("sample_dpm_adaptive does not support callback: fastdiff.adaptive has no hook "
                                  "for it; pass callback=None")
    if noise_sampler is not None and float(eta) > 0:
        raise NotImplementedError("sample_dpm_adaptive with eta > 0 does not take a noise_sampler: fastdiff.adaptive "
                                  "does not pass a step's noise levels to it; pass noise_sampler=None (Philox noise "
                                  "seeded from torch's global RNG)")
    sigma_dtype = x.dtype

    def denoiser(x_, sigma, **kwargs):
        return model(x_, sigma.to(sigma_dtype), **kwargs)

    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    drawn = [0]
    row_noise = None
    if noise == "torch" and noise_sampler is None and float(eta) > 0:
        def row_noise(row, state):
            drawn[0] += 1
            return torch.randn_like(x)
    out, info = adaptive.sample_dpm_adaptive(
        denoiser, x, schedule=VESchedule(sigma_min=lo, sigma_max=hi), prediction="sample", ksigma_min=lo,
        ksigma_max=hi, order=order, rtol=rtol, atol=atol, h_init=h_init, pcoeff=pcoeff, icoeff=icoeff,
        dcoeff=dcoeff, accept_safety=accept_safety, eta=eta, s_noise=s_noise, max_nfe=sys.maxsize,
        model_kwargs=dict(extra_args or {}), state_dtype=state_dtype, model_dtype=x.dtype, x_init=x,
        noise_sampler=row_noise)
    if noise == "torch" and noise_sampler is None:
        # k-diffusion draws at every accepted step, also where it adds none of it (eta = 0, the last step).
        for _ in range(info["n_accept"] - drawn[0]):
            torch.randn_like(x)
    out = out.to(x.dtype)
    return (out, info) if return_info else out


def _check_sigma_bounds(sigma_min, sigma_max) -> Tuple[float, float]:
    """(sigma_min, sigma_max) as floats, checked."""
    try:
        lo, hi = float(sigma_min), float(sigma_max)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"sigma_min and sigma_max must be numbers (or 1-element tensors), got "
                        f"{type(sigma_min).__name__} and {type(sigma_max).__name__}") from None
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf (sampling from sigma_max down to sigma_min), got "
                         f"sigma_min={lo}, sigma_max={hi}")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# The run: k-diffusion's arguments onto fastdiff.Sampler


def _run(solver: str, solver_options: dict, model, x, sigmas, extra_args, callback, disable,
         noise_sampler=None, noise_args: Optional[Callable[[Row], tuple]] = None, *, noise: str = "philox",
         kd_draws: Optional[str] = None, check_finite: str = 'end', pair: bool = False) -> torch.Tensor:
    """Sample along the k-diffusion noise levels ``sigmas``. ``noise_args(row)``: the arguments
    k-diffusion passes to its noise_sampler for that row's draw (default (sigmas[i], sigmas[i + 1])).
    ``kd_draws``: where k-diffusion's sampler calls ``torch.randn_like`` (``noise="torch"``):
    'every' step, the steps whose 'next_positive' sigma is > 0, those whose 'sigma_down' is not 0
    (computed as k-diffusion computes it), or None (it draws nothing). ``pair``: a CFG++ model
    (``_run_cfg_pp``)."""
    _check_run_inputs(model, x, extra_args, callback, noise_sampler)
    _check_noise_mode(noise)
    grid = _grid_from_sigmas(sigmas)
    torch_draws = None
    if noise == "torch" and noise_sampler is None and kd_draws is not None:
        torch_draws = _TorchDraws(x, _kd_draw_steps(kd_draws, sigmas, solver_options.get("eta", 1.0)))

    def callback_fields(i: int, point) -> dict:
        churned = point.ksigma != float(grid.ksigma[i])
        return {'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas.new_tensor(point.ksigma) if churned else sigmas[i]}

    return _sample(grid, solver, solver_options, model, x, extra_args, callback, callback_fields, disable,
                   noise_sampler, noise_args or (lambda row: (sigmas[row.step], sigmas[row.step + 1])),
                   torch_draws=torch_draws, check_finite=check_finite, pair=pair)


def _sample(grid: Grid, solver: str, solver_options: dict, model, x, extra_args, callback, callback_fields,
            disable, noise_sampler, noise_args, *, torch_draws: Optional["_TorchDraws"] = None,
            check_finite: str = "end", pair: bool = False) -> torch.Tensor:
    """Run ``solver`` on ``grid`` for a k-diffusion denoiser (``pair``: a CFG++ model returning
    (denoised, uncond_denoised), run as the two halves of a CFG call with g = 1)."""
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    key = (solver, repr(sorted(solver_options.items())), id(grid), state_dtype, str(x.device), pair)
    sampler = _SAMPLERS.get(key)
    if sampler is None or sampler.grid is not grid:
        sampler = Sampler.build(solver=solver, solver_options=solver_options, grid=grid, prediction="sample",
                                guidance=1.0 if pair else None, device=x.device, state_dtype=state_dtype)
        sampler._transient = True            # (buffers of small runs only, in the build cache's entry)
        _lru_put(_SAMPLERS, key, sampler)
    else:
        _SAMPLERS.move_to_end(key)
    if pair:
        denoiser = _PairDenoiser(x.shape[0], model, sampler.program.rows, callback, callback_fields, x.dtype)
        halves = {"cond": {}, "uncond": {}}
    else:
        denoiser = _Denoiser(model, sampler.program.rows, callback, callback_fields, x.dtype)
        halves = {}
    adapted_noise = None
    if noise_sampler is not None:
        def adapted_noise(row: Row, state: torch.Tensor) -> torch.Tensor:
            return noise_sampler(*noise_args(row))
    elif torch_draws is not None:
        adapted_noise = torch_draws
    out = sampler(denoiser, x, x_init=x, model_kwargs=dict(extra_args or {}), noise_sampler=adapted_noise,
                  progress=_show_progress(disable), model_dtype=x.dtype, check_finite=check_finite, **halves)
    if torch_draws is not None:
        torch_draws.finish()
    return out.to(x.dtype)


NOISE_MODES = ("philox", "torch")


def _check_noise_mode(noise) -> None:
    if not isinstance(noise, str) or noise not in NOISE_MODES:
        raise ValueError(f"noise must be 'philox' (fastdiff's in-kernel noise, the default) or 'torch' (k-diffusion's "
                         f"own draws from torch's global RNG), got {noise!r}")


class _TorchDraws:
    """k-diffusion's default noise, draw for draw: ``torch.randn_like(x)`` from torch's global RNG
    at each of ``steps`` (the steps at which k-diffusion's sampler draws, whether it uses the draw
    or not), in k-diffusion's order. Called as a fastdiff noise sampler ``(row, state)``, it makes
    the draws of the steps before ``row.step`` that fastdiff does not need (k-diffusion multiplies
    them by 0) and returns the draw of ``row.step``; ``finish()`` makes the remaining ones, so
    torch's RNG ends where k-diffusion leaves it."""

    def __init__(self, x: torch.Tensor, steps: List[int]):
        self.x, self.pending = x, sorted(steps)

    def __call__(self, row: Row, state: torch.Tensor) -> torch.Tensor:
        z = None
        while self.pending and self.pending[0] <= row.step:
            draw = torch.randn_like(self.x)
            if self.pending.pop(0) == row.step:
                z = draw
        # A step where k-diffusion adds no noise but fastdiff's float64 coefficients do (float32
        # sigmas whose sigma_down rounds to 0 in k-diffusion): a fresh draw.
        return torch.randn_like(self.x) if z is None else z

    def finish(self) -> None:
        while self.pending:
            self.pending.pop(0)
            torch.randn_like(self.x)


def _kd_draw_steps(kind: str, sigmas: torch.Tensor, eta) -> List[int]:
    """The steps at which k-diffusion's sampler calls ``torch.randn_like`` (see ``_run``)."""
    n = len(sigmas) - 1
    if kind == "every":
        return list(range(n))
    if kind == "next_positive":
        return [i for i in range(n) if sigmas[i + 1] > 0]
    if kind == "sigma_down":     # k-diffusion's get_ancestral_step, in the dtype of sigmas
        steps = []
        for i in range(n):
            lo, hi = sigmas[i + 1], sigmas[i]
            if not eta:
                down = lo
            else:
                up = min(lo, eta * (lo ** 2 * (hi ** 2 - lo ** 2) / hi ** 2) ** 0.5)
                down = (lo ** 2 - up ** 2) ** 0.5
            if down != 0:
                steps.append(i)
        return steps
    raise ValueError(f"unknown kind of k-diffusion draws {kind!r}")


def _tree_noise(noise, noise_sampler, x, sigmas):
    """``noise="torch"`` for the SDE samplers: k-diffusion's default noise sampler, built as
    k-diffusion builds it (a BrownianTreeNoiseSampler over the positive range of ``sigmas``, seeded
    from torch's global RNG); otherwise ``noise_sampler`` as given."""
    _check_noise_mode(noise)
    if noise != "torch" or noise_sampler is not None:
        return noise_sampler
    _check_run_inputs(lambda: None, x, None, None, None)
    _grid_from_sigmas(sigmas)
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


class _Denoiser:
    """The k-diffusion denoiser as a fastdiff model (prediction="sample"); fires the k-diffusion
    callback at the first model evaluation of each step, which is where k-diffusion fires it,
    with ``callback_fields(step, point evaluated)`` plus the state ``x`` and ``denoised``."""

    def __init__(self, model: Callable, rows: List[Row], callback: Optional[Callable],
                 callback_fields: Callable[[int, object], dict], sigma_dtype: torch.dtype):
        self.model, self.callback, self.sigma_dtype = model, callback, sigma_dtype
        # For the k-th model call of the run: its step if it is the step's first call, else -1.
        evals = [r for r in rows if r.needs_model]
        self.callback_step = [r.step if k == 0 or evals[k - 1].step != r.step else -1 for k, r in enumerate(evals)]
        self.calls = 0
        self.fields = {}
        if callback is not None:
            self.fields = {r.step: callback_fields(r.step, r.point) for k, r in enumerate(evals)
                           if self.callback_step[k] >= 0}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        # k-diffusion passes sigmas[i] * x.new_ones(B), i.e. sigma in x's dtype (fp16 models too).
        if sigma.dtype != self.sigma_dtype:
            sigma = sigma.to(self.sigma_dtype)
        denoised = self.model(x, sigma, **extra_args)
        step = self.callback_step[self.calls]
        self.calls += 1
        if self.callback is not None and step >= 0:
            self.callback({'x': x.clone(), **self.fields[step], 'denoised': denoised})
        return denoised


class _PairDenoiser(_Denoiser):
    """A CFG++ model ``(x, sigma) -> (denoised, uncond_denoised)`` as the two halves [uncond; cond]
    of a fastdiff CFG call: called once, on one half (both halves hold the same x); the callback
    gets the guided denoised."""

    def __init__(self, batch: int, model: Callable, *args):
        self._uncond, self.batch = None, batch

        def guided(x, sigma, **extra_args):
            out = model(x, sigma, **extra_args)
            if not (isinstance(out, (tuple, list)) and len(out) == 2
                    and all(isinstance(o, torch.Tensor) for o in out)):
                raise TypeError("the CFG++ samplers need model(x, sigma, **extra_args) -> (denoised, "
                                f"uncond_denoised), got {type(out).__name__}")
            self._uncond = out[1]
            return out[0]

        super().__init__(guided, *args)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        B = self.batch
        if x.shape[0] == B:             # a row that uses the guided denoised alone (the step to sigma = 0)
            return super().__call__(x, sigma, **extra_args)
        denoised = super().__call__(x[B:], sigma[B:], **extra_args)
        return torch.cat([self._uncond.to(denoised.dtype), denoised])


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


# The grids and prepared Samplers of recent runs (k-diffusion's functions are called once per
# image with the same sigmas): a repeated call skips building the program and allocating buffers.
_GRIDS: "OrderedDict[bytes, Grid]" = OrderedDict()
_SAMPLERS: "OrderedDict[tuple, Sampler]" = OrderedDict()
_CACHE_SIZE = 16


def _lru_put(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _grid_from_sigmas(sigmas) -> Grid:
    """The fastdiff grid visiting exactly ``sigmas`` (strictly decreasing, >= 0) on a VE schedule."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor of noise levels, got {type(sigmas).__name__}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 noise levels (1 step), got shape {tuple(sigmas.shape)}")
    ks = sigmas.detach().to(device="cpu", dtype=torch.float64).numpy()
    key = ks.tobytes()
    grid = _GRIDS.get(key)
    if grid is None:
        grid = _make_grid(ks)
        _lru_put(_GRIDS, key, grid)
    return grid


def _make_grid(ks: np.ndarray) -> Grid:
    if not np.all(np.isfinite(ks)) or np.any(ks < 0):
        raise ValueError(f"sigmas must be finite and >= 0, got {ks}")
    if np.any(np.diff(ks) >= 0):
        raise ValueError(f"sigmas must strictly decrease (from the noisiest level to the cleanest), got {ks}")
    positive = ks[ks > 0]
    lo, hi = float(positive.min()), float(positive.max())
    # The VE schedule's t range is bookkeeping here (the grid is given); it only has to be valid.
    schedule = VESchedule(sigma_min=lo, sigma_max=hi if hi > lo else math.nextafter(lo, math.inf))
    return Grid.from_ksigmas(schedule, ks)


def _with_churn(plain: str, churned: str, sigmas, s_churn, s_tmin, s_tmax, s_noise):
    """(solver name, options) for k-diffusion's samplers with EDM churn (Euler, Heun, DPM-2): the
    ``plain`` solver, or the ``churned`` one with the churn options when churn applies (s_churn > 0
    at some step with s_tmin <= sigmas[i] <= s_tmax)."""
    s_churn = float(s_churn)
    if not (s_churn >= 0.0 and math.isfinite(s_churn)):
        raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn}")
    if s_churn == 0.0 or not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1:
        return plain, {}  # no churn; bad sigmas are reported by _grid_from_sigmas
    levels = sigmas[:-1].detach().to(device="cpu", dtype=torch.float64)
    if not bool(((levels >= float(s_tmin)) & (levels <= float(s_tmax))).any()):
        return plain, {}
    if churned not in SOLVERS:
        raise NotImplementedError(f"sample_{plain} with s_churn > 0 (EDM stochastic churn) needs fastdiff's "
                                  f"{churned!r} solver, which is not registered. Use s_churn=0, or "
                                  "sample_euler_ancestral for a stochastic sampler.")
    return churned, {"s_churn": s_churn, "s_tmin": float(s_tmin), "s_tmax": float(s_tmax), "s_noise": float(s_noise)}


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
    return _sigmas_tensor(karras_ksigmas(n, float(sigma_min), float(sigma_max), _check_rho(rho)), device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Noise levels uniform in log sigma, with a final 0."""
    _check_sigma_range(n, sigma_min, sigma_max)
    return _sigmas_tensor(exponential_ksigmas(n, float(sigma_min), float(sigma_max)), device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """log sigma a polynomial (power rho) in the step, with a final 0; rho = 1 is exponential."""
    _check_sigma_range(n, sigma_min, sigma_max)
    rho = _check_rho(rho)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return _sigmas_tensor(np.exp(ramp * (hi - lo) + lo), device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The noise levels of the continuous VP-SDE (linear beta) at times linspace(1, eps_s, n), with a final 0."""
    _check_count(n)
    schedule = ContinuousVP(beta_min=beta_min, beta_max=beta_min + beta_d, t_min=eps_s, t_max=1.0)
    return _sigmas_tensor(schedule.ksigma(np.linspace(1.0, eps_s, n)), device)


# ComfyUI's schedulers (comfy/samplers.py SCHEDULER_HANDLERS and its scheduler nodes), computed in
# float64 by fastdiff.comfy_schedulers. ``model_sampling``: None (Stable Diffusion's discrete
# schedule), a fastdiff Schedule, ComfyUI's model_sampling (its ``.sigmas`` table) or an ascending
# 1-D table of the model's training noise levels.


def _comfy(spacing, n, device, model_sampling=None, **options):
    from ..comfy_schedulers import comfy_sigmas
    _check_count(n)
    values = comfy_sigmas(spacing, int(n), model_sampling, **options)
    return torch.from_numpy(values).to(torch.get_default_dtype()).to(device)


def get_sigmas_simple(n, model_sampling=None, device='cpu'):
    """ComfyUI's ``simple``: every (T/n)-th level of the model's sigma table from the top, with a final 0."""
    return _comfy("simple", n, device, model_sampling)


def get_sigmas_sgm_uniform(n, model_sampling=None, device='cpu'):
    """ComfyUI's ``sgm_uniform``: ``normal`` over n + 1 timesteps with the last dropped, then a final 0."""
    return _comfy("sgm_uniform", n, device, model_sampling)


def get_sigmas_normal(n, model_sampling=None, device='cpu'):
    """ComfyUI's ``normal``: n levels uniform in the model's timestep from sigma_max to sigma_min, with a final 0."""
    return _comfy("normal", n, device, model_sampling)


def get_sigmas_ddim_uniform(n, model_sampling=None, device='cpu'):
    """ComfyUI's ``ddim_uniform``: table levels 1, 1 + T//n, ... (descending), with a final 0; as in
    ComfyUI that is ceil((T - 1) / (T // n)) levels, which can exceed n."""
    return _comfy("ddim_uniform", n, device, model_sampling)


def get_sigmas_beta(n, model_sampling=None, alpha=0.6, beta=0.6, device='cpu'):
    """ComfyUI's ``beta`` (arXiv 2407.12173): table levels at the Beta(alpha, beta) quantiles of
    1 - i/n, rounded to indices, repeats dropped, with a final 0."""
    return _comfy("beta", n, device, model_sampling, alpha=alpha, beta=beta)


def get_sigmas_linear_quadratic(n, model_sampling=None, threshold_noise=0.025, linear_steps=None, device='cpu'):
    """ComfyUI's ``linear_quadratic`` (Mochi): n + 1 levels from the model's sigma_max to 0."""
    return _comfy("linear_quadratic", n, device, model_sampling, threshold_noise=threshold_noise,
                  linear_steps=linear_steps)


def get_sigmas_kl_optimal(n, sigma_min, sigma_max, device='cpu'):
    """ComfyUI's ``kl_optimal``: tan of a linear ramp from atan(sigma_max) to atan(sigma_min), with a final 0."""
    return _comfy("kl_optimal", n, device, sigma_min=sigma_min, sigma_max=sigma_max)


def get_sigmas_laplace(n, sigma_min, sigma_max, mu=0., beta=0.5, device='cpu'):
    """ComfyUI's ``get_sigmas_laplace``: log sigma at Laplace(mu, beta) quantiles, clamped to
    [sigma_min, sigma_max]. n levels and, as ComfyUI's, no final 0 (``append_zero`` adds one)."""
    return _comfy("laplace", n, device, sigma_min=sigma_min, sigma_max=sigma_max, mu=mu, beta=beta)


def get_sigmas_sd_turbo(n, model_sampling=None, device='cpu'):
    """ComfyUI's SDTurboScheduler: the table levels at timesteps 999, 899, ... (n <= 10), with a final 0."""
    return _comfy("sd_turbo", n, device, model_sampling)


def get_sigmas_align_your_steps(n, model_type='SD1', device='cpu'):
    """Align Your Steps (arXiv 2404.14507): the published 10-step table of ``model_type`` (SD1, SDXL,
    SVD), log-linearly interpolated to n steps; the last level replaced by 0 (as ComfyUI)."""
    return _comfy("align_your_steps", n, device, model=model_type)


def get_sigmas_gits(n, coeff=1.2, device='cpu'):
    """GITS (arXiv 2405.11326): the published n-step SD1.5 table for ``coeff`` (0.80 .. 1.50), n in
    2..20; beyond 20 the 20-step table log-linearly interpolated. Last level replaced by 0."""
    return _comfy("gits", n, device, coeff=coeff)


def get_sigmas_optimal_steps(n, model_type='FLUX', device='cpu'):
    """OptimalSteps (arXiv 2503.21774): the published flow-matching table of ``model_type`` (FLUX,
    Wan, Chroma), log-linearly interpolated to n steps; the last level replaced by 0."""
    return _comfy("optimal_steps", n, device, model=model_type)


def get_sigmas_flux(n, image_seq_len=4096, base_shift=0.5, max_shift=1.15, device='cpu'):
    """Flux.1's schedule: flow times linspace(1, 0, n + 1) under the exponential shift with mu linear
    in ``image_seq_len`` ((W/16)(H/16); diffusers' calculate_shift, ComfyUI's ModelSamplingFlux)."""
    return _comfy("flux", n, device, image_seq_len=image_seq_len, base_shift=base_shift, max_shift=max_shift)


def get_sigmas_flux2(n, image_seq_len=4096, device='cpu'):
    """Flux.2's schedule (ComfyUI's Flux2Scheduler): as get_sigmas_flux with the empirical mu of
    ``image_seq_len`` and the step count n."""
    return _comfy("flux2", n, device, image_seq_len=image_seq_len)


def _check_count(n):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of noise levels before the final 0) must be an integer >= 1, got {n!r}")


def _check_rho(rho) -> float:
    """rho as a float, a finite number > 0 (rho <= 0 or NaN would give inf/NaN or constant levels)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float, np.integer, np.floating)) and not (
            isinstance(rho, torch.Tensor) and rho.numel() == 1):
        raise TypeError(f"rho must be a number, got {type(rho).__name__}")
    value = float(rho)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    return value


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


class BatchedBrownianTree:
    """k-diffusion's wrapper around ``torchsde.BrownianTree``: a Brownian motion with the shape of
    ``x`` on [t0, t1] (either order); with a list of seeds, one tree per batch item.
    ``tree(a, b)`` is the increment W(b) - W(a)."""

    def __init__(self, x, t0, t1, seed=None, **kwargs):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("BrownianTreeNoiseSampler needs torchsde (pip install torchsde)") from e
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = kwargs.pop('w0', torch.zeros_like(x))
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"a list of seeds needs one seed per batch item ({x.shape[0]}), got {len(seed)}")
            w0 = w0[0]
        else:
            seed = [seed]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seed]

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """k-diffusion's noise sampler backed by a Brownian tree: ``noise_sampler(sigma, sigma_next)``
    is the increment of one Brownian motion over [sigma_next, sigma] (of ``transform(sigma)``),
    normalised to unit variance, so draws over overlapping intervals are correlated as the SDE
    samplers (sample_dpmpp_sde, _2m_sde, _3m_sde) assume. ``seed``: an int, or a list with one
    seed per batch item; None draws one from torch's global RNG. Gives the values k-diffusion's
    class of the same name gives for the same arguments and calls."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x):
        self.transform = transform
        t0, t1 = self.transform(torch.as_tensor(sigma_min)), self.transform(torch.as_tensor(sigma_max))
        self.tree = BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


__all__ += ["sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp", "sample_dpmpp_2m_cfg_pp",
            "sample_dpmpp_2s_ancestral_cfg_pp", "sample_res_multistep_cfg_pp", "sample_res_multistep_ancestral_cfg_pp",
            "sample_gradient_estimation_cfg_pp", "sample_cfgpp_ud10_ab"]
__all__ += ["sample_res_multistep", "sample_res_multistep_ancestral", "sample_dpmpp_2m_sde_heun", "sample_ipndm",
            "sample_ipndm_v", "sample_deis", "sample_gradient_estimation", "sample_heunpp2", "sample_exp_heun_2_x0",
            "sample_exp_heun_2_x0_sde", "sample_seeds_2", "sample_seeds_3", "sample_er_sde", "sample_lcm",
            "sample_ddim", "sample_uni_pc", "sample_uni_pc_bh2", "sample_sa_solver", "sample_sa_solver_pece"]


# ComfyUI's KSAMPLER names that are other names of the samplers above.
# *_gpu: ComfyUI draws these samplers' noise on the model's device instead of the CPU; fastdiff's
# Philox noise is the same stream on every device, so they are the same functions.
sample_dpmpp_sde_gpu = sample_dpmpp_sde
sample_dpmpp_2m_sde_gpu = sample_dpmpp_2m_sde
sample_dpmpp_3m_sde_gpu = sample_dpmpp_3m_sde


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                noise='philox', check_finite='end'):
    """ComfyUI's ``ddpm``: the DDPM posterior step (Ho et al. 2020, variance fixed_small) taken in
    the VP space of each noise level, alpha_cumprod = 1 / (1 + sigma^2). Algebraically that is the
    ancestral Euler step at eta = 1 (mean and variance agree term by term), so it runs as one."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta=1.0, s_noise=1.0,
                                  noise_sampler=noise_sampler, noise=noise, check_finite=check_finite)


__all__ += ["sample_dpmpp_sde_gpu", "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_2m_sde_heun_gpu",
            "sample_dpmpp_3m_sde_gpu", "sample_ddpm"]


# ComfyUI's samplers (fastdiff.integrations.comfy_samplers, built on this module's run) are names
# of this module too, as in ComfyUI's k_diffusion.sampling; loaded on first use (PEP 562), so
# neither module imports the other at import time.
_COMFY_ALIASES = {"sample_dpmpp_2m_sde_heun_gpu": "sample_dpmpp_2m_sde_heun"}


def __getattr__(name: str):
    from . import comfy_samplers
    target = _COMFY_ALIASES.get(name, name)
    if target in comfy_samplers.__all__:
        return getattr(comfy_samplers, target)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
