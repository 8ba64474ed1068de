"""Time steps tuned to the model: the grid of ``steps`` points that minimises a solver's error.

    grid = fastdiff.tune.tune_grid(model, noise, solver="dpmpp_2m", steps=5, schedule=schedule,
                                   prediction="epsilon")
    x = fastdiff.sample(model, other_noise, solver="dpmpp_2m", grid=grid, prediction="epsilon")

From a small batch of noise (16-64 samples) and a high-accuracy reference trajectory of the same
model, two searches run one after the other (``method="dp+refine"``, the default):

1. **Dynamic programming over a fine candidate grid** (OSS, "Optimal Stepsize for Diffusion
   Sampling"): the candidates are ``candidates`` points log-spaced in the noise level between the
   grid's ends; ``dp[k][j]`` is the least summed local error of k steps from the start to candidate
   j, each step taken by the solver *as it runs in the final k-step grid* (its warm-up and final-step
   orders included) from the reference state, with the model output at the reference state
   (teacher forcing: the model is evaluated once per candidate). For one-step solvers that is exact
   for the local-error objective; a multistep solver's history is that of the best path found to
   the step's start (OSS's approximation).
2. **Continuous refinement** of the interior noise levels (Nelder-Mead on their log-gaps, so the
   grid stays strictly decreasing and inside its ends) against the **global** error: the solver's
   real run on the batch vs the reference endpoint. Kept only where it improves on step 1.

Both are deterministic given their inputs. The result is a ``fastdiff.Grid``: use it as
``fastdiff.sample(grid=...)``; ``sigmas_for_k_diffusion(grid)`` gives k-diffusion sigmas,
``grid.model_t`` diffusers ``timesteps=`` and ``grid.ksigma`` diffusers ``sigmas=``;
``save_grid``/``load_grid`` write and read JSON; ``tuned_grid(name)`` loads the tables fastdiff
ships (tuned on the analytic Gaussian mixture and on the shipped digits model).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .schedules import DiscreteVP, Grid, Schedule, VESchedule, make_grid

__all__ = ["tune_grid", "TuneInfo", "dp_search", "save_grid", "load_grid", "tuned_grid", "TABLES",
           "sigmas_for_k_diffusion", "diffusers_kwargs", "reference_trajectory"]

METHODS = ("dp", "refine", "dp+refine")


class _StopRun(Exception):
    """Raised from a sampler callback to stop a run once the state of interest is captured."""


@dataclass
class TuneInfo:
    """What tune_grid did: errors (RMS over the batch vs the reference endpoint) and timings."""

    error_start: float                       # the starting spacing (``init_spacing``), global error
    error_dp: Optional[float] = None         # after the DP search, global error
    error_final: float = math.nan            # the returned grid, global error
    seconds: float = 0.0
    model_calls: int = 0
    ksigmas: List[float] = field(default_factory=list)


def dp_search(cost: Callable[[Sequence[int], int], float], num_candidates: int, steps: int) -> Tuple[List[int], float]:
    """The ``steps``-step path 0 = i_0 < i_1 < ... < i_steps = num_candidates - 1 minimising
    sum_k cost(path up to i_k, i_{k+1}); ``cost(prefix, j)`` sees the best path found to its last
    point (exact when the cost depends only on the prefix's last point). Returns (path, total)."""
    M = num_candidates
    if steps < 1 or steps > M - 1:
        raise ValueError(f"steps must be in [1, {M - 1}] for {M} candidates, got {steps}")
    INF = math.inf
    best = [[INF] * M for _ in range(steps + 1)]
    back: List[List[Optional[Tuple[int, ...]]]] = [[None] * M for _ in range(steps + 1)]
    best[0][0] = 0.0
    back[0][0] = (0,)
    for k in range(steps):
        # after k+1 steps the path may end at j, leaving room for the remaining steps
        last_j = M - 1 - (steps - k - 1)
        for i in range(k, M):
            if best[k][i] == INF:
                continue
            prefix = back[k][i]
            for j in range(i + 1, last_j + 1):
                if k + 1 == steps and j != M - 1:
                    continue
                c = best[k][i] + cost(prefix, j)
                if c < best[k + 1][j]:
                    best[k + 1][j] = c
                    back[k + 1][j] = prefix + (j,)
    if back[steps][M - 1] is None:
        raise RuntimeError("no path found (every step cost was infinite)")
    return list(back[steps][M - 1]), best[steps][M - 1]


def reference_trajectory(model: Callable, noise: torch.Tensor, grid: Grid, *, prediction: str, sample_options: dict,
                         solver: str = "unipc", solver_options: Optional[dict] = None, substeps: int = 8,
                         ) -> List[torch.Tensor]:
    """x at every point of ``grid`` along the probability-flow ODE from ``noise``: each interval
    split into ``substeps`` log-uniform steps of a high-order solver (the last interval to sigma = 0,
    if any, is one step: from the last noise level the solver returns the model's x0)."""
    from .sampler import Sampler
    ks = grid.ksigma
    fine: List[float] = []
    marks: List[int] = []
    for a, b in zip(ks[:-1], ks[1:]):
        fine.append(float(a))
        if b > 0 and math.isfinite(a):
            fine.extend(float(v) for v in np.exp(np.linspace(np.log(a), np.log(b), substeps + 1))[1:-1])
        marks.append(len(fine))              # index of b in the fine grid
    fine.append(float(ks[-1]))
    fgrid = _grid_from_ksigmas(grid.schedule, fine)
    s = Sampler.build(solver=solver, solver_options=solver_options or {"order": 3}, grid=fgrid, prediction=prediction,
                      state_dtype=torch.float64)
    out: List[Optional[torch.Tensor]] = [None] * len(ks)
    want = {m: k + 1 for k, m in enumerate(marks)}

    def grab(info):
        n = info["step"] + 1
        if n in want:
            out[want[n]] = info["x"].clone()

    out[0] = _start(noise, grid)
    s(model, noise, callback=grab, x_init=out[0], **{"progress": False, **sample_options})
    return out  # type: ignore[return-value]


def _start(noise: torch.Tensor, grid: Grid) -> torch.Tensor:
    scale = grid.schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0]))
    return noise.to(torch.float64) * scale


