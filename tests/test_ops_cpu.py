"""The C++ CPU backend (fastdiff._C) against the reference oracle (fastdiff.reference).

What is compared: every in-place output (x, y, the written history slot, model_in, bad_row),
and that read-only inputs are left as they were. Freshly allocated outputs and buffers the row
must not read are filled with NaN, and strided inputs are views into NaN-padded storage, so a
read of uninitialised memory, out of bounds, or of a strided tensor as if it were contiguous
shows up as a NaN in the result.
"""
from __future__ import annotations

import itertools
import warnings
import zlib

import numpy as np
import pytest
import torch

import fastdiff.ops as ops
from fastdiff.reference import philox as P
from fastdiff.ops.backends import load_extension, select
from fastdiff.check import (PHILOX_ULPS, STEP_ARGS, STEP_OUTPUTS, TOLERANCES, assert_rejects_unknown_flags,
                            assert_step_match, assert_within, clone_case, public_kwargs, with_flags,
                            random_table, relayout, run_against_reference, step_case)
from fastdiff.program import OUT_H, OUT_Z, col_out, pack_flags, table_width

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str), reason=str(_C))

# Cases, layouts, the comparison and its tolerances are fastdiff.check's (the harness that
# `fastdiff check` runs), stated there once: x, y, hist within TOLERANCES["state"], model_in within
# its dtype's, bad_row exactly. The kernel follows the reference's order of float32 operations with
# no FMA contraction, so without noise it is bitwise equal in practice; Philox normals differ from
# torch's log/cos/sin by at most PHILOX_ULPS ulp, which reaches x/y through the noise coefficient.
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUTPUTS = STEP_OUTPUTS + ("bad_row",)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def nan_empty():
    """Allocate an output buffer filled with NaN (catches reads of memory the kernel must not read
    and elements it fails to write)."""
    def make(shape, dtype=torch.float32, layout="contiguous"):
        return relayout(torch.full(tuple(shape), float("nan"), dtype=dtype), layout)
    return make


def run_both(kw):
    """The case on the cpu and the reference backends: (cpu copy, reference copy) after the call."""
    return run_against_reference(kw, "cpu")


# ----------------------------------------------------------------------------------------------
# fused_step parity
# ----------------------------------------------------------------------------------------------
CASES = list(itertools.product((0, 1, 3), ("none", "cond", "cfg"), ("none", "given", "philox"),
                               ("x", "y", "xy"), ("none", "B", "2B")))


@pytest.mark.parametrize("K,model,noise,writes,model_in", CASES)
def test_fused_step_parity(K, model, noise, writes, model_in):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, model, noise, writes, model_in)).encode()))
    for eval_y in ((False, True) if writes != "x" else (False,)):
        kw = step_case(gen, (2, 3, 5, 7), K=K, model=model, noise=noise, writes=writes,
                       model_in=model_in, eval_y=eval_y)
        a, b = run_both(kw)
        assert_step_match(a, b, f"eval_y={eval_y}")


