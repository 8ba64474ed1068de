"""The row format carries guidance as coefficients: CFG++ samplers and per-sample guidance scales.

* CFG++ (Chung et al. 2024; ComfyUI's euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2m_cfg_pp,
  dpmpp_2s_ancestral_cfg_pp, res_multistep(_ancestral)_cfg_pp, gradient_estimation_cfg_pp,
  cfgpp_ud10_ab) as coefficient programs equal their textbook oracles (fastdiff.textbook.cfg_pp) to
  ~1e-10 in float64, with DISTINCT cond and uncond models, in both CFG conventions; one fused-step
  call per model evaluation; without guidance they are their base samplers (BASE).
* A per-sample guidance scale vector: a batch of 3 with scales (1, 3, 7.5) equals three separate
  runs bit for bit (cpu and reference backends; Triton in tests/test_triton_interpret.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import Guidance, Sampler, ops
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.program import Out, Row
from fastdiff.schedules import DiscreteVP, VESchedule, make_grid
from fastdiff.textbook import ORACLES, guided
from fastdiff.textbook.cfg_pp import CFG_PP_ORACLES

SHAPE = (3, 2, 3)
CFG_PP = sorted(CFG_PP_ORACLES)
BASE = {"euler_cfg_pp": ("euler", {}), "euler_ancestral_cfg_pp": ("euler_ancestral", {}),
        "dpmpp_2m_cfg_pp": ("dpmpp_2m", {}), "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral", {}),
        "res_multistep_cfg_pp": ("res_multistep", {}),
        "res_multistep_ancestral_cfg_pp": ("res_multistep_ancestral", {}),
        "gradient_estimation_cfg_pp": ("gradient_estimation", {}), "cfgpp_ud10_ab": ("euler", {})}
# the CFG++ sampler's options under which it reduces to BASE without guidance (default: none needed)
REDUCES_WITH = {"cfgpp_ud10_ab": {"history_weight": 0.0, "zero_weight": None, "uncond_history_weight": 0.0}}
# options that change the program, per sampler (test_options_and_oracles_registered)
OPTIONS = {"euler_ancestral_cfg_pp": {"eta": 0.5, "s_noise": 0.8},
           "dpmpp_2s_ancestral_cfg_pp": {"eta": 0.5, "s_noise": 0.8},
           "res_multistep_cfg_pp": {"eta": 0.3}, "res_multistep_ancestral_cfg_pp": {"eta": 0.7, "s_noise": 0.9},
           "gradient_estimation_cfg_pp": {"ge_gamma": 1.5},
           "cfgpp_ud10_ab": {"history_weight": 0.5, "zero_weight": 0.5, "uncond_history_weight": 0.3}}
# model evaluations per step (fused rows per step)
EVALS_PER_STEP = {"dpmpp_2s_ancestral_cfg_pp": 2}


class LabelledPair:
    """model(x, t, label): the cond model where label = 1, the uncond model where label = 0."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond = cond, uncond
        self.calls = 0

    def __call__(self, x, t, label):
        self.calls += 1
        pick = label.reshape((-1,) + (1,) * (x.dim() - 1)).bool()
        return torch.where(pick, self.cond(x, t), self.uncond(x, t))


def pair(schedule, prediction):
    base = GaussianMixture.default(schedule, dim=6, prediction=prediction)
    cond = GaussianMixture(schedule, base.means + 0.75, base.stds, base.weights, prediction=prediction)
    uncond = GaussianMixture(schedule, base.means - 0.5, base.stds * 1.3, base.weights, prediction=prediction)
    return cond, uncond


CASES = [
    ("sd-karras", lambda: DiscreteVP(beta_schedule="scaled_linear"), "karras", "epsilon"),
    ("sd-leading", lambda: DiscreteVP(beta_schedule="scaled_linear"), "leading", "v_prediction"),
    ("edm-karras", lambda: VESchedule(), "karras", "sample"),
]


def run_pair(name, grid, prediction, cond, uncond, guidance, seed=0, opts=None, backend="reference"):
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    zs = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(grid.steps)]
    sampler = Sampler.build(solver=name, grid=grid, prediction=prediction, guidance=guidance,
                            solver_options=opts, state_dtype=torch.float64)
    model = LabelledPair(cond, uncond)
    B = SHAPE[0]
    kw = {"cond": {"label": torch.ones(B)}, "uncond": {"label": torch.zeros(B)}} if guidance is not None else \
        {"model_kwargs": {"label": torch.ones(B)}}
    out = sampler(model, noise, noise_sampler=lambda row, x: zs[row.step], backend=backend, progress=False, **kw)
    x0 = noise * grid.schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    return out, x0, zs, sampler, model


