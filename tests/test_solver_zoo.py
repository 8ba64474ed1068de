"""The solver zoo: DPM-Solver (singlestep, multistep, ++, SDE), DPM-2, LMS, DEIS, UniPC, EDM churn and
the flow-matching aliases (fastdiff.solvers.dpm_solver / multistep / edm / flow).

1. Each coefficient program equals its textbook form (fastdiff.textbook.zoo) over whole
   trajectories: float64 state, reference backend, relative error < 1e-10, for several schedules,
   spacings, step counts, final points and model predictions.
2. Parity with what users run: k-diffusion's samplers on the same noise (float64, 1e-10) and
   diffusers' schedulers (which compute in float32, hence 5e-5).
3. Convergence order on the Gaussian mixture (VE, Karras grid to sigma_min, final='none') against
   its DOP853 solution: fitted log-log slope within 0.3 of the theoretical order.
4. Moments of the stochastic samplers: from exact samples of the noisy marginal at sigma = 2 down
   to sigma = 0.3, whose mean and covariance are the mixture's, plus 0.3^2 I.
5. Bad input: clear ValueErrors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import Sampler, sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import ContinuousVP, DiscreteVP, FlowMatching, Grid, VESchedule, make_grid, time_shift
from fastdiff.solvers import SOLVERS, get_solver
from fastdiff.textbook import ORACLES
from fastdiff.textbook.zoo import ZOO_ORACLES

ZOO_MODULES = {f"fastdiff.solvers.{m}" for m in ("dpm_solver", "multistep", "edm", "flow")}
# (the foundation solvers among them, e.g. dpmpp_2m, have their oracle in fastdiff.textbook.ORACLES,
# judged by tests/test_solvers_textbook.py)
ZOO = sorted(n for n, cls in SOLVERS.items() if cls.__module__ in ZOO_MODULES and n not in ORACLES)


def test_every_zoo_solver_has_an_oracle():
    assert len(ZOO) >= 17
    assert sorted(ZOO_ORACLES) == ZOO


# ---------------------------------------------------------------------------------------------
# 1. Program == textbook

TOL = 1e-10
SHAPE = (3, 2, 2)
STEPS = (1, 2, 6, 16)       # 16: lower_order_final applies below 15 steps only

VARIANTS = [
    ("dpm_solver", {"order": 1}), ("dpm_solver", {"order": 2}), ("dpm_solver", {}),
    ("dpm_solver_multistep", {}),
    ("dpm_solver_multistep", {"order": 3, "solver_type": "heun", "lower_order_final": False}),
    ("dpm_solver_multistep", {"order": 3, "algorithm_type": "dpmsolver++", "euler_at_final": True,
                              "third_order": "taylor"}),
    ("dpmpp_3m", {}),
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_2s", {}), ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("dpmpp_sde", {}), ("dpmpp_sde", {"brownian": False, "eta": 0.6, "r": 0.3}),
    ("dpm_2", {}), ("dpm_2", {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 10.0}),
    ("dpm_2_ancestral", {}), ("dpm_2_ancestral", {"eta": 0.5}),
    ("lms", {}), ("lms", {"order": 2}),
    ("deis", {}), ("deis", {"order": 3}), ("deis", {"order": 3, "lower_order_final": False}),
    ("unipc", {}), ("unipc", {"order": 3}),
    ("unipc", {"order": 3, "solver_type": "bh1", "disable_corrector": [1, 2]}),
    ("unipc", {"order": 1, "predict_x0": False}),
    ("unipc", {"order": 3, "use_corrector": False, "lower_order_final": False}),
    ("edm_euler", {"s_churn": 20.0}), ("edm_heun", {}),
    ("edm_heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.007}),
    ("flow_euler", {}), ("flow_heun", {}),
]

# Which variants can start at alpha = 0 (flow t = 1): data-prediction exponential integrators and
# the ODE solvers in flow coordinates (without churn, which needs VE coordinates).
STARTS_AT_ALPHA_0 = {"dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "edm_euler", "edm_heun", "dpm_2", "lms",
                     "flow_euler", "flow_heun"}

CASES = [  # id, schedule, spacing, final, predictions, grid options
    ("ve-karras", VESchedule, "karras", "zero", ("sample", "epsilon"), {}),
    ("ve-exponential-none", VESchedule, "exponential", "none", ("score",), {}),
    ("sd-leading", DiscreteVP, "leading", "zero", ("epsilon", "v_prediction"), {"steps_offset": 1}),
    ("sd-trailing-sigma_min", DiscreteVP, "trailing", "sigma_min", ("sample",), {}),
    ("cvp-logsnr", ContinuousVP, "logsnr", "zero", ("v_prediction",), {}),
    ("flow-shift3", FlowMatching, "uniform", "zero", ("flow",), {"shift": 3.0}),
]


def _applies(name, opts, case_id):
    """Whether a variant can run the case: a flow grid starts at alpha = 0."""
    if case_id == "flow-shift3":
        return (name in STARTS_AT_ALPHA_0 and not opts.get("s_churn")) or \
            (name == "dpm_solver_multistep" and opts.get("algorithm_type") == "dpmsolver++")
    return True


def _variant_id(name, opts):
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def _zoo_noise_sampler(name, draws, draws2):
    """fastdiff's noise for the rows, as the oracle takes it (per step; dpmpp_sde: per stage)."""
    if name == "dpmpp_sde":
        return lambda row, x: (draws if row.out_y is not None else draws2)[row.step]
    return lambda row, x: draws[row.step]


