"""The CUDA backend: the C++/CUDA kernels of csrc/cuda (extension module ``fastdiff._cuda``) behind
the Backend interface of fastdiff.ops.backends.

Runs on CUDA tensors with a float32 solver state; model outputs, noise and model inputs in
float32, float16, bfloat16 or float64 (as the CPU backend); any strides (tensors whose samples
are dense are read in place, others copied; see csrc/cuda/torch_binding.cpp). Ops: fused_step,
cfg_combine, cfg_rescale, philox_normal. The extension is built by setup.py only against a CUDA
build of torch (FASTDIFF_CUDA=auto|1|0).

Importing this module imports neither the extension nor CUDA; that happens the first time the
backend is asked whether it is available.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .backends import Backend, register_backend

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_RESCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def load_cuda_extension():
    """fastdiff._cuda, or the reason it is not there (a string)."""
    if torch.version.cuda is None:
        return (f"fastdiff._cuda is not built: torch {torch.__version__} is a CPU-only build "
                "(setup.py builds the CUDA kernels only against a CUDA build of torch)")
    try:
        from .. import _cuda
        return _cuda
    except ImportError as e:
        return (f"fastdiff._cuda is not importable ({e}); reinstall with a CUDA torch and nvcc present: "
                "`FASTDIFF_CUDA=1 pip install --no-build-isolation -e .`")


class CudaBackend(Backend):
    """csrc/cuda kernels: CUDA tensors, float32 state."""

    name = "cuda"
    # Before triton in the automatic order (lower launch overhead: one C++ call per step); triton
    # still serves what this backend lacks (attention, dynamic_threshold, error norms).
    priority = 300
    ops = frozenset({"fused_step", "cfg_combine", "cfg_rescale", "philox_normal"})
    device_types = ("cuda",)
    # float64 is also the coefficient table's dtype (fused_step reads it on the device).
    dtypes = _MODEL_DTYPES
    state_dtypes = (torch.float32,)

    def dtypes_for(self, op: str):
        return _RESCALE_DTYPES if op == "cfg_rescale" else self.dtypes

    def unavailable_reason(self) -> Optional[str]:
        ext = load_cuda_extension()
        if isinstance(ext, str):
            return ext
        if not torch.cuda.is_available():
            return "cuda backend needs a CUDA device (torch.cuda.is_available() is False)"
        return None

    @property
    def fused_step(self):
        """The bound C++ function itself (no Python frame per step); arguments in the order of
        fastdiff.reference.fused_step, all positional."""
        return load_cuda_extension().fused_step

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return load_cuda_extension().cfg_combine(cond, uncond, float(scale), out_dtype or cond.dtype)

    def cfg_rescale(self, cond, uncond, g, rescale):
        return load_cuda_extension().cfg_rescale(cond, uncond, float(g), float(rescale))

    def philox_normal(self, shape, seed, noise_id, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        return load_cuda_extension().philox_normal([int(s) for s in shape], int(seed), int(noise_id), index)

    def build_info(self):
        """[(key, value)] of what was built (nvcc version, archs, CUDA runtime), or [] if not built."""
        ext = load_cuda_extension()
        return [] if isinstance(ext, str) else list(ext.build_info())


BACKEND = CudaBackend()
register_backend(BACKEND)
