"""fastdiff's drop-in diffusers schedulers (fastdiff.integrations.diffusers) against diffusers' own.

Parity: the same random model outputs into both, step by step, from the same initial sample; the
stochastic ones get generators seeded alike (the drop-in draws diffusers' noise in diffusers'
order). Tolerance, float32: at every step max |x_fastdiff - x_diffusers| <= 1e-5 * S, where S
is the sample scale, the largest |x| of diffusers' trajectory so far. Where diffusers' own
float32 arithmetic strays further from its float64 run (third-order UniPC/DEIS at many steps,
flow grids starting next to alpha = 0) the bound is twice that error, and fastdiff must be within
it of diffusers' float64 run as well; in those cases fastdiff is the closer of the two. Also: config round trips, runs beginning mid-schedule, latents edited
between steps, the outputs' types, and bad input.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_DDIM = dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
ZSNR = dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")


_BUILT = {}


def _fresh(lib, name, config):
    """A new scheduler of lib.name(**config); copies of one built instance, since some constructors
    are slow (KDPM2's runs set_timesteps(1000))."""
    key = (lib.__name__, name, repr(sorted(config.items())))
    if key not in _BUILT:
        _BUILT[key] = (getattr(fd, name).from_config(_fresh(diffusers, name, config).config) if lib is fd
                       else getattr(diffusers, name)(**config))
    return copy.deepcopy(_BUILT[key])


def _pair(name, config):
    return _fresh(diffusers, name, config), _fresh(fd, name, config)


def _to_float64(scheduler):
    """diffusers' scheduler computing in float64: its float32 arrays cast (its own formulas unchanged)."""
    for k, v in list(vars(scheduler).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(scheduler, k, v.double())
    return scheduler


def run_parity(name, config, steps, *, stochastic=False, set_kwargs=None, step_kwargs=None, begin=None, edit=None,
               seed=0):
    """(error of fastdiff vs diffusers, bound), relative to the sample scale (module docstring).

    The bound is TOL, or twice diffusers' own float32 rounding where that is larger (the
    flash-attention rule: error at most twice the library's own error in the same precision).
    For deterministic schedulers diffusers also runs in float64 (its float32 arrays cast), which
    measures its own rounding, and fastdiff must lie within the bound of that run too."""
    ref, ours = _pair(name, config)
    # no float64 run for stochastic schedulers: float64 draws (and DPMSolverSDE's Brownian tree on a
    # float64 sample) are other numbers
    exact = not stochastic and name != "DPMSolverSDEScheduler"
    ref64 = _to_float64_after_set(_fresh(diffusers, name, config), steps, set_kwargs, begin) if exact else None
    for s in (ref, ours):
        s.set_timesteps(steps, **(set_kwargs or {})) if steps is not None else s.set_timesteps(**set_kwargs)
        if begin is not None and hasattr(ref, "set_begin_index"):     # DDIM: the first timestep places the run
            s.set_begin_index(begin)
    assert torch.equal(ref.timesteps, ours.timesteps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * float(getattr(ref, "init_noise_sigma", 1.0))
    timesteps = ref.timesteps[begin or 0:]
    outputs = [torch.randn(SHAPE, generator=g) for _ in timesteps]
    x_ref, x_ours, x_64 = x.clone(), x.clone(), x.double()
    gens = [torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)]
    scale, err, err64, own = float(x.abs().max()), 0.0, 0.0, 0.0
    for i, t in enumerate(timesteps):
        kw = [dict(step_kwargs or {}), dict(step_kwargs or {})]
        if stochastic:
            kw[0]["generator"], kw[1]["generator"] = gens
        if hasattr(ref, "scale_model_input"):
            a, b = ref.scale_model_input(x_ref, t), ours.scale_model_input(x_ours, t)
            assert float((a - b).abs().max()) <= 1e-4 * max(scale, 1.0), f"scale_model_input differs at call {i}"
        x_ref = ref.step(outputs[i], t, x_ref, **kw[0]).prev_sample
        x_ours = ours.step(outputs[i], t, x_ours, **kw[1]).prev_sample
        assert x_ours.dtype == x_ref.dtype and x_ours.shape == x_ref.shape
        scale = max(scale, float(x_ref.abs().max()))
        err = max(err, float((x_ref - x_ours).abs().max()) / scale)
        if ref64 is not None:
            x_64 = ref64.step(outputs[i].double(), t, x_64, **kw[0]).prev_sample.double()
            err64 = max(err64, float((x_64 - x_ours.double()).abs().max()) / scale)
            own = max(own, float((x_64 - x_ref.double()).abs().max()) / scale)
        if edit is not None and i + 1 < len(timesteps):       # the same edit of the latents on every side
            x_ref, x_ours, x_64 = edit(x_ref, i), edit(x_ours, i), edit(x_64, i)
    bound = max(TOL, 2.0 * own)
    assert err64 <= bound, f"fastdiff vs diffusers in float64: relative error {err64:.3g} > {bound:.3g}"
    return err, bound


def _to_float64_after_set(scheduler, steps, set_kwargs, begin):
    scheduler.set_timesteps(steps, **(set_kwargs or {})) if steps is not None else scheduler.set_timesteps(**set_kwargs)
    if begin is not None and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return _to_float64(scheduler)


def assert_parity(*args, **kwargs):
    err, bound = run_parity(*args, **kwargs)
    assert err <= bound, f"fastdiff vs diffusers: relative error {err:.3g} > {bound:.3g}"


# name, config, step kwargs, stochastic, step counts
ALL_STEPS = (1, 5, 20, 50)
FEW = (1, 5, 20)
CASES = [
    ("RePaintScheduler", {}, None, True, ()),  # (step takes original_image and mask: tests/test_dropins_repaint_unipc.py)
    ("EulerDiscreteScheduler", SD, None, False, ALL_STEPS),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None, False, FEW),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="sample", use_exponential_sigmas=True), None, False, FEW),
    ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True, final_sigmas_type="sigma_min"), None, False, FEW),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), None, False, FEW),
    ("EulerDiscreteScheduler", dict(ZSNR), None, False, FEW),
    ("EulerDiscreteScheduler", dict(SD, interpolation_type="log_linear"), None, False, FEW),   # its steps end at sigma_min
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction", timestep_type="continuous"), None, False, FEW),
    ("EulerAncestralDiscreteScheduler", SD, None, True, ALL_STEPS),
    ("EulerAncestralDiscreteScheduler", dict(ZSNR), None, True, FEW),
    ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1,
                                             prediction_type="v_prediction"), None, True, FEW),
    ("HeunDiscreteScheduler", SD, None, False, ALL_STEPS),
    ("HeunDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None, False, FEW),
    ("HeunDiscreteScheduler", dict(SD, prediction_type="sample", clip_sample=True, clip_sample_range=0.5), None, False,
     FEW),
    ("LMSDiscreteScheduler", SD, None, False, ALL_STEPS),
    ("LMSDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None, False, FEW),
    ("LMSDiscreteScheduler", dict(SD, prediction_type="sample"), {"order": 2}, False, FEW),
    ("KDPM2DiscreteScheduler", SD, None, False, ALL_STEPS),
    ("KDPM2DiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None, False, FEW),
    ("KDPM2DiscreteScheduler", dict(SD, use_exponential_sigmas=True, timestep_spacing="trailing"), None, False, FEW),
    ("KDPM2AncestralDiscreteScheduler", SD, None, True, ALL_STEPS),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True), None, True, FEW),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=7), None, False, (1, 5, 20)),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=3, prediction_type="v_prediction", use_karras_sigmas=True),
     {"s_noise": 0.8}, False, (5,)),
    ("DDPMScheduler", dict(SD, clip_sample=False), None, True, ALL_STEPS),
    ("DDPMScheduler", {}, None, True, FEW),                                          # clip_sample=True
    ("DDPMScheduler", dict(SD, variance_type="fixed_large", prediction_type="v_prediction", clip_sample=False,
                           timestep_spacing="trailing"), None, True, FEW),
    ("DDPMScheduler", dict(prediction_type="sample", thresholding=True, sample_max_value=1.5,
                           dynamic_thresholding_ratio=0.9), None, True, FEW),
    ("DDPMScheduler", dict(SD, variance_type="fixed_small_log", clip_sample=False, timestep_spacing="linspace"), None,
     True, FEW),
    ("DDIMScheduler", SD_DDIM, None, False, ALL_STEPS),
    ("DDIMScheduler", {}, None, False, FEW),                                          # clip_sample=True, raw eps
    ("DDIMScheduler", {}, {"use_clipped_model_output": True}, False, FEW),
    ("DDIMScheduler", SD_DDIM, {"eta": 0.7}, True, FEW),
    ("DDIMScheduler", dict(ZSNR, clip_sample=False), None, False, FEW),
    ("DDIMScheduler", dict(SD, prediction_type="sample", thresholding=True, timestep_spacing="linspace"), {"eta": 1.0},
     True, FEW),
    ("DPMSolverMultistepScheduler", SD, None, False, ALL_STEPS),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3), None, False, ALL_STEPS),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=1, use_karras_sigmas=True), None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         solver_type="heun"), None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         prediction_type="v_prediction", use_exponential_sigmas=True), None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, use_lu_lambdas=True, lower_order_final=False,
                                         final_sigmas_type="sigma_min"), None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, use_beta_sigmas=True, euler_at_final=True, solver_type="heun"), None,
     False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, prediction_type="sample", thresholding=True, sample_max_value=1.2), None,
     False, FEW),
    ("DPMSolverMultistepScheduler", dict(ZSNR, final_sigmas_type="zero"), None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), None, True, ALL_STEPS),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True,
                                         final_sigmas_type="sigma_min"), None, True, FEW),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), None,
     False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, timestep_spacing="leading", steps_offset=1, lambda_min_clipped=-5.1),
     None, False, FEW),
    ("DPMSolverSinglestepScheduler", SD, None, False, ALL_STEPS),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3), None, False, (1, 5, 6, 20)),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3, solver_type="heun", use_karras_sigmas=True,
                                          final_sigmas_type="sigma_min", lower_order_final=False), None, False, (6, 21)),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min",
                                          prediction_type="v_prediction"), None, False, (5, 20)),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3), None, True, (5, 12)),
    ("DPMSolverSinglestepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
     None, False, (6,)),
    ("UniPCMultistepScheduler", SD, None, False, ALL_STEPS),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3), None, False, ALL_STEPS),
    ("UniPCMultistepScheduler", dict(SD, solver_order=1, prediction_type="v_prediction"), None, False, FEW),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min",
                                     use_karras_sigmas=True), None, False, FEW),
    ("UniPCMultistepScheduler", dict(SD, predict_x0=False, final_sigmas_type="sigma_min"), None, False, FEW),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, disable_corrector=[0, 2, 3], lower_order_final=False,
                                     final_sigmas_type="sigma_min"), None, False, FEW),
    ("UniPCMultistepScheduler", dict(SD, prediction_type="sample", thresholding=True), None, False, FEW),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=2.0, prediction_type="flow_prediction"), None,
     False, FEW),
    ("DEISMultistepScheduler", SD, None, False, ALL_STEPS),
    ("DEISMultistepScheduler", dict(SD, solver_order=3, prediction_type="v_prediction"), None, False, FEW),
    ("DEISMultistepScheduler", dict(SD, solver_order=1, use_karras_sigmas=True, prediction_type="sample"), None, False,
     FEW),
    ("DEISMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), None,
     False, FEW),
    ("EDMEulerScheduler", {}, None, False, ALL_STEPS),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", prediction_type="v_prediction",
                               final_sigmas_type="sigma_min"), None, False, FEW),
    ("EDMDPMSolverMultistepScheduler", {}, None, False, ALL_STEPS),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction", sigma_schedule="exponential",
                                            final_sigmas_type="sigma_min"), None, False, FEW),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), None, True, FEW),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), None, False, ALL_STEPS),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True, shift=1.0), None, False, FEW),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, shift_terminal=0.1, stochastic_sampling=True), None, True,
     (5, 20)),                                        # 1 step: diffusers' shift_terminal gives NaN
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), None, False, ALL_STEPS),
    ("FlowMatchHeunDiscreteScheduler", {}, None, False, FEW),
    # PNDM (pndm.py): Stable Diffusion 1.x's config (PLMS, skip_prk_steps) and the Runge-Kutta warm-up
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1), None, False, (5, 20, 50)),
    ("PNDMScheduler", SD, None, False, (5, 20, 50)),
    # issue 14 (tests/test_dropins_more.py has their full grids): consistency models
    ("LCMScheduler", {}, None, True, ALL_STEPS),
    ("LCMScheduler", dict(prediction_type="v_prediction", thresholding=True), None, True, FEW),
    ("TCDScheduler", {}, None, True, ALL_STEPS),
    ("TCDScheduler", dict(prediction_type="sample"), {"eta": 0.0}, False, FEW),
    ("IPNDMScheduler", {}, None, False, ALL_STEPS),
    ("DDIMInverseScheduler", SD_DDIM, None, False, ALL_STEPS),
    ("DDIMInverseScheduler", {}, None, False, FEW),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), None,
     True, ALL_STEPS),
    ("CosineDPMSolverMultistepScheduler", {}, None, True, ALL_STEPS),
    ("FlowMatchLCMScheduler", dict(shift=3.0), None, True, ALL_STEPS),
    ("CogVideoXDDIMScheduler", {}, None, False, ALL_STEPS),
    ("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                    rescale_betas_zero_snr=True), None, False, FEW),
    ("CogVideoXDPMScheduler", {}, None, True, ()),     # (its step takes the loop's history: test_dropins_more.py)
    ("DDIMParallelScheduler", SD_DDIM, None, False, ALL_STEPS),
    ("DDPMParallelScheduler", {}, None, True, FEW),
    ("CMStochasticIterativeScheduler", {}, None, True, (1, 5, 20, 40)),
    ("SASolverScheduler", {}, None, True, ALL_STEPS),
    ("ScoreSdeVeScheduler", {}, None, True, ()),      # (step_pred / step_correct, no step: test_dropins_more.py)
    ("DPMSolverMultistepInverseScheduler", SD, None, False, ALL_STEPS),
    ("DPMSolverMultistepInverseScheduler", dict(SD, solver_order=3, prediction_type="v_prediction"), None, False, FEW),
]