def run_program_and_oracle(name, opts, grid, prediction, seed=0):
    schedule = grid.schedule
    model = GaussianMixture.default(schedule, dim=int(np.prod(SHAPE[1:])), prediction=prediction)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    draws = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(grid.steps)]
    draws2 = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(grid.steps)]
    sampler = Sampler.build(solver=name, grid=grid, prediction=prediction, solver_options=opts,
                            state_dtype=torch.float64)
    out = sampler(model, noise, noise_sampler=_zoo_noise_sampler(name, draws, draws2), backend="reference",
                  progress=False)
    x = noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    oracle_noise = list(zip(draws, draws2)) if name == "dpmpp_sde" else draws
    ref = ZOO_ORACLES[name](model, x, grid, prediction, noise=oracle_noise, **opts)
    return out, ref


@pytest.mark.parametrize("name, opts, case", [
    pytest.param(n, o, c, id=f"{_variant_id(n, o)}-{c[0]}") for n, o in VARIANTS for c in CASES if _applies(n, o, c[0])])
def test_program_equals_textbook(name, opts, case):
    case_id, schedule_cls, spacing, final, predictions, grid_options = case
    schedule = schedule_cls()
    for k, steps in enumerate(STEPS):
        grid = make_grid(schedule, steps, spacing, final=final, **grid_options)
        prediction = predictions[k % len(predictions)]
        out, ref = run_program_and_oracle(name, opts, grid, prediction, seed=k)
        assert torch.isfinite(ref).all()
        err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert err < TOL, f"{steps} steps, {prediction}: program vs textbook relative error {err:.3g}"


def test_oracle_comparison_detects_a_wrong_option():
    """The oracle comparison has teeth: a program built with different options disagrees by far more."""
    grid = make_grid(VESchedule(), 8, "karras")
    for name, opts, other in [("unipc", {"order": 3}, {"order": 2}), ("deis", {"order": 3}, {"order": 2}),
                              ("dpmpp_sde", {}, {"brownian": False}),
                              ("dpm_solver_multistep", {"order": 3, "third_order": "taylor"}, {"order": 3})]:
        model = GaussianMixture.default(grid.schedule, dim=4, prediction="epsilon")
        noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        draws = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(grid.steps)]
        out = sample(model, noise, solver=name, solver_options=opts, grid=grid, state_dtype=torch.float64,
                     backend="reference", progress=False, noise_sampler=lambda r, x: draws[r.step])
        pairs = list(zip(draws, draws)) if name == "dpmpp_sde" else draws
        wrong = ZOO_ORACLES[name](model, noise * 80.0, grid, "epsilon", noise=pairs, **other)
        assert float((out - wrong).abs().max()) > 1e-4, (name, opts, other)


# ---------------------------------------------------------------------------------------------
# Identities between solvers (exact: same tables)


def _table(name, grid, **opts):
    # a flow-prediction model converts to x0 everywhere, also at alpha = 0
    return Sampler.build(solver=name, grid=grid, prediction="flow", solver_options=opts).program.table


@pytest.mark.parametrize("grid", [make_grid(VESchedule(), 9, "karras"), make_grid(DiscreteVP(), 7, "trailing"),
                                  make_grid(FlowMatching(), 6, "uniform", mu=0.7)], ids=["ve", "vp", "flow"])
