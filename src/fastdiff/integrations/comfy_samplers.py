"""ComfyUI's samplers with k-diffusion's signature, executed by fastdiff's solvers (fastdiff.solvers.comfy
and the solvers they alias). Importable from ``fastdiff.integrations.k_diffusion``:

    from fastdiff.integrations import k_diffusion as K
    x = K.sample_res_multistep(denoiser, torch.randn(shape) * sigmas[0], sigmas)

Each is ``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`` with
ComfyUI's options, which is what ComfyUI's ``KSAMPLER`` wraps, so it plugs into a custom-sampler node
as is (``comfy.samplers.KSAMPLER(K.sample_res_multistep)``). They run through k_diffusion's ``_run``
(the given sigmas as a VE grid, the denoiser as a ``prediction="sample"`` model, one fused step per
model call); see that module for the conventions they share (dtypes, callback, ``check_finite``).

Name -> fastdiff solver: res_multistep / res_multistep_ancestral -> same names; dpmpp_2m_sde_heun ->
dpmpp_2m_sde_heun (dpmpp_2m_sde with solver_type='heun'); ipndm / ipndm_v -> same; deis -> deis_comfy
(diffusers' DEISMultistep is fastdiff's ``deis``); gradient_estimation, heunpp2, exp_heun_2_x0,
exp_heun_2_x0_sde, seeds_2, seeds_3, er_sde, sa_solver, sa_solver_pece -> same; lcm -> lcm
(fastdiff.solvers.consistency);
ddim -> ddim (ComfyUI's ddim is Euler, which on these coordinates is DDIM, eta = 0); uni_pc /
uni_pc_bh2 -> same (fastdiff's unipc with ComfyUI's options; a final sigma = 0 is moved to 0.001 as
ComfyUI does, so the result is the state there, not the denoised sample).

Noise. ``noise="philox"`` (default): fastdiff's in-kernel noise, seeded from torch's global RNG (the
same law as ComfyUI's draws, not the same values). ``noise="torch"``: ``torch.randn_like(x)`` for each
draw fastdiff makes (ComfyUI's ``default_noise_sampler``; ComfyUI also draws, and discards, where a
coefficient is 0). A ``noise_sampler(sigma, sigma_next)`` is called with the levels ComfyUI passes
(SEEDS: the stage levels); dpmpp_2m_sde_heun's ``noise="torch"`` builds k-diffusion's Brownian tree.

Flow models (ComfyUI's CONST model sampling: Flux, SD3, Wan, ...): ComfyUI gives their sigma as t
(x = (1 - t) x0 + t eps) and its SDE samplers take the half-logSNR as log((1 - t)/t). The samplers that
do -- dpmpp_2m_sde_heun, exp_heun_2_x0(_sde), seeds_2/3, er_sde, sa_solver(_pece), lcm -- take a
keyword-only ``flow``: None (default) detects ComfyUI's CONST model sampling behind ``model`` (as
ComfyUI does), True / False say it. With it the sigmas become a flow grid (noise levels t/(1 - t), the
model told t; a first t = 1 moved to percent_to_sigma(1e-4)), so the rows are ComfyUI's flow forms. The
others (res_multistep, ipndm(_v), deis, gradient_estimation, heunpp2, ddim, uni_pc) use -log sigma on
every model in ComfyUI too, and here.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedules import FlowMatching, Grid
from . import k_diffusion as _kd

__all__ = [
    "sample_res_multistep", "sample_res_multistep_ancestral", "sample_dpmpp_2m_sde_heun", "sample_ipndm",
    "sample_ipndm_v", "sample_deis", "sample_gradient_estimation", "sample_heunpp2", "sample_exp_heun_2_x0",
    "sample_exp_heun_2_x0_sde", "sample_seeds_2", "sample_seeds_3", "sample_er_sde", "sample_lcm", "sample_ddim",
    "sample_uni_pc", "sample_uni_pc_bh2", "sample_sa_solver", "sample_sa_solver_pece",
]


def _noise_sampler(noise, noise_sampler, x):
    """ComfyUI's default noise (a fresh ``torch.randn_like(x)`` per draw) for ``noise="torch"``."""
    _kd._check_noise_mode(noise)
    if noise == "torch" and noise_sampler is None and isinstance(x, torch.Tensor):
        return _kd.default_noise_sampler(x)
    return noise_sampler