def _case_id(name, config, step_kwargs):
    opts = {k: v for k, v in {**config, **(step_kwargs or {})}.items() if k not in SD or config[k] != SD[k]}
    return name.replace("Scheduler", "") + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("name, config, step_kwargs, stochastic, steps", [
    pytest.param(n, c, k, s, steps, id=f"{_case_id(n, c, k)}-{steps}") for n, c, k, s, counts in CASES
    for steps in counts])
def test_parity_step_by_step(name, config, step_kwargs, stochastic, steps):
    assert_parity(name, config, steps, stochastic=stochastic, step_kwargs=step_kwargs)


def test_every_drop_in_is_covered():
    assert {n for n, *_ in CASES} == set(fd.DROP_INS)


@pytest.mark.parametrize("set_kwargs", [{"mu": 0.8}, {"mu": 1.3}])
def test_parity_flow_dynamic_shifting(set_kwargs):
    assert_parity("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, 12, set_kwargs=set_kwargs)
    config = {"use_flow_sigmas": True, "use_dynamic_shifting": True, "prediction_type": "flow_prediction"}
    assert_parity("DPMSolverMultistepScheduler", config, 12, set_kwargs=set_kwargs)


@pytest.mark.parametrize("name, set_kwargs", [
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 850, 600, 400, 250, 120, 40, 5]}),
    ("DDPMScheduler", {"timesteps": [900, 700, 420, 260, 100, 0]}),
    ("EulerDiscreteScheduler", {"sigmas": [14.0, 6.0, 2.5, 1.0, 0.3, 0.0]}),
    ("FlowMatchEulerDiscreteScheduler", {"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]}),
    ("UniPCMultistepScheduler", {"sigmas": np.array([1.0, 0.8, 0.55, 0.3, 0.1])}),   # diffusers needs an array
])
def test_parity_custom_timesteps_and_sigmas(name, set_kwargs):
    config = {"DDPMScheduler": dict(SD, clip_sample=False), "FlowMatchEulerDiscreteScheduler": {},
              "UniPCMultistepScheduler": dict(use_flow_sigmas=True, prediction_type="flow_prediction")}.get(name, SD)
    assert_parity(name, config, None, set_kwargs=set_kwargs, stochastic=name == "DDPMScheduler")


