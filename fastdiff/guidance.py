"""Classifier-free guidance settings.

CFG is linear, D = uncond + g (cond - uncond), so it folds into the fused step as one per-row
coefficient g. Both conventions in use map onto g:

* ``convention="w"``   (diffusers' guidance_scale, k-diffusion): g = w
* ``convention="1+w"`` (Ho & Salimans' w; Imagen):               g = 1 + w

``interval=(ksigma_lo, ksigma_hi)`` applies guidance only at noise levels inside the interval
(Kynkäänniemi et al. 2024); elsewhere g = 1 and the unconditional pass is skipped altogether.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .ops import guidance_scale_to_g
from .program import Point


@dataclass(frozen=True)
class Guidance:
    scale: float
    convention: str = "w"
    interval: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")
        guidance_scale_to_g(self.scale, self.convention)  # validates the convention
        if self.interval is not None:
            lo, hi = self.interval
            if not (0 <= lo < hi):
                raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo < hi (noise levels "
                                 f"sigma/alpha), got {self.interval}")

    @property
    def g(self) -> float:
        return guidance_scale_to_g(self.scale, self.convention)

    def g_at(self, point: Point) -> float:
        """The CFG coefficient at a model evaluation point (1.0 = conditional only)."""
        if self.interval is not None:
            lo, hi = self.interval
            if not (lo <= point.ksigma <= hi):
                return 1.0
        return self.g


def as_guidance(guidance) -> Optional[Guidance]:
    if guidance is None or isinstance(guidance, Guidance):
        return guidance
    if isinstance(guidance, (int, float)):
        return Guidance(float(guidance))
    raise TypeError(f"guidance must be None, a number or a fastdiff.Guidance, got {type(guidance).__name__}")
