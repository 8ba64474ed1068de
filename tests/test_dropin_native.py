"""The drop-ins' C++ step (fastdiff._C.DropinStep, csrc/cpu/dropin_step.cpp) against their Python path.

A drop-in scheduler's step serves its plain calls in C++: float32 CPU tensors, the sample read
where it lies, no noise draw, a timestep equal to the call's; pred_original_sample is written by
the same pass (a write-only history slot). Every other call goes through the Python path
(FastdiffScheduler._fd_step_unsafe), which converts or raises. Checked here: the two paths give
the same prev_sample and pred_original_sample bit for bit, the same step index and output
classes; the calls meant for the C++ step do not reach the Python path; anything else falls back
to it untouched (same errors, nothing written); the scheduler is not kept alive by its C++ step;
a deepcopy mid-run continues alike.
"""
from __future__ import annotations

import copy
import gc
import logging
import weakref

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
from fastdiff.integrations.diffusers import base  # noqa: E402
from fastdiff.ops.backends import load_extension  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.skipif(isinstance(load_extension(), str) or not hasattr(load_extension(), "DropinStep"),
                                 reason="fastdiff._C (with DropinStep) is not built")]
logging.getLogger("diffusers").setLevel(logging.ERROR)

SHAPE = (2, 4, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_LEADING = dict(SD, timestep_spacing="leading", steps_offset=1)

# name, config, whether it draws noise (each call after the first, which builds the run, in C++)
CASES = [
    ("EulerDiscreteScheduler", SD_LEADING, False),                              # in place as x, x0 by the pass
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction"), False),   # ... x0 by the x0 pass
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), False),
    ("FlowMatchEulerDiscreteScheduler", {}, False),                             # no x0 returned
    ("LCMScheduler", {}, True),
    ("EulerAncestralDiscreteScheduler", SD_LEADING, True),
    ("DDPMScheduler", dict(SD, clip_sample=False), True),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), False),
    ("HeunDiscreteScheduler", SD, False),                 # two stages: state path, then in place as y
    ("KDPM2DiscreteScheduler", SD, False),
    ("DPMSolverMultistepScheduler", SD, False),           # history: the state path, x0 by torch
    ("UniPCMultistepScheduler", SD, False),
    ("DEISMultistepScheduler", SD, False),
    ("LMSDiscreteScheduler", SD, False),
]


def _make(name, config):
    return getattr(fd, name)(**config)


def _python_only(s):
    """``s`` with its C++ step turned off (every call through the Python path)."""
    s._native_step = lambda run: None
    return s


class _Spy:
    """Counts the calls that reach the Python path of one scheduler."""

    def __init__(self, s):
        self.n = 0
        inner = s._fd_step_unsafe

        def counted(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)
        s._fd_step_unsafe = counted


def _inputs(n, seed=0, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g) * scale, torch.randn(SHAPE, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("return_dict", [False, True])
@pytest.mark.parametrize("name, config, stochastic", CASES)
def test_native_step_equals_the_python_path(name, config, stochastic, return_dict):
    """Same inputs to a scheduler with its C++ step and one without: the same outputs bit for
    bit, output class, step index and stage flag; only the first call of a run goes through
    Python (it builds the run)."""
    fast, slow = _make(name, config), _python_only(_make(name, config))
    spy = _Spy(fast)
    for s in (fast, slow):
        s.set_timesteps(8)
    kw = [{"generator": torch.Generator().manual_seed(3)} for _ in range(2)] if stochastic else [{}, {}]
    for i, (t, (x, out)) in enumerate(zip(fast.timesteps, _inputs(len(fast.timesteps)))):
        a = fast.step(out, t, x, return_dict=return_dict, **kw[0])
        b = slow.step(out, t, x, return_dict=return_dict, **kw[1])
        assert type(a) is type(b)
        a, b = (a.to_tuple(), b.to_tuple()) if return_dict else (a, b)
        assert len(a) == len(b)
        for j, (u, v) in enumerate(zip(a, b)):
            assert u.dtype == v.dtype and u.shape == v.shape and u.is_contiguous()
            assert torch.equal(u, v), f"{name}: output {j} differs between the paths at call {i}"
        assert fast._step_index == slow._step_index
        for flag in ("state_in_first_order", "dt", "sample"):
            if hasattr(slow, flag) and flag != "sample" or getattr(slow, "_stage_flag", None) == flag:
                assert _same(getattr(fast, flag, None), getattr(slow, flag, None)), f"{name}: {flag} at call {i}"
    assert spy.n == 1, f"{name}: {spy.n} calls went through the Python path (expected only the first)"


def _same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_pred_original_sample_from_the_pass_is_diffusers_own():
    """Euler's pred_original_sample (sample - sigma * model_output, two roundings as diffusers
    forms it) written by the pass equals diffusers' bit for bit."""
    ours, ref = _make("EulerDiscreteScheduler", SD_LEADING), diffusers.EulerDiscreteScheduler(**SD_LEADING)
    for s in (ours, ref):
        s.set_timesteps(6)
    for t, (x, out) in list(zip(ref.timesteps, _inputs(6)))[:-1]:
        a, b = ours.step(out, t, x, return_dict=False), ref.step(out, t, x, return_dict=False)
        assert torch.equal(a[1], b[1])


def _served_run():
    s = _make("EulerDiscreteScheduler", SD_LEADING)
    s.set_timesteps(6)
    (x, out), = _inputs(1)
    s.step(out, s.timesteps[0], x)
    return s


@pytest.mark.parametrize("kind", ["fp16 output", "non-contiguous sample", "float64 sample", "numpy timestep",
                                  "tensor timestep", "0-d int tensor timestep"])
def test_declined_calls_take_the_python_path(kind):
    """A call the C++ step does not serve reaches the Python path and gives its result."""
    a, b = _served_run(), _python_only(_served_run())
    spy = _Spy(a)
    (x, out), = _inputs(1, seed=1)
    t = a.timesteps[1]
    args = {"fp16 output": (out.half(), t, x), "non-contiguous sample": (out, t, x.transpose(-1, -2)),
            "float64 sample": (out, t, x.double()), "numpy timestep": (out, np.float32(t), x),
            "tensor timestep": (out, t.clone(), x), "0-d int tensor timestep": None}[kind]
    if args is None:                                # (Euler refuses integer timesteps: both paths raise)
        with pytest.raises(ValueError, match="integer"):
            a.step(out, torch.tensor(int(t)), x)
        assert spy.n == 1 and a._step_index == 1
        return
    ra, rb = a.step(*args, return_dict=False), b.step(*args, return_dict=False)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert spy.n == (0 if kind == "tensor timestep" else 1)


@pytest.mark.parametrize("bad", ["wrong timestep", "wrong shape", "int timestep", "float int timestep"])
def test_bad_calls_raise_the_python_paths_errors(bad):
    """Calls the C++ step declines because they are wrong raise the Python path's error and
    change nothing; the run then continues as a scheduler that never saw them."""
    a, b = _served_run(), _served_run()
    (x, out), = _inputs(1, seed=2)
    t = a.timesteps[1]
    kept = x.clone()
    args, match = {"wrong timestep": ((out, a.timesteps[3], x), "timestep"),
                   "wrong shape": ((torch.randn(1, 4, 8, 8), t, x), "shape"),
                   "int timestep": ((out, int(t), x), "integer"),
                   "float int timestep": ((out, float(t) + 0.5, x), "timestep")}[bad]
    with pytest.raises((ValueError, TypeError), match=match):
        a.step(*args, return_dict=False)
    assert a._step_index == 1 and torch.equal(x, kept)
    ra, rb = a.step(out, t, x, return_dict=False), b.step(out, t, x, return_dict=False)
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])


