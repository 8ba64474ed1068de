"""fastdiff: exact diffusion samplers executed as one fused kernel per step.

    x = fastdiff.sample(model, noise, solver="dpmpp_2m", steps=20, guidance=7.5,
                        cond={"encoder_hidden_states": c}, uncond={"encoder_hidden_states": u})

See README.md. Layers: schedules -> solvers (coefficient programs) -> ops (fused kernels,
backend dispatch) -> sampler -> integrations / CLI.

The public names below load on first use (PEP 562): ``import fastdiff`` imports no submodule, so
``import fastdiff.kernels.fused_step`` or ``import fastdiff.reference`` loads only what those
modules import themselves, never the sampler, the solvers or a host library.
"""
from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> (submodule, attribute in it; None: the submodule itself)
_LAZY = {
    "sample": ("sampler", "sample"),
    "Sampler": ("sampler", "Sampler"),
    "Guidance": ("guidance", "Guidance"),
    "get_solver": ("solvers", "get_solver"),
    "SOLVERS": ("solvers", "SOLVERS"),
    "PREDICTIONS": ("parameterization", "PREDICTIONS"),
    "Program": ("program", "Program"),
    "compile_program": ("program", "compile_program"),
    "make_grid": ("schedules", "make_grid"),
    "Grid": ("schedules", "Grid"),
    "DiscreteVP": ("schedules", "DiscreteVP"),
    "ContinuousVP": ("schedules", "ContinuousVP"),
    "VESchedule": ("schedules", "VESchedule"),
    "FlowMatching": ("schedules", "FlowMatching"),
    "ops": ("ops", None),
    "schedules": ("schedules", None),
    "solvers": ("solvers", None),
    # Guidance transforms; adaptive / predictor-corrector / likelihood / interpolation drivers.
    "ClassifierGuidance": ("guidance", "ClassifierGuidance"),
    "ClipSample": ("guidance", "ClipSample"),
    "DynamicThresholding": ("guidance", "DynamicThresholding"),
    "adaptive": ("adaptive", None),
    "interpolation": ("interpolation", None),
    "likelihood": ("likelihood", None),
    "predictor_corrector": ("predictor_corrector", None),
    # Sharded generation over torch.distributed ranks (fastdiff.distributed; `fastdiff generate`).
    "generate": ("distributed", "generate"),
}

__all__ = ["sample", "Sampler", "Guidance", "get_solver", "SOLVERS", "PREDICTIONS", "make_grid", "Grid",
           "DiscreteVP", "ContinuousVP", "VESchedule", "FlowMatching", "ops", "schedules", "solvers",
           "ClassifierGuidance", "ClipSample", "DynamicThresholding", "adaptive", "interpolation", "likelihood",
           "predictor_corrector", "generate"]


def __getattr__(name: str):
    module, attr = _LAZY.get(name, (name, None))
    # Any other submodule loads on first access too (``fastdiff.attention`` after ``import fastdiff``),
    # as it did when this file imported them all.
    if module is name and (name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(f"{__name__}.{module}")
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value   # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
