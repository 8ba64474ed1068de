"""Numerical parity of every kernel on every backend that can run here, against the reference
oracles; and the parity harness the tests share (one case builder, one set of layouts, one
comparison, tolerances stated once).

``fastdiff check`` runs this and exits with status 1 if anything fails, so it can gate a CI job.
The oracles are those of fastdiff.reference (step, philox, reductions), called directly (never
through dispatch, so a broken backend cannot judge itself). Each kernel backend in
fastdiff.ops.BACKENDS is checked on the device it serves here (cpu; triton on a CUDA GPU or under
TRITON_INTERPRET=1; cuda where it is built); one that cannot run is listed as skipped with its
reason, and an op a backend does not implement is "n/a". ``check_backend`` takes any object with
the Backend interface (tests run it on the CUDA kernels' host emulation, for one).

What is compared:

* fused_step: seven row kinds (ROW_KINDS) x model dtypes float32/float16/bfloat16 x odd sizes, and
  non-contiguous inputs (LAYOUTS: channels-last, transposed, strided and batch-sliced views into
  NaN-padded storage, offset views). Every in-place output (x, y, every history slot, the model
  input, the non-finite flag) is compared; outputs are allocated NaN-filled, so an element the
  kernel fails to write, or a read outside a view, shows up; read-only inputs (table, model
  outputs, noise, guidance) must come back bit-identical.
* cfg_combine: both CFG halves or cond only, the same dtypes, contiguous and every layout.
* philox: the raw 32-bit words bit-equal; the Gaussian normals within PHILOX_ULPS ulp.
* reductions: cfg_rescale, dynamic_threshold, error_norm, per_sample_norm.

The harness (``step_case``, ``relayout``, ``clone_case``, ``step_mismatches``, ``assert_step_match``,
``compare``, ``assert_within``) is what tests/test_ops_cpu.py, test_cuda_emulated.py and
test_triton_interpret.py build and compare their cases with. Tolerances are stated once, here
(TOLERANCES, EXACT, PHILOX_ULPS).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .reference import philox as philox_oracle
from .reference import reductions as reductions_oracle
from .reference import step as reference_oracle
from .ops.backends import REDUCTION_OPS
from .program.layout import (COL_G, COL_G0, COL_G1, FLAG_ALL, FLAG_ARG_NAMES, OUT_FIXED, STEP_ARG_NAMES, col_out_slot,
                             col_out_x, col_out_y, pack_flags, table_width, unpack_flags)

__all__ = ["Tolerance", "TOLERANCES", "EXACT", "PHILOX_ULPS", "CheckResult", "kernel_backends", "device_for",
           "check_backend", "run_checks", "render_table", "failed",
           # the harness the tests share
           "ALL_LAYOUTS", "LAYOUTS", "relayout", "clone_keep_layout", "compare", "assert_within", "ulps",
           "STEP_ARGS", "random_table", "step_case", "public_kwargs", "with_flags", "clone_case", "run_step",
           "modified_inputs", "step_mismatches", "assert_step_match", "UNKNOWN_FLAGS", "assert_rejects_unknown_flags",
           "OP_GROUPS"]


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * |want| per element or, ``normwise``, <= atol + rtol * max |want|
    (for reductions, whose float32 sums run in another order than torch's)."""

    atol: float
    rtol: float
    normwise: bool = False

    def allowed(self, want: torch.Tensor) -> torch.Tensor:
        scale = want.abs().max() if self.normwise else want.abs()
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        if not (self.atol or self.rtol):
            return "bit-equal"
        ref = "max|ref|" if self.normwise else "|ref|"
        return f"{self.atol:.0e} + {self.rtol:.0e}·{ref}" if self.atol else f"{self.rtol:.0e}·{ref}"


# The kernels follow the reference's order of float32 operations without FMA contraction, so they
# agree to the last bit in practice; the slack is for Philox normals (libm's log/sin/cos vs the
# kernels' own, up to PHILOX_ULPS apart) reaching x through the noise coefficient, and for one ulp
# of the model dtype where a float32 -> float16/bfloat16 rounding lands on the other side.
TOLERANCES: Dict[object, Tolerance] = {
    "state": Tolerance(2e-5, 1e-5),          # x, y, history slots: float32
    torch.float32: Tolerance(2e-5, 1e-5),
    torch.float16: Tolerance(1e-3, 1e-3),    # 1 ulp of float16
    torch.bfloat16: Tolerance(8e-3, 8e-3),   # 1 ulp of bfloat16
    torch.float64: Tolerance(2e-5, 1e-5),    # a float64 model input: the float32 math, exactly widened
    "reduction": Tolerance(0.0, 1e-5, normwise=True),
}
EXACT = Tolerance(0.0, 0.0)                  # bit-equal (NaN == NaN): kernels without noise vs their emulation
PHILOX_ULPS = 4   # the largest distance of the C++/Triton normals to the reference seen is 3 ulp

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
PASS, FAIL, NA, SKIPPED = "pass", "FAIL", "n/a", "skipped"