def test_the_sample_is_not_written_and_outputs_are_fresh():
    s = _served_run()
    (x, out), = _inputs(1, seed=4)
    kept, version = x.clone(), x._version
    p1, x1 = s.step(out, s.timesteps[1], x, return_dict=False)
    p2, x2 = s.step(out, s.timesteps[2], x, return_dict=False)
    assert x._version == version and torch.equal(x, kept)
    ptrs = {t.data_ptr() for t in (x, out, p1, x1, p2, x2)}
    assert len(ptrs) == 6 and torch.isfinite(x1).all() and torch.isfinite(x2).all()


def test_the_scheduler_is_not_kept_alive_by_its_native_step():
    s = _served_run()
    (x, out), = _inputs(1)
    s.step(out, s.timesteps[1], x)
    assert s._fd_run.native not in (None, False)
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None


def test_deepcopy_mid_run_continues_alike():
    a = _served_run()
    (x, out), = _inputs(1, seed=5)
    a.step(out, a.timesteps[1], x)
    b = copy.deepcopy(a)
    assert b._fd_run.native is None
    for t, (x, out) in zip(a.timesteps[2:], _inputs(4, seed=6)):
        ra, rb = a.step(out, t, x, return_dict=False), b.step(out, t, x, return_dict=False)
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert b._fd_run.native not in (None, False)


def test_reference_backend_has_no_native_step():
    s = _make("EulerDiscreteScheduler", SD_LEADING)
    s.fastdiff_backend = "reference"
    s.set_timesteps(4)
    for t, (x, out) in zip(s.timesteps, _inputs(3)):
        s.step(out, t, x)
    assert s._fd_run.native is False
    assert base.FastdiffScheduler._native_step(s, s._fd_run) is None


def test_transformed_x0_and_given_noise_take_the_python_path():
    """clip_sample (an x0 transform) has no C++ step; a given variance_noise is checked by the
    Python path (the call is declined before anything is drawn)."""
    s = _make("DDPMScheduler", SD)                          # (clip_sample=True by default)
    s.set_timesteps(4)
    for t, (x, out) in zip(s.timesteps, _inputs(3)):
        s.step(out, t, x, generator=torch.Generator().manual_seed(0))
    assert s._fd_run.native is False

    ddim = dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    a, b = _make("DDIMScheduler", ddim), _python_only(_make("DDIMScheduler", ddim))
    spy = _Spy(a)
    for s in (a, b):
        s.set_timesteps(4)
    for t, (x, out) in zip(a.timesteps, _inputs(4, seed=8)):
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(t)))
        ra = a.step(out, t, x, eta=1.0, variance_noise=z, return_dict=False)
        rb = b.step(out, t, x, eta=1.0, variance_noise=z, return_dict=False)
        assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert spy.n == 4
    a.set_timesteps(4)
    a.step(out, a.timesteps[0], x, eta=1.0)
    with pytest.raises(ValueError, match="variance_noise"):
        a.step(out, a.timesteps[1], x, eta=1.0, variance_noise=torch.randn(1, 4, 8, 8))
    assert a._step_index == 1