def test_edm_without_churn_and_flow_aliases_are_euler_and_heun(grid):
    space = grid.schedule.ode_space
    assert np.array_equal(_table("edm_euler", grid), _table("euler", grid))
    assert np.array_equal(_table("edm_heun", grid), _table("heun", grid))
    assert np.array_equal(_table("flow_euler", grid), _table("euler", grid, ode_space="flow"))
    assert np.array_equal(_table("flow_heun", grid), _table("heun", grid, ode_space="flow"))
    if space == "ve":   # dpm_2 is DPM-Solver-2 (r = 1/2) written in the VE coordinates
        a = sample(GaussianMixture.default(grid.schedule), torch.ones(2, 2), solver="dpm_2", grid=grid,
                   state_dtype=torch.float64, backend="reference", progress=False)
        b = sample(GaussianMixture.default(grid.schedule), torch.ones(2, 2), solver="dpm_solver",
                   solver_options={"order": 2}, grid=grid, state_dtype=torch.float64, backend="reference",
                   progress=False)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_multistep_identities():
    grid = make_grid(DiscreteVP(), 20, "leading")
    # the general multistep class reproduces the foundation's DPM-Solver++(2M)
    assert np.allclose(_table("dpm_solver_multistep", grid, algorithm_type="dpmsolver++", lower_order_final=False),
                       _table("dpmpp_2m", grid), rtol=1e-14, atol=0)
    # Two derivations of the same method: DEIS-k (exact integrals of the interpolant of eps in
    # log rho = -lambda; diffusers' closed forms) and multistep DPM-Solver-k on eps with the exact
    # integral of the linear term ('heun') and the Taylor D2 term.
    grid = make_grid(VESchedule(), 20, "karras", final="none")
    deis = _table("deis", grid, order=3, lower_order_final=False)
    dpm = _table("dpm_solver_multistep", grid, order=3, solver_type="heun", third_order="taylor",
                 lower_order_final=False)
    assert np.allclose(deis, dpm, rtol=1e-10, atol=1e-12)
    diffusers_form = _table("dpm_solver_multistep", grid, order=3, lower_order_final=False)
    assert not np.allclose(deis, diffusers_form, rtol=1e-3)


def test_row_structure_churn_unipc_and_sde_noise():
    grid = make_grid(VESchedule(), 6, "karras")
    rows = get_solver("edm_heun", s_churn=30.0, s_tmin=1.0).rows(grid)
    churn = [r for r in rows if r.point is None]
    assert churn and all(r.out_y is None and r.out_x.z > 0 and r.out_x.h == 0 and r.noise_id >= 0 for r in churn)
    assert len(churn) == sum(grid.ksigma[:-1] >= 1.0)          # only inside [s_tmin, s_tmax]
    ids = [r.noise_id for r in rows if r.noise_id >= 0]
    assert ids == list(range(len(ids)))                          # draws numbered in call order

    rows = get_solver("unipc", order=2).rows(grid)
    assert rows[0].eval_at == "x" and rows[0].out_x is None and rows[0].out_y is not None
    assert all(r.eval_at == "y" and r.out_x is not None and r.out_y is not None for r in rows[1:-1])
    assert rows[-1].out_y is None and rows[-1].out_x is not None
    assert all(r.needs_model for r in rows) and len(rows) == grid.steps   # one model call per step

    rows = get_solver("dpmpp_sde").rows(grid)
    ids = [r.noise_id for r in rows if r.noise_id >= 0]
    assert len(ids) == 2 * (grid.steps - 1) and len(set(ids)) == len(ids)
    # the coupled second stage reads its evaluation point (the first stage's output) and its history slot
    second = [r for r in rows if r.eval_at == "y"]
    assert all(r.out_x.y != 0 and r.out_x.slots == (0,) for r in second)


# ---------------------------------------------------------------------------------------------
# 2. Parity with k-diffusion (same noise) and diffusers


@pytest.fixture(scope="module")
def K():
    from kdiffusion_loader import load_kdiffusion_sampling
    return load_kdiffusion_sampling()


def _kd_setup(steps, seed, final="zero"):
    schedule = VESchedule()
    grid = make_grid(schedule, steps, "karras", final=final)
    gm = GaussianMixture.default(schedule, dim=4, prediction="sample")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(5, 4, dtype=torch.float64, generator=g)
    draws = [torch.randn(5, 4, dtype=torch.float64, generator=g) for _ in range(2 * steps)]
    return grid, gm, noise, draws, torch.tensor(grid.ksigma)


