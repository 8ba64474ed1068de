"""Issue 14, "Scheduler drop-ins still missing": the newer drop-ins against stock diffusers.

Each class runs step by step beside stock diffusers on the same inputs (model output = o_k + 0.3 x,
fed from each run's own samples; stochastic ones with the same generator seed), and each call's
outputs must agree within stock's own float32 precision: PEER_MARGIN x |stock fp32 - stock fp64| (its arrays cast to float64)
elementwise plus its worst error over the tensor (conftest.peer_tolerance), stock's float64 run
drawing the same (float32) noise. The inverse schedulers also round-trip: invert a latent, sample
it back, and the reconstruction error must be stock's within stock's precision.
"""
from __future__ import annotations

import contextlib
import logging
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import PEER_MARGIN, assert_close_to_peer, dtype_tolerance, peer_tolerance

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

SHAPE = (2, 4, 4, 4)


@contextlib.contextmanager
def _float32_noise(module_name: str):
    """Stock's float64 run draws the float32 noise its float32 run draws (then upcast)."""
    import importlib
    from diffusers.utils.torch_utils import randn_tensor
    module = importlib.import_module(module_name)

    def draw(shape, generator=None, device=None, dtype=None, **kw):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32, **kw).to(dtype)
    with contextlib.ExitStack() as stack:
        if hasattr(module, "randn_tensor"):
            stack.enter_context(mock.patch.object(module, "randn_tensor", draw))
        if hasattr(module, "BrownianTreeNoiseSampler"):     # the same tree, built on float32
            tree = module.BrownianTreeNoiseSampler

            def sampler(x, *args, **kwargs):
                inner = tree(x.float(), *args, **kwargs)
                return lambda s, s_next: inner(s, s_next).to(x.dtype)
            stack.enter_context(mock.patch.object(module, "BrownianTreeNoiseSampler", sampler))
        yield