def _run(solver, options, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, noise_args=None, *,
         noise="philox", check_finite="end", flow=False):
    """k_diffusion's run on the VE grid of ``sigmas``; ``flow``: on the flow grid (see ``_flow_grid``)."""
    noise_sampler = _noise_sampler(noise, noise_sampler, x)
    if not flow:
        return _kd._run(solver, options, model, x, sigmas, extra_args, callback, disable, noise_sampler, noise_args,
                        noise=noise, check_finite=check_finite)
    _kd._check_run_inputs(model, x, extra_args, callback, noise_sampler)
    grid = _flow_grid(model, sigmas)

    def callback_fields(i, point):
        return {'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i]}

    return _kd._sample(grid, solver, options, model, x, extra_args, callback, callback_fields, disable, noise_sampler,
                       noise_args or (lambda row: (sigmas[row.step], sigmas[row.step + 1])), check_finite=check_finite)


# ---------------------------------------------------------------------------------------------
# Flow models: ComfyUI's half-logSNR log((1 - t)/t) of a CONST (rectified-flow) model's sigma t


def _model_sampling(model):
    """ComfyUI's model_sampling object behind a KSAMPLER's model, or None."""
    inner = getattr(model, "inner_model", None)
    patcher = getattr(inner, "model_patcher", None)
    if patcher is not None and hasattr(patcher, "get_model_object"):
        try:
            return patcher.get_model_object("model_sampling")
        except Exception:                      # noqa: BLE001  (not a ComfyUI patcher after all)
            pass
    for obj in (getattr(inner, "inner_model", None), inner):
        ms = getattr(obj, "model_sampling", None)
        if ms is not None:
            return ms
    return None


def _is_flow(model, flow) -> bool:
    """``flow`` as given (True / False), or None: whether ``model`` is a ComfyUI model whose sampling is
    CONST (rectified flow: Flux, SD3, Wan, ...), which ComfyUI's SDE samplers treat with the flow
    half-logSNR."""
    if flow is not None:
        if not isinstance(flow, bool):
            raise TypeError(f"flow must be True, False or None (detect ComfyUI's CONST model sampling), got {flow!r}")
        return flow
    ms = _model_sampling(model)
    return ms is not None and any(c.__name__ == "CONST" for c in type(ms).__mro__)


def _flow_grid(model, sigmas) -> Grid:
    """The grid of a flow model's sigmas t (x = (1 - t) x0 + t eps, the model told t): noise levels
    t / (1 - t). A first t >= 1 becomes percent_to_sigma(1e-4) (ComfyUI's offset_first_sigma_for_snr)."""
    _kd._grid_from_sigmas(sigmas)        # the checks (1-D, finite, >= 0, decreasing)
    t = sigmas.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    if t[0] >= 1.0:
        ms = _model_sampling(model)
        t[0] = float(ms.percent_to_sigma(1e-4)) if hasattr(ms, "percent_to_sigma") else 1.0 - 1e-4
    if np.any(t >= 1.0) or np.any(np.diff(t) >= 0):
        raise ValueError(f"a flow model's sigmas must decrease within [0, 1] (only the first may be 1), got {t}")
    positive = t[t > 0]
    schedule = FlowMatching(num_train_timesteps=1, t_min=float(positive.min()) / 2.0, t_max=1.0)
    return Grid.from_ksigmas(schedule, t / (1.0 - t), model_t=t)


# ---------------------------------------------------------------------------------------------
# Multistep


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                         noise_sampler=None, *, noise='philox', check_finite='end'):
    """RES second-order multistep exponential integrator (arXiv 2308.02157), ComfyUI's form; deterministic."""
    return _run("res_multistep", {"eta": 0.0, "s_noise": s_noise}, model, x, sigmas, extra_args, callback, disable,
                noise_sampler, noise=noise, check_finite=check_finite)


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                   s_noise=1., noise_sampler=None, *, noise='philox', check_finite='end'):
    """res_multistep down to sigma_down, then ancestral noise of std sigma_up (get_ancestral_step, eta)."""
    return _run("res_multistep_ancestral", {"eta": eta, "s_noise": s_noise}, model, x, sigmas, extra_args, callback,
                disable, noise_sampler, noise=noise, check_finite=check_finite)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type='heun', *, noise='philox', check_finite='end', flow=None):
    """DPM-Solver++(2M) SDE with the 'heun' second-order term (ComfyUI's alias of dpmpp_2m_sde)."""
    flow = _is_flow(model, flow)
    noise_sampler = _kd._tree_noise(noise, noise_sampler, x, sigmas)
    return _run("dpmpp_2m_sde_heun", {"eta": eta, "s_noise": s_noise, "solver_type": solver_type}, model, x, sigmas,
                extra_args, callback, disable, noise_sampler, noise=noise, check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *, noise='philox',
                 check_finite='end'):
    """iPNDM: Adams-Bashforth with the equal-step weights (order up to ``max_order``)."""
    return _run("ipndm", {"max_order": max_order}, model, x, sigmas, extra_args, callback, disable, noise=noise,
                check_finite=check_finite)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, *, noise='philox',
                   check_finite='end'):
    """iPNDM with variable-step weights (ComfyUI's, including its fourth-order weight)."""
    return _run("ipndm_v", {"max_order": max_order}, model, x, sigmas, extra_args, callback, disable, noise=noise,
                check_finite=check_finite)


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode='tab', *,
                noise='philox', check_finite='end'):
    """ComfyUI's DEIS ('tab': d interpolated in the time of a fixed VP SDE; 'rhoab': in sigma)."""
    return _run("deis_comfy", {"max_order": max_order, "deis_mode": deis_mode}, model, x, sigmas, extra_args,
                callback, disable, noise=noise, check_finite=check_finite)


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2., *,
                               noise='philox', check_finite='end'):
    """Gradient estimation (Permenter & Yuan, ICML 2024): Euler with d + (ge_gamma - 1)(d - d_prev)."""
    return _run("gradient_estimation", {"ge_gamma": ge_gamma}, model, x, sigmas, extra_args, callback, disable,
                noise=noise, check_finite=check_finite)


