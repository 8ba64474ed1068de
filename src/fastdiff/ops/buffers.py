"""Buffers the sampler owns, placed so that concurrent streams do not share an address mod 4096.

A fused step streams several tensors at once (x, the history slots, the model input, the model
output's halves). When their start addresses agree modulo 4096, element i of every stream maps
to the same L1 set and a load can falsely alias an earlier store of another stream (4K aliasing).
Separate allocations of a power-of-two size land at such "aligned" addresses often, and which
case a run gets depends on the allocator's history. Issue 17 measured the SD-1.5 step ~1.9x
slower when aligned on the kernel of that time; the current CPU kernel measured 2.5% at fp32 and
nothing at fp16 (benchmarks/results/issue17_kernel.md), so this is insurance, not a speedup.

``alloc_staggered`` makes the placement deterministic: one allocation, the tensors as views at
offsets that differ modulo 4096 by a fixed stagger (each view 64-byte aligned).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

PAGE = 4096
ALIGN = 64
#: Offset between consecutive buffers modulo 4096 (bytes): 1088 = 17 cache lines (17 is odd, so
#: up to 64 buffers take distinct 64-byte slots mod 4096), and neighbours are >= 1 KiB apart.
DEFAULT_STAGGER = 1088

Spec = Tuple[Sequence[int], torch.dtype]


def _check_spec(i: int, spec) -> Tuple[Tuple[int, ...], torch.dtype]:
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
        raise TypeError(f"alloc_staggered: spec {i} must be a (shape, dtype) pair, got {spec!r}")
    shape, dtype = spec
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"alloc_staggered: spec {i}: dtype must be a torch.dtype, got {dtype!r}")
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"alloc_staggered: spec {i}: shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"alloc_staggered: spec {i}: sizes must be non-negative, got {list(shape)}")
    return shape, dtype


def staggered_offsets(nbytes: Sequence[int], stagger: int = DEFAULT_STAGGER) -> Tuple[List[int], int]:
    """Byte offsets of buffers of the given sizes in one allocation, and its total size.

    Buffer j starts at the first address >= the end of buffer j-1 that is congruent to
    ``j * stagger`` modulo 4096 (so the start offsets mod 4096 are 0, stagger, 2 stagger, ...),
    relative to a page-aligned base."""
    if stagger % ALIGN or not 0 <= stagger < PAGE:
        raise ValueError(f"stagger must be a multiple of {ALIGN} in [0, {PAGE}), got {stagger}")
    offsets, end = [], 0
    for j, n in enumerate(nbytes):
        want = (j * stagger) % PAGE
        start = end + ((want - end) % PAGE)
        offsets.append(start)
        end = start + int(n)
    return offsets, end


def alloc_staggered(*specs: Spec, device: Union[str, torch.device] = "cpu", stagger: int = DEFAULT_STAGGER,
                    fill: Optional[float] = None) -> List[torch.Tensor]:
    """Contiguous tensors of the given (shape, dtype) pairs, as views into one allocation whose
    start addresses differ modulo 4096 by ``stagger`` bytes (0, stagger, 2 stagger, ... mod 4096),
    each 64-byte aligned.

        x, hist, model_in = alloc_staggered(((1, 4, 64, 64), torch.float32),
                                            ((1, 1, 4, 64, 64), torch.float32),
                                            ((2, 4, 64, 64), torch.float16))

    The views share one storage (keep them alive together; ``x.untyped_storage()`` holds all).
    Contents are uninitialised unless ``fill`` is given. On a device other than the CPU the
    placement is irrelevant to caching and the offsets are kept only for uniformity.
    """
    parsed = [_check_spec(i, s) for i, s in enumerate(specs)]
    if not parsed:
        return []
    sizes = [math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in parsed]
    offsets, total = staggered_offsets(sizes, stagger)
    # PAGE extra bytes: room to move the base to a page boundary whatever the allocator returns.
    raw = torch.empty(total + PAGE, dtype=torch.uint8, device=device)
    base = (-raw.data_ptr()) % PAGE
    out = []
    for (shape, dt), off, n in zip(parsed, offsets, sizes):
        view = raw[base + off: base + off + n].view(dt).view(shape)
        if fill is not None:
            view.fill_(fill)
        out.append(view)
    return out


def address_mod_page(t: torch.Tensor) -> int:
    """Where ``t`` starts modulo 4096 (bytes); for benchmarks and tests of placement."""
    return t.data_ptr() % PAGE
