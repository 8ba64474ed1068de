"""Noise interpolation (fastdiff.interpolation): slerp's geometry, and deterministic sampling
along the path."""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff import DiscreteVP
from fastdiff.interpolation import sample_slerp_path, slerp
from fastdiff.models import GaussianMixture


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _angle(a, b):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return torch.acos(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1))


def test_endpoints():
    z0, z1 = _randn(3, 4, 8, 8, seed=1), _randn(3, 4, 8, 8, seed=2)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0, rtol=0, atol=1e-14)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=0, atol=1e-14)
    path = slerp(z0, z1, [0.0, 0.25, 1.0])
    assert path.shape == (3,) + z0.shape
    torch.testing.assert_close(path[0], z0, rtol=0, atol=1e-14)
    torch.testing.assert_close(path[2], z1, rtol=0, atol=1e-14)


def test_great_circle_geometry():
    """Orthogonal vectors of equal norm: the norm is preserved exactly and the angle to z0
    grows linearly in t."""
    z0 = torch.zeros(1, 6, dtype=torch.float64)
    z1 = torch.zeros(1, 6, dtype=torch.float64)
    z0[0, 0], z1[0, 1] = 2.0, 2.0
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    path = slerp(z0, z1, ts)
    torch.testing.assert_close(path.reshape(11, -1).norm(dim=1), torch.full((11,), 2.0, dtype=torch.float64))
    angles = torch.stack([_angle(z0, p)[0] for p in path])
    torch.testing.assert_close(angles, ts * math.pi / 2, rtol=0, atol=1e-7)


def test_gaussian_noise_keeps_its_norm_lerp_does_not():
    d = 4 * 32 * 32
    z0, z1 = _randn(4, d, seed=3), _randn(4, d, seed=4)
    mid = slerp(z0, z1, 0.5)
    norms = mid.norm(dim=1) / (0.5 * (z0.norm(dim=1) + z1.norm(dim=1)))
    assert torch.all((norms - 1).abs() < 0.02)                      # nearly orthogonal, nearly equal norms
    lerp_norms = (0.5 * (z0 + z1)).norm(dim=1) / z0.norm(dim=1)
    assert torch.all((lerp_norms - 1 / math.sqrt(2)).abs() < 0.03)  # the straight line shrinks by 1/sqrt(2)


def test_per_sample_angles_and_parallel_fallback():
    z0 = _randn(2, 5, seed=5)
    other = _randn(1, 5, seed=6)[0]
    other = other * z0[0].norm() / other.norm()                      # sample 0: equal norms
    z1 = torch.stack([other, 3.0 * z0[1]])                          # sample 1: parallel to z0[1]
    out = slerp(z0, z1, 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], 0.7 * z0[1] + 0.3 * z1[1])   # linear where sin(theta) ~ 0
    # sample 0 moves along its own great circle: the angle to z0 grows linearly in t
    theta = _angle(z0[:1], z1[:1])[0]
    torch.testing.assert_close(_angle(z0[:1], out[:1])[0], 0.3 * theta, rtol=1e-10, atol=1e-12)
    assert slerp(z0.float(), z1.float(), 0.5).dtype == torch.float32


def test_slerp_bad_input():
    z = _randn(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        slerp(z, _randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="batch dimension"):
        slerp(z[0], z[1], 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        slerp(z, torch.zeros_like(z), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        slerp(z, z + 1, float("nan"))
    with pytest.raises(ValueError, match="t must be"):
        slerp(z, z + 1, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="dot_threshold"):
        slerp(z, z + 1, 0.5, dot_threshold=0.0)
    with pytest.raises(TypeError, match="torch.Tensors"):
        slerp(z.numpy(), z, 0.5)


def test_sampling_along_the_path_is_deterministic():
    schedule = DiscreteVP()
    gm = GaussianMixture.default(schedule, dim=2)
    z0, z1 = _randn(2, 2, seed=7), _randn(2, 2, seed=8)
    kw = dict(steps=8, schedule=schedule, solver="dpmpp_2m", progress=False, state_dtype=torch.float64)
    a = sample_slerp_path(gm, z0, z1, 5, **kw)
    b = sample_slerp_path(gm, z0, z1, 5, **kw)
    assert a.shape == (5, 2, 2) and torch.equal(a, b)
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    for i in (0, 2, 4):   # each point equals sampling its own noise alone
        alone = fastdiff.sample(gm, slerp(z0, z1, float(ts[i])), **{k: v for k, v in kw.items()})
        torch.testing.assert_close(a[i], alone, rtol=0, atol=1e-12)
    # The path is continuous in t: a finer step moves the sample less.
    fine = sample_slerp_path(gm, z0, z1, [0.5, 0.51], **kw)
    assert (fine[1] - fine[0]).abs().max() < (a[3] - a[2]).abs().max()


def test_sample_path_bad_input():
    schedule = DiscreteVP()
    gm = GaussianMixture.default(schedule, dim=2)
    z0, z1 = _randn(1, 2), _randn(1, 2, seed=1)
    with pytest.raises(ValueError, match="deterministic solver"):
        sample_slerp_path(gm, z0, z1, 3, schedule=schedule, solver="euler_ancestral", progress=False)
    with pytest.raises(ValueError, match=">= 2"):
        sample_slerp_path(gm, z0, z1, 1, schedule=schedule, progress=False)
