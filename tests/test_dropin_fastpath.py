"""The drop-ins' in-place path: a step that reads the caller's sample where it lies.

Where a row needs no state from the call (Euler, Euler ancestral, DDIM, DDPM, LCM: a row
evaluated at x that writes x only; the second stage of Heun reads its sample as y), ``step``
binds a float32 contiguous ``sample`` to the kernel read-only instead of copying it into the
run's state, and writes prev_sample straight into the returned tensor (fastdiff.integrations.
diffusers.base, ``_sample_binding``). Any other sample (float16/bfloat16/float64, non-contiguous)
takes the state path, which copies it in. Checked here: both paths give the same prev_sample bit
for bit and the same pred_original_sample (bit for bit where torch forms it alike, to a few ulps
where the kernel forms it), alone and mixed within a run; both match diffusers over dtypes; the
sample is never written, also when it is the model output; CFG recorded as a GuidedOutput; bad
input raises before anything is written.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
from fastdiff.integrations.diffusers.cfg import GuidedOutput, tag_model_output  # noqa: E402
from fastdiff.program import COL_G  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)

TOL = 1e-5                     # float32 state: the drop-in tests' bound, relative to the sample scale
SHAPE = (2, 4, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_LEADING = dict(SD, timestep_spacing="leading", steps_offset=1)
SD_DDIM = dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# name, config, stochastic (draws noise from a generator)
CASES = [
    ("EulerDiscreteScheduler", SD_LEADING, False),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction"), False),
    ("EulerAncestralDiscreteScheduler", SD_LEADING, True),
    ("DDIMScheduler", SD_DDIM, False),
    ("HeunDiscreteScheduler", SD, False),
    ("DDPMScheduler", SD, True),
    ("LCMScheduler", {}, True),
]
FOUR = [c for c in CASES if c[0] in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                                     "HeunDiscreteScheduler")]


def _make(lib, name, config):
    return getattr(lib, name)(**config)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed layout (the state path copies it in)."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _inputs(scheduler, steps, dtype=torch.float32, seed=0):
    """Per call a fresh sample (as an edited latent would be) and model output."""
    g = torch.Generator().manual_seed(seed)
    sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    return [((torch.randn(SHAPE, generator=g) * sigma).to(dtype), torch.randn(SHAPE, generator=g).to(dtype))
            for _ in range(steps)]


def _step(s, out, t, x, gen=None):
    kw = {"generator": gen} if gen is not None else {}
    return s.step(out, t, x, return_dict=False, **kw)


def _x0_bitwise(name, config) -> bool:
    """Whether pred_original_sample is formed by the same torch op on both paths (A_x = 1: x + A_d D)."""
    return name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler") and \
        config.get("prediction_type", "epsilon") == "epsilon"


def _assert_x0_close(a, b, what):
    scale = max(1.0, float(b.abs().max()))
    err = float((a.double() - b.double()).abs().max())
    assert err <= 4 * torch.finfo(torch.float32).eps * scale, f"{what}: {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# The in-place path against the state path


@pytest.mark.parametrize("name, config, stochastic", CASES)
def test_in_place_path_equals_state_path(name, config, stochastic):
    """Three runs on the same inputs: contiguous samples (in place), non-contiguous samples (the
    state path, i.e. the step as it was), and the two alternating. prev_sample agrees bit for bit."""
    runs = [_make(fd, name, config) for _ in range(3)]
    for s in runs:
        s.set_timesteps(6)
    timesteps = runs[0].timesteps
    inputs = _inputs(runs[0], len(timesteps))
    gens = [torch.Generator().manual_seed(5) for _ in runs] if stochastic else [None] * 3
    for i, (t, (x, out)) in enumerate(zip(timesteps, inputs)):
        version = x._version
        layouts = [x, _non_contiguous(x), x if i % 2 else _non_contiguous(x)]
        res = [_step(s, out, t, xi, g) for s, xi, g in zip(runs, layouts, gens)]
        assert x._version == version and torch.equal(x, inputs[i][0]), "step wrote its sample"
        (p0, x00), (p1, x01), (p2, x02) = res
        assert p0.dtype == p1.dtype == torch.float32 and p0.is_contiguous()
        assert torch.equal(p0, p1) and torch.equal(p0, p2), f"prev_sample differs between the paths at call {i}"
        if _x0_bitwise(name, config):
            assert torch.equal(x00, x01) and torch.equal(x00, x02), f"pred_original_sample differs at call {i}"
        else:
            _assert_x0_close(x00, x01, f"pred_original_sample at call {i}")
            _assert_x0_close(x02, x01, f"pred_original_sample at call {i}")


def test_in_place_path_reads_no_state():
    """Euler's step reads its sample, not the run's state buffer; Heun's second stage reads its
    sample as y, not the run's y (both filled with NaN here)."""
    s = fd.EulerDiscreteScheduler(**SD)
    s.set_timesteps(4)
    (x0, o0), (x1, o1) = _inputs(s, 2)
    _step(s, o0, s.timesteps[0], x0)
    s._fd_run.x.fill_(float("nan"))
    prev, pred = _step(s, o1, s.timesteps[1], x1)
    assert torch.isfinite(prev).all() and torch.isfinite(pred).all()
    assert torch.isnan(s._fd_run.x).all(), "the in-place step wrote the state"

    h = fd.HeunDiscreteScheduler(**SD)
    h.set_timesteps(4)
    y, _ = _step(h, o0, h.timesteps[0], x0)              # first stage: through the state (x is kept)
    h._fd_run.y.fill_(float("nan"))
    prev, pred = _step(h, o1, h.timesteps[1], y)
    assert torch.isfinite(prev).all() and torch.isfinite(pred).all()


