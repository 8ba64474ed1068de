"""``compile_program``: fold the model's parameterization and the guidance scale into a solver's
rows and lay out the float64 table (columns: fastdiff.program.layout)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from ..parameterization import x0_coefficients
from .layout import COL_G, COL_QD, COL_QY, OUT_FIXED, OUT_H, OUT_X, OUT_Y, OUT_Z, col_out, col_s_in, table_width
from .rows import Program, Row


def guidance_column(rows: List[Row], scale_at) -> np.ndarray:
    """The per-row CFG scale g (D = u + g (c - u)); ``scale_at(point) -> g`` or None (g = 1)."""
    g = np.ones(len(rows))
    if scale_at is not None:
        for i, r in enumerate(rows):
            if r.needs_model:
                g[i] = scale_at(r.point)
    return g


def compile_program(rows: List[Row], prediction: str, num_slots: int, steps: int,
                    guidance_scale: Optional[np.ndarray] = None, s_in=None) -> Program:
    """Fold the parameterization into the solver's rows and lay out the float64 table."""
    K = int(num_slots)
    T = np.zeros((len(rows), table_width(K)), dtype=np.float64)
    T[:, COL_G] = 1.0 if guidance_scale is None else guidance_scale
    T[:, col_s_in(K)] = 1.0 if s_in is None else s_in
    for i, r in enumerate(rows):
        if r.needs_model:
            A_x, A_d = x0_coefficients(prediction, r.point.alpha, r.point.sigma)
            T[i, COL_QY] = r.q_y + r.q_x0 * float(A_x)
            T[i, COL_QD] = r.q_x0 * float(A_d)
            if not (np.isfinite(T[i, COL_QY]) and np.isfinite(T[i, COL_QD])):
                raise ValueError(f"prediction {prediction!r} cannot be converted at step {r.step} "
                                 f"(alpha={r.point.alpha}, sigma={r.point.sigma})")
        for which, out in (("x", r.out_x), ("y", r.out_y)):
            if out is None:
                continue
            c = col_out(K, which)
            T[i, c + OUT_X], T[i, c + OUT_Y], T[i, c + OUT_H], T[i, c + OUT_Z] = out.x, out.y, out.h, out.z
            for j, b in out.hist:
                if not 0 <= j < K:
                    raise ValueError(f"history slot {j} out of range for {K} slots")
                T[i, c + OUT_FIXED + j] += b
        if r.hist_write >= K:
            raise ValueError(f"history slot {r.hist_write} out of range for {K} slots")
    if not np.all(np.isfinite(T)):
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(T))[:, 0]})
        raise ValueError(f"non-finite coefficients in rows {bad[:10]} (a degenerate grid or schedule?)")
    return Program(rows=list(rows), num_slots=K, table=T, steps=steps)
