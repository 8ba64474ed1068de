"""One CFG + DPM-Solver++(2M) step, done four ways, on the same inputs.

The benchmark question is "how long does one guided DPM-Solver++(2M) step take", so every
implementation here computes the same numbers from the same state:

* ``StepProblem``: a genuine mid-sampling state at a given shape. A diffusers
  ``DPMSolverMultistepScheduler`` (Stable Diffusion 1.5's configuration, 20 steps) is advanced
  ``step_index`` steps with random model outputs, so x and the previous x0 are what a real loop
  would hold at a step where the second-order path runs. The model output of the step being
  timed is one [2B] tensor holding the two CFG halves, [uncond; cond], as a pipeline's batched
  UNet call returns it.
* fastdiff: the fused step op (``FastdiffStep``) executing row ``step_index`` of the coefficient
  program ``fastdiff.Sampler.build`` compiles for the same grid (diffusers' timesteps).
* eager PyTorch (``eager_step``): the textbook math a user writes, eps -> x0, CFG, DPM++(2M).
* torch.compile of exactly that function (``compiled_step``), allocating its outputs as the
  eager function does, and in place (``CompiledInplaceStep``: the compiled function writes x_next
  into x and x0 into the history buffer, and optionally the next model input into a preallocated
  [2B] buffer, as fastdiff does), the honest baseline for a fused in-place kernel.
* diffusers (``DiffusersStep``): ``uncond + w * (cond - uncond)`` then ``scheduler.step``.

tests/test_benchmarks_smoke.py checks that they agree, so the timings compare like with like.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch

import fastdiff
from fastdiff.ops.backends import BACKENDS
from fastdiff.program.layout import FLAG_WRITE_X
from fastdiff.schedules import DiscreteVP, Grid

GUIDANCE = 7.5
STEPS = 20
MID_STEP = 10          # a step where DPM-Solver++(2M) takes its second-order path

# Stable Diffusion 1.5's scheduler configuration (scaled-linear betas 0.00085..0.012).
SD15_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
                             prediction_type="epsilon")


def sd15_dpm_scheduler(steps: int = STEPS):
    """diffusers' DPMSolverMultistepScheduler as SD-1.5 pipelines configure it, with timesteps set."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


def fastdiff_sampler_like(scheduler, guidance: float = GUIDANCE) -> fastdiff.Sampler:
    """A fastdiff Sampler on exactly the scheduler's grid: its integer timesteps, then sigma = 0."""
    schedule = DiscreteVP(beta_schedule="scaled_linear", beta_start=SD15_SCHEDULER_CONFIG["beta_start"],
                          beta_end=SD15_SCHEDULER_CONFIG["beta_end"])
    grid = Grid.from_times(schedule, scheduler.timesteps.double().numpy(), final="zero")
    return fastdiff.Sampler.build(solver="dpmpp_2m", grid=grid, prediction="epsilon", guidance=guidance)


class DPMStepScalars(NamedTuple):
    """The scalars of one DPM-Solver++(2M) step t -> s (VP: x = alpha x0 + sigma eps), as the paper
    writes it: h = lambda_s - lambda_t, r = h_prev / h, lambda = log(alpha / sigma)."""

    guidance: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    h: float
    r: float


def step_scalars(scheduler, step_index: int, guidance: float = GUIDANCE) -> DPMStepScalars:
    """Read the step's scalars off the diffusers scheduler (its sigmas are k-diffusion noise levels)."""
    ks = scheduler.sigmas.double()
    alpha = 1.0 / torch.sqrt(ks * ks + 1.0)
    sigma = ks * alpha
    lam = torch.log(alpha) - torch.log(sigma)
    i = step_index
    if not 1 <= i < len(scheduler.timesteps) - 1:
        raise ValueError(f"step_index must be a second-order step in [1, {len(scheduler.timesteps) - 1}), got {i}")
    h = float(lam[i + 1] - lam[i])
    return DPMStepScalars(float(guidance), float(alpha[i]), float(sigma[i]), float(alpha[i + 1]), float(sigma[i + 1]),
                          h, float(lam[i] - lam[i - 1]) / h)