@pytest.mark.parametrize("K", (0, 1, 3))
@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("writes", ("x", "xy"))
@pytest.mark.parametrize("gdtype", (torch.float32, torch.float64))
def test_fused_step_per_sample_guidance(K, model_dtype, writes, gdtype):
    """A per-sample scale vector: sample b uses g0 + g1 * s[b]; samples of 1, 2, 5 elements and
    samples that straddle the kernel's blocks (one g per run of a sample); bitwise on fp32 outputs."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, model_dtype, writes, gdtype)).encode()))
    for shape in ((3, 5), (4, 1), (5, 3, 7, 11), (3, 700)):
        for row in (0, 1, 2):
            kw = step_case(gen, shape, K=K, model="cfg", noise="given", writes=writes, model_in="2B",
                           model_dtype=model_dtype, guidance=gdtype)
            kw["row"] = row
            a, b = run_both(kw)
            assert_step_match(a, b, f"{shape} row={row}")
            if model_dtype == torch.float32:
                for name in ("x", "y", "hist"):
                    if a.get(name) is not None:
                        assert torch.equal(a[name], b[name]), name


def test_fused_step_unused_y_not_read(nan_empty):
    """y given but neither read nor written (eval_y=False, write_y=False): a NaN y changes nothing."""
    gen = torch.Generator().manual_seed(0)
    kw = step_case(gen, (2, 4, 8, 8), K=1, writes="x")
    kw["y"] = nan_empty((2, 4, 8, 8))
    a, b = run_both(kw)
    assert_step_match(a, b)
    assert a["x"].isfinite().all() and a["y"].isnan().all()


@pytest.mark.parametrize("model_dtype", MODEL_DTYPES + (torch.float64,))
@pytest.mark.parametrize("shape", [(1,), (7,), (1000003,), (2, 4, 64, 64), (1, 4, 8, 8), (16, 4, 9, 11)])
def test_fused_step_dtypes_and_sizes(model_dtype, shape):
    gen = torch.Generator().manual_seed(7)
    variants = [("given", model_dtype)]
    if np.prod(shape) < 100_000:   # keep the file fast; large in-kernel noise: see *_philox_threads_*
        variants += [("given", torch.float32), ("none", None), ("philox", None)]
    for noise, noise_dtype in variants:
        kw = step_case(gen, shape, K=1, model="cfg", noise=noise, writes="xy", model_in="2B",
                       model_dtype=model_dtype, noise_dtype=noise_dtype)
        a, b = run_both(kw)
        assert_step_match(a, b, f"{model_dtype} {shape} noise={noise}/{noise_dtype}")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided", "padded"])
@pytest.mark.parametrize("noise", ["none", "given", "philox"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 48, 50)])
def test_fused_step_layouts(layout, noise, shape):
    """All tensors in a non-contiguous layout (dense ones run in memory order, the rest on copies)."""
    gen = torch.Generator().manual_seed(11)
    kw = step_case(gen, shape, K=2, model="cfg", noise=noise, writes="xy", model_in="2B", layout=layout)
    a, b = run_both(kw)
    assert_step_match(a, b, layout)


@pytest.mark.parametrize("odd", ["x", "y", "cond", "uncond", "hist", "noise", "model_in"])
def test_fused_step_mixed_layouts(odd, nan_empty):
    """One tensor in another layout than the rest: never read as if contiguous."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 4, 16, 24)
    for layout in ("channels_last", "strided"):
        kw = step_case(gen, shape, K=1, model="cfg", noise="given", writes="xy", model_in="2B")
        kw[odd] = relayout(kw[odd], layout) if odd != "model_in" else nan_empty(kw[odd].shape, layout=layout)
        a, b = run_both(kw)
        assert_step_match(a, b, f"{odd} {layout}")


@pytest.mark.parametrize("model_dtype,writes", [(torch.bfloat16, "xy"), (torch.float32, "x")])
def test_fused_step_large_batch_and_threads(model_dtype, writes):
    """Above the serial threshold (OpenMP path), at 1 and 2 threads: the general block kernel
    (bf16, x and y) and the one-pass float32 kernel (x only)."""
    gen = torch.Generator().manual_seed(5)
    kw = step_case(gen, (40, 4, 16, 16), K=3, model="cfg", noise="philox", writes=writes,
                   model_in="2B", model_dtype=model_dtype)
    ref = clone_case(kw)
    ops.fused_step(**public_kwargs(ref), backend="reference")
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            a = clone_case(kw)
            ops.fused_step(**public_kwargs(a), backend="cpu")
            assert_step_match(a, ref, f"threads={nt}")
            outs.append(a)
    finally:
        torch.set_num_threads(n0)
    for name in OUTPUTS:
        if outs[0].get(name) is not None:
            assert torch.equal(outs[0][name], outs[1][name]), f"{name} depends on the thread count"


def test_fused_step_zero_size():
    gen = torch.Generator().manual_seed(0)
    kw = step_case(gen, (3, 0, 4), K=1)
    a, b = run_both(kw)
    assert_step_match(a, b)


def test_fused_step_deterministic():
    gen = torch.Generator().manual_seed(3)
    kw = step_case(gen, (2, 4, 64, 64), K=1, model="cfg", noise="philox", writes="xy")
    a, b = clone_case(kw), clone_case(kw)
    ops.fused_step(**public_kwargs(a), backend="cpu")
    ops.fused_step(**public_kwargs(b), backend="cpu")
    for name in OUTPUTS:
        if a.get(name) is not None:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


