"""The row ABI: the column layout of the coefficient table and the row flags, declared once.

This module is the single Python declaration of what a fused kernel reads. Its mirror for C++
and CUDA is ``csrc/program_layout.h`` (same names, same values); ``tests/test_row_abi.py``
compiles the header against this module for several K and fails on any difference, and on any
literal column offset elsewhere in csrc/. The reference op (fastdiff/reference/step.py), the
Triton kernel (kernels/fused_step.py) and the table builder (fastdiff/program/compile.py) read
the names below; nobody else computes a column.

A table has one row per pass of the fused step (see fastdiff.program for the formula) and
``table_width(K)`` float64 columns, K being the number of history slots::

    [ g, g0, g1, q_y, q_d,  x-out block,  y-out block,  h-out block of slot 0 .. of slot K-1,  s_in ]
    an out block:  [ x, y, h, hu, z, H_0 .. H_{K-1} ]     (out_width(K) = 5 + K columns)

The model terms of a row: D = u + g (c - u) (the guided output; g == 1 means D = c exactly, a
run without the uncond pass), h = q_y E + q_d D (the solver's quantity, e.g. x0 or eps, from
the guided output) and hu = q_y E + q_d u (the same from the unconditional output: CFG++).
Every output of a row (new x, new y, and the value written to each history slot the row writes)
is one out block: a_x x + a_y E + a_h h + a_hu hu + a_z z + sum_j a_j H_j. Its coefficients of
cond and uncond are independent: a_h q_d g and a_h q_d (1 - g) + a_hu q_d (any pair, for
g != 0). D and h stay intermediates so that CFG keeps its precision (c - u is formed before it
is scaled) and a solver's quantity is rounded as its textbook form rounds it. g is column
``COL_G``; with a per-sample scale vector s (one float per batch element), sample b uses
g_b = g0 + g1 * s_b (``COL_G0``, ``COL_G1``: (0, 1) where CFG is on, (1, 0) outside a
guidance interval). Without uncond, u = c; without cond (no model call) h = hu = 0.

History slots: a row writes any set of slots, given as one bitmask ``hist_writes`` (bit j: slot j
gets the value of its own out block, ``col_out_slot(K, j)``; 0: no write), so one pass can keep
two quantities (a multistep solver's x0 and its derivative, or the state and a value handed back
to the caller). A history term whose coefficient is zero is absent, not 0 * H_j: a row reads only
the slots it uses, so a slot that holds nothing yet (uninitialized memory, NaN) or a buffer the
row only writes costs no bandwidth and cannot poison the result. (Every other term is evaluated
as written: 0 * inf is NaN there, as in the textbook formula.) Every read of a row happens before
any of its writes.

Row flags: the booleans of one row, as one bitmask (``Row.flags``), and so one ``flags`` argument of
every backend's fused step (a new flag changes no signature). Each backend decodes it with the names
below (C/C++: program_layout.h's) and rejects unknown bits with a ValueError before writing anything.
The public keyword API (``fastdiff.ops.fused_step(..., eval_y=, write_x=, write_y=, model_in_from_y=)``)
packs its booleans with ``pack_flags``.

The fused step's argument list (``STEP_ARGS``, and the custom-op schema built from it) is declared
here too; tests/test_row_abi.py checks every backend's signature against it.

Pure Python, no imports: a kernel module can import it without loading the rest of fastdiff.
"""
from __future__ import annotations

__all__ = [
    "COL_G", "COL_G0", "COL_G1", "COL_QY", "COL_QD", "OUT_BASE", "OUT_X", "OUT_Y", "OUT_H", "OUT_HU", "OUT_Z",
    "OUT_FIXED", "out_width", "table_width", "col_out_x", "col_out_y", "col_out_h", "col_out_slot", "col_s_in", "col_out",
    "hist_mask", "mask_slots", "hist_writes_error",
    "FLAG_EVAL_Y", "FLAG_WRITE_X", "FLAG_WRITE_Y", "FLAG_MODEL_IN_FROM_Y", "FLAG_ALL",
    "pack_flags", "unpack_flags", "unknown_flag_bits", "flags_error", "STEP_ARGS", "STEP_ARG_NAMES", "FLAG_ARG_NAMES",
    "step_schema",
    "CONSTANTS", "FUNCTIONS",
]

