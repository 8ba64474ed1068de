"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Section 4.3 and
Appendix D.2; Chen et al. 2018 / Grathwohl et al. 2019 for the instantaneous change of variables).

In k-diffusion's coordinates y = x/alpha, s = sigma/alpha, and with u = log s, the
probability-flow ODE is dy/du = y - x0(y, s), and along a solution

    d/du log p_u(y(u)) = -div_y (y - x0(y, s)) = -(d - tr(d x0/d y)).

Integrating data -> noise from ksigma_min to ksigma_max gives

    log p_min(y_min) = log p_max(y_max) + int_{u_min}^{u_max} div_y (y - x0) du,

and log p of the native x = alpha y is that minus d log alpha. The divergence is either exact
(the Jacobian trace from d vector-Jacobian products: for small d) or Hutchinson's estimate
E[v^T J v] with Rademacher or Gaussian probes v, drawn once and kept along the path
(FFJORD); both are one batched model call plus one autograd VJP per ODE evaluation. The ODE
is integrated by scipy's ``solve_ivp`` (adaptive, ``method``/``rtol``/``atol``).

The result is the log density of the noisy marginal at ksigma_min (for a small ksigma_min: the
data log density up to that smoothing), in nats, per sample. The model must be differentiable
w.r.t. its input (any torch model is; no fused kernels run here).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .parameterization import canonical_prediction, x0_coefficients
from .sampler import _model_output
from .schedules import Schedule

