"""The CUDA kernels' own code, run on the host, against the reference ops (and the CPU backend).

csrc/cuda/tools/emulate.cpp replays each CUDA launch serially, calling the same kernel_bodies.h
functions the __global__ kernels call (built here with g++ as a shared library, used via ctypes).
So the kernels' addressing of [B, M] rows, the vector/scalar paths, coefficient reading from the
table, dtype conversions, in-kernel Philox, the model_in epilogue and the bad_row logic are
tested on CPU tensors, without a GPU. What runs only on a GPU (block reductions, atomics,
__syncthreads_or) is not covered here; its math pieces are.

The packing of torch tensors into the C argument structs below mirrors csrc/cuda/torch_binding.cpp.

Tolerances: without noise the emulated kernel is bitwise equal to the reference (the same float32
operations in the same order, no FMA). With Philox noise it is bitwise equal to the CPU backend
(same step_math.h) and within PHILOX_ULPS (fastdiff.check) of the reference (torch's log/sin/cos).
"""
from __future__ import annotations

import ctypes
import itertools
import math
import re
import shutil
import subprocess
import zlib

import pytest
import torch

from conftest import REPO  # noqa: E402

from benchmarks.cuda_report import TORCH_FLAGS, cuda_include_dir  # noqa: E402
from fastdiff.reference import philox as P  # noqa: E402
from fastdiff.reference import reductions as reduction_oracles, step as reference  # noqa: E402
from fastdiff.ops.backends import load_extension  # noqa: E402
from fastdiff.check import (PHILOX_ULPS, STEP_ARGS, UNKNOWN_FLAGS, assert_step_match, clone_case,  # noqa: E402
                            relayout, run_step, step_case, ulps)
from fastdiff.ops.cuda_backend import CudaBackend  # noqa: E402
from fastdiff.program import FLAG_WRITE_X, FLAG_WRITE_Y, col_out, col_s_in, out_width, table_width  # noqa: E402
from fastdiff.program.layout import (OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z, col_out_slot,  # noqa: E402
                                     hist_writes_error, mask_slots, pack_flags)

_C = load_extension()
# The CPU backend as a second oracle (Philox noise bit for bit), where the built fastdiff._C takes
# this row ABI (the hist_writes bitmask; an older build takes one slot, hist_write).
HAVE_CPU = not isinstance(_C, str) and "hist_writes" in (_C.fused_step.__doc__ or "")

# ----------------------------------------------------------------------------------------------
# The emulator library and the ctypes mirror of csrc/cuda/launch.h
# ----------------------------------------------------------------------------------------------
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


class Rows(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("batch_stride", ctypes.c_int64), ("dtype", ctypes.c_int)]


class StepArgs(ctypes.Structure):
    _fields_ = [("table", ctypes.c_void_p), ("table_rows", ctypes.c_int64), ("table_cols", ctypes.c_int64),
                ("table_row_stride", ctypes.c_int64), ("table_col_stride", ctypes.c_int64), ("row", ctypes.c_int64),
                ("batch", ctypes.c_int64), ("sample_size", ctypes.c_int64),
                ("x", Rows), ("y", Rows), ("cond", Rows), ("uncond", Rows), ("noise", Rows), ("hist", Rows),
                ("hist_slot_stride", ctypes.c_int64), ("num_slots", ctypes.c_int32), ("hist_writes", ctypes.c_int64),
                ("flags", ctypes.c_uint32), ("seed", ctypes.c_uint64), ("noise_id", ctypes.c_int64),
                ("model_in", Rows), ("model_in_halves", ctypes.c_int32), ("model_in_half_stride", ctypes.c_int64),
                ("bad_row", ctypes.c_void_p),
                ("guidance", ctypes.c_void_p), ("guidance_dtype", ctypes.c_int)]


