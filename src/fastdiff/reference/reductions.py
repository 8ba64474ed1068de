"""Plain-PyTorch oracles of the per-sample reductions (the ops of fastdiff.ops.reductions):

* ``cfg_rescale``        CFG, then the std rescale of Lin et al. (2023) (per-sample std)
* ``dynamic_threshold``  Imagen's dynamic thresholding of x0 (per-sample quantile of |x0|)
* ``error_norm``         the RMS error norm of adaptive step-size control (one scalar per batch)
* ``per_sample_norm``    per-sample L2 norms (Langevin corrector step sizes)

"Per sample" means over every dimension but the first (the batch). Arguments are already
validated (the public ops check them). Math in float32, or float64 for float64 inputs; results
are in that math dtype. Imports torch only: nothing it judges.
"""
from __future__ import annotations

import math

import torch

__all__ = ["cfg_rescale", "dynamic_threshold", "error_norm", "per_sample_norm", "per_sample_abs_quantile"]


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, n] view (or copy, for non-contiguous input) in the math dtype."""
    return t.to(_math_dtype(t)).reshape(t.shape[0], -1)


def cfg_rescale(cond: torch.Tensor, uncond: torch.Tensor, g: float, rescale: float) -> torch.Tensor:
    """D = u + g (c - u), then D * (rescale * std(c) / std(D) + 1 - rescale), stds per sample.

    As diffusers' ``rescale_noise_cfg``; a sample whose D is constant (std 0) is left as D."""
    md = _math_dtype(cond)
    c, u = cond.to(md), uncond.to(md)
    d = u + g * (c - u)
    if rescale == 0.0:
        return d
    B = d.shape[0]
    std_c = c.reshape(B, -1).std(dim=1)
    std_d = d.reshape(B, -1).std(dim=1)
    ratio = torch.where(std_d > 0, std_c / torch.where(std_d > 0, std_d, 1.0), 1.0)
    factor = (rescale * ratio + (1.0 - rescale)).reshape((B,) + (1,) * (d.dim() - 1))
    return d * factor


def per_sample_abs_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |x| per sample, interpolated linearly between order statistics exactly
    as ``torch.quantile`` does; with ``kthvalue`` (selection, O(n)) instead of a sort, and no
    size limit (torch.quantile refuses inputs above 2**24 elements)."""
    a = _flat(x).abs()
    n = a.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = a.kthvalue(lo + 1, dim=1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = a.kthvalue(hi + 1, dim=1).values
    return torch.lerp(v_lo, v_hi, pos - lo)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. (2022) / diffusers ``_threshold_sample``: s = the ``ratio`` quantile of
    |x0| per sample, clamped to [1, max_value] (torch.clamp semantics: max wins), then
    x0 = clamp(x0, -s, s) / s."""
    s = per_sample_abs_quantile(x0, ratio).clamp(min=1.0, max=max_value)
    s = s.reshape((x0.shape[0],) + (1,) * (x0.dim() - 1))
    x = x0.to(_math_dtype(x0))
    return torch.maximum(torch.minimum(x, s), -s) / s


def error_norm(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, rtol: float,
                         atol: float) -> torch.Tensor:
    """sqrt(mean(((a - b) / max(atol, rtol * max(|a|, |ref|)))^2)) over the whole batch (a 0-d
    tensor): k-diffusion's ``dpm_solver_adaptive`` norm, with a = the lower-order solution."""
    md = _math_dtype(a)
    a, b, ref = a.to(md), b.to(md), ref.to(md)
    delta = torch.clamp(rtol * torch.maximum(a.abs(), ref.abs()), min=atol)
    return torch.linalg.vector_norm((a - b) / delta) / math.sqrt(a.numel())


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(_flat(x), dim=1)