def _to_float64(scheduler):
    """Stock computing in float64: its float32 arrays (alphas_cumprod, sigmas, ...) cast, its formulas
    unchanged; so its float32 run's distance from this one includes the rounding of its coefficients."""
    for k, v in list(vars(scheduler).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and k != "timesteps":
            setattr(scheduler, k, v.double())
    return scheduler


def _model(o, x):
    """The test's model output: o + 0.3 x (o with twice the channels: the extra half as it is)."""
    if o.shape[1] == x.shape[1]:
        return o + 0.3 * x
    c = x.shape[1]
    return torch.cat([o[:, :c] + 0.3 * x, o[:, c:]], dim=1)


def _trajectory(scheduler, steps, dtype, x_init, outputs, seed=0, set_kwargs=None, step_kwargs=None, begin=None):
    """(prev_sample, second value) of every call of a run fed from its own outputs."""
    scheduler.set_timesteps(steps, **(set_kwargs or {}))
    if dtype == torch.float64:
        _to_float64(scheduler)
    if begin is not None:
        scheduler.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    x, xs = x_init.to(dtype), []
    for k, t in enumerate(scheduler.timesteps[begin or 0:]):
        kw = dict(step_kwargs or {})
        if "generator" in __import__("inspect").signature(scheduler.step).parameters:
            kw["generator"] = g
        out = scheduler.step(_model(outputs[k].to(dtype), x), t, x, return_dict=False, **kw)
        x = out[0]
        xs.append(out)
    return xs


def _check_parity(make_stock, make_ours, steps, module, seed=0, set_kwargs=None, step_kwargs=None, begin=None,
                  record=None, out_shape=SHAPE, out_map=None, ops=0):
    """``ops``: where stock's float64 run shares the cancellation of its float32 one (so their distance
    understates its rounding), also conftest.dtype_tolerance of that many float32 operations."""
    stock = make_stock()
    stock.set_timesteps(steps, **(set_kwargs or {}))
    calls = len(stock.timesteps) - (begin or 0)
    g = torch.Generator().manual_seed(1000 + (steps or 0))
    x_init = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    outputs = [torch.randn(out_shape, dtype=torch.float64, generator=g) for _ in range(calls)]
    if out_map is not None:
        outputs = [out_map(o) for o in outputs]
    args = (steps, None, x_init, outputs, seed, set_kwargs, step_kwargs, begin)
    run = lambda s, dtype: _trajectory(s, args[0], dtype, *args[2:])  # noqa: E731
    peer = run(make_stock(), torch.float32)
    with _float32_noise(module):
        peer64 = run(make_stock(), torch.float64)
    mine = run(make_ours(), torch.float32)
    assert len(mine) == len(peer) == calls
    worst, dev = 0.0, 0.0
    for k, (a, p, p64) in enumerate(zip(mine, peer, peer64)):
        assert type(a) is tuple and len(a) == len(p)
        for j, (aj, pj, pj64) in enumerate(zip(a, p, p64)):
            assert aj.dtype == pj.dtype, (k, j, aj.dtype, pj.dtype)
            tol = peer_tolerance(pj, pj64) + PEER_MARGIN * float((pj.double() - pj64).abs().max())
            if ops:
                tol = tol + dtype_tolerance(pj, ops=ops)
            assert_close_to_peer(aj, pj, tol, f"call {k} of {calls}, output {j}")
            diff = np.abs(aj.double().numpy() - pj.double().numpy())
            worst = max(worst, float((diff / np.maximum(tol, 1e-30)).max()))
            dev = max(dev, float(diff.max()))
    if record is not None:
        record.append((worst, dev))
    return worst


# ---------------------------------------------------------------------------------------------
# LCMScheduler, TCDScheduler


LCM_GRID = [(p, steps, opt) for p in ("epsilon", "v_prediction", "sample") for steps in (1, 4, 5, 20, 50)
            for opt in ("plain", "clip", "threshold")
            if opt == "plain" or (p == "epsilon" and steps in (4, 20))]


def _lcm_config(prediction, opt, **extra):
    return dict(prediction_type=prediction, clip_sample=opt == "clip", thresholding=opt == "threshold",
                **extra)


@pytest.mark.parametrize("prediction, steps, opt", LCM_GRID)
def test_lcm_step_by_step_matches_stock(prediction, steps, opt):
    config = _lcm_config(prediction, opt)
    _check_parity(lambda: diffusers.LCMScheduler(**config), lambda: fd.LCMScheduler(**config), steps,
                  "diffusers.schedulers.scheduling_lcm", seed=steps)


@pytest.mark.parametrize("steps, begin, original", [(4, 2, 50), (8, 3, 50), (6, 0, 100), (3, 0, 10)])
def test_lcm_mid_run_start_and_original_steps_match_stock(steps, begin, original):
    config = dict(original_inference_steps=original, beta_schedule="linear", timestep_scaling=5.0)
    _check_parity(lambda: diffusers.LCMScheduler(**config), lambda: fd.LCMScheduler(**config), steps,
                  "diffusers.schedulers.scheduling_lcm", seed=7, begin=begin or None)


TCD_GRID = [(p, steps, eta) for p in ("epsilon", "v_prediction", "sample") for steps in (1, 4, 5, 20, 50)
            for eta in (0.0, 0.3, 1.0) if eta == 0.3 or steps in (1, 5)]


@pytest.mark.parametrize("prediction, steps, eta", TCD_GRID)
def test_tcd_step_by_step_matches_stock(prediction, steps, eta):
    config = dict(prediction_type=prediction)
    _check_parity(lambda: diffusers.TCDScheduler(**config), lambda: fd.TCDScheduler(**config), steps,
                  "diffusers.schedulers.scheduling_tcd", seed=steps, step_kwargs={"eta": eta})


def test_tcd_original_steps_and_mid_run_start_match_stock():
    config = dict(beta_schedule="linear")
    _check_parity(lambda: diffusers.TCDScheduler(**config), lambda: fd.TCDScheduler(**config), 6,
                  "diffusers.schedulers.scheduling_tcd", seed=3, set_kwargs={"original_inference_steps": 100})
    _check_parity(lambda: diffusers.TCDScheduler(**config), lambda: fd.TCDScheduler(**config), 8,
                  "diffusers.schedulers.scheduling_tcd", seed=4, begin=3, step_kwargs={"eta": 0.5})


def test_consistency_outputs_are_diffusers_classes():
    for cls, stock_cls, field in ((fd.LCMScheduler, diffusers.LCMScheduler, "denoised"),
                                  (fd.TCDScheduler, diffusers.TCDScheduler, "pred_noised_sample")):
        s = cls()
        s.set_timesteps(4)
        x = torch.randn(1, 4, 2, 2)
        out = s.step(torch.randn(1, 4, 2, 2), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        want = diffusers.utils.import_utils.importlib.import_module(stock_cls.__module__)
        assert type(out) is getattr(want, stock_cls.__name__ + "Output")
        assert set(out.keys()) == {"prev_sample", field}


FLOW_LCM = {"shift3": dict(shift=3.0), "plain": {}, "karras": dict(use_karras_sigmas=True, shift=1.0),
            "terminal": dict(shift=3.0, shift_terminal=0.1), "dynamic": dict(use_dynamic_shifting=True)}


@pytest.mark.parametrize("config, steps", [(c, n) for c in FLOW_LCM for n in (1, 4, 5, 20, 50)
                                           if c == "shift3" or n in (4, 20)])
def test_flow_match_lcm_matches_stock(config, steps):
    cfg = FLOW_LCM[config]
    set_kwargs = {"mu": 0.9} if cfg.get("use_dynamic_shifting") else None
    _check_parity(lambda: diffusers.FlowMatchLCMScheduler(**cfg), lambda: fd.FlowMatchLCMScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_flow_match_lcm", seed=steps, set_kwargs=set_kwargs)


def test_flow_match_lcm_refuses_upscaling():
    s = fd.FlowMatchLCMScheduler(scale_factors=[1.5, 2.0], upscale_mode="bicubic")
    s.set_timesteps(3)
    with pytest.raises(NotImplementedError, match="scale_factors"):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))


CM = {"default": {}, "noclip-snoise": dict(clip_denoised=False, s_noise=0.9), "imagenet": dict(sigma_min=0.002,
                                                                                             sigma_max=80.0)}


@pytest.mark.parametrize("config, steps", [(c, n) for c in CM for n in (1, 2, 5, 20, 40) if c == "default" or n != 40])
def test_cm_stochastic_iterative_matches_stock(config, steps):
    cfg = CM[config]
    _check_parity(lambda: diffusers.CMStochasticIterativeScheduler(**cfg),
                  lambda: fd.CMStochasticIterativeScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_consistency_models", seed=steps, ops=4)


def test_cm_stochastic_iterative_custom_timesteps_match_stock():
    cfg = {}
    _check_parity(lambda: diffusers.CMStochasticIterativeScheduler(**cfg),
                  lambda: fd.CMStochasticIterativeScheduler(**cfg), None,
                  "diffusers.schedulers.scheduling_consistency_models", seed=3, set_kwargs={"timesteps": [39, 22, 10]},
                  ops=4)


# ---------------------------------------------------------------------------------------------
# IPNDMScheduler


@pytest.mark.parametrize("steps, begin", [(1, None), (2, None), (4, None), (5, None), (20, None), (50, None),
                                          (1000, None), (12, 5)])
def test_ipndm_step_by_step_matches_stock(steps, begin):
    _check_parity(diffusers.IPNDMScheduler, fd.IPNDMScheduler, steps, "diffusers.schedulers.scheduling_ipndm",
                  begin=begin)


def test_ipndm_steps_without_set_timesteps_as_stock():
    """diffusers' constructor sets a 1000-step schedule: both step from it at once."""
    ref, ours = diffusers.IPNDMScheduler(), fd.IPNDMScheduler()
    x = torch.randn(SHAPE)
    xr = xo = x
    for k, t in enumerate(ref.timesteps[:6]):
        out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        xr, xo = ref.step(out, t, xr).prev_sample, ours.step(out, t, xo).prev_sample
    torch.testing.assert_close(xo, xr, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DDIMInverseScheduler, DPMSolverMultistepInverseScheduler: parity, and the inversion round trip


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_INV = dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)     # SD's config (DiffEdit's use)
DDIM_INV_CONFIGS = {
    "default": {},                                   # clip_sample=True, set_alpha_to_one=True: starts clean
    "sd": SD_INV,
    "noclip-alpha1": dict(SD, clip_sample=False),
    "v": dict(SD_INV, prediction_type="v_prediction"),
    "sample-clip": dict(SD, prediction_type="sample", set_alpha_to_one=False, clip_sample_range=2.0),
    "trailing": dict(SD_INV, timestep_spacing="trailing", steps_offset=0),
    "zsnr": dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                 clip_sample=False),
}
DDIM_INV_GRID = [(c, n) for c in DDIM_INV_CONFIGS for n in (1, 5, 20, 50) if c in ("default", "sd") or n in (1, 20)]


@pytest.mark.parametrize("config, steps", DDIM_INV_GRID)
def test_ddim_inverse_step_by_step_matches_stock(config, steps):
    cfg = DDIM_INV_CONFIGS[config]
    _check_parity(lambda: diffusers.DDIMInverseScheduler(**cfg), lambda: fd.DDIMInverseScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_ddim_inverse")


DPM_INV_CONFIGS = {
    "default": {},                                              # dpmsolver++ order 2, linspace
    "sd-order3": dict(SD, solver_order=3),
    "order1-v": dict(SD, solver_order=1, prediction_type="v_prediction"),
    "dpmsolver-heun": dict(SD, algorithm_type="dpmsolver", solver_type="heun"),
    "sample-threshold": dict(SD, prediction_type="sample", thresholding=True),
    "karras": dict(SD, use_karras_sigmas=True),                # ends with a zero-length step
    "trailing": dict(SD, timestep_spacing="trailing"),         # ends with a zero-length step too
    "leading-eaf": dict(SD, timestep_spacing="leading", steps_offset=1, euler_at_final=True),
    "lambda-clipped": dict(SD, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
}
DPM_INV_GRID = [(c, n) for c in DPM_INV_CONFIGS for n in (1, 5, 20, 50) if c in ("default", "sd-order3") or n in (1, 5, 20)]


@pytest.mark.parametrize("config, steps", DPM_INV_GRID)
def test_dpmsolver_inverse_step_by_step_matches_stock(config, steps):
    cfg = DPM_INV_CONFIGS[config]
    _check_parity(lambda: diffusers.DPMSolverMultistepInverseScheduler(**cfg),
                  lambda: fd.DPMSolverMultistepInverseScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_dpmsolver_multistep_inverse")


def test_inverse_drop_ins_refuse_what_they_cannot_run():
    with pytest.raises(NotImplementedError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        fd.DPMSolverMultistepInverseScheduler(algorithm_type="sde-dpmsolver++")
    out = fd.DDIMInverseScheduler(**SD_INV)
    out.set_timesteps(4)
    r = out.step(torch.randn(SHAPE), out.timesteps[0], torch.randn(SHAPE))
    assert type(r) is diffusers.schedulers.scheduling_ddim_inverse.DDIMSchedulerOutput
    assert set(r.keys()) == {"prev_sample", "pred_original_sample"}


def _gaussian_eps(acp, c=0.5):
    """The exact noise prediction for data N(0, c^2 I) on a VP schedule (x = a x0 + s eps)."""
    def model(x, t):
        a2 = acp[int(t)].to(x.dtype)
        return (1 - a2).sqrt() * x / (a2 * c * c + (1 - a2))
    return model


def _round_trip(inverse, forward, steps, x0, dtype):
    """Invert x0 with ``inverse``, sample it back with ``forward``: (latent, reconstruction)."""
    model = _gaussian_eps(inverse.alphas_cumprod.double())
    inverse.set_timesteps(steps)
    if dtype == torch.float64:
        _to_float64(inverse)
    x = x0.to(dtype)
    for t in inverse.timesteps:
        x = inverse.step(model(x, t), t, x).prev_sample
    latent = x
    forward.set_timesteps(steps)
    if dtype == torch.float64:
        _to_float64(forward)
    for t in forward.timesteps:
        x = forward.step(model(x, t), t, x).prev_sample
    return latent, x


ROUND_TRIPS = [("DDIMInverseScheduler", "DDIMScheduler", "sd", SD_INV, n) for n in (5, 20, 50)] + \
    [("DDIMInverseScheduler", "DDIMScheduler", "alpha1", dict(SD, clip_sample=False), 20)] + \
    [("DPMSolverMultistepInverseScheduler", "DPMSolverMultistepScheduler", f"order{k}", dict(SD, solver_order=k), n)
     for k in (1, 2, 3) for n in (5, 20, 50)]
ROUND_TRIP_ERRORS = {}


@pytest.mark.parametrize("inverse, forward, label, config, steps", ROUND_TRIPS,
                         ids=[f"{i.replace('Scheduler', '')}-{lab}-{n}" for i, _, lab, _, n in ROUND_TRIPS])
def test_inversion_round_trip_reconstructs_like_stock(inverse, forward, label, config, steps):
    """Invert a latent, sample it back: fastdiff's latent and reconstruction are stock's within
    stock's float32 precision, and so is the reconstruction error."""
    x0 = 0.5 * torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    make = lambda lib, name: getattr(lib, name)(**config)  # noqa: E731
    stock = _round_trip(make(diffusers, inverse), make(diffusers, forward), steps, x0, torch.float32)
    stock64 = _round_trip(make(diffusers, inverse), make(diffusers, forward), steps, x0, torch.float64)
    ours = _round_trip(make(fd, inverse), make(fd, forward), steps, x0, torch.float32)
    for what, a, p, p64 in zip(("latent", "reconstruction"), ours, stock, stock64):
        tol = peer_tolerance(p, p64) + PEER_MARGIN * float((p.double() - p64).abs().max())
        assert_close_to_peer(a, p, tol, what)
    err = {k: float((v[1].double() - x0).abs().max()) for k, v in (("ours", ours), ("stock", stock),
                                                                   ("stock64", stock64))}
    ROUND_TRIP_ERRORS[(inverse, label, steps)] = err
    assert abs(err["ours"] - err["stock"]) <= PEER_MARGIN * abs(err["stock"] - err["stock64"]) + \
        2 * torch.finfo(torch.float32).eps * float(x0.abs().max()) + float(tol.max()), err


# ---------------------------------------------------------------------------------------------
# EDMEulerScheduler with churn


EDM_CHURN = [(cfg, n, churn) for cfg in ("karras", "exponential-v") for n in (1, 5, 20, 50)
             for churn in ({"s_churn": 40.0}, {"s_churn": 80.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.003})
             if cfg == "karras" or n in (5, 20)]
EDM_CONFIGS = {"karras": {}, "exponential-v": dict(sigma_schedule="exponential", prediction_type="v_prediction")}


@pytest.mark.parametrize("config, steps, churn", EDM_CHURN,
                         ids=[f"{c}-{n}-{'-'.join(f'{k}={v}' for k, v in ch.items())}" for c, n, ch in EDM_CHURN])
def test_edm_euler_churn_matches_stock(config, steps, churn):
    cfg = EDM_CONFIGS[config]
    _check_parity(lambda: diffusers.EDMEulerScheduler(**cfg), lambda: fd.EDMEulerScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_edm_euler", seed=steps, step_kwargs=churn)


def test_edm_euler_churn_changes_mid_run_and_refuses_a_given_x0():
    s, ref = fd.EDMEulerScheduler(), diffusers.EDMEulerScheduler()
    for x in (s, ref):
        x.set_timesteps(6)
    x = xr = torch.randn(SHAPE) * 80
    for k, t in enumerate(s.timesteps):
        out, churn = torch.randn(SHAPE), [0.0, 30.0][k % 2]
        x = s.step(out, t, x, s_churn=churn, generator=torch.Generator().manual_seed(k)).prev_sample
        xr = ref.step(out, t, xr, s_churn=churn, generator=torch.Generator().manual_seed(k)).prev_sample
    torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-4)
    s.set_timesteps(4)
    with pytest.raises(NotImplementedError, match="pred_original_sample"):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE), s_churn=10.0,
               pred_original_sample=torch.randn(SHAPE))


# ---------------------------------------------------------------------------------------------
# DDPMScheduler with learned variances


def _variance_half(kind):
    """The model's variance channels: in [-1, 1] for 'learned_range' (an interpolation weight), a
    positive variance for 'learned'."""
    def f(o):
        c = o.shape[1] // 2
        v = torch.tanh(o[:, c:]) if kind == "learned_range" else 0.02 + 0.5 * o[:, c:].abs()
        return torch.cat([o[:, :c], v], dim=1)
    return f


DDPM_LEARNED = [(v, p, n, opt) for v in ("learned_range", "learned") for p in ("epsilon", "v_prediction", "sample")
                for n in (1, 5, 20, 50) for opt in ({}, {"clip_sample": False}, {"thresholding": True})
                if (p == "epsilon" or n in (1, 20)) and (not opt or (v, p, n) == ("learned_range", "epsilon", 20))]


@pytest.mark.parametrize("variance, prediction, steps, opt", DDPM_LEARNED)
def test_ddpm_learned_variance_matches_stock(variance, prediction, steps, opt):
    cfg = dict(SD, variance_type=variance, prediction_type=prediction, **opt)
    _check_parity(lambda: diffusers.DDPMScheduler(**cfg), lambda: fd.DDPMScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_ddpm", seed=steps, out_shape=(2, 8, 4, 4),
                  out_map=_variance_half(variance))


def test_ddpm_learned_variance_wants_the_variance_channels():
    s = fd.DDPMScheduler(variance_type="learned_range")
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))


# ---------------------------------------------------------------------------------------------
# DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")


SDE_DPM = {
    "order2-midpoint": dict(SD),
    "order2-heun-v": dict(SD, solver_type="heun", prediction_type="v_prediction"),
    "order1-sample": dict(SD, solver_order=1, prediction_type="sample"),
    "karras": dict(SD, use_karras_sigmas=True),
    "trailing-eaf": dict(SD, timestep_spacing="trailing", euler_at_final=True, lower_order_final=False),
    "threshold": dict(SD, thresholding=True, sample_max_value=1.5),
}
SDE_DPM_GRID = [(c, n) for c in SDE_DPM for n in (1, 5, 20, 50) if c == "order2-midpoint" or n in (1, 5, 20)]


@pytest.mark.parametrize("config, steps", SDE_DPM_GRID)
def test_sde_dpmsolver_matches_stock(config, steps):
    cfg = dict(SDE_DPM[config], algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    _check_parity(lambda: diffusers.DPMSolverMultistepScheduler(**cfg), lambda: fd.DPMSolverMultistepScheduler(**cfg),
                  steps, "diffusers.schedulers.scheduling_dpmsolver_multistep", seed=steps)


def test_sde_dpmsolver_order_3_is_refused_as_diffusers_cannot_step_it():
    with pytest.raises(NotImplementedError, match="solver_order=3"):
        fd.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3)


def test_sde_dpmsolver_solver_variants_equal_the_textbook():
    """fastdiff's sde_dpmsolver against its textbook oracle (float64), every option."""
    from fastdiff import Sampler
    from fastdiff.models.gaussian_mixture import GaussianMixture
    from fastdiff.schedules import DiscreteVP, make_grid
    from fastdiff.textbook.sde_dpm_solver import sample_sde_dpmsolver
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    for steps in (1, 2, 5, 16):
        grid = make_grid(schedule, steps, "leading", steps_offset=1)
        for opts in ({"order": 1}, {"solver_type": "heun"}, {"lower_order_final": False},
                     {"euler_at_final": True, "solver_type": "heun"}):
            model = GaussianMixture.default(schedule, dim=6, prediction="epsilon")
            noise = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
            zs = [torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + k))
                  for k in range(steps)]
            sampler = Sampler.build(solver="sde_dpmsolver", grid=grid, prediction="epsilon", solver_options=opts,
                                    state_dtype=torch.float64)
            out = sampler(model, noise, noise_sampler=lambda row, x: zs[row.step], backend="reference", progress=False)
            ref = sample_sde_dpmsolver(model, noise * schedule.init_noise_scale(float(grid.alpha[0]),
                                                                                float(grid.sigma[0])),
                                       grid, "epsilon", noise=zs, **opts)
            err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            assert err < 1e-10, (steps, opts, err)