# ---------------------------------------------------------------------------------------------
# Eager PyTorch and torch.compile


def eager_step(x: torch.Tensor, model_out: torch.Tensor, x0_prev: torch.Tensor, c: DPMStepScalars
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CFG + epsilon -> x0 + DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as plain tensor code.
    Returns (x_next, x0); x0 is the next step's history. A float16/bfloat16 model output is widened
    to the state's dtype first (CFG in float32, as fastdiff computes it), which a compiled version
    fuses into its loads."""
    if model_out.dtype != x.dtype:
        model_out = model_out.to(x.dtype)
    uncond, cond = model_out.chunk(2)
    eps = uncond + c.guidance * (cond - uncond)
    x0 = (x - c.sigma_t * eps) / c.alpha_t
    d = (1.0 + 0.5 / c.r) * x0 - (0.5 / c.r) * x0_prev
    x_next = (c.sigma_s / c.sigma_t) * x - (c.alpha_s * math.expm1(-c.h)) * d
    return x_next, x0


def eager_step_and_model_input(x, model_out, x0_prev, c: DPMStepScalars):
    """``eager_step`` plus the next model input a pipeline builds, torch.cat([x_next] * 2): the
    work fastdiff's epilogue does in the same pass."""
    x_next, x0 = eager_step(x, model_out, x0_prev, c)
    return x_next, x0, torch.cat([x_next, x_next])


def inplace_step(x, model_out, x0_prev, c: DPMStepScalars, model_in: Optional[torch.Tensor] = None) -> None:
    """``eager_step`` written into its inputs: x <- x_next, x0_prev <- x0, and, if given, both halves
    of model_in <- x_next (cast to model_in's dtype; DPM-Solver++'s scale_model_input is the
    identity). Under torch.compile the copies become the stores of one fused kernel."""
    x_next, x0 = eager_step(x, model_out, x0_prev, c)
    x0_prev.copy_(x0)
    x.copy_(x_next)
    if model_in is not None:
        B = x.shape[0]
        model_in[:B].copy_(x_next)
        model_in[B:].copy_(x_next)


def _allow_recompiles(limit: int = 256) -> None:
    """One benchmark run compiles the same Python function for many (dtype, epilogue, scalars,
    shape) variants; dynamo's default recompile limit (8 per code object) would silently run the
    later variants eagerly."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def compiled_inplace_step() -> Callable:
    """A fresh torch.compile of ``inplace_step`` (see ``compiled_step`` on thread counts)."""
    _allow_recompiles()
    return torch.compile(inplace_step, dynamic=False)


def compiled_step(with_model_input: bool = False) -> Callable:
    """A fresh torch.compile (mode default) of the eager step. Inductor's CPU code fixes its OpenMP
    thread count when it compiles, so compile under the thread count it will run with."""
    fn = eager_step_and_model_input if with_model_input else eager_step
    _allow_recompiles()
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------
# The problem and the fastdiff / diffusers steps


@dataclass
class StepProblem:
    """A state in the middle of a guided DPM-Solver++(2M) run, shared by every implementation.

    x, x0_prev: float32 [B, ...]; model_out: [2B, ...] of ``model_dtype``, [uncond; cond]."""

    shape: Tuple[int, ...]
    model_dtype: torch.dtype
    x: torch.Tensor
    x0_prev: torch.Tensor
    model_out: torch.Tensor
    scalars: DPMStepScalars
    scheduler: object                  # diffusers scheduler, advanced to step_index
    step_index: int
    table: torch.Tensor                # fastdiff coefficient table (float64)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def make_problem(shape, model_dtype: torch.dtype = torch.float32, *, step_index: int = MID_STEP,
                 guidance: float = GUIDANCE, steps: int = STEPS, seed: int = 0) -> StepProblem:
    """Advance diffusers' scheduler ``step_index`` steps with random model outputs (public API only)
    and capture the state; the fastdiff table is compiled for the same grid and guidance."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be [B, C, ...] with positive sizes, got {shape}")
    gen = torch.Generator().manual_seed(seed)
    scheduler = sd15_dpm_scheduler(steps)
    x = torch.randn(shape, generator=gen) * float(scheduler.init_noise_sigma)
    # A random "model" that drives the scheduler to step_index; a unit-variance eps keeps the
    # state at the scale a real run has.
    eps = torch.empty(shape)
    for t in scheduler.timesteps[:step_index]:
        eps.normal_(generator=gen)
        x = scheduler.step(eps, t, x).prev_sample
    x0_prev = scheduler.model_outputs[-1].clone()
    model_out = torch.randn((2 * shape[0],) + shape[1:], generator=gen).to(model_dtype)
    table = torch.from_numpy(fastdiff_sampler_like(scheduler, guidance).program.table)
    return StepProblem(shape, model_dtype, x.contiguous(), x0_prev, model_out,
                       step_scalars(scheduler, step_index, guidance), scheduler, step_index, table)


