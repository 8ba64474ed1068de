"""Per-sample reductions beside the fused step, in Triton (semantics: fastdiff/ops/reductions.py):

* ``cfg_rescale``        CFG, then the std rescale of Lin et al. (per-sample std of cond and of D)
* ``dynamic_threshold``  Imagen's dynamic thresholding (per-sample quantile of |x0|)
* ``error_norm``         the scaled RMS error norm of adaptive step-size control
* ``per_sample_norm``    per-sample L2 norms

Every reduction is two-stage and deterministic: a kernel writes one partial result per
(sample, block) and a few torch ops on the device combine the partials (no atomics on floats, no
host sync). Variances combine block means and squared deviations with Chan et al.'s pairwise
formula (float64), not sums of squares, so a large mean does not cancel the variance away.

The quantile is exact: a radix select on the bits of |x| (for non-negative floats the bit
pattern orders like the value) finds the two order statistics torch.quantile interpolates,
4 passes of 8 bits, with integer histograms; then the same torch.lerp as the reference. So
dynamic thresholding equals the reference bit for bit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import EXACT_FP, dense_rows, sample_size

BLOCK = 2048
NUM_WARPS = 4
RADIX_BITS = 8


def _grid(B: int, M: int):
    return (triton.cdiv(M, BLOCK), B)


@triton.jit
def _block_moments(v, mask, n):
    """(mean, sum of squared deviations) of the masked values of one block."""
    mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / n
    dev = tl.where(mask, v - mean, 0.0)
    return mean, tl.sum(dev * dev, axis=0)


@triton.jit
def cfg_moments_kernel(c_ptr, u_ptr, part_ptr, M, c_sb, u_sb, g, NUM_BLOCKS, BLOCK: tl.constexpr):
    """part[b, blk] = (n, mean(c), M2(c), mean(D), M2(D)) over block blk of sample b; D = u + g(c - u)."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = blk * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    c = tl.load(c_ptr + b * c_sb + m, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * u_sb + m, mask=mask, other=0.0).to(tl.float32)
    d = u + g * (c - u)
    n = tl.minimum(M - blk * BLOCK, BLOCK).to(tl.float32)
    mean_c, m2_c = _block_moments(c, mask, n)
    mean_d, m2_d = _block_moments(d, mask, n)
    out = part_ptr + (b * NUM_BLOCKS + blk) * 5
    tl.store(out + 0, n)
    tl.store(out + 1, mean_c)
    tl.store(out + 2, m2_c)
    tl.store(out + 3, mean_d)
    tl.store(out + 4, m2_d)


