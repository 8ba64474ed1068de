"""The row runtime (fastdiff.runtime) and the caches around it: every driver runs rows through one
RowExecutor; built programs, drivers' buffers and the drop-ins' compiled plans are reused, and
reuse never changes a result or leaks one run's state into another."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastdiff
import fastdiff.integrations.k_diffusion as K
from fastdiff import sampler as sampler_module
from fastdiff.program import FLAG_MODEL_IN_FROM_Y, col_s_in, unpack_flags
from fastdiff.runtime import RowExecutor, row_args
from fastdiff.sampler import all_finite


def _model(x, t, **kwargs):
    # A deterministic, input-dependent "denoiser": the result depends on every step's state.
    return 0.1 * x + 0.01 * t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) / 1000


@pytest.fixture(autouse=True)
def _fresh_caches():
    sampler_module._BUILD_CACHE.clear()
    yield
    sampler_module._BUILD_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# The executor


def test_executor_runs_rows_like_the_public_op():
    s = fastdiff.Sampler.build(solver="dpmpp_3m_sde" if "dpmpp_3m_sde" in fastdiff.SOLVERS else "dpmpp_2m", steps=6)
    prog = s.program
    x0 = torch.randn(2, 3, 5, 7)
    ex = RowExecutor.allocate(prog, x0, model_in_batch=None)
    ex.x.copy_(x0)
    ref_x, ref_hist = x0.clone(), torch.zeros_like(ex.hist) if ex.hist is not None else None
    ref_y = torch.empty_like(x0) if ex.y is not None else None
    table = torch.tensor(prog.table)
    for i, (r, a) in enumerate(zip(prog.rows, row_args(prog.rows))):
        D = torch.randn(x0.shape) if r.needs_model else None
        ex.run(i, D, None, None, 11)
        fastdiff.ops.fused_step(table, i, ref_x, y=ref_y, cond=D, hist=ref_hist, hist_write=r.hist_write,
                                eval_y=r.eval_at == "y", write_x=r.out_x is not None, write_y=r.out_y is not None,
                                seed=11, noise_id=r.noise_id)
    assert torch.equal(ex.x, ref_x)


def test_row_args_carry_the_rows_flags():
    """Per row (hist_writes, flags, noise_id): hist_writes the bitmask of the slots the row writes
    (one bit per write: slot hist_write, then more_writes), flags is Row.flags, its model-input bit
    set where the next model call reads y (the next row's evaluation point; the last row's next_eval)."""
    rows = fastdiff.Sampler.build(solver="heun", steps=3).program.rows          # rows at x and at y
    args = row_args(rows)
    assert any(r.eval_at == "y" for r in rows) and any(r.eval_at == "x" for r in rows)
    for i, (r, (hw, flags, nid)) in enumerate(zip(rows, args)):
        nxt = rows[i + 1].eval_at if i + 1 < len(rows) else r.next_eval
        assert (hw, nid) == ((1 << r.hist_write if r.hist_write >= 0 else 0), r.noise_id)
        assert flags & ~FLAG_MODEL_IN_FROM_Y == r.flags & ~FLAG_MODEL_IN_FROM_Y
        assert unpack_flags(flags) == (r.eval_at == "y", r.out_x is not None, r.out_y is not None, nxt == "y")


def test_executor_run_passes_flags_and_its_model_in_override_edits_one_bit():
    """RowExecutor.run hands the kernel the row's flags; model_in_from_y=True/False sets/clears
    FLAG_MODEL_IN_FROM_Y only (None: the row's own), and the kernel then writes model_in from the
    new y or the new x."""
    prog = fastdiff.Sampler.build(solver="heun", steps=3).program
    x0 = torch.randn(2, 3, 4)
    ex = RowExecutor.allocate(prog, x0, model_in_batch=2)
    seen = []
    step = ex._step
    ex._step = lambda *a: (seen.append(a[8]), step(*a))
    D = torch.randn(x0.shape)
    tried = set()
    for k, r in enumerate(prog.rows):
        # an override may only name an output the row writes
        for override in [None] + ([False] if r.out_x is not None else []) + ([True] if r.out_y is not None else []):
            ex.x.copy_(x0)
            ex.y.copy_(x0)
            ex.run(k, D if r.needs_model else None, model_in=ex.model_in if override is not None else None,
                   model_in_from_y=override)
            want = ex.args[k][1]
            if override is not None:
                want = (want & ~FLAG_MODEL_IN_FROM_Y) | (FLAG_MODEL_IN_FROM_Y if override else 0)
                s_in = float(prog.table[k, col_s_in(prog.num_slots)])
                src = ex.y if override else ex.x
                assert torch.equal(ex.model_in, (s_in * src).expand_as(ex.model_in)), (k, override)
                tried.add(override)
            assert seen[-1] == want
    assert tried == {False, True}


def test_executor_bind_rejects_a_program_its_buffers_cannot_hold():
    prog = fastdiff.Sampler.build(solver="dpmpp_2m", steps=4).program           # one history slot
    x = torch.zeros(1, 2, 3)
    ex = RowExecutor(x, model_like=x)
    with pytest.raises(ValueError, match="history slots"):
        ex.load(prog)
    heun = fastdiff.Sampler.build(solver="heun", steps=4).program               # evaluates at y
    with pytest.raises(ValueError, match="no y buffer"):
        RowExecutor(x, model_like=x, hist=torch.zeros(1, 1, 2, 3)).load(heun)
    with pytest.raises(ValueError, match="float64"):
        ex.bind(prog.rows, torch.zeros(len(prog.rows), 3, dtype=torch.float32), 0)


# ---------------------------------------------------------------------------------------------
# The build cache


def test_build_cache_hits_only_on_equal_arguments():
    a = fastdiff.Sampler.build(solver="dpmpp_2m", steps=8, guidance=7.5)
    b = fastdiff.Sampler.build(solver="dpmpp_2m", steps=8, guidance=7.5)
    assert b.program.rows is a.program.rows                         # built once
    assert b.program.table is not a.program.table                    # each Sampler owns its table
    for other in (dict(steps=9, guidance=7.5), dict(steps=8, guidance=7.0), dict(steps=8), dict(steps=8, guidance=7.5,
                  prediction="v_prediction"), dict(steps=8, guidance=7.5, spacing="trailing")):
        c = fastdiff.Sampler.build(solver="dpmpp_2m", **other)
        assert c.program.rows is not a.program.rows
    # A solver instance mutated after its first build is a different key.
    solver = fastdiff.get_solver("dpm_solver_multistep", order=2)
    p1 = fastdiff.Sampler.build(solver=solver, steps=6).program
    solver.order = 3
    p2 = fastdiff.Sampler.build(solver=solver, steps=6).program
    assert p2.rows is not p1.rows


def test_a_cached_build_equals_a_fresh_one_and_an_edited_table_stays_local():
    fresh = fastdiff.Sampler.build(solver="unipc", steps=10, guidance=3.0)
    again = fastdiff.Sampler.build(solver="unipc", steps=10, guidance=3.0)
    sampler_module._BUILD_CACHE.clear()
    rebuilt = fastdiff.Sampler.build(solver="unipc", steps=10, guidance=3.0)
    assert (again.program.table == rebuilt.program.table).all()
    again.program.table[:, 0] = 1.0                                    # a caller editing its Sampler
    assert (fastdiff.Sampler.build(solver="unipc", steps=10, guidance=3.0).program.table[:, 0] == 3.0).any()
    assert fresh.program.table is not again.program.table


def test_unkeyable_arguments_build_without_the_cache():
    g = fastdiff.Guidance(2.0)
    key = sampler_module._build_key("dpmpp_2m", None, None, None, 5, "auto", "zero", {}, "epsilon",
                                    lambda: None, torch.float32)
    assert key is None                                                  # a function has no value identity
    s = fastdiff.Sampler.build(solver="dpmpp_2m", steps=5, guidance=g)
    assert s.program.steps == 5


def test_build_errors_are_raised_every_time():
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown solver"):
            fastdiff.Sampler.build(solver="nope", steps=5)
        with pytest.raises(TypeError, match="state_dtype"):
            fastdiff.Sampler.build(solver="euler", steps=5, state_dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Buffer reuse


@pytest.mark.parametrize("solver,guidance", [("dpmpp_2m", None), ("heun", 4.0), ("euler_ancestral", 2.0)])
def test_reused_buffers_give_the_result_of_fresh_ones(solver, guidance):
    noise = torch.randn(2, 3, 4, 5)
    kw = dict(cond={"c": torch.ones(2)}, uncond={"c": torch.zeros(2)}) if guidance else {}
    model = (lambda x, t, c=None: _model(x, t) + (0 if c is None else c.reshape(-1, 1, 1, 1) * 0.01))
    s = fastdiff.Sampler.build(solver=solver, steps=6, guidance=guidance)
    first = s(model, noise, seed=3, **kw)
    second = s(model, noise, seed=3, **kw)                              # reuses y / history / model input
    other = s(model, noise * 0.5, seed=3, **kw)
    assert second is not first and second.data_ptr() != first.data_ptr()
    assert torch.equal(first, second)
    fresh = fastdiff.Sampler(s.program, s.grid, s.solver, s.prediction, s.guidance, s.device)(model, noise * 0.5,
                                                                                              seed=3, **kw)
    assert torch.equal(other, fresh)


def test_a_reentrant_run_gets_its_own_buffers():
    s = fastdiff.Sampler.build(solver="dpmpp_2m", steps=4)
    noise = torch.randn(1, 2, 3)
    inner = []

    def model(x, t):
        if not inner:
            inner.append(s(_model, noise))                               # the same Sampler, mid-run
        return _model(x, t)

    out = s(model, noise)
    assert torch.equal(out, s(_model, noise)) and torch.equal(inner[0], out)


def test_a_nonfinite_flag_does_not_leak_into_the_next_run():
    s = fastdiff.Sampler.build(solver="euler", steps=3)
    noise = torch.randn(1, 4)
    with pytest.raises(FloatingPointError):
        s(lambda x, t: x * float("nan"), noise)
    assert torch.isfinite(s(_model, noise)).all()


# ---------------------------------------------------------------------------------------------
# Finiteness check and progress


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    x = torch.randn(3, 5, 67).to(dtype)
    assert all_finite(x)
    for pos in (0, 500, x.numel() - 1):
        y = x.clone()
        y.view(-1)[pos] = bad
        assert not all_finite(y)
        assert not all_finite(y.transpose(0, 2))                         # any layout
    assert all_finite(torch.empty(0, 3, dtype=dtype))


def test_progress_none_draws_nothing_for_a_short_run_and_true_draws_a_bar(capsys):
    s = fastdiff.Sampler.build(solver="euler", steps=3)
    s(_model, torch.randn(1, 4))
    assert capsys.readouterr().err == ""
    s(_model, torch.randn(1, 4), progress=True)
    assert "fastdiff euler" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress"):
        s(_model, torch.randn(1, 4), progress="yes")


# ---------------------------------------------------------------------------------------------
# k-diffusion and drop-in caches


def test_k_diffusion_repeated_calls_match_and_new_sigmas_rebuild():
    x = torch.randn(2, 3, 4)
    s1 = K.get_sigmas_karras(5, 0.1, 10.0)
    a = K.sample_dpmpp_2m(_model, x, s1, disable=True)
    b = K.sample_dpmpp_2m(_model, x, s1, disable=True)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    s2 = K.get_sigmas_karras(5, 0.1, 12.0)
    c = K.sample_dpmpp_2m(_model, x, s2, disable=True)
    K._SAMPLERS.clear()
    K._GRIDS.clear()
    assert torch.equal(c, K.sample_dpmpp_2m(_model, x, s2, disable=True))
    assert not torch.equal(a, c)


def test_drop_in_plans_are_shared_only_between_equal_configurations():
    from fastdiff.integrations import diffusers as fdd
    from fastdiff.integrations.diffusers import base
    base._PROGRAMS.clear()
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sample, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)

    def run(sched, steps):
        sched.set_timesteps(steps)
        x = sample
        for t in sched.timesteps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = sched.step(eps, t, x).prev_sample
        return x

    a = run(fdd.EulerDiscreteScheduler(**cfg), 6)
    n = len(base._PROGRAMS)
    b = run(fdd.EulerDiscreteScheduler(**cfg), 6)                      # another instance, same config
    assert len(base._PROGRAMS) == n and torch.equal(a, b)
    c = run(fdd.EulerDiscreteScheduler(**cfg, timestep_spacing="trailing"), 6)
    d = run(fdd.EulerDiscreteScheduler(**cfg), 7)
    assert len(base._PROGRAMS) == n + 2 and not torch.equal(a, c) and not torch.equal(a, d)
    base._PROGRAMS.clear()
    assert torch.equal(run(fdd.EulerDiscreteScheduler(**cfg, timestep_spacing="trailing"), 6), c)


def test_a_new_drop_in_run_reuses_buffers_and_starts_clean():
    """set_timesteps() again at the same shape: the run takes the previous run's buffers (no
    allocation, no backend choice) and clears its history, so a multistep run equals a fresh one."""
    from fastdiff.integrations import diffusers as fdd
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=2)
    sample = torch.randn(1, 4, 8, 8)

    def run(sched, steps, scale=1.0):
        sched.set_timesteps(steps)
        x = sample
        for k, t in enumerate(sched.timesteps):
            x = sched.step(scale * (0.3 * x + 0.05 * k), t, x).prev_sample
        return x

    s = fdd.DPMSolverMultistepScheduler(**cfg)
    run(s, 6, scale=3.0)                                    # leaves history behind
    first = s._fd_run
    again = run(s, 6)
    assert s._fd_run is not first and s._fd_run.x is first.x and s._fd_run.executor is first.executor
    assert torch.equal(again, run(fdd.DPMSolverMultistepScheduler(**cfg), 6))
    run(s, 5)                                               # another step count, same shape: reused too
    assert s._fd_run.x is first.x
    s.set_timesteps(6)
    s.step(torch.zeros(2, 4, 8, 8), s.timesteps[0], torch.randn(2, 4, 8, 8))   # another shape: new buffers
    assert s._fd_run.x is not first.x
