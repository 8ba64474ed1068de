"""An analytic data distribution whose denoiser is exact: the oracle model for solver accuracy.

Data: a mixture of Gaussians with diagonal covariances in R^d (d = number of elements per
sample; inputs of any shape [B, ...] are flattened). Under x_t = alpha x0 + sigma eps, component k
of the noisy marginal is N(alpha mu_k, alpha^2 S_k + sigma^2 I), so the posterior mean is

    E[x0 | x_t] = sum_k w_k(x_t) (mu_k + alpha S_k (alpha^2 S_k + sigma^2)^-1 (x_t - alpha mu_k))

with w_k the posterior component weights: every quantity is closed form, for any schedule.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..parameterization import canonical_prediction, convert
from ..schedules import Schedule


class GaussianMixture:
    """``model(x, t)`` returning the exact ``prediction`` of the mixture for ``schedule``.

    means: [K, d]; stds: [K, d] or [K] or a scalar; weights: [K] (normalised here).
    """

    def __init__(self, schedule: Schedule, means, stds=0.5, weights=None, prediction: str = "epsilon"):
        self.schedule = schedule
        self.prediction = canonical_prediction(prediction)
        self.means = torch.as_tensor(np.asarray(means, dtype=np.float64))
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        K, d = self.means.shape
        stds = torch.as_tensor(np.asarray(stds, dtype=np.float64))
        self.stds = stds.reshape(K, 1).expand(K, d).clone() if stds.dim() == 1 else stds.expand(K, d).clone()
        if torch.any(self.stds <= 0):
            raise ValueError("stds must be > 0")
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        if w.shape != (K,) or torch.any(w <= 0):
            raise ValueError(f"weights must be [K] positive numbers, got {tuple(w.shape)}")
        self.weights = w / w.sum()
        self.dim = d
        self.calls = 0

    @classmethod
    def default(cls, schedule: Schedule, dim: int = 2, prediction: str = "epsilon", seed: int = 0):
        """A fixed, well-separated 3-component mixture (the project's standard test problem)."""
        g = np.random.default_rng(seed)
        means = g.normal(size=(3, dim)) * 1.2
        stds = 0.25 + 0.35 * g.random(size=(3, dim))
        return cls(schedule, means, stds, weights=[0.5, 0.3, 0.2], prediction=prediction)

    # -- distribution facts ------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def cov(self) -> torch.Tensor:
        m = self.mean
        second = sum(self.weights[k] * (torch.diag(self.stds[k] ** 2) + torch.outer(self.means[k], self.means[k]))
                     for k in range(len(self.weights)))
        return second - torch.outer(m, m)

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k] * z

    def log_prob(self, x0: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
        """log density of the noisy marginal at (alpha, sigma) (the data density by default)."""
        x = x0.reshape(x0.shape[0], -1).to(torch.float64)
        return torch.logsumexp(self._log_joint(x, alpha, sigma), dim=1)

    def _log_joint(self, x, alpha, sigma):
        var = alpha ** 2 * self.stds.to(x) ** 2 + sigma ** 2                     # [K, d]
        diff = x[:, None, :] - alpha * self.means.to(x)[None]                  # [B, K, d]
        ll = -0.5 * ((diff ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
        return ll + torch.log(self.weights.to(x))[None]

    # -- the exact denoiser ------------------------------------------------------------------
    def x0(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] for per-sample alpha, sigma (tensors [B] or floats)."""
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        if xf.shape[1] != self.dim:
            raise ValueError(f"the mixture has dimension {self.dim}, got inputs of {xf.shape[1]} elements")
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1).expand(B, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(B, 1, 1)
        S = self.stds.to(xf)[None] ** 2                                         # [1, K, d]
        mu = self.means.to(xf)[None]
        var = a ** 2 * S + s ** 2                                               # [B, K, d]
        diff = xf[:, None, :] - a * mu
        logw = -0.5 * ((diff ** 2) / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights.to(xf))[None]
        # softmax by hand: torch.softmax (and .max(dim)) wake the thread pool even for tiny inputs (~15 ms
        # a call on a busy 2-core machine, against microseconds for amax and elementwise ops)
        w = torch.exp(logw - logw.amax(dim=1, keepdim=True))
        w = w / w.sum(dim=1, keepdim=True)                                      # [B, K]
        post = mu + a * S / var * diff                                          # [B, K, d]
        return (w[:, :, None] * post).sum(1).reshape(x.shape)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **unused) -> torch.Tensor:
        self.calls += 1
        tt = self.schedule.t_from_model_time(t.detach().to(torch.float64).cpu().numpy())
        a, s = self.schedule.alpha_sigma(tt)
        x0 = self.x0(x, torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(s)))
        if self.prediction == "sample":
            out = x0
        else:
            B = x.shape[0]
            shape = (B,) + (1,) * (x.dim() - 1)
            at = torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(shape)
            st = torch.from_numpy(np.asarray(s, dtype=np.float64)).reshape(shape)
            xd = x.to(torch.float64)
            eps = (xd - at * x0) / st
            if self.prediction == "epsilon":
                out = eps
            elif self.prediction == "v_prediction":
                out = at * eps - st * x0
            elif self.prediction == "flow":
                out = eps - x0
            else:
                out = -eps / st
        return out.to(x.dtype)

    # -- a high-accuracy reference solution of the probability-flow ODE ------------------------
    def solve_ode(self, x_start: torch.Tensor, ksigma_from: float, ksigma_to: float, rtol: float = 1e-12,
                  atol: float = 1e-12, progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
        """Integrate dy/ds = (y - x0)/s in k-diffusion coordinates (y = x/alpha, s = ksigma) with
        scipy's DOP853; ``x_start`` is in the schedule's native space (x = alpha*y), as is the result.
        ``progress(fraction)``: called as the solve advances (fraction of the way in log ksigma, never
        decreasing, 1.0 at the end); the solve takes tens of seconds for thousands of samples."""
        from scipy.integrate import solve_ivp

        a_from = float(self.schedule.alpha_from_ksigma(np.float64(ksigma_from)))
        a_to = 1.0 if ksigma_to == 0 else float(self.schedule.alpha_from_ksigma(np.float64(ksigma_to)))
        shape = x_start.shape
        y0 = (x_start.to(torch.float64) / a_from).reshape(-1).numpy()
        B = shape[0]

        span = math.log(ksigma_from / ksigma_to) if ksigma_to > 0 else 1.0
        done = [0.0]

        def f(s, yflat):
            if progress is not None and s > 0:
                frac = min(max(math.log(ksigma_from / s) / span, 0.0), 1.0)
                if frac > done[0]:
                    done[0] = frac
                    progress(frac)
            y = torch.from_numpy(yflat).reshape(B, -1)
            x0 = self.x0(y, 1.0, s)  # in y coordinates alpha = 1, sigma = s
            return ((y - x0) / s).reshape(-1).numpy()

        if ksigma_to == 0:
            raise ValueError("integrate to a small positive noise level, then denoise with x0()")
        sol = solve_ivp(f, (ksigma_from, ksigma_to), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        if progress is not None and done[0] < 1.0:
            progress(1.0)
        return torch.from_numpy(sol.y[:, -1] * a_to).reshape(shape)

    def ode_trajectory(self, x_start: torch.Tensor, ksigmas, rtol: float = 1e-10, atol: float = 1e-10):
        """The exact probability-flow ODE solution from ``x_start`` (at ``ksigmas[0]``) at every
        noise level of ``ksigmas`` (a decreasing sequence, or a Grid): a list of tensors, the first
        ``x_start`` itself. The shape ``fastdiff.tune.tune_grid(reference=...)`` takes, as
        ``reference=lambda x, grid: mixture.ode_trajectory(x, grid)``."""
        ks = [float(v) for v in getattr(ksigmas, "ksigma", ksigmas)]
        out, x = [x_start], x_start
        for a, b in zip(ks[:-1], ks[1:]):
            x = self.solve_ode(x, a, b, rtol=rtol, atol=atol)
            out.append(x)
        return out
