"""Guidance transforms and the reduction ops behind them.

* The reductions (fastdiff.ops.reductions) against the library code they reproduce: diffusers'
  ``rescale_noise_cfg`` and ``_threshold_sample``, ``torch.quantile``, k-diffusion's error norm.
* Whole sampling runs against diffusers scheduler loops: DPM-Solver++(2M) with dynamic
  thresholding and CFG rescale (the pipeline applies rescale_noise_cfg to the noise prediction),
  DDPM with static clipping (same noise on both sides).
  Tolerance 1e-5: diffusers keeps alphas_cumprod in float32 (measured: ~1e-6, the same as the
  plain solver's parity without any transform).
* Classifier guidance with the mixture's exact component posterior p(k | x_t) as the classifier
  turns the mixture's score into the score of component k: sampling must equal sampling the
  single-component mixture (float64, 1e-12; measured 1e-15).
* The unconditional pass is skipped where g = 1; bad input raises ValueError/TypeError.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import DiscreteVP, Grid, Guidance, VESchedule
from fastdiff.guidance import ClassifierGuidance, ClipSample, DynamicThresholding, GuidanceHook
from fastdiff.models import GaussianMixture
from fastdiff.ops import reductions as R
from fastdiff.reference import reductions as reference_reductions

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

PARITY_TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # float64 state runs on the reference backend, with a one-time warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the reference backend.*")
        yield


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Reductions vs the code they reproduce


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 5, 7), (2, 1000003 // 1000, 3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_cfg_rescale_matches_diffusers(shape, dtype, tol):
    c, u = _randn(*shape, seed=1, dtype=dtype), _randn(*shape, seed=2, dtype=dtype)
    c0, u0 = c.clone(), u.clone()
    for w, phi in [(7.5, 0.7), (3.0, 1.0), (5.0, 0.0)]:
        ours = R.cfg_rescale(c, u, w, phi)
        theirs = rescale_noise_cfg((u + w * (c - u)).double(), c.double(), phi)
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(ours.double(), theirs, atol=tol * theirs.abs().max().item(), rtol=0)
    assert torch.equal(c, c0) and torch.equal(u, u0)  # inputs untouched


def test_cfg_rescale_conventions_and_noncontiguous():
    c = _randn(2, 6, 5, seed=3).transpose(1, 2)       # non-contiguous views
    u = _randn(2, 6, 5, seed=4).transpose(1, 2)
    a = R.cfg_rescale(c, u, 3.0, 0.5, convention="1+w")
    b = R.cfg_rescale(c.contiguous(), u.contiguous(), 4.0, 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # A constant guided prediction (std 0) is left as is instead of dividing by zero.
    k = torch.ones(2, 3, 4, dtype=torch.float64)
    assert torch.equal(R.cfg_rescale(k, k, 5.0, 0.7), k)


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 2.0), (0.5, 1.5), (1.0, 3.0), (0.7, 0.5)])
def test_dynamic_threshold_matches_diffusers(ratio, max_value):
    sched = DPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    x = _randn(3, 4, 5, 7, seed=5) * 2.0
    x0 = x.clone()
    torch.testing.assert_close(R.dynamic_threshold(x, ratio, max_value), sched._threshold_sample(x), rtol=0, atol=1e-14)
    assert torch.equal(x, x0)
    # fp16 input: quantile and clamp in float32 (diffusers upcasts likewise), result float32.
    h = x.half()
    ours = R.dynamic_threshold(h, ratio, max_value)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, sched._threshold_sample(h).float(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.995, 1.0])
def test_per_sample_quantile_matches_torch_quantile(n, q):
    x = _randn(4, n, seed=n)
    ours = reference_reductions.per_sample_abs_quantile(x, q)
    torch.testing.assert_close(ours, torch.quantile(x.abs(), q, dim=1), rtol=0, atol=1e-15)


def test_error_norm_and_per_sample_norm():
    a, b, ref = _randn(3, 5, seed=6), _randn(3, 5, seed=7), _randn(3, 5, seed=8)
    rtol, atol = 0.05, 0.0078
    # k-diffusion's DPMSolver.dpm_solver_adaptive, written out
    delta = torch.maximum(torch.tensor(atol, dtype=torch.float64), rtol * torch.maximum(a.abs(), ref.abs()))
    expected = torch.linalg.norm((a - b) / delta) / a.numel() ** 0.5
    torch.testing.assert_close(R.error_norm(a, b, ref, rtol, atol), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(R.per_sample_norm(a.reshape(3, 5, 1)), a.norm(dim=1), rtol=1e-14, atol=0)


def test_reductions_bad_input():
    x = _randn(2, 3, 4)
    with pytest.raises(ValueError, match="guidance_rescale"):
        R.cfg_rescale(x, x, 7.5, 1.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        R.cfg_rescale(x, x, 7.5, -0.1)
    with pytest.raises(ValueError, match="shape"):
        R.cfg_rescale(x, x[:, :2], 7.5, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        R.cfg_rescale(x, x.float(), 7.5, 0.5)
    with pytest.raises(ValueError, match="convention"):
        R.cfg_rescale(x, x, 7.5, 0.5, convention="v")
    for ratio in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            R.dynamic_threshold(x, ratio, 1.0)
    for mv in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_value"):
            R.dynamic_threshold(x, 0.9, mv)
    with pytest.raises(TypeError, match="torch.Tensor"):
        R.dynamic_threshold(x.numpy(), 0.9, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        R.per_sample_norm(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="rtol"):
        R.error_norm(x, x, x, 0.0, 0.1)
    with pytest.raises(ValueError, match="atol"):
        R.error_norm(x, x, x, 0.1, -1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        R.per_sample_norm(x, backend="nonexistent")


# ---------------------------------------------------------------------------------------------
# Sampling runs vs diffusers scheduler loops

SHAPE = (4, 4, 2, 2)      # diffusers' thresholding needs [B, C, ...]; the mixture sees 16 dims


class CondMixture:
    """A conditional epsilon model: the mixture's exact eps, shifted non-linearly by the
    condition c (a [B] tensor: 0 = unconditional, 1 = conditional)."""

    def __init__(self, schedule):
        self.gm = GaussianMixture.default(schedule, dim=int(np.prod(SHAPE[1:])))
        self.batches = []

    def __call__(self, x, t, c):
        self.batches.append(x.shape[0])
        return self.gm(x, t) + 0.4 * c.reshape(-1, 1, 1, 1).to(x.dtype) * torch.tanh(x + 0.5)


def _diffusers_cfg_loop(scheduler, model, noise, w, phi, generator=None):
    B = noise.shape[0]
    zeros, ones = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((B,), float(t), dtype=torch.float64)
        eps_u, eps_c = model(x, tt, zeros), model(x, tt, ones)
        eps = eps_u + w * (eps_c - eps_u)
        if phi > 0:
            eps = rescale_noise_cfg(eps, eps_c, phi)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample if generator is not None \
            else scheduler.step(eps, t, x).prev_sample
    return x


def _fastdiff_cfg(model, noise, grid, solver, guidance, **kw):
    B = noise.shape[0]
    return fastdiff.sample(model, noise, grid=grid, solver=solver, guidance=guidance,
                           cond={"c": torch.ones(B, dtype=torch.float64)},
                           uncond={"c": torch.zeros(B, dtype=torch.float64)},
                           state_dtype=torch.float64, progress=False, **kw)


@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_dpmpp_2m_rescale_and_thresholding_match_diffusers(thresholding, phi):
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    w, ratio, max_value = 5.0, 0.9, 1.5
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        thresholding=thresholding, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    sched.set_timesteps(8)
    noise = _randn(*SHAPE, seed=11)
    expected = _diffusers_cfg_loop(sched, model, noise, w, phi)
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    guidance = Guidance(w, rescale=phi, x0_clip=DynamicThresholding(ratio, max_value) if thresholding else None)
    ours = _fastdiff_cfg(model, noise, grid, "dpmpp_2m", guidance, solver_options={"lower_order_final": True})
    torch.testing.assert_close(ours, expected, rtol=0, atol=PARITY_TOL)
    # The transforms matter here: without them the result is far away.
    if thresholding or phi:
        plain = _fastdiff_cfg(model, noise, grid, "dpmpp_2m", Guidance(w), solver_options={"lower_order_final": True})
        assert (plain - expected).abs().max() > 100 * PARITY_TOL


def test_ddpm_static_clipping_matches_diffusers():
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    clip = 1.2
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True,
                          clip_sample_range=clip)
    sched.set_timesteps(10)
    noise = _randn(*SHAPE, seed=12)
    expected = _diffusers_cfg_loop(sched, model, noise, 3.0, 0.0, generator=torch.Generator().manual_seed(5))
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    gen = torch.Generator().manual_seed(5)      # diffusers draws its step noise in this order
    noise_sampler = lambda row, x: torch.randn(x.shape, generator=gen, dtype=torch.float64)  # noqa: E731
    ours = _fastdiff_cfg(model, noise, grid, "ddpm", Guidance(3.0, x0_clip=ClipSample(clip)),
                         noise_sampler=noise_sampler)
    torch.testing.assert_close(ours, expected, rtol=0, atol=PARITY_TOL)


def test_thresholding_bounds_the_predicted_x0():
    """Every x0 the solver sees after dynamic thresholding lies in [-1, 1] (s >= 1 divides)."""
    schedule = DiscreteVP()
    gm = GaussianMixture.default(schedule, dim=16)
    seen = []
    hook_call = GuidanceHook.__call__

    def spy(self, *a):
        table, x0, u = hook_call(self, *a)
        seen.append(x0.abs().max().item())
        return table, x0, u
    GuidanceHook.__call__ = spy
    try:
        fastdiff.sample(gm, _randn(*SHAPE, seed=13) * 3, steps=6, solver="dpmpp_2m", schedule=schedule,
                        guidance=Guidance(x0_clip=DynamicThresholding(0.95, 4.0)), progress=False)
    finally:
        GuidanceHook.__call__ = hook_call
    assert len(seen) == 6 and max(seen) <= 1.0 + 1e-6


# ---------------------------------------------------------------------------------------------
# Classifier guidance


def _component_classifier(gm: GaussianMixture, schedule):
    """The exact posterior p(k | x_t) of the mixture's components, as logits."""
    def classifier(x, t):
        a, s = (float(v) for v in schedule.alpha_sigma(schedule.t_from_model_time(float(t[0]))))
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        var = a ** 2 * gm.stds ** 2 + s ** 2                                   # [K, d]
        diff = xf[:, None, :] - a * gm.means[None]
        return (-0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
                + torch.log(gm.weights)[None])
    return classifier


