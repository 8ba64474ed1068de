"""diffusers integration: drop-in schedulers, an attention processor and a pipeline accelerator.

    from fastdiff.integrations import diffusers as fd
    pipe.scheduler = fd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    fd.accelerate(pipe)          # scheduler + attention processor + CFG fused into the step
    pipe.save_pretrained(folder) # a stock diffusers folder; fastdiff: fd.accelerate(DiffusionPipeline.from_pretrained(folder))

Modules: ``schedulers`` (the drop-ins, on ``base``; ``pndm``: PNDMScheduler; ``consistency``: LCMScheduler,
TCDScheduler, FlowMatchLCMScheduler, CMStochasticIterativeScheduler; ``ipndm``: IPNDMScheduler;
``inverse``: DDIMInverseScheduler, DPMSolverMultistepInverseScheduler; ``cosine``:
CosineDPMSolverMultistepScheduler; ``cogvideox``: CogVideoXDDIMScheduler, CogVideoXDPMScheduler;
``parallel``: DDIMParallelScheduler, DDPMParallelScheduler; ``sasolver``: SASolverScheduler;
``score_sde``: ScoreSdeVeScheduler), ``cfg`` (CFG fused inside unmodified
pipelines), ``attention`` (FastdiffAttnProcessor), ``pipelines`` (``accelerate``), ``perturbed``
(the extra-pass guidance hooks; ``PerturbedModel``), ``repaint`` (RePaintScheduler).
"""
from .attention import FastdiffAttnProcessor
from .base import StepOutput
from .pndm import PNDMScheduler
from .consistency import CMStochasticIterativeScheduler, FlowMatchLCMScheduler, LCMScheduler, TCDScheduler
from .ipndm import IPNDMScheduler
from .inverse import DDIMInverseScheduler, DPMSolverMultistepInverseScheduler
from .cosine import CosineDPMSolverMultistepScheduler
from .cogvideox import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from .parallel import DDIMParallelScheduler, DDPMParallelScheduler
from .sasolver import SASolverScheduler
from .score_sde import ScoreSdeVeScheduler
from .repaint import RePaintScheduler
from .pipelines import Acceleration, accelerate
from .perturbed import PerturbedModel
from .schedulers import (DROP_INS, DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                         DPMSolverSDEScheduler, DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler,
                         EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                         FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler,
                         KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler,
                         UniPCMultistepScheduler)

__all__ = [
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler", "LMSDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
    "LCMScheduler", "TCDScheduler", "IPNDMScheduler", "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler",
    "CosineDPMSolverMultistepScheduler", "FlowMatchLCMScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
    "DDIMParallelScheduler", "DDPMParallelScheduler", "CMStochasticIterativeScheduler",
    "SASolverScheduler", "ScoreSdeVeScheduler", "RePaintScheduler",
    "DROP_INS", "FastdiffAttnProcessor", "StepOutput", "Acceleration", "accelerate", "PerturbedModel",
]
