"""The plain-PyTorch oracle of the fused step and of CFG: ``fused_step`` (one row of a
coefficient program, see fastdiff.program) and ``cfg_combine``. Written for clarity, not speed;
math in float32 (float64 when the state is float64, which the solver tests use to check
coefficient programs to 1e-10). The "reference" backend of fastdiff.ops runs these functions.

Imports torch, the row layout and the Philox oracle only: nothing it judges.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..program.layout import (COL_G, COL_G0, COL_G1, COL_QD, COL_QY, OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z,
                              col_out, col_s_in, hist_writes_error, mask_slots, unpack_flags)
from .philox import philox_normal

__all__ = ["fused_step", "cfg_combine", "row_guidance", "guided"]


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cfg_combine(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale, out_dtype=None) -> torch.Tensor:
    """D = uncond + scale * (cond - uncond), computed in float32 (float64 for float64 inputs)."""
    md = torch.float64 if cond.dtype == torch.float64 else torch.float32
    c = cond.to(md)
    if uncond is None:
        d = c
    else:
        u = uncond.to(md)
        d = u + scale * (c - u)
    return d.to(out_dtype or cond.dtype)


def row_guidance(c: torch.Tensor, guidance: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The g of each sample, in the math dtype: the row's g column, or g0 + g1 * s[b] with a
    per-sample scale vector s (shaped [B, 1, ...] to broadcast over a sample)."""
    if guidance is None:
        return c[COL_G]
    s = guidance.to(device=x.device, dtype=c.dtype)
    return (c[COL_G0] + c[COL_G1] * s).reshape((-1,) + (1,) * (x.dim() - 1))


def guided(cond: torch.Tensor, uncond: Optional[torch.Tensor], g: torch.Tensor, md: torch.dtype) -> torch.Tensor:
    """D = uncond + g (cond - uncond) in the math dtype (float64 inputs combine in float64, then
    round); g == 1 (per sample) is D = cond exactly, as a run without the uncond pass."""
    C = cond.to(md)
    if uncond is None:
        return C
    return torch.where(g == 1, C, cfg_combine(cond, uncond, g, out_dtype=md))


def fused_step(table: torch.Tensor, row: int, x: torch.Tensor, y: Optional[torch.Tensor],
               cond: Optional[torch.Tensor], uncond: Optional[torch.Tensor],
               hist: Optional[torch.Tensor], hist_writes: int, flags: int,
               noise: Optional[torch.Tensor], seed: int, noise_id: int,
               model_in: Optional[torch.Tensor], bad_row: Optional[torch.Tensor],
               guidance: Optional[torch.Tensor] = None) -> None:
    """One row of a coefficient program; see fastdiff.program for the formula. In place on x, y,
    hist and model_in; every read happens before any write. ``flags``: the row's bitmask
    (fastdiff.program.layout FLAG_*; unknown bits raise ValueError before anything is written);
    ``hist_writes``: the bitmask of the history slots the row writes (slot j from its own out block).
    A history term with a zero coefficient is absent: the row does not read that slot.
    If ``bad_row`` (int32 [1]) is 0 and a written x or y value is not finite, it becomes row + 1
    (a device-side flag: no host sync). ``guidance``: optional per-sample scale vector [B]; sample
    b then uses g = g0 + g1 * s[b]."""
    eval_y, write_x, write_y, model_in_from_y = unpack_flags(flags)
    K = 0 if hist is None else hist.shape[0]
    if not 0 <= hist_writes < (1 << K):
        raise ValueError(hist_writes_error(hist_writes, K))
    md = _math_dtype(x)
    # Coefficients rounded to the math dtype, as the kernels do; indexing a device tensor keeps
    # them on the device (no host sync).
    c = table[row].to(device=x.device, dtype=md)
    X = x.to(md)
    E = y.to(md) if eval_y else X
    H = [] if hist is None else [hist[j].to(md) for j in range(K)]

    if cond is not None:
        D = guided(cond, uncond, row_guidance(c, guidance, x), md)
        h = c[COL_QY] * E + c[COL_QD] * D
        hu = h if uncond is None else c[COL_QY] * E + c[COL_QD] * uncond.to(md)
    else:
        h = hu = torch.zeros_like(X)

    z = None
    if noise is not None:
        z = noise.to(md)
    elif noise_id >= 0:
        z = philox_normal(tuple(x.shape), seed, noise_id, device=x.device).to(md)

    def output(which: str) -> torch.Tensor:
        b = col_out(K, which)
        o = c[b + OUT_X] * X + c[b + OUT_Y] * E
        o = o + c[b + OUT_H] * h
        o = o + c[b + OUT_HU] * hu
        if z is not None:
            o = o + c[b + OUT_Z] * z
        for j in range(K):
            a = c[b + OUT_FIXED + j]
            o = torch.where(a != 0, o + a * H[j], o)     # (a zero coefficient: the term is absent)
        return o

    new_x = output("x") if write_x else None
    new_y = output("y") if write_y else None
    new_h = [(j, output(j)) for j in mask_slots(hist_writes)]
    if bad_row is not None:
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        for o in (new_x, new_y):
            if o is not None:
                finite = finite & torch.isfinite(o).all()
        bad_row.copy_(torch.where((bad_row == 0) & ~finite, row + 1, bad_row))
    for j, v in new_h:
        hist[j].copy_(v)
    if new_x is not None:
        x.copy_(new_x)
    if new_y is not None:
        y.copy_(new_y)
    if model_in is not None:
        src = new_y if model_in_from_y else new_x
        src = (c[col_s_in(K)] * src).to(model_in.dtype)
        B = x.shape[0]
        for half in range(model_in.shape[0] // B):
            model_in[half * B:(half + 1) * B].copy_(src)