def _grid_from_ksigmas(schedule: Schedule, ks: Sequence[float]) -> Grid:
    ks = np.asarray(ks, dtype=np.float64)
    return Grid.from_ksigmas(schedule, ks, final="none")


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())


def tune_grid(model: Callable, noise: torch.Tensor, *, solver: str, steps: int, schedule: Schedule,
              prediction: str = "epsilon", guidance=None, cond: Optional[dict] = None, uncond: Optional[dict] = None,
              solver_options: Optional[dict] = None, method: str = "dp+refine", candidates: int = 48,
              reference: Optional[Callable[[torch.Tensor, Grid], List[torch.Tensor]]] = None,
              reference_substeps: int = 8, final: str = "zero", t_max: Optional[float] = None,
              t_min: Optional[float] = None, init_spacing: str = "auto", max_evals: int = 300,
              progress: bool = False, return_info: bool = False):
    """The ``steps``-step grid minimising ``solver``'s error on ``model`` from ``noise``.

    ``reference(x_start, grid) -> [x at each grid point]`` supplies an exact trajectory (e.g. an
    analytic model's ODE solution); otherwise one is computed with a high-order solver and
    ``reference_substeps`` steps per candidate interval. ``method``: "dp", "refine" (from
    ``init_spacing``) or "dp+refine". The grid starts where ``make_grid(schedule, steps,
    final=final, t_max=t_max, t_min=t_min)`` starts and ends where it ends. Returns a Grid, or
    (Grid, TuneInfo) with ``return_info=True``."""
    from .sampler import Sampler
    from .solvers import get_solver

    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < steps + 1:
        raise ValueError(f"candidates must be an integer >= steps + 1 = {steps + 1}, got {candidates!r}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise TypeError(f"noise must be a floating-point torch.Tensor [B, ...], got {type(noise).__name__}")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf")
    if final not in ("zero", "none"):
        raise ValueError(f"final must be 'zero' or 'none' for a tuned grid, got {final!r}")
    solver_obj = get_solver(solver, **(solver_options or {}))
    if solver_obj.stochastic:
        raise ValueError(f"tune_grid tunes deterministic solvers; {solver!r} is stochastic")
    sample_options = {"cond": cond, "uncond": uncond, "progress": False, "backend": "reference"}
    if init_spacing == "auto":
        init_spacing = "karras" if isinstance(schedule, VESchedule) else "exponential"
    # The starting grid (the spacing tuning starts from), and the candidates: log-uniform in the
    # noise level between its ends.
    start = make_grid(schedule, steps, init_spacing, final=final, t_max=t_max, t_min=t_min)
    cand = make_grid(schedule, candidates, "exponential", final=final, t_max=float(start.t[0]), t_min=t_min)
    if not np.allclose(cand.ksigma[[0, -1]], start.ksigma[[0, -1]], rtol=1e-9, atol=0.0):
        raise ValueError("the candidate grid does not share the run's end points (schedule/final/t_min mismatch)")
    ks_c = [float(v) for v in cand.ksigma]
    M = len(ks_c)
    calls = [0]

    def counted(x, t, **kw):
        calls[0] += 1
        return model(x, t, **kw)

    # Reference trajectory at the candidates, and its end point.
    with torch.no_grad():
        x_ref = (reference(_start(noise, cand), cand) if reference is not None else
                 reference_trajectory(counted, noise, cand, prediction=prediction, sample_options=sample_options,
                                      substeps=reference_substeps))
    if len(x_ref) != M:
        raise ValueError(f"reference returned {len(x_ref)} states for {M} grid points")
    x_ref = [x.to(torch.float64) for x in x_ref]
    target = x_ref[-1]

    def build(ks: Sequence[float]) -> "Sampler":
        return Sampler.build(solver=solver_obj, grid=_grid_from_ksigmas(schedule, ks), prediction=prediction,
                             guidance=guidance, state_dtype=torch.float64)

    def global_error(ks: Sequence[float]) -> float:
        with torch.no_grad():
            x = build(ks)(counted, noise, x_init=x_ref[0], **sample_options)
        return _rms(x, target)

    start_ks = [float(v) for v in start.ksigma]
    info = TuneInfo(error_start=global_error(start_ks))

    starts = [start_ks]
    if method in ("dp", "dp+refine"):
        path = _dp_grid(solver_obj, schedule, prediction, guidance, counted, cand, x_ref, steps, sample_options,
                        progress)
        dp_ks = [ks_c[i] for i in path]
        info.error_dp = global_error(dp_ks)
        starts = [dp_ks] if method == "dp" else [dp_ks, start_ks]
    if method in ("refine", "dp+refine"):
        # The summed local error is only a proxy of the final one (errors made at high noise are
        # damped later, and multistep errors interact): refine both the DP grid and the starting
        # spacing against the global error and keep the better.
        lowest = min(v for v in ks_c if v > 0)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_evals * len(starts), desc="tune: refinement", leave=False)

        def objective(ks):
            if bar is not None:
                bar.update(1)
            return global_error(ks)
        starts = [_refine(ks, lowest, objective, max_evals) for ks in starts]
        if bar is not None:
            bar.close()
    errors = [global_error(ks) for ks in starts]
    ks_best = starts[int(np.argmin(errors))]
    info.error_final = min(errors)
    info.ksigmas = list(ks_best)
    info.seconds = time.perf_counter() - t0
    info.model_calls = calls[0]
    grid = _grid_from_ksigmas(schedule, ks_best)
    return (grid, info) if return_info else grid


