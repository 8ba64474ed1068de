"""fastdiff.integrations.k_diffusion against the real k_diffusion.sampling on the same inputs.

The denoiser is the exact posterior mean of fastdiff's Gaussian mixture on a VE schedule (what a
k-diffusion denoiser returns: x0 at noise level sigma). Stochastic samplers get the same noise
on both sides from a noise sampler keyed by (sigma, sigma_next).

Tolerance: |fastdiff - k-diffusion| <= RTOL[dtype] * max|x_init|. Both sides round at the scale of
the initial state (~sigma_max), e.g. the last Euler step x + (x - x0)/sigma * (0 - sigma) cancels
x to leave x0. float64: 1e-10 (measured worst 2.3e-15); float32: 64 eps (measured worst 13 eps,
Heun with 2 steps).
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
SAMPLERS = ["sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_euler_ancestral"]
SIGMA_MIN, SIGMA_MAX = 0.02, 80.0


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # Until fastdiff._C is built the ops fall back to the reference backend, with a warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the reference backend.*")
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


def run_both(name, model, x, sigmas, **kwargs):
    """(fastdiff result, k-diffusion result); stochastic samplers get a fresh PairNoise each."""
    noise = {}
    if name == "sample_euler_ancestral" and "noise_sampler" not in kwargs:
        noise = {"ours": PairNoise(x), "theirs": PairNoise(x)}
    ours = getattr(K, name)(model, x, sigmas, disable=True, **kwargs,
                            **({"noise_sampler": noise["ours"]} if noise else {}))
    theirs = getattr(KD, name)(model, x, sigmas, disable=True, **kwargs,
                               **({"noise_sampler": noise["theirs"]} if noise else {}))
    if noise:
        adds_noise = kwargs.get("eta", 1.0) > 0 and kwargs.get("s_noise", 1.0) > 0
        # k-diffusion also draws (and discards) noise when eta == 0 or s_noise == 0; fastdiff does not.
        assert noise["ours"].calls == (noise["theirs"].calls if adds_noise else [])
    return ours, theirs


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
    ours, theirs = run_both(name, denoiser_for(shape), x, sigmas)
    assert_parity(ours, theirs, x)
    assert torch.equal(x, x_before), "the sampler modified its input x"


@pytest.mark.parametrize("eta,s_noise", [(0.5, 1.0), (1.0, 0.7), (0.0, 1.0)])
def test_euler_ancestral_eta_and_s_noise(eta, s_noise):
    sigmas = K.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    ours, theirs = run_both("sample_euler_ancestral", denoiser_for((3, 2)), x, sigmas, eta=eta, s_noise=s_noise)
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


def test_default_noise_is_seeded_by_torch_global_rng():
    sigmas = K.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(K.sample_euler_ancestral(model, x, sigmas, disable=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    deterministic = K.sample_euler_ancestral(model, x, sigmas, disable=True, eta=0.0)
    assert not torch.allclose(runs[0], deterministic)


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
    kw = {"eta": 0.0} if name == "sample_euler_ancestral" else {}
    getattr(K, name)(ours, x, sigmas, extra_args=extra, disable=True, **kw)
    getattr(KD, name)(theirs, x, sigmas, extra_args=extra, disable=True, **kw)
    assert len(ours.sigmas) == len(theirs.sigmas) == {"sample_heun": 2 * 5 - 1}.get(name, 5)
    for a, b in zip(ours.sigmas, theirs.sigmas):
        assert a.shape == b.shape == (3,) and a.dtype == b.dtype == torch.float64
        assert torch.equal(a, b)
    assert all(kw.keys() == extra.keys() and kw["cond"] is extra["cond"] and kw["scale"] == 2.5
               for kw in ours.kwargs)


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_matches_k_diffusion(name):
    sigmas = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((2, 4, 3, 3), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    ours, theirs = [], []
    kw = {"eta": 0.0} if name == "sample_euler_ancestral" else {}
    getattr(K, name)(model, x, sigmas, disable=True, callback=ours.append, **kw)
    getattr(KD, name)(model, x, sigmas, disable=True, callback=theirs.append, **kw)
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


def test_churn_outside_s_tmin_s_tmax_is_plain_sampling():
    """k-diffusion applies churn only where s_tmin <= sigma <= s_tmax: elsewhere s_churn is a no-op."""
    sigmas = K.get_sigmas_karras(5, SIGMA_MIN, SIGMA_MAX).double()
    x = initial_x((3, 2), sigmas, torch.float64)
    model = denoiser_for(x.shape)
    ours = K.sample_heun(model, x, sigmas, disable=True, s_churn=1.0, s_tmin=100.0)
    theirs = KD.sample_heun(model, x, sigmas, disable=True, s_churn=1.0, s_tmin=100.0)
    assert_parity(ours, theirs, x)


needs_edm = pytest.mark.skipif(not {"edm_euler", "edm_heun"} <= set(SOLVERS),
                               reason="fastdiff's EDM churn solvers are not registered")


@needs_edm
@pytest.mark.parametrize("churn", [{"s_churn": 1.0}, {"s_churn": 40.0},  # 40: gamma capped at sqrt(2) - 1
                                   {"s_churn": 3.0, "s_tmin": 0.1, "s_tmax": 10.0}], ids=["1", "40", "window"])
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
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
@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_churn_noise_is_fresh_standard_normal(name):
    """With a denoiser that returns 0, step n maps x_hat to x_hat * sigma_{n+1} / sigma_hat, so the
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


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
@pytest.mark.parametrize("opts", [{"s_churn": -1.0}, {"s_churn": float("inf")}])
def test_bad_churn_options(name, opts):
    model, x, sigmas = _good()
    with pytest.raises(ValueError, match="s_churn"):
        getattr(K, name)(model, x, sigmas, disable=True, **opts)
    assert model.calls == 0


@pytest.mark.parametrize("opts", [{"eta": -0.1}, {"s_noise": float("nan")}])
def test_ancestral_bad_options(opts):
    model, x, sigmas = _good()
    with pytest.raises(ValueError):
        K.sample_euler_ancestral(model, x, sigmas, disable=True, **opts)
    assert model.calls == 0
