"""Philox-4x32-10 Gaussian noise in Triton, the stream of fastdiff/reference/philox.py.

The integer stream is ``tl.philox`` (Triton's Philox-4x32-10, whose rounds and key schedule are
the reference's) with key = (seed lo, seed hi) and counter = (g lo, g hi, noise_id, 0) for group
g = i // 4 of flat element i: bit-identical to ``fastdiff.reference.philox.philox_uint32``.

Box-Muller uses the hand-written Cephes logf/sincosf of csrc/step_math.h, operation for
operation, compiled without FMA contraction or flush-to-zero (``EXACT_FP``): the normals are then
bit-identical to the C++ CPU backend, and within a few ulp of the PyTorch reference (whose
log/sin/cos come from the platform's libm).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import EXACT_FP, INT32_MAX, as_int32, key_words

BLOCK_GROUPS = 256          # groups (of 4 elements) per program of the standalone kernels
_TWO_M24 = tl.constexpr(5.9604644775390625e-08)     # 2^-24
_TWO_PI_F32 = tl.constexpr(6.2831854820251465)      # float32(2*pi), as fastdiff.reference.philox


@triton.jit
def philox_words(g, seed_lo, seed_hi, noise_id):
    """The 4 uint32 words of groups ``g`` (int32 or int64 tensor) of the stream (seed, noise_id);
    seed_lo/seed_hi/noise_id are int32 scalars holding uint32 bits."""
    c0 = g.to(tl.uint32)
    zero = c0 * 0
    if tl.constexpr(g.dtype.primitive_bitwidth) > 32:
        c1 = (g >> 32).to(tl.uint32)
    else:
        c1 = zero
    c2 = zero + noise_id.to(tl.uint32, bitcast=True)
    seed = (seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | \
        seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    return tl.philox(seed, c0, c1, c2, zero)


@triton.jit
def _log_pos(x):
    """Natural log of positive normal float32 x: step_math.h's log_pos, same operations."""
    b = x.to(tl.int32, bitcast=True)
    e = (b >> 23) - 127
    mb = (b & 0x007FFFFF) | 0x3F800000                 # mantissa in [1, 2)
    big = mb >= 0x3FB504F3                             # m >= sqrt(2)
    mb = tl.where(big, mb - 0x00800000, mb)            # m in [sqrt(1/2), sqrt(2))
    e = tl.where(big, e + 1, e)
    f = mb.to(tl.float32, bitcast=True) - 1.0
    z = f * f
    y = 7.0376836292E-2 * f - 1.1514610310E-1
    y = y * f + 1.1676998740E-1
    y = y * f - 1.2420140846E-1
    y = y * f + 1.4249322787E-1
    y = y * f - 1.6668057665E-1
    y = y * f + 2.0000714765E-1
    y = y * f - 2.4999993993E-1
    y = y * f + 3.3333331174E-1
    y = (y * f) * z
    fe = e.to(tl.float32)
    y = y + (-2.12194440E-4) * fe
    y = y + (-0.5) * z
    r = f + y
    r = r + 0.693359375 * fe
    return r


@triton.jit
def _sincos_0_2pi(th):
    """(sin th, cos th) for th in [0, 2*pi]: step_math.h's sincos_0_2pi, same operations."""
    j = (th * 1.27323954473516).to(tl.int32)
    j = j + (j & 1)
    yj = j.to(tl.float32)
    r = th - yj * 0.78515625
    r = r - yj * 0.00024191336706280708
    r = r - yj * 3.0385471916360984e-11
    r = r - yj * 3.0616171314629196e-17
    z = r * r
    sp = (-1.9515295891E-4) * z + 8.3321608736E-3
    sp = sp * z - 1.6666654611E-1
    sp = (sp * z) * r + r
    cp = 2.443315711809948E-5 * z - 1.388731625493765E-3
    cp = cp * z + 4.166664568298827E-2
    cp = ((cp * z) * z - 0.5 * z) + 1.0
    q = (j >> 1) & 3
    swap = (q & 1) != 0
    ss = tl.where(swap, cp, sp)
    cc = tl.where(swap, sp, cp)
    ss = tl.where((q & 2) != 0, -ss, ss)
    cc = tl.where(((q + 1) & 2) != 0, -cc, cc)
    return ss, cc


