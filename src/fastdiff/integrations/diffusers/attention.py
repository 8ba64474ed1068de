"""An attention processor for diffusers' ``Attention`` modules that runs ``fastdiff.attention``.

    unet.set_attn_processor(FastdiffAttnProcessor())

It is diffusers' ``AttnProcessor2_0`` (the default processor of U-Nets and DiT/PixArt-style
transformers) with the ``scaled_dot_product_attention`` call replaced by
``fastdiff.attention.attention``, which dispatches to fastdiff's flash-attention kernel where
it runs (CUDA; the CPU under TRITON_INTERPRET=1) and to torch's SDPA elsewhere. The projections,
norms, masks and residual handling are AttnProcessor2_0's, step for step.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import attention as fd_attention

__all__ = ["FastdiffAttnProcessor", "replaceable_processor"]


class FastdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 on ``fastdiff.attention.attention`` (``backend``: "auto", or
    one of fastdiff.attention.ATTENTION_BACKENDS)."""

    def __init__(self, backend: str = "auto"):
        if backend != "auto" and backend not in fd_attention.ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected 'auto' or one of "
                             f"{', '.join(fd_attention.ATTENTION_BACKENDS)}")
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # AttnProcessor2_0 leaves SDPA's default scale, 1/sqrt(head_dim), whatever attn.scale says.
        hidden_states = fd_attention.attention(query, key, value, bias=attention_mask, backend=self.backend)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def replaceable_processor(processor) -> bool:
    """Whether ``processor`` computes what FastdiffAttnProcessor computes: diffusers'
    AttnProcessor2_0 (the default of plain self/cross attention). Others (the legacy AttnProcessor,
    which honours a custom ``attn.scale``; joint, rotary, IP-adapter, ...) are left as they are."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    return type(processor) is AttnProcessor2_0
