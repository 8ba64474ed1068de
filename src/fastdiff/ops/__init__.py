"""The thin kernel API: validated public ops over interchangeable backends.

``fused_step`` executes one row of a coefficient program (see fastdiff.program) in place;
``cfg_combine`` and ``philox_normal`` are the standalone pieces; ``fastdiff.ops.reductions`` holds
the per-sample reductions. Every op checks its inputs at the Python edge (fastdiff.ops.api) and
raises ValueError/TypeError naming the tensor and the expectation; backends receive only valid
arguments. The sampler validates once per run and then calls ``prepare_fused_step(...)`` 's
returned callable each step, skipping the per-call checks.

Modules, each importing only those before it: ``backends`` (the registry, dispatch, and the
reference/cpu/sdpa backends; the reference backend runs the oracles of fastdiff.reference),
``triton_backend`` and ``cuda_backend`` (register themselves; triton and fastdiff._cuda load on
first use), ``api`` (the validated ops), ``reductions``, ``custom_ops`` (``torch.ops.fastdiff.*``,
registered when this package is imported).
"""
from __future__ import annotations

from .backends import BACKENDS, available_backends, register_backend, select  # noqa: F401
from . import triton_backend  # noqa: F401  (registers the "triton" backend; triton is imported lazily)
from . import cuda_backend  # noqa: F401  (registers the "cuda" backend; fastdiff._cuda is imported lazily)
from .api import (_MODEL_DTYPES, _STATE_DTYPES, _check_tensor, _validate_step, as_bool, as_int,  # noqa: F401
                  as_real, cfg_combine, fused_step, guidance_scale_to_g, philox_normal, prepare_fused_step)
from . import reductions  # noqa: F401
from . import custom_ops  # noqa: F401  (registers torch.ops.fastdiff.*; select's traced path)

__all__ = ["fused_step", "prepare_fused_step", "cfg_combine", "philox_normal", "available_backends",
           "BACKENDS", "select", "as_int", "as_bool", "as_real"]
