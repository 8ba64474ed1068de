"""Backends declare what they support; the dispatcher picks the best one or says why none fits.

A backend is a small class with ``name``, ``unavailable_reason()`` (why it cannot run on this
machine at all, or None) and ``not_supported_reasons(op, **inputs)`` (why it cannot run *these*
inputs). Its op methods take already-validated arguments. Adding a backend means adding a class
here and listing it in ``PRIORITY``; no solver changes.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional

import torch

from . import custom_ops, reductions, reference

OPS = ("fused_step", "cfg_combine", "philox_normal") + reductions.OPS
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend:
    name = "?"
    #: Device types this backend is for (None: any). Skipping a backend that is not for the
    #: inputs' device is normal and never warned about.
    device_types: Optional[tuple] = None

    def serves(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    def unavailable_reason(self) -> Optional[str]:
        return None

    def not_supported_reasons(self, op: str, tensors: List[torch.Tensor], state_dtype=None) -> List[str]:
        return []


class ReferenceBackend(Backend):
    """Plain PyTorch: any device, any floating dtype. The oracle and the fallback."""

    name = "reference"
    fused_step = staticmethod(reference.fused_step)
    cfg_combine = staticmethod(reference.cfg_combine)
    cfg_rescale = staticmethod(reductions.reference_cfg_rescale)
    dynamic_threshold = staticmethod(reductions.reference_dynamic_threshold)
    error_norm = staticmethod(reductions.reference_error_norm)
    per_sample_norm = staticmethod(reductions.reference_per_sample_norm)

    @staticmethod
    def philox_normal(shape, seed, noise_id, device):
        from .philox import philox_normal
        return philox_normal(shape, seed, noise_id, device)


@functools.lru_cache(maxsize=None)
def load_extension():
    """fastdiff._C, or the reason it cannot be imported (a string)."""
    try:
        from .. import _C  # noqa: F401
        return _C
    except ImportError as e:  # not built (pure-Python install) or built against another torch
        return f"fastdiff._C is not importable ({e}); reinstall with `pip install --no-build-isolation -e .`"


class CpuBackend(Backend):
    """fastdiff._C: C++ with OpenMP and SIMD, CPU tensors, float32 state (x, y, hist), model
    outputs / noise / model input in float32, float16, bfloat16 or float64."""

    name = "cpu"
    device_types = ("cpu",)

    def unavailable_reason(self):
        ext = load_extension()
        if isinstance(ext, str):
            return ext
        if not hasattr(ext, "fused_step"):
            return "fastdiff._C was built without the fused step"
        return None

    def not_supported_reasons(self, op, tensors, state_dtype=None):
        reasons = []
        if not hasattr(load_extension(), op):   # an extension built before the op was added
            reasons.append(f"fastdiff._C was built without {op}; rebuild with `pip install --no-build-isolation -e .`")
        for t in tensors:
            if t.device.type != "cpu":
                reasons.append(f"cpu backend runs on CPU tensors, got a tensor on {t.device}")
                break
        if state_dtype is not None and state_dtype != torch.float32:
            reasons.append(f"cpu backend keeps the state in float32, got {state_dtype}")
        for t in tensors:
            # float64 is the coefficient table's dtype, and a model dtype the kernel converts.
            if t.is_floating_point() and t.dtype not in _FLOAT_DTYPES and t.dtype != torch.float64:
                reasons.append(f"cpu backend supports float32/float16/bfloat16/float64, got {t.dtype}")
                break
        return reasons

    @property
    def fused_step(self):
        """The bound C++ function itself (no Python frame per step); arguments in the order of
        fastdiff.ops.reference.fused_step, all positional:
        (table, row, x, y, cond, uncond, hist, hist_write, eval_y, write_x, write_y,
         noise, seed, noise_id, model_in, model_in_from_y, bad_row)."""
        return load_extension().fused_step

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return load_extension().cfg_combine(cond, uncond, float(scale), out_dtype or cond.dtype)

    def philox_normal(self, shape, seed, noise_id, device):
        return load_extension().philox_normal([int(s) for s in shape], int(seed), int(noise_id))

    # Per-sample reductions (csrc/cpu/reductions.cpp): float32 math for float32/float16/bfloat16
    # inputs, float64 for float64, as the reference.
    def cfg_rescale(self, cond, uncond, g, rescale):
        return load_extension().cfg_rescale(cond, uncond, float(g), float(rescale))

    def dynamic_threshold(self, x0, ratio, max_value):
        return load_extension().dynamic_threshold(x0, float(ratio), float(max_value))

    def error_norm(self, a, b, ref, rtol, atol):
        if not a.dtype == b.dtype == ref.dtype:   # mixed dtypes: the reference's conversion to a's math dtype
            md = torch.float64 if a.dtype == torch.float64 else torch.float32
            a, b, ref = a.to(md), b.to(md), ref.to(md)
        return load_extension().error_norm(a, b, ref, float(rtol), float(atol))

    def per_sample_norm(self, x):
        return load_extension().per_sample_norm(x)


BACKENDS: Dict[str, Backend] = {b.name: b for b in (CpuBackend(), ReferenceBackend())}
# Automatic choice, best first.
PRIORITY = ("cpu", "reference")

_warned = set()


def register_backend(backend: Backend, priority: Optional[int] = None) -> None:
    """Add a backend (e.g. from the GPU modules) and place it in the automatic order."""
    global PRIORITY
    BACKENDS[backend.name] = backend
    order = [n for n in PRIORITY if n != backend.name]
    order.insert(len(order) - 1 if priority is None else priority, backend.name)
    PRIORITY = tuple(order)


def reasons_for(name: str, op: str, tensors, state_dtype=None) -> List[str]:
    b = BACKENDS[name]
    why = b.unavailable_reason()
    if why:
        return [why]
    if not hasattr(b, op):
        return [f"{name} backend does not implement {op}"]
    return b.not_supported_reasons(op, tensors, state_dtype)


def select(op: str, backend: str, tensors, state_dtype=None) -> Backend:
    """The backend to run ``op`` on these tensors. An explicit choice runs or raises with its
    reasons; ``auto`` takes the first supporting backend in PRIORITY and warns once when a
    faster backend had to be skipped for a reason the user may want to fix."""
    if op in custom_ops.OPS and torch.compiler.is_compiling():
        # Traced by torch.compile: the registered custom ops, which choose the backend when they run.
        return custom_ops.TracedBackend(backend)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
        why = reasons_for(backend, op, tensors, state_dtype)
        if why:
            raise RuntimeError(f"backend {backend!r} cannot run {op}: " + "; ".join(why))
        return BACKENDS[backend]
    skipped = []
    for name in PRIORITY:
        why = reasons_for(name, op, tensors, state_dtype)
        if not why:
            if name == "reference" and skipped:
                key = (op, tuple(skipped))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"fastdiff: {op} falls back to the reference backend: "
                                  + "; ".join(f"{n}: {r}" for n, r in skipped), RuntimeWarning, stacklevel=3)
            return BACKENDS[name]
        # Only a backend meant for this device (and having the op) is worth a warning.
        device_type = tensors[0].device.type if tensors else "cpu"
        if BACKENDS[name].serves(device_type) and not any("does not implement" in r for r in why):
            skipped.append((name, why[0]))
    raise RuntimeError(f"no backend can run {op}")


def available_backends() -> Dict[str, Optional[str]]:
    """name -> None if usable on this machine, else the reason it is not."""
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}