# ---------------------------------------------------------------------------------------------
# CosineDPMSolverMultistepScheduler


COSINE = {
    "default": {},                                              # v_prediction, exponential, order 2, to 0
    "karras-eps-heun": dict(sigma_schedule="karras", prediction_type="epsilon", solver_type="heun"),
    "order1": dict(solver_order=1),
    "sigma_data": dict(sigma_data=0.5, sigma_min=0.1, sigma_max=80.0),
    # (final_sigmas_type='sigma_min': stock's Brownian tree recurses without end on its last query, whose
    # float32 sigma_min lies below the tree's start; the drop-in queries the same tree, with the same result)
    "eaf": dict(euler_at_final=True, lower_order_final=False),
}
COSINE_GRID = [(c, n) for c in COSINE for n in (1, 5, 20, 50) if c == "default" or n in (1, 5, 20)]


@pytest.mark.parametrize("config, steps", COSINE_GRID)
def test_cosine_dpmsolver_matches_stock(config, steps):
    cfg = COSINE[config]
    _check_parity(lambda: diffusers.CosineDPMSolverMultistepScheduler(**cfg),
                  lambda: fd.CosineDPMSolverMultistepScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_cosine_dpmsolver_multistep", seed=steps)


# ---------------------------------------------------------------------------------------------
# CogVideoXDDIMScheduler, CogVideoXDPMScheduler


COG = {
    "default": {},
    "cogvideox": dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
                      set_alpha_to_one=True, clip_sample=False),      # CogVideoX-5b's config (zero terminal SNR)
    "leading-offset": dict(steps_offset=1, set_alpha_to_one=False, snr_shift_scale=1.0),
    "linspace-sample": dict(timestep_spacing="linspace", prediction_type="sample"),
}
COG_GRID = [(c, n) for c in COG for n in (1, 5, 20, 50) if c in ("default", "cogvideox") or n in (1, 5, 20)]


