"""fastdiff.integrations.k_diffusion against the real k_diffusion.sampling on the same inputs.

The denoiser is the exact posterior mean of fastdiff's Gaussian mixture on a VE schedule (what a
k-diffusion denoiser returns: x0 at noise level sigma). Stochastic samplers get the same noise
on both sides from a noise sampler keyed by (sigma, sigma_next) (k-diffusion calls it with the
same arguments, whoever calls first), or from two equally seeded BrownianTreeNoiseSamplers.

Tolerance: |fastdiff - k-diffusion| <= RTOL[dtype] * max|x_init|. Both sides round at the scale of
the initial state (~sigma_max), e.g. the last Euler step x + (x - x0)/sigma * (0 - sigma) cancels
x to leave x0. float64: 1e-10 (measured worst 1.5e-14, DPM-2 with 2 steps; dpm_fast 1.4e-14,
dpm_adaptive 4.3e-14); float32: 64 eps (measured worst 37 eps, DPM-2 with 2 steps, where the
second stage amplifies the rounding of the first by sigma / sigma_mid; dpm_adaptive 4 eps).
sample_dpm_fast in float32 is judged against k-diffusion in float64 instead: k-diffusion does its
coefficient arithmetic in float32 there (h, expm1(h), the ancestral sqrt(sigma^2 - sigma_down^2)),
which alone is off by up to 385 eps (measured, 5 calls, eta = 1); fastdiff must be within
2 x k-diffusion's float32 error + 16 eps (measured on the tested cases: at most 1.2x, 42 vs 35 eps
with 2 calls).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastdiff.integrations import k_diffusion as K
from fastdiff.models import GaussianMixture
from fastdiff.schedules import VESchedule
from fastdiff.solvers import SOLVERS
from kdiffusion_loader import load_kdiffusion_sampling

KD = load_kdiffusion_sampling()

RTOL = {torch.float64: 1e-10, torch.float32: 64 * torch.finfo(torch.float32).eps}
# The samplers that take a list of noise levels; NOISY ones take eta / s_noise / noise_sampler.
NOISY = ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]
SAMPLERS = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m"] + NOISY
BRANCH_ON_SIGMA_DOWN = {"sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"}   # Euler where sigma_down == 0
TWO_STAGE = {"sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"}
SIGMA_MIN, SIGMA_MAX = 0.02, 80.0


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # Until fastdiff._C is built the ops fall back to the reference backend, with a warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the reference backend.*")
        # torchsde, inside k-diffusion's default BrownianTreeNoiseSampler, when k-diffusion queries
        # it at its range's end with sigma_fn(t_fn(sigma_min)), one rounding below sigma_min.
        warnings.filterwarnings("ignore", message="Should have ta>=t0")
        yield


def denoiser_for(shape) -> GaussianMixture:
    """k-diffusion denoiser model(x, sigma) -> x0 for inputs of ``shape``."""
    return GaussianMixture.default(VESchedule(), dim=int(np.prod(shape[1:])), prediction="sample")


def initial_x(shape, sigmas, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * float(sigmas[0])).to(dtype)


class PairNoise:
    """The same standard normal tensor for the same (sigma, sigma_next), whoever asks."""

    def __init__(self, like: torch.Tensor):
        self.shape, self.dtype = like.shape, like.dtype
        self.calls = []

    def __call__(self, sigma, sigma_next):
        key = (float(sigma), float(sigma_next))
        self.calls.append(key)
        g = torch.Generator().manual_seed(hash(key) & (2 ** 62 - 1))
        return torch.randn(self.shape, generator=g, dtype=torch.float64).to(self.dtype)


def deterministic(name) -> dict:
    """Options that make a sampler deterministic (no noise at all)."""
    return {"eta": 0.0} if name in NOISY else {}


def run_both(name, model, x, sigmas, their_sigmas=None, **kwargs):
    """(fastdiff result, k-diffusion result); stochastic samplers get a fresh PairNoise each.
    ``their_sigmas``: other sigmas (the same values in another dtype) for k-diffusion."""
    noise = {}
    if name in NOISY and "noise_sampler" not in kwargs:
        noise = {"ours": PairNoise(x), "theirs": PairNoise(x)}
    ours = getattr(K, name)(model, x, sigmas, disable=True, **kwargs,
                            **({"noise_sampler": noise["ours"]} if noise else {}))
    if name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde") and len(sigmas) == 2 and sigmas[-1] == 0:
        # k-diffusion 0.1.1 raises UnboundLocalError (h) on a single step to 0; its step is x = denoised.
        return ours, model(x, sigmas[0] * x.new_ones(x.shape[0]))
    theirs = getattr(KD, name)(model, x, sigmas if their_sigmas is None else their_sigmas, disable=True, **kwargs,
                               **({"noise_sampler": noise["theirs"]} if noise else {}))
    if noise:
        adds_noise = kwargs.get("eta", 1.0) > 0 and kwargs.get("s_noise", 1.0) > 0
        # k-diffusion also draws (and discards) noise when eta == 0 or s_noise == 0; fastdiff does not.
        assert noise["ours"].calls == (noise["theirs"].calls if adds_noise else [])
    return ours, theirs


def sigma_down_vanishes_in_float32(sigmas) -> bool:
    if sigmas.dtype != torch.float32:
        return False
    return any(float(KD.get_ancestral_step(a, b)[0]) == 0 < float(KD.get_ancestral_step(a.double(), b.double())[0])
               for a, b in zip(sigmas[:-1], sigmas[1:]))


def assert_parity(ours, theirs, x):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    err = (ours.to(torch.float64) - theirs.to(torch.float64)).abs().max().item()
    scale = x.to(torch.float64).abs().max().item()
    assert err <= RTOL[x.dtype] * scale, f"max |fastdiff - k-diffusion| = {err:.3e}, allowed {RTOL[x.dtype] * scale:.3e}"


# ---------------------------------------------------------------------------------------------
# Sampler parity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(3, 2), (2, 4, 3, 3)], ids=["3x2", "2x4x3x3"])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("n", [1, 2, 7, 25])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_k_diffusion(name, n, spacing, shape, dtype):
    sigmas = getattr(K, f"get_sigmas_{spacing}")(n, SIGMA_MIN, SIGMA_MAX)
    if dtype == torch.float64:
        sigmas = sigmas.double()  # k-diffusion does its sigma arithmetic in the dtype of sigmas
    x = initial_x(shape, sigmas, dtype, seed=n)
    x_before = x.clone()
    their_sigmas = None
    if name in BRANCH_ON_SIGMA_DOWN and sigma_down_vanishes_in_float32(sigmas):
        # k-diffusion's get_ancestral_step in float32 rounds sigma_down to 0 here (it does when
        # sigma_next / sigma < ~2.4e-4), so it takes an Euler step (DPM-2: without noise) where the
        # float64 value asks for a second-order step. fastdiff computes it in float64: compare with
        # k-diffusion doing the same (float64 sigmas; it then also keeps a float64 state).
        their_sigmas = sigmas.double()
    ours, theirs = run_both(name, denoiser_for(shape), x, sigmas, their_sigmas)
    theirs = theirs.to(x.dtype)
    assert_parity(ours, theirs, x)
    assert torch.equal(x, x_before), "the sampler modified its input x"


OPTIONS = [(name, kw) for name in NOISY for kw in ({"eta": 0.5}, {"s_noise": 0.7}, {"eta": 0.0}, {"eta": 2.0})] + [
    ("sample_dpmpp_sde", {"r": 0.3}), ("sample_dpmpp_sde", {"r": 1.0, "eta": 0.5}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun"}), ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.0}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.3, "s_noise": 1.3}),
    ("sample_dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.0}),
    ("sample_lms", {"order": 1}), ("sample_lms", {"order": 2}), ("sample_lms", {"order": 3}),
]


@pytest.mark.parametrize("name,kw", OPTIONS, ids=[f"{n[7:]}-{kw}" for n, kw in OPTIONS])
def test_options_match_k_diffusion(name, kw):
    """eta (0: deterministic; 2: sigma_up capped at sigma_next, sigma_down = 0), s_noise, r,
    solver_type and the LMS order, on both shapes."""
    sigmas = K.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX).double()
    for shape in [(3, 2), (2, 4, 3, 3)]:
        x = initial_x(shape, sigmas, torch.float64)
        ours, theirs = run_both(name, denoiser_for(shape), x, sigmas, **kw)
        assert_parity(ours, theirs, x)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sigmas_without_final_zero(name):
    """A grid that stops at a positive noise level (the tail of a schedule) is followed as given."""
    sigmas = K.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX).double()[:-3]
    x = initial_x((3, 2), sigmas, torch.float64)
    ours, theirs = run_both(name, denoiser_for((3, 2)), x, sigmas)
    assert_parity(ours, theirs, x)


def test_default_noise_sampler_reproduces_k_diffusion_stream():
    sigmas = K.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((2, 4, 3, 3), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    torch.manual_seed(123)
    ours = K.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=K.default_noise_sampler(x))
    torch.manual_seed(123)
    theirs = KD.sample_euler_ancestral(model, x, sigmas, disable=True)  # its default: randn_like(x)
    assert_parity(ours, theirs, x)


@pytest.mark.parametrize("name", NOISY)
def test_default_noise_is_seeded_by_torch_global_rng(name):
    sigmas = K.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(getattr(K, name)(model, x, sigmas, disable=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    no_noise = getattr(K, name)(model, x, sigmas, disable=True, eta=0.0)
    assert not torch.allclose(runs[0], no_noise)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_x(dtype):
    """fp16/bf16 x: the model sees x.dtype inputs and sigmas; the solver state stays float32."""
    sigmas = K.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX)
    x32 = initial_x((3, 2), sigmas, torch.float32)
    seen = []
    gm = denoiser_for(x32.shape)

    def model(x, sigma):
        seen.append((x.dtype, sigma.dtype))
        return gm(x, sigma)

    out = K.sample_dpmpp_2m(model, x32.to(dtype), sigmas, disable=True)
    ref = K.sample_dpmpp_2m(gm, x32.to(dtype).float(), sigmas, disable=True)
    assert out.dtype == dtype
    assert set(seen) == {(dtype, dtype)}
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------
# What the model and the callback see


class Recorder:
    """A denoiser that records every call (sigma values, extra_args) and forwards to the mixture."""

    def __init__(self, shape):
        self.gm = denoiser_for(shape)
        self.sigmas, self.kwargs = [], []

    def __call__(self, x, sigma, **kwargs):
        self.sigmas.append(sigma.clone())
        self.kwargs.append(kwargs)
        return self.gm(x, sigma)


@pytest.mark.parametrize("name", SAMPLERS)
def test_model_calls_match_k_diffusion(name):
    """Same number of model calls, the same sigma tensors ([B], x's dtype), extra_args on every call."""
    sigmas = K.get_sigmas_exponential(5, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    extra = {"cond": torch.arange(3.0), "scale": 2.5}
    ours, theirs = Recorder(x.shape), Recorder(x.shape)
    getattr(K, name)(ours, x, sigmas, extra_args=extra, disable=True, **deterministic(name))
    getattr(KD, name)(theirs, x, sigmas, extra_args=extra, disable=True, **deterministic(name))
    # Two-stage samplers: a second call per step, except the (Euler) step to 0.
    assert len(ours.sigmas) == len(theirs.sigmas) == (2 * 5 - 1 if name in TWO_STAGE else 5)
    for a, b in zip(ours.sigmas, theirs.sigmas):
        assert a.shape == b.shape == (3,) and a.dtype == b.dtype == torch.float64
        if bool((sigmas == b[0]).any()):
            assert torch.equal(a, b)  # a level of the grid: passed through exactly
        else:  # a stage's level (e.g. DPM-2's geometric mean), computed in float64 on both sides
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert all(kw.keys() == extra.keys() and kw["cond"] is extra["cond"] and kw["scale"] == 2.5
               for kw in ours.kwargs)


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_matches_k_diffusion(name):
    sigmas = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((2, 4, 3, 3), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    ours, theirs = [], []
    getattr(K, name)(model, x, sigmas, disable=True, callback=ours.append, **deterministic(name))
    getattr(KD, name)(model, x, sigmas, disable=True, callback=theirs.append, **deterministic(name))
    assert [c["i"] for c in ours] == [c["i"] for c in theirs] == list(range(5))
    for a, b in zip(ours, theirs):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(a["sigma"]) == float(b["sigma"]) == float(a["sigma_hat"]) == float(b["sigma_hat"])
        for key in ("x", "denoised"):
            err = (a[key] - b[key]).abs().max().item()
            assert err <= RTOL[torch.float64] * x.abs().max().item(), (key, a["i"], err)


def test_callback_x_is_a_copy():
    """Entries kept by the callback must not change when sampling goes on."""
    sigmas = K.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    kept = []
    K.sample_euler(denoiser_for(x.shape), x, sigmas, disable=True,
                   callback=lambda d: kept.append((d["x"], d["x"].clone())))
    assert all(torch.equal(live, snapshot) for live, snapshot in kept)
    assert torch.equal(kept[0][0], x)


def test_disable_controls_progress_bar(capsys):
    sigmas = K.get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    K.sample_euler(denoiser_for(x.shape), x, sigmas, disable=True)
    assert capsys.readouterr().err == ""
    K.sample_euler(denoiser_for(x.shape), x, sigmas, disable=None)  # tqdm's None: no bar off a TTY
    assert capsys.readouterr().err == ""
    K.sample_euler(denoiser_for(x.shape), x, sigmas, disable=False)
    assert "fastdiff euler" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sample_heun", "sample_dpm_2"])
def test_churn_outside_s_tmin_s_tmax_is_plain_sampling(name):
    """k-diffusion applies churn only where s_tmin <= sigma <= s_tmax: elsewhere s_churn is a no-op."""
    sigmas = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    ours = getattr(K, name)(model, x, sigmas, disable=True, s_churn=1.0, s_tmin=100.0)
    theirs = getattr(KD, name)(model, x, sigmas, disable=True, s_churn=1.0, s_tmin=100.0)
    assert_parity(ours, theirs, x)


needs_edm = pytest.mark.skipif(not {"edm_euler", "edm_heun"} <= set(SOLVERS),
                               reason="fastdiff's EDM churn solvers are not registered")


@needs_edm
@pytest.mark.parametrize("churn", [{"s_churn": 1.0}, {"s_churn": 40.0},  # 40: gamma capped at sqrt(2) - 1
                                   {"s_churn": 3.0, "s_tmin": 0.1, "s_tmax": 10.0}], ids=["1", "40", "window"])
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_geometry_matches_k_diffusion(name, churn):
    """With s_noise = 0 churn is deterministic: the model is called at sigma_hat = sigma (1 + gamma)
    and the step runs from there; everything but the noise is compared."""
    sigmas = K.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((2, 4, 3, 3), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    ours_cb, theirs_cb = [], []
    ours = getattr(K, name)(model, x, sigmas, disable=True, callback=ours_cb.append, s_noise=0.0, **churn)
    theirs = getattr(KD, name)(model, x, sigmas, disable=True, callback=theirs_cb.append, s_noise=0.0, **churn)
    assert_parity(ours, theirs, x)
    hats = [float(c["sigma_hat"]) for c in ours_cb]
    assert hats == pytest.approx([float(c["sigma_hat"]) for c in theirs_cb], rel=1e-14)
    assert any(h > float(s) for h, s in zip(hats, sigmas))  # churn did raise some noise levels


@needs_edm
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_noise_is_fresh_standard_normal(name):
    """With a denoiser that returns 0, step n maps x_hat to x_hat * sigma_{n+1} / sigma_hat (for
    Euler, Heun and DPM-2 alike: the derivative is x/sigma all along the step), so the
    churn noise of every step can be read back from the callback: it must be N(0, 1) scaled by
    s_noise, new at every step, and reproducible under torch.manual_seed."""
    sigmas = K.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((2, 4, 64, 64), sigmas, torch.float64)
    zero = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    s_noise = 0.5

    def noises(seed):
        seen = []
        torch.manual_seed(seed)
        getattr(K, name)(zero, x, sigmas, disable=True, callback=seen.append, s_churn=2.0, s_noise=s_noise)
        zs, x_n = [], x
        for n, c in enumerate(seen):
            s, s_hat = float(sigmas[n]), float(c["sigma_hat"])
            zs.append((c["x"] - x_n) / ((s_hat ** 2 - s ** 2) ** 0.5 * s_noise))
            x_n = c["x"] * float(sigmas[n + 1]) / s_hat
        return torch.stack(zs)

    z = noises(0)
    assert z.shape[0] == 4
    for zn in z:  # 32768 values per step: mean within ~5 sigma of 0, std of 1
        assert abs(zn.mean().item()) < 0.03 and abs(zn.std().item() - 1.0) < 0.02
    corr = torch.corrcoef(z.reshape(4, -1))
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 0.03
    assert torch.equal(z, noises(0))
    assert not torch.allclose(z, noises(1))


# ---------------------------------------------------------------------------------------------
# Sigma schedules and helpers


SCHEDULES = [
    ("karras", (20, 0.0292, 14.6146)),
    ("karras", (7, 0.002, 80.0, 3.0)),
    ("karras", (1, 0.1, 10.0)),
    ("exponential", (20, 0.0292, 14.6146)),
    ("polyexponential", (20, 0.0292, 14.6146)),
    ("polyexponential", (12, 0.1, 10.0, 2.5)),
    ("vp", (20,)),
    ("vp", (9, 10.0, 0.2, 1e-2)),
]


@pytest.mark.parametrize("kind,args", SCHEDULES)
def test_sigma_schedules_match_k_diffusion(kind, args):
    """float64: equal to k-diffusion to ~1e-15. float32 (the default dtype): fastdiff computes in
    float64 and rounds once, so it must equal k-diffusion's float64 values rounded to float32;
    k-diffusion's own float32 arithmetic is off by up to 4.5e-6 (karras, rho=3) and 2e-4
    (vp, sqrt(exp(u) - 1) cancels near t = eps_s) relative, measured."""
    ours32 = getattr(K, f"get_sigmas_{kind}")(*args)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours64 = getattr(K, f"get_sigmas_{kind}")(*args)
        theirs64 = getattr(KD, f"get_sigmas_{kind}")(*args)
    finally:
        torch.set_default_dtype(default)
    assert ours64.dtype == theirs64.dtype == torch.float64 and ours32.dtype == torch.float32
    assert ours64.shape == theirs64.shape == ours32.shape == (args[0] + 1,)
    assert ours64[-1] == 0 and ours32[-1] == 0
    torch.testing.assert_close(ours64, theirs64, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours32, theirs64.float(), rtol=torch.finfo(torch.float32).eps, atol=0)


def test_sigma_schedule_device_argument():
    assert K.get_sigmas_karras(4, 0.1, 10.0, device="cpu").device.type == "cpu"
    assert K.get_sigmas_exponential(4, 0.1, 10.0, device=torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("call", [
    lambda: K.get_sigmas_karras(0, 0.1, 10.0),
    lambda: K.get_sigmas_karras(5.0, 0.1, 10.0),
    lambda: K.get_sigmas_karras(5, 0.0, 10.0),
    lambda: K.get_sigmas_karras(5, 10.0, 0.1),
    lambda: K.get_sigmas_karras(5, 0.1, 10.0, rho=0.0),
    lambda: K.get_sigmas_exponential(5, -1.0, 10.0),
    lambda: K.get_sigmas_polyexponential(5, 0.1, float("inf")),
    lambda: K.get_sigmas_vp(5, eps_s=1.5),
])
def test_sigma_schedules_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


def test_helpers_match_k_diffusion():
    s = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    assert torch.equal(K.append_zero(s[:3]), KD.append_zero(s[:3]))
    for a, b in zip(s[:-1], s[1:]):
        for eta in (0.0, 0.3, 1.0):
            ours, theirs = K.get_ancestral_step(a, b, eta=eta), KD.get_ancestral_step(a, b, eta=eta)
            assert ours == pytest.approx([float(v) for v in theirs], rel=1e-14, abs=0)
    x, den = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(K.to_d(x, sigma, den), KD.to_d(x, sigma, den), rtol=0, atol=0)
    torch.testing.assert_close(K.to_d(x, sigma[1], den), KD.to_d(x, sigma[1], den), rtol=0, atol=0)
    with pytest.raises(ValueError):
        K.to_d(x, torch.ones(1, 1, 1, 1), den)
    ns = K.default_noise_sampler(x)
    torch.manual_seed(3)
    a = ns(s[0], s[1])
    torch.manual_seed(3)
    assert torch.equal(a, KD.default_noise_sampler(x)(s[0], s[1]))


# ---------------------------------------------------------------------------------------------
# Bad input


def _good():
    sigmas = K.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).double()
    return denoiser_for((3, 2)), initial_x((3, 2), sigmas, torch.float64), sigmas


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("bad,exc,match", [
    ({"sigmas": torch.tensor([[3.0, 1.0, 0.0]])}, ValueError, "1-D"),
    ({"sigmas": torch.tensor([3.0])}, ValueError, "at least 2"),
    ({"sigmas": [3.0, 1.0, 0.0]}, TypeError, "torch.Tensor"),
    ({"sigmas": torch.tensor([0.5, 1.0, 3.0])}, ValueError, "strictly decrease"),
    ({"sigmas": torch.tensor([3.0, 1.0, 1.0, 0.0])}, ValueError, "strictly decrease"),
    ({"sigmas": torch.tensor([3.0, 1.0, -0.5])}, ValueError, ">= 0"),
    ({"sigmas": torch.tensor([float("nan"), 1.0, 0.0])}, ValueError, "finite"),
    ({"x": [[1.0, 2.0]] * 3}, TypeError, "torch.Tensor"),
    ({"x": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "floating-point"),
    ({"x": torch.ones(0, 2, dtype=torch.float64)}, ValueError, "batch"),
    ({"extra_args": ["cond"]}, TypeError, "extra_args"),
    ({"callback": "print"}, TypeError, "callback"),
    ({"model": None}, TypeError, "model"),
])
def test_bad_input_raises_and_changes_nothing(name, bad, exc, match):
    model, x, sigmas = _good()
    args = {"model": model, "x": x, "sigmas": sigmas, **bad}
    x_before = args["x"].clone() if isinstance(args["x"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        getattr(K, name)(args.pop("model"), args.pop("x"), args.pop("sigmas"), disable=True, **args)
    if x_before is not None:
        assert torch.equal(x if "x" not in bad else bad["x"], x_before)
    assert model.calls == 0


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_churn_without_edm_solver_is_not_implemented(name, monkeypatch):
    monkeypatch.delitem(SOLVERS, name.replace("sample_", "edm_"), raising=False)
    model, x, sigmas = _good()
    with pytest.raises(NotImplementedError, match="s_churn"):
        getattr(K, name)(model, x, sigmas, disable=True, s_churn=0.5)
    assert model.calls == 0


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
@pytest.mark.parametrize("opts", [{"s_churn": -1.0}, {"s_churn": float("inf")}])
def test_bad_churn_options(name, opts):
    model, x, sigmas = _good()
    with pytest.raises(ValueError, match="s_churn"):
        getattr(K, name)(model, x, sigmas, disable=True, **opts)
    assert model.calls == 0


@pytest.mark.parametrize("name", NOISY)
@pytest.mark.parametrize("opts,match", [({"eta": -0.1}, "eta"), ({"s_noise": float("nan")}, "s_noise"),
                                        ({"noise_sampler": "randn"}, "noise_sampler")])
def test_noisy_sampler_bad_options(name, opts, match):
    model, x, sigmas = _good()
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(K, name)(model, x, sigmas, disable=True, **opts)
    assert model.calls == 0


@pytest.mark.parametrize("name,opts,match", [
    ("sample_lms", {"order": 5}, "order must be one of 1, 2, 3, 4"),
    ("sample_lms", {"order": 0}, "order"),
    ("sample_lms", {"order": 2.0}, "order"),
    ("sample_dpmpp_2m_sde", {"solver_type": "euler"}, "solver_type"),
    ("sample_dpmpp_sde", {"r": 0.0}, "r "),
    ("sample_dpmpp_sde", {"r": 1.5}, "r "),
])
def test_sampler_bad_options(name, opts, match):
    model, x, sigmas = _good()
    with pytest.raises(ValueError, match=match):
        getattr(K, name)(model, x, sigmas, disable=True, **opts)
    assert model.calls == 0


# ---------------------------------------------------------------------------------------------
# Brownian-tree noise and the SDE samplers' default noise


@pytest.mark.parametrize("seed,transform", [(5, None), ([5, 6, 7], None), (11, lambda s: s.log())],
                         ids=["int-seed", "per-item-seeds", "log-transform"])
def test_brownian_tree_noise_sampler_matches_k_diffusion(seed, transform):
    x = torch.zeros(3, 4, 2, dtype=torch.float64)
    kw = {} if transform is None else {"transform": transform}
    ours = K.BrownianTreeNoiseSampler(x, 0.02, 80.0, seed=seed, **kw)
    theirs = KD.BrownianTreeNoiseSampler(x, 0.02, 80.0, seed=seed, **kw)
    draws = []
    for a, b in [(80.0, 14.0), (14.0, 3.0), (14.0, 7.0), (3.0, 0.02), (0.02, 3.0)]:
        z = ours(torch.tensor(a), torch.tensor(b))
        assert z.shape == x.shape and z.dtype == x.dtype
        assert torch.equal(z, theirs(torch.tensor(a), torch.tensor(b)))
        draws.append(z)
    assert torch.equal(draws[3], -draws[4])  # W(b) - W(a) = -(W(a) - W(b))
    if isinstance(seed, list):  # one independent tree per batch item
        assert not torch.allclose(draws[0][0], draws[0][1])


def test_brownian_tree_increments_are_nested():
    """noise(s, s_mid) and noise(s, s_next) are unit-variance increments over nested intervals:
    correlation sqrt((s - s_mid) / (s - s_next)), what sample_dpmpp_sde's two draws per step need."""
    x = torch.zeros(20000, dtype=torch.float64)
    ns = K.BrownianTreeNoiseSampler(x, 0.02, 80.0, seed=0)
    s, s_mid, s_next = torch.tensor(10.0), torch.tensor(6.0), torch.tensor(1.0)
    z1, z2 = ns(s, s_mid), ns(s, s_next)
    assert abs(z1.std().item() - 1) < 0.03 and abs(z2.std().item() - 1) < 0.03
    expected = ((s - s_mid) / (s - s_next)).sqrt().item()
    assert abs(torch.corrcoef(torch.stack([z1, z2]))[0, 1].item() - expected) < 0.03


def test_brownian_tree_bad_seed_list():
    with pytest.raises(ValueError, match="one seed per batch item"):
        K.BrownianTreeNoiseSampler(torch.zeros(3, 2), 0.02, 80.0, seed=[1, 2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_sde_samplers_with_equal_brownian_trees_match(name, dtype):
    """k-diffusion's default noise, made reproducible: equally seeded Brownian trees on both sides."""
    sigmas = K.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
    sigmas = sigmas.double() if dtype == torch.float64 else sigmas
    x = initial_x((2, 4, 3, 3), sigmas, dtype)
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    model = denoiser_for(x.shape)
    ours = getattr(K, name)(model, x, sigmas, disable=True, noise_sampler=K.BrownianTreeNoiseSampler(x, lo, hi, seed=3))
    theirs = getattr(KD, name)(model, x, sigmas, disable=True,
                               noise_sampler=KD.BrownianTreeNoiseSampler(x, lo, hi, seed=3))
    assert_parity(ours, theirs, x)


def test_dpmpp_sde_default_noise_has_k_diffusions_law():
    """Without a noise_sampler fastdiff draws Philox noise, coupling a step's two draws as
    k-diffusion's default Brownian tree does: the samples must have k-diffusion's mean and
    covariance (20000 samples: Monte Carlo error ~0.004). Independent draws (default_noise_sampler)
    give a visibly different covariance (0.18 vs 0.29 here, measured), so the test can fail."""
    sigmas = K.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((20000, 2), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    torch.manual_seed(1)
    ours = K.sample_dpmpp_sde(model, x, sigmas, disable=True)
    torch.manual_seed(2)
    theirs = KD.sample_dpmpp_sde(model, x, sigmas, disable=True)
    torch.manual_seed(3)
    independent = K.sample_dpmpp_sde(model, x, sigmas, disable=True, noise_sampler=K.default_noise_sampler(x))
    assert (ours.mean(0) - theirs.mean(0)).abs().max().item() < 0.025
    cov_ours, cov_theirs, cov_indep = (torch.cov(s.T) for s in (ours, theirs, independent))
    assert (cov_ours - cov_theirs).abs().max().item() < 0.03
    assert (cov_indep - cov_theirs).abs().max().item() > 0.08


# ---------------------------------------------------------------------------------------------
# DPM-Solver-fast and DPM-Solver-12/23 adaptive (between sigma_min and sigma_max)


class default_dtype:
    """torch's default dtype inside a with-block (k-diffusion's dpm_fast/adaptive compute their
    log-sigma grid and step sizes in it)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


FAST_NFE = [1, 2, 3, 4, 5, 6, 10, 17]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", FAST_NFE)
def test_dpm_fast_matches_k_diffusion(n, eta):
    """float64: every mix of orders (n % 3 = 0, 1, 2; a single step of order 1/2), ancestral or
    not, on both shapes; k-diffusion draws noise at every step and zeroes the last one's."""
    with default_dtype(torch.float64):
        for shape in [(3, 2), (2, 4, 3, 3)]:
            x = initial_x(shape, torch.tensor([SIGMA_MAX]), torch.float64, seed=n)
            model, noise = denoiser_for(shape), {"ours": PairNoise(x), "theirs": PairNoise(x)}
            ours = K.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta,
                                     noise_sampler=noise["ours"])
            theirs = KD.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta,
                                        noise_sampler=noise["theirs"])
            assert_parity(ours, theirs, x)
            steps = n // 3 + 1
            assert len(noise["theirs"].calls) == steps
            assert noise["ours"].calls == (noise["theirs"].calls[:-1] if eta else [])


@pytest.mark.parametrize("n", [2, 5, 10])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_float32_is_as_accurate_as_k_diffusion(n, eta):
    """float32, default dtype float32: fastdiff's and k-diffusion's errors against k-diffusion in
    float64 (see the module docstring for the rule and the measurements)."""
    shape = (2, 4, 3, 3)
    x64 = initial_x(shape, torch.tensor([SIGMA_MAX]), torch.float64, seed=n)
    x32 = x64.float()
    model = denoiser_for(shape)
    with default_dtype(torch.float64):
        ref = KD.sample_dpm_fast(model, x64, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta, noise_sampler=PairNoise(x64))
    ours = K.sample_dpm_fast(model, x32, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta, noise_sampler=PairNoise(x32))
    theirs = KD.sample_dpm_fast(model, x32, SIGMA_MIN, SIGMA_MAX, n, disable=True, eta=eta,
                                noise_sampler=PairNoise(x32))
    assert ours.dtype == torch.float32
    scale, eps = x64.abs().max().item(), torch.finfo(torch.float32).eps
    err_ours = (ours.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + 16 * eps * scale, (err_ours / scale / eps, err_theirs / scale / eps)


def test_dpm_fast_model_calls_and_callback_match_k_diffusion():
    with default_dtype(torch.float64):
        x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
        extra = {"cond": torch.arange(3.0)}
        ours, theirs = Recorder(x.shape), Recorder(x.shape)
        ours_cb, theirs_cb = [], []
        K.sample_dpm_fast(ours, x, SIGMA_MIN, SIGMA_MAX, 7, extra_args=extra, disable=True, callback=ours_cb.append)
        KD.sample_dpm_fast(theirs, x, SIGMA_MIN, SIGMA_MAX, 7, extra_args=extra, disable=True,
                           callback=theirs_cb.append)
    assert len(ours.sigmas) == len(theirs.sigmas) == 7
    for a, b in zip(ours.sigmas, theirs.sigmas):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    assert all(kw["cond"] is extra["cond"] for kw in ours.kwargs)
    assert [c["i"] for c in ours_cb] == [c["i"] for c in theirs_cb] == [0, 1, 2]
    for a, b in zip(ours_cb, theirs_cb):
        assert set(a) == set(b) == {"x", "i", "t", "t_up", "sigma", "sigma_hat", "denoised"}
        for key in ("t", "t_up", "sigma", "sigma_hat"):
            assert torch.equal(a[key], b[key]), key
        for key in ("x", "denoised"):
            assert (a[key] - b[key]).abs().max().item() <= RTOL[torch.float64] * x.abs().max().item()


def test_dpm_fast_default_noise_is_seeded_by_torch_global_rng():
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    model = denoiser_for(x.shape)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(K.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, 9, disable=True, eta=1.0))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], K.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, 9, disable=True))


@pytest.mark.parametrize("shape", [(3, 2), (2, 4, 3, 3)], ids=["3x2", "2x4x3x3"])
@pytest.mark.parametrize("order,tols", [(2, {}), (3, {}), (3, {"rtol": 1e-3, "atol": 1e-4}),
                                        (2, {"h_init": 0.5, "pcoeff": 0.1, "dcoeff": 0.05})])
def test_dpm_adaptive_matches_k_diffusion(order, tols, shape):
    """The same accepted/rejected steps and the same sample (float64); fastdiff reuses the model
    output at the start of a rejected step, so it makes n_reject fewer model calls."""
    x = initial_x(shape, torch.tensor([SIGMA_MAX]), torch.float64)
    model = denoiser_for(shape)
    extra = {"unused": 1}
    ours, info = K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, extra_args=extra, order=order,
                                       return_info=True, **tols)
    with default_dtype(torch.float64):  # k-diffusion's step-size arithmetic in float64
        theirs, kinfo = KD.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, extra_args=extra, disable=True,
                                               order=order, return_info=True, **tols)
    assert_parity(ours, theirs, x)
    assert (info["steps"], info["n_accept"], info["n_reject"]) == (kinfo["steps"], kinfo["n_accept"], kinfo["n_reject"])
    assert info["nfe"] == kinfo["nfe"] - kinfo["n_reject"]
    assert info["n_reject"] > 0  # every case here rejects some steps (1 to 9, measured)
    out = K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, order=order, **tols)  # return_info=False
    assert torch.equal(out, ours)


def test_dpm_adaptive_float32():
    x64 = initial_x((2, 4, 3, 3), torch.tensor([SIGMA_MAX]), torch.float64)
    x = x64.float()
    model = denoiser_for(x.shape)
    ours, info = K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, return_info=True)
    theirs, kinfo = KD.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, disable=True, return_info=True)
    assert ours.dtype == torch.float32
    assert info["n_accept"] == kinfo["n_accept"]
    assert_parity(ours, theirs, x)


