"""fastdiff: exact diffusion samplers executed as one fused kernel per step.

    x = fastdiff.sample(model, noise, solver="dpmpp_2m", steps=20, guidance=7.5,
                        cond={"encoder_hidden_states": c}, uncond={"encoder_hidden_states": u})

See README.md. Layers: schedules -> solvers (coefficient programs) -> ops (fused kernels,
backend dispatch) -> sampler -> integrations / CLI.
"""
__version__ = "0.1.0"

from . import ops, schedules, solvers  # noqa: F401
from .guidance import Guidance  # noqa: F401
from .parameterization import PREDICTIONS  # noqa: F401
from .program import Program, compile_program  # noqa: F401
from .sampler import Sampler, sample  # noqa: F401
from .schedules import (ContinuousVP, DiscreteVP, FlowMatching, Grid, VESchedule, make_grid)  # noqa: F401
from .solvers import SOLVERS, get_solver  # noqa: F401

__all__ = ["sample", "Sampler", "Guidance", "get_solver", "SOLVERS", "PREDICTIONS", "make_grid", "Grid",
           "DiscreteVP", "ContinuousVP", "VESchedule", "FlowMatching", "ops", "schedules", "solvers"]

# Guidance transforms; adaptive / predictor-corrector / likelihood / interpolation drivers.
from .guidance import ClassifierGuidance, ClipSample, DynamicThresholding  # noqa: F401,E402
from . import adaptive, interpolation, likelihood, predictor_corrector  # noqa: F401,E402

__all__ += ["ClassifierGuidance", "ClipSample", "DynamicThresholding", "adaptive", "interpolation", "likelihood",
            "predictor_corrector"]

# Sharded generation over torch.distributed ranks (fastdiff.distributed; `fastdiff generate`).
from .distributed import generate  # noqa: E402

__all__ += ["generate"]