# ---------------------------------------------------------------------------------------------
# Against diffusers, over dtypes (float32 in place; float16 / bfloat16 / float64 by the state path)


def _to_float64(scheduler):
    for k, v in list(vars(scheduler).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(scheduler, k, v.double())
    return scheduler


def _floor(dtype, scale):
    """The least bound: the float32 state's (TOL), or two ulps of a low-precision result."""
    eps = torch.finfo(dtype).eps
    return scale * (TOL if eps < 1e-4 else 2 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name, config, stochastic", FOUR)
def test_matches_diffusers_over_dtypes(name, config, stochastic, dtype):
    """Each call on fresh inputs of ``dtype`` (sample and model output): prev_sample and
    pred_original_sample against diffusers', in diffusers' dtypes. Bound: twice diffusers' own
    error against its float64 run, at least the float32 state's TOL (float32 / float64) or two
    ulps (float16 / bfloat16). Stochastic schedulers (noise in the model dtype, which a float64
    run would draw differently) are compared directly at that least bound, in the coarser of the
    model's and the result's dtype."""
    ours, ref = _make(fd, name, config), _make(diffusers, name, config)
    ref64 = _make(diffusers, name, config) if not stochastic else None
    for s in (ours, ref) + ((ref64,) if ref64 is not None else ()):
        s.set_timesteps(5)
    if ref64 is not None:
        _to_float64(ref64)
    gens = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)] if stochastic else [None, None]
    for i, (t, (x, out)) in enumerate(zip(ref.timesteps, _inputs(ref, len(ref.timesteps), dtype))):
        mine = _step(ours, out, t, x, gens[0])
        peer = _step(ref, out, t, x, gens[1])
        exact = _step(ref64, out.double(), t, x.double()) if ref64 is not None else None
        for j, what in enumerate(("prev_sample", "pred_original_sample")):
            assert mine[j].dtype == peer[j].dtype, f"{what} dtype at call {i}"
            scale = max(1.0, float(peer[j].abs().max()))
            # (diffusers forms its products in the model dtype: a stochastic run, which has no
            # float64 twin, is held to that dtype's rounding)
            bound = _floor(dtype if stochastic and torch.finfo(dtype).eps > torch.finfo(peer[j].dtype).eps
                           else peer[j].dtype, scale)
            target = peer[j].double()
            if exact is not None:
                target = exact[j].double()
                bound = max(bound, 2.0 * float((peer[j].double() - target).abs().max()))
            err = float((mine[j].double() - target).abs().max())
            assert err <= bound, f"{what} at call {i}: {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# Aliasing, CFG