def test_dpm_adaptive_ancestral_default_noise():
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    model = denoiser_for(x.shape)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, eta=1.0))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert not torch.allclose(runs[0], K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX))


def test_dpm_adaptive_ignores_noise_sampler_without_eta():
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    model, noise = denoiser_for(x.shape), PairNoise(x)
    out = K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, noise_sampler=noise)
    assert noise.calls == [] and torch.equal(out, K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX))


@pytest.mark.parametrize("kw,match", [({"callback": print}, "callback"),
                                      ({"eta": 1.0, "noise_sampler": lambda s, t: None}, "noise_sampler")])
def test_dpm_adaptive_unsupported_options(kw, match):
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    model = denoiser_for(x.shape)
    with pytest.raises(NotImplementedError, match=match):
        K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, **kw)
    assert model.calls == 0


BAD_RANGE = [
    ({"sigma_min": 0.0}, ValueError, "0 < sigma_min < sigma_max"),
    ({"sigma_min": 90.0}, ValueError, "0 < sigma_min < sigma_max"),
    ({"sigma_max": float("inf")}, ValueError, "sigma_max < inf"),
    ({"sigma_min": "small"}, TypeError, "numbers"),
    ({"x": torch.ones(3, 2, dtype=torch.int64)}, TypeError, "floating-point"),
    ({"model": None}, TypeError, "model"),
    ({"eta": -1.0}, ValueError, "eta"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_RANGE + [
    ({"n": 0}, ValueError, "n \\(the number of model evaluations\\)"),
    ({"n": 2.5}, ValueError, "integer"),
    ({"n": True}, ValueError, "integer"),
])
def test_dpm_fast_bad_input(bad, exc, match):
    model = denoiser_for((3, 2))
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    args = {"model": model, "x": x, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "n": 5, **bad}
    with pytest.raises(exc, match=match):
        K.sample_dpm_fast(args.pop("model"), args.pop("x"), args.pop("sigma_min"), args.pop("sigma_max"),
                          args.pop("n"), disable=True, **args)
    assert model.calls == 0


@pytest.mark.parametrize("bad,exc,match", BAD_RANGE + [
    ({"order": 1}, ValueError, "order"),
    ({"rtol": 0.0}, ValueError, "rtol"),
    ({"h_init": -0.1}, ValueError, "h_init"),
])
def test_dpm_adaptive_bad_input(bad, exc, match):
    model = denoiser_for((3, 2))
    x = initial_x((3, 2), torch.tensor([SIGMA_MAX]), torch.float64)
    x_before = x.clone()
    args = {"model": model, "x": x, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, **bad}
    with pytest.raises(exc, match=match):
        K.sample_dpm_adaptive(args.pop("model"), args.pop("x"), args.pop("sigma_min"), args.pop("sigma_max"), **args)
    assert model.calls == 0 and torch.equal(x, x_before)


# ---------------------------------------------------------------------------------------------
# The singlestep DPM-Solver options dpm_fast runs on (fastdiff.solvers.dpm_solver: orders, eta)


def test_dpm_solver_orders_equal_to_a_fixed_order_is_that_order():
    from fastdiff.solvers import get_solver
    from fastdiff.schedules import DiscreteVP, make_grid
    for schedule in (VESchedule(), DiscreteVP()):
        grid = make_grid(schedule, 5, "karras")
        for k in (1, 2, 3):
            assert get_solver("dpm_solver", orders=[k] * 5).rows(grid) == get_solver("dpm_solver", order=k).rows(grid)


def test_dpm_solver_ancestral_steps_on_a_vp_grid():
    """eta > 0 on a VP schedule (epsilon model, native x) equals the VE run on the same noise
    levels sigma/alpha with the same noise, after dividing by alpha: the ancestral split and the
    rescaling after the step are done in the k-diffusion coordinates x/alpha."""
    from fastdiff import Sampler
    from fastdiff.schedules import DiscreteVP, Grid
    vp = DiscreteVP()
    ks = np.geomspace(vp.ksigma_max, vp.ksigma_min * 2, 6)
    grid_vp, grid_ve = Grid.from_ksigmas(vp, ks), Grid.from_ksigmas(VESchedule(ks[-1], ks[0]), ks)
    gm = GaussianMixture.default(vp, dim=2, prediction="epsilon")
    x_ve = initial_x((4, 2), torch.tensor([ks[0]]), torch.float64)
    zs = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    options = {"orders": [3, 3, 2, 1, 2], "eta": 0.7, "s_noise": 0.9}
    run = dict(noise_sampler=lambda row, x: zs[row.noise_id], progress=False)
    ours_vp = Sampler.build(solver="dpm_solver", solver_options=options, grid=grid_vp, prediction="epsilon",
                            state_dtype=torch.float64)(gm, x_ve, x_init=x_ve * float(grid_vp.alpha[0]), **run)
    ours_ve = Sampler.build(solver="dpm_solver", solver_options=options, grid=grid_ve, prediction="sample",
                            state_dtype=torch.float64)(lambda y, s: gm.x0(y, 1.0, s), x_ve, x_init=x_ve, **run)
    assert not torch.allclose(ours_ve, Sampler.build(solver="dpm_solver", solver_options={"orders": options["orders"]},
                                                     grid=grid_ve, prediction="sample", state_dtype=torch.float64)(
        lambda y, s: gm.x0(y, 1.0, s), x_ve, x_init=x_ve, progress=False))   # the noise did something
    torch.testing.assert_close(ours_vp / float(grid_vp.alpha[-1]), ours_ve, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options,match", [({"orders": [3, 4]}, "each of orders"), ({"orders": []}, "non-empty"),
                                           ({"orders": "33"}, "non-empty"), ({"eta": -1.0}, "eta"),
                                           ({"s_noise": float("inf")}, "s_noise")])
