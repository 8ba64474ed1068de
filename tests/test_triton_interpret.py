"""The Triton kernels, run on the CPU by the Triton interpreter, against the reference oracles.

Triton decides between compiler and interpreter when each ``@triton.jit`` runs, including
triton's own library functions at ``import triton``, so the cases need a process that had
TRITON_INTERPRET=1 from its start. In a normal run, ``test_cases_under_the_interpreter`` runs
this file again in such a subprocess (and the cases here are skipped); to run them directly:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpret.py -q

fastdiff check's cases (the shared harness of fastdiff.check: row kinds x dtypes x odd sizes x
layouts, its tolerances) run here too, one test per op group, besides the Triton-specific cases.

Tolerances of the Triton-specific cases (tighter than the harness's): float32 and float16 results
equal the reference bit for bit (the kernels keep its order of operations and never contract into
FMA); bfloat16 results may differ
by 1 bf16 ulp (the interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest);
Philox words are bit-equal; Philox normals are within PHILOX_ULPS (fastdiff.check) of the
reference (whose log/sin/cos come from libm; ours are the Cephes polynomials of csrc/step_math.h)
and bit-equal to the C++ backend; attention's error against a float64 oracle is at most twice torch SDPA's error
in the same dtype (flash-attention's rule), plus one output ulp for the bf16 truncation.

Each interpreted program instance costs ~1 ms plus ~50 ms per 1024 Philox draws, so the shapes
are small but always span several programs, odd sizes included.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fastdiff.check import EXACT, PHILOX_ULPS, assert_within, clone_keep_layout

pytest.importorskip("triton")

pytestmark = pytest.mark.triton
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in test_cases_under_the_interpreter's "
                                                            "TRITON_INTERPRET=1 subprocess")


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the runner")
def test_cases_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                        "-W", "ignore::DeprecationWarning"],
                       env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"interpreter cases failed:\n{r.stdout[-12000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout, r.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# helpers

def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in ulps of their (common) float dtype, via the monotone integer image of the bits."""
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    bits = 8 * a.element_size()

    def ordered(t):
        i = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)
    return (ordered(a) - ordered(b)).abs()


def assert_same(name, got, want, dtype_ulps=0):
    """Bit-equal (fastdiff.check's EXACT; NaN == NaN), or within ``dtype_ulps`` ulps of the dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if dtype_ulps == 0:
        assert_within(got, want, EXACT, name)
    else:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        d = ulps(got, want)
        assert d.max().item() <= dtype_ulps, f"{name}: {d.max().item()} ulps apart"


def nan_padded(shape, dtype, *, layout="contiguous", fill=None, gen=None):
    """A tensor of ``shape`` whose storage around/between its elements is NaN, so any read outside
    the view shows up as NaN in the result. layout: contiguous | batch_strided | channels_last |
    transposed."""
    values = torch.randn(shape, generator=gen) if fill is None else torch.full(shape, fill)
    values = values.to(dtype)
    if layout == "contiguous":
        buf = torch.full((values.numel() + 7,), float("nan"), dtype=dtype)
        t = buf[3:3 + values.numel()].view(shape)
    elif layout == "batch_strided":
        buf = torch.full((shape[0], 2) + tuple(shape[1:]), float("nan"), dtype=dtype)
        t = buf[:, 1]
    elif layout == "channels_last":
        t = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        t = torch.full(tuple(reversed(shape)), float("nan"), dtype=dtype).permute(*reversed(range(len(shape))))
    else:
        raise ValueError(layout)
    t.copy_(values)
    return t


# ---------------------------------------------------------------------------------------------
# Philox

@interpreted
@pytest.mark.parametrize("numel,seed,noise_id", [(1, 0, 0), (1029, 2 ** 64 - 1, 2 ** 32 - 1),
                                                 (4101, 0x0123456789ABCDEF, 7)])
def test_philox_words_bit_equal(numel, seed, noise_id):
    from fastdiff.kernels.philox import philox_uint32
    from fastdiff.reference.philox import philox_uint32 as reference
    got = philox_uint32(numel, seed, noise_id, "cpu")
    assert torch.equal(got, reference(numel, seed, noise_id))


@interpreted
@pytest.mark.parametrize("first_group", [2 ** 32 - 300, 2 ** 40 + 5])
def test_philox_words_high_counter_word(first_group):
    """Groups past 2**32 carry into the counter's second word."""
    from fastdiff.kernels.philox import philox_uint32
    from fastdiff.reference.philox import MASK32, philox4x32_10
    seed, noise_id = 2 ** 45 + 17, 6
    got = philox_uint32(4 * 600, seed, noise_id, "cpu", first_group=first_group)
    g = torch.arange(first_group, first_group + 600, dtype=torch.int64)
    want = torch.stack(philox4x32_10(g & MASK32, g >> 32, torch.full_like(g, noise_id), torch.zeros_like(g),
                                     seed & MASK32, seed >> 32), dim=1)
    assert torch.equal(got, want)