def _dp_grid(solver, schedule, prediction, guidance, model, cand: Grid, x_ref, steps, sample_options,
             progress) -> List[int]:
    """DP over candidates with teacher-forced local errors (see the module docstring)."""
    from .sampler import Sampler
    ks_c = [float(v) for v in cand.ksigma]
    M = len(ks_c)
    # The model output at each reference state, computed once per candidate: the runs below
    # look it up by model time whatever their own state is (teacher forcing).
    by_t: Dict[float, int] = {}
    for k, mt in enumerate(cand.model_t[:-1]):
        if float(mt) in by_t:
            raise ValueError("two candidate points share a model time; use fewer candidates")
        by_t[float(mt)] = k
    cache: Dict[Tuple[int, int], torch.Tensor] = {}

    def lookup(x, t, **kw):
        k = by_t.get(float(t.reshape(-1)[0]))
        if k is None:
            raise RuntimeError("a tuning run evaluated the model off the candidate grid (multi-stage solver?); "
                               "use method='refine' for this solver")
        key = (k, x.shape[0])
        if key not in cache:
            reps = x.shape[0] // x_ref[k].shape[0]
            cache[key] = model(x_ref[k].repeat((reps,) + (1,) * (x.dim() - 1)).to(x.dtype), t, **kw)
        return cache[key]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="tune: dynamic programming", leave=False)

    def cost(prefix: Sequence[int], j: int) -> float:
        k = len(prefix) - 1                      # the step from prefix[-1] to j is step k of the run
        # the run's grid: the path so far, j, then the next candidates to fill the remaining steps
        rest = list(range(j + 1, j + 1 + (steps - k - 1)))
        if rest and rest[-1] != M - 1:
            rest[-1] = M - 1
        ks = [ks_c[i] for i in list(prefix) + [j] + rest]
        s = Sampler.build(solver=solver, grid=_grid_from_ksigmas(schedule, ks), prediction=prediction,
                          guidance=guidance, state_dtype=torch.float64)
        got = {}
        visited = list(prefix) + [j]

        def reset(info):
            n = info["step"]
            if n == k:
                got["x"] = info["x"].clone()
                raise _StopRun
            info["x"].copy_(x_ref[visited[n + 1]])      # teacher forcing: back onto the reference

        try:
            with torch.no_grad():
                s(lookup, torch.zeros_like(x_ref[0]), x_init=x_ref[prefix[0]], callback=reset, **sample_options)
        except _StopRun:
            pass
        return float((got["x"] - x_ref[j]).pow(2).mean())

    path, _ = dp_search(_progress_cost(cost, bar, steps), M, steps)
    if bar is not None:
        bar.close()
    return path


