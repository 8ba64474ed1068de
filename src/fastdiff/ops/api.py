"""The thin kernel API: validated public ops over interchangeable backends (re-exported by fastdiff.ops).

``fused_step`` executes one row of a coefficient program (see fastdiff.program) in place;
``cfg_combine`` and ``philox_normal`` are the standalone pieces. Every op checks its inputs here,
at the Python edge, and raises ValueError/TypeError naming the tensor and the expectation;
backends receive only valid arguments. The sampler validates once per run and then calls
``prepare_fused_step(...)`` 's returned callable each step, skipping the per-call checks.

Dependencies run one way: fastdiff.program.layout < fastdiff.reference (the oracles) <
fastdiff.ops.backends (registry and dispatch) < this module < fastdiff.ops.custom_ops (the torch
custom ops, whose implementations call these functions). ``cfg_combine`` with an input that
requires grad calls the registered ``torch.ops.fastdiff.cfg_combine`` by name (it carries the
backward), which the package ``fastdiff.ops`` registers on import.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..program.layout import (FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y, FLAG_WRITE_X, FLAG_WRITE_Y, flags_error,
                              hist_writes_error, pack_flags, table_width, unknown_flag_bits)
from .backends import BACKENDS, select

__all__ = ["fused_step", "prepare_fused_step", "cfg_combine", "guidance_scale_to_g", "philox_normal",
           "as_int", "as_bool", "as_real"]

_STATE_DTYPES = (torch.float32, torch.float64)
_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Scalar arguments: Python and numpy integers wherever an int is taken, never bool or float.

def as_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``v`` as a Python int (Python or numpy integer; bools and floats raise TypeError), in
    [lo, hi) if given (else ValueError)."""
    if type(v) is not int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        rng = f"[{lo}, {'2**' + str(hi.bit_length() - 1) if hi and hi >= 2 ** 16 else hi})"
        raise ValueError(f"{name} must be an int in {rng}, got {v}")
    return v