@triton.jit
def _box_muller(ra, rb):
    """Two uint32 words -> two standard normals (fastdiff.reference.philox.box_muller)."""
    u1 = ((ra >> 8) + 1).to(tl.int32).to(tl.float32) * _TWO_M24     # (0, 1]
    u2 = (rb >> 8).to(tl.int32).to(tl.float32) * _TWO_M24           # [0, 1)
    rad = tl.sqrt_rn(-2.0 * _log_pos(u1))
    s, c = _sincos_0_2pi(u2 * _TWO_PI_F32)
    return rad * c, rad * s


@triton.jit
def philox_normal_block(first_group, seed_lo, seed_hi, noise_id, NUM_GROUPS: tl.constexpr):
    """The 4*NUM_GROUPS normals of groups first_group .. first_group + NUM_GROUPS - 1, in element
    order: element 4*g + k takes z_k of group g."""
    g = first_group + tl.arange(0, NUM_GROUPS)
    r0, r1, r2, r3 = philox_words(g, seed_lo, seed_hi, noise_id)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    # join(join(z0, z2), join(z1, z3))[g, a, b] = z_(2a+b): row-major flattening is element order.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * NUM_GROUPS])


@triton.jit(do_not_specialize=["first_group", "seed_lo", "seed_hi", "noise_id"])
def philox_uint32_kernel(out_ptr, num_groups, first_group, seed_lo, seed_hi, noise_id, BLOCK_GROUPS: tl.constexpr):
    """out: int64 [num_groups, 4], the raw words of groups first_group .. first_group + num_groups - 1."""
    g = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    mask = g < num_groups
    r0, r1, r2, r3 = philox_words(first_group + g, seed_lo, seed_hi, noise_id)
    tl.store(out_ptr + 4 * g + 0, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * g + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * g + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * g + 3, r3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "noise_id"])
def philox_normal_kernel(out_ptr, numel, seed_lo, seed_hi, noise_id, BLOCK_GROUPS: tl.constexpr,
                         INDEX_64: tl.constexpr):
    """out: float32 [numel], element i = z_(i%4) of group i//4."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    z = philox_normal_block(pid * BLOCK_GROUPS, seed_lo, seed_hi, noise_id, BLOCK_GROUPS)
    offs = pid * (4 * BLOCK_GROUPS) + tl.arange(0, 4 * BLOCK_GROUPS)
    tl.store(out_ptr + offs, z, mask=offs < numel)


# ---------------------------------------------------------------------------------------------
# Host launchers (arguments already validated by fastdiff.ops)
# ---------------------------------------------------------------------------------------------

def philox_uint32(numel: int, seed: int, noise_id: int, device, first_group: int = 0) -> torch.Tensor:
    """int64 [ceil(numel/4), 4] of uint32 words, as fastdiff.reference.philox.philox_uint32; from group
    ``first_group`` on (the counter's high word is in use past 2**32 groups)."""
    groups = (numel + 3) // 4
    out = torch.empty(groups, 4, dtype=torch.int64, device=device)
    if groups:
        lo, hi = key_words(seed)
        grid = (triton.cdiv(groups, BLOCK_GROUPS),)
        philox_uint32_kernel[grid](out, groups, first_group, lo, hi, as_int32(noise_id),
                                   BLOCK_GROUPS=BLOCK_GROUPS, **EXACT_FP)
    return out


def philox_normal(shape, seed: int, noise_id: int, device) -> torch.Tensor:
    """float32 standard normals of ``shape`` (fastdiff.reference.philox.philox_normal's stream)."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    numel = out.numel()
    if numel:
        lo, hi = key_words(seed)
        grid = (triton.cdiv(numel, 4 * BLOCK_GROUPS),)
        philox_normal_kernel[grid](out, numel, lo, hi, as_int32(noise_id),
                                   BLOCK_GROUPS=BLOCK_GROUPS, INDEX_64=numel + 4 * BLOCK_GROUPS > INT32_MAX,
                                   **EXACT_FP)
    return out

