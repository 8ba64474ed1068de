"""The C++ per-sample reductions (csrc/cpu/reductions.cpp) against the reference backend
(the oracles of fastdiff/reference/reductions.py): cfg_rescale, dynamic_threshold, error_norm, per_sample_norm.

Tolerances, stated once:
* dynamic_threshold is exact (the same order statistics, ATen's own lerp/clamp, the same IEEE
  clamp and division): compared with torch.equal, NaN where the reference has NaN.
* cfg_rescale in float32 math: within 1 ulp of float32 (the stds are float64 sums of another
  order, rounded once; in practice bitwise equal), float64 math: 1e-12 relative.
* error_norm / per_sample_norm sum squares in float64 where torch sums float32 in float32, so
  the kernel's error against a float64 oracle must be at most that of the reference, or 1 ulp.
Strided inputs are views into NaN-padded storage, so a read of a strided tensor as if it were
contiguous shows up as NaN. Layouts and the comparison are fastdiff.check's (the shared harness).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from fastdiff.check import EXACT, Tolerance, assert_within, relayout
from fastdiff.ops import reductions as R
from fastdiff.reference import reductions as reduction_oracles
from fastdiff.ops.backends import load_extension, select

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str), reason=str(_C))

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = [(1,), (7,), (1, 7), (3, 4, 9, 11), (2, 4, 64, 64), (1, 70001), (9, 1), (65, 3, 5, 7)]
LAYOUTS = ("contiguous", "last_two_transposed", "strided")
F32_ULP = 2.0 ** -23
F64_RTOL = 1e-12


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test case (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def sample(shape, dtype, gen, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_equal_nan(got, want, what=""):
    assert_within(got, want, EXACT, what)


def assert_rescale_close(got, want, what=""):
    rtol = F64_RTOL if want.dtype == torch.float64 else F32_ULP
    assert_within(got, want, Tolerance(1e-300, rtol), what)


def run_both(op, *args):
    """The op on the cpu and reference backends; the inputs must be left as they were."""
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    got = getattr(R, op)(*args, backend="cpu")
    want = getattr(R, op)(*args, backend="reference")
    for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before):
        assert torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()), f"{op} modified its input"
    return got, want


# ----------------------------------------------------------------------------------------------
# cfg_rescale
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.filterwarnings("ignore:std\\(\\)")   # the reference's torch.std of one-element samples
def test_cfg_rescale_parity(dtype, shape, layout):
    gen = seeded(dtype, shape, layout, "cfg")
    cond = relayout(sample(shape, dtype, gen, 2.0, 0.3), layout)
    uncond = relayout(sample(shape, dtype, gen), layout)
    for rescale in (0.0, 0.7, 1.0):
        got, want = run_both("cfg_rescale", cond, uncond, 7.5, rescale)
        assert got.dtype == math_dtype(dtype) and got.is_contiguous()
        assert_rescale_close(got, want, f"rescale={rescale}")


def test_cfg_rescale_bitwise_in_float32():
    """The claim of the kernel's comment: float32 results equal the reference's bit for bit
    (a float64 std of another summation order rounds to the same float32, barring ties)."""
    gen = torch.Generator().manual_seed(1)
    for B, n, scale, shift in [(2, 65536, 1.0, 0.0), (5, 70001, 1e-3, 10.0), (64, 37, 100.0, -3.0)]:
        cond, uncond = sample((B, n), torch.float32, gen, scale, shift), sample((B, n), torch.float32, gen, scale)
        got, want = run_both("cfg_rescale", cond, uncond, 5.0, 0.7)
        assert torch.equal(got, want)


def test_cfg_rescale_constant_and_single_element_samples():
    """std(D) = 0 (a constant sample) and std of one element (NaN, as torch.std) keep factor 1."""
    cond = torch.stack([torch.full((5, 3), 2.0), torch.randn(5, 3)])
    uncond = torch.stack([torch.full((5, 3), 2.0), torch.randn(5, 3)])
    got, want = run_both("cfg_rescale", cond, uncond, 3.0, 0.7)
    assert torch.equal(got, want)
    with pytest.warns(UserWarning):   # the reference's torch.std warns for one element per sample
        got, want = run_both("cfg_rescale", torch.randn(3, 1), torch.randn(3, 1), 3.0, 0.7)
    assert torch.equal(got, want)


def test_cfg_rescale_large_mean_small_spread():
    """The float64 two-pass/Chan variance keeps the std of a sample whose mean is 1e4 times its
    spread (a sum-of-squares formula in float32 would lose it)."""
    gen = torch.Generator().manual_seed(2)
    cond = sample((2, 100003), torch.float32, gen, 1e-2, 100.0)
    uncond = sample((2, 100003), torch.float32, gen, 1e-2, 100.0)
    got, want = run_both("cfg_rescale", cond, uncond, 4.0, 1.0)
    assert_rescale_close(got, want)


# ----------------------------------------------------------------------------------------------
# dynamic_threshold
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dynamic_threshold_parity(dtype, shape, layout):
    gen = seeded(dtype, shape, layout, "dt")
    x0 = relayout(sample(shape, dtype, gen, 1.7), layout)
    for ratio, max_value in [(0.995, 1.5), (0.5, 1.0), (1.0, math.inf), (1e-6, 3.0), (0.9, 2.0)]:
        got, want = run_both("dynamic_threshold", x0, ratio, max_value)
        assert got.dtype == math_dtype(dtype) and got.is_contiguous()
        assert_equal_nan(got, want, f"ratio={ratio} max_value={max_value}")


@pytest.mark.parametrize("data", ["ties", "constant", "zeros", "wide_range", "uniform", "inf", "nan", "signed_zeros"])
def test_dynamic_threshold_hard_data(data):
    """Selection edge cases: many equal values, one bucket holding everything, values spanning
    the exponent range, +-inf and NaN (torch.kthvalue orders NaN last; a NaN threshold makes the
    sample NaN, as torch.minimum does)."""
    gen = torch.Generator().manual_seed(3)
    shape = (3, 5000)
    if data == "ties":
        x = torch.randint(-4, 5, shape, generator=gen).float()
    elif data == "constant":
        x = torch.full(shape, -2.5)
    elif data == "zeros":
        x = torch.zeros(shape)
    elif data == "wide_range":
        x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 20)
    elif data == "uniform":
        x = torch.rand(shape, generator=gen) * 6 - 3
    elif data == "inf":
        x = torch.randn(shape, generator=gen) * 3
        x[0, ::50] = math.inf
        x[1, :] = -math.inf
    elif data == "nan":
        x = torch.randn(shape, generator=gen) * 3
        x[0, ::3] = math.nan      # enough NaN to reach the 0.995 quantile: sample 0 becomes NaN
        x[1, 7] = math.nan        # one NaN: only that element is NaN
    else:
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0)
        x[:, :100] = torch.randn(3, 100, generator=gen) * 4
    for ratio in (0.995, 0.5, 1.0):
        got, want = run_both("dynamic_threshold", x, ratio, 2.0)
        assert_equal_nan(got, want, f"{data} ratio={ratio}")
        num = ~want.isnan()   # (a NaN's sign bit means nothing)
        assert torch.equal(got.signbit()[num], want.signbit()[num]), "signed zeros differ"


def test_dynamic_threshold_large_sample():
    gen = torch.Generator().manual_seed(4)
    x0 = sample((1, 1000003), torch.float32, gen, 2.0)
    got, want = run_both("dynamic_threshold", x0, 0.995, 1.5)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# error_norm, per_sample_norm
# ----------------------------------------------------------------------------------------------
def _oracle_error_norm(a, b, ref, rtol, atol):
    """The reference's float32 elementwise operations, the sum in float64."""
    md = math_dtype(a.dtype)
    a, b, ref = a.to(md), b.to(md), ref.to(md)
    delta = torch.clamp(rtol * torch.maximum(a.abs(), ref.abs()), min=atol)
    r = ((a - b) / delta).double()
    return (r.square().sum().sqrt() / math.sqrt(a.numel())).item()


