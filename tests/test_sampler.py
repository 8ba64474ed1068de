"""The sampler's contract (fastdiff.sample / fastdiff.Sampler): reproducible seeded noise, the
callback, inpainting, the guidance interval, model kwargs and outputs, and clear errors on bad
input that leave the caller's tensors as they were."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastdiff import Guidance, Sampler, sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import DiscreteVP, VESchedule, make_grid

SHAPE = (4, 2, 3)


@pytest.fixture
def schedule():
    return DiscreteVP()


@pytest.fixture
def mixture(schedule):
    return GaussianMixture.default(schedule, dim=6)


@pytest.fixture
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


class Recorder:
    """Wraps a model; records (batch size, kwargs) of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, **kwargs):
        self.calls.append(SimpleNamespace(batch=x.shape[0], t=t.clone(), kwargs=dict(kwargs)))
        return self.model(x, t, **kwargs)


def run(model, noise, **kw):
    kw.setdefault("steps", 6)
    kw.setdefault("progress", False)
    return sample(model, noise, **kw)


# ---------------------------------------------------------------------------------------------
# Noise and reproducibility


@pytest.mark.parametrize("solver", ["euler_ancestral", "ddpm", "heun_sde"])
def test_same_seed_same_sample_and_different_seed_different_sample(mixture, noise, solver):
    schedule = mixture.schedule
    a = run(mixture, noise, solver=solver, schedule=schedule, seed=7)
    b = run(mixture, noise, solver=solver, schedule=schedule, seed=7)
    c = run(mixture, noise, solver=solver, schedule=schedule, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_generator_seeds_the_noise_reproducibly(mixture, noise):
    kw = dict(solver="euler_ancestral", schedule=mixture.schedule)
    a = run(mixture, noise, generator=torch.Generator().manual_seed(3), **kw)
    b = run(mixture, noise, generator=torch.Generator().manual_seed(3), **kw)
    c = run(mixture, noise, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_deterministic_solver_ignores_the_seed(mixture, noise):
    a = run(mixture, noise, solver="dpmpp_2m", schedule=mixture.schedule, seed=1)
    b = run(mixture, noise, solver="dpmpp_2m", schedule=mixture.schedule, seed=2)
    assert torch.equal(a, b)


def test_noise_sampler_gets_each_noise_row(mixture, noise):
    seen = []

    def noise_sampler(row, x):
        seen.append((row.step, row.noise_id))
        return torch.zeros_like(x)

    out = run(mixture, noise, solver="heun_sde", schedule=mixture.schedule, noise_sampler=noise_sampler)
    # stochastic Heun: the two rows of a step share one draw; the last step (to sigma = 0) has none
    assert [step for step, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    ids = [noise_id for _, noise_id in seen]
    assert ids[0::2] == ids[1::2] and len(set(ids)) == 5
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Callback


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "heun_sde"])
def test_callback_once_per_step_with_the_documented_dict(mixture, noise, solver):
    steps = 5
    grid = make_grid(mixture.schedule, steps, "leading")
    infos = []
    out = run(mixture, noise, solver=solver, grid=grid, seed=0, callback=lambda d: infos.append(dict(d, x=d["x"].clone())))
    assert [d["step"] for d in infos] == list(range(steps))
    for n, d in enumerate(infos):
        assert set(d) == {"step", "x", "sigma", "alpha", "t"}
        assert d["sigma"] == pytest.approx(float(grid.sigma[n + 1]))
        assert d["alpha"] == pytest.approx(float(grid.alpha[n + 1]))
        assert d["t"] == pytest.approx(float(grid.t[n + 1]))
        assert d["x"].shape == SHAPE
    assert torch.equal(infos[-1]["x"], out)


# ---------------------------------------------------------------------------------------------
# Inpainting


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "ddpm"])
def test_inpainting_keeps_the_known_region(mixture, noise, solver, mask_dtype):
    known = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[:, 0] = True                                   # the first channel is known
    mask = mask.to(mask_dtype)
    known_before, mask_before, noise_before = known.clone(), mask.clone(), noise.clone()
    free = run(mixture, noise, solver=solver, schedule=mixture.schedule, final="zero", seed=0)
    out = run(mixture, noise, solver=solver, schedule=mixture.schedule, final="zero", seed=0, inpaint=(known, mask))
    assert torch.equal(out[:, 0], known[:, 0])
    # the rest is sampled: not the known data, and conditioned on it (not the free sample)
    assert (out[:, 1] - known[:, 1]).abs().max() > 1e-2
    assert (out[:, 1] - free[:, 1]).abs().max() > 1e-4
    assert torch.equal(known, known_before) and torch.equal(mask, mask_before) and torch.equal(noise, noise_before)