def _fd(name, opts, grid, gm, noise, noise_for_row):
    return sample(gm, noise, solver=name, solver_options=opts, grid=grid, prediction="sample",
                  state_dtype=torch.float64, backend="reference", progress=False, noise_sampler=noise_for_row)


def _sequence(draws):
    """A k-diffusion noise_sampler returning the draws in call order."""
    it = iter(draws)
    return lambda sigma, sigma_next: next(it)


def _assert_parity(out, ref, tol=1e-10):
    err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err < tol, f"relative error {err:.3g}"


KD_ANCESTRAL = [
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.7}),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 1.0, "r": 0.4, "brownian": False}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.6, "solver_type": "heun", "s_noise": 1.1}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}),
]


@pytest.mark.parametrize("steps", [2, 7, 12])
@pytest.mark.parametrize("name, kd_name, opts", KD_ANCESTRAL, ids=[_variant_id(n, o) for n, _, o in KD_ANCESTRAL])
def test_k_diffusion_parity_noise_samplers(K, name, kd_name, opts, steps):
    grid, gm, noise, draws, sigmas = _kd_setup(steps, seed=steps)
    out = _fd(name, opts, grid, gm, noise, lambda row, x: draws[row.noise_id])
    kd_opts = {k: v for k, v in opts.items() if k != "brownian"}
    ref = getattr(K, kd_name)(lambda x, s: gm.x0(x, 1.0, s), noise * 80.0, sigmas, noise_sampler=_sequence(draws),
                              disable=True, **kd_opts)
    _assert_parity(out, ref)


def test_k_diffusion_parity_dpmpp_sde_brownian(K):
    """With brownian=True the second draw of a step is a z1 + b z' (z' = the row's own draw): given
    that draw, k-diffusion's sample_dpmpp_sde gives the same result."""
    steps, r = 9, 0.5
    grid, gm, noise, draws, sigmas = _kd_setup(steps, seed=3)
    out = _fd("dpmpp_sde", {"r": r}, grid, gm, noise, lambda row, x: draws[row.noise_id])
    kd_draws = []
    for n in range(steps - 1):          # the last step (to 0) draws nothing
        s, s_next = float(sigmas[n]), float(sigmas[n + 1])
        s_mid = math.exp(-(-math.log(s) + r * (math.log(s) - math.log(s_next))))
        z1, z_fresh = draws[2 * n], draws[2 * n + 1]
        z2 = (math.sqrt(s - s_mid) * z1 + math.sqrt(s_mid - s_next) * z_fresh) / math.sqrt(s - s_next)
        kd_draws += [z1, z2]
    ref = K.sample_dpmpp_sde(lambda x, sg: gm.x0(x, 1.0, sg), noise * 80.0, sigmas, noise_sampler=_sequence(kd_draws),
                             r=r, disable=True)
    _assert_parity(out, ref)


@pytest.mark.parametrize("steps", [1, 6, 13])
@pytest.mark.parametrize("name, kd_name", [("edm_euler", "sample_euler"), ("edm_heun", "sample_heun"),
                                           ("dpm_2", "sample_dpm_2")])
@pytest.mark.parametrize("s_churn", [0.0, 3.0, 40.0])
def test_k_diffusion_parity_churn(K, name, kd_name, s_churn, steps):
    """k-diffusion draws torch.randn_like(x) every step; the same draws feed fastdiff's churn rows."""
    grid, gm, noise, _, sigmas = _kd_setup(steps, seed=11)
    churn = {"s_churn": s_churn, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.003}
    torch.manual_seed(123)
    ref = getattr(K, kd_name)(lambda x, s: gm.x0(x, 1.0, s), noise * 80.0, sigmas, disable=True, **churn)
    torch.manual_seed(123)
    per_step = [torch.randn_like(noise) for _ in range(steps)]
    out = _fd(name, churn, grid, gm, noise, lambda row, x: per_step[row.step])
    _assert_parity(out, ref)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_k_diffusion_parity_lms(K, order):
    grid, gm, noise, _, sigmas = _kd_setup(11, seed=order)
    out = _fd("lms", {"order": order}, grid, gm, noise, None)
    ref = K.sample_lms(lambda x, s: gm.x0(x, 1.0, s), noise * 80.0, sigmas, order=order, disable=True)
    _assert_parity(out, ref)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_k_diffusion_parity_dpm_solver_steps(K, order):
    """dpm_solver = k-diffusion's DPMSolver.dpm_solver_{1,2,3}_step taken on every step of the grid."""
    grid, gm, noise, _, sigmas = _kd_setup(7, seed=order, final="none")
    out = _fd("dpm_solver", {"order": order}, grid, gm, noise, None)
    solver = K.DPMSolver(lambda x, s: gm.x0(x, 1.0, s))
    step = getattr(solver, f"dpm_solver_{order}_step")
    x = noise * 80.0
    for i in range(grid.steps):
        x, _ = step(x, solver.t(sigmas[i]), solver.t(sigmas[i + 1]))
    _assert_parity(out, x)


