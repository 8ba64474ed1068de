"""What every drop-in scheduler shares: a diffusers scheduler whose ``step`` runs a fastdiff program.

A drop-in class subclasses diffusers' own scheduler class (so its name, config, ``set_timesteps``,
``timesteps`` / ``sigmas``, ``scale_model_input``, ``add_noise``, ``order`` and save/load are
diffusers' own) and replaces ``step``. The first ``step`` of a run asks the class for a ``Plan``:
the solver rows of the run, one per ``step`` call, built from diffusers' own arrays (sigmas,
alphas_cumprod) by a fastdiff solver, with diffusers' conversion of the model output to x0 per
call. The plan is compiled once into a float64 table on the device, and every ``step`` call is
one fused kernel pass over state buffers the scheduler keeps (x, the evaluation point y of
multi-stage methods, the history slots): no per-step host work beyond Python, no host sync.

The state lives in diffusers' sample space (the ``sample`` a pipeline passes around: x/alpha for
the Euler family, x itself for DDIM / DPM-Solver / UniPC), so nothing is converted at the
boundary; a plan builds its grid in that space (alpha = 1 on the Euler family's VE grid).

Every ``step`` reads ``sample`` itself: no cached copy of the caller's tensor is ever trusted,
since edits that bypass the version counter (``x.data[...] = v``, writes through ``x.numpy()``)
cannot be detected cheaply. A pipeline that edits the latents between steps (inpainting) gets
exactly what diffusers would use. Where the call's row needs nothing of the state that the sample
does not hold (a row evaluated at x that writes x only: Euler, Euler ancestral, DDIM, DDPM, LCM;
the second stage of Heun-type steps, evaluated at y) and the sample is float32, contiguous and on
the run's device, the pass reads the sample in place, read only; otherwise it is copied into the
float32 state buffer first (``_sample_binding``). Each ``step`` returns a new tensor (written by
the same kernel pass), never a view of the state, so a caller may keep it.

What ``step`` returns is what diffusers' own ``step`` returns: with ``return_dict=False`` a plain
tuple (``(prev_sample,)`` or ``(prev_sample, pred_original_sample)``), else diffusers' own output
class of the scheduler (``DDIMSchedulerOutput``, ``SchedulerOutput``, ...), with the dtypes
diffusers' arithmetic gives for the dtypes of ``sample`` and ``model_output``. A call that raises
leaves the scheduler as it was before the call.
"""
from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...ops.backends import load_extension
from ...runtime import RowExecutor, row_args
from ...program import (COL_G, COL_G1, COL_QD, COL_QY, FLAG_MODEL_IN_FROM_Y, FLAG_WRITE_Y, OUT_BASE, OUT_H, OUT_Y,
                        Row, col_out_slot, col_out_x, col_out_y, col_s_in, compile_program, out_width, table_width)
from .cfg import GuidedOutput

__all__ = ["Plan", "FastdiffScheduler", "StepOutput", "drop_in"]

_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


@dataclass
class Plan:
    """The rows of one sampling run, one per ``step`` call from the run's first call on.

    ``fold[i] = (A_x, A_d)``: diffusers' conversion of call i's model output to x0 in its sample
    space, x0 = A_x * sample + A_d * model_output. ``draws[i]``: whether diffusers draws noise at
    call i (also where the noise is multiplied by 0, so a shared generator advances the same way).
    ``x0_transform``: clip_sample / thresholding, applied to x0 before the step."""

    rows: List[Row]
    fold: Sequence[Tuple[float, float]]
    num_slots: int
    draws: Optional[Sequence[bool]] = None
    noise_dtype: Optional[torch.dtype] = None          # None: the model output's dtype
    x0_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    extra: Optional[dict] = None                       # per-class data the class's own hooks read

    def __post_init__(self):
        if self.draws is None:
            self.draws = [r.noise_id >= 0 for r in self.rows]
        if not (len(self.rows) == len(self.fold) == len(self.draws)):
            raise ValueError("a plan needs one fold and one draw flag per row")
        for i, r in enumerate(self.rows):
            if not r.needs_model:
                raise ValueError(f"row {i} has no model evaluation; every step() call is one")
            uses_z = any(o is not None and o.z != 0.0 for o in (r.out_x, r.out_y))
            if uses_z and not self.draws[i]:
                raise ValueError(f"row {i} adds noise but the plan draws none there")
            if i and self.rows[i - 1].next_eval != r.eval_at:
                raise ValueError(f"row {i} evaluates at {r.eval_at!r} but row {i - 1} returns {self.rows[i - 1].next_eval!r}")

    def sliced(self, start: int) -> "Plan":
        """The calls from ``start`` on, for plans whose rows do not read earlier steps' history."""
        if start and self.rows[start].eval_at != "x":
            raise ValueError(f"a run cannot begin at call {start}: it is the second stage of a step "
                             "(begin at an even index of the interleaved timesteps)")
        return Plan(self.rows[start:], self.fold[start:], self.num_slots, self.draws[start:], self.noise_dtype,
                    self.x0_transform, self.extra)


# How a call's pass reads the caller's ``sample`` (_Program.args):
_VIA_STATE = 0     # copied into the run's float32 state buffer (x or y), which the pass updates in place
_SAMPLE_AS_X = 1   # read in place as x; the new x goes straight into the returned tensor (as y)
_SAMPLE_AS_Y = 2   # read in place as y (E); the pass updates the state x and writes the returned tensor
# How a call forms pred_original_sample (the C++ step's modes, csrc/cpu/dropin_step.cpp): not at all,
# by its own pass (_x0_slot_table), by torch's ops (_x0_now / _x0_in_place), by the kernel's x0 pass.
_X0_NONE, _X0_SLOT, _X0_TORCH, _X0_PASS = 0, 1, 2, 3


