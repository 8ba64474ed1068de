"""diffusers integration: drop-in schedulers, an attention processor and a pipeline accelerator.

    from fastdiff.integrations import diffusers as fd
    pipe.scheduler = fd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    fd.accelerate(pipe)          # scheduler + attention processor + CFG fused into the step

Modules: ``schedulers`` (the drop-ins, on ``base``), ``cfg`` (CFG fused inside unmodified
pipelines), ``attention`` (FastdiffAttnProcessor), ``pipelines`` (``accelerate``).
"""
from .attention import FastdiffAttnProcessor
from .base import StepOutput
from .pipelines import Acceleration, accelerate
from .schedulers import *  # noqa: F401,F403
from .schedulers import __all__ as _schedulers_all

__all__ = list(_schedulers_all) + ["FastdiffAttnProcessor", "StepOutput", "Acceleration", "accelerate"]