DIFFUSERS_TOL = 5e-5   # diffusers keeps sigmas (and DPMSolverMultistep the sample) in float32
# diffusers' own deprecations (numpy 2 __array__, algorithm_type='dpmsolver') are not ours to fix
quiet_diffusers = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _diffusers_run(scheduler, model, noise, B, variance_noise=None):
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        out = model(x, t.reshape(1).expand(B).to(torch.float64))
        kw = {"variance_noise": variance_noise[i]} if variance_noise is not None else {}
        x = scheduler.step(out, t, x, **kw).prev_sample.to(torch.float64)
    return x


def _diffusers_vs_fastdiff(cls, config, name, opts, steps, final, prediction="epsilon", sde=False):
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction,
                    **config)
    scheduler.set_timesteps(steps)
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    grid = Grid.from_times(schedule, scheduler.timesteps.numpy().astype(np.float64), final=final)
    gm = GaussianMixture.default(schedule, dim=4, prediction=prediction)
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(4, 4, dtype=torch.float64, generator=g)
    draws = [torch.randn(4, 4, dtype=torch.float64, generator=g) for _ in range(steps)] if sde else None
    ref = _diffusers_run(scheduler, gm, noise, 4, draws)
    out = sample(gm, noise, solver=name, solver_options=opts, grid=grid, prediction=prediction,
                 state_dtype=torch.float64, backend="reference", progress=False,
                 noise_sampler=(lambda r, x: draws[r.step]) if sde else None)
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


UNIPC_CONFIGS = [  # (fastdiff options, final): diffusers' bh1 / noise-prediction UniPC give NaN on a final
    # step to sigma = 0 (B(h) = -inf times a zero residual), so those run to sigma_min
    ({"order": 2}, "zero"), ({"order": 3}, "zero"), ({"order": 1}, "zero"),
    ({"order": 3, "solver_type": "bh1"}, "sigma_min"), ({"order": 2, "predict_x0": False}, "sigma_min"),
    ({"order": 3, "disable_corrector": [0, 2, 3]}, "zero"), ({"order": 3, "lower_order_final": False}, "sigma_min"),
]


@quiet_diffusers
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("opts, final", UNIPC_CONFIGS, ids=[_variant_id("unipc", o) + f"-{f}" for o, f in UNIPC_CONFIGS])
def test_diffusers_parity_unipc(opts, final, steps):
    diffusers = pytest.importorskip("diffusers")
    config = {"solver_order": opts.get("order", 2), "solver_type": opts.get("solver_type", "bh2"),
              "predict_x0": opts.get("predict_x0", True), "disable_corrector": opts.get("disable_corrector", []),
              "lower_order_final": opts.get("lower_order_final", True), "final_sigmas_type": final}
    err = _diffusers_vs_fastdiff(diffusers.UniPCMultistepScheduler, config, "unipc", opts, steps, final,
                                 prediction="v_prediction" if opts.get("order") == 1 else "epsilon")
    assert err < DIFFUSERS_TOL


@quiet_diffusers
@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_diffusers_parity_deis(order, steps):
    diffusers = pytest.importorskip("diffusers")
    err = _diffusers_vs_fastdiff(diffusers.DEISMultistepScheduler, {"solver_order": order}, "deis", {"order": order},
                                 steps, "sigma_min", prediction="sample")
    assert err < DIFFUSERS_TOL


DPM_CONFIGS = [  # fastdiff options (diffusers: the same names, order -> solver_order), final
    ({"order": 2, "algorithm_type": "dpmsolver"}, "sigma_min"),
    ({"order": 3, "algorithm_type": "dpmsolver", "solver_type": "heun"}, "sigma_min"),
    ({"order": 3, "algorithm_type": "dpmsolver++"}, "zero"),
    ({"order": 3, "algorithm_type": "dpmsolver++", "lower_order_final": False}, "sigma_min"),
    ({"order": 2, "algorithm_type": "dpmsolver++", "solver_type": "heun", "euler_at_final": True}, "sigma_min"),
    ({"order": 2, "algorithm_type": "dpmsolver++", "eta": 1.0}, "zero"),             # sde-dpmsolver++
    ({"order": 2, "algorithm_type": "dpmsolver++", "eta": 1.0, "solver_type": "heun"}, "sigma_min"),
]


