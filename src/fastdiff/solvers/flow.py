"""Flow-matching Euler and Heun: names for what euler / heun already are in flow coordinates.

In the flow coordinates y = x/(alpha + sigma), s = sigma/(alpha + sigma) (= x and t for the
rectified-flow schedule alpha = 1 - t, sigma = t) the derivative (y - x0)/s of a flow-prediction
model is its output v = eps - x0, so Euler is x + (t_next - t) v, which is diffusers'
FlowMatchEulerDiscreteScheduler.step, and Heun with an Euler step to t = 0 is
FlowMatchHeunDiscreteScheduler.step (tests/test_solver_zoo.py checks both against diffusers).

The shift lives in the grid: ``make_grid(FlowMatching(), steps, "uniform", shift=s)`` or
``mu=...`` (resolution-dependent, 'exponential' time shift). With ``mu`` the grid is diffusers'
``use_dynamic_shifting=True`` grid exactly. With a static shift diffusers shifts its smallest
time 1/T twice (once in ``__init__``, again in ``set_timesteps``); to reproduce its grid to the
last step use ``FlowMatching(t_min=time_shift(1/T, s))`` with ``shift=s``.
"""
from __future__ import annotations

from .base import register
from .runge_kutta import Euler, Heun


@register("flow_euler")
class FlowEuler(Euler):
    """Euler in flow coordinates (diffusers FlowMatchEulerDiscreteScheduler)."""

    def __init__(self):
        super().__init__(ode_space="flow")


@register("flow_heun")
class FlowHeun(Heun):
    """Heun in flow coordinates, Euler for the step to t = 0 (diffusers FlowMatchHeunDiscreteScheduler)."""

    def __init__(self):
        super().__init__(ode_space="flow")
