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
from fastdiff.check import PHILOX_ULPS
from fastdiff.program import COL_G, OUT_Z, col_out, table_width

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str), reason=str(_C))

# Tolerances, stated once. The kernel follows the reference's order of float32 operations with
# no FMA contraction, so without noise it is bitwise equal in practice; Philox normals differ
# from torch's log/cos/sin by at most PHILOX_ULPS ulp (fastdiff.check), which reaches x/y through the noise
# coefficient. "state": x, y, hist (always float32); the model dtypes: model_in.
TOL = {
    "state": dict(atol=2e-5, rtol=1e-5),
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),    # 1 ulp of fp16 (a rounding boundary crossed)
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),   # 1 ulp of bf16
    torch.float64: dict(atol=2e-5, rtol=1e-5),    # model_in = float32 math, exactly widened
}

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def nan_empty():
    """Allocate an output buffer filled with NaN (catches reads of memory the kernel must not read
    and elements it fails to write)."""
    def make(shape, dtype=torch.float32, layout="contig"):
        return relayout(torch.full(tuple(shape), float("nan"), dtype=dtype), layout)
    return make


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "contig":
        return t.contiguous()
    if layout == "channels_last":        # dense, non-contiguous (NHWC-like; for any rank >= 2)
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if t.dim() >= 2:
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t.contiguous()
    if layout == "transposed":           # dense, batch dim innermost in memory
        if t.dim() < 2:
            return t.contiguous()
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":              # every other element of NaN-padded storage
        big = torch.full(tuple(t.shape[:-1]) + (2 * t.shape[-1] + 3,), float("nan"), dtype=t.dtype)
        v = big[..., 1:2 * t.shape[-1] + 1:2]
        v.copy_(t)
        return v
    if layout == "padded":               # a contiguous view in the middle of NaN-padded storage
        big = torch.full((t.numel() + 37,), float("nan"), dtype=t.dtype)
        v = big[17:17 + t.numel()].view(t.shape)
        v.copy_(t)
        return v
    raise ValueError(layout)


def random_table(gen, K, rows=3):
    T = torch.randn(rows, table_width(K), dtype=torch.float64, generator=gen)
    T[:, COL_G] = 1.0 + 7.0 * torch.rand(rows, dtype=torch.float64, generator=gen)   # guidance scale g
    return T


def make_case(gen, nan_empty, shape, *, K=1, model="cfg", noise="philox", writes="x", model_in="2B",
              eval_y=None, model_dtype=torch.float32, noise_dtype=torch.float32, layout="contig",
              seed=1234, noise_id=3, bad_row=True, guidance=None):
    """Keyword arguments of ops.fused_step for one random case (tensors in `layout`)."""
    L = (lambda t: relayout(t, layout))
    write_x, write_y = "x" in writes, "y" in writes
    has_y = write_y or bool(eval_y)
    if eval_y is None:
        eval_y = has_y
    B = shape[0]
    kw = dict(table=random_table(gen, K), row=1)
    kw["x"] = L(torch.randn(shape, generator=gen))
    # y absent, or present; when the row neither reads nor writes it, fill it with NaN.
    kw["y"] = L(torch.randn(shape, generator=gen)) if has_y else None
    if model != "none":
        kw["cond"] = L(torch.randn(shape, generator=gen).to(model_dtype))
        kw["uncond"] = L(torch.randn(shape, generator=gen).to(model_dtype)) if model == "cfg" else None
    kw["hist"] = L(torch.randn((K,) + tuple(shape), generator=gen)) if K else None
    kw["hist_write"] = int(torch.randint(-1, K, (1,), generator=gen)) if K else -1
    kw["eval_y"], kw["write_x"], kw["write_y"] = bool(eval_y), write_x, write_y
    if noise == "given":
        kw["noise"] = L(torch.randn(shape, generator=gen).to(noise_dtype))
    kw["seed"], kw["noise_id"] = seed, (noise_id if noise == "philox" else -1)
    if model_in != "none":
        rows = B if model_in == "B" else 2 * B
        kw["model_in"] = nan_empty((rows,) + tuple(shape[1:]), model_dtype, layout)
        kw["model_in_from_y"] = write_y and not write_x or (write_x and write_y and bool(torch.rand(1, generator=gen) < 0.5))
    if bad_row:
        kw["bad_row"] = torch.zeros(1, dtype=torch.int32)
    if guidance is not None:   # per-sample scales, one of them exactly 1 (D = cond)
        g = 1.0 + 7.0 * torch.rand(B, dtype=torch.float64, generator=gen)
        g[0] = 1.0
        kw["guidance"] = g.to(guidance)
        kw["table"][:, 1:3] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.25, 0.5]], dtype=torch.float64)[:kw["table"].shape[0]]
    return kw


