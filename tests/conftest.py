"""Fixtures, paths and tolerance rules shared by every test file.

Nothing here (and no test) edits ``sys.path``: the tests import the *installed* fastdiff (editable
or not; the checkout keeps the package under ``src/``, so the checkout root on ``sys.path`` never
shadows it), and ``benchmarks`` from the checkout root, which pytest puts on the path through
``pythonpath`` in pyproject.toml.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on one thread. The tensors here are small, and on a shared 2-core
    machine OpenMP threads that spin-wait for a descheduled peer made them up to 20x slower; no
    result depends on the count (tests of thread-count invariance set it themselves)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Tolerances against a peer library (diffusers, k-diffusion, scipy).
#
# The rule, stated once: a comparison with a peer may not demand more than the peer's own
# precision. That precision is measured, not guessed: either the peer's result in its working
# dtype against the same computation in float64 (``peer_tolerance(peer, peer64)``), plus, where the
# peer rounds its *inputs* to its dtype, how much a last-bits nudge of those inputs moves the
# result (``nudge_tolerance(fn, x)``); or, where the peer cannot run in float64, the rounding of its
# dtype applied to each of the ``ops`` operations that produced the value (``dtype_tolerance``). A margin of PEER_MARGIN covers the
# different (but equally valid) order of operations on our side.
PEER_MARGIN = 4.0


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def peer_tolerance(peer, peer64, floor_ulps: float = 2.0) -> np.ndarray:
    """Elementwise absolute tolerance: PEER_MARGIN x |peer - peer64|, floored at ``floor_ulps``
    ulps of the peer's dtype (so an exactly-rounded peer still gets its last bits)."""
    dtype = peer.dtype if isinstance(peer, torch.Tensor) else torch.float32
    p, p64 = _np(peer), _np(peer64)
    eps = torch.finfo(dtype).eps
    return PEER_MARGIN * np.abs(p - p64) + floor_ulps * eps * np.abs(p64)


def nudge_tolerance(fn, x, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Elementwise absolute tolerance: PEER_MARGIN x the largest change of ``fn``'s float64 output
    when its input ``x`` moves by one ulp of ``dtype`` either way (the peer's input rounding)."""
    x64 = torch.as_tensor(_np(x))
    eps = torch.finfo(dtype).eps
    base = _np(fn(x64))
    up, down = _np(fn(x64 * (1 + eps))), _np(fn(x64 * (1 - eps)))
    return PEER_MARGIN * np.maximum(np.abs(up - base), np.abs(down - base))


def dtype_tolerance(peer, ops: int = 1, dtype: torch.dtype | None = None) -> np.ndarray:
    """Elementwise absolute tolerance for a peer computed in ``dtype`` (default: the peer tensor's,
    else float32) through ``ops`` rounded operations: PEER_MARGIN x ops x eps x |value|."""
    if dtype is None:
        dtype = peer.dtype if isinstance(peer, torch.Tensor) and peer.is_floating_point() else torch.float32
    eps = torch.finfo(dtype).eps
    return PEER_MARGIN * max(int(ops), 1) * eps * np.abs(_np(peer))


def assert_close_to_peer(ours, peer, tol, what: str = "value"):
    """|ours - peer| <= tol elementwise, with a message that names the worst element."""
    o, p = _np(ours), _np(peer)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), p.shape)
    err = np.abs(o - p)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, err - tol, -np.inf))), p.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {p.size} elements beyond the peer's precision; "
                             f"worst at {i}: ours {o[i]!r}, peer {p[i]!r}, |diff| {err[i]:.3g} > tol {tol[i]:.3g}")