class CfgArgs(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("sample_size", ctypes.c_int64), ("cond", Rows), ("uncond", Rows),
                ("g", ctypes.c_double), ("out", ctypes.c_void_p), ("out_dtype", ctypes.c_int)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (nvcc's include folder)")
    lib = tmp_path_factory.mktemp("cuda_emulate") / "libfastdiff_cuda_emulate.so"
    cmd = [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           "-I", inc, *[f for f in TORCH_FLAGS if f.startswith("-D")],
           str(REPO / "csrc" / "cuda" / "tools" / "emulate.cpp"), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    so = ctypes.CDLL(str(lib))
    for fn in ("fastdiff_emulate_fused_step", "fastdiff_emulate_cfg_combine", "fastdiff_emulate_cfg_rescale",
               "fastdiff_emulate_step_plan"):
        getattr(so, fn).restype = ctypes.c_char_p
    so.fastdiff_emulate_cfg_rescale.argtypes = [ctypes.POINTER(CfgArgs), ctypes.c_double, ctypes.c_void_p,
                                                ctypes.c_size_t]
    so.fastdiff_emulate_philox_normal.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32]
    so.fastdiff_emulate_philox_uint32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                                  ctypes.c_uint64]
    for fn in ("sizeof_step_args", "sizeof_cfg_args", "offsetof_bad_row", "offsetof_out_dtype"):
        getattr(so, f"fastdiff_emulate_{fn}").restype = ctypes.c_size_t
    # The mirror above must match the C layout exactly.
    assert so.fastdiff_emulate_sizeof_step_args() == ctypes.sizeof(StepArgs)
    assert so.fastdiff_emulate_offsetof_bad_row() == StepArgs.bad_row.offset
    assert so.fastdiff_emulate_sizeof_cfg_args() == ctypes.sizeof(CfgArgs)
    assert so.fastdiff_emulate_offsetof_out_dtype() == CfgArgs.out_dtype.offset
    return so


# ----------------------------------------------------------------------------------------------
# Packing torch tensors as [B, M] rows (what csrc/cuda/torch_binding.cpp does)
# ----------------------------------------------------------------------------------------------
def batch_stride(t: torch.Tensor):
    """The stride between samples if each sample t[b] is dense (row-major), else None."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.stride(0) if t.shape[0] > 1 else math.prod(t.shape[1:])


class Packer:
    """Rows for each tensor: in place when its samples are dense, else a contiguous copy (outputs
    are copied back by finish())."""

    def __init__(self):
        self.keep, self.back = [], []

    def rows(self, t, output=False):
        if t is None:
            return Rows(None, 0, 0), None
        sb = batch_stride(t)
        used = t
        if sb is None:
            used = t.contiguous()
            sb = batch_stride(used)
            if output:
                self.back.append((t, used))
        self.keep.append(used)
        return Rows(used.data_ptr(), sb, DTYPE_CODE[used.dtype]), used

    def finish(self):
        for original, used in self.back:
            original.copy_(used)


def step_args(kw, packer: Packer) -> StepArgs:
    x, table = kw["x"], kw["table"]
    a = StepArgs()
    a.table, a.table_rows, a.table_cols = table.data_ptr(), table.shape[0], table.shape[1]
    a.table_row_stride, a.table_col_stride, a.row = table.stride(0), table.stride(1), kw["row"]
    a.batch, a.sample_size = x.shape[0], math.prod(x.shape[1:])
    flags = kw["flags"]
    a.x, _ = packer.rows(x, output=bool(flags & FLAG_WRITE_X))
    a.y, _ = packer.rows(kw.get("y"), output=bool(flags & FLAG_WRITE_Y))
    a.cond, _ = packer.rows(kw.get("cond"))
    a.uncond, _ = packer.rows(kw.get("uncond"))
    a.noise, _ = packer.rows(kw.get("noise"))
    hist = kw.get("hist")
    if hist is not None and hist.shape[0] > 0:
        slot0 = hist[0]
        used = hist if batch_stride(slot0) is not None else hist.contiguous()
        if used is not hist:           # the written slots are copied back (as the binding does)
            packer.back += [(hist[j], used[j]) for j in mask_slots(kw["hist_writes"]) if j < hist.shape[0]]
        a.hist, _ = packer.rows(used[0])
        packer.keep.append(used)
        a.hist_slot_stride, a.num_slots = used.stride(0), hist.shape[0]
    a.hist_writes = kw["hist_writes"]
    a.flags = flags & 0xFFFF_FFFF        # (the binding rejects other int64 values before packing)
    a.seed, a.noise_id = kw["seed"], kw["noise_id"]
    mi = kw.get("model_in")
    if mi is not None:
        a.model_in, used = packer.rows(mi, output=True)
        a.model_in_halves = mi.shape[0] // x.shape[0]
        a.model_in_half_stride = x.shape[0] * a.model_in.batch_stride
    bad = kw.get("bad_row")
    a.bad_row = None if bad is None else bad.data_ptr()
    gv = kw.get("guidance")
    if gv is not None:                 # (the binding passes a contiguous vector)
        gv = gv.contiguous()
        packer.keep.append(gv)
        a.guidance, a.guidance_dtype = gv.data_ptr(), (3 if gv.dtype == torch.float64 else 0)
    return a


def emulate_step(emu, kw):
    packer = Packer()
    a = step_args(kw, packer)
    err = emu.fastdiff_emulate_fused_step(ctypes.byref(a))
    assert err is None, err.decode()
    packer.finish()


def step_plan(emu, kw, *, full=False):
    """The launch plan: dense, vec, groups (full: also the kernel variant KT, K or -1 for the any-K
    loop, and the block's shared memory in bytes)."""
    out = (ctypes.c_int64 * 5)()
    a = step_args(kw, Packer())
    assert emu.fastdiff_emulate_step_plan(ctypes.byref(a), out) is None
    plan = dict(dense=bool(out[0]), vec=bool(out[1]), groups=out[2])
    if full:
        plan.update(variant=out[3], shared=out[4])
    return plan


# ----------------------------------------------------------------------------------------------
# Cases: fastdiff.check's builder, layouts and comparison (the harness `fastdiff check` runs)
# ----------------------------------------------------------------------------------------------
OUTPUTS = ("x", "y", "hist", "model_in", "bad_row")


def run(kw, how, emu=None):
    """A copy of the case after the emulated kernel, the reference or the CPU backend ran it."""
    if how == "emulated":
        c = clone_case(kw)
        emulate_step(emu, c)
        return c
    return run_step(reference.fused_step if how == "reference" else _C.fused_step, kw)


def assert_outputs(got, want, what, *, exact=True):
    """Every in-place output bitwise equal (NaN == NaN), or, for Philox noise against the
    reference, within fastdiff.check's tolerances (those of the CPU backend)."""
    assert_step_match(got, want, what, exact=exact)


# ----------------------------------------------------------------------------------------------
# fused_step
# ----------------------------------------------------------------------------------------------
CASES = list(itertools.product((0, 1, 5), ("none", "cond", "cfg"), ("none", "given", "philox"), ("x", "y", "xy"),
                               ("none", "B", "2B")))


@pytest.mark.parametrize("K,model,noise,writes,model_in", CASES)
def test_fused_step_matches_reference(emu, K, model, noise, writes, model_in):
    """K = 5 runs the any-K loop variant; 0 and 1 the fixed-K ones."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, model, noise, writes, model_in)).encode()))
    for eval_y in ((False, True) if writes != "x" else (False,)):
        kw = step_case(gen, (2, 3, 4, 6), K=K, model=model, noise=noise, writes=writes, model_in=model_in,
                       eval_y=eval_y)
        got = run(kw, "emulated", emu)
        if noise == "philox":
            assert_outputs(got, run(kw, "reference"), f"eval_y={eval_y}", exact=False)
            if HAVE_CPU:
                assert_outputs(got, run(kw, "cpu"), f"eval_y={eval_y} vs cpu")
        else:
            assert_outputs(got, run(kw, "reference"), f"eval_y={eval_y}")


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (4, 1), (3, 4, 6, 6)])
@pytest.mark.parametrize("K", [0, 2, 5])
def test_fused_step_per_sample_guidance(emu, model_dtype, shape, K):
    """A per-sample scale vector (float32 and float64): sample b uses g0 + g1 * s[b] (a 4-group
    that straddles samples takes each element's own g); bitwise equal to the reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((model_dtype, shape, K)).encode()))
    for gdtype in (torch.float32, torch.float64):
        for row in (0, 1, 2):
            kw = step_case(gen, shape, K=K, model="cfg", noise="given", writes="xy", model_in="2B",
                           model_dtype=model_dtype, guidance=gdtype)
            kw["row"] = row
            got = run(kw, "emulated", emu)
            assert_outputs(got, run(kw, "reference"), f"{gdtype} row {row}")
            if HAVE_CPU:
                assert_outputs(got, run(kw, "cpu"), f"{gdtype} row {row} vs cpu")


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 5, 7), (1, 4, 8, 8), (3, 4, 6, 6)])
def test_fused_step_dtypes_and_sizes(emu, model_dtype, shape):
    """Odd sizes (groups straddling samples, a partial last group) in every model dtype, noise
    given in the model dtype or drawn in the kernel."""
    gen = torch.Generator().manual_seed(7)
    for noise in ("given", "philox"):
        kw = step_case(gen, shape, K=2, model="cfg", noise=noise, writes="xy", model_in="2B",
                       model_dtype=model_dtype, noise_dtype=model_dtype)
        got = run(kw, "emulated", emu)
        if noise == "given":
            assert_outputs(got, run(kw, "reference"), f"{model_dtype} {shape}")
        elif HAVE_CPU:
            assert_outputs(got, run(kw, "cpu"), f"{model_dtype} {shape} philox vs cpu")


