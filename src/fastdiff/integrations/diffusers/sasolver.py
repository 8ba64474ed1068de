"""The SASolverScheduler drop-in.

    from fastdiff.integrations.diffusers import SASolverScheduler
    pipe.scheduler = SASolverScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class (config, ``set_timesteps``, ``sigmas``, ``tau_func`` are diffusers'
own) whose ``step`` runs one fused pass of fastdiff's ``sasolver`` (fastdiff.solvers.sa_solver):
the stochastic Adams-Moulton corrector of the previous step and the stochastic Adams-Bashforth
predictor of this one in one row, data or noise prediction, predictor / corrector orders 1-4, tau
per step from the config's ``tau_func`` at each timestep (diffusers' default: 1 for timesteps in
[200, 800], else 0), noise drawn as diffusers draws it. The corrector reads the previous step's noise
back from the sample it is given (diffusers keeps it), so a sample edited between calls enters it
as edited. Not reproduced: noise prediction with thresholding (diffusers' own step fails there),
a schedule ending with a zero-length step (Karras / exponential / beta sigmas: diffusers' corrector
divides by its zero step), learned variances.
"""
from __future__ import annotations

import diffusers

from ...solvers import get_solver
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import DROP_INS, _check_prediction, _multistep_grid, _unsupported, _x0_transform

__all__ = ["SASolverScheduler"]


@drop_in(diffusers.SASolverScheduler)
class SASolverScheduler(FastdiffScheduler, diffusers.SASolverScheduler):
    """SA-Solver (fastdiff ``sasolver``)."""

    _out_dtype = "sample"              # diffusers casts its result to the sample's dtype

    def _check_config(self):
        c = self.config
        data = c.algorithm_type == "data_prediction"
        _check_prediction(self, ("epsilon", "sample", "v_prediction") + (("flow_prediction",) if data else ()))
        if c.variance_type is not None:
            _unsupported(type(self).__name__, "variance_type", c.variance_type)
        if c.thresholding and not data:
            _unsupported(type(self).__name__, "thresholding", True, " with algorithm_type='noise_prediction' "
                         "(diffusers' own step fails there)")

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid, fold = _multistep_grid(self, start, hint=" (SA-Solver's corrector divides by the step size)")
        if grid.tail:
            raise ValueError("this schedule ends with a zero-length step (Karras / exponential / beta sigmas), where "
                             "diffusers' SA-Solver corrector divides by zero; use another sigma schedule")
        taus = [float(self.tau_func(t)) for t in self.timesteps[start:]]
        solver = get_solver("sasolver", predictor_order=c.predictor_order, corrector_order=c.corrector_order,
                            taus=taus, algorithm_type=c.algorithm_type, lower_order_final=c.lower_order_final)
        rows = solver.rows(grid)
        return Plan(rows, fold, solver.num_slots, draws=[True] * len(rows), x0_transform=_x0_transform(c))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._fd_step(model_output, timestep, sample, generator, None, return_dict)


DROP_INS[SASolverScheduler.__name__] = SASolverScheduler      # accelerate(pipe) finds it there