def test_fused_step_strided_table_and_prepared_call():
    """A non-contiguous coefficient table; the callable of prepare_fused_step is the raw binding."""
    gen = torch.Generator().manual_seed(21)
    kw = step_case(gen, (2, 4, 8, 8), K=2, model="cfg", noise="given", writes="xy")
    kw["table"] = kw["table"].t().contiguous().t()
    a, b = clone_case(kw), clone_case(kw)
    step = ops.prepare_fused_step(a["x"], table=a["table"], y=a["y"], cond_like=a["cond"], hist=a["hist"],
                                  noise_like=a["noise"], model_in=a["model_in"], backend="cpu")
    assert step is _C.fused_step
    step(*[a.get(k) for k in ORDER])
    ops.fused_step(**public_kwargs(b), backend="reference")
    assert_step_match(a, b)


def test_step_math_exhaustive_accuracy(tmp_path):
    """csrc/tools/check_math.cpp: the hand-written logf/sinf/cosf of step_math.h over every input
    Box-Muller can give them (2**24 each) stay below 2 ulp."""
    import os
    import shutil
    import subprocess
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.join(os.path.dirname(__file__), "..", "csrc")
    exe = str(tmp_path / "check_math")
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-I", root, os.path.join(root, "tools", "check_math.cpp"),
                    "-o", exe], check=True, capture_output=True)
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.cuda_compile
def test_step_math_compiles_as_cuda_device_code(tmp_path):
    """The shared header builds for sm_80 with nvcc (torch's half flags, warnings as errors)."""
    import os
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    root = os.path.join(os.path.dirname(__file__), "..", "csrc")
    cmd = [nvcc, "-std=c++17", "-arch=sm_80", "-Werror", "all-warnings", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "--expt-relaxed-constexpr", "-I", root, "-c", os.path.join(root, "tools", "step_math_device_check.cu"),
           "-o", str(tmp_path / "check.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# bad_row: the device-side non-finite flag
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["cond", "x", "hist", "none"])
@pytest.mark.parametrize("initial", [0, 5])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 4, 64, 64)])
def test_bad_row(where, initial, shape):
    gen = torch.Generator().manual_seed(9)
    kw = step_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="none")
    kw["table"][:, :] = kw["table"].abs() + 0.1      # every term contributes: the NaN reaches x
    kw["bad_row"] = torch.tensor([initial], dtype=torch.int32)
    idx = tuple(s - 1 for s in shape)
    if where == "cond":
        kw["cond"][idx] = float("nan")
    elif where == "x":
        kw["x"][idx] = float("inf")
    elif where == "hist":
        kw["hist"][(0,) + idx] = float("-inf")
    a, b = run_both(kw)
    assert_step_match(a, b, where)
    expect = initial if (initial or where == "none") else kw["row"] + 1
    assert a["bad_row"].item() == expect


def test_bad_row_y_only():
    gen = torch.Generator().manual_seed(10)
    kw = step_case(gen, (2, 3, 5, 7), K=0, model="cond", noise="none", writes="y", model_in="none")
    kw["cond"][1, 2, 3, 4] = float("nan")
    kw["table"][1, col_out(0, "y") + OUT_H] = 1.0   # y's h coefficient
    kw["row"] = 1
    a, b = run_both(kw)
    assert_step_match(a, b)
    assert a["bad_row"].item() == 2


# ----------------------------------------------------------------------------------------------
# cfg_combine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", MODEL_DTYPES + (torch.float64,))
@pytest.mark.parametrize("with_uncond", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 4, 33, 35), (3, 70001)])
def test_cfg_combine_parity(dtype, with_uncond, layout, shape):
    gen = torch.Generator().manual_seed(1)
    c = relayout(torch.randn(shape, generator=gen).to(dtype), layout)
    u = relayout(torch.randn(shape, generator=gen).to(dtype), layout) if with_uncond else None
    c0, u0 = c.clone(), (u.clone() if u is not None else None)
    for scale, conv in ((7.5, "w"), (0.3, "1+w")):
        got = ops.cfg_combine(c, u, scale, convention=conv, backend="cpu")
        want = ops.cfg_combine(c, u, scale, convention=conv, backend="reference")
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_within(got, want, TOLERANCES[dtype], f"{conv}")
    assert torch.equal(c, c0) and (u is None or torch.equal(u, u0))


