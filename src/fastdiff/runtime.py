"""The row executor: one place where coefficient programs meet a backend's fused step.

Every driver runs its rows here: ``fastdiff.Sampler`` (and through it ``fastdiff.sample``, the
k-diffusion functions and the CLI), the diffusers drop-ins' ``step``, the adaptive and
predictor-corrector drivers, and the torch.compile loop (``run_program``). A ``RowExecutor``
holds a run's buffers (state x, evaluation buffer y, history slots, model input, the non-finite
flag, the per-sample guidance vector), chooses the backend and checks those buffers once
(``fastdiff.ops.prepare_fused_step``), and then executes a row with one call of the bound
kernel: no per-call validation, no dispatch, no host sync (~1.3 us at 1x4x8x8 on the CPU).

The static facts of each row (which buffers it reads and writes, its history slot and noise draw,
where the next model input comes from) are looked up once per program (``load`` / ``bind``), from the
``Row`` s, so drivers never re-derive them. What a driver still decides per call: the model
outputs (cond, uncond), explicit noise, and whether the row's epilogue writes the next model input.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from . import ops
from .program import FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y, Program, Row

__all__ = ["RowExecutor", "row_args", "device_table", "run_program"]

# Per row: (hist_writes, flags, noise_id), the written history slots and the row flags as the
# kernel's bitmasks (fastdiff.program.layout)
RowArgs = Tuple[int, int, int]


def row_args(rows: List[Row]) -> List[RowArgs]:
    """The kernel's per-row arguments, from the rows' static facts (``Row.flags``). The model-input
    flag says where the next model call reads: the next row's evaluation buffer (for the last row,
    its ``next_eval``)."""
    out = []
    for i, r in enumerate(rows):
        nxt = rows[i + 1].eval_at if i + 1 < len(rows) else r.next_eval
        flags = (r.flags & ~FLAG_MODEL_IN_FROM_Y) | (FLAG_MODEL_IN_FROM_Y if nxt == "y" else 0)
        out.append((r.hist_writes, flags, r.noise_id))
    return out


def device_table(program: Program, device) -> torch.Tensor:
    """The program's float64 table on ``device``, as a tensor the caller owns (a copy: programs
    are shared through the build cache, and drivers may rewrite their table's g column)."""
    return torch.tensor(program.table, dtype=torch.float64, device=device)


