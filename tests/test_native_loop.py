"""The Sampler's C++ row loop (fastdiff._C.RowLoop) and its C++ noise check (fastdiff._C.all_finite).

Runs on the C++ CPU kernel take the C++ loop wherever the Python loop would only call the model and
the kernel; it must be the Python loop exactly: the same samples bit for bit, the same model calls
(inputs, times, keyword arguments) in the same order, the same errors, the same progress counts.
``sampler.NATIVE_LOOP = False`` forces the Python loop, the oracle here.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff import sampler as sampler_module
from fastdiff.ops.backends import load_extension
from fastdiff.sampler import all_finite

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str) or not hasattr(_C, "RowLoop"),
                                reason="fastdiff._C (with RowLoop) is not built")


class Recorder:
    """A deterministic model whose output depends on its input, time and keyword arguments; it
    records every call."""

    def __init__(self, shape, wrap=None):
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(shape[1:], generator=g)
        self.calls = []
        self.wrap = wrap

    def __call__(self, x, t, **kw):
        self.calls.append((x.clone(), t.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                  for k, v in kw.items()}))
        out = torch.tanh(0.3 * x + self.w) * (1 + t.reshape(-1, *[1] * (x.dim() - 1)) / 1000)
        if "c" in kw:
            out = out + 0.1 * kw["c"].reshape(-1, *[1] * (x.dim() - 1))
        return out if self.wrap is None else self.wrap(out)


def both_loops(run):
    """run(recorders) under the C++ loop, then under the Python loop: (results, recorders). Fails
    unless the first run really took the C++ loop and the second did not."""
    results, recorders, native_runs = [], [], []
    original = sampler_module.Sampler._run_native

    def counted(self, *args):
        native_runs.append(1)
        return original(self, *args)

    sampler_module.Sampler._run_native = counted
    try:
        for native in (True, False):
            sampler_module.NATIVE_LOOP = native
            before = len(native_runs)
            rec = []
            results.append(run(rec))
            recorders.append(rec[0] if rec else None)
            assert (len(native_runs) > before) == native
    finally:
        sampler_module.NATIVE_LOOP = True
        sampler_module.Sampler._run_native = original
    return results, recorders


def assert_same_calls(a: Recorder, b: Recorder):
    assert len(a.calls) == len(b.calls) > 0
    for (xa, ta, ka), (xb, tb, kb) in zip(a.calls, b.calls):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and ta.dtype == tb.dtype
        assert ka.keys() == kb.keys()
        for k in ka:
            assert torch.equal(ka[k], kb[k]) if isinstance(ka[k], torch.Tensor) else ka[k] == kb[k]


SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_ancestral", "unipc", "ddim", "ddpm",
           "rk4", "dpmpp_2s_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp"]


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s in fastdiff.SOLVERS])
@pytest.mark.parametrize("guidance", [None, 4.5, (1.0, 3.0, 7.5)])
def test_native_loop_equals_python_loop(solver, guidance):
    shape = (3, 2, 5, 7)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"c": torch.tensor([1.0, 2.0, 3.0])}, {"c": torch.zeros(3)}
    if isinstance(guidance, tuple):
        guidance = fastdiff.Guidance(scale=torch.tensor(guidance))

    def run(rec):
        m = Recorder(shape)
        rec.append(m)
        kw = dict(cond=cond, uncond=uncond) if guidance is not None else dict(cond=cond)
        return fastdiff.sample(m, noise, solver=solver, steps=6, guidance=guidance, seed=7, progress=False, **kw)

    (a, b), (ra, rb) = both_loops(run)
    assert torch.equal(a, b)
    assert_same_calls(ra, rb)


def test_native_loop_prepared_sampler_reused_and_model_dtypes():
    # A prepared Sampler called again (the executor and its C++ loop are reused), fp16 / bf16 models.
    shape = (2, 3, 4, 4)
    noise = torch.randn(shape)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        s = fastdiff.Sampler.build(solver="dpmpp_2m", steps=5, guidance=3.0)

        def run(rec):
            m = Recorder(shape, wrap=lambda o: o.to(dtype))
            rec.append(m)
            first = s(m, noise, cond={}, uncond={}, model_dtype=dtype, progress=False)
            return torch.stack([first, s(m, noise, cond={}, uncond={}, model_dtype=dtype, progress=False)])

        (a, b), (ra, rb) = both_loops(run)
        assert torch.equal(a, b) and torch.equal(a[0], a[1])
        assert_same_calls(ra, rb)


class Wrapped:
    def __init__(self, sample):
        self.sample = sample


class Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("wrap", [lambda o: (o,), lambda o: Wrapped(o), lambda o: o.as_subclass(Sub),
                                  lambda o: o.double()],
                         ids=["tuple", "dot-sample", "subclass", "float64"])
def test_native_loop_hands_other_outputs_to_python(wrap):
    # Outputs that are not a plain tensor of a model dtype: converted by Python, then the loop resumes.
    shape = (2, 3, 4, 4)
    noise = torch.randn(shape)

    def run(rec):
        m = Recorder(shape, wrap=wrap)
        rec.append(m)
        return fastdiff.sample(m, noise, solver="dpmpp_2m", steps=5, guidance=2.0, cond={}, uncond={},
                               progress=False)

    (a, b), (ra, rb) = both_loops(run)
    assert torch.equal(a, b)
    assert_same_calls(ra, rb)


@pytest.mark.parametrize("bad", ["shape", "int", "string"])
def test_native_loop_bad_model_output_same_error(bad):
    shape = (2, 3, 4, 4)
    noise = torch.randn(shape)
    calls = {"n": 0}

    def model(x, t):
        calls["n"] += 1
        if calls["n"] < 3:
            return torch.zeros_like(x)
        return {"shape": torch.zeros(x.shape[0], 5), "int": torch.zeros(x.shape, dtype=torch.int32),
                "string": "oops"}[bad]

    errors = []
    for native in (True, False):
        sampler_module.NATIVE_LOOP = native
        calls["n"] = 0
        try:
            with pytest.raises((ValueError, TypeError)) as e:
                fastdiff.sample(model, noise, solver="euler", steps=5, progress=False)
            errors.append((e.type, str(e.value), calls["n"]))
        finally:
            sampler_module.NATIVE_LOOP = True
    assert errors[0] == errors[1]


def test_native_loop_model_exception_propagates():
    def model(x, t):
        raise KeyError("from the model")
    with pytest.raises(KeyError, match="from the model"):
        fastdiff.sample(model, torch.randn(1, 2, 3, 3), solver="euler", steps=3, progress=False)


def test_native_loop_nonfinite_flag_same_row():
    shape = (1, 2, 3, 3)
    noise = torch.randn(shape)
    msgs = []
    for native in (True, False):
        sampler_module.NATIVE_LOOP = native
        n = {"i": 0}

        def model(x, t):
            n["i"] += 1
            return torch.full_like(x, float("nan") if n["i"] == 4 else 0.5)
        try:
            with pytest.raises(FloatingPointError) as e:
                fastdiff.sample(model, noise, solver="dpmpp_2m", steps=6, progress=False)
            msgs.append(str(e.value))
        finally:
            sampler_module.NATIVE_LOOP = True
    assert msgs[0] == msgs[1] and "step 3" in msgs[0]


def test_native_loop_progress_counts_every_step(monkeypatch):
    # progress=True: the loop returns after every step so the bar advances step by step; the lazy bar
    # (progress=None) opens once its delay has passed, with the steps done so far.
    counts = []

    class Bar:
        def __init__(self, total, desc, leave, initial):
            self.n = initial
            counts.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            pass

    import tqdm.auto
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    noise = torch.randn(1, 2, 3, 3)
    fastdiff.sample(lambda x, t: torch.zeros_like(x), noise, solver="heun", steps=7, progress=True)
    assert len(counts) == 1 and counts[0].n == 7
    counts.clear()
    fastdiff.sample(lambda x, t: torch.zeros_like(x), noise, solver="heun", steps=7)       # fast: no bar
    assert counts == []
    import time as _time

    def slow(x, t):
        _time.sleep(0.06)
        return torch.zeros_like(x)
    fastdiff.sample(slow, noise, solver="euler", steps=12)          # ~0.7 s: the lazy bar opens mid-run
    assert len(counts) == 1 and counts[0].n == 12


def test_one_call_sampler_is_reused_without_leaking_state():
    noise = torch.randn(2, 3, 4, 4)
    m = lambda x, t: 0.1 * x  # noqa: E731
    a = fastdiff.sample(m, noise, solver="dpmpp_2m", steps=5)
    b = fastdiff.sample(m, noise, solver="dpmpp_2m", steps=5)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    c = fastdiff.sample(m, noise[:1], solver="dpmpp_2m", steps=5)       # another shape, same build entry
    assert torch.equal(c, a[:1])
    s = fastdiff.Sampler.build(solver="dpmpp_2m", steps=5)                # a user's Sampler: a private table
    s.program.table[:, 0] = 2.0
    assert torch.equal(fastdiff.sample(m, noise, solver="dpmpp_2m", steps=5), a)


# ---------------------------------------------------------------------------------------------
# The noise check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 9000])
def test_all_finite_bit_test_matches_isfinite(dtype, n):
    t = torch.randn(n, dtype=torch.float64).to(dtype)
    assert _C.all_finite(t) and all_finite(t)
    for pos in sorted({0, n // 2, 4095 % n, n - 1}):
        for bad in (math.nan, math.inf, -math.inf):
            u = t.clone()
            u[pos] = bad
            assert not _C.all_finite(u) and not all_finite(u)
    big = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny / 2], dtype=dtype)
    assert _C.all_finite(big)                       # the largest finite values and subnormals are finite


def test_all_finite_other_layouts_fall_back():
    t = torch.randn(6, 8)
    t[0, 1] = math.nan
    assert not all_finite(t.t())                    # non-contiguous: the aminmax path
    assert all_finite(t[1:, 2:].t())
    with pytest.raises(ValueError, match="contiguous"):
        _C.all_finite(t.t())
    with pytest.raises(TypeError, match="float32"):
        _C.all_finite(torch.zeros(3, dtype=torch.int32))