# ---- table columns --------------------------------------------------------------------------
COL_G = 0          # CFG scale g of D = uncond + g (cond - uncond) (no per-sample scale given)
COL_G0 = 1         # with a per-sample scale s_b: g_b = g0 + g1 * s_b
COL_G1 = 2
COL_QY = 3         # h = q_y E + q_d D,  hu = q_y E + q_d u
COL_QD = 4
OUT_BASE = 5       # first column of the x-out block; the y-out and the K h-out blocks follow it
# offsets inside an out block
OUT_X = 0          # the state x
OUT_Y = 1          # E, the point the model was evaluated at (x or y)
OUT_H = 2          # h (from the guided output D)
OUT_HU = 3         # hu (from the unconditional output u)
OUT_Z = 4          # noise
OUT_FIXED = 5      # the history coefficients H_0 .. H_{K-1} start here


def out_width(K: int) -> int:
    """Columns of one out block."""
    return OUT_FIXED + K


def table_width(K: int) -> int:
    """Columns of a table with K history slots."""
    return OUT_BASE + (2 + K) * out_width(K) + 1


def col_out_x(K: int) -> int:
    """First column of the x-out block."""
    return OUT_BASE


def col_out_y(K: int) -> int:
    """First column of the y-out block."""
    return OUT_BASE + out_width(K)


def col_out_h(K: int) -> int:
    """First column of the h-out blocks: the block of history slot 0 (slot j's: col_out_slot)."""
    return OUT_BASE + 2 * out_width(K)


def col_out_slot(K: int, j: int) -> int:
    """First column of the out block of history slot j: the value a row writing slot j stores."""
    return col_out_h(K) + j * out_width(K)


def col_s_in(K: int) -> int:
    """The model-input scale s_in: the last column."""
    return OUT_BASE + (2 + K) * out_width(K)


def col_out(K: int, which) -> int:
    """First column of the x-out ('x') or y-out ('y') block, or of history slot ``which`` (an
    int; 'h' is slot 0)."""
    if which == "x":
        return col_out_x(K)
    if which == "y":
        return col_out_y(K)
    if which == "h":
        return col_out_h(K)
    if isinstance(which, int) and not isinstance(which, bool) and 0 <= which < K:
        return col_out_slot(K, which)
    raise ValueError(f"which must be 'x', 'y', 'h' or a history slot in [0, {K}), got {which!r}")


# ---- history writes -------------------------------------------------------------------------
def hist_mask(slots) -> int:
    """The ``hist_writes`` bitmask of an iterable of slot indices (bit j: slot j is written)."""
    m = 0
    for j in slots:
        m |= 1 << int(j)
    return m


def mask_slots(mask: int):
    """The slots a ``hist_writes`` mask writes, ascending."""
    return tuple(j for j in range(max(mask, 0).bit_length()) if mask >> j & 1)


def hist_writes_error(mask: int, K: int) -> str:
    """The message every backend raises (ValueError) for a mask naming a slot outside [0, K)."""
    return (f"hist_writes must be a bitmask of history slots in [0, {K}) (0: no write; 0 <= hist_writes < "
            f"{1 << K}), got {mask}")


# ---- row flags ------------------------------------------------------------------------------
FLAG_EVAL_Y = 1 << 0           # E (the point the model was evaluated at) is y, else x
FLAG_WRITE_X = 1 << 1          # the row writes x
FLAG_WRITE_Y = 1 << 2          # the row writes y
FLAG_MODEL_IN_FROM_Y = 1 << 3  # the next model input is s_in * new y, else s_in * new x
FLAG_ALL = FLAG_EVAL_Y | FLAG_WRITE_X | FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y


