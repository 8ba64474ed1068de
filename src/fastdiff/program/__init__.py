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

Modules: ``layout`` (the row ABI: table columns and row flags, mirrored by csrc/program_layout.h),
``rows`` (Out, Point, Row, Program), ``compile`` (compile_program, guidance_column).
"""
from __future__ import annotations

from .layout import (COL_G, COL_QD, COL_QY, FLAG_ALL, FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y, FLAG_WRITE_X,  # noqa: F401
                     FLAG_WRITE_Y, OUT_BASE, OUT_FIXED, OUT_H, OUT_X, OUT_Y, OUT_Z, col_out, col_out_x, col_out_y,
                     col_s_in, out_width, pack_flags, table_width, unpack_flags)
from .rows import Out, Point, Program, Row  # noqa: F401
from .compile import compile_program, guidance_column  # noqa: F401