@interpreted
@pytest.mark.parametrize("shape,seed,noise_id", [((3,), 5, 0), ((2, 3, 29, 31), 2 ** 63 + 11, 4)])
def test_philox_normals(shape, seed, noise_id):
    from fastdiff.kernels.philox import philox_normal
    from fastdiff.reference.philox import philox_normal as reference
    got = philox_normal(shape, seed, noise_id, "cpu")
    want = reference(shape, seed, noise_id)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ulps(got, want).max().item() <= PHILOX_ULPS
    try:
        import fastdiff._C as C
    except ImportError:
        return
    assert torch.equal(got, C.philox_normal(list(shape), seed, noise_id)), "differs from the C++ backend"


# ---------------------------------------------------------------------------------------------
# fused step

def _step_case(*, shape=(2, 3, 13, 17), K=2, model=torch.float16, cfg=True, has_cond=True, noise="philox",
               hist_writes=0b10, eval_y=False, write_x=True, write_y=False, model_in_halves=2, from_y=False,
               bad_row=True, layout="contiguous", seed=7, guidance=None):
    """Arguments of fastdiff.ops.fused_step (a fresh set per call), every coefficient random and
    non-zero so each term of the formula shows."""
    from fastdiff.program import table_width
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]
    table = torch.rand(4, table_width(K), generator=gen, dtype=torch.float64) + 0.25
    lay = layout if len(shape) == 4 or layout in ("contiguous", "batch_strided") else "contiguous"
    x = nan_padded(shape, torch.float32, layout=lay, gen=gen)
    y = nan_padded(shape, torch.float32, layout=lay, gen=gen) if (eval_y or write_y or from_y) else None
    cond = uncond = None
    if has_cond:
        both = torch.randn((2 * B,) + shape[1:], generator=gen).to(model)   # one batched model call
        cond = both[B:] if layout == "contiguous" else nan_padded(shape, model, layout=lay, gen=gen)
        if cfg:
            uncond = both[:B] if layout == "contiguous" else nan_padded(shape, model, layout=lay, gen=gen)
    hist = torch.randn((K,) + shape, generator=gen) if K else None
    if hist is not None and layout == "batch_strided":      # every other sample of a NaN-padded stack
        buf = torch.full((K, 2 * B) + tuple(shape[1:]), float("nan"))
        buf[:, ::2] = hist
        hist = buf[:, ::2]
    elif hist is not None and layout != "contiguous":
        hist = torch.randn(shape + (K,), generator=gen).permute(len(shape), *range(len(shape)))
    noise_t = nan_padded(shape, model, layout=lay, gen=gen) if noise == "tensor" else None
    model_in = None
    if model_in_halves:
        model_in = torch.full((model_in_halves * B,) + shape[1:], float("nan"), dtype=model)
        if layout != "contiguous" and len(shape) == 4:
            model_in = model_in.contiguous(memory_format=torch.channels_last)
    if guidance is not None:   # per-sample scales (one of them 1: D = cond); g = g0 + g1 * s[b]
        from fastdiff.program import COL_G0, COL_G1
        guidance = torch.tensor(([1.0, 3.0, 7.5] * B)[:B], dtype=guidance)
        table[:, COL_G0], table[:, COL_G1] = 0.0, 1.0
    return dict(table=table, row=2, x=x, y=y, cond=cond, uncond=uncond, hist=hist, hist_writes=hist_writes,
                eval_y=eval_y, write_x=write_x, write_y=write_y, noise=noise_t, seed=2 ** 40 + 3,
                noise_id=5 if noise == "philox" else -1, model_in=model_in, model_in_from_y=from_y,
                bad_row=torch.zeros(1, dtype=torch.int32) if bad_row else None, guidance=guidance)