@pytest.mark.parametrize("out_dtype", MODEL_DTYPES + (torch.float64,))
def test_cfg_combine_out_dtype(out_dtype):
    from fastdiff.reference import step as reference
    gen = torch.Generator().manual_seed(2)
    c, u = torch.randn(3, 1001, generator=gen), torch.randn(3, 1001, generator=gen)
    got = _C.cfg_combine(c, u, 4.5, out_dtype)
    want = reference.cfg_combine(c, u, 4.5, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert_within(got, want, TOLERANCES[out_dtype], f"out_dtype {out_dtype}")


# ----------------------------------------------------------------------------------------------
# Philox
# ----------------------------------------------------------------------------------------------
SEEDS = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3, 2 ** 63 + 7, 2 ** 64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("noise_id", [0, 1, 77, 2 ** 32 - 1])
def test_philox_uint32_bit_equal(seed, noise_id):
    for numel in (1, 6, 4097):
        got = _C.philox_uint32(numel, seed, noise_id)
        want = P.philox_uint32(numel, seed, noise_id)
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("first_group", [2 ** 32 - 37, 2 ** 33 + 5, 2 ** 62])
def test_philox_uint32_high_counter_word(first_group):
    """Groups past 2**32 carry into the counter's second word (SIMD lanes included)."""
    from fastdiff.reference.philox import MASK32, philox4x32_10
    seed, nid, numel = 2 ** 45 + 17, 6, 4 * 100
    got = _C.philox_uint32(numel, seed, nid, first_group)
    g = torch.arange(first_group, first_group + numel // 4, dtype=torch.int64)
    want = torch.stack(philox4x32_10(g & MASK32, g >> 32, torch.full_like(g, nid), torch.zeros_like(g),
                                     seed & MASK32, seed >> 32), dim=1)
    assert torch.equal(got, want)


def _ulp_err(got: torch.Tensor, want: torch.Tensor) -> float:
    w = want.numpy()
    ulp = np.spacing(np.abs(w).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(got.numpy().astype(np.float64) - w) / ulp)) if w.size else 0.0


@pytest.mark.parametrize("seed,noise_id", [(0, 0), (2 ** 40 + 3, 2 ** 32 - 1), (12345, 99)])
def test_philox_normal_ulp(seed, noise_id):
    for shape in [(1,), (7,), (2, 4, 9, 13), (1 << 17,)]:
        got = ops.philox_normal(shape, seed, noise_id, backend="cpu")
        want = ops.philox_normal(shape, seed, noise_id, backend="reference")
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert _ulp_err(got, want) <= PHILOX_ULPS


def test_philox_normal_prefix_and_threads():
    """Element i depends only on (seed, noise_id, i): the same whatever the shape, thread count,
    or call."""
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.philox_normal([300007], 2 ** 33 + 1, 4)
        torch.set_num_threads(2)
        two = _C.philox_normal([300007], 2 ** 33 + 1, 4)
        again = _C.philox_normal([300007], 2 ** 33 + 1, 4)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(one, two) and torch.equal(two, again)
    small = _C.philox_normal([3, 1001], 2 ** 33 + 1, 4)
    assert torch.equal(small.reshape(-1), one[:3003])


def test_fused_step_philox_threads_bitwise():
    """In-kernel noise in fused_step: bitwise equal at 1 and 2 threads, and to philox_normal
    given as an explicit noise tensor."""
    shape = (2, 4, 96, 96)   # above the serial threshold
    gen = torch.Generator().manual_seed(4)
    K = 0
    T = torch.zeros(1, table_width(K), dtype=torch.float64)
    T[0, col_out(K, "x") + OUT_Z] = 1.0        # x' = z
    x0 = torch.randn(shape, generator=gen)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 2):
            torch.set_num_threads(nt)
            x = x0.clone()
            ops.fused_step(T, 0, x, seed=2 ** 50 + 9, noise_id=17, backend="cpu")
            outs.append(x)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert torch.equal(outs[0], _C.philox_normal(list(shape), 2 ** 50 + 9, 17))


def test_philox_normality():
    from scipy import stats
    z = ops.philox_normal((1_000_000,), 2024, 1, backend="cpu").double()
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - 1.0) < 1e-2
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # distinct noise ids and seeds give uncorrelated streams
    z2 = ops.philox_normal((1_000_000,), 2024, 2, backend="cpu").double()
    z3 = ops.philox_normal((1_000_000,), 2025, 1, backend="cpu").double()
    assert abs(torch.corrcoef(torch.stack([z, z2, z3]))[0, 1:]).max() < 5e-3