@pytest.mark.parametrize("layout,dense,vec", [("contiguous", True, True), ("batch_slice", False, True),
                                              ("last_two_transposed", True, True), ("channels_last", True, True),
                                              ("offset", True, False)])
@pytest.mark.parametrize("noise", ["given", "philox"])
def test_fused_step_layouts(emu, layout, dense, vec, noise):
    """Batch slices are read in place (vector path), layouts whose samples are not dense
    (last two dims transposed, channels-last) run on contiguous copies, a
    misaligned tensor takes the scalar path: all give the reference's values."""
    gen = torch.Generator().manual_seed(11)
    kw = step_case(gen, (3, 4, 6, 10), K=2, model="cfg", noise=noise, writes="xy", model_in="2B", layout=layout,
                   model_dtype=torch.float16)
    plan = step_plan(emu, clone_case(kw))
    assert (plan["dense"], plan["vec"]) == (dense, vec)
    got = run(kw, "emulated", emu)
    for name in OUTPUTS:
        if got.get(name) is not None:
            assert got[name].stride() == kw[name].stride()
    if noise == "given":
        assert_outputs(got, run(kw, "reference"), layout)
    else:
        assert_outputs(got, run(kw, "reference"), layout, exact=False)
        if HAVE_CPU:
            assert_outputs(got, run(kw, "cpu"), f"{layout} vs cpu")