@pytest.mark.parametrize("name, config, stochastic", FOUR)
def test_sample_aliasing_model_output(name, config, stochastic):
    """step(x, t, x): the same tensor as model output and sample; x is not written."""
    a, b = _make(fd, name, config), _make(fd, name, config)
    for s in (a, b):
        s.set_timesteps(4)
    gens = [torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)] if stochastic else [None, None]
    for t, (x, _) in zip(a.timesteps, _inputs(a, len(a.timesteps))):
        kept, version = x.clone(), x._version
        shared = _step(a, x, t, x, gens[0])
        apart = _step(b, x.clone(), t, x.clone(), gens[1])
        assert x._version == version and torch.equal(x, kept)
        assert torch.equal(shared[0], apart[0]) and torch.equal(shared[1], apart[1])


def _guided(u: torch.Tensor, c: torch.Tensor, g: float) -> GuidedOutput:
    """The pipeline's CFG formula on a tagged [uncond; cond] output: recorded, not computed."""
    uu, cc = tag_model_output(torch.cat([u, c])).chunk(2)
    d = uu + g * (cc - uu)
    assert type(d) is GuidedOutput
    return d


@pytest.mark.parametrize("name, config, stochastic", FOUR)
def test_cfg_guided_output(name, config, stochastic):
    """A recorded CFG combination (changing scales, then a plain tensor): the in-place path, the
    state path (non-contiguous samples) and diffusers on the eager formula agree."""
    fast, state, ref = _make(fd, name, config), _make(fd, name, config), _make(diffusers, name, config)
    for s in (fast, state, ref):
        s.set_timesteps(5)
    gens = [torch.Generator().manual_seed(4) for _ in range(3)] if stochastic else [None] * 3
    g = torch.Generator().manual_seed(1)
    scales = [7.5, 7.5, 3.0, None, 5.0, 1.5, 7.5, 2.0, 3.0, 4.0]
    for i, t in enumerate(ref.timesteps):
        x = torch.randn(SHAPE, generator=g) * float(ref.init_noise_sigma)
        u, c = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        w = scales[i]
        if w is None:
            a = _step(fast, c, t, x, gens[0])
            b = _step(state, c, t, _non_contiguous(x), gens[1])
            r = _step(ref, c, t, x, gens[2])
        else:
            a = _step(fast, _guided(u, c, w), t, x, gens[0])
            b = _step(state, _guided(u, c, w), t, _non_contiguous(x), gens[1])
            r = _step(ref, u + w * (c - u), t, x, gens[2])
        assert torch.equal(a[0], b[0]), f"prev_sample differs between the paths at call {i}"
        _assert_x0_close(a[1], b[1], f"pred_original_sample (paths) at call {i}")
        for j in (0, 1):
            scale = max(1.0, float(r[j].abs().max()))
            err = float((a[j] - r[j]).abs().max())
            assert err <= TOL * scale, f"output {j} vs diffusers at call {i}: {err:.3g}"
        run = fast._fd_run
        assert bool((run.table[:, COL_G] == run.g).all())
        if run.x0_pass is not None:
            assert bool((run.x0_pass[:, COL_G] == run.g).all())


# ---------------------------------------------------------------------------------------------
# Bad input


def _twin_runs(name="EulerDiscreteScheduler", config=SD):
    a, b = _make(fd, name, config), _make(fd, name, config)
    for s in (a, b):
        s.set_timesteps(5)
    inputs = _inputs(a, 3)
    for s in (a, b):
        _step(s, inputs[0][1], s.timesteps[0], inputs[0][0])
    return a, b, inputs