def _clone(args):
    """Copies keeping each tensor's strides and offset, the storage around them NaN (fastdiff.check's);
    cond and uncond stay the two halves of one batched model output, as the sampler passes them."""
    return {k: (clone_keep_layout(v) if k not in ("cond", "uncond") else v) for k, v in args.items()}


def _run_both(args):
    """(reference result, triton result) on identical copies; the read-only inputs must survive."""
    from fastdiff import ops
    import fastdiff.ops.triton_backend  # noqa: F401  (registers the backend)
    want, got = _clone(args), _clone(args)
    if args["noise_id"] >= 0:
        # In-kernel Philox is tested bit for bit by feeding the reference the kernels' own draw
        # (the draws themselves are compared with the reference's in test_philox_normals).
        from fastdiff.kernels.philox import philox_normal
        want["noise"] = philox_normal(tuple(args["x"].shape), args["seed"], args["noise_id"], "cpu")
    inputs_before = {k: args[k].clone() for k in ("cond", "uncond", "noise", "guidance") if args.get(k) is not None}
    ops.fused_step(**want, backend="reference")
    ops.fused_step(**got, backend="triton")
    for k, v in inputs_before.items():
        assert torch.equal(args[k], v) or torch.equal(torch.isnan(args[k]), torch.isnan(v)), f"{k} was modified"
    return want, got


def _compare(want, got, model):
    for name in ("x", "y", "hist", "bad_row"):
        if want[name] is not None:
            assert_same(name, got[name], want[name])
    if want["model_in"] is not None:
        assert_same("model_in", got["model_in"], want["model_in"], dtype_ulps=1 if model == torch.bfloat16 else 0)


@interpreted
@pytest.mark.parametrize("model", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_step_cfg_history_philox(model):
    """The DPM-Solver++(2M)+CFG row as the sampler runs it: both CFG halves of the model output,
    two history slots, Philox noise, the next model input into both halves, the bad_row flag."""
    args = _step_case(model=model)
    _compare(*_run_both(args), model)


@interpreted
@pytest.mark.parametrize("case", [
    dict(K=0, hist_writes=0, cfg=False, noise="none", model_in_halves=1, shape=(1,)),
    dict(K=1, hist_writes=0b1, noise="tensor", eval_y=True, write_y=True, model_in_halves=1, from_y=True,
         shape=(7,)),
    dict(K=3, hist_writes=0b100, has_cond=False, noise="none", write_x=False, write_y=True, model_in_halves=0,
         shape=(3, 1031)),
    dict(K=1, hist_writes=0, noise="philox", eval_y=True, write_y=True, bad_row=False, shape=(2, 5, 11, 1)),
], ids=["K0-no-cfg-1-element", "y-rows-noise-tensor-7", "no-model-y-only-K3", "philox-eval-y-odd"])
def test_fused_step_row_kinds(case):
    model = torch.float16
    args = _step_case(model=model, **case)
    _compare(*_run_both(args), model)


@interpreted
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 13, 17), (3, 5)])
def test_fused_step_per_sample_guidance(gdtype, shape):
    """A per-sample scale vector (1, 3, 7.5): each sample's g from its own scale, bitwise."""
    model = torch.float32
    args = _step_case(model=model, shape=shape, guidance=gdtype, noise="tensor", write_y=True, eval_y=True)
    _compare(*_run_both(args), model)


@interpreted
@pytest.mark.parametrize("layout", ["batch_strided", "channels_last", "transposed"])
def test_fused_step_strided(layout):
    """Batch slices are read in place; other layouts go through a dense copy (written back). The
    storage around every view is NaN, so a read outside a view would poison the result."""
    model = torch.float32
    args = _step_case(model=model, layout=layout, noise="tensor", eval_y=True, write_y=True, shape=(2, 3, 9, 7))
    want, got = _run_both(args)
    _compare(want, got, model)
    assert got["bad_row"].item() == 0


@interpreted
def test_fused_step_strided_table():
    """The coefficient table is read through its strides (a column-major copy here)."""
    model = torch.float16
    args = _step_case(model=model, noise="none")
    args["table"] = args["table"].t().contiguous().t()
    _compare(*_run_both(args), model)