@dataclass
class CheckResult:
    """One row of the report: an op on a backend over a group of cases (sizes, layouts, seeds)."""

    op: str
    backend: str
    case: str
    status: str                      # PASS, FAIL, NA or SKIPPED
    error: str = ""                  # the largest error, in the row's unit ("3.0e-07", "3 ulp", ...)
    tolerance: str = ""
    worst: Optional[float] = None    # largest error / allowed error over the cases (<= 1 passes)
    detail: str = ""                 # the worst case, the first failure, or why n/a / skipped

    def to_json(self) -> dict:
        return asdict(self)


def failed(results: Iterable[CheckResult]) -> List[CheckResult]:
    return [r for r in results if r.status == FAIL]


@dataclass
class _Worst:
    """The running maximum of one result row over its cases, and its failures."""

    tolerance: str
    unit: str = ""                   # "" for absolute errors, else e.g. " ulp"
    ratio: float = 0.0
    error: float = 0.0
    where: str = ""
    worst_tolerance: str = ""        # the worst case's tolerance, where it is not the row's
    failures: List[str] = field(default_factory=list)

    def add(self, where: str, error: float, ratio: float, problem: str = "", tolerance: str = "") -> None:
        """One case: its error, error / allowed error, what went wrong if not just the size of the
        error, and its tolerance if not the row's."""
        if problem:
            self.failures.append(f"{where}: {problem}")
        elif not ratio <= 1.0:           # NaN counts as a failure
            self.failures.append(f"{where}: error {self._fmt(error)} above {tolerance or self.tolerance}")
        if not ratio <= self.ratio:
            self.ratio, self.error, self.where = ratio, error, where
            self.worst_tolerance = tolerance

    def _fmt(self, v: float) -> str:
        return f"{v:g}{self.unit}" if self.unit else f"{v:.1e}"

    def result(self, op: str, backend: str, case: str) -> CheckResult:
        if self.failures:
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            return CheckResult(op, backend, case, FAIL, self._fmt(self.error), self.worst_tolerance or self.tolerance,
                               self.ratio, self.failures[0] + more)
        return CheckResult(op, backend, case, PASS, self._fmt(self.error), self.worst_tolerance or self.tolerance,
                           self.ratio, f"worst: {self.where}" if self.where else "")


def compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> Tuple[float, float, str]:
    """(max |got - want|, its largest ratio to the allowed error, problem). NaN against NaN and
    equal infinities are equal; a NaN or Inf against anything else is an infinite error."""
    if not isinstance(got, torch.Tensor):
        return math.inf, math.inf, f"returned {type(got).__name__}, expected a tensor"
    if tuple(got.shape) != tuple(want.shape):
        return math.inf, math.inf, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return math.inf, math.inf, f"dtype {got.dtype}, expected {want.dtype}"
    if got.numel() == 0:
        return 0.0, 0.0, ""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    d = _differences(g, w)
    ratio = torch.where(d == 0, torch.zeros_like(d), d / tol.allowed(w))   # 0/0 (exact zeros) is no error
    ratio = torch.where(ratio.isnan(), torch.full_like(ratio, math.inf), ratio)   # inf/inf: a finite vs an Inf
    return d.max().item(), ratio.max().item(), ""