def test_fused_step_straddling_groups_take_scalar_path(emu):
    """M = 5 with samples 8 apart: a 4-group spans two samples; nothing between samples is touched."""
    gen = torch.Generator().manual_seed(4)
    kw = step_case(gen, (6, 5), K=1, noise="given", writes="x", model_in="B")
    big = torch.full((6, 8), float("nan"))
    for name in ("x", "cond", "uncond", "noise"):
        v = big.clone()[:, :5]
        v.copy_(kw[name])
        kw[name] = v
    assert step_plan(emu, kw) == dict(dense=False, vec=False, groups=8)
    got = run(kw, "emulated", emu)
    assert_outputs(got, run(kw, "reference"), "M=5")
    pad = got["x"].as_strided((5, 3), (8, 1), 5)     # the gaps after samples 0..4
    assert bool(pad.isnan().all()), "wrote between samples"


def test_fused_step_any_k_loop_matches_fixed_k(emu):
    """The same row through the K=4 fixed variant and, with a fifth slot no output reads (NaN), the
    any-K loop; one and two slots written (three or more: the any-K loop for K = 4 too)."""
    for mask in (0b1000, 0b1001, 0b1010, 0b1111):
        gen = torch.Generator().manual_seed(2)
        kw4 = step_case(gen, (2, 4, 8, 8), K=4, noise="philox", writes="xy", model_in="2B", hist_writes=mask)
        kw5 = clone_case(kw4)
        T4 = kw4["table"]
        T5 = torch.zeros(T4.shape[0], table_width(5), dtype=torch.float64)
        T5[:, :col_out(5, "x")] = T4[:, :col_out(4, "x")]          # g, g0, g1
        for which in ("x", "y", 0, 1, 2, 3):                        # each out block, its 4 slots of 5
            T5[:, col_out(5, which):col_out(5, which) + out_width(4)] = \
                T4[:, col_out(4, which):col_out(4, which) + out_width(4)]
        T5[:, col_s_in(5)] = T4[:, col_s_in(4)]
        kw5["table"] = T5
        kw5["hist"] = torch.cat([kw4["hist"], torch.full((1,) + tuple(kw4["x"].shape), float("nan"))])
        a, b = run(kw4, "emulated", emu), run(kw5, "emulated", emu)
        for name in ("x", "y", "model_in", "bad_row"):
            assert torch.equal(a[name], b[name]), (mask, name)
        assert torch.equal(a["hist"], b["hist"][:4]), mask
        assert bool(b["hist"][4].isnan().all()), mask


def test_fused_step_bad_row(emu):
    gen = torch.Generator().manual_seed(9)
    kw = step_case(gen, (4, 4, 16, 16), K=1, noise="none", writes="x", model_in="none")
    kw["table"][:, :] = kw["table"].abs() + 0.1      # every term reaches x
    assert run(kw, "emulated", emu)["bad_row"].item() == 0
    kw["cond"][3, 3, 15, 15] = float("nan")          # in the last block only
    assert run(kw, "emulated", emu)["bad_row"].item() == kw["row"] + 1
    kw["bad_row"][0] = 5                             # an earlier bad row is kept
    assert run(kw, "emulated", emu)["bad_row"].item() == 5
    kw["bad_row"][0] = 0
    kw["cond"][3, 3, 15, 15] = 0.0
    kw["x"][0, 0, 0, 0] = float("inf")
    assert run(kw, "emulated", emu)["bad_row"].item() == kw["row"] + 1


def test_fused_step_rejects_bad_arguments(emu):
    gen = torch.Generator().manual_seed(1)
    kw = step_case(gen, (2, 4, 4), K=2)
    a = step_args(kw, Packer())
    a.table_cols = 99
    assert b"table_cols" in emu.fastdiff_emulate_fused_step(ctypes.byref(a))
    a = step_args(kw, Packer())
    a.row = 3
    assert b"row" in emu.fastdiff_emulate_fused_step(ctypes.byref(a))


