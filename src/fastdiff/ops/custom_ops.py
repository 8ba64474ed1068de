"""fastdiff's ops as torch custom ops (``torch.ops.fastdiff.*``), so a sampling loop written with
them composes with ``torch.compile(fullgraph=True)`` and CUDA graphs.

Registered: ``fused_step`` (in place on x, y, hist, model_in, bad_row; returns nothing),
``cfg_combine``, ``philox_normal``, ``cfg_rescale``, ``dynamic_threshold``, ``error_norm``,
``per_sample_norm``. Each has

* a schema whose last argument is the backend name (``"auto"`` by default); the mutated
  arguments of ``fused_step`` are declared (``Tensor(a!)``), so functionalization knows them;
* one implementation for every device, which runs the validated public op of fastdiff.ops
  (bad input raises ValueError/TypeError and changes nothing) on the backend ``select`` picks
  when it runs: fastdiff._C for CPU tensors where it is built, else the reference;
* a fake implementation for tracing: nothing for ``fused_step``; for the others an empty
  contiguous tensor of the result's shape, dtype and device (the implementation returns
  contiguous results to match).

The Philox seed is a uint64 but a schema int is int64: the ops take it in two's complement
(``seed_to_int64``); ``TracedBackend`` converts, so ``fastdiff.ops.fused_step`` still takes the uint64.

When the custom ops are used. Per-call cost of one fused CFG + DPM-Solver++(2M) row at 1x4x8x8,
measured here (1 thread, minimum over 9 x 4000 calls, a busy 2-core machine):

    fastdiff._C.fused_step (pybind; what the Sampler's prepared step is)       0.7 us
    torch.ops.fastdiff.fused_step (this module: dispatcher, validation, select) 58 us
        of which fastdiff.ops.fused_step's validation + select                 42 us
    the same Library op calling fastdiff._C directly                           13 us
    the same op via torch.library.custom_op calling fastdiff._C directly      260 us

(custom_op's generated ADInplaceOrView kernel walks the whole schema in Python on every call.) So:
the ops are registered with ``torch.library.Library`` (define + impl + register_fake), which is
also what compiled code calls into; they validate like the public ops (a direct call is safe);
and eager code never pays for them: ``fastdiff.ops.backends.select`` returns the real backend in
eager mode (the Sampler keeps calling the raw ``_C.fused_step`` that ``prepare_fused_step``
returns) and a ``TracedBackend``, whose methods are these custom ops, only while torch.compile
traces (``torch.compiler.is_compiling()``, 0.07 us). Hence ``fastdiff.ops.fused_step`` and the
reductions work unchanged inside a compiled function, and keep their eager speed outside.

The sampling loop written for torch.compile(fullgraph=True) is ``fastdiff.runtime.run_program``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..program.layout import step_schema
from . import api, reductions
from .backends import OPS, register_traced_backend

__all__ = ["OPS", "TracedBackend", "seed_to_int64", "seed_from_int64"]

# The fused step's schema is generated from the row ABI's argument list (layout.STEP_ARGS), the one
# every backend's signature is tested against; the other ops' are written here.
_SCHEMAS = {
    "fused_step": step_schema(),
    "cfg_combine": "cfg_combine(Tensor cond, Tensor? uncond, float g, ScalarType? out_dtype=None, "
                   "str backend='auto') -> Tensor",
    "philox_normal": "philox_normal(SymInt[] shape, int seed, int noise_id, Device device, "
                     "str backend='auto') -> Tensor",
    "cfg_rescale": "cfg_rescale(Tensor cond, Tensor uncond, float g, float rescale, str backend='auto') -> Tensor",
    "dynamic_threshold": "dynamic_threshold(Tensor x0, float ratio, float max_value, str backend='auto') -> Tensor",
    "error_norm": "error_norm(Tensor a, Tensor b, Tensor ref, float rtol, float atol, str backend='auto') -> Tensor",
    "per_sample_norm": "per_sample_norm(Tensor x, str backend='auto') -> Tensor",
}


def seed_to_int64(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (schema ints are int64)."""
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


def seed_from_int64(seed: int) -> int:
    return seed + 2 ** 64 if seed < 0 else seed


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Implementations: the validated public ops (fastdiff.ops.api, fastdiff.ops.reductions), on the
# backend chosen when they run.

def _fused_step_impl(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
                     bad_row, guidance=None, backend="auto"):
    api._fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed_from_int64(seed), noise_id,
                    model_in, bad_row, guidance, backend)


def _cfg_combine_impl(cond, uncond, g, out_dtype=None, backend="auto"):
    api._check_tensor("cond", cond, dtypes=api._MODEL_DTYPES)
    g = api.as_real("guidance scale g", g)
    if uncond is not None:
        api._check_tensor("uncond", uncond, shape=cond.shape, dtype=cond.dtype, device=cond.device)
    if out_dtype is not None and out_dtype not in api._MODEL_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in api._MODEL_DTYPES]}, got {out_dtype}")
    tensors = [t for t in (cond, uncond) if t is not None]
    return api.select("cfg_combine", backend, tensors).cfg_combine(cond, uncond, g, out_dtype).contiguous()


