"""Attention for diffusion transformers and U-Nets (inference forward), over interchangeable
backends:

* ``triton``     fastdiff's flash-attention kernel (kernels/attention.py): CUDA tensors (or the
                 CPU under TRITON_INTERPRET=1), float32/float16/bfloat16, head dims up to 128,
                 joint attention without concatenating the key/value sources;
* ``sdpa``       ``torch.nn.functional.scaled_dot_product_attention`` (any device);
* ``reference``  plain matmul-softmax in float32 (float64 for float64 inputs): the test oracle.

``backend="auto"`` takes the highest-priority of these that supports the inputs (one registry
with the kernel ops: fastdiff.ops.backends). Layout (B, H, N, D);
q, k and v share batch, heads, head dim, dtype and device. ``bias`` is an additive float bias
or a boolean mask (True = attend, as SDPA), broadcastable to (B, H, Nq, Nkv). A query row whose
keys are all masked out gives zeros (as torch's SDPA does).

    out = attention(q, k, v)                                  # self- or cross-attention
    out = joint_attention(q, k_img, v_img, k_txt, v_txt)      # = attention over [img; txt] keys

MMDiT / Flux attend the concatenated image and text queries over the concatenated keys; with
``joint_attention`` that is one call per query source, and no concatenation at all.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from . import ops as _ops  # noqa: F401  (registers every backend)
from .ops.backends import ATTENTION_OP, Backend, RegistryView, implements, select
from .reference.attention import attention as reference_attention  # noqa: F401  (public name)

__all__ = ["attention", "joint_attention", "reference_attention", "ATTENTION_BACKENDS"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# The attention backends are the registry's backends implementing the "attention" op (triton,
# sdpa, reference), highest priority first; fastdiff.ops.backends.select chooses among them.
ATTENTION_BACKENDS: Mapping[str, Backend] = RegistryView(lambda b: implements(b, ATTENTION_OP))


def _check_qkv(q, pairs) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must have dtype in {[str(d) for d in _DTYPES]}, got {q.dtype}")
    B, H, _, D = q.shape
    if D == 0:
        raise ValueError("q has head dim 0")
    for k_name, k, v_name, v in pairs:
        for name, t in ((k_name, k), (v_name, v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must be on one device")
            if t.shape[0] != B:
                raise ValueError(f"{name} has batch {t.shape[0]} but q has {B}")
            if t.shape[1] != H:
                raise ValueError(f"{name} has {t.shape[1]} heads but q has {H}")
            if t.shape[3] != D:
                raise ValueError(f"{name} has head dim {t.shape[3]} but q has {D}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"{k_name} has {k.shape[2]} tokens but {v_name} has {v.shape[2]}")


def _prepare_bias(bias, q: torch.Tensor, n_kv: int) -> Optional[torch.Tensor]:
    """The bias as a float tensor expanded (a view, no copy) to (B, H, Nq, Nkv)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], n_kv)
    try:
        ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"bias must broadcast to (batch, heads, q tokens, kv tokens) = {target}, "
                         f"got shape {tuple(bias.shape)}")
    if bias.dtype == torch.bool:
        md = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = torch.zeros(bias.shape, dtype=md, device=bias.device).masked_fill(~bias, float("-inf"))
    elif not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point or bool tensor, got {bias.dtype}")
    return bias.expand(target)


def _check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _run(q, sources, bias, scale, backend) -> torch.Tensor:
    _check_qkv(q, sources)
    n_kv = sum(k.shape[2] for _, k, _, _ in sources)
    if n_kv == 0:
        raise ValueError("attention needs at least one key/value token")
    bias = _prepare_bias(bias, q, n_kv)
    scale = _check_scale(scale)
    tensors = [q] + [t for _, k, _, v in sources for t in (k, v)] + ([bias] if bias is not None else [])
    kv = [t for _, k, _, v in sources for t in (k, v)]
    return select(ATTENTION_OP, backend, tensors).attention(q, *kv, bias=bias, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, H, N, D) tensors (scale defaults to 1/sqrt(D));
    a new (B, H, Nq, D) tensor of q's dtype."""
    return _run(q, [("k", k, "v", v)], bias, scale, backend)


def joint_attention(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of q over the keys/values of two sources, [k1; k2] and [v1; v2] along the
    tokens (image then text tokens, as MMDiT / Flux), without concatenating them on the triton
    backend. ``bias`` broadcasts to (B, H, Nq, N1 + N2)."""
    return _run(q, [("k1", k1, "v1", v1), ("k2", k2, "v2", v2)], bias, scale, backend)