@pytest.mark.parametrize("solver,schedule,prediction", [
    ("heun", VESchedule(0.002, 80.0), "sample"),
    ("dpmpp_2m", DiscreteVP(), "epsilon"),
    ("ddim", DiscreteVP(), "v_prediction"),
])
def test_classifier_guidance_samples_the_class_conditional(solver, schedule, prediction):
    """grad log p(x_t | k) = grad log p(x_t) + grad log p(k | x_t): guidance with scale 1 and
    the exact component classifier turns the mixture's model into component k's model."""
    gm = GaussianMixture.default(schedule, dim=2, prediction=prediction)
    k = 1
    only_k = GaussianMixture(schedule, gm.means[k:k + 1], gm.stds[k:k + 1], prediction=prediction)
    noise = _randn(6, 2, seed=14)
    labels = torch.full((6,), k)
    guided = fastdiff.sample(gm, noise, steps=12, solver=solver, schedule=schedule, prediction=prediction,
                             guidance=Guidance(classifier=ClassifierGuidance(_component_classifier(gm, schedule),
                                                                            labels, scale=1.0)),
                             state_dtype=torch.float64, progress=False)
    expected = fastdiff.sample(only_k, noise, steps=12, solver=solver, schedule=schedule, prediction=prediction,
                               state_dtype=torch.float64, progress=False)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-12)
    unguided = fastdiff.sample(gm, noise, steps=12, solver=solver, schedule=schedule, prediction=prediction,
                               state_dtype=torch.float64, progress=False)
    assert (unguided - expected).abs().max() > 0.1