def as_bool(name: str, v) -> bool:
    if v is True or v is False:
        return v
    if not isinstance(v, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")
    return bool(v)


def as_real(name: str, v, *, finite: bool = True) -> float:
    """``v`` as a float (Python or numpy int/float; bools, strings and tensors raise TypeError);
    NaN and +-Inf raise ValueError when ``finite``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_no_grad(op: str, named) -> None:
    """The fused ops have no backward (they write in place): never return a wrong gradient."""
    if torch.is_grad_enabled():
        for name, t in named:
            if t is not None and t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but this op has no backward (it writes its outputs "
                                 "in place); detach it or run under torch.no_grad()")


def _span(t: torch.Tensor):
    """(storage address, first byte, one past the last byte) that ``t`` can touch, or None if empty."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return t.untyped_storage().data_ptr(), lo, lo + (extent + 1) * t.element_size()


def _check_overlap(written, read=()) -> None:
    """Raise if a tensor written in place shares memory with any other argument. Reads of an
    exact alias of x or y (same address, shape, strides, dtype: a model returning its input) are
    allowed: every backend reads an element before it writes that element."""
    named = [(n, t, True) for n, t in written if t is not None] + [(n, t, False) for n, t in read if t is not None]
    storages = [t.untyped_storage().data_ptr() for _, t, _ in named]
    if len(set(storages)) == len(storages):       # the usual case: no two arguments share memory
        return
    spans = [(n, t, _span(t), w) for n, t, w in named]
    for i, (nw, tw, sw, w) in enumerate(spans):
        if not w or sw is None:
            continue
        for no, to, so, wo in spans[i + 1:]:
            if so is None or so[0] != sw[0] or so[1] >= sw[2] or sw[1] >= so[2]:
                continue
            if (not wo and nw in ("x", "y") and to.data_ptr() == tw.data_ptr() and to.shape == tw.shape
                    and to.stride() == tw.stride() and to.dtype == tw.dtype):
                continue
            raise ValueError(f"{nw} and {no} overlap in memory; {nw} is written in place, so they must be "
                             "separate buffers")


def _check_finite_table(table: torch.Tensor, row: Optional[int] = None) -> None:
    # (A row is a few dozen values: a host list is cheaper than a tensor reduction.)
    ok = bool(torch.isfinite(table).all()) if row is None else all(map(math.isfinite, table[row].tolist()))
    if not ok:
        where = "the table" if row is None else f"table row {row}"
        raise ValueError(f"{where} has NaN/Inf coefficients (they would be written into x)")


def _check_tensor(name, t, *, shape=None, dtypes=None, device=None, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_writable(name, t):
    # An in-place output must not overlap itself (expanded/broadcast views would race).
    if t.numel() > 1 and any(s == 0 for s, n in zip(t.stride(), t.shape) if n > 1):
        raise ValueError(f"{name} is written in place and must not be a broadcast (stride-0) view")


def _check_guidance(guidance, x) -> None:
    """The per-sample guidance scale vector: a finite float32/float64 tensor [B] on x's device."""
    _check_tensor("guidance (per-sample scale vector)", guidance, dtypes=(torch.float32, torch.float64))
    B = x.shape[0]
    if tuple(guidance.shape) != (B,):
        raise ValueError(f"guidance (per-sample scale vector) must have shape [{B}] (one scale per sample), "
                         f"got {tuple(guidance.shape)}")
    if guidance.device != x.device and not (guidance.device.type == x.device.type == "cpu"):
        raise ValueError(f"guidance (per-sample scale vector) must be on {x.device}, got {guidance.device}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(guidance).all()):
        raise ValueError("guidance (per-sample scale vector) contains NaN or Inf")


def _validate_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
                   bad_row, guidance=None):
    """The fused step's arguments (fastdiff.program.layout.STEP_ARGS' order), checked; returns them
    with the scalars as Python ints. Raises ValueError/TypeError before anything is written."""
    _check_tensor("x", x, dtypes=_STATE_DTYPES)
    dev, shape = x.device, tuple(x.shape)
    if dev.type == "meta":
        raise ValueError("x is on the meta device (it has no values); fused_step runs on cpu or GPU tensors")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    _check_tensor("table", table, dtype=torch.float64, device=None)
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, columns], got shape {tuple(table.shape)}")
    if table.device != dev and not (table.device.type == "cpu" and dev.type == "cpu"):
        raise ValueError(f"table must be on {dev} (the kernels read it there), got {table.device}")
    row = as_int("row", row, 0, table.shape[0])
    hist_writes = as_int("hist_writes", hist_writes)
    flags = as_int("flags", flags)
    if unknown_flag_bits(flags):
        raise ValueError(flags_error(flags))
    eval_y, write_x, write_y = bool(flags & FLAG_EVAL_Y), bool(flags & FLAG_WRITE_X), bool(flags & FLAG_WRITE_Y)
    model_in_from_y = bool(flags & FLAG_MODEL_IN_FROM_Y)
    seed = as_int("seed", seed, 0, 2 ** 64)
    noise_id = as_int("noise_id", noise_id, -1, 2 ** 32)
    K = 0
    if hist is not None:
        _check_tensor("hist", hist, dtype=x.dtype, device=dev)
        if tuple(hist.shape[1:]) != shape:
            raise ValueError(f"hist must have shape [K, {', '.join(map(str, shape))}], got {tuple(hist.shape)}")
        K = hist.shape[0]
        _check_writable("hist", hist)
    if table.shape[1] != table_width(K):
        raise ValueError(f"table has {table.shape[1]} columns; {K} history slots need {table_width(K)}")
    if not 0 <= hist_writes < (1 << K):
        raise ValueError(hist_writes_error(hist_writes, K))
    if y is not None:
        _check_tensor("y", y, shape=shape, dtype=x.dtype, device=dev)
        _check_writable("y", y)
        if not torch.compiler.is_compiling() and y.data_ptr() == x.data_ptr():   # (traced: checked when the op runs)
            raise ValueError("y must be a different buffer from x (pass y=None to evaluate at x)")
    if (eval_y or write_y or model_in_from_y) and y is None:
        raise ValueError("this row reads or writes y, but y is None")
    if not (write_x or write_y):
        raise ValueError("a row must write x or y")
    if cond is not None:
        _check_tensor("model output (cond)", cond, shape=shape, dtypes=_MODEL_DTYPES, device=dev)
    if uncond is not None:
        if cond is None:
            raise ValueError("uncond given without cond")
        _check_tensor("model output (uncond)", uncond, shape=shape, dtype=cond.dtype, device=dev)
    if noise is not None:
        _check_tensor("noise", noise, shape=shape, dtypes=_MODEL_DTYPES, device=dev)
    if model_in is not None:
        _check_tensor("model_in", model_in, dtypes=_MODEL_DTYPES, device=dev)
        B = shape[0]
        if tuple(model_in.shape[1:]) != shape[1:] or model_in.shape[0] not in (B, 2 * B):
            raise ValueError(f"model_in must have shape [{B} or {2 * B}, {', '.join(map(str, shape[1:]))}], "
                             f"got {tuple(model_in.shape)}")
        _check_writable("model_in", model_in)
        if not (write_y if model_in_from_y else write_x):
            which = "y" if model_in_from_y else "x"
            raise ValueError(f"model_in_from_{which} needs a row that writes {which} (the epilogue copies "
                             f"the new {which} into model_in)")
    if bad_row is not None:
        _check_tensor("bad_row", bad_row, shape=(1,), dtype=torch.int32, device=dev)
    if guidance is not None:
        _check_guidance(guidance, x)
    _check_writable("x", x)
    if not torch.compiler.is_compiling():   # (traced: checked when the op runs)
        _check_overlap((("x", x), ("y", y), ("hist", hist), ("model_in", model_in), ("bad_row", bad_row)),
                       (("cond", cond), ("uncond", uncond), ("noise", noise), ("table", table),
                        ("guidance", guidance)))
        _check_finite_table(table, row)
    return table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in, bad_row, guidance


def prepare_fused_step(x, *, table, y=None, cond_like=None, hist=None, noise_like=None,
                       model_in=None, guidance=None, backend: str = "auto") -> Callable:
    """Choose the backend once for a sampling run; returns its raw ``fused_step``: arguments in the
    order of fastdiff.program.layout.STEP_ARGS (the row booleans as one ``flags`` bitmask, see
    ``pack_flags``), unchecked: the buffers given here are checked once, here; the per-sample
    ``guidance`` vector, if the run uses one, is the last positional argument."""
    _check_tensor("x", x, dtypes=_STATE_DTYPES)
    if x.device.type == "meta":
        raise ValueError("x is on the meta device (it has no values); fused_step runs on cpu or GPU tensors")
    _check_tensor("table", table, dtype=torch.float64)
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, columns], got shape {tuple(table.shape)}")
    for name, t in (("y", y), ("hist", hist), ("model_in", model_in)):
        if t is not None:
            _check_tensor(name, t)
            _check_writable(name, t)
    _check_writable("x", x)
    if guidance is not None:
        _check_guidance(guidance, x)
    if not torch.compiler.is_compiling():
        _check_no_grad("fastdiff.ops.prepare_fused_step", (("x", x), ("y", y), ("hist", hist),
                                                           ("model_in", model_in), ("table", table)))
        _check_overlap((("x", x), ("y", y), ("hist", hist), ("model_in", model_in)), (("table", table),))
        _check_finite_table(table)
    tensors = [t for t in (x, table, y, cond_like, hist, noise_like, model_in, guidance) if t is not None]
    return select("fused_step", backend, tensors, state_dtype=x.dtype).fused_step


