"""Coefficient programs: what a solver computes once, in float64, and a fused kernel executes.

A program is a list of rows. Each row is one pass over the tensors (one kernel launch). Every
output of a row is one linear combination of the same terms, with its own coefficients:

    D     = uncond + g * (cond - uncond)     CFG (g = 1: D = cond; g per sample with a scale vector)
    h     = q_y*E + q_d*D                    the solver's quantity from the guided output
    hu    = q_y*E + q_d*uncond               the same from the unconditional output (CFG++)
    out   = a_x*x + a_y*E + a_h*h + a_hu*hu + a_z*z + sum_j a_j * H[j]
            (cond coefficient a_h q_d g, uncond a_h q_d (1 - g) + a_hu q_d: independent;
             a history term with a_j = 0 is absent: the slot is not read)
    x'    = out_x(...)                       (if the row writes x)
    y'    = out_y(...)                       (if the row writes y)
    H[w]  = out_w(...)                       (for each history slot w the row writes: any set)
    model_in = s_in * (x' or y')  cast to the model dtype, into one or both CFG halves

``x`` is the solver state (the sample, in the schedule's native space x = alpha*x0 + sigma*eps),
``E`` the buffer the model was evaluated at (x or ``y``, a second buffer for the evaluation points
of multi-stage methods), ``H`` a stack of history slots (previous model outputs or stage
derivatives, already converted to what the solver needs), ``z`` standard Gaussian noise.

Solvers describe outputs in terms of h = q_y*E + q_x0*x0 (the guided prediction) and, for
CFG++, h_u (the same from the unconditional prediction): ``Out(x, y, h, z, hist, hu)``.
``compile_program`` folds in the model's parameterization (x0 = A_x*E + A_d*D) and the guidance
scale, producing the float64 table the kernels read. CFG is therefore only coefficients. Static
facts of a row (which buffers it reads and writes, whether it needs the model, which noise draw
it uses) stay on the host as ``Row`` fields, so the sampling loop never reads device memory.

Modules: ``layout`` (the row ABI: table columns and row flags, mirrored by csrc/program_layout.h),
``rows`` (Out, Point, Row, Program), ``compile`` (compile_program, guidance_column,
guidance_affine).
"""
from __future__ import annotations

from .layout import (COL_G, COL_G0, COL_G1, COL_QD, COL_QY, FLAG_ALL, FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y,  # noqa: F401
                     FLAG_WRITE_X, FLAG_WRITE_Y, OUT_BASE, OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z,
                     col_out, col_out_h, col_out_slot, col_out_x, col_out_y, col_s_in, hist_mask, mask_slots,
                     out_width, pack_flags, table_width, unpack_flags)
from .rows import Out, Point, Program, Row  # noqa: F401
from .compile import compile_program, guidance_affine, guidance_column  # noqa: F401
