"""Tuned time steps (fastdiff.tune) and the iPNDM solver they are shown with."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from fastdiff import Sampler, sample, tune
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import DiscreteVP, Grid, VESchedule, make_grid
from fastdiff.solvers import get_solver
from fastdiff.textbook.ipndm import sample_ipndm

SCHED = VESchedule(0.002, 80.0)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.default(SCHED, dim=3, prediction="sample", seed=0)


def _exact(gm):
    return gm.ode_trajectory


def _noise(n, seed):
    return torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The DP search


def test_dp_finds_the_closed_form_optimum():
    """Additive convex step costs (u_j - u_i)^2 on points u: the optimal K-step path from the first
    to the last point spaces the steps as evenly as the points allow; on evenly spaced points with
    K dividing the span it is exactly every (M-1)/K-th point, with total span^2 / K."""
    M, K = 25, 6
    u = np.linspace(0.0, 1.0, M)
    path, total = tune.dp_search(lambda prefix, j: (u[j] - u[prefix[-1]]) ** 2, M, K)
    assert path == list(range(0, M, (M - 1) // K))
    assert total == pytest.approx(1.0 / K, rel=1e-12)


def test_dp_equals_brute_force_on_random_additive_costs():
    rng = np.random.default_rng(3)
    M, K = 9, 4
    C = rng.random((M, M))
    path, total = tune.dp_search(lambda prefix, j: C[prefix[-1], j], M, K)
    best = min((sum(C[a, b] for a, b in zip((0,) + inner, inner + (M - 1,))), (0,) + inner + (M - 1,))
               for inner in itertools.combinations(range(1, M - 1), K - 1))
    assert total == pytest.approx(best[0], rel=1e-12) and tuple(path) == best[1]


def test_dp_rejects_impossible_step_counts():
    with pytest.raises(ValueError, match="steps must be in"):
        tune.dp_search(lambda p, j: 0.0, 4, 4)


# ---------------------------------------------------------------------------------------------
# tune_grid on the analytic mixture


@pytest.fixture(scope="module")
def tuned(mixture):
    grid, info = tune.tune_grid(mixture, _noise(64, 0), solver="dpmpp_2m", steps=4, schedule=SCHED,
                                prediction="sample", final="none", reference=_exact(mixture), candidates=20,
                                max_evals=80, return_info=True)
    return grid, info


def test_tuned_grid_is_valid_and_better_on_a_disjoint_batch(mixture, tuned):
    grid, info = tuned
    ks = grid.ksigma
    assert np.all(np.diff(ks) < 0) and ks[0] == pytest.approx(80.0) and ks[-1] == pytest.approx(0.002)
    assert grid.steps == 4
    assert info.error_final <= info.error_dp + 1e-15 and info.error_final < info.error_start
    # evaluated on other noise: still better than the Karras spacing it started from
    noise = _noise(64, 1)
    x_start = noise * 80.0
    exact = mixture.solve_ode(x_start, 80.0, 0.002, rtol=1e-10, atol=1e-10)

    def err(g):
        x = sample(mixture, noise, solver="dpmpp_2m", grid=g, prediction="sample", backend="reference",
                   state_dtype=torch.float64, progress=False)
        return float((x - exact).pow(2).mean().sqrt())

    karras = make_grid(SCHED, 4, "karras", final="none")
    assert err(grid) < err(karras)


def test_tuning_reproduces_bitwise(mixture, tuned):
    grid, _ = tuned
    again = tune.tune_grid(mixture, _noise(64, 0), solver="dpmpp_2m", steps=4, schedule=SCHED, prediction="sample",
                           final="none", reference=_exact(mixture), candidates=20, max_evals=80)
    assert np.array_equal(grid.ksigma, again.ksigma)


def test_grid_never_leaves_the_range_or_stops_decreasing(mixture):
    # an objective that pulls every level out of range: the parametrisation cannot follow it
    ks0 = [80.0, 10.0, 1.0, 0.1, 0.0]

    def pull(ks):
        return -sum(ks[1:-1]) + sum(1.0 / k for k in ks[1:-1])

    out = tune._refine(ks0, 0.002, pull, 200)
    assert out[0] == 80.0 and out[-1] == 0.0
    assert all(a > b for a, b in zip(out[:-1], out[1:]))
    assert min(out[:-1]) >= 0.002 * (1 - 1e-12)


def test_tune_with_a_computed_reference_and_final_zero_on_a_vp_model():
    sched = DiscreteVP()
    gm = GaussianMixture.default(sched, dim=3, prediction="epsilon", seed=1)
    grid, info = tune.tune_grid(gm, _noise(8, 2), solver="ipndm", steps=3, schedule=sched, prediction="epsilon",
                                candidates=14, reference_substeps=6, max_evals=40, return_info=True)
    assert grid.ksigma[-1] == 0.0 and grid.steps == 3 and np.all(np.diff(grid.ksigma) < 0)
    assert info.error_final <= info.error_start and info.model_calls > 0


def test_grid_files_round_trip_and_feed_every_consumer(tuned, tmp_path, mixture):
    grid, _ = tuned
    p = tmp_path / "g.json"
    tune.save_grid(grid, p, solver="dpmpp_2m")
    back = tune.load_grid(p)
    assert np.allclose(back.ksigma, grid.ksigma, rtol=1e-12)
    assert json.loads(p.read_text())["solver"] == "dpmpp_2m"
    sig = tune.sigmas_for_k_diffusion(grid)
    assert sig.dtype == torch.float64 and torch.allclose(sig, torch.from_numpy(grid.ksigma))
    from fastdiff.integrations import k_diffusion as K
    x = K.sample_dpmpp_2m(lambda x, s: mixture.x0(x, 1.0, s.reshape(-1, 1)), _noise(4, 5) * 80.0, sig,
                          disable=True)
    assert torch.isfinite(x).all()


def test_shipped_tables_load_by_name():
    names = tune.TABLES()
    assert names, "no tuned grids shipped"
    for name in names:
        g = tune.tuned_grid(name)
        assert isinstance(g, Grid) and np.all(np.diff(g.ksigma) < 0)
    with pytest.raises(ValueError, match="unknown tuned grid"):
        tune.tuned_grid("nope/nope/1")


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps must be"), (dict(candidates=3), "candidates must be"), (dict(method="x"), "method"),
    (dict(solver="euler_ancestral"), "stochastic"), (dict(final="sigma_min"), "final must be"),
])
def test_bad_arguments(mixture, kw, match):
    args = dict(solver="dpmpp_2m", steps=4, schedule=SCHED, prediction="sample", final="none", candidates=10)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        tune.tune_grid(mixture, _noise(4, 0), **args)


# ---------------------------------------------------------------------------------------------
# iPNDM


@pytest.mark.parametrize("sched, spacing, final, pred", [
    (VESchedule(0.002, 80.0), "karras", "zero", "sample"), (VESchedule(0.002, 80.0), "karras", "none", "sample"),
    (DiscreteVP(), "leading", "zero", "epsilon"), (DiscreteVP(), "trailing", "zero", "v_prediction")])
@pytest.mark.parametrize("steps", [1, 2, 4, 9])
@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_program_equals_textbook(sched, spacing, final, pred, steps, max_order):
    gm = GaussianMixture.default(sched, dim=3, prediction=pred, seed=0)
    grid = make_grid(sched, steps, spacing, final=final)
    s = Sampler.build(solver="ipndm", solver_options={"max_order": max_order}, grid=grid, prediction=pred,
                      state_dtype=torch.float64)
    noise = _noise(5, 1)
    x = s(gm, noise, backend="reference", progress=False)
    x_start = noise * sched.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    y = sample_ipndm(gm, x_start, grid, pred, max_order=max_order)
    assert float((x - y).abs().max() / y.abs().max()) < 1e-10


def test_ipndm_convergence_order(mixture):
    """Fixed equal-step AB weights on the Karras grid: the order of the method is that of AB-4 only
    on equal steps; measured on this grid it reaches at least 2 (reported in the README)."""
    noise = _noise(32, 7)
    exact = mixture.solve_ode(noise * 80.0, 80.0, 0.002, rtol=1e-12, atol=1e-12)
    errs, ns = [], [16, 24, 32, 48]
    for n in ns:
        x = sample(mixture, noise, solver="ipndm", steps=n, schedule=SCHED, spacing="karras", final="none",
                   prediction="sample", backend="reference", state_dtype=torch.float64, progress=False)
        errs.append(float((x - exact).pow(2).mean().sqrt()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope >= get_solver("ipndm").order - 2.3, (slope, errs)
    assert errs[-1] < errs[0]


def test_tuned_grid_drives_stock_diffusers_and_the_drop_in():
    """A grid on diffusers' default (linear-beta) schedule drives stock diffusers: EulerDiscrete
    takes its sigmas exactly (to float32), DPMSolverMultistep its rounded integer timesteps."""
    diffusers = pytest.importorskip("diffusers")
    from conftest import dtype_tolerance
    sched = DiscreteVP()
    gm = GaussianMixture.default(sched, dim=3, prediction="epsilon", seed=2)
    grid = tune.tune_grid(gm, _noise(16, 3), solver="euler", steps=4, schedule=sched, prediction="epsilon",
                          candidates=12, max_evals=30, method="refine")
    stock = diffusers.EulerDiscreteScheduler()
    kw = tune.diffusers_kwargs(grid, stock)
    assert "sigmas" in kw
    stock.set_timesteps(**kw)
    # the stock scheduler now walks the tuned grid's noise levels (to its float32 precision)
    assert np.allclose(stock.sigmas.double().numpy(), grid.ksigma, rtol=0,
                       atol=float(dtype_tolerance(torch.tensor(grid.ksigma, dtype=torch.float32), 1).max()))
    dpm = diffusers.DPMSolverMultistepScheduler()
    kw2 = tune.diffusers_kwargs(grid, dpm)
    assert list(kw2) == ["timesteps"] and kw2["timesteps"] == sorted(kw2["timesteps"], reverse=True)
    dpm.set_timesteps(**kw2)
    assert len(dpm.timesteps) == grid.steps


def test_cli_tune_writes_a_loadable_grid(tmp_path, capsys):
    from fastdiff.cli import main
    out = tmp_path / "g.json"
    assert main(["tune", "--model", "mixture", "--solver", "ipndm", "--steps", "3", "--batch", "8",
                 "--candidates", "10", "--max-evals", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tuned 3 steps of ipndm" in text and "->" in text and f"wrote {out}" in text
    g = tune.load_grid(out)
    assert g.steps == 3 and np.all(np.diff(g.ksigma) < 0)
    assert main(["tune", "--steps", "0", "--out", str(tmp_path / "h.json")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "missing" / "h.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tuned_grid_in_the_euler_drop_in_matches_stock():
    diffusers = pytest.importorskip("diffusers")
    from conftest import assert_close_to_peer, peer_tolerance
    from fastdiff.integrations import diffusers as fd
    sched = DiscreteVP()
    gm = GaussianMixture.default(sched, dim=3, prediction="epsilon", seed=2)
    grid = tune.tune_grid(gm, _noise(16, 3), solver="euler", steps=4, schedule=sched, prediction="epsilon",
                          candidates=12, max_evals=30, method="refine")

    def run(s, dtype):
        s.set_timesteps(**tune.diffusers_kwargs(grid, s))
        x = (_noise(6, 9) * s.init_noise_sigma).to(dtype)
        for t in s.timesteps:
            eps = 0.3 * s.scale_model_input(x, t) + 0.1           # any smooth model
            x = s.step(eps, t, x).prev_sample
        return x

    stock32 = run(diffusers.EulerDiscreteScheduler(), torch.float32)
    stock64 = run(diffusers.EulerDiscreteScheduler(), torch.float64)
    ours = run(fd.EulerDiscreteScheduler(), torch.float32)
    assert_close_to_peer(ours, stock32, peer_tolerance(stock32, stock64), "drop-in on the tuned grid")