def _no_worse_than_reference(got, want, oracle, what):
    ulp = F64_RTOL if got.dtype == torch.float64 else F32_ULP
    scale = oracle.abs().clamp(min=1e-300)   # (an exact 0 must come out as 0)
    err_cpu = (got.double() - oracle).abs() / scale
    err_ref = (want.double() - oracle).abs() / scale
    assert bool((err_cpu <= torch.clamp(err_ref, min=ulp) + ulp).all()), \
        f"{what}: cpu error {err_cpu.max().item():.3g} vs reference {err_ref.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_norms_parity(dtype, shape, layout):
    gen = seeded(dtype, shape, layout, "norms")
    a = relayout(sample(shape, dtype, gen, 3.0), layout)
    b = relayout((a.double() + sample(shape, torch.float64, gen, 1e-3)).to(dtype), layout)
    ref = relayout(sample(shape, dtype, gen, 3.0), layout)

    got, want = run_both("per_sample_norm", a)
    assert got.shape == (shape[0],) and got.dtype == math_dtype(dtype)
    oracle = a.double().reshape(shape[0], -1).norm(dim=1)
    _no_worse_than_reference(got, want, oracle, "per_sample_norm")

    got, want = run_both("error_norm", a, b, ref, 1e-3, 1e-4)
    assert got.shape == () and got.dtype == math_dtype(dtype)
    _no_worse_than_reference(got, want, torch.tensor(_oracle_error_norm(a, b, ref, 1e-3, 1e-4), dtype=torch.float64), "error_norm")