@pytest.mark.parametrize("config, steps", COG_GRID)
def test_cogvideox_ddim_matches_stock(config, steps):
    cfg = COG[config]
    _check_parity(lambda: diffusers.CogVideoXDDIMScheduler(**cfg), lambda: fd.CogVideoXDDIMScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_ddim_cogvideox", seed=steps)


def _cog_dpm_trajectory(scheduler, steps, dtype, x_init, outputs, seed):
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        _to_float64(scheduler)
    g = torch.Generator().manual_seed(seed)
    x, old, xs = x_init.to(dtype), None, []
    ts = scheduler.timesteps
    for k, t in enumerate(ts):
        out = scheduler.step(_model(outputs[k].to(dtype), x), old, t, ts[k - 1] if k else None, x, generator=g,
                             return_dict=False)
        x, old = out
        xs.append(out)
    return xs


@pytest.mark.parametrize("config, steps", COG_GRID)
def test_cogvideox_dpm_matches_stock(config, steps):
    """The pipeline's loop (old_pred_original_sample, timestep_back), the same generator."""
    cfg = COG[config]
    stock = diffusers.CogVideoXDPMScheduler(**cfg)
    stock.set_timesteps(steps)
    g = torch.Generator().manual_seed(1000 + steps)
    x_init = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    outputs = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in stock.timesteps]
    peer = _cog_dpm_trajectory(diffusers.CogVideoXDPMScheduler(**cfg), steps, torch.float32, x_init, outputs, steps)
    with _float32_noise("diffusers.schedulers.scheduling_dpm_cogvideox"):
        peer64 = _cog_dpm_trajectory(diffusers.CogVideoXDPMScheduler(**cfg), steps, torch.float64, x_init, outputs,
                                     steps)
    mine = _cog_dpm_trajectory(fd.CogVideoXDPMScheduler(**cfg), steps, torch.float32, x_init, outputs, steps)
    for k, (a, p, p64) in enumerate(zip(mine, peer, peer64)):
        for j, (aj, pj, pj64) in enumerate(zip(a, p, p64)):
            assert aj.dtype == pj.dtype
            tol = peer_tolerance(pj, pj64) + PEER_MARGIN * float((pj.double() - pj64).abs().max())
            assert_close_to_peer(aj, pj, tol, f"call {k} of {len(peer)}, output {j}")


