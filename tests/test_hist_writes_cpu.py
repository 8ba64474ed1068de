"""The C++ CPU fused step on the hist_writes ABI (issue 11): a row writes any set of history slots
(a bitmask, slot j from its own out block), and a history term whose float32 coefficient is zero
is absent (the slot is not read). Against the reference oracle, bit for bit (Philox noise: within
the shared PHILOX tolerance), on the general block loop (rows writing x and y, or three or more
slots, float64 model outputs) and on the one-pass loops (rows writing x only or y only, at most
three slots read and two written), dense and sparse rows, with NaN-filled slots no output reads.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.check import assert_step_match, clone_case, public_kwargs, run_against_reference, step_case
from fastdiff.ops.backends import load_extension
from fastdiff.program.layout import (COL_G, OUT_FIXED, OUT_H, OUT_HU, OUT_Y, STEP_ARG_NAMES, col_out, col_out_slot,
                                     col_out_x, col_out_y, hist_writes_error)

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str), reason=str(_C))

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OUTPUTS = ("x", "y", "hist", "model_in")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _assert_bits(got, want, name):
    """Equal bit for bit (signed zeros included); NaN at the same places."""
    gn, wn = got.isnan(), want.isnan()
    assert torch.equal(gn, wn), f"{name}: NaN at other places than the reference's"
    iview = {8: torch.int64, 4: torch.int32, 2: torch.int16}[got.element_size()]
    g, w = got[~gn].contiguous().view(iview), want[~wn].contiguous().view(iview)
    assert torch.equal(g, w), f"{name}: {(g != w).sum().item()} elements differ from the reference (bits)"


def _check(kw, what, *, finite=()):
    """Run kw on cpu and reference; outputs bitwise equal (Philox: the shared tolerance), bad_row
    equal, and the named outputs finite (they read only finite values). Returns the cpu copy."""
    a, b = run_against_reference(kw, "cpu")
    assert torch.equal(a["bad_row"], b["bad_row"]), f"bad_row {what}"
    if kw["noise_id"] >= 0 and kw["noise"] is None:
        assert_step_match(a, b, what)
    else:
        for name in OUTPUTS:
            if a.get(name) is not None:
                _assert_bits(a[name], b[name], f"{name} {what}")
    for name in finite:
        assert torch.isfinite(a[name]).all(), f"{name} not finite {what}"
    return a


def _masks(K):
    """(label, mask): none, one slot, two slots, every slot (the kinds that exist for K)."""
    out = [("none", 0)]
    if K >= 1:
        out.append(("one", 1 << (K - 1)))
    if K >= 2:
        out.append(("two", 0b1 | 1 << (K - 1)))
    if K >= 3:
        out.append(("all", (1 << K) - 1))
    return out


def _solver_like(table, K, stored, mask):
    """Sparse rows: the stored block (x-out or y-out) with a_y = a_hu = 0, each written slot's
    value h itself (what the one-pass loop's sparse form serves)."""
    b = col_out_x(K) if stored == "x" else col_out_y(K)
    table[:, b + OUT_Y] = 0.0
    table[:, b + OUT_HU] = 0.0
    for j in range(K):
        if mask >> j & 1:
            h = col_out_slot(K, j)
            table[:, h:h + OUT_FIXED + K] = 0.0
            table[:, h + OUT_H] = 1.0


# ----------------------------------------------------------------------------------------------
# every mask kind, every path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES)
@pytest.mark.parametrize("K", (0, 1, 2, 3, 4))
@pytest.mark.parametrize("writes", ("x", "y", "xy"))
def test_masks_bitwise(model_dtype, K, writes):
    """Masks writing no slot, one, two, all; rows evaluated at x and at y; no / given / Philox
    noise, model input or none; odd sizes (vector tails). The random tables read every slot from
    every block, so a written slot is also read by the same row (old value in, new value out)."""
    gen = torch.Generator().manual_seed(_seed("masks", model_dtype, K, writes))
    noises = ("none", "given", "philox")
    for i, (label, mask) in enumerate(_masks(K)):
        for eval_y in (False, True):
            for n, shape in enumerate(((1,), (7,), (33,), (2, 3, 5, 7))):
                noise = noises[(i + n) % 3]
                kw = step_case(gen, shape, K=K, model="cfg" if n % 2 else "cond", noise=noise, writes=writes,
                               model_in=("none", "2B", "B")[n % 3], model_dtype=model_dtype, eval_y=eval_y,
                               hist_writes=mask)
                _check(kw, f"{label} mask={mask:#b} eval_y={eval_y} {shape} {noise}")


@pytest.mark.parametrize("model_dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("stored", ("x", "y"))
@pytest.mark.parametrize("sparse", (False, True))
@pytest.mark.parametrize("K", (1, 2, 3))
def test_two_writes_one_pass_bitwise(model_dtype, stored, sparse, K):
    """The one-pass loop with two written slots (one extra store stream), the stored value x or y
    (evaluated at x), dense and sparse rows, g = 1 and not, no / given noise; with K = 3 the
    second write is a slot the row also reads. K = 1: one slot written and read."""
    gen = torch.Generator().manual_seed(_seed("two writes", model_dtype, stored, sparse, K))
    mask = 0b1 | (1 << (K - 1))
    for shape in ((1,), (7,), (33,), (2, 203), (1, 4, 40, 41)):
        for noise in ("none", "given"):
            for g_one in (False, True):
                kw = step_case(gen, shape, K=K, model="cfg", noise=noise, writes=stored, model_in="2B",
                               model_dtype=model_dtype, eval_y=False, hist_writes=mask, model_in_from_y=stored == "y")
                if sparse:
                    _solver_like(kw["table"], K, stored, mask)
                if g_one:
                    kw["table"][:, COL_G] = 1.0
                _check(kw, f"{shape} {noise} g_one={g_one}")


# ----------------------------------------------------------------------------------------------
# absent history terms: NaN-filled slots that no output reads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_dtype", MODEL_DTYPES)
@pytest.mark.parametrize("writes", ("x", "y", "xy"))
@pytest.mark.parametrize("sparse", (False, True))
@pytest.mark.parametrize("written", (False, True))
def test_unread_nan_slot(model_dtype, writes, sparse, written):
    """A slot whose coefficients are all zero holds NaN: every output is finite and the
    reference's bit for bit (0 * NaN would be NaN), whether the row also writes that slot (a
    write-only slot, the drop-ins' x0 handed back) or leaves it alone (then it stays NaN). One-pass
    loop (x or y), general loop (x and y, float64), dense and sparse rows."""
    gen = torch.Generator().manual_seed(_seed("nan slot", model_dtype, writes, sparse, written))
    for K, unread in ((1, 0), (2, 1), (3, 0), (4, 2)):
        mask = (1 << unread if written else 0) | (1 << (K - 1 - unread) if K > 1 else 0)
        for shape in ((7,), (33,), (2, 3, 5, 7)):
            for noise in ("none", "given"):
                kw = step_case(gen, shape, K=K, model="cfg", noise=noise, writes=writes, model_in="2B",
                               model_dtype=model_dtype, eval_y=False if writes != "xy" else None,
                               hist_writes=mask, unread_slot=unread)
                if sparse:
                    _solver_like(kw["table"], K, writes[0], mask)
                    b = col_out_x(K) if writes[0] == "x" else col_out_y(K)
                    kw["table"][:, b + OUT_FIXED + unread] = 0.0
                what = f"K={K} unread={unread} mask={mask:#b} {shape} {noise}"
                a = _check(kw, what, finite=[w for w in ("x", "y") if w in writes])
                others = [j for j in range(K) if j != unread]
                assert torch.isfinite(a["hist"][others]).all(), f"hist {what}"
                if written:
                    assert torch.isfinite(a["hist"][unread]).all(), f"written slot {what}"
                else:
                    assert a["hist"][unread].isnan().all(), f"unwritten slot {what}"


def test_write_only_slot_fresh_empty_buffer():
    """The drop-ins' use: a K=1 program extended by a write-only slot handed back as a fresh
    torch.empty tensor (garbage, NaN here), at the SD-1.5 latent, fp32 and fp16 model outputs."""
    gen = torch.Generator().manual_seed(_seed("drop-in"))
    for model_dtype in (torch.float32, torch.float16):
        for K, mask in ((1, 0b1), (2, 0b11)):
            kw = step_case(gen, (1, 4, 64, 64), K=K, model="cond", noise="none", writes="y", model_in="none",
                           model_dtype=model_dtype, eval_y=False, hist_writes=mask, unread_slot=K - 1)
            _solver_like(kw["table"], K, "y", mask)
            kw["table"][:, col_out_y(K) + OUT_FIXED + K - 1] = 0.0
            _check(kw, f"{model_dtype} K={K}", finite=("y", "hist"))


# ----------------------------------------------------------------------------------------------
# sizes, threads, layouts
# ----------------------------------------------------------------------------------------------
def _run_threads(kw, n):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        a = clone_case(kw)
        ops.fused_step(**public_kwargs(a), backend="cpu")
        return a
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("writes,mask", [("x", 0b11), ("y", 0b101), ("xy", 0b11), ("x", 0b111)])
def test_openmp_sizes_and_threads(model_dtype, writes, mask):
    """Above the serial threshold (2x4x67x65, and 1000003 elements for two writes): 1 and 2
    threads give the same bits, which are the reference's."""
    gen = torch.Generator().manual_seed(_seed("omp", model_dtype, writes, mask))
    shapes = [(2, 4, 67, 65)] + ([(1000003,)] if model_dtype == torch.float32 and mask == 0b11 else [])
    for shape in shapes:
        for noise in ("none", "philox"):
            kw = step_case(gen, shape, K=3, model="cfg", noise=noise, writes=writes, model_in="2B",
                           model_dtype=model_dtype, eval_y=False if writes != "xy" else None, hist_writes=mask)
            if noise == "none" and writes != "xy":
                _solver_like(kw["table"], 3, writes, mask)
            one, two = _run_threads(kw, 1), _run_threads(kw, 2)
            for name in OUTPUTS:
                if one.get(name) is not None:
                    _assert_bits(one[name], two[name], f"{name} 1 vs 2 threads {shape} {noise}")
            _check(kw, f"{shape} {noise}")


@pytest.mark.parametrize("layout", ("channels_last", "last_two_transposed", "strided", "batch_slice", "padded"))
@pytest.mark.parametrize("writes", ("x", "xy"))
def test_layouts_two_writes(layout, writes):
    """Non-contiguous tensors (copied or run in memory order): both written slots come back."""
    gen = torch.Generator().manual_seed(_seed("layout", layout, writes))
    for mask in (0b011, 0b110):
        kw = step_case(gen, (2, 3, 5, 7), K=3, model="cfg", noise="given", writes=writes, model_in="2B",
                       layout=layout, hist_writes=mask, eval_y=False if writes == "x" else None)
        _check(kw, f"{layout} mask={mask:#b}")


# ----------------------------------------------------------------------------------------------
# bad masks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,mask", [(0, 1), (1, 2), (1, -1), (3, 8), (3, -8), (4, 1 << 40)])
@pytest.mark.parametrize("level", ("public", "extension"))
def test_bad_mask_raises_and_changes_nothing(K, mask, level):
    gen = torch.Generator().manual_seed(_seed("bad", K, mask))
    kw = step_case(gen, (2, 3, 4), K=K, model="cfg", noise="given", writes="xy", model_in="2B")
    kw["hist_writes"] = mask
    before = clone_case(kw)
    if level == "public":
        with pytest.raises(ValueError) as info:
            ops.fused_step(**public_kwargs(kw), backend="cpu")
        assert str(info.value) == hist_writes_error(mask, K)
    else:
        with pytest.raises(ValueError) as info:
            _C.fused_step(*[kw[name] for name in STEP_ARG_NAMES])
        msg = str(info.value)
        assert msg.startswith(f"fastdiff._C.fused_step: hist_writes must be a bitmask of history slots in [0, {K})")
        assert msg.endswith(f"got {mask}")
    for name, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(kw[name].nan_to_num(), v.nan_to_num()), f"{name} was modified by a call that raised"


def test_mask_helpers_cover_the_kinds():
    """(the test's own table: every kind it claims exists for K)"""
    assert [label for label, _ in _masks(4)] == ["none", "one", "two", "all"]
    assert dict(_masks(4))["two"] == 0b1001 and bin(dict(_masks(3))["all"]).count("1") == 3
    assert col_out(3, 2) == col_out_slot(3, 2)
