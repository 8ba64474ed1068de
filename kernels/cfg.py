"""Classifier-free guidance combine in Triton: D = uncond + g * (cond - uncond) in float32, as
fastdiff.reference.cfg_combine (bit-identical in float32: same operations, no FMA).

The fused step folds CFG in already; this standalone op serves callers that want D itself
(CFG rescale, a scheduler from another library).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import EXACT_FP, INT32_MAX, dense_rows, max_offset, sample_size

BLOCK = 2048
NUM_WARPS = 4


@triton.jit(do_not_specialize=["g"])
def cfg_combine_kernel(cond_ptr, uncond_ptr, out_ptr, g, numel, M, cond_sb, uncond_sb,
                       HAS_UNCOND: tl.constexpr, STRIDED: tl.constexpr, INDEX_64: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    if STRIDED:
        b = i // M
        m = i - b * M
        c_off = b * cond_sb + m
        u_off = b * uncond_sb + m
    else:
        c_off = i
        u_off = i
    d = tl.load(cond_ptr + c_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + u_off, mask=mask, other=0.0).to(tl.float32)
        d = u + g * (d - u)
    tl.store(out_ptr + i, d.to(out_ptr.dtype.element_ty), mask=mask)


def cfg_combine(cond: torch.Tensor, uncond, g: float, out_dtype=None) -> torch.Tensor:
    """A new contiguous tensor of ``out_dtype`` (default cond's); arguments already validated.
    ``g`` is rounded to float32, as the reference does."""
    out = torch.empty(cond.shape, dtype=out_dtype or cond.dtype, device=cond.device)
    numel = out.numel()
    if numel == 0:
        return out
    if cond.dim() == 0:
        cond, uncond = cond.reshape(1), None if uncond is None else uncond.reshape(1)
    M = sample_size(cond)
    ck, c_sb = dense_rows(cond)
    uk, u_sb = dense_rows(uncond)
    strided = c_sb != M or (uk is not None and u_sb != M)
    index_64 = max(max_offset(ck), max_offset(uk), numel) + BLOCK > INT32_MAX
    cfg_combine_kernel[(triton.cdiv(numel, BLOCK),)](
        ck, ck if uk is None else uk, out, float(g), numel, M, c_sb, u_sb or 0,
        HAS_UNCOND=uk is not None, STRIDED=strided, INDEX_64=index_64, BLOCK=BLOCK,
        num_warps=NUM_WARPS, **EXACT_FP)
    return out