INPLACE = ("x", "y", "hist", "model_in", "bad_row")
READONLY = ("table", "cond", "uncond", "noise", "guidance")


def clone_case(kw):
    """A deep copy that keeps each tensor's strides, storage offset and NaN padding."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            need = v.storage_offset() + sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1
            fill = float("nan") if v.is_floating_point() else 0
            buf = torch.full((max(need, 1),), fill, dtype=v.dtype)
            out[k] = buf.as_strided(v.shape, v.stride(), v.storage_offset()).copy_(v)
        else:
            out[k] = v
    return out


def run_both(kw):
    """Run the case on the cpu and reference backends; returns (cpu_kwargs, ref_kwargs) after."""
    a, b = clone_case(kw), clone_case(kw)
    ops.fused_step(**a, backend="cpu")
    ops.fused_step(**b, backend="reference")
    for name in READONLY:
        if kw.get(name) is not None:
            assert torch.equal(a[name], kw[name]) or torch.allclose(a[name], kw[name], equal_nan=True), \
                f"cpu backend modified read-only input {name}"
    return a, b


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """|got - want| <= atol + rtol |want| elementwise, NaN where want is NaN, inf equal to inf
    (a cheaper torch.testing.assert_close for million-element tensors)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    g, w = got.double(), want.double()
    ok = ((g - w).abs() <= atol + rtol * w.abs()) | (g == w) | (g.isnan() & w.isnan())
    if not bool(ok.all()):
        i = int((~ok).reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at flat index {i}: "
                             f"got {g.reshape(-1)[i].item()!r}, want {w.reshape(-1)[i].item()!r} (atol={atol}, rtol={rtol})")


def assert_match(a, b, what=""):
    for name in INPLACE:
        if a.get(name) is None:
            continue
        ta, tb = a[name], b[name]
        assert ta.stride() == tb.stride(), f"{name}: the cpu backend replaced the tensor's layout"
        if name == "bad_row":
            assert torch.equal(ta, tb), f"bad_row {ta.item()} != {tb.item()} {what}"
            continue
        tol = TOL[ta.dtype] if name == "model_in" else TOL["state"]
        assert_close(ta, tb, what=f"{name} {what}", **tol)


# ----------------------------------------------------------------------------------------------
# fused_step parity
# ----------------------------------------------------------------------------------------------
CASES = list(itertools.product((0, 1, 3), ("none", "cond", "cfg"), ("none", "given", "philox"),
                               ("x", "y", "xy"), ("none", "B", "2B")))


@pytest.mark.parametrize("K,model,noise,writes,model_in", CASES)
def test_fused_step_parity(K, model, noise, writes, model_in, nan_empty):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, model, noise, writes, model_in)).encode()))
    for eval_y in ((False, True) if writes != "x" else (False,)):
        kw = make_case(gen, nan_empty, (2, 3, 5, 7), K=K, model=model, noise=noise, writes=writes,
                       model_in=model_in, eval_y=eval_y)
        a, b = run_both(kw)
        assert_match(a, b, f"eval_y={eval_y}")