# ----------------------------------------------------------------------------------------------
# dispatch and bad input
# ----------------------------------------------------------------------------------------------
def test_auto_selects_cpu_for_float32_and_reference_for_float64():
    x32, x64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    T = torch.zeros(1, table_width(0), dtype=torch.float64)
    assert select("fused_step", "auto", [x32, T], state_dtype=torch.float32).name == "cpu"
    with warnings.catch_warnings():   # the fallback warns once per process
        warnings.simplefilter("ignore")
        assert select("fused_step", "auto", [x64, T], state_dtype=torch.float64).name == "reference"
    with pytest.raises(RuntimeError, match="float32"):
        ops.fused_step(T, 0, x64, backend="cpu")


def _valid_args(gen):
    shape = (2, 3, 4)
    K = 1
    return dict(table=random_table(gen, K), row=0, x=torch.randn(shape, generator=gen), y=torch.randn(shape, generator=gen),
                cond=torch.randn(shape, generator=gen), uncond=torch.randn(shape, generator=gen),
                hist=torch.randn((K,) + shape, generator=gen), hist_writes=1,
                flags=pack_flags(eval_y=False, write_x=True, write_y=True, model_in_from_y=False),
                noise=None, seed=5, noise_id=2, model_in=torch.zeros((4, 3, 4)),
                bad_row=torch.zeros(1, dtype=torch.int32), guidance=torch.tensor([3.0, 7.5]))


ORDER = STEP_ARGS