def fused_step(table: torch.Tensor, row: int, x: torch.Tensor, *, y: Optional[torch.Tensor] = None,
               cond: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
               hist: Optional[torch.Tensor] = None, hist_writes: Optional[int] = None, eval_y: bool = False,
               write_x: bool = True, write_y: bool = False,
               noise: Optional[torch.Tensor] = None, seed: int = 0, noise_id: int = -1,
               model_in: Optional[torch.Tensor] = None, model_in_from_y: bool = False,
               bad_row: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None,
               backend: str = "auto", hist_write: int = -1) -> None:
    """Execute row ``row`` of a coefficient table, in place on x / y / hist / model_in.
    Differentiable (on the reference backend) when an input requires grad in grad mode.

    cond/uncond: model outputs (the two CFG halves; uncond=None means no CFG; cond=None: the row
    does not use the model). noise: explicit noise, else (seed, noise_id >= 0) draws Philox noise
    in the kernel. model_in: if given, receives s_in * (new x or new y), cast to its dtype, in one
    or both CFG halves. guidance: optional per-sample scale vector [B] (float32/float64): sample b
    then uses g = g0 + g1 * guidance[b] (table columns COL_G0, COL_G1) instead of the g column.
    See fastdiff.program for the formula. The four booleans are the row's flags: every backend
    takes them as one bitmask (fastdiff.program.layout.pack_flags). History: ``hist_write`` writes
    one slot (-1: none); ``hist_writes``, a bitmask of slots (fastdiff.program.layout.hist_mask),
    writes several in the same pass (each from its own out block); give one or the other.
    """
    flags = pack_flags(as_bool("eval_y", eval_y), as_bool("write_x", write_x), as_bool("write_y", write_y),
                       as_bool("model_in_from_y", model_in_from_y))
    hist_write = as_int("hist_write", hist_write)
    if hist_writes is None:
        K = 0 if not isinstance(hist, torch.Tensor) or hist.dim() < 1 else hist.shape[0]
        if not -1 <= hist_write < K:
            raise ValueError(f"hist_write must be -1 or a slot in [0, {K}), got {hist_write}")
        hist_writes = 0 if hist_write < 0 else 1 << hist_write
    elif hist_write != -1:
        raise ValueError(f"give hist_write (one slot) or hist_writes (a bitmask of slots), not both; got "
                         f"hist_write={hist_write}, hist_writes={hist_writes}")
    _fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in, bad_row,
                guidance, backend)


