"""The attention oracle: softmax(q k^T * scale + bias) v in plain PyTorch, what every attention
backend (Triton, SDPA) is compared with."""
from __future__ import annotations

import math

import torch

__all__ = ["attention"]


def attention(q, k1, v1, k2=None, v2=None, bias=None, scale=None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in float32 (float64 for float64 q), keys [k1; k2]; rows
    with every key masked give 0."""
    md = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k1 if k2 is None else torch.cat([k1, k2], dim=2)
    v = v1 if v2 is None else torch.cat([v1, v2], dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.to(md), k.to(md).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(md)
    p = torch.softmax(s, dim=-1)
    p = p.masked_fill(torch.isneginf(s).all(dim=-1, keepdim=True), 0.0)
    return torch.matmul(p, v.to(md)).to(q.dtype)
