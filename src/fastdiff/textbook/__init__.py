"""Textbook samplers: each foundation solver written as its paper and the diffusers/k-diffusion
code state it, step by step on tensors in plain PyTorch. They are the oracles the coefficient
programs (fastdiff.solvers) are tested against, so they never import fastdiff.solvers,
fastdiff.program or fastdiff.ops.

Signature (k-diffusion style): ``fn(model, x, grid, prediction, noise=None, **options)``

* ``model(x, t)`` returns ``prediction`` (epsilon / sample / v_prediction / flow / score) at the
  schedule's native x = alpha*x0 + sigma*eps, with t the grid's model time (a [B] tensor);
* ``x`` is the starting state at grid point 0 (already scaled: noise * init scale);
* ``noise``: the Gaussian draws of the stochastic samplers, one per step (a list indexed by step,
  or a callable ``step -> tensor``);
* options are named like the solver's options (eta, s_noise, variance, lower_order_final, ode_space).

``ORACLES`` maps each foundation solver's name to its textbook function; the solver zoo's
(DPM-Solver family, UniPC, DEIS, LMS, EDM, flow aliases) are ``fastdiff.textbook.zoo.ZOO_ORACLES``.
Use ``guided`` for CFG.
"""
from .common import ODECoordinates, denoise, guided  # noqa: F401
from .ddpm_ddim import sample_ddim, sample_ddpm
from .dpm_solver import sample_dpmpp_2m
from .comfy import COMFY_ORACLES, MULTI_DRAW
from .ipndm import sample_ipndm
from .cfg_pp import CFG_PP_ORACLES
from .pndm import sample_pndm
from .consistency import sample_lcm, sample_tcd
from .plms import sample_plms
from .sde_dpm_solver import sample_sde_dpmsolver
from .sa_solver import sample_sa_solver
from .score_sde import sample_reverse_diffusion
from .ode import sample_euler, sample_heun, sample_midpoint, sample_ralston, sample_rk3, sample_rk4
from .stochastic import sample_euler_ancestral, sample_euler_maruyama, sample_heun_sde

ORACLES = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "midpoint": sample_midpoint,
    "ralston": sample_ralston,
    "rk3": sample_rk3,
    "rk4": sample_rk4,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm_solver++_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
    "euler_maruyama": sample_euler_maruyama,
    "heun_sde": sample_heun_sde,
    "pndm": sample_pndm,
    "ipndm": sample_ipndm,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
    "plms": sample_plms,
    "sde_dpmsolver": sample_sde_dpmsolver,
    "sasolver": sample_sa_solver,
    "reverse_diffusion": sample_reverse_diffusion,
}
ORACLES.update(CFG_PP_ORACLES)   # CFG++: given a textbook.guided model, they call its parts apart
# ComfyUI's samplers (fastdiff.solvers.comfy). seeds_2 / seeds_3 make 2 / 3 noise draws per step, which
# tests/test_solvers_textbook.py's one-draw-per-step harness does not model: their oracles are in
# COMFY_ORACLES, judged by tests/test_comfy_samplers.py.
ORACLES.update({n: f for n, f in COMFY_ORACLES.items() if n not in MULTI_DRAW})

__all__ = ["ORACLES", "guided", "denoise", "ODECoordinates"] + sorted(
    {f.__name__ for f in ORACLES.values()})