@quiet_diffusers
@pytest.mark.parametrize("steps", [1, 6, 20])
@pytest.mark.parametrize("opts, final", DPM_CONFIGS, ids=[_variant_id("dpm", o) + f"-{f}" for o, f in DPM_CONFIGS])
def test_diffusers_parity_dpm_solver_multistep(opts, final, steps):
    diffusers = pytest.importorskip("diffusers")
    config = {k: v for k, v in opts.items() if k not in ("order", "eta")}
    config["solver_order"] = opts["order"]
    config["final_sigmas_type"] = final
    if opts.get("eta"):
        config["algorithm_type"] = "sde-dpmsolver++"
    err = _diffusers_vs_fastdiff(diffusers.DPMSolverMultistepScheduler, config, "dpm_solver_multistep", opts, steps,
                                 final, sde=bool(opts.get("eta")))
    assert err < DIFFUSERS_TOL


@quiet_diffusers
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("kind, shift, mu", [("euler", 1.0, None), ("euler", 3.0, None), ("euler", 1.0, 0.8),
                                             ("heun", 3.0, None)])
def test_diffusers_parity_flow_matching(kind, shift, mu, steps):
    """flow_euler / flow_heun on make_grid(FlowMatching(...), shift=, mu=) are diffusers'
    FlowMatch{Euler,Heun}DiscreteScheduler. diffusers shifts its smallest time 1/T twice with a
    static shift: FlowMatching(t_min=time_shift(1/T, shift)) reproduces that grid."""
    diffusers = pytest.importorskip("diffusers")
    cls = diffusers.FlowMatchEulerDiscreteScheduler if kind == "euler" else diffusers.FlowMatchHeunDiscreteScheduler
    scheduler = cls(use_dynamic_shifting=True) if mu is not None else cls(shift=shift)
    scheduler.set_timesteps(steps, **({"mu": mu} if mu is not None else {}))
    schedule = FlowMatching() if mu is not None else FlowMatching(t_min=float(time_shift(1 / 1000, shift)))
    grid = make_grid(schedule, steps, "uniform", shift=shift, mu=mu)
    sigmas = scheduler.sigmas.numpy()[::2 if kind == "heun" else 1][:steps]     # heun repeats the inner ones
    assert np.allclose(grid.sigma, np.append(sigmas, 0.0), rtol=1e-6, atol=1e-7)
    gm = GaussianMixture.default(schedule, dim=4, prediction="flow")
    noise = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ref = _diffusers_run(scheduler, gm, noise, 4)
    s = Sampler.build(solver=f"flow_{kind}", grid=grid, prediction="flow", state_dtype=torch.float64)
    assert s.program.nfe == len(scheduler.timesteps)
    out = s(gm, noise, backend="reference", progress=False)
    assert float((out - ref).abs().max()) < DIFFUSERS_TOL


# ---------------------------------------------------------------------------------------------
# 3. Convergence order

ORDER_TOL = 0.3
SHORT = (16, 24, 32, 48, 64)        # solvers in their asymptotic range already
LONG = (64, 96, 128, 192, 256)      # the eps-interpolating multistep methods get there later