BAD = {
    "state float64": (dict(x=lambda a: a["x"].double()), TypeError, "float32"),
    "state float16": (dict(x=lambda a: a["x"].half()), TypeError, "float32"),
    "hist float64": (dict(hist=lambda a: a["hist"].double()), TypeError, "hist"),
    "y shape": (dict(y=lambda a: a["y"][:, :2]), ValueError, "y"),
    "cond shape": (dict(cond=lambda a: a["cond"][:1]), ValueError, "cond"),
    "uncond dtype": (dict(uncond=lambda a: a["uncond"].half()), TypeError, "uncond"),
    "cond int": (dict(cond=lambda a: a["cond"].int(), uncond=lambda a: None), TypeError, "cond"),
    "noise shape": (dict(noise=lambda a: torch.zeros(2, 3, 5)), ValueError, "noise"),
    "hist shape": (dict(hist=lambda a: a["hist"][:, :1]), ValueError, "hist"),
    "table width": (dict(table=lambda a: a["table"][:, :-1]), ValueError, "columns"),
    "table dtype": (dict(table=lambda a: a["table"].float()), TypeError, "table"),
    "row range": (dict(row=lambda a: 3), ValueError, "row"),
    "hist_writes range": (dict(hist_writes=lambda a: 2), ValueError,
                          r"hist_writes must be a bitmask of history slots in \[0, 1\).*got 2"),
    "hist_writes negative": (dict(hist_writes=lambda a: -1), ValueError,
                             r"hist_writes must be a bitmask of history slots in \[0, 1\).*got -1"),
    "model_in shape": (dict(model_in=lambda a: torch.zeros(3, 3, 4)), ValueError, "model_in"),
    "model_in int": (dict(model_in=lambda a: torch.zeros(4, 3, 4, dtype=torch.int32)), TypeError, "model_in"),
    "bad_row dtype": (dict(bad_row=lambda a: torch.zeros(1, dtype=torch.int64)), TypeError, "bad_row"),
    "bad_row shape": (dict(bad_row=lambda a: torch.zeros(2, dtype=torch.int32)), ValueError, "bad_row"),
    "y missing": (dict(y=lambda a: None), ValueError, "y"),
    "uncond without cond": (dict(cond=lambda a: None), ValueError, "uncond"),
    "writes nothing": (dict(flags=lambda a: 0), ValueError, "write x or y"),
    "y is x": (dict(y=lambda a: a["x"]), ValueError, "different buffer"),
    "noise_id too big": (dict(noise_id=lambda a: 2 ** 32), ValueError, "noise_id"),
    "seed negative": (dict(seed=lambda a: -1), ValueError, "seed"),
    "guidance shape": (dict(guidance=lambda a: torch.tensor([3.0, 7.5, 1.0])), ValueError, "guidance"),
    "guidance dtype": (dict(guidance=lambda a: torch.tensor([3, 7])), TypeError, "guidance"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("level", ["public", "extension"])
def test_bad_input_raises_and_changes_nothing(case, level):
    """Python validates first; the C++ checks stand on their own too (level='extension' calls
    fastdiff._C directly). Either way nothing is written."""
    changes, exc, match = BAD[case]
    gen = torch.Generator().manual_seed(0)
    args = _valid_args(gen)
    for k, f in changes.items():
        args[k] = f(args)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    if level == "public":
        kw = {k: v for k, v in public_kwargs(args).items() if k not in ("table", "row", "x")}
        with pytest.raises((exc, RuntimeError)):
            ops.fused_step(args["table"], args["row"], args["x"], **kw, backend="cpu")
    else:
        with pytest.raises(exc, match=match):
            _C.fused_step(*[args[k] for k in ORDER])
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was modified by a call that raised"


def test_extension_rejects_model_in_from_unwritten_output():
    """The reference cannot compute model_in from an output the row does not write; neither can we."""
    gen = torch.Generator().manual_seed(0)
    args = with_flags(_valid_args(gen), write_y=False, model_in_from_y=True)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="does not write"):
        _C.fused_step(*[args[k] for k in ORDER])
    for k, v in before.items():
        assert torch.equal(args[k], v)


def test_unknown_flag_bits_raise_and_change_nothing():
    """A flags bit no row flag names (a flag of a newer kernel, garbage): the oracle, the validated
    op, the C++ extension (raw and as the prepared call) each raise a ValueError naming the bits,
    and write nothing."""
    from fastdiff.ops import api
    from fastdiff.reference import step as reference
    args = _valid_args(torch.Generator().manual_seed(0))
    prepared = ops.prepare_fused_step(args["x"], table=args["table"], y=args["y"], cond_like=args["cond"],
                                      hist=args["hist"], model_in=args["model_in"], guidance=args["guidance"],
                                      backend="cpu")
    assert prepared is _C.fused_step
    for fused_step in (reference.fused_step, _C.fused_step, lambda *a: api._fused_step(*a, backend="cpu")):
        assert_rejects_unknown_flags(fused_step, args)
    with pytest.raises(ValueError, match=r"flags has unknown row flag bits 0x10 \(got 31"):
        _C.fused_step(*[dict(args, flags=31)[k] for k in ORDER])


def test_extension_philox_errors():
    with pytest.raises(ValueError, match="noise_id"):
        _C.philox_normal([4], 0, 2 ** 32)
    with pytest.raises(ValueError, match="seed"):
        _C.philox_uint32(4, 2 ** 64, 0)
    with pytest.raises(ValueError, match="shape"):
        _C.philox_normal([-1], 0, 0)


def test_build_info():
    info = dict(_C.build_info())
    assert {"compiler", "march", "simd", "openmp"} <= set(info)


# ----------------------------------------------------------------------------------------------
# The shared harness (what `fastdiff check` runs) on this backend, and the custom op's schema
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["fused_step", "cfg_combine", "philox", "reductions"])
def test_fastdiff_check_harness(group):
    """fastdiff.check's cases for this op group (row kinds x dtypes x sizes x layouts) on the cpu
    backend: every one passes, and none is skipped (the cpu backend implements every op)."""
    from fastdiff.check import NA, OP_GROUPS, PASS, check_backend
    from fastdiff.ops import BACKENDS
    assert group in OP_GROUPS
    results = check_backend(BACKENDS["cpu"], device="cpu", groups=[group], large=False)
    assert results and all(r.backend == "cpu" for r in results)
    bad = [f"{r.op} {r.case}: {r.status} {r.detail}" for r in results if r.status != PASS]
    assert not bad, "\n".join(bad)
    assert not any(r.status == NA for r in results)


def test_custom_op_schema_is_the_cpp_bindings_argument_list():
    """The registered torch.ops.fastdiff.fused_step schema (generated from the row ABI) takes the
    arguments of the built pybind binding fastdiff._C.fused_step, in its order, plus the backend name."""
    import re
    from fastdiff.program.layout import STEP_ARG_NAMES, step_schema
    schema = torch.ops.fastdiff.fused_step.default._schema
    names = [a.name for a in schema.arguments]
    assert names[-1] == "backend" and tuple(names[:-1]) == STEP_ARG_NAMES
    assert str(schema) == str(torch._C.parse_schema("fastdiff::" + step_schema()))
    # pybind11 writes the signature it was built with into the docstring: fused_step(table: ..., row: ...)
    doc = _C.fused_step.__doc__
    signature = doc[doc.index("fused_step(") + len("fused_step("):]
    cpp = re.findall(r"(\w+): ", signature[:signature.index(") ->")])
    assert tuple(cpp) == STEP_ARG_NAMES, f"the C++ binding takes {cpp}"
