"""Host-side helpers shared by the Triton launchers: interpreter detection, the Philox key words,
and the memory layout the elementwise kernels accept.

The elementwise kernels address every tensor as ``[B, M]`` rows: element ``i`` of the logical
(row-major) order lives at ``(i // M) * batch_stride + i % M``. So a tensor whose samples are
each dense (a batch slice of a larger buffer, the CFG halves of a batched model output, one slot
of a history stack) is read in place, without a copy; any other layout (channels-last,
transposed) is copied to a dense buffer first by ``dense_rows`` and, for outputs, copied back.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# Compiler options for the elementwise kernels: no FMA contraction and no flush-to-zero, so a
# GPU run reproduces the reference's (and the C++ backend's) order of float32 roundings.
EXACT_FP = {"enable_fp_fusion": False, "enable_reflect_ftz": False}

INT32_MAX = 2 ** 31 - 1


def is_interpreted(kernel) -> bool:
    """True if ``kernel`` was built by ``@triton.jit`` under TRITON_INTERPRET=1 (runs on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def as_int32(word: int) -> int:
    """A uint32 word as the signed int32 with the same bits (kernels bit-cast it back), so the
    argument always has type i32 and never triggers a recompile by value range."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


def key_words(seed: int) -> Tuple[int, int]:
    """The Philox key (seed low word, seed high word) as int32 kernel arguments."""
    return as_int32(seed), as_int32(seed >> 32)


def sample_size(t: torch.Tensor) -> int:
    """M: elements per sample (per index of dim 0)."""
    return math.prod(t.shape[1:])


def batch_stride(t: torch.Tensor) -> Optional[int]:
    """The stride between samples if each sample ``t[b]`` is dense (row-major), else None."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.stride(0) if t.shape[0] > 1 else sample_size(t)


def dense_rows(t: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[int]]:
    """(tensor the kernel may address as [B, M] rows, its batch stride). Copies only when the
    samples of ``t`` are not dense; the caller copies an output back with ``write_back``."""
    if t is None:
        return None, None
    s = batch_stride(t)
    if s is None:
        t = t.contiguous()
        s = sample_size(t)
    return t, s


def write_back(original: Optional[torch.Tensor], used: Optional[torch.Tensor]) -> None:
    """Copy a kernel output into the user's tensor if the kernel wrote a dense copy of it."""
    if original is not None and used is not None and used is not original:
        original.copy_(used)


def max_offset(t: Optional[torch.Tensor]) -> int:
    """The largest element offset the kernel may form for ``t`` (for choosing 64-bit indexing)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
