"""The CosineDPMSolverMultistepScheduler drop-in (Stable Audio's scheduler).

    from fastdiff.integrations.diffusers import CosineDPMSolverMultistepScheduler
    pipe.scheduler = CosineDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class (config, ``set_timesteps`` with its exponential / Karras sigmas,
``timesteps`` = atan(sigma) 2/pi, ``scale_model_input`` with EDM's c_in are diffusers' own) whose
``step`` runs one fused pass of fastdiff's ``dpm_solver_multistep`` as SDE-DPM-Solver++ (eta = 1,
diffusers' 'sde-dpmsolver++' formulas), orders 1-2, on its VE sigmas with EDM's preconditioning
(x0 = c_skip x + c_out output, sigma_data). The noise is diffusers' own Brownian-tree noise
(``BrownianTreeNoiseSampler`` seeded from the generator's initial seed, queried at diffusers'
(sigma, sigma_next)), so a run gives stock's samples for the same generator.
"""
from __future__ import annotations

import diffusers
import torch

from ...solvers import get_solver
from .base import FastdiffScheduler, Plan, drop_in
from .schedulers import DROP_INS, _check_prediction, _dpm_rows, _edm_fold, _f64, _unsupported, _ve_grid

__all__ = ["CosineDPMSolverMultistepScheduler"]


@drop_in(diffusers.CosineDPMSolverMultistepScheduler)
class CosineDPMSolverMultistepScheduler(FastdiffScheduler, diffusers.CosineDPMSolverMultistepScheduler):
    """SDE-DPM-Solver++ 1 / 2M (fastdiff ``dpm_solver_multistep``, eta = 1) with Brownian-tree noise."""

    _out_dtype = "promote"

    def _check_config(self):
        _check_prediction(self, ("epsilon", "v_prediction"))
        if self.config.solver_order not in (1, 2):
            _unsupported(type(self).__name__, "solver_order", self.config.solver_order,
                         " (diffusers' step has formulas for orders 1 and 2 only)")

    def _plan(self, start: int) -> Plan:
        c = self.config
        grid = _ve_grid(_f64(self.sigmas)[start:])
        # (diffusers lowers the last step also where it ends at sigma = 0: fastdiff's multistep_order does)
        solver, rows = _dpm_rows(lambda lof, eaf: get_solver(
            "dpm_solver_multistep", order=c.solver_order, algorithm_type="dpmsolver++", solver_type=c.solver_type,
            lower_order_final=lof, euler_at_final=eaf, eta=1.0),
            grid, bool(c.lower_order_final and len(self.timesteps) < 15), c.euler_at_final)
        fold = [_edm_fold(c.prediction_type, s, c.sigma_data) for s in grid.sigma[:-1]]
        sig = self.sigmas.detach().cpu()
        queries = [(sig[n], sig[n + 1]) for n in range(start, len(self.timesteps))]
        return Plan(rows, fold, solver.num_slots, draws=[True] * len(rows), extra={"queries": queries})

    def _draw_noise(self, k, shape, dtype, device, generator, variance_noise):
        return self.noise_sampler(*self._fd_run.program.plan.extra["queries"][k]).to(device)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        created = getattr(self, "noise_sampler", None) is None     # (set_timesteps sets it)
        if created:        # diffusers' tree, seeded and shaped as diffusers makes it
            from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
            if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
                raise TypeError(f"model_output must be a floating-point torch.Tensor, got {type(model_output).__name__}")
            seed = None
            if generator is not None:
                seed = [g.initial_seed() for g in generator] if isinstance(generator, list) else generator.initial_seed()
            # (diffusers builds it from its converted output x0 = c_skip sample + c_out output: that dtype)
            like = model_output.as_subclass(torch.Tensor)
            if isinstance(sample, torch.Tensor):
                like = like.to(torch.promote_types(sample.dtype, like.dtype))
            self.noise_sampler = BrownianTreeNoiseSampler(like,
                                                          sigma_min=self.config.sigma_min,
                                                          sigma_max=self.config.sigma_max, seed=seed)
        try:
            return self._fd_step(model_output, timestep, sample, generator, None, return_dict)
        except BaseException:
            if created:                    # a rejected call changes nothing
                self.noise_sampler = None
            raise


DROP_INS[CosineDPMSolverMultistepScheduler.__name__] = CosineDPMSolverMultistepScheduler