@interpreted
def test_fused_step_bad_row_first_wins():
    from fastdiff import ops
    args = _step_case(model=torch.float32, noise="none", shape=(2, 2100))
    both = torch.randn(4, 2100)
    both[3, 7] = float("nan")          # cond, sample 1: far from the first program
    both[2, 2099] = float("inf")
    args["cond"], args["uncond"] = both[2:], both[:2]
    ops.fused_step(**args, backend="triton")
    assert args["bad_row"].item() == args["row"] + 1
    args["row"] = 3
    ops.fused_step(**args, backend="triton")   # a later bad row does not overwrite the first
    assert args["bad_row"].item() == 3


@interpreted
def test_fused_step_bad_input_changes_nothing():
    from fastdiff import ops
    args = _step_case(model=torch.float32, noise="none", model_in_halves=1, eval_y=True)
    args.update(model_in_from_y=True, write_y=False)
    before = _clone(args)
    with pytest.raises(ValueError, match="model_in_from_y needs a row that writes y"):
        ops.fused_step(**args, backend="triton")
    for k in ("x", "y", "hist", "model_in", "bad_row"):
        assert torch.equal(args[k].nan_to_num(), before[k].nan_to_num()), k
    state64 = _step_case(model=torch.float32, noise="none", K=0, hist_writes=0, model_in_halves=0)
    state64["x"] = state64["x"].double()
    with pytest.raises(RuntimeError, match="keeps the solver state in float32, got torch.float64"):
        ops.fused_step(**state64, backend="triton")


@interpreted
def test_fused_step_rejects_unknown_flag_bits():
    """The launcher takes the row flags as one bitmask (the kernel's FLAGS constexpr): bits that no
    flag names raise a ValueError naming them, before anything is launched or written."""
    from fastdiff.check import assert_rejects_unknown_flags, step_case
    from fastdiff.kernels import fused_step as triton_step
    case = step_case(torch.Generator().manual_seed(3), (2, 3, 5), K=1, model="cfg", noise="given", writes="xy",
                     model_in="2B")
    assert_rejects_unknown_flags(triton_step.fused_step, case)


