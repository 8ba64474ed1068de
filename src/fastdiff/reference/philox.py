"""Philox-4x32-10 Gaussian noise in plain PyTorch: the oracle for the C++/CUDA/Triton versions.

The stream is defined element by element so every backend produces the same values whatever
its thread count or launch grid:

* key     = (seed & 0xffffffff, seed >> 32)
* counter = (g & 0xffffffff, g >> 32, noise_id, 0) for the group g = i // 4 of flat element i
  (row-major over the logical shape, so a sample's noise does not depend on the batch size)
* the 4 output words r0..r3 of group g give 4 normals by Box-Muller, in float32:
    u1 = ((r0 >> 8) + 1) * 2^-24   (in (0, 1])      u2 = (r1 >> 8) * 2^-24   (in [0, 1))
    rad = sqrt(-2 * log(u1)),  th = 2*pi*u2,  z0 = rad*cos(th),  z1 = rad*sin(th)
  and likewise (r2, r3) -> (z2, z3). Element i takes z_(i % 4).

The integer stream is bit-identical across backends; the normals agree up to the last bits of
each platform's logf/sinf/cosf.
"""
from __future__ import annotations

import math

import numpy as np
import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831854820251465  # float32(2*pi)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a * b for a constant a and int64 tensor b holding uint32 values.
    Split into 16-bit halves so no intermediate leaves int64's positive range."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & MASK32, lo & MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32 with 10 rounds on int64 tensors holding uint32 words."""
    for i in range(10):
        if i:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _check_seed(seed: int, noise_id: int):
    """(seed, noise_id) as Python ints; Python or numpy integers, never bools or floats."""
    out = []
    for name, v, hi in (("seed", seed, 2 ** 64), ("noise_id", noise_id, 2 ** 32)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if not 0 <= int(v) < hi:
            raise ValueError(f"{name} must be in [0, 2**{hi.bit_length() - 1}), got {v}")
        out.append(int(v))
    return out


def philox_uint32(numel: int, seed: int, noise_id: int, device=None) -> torch.Tensor:
    """The raw words: an int64 tensor [ceil(numel/4), 4] of uint32 values."""
    seed, noise_id = _check_seed(seed, noise_id)
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    c0, c1 = g & MASK32, g >> 32
    c2 = torch.full_like(g, noise_id)
    c3 = torch.zeros_like(g)
    r = philox4x32_10(c0, c1, c2, c3, seed & MASK32, (seed >> 32) & MASK32)
    return torch.stack(r, dim=1)


def box_muller(r: torch.Tensor) -> torch.Tensor:
    """[G, 4] uint32 words -> [G, 4] float32 normals, exactly as the module docstring says."""
    scale = 2.0 ** -24
    u1 = ((r[:, 0::2] >> 8) + 1).to(torch.float32) * scale   # words 0 and 2
    u2 = (r[:, 1::2] >> 8).to(torch.float32) * scale         # words 1 and 3
    rad = torch.sqrt(-2.0 * torch.log(u1))
    th = u2 * TWO_PI_F32
    z = torch.empty(r.shape[0], 4, dtype=torch.float32, device=r.device)
    z[:, 0::2] = rad * torch.cos(th)
    z[:, 1::2] = rad * torch.sin(th)
    return z


def philox_normal(shape, seed: int, noise_id: int, device=None) -> torch.Tensor:
    """Standard normal float32 tensor of ``shape``, element i = z_(i%4) of group i//4."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    z = box_muller(philox_uint32(numel, seed, noise_id, device))
    return z.reshape(-1)[:numel].reshape(shape)