def pack_flags(eval_y: bool, write_x: bool, write_y: bool, model_in_from_y: bool = False) -> int:
    """The bitmask of the four row booleans (FLAG_ARG_NAMES' order)."""
    return ((FLAG_EVAL_Y if eval_y else 0) | (FLAG_WRITE_X if write_x else 0)
            | (FLAG_WRITE_Y if write_y else 0) | (FLAG_MODEL_IN_FROM_Y if model_in_from_y else 0))


def unknown_flag_bits(flags: int) -> int:
    """The bits of ``flags`` that name no row flag (0 if none; a negative int has unknown bits)."""
    return flags & ~FLAG_ALL


def flags_error(flags: int) -> str:
    """The message every backend raises (ValueError) for a flags argument with unknown bits."""
    return (f"flags has unknown row flag bits {unknown_flag_bits(flags) & (2 ** 64 - 1):#x} (got {flags}; the row "
            f"flags are FLAG_EVAL_Y | FLAG_WRITE_X | FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y = {FLAG_ALL:#x})")


def unpack_flags(flags: int):
    """(eval_y, write_x, write_y, model_in_from_y), FLAG_ARG_NAMES' order; unknown bits: ValueError."""
    if unknown_flag_bits(flags):
        raise ValueError(flags_error(flags))
    return (bool(flags & FLAG_EVAL_Y), bool(flags & FLAG_WRITE_X), bool(flags & FLAG_WRITE_Y),
            bool(flags & FLAG_MODEL_IN_FROM_Y))


# ---- the fused step's arguments -------------------------------------------------------------
# Every backend's fused_step takes these, in this order (fastdiff.reference.fused_step is the
# spec); the type is the torch custom-op schema's, with the buffers the step writes in place marked
# (a!)..(e!). ``flags`` is the row's bitmask (FLAG_* above); ``hist_writes`` the bitmask of the
# history slots it writes (hist_mask). ``guidance`` (last, optional everywhere,
# default None) is the per-sample scale vector s [B] (float32/float64).
STEP_ARGS = (
    ("table", "Tensor"), ("row", "int"), ("x", "Tensor(a!)"), ("y", "Tensor(b!)?"), ("cond", "Tensor?"),
    ("uncond", "Tensor?"), ("hist", "Tensor(c!)?"), ("hist_writes", "int"), ("flags", "int"), ("noise", "Tensor?"),
    ("seed", "int"), ("noise_id", "int"), ("model_in", "Tensor(d!)?"), ("bad_row", "Tensor(e!)?"),
    ("guidance", "Tensor?"),
)
STEP_ARG_NAMES = tuple(name for name, _ in STEP_ARGS)
# The booleans packed into ``flags`` (pack_flags / unpack_flags' order): the keyword arguments of the
# public fastdiff.ops.fused_step, which no backend takes.
FLAG_ARG_NAMES = ("eval_y", "write_x", "write_y", "model_in_from_y")


def step_schema(name: str = "fused_step") -> str:
    """The torch.library schema of the fused step (fastdiff.ops.custom_ops), backend name last."""
    args = ', '.join(f'{t} {n}' + ('=None' if n == "guidance" else '') for n, t in STEP_ARGS)
    return f"{name}({args}, str backend='auto') -> ()"


# What the C/C++ mirror must declare (tests/test_row_abi.py): constants by value, functions of K.
CONSTANTS = {name: globals()[name] for name in (
    "COL_G", "COL_G0", "COL_G1", "COL_QY", "COL_QD", "OUT_BASE", "OUT_X", "OUT_Y", "OUT_H", "OUT_HU", "OUT_Z",
    "OUT_FIXED", "FLAG_EVAL_Y", "FLAG_WRITE_X", "FLAG_WRITE_Y", "FLAG_MODEL_IN_FROM_Y", "FLAG_ALL")}
FUNCTIONS = {f.__name__: f for f in (out_width, table_width, col_out_x, col_out_y, col_out_h, col_s_in)}
# (col_out_slot(K, j) = col_out_h(K) + j * out_width(K) in both: checked through col_out_h.)
