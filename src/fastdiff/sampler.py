"""The sampling loop: any ``model(x, t, **kwargs)``, any solver, CFG fused into the step.

Per step the host does almost nothing: the coefficient table, the model times and every buffer
are prepared before the loop; each row is one model call (or none) and one fused-step call; no
tensor is read back (non-finite values raise a device-side flag that is read once at the end).
"""
from __future__ import annotations

import functools
import math
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .guidance import Guidance, GuidanceHook, as_guidance
from .parameterization import canonical_prediction
from .program import COL_G, COL_G0, COL_G1, Program, compile_program, guidance_affine, guidance_column
from .runtime import RowExecutor
from .schedules import DiscreteVP, Grid, Schedule, make_grid
from .solvers import Solver, get_solver

__all__ = ["sample", "Sampler"]

CHECK_FINITE = ("end", "step", "off")
# Runs on the C++ CPU kernel take the C++ row loop (fastdiff._C.RowLoop) where the Python loop would
# do nothing but call the model and the kernel; False: always the Python loop (tests compare the two).
NATIVE_LOOP = True
_OUT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))   # (the fast check's)
_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: one pass, no full-size temporaries (``isfinite(t).all()``
    writes a bool tensor as large as t). On the CPU a bit test in C++ (fastdiff._C.all_finite);
    elsewhere aminmax, which propagates NaN and has any infinity as its min or max."""
    if t.numel() == 0:
        return True
    if not t.is_floating_point():
        return True
    if t.is_cpu and t.dtype in _MODEL_DTYPES and t.is_contiguous():
        ext = ops.backends.load_extension()
        if not isinstance(ext, str) and hasattr(ext, "all_finite"):
            return ext.all_finite(t)
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class _LazyProgress:
    """A tqdm bar that exists only for runs that last: nothing is created or drawn until
    ``delay`` seconds have passed, so short runs pay one clock read per step."""

    __slots__ = ("total", "desc", "n", "start", "delay", "bar")

    def __init__(self, total: int, desc: str, delay: float = 0.5):
        self.total, self.desc, self.n, self.delay, self.bar = total, desc, 0, delay, None
        self.start = time.perf_counter()
        if delay <= 0.0:
            self._open()

    def _open(self) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, desc=self.desc, leave=False, initial=self.n)

    def update(self, steps: int = 1, read_clock: Optional[bool] = None) -> None:
        """``steps`` more done; the clock is read every 8 steps unless ``read_clock`` says."""
        self.n += steps
        if self.bar is not None:
            self.bar.update(steps)
        elif (not self.n & 7 if read_clock is None else read_clock) and self.left() <= 0.0:
            self._open()

    def left(self) -> float:
        """Seconds until the bar opens (0 once it is open)."""
        return 0.0 if self.bar is not None else self.delay - (time.perf_counter() - self.start)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_sample_like(name: str, t, shape: tuple, dev: torch.device) -> None:
    """A floating tensor of the sample's shape, with values, on the sample's device, finite."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}"
                        + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it has no values)")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the shape of noise {shape}, got {tuple(t.shape)}")
    if t.device != dev and not (t.device.type == dev.type == "cpu"):
        raise ValueError(f"{name} must be on {dev} (the device of noise), got {t.device}")
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_inpaint(inpaint, shape: tuple, dev: torch.device):
    """(known, mask), validated: known a floating tensor of the sample's shape, finite where the
    mask is non-zero; mask bool or real, broadcasting to the sample without enlarging it, in [0, 1]."""
    if not isinstance(inpaint, (tuple, list)) or len(inpaint) != 2:
        raise TypeError(f"inpaint must be a pair (known, mask), got {type(inpaint).__name__}"
                        + (f" of length {len(inpaint)}" if isinstance(inpaint, (tuple, list)) else ""))
    known, mask = inpaint
    if not isinstance(known, torch.Tensor) or not known.is_floating_point():
        raise TypeError(f"inpaint known data must be a floating-point torch.Tensor, got {type(known).__name__}"
                        + (f" of dtype {known.dtype}" if isinstance(known, torch.Tensor) else ""))
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError(f"inpaint mask must be a bool or real torch.Tensor, got {type(mask).__name__}"
                        + (f" of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else ""))
    for name, t in (("known data", known), ("mask", mask)):
        if t.device.type == "meta":
            raise ValueError(f"inpaint {name} is on the meta device (it has no values)")
        if t.device != dev and not (t.device.type == dev.type == "cpu"):
            raise ValueError(f"inpaint {name} must be on {dev} (the device of noise), got {t.device}")
    if tuple(known.shape) != shape:
        raise ValueError(f"inpaint known data must have the shape of noise {shape}, got {tuple(known.shape)}")
    try:
        full = tuple(torch.broadcast_shapes(mask.shape, shape))
    except RuntimeError:
        full = None
    if full != shape:
        raise ValueError(f"inpaint mask of shape {tuple(mask.shape)} does not broadcast to the sample's shape "
                         f"{shape}" + (f" (it would enlarge it to {full})" if full is not None else ""))
    if mask.dtype != torch.bool:
        m = mask.double() if mask.is_floating_point() else mask
        if not bool(((m >= 0) & (m <= 1)).all()):
            bad = m[~((m >= 0) & (m <= 1))].reshape(-1)[0].item()
            raise ValueError(f"inpaint mask values must lie in [0, 1] (1 = known), got {bad}")
    if not bool((torch.isfinite(known) | (mask == 0)).all()):
        raise ValueError("inpaint known data contains NaN or Inf where the mask is non-zero")
    return known, mask


def _model_output(out) -> torch.Tensor:
    """Accept a tensor, a diffusers-style output object (``.sample``) or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model must return a tensor (or an object with .sample), got {type(out).__name__}")


def _batch_kwargs(uncond: Dict[str, Any], cond: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs for one batched call on [uncond; cond]: tensors concatenated along dim 0."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k in cond:
        c, u = cond[k], uncond[k]
        if isinstance(c, torch.Tensor) != isinstance(u, torch.Tensor):
            raise TypeError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or both not")
        if isinstance(c, torch.Tensor):
            if c.shape[1:] != u.shape[1:] or c.shape[0] != u.shape[0]:
                raise ValueError(f"cond[{k!r}] {tuple(c.shape)} and uncond[{k!r}] {tuple(u.shape)} differ in shape")
            out[k] = torch.cat([u, c])
        else:
            if c != u:
                raise ValueError(f"non-tensor kwarg {k!r} differs between cond and uncond")
            out[k] = c
    return out


# ---------------------------------------------------------------------------------------------
# The build cache: (solver options, grid or schedule + spacing, prediction, guidance) -> program.

_BUILD_CACHE: "OrderedDict[tuple, _Built]" = OrderedDict()
_BUILD_CACHE_SIZE = 64


class _Unkeyable(Exception):
    pass


def _freeze(v, depth: int = 0):
    """A hashable stand-in for v's value (arrays by their bytes, objects by their type and
    attributes); raises _Unkeyable for what has no value identity (functions, models, ...), and
    then the build is simply not cached."""
    if depth > 6:
        raise _Unkeyable
    if v is None or isinstance(v, (bool, int, str, bytes, np.bool_, np.integer)):
        return v
    if isinstance(v, (float, np.floating)):
        return ("f", float(v).hex())          # (keeps -0.0 and NaN apart from 0.0 and from each other)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__,) + tuple(_freeze(e, depth + 1) for e in v)
    if isinstance(v, Mapping):
        return ("dict",) + tuple(sorted((str(k), _freeze(e, depth + 1)) for k, e in v.items()))
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.numel() > 1 << 16:
            raise _Unkeyable
        return ("t", str(v.dtype), tuple(v.shape), v.detach().contiguous().numpy().tobytes())
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial,
                      torch.nn.Module, type)):
        raise _Unkeyable
    if is_dataclass(v):
        return (type(v),) + tuple((f.name, _freeze(getattr(v, f.name), depth + 1)) for f in fields(v))
    if hasattr(v, "__dict__"):
        return (type(v),) + tuple((k, _freeze(e, depth + 1)) for k, e in sorted(vars(v).items()))
    raise _Unkeyable


def _build_key(*arguments):
    """The build cache's key: Sampler.build's arguments by value (None: not cacheable)."""
    try:
        return tuple(_freeze(v) for v in arguments)
    except (_Unkeyable, TypeError, AttributeError):
        return None


class _Built:
    """A cached build: the program and everything it was built from, and the buffers of finished
    runs that were given back to it (one-call runs, ``fastdiff.sample``: up to SHARED_SPARE_BYTES
    each, since the cache must not hold large tensors on a GPU behind the user's back); a Sampler
    the caller keeps holds its own buffers, whatever their size."""

    __slots__ = ("program", "grid", "solver", "prediction", "guidance", "state_dtype", "spare", "one_calls")

    def __init__(self, program, grid, solver, prediction, guidance, state_dtype):
        self.program, self.grid, self.solver = program, grid, solver
        self.prediction, self.guidance, self.state_dtype = prediction, guidance, state_dtype
        self.spare = {}
        self.one_calls = {}

    def one_call(self, cls, device) -> "Sampler":
        """The Sampler of one-call runs (fastdiff.sample) on ``device``: kept with the entry, since
        nobody else sees it (its table is the program's own, never edited, and what it derives from
        the program on its first run is derived once)."""
        dev = torch.device(device)
        s = self.one_calls.get((cls, dev))
        if s is None:
            s = self.one_calls[(cls, dev)] = cls(self.program, self.grid, self.solver, self.prediction, self.guidance,
                                                 dev, self.state_dtype)
            s._shared, s._transient = self.spare, True
        return s

    def replica(self, cls, device) -> "Sampler":
        p = self.program      # (a table of its own: callers may edit a Sampler's table)
        program = Program(rows=p.rows, num_slots=p.num_slots, table=p.table.copy(), steps=p.steps)
        s = cls(program, self.grid, self.solver, self.prediction, self.guidance, torch.device(device),
                self.state_dtype)
        s._shared = self.spare
        return s


SHARED_SPARE_BYTES = 4 << 20


@dataclass
class Sampler:
    """A prepared sampling run: solver program and device tables built once, reusable for many
    batches of the same shape. ``fastdiff.sample`` is the one-call form."""

    program: Program
    grid: Grid
    solver: Solver
    prediction: str
    guidance: Optional[Guidance]
    device: torch.device
    state_dtype: torch.dtype = torch.float32
    # Buffers of finished runs, by (shape, device, dtypes, ...), for the next run to reuse: this
    # Sampler's own, and those its build-cache entry keeps for one-call runs (``_shared``).
    _spare: Optional[dict] = field(default=None, init=False, repr=False, compare=False)
    _shared: Optional[dict] = field(default=None, init=False, repr=False, compare=False)
    # One-call use (fastdiff.sample): the run's buffers go back to the shared spares, if small.
    _transient: bool = field(default=False, init=False, repr=False, compare=False)
    _row_cfg: Optional[list] = field(default=None, init=False, repr=False, compare=False)
    _draws_noise: Optional[bool] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, *, solver: Union[str, Solver] = "dpmpp_2m", steps: int = 20,
              schedule: Optional[Schedule] = None, grid: Optional[Grid] = None, spacing: str = "auto",
              final: str = "zero", prediction: str = "epsilon", guidance=None,
              solver_options: Optional[dict] = None, device="cpu",
              state_dtype: torch.dtype = torch.float32, **grid_options) -> "Sampler":
        """Build the run: the grid, the solver's rows and the compiled program. Built programs are
        cached by what determines them (the solver's options, the grid or the schedule and its
        spacing arguments, the prediction, the guidance), so building the same run again costs a
        key lookup, not the solver's Python (fastdiff.sample and the k-diffusion functions build on
        every call)."""
        return cls._built(solver, steps, schedule, grid, spacing, final, prediction, guidance, solver_options,
                          state_dtype, grid_options).replica(cls, device)

    @classmethod
    def _built(cls, solver, steps, schedule, grid, spacing, final, prediction, guidance, solver_options, state_dtype,
               grid_options) -> "_Built":
        """The build cache's entry for these arguments (built and cached on a miss)."""
        key = _build_key(solver, solver_options, grid, schedule, steps, spacing, final, grid_options, prediction,
                         guidance, state_dtype)
        hit = _BUILD_CACHE.get(key) if key is not None else None
        if hit is not None:              # (the same arguments were checked when the entry was built)
            _BUILD_CACHE.move_to_end(key)
            return hit
        solver = get_solver(solver, **(solver_options or {}))
        prediction = canonical_prediction(prediction)
        guidance = as_guidance(guidance)
        if state_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        if grid is not None and (grid_options or schedule is not None):
            raise ValueError("pass either grid or (schedule, steps, spacing, ...), not both")
        if grid is None:
            schedule = DiscreteVP() if schedule is None else schedule
            grid = make_grid(schedule, steps, spacing, final=final, **grid_options)
        rows = solver.rows(grid)
        g = guidance_column(rows, guidance.g_at if guidance is not None else None)
        affine = guidance_affine(rows, guidance.g_affine_at if guidance is not None else None)
        if guidance is not None and guidance.needs_hook and any(r.reads_uncond for r in rows):
            raise ValueError(f"solver {solver.name!r} uses the unconditional prediction on its own (CFG++); it takes "
                             "no guidance rescale / classifier guidance / x0 clipping")
        program = compile_program(rows, prediction, solver.num_slots, grid.steps, guidance_scale=g,
                                  guidance_affine=affine)
        built = _Built(program, grid, solver, prediction, guidance, state_dtype)
        if key is not None:
            _BUILD_CACHE[key] = built
            while len(_BUILD_CACHE) > _BUILD_CACHE_SIZE:
                _BUILD_CACHE.popitem(last=False)
        return built

    # ------------------------------------------------------------------------------------------
    def __call__(self, model: Callable, noise: torch.Tensor, *, cond: Optional[dict] = None,
                 uncond: Optional[dict] = None, model_kwargs: Optional[dict] = None,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 noise_sampler: Optional[Callable] = None, callback: Optional[Callable] = None,
                 progress: Optional[bool] = None, backend: str = "auto", model_dtype: Optional[torch.dtype] = None,
                 inpaint: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, check_finite: str = "end",
                 init_noise_scale: Optional[float] = None, x_init: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample from ``noise``. Every argument is checked here, before any tensor is written or
        the model is called. Sampling is not differentiable: it runs under ``torch.no_grad()`` (as
        diffusers' pipelines and k-diffusion's samplers do), and inputs that require grad in grad
        mode raise instead of getting a wrong gradient."""
        # --- Validation: everything before the first write or model call. ----------------------
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **kwargs), got {type(model).__name__}")
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}"
                            + (f" of dtype {noise.dtype}" if isinstance(noise, torch.Tensor) else ""))
        if noise.device.type == "meta":
            raise ValueError("noise is on the meta device (it has no values); pass a tensor on cpu or a GPU")
        if noise.dim() < 1 or noise.shape[0] < 1:
            raise ValueError(f"noise must have a non-empty batch dimension, got shape {tuple(noise.shape)}")
        if not all_finite(noise):
            raise ValueError("noise contains NaN or Inf")
        if check_finite not in CHECK_FINITE:
            raise ValueError(f"check_finite must be one of {CHECK_FINITE}, got {check_finite!r}")
        dev = noise.device
        if dev != self.device and not (dev.type == self.device.type == "cpu"):
            raise ValueError(f"noise is on {dev} but the sampler was built for {self.device}")
        shape = tuple(noise.shape)
        if seed is not None:
            seed = ops.as_int("seed", seed, 0, 2 ** 64)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if init_noise_scale is not None:
            init_noise_scale = ops.as_real("init_noise_scale", init_noise_scale)
            if not init_noise_scale > 0:
                raise ValueError(f"init_noise_scale must be > 0, got {init_noise_scale}")
        if x_init is not None:
            _check_sample_like("x_init", x_init, shape, dev)
        if model_dtype is not None and model_dtype not in _MODEL_DTYPES:
            raise TypeError(f"model_dtype must be None or one of {', '.join(map(str, _MODEL_DTYPES))}, "
                            f"got {model_dtype!r}")
        if progress is not None and not isinstance(progress, (bool, np.bool_)):
            raise TypeError(f"progress must be a bool or None, got {type(progress).__name__} {progress!r}")
        for name, f in (("callback", callback), ("noise_sampler", noise_sampler)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable or None, got {type(f).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
        for name, d in (("cond", cond), ("uncond", uncond), ("model_kwargs", model_kwargs)):
            if d is not None and not isinstance(d, Mapping):
                raise TypeError(f"{name} must be a dict of model keyword arguments (or None), got {type(d).__name__}")
        cond = dict(cond or {})
        model_kwargs = dict(model_kwargs or {})
        if uncond is not None:
            if set(uncond) != set(cond):
                raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
            if self.guidance is None:
                warnings.warn("uncond is ignored: no guidance was given (pass guidance=<scale> for classifier-free "
                              "guidance)", UserWarning, stacklevel=3)
        mask = known = None
        if inpaint is not None:
            known, mask = _check_inpaint(inpaint, shape, dev)
        if torch.is_grad_enabled():
            named = [("noise", noise), ("x_init", x_init), ("inpaint known", known), ("inpaint mask", mask)]
            for prefix, d in (("cond", cond), ("uncond", uncond or {}), ("model_kwargs", model_kwargs)):
                named += [(f"{prefix}[{k!r}]", v) for k, v in d.items()]
            for name, t in named:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    raise ValueError(f"{name} requires grad, but fastdiff's sampler is not differentiable (it "
                                     "would return a wrong gradient): detach it, or call under torch.no_grad()")
        with torch.no_grad():
            return self._run(model, noise, cond, uncond, model_kwargs, generator, seed, noise_sampler, callback,
                             progress, backend, model_dtype, known, mask, check_finite, init_noise_scale, x_init)

    def _run(self, model, noise, cond, uncond, model_kwargs, generator, seed, noise_sampler, callback, progress,
             backend, model_dtype, known, mask, check_finite, init_noise_scale, x_init) -> torch.Tensor:
        prog, rows = self.program, self.program.rows
        dev = noise.device
        shape, B = tuple(noise.shape), noise.shape[0]
        model_dtype = model_dtype or (torch.float64 if self.state_dtype == torch.float64 else torch.float32)

        # Which model evaluations need the uncond pass: where some sample's g != 1, and wherever
        # the solver reads the unconditional prediction on its own (CFG++) if guidance is given.
        gd = self.guidance
        g_host = None
        if gd is not None and gd.per_sample:
            g_host = gd.g_vector()
            if g_host.shape[0] != B:
                raise ValueError(f"guidance has {g_host.shape[0]} per-sample scales for a batch of {B}")
            g01 = prog.table[:, [COL_G0, COL_G1]]
            row_cfg = np.any(g01[:, :1] + g01[:, 1:] * g_host[None, :] != 1.0, axis=1).tolist()
            row_cfg = [r.needs_model and (row_cfg[i] or r.reads_uncond) for i, r in enumerate(rows)]
        else:
            if self._row_cfg is None:
                g = (prog.table[:, COL_G] != 1.0).tolist()
                self._row_cfg = [r.needs_model and (g[i] or (gd is not None and r.reads_uncond))
                                 for i, r in enumerate(rows)]
            row_cfg = self._row_cfg
        use_cfg = any(row_cfg)
        if use_cfg and uncond is None:
            raise ValueError("guidance needs the unconditional inputs: pass uncond={...} (and cond={...})")
        kw_cond = {**model_kwargs, **cond}
        kw_both = {**model_kwargs, **_batch_kwargs(dict(uncond), cond)} if use_cfg else None

        ex = self._executor(shape, dev, model_dtype, (2 * B) if use_cfg else B, check_finite != "off", g_host,
                            backend)
        try:
            return self._loop(ex, model, noise, kw_cond, kw_both, row_cfg, use_cfg, generator, seed, noise_sampler,
                              callback, progress, known, mask, check_finite, init_noise_scale, x_init)
        finally:
            self._release(ex)

    def _executor(self, shape, dev, model_dtype, model_batch, flag, g_host, backend) -> RowExecutor:
        """This run's RowExecutor. Its buffers (y, history, model input, flags) are kept by the
        Sampler and reused by the next run of the same shape (no allocation, no first touch of
        fresh pages); x is new for every run, since it is returned."""
        key = (shape, dev, model_dtype, model_batch, flag, g_host is not None, backend)
        ex = self._spare.pop(key, None) if self._spare else None
        if ex is None and self._shared:
            ex = self._shared.pop(key, None)
        if ex is None:
            g_vec = None if g_host is None else torch.empty(len(g_host), dtype=torch.float64, device=dev)
            like = torch.empty(shape, dtype=self.state_dtype, device=dev)
            ex = RowExecutor.allocate(self.program, like, state_dtype=self.state_dtype, model_dtype=model_dtype,
                                      model_in_batch=model_batch, check_finite=flag, guidance=g_vec, backend=backend)
            ex.key = key
        else:
            ex.fresh_state()
            if ex.hist is not None:
                ex.hist.zero_()
            if ex.bad_row is not None:
                ex.bad_row.zero_()
        if g_host is not None:
            ex.guidance.copy_(torch.from_numpy(g_host))
        return ex

    def _release(self, ex: RowExecutor) -> None:
        if self._transient:
            if self._shared is not None and ex.nbytes() <= SHARED_SPARE_BYTES:
                self._shared[ex.key] = ex
            return
        if self._spare is None:
            self._spare = {}
        if len(self._spare) < 4:
            self._spare[ex.key] = ex

    def _loop(self, ex: RowExecutor, model, noise, kw_cond, kw_both, row_cfg, use_cfg, generator, seed, noise_sampler,
              callback, progress, known, mask, check_finite, init_noise_scale, x_init) -> torch.Tensor:
        prog, rows = self.program, self.program.rows
        dev = noise.device
        shape, B = tuple(noise.shape), noise.shape[0]
        inpaint = mask is not None
        time_dtype = torch.float64 if self.state_dtype == torch.float64 else torch.float32

        # The initial state, written into the executor's (fresh) x.
        x = ex.x
        if x_init is None:
            a0, s0 = float(self.grid.alpha[0]), float(self.grid.sigma[0])
            scale = self.grid.schedule.init_noise_scale(a0, s0) if init_noise_scale is None else init_noise_scale
            torch.mul(noise, scale, out=x) if noise.dtype == x.dtype else x.copy_(noise.to(x.dtype) * scale)
        else:
            x.copy_(x_init)
        # The loop's per-row facts depend only on the program and these buffers: computed for the
        # executor's first run, reused by the runs after it.
        memo = ex.memo.get(inpaint)
        if memo is None:
            memo = ex.memo[inpaint] = self._loop_plan(ex, use_cfg, inpaint, B, time_dtype)
        t_full, t_half, plan = memo
        if inpaint:
            # Read only; known becomes a new tensor, zero where the mask is 0, so NaN or Inf there
            # (validated only where the mask is non-zero) cannot leak into the sample as 0 * NaN.
            mask = mask.to(device=dev, dtype=self.state_dtype)
            known = torch.where(mask != 0, known.to(device=dev, dtype=self.state_dtype), 0.0)
            base_noise = noise.to(self.state_dtype)

        if self._draws_noise is None:
            self._draws_noise = any(r.noise_id >= 0 for r in rows)
        if seed is None and noise_sampler is None and self._draws_noise:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
        seed = 0 if seed is None else seed

        # Non-linear guidance (rescale, classifier, x0 clipping, guider methods) only on runs that use it.
        hook = (GuidanceHook(self.guidance, prog, self.prediction, ex.table)
                if self.guidance is not None and self.guidance.needs_hook else None)

        # progress=None: a bar only for runs that last (costs a clock read per step otherwise).
        bar = (None if progress is False else
               _LazyProgress(prog.steps, f"fastdiff {self.solver.name}", delay=0.0 if progress else 0.5))
        shape_one, shape_both = torch.Size(shape), torch.Size((2 * B,) + shape[1:])
        loop = (self._native_loop(ex, memo, row_cfg, B) if NATIVE_LOOP and hook is None and noise_sampler is None
                and callback is None and not inpaint and check_finite != "step" else None)
        if loop is not None:
            self._run_native(loop, x, model, kw_both, kw_cond, seed, bar, row_cfg, shape_one, shape_both)
        else:
            self._run_python(ex, plan, t_full, t_half, model, kw_both, kw_cond, row_cfg, use_cfg, seed, noise_sampler,
                             hook, bar, callback, inpaint, mask, known, base_noise if inpaint else None, check_finite,
                             B, shape, shape_one, shape_both)
        if bar is not None:
            bar.close()
        if ex.first_bad_row():
            self._raise_nonfinite(ex.first_bad_row())
        return x

    def _native_loop(self, ex: RowExecutor, memo, row_cfg, B: int):
        """The executor's C++ row loop for this plan and these CFG rows (built once per executor and
        row_cfg), or None where the backend has none."""
        cached = ex.memo.get("native")
        if cached is not None and cached[0] == row_cfg:
            return cached[1]
        t_full, t_half, plan = memo
        rows = []
        for (_, needs_model, _, _, next_in, step_done), (hw, flags, nid), cfg in zip(plan, ex.args, row_cfg):
            rows.append((needs_model, bool(cfg), hw, flags, nid, next_in is not None, step_done))
        loop = ex.native_loop(rows, t_full, t_half, B)
        ex.memo["native"] = (list(row_cfg), loop)
        return loop

    def _run_native(self, loop, x, model, kw_both, kw_cond, seed, bar, row_cfg, shape_one, shape_both) -> None:
        """All rows through the C++ loop. It hands back to Python only to open or advance the
        progress bar and for a model output that is not a plain tensor of the expected shape and a
        model dtype (converted or rejected here, as in the Python loop, then the loop resumes)."""
        n = len(row_cfg)
        i, ready, given = 0, False, None
        while i < n:
            budget = -1.0 if bar is None else max(bar.left(), 0.0)
            i, steps, pending, ready = loop.run(x, model, kw_both, kw_cond, i, n, seed, ready, budget, given)
            given = None
            if bar is not None and steps:
                bar.update(steps, read_clock=True)
            if pending is not None:
                want = shape_both if row_cfg[i] else shape_one
                given = self._check_model_output(_model_output(pending), want, i)

    def _run_python(self, ex, plan, t_full, t_half, model, kw_both, kw_cond, row_cfg, use_cfg, seed, noise_sampler,
                    hook, bar, callback, inpaint, mask, known, base_noise, check_finite, B, shape, shape_one,
                    shape_both) -> None:
        """The rows in Python: any backend, and the runs with a guidance hook, callback, noise
        sampler, inpainting or a finiteness check per step."""
        x, y, model_in = ex.x, ex.y, ex.model_in
        model_in_ready = False
        cond_in = model_in[B:] if use_cfg else model_in
        run = ex.run
        for i, (r, needs_model, eval_y, noise_id, next_in, step_done) in enumerate(plan):
            E = y if eval_y else x
            cond_out = uncond_out = None
            if needs_model:
                if not model_in_ready:
                    model_in[:B].copy_(E)
                    if use_cfg:
                        model_in[B:].copy_(E)
                if row_cfg[i]:
                    out = model(model_in, t_full[i], **kw_both) if kw_both else model(model_in, t_full[i])
                    if type(out) is not torch.Tensor or out.shape != shape_both or out.dtype not in _OUT_DTYPES:
                        out = self._check_model_output(_model_output(out), shape_both, i)
                    uncond_out, cond_out = out.chunk(2)  # views; cheaper than split()
                else:
                    cond_out = model(cond_in, t_half[i], **kw_cond) if kw_cond else model(cond_in, t_half[i])
                    if (type(cond_out) is not torch.Tensor or cond_out.shape != shape_one
                            or cond_out.dtype not in _OUT_DTYPES):
                        cond_out = self._check_model_output(_model_output(cond_out), shape_one, i)
            noise_t = None
            if noise_id >= 0 and noise_sampler is not None:
                noise_t = noise_sampler(r, x)
                if not isinstance(noise_t, torch.Tensor) or tuple(noise_t.shape) != shape:
                    raise ValueError(f"noise_sampler must return a tensor of shape {shape}")
            if hook is not None and needs_model:
                step_table, cond_out, uncond_out = hook(i, r, E, cond_out, uncond_out, t_half[i])
                run(i, cond_out, uncond_out, noise_t, seed, next_in, step_table)
            else:
                run(i, cond_out, uncond_out, noise_t, seed, next_in)
            model_in_ready = next_in is not None
            if step_done:
                n = r.step
                if inpaint:
                    a, s = float(self.grid.alpha[n + 1]), float(self.grid.sigma[n + 1])
                    # x <- mask * (known noised to this level, with the initial noise) + (1 - mask) * x
                    x.add_(mask * (a * known + s * base_noise - x))
                if check_finite == "step" and ex.first_bad_row():
                    self._raise_nonfinite(ex.first_bad_row())
                if callback is not None:
                    callback({"step": n, "x": x, "sigma": float(self.grid.sigma[n + 1]),
                              "alpha": float(self.grid.alpha[n + 1]), "t": float(self.grid.t[n + 1])})
                if bar is not None:
                    bar.update()

    def _loop_plan(self, ex: RowExecutor, use_cfg: bool, inpaint: bool, B: int, time_dtype):
        """(model times per row, the same for the cond half, per-row facts) of runs on ``ex``."""
        rows, model_in = self.program.rows, ex.model_in
        # Model times for every row in one tensor; per-row views are taken once.
        t_rows = torch.tensor([r.point.model_t if r.needs_model else 0.0 for r in rows], dtype=time_dtype)
        t_rows = t_rows.to(model_in.device)[:, None].expand(len(rows), model_in.shape[0])
        t_full = list(t_rows.unbind(0))
        t_half = [t[:B] for t in t_full] if use_cfg else t_full
        plan = []
        for i, r in enumerate(rows):
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            # The row writes the next model input in its epilogue when it writes the buffer the next
            # model call reads (saves a pass over the tensor).
            writes_next = (nxt is not None and nxt.needs_model and not inpaint
                           and (r.out_x is not None if nxt.eval_at == "x" else r.out_y is not None))
            plan.append((r, r.needs_model, r.eval_at == "y", r.noise_id, model_in if writes_next else None,
                         nxt is None or nxt.step != r.step))
        return t_full, t_half, plan

    @staticmethod
    def _check_model_output(out: torch.Tensor, shape, row: int) -> torch.Tensor:
        if out.shape != shape:
            raise ValueError(f"model output at row {row} has shape {tuple(out.shape)}, expected {tuple(shape)} "
                             "(the shape of its input)")
        if not out.is_floating_point():
            raise TypeError(f"model output must be floating point, got {out.dtype}")
        return out

    def _raise_nonfinite(self, flag: int):
        r = self.program.rows[flag - 1]
        raise FloatingPointError(
            f"non-finite values (NaN/Inf) in the sample at step {r.step} (row {flag - 1}, noise level "
            f"sigma={r.point.sigma if r.point else float('nan'):.4g}): the model output or the solver "
            "diverged; pass check_finite='off' to get the values anyway")


def sample(model: Callable, noise: torch.Tensor, *, solver: Union[str, Solver] = "dpmpp_2m", steps: int = 20,
           schedule: Optional[Schedule] = None, grid: Optional[Grid] = None, spacing: str = "auto",
           final: str = "zero", prediction: str = "epsilon", guidance=None,
           solver_options: Optional[dict] = None, state_dtype: torch.dtype = torch.float32,
           grid_options: Optional[dict] = None, **run_options) -> torch.Tensor:
    """Sample with ``solver`` from ``model(x, t, **kwargs)`` starting at ``noise`` (standard normal).

    schedule/steps/spacing/final build the grid (or pass ``grid``); ``prediction`` is what the
    model outputs (epsilon / sample / v_prediction / flow / score); ``guidance`` a CFG scale or a
    ``fastdiff.Guidance`` with ``cond``/``uncond`` kwarg dicts for the two passes. Run options:
    ``cond``, ``uncond``, ``model_kwargs``, ``generator`` / ``seed`` (Philox noise),
    ``noise_sampler``, ``callback``, ``progress`` (True: a tqdm bar; None, the default: a bar once
    the run has lasted 0.5 s; False: none), ``backend``, ``model_dtype``,
    ``inpaint=(known, mask)`` (mask bool or in [0, 1], broadcasting to the sample; 1 = known),
    ``check_finite``. Returns the float32 (state_dtype) sample. Sampling is not differentiable:
    it runs under ``torch.no_grad()``, and in grad mode an input that requires grad raises.
    """
    if isinstance(noise, torch.Tensor):
        dev = noise.device
    else:
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    s = Sampler._built(solver, steps, schedule, grid, spacing, final, prediction, guidance, solver_options, state_dtype,
                       grid_options or {}).one_call(Sampler, dev)
    return s(model, noise, **run_options)