def test_fused_step_rejects_unknown_flag_bits(emu):
    """A flags bit that names no row flag: the launch check's error, and nothing written."""
    gen = torch.Generator().manual_seed(12)
    kw = step_case(gen, (2, 4, 4), K=2, model="cfg", noise="given", writes="xy", model_in="2B")
    for flags in UNKNOWN_FLAGS:
        c = clone_case(kw)
        c["flags"] = flags
        packer = Packer()
        err = emu.fastdiff_emulate_fused_step(ctypes.byref(step_args(c, packer)))
        assert err is not None and b"flags has unknown row flag bits" in err, (flags, err)
        for name, t in kw.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(c[name].nan_to_num(7.0), t.nan_to_num(7.0)), f"flags={flags}: wrote {name}"


# ----------------------------------------------------------------------------------------------
# History writes (a bitmask of slots, each from its own out block) and zero coefficients (the
# slot is not read)
# ----------------------------------------------------------------------------------------------
def _masks(K):
    """Every mask for K <= 3; above: none, one slot (first, last), two, all but one, all."""
    if K <= 3:
        return list(range(1 << K))
    full = (1 << K) - 1
    return sorted({0, 1, 1 << (K - 1), 0b11, 0b101 & full, 1 | 1 << (K - 1), full - 1, full})


MASK_CASES = [(K, mask) for K in (1, 2, 3, 4, 5, 6) for mask in _masks(K)] + [(16, (1 << 16) - 1), (16, 0b1010)]


