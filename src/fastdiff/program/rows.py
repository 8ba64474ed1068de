"""The static side of a coefficient program: rows, their outputs and evaluation points, and the
compiled ``Program`` (see fastdiff.program for the formula a row stands for)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .layout import hist_mask, pack_flags, table_width


@dataclass(frozen=True)
class Out:
    """Coefficients of one output: out = x*x + y*E + h*h + hu*h_u + z*z + sum hist[j]*H[j].

    ``h`` is the row's model term h = q_y*E + q_x0*x0 with x0 the guided prediction (from
    D = u + g (c - u)); ``h_u`` the same with the *unconditional* prediction (from u), which the
    CFG++ samplers use beside the guided one (fastdiff.solvers.cfg_pp). Without CFG, u = c."""

    x: float = 0.0
    y: float = 0.0
    h: float = 0.0
    z: float = 0.0
    hist: Tuple[Tuple[int, float], ...] = ()
    hu: float = 0.0

    @property
    def slots(self) -> Tuple[int, ...]:
        return tuple(j for j, _ in self.hist)


@dataclass(frozen=True)
class Point:
    """A point where the model is evaluated: schedule time, alpha, sigma, model time."""

    t: float
    alpha: float
    sigma: float
    model_t: float

    @property
    def ksigma(self) -> float:
        return self.sigma / self.alpha if self.alpha != 0 else float("inf")


@dataclass(frozen=True)
class Row:
    """One pass of the fused step (see the module docstring)."""

    step: int                              # the solver step this row belongs to (0-based)
    eval_at: str = "x"                     # E: the buffer ('x' or 'y') the model was evaluated at
    point: Optional[Point] = None          # where the model is evaluated; None: no model call
    q_y: float = 0.0                       # h = q_y * E + q_x0 * x0
    q_x0: float = 1.0
    out_x: Optional[Out] = None
    out_y: Optional[Out] = None
    hist_write: int = -1
    noise_id: int = -1                     # which Gaussian draw (same id -> same noise); -1: none
    next_eval: Optional[str] = None        # 'x'/'y': which output the next model call reads
    hist_out: Optional[Out] = None         # the value written to hist_write; None: h (Out(h=1))
    more_writes: Tuple[Tuple[int, Out], ...] = ()   # further (slot, value) writes of the same pass

    def __post_init__(self):
        if self.eval_at not in ("x", "y"):
            raise ValueError(f"eval_at must be 'x' or 'y', got {self.eval_at!r}")
        if self.out_x is None and self.out_y is None:
            raise ValueError("a row must write x or y")
        if self.next_eval not in ("x", "y", None):
            raise ValueError(f"next_eval must be 'x', 'y' or None, got {self.next_eval!r}")
        if self.hist_out is not None and self.hist_write < 0:
            raise ValueError("hist_out given but hist_write is -1")
        slots = [j for j, _ in self.writes]
        if any(not isinstance(j, int) or j < 0 for j in slots) or len(set(slots)) != len(slots):
            raise ValueError(f"a row writes each history slot at most once, to slots >= 0; got {slots}")
        uses_z = any(o is not None and o.z != 0.0 for o in (self.out_x, self.out_y) + self.write_values)
        if uses_z and self.noise_id < 0:
            raise ValueError("a row with a noise coefficient needs a noise_id")

    @property
    def needs_model(self) -> bool:
        return self.point is not None

    @property
    def hist_value(self) -> Optional[Out]:
        """The out combination written to history slot hist_write (None: no write)."""
        if self.hist_write < 0:
            return None
        return self.hist_out if self.hist_out is not None else Out(h=1.0)

    @property
    def writes(self) -> Tuple[Tuple[int, Out], ...]:
        """Every (slot, value) the row writes: hist_write's first, then more_writes."""
        first = ((self.hist_write, self.hist_value),) if self.hist_write >= 0 else ()
        return first + tuple(self.more_writes)

    @property
    def write_values(self) -> Tuple[Out, ...]:
        return tuple(o for _, o in self.writes)

    @property
    def hist_writes(self) -> int:
        """The slots the row writes as the kernel's bitmask (fastdiff.program.layout.hist_mask)."""
        mask = 1 << self.hist_write if self.hist_write >= 0 else 0      # (cheap: read per row and run)
        return (mask | hist_mask(j for j, _ in self.more_writes)) if self.more_writes else mask

    @property
    def reads_uncond(self) -> bool:
        """Whether an output uses the unconditional prediction on its own (CFG++): then the
        uncond pass runs wherever guidance is given, even where g = 1."""
        return self.needs_model and any(o is not None and o.hu != 0.0
                                        for o in (self.out_x, self.out_y) + self.write_values)

    @property
    def flags(self) -> int:
        """The row's booleans as the ABI's bitmask (fastdiff.program.layout): E is y, writes x,
        writes y, the next model call reads y."""
        return pack_flags(self.eval_at == "y", self.out_x is not None, self.out_y is not None,
                          self.next_eval == "y")


@dataclass
class Program:
    """A compiled coefficient program: static rows plus the float64 table the kernel reads."""

    rows: List[Row]
    num_slots: int
    table: np.ndarray                       # [len(rows), table_width(num_slots)] float64
    steps: int
    nfe: int = field(init=False)

    def __post_init__(self):
        self.nfe = sum(r.needs_model for r in self.rows)
        if self.table.shape != (len(self.rows), table_width(self.num_slots)):
            raise ValueError(f"table shape {self.table.shape} does not match {len(self.rows)} rows, "
                             f"{self.num_slots} slots")