def test_error_norm_nan_propagates():
    a, b, ref = torch.randn(2, 50), torch.randn(2, 50), torch.randn(2, 50)
    ref[1, 3] = math.nan
    got, want = run_both("error_norm", a, b, ref, 1e-2, 1e-3)
    assert got.isnan() and want.isnan()


# ----------------------------------------------------------------------------------------------
# threads, batch sizes, dispatch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (64, 4, 16, 16), (3, 300001)])
def test_thread_count_does_not_change_results(shape):
    """Fixed work pieces: the float64 partial sums, and so every result, are bitwise the same
    for 1 and 2 threads (and repeated runs)."""
    gen = torch.Generator().manual_seed(5)
    c, u = sample(shape, torch.float32, gen, 2.0), sample(shape, torch.float32, gen)
    calls = [lambda: _C.cfg_rescale(c, u, 6.0, 0.7), lambda: _C.dynamic_threshold(c, 0.995, 1.5),
             lambda: _C.error_norm(c, u, c, 1e-3, 1e-4), lambda: _C.per_sample_norm(c)]
    old = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            results.append([f() for f in calls])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)
    want = reduction_oracles.dynamic_threshold(c, 0.995, 1.5)
    assert torch.equal(results[0][1], want)


def test_auto_dispatch_picks_cpu_for_every_reduction():
    t = torch.zeros(2, 3)
    for op in R.OPS:
        assert select(op, "auto", [t]).name == "cpu", op
    for dtype in DTYPES:
        assert select("cfg_rescale", "auto", [t.to(dtype)] * 2).name == "cpu"


# ----------------------------------------------------------------------------------------------
# bad input: the public functions validate, the extension checks on its own; nothing changes
# ----------------------------------------------------------------------------------------------
def _ok():
    return torch.randn(2, 3, 4), torch.randn(2, 3, 4)


