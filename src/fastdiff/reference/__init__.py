"""The oracles of the kernel ops, in plain PyTorch, in one home.

* ``step``        ``fused_step`` (one row of a coefficient program) and ``cfg_combine``
* ``philox``      the Philox-4x32-10 stream and its Box-Muller normals (``philox_uint32``, ``philox_normal``)
* ``reductions``  ``cfg_rescale``, ``dynamic_threshold``, ``error_norm``, ``per_sample_norm``
* ``attention``   softmax attention (the Triton / SDPA attention backends' oracle)

The kernels (C++, CUDA, Triton) are tested against these functions, ``fastdiff check`` calls them
directly, and the "reference" backend of fastdiff.ops runs them. This package imports torch,
numpy and the row layout (fastdiff.program.layout) only: never fastdiff.ops or a kernel, so
importing an oracle registers no backend and no custom op, and a broken kernel cannot judge
itself. (The textbook formulas of the solvers, which a coefficient program is tested against,
are the other oracle home: fastdiff.textbook.)
"""
from __future__ import annotations

from . import attention, philox, reductions, step  # noqa: F401
from .philox import philox_normal, philox_uint32  # noqa: F401
from .step import cfg_combine, fused_step  # noqa: F401

__all__ = ["step", "philox", "reductions", "attention", "fused_step", "cfg_combine", "philox_normal", "philox_uint32"]