@pytest.mark.parametrize("K,mask", MASK_CASES)
def test_fused_step_hist_writes_masks(emu, K, mask):
    """Each slot in the mask gets the value of its own out block, and every read comes before any
    write: with random coefficients each written slot is read by its own block, by the other written
    slots' blocks and by x and y, so a slot stored too early shows. Bitwise the reference's, in the
    fixed-K variants (K <= 4) and the any-K loop (its pending area: up to 16 slots), vector and
    scalar paths; slots outside the mask untouched."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, mask)).encode()))
    written = bin(mask).count("1")
    for shape, layout in (((2, 3, 4, 6), "contiguous"), ((2, 3, 5, 7), "offset"), ((3, 4, 6, 10), "channels_last")):
        kw = step_case(gen, shape, K=K, model="cfg", noise="given", writes="xy", model_in="2B", hist_writes=mask,
                       layout=layout)
        plan = step_plan(emu, clone_case(kw), full=True)
        # K <= 4 with at most 2 slots written: the fixed-K variant (registers); else the any-K loop,
        # its written values in shared memory (4 floats of each of the 128 threads per slot).
        assert plan["variant"] == (K if K <= 4 and written <= 2 else -1), plan
        assert plan["shared"] == 4 * table_width(K) + (0 if plan["variant"] >= 0 else written * 4 * 128 * 4), plan
        assert plan["shared"] <= 48 * 1024
        got = run(kw, "emulated", emu)
        assert_outputs(got, run(kw, "reference"), f"K={K} mask={mask:#b} {layout}")
        for j in range(K):
            if not mask >> j & 1:
                assert torch.equal(got["hist"][j], kw["hist"][j]), f"slot {j} outside mask {mask:#b} written"
            else:
                assert not torch.equal(got["hist"][j], kw["hist"][j]), f"slot {j} of mask {mask:#b} not written"


@pytest.mark.parametrize("K", [1, 2, 4, 5, 6])
@pytest.mark.parametrize("fill", ["nan", "inf"])
def test_fused_step_unread_slot_is_not_read(emu, K, fill):
    """A slot whose coefficient is zero in every out block holds NaN (or inf: 0 * inf is NaN too):
    it is absent, not 0 * H, so every output is finite and bitwise the reference's, whether the row
    leaves the slot alone or writes it (a write-only slot: the drop-ins' x0 handed back)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((K, fill)).encode()))
    for j in sorted({0, K - 1}):
        for mask in sorted({0, 1 << j, (1 << K) - 1}):
            for model, noise in (("cond", "given"), ("cfg", "philox")):
                kw = step_case(gen, (2, 4, 6, 6), K=K, model=model, noise=noise, writes="xy", model_in="B",
                               hist_writes=mask, unread_slot=j)
                kw["hist"][j].fill_(float(fill))
                got = run(kw, "emulated", emu)
                what = f"K={K} unread slot {j} mask={mask:#b} {model} {noise}"
                assert_outputs(got, run(kw, "reference"), what, exact=noise != "philox")
                if HAVE_CPU and noise == "philox":
                    assert_outputs(got, run(kw, "cpu"), what + " vs cpu")
                for name in ("x", "y", "model_in"):
                    assert bool(got[name].isfinite().all()), f"{what}: {name} read the {fill} slot"
                assert got["bad_row"].item() == 0, what
                others = [i for i in range(K) if i != j]
                assert bool(got["hist"][others].isfinite().all()), what
                if mask >> j & 1:
                    assert bool(got["hist"][j].isfinite().all()), f"{what}: the write-only slot"
                else:
                    assert bool(got["hist"][j].isnan().all() if fill == "nan" else got["hist"][j].isinf().all())


@pytest.mark.parametrize("K", [2, 5])
def test_fused_step_slot_read_only_by_an_output_not_written(emu, K):
    """Slot 1 is NaN and only the y-out block has a non-zero coefficient for it: a row that does
    not write y leaves it unread (x finite); a row that writes y reads it (y NaN, as the reference)."""
    gen = torch.Generator().manual_seed(20 + K)
    for writes in ("x", "xy"):
        kw = step_case(gen, (2, 4, 8), K=K, model="cfg", noise="given", writes=writes, model_in="none",
                       hist_writes=0b1, unread_slot=1)
        kw["table"][:, col_out(K, "y") + OUT_FIXED + 1] = 0.5
        got = run(kw, "emulated", emu)
        assert_outputs(got, run(kw, "reference"), f"K={K} writes={writes}")
        assert bool(got["x"].isfinite().all()) and bool(got["hist"][0].isfinite().all()), writes
        if writes == "xy":
            assert bool(got["y"].isnan().all()) and got["bad_row"].item() == kw["row"] + 1


@pytest.mark.parametrize("K", [2, 5])
def test_fused_step_slot_read_and_written_by_one_row(emu, K):
    """By hand: slot 0 <- 2 H0 and x <- x + H0 in one row: x gets the old H0 (every read before any
    write), slot 1 <- H0 + H1 reads the old H0 as well."""
    T = torch.zeros(1, table_width(K), dtype=torch.float64)
    T[0, col_out(K, "x") + OUT_X] = 1.0
    T[0, col_out(K, "x") + OUT_FIXED] = 1.0
    T[0, col_out_slot(K, 0) + OUT_FIXED] = 2.0
    T[0, col_out_slot(K, 1) + OUT_FIXED] = 1.0
    T[0, col_out_slot(K, 1) + OUT_FIXED + 1] = 1.0
    x = torch.arange(12.0).reshape(3, 4)
    hist = torch.stack([torch.full((3, 4), 10.0), torch.full((3, 4), 100.0)] +
                       [torch.full((3, 4), float("nan"))] * (K - 2))
    kw = dict(table=T, row=0, x=x, y=None, cond=None, uncond=None, hist=hist, hist_writes=0b11,
              flags=pack_flags(False, True, False, False), noise=None, seed=0, noise_id=-1, model_in=None,
              bad_row=None, guidance=None)
    got = run(kw, "emulated", emu)
    assert torch.equal(got["x"], x + 10.0)
    assert torch.equal(got["hist"][0], torch.full((3, 4), 20.0))
    assert torch.equal(got["hist"][1], torch.full((3, 4), 110.0))
    assert bool(got["hist"][2:].isnan().all())
    assert_outputs(got, run(kw, "reference"), f"K={K}")


def test_fused_step_zero_coefficient_keeps_negative_zero(emu):
    """x' = -x - x with x = +0 is -0; a slot with a zero coefficient (holding 1.0) must not add
    0 * 1.0 = +0, which would turn it into +0 (the reference keeps -0)."""
    for K in (1, 5):
        T = torch.zeros(1, table_width(K), dtype=torch.float64)
        T[0, col_out(K, "x") + OUT_X] = -1.0
        T[0, col_out(K, "x") + OUT_Y] = -1.0
        T[0, col_out(K, "x") + OUT_H] = -1.0
        T[0, col_out(K, "x") + OUT_HU] = -1.0
        T[0, col_out(K, "x") + OUT_Z] = -1.0
        kw = dict(table=T, row=0, x=torch.zeros(2, 8), y=None, cond=None, uncond=None, hist=torch.ones(K, 2, 8),
                  hist_writes=0, flags=pack_flags(False, True, False, False), noise=None, seed=0, noise_id=-1,
                  model_in=None, bad_row=None, guidance=None)
        want = run(kw, "reference")
        assert bool(want["x"].signbit().all()), "the reference keeps -0"
        got = run(kw, "emulated", emu)
        assert bool(got["x"].signbit().all()) and bool((got["x"] == 0).all()), f"K={K}: -0 became +0"


@pytest.mark.parametrize("K", [0, 1, 2, 5])
def test_fused_step_rejects_bad_hist_writes(emu, K):
    """A mask naming a slot outside [0, K), or negative: the launch check's error (the rule the
    reference states, hist_writes_error) and nothing written."""
    gen = torch.Generator().manual_seed(30 + K)
    kw = step_case(gen, (2, 4, 4), K=K, model="cfg", noise="given", writes="xy", model_in="2B", hist_writes=0)
    for mask in (-1, 1 << K, (1 << K) | 1, (1 << (K + 1)) - 1, 1 << 40, -(1 << 63)):
        c = clone_case(kw)
        c["hist_writes"] = mask
        err = emu.fastdiff_emulate_fused_step(ctypes.byref(step_args(c, Packer())))
        assert err is not None and err.startswith(b"hist_writes must be a bitmask of history slots in [0, K)"), \
            (mask, err)
        for name, t in kw.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(c[name].nan_to_num(7.0), t.nan_to_num(7.0)), f"mask={mask}: wrote {name}"
        with pytest.raises(ValueError, match=re.escape(hist_writes_error(mask, K))):
            reference.fused_step(*[clone_case(c)[k] for k in STEP_ARGS])


def test_fused_step_rejects_more_slots_than_the_kernels_take(emu):
    """K <= 16 (the row and the pending slot values fit a block's shared memory)."""
    gen = torch.Generator().manual_seed(31)
    kw = step_case(gen, (2, 4), K=17, model="cond", noise="none", hist_writes=1)
    err = emu.fastdiff_emulate_fused_step(ctypes.byref(step_args(kw, Packer())))
    assert err is not None and b"num_slots (K) must be in [0, 16]" in err, err


# ----------------------------------------------------------------------------------------------
# CFG, cfg_rescale, Philox
# ----------------------------------------------------------------------------------------------
def cfg_args(cond, uncond, g, out, packer):
    """The caller keeps cond, uncond and out alive while the struct is used (it holds raw pointers)."""
    a = CfgArgs()
    a.batch, a.sample_size = cond.shape[0], math.prod(cond.shape[1:])
    a.cond, _ = packer.rows(cond)
    a.uncond, _ = packer.rows(uncond)
    a.g, a.out, a.out_dtype = g, out.data_ptr(), DTYPE_CODE[out.dtype]
    return a


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float64, torch.float64),
                                             (torch.float64, torch.float32)])