def _fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in, bad_row,
                guidance=None, backend: str = "auto") -> None:
    """``fused_step`` with the backends' arguments (STEP_ARGS: the row flags and the written history
    slots as bitmasks), validated; what the ``fastdiff::fused_step`` custom op runs."""
    args = _validate_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
                          bad_row, guidance)
    if not torch.compiler.is_compiling() and _needs_grad(x, y, cond, uncond, hist, noise, model_in, table):
        _reference_with_autograd(backend, args)
        return
    tensors = [t for t in (x, table, y, cond, uncond, hist, noise, model_in, guidance) if t is not None]
    select("fused_step", backend, tensors, state_dtype=x.dtype).fused_step(*args)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _reference_with_autograd(backend: str, args) -> None:
    """fused_step where autograd must see it: the reference backend's plain PyTorch math, which
    autograd differentiates (its in-place writes are copies autograd records), so the gradient
    with respect to x, y, cond, uncond, hist and noise is the transposed row. The compiled
    backends have no backward: asking for one by name raises."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"fastdiff.ops.fused_step: an input requires grad, and only the reference backend "
                         f"differentiates (got backend={backend!r}); pass backend='auto' or 'reference', or "
                         "detach the inputs / run under torch.no_grad()")
    table, _, x, y, _, _, hist, _, _, _, _, _, model_in, _, _ = args
    if table.requires_grad:
        raise ValueError("fastdiff.ops.fused_step: table requires grad, but the coefficients are not "
                         "differentiable; detach it")
    for name, t in (("x", x), ("y", y), ("hist", hist), ("model_in", model_in)):
        if t is None:
            continue
        base = t if t._base is None else t._base
        if base.requires_grad and base.is_leaf:
            raise ValueError(f"fastdiff.ops.fused_step: {name} is written in place but is a leaf tensor that "
                             f"requires grad (or a view of one); pass a clone ({name}.clone()) to differentiate")
    BACKENDS["reference"].fused_step(*args)


def cfg_combine(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float, *,
                convention: str = "w", backend: str = "auto") -> torch.Tensor:
    """Classifier-free guidance, out of place. ``convention='w'``: uncond + w (cond - uncond);
    ``'1+w'``: (1 + w) cond - w uncond (Imagen / the CFG paper's w). Differentiable in cond and
    uncond (the backward is g * grad and (1 - g) * grad)."""
    _check_tensor("cond", cond, dtypes=_MODEL_DTYPES)
    if uncond is not None:
        _check_tensor("uncond", uncond, shape=cond.shape, dtype=cond.dtype, device=cond.device)
    g = guidance_scale_to_g(scale, convention)
    if torch.is_grad_enabled() and (cond.requires_grad or (uncond is not None and uncond.requires_grad)):
        # The registered custom op carries the autograd formula (fastdiff.ops.custom_ops).
        return torch.ops.fastdiff.cfg_combine(cond, uncond, g, None, backend)
    tensors = [t for t in (cond, uncond) if t is not None]
    return select("cfg_combine", backend, tensors).cfg_combine(cond, uncond, g)


def guidance_scale_to_g(scale: float, convention: str = "w") -> float:
    """Both CFG conventions as the g of D = uncond + g (cond - uncond)."""
    if convention not in ("w", "1+w"):
        raise ValueError(f"unknown CFG convention {convention!r}; expected 'w' or '1+w'")
    scale = as_real("guidance scale", scale)
    return scale if convention == "w" else 1.0 + scale


def _shape_arg(shape) -> tuple:
    """A shape as a tuple of Python ints: an int, or a sequence (tuple, list, torch.Size, 1-D
    integer array) of ints; numpy integers accepted, bools and floats rejected."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    elif isinstance(shape, np.ndarray) and shape.ndim == 1:
        shape = tuple(shape.tolist()) if np.issubdtype(shape.dtype, np.integer) else tuple(shape)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__} {shape!r}")
    out = []
    for s in shape:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"shape must contain ints, got {type(s).__name__} {s!r} in {tuple(shape)!r}")
        if s < 0:
            raise ValueError(f"shape must be non-negative, got {tuple(int(v) for v in shape)}")
        out.append(int(s))
    return tuple(out)


def philox_normal(shape, seed: int, noise_id: int = 0, *, device="cpu", backend: str = "auto") -> torch.Tensor:
    """Counter-based standard normal noise (float32); see fastdiff.reference.philox for the stream.
    ``shape`` an int or a sequence of ints, as torch.empty takes."""
    shape = _shape_arg(shape)
    seed = as_int("seed", seed, 0, 2 ** 64)
    noise_id = as_int("noise_id", noise_id, 0, 2 ** 32)
    probe = torch.empty(0, device=device)
    return select("philox_normal", backend, [probe]).philox_normal(shape, seed, noise_id, torch.device(device))
