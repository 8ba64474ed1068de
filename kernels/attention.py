"""Attention forward for diffusion transformers and U-Nets in Triton (inference; flash-attention
style online softmax, never materializing the Nq x Nkv score matrix).

* layout (B, H, N, D), any strides over B, H, N (the head dim must have stride 1; other inputs
  are copied once by the launcher): (B, N, H, D) projections viewed with ``.transpose(1, 2)``
  are read in place;
* self- and cross-attention (Nq != Nkv: 77 CLIP or 300 T5 text tokens);
* head dims up to 128; others than 16/32/64/128 (40, 72, 80, 96, ...) pad the block to the
  next power of two and mask the padding;
* fp16 / bf16 (tensor-core dots, fp32 accumulation) and fp32 (IEEE fp32 dots);
* an optional additive bias broadcastable to (B, H, Nq, Nkv), addressed by strides (a key
  padding mask of shape (B, 1, 1, Nkv) is read as is);
* joint attention over two key/value sources (image tokens + text tokens, as MMDiT / Flux):
  the kernel walks source 1 and then source 2 in the same online softmax, so the result equals
  attention over their concatenation without building it.

A query row whose keys are all masked (-inf bias everywhere) comes out 0, as in torch's SDPA.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import is_interpreted

MAX_HEAD_DIM = 128
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attend_source(acc, m_i, l_i, q, k_base, v_base, sk_n, sv_n, n_kv, bias_base, sb_n, col0, mask_m, offs_d,
                   qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys/values [0, n_kv) of one source into the running (acc, max m_i, sum l_i).
    Scores are kept in log2 units (exp2 is the fast path on GPUs)."""
    mask_d = offs_d[None, :] < HEAD_DIM
    for start in range(0, n_kv, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_kv
        kv_mask = mask_n[:, None] & mask_d
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + (col0 + offs_n)[None, :] * sb_n, mask=mask_m[:, None] & mask_n[None, :],
                           other=0.0)
            s = s + bias.to(tl.float32) * _LOG2E
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no finite score yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attention_fwd_kernel(
    q_ptr, k1_ptr, v1_ptr, k2_ptr, v2_ptr, bias_ptr, out_ptr,
    sq_b, sq_h, sq_n, sk1_b, sk1_h, sk1_n, sv1_b, sv1_h, sv1_n,
    sk2_b, sk2_h, sk2_n, sv2_b, sv2_h, sv2_n,
    so_b, so_h, so_n, sb_b, sb_h, sb_m, sb_n,
    H, Nq, N1, N2, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, JOINT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < Nq
    mask_d = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    bias_base = bias_ptr + b * sb_b + h * sb_h + offs_m[:, None] * sb_m

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, k1_ptr + b * sk1_b + h * sk1_h, v1_ptr + b * sv1_b + h * sv1_h,
                                   sk1_n, sv1_n, N1, bias_base, sb_n, 0, mask_m, offs_d, qk_scale,
                                   HEAD_DIM, BLOCK_N, HAS_BIAS, DOT_FP32, PRECISION)
    if JOINT:
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, k2_ptr + b * sk2_b + h * sk2_h,
                                       v2_ptr + b * sv2_b + h * sv2_h, sk2_n, sv2_n, N2, bias_base, sb_n, N1,
                                       mask_m, offs_d, qk_scale, HEAD_DIM, BLOCK_N, HAS_BIAS, DOT_FP32, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]     # every key masked: acc = 0, out = 0
    tl.store(out_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def padded_head_dim(head_dim: int) -> int:
    """The block width along the head dim: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(head_dim: int, dtype: torch.dtype, joint: bool = False) -> dict:
    """Block sizes and launch options per (padded head dim, dtype, joint), chosen from a sweep of
    compiled sm_80/sm_90 cubins (BLOCK_M 32-128, BLOCK_N 32-64, 4/8 warps, 2/3 stages): the largest
    tiles that compile without register spills on both architectures, so on paper (not measured).
    The joint kernel pipelines two loops, so it gets fewer stages (half the shared memory).
    benchmarks/results/triton_compile_report.md lists registers and shared memory per variant."""
    d_pad = padded_head_dim(head_dim)
    if dtype == torch.float32:      # IEEE fp32 dots: no tensor cores, keep the tiles small
        cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if joint else \
            dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=128 if d_pad <= 64 else 64, BLOCK_N=64, num_warps=8, num_stages=2 if joint else 3)
    return dict(cfg, enable_fp_fusion=True)     # FMA is fine here (and the fast path)


def _last_dim_unit(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: Optional[torch.Tensor] = None,
              v2: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over keys [k1; k2] (k2/v2 optional), as a new contiguous
    (B, H, Nq, D) tensor of q's dtype. Arguments already validated by fastdiff.attention: 4-D,
    equal B, H, D and dtype; ``bias`` a float tensor already expanded to (B, H, Nq, N1 + N2)."""
    B, H, Nq, D = q.shape
    q, k1, v1, k2, v2 = (_last_dim_unit(t) for t in (q, k1, v1, k2, v2))
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    joint = k2 is not None
    k2_, v2_ = (k2, v2) if joint else (k1, v1)
    N1, N2 = k1.shape[2], k2_.shape[2] if joint else 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = launch_config(D, q.dtype, joint)
    interpreted = is_interpreted(attention_fwd_kernel)
    # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast there; a GPU uses bf16 tensor cores.
    dot_fp32 = q.dtype == torch.float32 or (interpreted and q.dtype == torch.bfloat16)
    sb = bias.stride() if bias is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * H)
    attention_fwd_kernel[grid](
        q, k1, v1, k2_, v2_, q if bias is None else bias, out,
        *q.stride()[:3], *k1.stride()[:3], *v1.stride()[:3], *k2_.stride()[:3], *v2_.stride()[:3],
        *out.stride()[:3], *sb,
        H, Nq, N1, N2, scale * 1.4426950408889634,
        HEAD_DIM=D, D_PAD=padded_head_dim(D), HAS_BIAS=bias is not None, JOINT=joint, DOT_FP32=dot_fp32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg)
    return out
