"""Numerical parity of every kernel on every backend that can run here, against the reference oracles.

``fastdiff check`` runs this and exits with status 1 if anything fails, so it can gate a CI job.
The oracles are those of fastdiff.reference (step, philox, reductions), called directly (never through dispatch, so a broken backend cannot
judge itself). Each kernel backend in fastdiff.ops.BACKENDS is checked on the device it serves
here (cpu; triton on a CUDA GPU or under TRITON_INTERPRET=1; cuda where it is built); one that
cannot run is listed as skipped with its reason, and an op a backend does not implement is "n/a".

What is compared:

* fused_step: six row kinds (ROW_KINDS) x model dtypes float32/float16/bfloat16 x odd sizes, and
  non-contiguous inputs (channels-last, strided views into NaN-padded storage). Every in-place
  output (x, y, every history slot, the model input, the non-finite flag) is compared; outputs are
  allocated NaN-filled, so an element the kernel fails to write, or a read outside a view, shows up;
  read-only inputs (table, model outputs, noise) must come back bit-identical.
* cfg_combine: both CFG halves or cond only, the same dtypes, contiguous and strided.
* philox: the raw 32-bit words bit-equal; the Gaussian normals within PHILOX_ULPS ulp.
* reductions: cfg_rescale, dynamic_threshold, error_norm, per_sample_norm.

Tolerances are stated once, here (TOLERANCES, PHILOX_ULPS); they are those of the test suite.
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
from .program.layout import COL_G, COL_G0, COL_G1, table_width

__all__ = ["Tolerance", "TOLERANCES", "PHILOX_ULPS", "CheckResult", "kernel_backends", "device_for",
           "check_backend", "run_checks", "render_table", "failed"]


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
    "reduction": Tolerance(0.0, 1e-5, normwise=True),
}
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


def _compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> Tuple[float, float, str]:
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
    same = (g == w) | (g.isnan() & w.isnan())
    d = torch.where(same, torch.zeros_like(g), (g - w).abs())
    d = torch.where(d.isnan(), torch.full_like(d, math.inf), d)
    ratio = torch.where(d == 0, torch.zeros_like(d), d / tol.allowed(w))   # 0/0 (exact zeros) is no error
    return d.max().item(), ratio.max().item(), ""


_RAISED = object()


def _run(worst: "_Worst", where: str, fn: Callable, *args):
    """fn(*args), or _RAISED after recording the exception as this case's failure (a kernel that
    raises fails its case; the other cases still run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any exception from a kernel is a failed check
        worst.add(where, math.inf, math.inf, f"raised {type(e).__name__}: {e}")
        return _RAISED


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
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
LAYOUTS = ("channels_last", "strided")


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout; ``strided``: every other element of NaN-padded
    storage, so reading the view as if it were contiguous returns NaN."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":        # dense but not contiguous
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.contiguous()
    if layout == "strided":
        big = torch.full(tuple(t.shape[:-1]) + (2 * t.shape[-1] + 3,), float("nan"), dtype=t.dtype, device=t.device)
        view = big[..., 1:2 * t.shape[-1] + 1:2]
        view.copy_(t)
        return view
    raise ValueError(f"unknown layout {layout!r}; expected 'contiguous' or one of {LAYOUTS}")