# ---------------------------------------------------------------------------------------------
# Runs that begin mid-schedule (img2img), and latents edited between steps (inpainting)


@pytest.mark.parametrize("name, config, begin", [
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3), 4),    # warm-up restarts at the first call
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, disable_corrector=[5]), 3),
    ("LMSDiscreteScheduler", SD, 5),                                  # diffusers' order rule counts from step 0
    ("HeunDiscreteScheduler", SD, 6),                                 # an even call: a first stage
    ("DEISMultistepScheduler", dict(SD, solver_order=3), 2),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3), 4),      # begins inside a group: orders lowered
    ("DDIMScheduler", SD_DDIM, 3),
    ("EDMDPMSolverMultistepScheduler", {}, 5),
])
def test_parity_run_begins_mid_schedule(name, config, begin):
    assert_parity(name, config, 12, begin=begin)


def test_first_timestep_finds_the_start_like_diffusers():
    """Without set_begin_index the first step's timestep places the run (diffusers' _init_step_index)."""
    ref, ours = _pair("DPMSolverMultistepScheduler", SD)
    for s in (ref, ours):
        s.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xr = xo = x
    for t in ref.timesteps[4:]:
        out = torch.randn(SHAPE)
        xr, xo = ref.step(out, t, xr).prev_sample, ours.step(out, t, xo).prev_sample
    assert ours.step_index == ref.step_index == 10
    assert float((xr - xo).abs().max()) <= TOL * max(1.0, float(xr.abs().max()))