# name, options, step counts; the expected order is the solver's own (solver.order), measured here
CONVERGENCE = [
    ("dpm_solver", {"order": 1}, SHORT), ("dpm_solver", {"order": 2}, SHORT),
    ("dpm_solver", {"order": 3}, (12, 16, 24, 32, 48)),
    ("dpm_solver_multistep", {"order": 2}, SHORT),
    ("dpm_solver_multistep", {"order": 3, "third_order": "taylor"}, LONG),
    # diffusers' / k-diffusion's third-order formula (see DPMSolverMultistep.third_order): order 2
    ("dpm_solver_multistep", {"order": 3}, (128, 192, 256, 384, 512)),
    ("dpmpp_3m", {}, (128, 192, 256, 384, 512)),
    ("dpmpp_3m", {"third_order": "taylor"}, (32, 48, 64, 96, 128)),
    ("dpmpp_2s", {}, SHORT), ("dpm_2", {}, SHORT),
    ("edm_euler", {}, SHORT), ("edm_heun", {}, SHORT),
    ("flow_euler", {}, SHORT), ("flow_heun", {}, SHORT),
    ("lms", {"order": 1}, SHORT), ("lms", {"order": 2}, (32, 48, 64, 96, 128)),
    ("lms", {"order": 3}, LONG), ("lms", {"order": 4}, LONG),
    ("deis", {"order": 1}, SHORT), ("deis", {"order": 2}, SHORT), ("deis", {"order": 3}, LONG),
    # UniPC-p with the corrector has order p + 1 (Zhao et al. 2023), the predictor alone p
    ("unipc", {"order": 1}, SHORT), ("unipc", {"order": 2}, SHORT), ("unipc", {"order": 3}, SHORT),
    ("unipc", {"order": 2, "solver_type": "bh1"}, (32, 48, 64, 96, 128)),
    ("unipc", {"order": 3, "solver_type": "bh1"}, SHORT),
    ("unipc", {"order": 2, "predict_x0": False}, SHORT),
    ("unipc", {"order": 2, "use_corrector": False}, SHORT),
    ("unipc", {"order": 3, "use_corrector": False}, SHORT),
]


@pytest.fixture(scope="module")
def ode_problem():
    schedule = VESchedule(0.002, 80.0)
    gm = GaussianMixture.default(schedule, dim=2, prediction="sample")
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return schedule, gm, noise, gm.solve_ode(noise * 80.0, 80.0, 0.002)


def fitted_order(ode_problem, name, opts, steps):
    schedule, gm, noise, ref = ode_problem
    errs = []
    for n in steps:
        x = sample(gm, noise, solver=name, solver_options=opts, steps=n, schedule=schedule, final="none",
                   prediction="sample", state_dtype=torch.float64, backend="reference", progress=False)
        errs.append(float((x - ref).pow(2).mean().sqrt()))
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name, opts, steps", CONVERGENCE, ids=[_variant_id(n, o) for n, o, _ in CONVERGENCE])
def test_convergence_order(ode_problem, name, opts, steps):
    order = get_solver(name, **opts).order
    slope, errs = fitted_order(ode_problem, name, opts, steps)
    assert abs(slope - order) < ORDER_TOL, f"fitted order {slope:.2f}, expected {order} (solver.order); errors {errs}"


# ---------------------------------------------------------------------------------------------
# 4. Moments of the stochastic samplers

N_SAMPLES = 20000
SIGMA_A, SIGMA_B, MOMENT_STEPS = 2.0, 0.3, 20
Z_TOL = 5.0   # standard errors, estimated from the samples; the samplers' own bias here is <= 2.5 of them

STOCHASTIC = [
    ("dpmpp_2s_ancestral", {}), ("dpm_2_ancestral", {}), ("dpmpp_sde", {}), ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_3m_sde", {}),
    ("edm_heun", {"s_churn": 4.0}), ("dpm_2", {"s_churn": 4.0}),
]


@pytest.fixture(scope="module")
def marginal():
    """20000 exact samples of the mixture's noisy marginal at SIGMA_A (x = x0 + SIGMA_A z)."""
    schedule = VESchedule(SIGMA_B, SIGMA_A)
    gm = GaussianMixture.default(schedule, dim=2, prediction="epsilon")
    g = torch.Generator().manual_seed(0)
    x_a = gm.sample_data(N_SAMPLES, generator=g) + SIGMA_A * torch.randn(N_SAMPLES, 2, dtype=torch.float64, generator=g)
    return schedule, gm, x_a.float()


def moment_z_scores(marginal, name, opts):
    """Largest |sample moment - true moment| / standard error over the mean and covariance entries."""
    schedule, gm, x_a = marginal
    grid = make_grid(schedule, MOMENT_STEPS, "karras", final="none")
    s = Sampler.build(solver=name, solver_options=opts, grid=grid, prediction="epsilon")
    x = s(gm, torch.zeros_like(x_a), x_init=x_a, seed=3, progress=False).double()
    mean, cov = gm.mean, gm.cov + SIGMA_B ** 2 * torch.eye(2, dtype=torch.float64)
    m, c = x.mean(0), torch.cov(x.T)
    d = x - m
    se_m = (torch.diag(c) / N_SAMPLES).sqrt()
    se_c = (d[:, :, None] * d[:, None, :]).std(0) / N_SAMPLES ** 0.5
    return float(((m - mean).abs() / se_m).max()), float(((c - cov).abs() / se_c).max())


