"""iPNDM as ComfyUI / zju-pi diff-sampler write it (sample_ipndm): a list of earlier derivatives,
the equal-step Adams-Bashforth weights by order, x0 itself on a step to sigma = 0. Plain PyTorch
in k-diffusion's coordinates; imports no solver, program or op (the oracle of fastdiff.solvers.ipndm)."""
from __future__ import annotations

from typing import Callable, List

import torch

from ..schedules import Grid
from .common import ODECoordinates


def sample_ipndm(model: Callable, x: torch.Tensor, grid: Grid, prediction: str, noise=None, max_order: int = 4,
                 ode_space: str = "auto") -> torch.Tensor:
    ode = ODECoordinates(model, grid, prediction, ode_space)
    t = ode.s
    y_next = ode.to_y(x, 0)
    buffer: List[torch.Tensor] = []
    for i in range(grid.steps):
        y = y_next
        d = ode.d(y, i)
        order = min(max_order, i + 1)
        if t[i + 1] == 0:                     # denoising step: x0 = y - s d
            y_next = y - t[i] * d
        elif order == 1:
            y_next = y + (t[i + 1] - t[i]) * d
        elif order == 2:
            y_next = y + (t[i + 1] - t[i]) * (3 * d - buffer[-1]) / 2
        elif order == 3:
            y_next = y + (t[i + 1] - t[i]) * (23 * d - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            y_next = y + (t[i + 1] - t[i]) * (55 * d - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        if len(buffer) == max_order - 1 and buffer:
            buffer = buffer[1:] + [d]
        elif max_order > 1:
            buffer.append(d)
    return ode.to_x(y_next, grid.steps)
