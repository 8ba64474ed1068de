"""``compile_program``: fold the model's parameterization and the guidance scale into a solver's
rows and lay out the float64 table (columns: fastdiff.program.layout)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..parameterization import x0_coefficients
from .layout import (COL_G, COL_G0, COL_G1, COL_QD, COL_QY, OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z, col_out,
                     col_s_in, table_width)
from .rows import Out, Program, Row


def guidance_column(rows: List[Row], scale_at) -> np.ndarray:
    """The per-row CFG scale g (D = u + g (c - u)); ``scale_at(point) -> g`` or None (g = 1)."""
    g = np.ones(len(rows))
    if scale_at is not None:
        for i, r in enumerate(rows):
            if r.needs_model:
                g[i] = scale_at(r.point)
    return g


def guidance_affine(rows: List[Row], affine_at) -> np.ndarray:
    """The per-row map of a per-sample scale s to g = g0 + g1 * s, as [rows, 2] (g0, g1);
    ``affine_at(point) -> (g0, g1)``, or None: (0, 1) everywhere (g = s)."""
    a = np.zeros((len(rows), 2))
    a[:, 1] = 1.0
    if affine_at is not None:
        for i, r in enumerate(rows):
            if r.needs_model:
                a[i] = affine_at(r.point)
    return a


def _block(T: np.ndarray, i: int, c: int, K: int, out: Out) -> None:
    T[i, c + OUT_X] = out.x
    T[i, c + OUT_Y] = out.y
    T[i, c + OUT_H] = out.h
    T[i, c + OUT_HU] = out.hu
    T[i, c + OUT_Z] = out.z
    for j, b in out.hist:
        if not 0 <= j < K:
            raise ValueError(f"history slot {j} out of range for {K} slots")
        T[i, c + OUT_FIXED + j] += b


def compile_program(rows: List[Row], prediction: str, num_slots: int, steps: int,
                    guidance_scale: Optional[np.ndarray] = None, s_in=None,
                    guidance_affine: Optional[np.ndarray] = None,
                    x0_coefs: Optional[Sequence[Tuple[float, float]]] = None, check_finite: bool = True) -> Program:
    """Fold the parameterization into the solver's rows and lay out the float64 table.

    A row's h = q_y E + q_x0 x0 becomes q_y' E + q_d D with x0 = A_x E + A_d D (A from the
    ``prediction``, or per row from ``x0_coefs`` [(A_x, A_d)], e.g. a host library's own
    conversion); its unconditional counterpart hu = q_y' E + q_d u. ``guidance_scale``: the g
    column (default 1); ``guidance_affine``: [rows, 2] (g0, g1) for a per-sample scale
    (default (0, 1): g_b = s_b). ``check_finite=False`` leaves non-finite coefficients for the
    caller to report."""
    K = int(num_slots)
    T = np.zeros((len(rows), table_width(K)), dtype=np.float64)
    T[:, COL_G] = 1.0 if guidance_scale is None else guidance_scale
    if guidance_affine is None:
        T[:, COL_G1] = 1.0
    else:
        T[:, [COL_G0, COL_G1]] = np.asarray(guidance_affine, dtype=np.float64).reshape(len(rows), 2)
    T[:, col_s_in(K)] = 1.0 if s_in is None else s_in
    if x0_coefs is not None and len(x0_coefs) != len(rows):
        raise ValueError(f"x0_coefs needs one (A_x, A_d) per row: {len(x0_coefs)} for {len(rows)} rows")
    for i, r in enumerate(rows):
        if r.needs_model:
            if x0_coefs is None:
                A_x, A_d = x0_coefficients(prediction, r.point.alpha, r.point.sigma)
            else:
                A_x, A_d = x0_coefs[i]
            T[i, COL_QY] = r.q_y + r.q_x0 * float(A_x)
            T[i, COL_QD] = r.q_x0 * float(A_d)
            if check_finite and not (np.isfinite(T[i, COL_QY]) and np.isfinite(T[i, COL_QD])):
                raise ValueError(f"prediction {prediction!r} cannot be converted at step {r.step} "
                                 f"(alpha={r.point.alpha}, sigma={r.point.sigma})")
        for which, out in (("x", r.out_x), ("y", r.out_y)) + r.writes:
            if isinstance(which, int) and which >= K:
                raise ValueError(f"history slot {which} out of range for {K} slots")
            if out is not None:
                _block(T, i, col_out(K, which), K, out)
    if check_finite and not np.all(np.isfinite(T)):
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(T))[:, 0]})
        raise ValueError(f"non-finite coefficients in rows {bad[:10]} (a degenerate grid or schedule?)")
    return Program(rows=list(rows), num_slots=K, table=T, steps=steps)
