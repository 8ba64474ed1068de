"""fastdiff.attention: the public API, its SDPA and reference backends, and bad input. (The Triton
kernel is tested in test_triton_interpret.py.)"""
from __future__ import annotations

import pytest
import torch

from fastdiff.attention import attention, joint_attention, reference_attention


def _qkv(B=2, H=3, Nq=17, Nkv=23, D=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nkv, Nkv))


def test_reference_matches_textbook_softmax():
    q, k, v = _qkv(dtype=torch.float64)
    bias = torch.randn(1, 3, 1, 23, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) / 40 ** 0.5 + bias
    want = torch.exp(s - s.amax(-1, keepdim=True))
    want = (want / want.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(reference_attention(q, k, v, bias=bias.expand(2, 3, 17, 23)), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_reference(dtype, atol):
    q, k, v = _qkv(dtype=dtype)
    got = attention(q, k, v, scale=0.2, backend="sdpa")
    want = attention(q, k, v, scale=0.2, backend="reference")
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_joint_attention_is_attention_over_the_concatenation(backend):
    q, k1, v1 = _qkv(Nkv=30)
    _, k2, v2 = _qkv(Nkv=7, seed=1)
    bias = torch.randn(2, 1, 17, 37)
    got = joint_attention(q, k1, v1, k2, v2, bias=bias, backend=backend)
    want = attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), bias=bias, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_bool_mask_and_fully_masked_rows(backend):
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 17, 23, dtype=torch.bool)
    keep[0, 0, :, 10:] = False          # key padding for sample 0
    keep[1, 0, 4] = False               # query 4 of sample 1 sees nothing -> zeros, as SDPA
    got = attention(q, k, v, bias=keep, backend=backend)
    assert torch.equal(got[1, :, 4], torch.zeros(3, 40))
    want = attention(q[:1], k[:1, :, :10], v[:1, :, :10], backend="reference")
    torch.testing.assert_close(got[:1], want, rtol=0, atol=1e-5)


def test_auto_runs_without_a_gpu():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="reference"), rtol=0, atol=1e-5)


def _bad(q, k, v, error, match, **kw):
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(error, match=match):
        attention(q, k, v, **kw)
    assert all(a.device.type == "meta" or torch.equal(a, b) for a, b in zip((q, k, v), before))


def test_bad_input():
    q, k, v = _qkv()
    _bad(q, k[..., :32], v, ValueError, "k has head dim 32 but q has 40")
    _bad(q, k, v[..., :32], ValueError, "v has head dim 32 but q has 40")
    _bad(q, k[:1], v[:1], ValueError, "k has batch 1 but q has 2")
    _bad(q, k[:, :2], v[:, :2], ValueError, "k has 2 heads but q has 3")
    _bad(q, k, v[:, :, :5], ValueError, "k has 23 tokens but v has 5")
    _bad(q, k.half(), v, TypeError, "k has dtype torch.float16 but q has torch.float32")
    _bad(q, k, v.double(), TypeError, "v has dtype torch.float64")
    _bad(q[0], k, v, ValueError, r"q must be 4-D \(batch, heads, tokens, head_dim\)")
    _bad(q.int(), k.int(), v.int(), TypeError, "q must have dtype in")
    _bad(q, k, v, ValueError, "bias must broadcast to", bias=torch.zeros(2, 3, 17, 22))
    _bad(q, k, v, TypeError, "bias must be a floating-point or bool tensor", bias=torch.zeros(1, dtype=torch.int64))
    _bad(q, k, v, ValueError, "scale must be a finite number", scale=float("nan"))
    _bad(q, k, v, ValueError, "unknown attention backend 'flash'", backend="flash")
    _bad(q, k[:, :, :0], v[:, :, :0], ValueError, "at least one key")
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attention(q, None, v)


def test_inputs_on_different_devices():
    q, k, v = _qkv()
    _bad(q, k.to("meta"), v, ValueError, "k is on meta but q is on cpu")
    _bad(q, k, v, ValueError, "bias is on meta but q is on cpu", bias=torch.zeros(1, device="meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_explicit_triton_without_gpu_lists_the_reason():
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter makes triton available on the CPU")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="attention backend 'triton' cannot run these inputs: .*"):
        attention(q, k, v, backend="triton")