def _blend(x, i):
    """An inpainting-style edit: half of each sample replaced by fixed values."""
    x = x.clone()
    x[:, :, :4] = 0.25 * (i + 1)
    return x


@pytest.mark.parametrize("name, config", [
    ("DPMSolverMultistepScheduler", SD), ("HeunDiscreteScheduler", SD), ("UniPCMultistepScheduler", SD),
    ("KDPM2DiscreteScheduler", SD), ("EulerDiscreteScheduler", SD), ("DDIMScheduler", SD_DDIM)])
def test_parity_latents_edited_between_steps(name, config):
    assert_parity(name, config, 8, edit=_blend)


# ---------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.parametrize("name, config", [
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction")), ("DDIMScheduler", {}),
    ("DDPMScheduler", dict(SD, thresholding=True)), ("HeunDiscreteScheduler", SD), ("KDPM2DiscreteScheduler", SD),
    ("EDMEulerScheduler", {}), ("LMSDiscreteScheduler", SD), ("DPMSolverMultistepScheduler", SD),
    ("FlowMatchEulerDiscreteScheduler", {}), ("UniPCMultistepScheduler", SD)])
def test_outputs_match_diffusers_shape_and_pred_original_sample(name, config):
    ref, ours = _pair(name, config)
    for s in (ref, ours):
        s.set_timesteps(6)
    x = torch.randn(SHAPE) * float(getattr(ref, "init_noise_sigma", 1.0))
    xr = xo = x
    g = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    for t in ref.timesteps:
        out = torch.randn(SHAPE)
        kw = [{"generator": g[0]}, {"generator": g[1]}] if name == "DDPMScheduler" else [{}, {}]
        r = ref.step(out, t, xr, return_dict=False, **kw[0])
        o = ours.step(out, t, xo, return_dict=False, **kw[1])
        assert len(o) == len(r)
        if len(r) == 2:
            scale = max(1.0, float(r[1].abs().max()))
            assert float((r[1] - o[1]).abs().max()) <= TOL * scale
            assert float((r[1] - ours_out_x0(o)).abs().max()) <= TOL * scale
        xr, xo = r[0], o[0]


