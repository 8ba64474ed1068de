"""Interpolation between noises: spherical linear interpolation (slerp), and sampling along it.

Independent Gaussian noises in high dimension are nearly orthogonal with nearly equal norms, so
the straight line between them passes through points of atypically small norm (|lerp(0.5)| is
about |z| / sqrt 2), which a diffusion model has never seen as its starting noise; slerp moves
along the great circle and keeps the norm (Shoemake 1985; White 2016, "Sampling Generative
Networks"). With a deterministic ODE solver the samples along the path change smoothly.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .solvers import get_solver

__all__ = ["slerp", "sample_slerp_path"]


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: Union[float, Sequence[float], torch.Tensor], *,
          dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from ``z0`` (t = 0) to ``z1`` (t = 1), per sample: the angle
    between z0[b] and z1[b] is taken over all dimensions but the first.

        slerp = sin((1 - t) theta) / sin(theta) z0 + sin(t theta) / sin(theta) z1

    Where |cos theta| > ``dot_threshold`` (nearly parallel: sin theta ~ 0) it falls back to the
    linear interpolation, as the usual implementations do. ``t``: a number (result shaped like
    z0) or a 1-D sequence of T numbers (result [T, *z0.shape]). Computed in float64, returned
    in z0's dtype."""
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor):
        raise TypeError(f"z0 and z1 must be torch.Tensors, got {type(z0).__name__} and {type(z1).__name__}")
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if not z0.is_floating_point() or z0.dim() < 2:
        raise ValueError(f"z0 and z1 must be floating-point tensors [B, ...] with a batch dimension, "
                         f"got {z0.dtype} of shape {tuple(z0.shape)}")
    if not 0.0 < float(dot_threshold) <= 1.0:
        raise ValueError(f"dot_threshold must lie in (0, 1], got {dot_threshold}")
    scalar = isinstance(t, (int, float)) and not isinstance(t, bool)
    ts = torch.as_tensor([t] if scalar else t, dtype=torch.float64, device=z0.device)
    if ts.dim() != 1 or ts.numel() == 0 or not torch.isfinite(ts).all():
        raise ValueError(f"t must be a finite number or a non-empty 1-D sequence of finite numbers, got {t!r}")

    a, b = z0.to(torch.float64), z1.to(torch.float64)
    B = a.shape[0]
    af, bf = a.reshape(B, -1), b.reshape(B, -1)
    na, nb = af.norm(dim=1), bf.norm(dim=1)
    if not (torch.all(na > 0) and torch.all(nb > 0)):
        raise ValueError("slerp needs non-zero vectors (every sample of z0 and z1)")
    cos = ((af * bf).sum(1) / (na * nb)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)                                             # [B]
    linear = cos.abs() > dot_threshold
    tt = ts[:, None]                                                    # [T, 1]
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    w0 = torch.where(linear, 1.0 - tt, torch.sin((1.0 - tt) * theta) / sin_theta)   # [T, B]
    w1 = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    bshape = (ts.numel(), B) + (1,) * (a.dim() - 1)
    out = (w0.reshape(bshape) * a + w1.reshape(bshape) * b).to(z0.dtype)
    return out[0] if scalar else out


def sample_slerp_path(model, z0: torch.Tensor, z1: torch.Tensor, t: Union[int, Sequence[float], torch.Tensor] = 8,
                      *, solver="dpmpp_2m", solver_options=None, **sample_options) -> torch.Tensor:
    """Samples from the noises along slerp(z0, z1, t): ``fastdiff.sample`` on the interpolated
    noises as one batch, with a deterministic solver (so the path is a smooth function of t).
    ``t``: the number of evenly spaced points in [0, 1], or the points. Returns [T, *z0.shape].
    ``sample_options`` go to ``fastdiff.sample`` (steps, schedule, prediction, guidance, ...;
    tensor kwargs in cond/uncond/model_kwargs must then have a batch of T * B)."""
    from .sampler import sample

    s = get_solver(solver, **(solver_options or {}))
    if s.stochastic:
        raise ValueError(f"sampling along a noise path needs a deterministic solver; {s.name!r} is stochastic")
    if isinstance(t, int) and not isinstance(t, bool):
        if t < 2:
            raise ValueError(f"the number of path points must be >= 2, got {t}")
        t = torch.linspace(0.0, 1.0, t, dtype=torch.float64)
    noises = slerp(z0, z1, t)                                           # [T, B, ...]
    T = noises.shape[0]
    x = sample(model, noises.reshape((T * z0.shape[0],) + tuple(z0.shape[1:])), solver=s, **sample_options)
    return x.reshape((T,) + tuple(z0.shape))
