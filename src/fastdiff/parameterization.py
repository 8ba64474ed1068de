"""Model parameterizations and their exact, linear conversions.

With ``x = alpha * x0 + sigma * eps`` a model output D is one of

* ``epsilon``       D = eps
* ``sample``        D = x0
* ``v_prediction``  D = alpha * eps - sigma * x0          (Salimans & Ho, 2022)
* ``flow``          D = eps - x0  (= dx/dt for alpha = 1 - t, sigma = t)
* ``score``         D = grad log p(x) = -eps / sigma

Each conversion is linear in (x, D): ``x0 = A_x * x + A_d * D``. Solvers are written in terms
of x0 (and of quantities linear in x and x0), so this table is the only place that knows
about parameterizations.
"""
from __future__ import annotations

import numpy as np

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow", "score")
_ALIASES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction", "velocity": "flow",
            "flow_prediction": "flow"}


def canonical_prediction(prediction: str) -> str:
    name = _ALIASES.get(prediction, prediction)
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of "
                         f"{', '.join(PREDICTIONS)} (or aliases {', '.join(_ALIASES)})")
    return name


def x0_coefficients(prediction: str, alpha, sigma):
    """(A_x, A_d) with x0 = A_x * x + A_d * D, for arrays or scalars alpha, sigma (float64)."""
    p = canonical_prediction(prediction)
    a = np.asarray(alpha, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if p == "epsilon":
            return 1.0 / a, -s / a
        if p == "sample":
            return np.zeros_like(a + s), np.ones_like(a + s)
        if p == "v_prediction":
            n = a * a + s * s
            return a / n, -s / n
        if p == "flow":
            n = a + s
            return 1.0 / n, -s / n
        # score: eps = -sigma * D
        return 1.0 / a, s * s / a


def eps_coefficients(prediction: str, alpha, sigma):
    """(E_x, E_d) with eps = E_x * x + E_d * D."""
    A_x, A_d = x0_coefficients(prediction, alpha, sigma)
    a = np.asarray(alpha, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    p = canonical_prediction(prediction)
    if p == "epsilon":  # exact, avoids 1/alpha blowing up at alpha = 0
        return np.zeros_like(a + s), np.ones_like(a + s)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1.0 - a * A_x) / s, -a * A_d / s


def convert(D, x, alpha, sigma, src: str, dst: str = "sample"):
    """Convert a model output tensor ``D`` at state ``x`` from ``src`` to ``dst`` (plain PyTorch,
    for users and tests; samplers fold these coefficients into the fused step instead)."""
    src, dst = canonical_prediction(src), canonical_prediction(dst)
    if src == dst:
        return D
    A_x, A_d = (float(v) for v in x0_coefficients(src, alpha, sigma))
    E_x, E_d = (float(v) for v in eps_coefficients(src, alpha, sigma))
    x0 = A_x * x + A_d * D
    eps = E_x * x + E_d * D
    a, s = float(alpha), float(sigma)
    if dst == "sample":
        return x0
    if dst == "epsilon":
        return eps
    if dst == "v_prediction":
        return a * eps - s * x0
    if dst == "flow":
        return eps - x0
    return -eps / s