def _progress_cost(cost, bar, steps):
    if bar is None:
        return cost
    seen = set()

    def wrapped(prefix, j):
        k = len(prefix)
        if k not in seen:
            seen.add(k)
            bar.update(1)
        return cost(prefix, j)
    return wrapped


def _refine(ks: Sequence[float], lowest: float, objective: Callable[[Sequence[float]], float],
            max_evals: int) -> List[float]:
    """Nelder-Mead on the interior noise levels, parametrised by softmax weights of their log-gaps
    so every trial grid is strictly decreasing and stays inside [lowest, ks[0]]; the ends are fixed
    (a final 0 stays 0, and then the last nonzero level may move down to ``lowest``)."""
    from scipy.optimize import minimize
    ks = list(ks)
    K = len(ks) - 1
    zero_end = ks[-1] == 0.0
    if K < 2 or max_evals < 1:
        return ks
    top = math.log(ks[0])
    bottom = math.log(lowest) if zero_end else math.log(ks[-1])
    span = top - bottom
    levels = [math.log(v) for v in (ks[:-1] if zero_end else ks)]
    gaps = -np.diff(levels)
    if zero_end:
        gaps = np.append(gaps, levels[-1] - bottom)       # slack: the last level above the bottom
    gaps = np.maximum(gaps, 1e-6 * span)
    theta0 = np.log(gaps / gaps.sum())

    def unpack(theta) -> List[float]:
        w = np.exp(theta - theta.max())
        w = w / w.sum()
        inner = top - np.cumsum(w)[:K - 1] * span
        return [ks[0]] + [float(math.exp(v)) for v in inner] + [ks[-1]]

    def f(theta):
        trial = unpack(theta)
        positive = trial[:-1] if zero_end else trial
        if np.any(np.diff(positive) >= 0) or min(positive) < lowest * (1 - 1e-12):
            return math.inf
        return objective(trial)

    f0 = f(theta0)
    res = minimize(f, theta0, method="Nelder-Mead",
                   options={"maxfev": int(max_evals), "xatol": 1e-5, "fatol": 0.0})
    return unpack(res.x) if res.fun < f0 else unpack(theta0)


