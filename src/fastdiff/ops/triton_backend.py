"""The Triton backend: the kernels of the top-level ``kernels/`` folder (installed as
``fastdiff.kernels``) behind the Backend interface of fastdiff.ops.backends.

Runs on CUDA tensors; on CPU tensors only when Python was started with TRITON_INTERPRET=1 (the
Triton interpreter: correct but slow, for tests). Importing this module does not import triton;
that happens the first time the backend is asked whether it is available.

Supports: float32 solver state (float32 math, as the reference's for a float32 state; model
outputs, noise and model inputs in any float dtype, float16/bfloat16 being the point); any strides
(batch slices are read in place, other layouts copied first and outputs copied back: see
kernels/_common.py); attention with head dims up to 128 in float32/float16/bfloat16.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import List, Optional

import torch

from . import backends
from .backends import Backend, register_backend

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def load_kernels():
    """The fastdiff.kernels modules (a namespace object), or the reason they cannot be imported."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); `pip install triton` (Linux, CUDA GPUs)"
    try:
        mods = {name: importlib.import_module(f"fastdiff.kernels.{name}")
                for name in ("fused_step", "cfg", "philox", "attention", "reductions")}
    except ImportError as e:
        return f"fastdiff.kernels is not importable ({e}); reinstall fastdiff (`pip install -e .`)"
    return type("Kernels", (), mods)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreted() -> bool:
    """True if the kernels run on the Triton CPU interpreter (TRITON_INTERPRET=1 at import)."""
    k = load_kernels()
    if isinstance(k, str):
        return False
    from fastdiff.kernels._common import is_interpreted
    return is_interpreted(k.fused_step.fused_step_kernel)


class TritonBackend(Backend):
    """Triton kernels: CUDA tensors (CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"
    priority = 200          # after cpu and cuda (one C++ call per step), before sdpa and reference
    ops = frozenset(backends.OPS + (backends.ATTENTION_OP,))
    device_types = ("cuda",)   # and "cpu" under the interpreter: see serves()
    dtypes = _KERNEL_DTYPES
    state_dtypes = (torch.float32,)
    #: Ops reading their tensors in any float dtype (float64 inputs: float64 math in the reference
    #: for the others).
    _ANY_DTYPE_OPS = ("fused_step", "philox_normal")

    def serves(self, device_type: str) -> bool:
        return device_type == "cuda" or (device_type == "cpu" and interpreted())

    def dtypes_for(self, op: str):
        return None if op in self._ANY_DTYPE_OPS else self.dtypes

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available() and not _interpreter_requested():
            # Decided without importing triton (a second or two), so CPU-only dispatch stays cheap.
            return ("triton backend needs a CUDA device (torch.cuda.is_available() is False); start Python "
                    "with TRITON_INTERPRET=1 to run its kernels on the CPU interpreter (slow, for tests)")
        k = load_kernels()
        return k if isinstance(k, str) else None

    def device_reason(self, tensors) -> Optional[str]:
        allowed = ("cuda", "cpu") if interpreted() else ("cuda",)
        for t in tensors:
            if t.device.type not in allowed:
                where = " or ".join(a.upper() for a in allowed)
                return f"triton backend runs on {where} tensors, got a tensor on {t.device}"
        return None

    def dtype_reason(self, op: str, tensors) -> Optional[str]:
        allowed = self.dtypes_for(op)
        if allowed is None:
            return None
        for t in tensors:
            if t.dtype not in allowed:
                return f"triton {op} supports float32/float16/bfloat16, got {t.dtype}"
        return None

    def not_supported_reasons(self, op: str, tensors: List[torch.Tensor], state_dtype=None) -> List[str]:
        reasons = []
        why = self.device_reason(tensors)
        if why:
            reasons.append(why)
        if op == backends.ATTENTION_OP:   # tensors: q, k, v, ... (one dtype, validated), then the bias
            q = tensors[0]
            if q.dtype not in self.dtypes:
                reasons.append(f"triton attention supports float32/float16/bfloat16, got {q.dtype}")
            max_d = load_kernels().attention.MAX_HEAD_DIM
            if q.shape[-1] > max_d:
                reasons.append(f"triton attention supports head dims up to {max_d}, got {q.shape[-1]}")
            return reasons
        return reasons + [r for r in (self.state_reason(state_dtype), self.dtype_reason(op, tensors)) if r]

    def fused_step(self, *args) -> None:
        load_kernels().fused_step.fused_step(*args)

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return load_kernels().cfg.cfg_combine(cond, uncond, float(scale), out_dtype)

    def philox_normal(self, shape, seed, noise_id, device):
        return load_kernels().philox.philox_normal(shape, seed, noise_id, device)

    def cfg_rescale(self, cond, uncond, g, rescale):
        return load_kernels().reductions.cfg_rescale(cond, uncond, g, rescale)

    def dynamic_threshold(self, x0, ratio, max_value):
        return load_kernels().reductions.dynamic_threshold(x0, ratio, max_value)

    def error_norm(self, a, b, ref, rtol, atol):
        return load_kernels().reductions.error_norm(a, b, ref, rtol, atol)

    def per_sample_norm(self, x):
        return load_kernels().reductions.per_sample_norm(x)

    def attention(self, q, k1, v1, k2=None, v2=None, bias=None, scale=None):
        return load_kernels().attention.attention(q, k1, v1, k2, v2, bias, scale)


BACKEND = TritonBackend()
register_backend(BACKEND)