def ours_out_x0(o):
    return o.pred_original_sample if hasattr(o, "pred_original_sample") else o[1]


@pytest.mark.parametrize("name, config", [("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
                                          ("HeunDiscreteScheduler", SD), ("EulerAncestralDiscreteScheduler", SD)])
def test_reference_backend_gives_the_same_steps(name, config):
    """The plain-PyTorch fused step (the oracle of fastdiff._C) runs the same programs."""
    cpu, ref = _fresh(fd, name, config), _fresh(fd, name, config)
    ref.fastdiff_backend = "reference"
    for s in (cpu, ref):
        s.set_timesteps(7)
    xa = xb = torch.randn(SHAPE) * float(cpu.init_noise_sigma)
    for t in cpu.timesteps:
        out = torch.randn(SHAPE)
        xa = cpu.step(out, t, xa, **({"generator": torch.Generator().manual_seed(1)} if "Ancestral" in name else {}))[0]
        xb = ref.step(out, t, xb, **({"generator": torch.Generator().manual_seed(1)} if "Ancestral" in name else {}))[0]
    assert float((xa - xb).abs().max()) <= TOL * max(1.0, float(xa.abs().max()))


def test_prev_sample_is_a_new_tensor_each_step():
    s = fd.DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    first = s.step(torch.randn(SHAPE), s.timesteps[0], x).prev_sample
    kept = first.clone()
    s.step(torch.randn(SHAPE), s.timesteps[1], first)
    assert torch.equal(first, kept), "a returned sample must not be overwritten by the next step"


def test_pred_original_sample_is_unaffected_by_inputs_modified_in_place():
    """pred_original_sample is computed in the step (as diffusers computes it), so modifying the
    inputs afterwards changes nothing (it used to be computed lazily, and refused then)."""
    ref, ours = _pair("EulerDiscreteScheduler", SD)
    for s in (ref, ours):
        s.set_timesteps(4)
    x, out = torch.randn(SHAPE) * float(ref.init_noise_sigma), torch.randn(SHAPE)
    expected = ref.step(out, ref.timesteps[0], x).pred_original_sample
    res = ours.step(out, ours.timesteps[0], x)
    out.mul_(2.0)
    x.mul_(3.0)
    assert float((res.pred_original_sample - expected).abs().max()) <= TOL * max(1.0, float(expected.abs().max()))


def test_fp16_model_output_dtype_and_values():
    ref, ours = _pair("EulerDiscreteScheduler", SD)
    for s in (ref, ours):
        s.set_timesteps(5)
    x = (torch.randn(SHAPE) * float(ref.init_noise_sigma)).half()
    xr = xo = x
    for t in ref.timesteps:
        out = torch.randn(SHAPE).half()
        xr, xo = ref.step(out, t, xr).prev_sample, ours.step(out, t, xo).prev_sample
        assert xo.dtype == xr.dtype == torch.float16
    # fastdiff keeps the state in float32 between steps; diffusers rounds it to fp16 each step
    assert float((xr.float() - xo.float()).abs().max()) <= 2e-3 * max(1.0, float(xr.abs().max()))


def test_guided_output_is_combined_in_the_step():
    """A lazy CFG combination (what accelerate(pipe) hands the step) gives the eager result."""
    from fastdiff.integrations.diffusers.cfg import tag_model_output
    a, b = fd.DPMSolverMultistepScheduler(**SD), fd.DPMSolverMultistepScheduler(**SD)
    for s in (a, b):
        s.set_timesteps(6)
    xa = xb = torch.randn(SHAPE)
    for i, t in enumerate(a.timesteps):
        both = torch.randn((2 * SHAPE[0],) + SHAPE[1:])
        g = 3.0 + i                                   # a new scale each step rewrites the table's g column
        u, c = both.chunk(2)
        xa = a.step(u + g * (c - u), t, xa).prev_sample
        tu, tc = tag_model_output(both).chunk(2)
        lazy = tu + g * (tc - tu)
        assert type(lazy).__name__ == "GuidedOutput"
        xb = b.step(lazy, t, xb).prev_sample
        assert float((xa - xb).abs().max()) <= TOL * max(1.0, float(xa.abs().max()))


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("name", sorted(fd.DROP_INS))
def test_config_round_trip(name, tmp_path):
    ref = getattr(diffusers, name)()
    ours = getattr(fd, name).from_config(ref.config)
    assert type(ours) is getattr(fd, name) and isinstance(ours, getattr(diffusers, name))
    assert type(ours).__name__ == name
    ours.save_config(tmp_path)
    back = getattr(fd, name).from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(back) is type(ours) and public(back.config) == public(ours.config) == public(ref.config)
    assert public(getattr(diffusers, name).from_pretrained(tmp_path).config) == public(ref.config)  # diffusers reads ours
    import inspect
    for method in ("__init__", "set_timesteps", "step", "step_pred", "step_correct", "batch_step_no_noise"):
        if not hasattr(getattr(diffusers, name), method):      # (ScoreSdeVe has no step; most have no step_pred)
            continue
        assert (list(inspect.signature(getattr(type(ours), method)).parameters)
                == list(inspect.signature(getattr(getattr(diffusers, name), method)).parameters)), method


def test_step_options_change_the_program_mid_run():
    """DDIM's eta is a step() argument: a different eta gets its own coefficients."""
    assert_parity("DDIMScheduler", SD_DDIM, 6, stochastic=True, step_kwargs={"eta": 0.3})
    ref, ours = _pair("DDIMScheduler", SD_DDIM)
    for s in (ref, ours):
        s.set_timesteps(4)
    x = torch.randn(SHAPE)
    xr = xo = x
    for i, t in enumerate(ref.timesteps):
        out, eta = torch.randn(SHAPE), [0.0, 1.0][i % 2]
        gr, go = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        xr = ref.step(out, t, xr, eta=eta, generator=gr).prev_sample
        xo = ours.step(out, t, xo, eta=eta, generator=go).prev_sample
    assert float((xr - xo).abs().max()) <= TOL * max(1.0, float(xr.abs().max()))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name, config, option", [
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                                         solver_order=3), "solver_order"),
    ("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), "variance_type"),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), "variance_type"),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), "prediction_type"),
    ("KDPM2DiscreteScheduler", dict(prediction_type="sample"), "prediction_type"),
    ("FlowMatchEulerDiscreteScheduler", dict(invert_sigmas=True), "invert_sigmas"),
    ("UniPCMultistepScheduler", dict(predict_x0=False, prediction_type="flow_prediction"), "prediction_type"),
    ("DPMSolverSinglestepScheduler", dict(variance_type="learned_range"), "variance_type"),
])
def test_unsupported_config_names_the_option(name, config, option):
    with pytest.raises(NotImplementedError, match=option):
        getattr(fd, name)(**config)
    with pytest.raises(NotImplementedError, match=option):
        getattr(fd, name).from_config(getattr(diffusers, name)(**config).config)