def test_classifier_guidance_scale_enters_as_dhariwal_nichol():
    """One DDIM step by hand: eps' = eps - s * sigma * grad log p(y | x_t)."""
    schedule = DiscreteVP()
    gm = GaussianMixture.default(schedule, dim=2)
    clf = _component_classifier(gm, schedule)
    x = _randn(5, 2, seed=15)
    labels = torch.tensor([0, 1, 2, 0, 1])
    s = 2.5
    grid = Grid.from_times(schedule, np.array([500.0]), final="zero")
    ours = fastdiff.sample(gm, x, grid=grid, solver="ddim", state_dtype=torch.float64, progress=False,
                           guidance=Guidance(classifier=ClassifierGuidance(clf, labels, s)))
    a, sg = float(grid.alpha[0]), float(grid.sigma[0])
    t = torch.full((5,), float(grid.model_t[0]), dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(clf(xr, t), -1)[torch.arange(5), labels].sum()
    (grad,) = torch.autograd.grad(logp, xr)
    eps = gm(x, t) - s * sg * grad
    expected = (x - sg * eps) / a            # DDIM to sigma = 0: x0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Skipping the unconditional pass; the fast path


@pytest.mark.parametrize("guidance", [Guidance(1.0), Guidance(0.0, convention="1+w"),
                                      Guidance(1.0, rescale=0.7), Guidance(7.5, interval=(100.0, 200.0))])
def test_unconditional_pass_skipped_where_g_is_one(guidance):
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    noise = _randn(*SHAPE, seed=16)
    B = noise.shape[0]
    # No uncond needed: every evaluation has g = 1.
    out = fastdiff.sample(model, noise, steps=5, schedule=schedule, guidance=guidance,
                          cond={"c": torch.ones(B, dtype=torch.float64)}, progress=False, state_dtype=torch.float64)
    assert model.batches == [B] * 5
    plain = CondMixture(schedule)
    ref = fastdiff.sample(plain, noise, steps=5, schedule=schedule, cond={"c": torch.ones(B, dtype=torch.float64)},
                          progress=False, state_dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_guidance_interval_with_rescale_batches_only_inside():
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    noise = _randn(*SHAPE, seed=17)
    B = noise.shape[0]
    grid = fastdiff.make_grid(schedule, 6)
    lo, hi = float(grid.ksigma[4]), float(grid.ksigma[1])      # points 1..4 inside
    _fastdiff_cfg(model, noise, grid, "dpmpp_2m", Guidance(5.0, interval=(lo, hi), rescale=0.5))
    assert model.batches == [B, 2 * B, 2 * B, 2 * B, 2 * B, B]


def test_fast_path_without_transforms():
    assert not Guidance(7.5).needs_hook and not Guidance(7.5, interval=(0.1, 1.0)).needs_hook
    assert Guidance(7.5, rescale=0.1).needs_hook
    assert Guidance(x0_clip=ClipSample()).needs_hook and Guidance(x0_clip=DynamicThresholding()).needs_hook


# ---------------------------------------------------------------------------------------------
# Bad input


def test_guidance_bad_input():
    with pytest.raises(ValueError, match="rescale"):
        Guidance(7.5, rescale=1.5)
    with pytest.raises(ValueError, match="rescale"):
        Guidance(7.5, rescale=-0.5)
    with pytest.raises(ValueError, match="finite"):
        Guidance(float("nan"))
    for ratio in (0.0, 1.01, -1.0):
        with pytest.raises(ValueError, match="ratio"):
            DynamicThresholding(ratio=ratio)
    for mv in (0.0, -2.0):
        with pytest.raises(ValueError, match="max_value"):
            DynamicThresholding(max_value=mv)
    with pytest.raises(ValueError, match="range"):
        ClipSample(0.0)
    with pytest.raises(TypeError, match="x0_clip"):
        Guidance(x0_clip=0.995)
    with pytest.raises(ValueError, match="callable classifier"):
        ClassifierGuidance(None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        ClassifierGuidance(lambda x, t: x, None)
    with pytest.raises(ValueError, match="labels"):
        ClassifierGuidance(lambda x, t: x, torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="ClassifierGuidance"):
        Guidance(classifier=lambda x, t: x)


def test_classifier_guidance_bad_labels_at_sampling():
    schedule = DiscreteVP()
    gm = GaussianMixture.default(schedule, dim=2)
    noise = _randn(4, 2, seed=18)
    bad = Guidance(classifier=ClassifierGuidance(_component_classifier(gm, schedule), torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="3 entries for a batch of 4"):
        fastdiff.sample(gm, noise, steps=3, schedule=schedule, guidance=bad, progress=False)
    wrong_logits = Guidance(classifier=ClassifierGuidance(lambda x, t: x.sum(), torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="logits"):
        fastdiff.sample(gm, noise, steps=3, schedule=schedule, guidance=wrong_logits, progress=False)


def test_transforms_in_float32_on_the_automatic_backend():
    """The hook path with the default float32 state (the cpu backend when built) agrees with the
    float64 reference run to float32 accuracy."""
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    noise = _randn(*SHAPE, seed=19)
    B = noise.shape[0]
    guidance = Guidance(5.0, rescale=0.7, x0_clip=DynamicThresholding(0.9, 1.5))
    kw = dict(steps=8, schedule=schedule, solver="dpmpp_2m", guidance=guidance, progress=False,
              cond={"c": torch.ones(B)}, uncond={"c": torch.zeros(B)})
    f32 = fastdiff.sample(model, noise.float(), **kw)
    f64 = fastdiff.sample(model, noise, state_dtype=torch.float64, backend="reference",
                          **{**kw, "cond": {"c": torch.ones(B, dtype=torch.float64)},
                             "uncond": {"c": torch.zeros(B, dtype=torch.float64)}})
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, rtol=0, atol=1e-4)