def _bit_equal(a, b):
    """Same shape, dtype and bytes (NaN payloads and the sign of zero included)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def _leave_out_slot(table, K, slot):
    """Zero the coefficient of history slot ``slot`` in every out block (x, y, every slot's): no
    output of a row reads the slot then."""
    from fastdiff.program.layout import OUT_FIXED, col_out_slot, col_out_x, col_out_y
    for base in [col_out_x(K), col_out_y(K)] + [col_out_slot(K, j) for j in range(K)]:
        table[:, base + OUT_FIXED + slot] = 0.0


@interpreted
@pytest.mark.parametrize("K, hist_writes", [(1, 0), (1, 0b1), (2, 0b01), (2, 0b10), (2, 0b11), (3, 0b100),
                                            (3, 0b101), (3, 0b111)])
def test_fused_step_writes_every_slot_of_the_mask(K, hist_writes):
    """Masks writing 0, 1, 2 and all K slots in one pass, with x and y: each written slot gets the
    value of its own out block, the others keep theirs, bitwise. Every coefficient is non-zero, so
    every output reads every slot, the written ones included: a store before the row's last read
    (or a slot written from another slot's block) shows as a difference."""
    model = torch.float16
    args = _step_case(model=model, K=K, hist_writes=hist_writes, eval_y=True, write_y=True)
    want, got = _run_both(args)
    _compare(want, got, model)
    for j in range(K):
        assert _bit_equal(got["hist"][j], args["hist"][j]) != bool(hist_writes >> j & 1), f"slot {j}"
    if hist_writes == (1 << K) - 1 and K > 1:    # each slot from its own block: all written values differ
        assert not torch.equal(got["hist"][0], got["hist"][1])


@interpreted
@pytest.mark.parametrize("layout", ["batch_strided", "channels_last", "transposed"])
def test_fused_step_writes_two_slots_strided(layout):
    """Two slots written in one pass through a history stack read in place (every other sample of
    a NaN-padded stack) or through the dense copy that is written back (slots last in memory)."""
    model = torch.float32
    args = _step_case(model=model, K=3, hist_writes=0b101, layout=layout, noise="tensor", eval_y=True,
                      write_y=True, shape=(2, 3, 9, 7))
    want, got = _run_both(args)
    _compare(want, got, model)
    assert _bit_equal(got["hist"][1], args["hist"][1])


@interpreted
@pytest.mark.parametrize("K, slot, hist_writes, fill", [
    (1, 0, 0b1, float("nan")),     # the drop-in schedulers' write-only slot (pred_original_sample)
    (2, 1, 0b11, float("nan")),    # a write-only slot beside a slot read and written
    (2, 1, 0b01, float("inf")),    # neither read nor written: stays as it was
    (3, 0, 0b001, float("-inf")),
], ids=["K1-write-only", "K2-write-only-and-read-write", "K2-untouched-inf", "K3-write-only-slot0"])
def test_fused_step_unread_slot_may_hold_garbage(K, slot, hist_writes, fill):
    """A history slot whose coefficient is zero in every out block is absent, not 0 * H: filled with
    NaN/inf, it leaves x, y, the other slots and the model input finite and bit-equal to the
    reference (bad_row stays 0), and a row may write it."""
    model = torch.float16
    args = _step_case(model=model, K=K, hist_writes=hist_writes, eval_y=True, write_y=True)
    _leave_out_slot(args["table"], K, slot)
    args["hist"][slot].fill_(fill)
    want, got = _run_both(args)
    _compare(want, got, model)
    assert got["bad_row"].item() == 0
    for name in ("x", "y", "model_in"):
        assert torch.isfinite(got[name]).all(), name
    written = bool(hist_writes >> slot & 1)
    assert torch.isfinite(got["hist"][slot]).all() == written
    assert torch.isfinite(got["hist"][[j for j in range(K) if j != slot]]).all()


@interpreted
def test_fused_step_zero_history_coefficient_keeps_negative_zero():
    """o + 0 * H would turn a -0 output into +0: with the term absent, -0 stays -0 (as in the
    reference), in x and in the written slot."""
    from fastdiff.program.layout import OUT_H, OUT_HU, OUT_X, OUT_Y, col_out_slot, col_out_x
    model = torch.float32
    args = _step_case(model=model, K=1, hist_writes=0b1, has_cond=False, noise="none", model_in_halves=0,
                      shape=(3, 701))
    table = torch.zeros_like(args["table"])
    for base in (col_out_x(1), col_out_slot(1, 0)):   # -0 + -0 + (-1)(+0) + (-1)(+0) = -0, slot term 0
        table[:, base + OUT_X] = table[:, base + OUT_Y] = 1.0
        table[:, base + OUT_H] = table[:, base + OUT_HU] = -1.0
    args["table"] = table
    args["x"].fill_(-0.0)
    args["hist"].fill_(1.0)
    want, got = _run_both(args)
    _compare(want, got, model)
    assert torch.signbit(want["x"]).all() and torch.signbit(want["hist"]).all()   # the case shows -0
    assert _bit_equal(got["x"], want["x"]) and _bit_equal(got["hist"], want["hist"])


@interpreted
@pytest.mark.parametrize("K, mask", [(0, 1), (1, 0b10), (2, -1), (3, 1 << 3), (3, 1 << 40)])
def test_fused_step_rejects_bad_hist_writes_before_writing(K, mask):
    """A mask naming a slot outside [0, K) (or negative) raises layout.hist_writes_error's ValueError
    from the launcher itself, before anything is launched or written."""
    import re
    from fastdiff.check import STEP_ARGS, clone_case, step_case
    from fastdiff.kernels import fused_step as triton_step
    from fastdiff.program.layout import hist_writes_error
    case = step_case(torch.Generator().manual_seed(5), (2, 3, 5), K=K, model="cfg", noise="given", writes="xy",
                     model_in="2B")
    case["hist_writes"] = mask
    c = clone_case(case)
    with pytest.raises(ValueError, match=re.escape(hist_writes_error(mask, K))):
        triton_step.fused_step(*[c[k] for k in STEP_ARGS])
    changed = [k for k, v in case.items() if isinstance(v, torch.Tensor) and not _bit_equal(c[k], v)]
    assert not changed, f"rejected, but wrote {changed}"


@interpreted
def test_sampler_runs_on_triton_as_on_reference():
    """A whole DPM-Solver++(2M) + CFG run through the sampler: same samples on both backends."""
    import fastdiff
    import fastdiff.ops.triton_backend  # noqa: F401
    from fastdiff.models import GaussianMixture
    from fastdiff.schedules import DiscreteVP

    schedule = DiscreteVP()
    mixture = GaussianMixture.default(schedule, dim=3, prediction="epsilon")

    def model(x, t, shift):   # CFG: the two halves differ by a shift of the input
        return mixture(x + shift.reshape(-1, 1), t)

    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    sampler = fastdiff.Sampler.build(solver="dpmpp_2m", steps=6, schedule=schedule, prediction="epsilon",
                                     guidance=3.0)
    kw = dict(cond={"shift": torch.full((5,), 0.1)}, uncond={"shift": torch.zeros(5)}, progress=False, seed=1)
    want = sampler(model, noise, backend="reference", **kw)
    got = sampler(model, noise, backend="triton", **kw)
    assert torch.equal(got, want)


@interpreted
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_cfg_pp"])
def test_batch_of_per_sample_scales_equals_separate_runs(solver):
    """guidance = (1, 3, 7.5) per sample: the batch equals three separate runs bit for bit, and
    the reference backend's batch."""
    import fastdiff
    import fastdiff.ops.triton_backend  # noqa: F401
    from fastdiff.schedules import DiscreteVP

    def model(x, t, label):   # elementwise: a sample's output does not depend on its batch
        lab = label.reshape(-1, 1)
        return torch.tanh(0.7 * x + t.reshape(-1, 1) / 1000.0) * (0.6 + 0.3 * lab) + 0.2 * lab * torch.sin(3.0 * x)

    scales = (1.0, 3.0, 7.5)
    noise = torch.randn(3, 37, generator=torch.Generator().manual_seed(0))

    def run(guidance, idx, backend="triton"):
        s = fastdiff.Sampler.build(solver=solver, steps=4, schedule=DiscreteVP(), prediction="epsilon",
                                   guidance=guidance)
        n = len(idx)
        return s(model, noise[idx].clone(), cond={"label": torch.ones(n)}, uncond={"label": torch.zeros(n)},
                 progress=False, backend=backend)

    batch = run(torch.tensor(scales), [0, 1, 2])
    assert torch.equal(batch, run(torch.tensor(scales), [0, 1, 2], backend="reference"))
    for b, sc in enumerate(scales):
        assert torch.equal(batch[b:b + 1], run(sc, [b])), f"sample {b} (scale {sc})"


# ---------------------------------------------------------------------------------------------
# CFG combine

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cfg_combine(dtype, layout):
    from fastdiff import ops
    import fastdiff.ops.triton_backend  # noqa: F401
    gen = torch.Generator().manual_seed(1)
    cond = nan_padded((3, 4, 9, 37), dtype, layout=layout, gen=gen)
    uncond = nan_padded((3, 4, 9, 37), dtype, layout=layout, gen=gen)
    got = ops.cfg_combine(cond, uncond, 7.5, backend="triton")
    want = ops.cfg_combine(cond, uncond, 7.5, backend="reference")
    assert_same("cfg", got, want, dtype_ulps=1 if dtype == torch.bfloat16 else 0)
    assert_same("cond only", ops.cfg_combine(cond, None, 7.5, backend="triton"), cond.contiguous())


@interpreted
def test_philox_op_dispatches_to_triton():
    from fastdiff import ops
    import fastdiff.ops.triton_backend  # noqa: F401
    got = ops.philox_normal((5, 7), seed=3, noise_id=1, backend="triton")
    assert ulps(got, ops.philox_normal((5, 7), seed=3, noise_id=1, backend="reference")).max() <= PHILOX_ULPS


# ---------------------------------------------------------------------------------------------
# reductions (fastdiff.ops.reductions)

@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 4, 9, 37), (2, 5001), (1, 7)])
def test_reductions(dtype, shape):
    """cfg_rescale, per_sample_norm, error_norm: float32 sums in another order than torch's, so
    1e-6 relative; dynamic thresholding: bit-equal (an exact selection, then the same ops). The
    cond mean of 1000 would cancel a sum-of-squares variance in float32; Chan's merge does not."""
    from fastdiff.ops import reductions as R
    import fastdiff.ops.triton_backend  # noqa: F401
    gen = torch.Generator().manual_seed(sum(shape))
    cond = (torch.randn(shape, generator=gen) * 3 + 1000).to(dtype)
    uncond = (torch.randn(shape, generator=gen) + 1000).to(dtype)
    for name, args in [("cfg_rescale", (cond, uncond, 7.5, 0.7)), ("per_sample_norm", (cond,)),
                       ("error_norm", (cond, uncond, cond, 1e-3, 1e-4))]:
        got = getattr(R, name)(*args, backend="triton")
        want = getattr(R, name)(*args, backend="reference")
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6, name
    x0 = uncond - 1000
    got = R.dynamic_threshold(x0, 0.9, 1e3, backend="triton")      # max_value large: s is the quantile
    assert torch.equal(got, R.dynamic_threshold(x0, 0.9, 1e3, backend="reference"))
    assert got.abs().max().item() == 1.0