@triton.jit
def cfg_scale_kernel(c_ptr, u_ptr, factor_ptr, out_ptr, M, c_sb, u_sb, g, HAS_FACTOR: tl.constexpr,
                     BLOCK: tl.constexpr):
    """out[b] = (u + g (c - u)) * factor[b], float32 (dense [B, M])."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = blk * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    c = tl.load(c_ptr + b * c_sb + m, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * u_sb + m, mask=mask, other=0.0).to(tl.float32)
    d = u + g * (c - u)
    if HAS_FACTOR:
        d = d * tl.load(factor_ptr + b)
    tl.store(out_ptr + b * M + m, d, mask=mask)


@triton.jit
def sum_squares_kernel(a_ptr, b_ptr, ref_ptr, part_ptr, M, a_sb, b_sb, ref_sb, rtol, atol, NUM_BLOCKS,
                       SCALED_DIFF: tl.constexpr, BLOCK: tl.constexpr):
    """part[s, blk] = sum over the block of a^2, or with SCALED_DIFF of ((a - b) / delta)^2 where
    delta = max(rtol * max(|a|, |ref|), atol) (the error norm of adaptive step-size control)."""
    blk = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    m = blk * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    a = tl.load(a_ptr + s * a_sb + m, mask=mask, other=0.0).to(tl.float32)
    if SCALED_DIFF:
        bb = tl.load(b_ptr + s * b_sb + m, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(ref_ptr + s * ref_sb + m, mask=mask, other=0.0).to(tl.float32)
        delta = tl.maximum(rtol * tl.maximum(tl.abs(a), tl.abs(r)), atol)
        a = tl.div_rn(a - bb, delta)
    tl.store(part_ptr + s * NUM_BLOCKS + blk, tl.sum(tl.where(mask, a * a, 0.0), axis=0))


@triton.jit
def abs_digit_histogram_kernel(x_ptr, prefix_ptr, hist_ptr, M, x_sb, SHIFT: tl.constexpr, RANKS: tl.constexpr,
                               BLOCK: tl.constexpr):
    """For each sample b and each rank r: the histogram of bits [SHIFT, SHIFT + 8) of |x|'s bit
    pattern over the elements whose higher bits equal prefix[b, r]'s (integer atomics: exact)."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = blk * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    bits = tl.abs(tl.load(x_ptr + b * x_sb + m, mask=mask, other=0.0).to(tl.float32)).to(tl.int32, bitcast=True)
    digit = (bits >> SHIFT) & 255
    bins = tl.arange(0, 256)
    for r in tl.static_range(RANKS):
        if SHIFT + 8 >= 32:
            match = mask
        else:
            prefix = tl.load(prefix_ptr + b * RANKS + r)
            match = mask & ((bits >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        h = tl.histogram(digit, 256, mask=match)
        tl.atomic_add(hist_ptr + (b * RANKS + r) * 256 + bins, h)


@triton.jit
def clamp_divide_kernel(x_ptr, s_ptr, out_ptr, M, x_sb, BLOCK: tl.constexpr):
    """out[b] = max(min(x, s[b]), -s[b]) / s[b] (IEEE division), float32 (dense [B, M])."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = blk * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    x = tl.load(x_ptr + b * x_sb + m, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + b)
    tl.store(out_ptr + b * M + m, tl.div_rn(tl.maximum(tl.minimum(x, s), -s), s), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launchers (arguments validated by fastdiff.ops.reductions; float32 math, not float64)

def _rows(t: torch.Tensor):
    """(B, M, tensor addressable as dense [B, M] rows, batch stride)."""
    B, M = t.shape[0], sample_size(t)
    tk, sb = dense_rows(t.reshape(B, 1) if t.dim() == 1 else t)
    return B, M, tk, sb


def _combine_moments(n, mean, m2):
    """Chan et al.: merge per-block (n, mean, M2) along dim 1 (float64) into per-sample (N, M2)."""
    n, mean, m2 = n.double(), mean.double(), m2.double()
    N = n.sum(1)
    grand = (n * mean).sum(1) / N
    return N, m2.sum(1) + (n * (mean - grand[:, None]) ** 2).sum(1)


def cfg_rescale(cond: torch.Tensor, uncond: torch.Tensor, g: float, rescale: float) -> torch.Tensor:
    """D = u + g (c - u), then D * (rescale * std(c) / std(D) + 1 - rescale) per sample; float32."""
    B, M, ck, c_sb = _rows(cond)
    _, _, uk, u_sb = _rows(uncond)
    out = torch.empty(cond.shape, dtype=torch.float32, device=cond.device)
    factor = None
    if rescale != 0.0:
        nb = triton.cdiv(M, BLOCK)
        part = torch.empty(B, nb, 5, dtype=torch.float32, device=cond.device)
        cfg_moments_kernel[_grid(B, M)](ck, uk, part, M, c_sb, u_sb, float(g), nb, BLOCK=BLOCK,
                                        num_warps=NUM_WARPS, **EXACT_FP)
        N, m2_c = _combine_moments(part[..., 0], part[..., 1], part[..., 2])
        _, m2_d = _combine_moments(part[..., 0], part[..., 3], part[..., 4])
        std_c, std_d = (m2_c / (N - 1)).sqrt().float(), (m2_d / (N - 1)).sqrt().float()   # Bessel, as torch.std
        ratio = torch.where(std_d > 0, std_c / torch.where(std_d > 0, std_d, 1.0), 1.0)
        factor = (rescale * ratio + (1.0 - rescale)).contiguous()
    cfg_scale_kernel[_grid(B, M)](ck, uk, out if factor is None else factor, out, M, c_sb, u_sb, float(g),
                                  HAS_FACTOR=factor is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, **EXACT_FP)
    return out


def _sum_squares(a, b=None, ref=None, rtol=0.0, atol=0.0) -> torch.Tensor:
    """Per-sample sums (float64, [B]) of a^2 or of the scaled difference squared."""
    B, M, ak, a_sb = _rows(a)
    bk, b_sb = (ak, a_sb) if b is None else _rows(b)[2:]
    rk, r_sb = (ak, a_sb) if ref is None else _rows(ref)[2:]
    nb = triton.cdiv(M, BLOCK)
    part = torch.empty(B, nb, dtype=torch.float32, device=a.device)
    sum_squares_kernel[_grid(B, M)](ak, bk, rk, part, M, a_sb, b_sb, r_sb, float(rtol), float(atol), nb,
                                    SCALED_DIFF=b is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, **EXACT_FP)
    return part.double().sum(1)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return _sum_squares(x).sqrt().float()


def error_norm(a, b, ref, rtol: float, atol: float) -> torch.Tensor:
    return (_sum_squares(a, b, ref, rtol, atol).sum() / a.numel()).sqrt().float()


def per_sample_abs_order_statistics(x: torch.Tensor, ranks) -> torch.Tensor:
    """[B, len(ranks)] float32: the ranks[r]-th smallest |x| of each sample (0-based), exactly."""
    B, M, xk, x_sb = _rows(x)
    R = len(ranks)
    k = torch.tensor(ranks, dtype=torch.int64, device=x.device).repeat(B, 1)          # [B, R]
    prefix = torch.zeros(B, R, dtype=torch.int32, device=x.device)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        hist = torch.zeros(B, R, 256, dtype=torch.int32, device=x.device)
        abs_digit_histogram_kernel[_grid(B, M)](xk, prefix, hist, M, x_sb, SHIFT=shift, RANKS=R, BLOCK=BLOCK,
                                                num_warps=NUM_WARPS, **EXACT_FP)
        cum = hist.to(torch.int64).cumsum(-1)
        digit = (cum <= k[..., None]).sum(-1)                                # the bin holding rank k
        below = torch.gather(torch.nn.functional.pad(cum, (1, 0)), -1, digit[..., None])[..., 0]
        k = k - below
        prefix = prefix | (digit.to(torch.int32) << shift)
    return prefix.view(torch.float32)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """s = the ``ratio`` quantile of |x0| per sample (torch.quantile's linear interpolation),
    clamped to [1, max_value]; then clamp(x0, -s, s) / s, float32."""
    B, M, xk, x_sb = _rows(x0)
    pos = ratio * (M - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, M - 1)
    v = per_sample_abs_order_statistics(x0, (lo, hi))
    s = v[:, 0] if hi == lo or pos == lo else torch.lerp(v[:, 0], v[:, 1], pos - lo)
    s = s.clamp(min=1.0, max=max_value).contiguous()
    out = torch.empty(x0.shape, dtype=torch.float32, device=x0.device)
    clamp_divide_kernel[_grid(B, M)](xk, s, out, M, x_sb, BLOCK=BLOCK, num_warps=NUM_WARPS, **EXACT_FP)
    return out