def test_cogvideox_dpm_refuses_a_history_it_does_not_keep():
    s = fd.CogVideoXDPMScheduler()
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    with pytest.raises(NotImplementedError, match="old_pred_original_sample"):
        s.step(torch.randn(SHAPE), torch.randn(SHAPE), s.timesteps[0], None, x)
    x, old = s.step(torch.randn(SHAPE), None, s.timesteps[0], None, x)
    with pytest.raises(NotImplementedError, match="timestep_back"):
        s.step(torch.randn(SHAPE), old, s.timesteps[1], s.timesteps[0] - 1, x)
    out = s.step(torch.randn(SHAPE), old, s.timesteps[1], s.timesteps[0], x, return_dict=True)
    assert type(out) is diffusers.schedulers.scheduling_dpm_cogvideox.DDIMSchedulerOutput


# ---------------------------------------------------------------------------------------------
# DDIMParallelScheduler, DDPMParallelScheduler (step, and batch_step_no_noise)


PARALLEL = {
    "sd": dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "clip": dict(SD, prediction_type="v_prediction"),                       # clip_sample=True (default)
    "threshold-sample": dict(SD, thresholding=True, prediction_type="sample", sample_max_value=2.0),
}
PARALLEL_GRID = [(name, c, n) for name in ("DDIMParallelScheduler", "DDPMParallelScheduler") for c in PARALLEL
                 for n in (1, 5, 20, 50) if c == "sd" or n in (1, 20)]