BAD = {
    # op, args, exception, message fragment
    "cfg dtype int": ("cfg_rescale", lambda c, u: (c.int(), u.int(), 2.0, 0.5), TypeError, "float"),
    "cfg dtype mismatch": ("cfg_rescale", lambda c, u: (c, u.half(), 2.0, 0.5), TypeError, "dtype"),
    "cfg shape mismatch": ("cfg_rescale", lambda c, u: (c, u[:, :2], 2.0, 0.5), ValueError, "shape"),
    "cfg empty": ("cfg_rescale", lambda c, u: (c[:0], u[:0], 2.0, 0.5), ValueError, "non-empty"),
    "cfg 0-d": ("cfg_rescale", lambda c, u: (c[0, 0, 0], u[0, 0, 0], 2.0, 0.5), ValueError, "non-empty"),
    "cfg rescale range": ("cfg_rescale", lambda c, u: (c, u, 2.0, 1.5), ValueError, "rescale"),
    "dt dtype": ("dynamic_threshold", lambda c, u: (c.long(), 0.9, 1.0), TypeError, "float"),
    "dt ratio 0": ("dynamic_threshold", lambda c, u: (c, 0.0, 1.0), ValueError, "ratio"),
    "dt ratio > 1": ("dynamic_threshold", lambda c, u: (c, 1.5, 1.0), ValueError, "ratio"),
    "dt max_value": ("dynamic_threshold", lambda c, u: (c, 0.9, -1.0), ValueError, "max_value"),
    "dt empty": ("dynamic_threshold", lambda c, u: (c[:, :0], 0.9, 1.0), ValueError, "non-empty"),
    "en shape": ("error_norm", lambda c, u: (c, u[:1], c, 1e-3, 1e-4), ValueError, "shape"),
    "en rtol": ("error_norm", lambda c, u: (c, u, c, 0.0, 1e-4), ValueError, "rtol"),
    "psn dtype": ("per_sample_norm", lambda c, u: (c.bool(),), TypeError, "float"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("level", ["public", "extension"])
def test_bad_input(case, level):
    op, make, exc, match = BAD[case]
    c, u = _ok()
    args = make(c, u)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    fn = (lambda *a: getattr(R, op)(*a, backend="cpu")) if level == "public" else getattr(_C, op)
    with pytest.raises(exc, match=match):
        fn(*args)
    for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before):
        assert torch.equal(a, b)


def test_error_norm_mixed_dtypes():
    """The public error_norm accepts b and ref in other float dtypes (the reference converts them
    to a's math dtype); the cpu backend does the same, and the extension itself insists on one dtype."""
    gen = seeded("mixed")
    a = sample((2, 3, 40), torch.float16, gen)
    b, ref = sample((2, 3, 40), torch.float64, gen), sample((2, 3, 40), torch.float32, gen)
    got, want = run_both("error_norm", a, b, ref, 1e-3, 1e-4)
    _no_worse_than_reference(got, want, torch.tensor(_oracle_error_norm(a, b, ref, 1e-3, 1e-4), dtype=torch.float64), "error_norm")
    with pytest.raises(TypeError, match="dtype of a"):
        _C.error_norm(a, b, ref, 1e-3, 1e-4)


def test_extension_rejects_non_cpu_tensors():
    m = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="CPU tensor"):
        _C.per_sample_norm(m)
    with pytest.raises(ValueError, match="CPU tensor"):
        _C.cfg_rescale(m, m, 2.0, 0.5)


# ---------------------------------------------------------------------------------------------
# Autograd: never a silently cut graph (issue 12 item 10)


@pytest.mark.parametrize("op", ["cfg_rescale", "dynamic_threshold", "per_sample_norm"])
def test_reductions_differentiate_or_refuse(op):
    gen = seeded("grad", op)
    c = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    u = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    fn = {"cfg_rescale": lambda c, u, **k: R.cfg_rescale(c, u, 3.0, 0.7, **k),
          "dynamic_threshold": lambda c, u, **k: R.dynamic_threshold(c * 3, 0.9, 2.0, **k),
          "per_sample_norm": lambda c, u, **k: R.per_sample_norm(c + u, **k)}[op]
    # auto: the differentiable implementation, gradients checked numerically
    assert torch.autograd.gradcheck(lambda c, u: fn(c, u), (c, u))
    with pytest.raises(ValueError, match="has no backward"):      # the module is skipped without _C
        fn(c, u, backend="cpu")
    with torch.no_grad():
        fn(c, u, backend="cpu")              # without grad the kernel runs as always