@interpreted
def test_order_statistics_are_exact_with_ties_zeros_and_strides():
    from fastdiff.kernels.reductions import per_sample_abs_order_statistics
    gen = torch.Generator().manual_seed(0)
    x = nan_padded((3, 2100), torch.float32, layout="batch_strided", gen=gen)
    x[0] = torch.round(x[0] * 2) / 2           # many ties, and zeros of both signs
    x[1, :700] = -0.0
    ranks = (0, 1, 699, 700, 1050, 2099)
    got = per_sample_abs_order_statistics(x, ranks)
    want = torch.stack([x.abs().kthvalue(r + 1, dim=1).values for r in ranks], dim=1)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# attention

def _attention_error_bound(q, k, v, bias, out, oracle):
    """flash-attention's rule: error <= 2x torch SDPA's error in the same dtype, + 1 output ulp in
    bf16 (interpreter truncation), + 1e-6 so float32 round-off noise does not flake."""
    import torch.nn.functional as F
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    sdpa_err = (sdpa.double() - oracle).abs().max().item()
    slack = 1e-6
    if q.dtype == torch.bfloat16:
        slack += oracle.abs().max().item() * 2.0 ** -7
    err = (out.double() - oracle).abs().max().item()
    assert err <= 2 * sdpa_err + slack, f"error {err:.3g} vs SDPA's {sdpa_err:.3g}"