def _params(name, config):
    import inspect
    keys = inspect.signature(getattr(diffusers, name).__init__).parameters
    return {k: v for k, v in config.items() if k in keys}


@pytest.mark.parametrize("name, config, steps", PARALLEL_GRID)
def test_parallel_schedulers_step_like_stock(name, config, steps):
    cfg = _params(name, PARALLEL[config])
    kw = {"eta": 0.5} if name.startswith("DDIM") else None
    _check_parity(lambda: getattr(diffusers, name)(**cfg), lambda: getattr(fd, name)(**cfg), steps,
                  "diffusers.schedulers." + ("scheduling_ddim_parallel" if name.startswith("DDIM")
                                             else "scheduling_ddpm_parallel"), seed=steps, step_kwargs=kw)


@pytest.mark.parametrize("name, config, steps", [(n, c, s) for n, c, s in PARALLEL_GRID if s in (5, 20)])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_batch_step_no_noise_matches_stock(name, config, steps, use_clipped):
    """A batch whose samples sit at different timesteps (ParaDiGMS' window), stepped at once."""
    if use_clipped and name.startswith("DDPM"):
        return
    cfg = _params(name, PARALLEL[config])
    stock, ours, stock64 = (getattr(lib, name)(**cfg) for lib in (diffusers, fd, diffusers))
    for s in (stock, ours, stock64):
        s.set_timesteps(steps)
    _to_float64(stock64)
    g = torch.Generator().manual_seed(steps)
    ts = stock.timesteps[torch.randint(0, len(stock.timesteps), (6,), generator=g)]
    x = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64) + 0.3 * x
    kw = {"use_clipped_model_output": True} if use_clipped else {}
    p = stock.batch_step_no_noise(out.float(), ts, x.float(), **kw)
    p64 = stock64.batch_step_no_noise(out, ts, x, **kw)
    a = ours.batch_step_no_noise(out.float(), ts, x.float(), **kw)
    assert type(a) is torch.Tensor and a.dtype == p.dtype and a.shape == p.shape
    tol = peer_tolerance(p, p64) + PEER_MARGIN * float((p.double() - p64).abs().max())
    assert_close_to_peer(a, p, tol, "batch_step_no_noise")
    half = ours.batch_step_no_noise(out.half(), ts, x.half(), **kw)
    assert half.dtype == stock.batch_step_no_noise(out.half(), ts, x.half(), **kw).dtype


