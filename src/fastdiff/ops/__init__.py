"""The thin kernel API: validated public ops over interchangeable backends.

``fused_step`` executes one row of a coefficient program (see fastdiff.program) in place;
``cfg_combine`` and ``philox_normal`` are the standalone pieces. Every op checks its inputs here,
at the Python edge, and raises ValueError/TypeError naming the tensor and the expectation;
backends receive only valid arguments. The sampler validates once per run and then calls
``prepare_fused_step(...)`` 's returned callable each step, skipping the per-call checks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..program import table_width
from .backends import BACKENDS, available_backends, register_backend, select  # noqa: F401
from . import triton_backend  # noqa: F401,E402  (registers the "triton" backend; triton is imported lazily)
from . import cuda_backend  # noqa: F401,E402  (registers the "cuda" backend; fastdiff._cuda is imported lazily)

__all__ = ["fused_step", "prepare_fused_step", "cfg_combine", "philox_normal", "available_backends",
           "BACKENDS", "select"]

_STATE_DTYPES = (torch.float32, torch.float64)
_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def _validate_step(table, row, x, y, cond, uncond, hist, hist_write, eval_y, write_x, write_y,
                   noise, seed, noise_id, model_in, model_in_from_y, bad_row):
    _check_tensor("x", x, dtypes=_STATE_DTYPES)
    dev, shape = x.device, tuple(x.shape)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    _check_tensor("table", table, dtype=torch.float64, device=None)
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, columns], got shape {tuple(table.shape)}")
    if table.device != dev and not (table.device.type == "cpu" and dev.type == "cpu"):
        raise ValueError(f"table must be on {dev} (the kernels read it there), got {table.device}")
    if not isinstance(row, int) or not 0 <= row < table.shape[0]:
        raise ValueError(f"row must be an int in [0, {table.shape[0]}), got {row!r}")
    K = 0
    if hist is not None:
        _check_tensor("hist", hist, dtype=x.dtype, device=dev)
        if tuple(hist.shape[1:]) != shape:
            raise ValueError(f"hist must have shape [K, {', '.join(map(str, shape))}], got {tuple(hist.shape)}")
        K = hist.shape[0]
        _check_writable("hist", hist)
    if table.shape[1] != table_width(K):
        raise ValueError(f"table has {table.shape[1]} columns; {K} history slots need {table_width(K)}")
    if not -1 <= hist_write < K:
        raise ValueError(f"hist_write must be -1 or a slot in [0, {K}), got {hist_write}")
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
    if noise is None and noise_id >= 0:
        if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [0, 2**64) for in-kernel noise, got {seed!r}")
        if noise_id >= 2 ** 32:
            raise ValueError(f"noise_id must be < 2**32, got {noise_id}")
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
    _check_writable("x", x)


def prepare_fused_step(x, *, table, y=None, cond_like=None, hist=None, noise_like=None,
                       model_in=None, backend: str = "auto") -> Callable:
    """Choose the backend once for a sampling run; returns its raw ``fused_step`` (arguments in
    the order of ``fused_step`` below, unchecked)."""
    tensors = [t for t in (x, table, y, cond_like, hist, noise_like, model_in) if t is not None]
    return select("fused_step", backend, tensors, state_dtype=x.dtype).fused_step


def fused_step(table: torch.Tensor, row: int, x: torch.Tensor, *, y: Optional[torch.Tensor] = None,
               cond: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
               hist: Optional[torch.Tensor] = None, hist_write: int = -1, eval_y: bool = False,
               write_x: bool = True, write_y: bool = False,
               noise: Optional[torch.Tensor] = None, seed: int = 0, noise_id: int = -1,
               model_in: Optional[torch.Tensor] = None, model_in_from_y: bool = False,
               bad_row: Optional[torch.Tensor] = None, backend: str = "auto") -> None:
    """Execute row ``row`` of a coefficient table, in place on x / y / hist / model_in.

    cond/uncond: model outputs (the two CFG halves; uncond=None means no CFG; cond=None: the row
    does not use the model). noise: explicit noise, else (seed, noise_id >= 0) draws Philox noise
    in the kernel. model_in: if given, receives s_in * (new x or new y), cast to its dtype, in one
    or both CFG halves. See fastdiff.program for the formula.
    """
    args = (table, row, x, y, cond, uncond, hist, hist_write, eval_y, write_x, write_y,
            noise, seed, noise_id, model_in, model_in_from_y, bad_row)
    _validate_step(*args)
    tensors = [t for t in (x, table, y, cond, uncond, hist, noise, model_in) if t is not None]
    select("fused_step", backend, tensors, state_dtype=x.dtype).fused_step(*args)


def cfg_combine(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float, *,
                convention: str = "w", backend: str = "auto") -> torch.Tensor:
    """Classifier-free guidance, out of place. ``convention='w'``: uncond + w (cond - uncond);
    ``'1+w'``: (1 + w) cond - w uncond (Imagen / the CFG paper's w)."""
    _check_tensor("cond", cond, dtypes=_MODEL_DTYPES)
    if uncond is not None:
        _check_tensor("uncond", uncond, shape=cond.shape, dtype=cond.dtype, device=cond.device)
    g = guidance_scale_to_g(scale, convention)
    tensors = [t for t in (cond, uncond) if t is not None]
    return select("cfg_combine", backend, tensors).cfg_combine(cond, uncond, g)


def guidance_scale_to_g(scale: float, convention: str = "w") -> float:
    """Both CFG conventions as the g of D = uncond + g (cond - uncond)."""
    if convention == "w":
        return float(scale)
    if convention == "1+w":
        return 1.0 + float(scale)
    raise ValueError(f"unknown CFG convention {convention!r}; expected 'w' or '1+w'")


def philox_normal(shape, seed: int, noise_id: int = 0, *, device="cpu", backend: str = "auto") -> torch.Tensor:
    """Counter-based standard normal noise (float32); see fastdiff.ops.philox for the stream."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(noise_id, int) or not 0 <= noise_id < 2 ** 32:
        raise ValueError(f"noise_id must be an int in [0, 2**32), got {noise_id!r}")
    probe = torch.empty(0, device=device)
    return select("philox_normal", backend, [probe]).philox_normal(shape, seed, noise_id, torch.device(device))