# ---------------------------------------------------------------------------------------------
# Files and shipped tables


# Named DiscreteVP configurations a grid file records by name instead of 1000 betas.
_NAMED_VP = ({"beta_schedule": "squaredcos_cap_v2"},
             {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
             {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})


def _schedule_spec(s: Schedule) -> dict:
    if isinstance(s, VESchedule):
        return {"type": "VESchedule", "sigma_min": s.sigma_min, "sigma_max": s.sigma_max}
    if isinstance(s, DiscreteVP):
        n = int(s.betas.size)
        for named in _NAMED_VP:
            for zero_snr in (False, True):
                spec = {**named, "num_train_timesteps": n, "zero_terminal_snr": zero_snr}
                if np.array_equal(DiscreteVP(**spec).betas, s.betas):
                    return {"type": "DiscreteVP", **spec}
        return {"type": "DiscreteVP", "betas": [float(b) for b in s.betas]}
    return {"type": type(s).__name__}


def save_grid(grid: Grid, path, **meta) -> None:
    """Write a grid (its noise levels and model times, and what it was tuned for) as JSON."""
    data = {"format": 1, "ksigma": [float(v) for v in grid.ksigma], "model_t": [float(v) for v in grid.model_t],
            "t": [float(v) for v in grid.t], "schedule": _schedule_spec(grid.schedule), **meta}
    Path(path).write_text(json.dumps(data, indent=1))


def load_grid(path_or_data, schedule: Optional[Schedule] = None) -> Grid:
    """A grid from ``save_grid``'s JSON (a path or the parsed dict), on ``schedule`` (default: the
    schedule recorded in the file, where it can be rebuilt: VESchedule, DiscreteVP)."""
    data = path_or_data if isinstance(path_or_data, dict) else json.loads(Path(path_or_data).read_text())
    if data.get("format") != 1 or "ksigma" not in data:
        raise ValueError("not a fastdiff grid file (format 1 with 'ksigma')")
    if schedule is None:
        spec = data.get("schedule", {})
        if spec.get("type") == "VESchedule":
            schedule = VESchedule(spec["sigma_min"], spec["sigma_max"])
        elif spec.get("type") == "DiscreteVP":
            schedule = (DiscreteVP(betas=spec["betas"]) if "betas" in spec else
                        DiscreteVP(**{k: v for k, v in spec.items() if k != "type"}))
        else:
            raise ValueError(f"pass the schedule: the file's {spec.get('type')!r} cannot be rebuilt from it")
    ks = np.asarray(data["ksigma"], dtype=np.float64)
    return _grid_from_ksigmas(schedule, ks)


def _tables() -> Dict[str, dict]:
    text = resources.files("fastdiff").joinpath("data", "tuned_grids.json").read_text()
    return json.loads(text)["grids"]


def tuned_grid(name: str, schedule: Optional[Schedule] = None) -> Grid:
    """A shipped tuned grid by name, e.g. ``"mixture/dpmpp_2m/5"`` or ``"digits/unipc/6"``
    (``TABLES()`` lists them)."""
    tables = _tables()
    if name not in tables:
        raise ValueError(f"unknown tuned grid {name!r}; shipped: {', '.join(sorted(tables)) or 'none'}")
    return load_grid(tables[name], schedule)


def TABLES() -> List[str]:
    return sorted(_tables())


def sigmas_for_k_diffusion(grid: Grid) -> torch.Tensor:
    """The grid's noise levels sigma/alpha as k-diffusion's ``sigmas`` (float64, ending at 0 or
    sigma_min as the grid does)."""
    return torch.tensor(np.asarray(grid.ksigma, dtype=np.float64))


def diffusers_kwargs(grid: Grid, scheduler) -> dict:
    """Keyword arguments of ``scheduler.set_timesteps`` that put a diffusers scheduler (stock or a
    fastdiff drop-in) on ``grid``: ``sigmas=`` (the noise levels sigma/alpha, exact) where the
    class takes them, else ``timesteps=`` (the model times rounded to diffusers' integers, which
    moves the points to the nearest training step)."""
    import copy
    import inspect
    params = inspect.signature(scheduler.set_timesteps).parameters
    if "sigmas" in params:
        sigmas = [float(v) for v in grid.ksigma]
        try:
            copy.deepcopy(scheduler).set_timesteps(sigmas=sigmas)
            return {"sigmas": sigmas}
        except (ValueError, TypeError):
            pass                                      # e.g. UniPC takes sigmas only for flow models
    if "timesteps" in params:
        ts = [int(round(float(v))) for v in grid.model_t[:-1]]
        if any(a <= b for a, b in zip(ts[:-1], ts[1:])):
            raise ValueError("the grid's model times collide when rounded to diffusers' integer timesteps; "
                             f"{type(scheduler).__name__} takes no sigmas: use a scheduler that does (e.g. Euler)")
        return {"timesteps": ts}
    raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes neither sigmas= nor timesteps=")


# ---------------------------------------------------------------------------------------------
# Command line (fastdiff tune)
# ---------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--model", choices=("digits", "mixture"), default="digits",
                   help="the shipped digits model (default) or the analytic Gaussian mixture (exact reference)")
    p.add_argument("--solver", default="dpmpp_2m", help="a deterministic solver (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=5, help="steps of the tuned grid (default 5)")
    p.add_argument("--batch", type=int, default=32, help="noise samples to tune on (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tuning noise (default 0)")
    p.add_argument("--method", choices=METHODS, default="dp+refine")
    p.add_argument("--candidates", type=int, default=32, help="candidate points of the DP search (default 32)")
    p.add_argument("--max-evals", type=int, default=150, help="global-error evaluations of the refinement")
    p.add_argument("--out", required=True, help="the JSON file to write (fastdiff.tune.load_grid reads it)")


def run_from_args(args) -> int:
    out = Path(args.out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(out)!r}: directory {str(parent)!r} does not exist")
    for name in ("steps", "batch", "candidates", "max_evals"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    gen = torch.Generator().manual_seed(args.seed)
    kw = dict(solver=args.solver, steps=args.steps, method=args.method, candidates=args.candidates,
              max_evals=args.max_evals, progress=True, return_info=True)
    if args.model == "digits":
        from .models import digits as D
        model = D.load_digits_model().eval()
        noise = torch.randn((args.batch,) + D.IMAGE_SHAPE, generator=gen)
        labels = torch.arange(args.batch) % 10
        with torch.no_grad():
            grid, info = tune_grid(model, noise, schedule=D.digits_schedule(), prediction=D.PREDICTION,
                                   cond={"class_labels": labels}, **kw)
    else:
        from .models.gaussian_mixture import GaussianMixture
        sched = VESchedule(0.002, 80.0)
        gm = GaussianMixture.default(sched, dim=4, prediction="sample", seed=0)

        noise = torch.randn(args.batch, 4, dtype=torch.float64, generator=gen)
        grid, info = tune_grid(gm, noise, schedule=sched, prediction="sample", final="none",
                               reference=gm.ode_trajectory, **kw)
    save_grid(grid, out, solver=args.solver, steps=args.steps, model=args.model, method=args.method,
              error_start=info.error_start, error_final=info.error_final)
    print(f"tuned {args.steps} steps of {args.solver} on {args.batch} samples of the {args.model} model in "
          f"{info.seconds:.1f} s ({info.model_calls} model calls)")
    print(f"error vs the reference (RMS, tuning batch): {info.error_start:.4g} with the default spacing -> "
          f"{info.error_final:.4g} tuned")
    print("noise levels sigma/alpha: " + ", ".join(f"{v:.4g}" for v in grid.ksigma))
    print(f"wrote {out}")
    return 0