def with_model_dtype(problem: StepProblem, dtype: torch.dtype) -> StepProblem:
    """The same state with the model output in another dtype (fp16 / bf16 models)."""
    if dtype == problem.model_dtype:
        return problem
    return dataclasses.replace(problem, model_dtype=dtype, model_out=problem.model_out.to(dtype))


class FastdiffStep:
    """fastdiff's fused step on a StepProblem, called as the Sampler calls it: the backend's raw
    function with positional arguments, on preallocated state (x, history, next model input),
    with the device-side non-finite flag the sampler passes by default.

    In place: each call advances x and the history slot. Repeating the *same* step grows the
    state by ~1.13x a call (the step's linear map has a spectral radius above 1; a real run
    changes the coefficients every step), so after ~700 calls it overflows to inf and NaN.
    ``prepare(number)`` (benchmarks.timing.measure calls it, untimed, before each sample)
    restores the problem's state when the next ``number`` calls would exceed ``max_calls``
    calls since the last restore: every timed call sees finite values of a realistic size."""

    max_calls = 64

    def __init__(self, problem: StepProblem, backend: str = "cpu", model_input: bool = False):
        p = problem
        B = p.shape[0]
        self.problem = p
        self.x = p.x.clone()
        self.hist = p.x0_prev.clone().unsqueeze(0)                         # K = 1 slot
        self.calls_since_restore = 0
        self.uncond, self.cond = p.model_out[:B], p.model_out[B:]
        self.model_in = torch.empty_like(p.model_out) if model_input else None
        self.bad_row = torch.zeros(1, dtype=torch.int32)
        self.table, self.row = p.table, p.step_index
        self.fn = BACKENDS[backend].fused_step
        if BACKENDS[backend].unavailable_reason():
            raise RuntimeError(f"backend {backend!r} is unavailable: {BACKENDS[backend].unavailable_reason()}")

    def prepare(self, number: int) -> None:
        if self.calls_since_restore + number > self.max_calls:
            self.x.copy_(self.problem.x)
            self.hist[0].copy_(self.problem.x0_prev)
            self.bad_row.zero_()
            self.calls_since_restore = 0
        self.calls_since_restore += number

    def __call__(self) -> None:
        # (hist_writes 0b1: the step writes history slot 0)
        self.fn(self.table, self.row, self.x, None, self.cond, self.uncond, self.hist, 0b1, FLAG_WRITE_X, None, 0, -1,
                self.model_in, self.bad_row)