def rel_err(out, ref):
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("convention,scale", [("w", 1.5), ("1+w", 0.5), ("w", 1.0)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("name", CFG_PP)
def test_program_equals_textbook(name, case, steps, convention, scale):
    _, schedule_fn, spacing, prediction = case
    schedule = schedule_fn()
    grid = make_grid(schedule, steps, spacing, **({"steps_offset": 1} if spacing == "leading" else {}))
    cond, uncond = pair(schedule, prediction)
    gd = Guidance(scale, convention=convention)
    out, x0, zs, sampler, model = run_pair(name, grid, prediction, cond, uncond, gd)
    ref = CFG_PP_ORACLES[name](guided(cond, uncond, scale, convention), x0, grid, prediction, noise=zs)
    err = rel_err(out, ref)
    assert err < 1e-10 * max(1.0, grid.ksigma[0] / 100.0), err
    # fused: one model call (both CFG halves batched) and one row per evaluation, even at g = 1
    assert model.calls == sampler.program.nfe == len(sampler.program.rows)
    assert grid.steps <= len(sampler.program.rows) <= EVALS_PER_STEP.get(name, 1) * grid.steps
    # the unconditional prediction matters: not the plain guided solver
    base, opts = BASE[name]
    plain, *_ = run_pair(base, grid, prediction, cond, uncond, gd, opts=opts)
    if grid.steps == 7:
        assert float((out - plain).abs().max()) > 1e-4


@pytest.mark.parametrize("name", CFG_PP)
def test_ancestral_options_and_oracles_registered(name):
    assert ORACLES[name] is CFG_PP_ORACLES[name]
    grid = make_grid(VESchedule(), 6, "karras")
    cond, uncond = pair(grid.schedule, "sample")
    opts = OPTIONS.get(name, {})
    out, x0, zs, *_ = run_pair(name, grid, "sample", cond, uncond, Guidance(2.0), opts=opts)
    ref = CFG_PP_ORACLES[name](guided(cond, uncond, 2.0), x0, grid, "sample", noise=zs, **opts)
    assert rel_err(out, ref) < 1e-10
    if opts:                                               # the options reach the program
        plain, *_ = run_pair(name, grid, "sample", cond, uncond, Guidance(2.0))
        assert float((out - plain).abs().max()) > 1e-6


@pytest.mark.parametrize("name", CFG_PP)
def test_without_guidance_is_the_base_solver(name):
    """No uncond pass: the unconditional prediction is the conditional one."""
    grid = make_grid(DiscreteVP(beta_schedule="scaled_linear"), 8, "karras")
    cond, uncond = pair(grid.schedule, "epsilon")
    out, *_ = run_pair(name, grid, "epsilon", cond, uncond, None, opts=REDUCES_WITH.get(name))
    base, opts = BASE[name]
    ref, *_ = run_pair(base, grid, "epsilon", cond, uncond, None, opts=opts)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("name", CFG_PP)
def test_cpu_backend_matches_reference(name):
    grid = make_grid(DiscreteVP(beta_schedule="scaled_linear"), 6, "karras")
    cond, uncond = pair(grid.schedule, "epsilon")
    B = SHAPE[0]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    s = Sampler.build(solver=name, grid=grid, prediction="epsilon", guidance=1.8)
    model = LabelledPair(lambda x, t: cond(x.double(), t.double()).float(), lambda x, t: uncond(x.double(), t.double()).float())
    kw = dict(cond={"label": torch.ones(B)}, uncond={"label": torch.zeros(B)}, seed=5, progress=False)
    a, b = s(model, noise, backend="cpu", **kw), s(model, noise, backend="reference", **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [None, Guidance(2.0)])
def test_cfgpp_ud10_ab_without_guidance_and_its_euler_limit(guidance):
    """cfgpp_ud10_ab's default options without guidance (U = D): the oracle with the cond model alone
    (Euler blended with AB2 and the extrapolated last step); with its history weights 0 and no zero
    extrapolation it is Euler CFG++ (and Euler without guidance)."""
    grid = make_grid(DiscreteVP(beta_schedule="scaled_linear"), 9, "karras")
    cond, uncond = pair(grid.schedule, "epsilon")
    out, x0, zs, sampler, model = run_pair("cfgpp_ud10_ab", grid, "epsilon", cond, uncond, guidance)
    ref = CFG_PP_ORACLES["cfgpp_ud10_ab"](cond if guidance is None else guided(cond, uncond, 2.0), x0, grid,
                                          "epsilon", noise=zs)
    assert rel_err(out, ref) < 1e-10
    assert model.calls == len(sampler.program.rows) == grid.steps
    limit, *_ = run_pair("cfgpp_ud10_ab", grid, "epsilon", cond, uncond, guidance, opts=REDUCES_WITH["cfgpp_ud10_ab"])
    euler, *_ = run_pair("euler" if guidance is None else "euler_cfg_pp", grid, "epsilon", cond, uncond, guidance)
    assert rel_err(limit, euler) < 1e-10 and float((out - euler).abs().max()) > 1e-4
    no_zero, *_ = run_pair("cfgpp_ud10_ab", grid, "epsilon", cond, uncond, guidance, opts={"zero_weight": None})
    ref = CFG_PP_ORACLES["cfgpp_ud10_ab"](cond if guidance is None else guided(cond, uncond, 2.0), x0, grid,
                                          "epsilon", noise=zs, zero_weight=None)
    assert rel_err(no_zero, ref) < 1e-10 and float((no_zero - out).abs().max()) > 1e-6


def test_cfg_pp_rejects_nonlinear_guidance_hooks():
    grid = make_grid(VESchedule(), 4, "karras")
    with pytest.raises(ValueError, match="CFG\\+\\+"):
        Sampler.build(solver="euler_cfg_pp", grid=grid, prediction="sample", guidance=Guidance(2.0, rescale=0.5))


# ---------------------------------------------------------------------------------------------
# Rows: the new optional fields, the old ones unchanged

def test_row_fields_backward_compatible():
    r = Row(step=0, point=None, out_x=Out(x=1.0, h=2.0, z=0.0, hist=((0, 1.0),)), hist_write=0)
    assert r.hist_value == Out(h=1.0) and not r.reads_uncond
    with pytest.raises(ValueError, match="hist_out"):
        Row(step=0, out_x=Out(x=1.0), hist_out=Out(hu=1.0))


# ---------------------------------------------------------------------------------------------
# Per-sample guidance: a batch equals its samples run alone, bit for bit

def elementwise_model(x, t, label):
    """Elementwise in x (so a sample's output does not depend on its batch): cond where label = 1."""
    tt = t.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype) / 1000.0
    lab = label.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)
    return torch.tanh(0.7 * x + tt) * (0.6 + 0.3 * lab) + 0.2 * lab * torch.sin(3.0 * x) - 0.1 * tt