def _qkv(B, H, Nq, Nkv, D, dtype, gen, transposed=False):
    if transposed:  # (B, N, H, D) projections viewed as (B, H, N, D): strides over B, H, N, read in place
        q = torch.randn(B, Nq, H, D, generator=gen).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, H, Nkv, D, generator=gen).to(dtype)
    v = torch.randn(B, H, Nkv, D, generator=gen).to(dtype)
    return q, k, v


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 72, 80, 96, 128])
def test_attention_head_dims(head_dim, dtype):
    from fastdiff.attention import attention, reference_attention
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = _qkv(1, 2, 67, 93, head_dim, dtype, gen, transposed=True)      # odd Nq and Nkv
    out = attention(q, k, v, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    _attention_error_bound(q, k, v, None, out, reference_attention(q.double(), k.double(), v.double()))


@interpreted
@pytest.mark.parametrize("n_text", [77, 300])
def test_cross_attention_with_key_padding_mask(n_text):
    from fastdiff.attention import attention, reference_attention
    gen = torch.Generator().manual_seed(n_text)
    q, k, v = _qkv(2, 2, 50, n_text, 64, torch.float16, gen)
    keep = torch.ones(2, 1, 1, n_text, dtype=torch.bool)
    keep[0, ..., 20:] = False                                   # sample 0 has 20 real text tokens
    out = attention(q, k, v, bias=keep, backend="triton")
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    _attention_error_bound(q, k, v, bias, out, reference_attention(q.double(), k.double(), v.double(),
                                                                   bias=bias.double()))


@interpreted
def test_attention_full_bias_and_fully_masked_rows():
    from fastdiff.attention import attention, reference_attention
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(1, 3, 33, 45, 80, torch.float32, gen)
    bias = torch.randn(1, 3, 33, 45, generator=gen)
    bias[0, 1, 5] = float("-inf")                                 # a query that sees no key
    out = attention(q, k, v, bias=bias, scale=0.3, backend="triton")
    want = reference_attention(q.double(), k.double(), v.double(), bias=bias.double(), scale=0.3)
    assert torch.equal(out[0, 1, 5], torch.zeros(80))
    assert (out.double() - want).abs().max().item() < 1e-5


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_joint_attention_equals_concatenation(dtype):
    from fastdiff.attention import joint_attention, reference_attention
    gen = torch.Generator().manual_seed(4)
    q, k1, v1 = _qkv(2, 2, 70, 70, 64, dtype, gen)            # image tokens
    _, k2, v2 = _qkv(2, 2, 70, 13, 64, dtype, gen)            # text tokens (odd count)
    bias = torch.randn(2, 1, 70, 83, generator=gen)
    out = joint_attention(q, k1, v1, k2, v2, bias=bias, backend="triton")
    k, v = torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)
    _attention_error_bound(q, k, v, bias, out, reference_attention(q.double(), k.double(), v.double(),
                                                                   bias=bias.double()))