def test_dpm_solver_bad_options(options, match):
    from fastdiff.solvers import get_solver
    with pytest.raises(ValueError, match=match):
        get_solver("dpm_solver", **options)


def test_dpm_solver_orders_must_match_the_grid():
    from fastdiff.solvers import get_solver
    from fastdiff.schedules import make_grid
    with pytest.raises(ValueError, match="orders has 2 entries but the grid has 5 steps"):
        get_solver("dpm_solver", orders=[3, 2]).rows(make_grid(VESchedule(), 5, "karras"))


# ---------------------------------------------------------------------------------------------
# The API itself


FASTDIFF_EXTRAS = {"check_finite", "noise"}


def test_every_k_diffusion_sampler_exists_with_its_signature():
    import inspect
    theirs = sorted(n for n in dir(KD) if n.startswith("sample_"))
    # every k-diffusion sampler, with its signature; the others in K.__all__ are ComfyUI's
    # (tests/test_comfy_samplers.py)
    assert set(theirs) <= set(K.__all__), sorted(set(theirs) - set(K.__all__))
    for name in [n for n in K.__all__ if hasattr(KD, n)]:
        ours, kd = getattr(K, name), getattr(KD, name)
        ours, kd = (f.__init__ if inspect.isclass(f) else f for f in (ours, kd))
        a, b = inspect.signature(ours).parameters, inspect.signature(kd).parameters
        # k-diffusion's parameters, in its order; fastdiff's only additions are keyword-only
        # (check_finite, noise) after them, so every call written for k-diffusion means the same.
        extra = list(a)[len(b):]
        assert list(a)[:len(b)] == list(b), name
        assert set(extra) <= FASTDIFF_EXTRAS and all(a[p].kind is inspect.Parameter.KEYWORD_ONLY for p in extra), name
        for p in b:  # defaults equal (a default function, BrownianTreeNoiseSampler's transform: both identity)
            da, db = a[p].default, b[p].default
            if callable(da) and da is not inspect.Parameter.empty:
                assert da(3.0) == db(3.0) == 3.0, (name, p)
            else:
                assert da == db, (name, p)