def _sample_binding(rows: List[Row], i: int, num_slots: int) -> int:
    """How call ``i`` may read its sample without copying it into the run's state.

    The sample can stand in for a state buffer that the pass only reads and that no later call
    reads from the state: y is only ever read as the evaluation point E, which every call takes
    from its own sample; x is read by a later call only where that call evaluates at y (the
    second stage of Heun, KDPM2, ...). A row evaluated at x that writes x only, with the next
    call evaluated at x again, then needs no state at all: its new x is the returned tensor,
    written as the row's y output. (Only without history slots: the kernel reads every slot in
    that pass, and a row writing a slot keeps the state path, whose one-pass loop writes both.)"""
    r = rows[i]
    nxt = rows[i + 1].eval_at if i + 1 < len(rows) else "x"
    if r.eval_at == "x":
        if num_slots == 0 and r.out_y is None and not r.writes and nxt == "x":
            return _SAMPLE_AS_X
        return _VIA_STATE
    return _SAMPLE_AS_Y if r.out_y is None else _VIA_STATE


class _Program:
    """A plan compiled: the float64 tables and the fused-step arguments of each row."""

    def __init__(self, plan: Plan):
        rows, K = plan.rows, plan.num_slots
        # Compiled with the model output taken as x0 itself; then diffusers' conversion folded in.
        self.x0_table = compile_program(rows, "sample", K, rows[-1].step + 1).table
        fold = np.asarray(plan.fold, dtype=np.float64).reshape(len(rows), 2)
        with np.errstate(all="ignore"):       # (reported below)
            table = compile_program(rows, "sample", K, rows[-1].step + 1, x0_coefs=fold, check_finite=False).table
        if not np.all(np.isfinite(table)):
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(table))[:, 0]})
            raise ValueError(f"non-finite step coefficients at calls {bad[:10]} (a degenerate schedule?)")
        # (with clip_sample / thresholding the x0 is formed beside the pass from the state copy)
        bindings = [_sample_binding(rows, i, K) if plan.x0_transform is None else _VIA_STATE for i in range(len(rows))]
        # A row that reads its sample as x writes its result as y: its y-out block (unused by the
        # row as compiled, which writes x only) repeats the x-out block, so one table (and one g
        # column for set_g) serves both passes.
        cx, cy, w = col_out_x(K), col_out_y(K), out_width(K)
        for i, b in enumerate(bindings):
            if b == _SAMPLE_AS_X:
                table[i, cy:cy + w] = table[i, cx:cx + w]
        self.table = table
        self.fold = [(float(a), float(b)) for a, b in fold]
        self.plan = plan
        self.row_args = row_args(rows)        # (bound once per run: kept with the shared program)
        self.x0_slot = None                   # (_x0_slot's table and usability at g = 1, where the fold is the plan's)
        self.uses_y = any(r.eval_at == "y" or r.out_y is not None for r in rows)
        # Per call, what the scheduler needs beyond the kernel's row arguments (fastdiff.runtime):
        # (eval_y, returns_y: step() returns the new y, the next call's sample; draws noise;
        # how the pass may read the sample: _sample_binding)
        self.args = [(r.eval_at == "y", (r.next_eval == "y") if i + 1 < len(rows) else False, bool(plan.draws[i]),
                      bindings[i]) for i, r in enumerate(rows)]
        if rows[-1].out_x is None:
            raise ValueError("the last row of a plan must write x")


def _fused_step(executor: RowExecutor, table: torch.Tensor, row: int, x: torch.Tensor, y: Optional[torch.Tensor],
                cond, uncond, hist: Optional[torch.Tensor], hist_writes: int, flags: int, noise,
                model_in: Optional[torch.Tensor]) -> None:
    """One pass of the executor's bound kernel on buffers of the caller's choosing (the sample
    itself as x or y, a fresh output as y): RowExecutor.run's call with x / y / hist replaced.
    ``flags``: the row flags bitmask (fastdiff.program.layout.FLAG_*), ``hist_writes`` the written slots'. The kernel's argument
    order (layout.STEP_ARGS) is written out here only, in this module. Every draw is explicit
    (the drop-ins draw diffusers' noise), so no Philox seed or noise id."""
    executor._step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, 0, -1, model_in,
                   executor.bad_row, executor.guidance)


# Compiled plans shared by runs (FastdiffScheduler._program): at most 64, least recently used dropped.
_PROGRAMS: "OrderedDict[tuple, _Program]" = OrderedDict()