# ---------------------------------------------------------------------------------------------
# Multi-stage


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                   s_tmax=float('inf'), s_noise=1., *, noise='philox', check_finite='end'):
    """Heun++ (up to three model calls per step) with EDM churn (s_churn > 0: noise to sigma_hat first)."""
    options = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _kd._run("heunpp2", options, model, x, sigmas, extra_args, callback, disable, None, None,
                    noise=noise, kd_draws='every', check_finite=check_finite)


def _stage_levels(sigmas, rs, flow=False):
    """noise_args for SEEDS: ComfyUI's noise_sampler arguments (sigma_i, sigma_s1), (sigma_s1, sigma_s2),
    ..., (sigma_sk, sigma_{i+1}), with sigma_s = sigma_fn(lerp(lambda_i, lambda_{i+1}, r)), lambda = -log sigma
    (flow: -logit sigma, sigma_fn its inverse)."""
    lam = (lambda v: v.logit().neg()) if flow else (lambda v: v.log().neg())          # noqa: E731
    sigma_fn = (lambda v: v.neg().sigmoid()) if flow else (lambda v: v.neg().exp())   # noqa: E731

    def noise_args(row):
        i = row.step
        lo, hi = lam(sigmas[i]), lam(sigmas[i + 1])
        levels = [sigmas[i]] + [sigma_fn(torch.lerp(lo, hi, r)) for r in rs] + [sigmas[i + 1]]
        k = 0 if row.eval_at == "x" else (1 if row.out_y is not None else len(rs))
        return levels[k], levels[k + 1]
    return noise_args if isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1 else None


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                   noise_sampler=None, r=0.5, solver_type="phi_1", *, noise='philox', check_finite='end', flow=None):
    """SEEDS-2 (arXiv 2305.14267), data prediction, noise at both stages; solver_type 'phi_1' / 'phi_2'."""
    flow = _is_flow(model, flow)
    return _run("seeds_2", {"eta": eta, "s_noise": s_noise, "r": r, "solver_type": solver_type}, model, x, sigmas,
                extra_args, callback, disable, noise_sampler, _stage_levels(sigmas, [float(r)], flow), noise=noise,
                check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_exp_heun_2_x0(model, x, sigmas, extra_args=None, callback=None, disable=None, solver_type="phi_2", *,
                         noise='philox', check_finite='end', flow=None):
    """Exponential Heun, second order, data prediction (seeds_2 with eta = 0, r = 1)."""
    flow = _is_flow(model, flow)
    return _run("exp_heun_2_x0", {"solver_type": solver_type}, model, x, sigmas, extra_args, callback, disable,
                noise=noise, check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                             noise_sampler=None, solver_type="phi_2", *, noise='philox', check_finite='end', flow=None):
    """Stochastic exponential Heun (seeds_2 with r = 1)."""
    flow = _is_flow(model, flow)
    return _run("exp_heun_2_x0_sde", {"eta": eta, "s_noise": s_noise, "solver_type": solver_type}, model, x, sigmas,
                extra_args, callback, disable, noise_sampler, _stage_levels(sigmas, [1.0], flow), noise=noise,
                check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                   noise_sampler=None, r_1=1. / 3, r_2=2. / 3, *, noise='philox', check_finite='end', flow=None):
    """SEEDS-3 (arXiv 2305.14267), data prediction, noise at every stage."""
    flow = _is_flow(model, flow)
    return _run("seeds_3", {"eta": eta, "s_noise": s_noise, "r_1": r_1, "r_2": r_2}, model, x, sigmas, extra_args,
                callback, disable, noise_sampler, _stage_levels(sigmas, [float(r_1), float(r_2)], flow), noise=noise,
                check_finite=check_finite, flow=flow)


# ---------------------------------------------------------------------------------------------
# SDE / stochastic


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1., noise_sampler=None,
                  noise_scaler=None, max_stage=3, *, solver_type='ER-SDE', eta=1., num_integration_points=200,
                  noise='philox', check_finite='end', flow=None):
    """ER-SDE-Solver-3 (arXiv 2309.06169). ``noise_scaler`` as ComfyUI takes it (a function of a tensor, or of
    a float); ``solver_type`` / ``eta``: ComfyUI's SamplerER_SDE node ('ER-SDE' with scaler
    x (e^{x^0.3} + 10)^eta, 'Reverse-time SDE' with x^(eta + 1), 'ODE'; eta = 0 is the ODE)."""
    flow = _is_flow(model, flow)
    scaler = None
    if noise_scaler is not None:
        if not callable(noise_scaler):
            raise TypeError(f"noise_scaler must be callable or None, got {type(noise_scaler).__name__}")

        def scaler(v: float, f=noise_scaler) -> float:
            return float(f(torch.tensor(v, dtype=torch.float64)))
    options = {"solver_type": solver_type, "max_stage": max_stage, "eta": eta, "s_noise": s_noise,
               "noise_scaler": scaler, "num_integration_points": num_integration_points}
    return _run("er_sde", options, model, x, sigmas, extra_args, callback, disable, noise_sampler, noise=noise,
                check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
               noise='philox', check_finite='end', flow=None):
    """LCM multistep sampling: the denoised sample, noised afresh to the next level."""
    flow = _is_flow(model, flow)
    return _run("lcm", {}, model, x, sigmas, extra_args, callback, disable, noise_sampler, noise=noise,
                check_finite=check_finite, flow=flow)