@pytest.mark.parametrize("K", (0, 1, 3))
@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("writes", ("x", "xy"))
@pytest.mark.parametrize("gdtype", (torch.float32, torch.float64))
def test_fused_step_per_sample_guidance(K, model_dtype, writes, gdtype, nan_empty):
    """A per-sample scale vector: sample b uses g0 + g1 * s[b]; samples of 1, 2, 5 elements and
    samples that straddle the kernel's blocks (one g per run of a sample); bitwise on fp32 outputs."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, model_dtype, writes, gdtype)).encode()))
    for shape in ((3, 5), (4, 1), (5, 3, 7, 11), (3, 700)):
        for row in (0, 1, 2):
            kw = make_case(gen, nan_empty, shape, K=K, model="cfg", noise="given", writes=writes, model_in="2B",
                           model_dtype=model_dtype, guidance=gdtype)
            kw["row"] = row
            a, b = run_both(kw)
            assert_match(a, b, f"{shape} row={row}")
            if model_dtype == torch.float32:
                for name in ("x", "y", "hist"):
                    if a.get(name) is not None:
                        assert torch.equal(a[name], b[name]), name


def test_fused_step_unused_y_not_read(nan_empty):
    """y given but neither read nor written (eval_y=False, write_y=False): a NaN y changes nothing."""
    gen = torch.Generator().manual_seed(0)
    kw = make_case(gen, nan_empty, (2, 4, 8, 8), K=1, writes="x")
    kw["y"] = nan_empty((2, 4, 8, 8))
    a, b = run_both(kw)
    assert_match(a, b)
    assert a["x"].isfinite().all() and a["y"].isnan().all()


@pytest.mark.parametrize("model_dtype", MODEL_DTYPES + (torch.float64,))
@pytest.mark.parametrize("shape", [(1,), (7,), (1000003,), (2, 4, 64, 64), (1, 4, 8, 8), (16, 4, 9, 11)])
def test_fused_step_dtypes_and_sizes(model_dtype, shape, nan_empty):
    gen = torch.Generator().manual_seed(7)
    variants = [("given", model_dtype)]
    if np.prod(shape) < 100_000:   # keep the file fast; large in-kernel noise: see *_philox_threads_*
        variants += [("given", torch.float32), ("none", None), ("philox", None)]
    for noise, noise_dtype in variants:
        kw = make_case(gen, nan_empty, shape, K=1, model="cfg", noise=noise, writes="xy", model_in="2B",
                       model_dtype=model_dtype, noise_dtype=noise_dtype)
        a, b = run_both(kw)
        assert_match(a, b, f"{model_dtype} {shape} noise={noise}/{noise_dtype}")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided", "padded"])
@pytest.mark.parametrize("noise", ["none", "given", "philox"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 4, 48, 50)])
def test_fused_step_layouts(layout, noise, shape, nan_empty):
    """All tensors in a non-contiguous layout (dense ones run in memory order, the rest on copies)."""
    gen = torch.Generator().manual_seed(11)
    kw = make_case(gen, nan_empty, shape, K=2, model="cfg", noise=noise, writes="xy", model_in="2B", layout=layout)
    a, b = run_both(kw)
    assert_match(a, b, layout)


@pytest.mark.parametrize("odd", ["x", "y", "cond", "uncond", "hist", "noise", "model_in"])
def test_fused_step_mixed_layouts(odd, nan_empty):
    """One tensor in another layout than the rest: never read as if contiguous."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 4, 16, 24)
    for layout in ("channels_last", "strided"):
        kw = make_case(gen, nan_empty, shape, K=1, model="cfg", noise="given", writes="xy", model_in="2B")
        kw[odd] = relayout(kw[odd], layout) if odd != "model_in" else nan_empty(kw[odd].shape, layout=layout)
        a, b = run_both(kw)
        assert_match(a, b, f"{odd} {layout}")


@pytest.mark.parametrize("model_dtype,writes", [(torch.bfloat16, "xy"), (torch.float32, "x")])
def test_fused_step_large_batch_and_threads(model_dtype, writes, nan_empty):
    """Above the serial threshold (OpenMP path), at 1 and 2 threads: the general block kernel
    (bf16, x and y) and the one-pass float32 kernel (x only)."""
    gen = torch.Generator().manual_seed(5)
    kw = make_case(gen, nan_empty, (40, 4, 16, 16), K=3, model="cfg", noise="philox", writes=writes,
                   model_in="2B", model_dtype=model_dtype)
    ref = clone_case(kw)
    ops.fused_step(**ref, backend="reference")
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            a = clone_case(kw)
            ops.fused_step(**a, backend="cpu")
            assert_match(a, ref, f"threads={nt}")
            outs.append(a)
    finally:
        torch.set_num_threads(n0)
    for name in INPLACE:
        if outs[0].get(name) is not None:
            assert torch.equal(outs[0][name], outs[1][name]), f"{name} depends on the thread count"


def test_fused_step_zero_size(nan_empty):
    gen = torch.Generator().manual_seed(0)
    kw = make_case(gen, nan_empty, (3, 0, 4), K=1)
    a, b = run_both(kw)
    assert_match(a, b)


def test_fused_step_deterministic(nan_empty):
    gen = torch.Generator().manual_seed(3)
    kw = make_case(gen, nan_empty, (2, 4, 64, 64), K=1, model="cfg", noise="philox", writes="xy")
    a, b = clone_case(kw), clone_case(kw)
    ops.fused_step(**a, backend="cpu")
    ops.fused_step(**b, backend="cpu")
    for name in INPLACE:
        if a.get(name) is not None:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