class _Run:
    """Device state of one sampling run: buffers, device tables, the chosen kernel."""

    def __init__(self, program: _Program, start: int, key, sample: torch.Tensor, model_output: torch.Tensor,
                 timesteps: List[float], backend: str, previous: Optional["_Run"] = None):
        self.program, self.start, self.key = program, start, key
        self.n = len(program.args)
        self.shape, self.device = sample.shape, sample.device
        self.on_cpu = self.device.type == "cpu"
        self.timesteps = timesteps
        K = program.plan.num_slots
        self.table = torch.tensor(program.table, device=self.device)      # (a copy: programs are cached, set_g writes)
        self._x0_table = None
        self.x0_folds = None                   # per call, _x0_fold (FastdiffScheduler._x0_folds)
        self.x0_pass = None                    # the table of the pass that writes x0 (FastdiffScheduler._x0_pass)
        self.x0_slot = None                    # (table, per call: usable) of the pass that also writes x0 (_x0_slot)
        self.native = None                     # the C++ step of its plain calls (_native_step; None: not built, False: none)
        self.g = 1.0                           # the CFG scale currently in the table's g column
        self.dtypes = {}                       # (sample dtype, model dtype) -> (prev_sample, x0 dtypes, bindable)
        self.signature = (tuple(self.shape), self.device, model_output.dtype, K, program.uses_y, backend)
        if previous is not None and previous.signature == self.signature:
            # The previous run's buffers and bound kernel (a new set_timesteps() of the same shape:
            # no allocation, no backend choice); its history is cleared.
            self.x, self.y, self.hist, self.executor = previous.x, previous.y, previous.hist, previous.executor
            if self.hist is not None:
                self.hist.zero_()
        else:
            self.x = torch.empty(self.shape, dtype=torch.float32, device=self.device)
            self.y = torch.empty_like(self.x) if program.uses_y else None
            self.hist = torch.zeros((K,) + tuple(self.shape), dtype=torch.float32, device=self.device) if K else None
            probe = torch.empty(self.shape, dtype=model_output.dtype, device=self.device)
            self.executor = RowExecutor(self.x, y=self.y, hist=self.hist, model_in=probe, table=self.table,
                                        backend=backend)
        self.bind()

    def bind(self):
        """The executor runs this program's rows (every draw comes from diffusers' generator)."""
        program = self.program
        self.executor.bind(program.plan.rows, self.table, program.plan.num_slots, explicit_noise=True,
                           args=program.row_args)

    @property
    def x0_table(self) -> torch.Tensor:
        if self._x0_table is None:
            self._x0_table = torch.tensor(self.program.x0_table, device=self.device)
        return self._x0_table

    def call_args(self, k: int, returns_y: bool) -> Tuple[int, int]:
        """(hist_writes, flags) of call ``k`` as the drop-in runs it: the row's own, with the model
        input (the returned tensor) taken from y where the call returns the new y."""
        hw, flags, _ = self.executor.args[k]
        return hw, (flags & ~FLAG_MODEL_IN_FROM_Y) | (FLAG_MODEL_IN_FROM_Y if returns_y else 0)

    def __getstate__(self):
        # (deepcopy of a scheduler mid-run: the C++ step holds this run's tables; the copy builds its own)
        return dict(self.__dict__, native=None)

    def set_g(self, g: float):
        self.table[:, COL_G] = g
        if self.x0_pass is not None:
            self.x0_pass[:, COL_G] = g
        if self.x0_slot is not None:
            self.x0_slot[0][:, COL_G] = g
        self.g = g


class StepOutput:
    """Kept for code that imports it; ``step`` no longer returns it (it returns diffusers' own
    output class, or a plain tuple). ``prev_sample`` and, where given, ``pred_original_sample``
    (computed on first access), indexable like diffusers' outputs."""

    __slots__ = ("prev_sample", "_x0", "_x0_args", "_has_x0")

    def __init__(self, prev_sample: torch.Tensor, has_x0: bool, x0=None, x0_args=None):
        self.prev_sample = prev_sample
        self._has_x0 = has_x0
        self._x0 = x0
        self._x0_args = x0_args

    @property
    def pred_original_sample(self) -> torch.Tensor:
        if not self._has_x0:
            raise AttributeError("this scheduler's step output has no pred_original_sample (diffusers' has none)")
        if self._x0 is None:
            self._x0 = _lazy_x0(*self._x0_args)
            self._x0_args = None
        return self._x0

    def keys(self):
        return ("prev_sample", "pred_original_sample") if self._has_x0 else ("prev_sample",)

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        if key == 0:
            return self.prev_sample
        return self.to_tuple()[key]

    def __len__(self):
        return len(self.keys())

    def __iter__(self):
        return iter(self.to_tuple())

    def __repr__(self):
        return f"StepOutput(prev_sample={tuple(self.prev_sample.shape)}, keys={self.keys()})"


def _lazy_x0(a_x: float, a_d: float, sample, cond, uncond, g, versions) -> torch.Tensor:
    for t, v in versions:
        if t._version != v:
            raise RuntimeError("pred_original_sample is computed on first access from the step's inputs, but the "
                               "sample or the model output was modified in place since; read it before modifying them")
    return a_x * sample.float() + a_d * _guided(cond, uncond, g)


def _guided(cond, uncond, g, dtype=torch.float32) -> torch.Tensor:
    """D = u + g (c - u) in float32 (or ``dtype``), the pipelines' CFG formula."""
    if uncond is None:
        return cond.to(dtype)
    u = uncond.to(dtype)
    return u + g * (cond.to(dtype) - u)


def _x0_now(a_x: float, a_d: float, E: torch.Tensor, sample: torch.Tensor, cond, uncond, g, dtype) -> torch.Tensor:
    """pred_original_sample = a_x * sample + a_d * D in ``dtype``, computed in float32 from the
    float32 copy ``E`` of the sample (in float64 from ``sample`` itself when ``dtype`` is float64)."""
    if dtype == torch.float64:
        return a_x * sample.double() + a_d * _guided(cond, uncond, g, torch.float64)
    d = cond if uncond is None else _guided(cond, uncond, g)
    if a_x == 1.0:                  # (the common folds: one pass)
        x0 = torch.add(E, d, alpha=a_d)
    elif a_x == 0.0:
        x0 = torch.mul(d, a_d) if d.dtype == torch.float32 else d.float().mul_(a_d)
    else:
        x0 = torch.mul(E, a_x)
        x0.add_(d, alpha=a_d)
    return x0 if dtype == torch.float32 else x0.to(dtype)


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple:
    import dataclasses
    return tuple(f.name for f in dataclasses.fields(cls))


def _make_output(cls: type, **values):
    """``cls(**values)`` for a diffusers BaseOutput dataclass, built directly (its generic
    __init__/__post_init__ cost several microseconds a step): the same mapping and attributes."""
    if tuple(values) != _field_names(cls) or any(v is None for v in values.values()):
        return cls(**values)
    out = cls.__new__(cls)
    for k, v in values.items():
        OrderedDict.__setitem__(out, k, v)
        object.__setattr__(out, k, v)
    return out


def _native_output(cls: type, x0_field: Optional[str], prev_sample: torch.Tensor, x0: Optional[torch.Tensor] = None):
    """The return_dict=True output of a DropinStep call (no reference to the scheduler: no cycle)."""
    if x0_field is None:
        return _make_output(cls, prev_sample=prev_sample)
    return _make_output(cls, prev_sample=prev_sample, **{x0_field: x0})