def _sa_options(model, sigmas, tau_func, eta, tau_interval, flow=False):
    """SA-Solver's tau per step: ``tau_func(sigma_next)`` evaluated once on the host for every step (no
    per-step sync); else eta in ``tau_interval``; else ComfyUI's default window percent_to_sigma(0.2) ..
    percent_to_sigma(0.8) of a ComfyUI model wrapper (``model.inner_model.model_sampling``), or without
    one 20% .. 80% of the VE time range (t = sigma) between the given sigmas' extremes."""
    if tau_func is not None:
        if not callable(tau_func):
            raise TypeError(f"tau_func must be callable (sigma -> tau) or None, got {type(tau_func).__name__}")
        if not (isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1):
            return {}
        levels = sigmas.detach().to("cpu", torch.float64).tolist()
        return {"taus": [float(tau_func(torch.tensor(levels[i + 1]))) for i in range(len(levels) - 1)]}
    if tau_interval is None:
        ms = getattr(getattr(model, "inner_model", None), "model_sampling", None)
        if ms is not None and hasattr(ms, "percent_to_sigma"):
            tau_interval = (float(ms.percent_to_sigma(0.2)), float(ms.percent_to_sigma(0.8)))
            if flow:        # ComfyUI's sigma t of a flow model as a noise level t / (1 - t)
                tau_interval = tuple(v / (1.0 - v) if v < 1.0 else float("inf") for v in tau_interval)
    return {"eta": eta, "tau_interval": tau_interval}


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False,
                     *, eta=1.0, tau_interval=None, noise='philox', check_finite='end', flow=None):
    """SA-Solver (arXiv 2309.05019): stochastic Adams predictor (order <= 3) and corrector (<= 4) with
    noise tau(sigma); one model call per step (two with ``use_pece``), no per-step host sync.
    ``eta`` / ``tau_interval`` (keyword-only): ComfyUI's SamplerSASolver node's eta and window, as noise
    levels (start, end); ``tau_func`` overrides them."""
    flow = _is_flow(model, flow)
    options = {"s_noise": s_noise, "predictor_order": predictor_order, "corrector_order": corrector_order,
               "use_pece": use_pece, "simple_order_2": simple_order_2,
               **_sa_options(model, sigmas, tau_func, eta, tau_interval, flow)}
    return _run("sa_solver", options, model, x, sigmas, extra_args, callback, disable, noise_sampler, noise=noise,
                check_finite=check_finite, flow=flow)


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=False, tau_func=None,
                          s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, simple_order_2=False,
                          *, eta=1.0, tau_interval=None, noise='philox', check_finite='end', flow=None):
    """SA-Solver in PECE mode (the model evaluated again at the corrected state)."""
    flow = _is_flow(model, flow)
    options = {"s_noise": s_noise, "predictor_order": predictor_order, "corrector_order": corrector_order,
               "simple_order_2": simple_order_2, **_sa_options(model, sigmas, tau_func, eta, tau_interval, flow)}
    return _run("sa_solver_pece", options, model, x, sigmas, extra_args, callback, disable, noise_sampler,
                noise=noise, check_finite=check_finite, flow=flow)


