"""The fused solver step in Triton: one row of a coefficient program (fastdiff/program) per
launch, with exactly the semantics of fastdiff.reference.fused_step.

The kernel reads the row's coefficients from the float64 table on the device (pointer + row
index: no host reads, so a captured CUDA graph replays current values), folds CFG in, reads the
history slots whose coefficients are non-zero and writes the slots of its ``hist_writes`` mask (each
from its own out block), writes x and/or y, draws Philox noise in place or reads a noise
tensor, writes the next model input (cast to the model dtype, into one or both CFG halves) and
raises the ``bad_row`` flag (first bad row wins, via compare-and-swap) when a written x/y value
is not finite.

Every float32 operation follows the reference's order and the kernel is compiled without FMA
contraction (``EXACT_FP``), so fp32 results equal the reference's bit for bit.

History: a term whose float32 coefficient is 0 is absent (the reference's ``where(a != 0, o + a H, o)``),
so slot j is loaded only where some output the row computes has a non-zero coefficient for it (a
masked load), once, before any store: a slot the row only writes may hold NaN or garbage, and a slot
may be read and written by the same row. K and the mask are constexprs, so only the written slots'
outputs are code: a program compiles one variant per distinct mask it uses (a ring of K slots: K of
them, never more than 2**K). A runtime mask (one variant, a uniform branch per slot) was measured at
up to +28 registers per thread on sm_80/sm_90 (+7..+26 on the K=2 CFG row of kernels/report.py), for
every row.

Layout: every tensor is addressed as [B, M] rows with its own batch stride (see _common), so
batch slices, CFG halves and history slots are read in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.program.layout import (COL_G, COL_G0, COL_G1, COL_QD, COL_QY, FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y,
                                     FLAG_WRITE_X, FLAG_WRITE_Y, OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z,
                                     col_out_slot, col_out_x, col_out_y, col_s_in, flags_error, hist_writes_error,
                                     unknown_flag_bits)

from ._common import EXACT_FP, INT32_MAX, as_int32, dense_rows, key_words, max_offset, sample_size, write_back
from .philox import philox_normal_block

BLOCK = 1024          # elements per program (a multiple of 4: Philox groups never straddle programs)
NUM_WARPS = 4

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2

# The row ABI (fastdiff/program/layout.py): fixed columns as module constants, the columns that
# move with K as constexpr arguments (layout_constexprs), so the kernel computes no offset itself.
_COL_G = tl.constexpr(COL_G)
_COL_G0 = tl.constexpr(COL_G0)
_COL_G1 = tl.constexpr(COL_G1)
_COL_QY = tl.constexpr(COL_QY)
_COL_QD = tl.constexpr(COL_QD)
_OUT_FIXED = tl.constexpr(OUT_FIXED)
_OUT_X = tl.constexpr(OUT_X)
_OUT_Y = tl.constexpr(OUT_Y)
_OUT_H = tl.constexpr(OUT_H)
_OUT_HU = tl.constexpr(OUT_HU)
_OUT_Z = tl.constexpr(OUT_Z)
# The row flags, decoded in the kernel from its FLAGS constexpr (``_FLAG & FLAGS``: the constant on the
# left, so the interpreter, which passes FLAGS as a plain int, evaluates it too).
_FLAG_EVAL_Y = tl.constexpr(FLAG_EVAL_Y)
_FLAG_WRITE_X = tl.constexpr(FLAG_WRITE_X)
_FLAG_WRITE_Y = tl.constexpr(FLAG_WRITE_Y)
_FLAG_MODEL_IN_FROM_Y = tl.constexpr(FLAG_MODEL_IN_FROM_Y)


def layout_constexprs(K: int) -> dict:
    """The K-dependent columns of the table, as the kernel's constexpr arguments (COL_OUT_SLOTS[j]: the
    out block of history slot j)."""
    return dict(COL_OUT_X=col_out_x(K), COL_OUT_Y=col_out_y(K),
                COL_OUT_SLOTS=tuple(col_out_slot(K, j) for j in range(K)), COL_S_IN=col_s_in(K))


@triton.jit
def _coef(row_ptr, col, col_stride):
    """Coefficient ``col`` of the row, rounded to float32 as the reference rounds the table."""
    return tl.load(row_ptr + col * col_stride).to(tl.float32)


@triton.jit
def _output(row_ptr, cs, base, X, E, h, hu, z, H, K: tl.constexpr, HAS_Z: tl.constexpr):
    """(((a_x*X + a_y*E) + a_h*h) + a_hu*hu) [+ a_z*z] + sum_j a_j*H[j], in the reference's order; a
    history term with a_j == 0 is absent (H[j] may then be unloaded: a slot that holds NaN must not
    turn the output into NaN, nor 0 * H turn a -0 into +0)."""
    o = _coef(row_ptr, base + _OUT_X, cs) * X + _coef(row_ptr, base + _OUT_Y, cs) * E
    o = o + _coef(row_ptr, base + _OUT_H, cs) * h
    o = o + _coef(row_ptr, base + _OUT_HU, cs) * hu
    if HAS_Z:
        o = o + _coef(row_ptr, base + _OUT_Z, cs) * z
    for j in tl.static_range(K):
        a = _coef(row_ptr, base + _OUT_FIXED + j, cs)
        o = tl.where(a != 0.0, o + a * H[j], o)
    return o


@triton.jit
def _reads_slot(used, row_ptr, cs, base, j):
    """``used``, or whether the out block at ``base`` has a non-zero coefficient of slot j."""
    return used | (_coef(row_ptr, base + _OUT_FIXED + j, cs) != 0.0)


@triton.jit
def _at(i, b, m, batch_stride, STRIDED: tl.constexpr):
    """Offset of element i (= b*M + m) in a tensor addressed as [B, M] rows."""
    if STRIDED:
        return b * batch_stride + m
    else:                   # every tensor dense: no division needed
        return i


@triton.jit
def _nonfinite(v):
    return (v.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit(do_not_specialize=["row", "seed_lo", "seed_hi", "noise_id"])
def fused_step_kernel(
    table_ptr, row, table_sr, table_sc,
    x_ptr, y_ptr, cond_ptr, uncond_ptr, hist_ptr, noise_ptr, model_in_ptr, bad_row_ptr, guidance_ptr,
    numel, M,
    x_sb, y_sb, cond_sb, uncond_sb, hist_sb, hist_sk, noise_sb, model_in_sb, model_in_half,
    seed_lo, seed_hi, noise_id,
    K: tl.constexpr, FLAGS: tl.constexpr, HIST_WRITES: tl.constexpr,
    HAS_COND: tl.constexpr, HAS_UNCOND: tl.constexpr, NOISE: tl.constexpr,
    MODEL_IN_HALVES: tl.constexpr, CHECK_FINITE: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr, STRIDED: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
    COL_OUT_X: tl.constexpr, COL_OUT_Y: tl.constexpr, COL_OUT_SLOTS: tl.constexpr, COL_S_IN: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)           # flat logical (row-major) element index
    mask = i < numel
    b = i // M                                      # used when STRIDED or with per-sample guidance
    m = i - b * M

    # Columns: fastdiff/program/layout.py (table strides: any).
    row_ptr = table_ptr + row * table_sr

    X = tl.load(x_ptr + _at(i, b, m, x_sb, STRIDED), mask=mask, other=0.0)
    if _FLAG_EVAL_Y & FLAGS:
        E = tl.load(y_ptr + _at(i, b, m, y_sb, STRIDED), mask=mask, other=0.0)
    else:
        E = X

    if HAS_COND:
        C = tl.load(cond_ptr + _at(i, b, m, cond_sb, STRIDED), mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            U = tl.load(uncond_ptr + _at(i, b, m, uncond_sb, STRIDED), mask=mask, other=0.0).to(tl.float32)
            if HAS_GUIDANCE:    # g of each element's sample: g0 + g1 * s[b]
                s = tl.load(guidance_ptr + b, mask=mask, other=0.0).to(tl.float32)
                g = _coef(row_ptr, _COL_G0, table_sc) + _coef(row_ptr, _COL_G1, table_sc) * s
            else:
                g = _coef(row_ptr, _COL_G, table_sc)
            D = tl.where(g == 1.0, C, U + g * (C - U))     # g == 1: D = cond exactly
            h = _coef(row_ptr, _COL_QY, table_sc) * E + _coef(row_ptr, _COL_QD, table_sc) * D
            hu = _coef(row_ptr, _COL_QY, table_sc) * E + _coef(row_ptr, _COL_QD, table_sc) * U
        else:
            h = _coef(row_ptr, _COL_QY, table_sc) * E + _coef(row_ptr, _COL_QD, table_sc) * C
            hu = h
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
        hu = h

    if NOISE == 1:
        z = tl.load(noise_ptr + _at(i, b, m, noise_sb, STRIDED), mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        z = philox_normal_block(pid * (BLOCK // 4), seed_lo, seed_hi, noise_id, BLOCK // 4)
    else:
        z = h  # unused: the outputs have no noise term

    # History: slot j is loaded once, before any store, and only where an output this row computes
    # (x, y, the written slots) has a non-zero coefficient for it.
    hist_off = _at(i, b, m, hist_sb, STRIDED)
    H = ()
    for j in tl.static_range(K):
        used = False
        if _FLAG_WRITE_X & FLAGS:
            used = _reads_slot(used, row_ptr, table_sc, COL_OUT_X, j)
        if _FLAG_WRITE_Y & FLAGS:
            used = _reads_slot(used, row_ptr, table_sc, COL_OUT_Y, j)
        for w in tl.static_range(K):
            if (HIST_WRITES >> w) & 1:
                used = _reads_slot(used, row_ptr, table_sc, COL_OUT_SLOTS[w], j)
        H = H + (tl.load(hist_ptr + j * hist_sk + hist_off, mask=tl.where(used, mask, False), other=0.0),)

    if _FLAG_WRITE_X & FLAGS:
        new_x = _output(row_ptr, table_sc, COL_OUT_X, X, E, h, hu, z, H, K, NOISE != 0)
    if _FLAG_WRITE_Y & FLAGS:
        new_y = _output(row_ptr, table_sc, COL_OUT_Y, X, E, h, hu, z, H, K, NOISE != 0)

    if CHECK_FINITE:
        bad = tl.zeros([BLOCK], dtype=tl.int1)
        if _FLAG_WRITE_X & FLAGS:
            bad = bad | _nonfinite(new_x)
        if _FLAG_WRITE_Y & FLAGS:
            bad = bad | _nonfinite(new_y)
        if tl.max((bad & mask).to(tl.int32), axis=0) > 0:
            tl.atomic_cas(bad_row_ptr, 0, row + 1)      # only the first bad row is recorded

    # Writes after every read (the history slots are in H): each written slot from its own out block.
    for j in tl.static_range(K):
        if (HIST_WRITES >> j) & 1:
            new_h = _output(row_ptr, table_sc, COL_OUT_SLOTS[j], X, E, h, hu, z, H, K, NOISE != 0)
            tl.store(hist_ptr + j * hist_sk + hist_off, new_h, mask=mask)
    if _FLAG_WRITE_X & FLAGS:
        tl.store(x_ptr + _at(i, b, m, x_sb, STRIDED), new_x, mask=mask)
    if _FLAG_WRITE_Y & FLAGS:
        tl.store(y_ptr + _at(i, b, m, y_sb, STRIDED), new_y, mask=mask)
    if MODEL_IN_HALVES > 0:
        if _FLAG_MODEL_IN_FROM_Y & FLAGS:
            src = new_y
        else:
            src = new_x
        v = (_coef(row_ptr, COL_S_IN, table_sc) * src).to(model_in_ptr.dtype.element_ty)
        mi = model_in_ptr + _at(i, b, m, model_in_sb, STRIDED)
        tl.store(mi, v, mask=mask)
        if MODEL_IN_HALVES == 2:
            tl.store(mi + model_in_half, v, mask=mask)


def fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in, bad_row,
               guidance=None) -> None:
    """Launch one row; arguments as fastdiff.reference.fused_step (fastdiff.program.layout.STEP_ARGS,
    already validated; ``flags`` the row's bitmask and ``hist_writes`` the bitmask of the history
    slots it writes, both constexprs of the kernel). Tensors whose samples are not dense are copied
    (outputs copied back): see _common."""
    flags = int(flags)
    if unknown_flag_bits(flags):
        raise ValueError(flags_error(flags))
    hist_writes = int(hist_writes)
    write_x, write_y = bool(flags & FLAG_WRITE_X), bool(flags & FLAG_WRITE_Y)
    if model_in is not None and flags & FLAG_MODEL_IN_FROM_Y and not write_y:
        raise ValueError("model_in_from_y needs a row that writes y")
    if hist is not None and hist.shape[0] == 0:
        hist = None
    K = 0 if hist is None else hist.shape[0]
    if not 0 <= hist_writes < (1 << K):
        raise ValueError(hist_writes_error(hist_writes, K))
    B, M = x.shape[0], sample_size(x)
    numel = x.numel()
    if numel == 0:
        return

    xk, x_sb = dense_rows(x)
    yk, y_sb = dense_rows(y)
    ck, cond_sb = dense_rows(cond)
    uk, uncond_sb = dense_rows(uncond)
    nk, noise_sb = dense_rows(noise)
    mk, mi_sb = dense_rows(model_in)
    hk, hist_sb, hist_sk = hist, 0, 0
    if hist is not None:
        slot0 = hist[0]
        slot, hist_sb = dense_rows(slot0)
        if slot is not slot0 or (K > 1 and hist.stride(0) == 0):
            hk = hist.contiguous()
            hist_sb = M
        hist_sk = hk.stride(0)
    dummy = xk  # stands in for absent tensors (never dereferenced)
    gk = None if guidance is None or cond is None or uncond is None else guidance.contiguous()

    batch_strides = [s for s in (x_sb, y_sb, cond_sb, uncond_sb, noise_sb, mi_sb) if s is not None]
    if hist is not None:
        batch_strides.append(hist_sb)
    strided = any(s != M for s in batch_strides) or (K > 1 and hist_sk != numel)
    index_64 = max(max_offset(t) for t in (xk, yk, ck, uk, nk, mk, hk)) + BLOCK > INT32_MAX
    noise_kind = NOISE_TENSOR if noise is not None else NOISE_PHILOX if noise_id >= 0 else NOISE_NONE
    lo, hi = key_words(seed) if noise_kind == NOISE_PHILOX else (0, 0)
    halves = 0 if model_in is None else model_in.shape[0] // B

    grid = (triton.cdiv(numel, BLOCK),)
    fused_step_kernel[grid](
        table, row, table.stride(0), table.stride(1),
        xk, dummy if yk is None else yk, dummy if ck is None else ck, dummy if uk is None else uk,
        dummy if hk is None else hk, dummy if nk is None else nk, dummy if mk is None else mk,
        dummy if bad_row is None else bad_row, dummy if gk is None else gk,
        numel, M,
        x_sb, y_sb or 0, cond_sb or 0, uncond_sb or 0, hist_sb, hist_sk, noise_sb or 0, mi_sb or 0,
        (B * mi_sb) if mk is not None else 0,
        lo, hi, as_int32(max(noise_id, 0)),
        K=K, FLAGS=flags, HIST_WRITES=hist_writes,
        HAS_COND=cond is not None, HAS_UNCOND=uncond is not None, NOISE=noise_kind,
        MODEL_IN_HALVES=halves,
        CHECK_FINITE=bad_row is not None, HAS_GUIDANCE=gk is not None, STRIDED=strided, INDEX_64=index_64, BLOCK=BLOCK, **layout_constexprs(K),
        num_warps=NUM_WARPS, **EXACT_FP,
    )
    write_back(x, xk if write_x else None)
    write_back(y, yk if write_y else None)
    write_back(hist, hk if hist_writes else None)
    write_back(model_in, mk)