@pytest.mark.parametrize("name, kwargs, option", [
    ("EulerDiscreteScheduler", {"s_churn": 1.0}, "s_churn"),
    ("FlowMatchHeunDiscreteScheduler", {"s_churn": 2.0}, "s_churn"),
    ("FlowMatchEulerDiscreteScheduler", {"per_token_timesteps": torch.ones(2)}, "per_token_timesteps"),
])
def test_unsupported_step_argument_names_it(name, kwargs, option):
    s = getattr(fd, name)()
    s.set_timesteps(4)
    with pytest.raises(NotImplementedError, match=option):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE), **kwargs)


@pytest.fixture
def started():
    s = fd.DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(3)
    x = s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE)).prev_sample
    return s, x


def test_stepping_past_the_end(started):
    s, x = started
    for t in s.timesteps[1:]:
        x = s.step(torch.randn(SHAPE), t, x).prev_sample
    with pytest.raises(IndexError, match="after the last of the run's 3 timesteps"):
        s.step(torch.randn(SHAPE), s.timesteps[-1], x)


def test_wrong_timestep(started):
    s, x = started
    with pytest.raises(ValueError, match=r"got timestep 999.*timesteps\[1\]"):
        s.step(torch.randn(SHAPE), 999, x)
    assert s.step_index == 1                          # nothing changed: the right call still works
    s.step(torch.randn(SHAPE), s.timesteps[1], x)