# ---------------------------------------------------------------------------------------------
# noise="torch": k-diffusion's own draws, so the same seed gives k-diffusion's result (issue 12,
# item 18); torch's global RNG ends in the same state too (k-diffusion's discarded draws made).
TORCH_NOISE_CASES = [(n, {}) for n in NOISY] + [
    ("sample_euler_ancestral", {"eta": 0.0}), ("sample_dpm_2_ancestral", {"eta": 0.5}),
    ("sample_dpmpp_2s_ancestral", {"s_noise": 0.0}), ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("sample_euler", {}), ("sample_heun", {}), ("sample_dpm_2", {}), ("sample_lms", {}), ("sample_dpmpp_2m", {}),
]


def _same_seed(fn, seed=1234):
    torch.manual_seed(seed)
    out = fn()
    return out, torch.get_rng_state()


@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("name,kw", TORCH_NOISE_CASES, ids=[f"{n[7:]}-{kw}" for n, kw in TORCH_NOISE_CASES])
def test_noise_torch_reproduces_k_diffusion_same_seed(name, kw, n):
    shape = (3, 2, 2)
    model = denoiser_for(shape)
    sigmas = K.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x(shape, sigmas, torch.float64)
    if name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde") and n == 1:
        pytest.skip("k-diffusion 0.1.1 raises UnboundLocalError on a single step to sigma = 0")
    ours, our_rng = _same_seed(lambda: getattr(K, name)(model, x, sigmas, disable=True, noise="torch", **kw))
    theirs, their_rng = _same_seed(lambda: getattr(KD, name)(model, x, sigmas, disable=True, **kw))
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-14 * x.abs().max().item(), f"max |fastdiff - k-diffusion| = {err:.3e}"
    assert torch.equal(our_rng, their_rng), "torch's global RNG ends in another state than after k-diffusion"
    if name in NOISY and n > 1 and kw.get("eta", 1.0) > 0 and kw.get("s_noise", 1.0) > 0:
        default, _ = _same_seed(lambda: getattr(K, name)(model, x, sigmas, disable=True, **kw))
        assert (default - theirs).abs().max().item() > 1e-10 * x.abs().max().item(), "Philox noise is not torch's"