def test_fused_step_strided_table_and_prepared_call(nan_empty):
    """A non-contiguous coefficient table; the callable of prepare_fused_step is the raw binding."""
    gen = torch.Generator().manual_seed(21)
    kw = make_case(gen, nan_empty, (2, 4, 8, 8), K=2, model="cfg", noise="given", writes="xy")
    kw["table"] = kw["table"].t().contiguous().t()
    a, b = clone_case(kw), clone_case(kw)
    step = ops.prepare_fused_step(a["x"], table=a["table"], y=a["y"], cond_like=a["cond"], hist=a["hist"],
                                  noise_like=a["noise"], model_in=a["model_in"], backend="cpu")
    assert step is _C.fused_step
    step(*[a.get(k) for k in ORDER])
    ops.fused_step(**b, backend="reference")
    assert_match(a, b)


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
def test_bad_row(where, initial, shape, nan_empty):
    gen = torch.Generator().manual_seed(9)
    kw = make_case(gen, nan_empty, shape, K=1, model="cfg", noise="none", writes="x", model_in="none")
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
    assert_match(a, b, where)
    expect = initial if (initial or where == "none") else kw["row"] + 1
    assert a["bad_row"].item() == expect


def test_bad_row_y_only(nan_empty):
    gen = torch.Generator().manual_seed(10)
    kw = make_case(gen, nan_empty, (2, 3, 5, 7), K=0, model="cond", noise="none", writes="y", model_in="none")
    kw["cond"][1, 2, 3, 4] = float("nan")
    kw["table"][1, 3 + 4 + 2] = 1.0   # y's h coefficient
    kw["row"] = 1
    a, b = run_both(kw)
    assert_match(a, b)
    assert a["bad_row"].item() == 2


# ----------------------------------------------------------------------------------------------
# cfg_combine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", MODEL_DTYPES + (torch.float64,))
@pytest.mark.parametrize("with_uncond", [True, False])
@pytest.mark.parametrize("layout", ["contig", "channels_last", "strided"])
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
        assert_close(got, want, what=f"{conv}", **TOL[dtype])
    assert torch.equal(c, c0) and (u is None or torch.equal(u, u0))


@pytest.mark.parametrize("out_dtype", MODEL_DTYPES + (torch.float64,))
def test_cfg_combine_out_dtype(out_dtype):
    from fastdiff.reference import step as reference
    gen = torch.Generator().manual_seed(2)
    c, u = torch.randn(3, 1001, generator=gen), torch.randn(3, 1001, generator=gen)
    got = _C.cfg_combine(c, u, 4.5, out_dtype)
    want = reference.cfg_combine(c, u, 4.5, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert_close(got, want, **TOL[out_dtype])


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
                hist=torch.randn((K,) + shape, generator=gen), hist_write=0, eval_y=False, write_x=True, write_y=True,
                noise=None, seed=5, noise_id=2, model_in=torch.zeros((4, 3, 4)), model_in_from_y=False,
                bad_row=torch.zeros(1, dtype=torch.int32), guidance=torch.tensor([3.0, 7.5]))


ORDER = ("table", "row", "x", "y", "cond", "uncond", "hist", "hist_write", "eval_y", "write_x", "write_y",
         "noise", "seed", "noise_id", "model_in", "model_in_from_y", "bad_row", "guidance")

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
    "hist_write range": (dict(hist_write=lambda a: 1), ValueError, "hist_write"),
    "model_in shape": (dict(model_in=lambda a: torch.zeros(3, 3, 4)), ValueError, "model_in"),
    "model_in int": (dict(model_in=lambda a: torch.zeros(4, 3, 4, dtype=torch.int32)), TypeError, "model_in"),
    "bad_row dtype": (dict(bad_row=lambda a: torch.zeros(1, dtype=torch.int64)), TypeError, "bad_row"),
    "bad_row shape": (dict(bad_row=lambda a: torch.zeros(2, dtype=torch.int32)), ValueError, "bad_row"),
    "y missing": (dict(y=lambda a: None), ValueError, "y"),
    "uncond without cond": (dict(cond=lambda a: None), ValueError, "uncond"),
    "writes nothing": (dict(write_x=lambda a: False, write_y=lambda a: False), ValueError, "write x or y"),
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
        kw = {k: v for k, v in args.items() if k not in ("table", "row", "x")}
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
    args = _valid_args(gen)
    args["write_y"] = False
    args["model_in_from_y"] = True
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="does not write"):
        _C.fused_step(*[args[k] for k in ORDER])
    for k, v in before.items():
        assert torch.equal(args[k], v)


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