class CompiledInplaceStep:
    """The torch.compile'd in-place step on its own copy of the problem's state (same restore rule
    as FastdiffStep: the in-place step applied repeatedly grows the state, so ``prepare`` restores
    it every ``max_calls`` calls). ``compile_times()`` runs the first call (compile) and a call
    with the next step's scalars (the one recompile a loop pays), untimed by the benchmark."""

    max_calls = FastdiffStep.max_calls

    def __init__(self, problem: StepProblem, model_input: bool = False):
        p = problem
        self.problem = p
        self.x = p.x.clone()
        self.x0_prev = p.x0_prev.clone()
        self.model_in = torch.empty_like(p.model_out) if model_input else None
        self.fn = compiled_inplace_step()
        self.calls_since_restore = 0

    def compile_times(self) -> Tuple[float, float]:
        import time
        p = self.problem
        previous = step_scalars(p.scheduler, p.step_index - 1, p.scalars.guidance)
        t0 = time.perf_counter()
        self.fn(self.x, p.model_out, self.x0_prev, previous, self.model_in)
        t1 = time.perf_counter()
        self.fn(self.x, p.model_out, self.x0_prev, p.scalars, self.model_in)
        t2 = time.perf_counter()
        self.calls_since_restore = self.max_calls     # restore before the first timed call
        return t1 - t0, t2 - t1

    def prepare(self, number: int) -> None:
        if self.calls_since_restore + number > self.max_calls:
            self.x.copy_(self.problem.x)
            self.x0_prev.copy_(self.problem.x0_prev)
            self.calls_since_restore = 0
        self.calls_since_restore += number

    def __call__(self) -> None:
        self.fn(self.x, self.problem.model_out, self.x0_prev, self.problem.scalars, self.model_in)


class PublicOpStep(FastdiffStep):
    """The same step through the public ``fastdiff.ops.fused_step``: input validation and backend
    selection on every call (what a user calling the op directly pays)."""

    def __init__(self, problem: StepProblem, backend: str = "cpu", model_input: bool = False):
        super().__init__(problem, backend, model_input)
        self.backend = backend

    def __call__(self) -> None:
        fastdiff.ops.fused_step(self.table, self.row, self.x, cond=self.cond, uncond=self.uncond, hist=self.hist,
                                hist_write=0, model_in=self.model_in, bad_row=self.bad_row, backend=self.backend)


class DiffusersStep:
    """Pipeline-style CFG, then ``DPMSolverMultistepScheduler.step`` at the problem's step.

    ``step`` advances the scheduler (``_step_index`` += 1, ``model_outputs`` shifted by one), so
    each call first puts both back to the problem's state: two attribute writes, well under a
    microsecond, timed with the step. Every call therefore runs the same second-order update."""

    def __init__(self, problem: StepProblem):
        self.scheduler = problem.scheduler
        self.index = problem.step_index
        self.timestep = self.scheduler.timesteps[self.index]
        self.saved_outputs = list(self.scheduler.model_outputs)
        self.guidance = problem.scalars.guidance

    def __call__(self, model_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.scheduler
        s._step_index = self.index
        s.model_outputs[:] = self.saved_outputs
        uncond, cond = model_out.chunk(2)
        eps = uncond + self.guidance * (cond - uncond)
        return s.step(eps, self.timestep, x).prev_sample


def reference_result(problem: StepProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_next, x0) in float64: the oracle the implementations are checked against."""
    p = problem
    d = p.scalars
    x, mo, x0p = p.x.double(), p.model_out.double(), p.x0_prev.double()
    return eager_step(x, mo, x0p, d)


def one_step(problem: StepProblem, impl: str, model_input: bool = False
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run one step with ``impl`` ('cpu', 'reference', 'eager', 'diffusers') on a copy of the
    problem's state; returns (x_next, x0 or None, next model input or None). For tests."""
    p = problem
    if impl in ("cpu", "reference"):
        s = FastdiffStep(p, impl, model_input)
        s()
        return s.x, s.hist[0], s.model_in
    if impl == "eager":
        x_next, x0 = eager_step(p.x, p.model_out, p.x0_prev, p.scalars)
        return x_next, x0, None
    if impl == "diffusers":
        step = DiffusersStep(p)
        x_next = step(p.model_out, p.x)
        x0 = p.scheduler.model_outputs[-1]
        step.scheduler.model_outputs[:] = step.saved_outputs    # leave the problem as it was
        step.scheduler._step_index = step.index
        return x_next, x0, None
    raise ValueError(f"unknown impl {impl!r}; expected 'cpu', 'reference', 'eager' or 'diffusers'")