# ---------------------------------------------------------------------------------------------
# SASolverScheduler


SAS = {
    "default": {},                                               # data prediction, orders 2/2, tau 1 in [200, 800]
    "sd-p3c4": dict(SD, predictor_order=3, corrector_order=4),
    "p4c1-v": dict(SD, predictor_order=4, corrector_order=1, prediction_type="v_prediction"),
    "noise-p1c3": dict(SD, algorithm_type="noise_prediction", predictor_order=1, corrector_order=3),
    "tau-half-sample-threshold": dict(SD, tau_func=lambda t: 0.5, prediction_type="sample", thresholding=True,
                                      sample_max_value=1.5),
    "trailing-nolof": dict(SD, timestep_spacing="trailing", lower_order_final=False),
}
SAS_GRID = [(c, n) for c in SAS for n in (1, 5, 20, 50) if c in ("default", "sd-p3c4") or n in (1, 5, 20)]


@pytest.mark.parametrize("config, steps", SAS_GRID)
def test_sa_solver_matches_stock(config, steps):
    cfg = SAS[config]
    _check_parity(lambda: diffusers.SASolverScheduler(**cfg), lambda: fd.SASolverScheduler(**cfg), steps,
                  "diffusers.schedulers.scheduling_sasolver", seed=steps)


def test_sa_solver_variants_equal_the_textbook():
    """fastdiff's sasolver against its textbook oracle (quadrature integrals), float64, every option."""
    from fastdiff import Sampler
    from fastdiff.models.gaussian_mixture import GaussianMixture
    from fastdiff.schedules import DiscreteVP, make_grid
    from fastdiff.textbook.sa_solver import sample_sa_solver
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    for steps in (1, 3, 8):
        grid = make_grid(schedule, steps, "leading", steps_offset=1)
        for opts in ({"predictor_order": 3, "corrector_order": 4}, {"predictor_order": 4, "corrector_order": 1},
                     {"algorithm_type": "noise_prediction", "corrector_order": 3},
                     {"taus": [0.0, 1.0, 0.3, 0.0, 1.0, 1.0, 0.5, 0.0][:steps], "lower_order_final": False}):
            model = GaussianMixture.default(schedule, dim=6, prediction="epsilon")
            noise = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
            zs = [torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + k))
                  for k in range(steps)]
            sampler = Sampler.build(solver="sasolver", grid=grid, prediction="epsilon", solver_options=opts,
                                    state_dtype=torch.float64)
            out = sampler(model, noise, noise_sampler=lambda row, x: zs[row.step], backend="reference", progress=False)
            ref = sample_sa_solver(model, noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0])),
                                   grid, "epsilon", noise=zs, **opts)
            err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            assert err < 1e-9, (steps, opts, err)


# ---------------------------------------------------------------------------------------------
# ScoreSdeVeScheduler: the predictor fused, diffusers' corrector