def test_first_timestep_not_in_the_run():
    s = fd.EulerDiscreteScheduler(**SD)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        s.step(torch.randn(SHAPE), 123.5, torch.randn(SHAPE))
    d = fd.DDIMScheduler(**SD_DDIM)
    d.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this run's timesteps"):
        d.step(torch.randn(SHAPE), 3, torch.randn(SHAPE))


def test_mismatched_shapes(started):
    s, x = started
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(torch.randn(1, 4, 8, 8), s.timesteps[1], x)
    with pytest.raises(ValueError, match="sample has shape"):
        s.step(torch.randn(SHAPE), s.timesteps[1], x[:1])
    before = x.clone()
    s.step(torch.randn(SHAPE), s.timesteps[1], x)
    assert torch.equal(x, before), "step must not modify its inputs"


def test_step_before_set_timesteps_and_integer_timesteps():
    s = fd.DPMSolverMultistepScheduler(**SD)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 999, torch.randn(SHAPE))
    e = fd.EulerDiscreteScheduler(**SD)
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="integer indices"):
        e.step(torch.randn(SHAPE), 0, torch.randn(SHAPE))
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        e.step(np.zeros(SHAPE), e.timesteps[0], torch.randn(SHAPE))


def test_repeated_noise_level_is_refused():
    """A zero-length step inside the schedule (diffusers would take it; fastdiff needs a decreasing grid)."""
    s = fd.EulerDiscreteScheduler(**SD)
    s.set_timesteps(sigmas=[10.0, 5.0, 5.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="repeats .* a noise level"):
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))


def test_two_stage_run_cannot_begin_at_a_second_stage():
    s = fd.HeunDiscreteScheduler(**SD)
    s.set_timesteps(5)
    s.set_begin_index(3)
    with pytest.raises(ValueError, match="second stage"):
        s.step(torch.randn(SHAPE), s.timesteps[3], torch.randn(SHAPE))