__all__ = ["log_likelihood", "DIVERGENCES", "PROBES"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _gaussian_prior(schedule: Schedule, alpha: float, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """log N(x; 0, c^2 I) with c the schedule's initial-noise std (the sampler's prior)."""
    c = schedule.init_noise_scale(alpha, sigma)

    def logp(x: torch.Tensor) -> torch.Tensor:
        d = x[0].numel()
        return -0.5 * (x.reshape(x.shape[0], -1) ** 2).sum(1) / c ** 2 - 0.5 * d * math.log(2 * math.pi * c * c)
    return logp


def _probes(kind: str, n: int, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[n * B, ...]: n probe vectors per sample (probe-major)."""
    shape = (n * x.shape[0],) + tuple(x.shape[1:])
    if kind == "gaussian":
        return torch.randn(shape, dtype=torch.float64, generator=generator)
    return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2.0 - 1.0


def log_likelihood(model: Callable, x: torch.Tensor, *, schedule: Schedule, prediction: str = "epsilon",
                   ksigma_min: Optional[float] = None, ksigma_max: Optional[float] = None,
                   divergence: str = "exact", probes: int = 1, probe: str = "rademacher",
                   generator: Optional[torch.Generator] = None, rtol: float = 1e-6, atol: float = 1e-6,
                   method: str = "RK45", prior_logp: Optional[Callable] = None,
                   model_kwargs: Optional[dict] = None, model_dtype: Optional[torch.dtype] = None
                   ) -> Tuple[torch.Tensor, Dict]:
    """log p(x) per sample (float64 [B]) for samples ``x`` (the schedule's native space, taken
    to be at noise level ``ksigma_min``; default the schedule's smallest), via the
    probability-flow ODE of ``model`` (``prediction`` as in ``fastdiff.sample``) up to
    ``ksigma_max`` (default the schedule's largest, which must be finite).

    ``divergence``: 'exact' (the model runs on d copies of the batch per evaluation: for small
    d) or 'hutchinson' (``probes`` copies with ``probe`` vectors, 'rademacher' or 'gaussian',
    from ``generator``; Rademacher probes have the lower variance, as they see only the
    Jacobian's off-diagonal). Tensor ``model_kwargs`` with a batch dimension are repeated to
    match.
    ``prior_logp(x_T) -> [B]``: log density of the native x at ksigma_max (default: the
    Gaussian the sampler starts from, N(0, c^2 I) with c = schedule.init_noise_scale).
    Returns ``(logp, info)``; info: 'nfe' (batched model calls), 'prior_logp', 'delta_logp'
    (the integral), 'x_T' (the encoded noise), 'stderr' (Hutchinson with probes > 1: the
    standard error of the probe mean, per sample)."""
    prediction = canonical_prediction(prediction)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise TypeError(f"x must be a floating-point torch.Tensor with a batch dimension, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    ks_min = schedule.ksigma_min if ksigma_min is None else float(ksigma_min)
    ks_max = schedule.ksigma_max if ksigma_max is None else float(ksigma_max)
    if not (0 < ks_min < ks_max < math.inf):
        raise ValueError(f"need 0 < ksigma_min < ksigma_max < inf (noise levels sigma/alpha), got {ks_min}, {ks_max}")
    from scipy.integrate import solve_ivp

    B, shape, d = x.shape[0], tuple(x.shape), x[0].numel()
    device = x.device
    model_dtype = model_dtype or x.dtype
    kwargs = dict(model_kwargs or {})

    def point(u: float):
        t, a, s = (float(v) for v in schedule.point_at_ksigma(np.float64(math.exp(u))))
        return t, a, s, float(schedule.model_time(t))

    if divergence == "exact":
        # Probe j of every sample is the basis vector e_j; the trace is the sum over j.
        P = d
        v = torch.eye(d, dtype=torch.float64).repeat_interleave(B, dim=0).reshape((P * B,) + shape[1:])
        weights = torch.ones(P, dtype=torch.float64)
    else:
        P = probes
        v = _probes(probe, P, x, generator)
        weights = torch.full((P,), 1.0 / P, dtype=torch.float64)
    v = v.to(device)
    # The model sees P copies of the batch (probe-major): repeat per-sample kwargs to match.
    kwargs = {k: val.repeat((P,) + (1,) * (val.dim() - 1)) if isinstance(val, torch.Tensor) and val.dim() > 0
              and val.shape[0] == B else val for k, val in kwargs.items()}
    nfe = [0]

    def drift_and_vjp(u: float, y: torch.Tensor):
        _, a, s, mt = point(u)
        A_x, A_d = (float(c) for c in x0_coefficients(prediction, a, s))
        y_rep = y.repeat((P,) + (1,) * (len(shape) - 1)).to(model_dtype).requires_grad_(True)
        with torch.enable_grad():
            xn = a * y_rep
            t = torch.full((P * B,), mt, dtype=torch.float64 if model_dtype == torch.float64 else torch.float32,
                           device=device)
            D = _model_output(model(xn, t, **kwargs))
            g = y_rep - (A_x * xn + A_d * D)                     # dy/du = y - x0
            (vjp,) = torch.autograd.grad((g * v.to(g.dtype)).sum(), y_rep)
        nfe[0] += 1
        quad = (vjp.to(torch.float64) * v).reshape(P, B, -1).sum(-1)        # v^T J v  [P, B]
        return g[:B].detach().to(torch.float64), quad

    def rhs(u, state):
        y = torch.from_numpy(state[:B * d]).reshape(shape).to(device)
        dy, quad = drift_and_vjp(u, y)
        return np.concatenate([dy.reshape(-1).cpu().numpy(), quad.reshape(-1).cpu().numpy()])

    _, a0, _, _ = point(math.log(ks_min))
    y0 = (x.detach().to(torch.float64) / a0).reshape(-1).cpu().numpy()
    state0 = np.concatenate([y0, np.zeros(P * B)])
    sol = solve_ivp(rhs, (math.log(ks_min), math.log(ks_max)), state0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solve failed: {sol.message}")
    end = sol.y[:, -1]
    _, aT, sT, _ = point(math.log(ks_max))
    x_T = torch.from_numpy(end[:B * d] * aT).reshape(shape)
    integrals = torch.from_numpy(end[B * d:]).reshape(P, B)                  # int v^T J v du, per probe
    delta = (weights[:, None] * integrals).sum(0)
    prior = (prior_logp or _gaussian_prior(schedule, aT, sT))(x_T.to(device)).to(torch.float64).cpu()
    # log p_y(y_T) = log p_x(x_T) + d log alpha_T; log p_x(x_0) = log p_y(y_0) - d log alpha_0.
    logp = prior + d * math.log(aT) + delta - d * math.log(a0)
    info = {"nfe": nfe[0], "prior_logp": prior, "delta_logp": delta, "x_T": x_T,
            "stderr": (integrals.std(0) / math.sqrt(P)) if divergence == "hutchinson" and P > 1 else None}
    return logp, info
