"""Coefficient programs: what a solver computes once, in float64, and a fused kernel executes.

A program is a list of rows. Each row is one pass over the tensors (one kernel launch):

    D     = uncond + g * (cond - uncond)          CFG, folded in (D = cond without CFG)
    h     = q_y * E + q_d * D                     E: the point the model was evaluated at
    x'    = ax_x*x + ax_y*E + ax_h*h + ax_z*z + sum_j ax_j * H[j]      (if the row writes x)
    y'    = ay_x*x + ay_y*E + ay_h*h + ay_z*z + sum_j ay_j * H[j]      (if the row writes y)
    H[w]  = h                                     (if the row writes history slot w)
    model_in = s_in * (x' or y')  cast to the model dtype, into one or both CFG halves

``x`` is the solver state (the sample, in the schedule's native space x = alpha*x0 + sigma*eps),
``y`` a second buffer for the evaluation points of multi-stage methods (Heun, RK4, DPM-2, UniPC's
predicted sample), ``H`` a stack of history slots (previous model outputs or stage derivatives,
already converted to what the solver needs), ``z`` standard Gaussian noise.

Solvers describe ``h`` in terms of x0 (``h = q_y*E + q_x0*x0``); ``compile_program`` folds in
the model's parameterization (x0 = A_x*E + A_d*D) and the guidance scale, producing the
float64 table the kernels read. Static facts of a row (which buffers it reads and writes,
whether it needs the model, which noise draw it uses) stay on the host as ``Row`` fields, so
the sampling loop never reads device memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .parameterization import x0_coefficients

# Column layout of the coefficient table. K = number of history slots.
COL_G, COL_QY, COL_QD = 0, 1, 2
OUT_BASE = 3                      # out block: [x, y, h, z, H_0 .. H_{K-1}]
OUT_X, OUT_Y, OUT_H, OUT_Z = 0, 1, 2, 3
OUT_FIXED = 4


def out_width(K: int) -> int:
    return OUT_FIXED + K


def table_width(K: int) -> int:
    return OUT_BASE + 2 * out_width(K) + 1


def col_out(K: int, which: str) -> int:
    """First column of the x-output block ('x') or the y-output block ('y')."""
    return OUT_BASE if which == "x" else OUT_BASE + out_width(K)


def col_s_in(K: int) -> int:
    return table_width(K) - 1


@dataclass(frozen=True)
class Out:
    """Coefficients of one output: x_out = x*x + y*E + h*h + z*z + sum hist[j]*H[j]."""

    x: float = 0.0
    y: float = 0.0
    h: float = 0.0
    z: float = 0.0
    hist: Tuple[Tuple[int, float], ...] = ()

    @property
    def slots(self) -> Tuple[int, ...]:
        return tuple(j for j, _ in self.hist)


@dataclass(frozen=True)
class Point:
    """A point where the model is evaluated: schedule time, alpha, sigma, model time."""

    t: float
    alpha: float
    sigma: float
    model_t: float

    @property
    def ksigma(self) -> float:
        return self.sigma / self.alpha if self.alpha != 0 else float("inf")


@dataclass(frozen=True)
class Row:
    """One pass of the fused step (see the module docstring)."""

    step: int                              # the solver step this row belongs to (0-based)
    eval_at: str = "x"                     # E: the buffer ('x' or 'y') the model was evaluated at
    point: Optional[Point] = None          # where the model is evaluated; None: no model call
    q_y: float = 0.0                       # h = q_y * E + q_x0 * x0
    q_x0: float = 1.0
    out_x: Optional[Out] = None
    out_y: Optional[Out] = None
    hist_write: int = -1
    noise_id: int = -1                     # which Gaussian draw (same id -> same noise); -1: none
    next_eval: Optional[str] = None        # 'x'/'y': which output the next model call reads

    def __post_init__(self):
        if self.eval_at not in ("x", "y"):
            raise ValueError(f"eval_at must be 'x' or 'y', got {self.eval_at!r}")
        if self.out_x is None and self.out_y is None:
            raise ValueError("a row must write x or y")
        if self.next_eval not in ("x", "y", None):
            raise ValueError(f"next_eval must be 'x', 'y' or None, got {self.next_eval!r}")
        uses_z = any(o is not None and o.z != 0.0 for o in (self.out_x, self.out_y))
        if uses_z and self.noise_id < 0:
            raise ValueError("a row with a noise coefficient needs a noise_id")


    @property
    def needs_model(self) -> bool:
        return self.point is not None


@dataclass
class Program:
    """A compiled coefficient program: static rows plus the float64 table the kernel reads."""

    rows: List[Row]
    num_slots: int
    table: np.ndarray                       # [len(rows), table_width(num_slots)] float64
    steps: int
    nfe: int = field(init=False)

    def __post_init__(self):
        self.nfe = sum(r.needs_model for r in self.rows)
        if self.table.shape != (len(self.rows), table_width(self.num_slots)):
            raise ValueError(f"table shape {self.table.shape} does not match {len(self.rows)} rows, "
                             f"{self.num_slots} slots")


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
