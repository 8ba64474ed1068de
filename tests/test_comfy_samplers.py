"""ComfyUI's samplers (issue 13, "Samplers"): fastdiff.solvers.comfy and the solvers they alias, and
their k-diffusion-signature functions (fastdiff.integrations.comfy_samplers, re-exported by
fastdiff.integrations.k_diffusion).

1. Every name of the issue's list is a solver and has its ``sample_<name>`` function (the CFG++ ones
   not written yet, NOT_YET, are xfail).
2. Each coefficient program equals its textbook form (fastdiff.textbook.comfy, written from ComfyUI's
   code) over whole trajectories: float64 state, reference backend, relative error < 1e-10, on VE,
   discrete-VP, continuous-VP grids, several step counts and predictions, one draw per noise id.
3. Deterministic samplers: convergence order on the Gaussian mixture (VE, Karras grid to sigma_min,
   final='none') against its DOP853 solution, fitted log-log slope within 0.3 of ``solver.order``.
4. Stochastic samplers: from exact samples of the noisy marginal at sigma = 2 down to sigma = 0.3
   (20 steps, 20000 samples), the sample mean and covariance within 5 standard errors (estimated
   from the samples) of the mixture's, plus 0.3^2 I (the tolerance of tests/test_solver_zoo.py).
5. The k-diffusion functions run the solvers they name; bad options raise clear errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import Sampler, sample
from fastdiff.integrations import k_diffusion as K
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import ContinuousVP, DiscreteVP, FlowMatching, VESchedule, make_grid
from fastdiff.solvers import SOLVERS, get_solver
from fastdiff.textbook.comfy import COMFY_ORACLES, MULTI_DRAW

# ---------------------------------------------------------------------------------------------
# 1. The issue's list

# ComfyUI name -> (fastdiff solver, k-diffusion function).
ISSUE_SAMPLERS = {
    "euler_cfg_pp": ("euler_cfg_pp", "sample_euler_cfg_pp"),
    "euler_ancestral_cfg_pp": ("euler_ancestral_cfg_pp", "sample_euler_ancestral_cfg_pp"),
    "dpmpp_2m_cfg_pp": ("dpmpp_2m_cfg_pp", "sample_dpmpp_2m_cfg_pp"),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral_cfg_pp", "sample_dpmpp_2s_ancestral_cfg_pp"),
    "res_multistep": ("res_multistep", "sample_res_multistep"),
    "res_multistep_cfg_pp": ("res_multistep_cfg_pp", "sample_res_multistep_cfg_pp"),
    "res_multistep_ancestral": ("res_multistep_ancestral", "sample_res_multistep_ancestral"),
    "res_multistep_ancestral_cfg_pp": ("res_multistep_ancestral_cfg_pp", "sample_res_multistep_ancestral_cfg_pp"),
    "gradient_estimation": ("gradient_estimation", "sample_gradient_estimation"),
    "gradient_estimation_cfg_pp": ("gradient_estimation_cfg_pp", "sample_gradient_estimation_cfg_pp"),
    "heunpp2": ("heunpp2", "sample_heunpp2"),
    "exp_heun_2_x0": ("exp_heun_2_x0", "sample_exp_heun_2_x0"),
    "exp_heun_2_x0_sde": ("exp_heun_2_x0_sde", "sample_exp_heun_2_x0_sde"),
    "seeds_2": ("seeds_2", "sample_seeds_2"),
    "seeds_3": ("seeds_3", "sample_seeds_3"),
    "er_sde": ("er_sde", "sample_er_sde"),
    "sa_solver": ("sa_solver", "sample_sa_solver"),
    "sa_solver_pece": ("sa_solver_pece", "sample_sa_solver_pece"),
    "ipndm": ("ipndm", "sample_ipndm"),
    "ipndm_v": ("ipndm_v", "sample_ipndm_v"),
    "deis": ("deis_comfy", "sample_deis"),          # diffusers' DEISMultistep keeps the name "deis"
    "lcm": ("lcm", "sample_lcm"),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde_heun"),
    "cfgpp_ud10_ab": ("cfgpp_ud10_ab", "sample_cfgpp_ud10_ab"),
    "ddim": ("ddim", "sample_ddim"),
    "uni_pc": ("uni_pc", "sample_uni_pc"),
    "uni_pc_bh2": ("uni_pc_bh2", "sample_uni_pc_bh2"),
}
NOT_YET = set()      # samplers of the list not written yet (xfail)


def _issue_param(name):
    marks = [pytest.mark.xfail(reason="not written yet", strict=False)] if name in NOT_YET else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("comfy_name", [_issue_param(n) for n in ISSUE_SAMPLERS])
def test_every_issue_sampler_is_a_solver_with_a_k_diffusion_function(comfy_name):
    solver, function = ISSUE_SAMPLERS[comfy_name]
    assert solver in SOLVERS, f"{comfy_name}: no fastdiff solver {solver!r}"
    assert callable(getattr(K, function, None)), f"{comfy_name}: no fastdiff.integrations.k_diffusion.{function}"
    assert function in K.__all__


# ---------------------------------------------------------------------------------------------
# 2. Program == textbook

TOL = 1e-10
SHAPE = (3, 2, 3)
STEPS = (1, 2, 5, 12)

VARIANTS = [
    ("res_multistep", {}), ("res_multistep", {"eta": 0.5, "s_noise": 0.8}), ("res_multistep_ancestral", {}),
    ("dpmpp_2m_sde_heun", {}), ("dpmpp_2m_sde_heun", {"eta": 0.0}),
    ("ipndm_v", {}), ("ipndm_v", {"max_order": 2}), ("ipndm_v", {"max_order": 3}),
    ("deis_comfy", {}), ("deis_comfy", {"max_order": 4}), ("deis_comfy", {"deis_mode": "rhoab"}),
    ("deis_comfy", {"deis_mode": "rhoab", "max_order": 4}), ("deis_comfy", {"max_order": 2}),
    ("gradient_estimation", {}), ("gradient_estimation", {"ge_gamma": 1.5}),
    ("heunpp2", {}), ("heunpp2", {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.007}),
    ("exp_heun_2_x0", {}), ("exp_heun_2_x0", {"solver_type": "phi_1"}), ("exp_heun_2_x0_sde", {}),
    ("seeds_2", {}), ("seeds_2", {"solver_type": "phi_2", "r": 0.3, "eta": 0.6, "s_noise": 0.9}),
    ("seeds_2", {"eta": 0.0}), ("seeds_3", {}), ("seeds_3", {"eta": 0.0}),
    ("seeds_3", {"r_1": 0.25, "r_2": 0.75, "eta": 0.4}),
    ("er_sde", {}), ("er_sde", {"max_stage": 2}), ("er_sde", {"solver_type": "Reverse-time SDE", "eta": 0.5}),
    ("er_sde", {"solver_type": "ODE"}), ("er_sde", {"solver_type": "ODE", "num_integration_points": None}),
    ("er_sde", {"noise_scaler": lambda v: v * v + v}), ("er_sde", {"eta": 0.5}), ("er_sde", {"eta": 0.0}),
    ("uni_pc", {}), ("uni_pc_bh2", {}),
    ("sa_solver", {}), ("sa_solver", {"tau_interval": (1e9, 0.0)}), ("sa_solver", {"eta": 0.0}),
    ("sa_solver", {"tau_interval": (1e9, 0.0), "simple_order_2": True, "predictor_order": 2, "corrector_order": 2}),
    ("sa_solver", {"tau_interval": (1e9, 0.0), "predictor_order": 1, "corrector_order": 0, "s_noise": 0.7}),
    ("sa_solver_pece", {}), ("sa_solver_pece", {"tau_interval": (1e9, 0.0), "predictor_order": 2,
                                                "corrector_order": 3}),
]

CASES = [  # id, schedule, spacing, final, predictions
    ("ve-karras", VESchedule, "karras", "zero", ("sample", "epsilon")),
    ("ve-exponential-none", VESchedule, "exponential", "none", ("score",)),
    ("sd-leading", lambda: DiscreteVP(beta_schedule="scaled_linear"), "leading", "zero", ("epsilon", "v_prediction")),
    ("cvp-uniform", ContinuousVP, "uniform", "zero", ("v_prediction", "sample")),
]


def _variant_id(name, opts):
    return name + "".join(f"-{k}={'f' if callable(v) else v}" for k, v in opts.items())


def run_program_and_oracle(name, opts, grid, prediction, seed=0):
    """The program on the reference backend and the oracle, with the same Gaussian draws: the k-th
    draw of step n (k-th distinct noise id among the step's rows) is draws[n][k]."""
    schedule = grid.schedule
    model = GaussianMixture.default(schedule, dim=int(np.prod(SHAPE[1:])), prediction=prediction)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    draws = [tuple(torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(3)) for _ in range(grid.steps)]
    sampler = Sampler.build(solver=name, grid=grid, prediction=prediction, solver_options=opts,
                            state_dtype=torch.float64)
    ids = {}
    for r in sampler.program.rows:
        if r.noise_id >= 0 and r.noise_id not in ids.setdefault(r.step, []):
            ids[r.step].append(r.noise_id)
    out = sampler(model, noise, noise_sampler=lambda row, x: draws[row.step][ids[row.step].index(row.noise_id)],
                  backend="reference", progress=False)
    x = noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    oracle_noise = draws if name in MULTI_DRAW else [d[0] for d in draws]
    ref = COMFY_ORACLES[name](model, x, grid, prediction, noise=oracle_noise, **opts)
    return out, ref, ids


@pytest.mark.parametrize("name, opts, case", [
    pytest.param(n, o, c, id=f"{_variant_id(n, o)}-{c[0]}") for n, o in VARIANTS for c in CASES])
def test_program_equals_textbook(name, opts, case):
    case_id, schedule_cls, spacing, final, predictions = case
    schedule = schedule_cls()
    for k, steps in enumerate(STEPS):
        grid = make_grid(schedule, steps, spacing, final=final)
        prediction = predictions[k % len(predictions)]
        out, ref, _ = run_program_and_oracle(name, opts, grid, prediction, seed=k)
        assert torch.isfinite(ref).all()
        err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert err < TOL, f"{steps} steps, {prediction}: program vs textbook relative error {err:.3g}"


def test_every_comfy_solver_has_an_oracle():
    from fastdiff.solvers import comfy
    names = sorted(n for n, cls in SOLVERS.items() if cls.__module__ == comfy.__name__)
    assert sorted(COMFY_ORACLES) == names
    assert {n for n, _ in VARIANTS} == set(names)


@pytest.mark.parametrize("name, opts, per_step", [("seeds_2", {}, 2), ("seeds_3", {}, 3), ("exp_heun_2_x0_sde", {}, 1),
                                                  ("seeds_2", {"eta": 0.0}, 0), ("res_multistep_ancestral", {}, 1)])
def test_noise_draws_per_step(name, opts, per_step):
    """SEEDS draws at every stage (the later stages recover the earlier draws from their evaluation
    point, so each row draws once); with r = 1 the second draw has weight 0 and is not made."""
    grid = make_grid(VESchedule(), 6, "karras", final="zero")
    rows = Sampler.build(solver=name, grid=grid, prediction="sample", solver_options=opts).program.rows
    for n in range(grid.steps - 1):
        assert len({r.noise_id for r in rows if r.step == n and r.noise_id >= 0}) == per_step
    assert all(r.noise_id < 0 for r in rows if r.step == grid.steps - 1)    # the step to sigma = 0
    ids = [r.noise_id for r in rows if r.noise_id >= 0]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", sorted(COMFY_ORACLES))
def test_one_fused_step_per_model_call(name):
    """Every row of every ComfyUI sampler (default options) evaluates the model: one fused call per model
    evaluation, nothing between (EDM churn, off by default in heunpp2, adds a row of its own)."""
    grid = make_grid(VESchedule(), 7, "karras")
    program = Sampler.build(solver=name, grid=grid, prediction="sample").program
    assert all(r.needs_model for r in program.rows) and program.nfe == len(program.rows)


def test_oracle_comparison_detects_a_wrong_option():
    grid = make_grid(VESchedule(), 6, "karras")
    out, _, _ = run_program_and_oracle("seeds_2", {"solver_type": "phi_2"}, grid, "sample")
    _, ref, _ = run_program_and_oracle("seeds_2", {"solver_type": "phi_1"}, grid, "sample")
    assert float((out - ref).abs().max()) > 1e-6


def test_res_multistep_ancestral_is_dpmpp_2m_sde_heun_at_eta_1():
    """On k-diffusion noise levels RES ancestral (eta = 1) and DPM-Solver++(2M) SDE 'heun' (eta = 1) take
    the same step: the ancestral down-step doubles h, and c2 = -h_prev/h makes RES's phi_2 term the
    'heun' correction (a cross-check of two independently written programs)."""
    grid = make_grid(VESchedule(), 9, "karras")
    a = Sampler.build(solver="res_multistep_ancestral", grid=grid, prediction="sample").program.table
    b = Sampler.build(solver="dpmpp_2m_sde_heun", grid=grid, prediction="sample").program.table
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_aliases():
    """dpmpp_2m_sde_heun is dpmpp_2m_sde(solver_type='heun'); uni_pc / uni_pc_bh2 are unipc(order=3)."""
    grid = make_grid(DiscreteVP(), 8, "leading")
    table = lambda name, **o: Sampler.build(solver=name, solver_options=o, grid=grid,  # noqa: E731
                                            prediction="epsilon").program.table
    np.testing.assert_array_equal(table("dpmpp_2m_sde_heun"), table("dpmpp_2m_sde", solver_type="heun"))
    np.testing.assert_array_equal(table("uni_pc"), table("unipc", order=3, solver_type="bh1"))
    np.testing.assert_array_equal(table("uni_pc_bh2"), table("unipc", order=3, solver_type="bh2"))


# ---------------------------------------------------------------------------------------------
# 3. Convergence order

ORDER_TOL = 0.3
SHORT = (16, 24, 32, 48, 64)
LONG = (64, 96, 128, 192, 256)
LONGER = (128, 192, 256, 384, 512)

# name, options, step counts; the expected order is the solver's own (solver.order)
CONVERGENCE = [
    ("res_multistep", {}, SHORT),
    ("ipndm_v", {"max_order": 2}, LONG), ("ipndm_v", {"max_order": 3}, LONGER),
    # ComfyUI's fourth-order weight does not sum the weights to 1 on uneven steps: first order
    ("ipndm_v", {}, LONG),
    ("deis_comfy", {}, LONG), ("deis_comfy", {"deis_mode": "rhoab"}, LONG), ("deis_comfy", {"max_order": 2}, SHORT),
    ("gradient_estimation", {}, LONG),
    ("heunpp2", {}, SHORT),
    ("exp_heun_2_x0", {}, SHORT), ("seeds_2", {"eta": 0.0}, SHORT), ("seeds_3", {"eta": 0.0}, LONG),
    ("er_sde", {"solver_type": "ODE", "max_stage": 2}, SHORT),
    ("er_sde", {"solver_type": "ODE", "num_integration_points": None}, LONG),
    ("uni_pc", {}, SHORT), ("uni_pc_bh2", {}, SHORT),
    ("sa_solver", {"eta": 0.0}, LONG), ("sa_solver_pece", {"eta": 0.0}, SHORT),
    ("sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 3}, SHORT),
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
    solver = get_solver(name, **opts)
    assert not solver.stochastic
    slope, errs = fitted_order(ode_problem, name, opts, steps)
    assert abs(slope - solver.order) < ORDER_TOL, \
        f"fitted order {slope:.2f}, expected {solver.order} (solver.order); errors {errs}"


# ---------------------------------------------------------------------------------------------
# 4. Moments of the stochastic samplers

N_SAMPLES = 20000
SIGMA_A, SIGMA_B, MOMENT_STEPS = 2.0, 0.3, 20
Z_TOL = 5.0

STOCHASTIC = [
    ("res_multistep_ancestral", {}), ("dpmpp_2m_sde_heun", {}), ("exp_heun_2_x0_sde", {}),
    ("seeds_2", {}), ("seeds_2", {"solver_type": "phi_2", "eta": 0.5}), ("seeds_3", {}),
    ("er_sde", {}), ("er_sde", {"solver_type": "Reverse-time SDE"}),
    ("er_sde", {"solver_type": "Reverse-time SDE", "eta": 0.5}), ("er_sde", {"eta": 0.5}),
    ("sa_solver", {}), ("sa_solver", {"tau_interval": (1e9, 0.0)}), ("sa_solver_pece", {"tau_interval": (1e9, 0.0)}),
]
# Not here: lcm, whose step x' = alpha' x0(x) + sigma' z draws from the posterior mean, not the
# marginal (its covariance is off by hundreds of standard errors on the mixture by design).


@pytest.fixture(scope="module")
def marginal():
    schedule = VESchedule(SIGMA_B, SIGMA_A)
    gm = GaussianMixture.default(schedule, dim=2, prediction="epsilon")
    g = torch.Generator().manual_seed(0)
    x_a = gm.sample_data(N_SAMPLES, generator=g) + SIGMA_A * torch.randn(N_SAMPLES, 2, dtype=torch.float64, generator=g)
    return schedule, gm, x_a.float()


def moment_z_scores(marginal, name, opts):
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


@pytest.mark.parametrize("name, opts", [("seeds_2", {"s_noise": 0.9}), ("res_multistep_ancestral", {"s_noise": 0.9}),
                                        ("sa_solver", {"tau_interval": (1e9, 0.0), "s_noise": 0.9})])
def test_moment_check_detects_wrong_noise(marginal, name, opts):
    """10% too little noise is caught."""
    _, z_cov = moment_z_scores(marginal, name, opts)
    assert z_cov > 2 * Z_TOL


# ---------------------------------------------------------------------------------------------
# 5. The k-diffusion functions


def _kd_setup(steps=6, seed=0):
    schedule = VESchedule(0.03, 14.6)
    gm = GaussianMixture.default(schedule, dim=6, prediction="sample")
    sigmas = K.get_sigmas_karras(steps, 0.03, 14.6).double()
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    denoiser = lambda x_, sigma, **kw: gm(x_, sigma)   # noqa: E731  (sample prediction: x0 = D(x, sigma))
    return gm, sigmas, x, denoiser


FUNCTIONS = [  # function, its options, solver, solver options
    ("sample_res_multistep", {}, "res_multistep", {"eta": 0.0}),
    ("sample_ipndm", {"max_order": 3}, "ipndm", {"max_order": 3}),
    ("sample_ipndm_v", {}, "ipndm_v", {}),
    ("sample_deis", {"deis_mode": "rhoab"}, "deis_comfy", {"deis_mode": "rhoab"}),
    ("sample_gradient_estimation", {"ge_gamma": 2.5}, "gradient_estimation", {"ge_gamma": 2.5}),
    ("sample_heunpp2", {}, "heunpp2", {}),
    ("sample_exp_heun_2_x0", {}, "exp_heun_2_x0", {}),
    ("sample_seeds_2", {"eta": 0.0}, "seeds_2", {"eta": 0.0}),
    ("sample_seeds_3", {"eta": 0.0}, "seeds_3", {"eta": 0.0}),
    ("sample_er_sde", {"solver_type": "ODE"}, "er_sde", {"solver_type": "ODE"}),
    ("sample_ddim", {}, "euler", {}),
    ("sample_sa_solver", {"eta": 0.0}, "sa_solver", {"eta": 0.0}),
    ("sample_sa_solver_pece", {"tau_func": lambda sigma: 0.0}, "sa_solver_pece", {"eta": 0.0}),
]


@pytest.mark.parametrize("fn, fn_opts, solver, opts", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_k_diffusion_functions_run_their_solver(fn, fn_opts, solver, opts):
    gm, sigmas, x, denoiser = _kd_setup()
    calls = []
    out = getattr(K, fn)(denoiser, x.clone(), sigmas, callback=calls.append, disable=True, **fn_opts)
    grid = K._grid_from_sigmas(sigmas)
    ref = Sampler.build(solver=solver, solver_options=opts, grid=grid, prediction="sample",
                        state_dtype=torch.float64)(gm, x, x_init=x, backend="reference", progress=False)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert [c["i"] for c in calls] == list(range(len(sigmas) - 1))


def test_k_diffusion_uni_pc_ends_at_0_001_as_comfyui():
    gm, sigmas, x, denoiser = _kd_setup()
    out = K.sample_uni_pc(denoiser, x.clone(), sigmas, disable=True)
    moved = sigmas.clone()
    moved[-1] = 0.001
    ref = Sampler.build(solver="unipc", solver_options={"order": 3, "solver_type": "bh1"},
                        grid=K._grid_from_sigmas(moved), prediction="sample", state_dtype=torch.float64)(
        gm, x, x_init=x, backend="reference", progress=False)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    bh2 = K.sample_uni_pc_bh2(denoiser, x.clone(), sigmas, disable=True)
    assert float((bh2 - out).abs().max()) > 1e-8


@pytest.mark.parametrize("fn, opts", [("sample_res_multistep_ancestral", {}), ("sample_seeds_2", {}),
                                      ("sample_seeds_3", {}), ("sample_exp_heun_2_x0_sde", {}),
                                      ("sample_er_sde", {}), ("sample_dpmpp_2m_sde_heun", {}),
                                      ("sample_sa_solver", {"tau_interval": (20.0, 0.0)}),
                                      ("sample_sa_solver_pece", {"tau_func": lambda sigma: 1.0 if sigma > 1 else 0.0})])
def test_k_diffusion_stochastic_functions(fn, opts):
    """Reproducible from torch's seed (Philox, and noise='torch'); a given noise_sampler is called with
    ComfyUI's levels (SEEDS: the stage levels, inside [sigma_next, sigma])."""
    gm, sigmas, x, denoiser = _kd_setup()
    f = getattr(K, fn)
    for mode in ("philox", "torch"):
        torch.manual_seed(5)
        a = f(denoiser, x.clone(), sigmas, disable=True, noise=mode, **opts)
        torch.manual_seed(5)
        b = f(denoiser, x.clone(), sigmas, disable=True, noise=mode, **opts)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.isfinite(a).all()
    levels = []

    def noise_sampler(sigma, sigma_next):
        levels.append((float(sigma), float(sigma_next)))
        return torch.randn_like(x)
    f(denoiser, x.clone(), sigmas, disable=True, noise_sampler=noise_sampler, **opts)
    assert levels and all(hi > lo >= 0 for hi, lo in levels)
    ks = sigmas.tolist()
    for hi, lo in levels:
        i = max(j for j in range(len(ks) - 1) if ks[j] >= hi - 1e-12)
        assert ks[i + 1] - 1e-12 <= lo <= ks[i] + 1e-12


def test_k_diffusion_er_sde_takes_comfyuis_tensor_noise_scaler():
    gm, sigmas, x, denoiser = _kd_setup()
    torch.manual_seed(1)
    a = K.sample_er_sde(denoiser, x.clone(), sigmas, disable=True, noise_scaler=lambda v: v * ((v ** 0.3).exp() + 10.0))
    torch.manual_seed(1)
    b = K.sample_er_sde(denoiser, x.clone(), sigmas, disable=True)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_k_diffusion_lcm():
    if "lcm" not in SOLVERS:
        pytest.skip("the lcm solver (fastdiff.solvers.consistency) is not registered")
    gm, sigmas, x, denoiser = _kd_setup()
    torch.manual_seed(2)
    out = K.sample_lcm(denoiser, x.clone(), sigmas, disable=True, noise="torch")
    torch.manual_seed(2)
    ref = x.clone()
    for i in range(len(sigmas) - 1):          # ComfyUI's sample_lcm, line for line
        ref = denoiser(ref, sigmas[i] * ref.new_ones([ref.shape[0]]))
        if sigmas[i + 1] > 0:
            ref = ref + sigmas[i + 1] * torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 6. Bad input

BAD = [
    ("res_multistep", {"eta": -0.1}, "eta must be a finite number >= 0"),
    ("res_multistep_ancestral", {"s_noise": float("nan")}, "s_noise"),
    ("ipndm_v", {"max_order": 5}, "max_order must be one of 1, 2, 3, 4"),
    ("deis_comfy", {"deis_mode": "logrho"}, "deis_mode must be one of 'tab', 'rhoab'"),
    ("deis_comfy", {"max_order": 0}, "max_order"),
    ("gradient_estimation", {"ge_gamma": float("inf")}, "ge_gamma must be a finite number"),
    ("heunpp2", {"s_churn": -1.0}, "s_churn"), ("heunpp2", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin <= s_tmax"),
    ("seeds_2", {"r": 0.0}, "r .* must lie in \\(0, 1\\]"), ("seeds_2", {"r": 1.5}, "r"),
    ("seeds_2", {"solver_type": "phi_3"}, "solver_type must be one of 'phi_1', 'phi_2'"),
    ("seeds_3", {"r_1": 0.7, "r_2": 0.5}, "r_1 must be smaller than r_2"),
    ("seeds_3", {"eta": -1.0}, "eta"),
    ("exp_heun_2_x0", {"eta": 1.0}, "has no option"),
    ("er_sde", {"solver_type": "SDE"}, "solver_type must be one of 'ER-SDE', 'Reverse-time SDE', 'ODE'"),
    ("er_sde", {"max_stage": 4}, "max_stage"), ("er_sde", {"num_integration_points": 0}, "num_integration_points"),
    ("er_sde", {"noise_scaler": 3.0}, "noise_scaler must be a callable"),
    ("er_sde", {"solver_type": "ODE", "noise_scaler": abs}, "noise_scaler applies to solver_type='ER-SDE'"),
    ("uni_pc", {"order": 4}, "order"), ("uni_pc_bh2", {"solver_type": "bh3"}, "solver_type"),
    ("dpmpp_2m_sde_heun", {"solver_type": "euler"}, "solver_type"),
    ("sa_solver", {"predictor_order": 0}, "predictor_order"), ("sa_solver", {"corrector_order": 7}, "corrector_order"),
    ("sa_solver", {"tau_interval": (0.5, 2.0)}, "tau_interval must be \\(start, end\\)"),
    ("sa_solver", {"tau_interval": 3.0}, "tau_interval"), ("sa_solver", {"taus": [0.5, -1.0]}, "each of taus"),
    ("sa_solver_pece", {"eta": -1.0}, "eta"),
]


@pytest.mark.parametrize("name, opts, match", BAD, ids=[_variant_id(n, o) for n, o, _ in BAD])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts)


def test_sa_solver_taus_and_window():
    """tau per step: ``taus`` as given (its length checked), ``tau_interval`` in noise levels; a tau_func
    in the k-diffusion function is evaluated once per step on the host; sa_solver_pece evaluates the model
    twice per step after the first."""
    grid = make_grid(VESchedule(), 8, "karras")
    build = lambda name, **o: Sampler.build(solver=name, solver_options=o, grid=grid, prediction="sample")  # noqa
    rows = build("sa_solver", tau_interval=(10.0, 1.0)).program.rows
    noisy = sorted({r.step for r in rows if r.noise_id >= 0})
    assert noisy == [i for i in range(8) if 10.0 >= grid.ksigma[i + 1] >= 1.0]
    taus = [0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.2, 0.0]
    rows = build("sa_solver", taus=taus).program.rows
    assert sorted({r.step for r in rows if r.noise_id >= 0}) == [1, 3, 6]
    with pytest.raises(ValueError, match="taus has 3 values but the grid has 8 steps"):
        build("sa_solver", taus=[0.0, 1.0, 0.0])
    assert build("sa_solver").program.nfe == 8 and build("sa_solver_pece").program.nfe == 15
    gm, sigmas, x, denoiser = _kd_setup()
    seen = []
    K.sample_sa_solver(denoiser, x, sigmas, disable=True, tau_func=lambda s: seen.append(float(s)) or 0.0)
    assert seen == [float(s) for s in sigmas[1:]]


@pytest.mark.parametrize("name", ["res_multistep", "ipndm_v", "deis_comfy", "gradient_estimation", "heunpp2",
                                  "er_sde", "seeds_2", "seeds_3", "exp_heun_2_x0", "sa_solver"])
def test_grid_starting_at_alpha_0_is_refused(name):
    grid = make_grid(FlowMatching(), 5, "uniform")
    with pytest.raises(ValueError, match="alpha|finite|ve"):
        Sampler.build(solver=name, grid=grid, prediction="flow")


def test_k_diffusion_bad_arguments():
    gm, sigmas, x, denoiser = _kd_setup()
    with pytest.raises(ValueError, match="s_churn"):
        K.sample_heunpp2(denoiser, x, sigmas, s_churn=-1.0)
    with pytest.raises(ValueError, match="variant must be 'bh1' or 'bh2'"):
        K.sample_uni_pc(denoiser, x, sigmas, variant="bh3")
    with pytest.raises(ValueError, match="noise must be 'philox'"):
        K.sample_seeds_2(denoiser, x, sigmas, noise="numpy")
    with pytest.raises(TypeError, match="noise_scaler must be callable"):
        K.sample_er_sde(denoiser, x, sigmas, noise_scaler=2.0)
    with pytest.raises(ValueError, match="sigmas must strictly decrease"):
        K.sample_res_multistep(denoiser, x, sigmas.flip(0))


def test_flow_grid_runs_the_half_log_snr_samplers():
    """SEEDS, exp_heun_2_x0 and ER-SDE on a flow grid below t = 1 (ComfyUI's logit form of the
    half-logSNR for flow models): finite, and close to the exact ODE end point for exp_heun_2_x0."""
    schedule = FlowMatching()
    grid = make_grid(schedule, 12, "uniform", t_max=0.999)
    gm = GaussianMixture.default(schedule, dim=2, prediction="flow")
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in ("seeds_2", "seeds_3", "exp_heun_2_x0", "er_sde"):
        out = Sampler.build(solver=name, grid=grid, prediction="flow", state_dtype=torch.float64)(
            gm, noise, backend="reference", progress=False, seed=0)
        assert torch.isfinite(out).all() and math.isfinite(float(out.std()))


# ---------------------------------------------------------------------------------------------
# Flow models (ComfyUI's CONST model sampling)


class CONST:
    """Stands for ComfyUI's comfy.model_sampling.CONST (detected by class name, as fastdiff does not import
    ComfyUI): sigma is the flow time t."""

    def percent_to_sigma(self, percent):
        return 1.0 - percent


class _ComfyLikeModel:
    """A KSAMPLER-style model: ``model.inner_model.model_sampling`` and ``model(x, sigma, **kw)`` -> x0."""

    def __init__(self, denoiser, sampling):
        self.denoiser = denoiser
        self.inner_model = type("Inner", (), {"model_sampling": sampling})()

    def __call__(self, x, sigma, **kw):
        return self.denoiser(x, sigma)


def _flow_setup(steps=6):
    from fastdiff.schedules import Grid
    schedule = FlowMatching(num_train_timesteps=1, t_min=1e-3)     # the model is told t itself
    gm = GaussianMixture.default(schedule, dim=6, prediction="sample")
    t = torch.linspace(1.0, 0.05, steps, dtype=torch.float64)
    sigmas = torch.cat([t, t.new_zeros(1)])
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))   # t = 1: pure noise
    t_np = sigmas.numpy().copy()
    t_np[0] = 1.0 - 1e-4                                             # percent_to_sigma(1e-4)
    grid = Grid.from_ksigmas(schedule, t_np / (1.0 - t_np), model_t=t_np)
    return gm, sigmas, x, grid


@pytest.mark.parametrize("fn, name, opts", [("sample_exp_heun_2_x0", "exp_heun_2_x0", {}),
                                            ("sample_seeds_3", "seeds_3", {"eta": 0.0}),
                                            ("sample_er_sde", "er_sde", {"solver_type": "ODE"}),
                                            ("sample_sa_solver", "sa_solver", {"eta": 0.0})])
def test_flow_models_take_comfyuis_logit_half_log_snr(fn, name, opts):
    """On a ComfyUI CONST model the SDE samplers step in lambda = log((1 - t)/t): the function equals the
    textbook form on the flow grid (noise levels t/(1 - t), the model told t, the first t = 1 moved to
    percent_to_sigma(1e-4)); flow=True says the same without ComfyUI; flow=False is the VE reading."""
    gm, sigmas, x, grid = _flow_setup()
    model = _ComfyLikeModel(lambda x_, s: gm(x_, s), CONST())
    f = getattr(K, fn)
    out = f(model, x.clone(), sigmas, disable=True, **opts)
    ref = COMFY_ORACLES[name](gm, x.clone(), grid, "sample", noise=None, **opts)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    plain = lambda x_, s, **kw: gm(x_, s)     # noqa: E731
    torch.testing.assert_close(f(plain, x.clone(), sigmas, disable=True, flow=True, **opts), out, rtol=0, atol=0)
    if name != "sa_solver":
        ve = f(plain, x.clone(), sigmas[1:], disable=True, **opts)
        flow_from_1 = f(plain, x.clone(), sigmas[1:], disable=True, flow=True, **opts)
        assert float((ve - flow_from_1).abs().max()) > 1e-6
    with pytest.raises(TypeError, match="flow must be True, False or None"):
        f(plain, x.clone(), sigmas, flow="yes", **opts)


def test_flow_sigmas_are_checked():
    gm, sigmas, x, grid = _flow_setup()
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        K.sample_seeds_2(lambda x_, s, **kw: gm(x_, s), x, sigmas * 2.0, flow=True)
