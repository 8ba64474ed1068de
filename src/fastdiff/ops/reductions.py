"""The non-elementwise ops beside the fused step: per-sample reductions and what is built on them.

* ``cfg_rescale``        CFG, then the std rescale of Lin et al. (2023) (per-sample std)
* ``dynamic_threshold``  Imagen's dynamic thresholding of x0 (per-sample quantile of |x0|)
* ``error_norm``         the RMS error norm of adaptive step-size control (one scalar per batch)
* ``per_sample_norm``    per-sample L2 norms (Langevin corrector step sizes)

Each op is a public function here that validates its inputs and dispatches with
``backends.select(op, ...)``; a backend adds a kernel by defining a method of the same name. The
plain-PyTorch oracles live in fastdiff.reference.reductions (the "reference" backend runs them).
"Per sample" means over every dimension but the first (the batch).

Numerics: math in float32, or float64 for float64 inputs; results are in that math dtype.
"""
from __future__ import annotations

import math

import torch

from .api import guidance_scale_to_g
from .backends import REDUCTION_OPS as OPS, select  # noqa: F401  (OPS: the names a backend implements)

__all__ = ["cfg_rescale", "dynamic_threshold", "error_norm", "per_sample_norm"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Public, validated ops


def _backend(op: str, backend: str, tensors):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        # Only the plain-PyTorch implementation has a backward; a kernel would silently cut the
        # graph (a gradient of zero through this op), which is worse than an error.
        if backend not in ("auto", "reference"):
            raise ValueError(f"{op}: backend {backend!r} has no backward and an input requires grad; use "
                             "backend='auto' or 'reference' (differentiable), or call it under torch.no_grad()")
        backend = "reference"
    return select(op, backend, tensors)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in _FLOAT_DTYPES]}, got {t.dtype}")
    if t.dim() < 1 or t.shape[0] < 1 or t.numel() == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension and elements, got shape {tuple(t.shape)}")


def _check_like(name: str, t, like: torch.Tensor, like_name: str) -> None:
    _check_float(name, t)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} (the device of {like_name}), got {t.device}")


def _check_number(name: str, v, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    ok = math.isfinite(v) or (hi == math.inf and v == math.inf and not hi_open)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {v}")
    return v


def cfg_rescale(cond: torch.Tensor, uncond: torch.Tensor, scale: float, guidance_rescale: float, *,
                convention: str = "w", backend: str = "auto") -> torch.Tensor:
    """Classifier-free guidance with the std rescale of Lin et al. (2023), Section 3.4:

        D    = uncond + g (cond - uncond)                     (g from scale and convention)
        D'   = phi * D * std(cond) / std(D) + (1 - phi) * D   (std per sample, phi = guidance_rescale)

    diffusers applies this to the noise prediction (``rescale_noise_cfg``); applied to another
    parameterization's outputs it rescales that quantity instead. Returns a new tensor in float32
    (float64 for float64 inputs)."""
    _check_float("cond", cond)
    _check_like("uncond", uncond, cond, "cond")
    if uncond.dtype != cond.dtype:
        raise TypeError(f"uncond must have the dtype of cond ({cond.dtype}), got {uncond.dtype}")
    phi = _check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
    g = guidance_scale_to_g(_check_number("scale", scale, -math.inf, math.inf, True, True), convention)
    return _backend("cfg_rescale", backend, [cond, uncond]).cfg_rescale(cond, uncond, g, phi)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0, *,
                      backend: str = "auto") -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted clean sample (diffusers ``thresholding=True``
    with ``dynamic_thresholding_ratio=ratio``, ``sample_max_value=max_value``). Returns a new
    tensor in float32 (float64 for float64 input)."""
    _check_float("x0", x0)
    ratio = _check_number("ratio (dynamic_thresholding_ratio)", ratio, 0.0, 1.0, lo_open=True)
    max_value = _check_number("max_value (sample_max_value)", max_value, 0.0, math.inf, lo_open=True)
    return _backend("dynamic_threshold", backend, [x0]).dynamic_threshold(x0, ratio, max_value)


def error_norm(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, *,
               backend: str = "auto") -> torch.Tensor:
    """The scaled RMS difference of two solutions ``a`` (lower order) and ``b`` with the error
    scale max(atol, rtol * max(|a|, |ref|)) per element; a 0-d tensor. <= 1 means "within
    tolerance" for a step-size controller."""
    _check_float("a", a)
    _check_like("b", b, a, "a")
    _check_like("ref", ref, a, "a")
    rtol = _check_number("rtol", rtol, 0.0, math.inf, lo_open=True, hi_open=True)
    atol = _check_number("atol", atol, 0.0, math.inf, lo_open=True, hi_open=True)
    return _backend("error_norm", backend, [a, b, ref]).error_norm(a, b, ref, rtol, atol)


def per_sample_norm(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """L2 norm of each sample (over every dimension but the first): a [B] tensor."""
    _check_float("x", x)
    return _backend("per_sample_norm", backend, [x]).per_sample_norm(x)