def _differences(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|g - w| elementwise in float64, 0 where equal (NaN == NaN, Inf == Inf), inf where a NaN meets a number."""
    same = (g == w) | (g.isnan() & w.isnan())
    d = torch.where(same, torch.zeros_like(g), (g - w).abs())
    return torch.where(d.isnan(), torch.full_like(d, math.inf), d)


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, what: str = "") -> None:
    """``compare`` as a test assertion: raise AssertionError naming the worst element."""
    err, ratio, problem = compare(got, want, tol)
    if problem:
        raise AssertionError(f"{what}: {problem}")
    if ratio <= 1.0:
        return
    g, w = got.detach().cpu().double().reshape(-1), want.detach().cpu().double().reshape(-1)
    d = _differences(g, w)
    r = torch.where(d == 0, torch.zeros_like(d), d / tol.allowed(w))
    r = torch.where(r.isnan(), torch.full_like(r, math.inf), r)
    i = int(r.argmax())
    raise AssertionError(f"{what}: {int((r > 1).sum())} of {r.numel()} elements beyond {tol}; worst at flat index "
                         f"{i}: got {g[i].item()!r}, want {w[i].item()!r} (error {d[i].item():.3g})")


_RAISED = object()


def _run(worst: "_Worst", where: str, fn: Callable, *args):
    """fn(*args), or _RAISED after recording the exception as this case's failure (a kernel that
    raises fails its case; the other cases still run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any exception from a kernel is a failed check
        worst.add(where, math.inf, math.inf, f"raised {type(e).__name__}: {e}")
        return _RAISED


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in float32 ulps of want (inf for a NaN)."""
    w = want.detach().cpu().numpy().astype(np.float32)
    d = np.abs(got.detach().cpu().numpy().astype(np.float64) - w) / np.spacing(np.abs(w)).astype(np.float64)
    return float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0


def _seed(*key) -> torch.Generator:
    """A generator seeded from the case (stable across runs, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape(shape) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------
# Tensors in layouts that catch wrong reads, and copies that keep them
# ---------------------------------------------------------------------------------------------
#: Every memory layout a parity case can take. Dense but not contiguous: ``channels_last`` (torch's
#: format for 4-D/5-D tensors, the last two dims swapped otherwise), ``last_two_transposed``,
#: ``transposed`` (the batch dim innermost). Not dense, inside NaN-padded storage: ``strided``
#: (every other element), ``batch_slice`` (every other sample). Contiguous views inside NaN-padded
#: storage: ``padded`` (from element 17), ``offset`` (from element 1: misaligned for vector loads).
ALL_LAYOUTS = ("contiguous", "channels_last", "last_two_transposed", "transposed", "strided", "batch_slice",
               "padded", "offset")
#: The non-contiguous layouts ``fastdiff check`` runs (besides contiguous inputs).
LAYOUTS = ("channels_last", "transposed", "strided", "batch_slice", "padded")


def relayout(t: torch.Tensor, layout: str, *, batch_dim: int = 0) -> torch.Tensor:
    """The same values in ``layout`` (one of ALL_LAYOUTS), on t's device. Storage around a view is
    NaN, so reading it as if it were contiguous, or out of bounds, returns NaN. ``batch_dim``: the
    dim that ``batch_slice`` slices (1 for a history stack [K, B, ...])."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        layout = "last_two_transposed"
    if layout == "last_two_transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.contiguous()
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t.contiguous()
    nan = float("nan")
    if layout == "strided":
        big = torch.full(tuple(t.shape[:-1]) + (2 * t.shape[-1] + 3,), nan, dtype=t.dtype, device=t.device)
        view = big[..., 1:2 * t.shape[-1] + 1:2]
    elif layout == "batch_slice":
        shape = list(t.shape)
        shape[batch_dim] *= 2
        big = torch.full(shape, nan, dtype=t.dtype, device=t.device)
        view = big[(slice(None),) * batch_dim + (slice(None, None, 2),)]
    elif layout in ("padded", "offset"):
        start, extra = (17, 37) if layout == "padded" else (1, 2)
        big = torch.full((t.numel() + extra,), nan, dtype=t.dtype, device=t.device)
        view = big[start:start + t.numel()].view(t.shape)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(ALL_LAYOUTS)}")
    return view.copy_(t)


def clone_keep_layout(t):
    """A copy with the same shape, strides and storage offset, the storage around and between its
    elements NaN (0 for integers); anything but a tensor is returned as it is."""
    if not isinstance(t, torch.Tensor):
        return t
    need = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    fill = float("nan") if t.is_floating_point() else 0
    buf = torch.full((max(need, 1),), fill, dtype=t.dtype, device=t.device)
    return buf.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.cpu(), b.cpu()
    eq = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else (a == b)
    return bool(eq.all())


# ---------------------------------------------------------------------------------------------
# fused_step: cases, and the comparison of a backend's run with the oracle's
# ---------------------------------------------------------------------------------------------
STEP_ARGS = STEP_ARG_NAMES                     # every backend's fused_step takes these, in this order
STEP_OUTPUTS = ("x", "y", "hist", "model_in")  # written in place (and bad_row, compared exactly)
STEP_INPUTS = ("table", "cond", "uncond", "noise", "guidance")   # read only: must come back bit-equal
#: The per-sample affine guidance (g0, g1) of the rows of a case with a scale vector: on, off, and a mix.
GUIDANCE_ROWS = ((0.0, 1.0), (1.0, 0.0), (0.25, 0.5))


def random_table(gen: torch.Generator, K: int, rows: int = 3) -> torch.Tensor:
    """A float64 table of random coefficients, the CFG scale g in [1, 8)."""
    T = torch.randn(rows, table_width(K), dtype=torch.float64, generator=gen)
    T[:, COL_G] = 1.0 + 7.0 * torch.rand(rows, dtype=torch.float64, generator=gen)
    return T


def step_case(gen: torch.Generator, shape, *, K: int = 1, model: str = "cfg", noise: str = "philox",
              writes: str = "x", model_in: str = "2B", eval_y: Optional[bool] = None,
              model_dtype: torch.dtype = torch.float32, noise_dtype: torch.dtype = torch.float32,
              layout: str = "contiguous", seed: int = 1234, noise_id: int = 3, bad_row: bool = True,
              guidance: Optional[torch.dtype] = None, hist_writes: Optional[int] = None,
              model_in_from_y: Optional[bool] = None, unread_slot: Optional[int] = None, device="cpu") -> dict:
    """Random, valid arguments of one fused_step call (the names of STEP_ARGS: the row booleans
    packed into ``flags``; ``public_kwargs`` gives fastdiff.ops.fused_step's), every tensor in
    ``layout``. model: "none" | "cond" | "cfg" (both halves); noise: "none" | "given" (a tensor of
    ``noise_dtype``) | "philox" (drawn in the kernel); writes: "x" | "y" | "xy"; model_in: "none" |
    "B" | "2B" (one or both CFG halves, NaN-filled); eval_y: default whether the row writes y;
    hist_writes (the bitmask of written slots) / model_in_from_y: default random; guidance: the dtype
    of a per-sample scale vector (the first sample's scale exactly 1: D = cond), the rows' (g0, g1)
    from GUIDANCE_ROWS; unread_slot: a slot that every out block's coefficient leaves out (zero),
    NaN-filled: a backend that reads it anyway poisons its outputs."""
    def tensor(s, dtype=torch.float32):
        return relayout(torch.randn(s, generator=gen).to(dtype).to(device), layout)

    write_x, write_y = "x" in writes, "y" in writes
    eval_y = write_y if eval_y is None else bool(eval_y)
    B = shape[0]
    table = random_table(gen, K)
    from_y = False
    a = dict(table=table, row=1, x=tensor(shape), y=None, cond=None, uncond=None, hist=None, hist_writes=0,
             flags=0, noise=None, seed=seed, noise_id=-1, model_in=None, bad_row=None, guidance=None)
    if write_y or eval_y:
        a["y"] = tensor(shape)
    if model != "none":
        a["cond"] = tensor(shape, model_dtype)
        if model == "cfg":
            a["uncond"] = tensor(shape, model_dtype)
    if K:
        a["hist"] = relayout(torch.randn((K,) + tuple(shape), generator=gen).to(device), layout, batch_dim=1)
        a["hist_writes"] = int(torch.randint(0, 1 << K, (1,), generator=gen))
    if hist_writes is not None:
        a["hist_writes"] = hist_writes
    if unread_slot is not None:
        for b in [col_out_x(K), col_out_y(K)] + [col_out_slot(K, j) for j in range(K)]:
            table[:, b + OUT_FIXED + unread_slot] = 0.0
        a["hist"][unread_slot].fill_(float("nan"))
    if noise == "given":
        a["noise"] = tensor(shape, noise_dtype)
    elif noise == "philox":
        a["noise_id"] = noise_id
    if model_in != "none":
        rows = B if model_in == "B" else 2 * B
        a["model_in"] = relayout(torch.full((rows,) + tuple(shape[1:]), float("nan"), dtype=model_dtype,
                                            device=device), layout)
        from_y = write_y and (not write_x or bool(torch.rand(1, generator=gen) < 0.5))
    if model_in_from_y is not None:
        from_y = bool(model_in_from_y)
    a["flags"] = pack_flags(eval_y, write_x, write_y, from_y)
    if bad_row:
        a["bad_row"] = torch.zeros(1, dtype=torch.int32, device=device)
    if guidance is not None:
        s = 1.0 + 7.0 * torch.rand(B, dtype=torch.float64, generator=gen)
        s[0] = 1.0
        a["guidance"] = s.to(guidance).to(device)
        table[:, [COL_G0, COL_G1]] = torch.tensor(GUIDANCE_ROWS, dtype=torch.float64)[:table.shape[0]]
    a["table"] = table.to(device)
    return a


def public_kwargs(case: dict) -> dict:
    """A case as keyword arguments of the public ``fastdiff.ops.fused_step``: its ``flags``
    unpacked into eval_y, write_x, write_y, model_in_from_y (``hist_writes`` is a keyword too)."""
    kw = {k: v for k, v in case.items() if k != "flags"}
    kw.update(zip(FLAG_ARG_NAMES, unpack_flags(case["flags"])))
    return kw


def with_flags(case: dict, **flags: bool) -> dict:
    """``case`` with some row booleans changed (names of FLAG_ARG_NAMES), in place; returns it."""
    current = dict(zip(FLAG_ARG_NAMES, unpack_flags(case["flags"])))
    unknown = set(flags) - set(current)
    if unknown:
        raise TypeError(f"unknown row flag(s) {sorted(unknown)}; the flags are {FLAG_ARG_NAMES}")
    current.update(flags)
    case["flags"] = pack_flags(*(current[n] for n in FLAG_ARG_NAMES))
    return case


#: flags values with bits that name no row flag: the next bit, a high bit, every bit (-1), and the
#: next bit on top of every known one; each backend must reject them all and write nothing.
UNKNOWN_FLAGS = (FLAG_ALL + 1, 1 << 31, -1, FLAG_ALL | (FLAG_ALL + 1))


def assert_rejects_unknown_flags(fused_step: Callable, case: dict) -> None:
    """``fused_step`` (positional, STEP_ARGS' order) raises a ValueError naming ``flags`` and its
    unknown bits for every value of UNKNOWN_FLAGS (the rest of ``case`` valid), and changes no
    argument: every tensor of the case comes back bit-equal."""
    for flags in UNKNOWN_FLAGS:
        c = clone_case(case)
        c["flags"] = flags
        try:
            fused_step(*[c[k] for k in STEP_ARGS])
        except ValueError as e:
            assert "flags has unknown row flag bits" in str(e), f"flags={flags}: unclear error {e}"
        else:
            raise AssertionError(f"flags={flags} (unknown bits) was accepted")
        changed = [k for k, v in case.items() if isinstance(v, torch.Tensor) and not _bit_equal(c[k], v)]
        assert not changed, f"flags={flags}: rejected, but wrote {changed}"


def clone_case(case: dict) -> dict:
    """A copy of every tensor of a case, layouts and NaN padding kept."""
    return {k: clone_keep_layout(v) for k, v in case.items()}


def run_step(fused_step: Callable, case: dict) -> dict:
    """A copy of ``case`` after ``fused_step`` ran on it (positional arguments, STEP_ARGS' order)."""
    c = clone_case(case)
    fused_step(*[c[k] for k in STEP_ARGS])
    return c


def run_against_reference(case: dict, backend: str) -> Tuple[dict, dict]:
    """``case`` run through ``fastdiff.ops.fused_step`` on ``backend`` and on the reference backend:
    (backend's copy, reference's copy) after the call; raises if the backend changed a read-only input."""
    from . import ops
    a, b = clone_case(case), clone_case(case)
    ops.fused_step(**public_kwargs(a), backend=backend)
    ops.fused_step(**public_kwargs(b), backend="reference")
    changed = modified_inputs(case, a)
    if changed:
        raise AssertionError(f"{backend} backend modified read-only input(s) {changed}")
    return a, b


def modified_inputs(before: dict, after: dict) -> List[str]:
    """The read-only inputs of a case that a run changed."""
    return [k for k in STEP_INPUTS if before.get(k) is not None and not _bit_equal(after[k], before[k])]


def step_mismatches(got: dict, want: dict, *, exact: bool = False) -> List[Tuple[str, float, float, str, str]]:
    """(output, error, error / allowed, problem, tolerance) for each in-place output of a run
    ``got`` against the oracle's ``want``: x, y, history with the state's tolerance, the model
    input with its dtype's (``exact``: bit-equal, NaN == NaN), bad_row always exactly."""
    out = []
    g_bad, w_bad = got.get("bad_row"), want.get("bad_row")
    if w_bad is not None and not torch.equal(g_bad.cpu(), w_bad.cpu()):
        out.append(("bad_row", math.inf, math.inf, f"non-finite flag is {g_bad.item()}, expected {w_bad.item()}", ""))
    for name in STEP_OUTPUTS:
        w = want.get(name)
        if w is None:
            continue
        g = got[name]
        if g.stride() != w.stride():
            out.append((name, math.inf, math.inf, f"strides {g.stride()}, expected {w.stride()} (layout replaced)", ""))
            continue
        tol = EXACT if exact else (TOLERANCES[w.dtype] if name == "model_in" else TOLERANCES["state"])
        out.append((name,) + compare(g, w, tol) + (str(tol),))
    return out


def assert_step_match(got: dict, want: dict, what: str = "", *, exact: bool = False) -> None:
    """``step_mismatches`` as a test assertion (the first output beyond its tolerance, worst element named)."""
    for name, err, ratio, problem, tol in step_mismatches(got, want, exact=exact):
        if problem:
            raise AssertionError(f"{name} {what}: {problem}")
        if not ratio <= 1.0:
            assert_within(got[name], want[name], EXACT if exact else _step_tolerance(name, want[name]),
                          f"{name} {what}")


def _step_tolerance(name: str, t: torch.Tensor) -> Tolerance:
    return TOLERANCES[t.dtype] if name == "model_in" else TOLERANCES["state"]


@dataclass(frozen=True)
class RowKind:
    """A kind of coefficient-program row, as the solvers emit them (see fastdiff.program)."""

    label: str
    K: int                       # history slots
    model: str                   # "none", "cond" or "cfg"
    noise: str = "none"          # "none", "given" (a tensor) or "philox" (drawn in the kernel)
    write_y: bool = False
    eval_y: bool = False
    hist_writes: int = 0         # the written history slots (bitmask)
    model_in: str = "none"       # "none", "B" or "2B" (both CFG halves)
    model_in_from_y: bool = False
    nonfinite: bool = False      # a NaN in the model output: the kernel must raise the flag
    guidance: bool = False       # a per-sample guidance scale vector (g = g0 + g1 * s[b])
    unread_slot: Optional[int] = None   # a NaN-filled slot no output reads (zero coefficients)


ROW_KINDS = (
    RowKind("model output, no CFG (DDIM/Euler)", K=0, model="cond", model_in="B"),
    RowKind("CFG + history write (multistep)", K=1, model="cfg", hist_writes=0b1, model_in="2B"),
    RowKind("CFG + Philox noise (ancestral/SDE)", K=1, model="cfg", noise="philox", hist_writes=0b1, model_in="2B"),
    RowKind("x and y at y, 3 slots, given noise (multi-stage)", K=3, model="cfg", noise="given", write_y=True,
            eval_y=True, hist_writes=0b100, model_in="2B", model_in_from_y=True),
    RowKind("no model, history combination", K=2, model="none", noise="given"),
    RowKind("non-finite flag (NaN in the model output)", K=1, model="cfg", hist_writes=0b1),
    RowKind("per-sample CFG scales + CFG++ terms", K=1, model="cfg", hist_writes=0b1, model_in="2B", guidance=True),
    RowKind("two slots written in one pass, x and y", K=3, model="cfg", write_y=True, hist_writes=0b101,
            model_in="B"),
    RowKind("a write-only slot, NaN-filled (x0 handed back)", K=2, model="cond", noise="given", hist_writes=0b11,
            model_in="B", unread_slot=1),
)
MULTI_STAGE = ROW_KINDS[3]       # the row that touches every buffer: used for the layouts
# Odd sizes; 2x4x67x65 (34840 elements) is above the C++ kernels' serial threshold (32768), so the
# OpenMP path runs too. The large size runs with float32 model outputs only (it is what costs time).
STEP_SHAPES = ((1,), (7,), (2, 3, 5, 7), (2, 4, 67, 65))
LARGE_SHAPE = (1000003,)
LAYOUT_SHAPES = ((2, 3, 5, 7), (2, 4, 16, 24))


def _kind_case(kind: RowKind, shape, model_dtype, device, gen: torch.Generator, layout="contiguous") -> dict:
    """Random, valid arguments of one fused_step call of this row kind (step_case's)."""
    a = step_case(gen, shape, K=kind.K, model=kind.model, noise=kind.noise, writes="xy" if kind.write_y else "x",
                  model_in=kind.model_in, eval_y=kind.eval_y, model_dtype=model_dtype, noise_dtype=model_dtype,
                  layout=layout, seed=2 ** 40 + 1234, noise_id=3,
                  guidance=torch.float64 if kind.guidance else None, hist_writes=kind.hist_writes,
                  model_in_from_y=kind.model_in_from_y, unread_slot=kind.unread_slot, device=device)
    if kind.guidance:
        a["row"] = 0                     # g = 0 + 1 * s[b] (GUIDANCE_ROWS[0])
    if kind.nonfinite:
        a["cond"][tuple(n - 1 for n in shape)] = float("nan")
    return a


def _check_step_case(backend, a: dict, where: str, worst: _Worst) -> None:
    """Run one case on the backend and on the oracle; fold the comparison into ``worst``."""
    got = clone_case(a)
    want = clone_case({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in a.items()})
    if _run(worst, where, backend.fused_step, *[got[k] for k in STEP_ARGS]) is _RAISED:
        return
    reference_oracle.fused_step(*[want[k] for k in STEP_ARGS])
    for name in modified_inputs(a, got):
        worst.add(where, math.inf, math.inf, f"modified the read-only input {name}")
    for name, err, ratio, problem, tol in step_mismatches(got, want):
        worst.add(f"{where} {name}", err, ratio, problem, tolerance=tol)


def check_fused_step(backend, device, *, large: bool = True) -> List[CheckResult]:
    # x, y, history: the state's tolerance; the model input: its dtype's. The row shows the worst's.
    tol_text = str(TOLERANCES["state"])
    out = []
    for kind in ROW_KINDS:
        for dtype in MODEL_DTYPES:
            shapes = STEP_SHAPES + ((LARGE_SHAPE,) if large and dtype == torch.float32 else ())
            why = _why_not(backend, "fused_step", dtype, device, state_dtype=torch.float32)
            if why:
                out.append(CheckResult("fused_step", backend.name, f"{kind.label}; {_dtype(dtype)}", NA, detail=why))
                continue
            worst = _Worst(tol_text)
            for shape in shapes:
                case = _kind_case(kind, shape, dtype, device, _seed(kind.label, str(dtype), shape))
                _check_step_case(backend, case, _shape(shape), worst)
            out.append(worst.result("fused_step", backend.name,
                                    f"{kind.label}; {_dtype(dtype)}; sizes {', '.join(map(_shape, shapes))}"))
    for dtype in MODEL_DTYPES:
        if _why_not(backend, "fused_step", dtype, device, state_dtype=torch.float32):
            continue   # reported n/a above
        worst = _Worst(tol_text)
        for layout in LAYOUTS:
            for shape in LAYOUT_SHAPES:
                case = _kind_case(MULTI_STAGE, shape, dtype, device, _seed(layout, str(dtype), shape), layout)
                _check_step_case(backend, case, f"{layout} {_shape(shape)}", worst)
        out.append(worst.result("fused_step", backend.name,
                                f"non-contiguous ({', '.join(LAYOUTS)}), {MULTI_STAGE.label}; {_dtype(dtype)}"))
    return out


# ---------------------------------------------------------------------------------------------
# cfg_combine
# ---------------------------------------------------------------------------------------------
CFG_SHAPES = ((1,), (7,), (2, 4, 33, 35), (3, 70001))
CFG_SCALE = 7.5


def check_cfg_combine(backend, device) -> List[CheckResult]:
    out = []
    for dtype in MODEL_DTYPES:
        why = _why_not(backend, "cfg_combine", dtype, device)
        if why:
            out.append(CheckResult("cfg_combine", backend.name, _dtype(dtype), NA, detail=why))
            continue
        worst = _Worst(str(TOLERANCES[dtype]))
        for layout in ("contiguous",) + LAYOUTS:
            for shape in CFG_SHAPES:
                gen = _seed("cfg", layout, str(dtype), shape)
                cond = relayout(torch.randn(shape, generator=gen).to(dtype).to(device), layout)
                uncond = relayout(torch.randn(shape, generator=gen).to(dtype).to(device), layout)
                for u in (uncond, None):
                    where = f"{layout} {_shape(shape)}" + ("" if u is not None else " cond only")
                    got = _run(worst, where, backend.cfg_combine, cond, u, CFG_SCALE)
                    if got is _RAISED:
                        continue
                    want = reference_oracle.cfg_combine(cond.cpu(), None if u is None else u.cpu(), CFG_SCALE)
                    worst.add(where, *compare(got, want, TOLERANCES[dtype]))
        out.append(worst.result("cfg_combine", backend.name,
                                f"u + {CFG_SCALE}(c - u) and c alone; {_dtype(dtype)}; sizes "
                                f"{', '.join(map(_shape, CFG_SHAPES))}; contiguous, {', '.join(LAYOUTS)}"))
    return out


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------
PHILOX_SEEDS = ((0, 0), (12345, 77), (2 ** 32 + 5, 1), (2 ** 64 - 1, 2 ** 32 - 1))
WORD_COUNTS = (1, 6, 4097)
NORMAL_SHAPES = ((7,), (2, 4, 9, 13), (1 << 17,))


def philox_words_fn(backend) -> Optional[Callable]:
    """The backend's raw Philox words, ``(numel, seed, noise_id, device) -> int64 [ceil(numel/4), 4]``,
    or None. The Backend interface has no words op (only the normals); a backend may add
    ``philox_uint32``, else the cpu and triton backends' kernels are called directly."""
    if hasattr(backend, "philox_uint32"):
        return backend.philox_uint32
    if backend.name == "cpu":
        from .ops.backends import load_extension
        ext = load_extension()
        if not isinstance(ext, str) and hasattr(ext, "philox_uint32"):
            return lambda numel, seed, noise_id, device: ext.philox_uint32(numel, seed, noise_id)
    if backend.name == "triton":
        from .ops.triton_backend import load_kernels
        kernels = load_kernels()
        if not isinstance(kernels, str):
            return kernels.philox.philox_uint32
    return None


def check_philox(backend, device) -> List[CheckResult]:
    out = []
    words = philox_words_fn(backend)
    if words is None:
        out.append(CheckResult("philox", backend.name, "32-bit words", NA, detail="the backend exposes no raw words"))
    else:
        worst = _Worst("bit-equal", unit=" words differ")
        for seed, noise_id in PHILOX_SEEDS:
            for numel in WORD_COUNTS:
                where = f"seed {seed}, noise_id {noise_id}, {numel} elements"
                got = _run(worst, where, words, numel, seed, noise_id, device)
                if got is _RAISED:
                    continue
                want = philox_oracle.philox_uint32(numel, seed, noise_id)
                if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
                    worst.add(where, math.inf, math.inf, f"expected a tensor of shape {tuple(want.shape)}")
                    continue
                differ = int((got.cpu().to(torch.int64) != want).sum())
                worst.add(where, differ, math.inf if differ else 0.0)
        out.append(worst.result("philox", backend.name, f"32-bit words; {len(PHILOX_SEEDS)} (seed, noise_id) "
                                f"pairs incl. 2**64-1; {', '.join(map(str, WORD_COUNTS))} elements"))
    worst = _Worst(f"{PHILOX_ULPS} ulp", unit=" ulp")
    for seed, noise_id in PHILOX_SEEDS:
        for shape in NORMAL_SHAPES:
            where = f"seed {seed}, noise_id {noise_id}, {_shape(shape)}"
            got = _run(worst, where, backend.philox_normal, shape, seed, noise_id, torch.device(device))
            if got is _RAISED:
                continue
            want = philox_oracle.philox_normal(shape, seed, noise_id)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape or got.dtype != torch.float32:
                worst.add(where, math.inf, math.inf, "not a float32 tensor of the requested shape")
                continue
            u = ulps(got, want)
            worst.add(where, u, u / PHILOX_ULPS)
    out.append(worst.result("philox", backend.name, f"normals (Box-Muller, float32); sizes "
                            f"{', '.join(map(_shape, NORMAL_SHAPES))}"))
    return out


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------
REDUCTION_SHAPES = ((1, 7), (3, 5, 7, 11), (2, 4, 33, 35))


def _reduction_cases(gen, shape, dtype, device, layout):
    """(op, args) pairs; the tensors are what the op sees, the numbers its validated parameters."""
    def tensor(scale=1.0, offset=0.0):
        t = torch.randn(shape, generator=gen) * scale + offset
        return relayout(t.to(dtype).to(device), layout)
    cond, uncond = tensor(3.0, 0.5), tensor()
    return [("cfg_rescale", (cond, uncond, 5.0, 0.7)),
            ("dynamic_threshold", (tensor(2.0), 0.995, 2.5)),       # some samples clamp at 2.5, some at s
            ("error_norm", (cond, uncond, tensor(), 1e-2, 1e-3)),
            ("per_sample_norm", (cond,))]


def check_reductions(backend, device) -> List[CheckResult]:
    tol = TOLERANCES["reduction"]
    out = []
    for op in REDUCTION_OPS:
        oracle = getattr(reductions_oracle, op)
        for dtype in MODEL_DTYPES:
            why = _why_not(backend, op, dtype, device)
            if why:
                out.append(CheckResult(op, backend.name, _dtype(dtype), NA, detail=why))
                continue
            worst = _Worst(str(tol))
            for layout in ("contiguous", "strided"):
                for shape in REDUCTION_SHAPES:
                    gen = _seed(op, layout, str(dtype), shape)
                    args = dict(_reduction_cases(gen, shape, dtype, device, layout))[op]
                    where = f"{layout} {_shape(shape)}"
                    got = _run(worst, where, getattr(backend, op), *args)
                    if got is _RAISED:
                        continue
                    want = oracle(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
                    worst.add(where, *compare(got, want, tol))
            out.append(worst.result(op, backend.name, f"{_dtype(dtype)}; sizes {', '.join(map(_shape, REDUCTION_SHAPES))};"
                                    " contiguous, strided"))
    return out


def _why_not(backend, op: str, dtype: torch.dtype, device, state_dtype=None) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``dtype`` on ``device`` (None: it can)."""
    if not hasattr(backend, op):
        return f"the {backend.name} backend does not implement {op}"
    probe = [torch.empty(0, dtype=dtype, device=device)]
    return "; ".join(backend.not_supported_reasons(op, probe, state_dtype)) or None


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def kernel_backends() -> Dict[str, object]:
    """Every registered backend but the reference (the oracle itself)."""
    from .ops.backends import BACKENDS
    return {name: b for name, b in BACKENDS.items() if name != "reference"}


def device_for(backend) -> Optional[str]:
    """The device to check ``backend`` on: a CUDA GPU if it serves one and one is here, else the
    CPU if it serves that (triton does only under TRITON_INTERPRET=1), else None."""
    if torch.cuda.is_available() and backend.serves("cuda"):
        return "cuda"
    return "cpu" if backend.serves("cpu") else None


OP_GROUPS = ("fused_step", "cfg_combine", "philox", "reductions")


def check_backend(backend, *, device: Optional[str] = None, large: bool = True,
                  groups: Sequence[str] = OP_GROUPS,
                  progress: Callable[[str], None] = lambda what: None) -> List[CheckResult]:
    """The checks of ``groups`` (default: all of OP_GROUPS) on one backend object (anything with
    the Backend interface). ``large`` adds the 1000003-element fused_step cases; ``progress`` is
    called after each group."""
    runners = {"fused_step": lambda: check_fused_step(backend, device, large=large),
               "cfg_combine": lambda: check_cfg_combine(backend, device),
               "philox": lambda: check_philox(backend, device),
               "reductions": lambda: check_reductions(backend, device)}
    why = backend.unavailable_reason()
    device = device or device_for(backend)
    if why is None and device is None:
        why = "it serves no device on this machine"
    if why:
        return [CheckResult("all", backend.name, "", SKIPPED, detail=why)]
    out = []
    for group in groups:
        out += _guarded(group, backend, runners[group])
        progress(f"{backend.name}: {group}")
    return out


def _guarded(op: str, backend, run: Callable[[], List[CheckResult]]) -> List[CheckResult]:
    """A kernel that raises fails its check (with the error) instead of ending the run."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - any exception from a kernel is a failed check
        return [CheckResult(op, backend.name, "", FAIL, detail=f"raised {type(e).__name__}: {e}")]


def run_checks(backends: Optional[Sequence[str]] = None, *, groups: Optional[Sequence[str]] = None,
               large: bool = True, progress: Callable[[str], None] = lambda what: None) -> List[CheckResult]:
    """Check the named backends (default: every registered kernel backend) on the op groups
    ``groups`` (default: all of OP_GROUPS). Unknown names raise ValueError listing the known ones."""
    known = kernel_backends()
    names = list(known) if backends is None else list(backends)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(map(repr, unknown))}; expected some of "
                         f"{', '.join(known)} (the reference backend is the oracle)")
    groups = list(OP_GROUPS) if groups is None else list(groups)
    bad = [g for g in groups if g not in OP_GROUPS]
    if bad or not groups:
        raise ValueError(f"unknown op group(s) {bad or groups}; expected some of {', '.join(OP_GROUPS)}")
    out = []
    for name in names:
        out += check_backend(known[name], large=large, groups=groups, progress=progress)
    return out


def render_table(results: Sequence[CheckResult]) -> str:
    """A markdown table: op, backend, cases, max error, tolerance, error/tolerance, result."""
    lines = ["| op | backend | cases | max error | tolerance | max error / tolerance | result |",
             "|---|---|---|---:|---|---:|---|"]
    for r in results:
        ratio = "" if r.worst is None else ("inf" if math.isinf(r.worst) else f"{r.worst:.2g}")
        case = r.case if r.status in (PASS, FAIL) or not r.detail else f"{r.case} ({r.detail})".strip()
        lines.append(f"| {r.op} | {r.backend} | {case} | {r.error} | {r.tolerance} | {ratio} | {r.status} |")
    return "\n".join(lines)