# ---------------------------------------------------------------------------------------------
# Aliases ComfyUI computes with other samplers


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, *, noise='philox',
                check_finite='end'):
    """ComfyUI's ddim: its Euler sampler, which on k-diffusion noise levels is DDIM (eta = 0)."""
    return _run("ddim", {}, model, x, sigmas, extra_args, callback, disable, noise=noise, check_finite=check_finite)


def _unipc_sigmas(sigmas):
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() == 1 and sigmas.numel() >= 2 and float(sigmas[-1]) == 0.0:
        sigmas = sigmas.clone()
        sigmas[-1] = 0.001          # ComfyUI's uni_pc: timesteps[-1] = 0.001
    return sigmas


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant='bh1', *,
                  noise='philox', check_finite='end'):
    """ComfyUI's uni_pc: UniPC-3 with the corrector, data prediction, lower orders at the end; a final
    sigma = 0 becomes 0.001 (the result is the state there)."""
    name = {"bh1": "uni_pc", "bh2": "uni_pc_bh2"}.get(variant)
    if name is None:
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    return _run(name, {}, model, x, _unipc_sigmas(sigmas), extra_args, callback, disable, noise=noise,
                check_finite=check_finite)


@torch.no_grad()
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None, *, noise='philox',
                      check_finite='end'):
    """ComfyUI's uni_pc_bh2: uni_pc with B(h) = e^h - 1."""
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant='bh2', noise=noise,
                         check_finite=check_finite)