def _listing(values, head: int = 4, tail: int = 2) -> str:
    """A short rendering of a long list of numbers: the first and last few, and the count."""
    v = [float(x) for x in values]
    fmt = lambda xs: ", ".join(f"{x:.6g}" for x in xs)  # noqa: E731
    if len(v) <= head + tail + 1:
        return f"[{fmt(v)}]"
    return f"[{fmt(v[:head])}, ..., {fmt(v[-tail:])}] ({len(v)} values)"


@functools.lru_cache(maxsize=None)
def diffusers_output_class(cls: type) -> type:
    """diffusers' own step output class for a drop-in class: ``<Name>Output`` of the module of the
    diffusers scheduler it subclasses (e.g. DDIMSchedulerOutput), else ``SchedulerOutput``."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    if getattr(cls, "_diffusers_output", None) is not None:     # (a module whose class names it otherwise)
        return cls._diffusers_output
    for base in cls.__mro__:
        module = getattr(base, "__module__", "") or ""
        if module.startswith("diffusers.") and base.__name__.endswith("Scheduler"):
            out = getattr(sys.modules.get(module), base.__name__ + "Output", None)
            return out if isinstance(out, type) else SchedulerOutput
    return SchedulerOutput


def drop_in(base: type):
    """Class decorator: ``cls`` (a FastdiffScheduler subclassing ``base``) keeps the signatures of
    ``base.__init__`` and ``base.set_timesteps`` (from_config and pipelines inspect them), rejects
    the options it cannot run at construction time, and starts a new run at set_timesteps."""
    init, set_timesteps = base.__init__, base.set_timesteps

    def deco(cls):
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            self._fd_reset()
            # diffusers' save_pretrained records an object's library from its __module__: record
            # diffusers' (the class stays fastdiff's), so a saved pipeline is a stock folder.
            self.__module__ = base.__module__
            init(self, *args, **kwargs)
            self._check_config()

        @functools.wraps(set_timesteps)
        def _set_timesteps(self, *args, **kwargs):
            set_timesteps(self, *args, **kwargs)
            self._fd_reset()

        cls.__init__ = __init__
        cls.set_timesteps = _set_timesteps
        return cls
    return deco


class FastdiffScheduler:
    """Mixin placed before the diffusers scheduler class in a drop-in's bases.

    Subclasses implement ``_plan(start, **step_options) -> Plan`` (the rows of the calls from
    ``start``, the step index of the run's first call) and may override ``_check_config``;
    their ``step`` has diffusers' signature and calls ``_fd_step``."""

    #: which backend runs the fused step ("auto", "cpu", "reference", ...)
    fastdiff_backend = "auto"
    #: diffusers' step returns pred_original_sample too
    _returns_x0 = False
    #: diffusers' step rejects integer timesteps (the Euler family: they are indices, not times)
    _float_timesteps = False
    #: prev_sample dtype, as diffusers' arithmetic gives it: the model output's ("model"), the
    #: promotion of sample and model output ("promote"), or the sample's ("sample")
    _out_dtype = "model"
    #: pred_original_sample dtype: "promote" (of sample and model output), or "promote_f32" (of
    #: float32 and the model output: the Euler family, which upcasts the sample first)
    _x0_dtype = "promote"
    #: the name of that second value in diffusers' output class (LCM: 'denoised', TCD: 'pred_noised_sample')
    _x0_field = "pred_original_sample"
    #: diffusers' step refuses to run before set_timesteps() (the schedulers whose constructor
    #: leaves no usable schedule: num_inference_steps is None there)
    _needs_set_timesteps = True
    _fd_cacheable = False          # the plan depends only on config, timesteps, sigmas, alphas (see _program)
    #: the two-stage schedulers keep diffusers' stage flag (state_in_first_order), which their
    #: inherited scale_model_input reads: "sample" (KDPM2, DPMSolverSDE) or "dt" (Heun)
    _stage_flag = None

    # ------------------------------------------------------------------------------------------
    # Hooks

    def _plan(self, start: int, **options) -> Plan:
        raise NotImplementedError

    def _check_config(self):
        """Raise NotImplementedError naming any option the drop-in cannot reproduce."""

    def _x0_fold(self, run: _Run, k: int) -> Tuple[float, float]:
        """(A_x, A_d) of the second value call ``k`` returns (``_x0_field``): x0 by default."""
        return run.program.fold[k]

    def _draw_noise(self, k: int, shape, dtype, device, generator, variance_noise):
        """The noise of call ``k`` of the run, drawn as diffusers draws it."""
        if variance_noise is not None:
            return variance_noise
        from diffusers.utils.torch_utils import randn_tensor
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _set_stage(self, k: int, second_next: bool, sample: torch.Tensor):
        """Keep diffusers' stage flag: set while the next call is a step's second stage."""
        setattr(self, self._stage_flag, (sample if self._stage_flag == "sample" else 1.0) if second_next else None)

    def _result_dtypes(self, sample_dtype: torch.dtype, model_dtype: torch.dtype):
        """(prev_sample dtype, pred_original_sample dtype) of diffusers' step for these inputs."""
        promoted = torch.promote_types(sample_dtype, model_dtype)
        out = {"model": model_dtype, "promote": promoted, "sample": sample_dtype}[self._out_dtype]
        x0 = torch.promote_types(torch.float32, model_dtype) if self._x0_dtype == "promote_f32" else promoted
        return out, x0

    def _checked_dtypes(self, sample_dtype: torch.dtype, model_dtype: torch.dtype):
        for what, dtype in (("sample", sample_dtype), ("model_output", model_dtype)):
            if dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{what} must be a float16, bfloat16, float32 or float64 tensor, got {dtype}")
        return self._result_dtypes(sample_dtype, model_dtype)

    def _x0_folds(self, run: _Run) -> List[Tuple[float, float]]:
        """Per call of the run, ``_x0_fold`` (built once per run)."""
        if run.x0_folds is None:
            run.x0_folds = [self._x0_fold(run, j) for j in range(run.n)]
        return run.x0_folds

    def _x0_in_place(self, run: _Run, k: int, sample: torch.Tensor, cond, uncond, g, dtype) -> torch.Tensor:
        """pred_original_sample of call ``k`` from a float32 contiguous sample on the run's device.
        A single torch op where one does it (x + a*D, a*D); otherwise (a CFG combination, a
        coefficient on the sample) one pass of the kernel, which forms D and A_x E + A_d D in
        one loop where torch takes two to four."""
        a_x, a_d = self._x0_folds(run)[k]
        if uncond is None and dtype == torch.float32:
            if a_x == 1.0:                # (the Euler family, EDM: one op)
                return torch.add(sample, cond, alpha=a_d)
            if a_x == 0.0:
                return torch.mul(cond, a_d) if cond.dtype == torch.float32 else cond.float().mul_(a_d)
        elif dtype != torch.float32:
            return _x0_now(a_x, a_d, sample, sample, cond, uncond, g, dtype)
        if run.x0_pass is None:
            run.x0_pass = self._x0_pass(run)
        x0 = torch.empty_like(sample)
        _fused_step(run.executor, run.x0_pass, k, sample, x0, cond, uncond, None, 0, FLAG_WRITE_Y, None, None)
        return x0

    def _x0_pass(self, run: _Run) -> torch.Tensor:
        """The device table of the x0 pass: row k writes h = A_x E + A_d D (``_x0_fold(run, k)``,
        D the guided model output at the run's g) as y; no history slots."""
        T = np.zeros((run.n, table_width(0)), dtype=np.float64)
        T[:, COL_G], T[:, COL_G1] = run.g, 1.0
        T[:, [COL_QY, COL_QD]] = np.array(self._x0_folds(run), dtype=np.float64).reshape(run.n, 2)
        T[:, col_out_y(0) + OUT_H] = 1.0
        T[:, col_s_in(0)] = 1.0
        return torch.tensor(T, device=run.device)

    def _x0_slot_table(self, run: _Run, k: int, x0_dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The table of call ``k``'s pass that also writes pred_original_sample, as a write-only
        history slot (the caller's fresh tensor: no copy, no second pass), or None where that pass
        does not apply: a program with history (its slots are the run's state, one tensor), x0 not
        float32, or a row whose model term h is neither the guided output D (q_y = 0, q_d = 1: then
        x0 = A_x E + A_d h, diffusers' own arithmetic) nor x0 itself (x0 = h)."""
        slot = self._x0_slot_of(run) if x0_dtype == torch.float32 else None
        return slot[0] if slot is not None and slot[1][k] else None

    def _x0_slot_of(self, run: _Run):
        """The run's (table, per call: usable) of _x0_slot, built once; None for a program with history."""
        if run.program.plan.num_slots:
            return None
        if run.x0_slot is None:
            run.x0_slot = self._x0_slot(run)
        return run.x0_slot

    def _x0_slot(self, run: _Run):
        """(device table, per call: usable) for _x0_slot_table: the run's table (no history slots)
        widened to one slot, whose out block is x0 from the call's fold (A_x, A_d). Kept with the
        (shared) program where the folds are the plan's own and the run's g is 1."""
        shared = run.g == 1.0 and type(self)._x0_fold is FastdiffScheduler._x0_fold
        if shared and run.program.x0_slot is not None:
            T, usable = run.program.x0_slot
            return torch.tensor(T, device=run.device), usable
        T, usable = self._x0_slot_np(run)
        if shared:
            run.program.x0_slot = (T, usable)
        return torch.tensor(T, device=run.device), usable

    def _x0_slot_np(self, run: _Run):
        T0 = run.table.cpu().numpy()                 # (its g column as set now; set_g keeps both)
        T = np.zeros((T0.shape[0], table_width(1)), dtype=np.float64)
        T[:, :OUT_BASE] = T0[:, :OUT_BASE]
        w = out_width(0)                             # (the history column the blocks gain stays 0)
        for c0, c1 in ((col_out_x(0), col_out_x(1)), (col_out_y(0), col_out_y(1))):
            T[:, c1:c1 + w] = T0[:, c0:c0 + w]
        T[:, col_s_in(1)] = T0[:, col_s_in(0)]
        c = col_out_slot(1, 0)
        f32 = np.float32                             # (the kernels' coefficients: float64 rounded to float32)
        a = np.asarray(self._x0_folds(run), dtype=np.float64).reshape(-1, 2)
        qy, qd = T0[:, COL_QY].astype(f32), T0[:, COL_QD].astype(f32)
        is_d = (qy == 0) & (qd == 1)
        is_x0 = ~is_d & (qy == a[:, 0].astype(f32)) & (qd == a[:, 1].astype(f32))
        T[is_d, c + OUT_Y], T[is_d, c + OUT_H] = a[is_d, 0], a[is_d, 1]
        T[is_x0, c + OUT_H] = 1.0
        return T, (is_d | is_x0).tolist()

    def _native_step(self, run: _Run):
        """A ``fastdiff._C.DropinStep`` for the run's plain calls, or None where the run's kernel is
        not the C++ one or its x0 is transformed (clip / thresholding). It runs a call as the Python
        path below runs it for plain float32 CPU tensors (the same passes and torch ops, the same
        noise draw and stage flag), and declines any other call (csrc/cpu/dropin_step.cpp)."""
        ext = load_extension()
        if isinstance(ext, str) or not hasattr(ext, "DropinStep") or run.executor._step is not ext.fused_step \
                or run.program.plan.x0_transform is not None:
            return None
        noise_dtype = run.program.plan.noise_dtype or torch.float32      # (the model output's: float32)
        returns_x0 = self._returns_x0
        folds = self._x0_folds(run) if returns_x0 else None
        slot_table, usable = (self._x0_slot_of(run) if returns_x0 else None) or (None, None)
        calls = []
        for k, (_, returns_y, draws, binding) in enumerate(run.program.args):
            hw, flags = run.call_args(k, returns_y)
            table, mode, (a_x, a_d) = run.table, _X0_NONE, (0.0, 0.0)
            if returns_x0:
                a_x, a_d = folds[k]
                if usable is not None and usable[k] and binding != _SAMPLE_AS_Y:
                    table, mode = slot_table, _X0_SLOT
                elif binding == _VIA_STATE or a_x in (0.0, 1.0):
                    mode = _X0_TORCH                    # (_x0_now; _x0_in_place's one-op cases)
                else:
                    mode = _X0_PASS                     # (_x0_in_place's kernel pass)
                    if run.x0_pass is None:
                        run.x0_pass = self._x0_pass(run)
            calls.append((binding, table, hw, flags, mode, float(a_x), float(a_d), noise_dtype if draws else None,
                          bool(returns_y)))
        make = functools.partial(_native_output, diffusers_output_class(type(self)),
                                 self._x0_field if self._returns_x0 else None)
        return ext.DropinStep(list(run.shape), run.timesteps, run.start, run.x, run.y, run.hist, run.x0_pass, calls,
                              self._float_timesteps, self._stage_flag is not None, make)

    def _transform_step(self, run: _Run, k: int, E: torch.Tensor, cond, uncond, g):
        """The table and model output of a step whose x0 is clipped/thresholded: x0 computed
        here, transformed, and given to the rows compiled for D = x0."""
        a_x, a_d = run.program.fold[k]
        x0 = run.program.plan.x0_transform(a_x * E + a_d * _guided(cond, uncond, g))
        return run.x0_table, x0, x0

    # ------------------------------------------------------------------------------------------
    # Run bookkeeping

    def _fd_reset(self):
        self._fd_run = None

    def set_begin_index(self, begin_index: int = 0):
        super().set_begin_index(begin_index)
        self._fd_reset()

    def _init_index(self, timestep) -> int:
        """The step index of the run's first call: diffusers' rule (set_begin_index, else the
        position of ``timestep`` in ``timesteps``)."""
        if getattr(self, "_step_index", None) is None:
            if getattr(self, "begin_index", None) is None:
                t = timestep.to(self.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
                found = isinstance(t, (int, float, np.integer, np.floating, torch.Tensor)) and not isinstance(t, bool) \
                    and bool((self.timesteps == t).any())
                if not found:      # (diffusers' multistep schedulers would silently take the last step)
                    self._not_a_timestep(timestep)
            try:
                self._init_step_index(timestep)
            except (IndexError, ValueError):            # diffusers' lookup found no such timestep
                self._not_a_timestep(timestep)
        return self._step_index

    def _not_a_timestep(self, timestep):
        try:
            value = f"{float(timestep):g}"
        except (TypeError, ValueError, RuntimeError):
            value = repr(timestep)[:40]
        raise ValueError(f"step() got timestep {value}, which is not one of this run's timesteps "
                         f"{_listing(self.timesteps.tolist())}") from None

    def _program(self, start: int, key) -> "_Program":
        """The compiled plan of a run from call ``start`` with step options ``key``. Classes whose
        plan is a function of their config, timesteps, sigmas and alphas only (``_fd_cacheable``)
        share compiled plans across set_timesteps() calls and instances (a plan costs ~1 ms of
        Python: most of a 50-step loop at SD-1.5 if it were rebuilt every run)."""
        ck = self._program_key(start, key) if self._fd_cacheable else None
        program = _PROGRAMS.get(ck) if ck is not None else None
        if program is None:
            program = _Program(self._plan(start, **dict(key)))
            if ck is not None:
                _PROGRAMS[ck] = program
                while len(_PROGRAMS) > 64:
                    _PROGRAMS.popitem(last=False)
        else:
            _PROGRAMS.move_to_end(ck)
        return program

    def _program_key(self, start: int, key):
        state = []
        for name in ("timesteps", "sigmas", "alphas_cumprod", "final_alpha_cumprod"):
            v = getattr(self, name, None)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                v = (str(v.dtype), tuple(v.shape), v.numpy().tobytes())
            elif v is not None and not isinstance(v, (int, float)):
                return None
            state.append(v)
        if getattr(self, "solver_p", None) is not None:       # (UniPC's predictor: another scheduler's state)
            return None
        config = []
        for k, v in sorted(dict(self.config).items()):
            if isinstance(v, (np.ndarray, torch.Tensor)):
                v = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                v = (v.dtype.str, v.shape, v.tobytes())
            elif not isinstance(v, (type(None), bool, int, float, str, list, tuple)):
                return None
            config.append((k, repr(v) if isinstance(v, (list, tuple)) else v))
        return (type(self), tuple(config), tuple(state), getattr(self, "num_inference_steps", None), start, key)

    def _fd_begin(self, model_output, timestep, sample, key) -> _Run:
        if self._needs_set_timesteps and getattr(self, "num_inference_steps", None) is None \
                and not getattr(self, "custom_timesteps", False):
            raise ValueError(f"{type(self).__name__}.step() called before set_timesteps(); call "
                             "set_timesteps(num_inference_steps) first")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point torch.Tensor, got "
                            f"{sample.dtype if isinstance(sample, torch.Tensor) else type(sample).__name__}")
        if sample.dim() < 1 or sample.shape[0] < 1:
            raise ValueError(f"sample must have a non-empty batch dimension, got shape {tuple(sample.shape)}")
        run = self._fd_run
        if run is not None:          # a step option (eta, order, ...) changed mid-run: same state, new table
            program = self._program(run.start, key)
            if len(program.args) != run.n or program.plan.num_slots != run.program.plan.num_slots:
                raise ValueError("changing this step option mid-run changes the program's structure; "
                                 "call set_timesteps() and start a new run")
            run.program, run.key = program, key
            run.table = torch.tensor(program.table, device=run.device)
            run._x0_table, run.x0_folds, run.x0_pass, run.x0_slot, run.g = None, None, None, None, 1.0
            run.bind()
            run.native = None
            return run
        start = self._init_index(timestep)
        timesteps = [float(t) for t in self.timesteps.detach().cpu().tolist()]
        if not 0 <= start < len(timesteps):
            raise ValueError(f"step index {start} is outside the {len(timesteps)} timesteps of this run")
        program = self._program(start, key)
        # (a plan may end before the timesteps do where diffusers has no noise level after the last
        # one, e.g. FlowMatchEuler's schedule before set_timesteps(): its last step fails there too)
        if len(program.args) > len(timesteps) - start or len(program.args) < len(timesteps) - start - 1:
            raise AssertionError(f"{type(self).__name__}: plan has {len(program.args)} calls for "
                                 f"{len(timesteps) - start} timesteps")
        self._fd_run = _Run(program, start, key, sample, _model_tensor(model_output), timesteps, self.fastdiff_backend,
                            getattr(self, "_fd_last_run", None))
        self._fd_last_run = self._fd_run
        return self._fd_run

    # ------------------------------------------------------------------------------------------
    # The step

    def _fd_step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True,
                 key=(), x0=None):
        """One diffusers step() call: the next row of the run's program, one fused pass.

        ``key``: step options that change the coefficients (as a tuple of (name, value) pairs).
        ``x0``: a given prediction of x0 that replaces the model's (EDM Euler's pred_original_sample).
        A call that raises leaves the scheduler as it was (run, step index, tables)."""
        run = self._fd_run
        same_run = run is not None and key == run.key
        if same_run and x0 is None:
            native = run.native
            if native is None:
                native = run.native = self._native_step(run) or False
            if native is not False:
                out = native.step(self, model_output, timestep, sample, return_dict, generator, variance_noise)
                if out is not None:              # (None: not a call it serves; nothing was touched)
                    return out
        if same_run and self._step_index is not None:
            # Inside a run the only scheduler state a call changes before its pass is the table's
            # g column (set_g); the pass itself checks everything before it writes.
            g = run.g
            try:
                return self._fd_step_unsafe(run, model_output, timestep, sample, generator, variance_noise,
                                            return_dict, x0)
            except BaseException:
                if run.g != g:
                    run.set_g(g)
                raise
        saved = (run, getattr(self, "_step_index", None),
                 None if run is None else (run.program, run.key, run.table, run._x0_table, run.x0_folds, run.x0_pass,
                                           run.x0_slot, run.native, run.g))
        try:
            run = self._fd_begin(model_output, timestep, sample, key)
            return self._fd_step_unsafe(run, model_output, timestep, sample, generator, variance_noise, return_dict,
                                        x0)
        except BaseException:
            run, self._step_index, fields = saved
            self._fd_run = run
            if run is not None:
                (run.program, run.key, run.table, run._x0_table, run.x0_folds, run.x0_pass, run.x0_slot, run.native,
                 run.g) = fields
                run.set_g(run.g)                     # (set_g writes the tables in place)
                run.bind()
            raise

    def _fd_step_unsafe(self, run: _Run, model_output, timestep, sample, generator, variance_noise, return_dict, x0):
        i = self._step_index
        k = i - run.start
        if k >= run.n:
            if i < len(run.timesteps):
                raise IndexError(f"{type(self).__name__}.step(): this schedule has no noise level after timestep "
                                 f"{run.timesteps[i]:g} (diffusers' step fails here too); call set_timesteps() first")
            raise IndexError(f"{type(self).__name__}.step() called after the last of the run's {len(run.timesteps)} "
                             "timesteps; call set_timesteps() to start a new run")

        if type(model_output) is torch.Tensor:
            cond, uncond, g = model_output, None, 1.0
        else:
            cond, uncond, g = _unpack(model_output)
        shape = run.shape
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a floating-point torch.Tensor, got {type(sample).__name__}")
        dtypes = run.dtypes.get((sample.dtype, cond.dtype))      # (validates both dtypes too)
        if dtypes is None:
            out_dtype, x0_dtype = self._checked_dtypes(sample.dtype, cond.dtype)
            # (per sample binding, whether these dtypes allow it: a float32 sample, as the state; read
            # as x, also a float32 result, which the pass writes as y)
            f32 = sample.dtype == torch.float32
            dtypes = run.dtypes[(sample.dtype, cond.dtype)] = (out_dtype, x0_dtype,
                                                               (False, f32 and out_dtype == torch.float32, f32))
        out_dtype, x0_dtype, bindable = dtypes
        if sample.shape != shape or cond.shape != shape:
            what, got = ("sample", sample.shape) if sample.shape != shape else ("model_output", cond.shape)
            raise ValueError(f"{what} has shape {tuple(got)}, but this run's samples have shape {tuple(shape)} "
                             f"(model_output must have the shape of sample; call set_timesteps() for a new run)")
        if (not cond.is_cpu) if run.on_cpu else cond.device != run.device:     # (sample is copied in from any device)
            raise ValueError(f"model_output must be on {run.device}, this run's device; got {cond.device}")
        if type(timestep) is torch.Tensor and timestep.is_cpu:
            try:
                value = timestep.item()      # (a Python int for an integer tensor, bool for bool)
            except RuntimeError:             # (not one element: not checked, as a tensor on a device)
                value = None
            if value is not None:
                if self._float_timesteps and type(value) is not float:
                    self._reject_integer_timestep()
                if value != run.timesteps[i]:
                    self._wrong_timestep(value, run, i)
        elif type(timestep) is not torch.Tensor:
            self._check_number_timestep(timestep, run, i)

        eval_y, returns_y, draws, binding = run.program.args[k]
        noise = None
        if draws:
            dtype = run.program.plan.noise_dtype or cond.dtype
            noise = self._draw_noise(k, shape, dtype, run.device, generator, variance_noise)
            if not isinstance(noise, torch.Tensor) or noise.shape != shape or not noise.is_floating_point():
                raise ValueError(f"variance_noise must be a floating-point tensor of shape {tuple(shape)}, got "
                                 f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            noise = noise.to(run.device)
        if bindable[binding] and x0 is None and sample.is_contiguous() and \
                (sample.is_cpu if run.on_cpu else sample.device == run.device):
            # The sample read in place (no copy into the state): see _sample_binding
            if uncond is not None and g != run.g:
                run.set_g(g)
            pred_x0 = None
            if binding == _SAMPLE_AS_X:
                out = torch.empty_like(sample)
                slot = self._x0_slot_table(run, k, x0_dtype) if self._returns_x0 else None
                if slot is not None:             # (x0 written by the same pass, into the returned tensor)
                    pred_x0 = torch.empty_like(sample)
                    _fused_step(run.executor, slot, k, sample, out, cond, uncond, pred_x0[None], 1, FLAG_WRITE_Y,
                                noise, None)
                else:
                    _fused_step(run.executor, run.table, k, sample, out, cond, uncond, None, 0, FLAG_WRITE_Y, noise,
                                None)
            else:
                out = torch.empty_like(sample, dtype=out_dtype)
                hw, flags = run.call_args(k, returns_y)  # (the row's own: evaluated at y, writes x, ...)
                _fused_step(run.executor, run.table, k, run.x, sample, cond, uncond, run.hist, hw, flags, noise, out)
            if self._returns_x0 and pred_x0 is None:
                pred_x0 = self._x0_in_place(run, k, sample, cond, uncond, g, x0_dtype)
            self._step_index = i + 1
            if self._stage_flag is not None:
                self._set_stage(k, returns_y, sample)
            if pred_x0 is None:
                return (out,) if not return_dict else _make_output(diffusers_output_class(type(self)), prev_sample=out)
            if not return_dict:
                return (out, pred_x0)
            return _make_output(diffusers_output_class(type(self)), prev_sample=out, **{self._x0_field: pred_x0})

        E = run.y if eval_y else run.x
        E.copy_(sample)                  # read every call: no cached copy of the caller's tensor is trusted
        table, pred_x0 = run.table, None
        if x0 is not None:
            table, cond, uncond, pred_x0 = run.x0_table, x0, None, x0
        elif run.program.plan.x0_transform is not None:
            table, cond, pred_x0 = self._transform_step(run, k, E, cond, uncond, g)
            uncond = None
        elif uncond is not None and g != run.g:
            run.set_g(g)

        out = torch.empty_like(run.x, dtype=out_dtype)
        slot = None
        if self._returns_x0 and pred_x0 is None:
            slot = self._x0_slot_table(run, k, x0_dtype)
            if slot is None:                            # (before the pass: the pass overwrites x / y)
                a_x, a_d = self._x0_fold(run, k)
                pred_x0 = _x0_now(a_x, a_d, E, sample, cond, uncond, g, x0_dtype)
        if slot is not None:                            # (x0 from the same pass: a write-only slot)
            pred_x0 = torch.empty_like(run.x)
            _, flags = run.call_args(k, returns_y)
            _fused_step(run.executor, slot, k, run.x, run.y, cond, uncond, pred_x0[None], 1, flags, noise, out)
        else:
            run.executor.run(k, cond, uncond, noise, 0, out, table, returns_y)
        self._step_index = i + 1
        if self._stage_flag is not None:
            self._set_stage(k, returns_y, sample)

        if not self._returns_x0:
            return (out,) if not return_dict else _make_output(diffusers_output_class(type(self)), prev_sample=out)
        if x0 is None and pred_x0.dtype != x0_dtype:
            pred_x0 = pred_x0.to(x0_dtype)
        if not return_dict:
            return (out, pred_x0)
        return _make_output(diffusers_output_class(type(self)), prev_sample=out, **{self._x0_field: pred_x0})

    # Timestep checks (a tensor timestep is read only on the CPU, where that costs no device sync)

    def _reject_integer_timestep(self):
        raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                         "`scheduler.timesteps` as a timestep.")

    def _check_number_timestep(self, timestep, run: _Run, i: int):
        if isinstance(timestep, torch.Tensor):       # a tensor subclass, or on a device
            if not timestep.is_cpu or timestep.numel() != 1:
                return
            if self._float_timesteps and not timestep.is_floating_point():
                self._reject_integer_timestep()
            value = timestep.item()
        elif isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            if self._float_timesteps and isinstance(timestep, (int, np.integer)):
                self._reject_integer_timestep()
            value = float(timestep)
        else:
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if value != run.timesteps[i]:
            self._wrong_timestep(value, run, i)

    @staticmethod
    def _wrong_timestep(value: float, run: _Run, i: int):
        raise ValueError(f"step() got timestep {value:g}, but call {i - run.start + 1} of this run is at timestep "
                         f"{run.timesteps[i]:g} (scheduler.timesteps[{i}]); pass the scheduler's timesteps in order, "
                         "or call set_timesteps() to start over")


def _unpack(model_output):
    """(cond, uncond, g) of a model output: a lazy CFG combination (fastdiff.integrations.diffusers.cfg)
    or a tensor (tagged or plain)."""
    if isinstance(model_output, GuidedOutput):
        return model_output.parts()
    if isinstance(model_output, torch.Tensor):
        return model_output.as_subclass(torch.Tensor), None, 1.0
    raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")


def _model_tensor(model_output) -> torch.Tensor:
    if isinstance(model_output, GuidedOutput):
        return model_output.parts()[0]
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    if not model_output.is_floating_point():
        raise TypeError(f"model_output must be floating point, got {model_output.dtype}")
    return model_output