def _philox_normal_impl(shape, seed, noise_id, device, backend="auto"):
    return api.philox_normal(shape, seed_from_int64(seed), noise_id, device=device, backend=backend)


def _cfg_rescale_impl(cond, uncond, g, rescale, backend="auto"):
    return reductions.cfg_rescale(cond, uncond, g, rescale, convention="w", backend=backend).contiguous()


def _dynamic_threshold_impl(x0, ratio, max_value, backend="auto"):
    return reductions.dynamic_threshold(x0, ratio, max_value, backend=backend).contiguous()


def _error_norm_impl(a, b, ref, rtol, atol, backend="auto"):
    return reductions.error_norm(a, b, ref, rtol, atol, backend=backend)


def _per_sample_norm_impl(x, backend="auto"):
    return reductions.per_sample_norm(x, backend=backend)


# ---------------------------------------------------------------------------------------------
# Fake implementations: results' metadata only.

def _fused_step_fake(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
                     bad_row, guidance=None, backend="auto"):
    return None


def _cfg_combine_fake(cond, uncond, g, out_dtype=None, backend="auto"):
    return cond.new_empty(cond.shape, dtype=out_dtype or cond.dtype)


def _philox_normal_fake(shape, seed, noise_id, device, backend="auto"):
    return torch.empty(shape, dtype=torch.float32, device=device)


def _cfg_rescale_fake(cond, uncond, g, rescale, backend="auto"):
    return cond.new_empty(cond.shape, dtype=_math_dtype(cond.dtype))


def _dynamic_threshold_fake(x0, ratio, max_value, backend="auto"):
    return x0.new_empty(x0.shape, dtype=_math_dtype(x0.dtype))


def _error_norm_fake(a, b, ref, rtol, atol, backend="auto"):
    return a.new_empty((), dtype=_math_dtype(a.dtype))


def _per_sample_norm_fake(x, backend="auto"):
    return x.new_empty((x.shape[0],), dtype=_math_dtype(x.dtype))


_LIB = torch.library.Library("fastdiff", "DEF")
for _name in OPS:
    _LIB.define(_SCHEMAS[_name])
    _LIB.impl(_name, globals()[f"_{_name}_impl"], "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastdiff::{_name}", globals()[f"_{_name}_fake"], lib=_LIB)


# ---------------------------------------------------------------------------------------------
# Autograd. cfg_combine is linear: D = uncond + g (cond - uncond), so dD/dcond = g and
# dD/duncond = 1 - g (without uncond, D = cond). fused_step needs no formula here: where an input
# requires grad, fastdiff.ops.fused_step runs the reference row, whose PyTorch ops autograd records.

def _cfg_combine_setup_context(ctx, inputs, output):
    cond, uncond, g, out_dtype, backend = inputs
    ctx.g = float(g)
    ctx.has_uncond = uncond is not None
    ctx.cond_dtype = cond.dtype
    ctx.uncond_dtype = uncond.dtype if uncond is not None else None


def _cfg_combine_backward(ctx, grad):
    md = _math_dtype(ctx.cond_dtype)
    gm = grad.to(md)
    g_cond = (gm * ctx.g).to(ctx.cond_dtype) if ctx.has_uncond else gm.to(ctx.cond_dtype)
    g_uncond = (gm * (1.0 - ctx.g)).to(ctx.uncond_dtype) if ctx.has_uncond else None
    return g_cond, g_uncond, None, None, None


torch.library.register_autograd("fastdiff::cfg_combine", _cfg_combine_backward,
                                setup_context=_cfg_combine_setup_context, lib=_LIB)


# ---------------------------------------------------------------------------------------------
# What fastdiff.ops.backends.select returns while torch.compile traces.

class TracedBackend:
    """The ops as their custom ops; ``backend`` (a name or "auto") is chosen when they run."""

    name = "custom_op"

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def fused_step(self, table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
                   bad_row, guidance=None) -> None:
        seed = seed_to_int64(seed) if noise is None and noise_id >= 0 else 0   # (only read for Philox noise)
        torch.ops.fastdiff.fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id,
                                      model_in, bad_row, guidance, self.backend)

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return torch.ops.fastdiff.cfg_combine(cond, uncond, float(scale), out_dtype, self.backend)

    def philox_normal(self, shape, seed, noise_id, device):
        return torch.ops.fastdiff.philox_normal(list(shape), seed_to_int64(seed), noise_id, torch.device(device),
                                                self.backend)

    def cfg_rescale(self, cond, uncond, g, rescale):
        return torch.ops.fastdiff.cfg_rescale(cond, uncond, float(g), float(rescale), self.backend)

    def dynamic_threshold(self, x0, ratio, max_value):
        return torch.ops.fastdiff.dynamic_threshold(x0, float(ratio), float(max_value), self.backend)

    def error_norm(self, a, b, ref, rtol, atol):
        return torch.ops.fastdiff.error_norm(a, b, ref, float(rtol), float(atol), self.backend)

    def per_sample_norm(self, x):
        return torch.ops.fastdiff.per_sample_norm(x, self.backend)


register_traced_backend(TracedBackend, OPS)