@pytest.mark.parametrize("layout", ["contiguous", "batch_slice", "offset"])
def test_cfg_combine(emu, dtype, out_dtype, layout):
    gen = torch.Generator().manual_seed(3)
    for uncond_given in (True, False):
        c = relayout(torch.randn(3, 5, 7, generator=gen).to(dtype), layout)
        u = relayout(torch.randn(3, 5, 7, generator=gen).to(dtype), layout) if uncond_given else None
        out = torch.full(c.shape, float("nan"), dtype=out_dtype)
        assert emu.fastdiff_emulate_cfg_combine(ctypes.byref(cfg_args(c, u, 7.3, out, Packer()))) is None
        want = reference.cfg_combine(c, u, 7.3, out_dtype=out_dtype)
        assert torch.equal(out, want), f"{dtype}->{out_dtype} {layout} uncond={uncond_given}"


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")   # the reference, one element per sample
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 5000), (2, 1), (1, 2 * 2048 + 1)])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_rescale(emu, shape, phi, dtype):
    """Several chunks per sample (5000, 4097 elements), one element per sample (std NaN: factor 1)."""
    gen = torch.Generator().manual_seed(5)
    c = (3.0 + torch.randn(shape, generator=gen)).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype)
    out = torch.full(shape, float("nan"))
    ws = torch.zeros(emu_workspace_bytes(shape) // 8 + 1, dtype=torch.float64)
    a = cfg_args(c, u, 7.5, out, Packer())
    assert emu.fastdiff_emulate_cfg_rescale(ctypes.byref(a), phi, ws.data_ptr(), ws.numel() * 8) is None
    want = reduction_oracles.cfg_rescale(c, u, 7.5, phi)
    # std in float64 then rounded: the factor may differ from torch's by an ulp of float32.
    torch.testing.assert_close(out, want, rtol=4e-7 * 4, atol=0)


def emu_workspace_bytes(shape):
    B, M = shape[0], math.prod(shape[1:])
    chunks = -(-M // 2048)
    return B * chunks * 5 * 8 + B * 4


def test_cfg_rescale_constant_guided_output(emu):
    """std(D) = 0 (cond == uncond, constant): the reference keeps D (ratio 1)."""
    c, u = torch.full((2, 64), 0.5), torch.full((2, 64), 0.5)
    out = torch.empty(2, 64)
    ws = torch.zeros(64, dtype=torch.float64)
    a = cfg_args(c, u, 3.0, out, Packer())
    assert emu.fastdiff_emulate_cfg_rescale(ctypes.byref(a), 0.7, ws.data_ptr(), 512) is None
    assert torch.equal(out, reduction_oracles.cfg_rescale(c, u, 3.0, 0.7))


@pytest.mark.parametrize("numel", [1, 7, 8, 1001])
def test_philox(emu, numel):
    seed, nid = 0x1234_5678_9ABC_DEF0, 77
    G = (numel + 3) // 4
    words = torch.full((G, 4), -1, dtype=torch.int64)
    emu.fastdiff_emulate_philox_uint32(words.data_ptr(), numel, seed, nid, 0)
    assert torch.equal(words, P.philox_uint32(numel, seed, nid))
    # Counters from 2**32 - 1 on: the group index carries into the counter's second word.
    first = 2 ** 32 - 1
    emu.fastdiff_emulate_philox_uint32(words.data_ptr(), numel, seed, nid, first)
    g = first + torch.arange(G, dtype=torch.int64)
    want = P.philox4x32_10(g & P.MASK32, g >> 32, torch.full_like(g, nid), torch.zeros_like(g),
                           seed & P.MASK32, seed >> 32)
    assert torch.equal(words, torch.stack(want, dim=1))
    z = torch.full((numel + 5,), float("nan"))
    emu.fastdiff_emulate_philox_normal(z.data_ptr(), numel, seed, nid)
    assert bool(z[numel:].isnan().all()), "wrote past numel"
    ref = P.philox_normal((numel,), seed, nid)
    assert ulps(z[:numel], ref) <= PHILOX_ULPS
    if HAVE_CPU:
        assert torch.equal(z[:numel], _C.philox_normal([numel], seed, nid))


# ----------------------------------------------------------------------------------------------
# fastdiff check's cases on the emulated kernels
# ----------------------------------------------------------------------------------------------
class EmulatedCudaBackend(CudaBackend):
    """The CUDA backend's declarations (ops, dtypes, state dtype) with its kernels run by the host
    emulation on CPU tensors, packed as csrc/cuda/torch_binding.cpp packs them."""

    name = "cuda-emulated"
    device_types = ("cpu",)

    def __init__(self, emu):
        self.emu = emu

    def unavailable_reason(self):
        return None

    def fused_step(self, *args):
        emulate_step(self.emu, dict(zip(STEP_ARGS, args)))

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        out = torch.full(cond.shape, float("nan"), dtype=out_dtype or cond.dtype)
        packer = Packer()   # holds the dense copies of inputs whose samples are not dense while the kernel runs
        err = self.emu.fastdiff_emulate_cfg_combine(ctypes.byref(cfg_args(cond, uncond, float(scale), out, packer)))
        assert err is None, err.decode()
        return out

    def cfg_rescale(self, cond, uncond, g, rescale):
        out = torch.full(cond.shape, float("nan"))
        ws = torch.zeros(emu_workspace_bytes(cond.shape) // 8 + 1, dtype=torch.float64)
        packer = Packer()
        a = cfg_args(cond, uncond, float(g), out, packer)
        err = self.emu.fastdiff_emulate_cfg_rescale(ctypes.byref(a), float(rescale), ws.data_ptr(), ws.numel() * 8)
        assert err is None, err.decode()
        return out

    def philox_normal(self, shape, seed, noise_id, device):
        numel = math.prod(shape)
        z = torch.full((max(numel, 1),), float("nan"))
        self.emu.fastdiff_emulate_philox_normal(z.data_ptr(), numel, seed, noise_id)
        return z[:numel].reshape(tuple(shape))

    def philox_uint32(self, numel, seed, noise_id, device):
        words = torch.full(((numel + 3) // 4, 4), -1, dtype=torch.int64)
        self.emu.fastdiff_emulate_philox_uint32(words.data_ptr(), numel, seed, noise_id, 0)
        return words


@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")   # the reference, one element per sample
@pytest.mark.parametrize("group", ["fused_step", "cfg_combine", "philox", "reductions"])
def test_fastdiff_check_harness(emu, group):
    """fastdiff.check's cases for this op group (row kinds x dtypes x sizes x layouts) on the
    emulated CUDA kernels: every op the CUDA backend declares passes; the others are n/a."""
    from fastdiff.check import NA, PASS, check_backend
    backend = EmulatedCudaBackend(emu)
    results = check_backend(backend, device="cpu", groups=[group], large=False)
    assert results
    bad = [f"{r.op} {r.case}: {r.status} {r.detail}" for r in results if r.status not in (PASS, NA)]
    assert not bad, "\n".join(bad)
    declared = {"philox" if op == "philox_normal" else op for op in backend.ops}   # check names philox "philox"
    assert {r.op for r in results if r.status == PASS} == declared & {r.op for r in results}
    assert not {r.op for r in results if r.status == NA} & declared