SCALES = (1.0, 3.0, 7.5)


def _batch_vs_separate(solver, backend, guidance_for, *, state_dtype=torch.float32, steps=6, shape=(3, 4, 5, 6),
                       solver_options=None, batch_only=False):
    B = shape[0]
    grid = make_grid(DiscreteVP(beta_schedule="scaled_linear"), steps, "karras")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    zs = [torch.randn(shape, generator=torch.Generator().manual_seed(100 + n)) for n in range(steps)]

    def run(gd, idx):
        s = Sampler.build(solver=solver, grid=grid, prediction="epsilon", guidance=gd, state_dtype=state_dtype,
                          solver_options=solver_options)
        n = len(idx)
        return s(elementwise_model, noise[idx].clone(), cond={"label": torch.ones(n)},
                 uncond={"label": torch.zeros(n)}, noise_sampler=lambda row, x: zs[row.step][idx].to(x.dtype),
                 backend=backend, progress=False)

    batch = run(guidance_for(torch.tensor(SCALES)), list(range(B)))
    if batch_only:
        return batch
    for b, sc in enumerate(SCALES):
        alone = run(guidance_for(sc), [b])
        assert torch.equal(batch[b:b + 1], alone), f"sample {b} (scale {sc}): max |diff| " \
                                                    f"{float((batch[b:b + 1] - alone).abs().max())}"
        one = run(guidance_for(torch.tensor([sc])), [b])        # a vector of one scale: the same
        assert torch.equal(one, alone)
    return batch


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler", "heun", "euler_ancestral", "euler_cfg_pp",
                                    "dpmpp_2m_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                                    "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp",
                                    "gradient_estimation_cfg_pp", "cfgpp_ud10_ab"])
def test_batch_of_3_scales_equals_separate_runs_bitwise(solver, backend):
    batch = _batch_vs_separate(solver, backend, lambda s: s)
    assert torch.isfinite(batch).all()
    # and the scales matter
    same = _batch_vs_separate(solver, backend, lambda s: 3.0, batch_only=True)
    assert float((batch[2] - same[2]).abs().max()) > 1e-3


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_per_sample_scales_with_convention_and_interval(backend):
    """'1+w' and a guidance interval: g_b = 1 + w_b inside the interval, 1 outside it."""
    _batch_vs_separate("dpmpp_2m", backend, lambda s: Guidance(s, convention="1+w", interval=(0.5, 5.0)))
    _batch_vs_separate("euler_cfg_pp", backend, lambda s: Guidance(s, interval=(0.5, 5.0)))


def test_per_sample_float64_state():
    _batch_vs_separate("dpmpp_2m", "reference", lambda s: s, state_dtype=torch.float64)