def test_inpainting_rejects_known_data_of_the_wrong_shape(mixture, noise):
    with pytest.raises(ValueError, match="shape"):
        run(mixture, noise, solver="euler", schedule=mixture.schedule,
            inpaint=(torch.zeros(2, 2, 3), torch.ones(SHAPE, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------
# Guidance and model kwargs


class PairModel:
    """model(x, t, emb): the cond mixture where emb > 0, the uncond mixture where emb < 0."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond

    def __call__(self, x, t, emb, **_):
        pick = (emb[:, 0] > 0).reshape((-1,) + (1,) * (x.dim() - 1))
        return torch.where(pick, self.cond(x, t), self.uncond(x, t))


@pytest.fixture
def pair(schedule):
    base = GaussianMixture.default(schedule, dim=6)
    cond = GaussianMixture(schedule, base.means + 1.0, base.stds, base.weights)
    return PairModel(cond, base)


def embeddings(B):
    c = torch.arange(1.0, B + 1)[:, None].repeat(1, 3)    # > 0: cond, and tells the samples apart
    return c, -c


def test_guidance_interval_calls_the_model_with_batch_B_outside(pair, noise):
    B = SHAPE[0]
    c, u = embeddings(B)
    grid = make_grid(DiscreteVP(), 8, "leading")
    lo, hi = float(grid.ksigma[5]) * 0.999, float(grid.ksigma[2]) * 1.001   # points 2..5 guided
    model = Recorder(pair)
    run(model, noise, solver="euler", grid=grid, guidance=Guidance(4.0, interval=(lo, hi)),
        cond={"emb": c}, uncond={"emb": u})
    batches = [call.batch for call in model.calls]
    assert batches == [B, B, 2 * B, 2 * B, 2 * B, 2 * B, B, B]
    for call in model.calls:
        expected = torch.cat([u, c]) if call.batch == 2 * B else c
        assert torch.equal(call.kwargs["emb"], expected)


def test_cond_and_uncond_kwargs_are_concatenated_uncond_first(pair, noise):
    B = SHAPE[0]
    c, u = embeddings(B)
    c_before, u_before = c.clone(), u.clone()
    model = Recorder(pair)
    run(model, noise, solver="dpmpp_2m", schedule=DiscreteVP(), guidance=3.0, cond={"emb": c}, uncond={"emb": u},
        model_kwargs={"scale_hint": 0.5})
    assert model.calls and all(call.batch == 2 * B for call in model.calls)
    for call in model.calls:
        assert torch.equal(call.kwargs["emb"], torch.cat([u, c]))
        assert call.kwargs["scale_hint"] == 0.5
        assert torch.equal(call.t[:B], call.t[B:])
    assert torch.equal(c, c_before) and torch.equal(u, u_before)


def test_guidance_scale_1_needs_no_uncond_and_makes_one_call_per_step(pair, noise):
    c, _ = embeddings(SHAPE[0])
    model = Recorder(pair)
    run(model, noise, solver="euler", schedule=DiscreteVP(), guidance=1.0, cond={"emb": c})
    assert [call.batch for call in model.calls] == [SHAPE[0]] * 6


def test_model_returning_a_diffusers_style_output(mixture, noise):
    plain = run(mixture, noise, solver="heun", schedule=mixture.schedule)
    wrapped = run(lambda x, t: SimpleNamespace(sample=mixture(x, t)), noise, solver="heun", schedule=mixture.schedule)
    assert torch.equal(plain, wrapped)


# ---------------------------------------------------------------------------------------------
# Non-finite values


class NaNAfter:
    """The mixture, but NaN from the call ``bad_call`` on."""

    def __init__(self, model, bad_call):
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def __call__(self, x, t):
        self.calls += 1
        out = self.model(x, t)
        return out * float("nan") if self.calls > self.bad_call else out


@pytest.mark.parametrize("check_finite", ["end", "step"])
def test_nan_in_the_model_output_raises_naming_the_step(mixture, noise, check_finite):
    model = NaNAfter(mixture, bad_call=3)                  # euler: the call of step 3 returns NaN
    noise_before = noise.clone()
    with pytest.raises(FloatingPointError, match="step 3"):
        run(model, noise, solver="euler", schedule=mixture.schedule, steps=8, check_finite=check_finite)
    # 'step' stops right after the bad step; 'end' runs on and reports the first bad step
    assert model.calls == (4 if check_finite == "step" else 8)
    assert torch.equal(noise, noise_before)


def test_check_finite_off_returns_the_nans(mixture, noise):
    out = run(NaNAfter(mixture, bad_call=3), noise, solver="euler", schedule=mixture.schedule, check_finite="off")
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception, and the caller's tensors unchanged


def bad_calls(s):
    B = SHAPE[0]
    c, u = embeddings(B)
    return {
        "unknown solver": (ValueError, "available: .*euler", dict(solver="eulerr", schedule=s)),
        "steps 0": (ValueError, "steps", dict(solver="euler", schedule=s, steps=0)),
        "steps negative": (ValueError, "steps", dict(solver="euler", schedule=s, steps=-3)),
        "steps float": (ValueError, "steps", dict(solver="euler", schedule=s, steps=2.5)),
        "steps str": (ValueError, "steps", dict(solver="euler", schedule=s, steps="5")),
        "steps bool": (ValueError, "steps", dict(solver="euler", schedule=s, steps=True)),
        "unknown prediction": (ValueError, "prediction", dict(solver="euler", schedule=s, prediction="noise")),
        "unknown spacing": (ValueError, "spacing", dict(solver="euler", schedule=s, spacing="geometric")),
        "unknown solver option": (ValueError, "option", dict(solver="euler", schedule=s, solver_options={"eta": 1})),
        "guidance without uncond": (ValueError, "uncond", dict(solver="euler", schedule=s, guidance=5.0,
                                                               cond={"emb": c})),
        "bad check_finite": (ValueError, "check_finite", dict(solver="euler", schedule=s, check_finite="always")),
    }


@pytest.mark.parametrize("case", list(bad_calls(DiscreteVP())))
def test_bad_arguments_raise_clear_errors(mixture, noise, case):
    exc, match, kw = bad_calls(mixture.schedule)[case]
    noise_before = noise.clone()
    cond_before = {k: v.clone() for k, v in kw.get("cond", {}).items()}
    model = Recorder(mixture)
    with pytest.raises(exc, match=match):
        run(model, noise, **kw)
    assert not model.calls                             # rejected before any work
    assert torch.equal(noise, noise_before)
    assert all(torch.equal(kw["cond"][k], v) for k, v in cond_before.items())


def test_model_output_of_the_wrong_shape(mixture, noise):
    noise_before = noise.clone()
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*expected \(4, 2, 3\)"):
        run(lambda x, t: mixture(x, t).reshape(x.shape[0], -1), noise, solver="euler", schedule=mixture.schedule)
    assert torch.equal(noise, noise_before)


def test_model_output_that_is_not_a_tensor(mixture, noise):
    with pytest.raises(TypeError, match="tensor"):
        run(lambda x, t: mixture(x, t).tolist(), noise, solver="euler", schedule=mixture.schedule)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(SHAPE, dtype=torch.int64), TypeError, "floating"),
    (torch.full(SHAPE, float("nan")), ValueError, "NaN"),
    (torch.full(SHAPE, float("inf")), ValueError, "Inf"),
    ([[0.0]], TypeError, "Tensor"),
], ids=["int", "nan", "inf", "list"])
def test_bad_noise(mixture, bad, exc, match):
    before = bad.clone() if isinstance(bad, torch.Tensor) else None
    model = Recorder(mixture)
    with pytest.raises(exc, match=match):
        run(model, bad, solver="euler", schedule=mixture.schedule)
    assert not model.calls
    if before is not None:
        assert torch.allclose(bad.double(), before.double(), equal_nan=True)


def test_x_init_is_not_modified(mixture, noise):
    x_init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    before = x_init.clone()
    out = run(mixture, noise, solver="dpmpp_2m", schedule=mixture.schedule, x_init=x_init)
    assert torch.equal(x_init, before) and not torch.equal(out, x_init)


def test_a_prepared_sampler_is_reusable_and_matches_sample(mixture, noise):
    grid = make_grid(VESchedule(), 7, "karras")
    mix = GaussianMixture.default(grid.schedule, dim=6, prediction="sample")
    sampler = Sampler.build(solver="heun", grid=grid, prediction="sample")
    a = sampler(mix, noise, progress=False)
    b = sampler(mix, noise, progress=False)
    c = sample(mix, noise, solver="heun", grid=grid, prediction="sample", progress=False)
    assert torch.equal(a, b) and torch.equal(a, c)