def _sde_ve_trajectory(scheduler, steps, dtype, x_init, outputs, seed, correct_steps):
    """ScoreSdeVePipeline's loop; the model: the score of N(0, I) data plus 0.1 o."""
    scheduler.set_timesteps(steps)
    scheduler.set_sigmas(steps)
    if dtype == torch.float64:
        _to_float64(scheduler)
    g = torch.Generator().manual_seed(seed)
    x, xs = x_init.to(dtype) * scheduler.config.sigma_max, []
    for k, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[k]
        model = lambda x: -x / (sigma ** 2 + 1) + 0.1 * outputs[k].to(dtype)  # noqa: E731
        for _ in range(correct_steps):
            x = scheduler.step_correct(model(x), x, generator=g).prev_sample
        out = scheduler.step_pred(model(x), t, x, generator=g, return_dict=False)
        x = out[0]
        xs.append(out)
    return xs


@pytest.mark.parametrize("steps, correct_steps", [(1, 0), (5, 0), (20, 1), (50, 0), (10, 2)])
def test_score_sde_ve_matches_stock(steps, correct_steps):
    g = torch.Generator().manual_seed(1000 + steps)
    x_init = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    outputs = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(steps)]
    peer = _sde_ve_trajectory(diffusers.ScoreSdeVeScheduler(), steps, torch.float32, x_init, outputs, steps,
                              correct_steps)
    with _float32_noise("diffusers.schedulers.scheduling_sde_ve"):
        peer64 = _sde_ve_trajectory(diffusers.ScoreSdeVeScheduler(), steps, torch.float64, x_init, outputs, steps,
                                    correct_steps)
    mine = _sde_ve_trajectory(fd.ScoreSdeVeScheduler(), steps, torch.float32, x_init, outputs, steps, correct_steps)
    for k, (a, p, p64) in enumerate(zip(mine, peer, peer64)):
        for j, (aj, pj, pj64) in enumerate(zip(a, p, p64)):
            assert aj.dtype == pj.dtype
            tol = peer_tolerance(pj, pj64) + PEER_MARGIN * float((pj.double() - pj64).abs().max())
            assert_close_to_peer(aj, pj, tol, f"call {k} of {steps}, output {j}")


def test_score_sde_ve_outputs_are_diffusers():
    s = fd.ScoreSdeVeScheduler()
    s.set_timesteps(3)
    s.set_sigmas(3)
    out = s.step_pred(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE), generator=torch.Generator().manual_seed(0))
    assert type(out) is diffusers.schedulers.scheduling_sde_ve.SdeVeOutput
    assert set(out.keys()) == {"prev_sample", "prev_sample_mean"}


# ---------------------------------------------------------------------------------------------
# accelerate(pipe) takes each new drop-in, and the pipeline's images are stock's


ACCELERATED = [("LCMScheduler", {}), ("TCDScheduler", {}), ("IPNDMScheduler", {}),
               ("DDIMInverseScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
               ("DPMSolverMultistepInverseScheduler", {}),
               ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
               ("CosineDPMSolverMultistepScheduler", {}), ("FlowMatchLCMScheduler", {"shift": 3.0}),
               ("CogVideoXDDIMScheduler", {}), ("DDIMParallelScheduler", {}), ("DDPMParallelScheduler", {}),
               ("CMStochasticIterativeScheduler", {}), ("SASolverScheduler", {})]


@pytest.mark.parametrize("name, config", ACCELERATED, ids=[n + "".join(f"-{v}" for v in c.values())
                                                            for n, c in ACCELERATED])
def test_accelerate_takes_the_new_drop_ins(name, config):
    from test_dropin_pipelines import SD_SCHEDULER, _run, _sd, _sd3
    import inspect
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    config = {**{k: v for k, v in SD_SCHEDULER.items() if k in params}, **config}
    pipe, inputs = (_sd3 if name.startswith("FlowMatch") else _sd)(getattr(diffusers, name)(**config))
    torch.manual_seed(0)              # (pipelines that pass no generator to step: torch's global one draws)
    stock = _run(pipe, inputs, steps=4)
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is getattr(fd, name) and fd.DROP_INS[name] is getattr(fd, name)
    torch.manual_seed(0)
    torch.testing.assert_close(_run(pipe, inputs, steps=4), stock, rtol=0, atol=1e-5)
    handle.remove()


def test_accelerate_swaps_in_the_drop_ins_whose_step_pipelines_call_otherwise():
    """CogVideoXDPMScheduler's step takes the loop's history (CogVideoX pipelines): accelerate swaps it in."""
    from test_dropin_pipelines import _sd
    pipe, _ = _sd(diffusers.CogVideoXDPMScheduler())
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    before = public(pipe.scheduler.config)
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is fd.CogVideoXDPMScheduler
    assert public(pipe.scheduler.config) == before
    handle.remove()
    assert type(pipe.scheduler) is diffusers.CogVideoXDPMScheduler


def test_accelerate_takes_score_sde_ve_in_its_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    pipe = diffusers.ScoreSdeVePipeline(unet=unet, scheduler=diffusers.ScoreSdeVeScheduler(sigma_max=5.0))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images  # noqa: E731
    stock = run()
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is fd.ScoreSdeVeScheduler
    np.testing.assert_allclose(run(), stock, rtol=0, atol=1e-5)
    handle.remove()