@pytest.mark.parametrize("bad", ["shape", "timestep", "integer_timestep", "model_dtype", "sample_dtype", "uncond"])
def test_bad_input_raises_before_any_write(bad):
    """A refused call changes nothing: not the sample, not the step index, not the run; the next
    call gives what a scheduler that never saw it gives."""
    a, b, inputs = _twin_runs()
    x, out = inputs[1]
    t = a.timesteps[1]
    kept, version = x.clone(), x._version
    run, index = a._fd_run, a._step_index
    args = {"shape": lambda: (torch.randn(1, 4, 8, 8), t, x), "timestep": lambda: (out, a.timesteps[3], x),
            "integer_timestep": lambda: (out, 1, x), "model_dtype": lambda: (out.to(torch.int32), t, x),
            "sample_dtype": lambda: (out, t, x.to(torch.int64)),
            # (a CFG scale set for the call, then refused by the kernel: the scale is put back)
            "uncond": lambda: (_FakeGuided(out, torch.randn(1, 4, 8, 8), 3.0), t, x)}[bad]()
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        a.step(*args, return_dict=False)
    assert x._version == version and torch.equal(x, kept)
    assert a._fd_run is run and a._step_index == index and run.g == 1.0
    assert bool((run.table[:, COL_G] == 1.0).all())
    good_a, good_b = _step(a, out, t, x), _step(b, out, t, x)
    assert torch.equal(good_a[0], good_b[0]) and torch.equal(good_a[1], good_b[1])


class _FakeGuided(GuidedOutput):
    """A recorded CFG value whose uncond half has the wrong shape, which only the kernel sees
    (after the step has set the call's scale): a GuidedOutput built by hand."""

    def __new__(cls, cond, uncond, g):
        self = torch.Tensor._make_subclass(cls, cond.as_subclass(torch.Tensor))
        self._parts = (cond, uncond, g)
        return self

    def __init__(self, *args):
        pass

    def parts(self):
        return self._parts


@pytest.mark.parametrize("name, config, where", [
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction"), "_x0_in_place"),   # after the pass
    ("EulerDiscreteScheduler", SD, "_x0_slot_table"),             # (Euler's x0 is the pass's: before it)
])
def test_failure_after_the_pass_restores_the_scale(name, config, where):
    """A failure after the scale is set (forced in forming pred_original_sample: after the pass
    where it is formed beside it, before it where the pass writes it) leaves the run's CFG scale
    and tables as they were, and the step index where it was."""
    a, b, inputs = _twin_runs(name, config)
    (x, out), t = inputs[1], a.timesteps[1]
    run, index = a._fd_run, a._step_index

    def fail(*args, **kwargs):
        raise RuntimeError("forced")
    setattr(a, where, fail)
    with pytest.raises(RuntimeError, match="forced"):
        _step(a, _guided(torch.randn(SHAPE), out, 6.0), t, x)
    delattr(a, where)
    assert a._step_index == index and run.g == 1.0 and bool((run.table[:, COL_G] == 1.0).all())
    if run.x0_slot is not None:
        assert bool((run.x0_slot[0][:, COL_G] == 1.0).all())
    u = torch.randn(SHAPE)
    good_a, good_b = _step(a, _guided(u, out, 2.5), t, x), _step(b, _guided(u, out, 2.5), t, x)
    assert torch.equal(good_a[0], good_b[0]) and torch.equal(good_a[1], good_b[1])


def test_copies_of_a_scheduler_take_the_in_place_path_independently():
    """deepcopy mid-run (the pipelines' scheduler copies): both continue alike."""
    a = fd.DDIMScheduler(**SD_DDIM)
    a.set_timesteps(5)
    inputs = _inputs(a, 5)
    _step(a, inputs[0][1], a.timesteps[0], inputs[0][0])
    b = copy.deepcopy(a)
    for t, (x, out) in zip(a.timesteps[1:], inputs[1:]):
        ra, rb = _step(a, out, t, x), _step(b, out, t, x)
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert np.isfinite(ra[0].numpy()).all()