def test_per_sample_scales_bad_input():
    grid = make_grid(DiscreteVP(), 3, "karras")
    s = Sampler.build(solver="euler", grid=grid, guidance=torch.tensor([1.0, 2.0]))
    noise = torch.randn(3, 4)
    with pytest.raises(ValueError, match="per-sample scales for a batch of 3"):
        s(elementwise_model, noise, cond={"label": torch.ones(3)}, uncond={"label": torch.zeros(3)}, progress=False)
    with pytest.raises(ValueError, match="per-sample"):
        Guidance(torch.tensor([1.0, 2.0]), rescale=0.5)
    with pytest.raises(ValueError):
        Guidance(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        Guidance([1.0, float("nan")])
    x = torch.zeros(2, 3)
    T = torch.zeros(1, fastdiff.program.table_width(0), dtype=torch.float64)
    for bad, exc in ((torch.tensor([1.0, 2.0, 3.0]), ValueError), (torch.tensor([1, 2]), TypeError),
                     (torch.tensor([1.0, float("inf")]), ValueError)):
        with pytest.raises(exc, match="guidance"):
            ops.fused_step(T, 0, x, cond=x.clone(), uncond=x.clone(), guidance=bad, backend="cpu")


def test_sample_function_takes_a_scale_vector():
    grid = make_grid(DiscreteVP(), 4, "karras")
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(cond={"label": torch.ones(3)}, uncond={"label": torch.zeros(3)}, progress=False)
    out = fastdiff.sample(elementwise_model, noise, solver="dpmpp_2m", grid=grid, guidance=torch.tensor(SCALES), **kw)
    for b, sc in enumerate(SCALES):
        alone = fastdiff.sample(elementwise_model, noise[b:b + 1], solver="dpmpp_2m", grid=grid, guidance=sc,
                                cond={"label": torch.ones(1)}, uncond={"label": torch.zeros(1)}, progress=False)
        assert torch.equal(out[b:b + 1], alone)


# ---------------------------------------------------------------------------------------------
# k-diffusion signatures: model(x, sigma, **extra_args) -> (denoised, uncond_denoised)

@pytest.mark.parametrize("name", CFG_PP)
def test_k_diffusion_functions_equal_the_oracle(name):
    from fastdiff.integrations import k_diffusion as K
    grid = make_grid(VESchedule(), 7, "karras")
    cond, uncond = pair(grid.schedule, "sample")
    scale = 1.7

    def denoiser(x, sigma, shift):           # a ComfyUI-style wrapper: CFG inside, uncond on the side
        c, u = cond(x + shift, sigma), uncond(x + shift, sigma)
        return u + scale * (c - u), u

    sigmas = torch.from_numpy(grid.sigma.copy())
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * float(sigmas[0])
    zs = [torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + i)) for i in range(7)]
    draws = iter(zs)
    stochastic = name in ("euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp")
    kw = {"noise_sampler": lambda s, sn: next(draws)} if stochastic else {}
    seen = []
    out = getattr(K, f"sample_{name}")(denoiser, x.clone(), sigmas, extra_args={"shift": 0.0}, disable=True,
                                       callback=lambda d: seen.append(d["i"]), **kw)
    ref = CFG_PP_ORACLES[name](guided(cond, uncond, scale), x.clone(), grid, "sample", noise=zs)
    assert rel_err(out, ref) < 1e-10
    assert seen == list(range(7))
    with pytest.raises(TypeError, match="uncond_denoised"):
        getattr(K, f"sample_{name}")(lambda x, s, shift: cond(x, s), x.clone(), sigmas, extra_args={"shift": 0.0},
                                     disable=True)


@pytest.mark.parametrize("name", ["euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                                  "res_multistep_ancestral_cfg_pp", "res_multistep_cfg_pp"])
def test_k_diffusion_torch_noise_is_comfyuis_draw_order(name):
    """noise='torch': torch.randn_like(x) at every step whose next sigma is > 0, as ComfyUI draws (also
    where it multiplies the draw by 0), so torch's RNG ends where ComfyUI leaves it."""
    from fastdiff.integrations import k_diffusion as K
    grid = make_grid(VESchedule(), 6, "karras")
    cond, uncond = pair(grid.schedule, "sample")
    sigmas = torch.from_numpy(grid.sigma.copy())
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * float(sigmas[0])

    def denoiser(x, sigma):
        c, u = cond(x, sigma), uncond(x, sigma)
        return u + 1.5 * (c - u), u

    torch.manual_seed(11)
    out = getattr(K, f"sample_{name}")(denoiser, x.clone(), sigmas, disable=True, noise="torch")
    after = torch.randn(1)
    torch.manual_seed(11)
    zs = [torch.randn_like(x) for i in range(grid.steps) if sigmas[i + 1] > 0]
    assert torch.equal(torch.randn(1), after)
    ref = CFG_PP_ORACLES[name](guided(cond, uncond, 1.5), x.clone(), grid, "sample", noise=zs)
    assert rel_err(out, ref) < 1e-10