class RowExecutor:
    """Runs the rows of a program in place on one set of buffers, with the kernel bound once.

    ``x`` (state), ``y``, ``hist``, ``model_in`` and ``bad_row`` are the buffers the kernel writes;
    ``model_like`` a tensor of the model outputs' dtype and device (to choose the backend);
    ``guidance`` the optional per-sample scale vector [B]. ``load(program)`` binds the rows; a
    program with the same buffers can replace it at any time (adaptive drivers build one per step).
    """

    __slots__ = ("x", "y", "hist", "model_in", "bad_row", "guidance", "table", "rows", "args", "key", "memo", "_step")

    def __init__(self, x: torch.Tensor, *, y: Optional[torch.Tensor] = None, hist: Optional[torch.Tensor] = None,
                 model_in: Optional[torch.Tensor] = None, model_like: Optional[torch.Tensor] = None,
                 guidance: Optional[torch.Tensor] = None, bad_row: Optional[torch.Tensor] = None,
                 table: Optional[torch.Tensor] = None, backend: str = "auto"):
        self.x, self.y, self.hist, self.model_in, self.bad_row, self.guidance = x, y, hist, model_in, bad_row, guidance
        probe = table if table is not None else torch.zeros((1, 1), dtype=torch.float64, device=x.device)
        self._step = ops.prepare_fused_step(x, table=probe, y=y, cond_like=model_like if model_like is not None
                                            else model_in, hist=hist, model_in=model_in, guidance=guidance,
                                            backend=backend)
        self.table, self.rows, self.args, self.key = table, [], [], None
        self.memo = {}                     # a driver's per-buffer facts (the Sampler's loop plan)

    @classmethod
    def allocate(cls, program: Program, like: torch.Tensor, *, state_dtype: torch.dtype = torch.float32,
                 model_dtype: Optional[torch.dtype] = None, model_in_batch: Optional[int] = None,
                 check_finite: bool = True, guidance: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> "RowExecutor":
        """Buffers for ``program`` at the shape and device of ``like``: x (uninitialised: the
        caller writes the initial state), y if a row uses it, zeroed history slots, a model input
        of ``model_in_batch`` samples (None: no model input buffer) and the non-finite flag."""
        shape, dev = tuple(like.shape), like.device
        uses_y = any(r.eval_at == "y" or r.out_y is not None for r in program.rows)
        x = torch.empty(shape, dtype=state_dtype, device=dev)
        y = torch.empty_like(x) if uses_y else None
        K = program.num_slots
        hist = torch.zeros((K,) + shape, dtype=state_dtype, device=dev) if K else None
        model_dtype = model_dtype or state_dtype
        model_in = None
        if model_in_batch is not None:
            model_in = torch.empty((model_in_batch,) + shape[1:], dtype=model_dtype, device=dev)
        model_like = model_in if model_in is not None else torch.empty(0, dtype=model_dtype, device=dev)
        bad_row = torch.zeros(1, dtype=torch.int32, device=dev) if check_finite else None
        table = device_table(program, dev)
        ex = cls(x, y=y, hist=hist, model_in=model_in, model_like=model_like, guidance=guidance, bad_row=bad_row,
                 table=table, backend=backend)
        ex.bind(program.rows, table, program.num_slots)
        return ex

    def load(self, program: Program, table: Optional[torch.Tensor] = None, *, explicit_noise: bool = False) -> None:
        """Bind ``program`` 's rows and table (default: a device copy of its table, whose
        coefficients ``compile_program`` has checked to be finite). ``explicit_noise``: the driver
        passes every draw as a tensor (a drop-in with diffusers' generator), so no row draws Philox noise."""
        self.bind(program.rows, device_table(program, self.x.device) if table is None else table,
                  program.num_slots, explicit_noise=explicit_noise)

    def bind(self, rows: List[Row], table: torch.Tensor, num_slots: int, *, explicit_noise: bool = False,
             args: Optional[List[RowArgs]] = None) -> None:
        """Bind rows and their device table (already checked finite by whoever built it). ``args``:
        the rows' ``row_args`` where the caller keeps them (a drop-in's compiled plan), else computed."""
        if table.dtype != torch.float64 or table.dim() != 2 or table.shape[0] != len(rows):
            raise ValueError(f"table must be float64 [{len(rows)}, columns], got {table.dtype} {tuple(table.shape)}")
        if num_slots and (self.hist is None or self.hist.shape[0] < num_slots):
            raise ValueError(f"the program needs {num_slots} history slots, the executor has "
                             f"{0 if self.hist is None else self.hist.shape[0]}")
        if self.y is None and any(r.eval_at == "y" or r.out_y is not None for r in rows):
            raise ValueError("the program reads or writes y, but the executor has no y buffer")
        args = row_args(rows) if args is None else args
        if explicit_noise:
            args = [(hw, flags, -1) for hw, flags, _ in args]
        self.table, self.rows, self.args = table, rows, args

    def fresh_state(self) -> torch.Tensor:
        """A new x for the next run on these buffers (x is what a run returns, so it is never
        reused); same shape, dtype and device, so the bound kernel stays valid."""
        self.x = torch.empty_like(self.x, memory_format=torch.contiguous_format)
        return self.x

    def nbytes(self) -> int:
        """Bytes held by the buffers (x, y, history, model input); fixed for an executor."""
        n = self.memo.get("nbytes")
        if n is None:
            n = self.memo["nbytes"] = sum(t.numel() * t.element_size()
                                          for t in (self.x, self.y, self.hist, self.model_in) if t is not None)
        return n

    def evaluated(self, i: int) -> torch.Tensor:
        """The buffer row ``i`` 's model call reads (x or y)."""
        return self.y if self.args[i][1] & FLAG_EVAL_Y else self.x

    def run(self, i: int, cond: Optional[torch.Tensor] = None, uncond: Optional[torch.Tensor] = None,
            noise: Optional[torch.Tensor] = None, seed: int = 0, model_in: Optional[torch.Tensor] = None,
            table: Optional[torch.Tensor] = None, model_in_from_y: Optional[bool] = None) -> None:
        """Row ``i``, in place. ``model_in``: where the epilogue writes s_in * (new x or new y)
        (None: nowhere); ``table``: a replacement table for this call (non-linear guidance, a
        drop-in's x0 override); ``model_in_from_y`` overrides the row's default source (its flag)."""
        hw, flags, nid = self.args[i]
        if model_in_from_y is not None:
            flags = (flags | FLAG_MODEL_IN_FROM_Y) if model_in_from_y else (flags & ~FLAG_MODEL_IN_FROM_Y)
        self._step(self.table if table is None else table, i, self.x, self.y, cond, uncond, self.hist, hw, flags,
                   noise, seed, nid, model_in, self.bad_row, self.guidance)

    def native_loop(self, rows: List[tuple], t_full: List[torch.Tensor], t_half: List[torch.Tensor],
                    batch: int):
        """A ``fastdiff._C.RowLoop`` over this executor's buffers and table (the model call and the
        kernel of each row, run in C++), or None where the bound kernel is not the C++ CPU one.
        ``rows``: per row (needs_model, both CFG halves, hist_writes, flags, noise_id, writes the next
        model input, ends a step)."""
        ext = ops.backends.load_extension()
        if isinstance(ext, str) or self._step is not getattr(ext, "fused_step", None) or not hasattr(ext, "RowLoop"):
            return None
        return ext.RowLoop(self.table, self.y, self.hist, self.model_in, self.bad_row, self.guidance, batch, rows,
                           t_full, t_half)

    def first_bad_row(self) -> int:
        """0, or 1 + the first row that wrote a non-finite value (one host read)."""
        return 0 if self.bad_row is None else int(self.bad_row.item())


# ---------------------------------------------------------------------------------------------
# A sampling loop for torch.compile(fullgraph=True)

def run_program(program: Program, table: torch.Tensor, model: Callable, x: torch.Tensor, *, cfg: bool = False,
                model_kwargs: Optional[dict] = None, seed: int = 0, backend: str = "auto",
                guidance: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a coefficient program (e.g. ``Sampler.build(...).program``) from the state ``x``
    (noise times the schedule's initial scale), in place; returns ``(x, bad_row)``.

    Written to be traced by ``torch.compile(fullgraph=True)``: the rows are unrolled (their static
    facts are Python values), each row is at most one model call and one fused step through a
    ``RowExecutor`` (under tracing its bound step is the ``fastdiff::fused_step`` custom op), and
    nothing is read back to the host. ``table`` is the program's table as a tensor on x's device;
    as a graph input its values can change without a recompile. ``cfg=True`` calls
    ``model(cat([x, x]), cat([t, t]), **model_kwargs)`` once per evaluation with kwargs already
    batched as [uncond; cond] and takes the halves as (uncond, cond); the guidance scale is the
    table's (or, with ``guidance`` a per-sample scale vector [B], each sample's own). ``bad_row``
    (int32 [1]) is 0, or 1 + the first row that wrote a non-finite value: read it once, after the
    loop. Philox noise comes from ``seed``. For everything else (progress, callbacks, non-linear
    guidance, inpainting, input checks) use fastdiff.Sampler."""
    rows = program.rows
    kwargs = model_kwargs or {}
    B = x.shape[0]
    y = torch.empty_like(x) if any(r.eval_at == "y" or r.out_y is not None for r in rows) else None
    hist = x.new_zeros((program.num_slots,) + tuple(x.shape)) if program.num_slots else None
    bad_row = torch.zeros(1, dtype=torch.int32, device=x.device)
    ex = RowExecutor(x, y=y, hist=hist, model_like=x, guidance=guidance if cfg else None, bad_row=bad_row,
                     table=table, backend=backend)
    ex.bind(rows, table, program.num_slots)
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for i, r in enumerate(rows):
        cond = uncond = None
        if r.needs_model:
            E = ex.evaluated(i)
            t = torch.full((2 * B if cfg else B,), r.point.model_t, dtype=t_dtype, device=x.device)
            out = model(torch.cat([E, E]) if cfg else E, t, **kwargs)
            if cfg:
                uncond, cond = out[:B], out[B:]
            else:
                cond = out
        ex.run(i, cond, uncond, seed=seed)
    return x, bad_row
