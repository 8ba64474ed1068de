"""Solvers: each turns a sampling grid into a coefficient program (see fastdiff.program).

Importing this package registers every solver; ``get_solver(name, **options)`` builds one and
``SOLVERS`` lists them. A new solver is a new module here with a ``@register``-ed class.
"""
from .base import SOLVERS, Solver, get_solver, register  # noqa: F401
from . import exponential, runge_kutta, stochastic  # noqa: F401  (registration)
from . import edm  # noqa: F401  (registration)
from . import dpm_solver  # noqa: F401  (registration)
from . import multistep  # noqa: F401  (registration)
from . import flow  # noqa: F401  (registration)
from . import ipndm  # noqa: F401  (registration)
from . import pndm  # noqa: F401  (registration)
from . import cfg_pp  # noqa: F401  (registration: CFG++ samplers)
from . import comfy  # noqa: F401  (registration: ComfyUI's samplers)
from . import consistency  # noqa: F401  (registration)
from . import plms  # noqa: F401  (registration)
from . import sde_dpm_solver  # noqa: F401  (registration)
from . import sa_solver  # noqa: F401  (registration)
from . import score_sde  # noqa: F401  (registration)

__all__ = ["SOLVERS", "Solver", "get_solver", "register"]