@needs_edm
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_noise_torch_reproduces_k_diffusion_churn(name):
    shape = (3, 2)
    model = denoiser_for(shape)
    sigmas = K.get_sigmas_karras(7, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x(shape, sigmas, torch.float64)
    kw = {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 10.0}
    ours, our_rng = _same_seed(lambda: getattr(K, name)(model, x, sigmas, disable=True, noise="torch", **kw))
    theirs, their_rng = _same_seed(lambda: getattr(KD, name)(model, x, sigmas, disable=True, **kw))
    assert (ours - theirs).abs().max().item() <= 1e-14 * x.abs().max().item()
    assert torch.equal(our_rng, their_rng)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_noise_torch_reproduces_k_diffusion_dpm_fast_and_adaptive(eta):
    shape = (3, 2)
    model = denoiser_for(shape)
    x = initial_x(shape, torch.tensor([SIGMA_MAX]), torch.float64)
    with default_dtype(torch.float64):   # k-diffusion's level and step-size arithmetic in float64
        _fast_and_adaptive_same_seed(model, x, eta)


def _fast_and_adaptive_same_seed(model, x, eta):
    ours, our_rng = _same_seed(lambda: K.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, 7, eta=eta, disable=True,
                                                         noise="torch"))
    theirs, their_rng = _same_seed(lambda: KD.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, 7, eta=eta,
                                                              disable=True))
    assert (ours - theirs).abs().max().item() <= 1e-14 * x.abs().max().item()
    assert torch.equal(our_rng, their_rng)
    ours, our_rng = _same_seed(lambda: K.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, eta=eta, disable=True,
                                                             noise="torch"))
    theirs, their_rng = _same_seed(lambda: KD.sample_dpm_adaptive(model, x, SIGMA_MIN, SIGMA_MAX, eta=eta,
                                                                  disable=True))
    # the adaptive controller's float64 arithmetic: 4.3e-14 measured (module docstring)
    assert (ours - theirs).abs().max().item() <= 1e-13 * x.abs().max().item()
    assert torch.equal(our_rng, their_rng)


def test_noise_mode_is_checked():
    x = torch.randn(2, 2, dtype=torch.float64)
    sigmas = K.get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX).double()
    for call in (lambda: K.sample_euler_ancestral(denoiser_for(x.shape), x, sigmas, noise="numpy"),
                 lambda: K.sample_dpmpp_sde(denoiser_for(x.shape), x, sigmas, noise=None),
                 lambda: K.sample_dpm_fast(denoiser_for(x.shape), x, 0.1, 1.0, 3, noise="Torch")):
        with pytest.raises(ValueError, match="noise must be 'philox'"):
            call()