def _clone(t):
    """A copy with the same shape, strides and storage offset (the storage around it NaN)."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t.clone()   # dense: clone keeps the strides
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
# fused_step
# ---------------------------------------------------------------------------------------------
STEP_ARGS = ("table", "row", "x", "y", "cond", "uncond", "hist", "hist_write", "eval_y", "write_x", "write_y",
             "noise", "seed", "noise_id", "model_in", "model_in_from_y", "bad_row", "guidance")   # the backend's order
STEP_OUTPUTS = ("x", "y", "hist", "model_in")
STEP_INPUTS = ("table", "cond", "uncond", "noise", "guidance")


@dataclass(frozen=True)
class RowKind:
    """A kind of coefficient-program row, as the solvers emit them (see fastdiff.program)."""

    label: str
    K: int                       # history slots
    model: str                   # "none", "cond" or "cfg"
    noise: str = "none"          # "none", "given" (a tensor) or "philox" (drawn in the kernel)
    write_y: bool = False
    eval_y: bool = False
    hist_write: int = -1
    model_in: str = "none"       # "none", "B" or "2B" (both CFG halves)
    model_in_from_y: bool = False
    nonfinite: bool = False      # a NaN in the model output: the kernel must raise the flag
    guidance: bool = False       # a per-sample guidance scale vector (g = g0 + g1 * s[b])


ROW_KINDS = (
    RowKind("model output, no CFG (DDIM/Euler)", K=0, model="cond", model_in="B"),
    RowKind("CFG + history write (multistep)", K=1, model="cfg", hist_write=0, model_in="2B"),
    RowKind("CFG + Philox noise (ancestral/SDE)", K=1, model="cfg", noise="philox", hist_write=0, model_in="2B"),
    RowKind("x and y at y, 3 slots, given noise (multi-stage)", K=3, model="cfg", noise="given", write_y=True,
            eval_y=True, hist_write=2, model_in="2B", model_in_from_y=True),
    RowKind("no model, history combination", K=2, model="none", noise="given"),
    RowKind("non-finite flag (NaN in the model output)", K=1, model="cfg", hist_write=0),
    RowKind("per-sample CFG scales + CFG++ terms", K=1, model="cfg", hist_write=0, model_in="2B", guidance=True),
)
MULTI_STAGE = ROW_KINDS[3]       # the row that touches every buffer: used for the layouts
# Odd sizes; 2x4x67x65 (34840 elements) is above the C++ kernels' serial threshold (32768), so the
# OpenMP path runs too. The large size runs with float32 model outputs only (it is what costs time).
STEP_SHAPES = ((1,), (7,), (2, 3, 5, 7), (2, 4, 67, 65))
LARGE_SHAPE = (1000003,)
LAYOUT_SHAPES = ((2, 3, 5, 7), (2, 4, 16, 24))


def _step_case(kind: RowKind, shape, model_dtype, device, gen: torch.Generator, layout="contiguous") -> dict:
    """Random, valid arguments of one fused_step call (the names of STEP_ARGS)."""
    def tensor(s, dtype=torch.float32):
        return _relayout(torch.randn(s, generator=gen).to(dtype).to(device), layout)

    table = torch.randn(3, table_width(kind.K), dtype=torch.float64, generator=gen)
    table[:, COL_G] = 1.0 + 7.0 * torch.rand(3, dtype=torch.float64, generator=gen)   # the CFG scale g
    a = dict(table=table.to(device), row=1, x=tensor(shape), y=None, cond=None, uncond=None, hist=None,
             hist_write=kind.hist_write, eval_y=kind.eval_y, write_x=True, write_y=kind.write_y, noise=None,
             seed=2 ** 40 + 1234, noise_id=-1, model_in=None, model_in_from_y=kind.model_in_from_y,
             bad_row=torch.zeros(1, dtype=torch.int32, device=device), guidance=None)
    if kind.guidance:   # one scale per sample, the first exactly 1 (D = cond); g = 0 + 1 * s[b]
        table[:, COL_G0], table[:, COL_G1] = 0.0, 1.0
        a["table"] = table.to(device)
        s = 1.0 + 7.0 * torch.rand(shape[0], dtype=torch.float64, generator=gen)
        s[0] = 1.0
        a["guidance"] = s.to(device)
    if kind.eval_y or kind.write_y:
        a["y"] = tensor(shape)
    if kind.model != "none":
        a["cond"] = tensor(shape, model_dtype)
        if kind.model == "cfg":
            a["uncond"] = tensor(shape, model_dtype)
        if kind.nonfinite:
            a["cond"][tuple(s - 1 for s in shape)] = float("nan")
    if kind.K:
        a["hist"] = tensor((kind.K,) + tuple(shape))
    if kind.noise == "given":
        a["noise"] = tensor(shape, model_dtype)
    elif kind.noise == "philox":
        a["noise_id"] = 3
    if kind.model_in != "none":
        rows = shape[0] * (2 if kind.model_in == "2B" else 1)
        a["model_in"] = _relayout(torch.full((rows,) + tuple(shape[1:]), float("nan"), dtype=model_dtype,
                                             device=device), layout)
    return a


def _check_step_case(backend, a: dict, where: str, worst: _Worst) -> None:
    """Run one case on the backend and on the oracle; fold the comparison into ``worst``."""
    got = {k: _clone(v) for k, v in a.items()}
    want = {k: (_clone(v).cpu() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    if _run(worst, where, backend.fused_step, *[got[k] for k in STEP_ARGS]) is _RAISED:
        return
    reference_oracle.fused_step(*[want[k] for k in STEP_ARGS])
    for name in STEP_INPUTS:
        if a[name] is not None and not _bit_equal(got[name], a[name]):
            worst.add(where, math.inf, math.inf, f"modified the read-only input {name}")
    if not torch.equal(got["bad_row"].cpu(), want["bad_row"]):
        worst.add(where, math.inf, math.inf,
                  f"non-finite flag is {got['bad_row'].item()}, expected {want['bad_row'].item()}")
    for name in STEP_OUTPUTS:
        if a[name] is not None:
            tol = TOLERANCES[a[name].dtype] if name == "model_in" else TOLERANCES["state"]
            worst.add(f"{where} {name}", *_compare(got[name], want[name], tol), tolerance=str(tol))


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
                case = _step_case(kind, shape, dtype, device, _seed(kind.label, str(dtype), shape))
                _check_step_case(backend, case, _shape(shape), worst)
            out.append(worst.result("fused_step", backend.name,
                                    f"{kind.label}; {_dtype(dtype)}; sizes {', '.join(map(_shape, shapes))}"))
    for dtype in MODEL_DTYPES:
        if _why_not(backend, "fused_step", dtype, device, state_dtype=torch.float32):
            continue   # reported n/a above
        worst = _Worst(tol_text)
        for layout in LAYOUTS:
            for shape in LAYOUT_SHAPES:
                case = _step_case(MULTI_STAGE, shape, dtype, device, _seed(layout, str(dtype), shape), layout)
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
                cond = _relayout(torch.randn(shape, generator=gen).to(dtype).to(device), layout)
                uncond = _relayout(torch.randn(shape, generator=gen).to(dtype).to(device), layout)
                for u in (uncond, None):
                    where = f"{layout} {_shape(shape)}" + ("" if u is not None else " cond only")
                    got = _run(worst, where, backend.cfg_combine, cond, u, CFG_SCALE)
                    if got is _RAISED:
                        continue
                    want = reference_oracle.cfg_combine(cond.cpu(), None if u is None else u.cpu(), CFG_SCALE)
                    worst.add(where, *_compare(got, want, TOLERANCES[dtype]))
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
            u = _ulps(got, want)
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
        return _relayout(t.to(dtype).to(device), layout)
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
                    worst.add(where, *_compare(got, want, tol))
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