@interpreted
def test_attention_rejects_unsupported_head_dim_on_explicit_triton():
    from fastdiff.attention import attention
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(RuntimeError, match="head dims up to 128, got 256"):
        attention(q, q, q, backend="triton")
    assert attention(q, q, q).shape == q.shape     # auto falls back to SDPA


@interpreted
def test_gpu_benchmark_code_paths_on_the_interpreter():
    """benchmarks/gpu_bench.py cannot be measured here; this runs its step and attention tables on
    CPU tensors (one call each, untimed) so a GPU run does not die of a typo."""
    from benchmarks import gpu_bench as G

    def once(fn):
        fn()
        return 1e-3

    steps = G.step_rows(["tiny"], 1.0, 1.0, lambda msg: None, device="cpu", timer=once, with_compile=False)
    assert {r["impl"] for r in steps} >= {"fastdiff triton fused step + model input", "eager PyTorch"}
    tiny = [G.AttentionShape("tiny joint", 1, 2, 40, 33, 72, joint_tokens=9), G.AttentionShape("tiny", 1, 2, 40, 7, 40)]
    rows = G.attention_rows(tiny, lambda msg: None, device="cpu", timer=once)
    assert len(rows) == 2 * 2 * 3
    assert "| tiny joint | bfloat16 | triton |" in G.measured_markdown("cpu", 1.0, "test", 1.0, steps, rows)


# ---------------------------------------------------------------------------------------------
# outside the interpreter

@pytest.mark.skipif(IN_INTERPRETER or torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_backend_without_gpu_says_why():
    from fastdiff import ops
    from fastdiff.ops.triton_backend import BACKEND
    why = BACKEND.unavailable_reason()
    assert why is not None and "CUDA" in why and "TRITON_INTERPRET=1" in why
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        ops.cfg_combine(torch.ones(3), torch.zeros(3), 2.0, backend="triton")


def test_package_works_without_triton():
    """With triton unimportable, fastdiff imports, the backend reports why, attention runs on SDPA."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdiff, fastdiff.ops.triton_backend as tb\n"
        "from fastdiff.attention import attention\n"
        "why = tb.BACKEND.unavailable_reason(); assert why.startswith('triton is not importable'), why\n"
        "q = torch.randn(1, 2, 5, 8); assert attention(q, q, q).shape == q.shape\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")     # else "no CUDA device" is the first reason
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# fastdiff check's cases (the shared harness) on the triton backend

@interpreted
@pytest.mark.filterwarnings("ignore:std.*degrees of freedom:UserWarning")   # the reference, one element per sample
@pytest.mark.parametrize("group", ["fused_step", "cfg_combine", "philox", "reductions"])
def test_fastdiff_check_harness(group):
    """fastdiff.check's cases for this op group (row kinds x dtypes x odd sizes x layouts, without
    the 1000003-element ones) on the interpreted Triton kernels: every one passes, none is n/a."""
    from fastdiff.check import PASS, check_backend
    from fastdiff.ops import BACKENDS
    results = check_backend(BACKENDS["triton"], device="cpu", groups=[group], large=False)
    assert results
    bad = [f"{r.op} {r.case}: {r.status} {r.detail}" for r in results if r.status != PASS]
    assert not bad, "\n".join(bad)