@pytest.mark.parametrize("name, opts", STOCHASTIC, ids=[_variant_id(n, o) for n, o in STOCHASTIC])
def test_stochastic_samplers_keep_the_marginal(marginal, name, opts):
    assert get_solver(name, **opts).stochastic
    z_mean, z_cov = moment_z_scores(marginal, name, opts)
    assert z_mean < Z_TOL and z_cov < Z_TOL, f"mean off by {z_mean:.1f}, covariance by {z_cov:.1f} standard errors"


@pytest.mark.parametrize("name, opts", [("dpmpp_2s_ancestral", {"s_noise": 0.95}), ("edm_heun", {"s_churn": 4.0, "s_noise": 0.9}),
                                        ("dpmpp_sde", {"brownian": False})])
def test_moment_check_detects_wrong_noise(marginal, name, opts):
    """5% too little ancestral noise, 10% too little churn noise, or dpmpp_sde's two draws left
    independent (k-diffusion's default sampler couples them) are caught."""
    _, z_cov = moment_z_scores(marginal, name, opts)
    assert z_cov > 2 * Z_TOL / 1.25


# ---------------------------------------------------------------------------------------------
# 5. Bad input

BAD = [
    ("dpm_solver", {"order": 4}, "order must be one of 1, 2, 3"),
    ("dpm_solver", {"order": 2.5}, "order"), ("dpm_solver", {"order": True}, "order"),
    ("dpm_solver_multistep", {"order": 0}, "order"),
    ("dpm_solver_multistep", {"algorithm_type": "dpmsolver", "eta": 0.5}, "eta > 0 .* needs algorithm_type='dpmsolver\\+\\+'"),
    ("dpm_solver_multistep", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm_solver_multistep", {"solver_type": "bh2"}, "solver_type"),
    ("dpm_solver_multistep", {"third_order": "exact"}, "third_order"),
    ("dpmpp_2m_sde", {"eta": -0.1}, "eta must be a finite number >= 0"),
    ("dpmpp_3m_sde", {"s_noise": -1.0}, "s_noise"),
    ("dpmpp_2s_ancestral", {"eta": float("nan")}, "eta"),
    ("dpm_2_ancestral", {"eta": -1.0}, "eta"),
    ("dpmpp_sde", {"r": 0.0}, "r .* must lie in \\(0, 1\\]"), ("dpmpp_sde", {"r": 1.5}, "r"),
    ("dpmpp_2s", {"eta": 1.0}, "has no option"),
    ("lms", {"order": 5}, "order must be one of 1, 2, 3, 4"),
    ("deis", {"order": 4}, "order"),
    ("unipc", {"order": 4}, "order"), ("unipc", {"solver_type": "bh3"}, "solver_type"),
    ("unipc", {"use_corrector": False, "disable_corrector": [1]}, "use_corrector=False already"),
    ("unipc", {"disable_corrector": [-1]}, "disable_corrector"), ("unipc", {"disable_corrector": "1"}, "disable_corrector"),
    ("edm_heun", {"s_churn": -1.0}, "s_churn"), ("edm_euler", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin <= s_tmax"),
    ("dpm_2", {"s_noise": -0.5}, "s_noise"),
    ("flow_euler", {"ode_space": "ve"}, "has no option"),
]


@pytest.mark.parametrize("name, opts, match", BAD, ids=[_variant_id(n, o) for n, o, _ in BAD])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts)


def test_dpmpp_sde_brownian_must_be_a_bool():
    with pytest.raises(TypeError, match="brownian"):
        get_solver("dpmpp_sde", brownian="yes")


@pytest.mark.parametrize("name, opts, match", [
    ("dpm_solver", {}, "alpha > 0"), ("dpm_solver_multistep", {}, "alpha > 0"), ("deis", {}, "alpha > 0"),
    ("unipc", {}, "alpha > 0"), ("dpmpp_2s", {}, "finite"), ("dpmpp_sde", {}, "finite"),
    ("dpm_2_ancestral", {}, "finite"), ("edm_heun", {"s_churn": 1.0}, "churn .* ode_space='ve'"),
    ("lms", {"ode_space": "ve"}, "ode_space='ve' needs finite"),
])
def test_grid_starting_at_alpha_0_is_refused_where_unsupported(name, opts, match):
    grid = make_grid(FlowMatching(), 5, "uniform")          # t = 1: alpha = 0
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts).rows(grid)
