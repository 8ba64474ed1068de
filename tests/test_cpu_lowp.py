"""The C++ CPU fused step's one-pass kernel with float16/bfloat16 model outputs, noise and model
input (issue 17), against the reference backend; and ``fastdiff.ops.buffers.alloc_staggered``.

The one-pass kernel runs rows that write x only (the sampler's common case); float16/bfloat16
tensors are widened to float32 block by block and the model input is narrowed after the loop,
so the results must equal the reference to the tolerances of tests/test_ops_cpu.py: bitwise on
the float32 state (no noise), 1 ulp of the model dtype on the model input. Sizes cover the tails
of every vector width (16-lane AVX-512, 8-lane F16C, the scalar tail) and the 512-element block.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops.buffers import DEFAULT_STAGGER, address_mod_page, alloc_staggered, staggered_offsets

from fastdiff.check import assert_step_match, clone_case, public_kwargs, relayout, run_against_reference, step_case
from fastdiff.ops.backends import load_extension
from fastdiff.program import COL_G, COL_QD, OUT_FIXED, OUT_H, OUT_HU, OUT_X, OUT_Y, OUT_Z, col_out, col_s_in

_C = load_extension()
pytestmark = pytest.mark.skipif(isinstance(_C, str), reason=str(_C))

LOWP = (torch.float16, torch.bfloat16)
# Tails of every vector width and of the block: 1..17 elements, a block +- a few, odd 2-D sizes.
ODD_SHAPES = ((1,), (7,), (8,), (9,), (15,), (16,), (17,), (511,), (513,), (3, 341), (2, 3, 5, 7), (1, 4, 64, 64))


def make_case(gen, shape, **kw):
    return step_case(gen, shape, **kw)


def run_both(kw):
    """The case on the cpu and the reference backends: (cpu copy, reference copy) after the call."""
    return run_against_reference(kw, "cpu")


def assert_match(a, b, what=""):
    assert_step_match(a, b, what)
    if b.get("bad_row") is not None:
        assert torch.equal(a["bad_row"], b["bad_row"]), f"bad_row {what}"


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _state_bitwise(a, b):
    for name in ("x", "hist"):
        if a.get(name) is not None:
            assert torch.equal(a[name], b[name]), f"{name} differs from the reference"


@pytest.mark.parametrize("model_dtype", LOWP)
@pytest.mark.parametrize("model", ("cond", "cfg"))
@pytest.mark.parametrize("K", (0, 1, 2, 3))
@pytest.mark.parametrize("model_in", ("none", "B", "2B"))
def test_lowp_one_pass_parity(model_dtype, model, K, model_in):
    """x-only rows (the one-pass kernel), fp16/bf16 model output and model input, CFG on/off,
    every history depth it serves; the state is bitwise the reference's (no noise)."""
    gen = torch.Generator().manual_seed(_seed(model_dtype, model, K, model_in))
    for shape in ODD_SHAPES:
        kw = make_case(gen, shape, K=K, model=model, noise="none", writes="x", model_in=model_in,
                       model_dtype=model_dtype)
        a, b = run_both(kw)
        assert_match(a, b, f"{model_dtype} {shape}")
        _state_bitwise(a, b)
        if model_in != "none":
            assert a["model_in"].dtype == model_dtype and not a["model_in"].isnan().any()


@pytest.mark.parametrize("model_dtype", LOWP)
def test_lowp_special_values_convert_exactly(model_dtype):
    """Conversions at the edges of the formats (half_bits.h): subnormal, zero, signed zero,
    largest, inf and NaN model outputs are widened exactly, and a model input that overflows,
    rounds to a subnormal, or ties, is narrowed as torch's .to() narrows (bit for bit)."""
    gen = torch.Generator().manual_seed(_seed("special", model_dtype))
    fi = torch.finfo(model_dtype)
    specials = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 8, fi.smallest_normal / 1024 if model_dtype ==
                             torch.float16 else fi.tiny / 128, fi.max, -fi.max, 1.0, -3.5, float("inf"), float("-inf"),
                             float("nan"), 65520.0, 65519.0, 2.0 ** -25, 3 * 2.0 ** -25, 1.0 + 2.0 ** -11,
                             1.0 + 3 * 2.0 ** -11, 2.0 ** -24 * 1.5], dtype=torch.float32)
    N = specials.numel()
    shape = (2, 3 * N + 5)
    kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B", model_dtype=model_dtype)
    # x_next = x + D with D = cond (g = 1); model_in = x_next. Elements [0, N): x = 0 and cond the
    # specials (widening); [N, 2N): cond = 0 and x the specials (narrowing of the model input).
    K = 1
    kw["table"][:, :] = 0.0
    kw["table"][:, COL_G] = 1.0
    kw["table"][:, COL_QD] = 1.0
    kw["table"][:, col_out(K, "x") + OUT_X] = 1.0
    kw["table"][:, col_out(K, "x") + OUT_H] = 1.0
    kw["table"][:, col_s_in(K)] = 1.0
    kw["cond"].zero_()
    kw["uncond"].zero_()
    kw["cond"].view(-1)[:N] = specials.to(model_dtype)
    kw["x"].view(-1)[:N] = 0.0
    kw["x"].view(-1)[N: 2 * N] = specials
    a, b = run_both(kw)
    assert_match(a, b, "specials")
    widened = a["x"].view(-1)[:N]
    want = specials.to(model_dtype).float() + 0.0        # x_next = 0 + D
    assert torch.equal(widened.isnan(), want.isnan()) and torch.equal(widened[~want.isnan()], want[~want.isnan()])
    fin = ~b["model_in"].isnan()
    assert torch.equal(a["model_in"].isnan(), b["model_in"].isnan())
    assert torch.equal(a["model_in"][fin], b["model_in"][fin])
    assert torch.equal(a["model_in"][fin].view(torch.int16), b["model_in"][fin].view(torch.int16))   # signed zeros


@pytest.mark.parametrize("model_dtype", LOWP)
@pytest.mark.parametrize("noise,noise_dtype", [("given", torch.float16), ("given", torch.bfloat16),
                                               ("given", torch.float32), ("philox", None)])
def test_lowp_noise(model_dtype, noise, noise_dtype):
    """Given noise in any model dtype (widened in the kernel) and Philox noise."""
    gen = torch.Generator().manual_seed(_seed(model_dtype, noise, noise_dtype))
    for shape in ((17,), (2, 3, 5, 7), (3, 1000)):
        kw = make_case(gen, shape, K=1, model="cfg", noise=noise, writes="x", model_in="2B",
                       model_dtype=model_dtype, noise_dtype=noise_dtype)
        a, b = run_both(kw)
        assert_match(a, b, f"{shape} {noise}/{noise_dtype}")
        if noise == "given":
            _state_bitwise(a, b)


@pytest.mark.parametrize("model_dtype", LOWP)
@pytest.mark.parametrize("gdtype", (torch.float32, torch.float64))
def test_lowp_per_sample_guidance(model_dtype, gdtype):
    """Per-sample scales (one of them exactly 1: D = cond) with samples that straddle blocks."""
    gen = torch.Generator().manual_seed(_seed(model_dtype, gdtype))
    for shape in ((3, 5), (4, 1), (5, 3, 7, 11), (3, 700)):
        for row in (0, 1, 2):
            kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                           model_dtype=model_dtype, guidance=gdtype)
            kw["row"] = row
            a, b = run_both(kw)
            assert_match(a, b, f"{shape} row={row}")
            _state_bitwise(a, b)


@pytest.mark.parametrize("model_dtype", LOWP)
@pytest.mark.parametrize("layout", ("channels_last", "strided", "padded", "transposed", "batch_slice"))
@pytest.mark.parametrize("odd", ("cond", "uncond", "model_in", "all"))
def test_lowp_non_contiguous(model_dtype, layout, odd):
    """Non-contiguous model outputs / model input (alone, or every tensor): never read as if
    contiguous, whichever path (memory order, or contiguous copies) the kernel takes."""
    gen = torch.Generator().manual_seed(_seed(model_dtype, layout, odd))
    shape = (2, 4, 16, 24)
    if odd == "all":
        kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                       model_dtype=model_dtype, layout=layout)
    else:
        kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                       model_dtype=model_dtype)
        kw[odd] = relayout(kw[odd], layout) if odd != "model_in" else relayout(torch.full(kw[odd].shape, float("nan"), dtype=model_dtype), layout)
    a, b = run_both(kw)
    assert_match(a, b, f"{odd} {layout}")
    _state_bitwise(a, b)


def test_lowp_cfg_halves_of_one_tensor():
    """cond/uncond as the two halves of one [2B] fp16 tensor (what a batched model returns), the
    sampler's layout; and a bf16 model input [2B] both of whose halves hold s_in * x_next."""
    gen = torch.Generator().manual_seed(4)
    for dt in LOWP:
        kw = make_case(gen, (2, 4, 33, 35), K=1, model="cfg", noise="none", writes="x", model_in="2B",
                       model_dtype=dt)
        both = torch.cat([kw["uncond"], kw["cond"]])
        kw["uncond"], kw["cond"] = both[:2], both[2:]
        a, b = run_both(kw)
        assert_match(a, b, str(dt))
        assert torch.equal(a["model_in"][:2], a["model_in"][2:])


@pytest.mark.parametrize("model_dtype", LOWP)
@pytest.mark.parametrize("where", ("cond", "x", "hist"))
def test_lowp_finite_flag(model_dtype, where):
    """A non-finite written x raises bad_row (1-based row) in the one-pass kernel as in the reference;
    a finite step leaves it 0."""
    gen = torch.Generator().manual_seed(_seed(model_dtype, where))
    shape = (2, 3, 5, 7)
    kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                   model_dtype=model_dtype)
    a, b = run_both(kw)
    assert a["bad_row"].item() == b["bad_row"].item() == 0
    kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                   model_dtype=model_dtype)
    kw["table"][:, :] = kw["table"].abs() + 0.5      # every coefficient nonzero: a NaN input reaches x
    target = kw[where] if where != "hist" else kw["hist"][0]
    target.view(-1)[37] = float("nan") if where != "cond" else float("inf")
    a, b = run_both(kw)
    assert b["bad_row"].item() == kw["row"] + 1
    assert_match(a, b, where)


def _same_at_1_and_2_threads(kw, names, state_bitwise: bool = False):
    """The case at 1 and 2 threads: each matches the reference (bitwise in the state if asked), and
    ``names`` are the same bits at both thread counts."""
    n0 = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            a, b = run_both(kw)
            assert_match(a, b, f"threads={nt}")
            if state_bitwise:
                _state_bitwise(a, b)
            outs.append(a)
    finally:
        torch.set_num_threads(n0)
    for name in names:
        assert torch.equal(outs[0][name], outs[1][name]), name


@pytest.mark.parametrize("model_dtype", LOWP)
def test_lowp_threads(model_dtype):
    """Above the serial threshold (OpenMP blocks) at 1 and 2 threads: the same bits."""
    gen = torch.Generator().manual_seed(_seed("threads", model_dtype))
    kw = make_case(gen, (3, 4, 100, 101), K=2, model="cfg", noise="philox", writes="x",
                   model_in="2B", model_dtype=model_dtype)
    _same_at_1_and_2_threads(kw, ("x", "hist", "model_in"))


@pytest.mark.parametrize("model_dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("model_in", ("none", "2B"))
def test_big_blocks_threads(model_dtype, model_in):
    """No noise and a written history slot: the one-pass kernel runs 4096-element blocks (no block
    buffers); above the serial threshold, at 1 and 2 threads, with a partial last block."""
    gen = torch.Generator().manual_seed(_seed("big", model_dtype, model_in))
    kw = make_case(gen, (3, 4, 100, 101), K=1, model="cfg", noise="none", writes="x", model_in=model_in,
                   model_dtype=model_dtype, hist_writes=1)
    _same_at_1_and_2_threads(kw, ("x", "hist") + (("model_in",) if model_in != "none" else ()), state_bitwise=True)


# ----------------------------------------------------------------------------------------------
# Sparse rows: the solvers' rows have a_y = a_hu = 0 in the new x and a history value that is h
# itself; the AVX-512 loop leaves those terms out and recomputes, by the full formula, every
# vector where that could differ from the reference (a zero or non-finite result, a non-finite hu).


def _sparse_table(table, K, g_one):
    """The case's random rows made solver-like: x-out (a_x, 0, a_h, 0, a_z, a_0..), history value
    = 1 * h; row 0 with g = 1 (D = cond), the others g in [1, 8)."""
    x = col_out(K, "x")
    table[:, x + OUT_Y] = 0.0
    table[:, x + OUT_HU] = 0.0
    for j in range(K):     # (every slot's block; K = 0 has none)
        h = col_out(K, j)
        table[:, h:h + OUT_FIXED + K] = 0.0
        table[:, h + OUT_H] = 1.0
    if g_one:
        table[:, COL_G] = 1.0
    return table


def _sprinkle(gen, t, values, frac=0.3):
    """Put special values at a random fraction of t's elements (in place)."""
    flat = t.view(-1)
    pick = torch.rand(flat.numel(), generator=gen) < frac
    idx = torch.randint(0, len(values), (flat.numel(),), generator=gen)
    vals = torch.tensor(values, dtype=torch.float32)[idx].to(t.dtype)
    flat[pick] = vals[pick]


def _assert_bits(got, want, name):
    """Equal bit for bit (signed zeros included); NaN at the same places (payloads not compared)."""
    gn, wn = got.isnan(), want.isnan()
    assert torch.equal(gn, wn), f"{name}: NaN at other places than the reference's"
    iview = torch.int16 if got.element_size() == 2 else torch.int32
    g, w = got[~gn].contiguous().view(iview), want[~wn].contiguous().view(iview)
    assert torch.equal(g, w), f"{name}: {(g != w).sum().item()} elements differ from the reference (bits)"


SPECIAL_STATE = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -3.0e38, 1e-42]
SPECIAL_MODEL = {torch.float32: [0.0, -0.0, float("inf"), float("nan"), 3.0e38, -3.0e38, 1e-42],
                 torch.float16: [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 6e-8],
                 torch.bfloat16: [0.0, -0.0, float("inf"), float("nan"), 3.0e38, -3.0e38, 1e-40]}


@pytest.mark.parametrize("model_dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("K", (0, 1, 3))
@pytest.mark.parametrize("noise", ("none", "given"))
@pytest.mark.parametrize("slot_write", ("slot", "none"))
@pytest.mark.parametrize("eval_y", (False, True))
def test_sparse_rows_bitwise_with_special_values(model_dtype, K, noise, slot_write, eval_y):
    """Solver-like rows (zero a_y, a_hu; history value = h) with zeros of both signs, infinities,
    NaNs and huge values in every input: x, the history and the model input are the reference's
    bit for bit (a skipped 0 * inf is NaN, a skipped 0 * v can flip the sign of a zero result),
    and bad_row is the reference's. g = 1 and g != 1, odd sizes (vector tails), both CFG forms."""
    gen = torch.Generator().manual_seed(_seed("sparse", model_dtype, K, noise, slot_write, eval_y))
    for shape in ((2, 203), (1, 4, 40, 41)):
        for g_one in (False, True):
            for special in (False, True):
                kw = make_case(gen, shape, K=K, model="cfg", noise=noise, writes="x", model_in="2B",
                               model_dtype=model_dtype, eval_y=eval_y,
                               hist_writes=(1 if K else 0) if slot_write == "slot" else 0)
                _sparse_table(kw["table"], K, g_one)
                if special:
                    for name in ("x", "y", "hist", "noise"):
                        if kw.get(name) is not None:
                            _sprinkle(gen, kw[name], SPECIAL_STATE)
                    for name in ("cond", "uncond"):
                        _sprinkle(gen, kw[name], SPECIAL_MODEL[model_dtype])
                    # exact zeros of both signs everywhere in one stretch: zero results
                    for name in ("x", "y", "hist", "noise", "cond", "uncond"):
                        if kw.get(name) is not None:
                            z = kw[name].view(-1)[:40]
                            z.copy_(torch.where(torch.rand(40, generator=gen) < 0.5, 0.0, -0.0).to(z.dtype))
                a, b = run_both(kw)
                what = f"{model_dtype} {shape} g_one={g_one} special={special}"
                assert a["bad_row"].item() == b["bad_row"].item(), f"bad_row {what}"
                for name in ("x", "hist", "model_in"):
                    if a.get(name) is not None:
                        _assert_bits(a[name], b[name], f"{name} {what}")


@pytest.mark.parametrize("model_dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("K", (0, 1, 3))
@pytest.mark.parametrize("noise", ("none", "given", "philox"))
@pytest.mark.parametrize("model_in", ("none", "2B"))
def test_y_only_rows_one_pass_bitwise(model_dtype, K, noise, model_in):
    """Rows evaluated at x that write only y (how the diffusers drop-ins read the caller's sample as x
    and write the step into the returned tensor) run the one-pass loop with the y-out coefficients:
    y, the history and the model input are the reference's bit for bit (Philox noise: within the
    shared tolerance), x is not written, with sparse and dense rows, g = 1 and not, special values,
    odd sizes."""
    gen = torch.Generator().manual_seed(_seed("y only", model_dtype, K, noise, model_in))
    for shape in ((2, 203), (1, 4, 40, 41)):
        for sparse in (False, True):
            for special in (False, True):
                kw = make_case(gen, shape, K=K, model="cfg", noise=noise, writes="y", model_in=model_in,
                               model_dtype=model_dtype, eval_y=False, model_in_from_y=True,
                               hist_writes=1 if K else 0)
                if sparse:      # the y-out block solver-like (the loop leaves its zero terms out)
                    y = col_out(K, "y")
                    kw["table"][:, y + OUT_Y] = 0.0
                    kw["table"][:, y + OUT_HU] = 0.0
                    for j in range(K):
                        h = col_out(K, j)
                        kw["table"][:, h:h + OUT_FIXED + K] = 0.0
                        kw["table"][:, h + OUT_H] = 1.0
                    kw["table"][0, COL_G] = 1.0
                if special:
                    for name in ("x", "hist", "noise"):
                        if kw.get(name) is not None:
                            _sprinkle(gen, kw[name], SPECIAL_STATE)
                    for name in ("cond", "uncond"):
                        _sprinkle(gen, kw[name], SPECIAL_MODEL[model_dtype])
                x_before = kw["x"].clone()
                a, b = run_both(kw)
                what = f"{model_dtype} {shape} sparse={sparse} special={special}"
                _assert_bits(a["x"], x_before, f"x written {what}")
                assert a["bad_row"].item() == b["bad_row"].item(), f"bad_row {what}"
                if noise == "philox":       # (the kernel's Philox normals are the oracle's within PHILOX_ULPS)
                    assert_match(a, b, what)
                    continue
                for name in ("y", "hist", "model_in"):
                    if a.get(name) is not None:
                        _assert_bits(a[name], b[name], f"{name} {what}")


def test_sparse_rows_skipped_hu_overflow():
    """g = 1 (hu's u reaches no kept term) with u so large that q_d * u overflows: the reference's
    0 * hu is NaN, so the loop must not keep its sparse result there."""
    gen = torch.Generator().manual_seed(_seed("hu overflow"))
    for model_dtype in (torch.float32, torch.bfloat16):
        kw = make_case(gen, (1, 3, 50), K=1, model="cfg", noise="none", writes="x", model_in="2B",
                       model_dtype=model_dtype, hist_writes=1)
        _sparse_table(kw["table"], 1, g_one=True)
        kw["table"][:, COL_QD] = 4.0
        kw["uncond"].view(-1)[5::7] = 2.0e38
        a, b = run_both(kw)
        assert b["x"].view(-1)[5::7].isnan().all()          # the case tests what it says
        assert a["bad_row"].item() == b["bad_row"].item() != 0
        for name in ("x", "hist", "model_in"):
            _assert_bits(a[name], b[name], f"{name} {model_dtype}")


def _placed_case(gen, shape, model_dtype, offsets):
    """A K=1 CFG case whose x, history, [2B] model output and [2B] model input start at the given
    byte offsets modulo 4096 (one allocation), as fused_step kwargs."""
    B, n = shape[0], 1
    for v in shape:
        n *= v
    es = torch.empty((), dtype=model_dtype).element_size()
    sizes = [4 * n, 4 * n, 2 * n * es, 2 * n * es]
    raw = torch.empty(sum(sizes) + 5 * 4096, dtype=torch.uint8)
    end, views = (-raw.data_ptr()) % 4096, []
    for size, off in zip(sizes, offsets):
        start = end + ((off - end) % 4096)
        views.append(raw[start:start + size])
        end = start + size
    kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B", model_dtype=model_dtype,
                   hist_writes=1)
    x = views[0].view(torch.float32).view(shape).copy_(kw["x"])
    hist = views[1].view(torch.float32).view((1,) + tuple(shape)).copy_(kw["hist"])
    out = views[2].view(model_dtype).view((2 * B,) + tuple(shape[1:]))
    out[:B].copy_(kw["uncond"])
    out[B:].copy_(kw["cond"])
    model_in = views[3].view(model_dtype).view((2 * B,) + tuple(shape[1:])).fill_(float("nan"))
    return dict(kw, x=x, hist=hist, uncond=out[:B], cond=out[B:], model_in=model_in)


@pytest.mark.parametrize("model_dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("offsets", ([0, 3008, 1984, 2048], [0, 3008, 1984, 1920], [0, 0, 0, 0], [448, 704, 640, 2944]))
def test_placements_forward_and_backward_loops(model_dtype, offsets):
    """Placements that make the kernel run its vector loop backward (the model input 64 bytes after
    the model output mod 4096, against 4K aliasing) or forward: the same result as the reference,
    for whole blocks and for a remainder shorter than a vector. The kernel reads the tensors in
    place (no copies), so the placement is the one tested."""
    gen = torch.Generator().manual_seed(_seed("placed", model_dtype, tuple(offsets)))
    n0 = torch.get_num_threads()
    try:
        for shape, nt in (((1, 4, 64, 64), 1), ((1, 3, 37, 41), 1), ((2, 4, 64, 80), 2)):   # the last: OpenMP blocks
            torch.set_num_threads(nt)
            kw = _placed_case(gen, shape, model_dtype, offsets)
            ref = clone_case(kw)
            ops.fused_step(**public_kwargs(ref), backend="reference")
            ops.fused_step(**public_kwargs(kw), backend="cpu")
            assert_match(kw, ref, f"{offsets} {shape}")
            _state_bitwise(kw, ref)
    finally:
        torch.set_num_threads(n0)


@pytest.mark.parametrize("model_dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("where", ("forward", "backward", "unaligned"))
def test_large_step_streamed_model_input(model_dtype, where):
    """2M elements: a model input of 8 MiB or more is written with non-temporal stores when both
    halves are aligned to the vector, else with plain stores ("unaligned"), and the one-pass
    kernel's blocks grow past 4K elements (64K at 1 thread, 8K at 2); the loop runs forward or
    backward (placement): the reference's bits every way."""
    gen = torch.Generator().manual_seed(_seed("stream", model_dtype, where))
    es = torch.empty((), dtype=model_dtype).element_size()
    shape = (1, 4, 512, 1040)                      # 2,129,920 elements, not a multiple of 64K
    assert 2 * es * 4 * 512 * 1040 >= 8 << 20      # >= 8 MiB of model input in fp16 / bf16 too
    offsets = {"forward": [0, 0, 0, 0], "backward": [0, 3008, 1984, 2048],
               "unaligned": [0, 0, 0, 2048 + es]}[where]
    n0 = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            kw = _placed_case(gen, shape, model_dtype, offsets)
            kw["bad_row"] = None
            ref = clone_case(kw)
            ops.fused_step(**public_kwargs(ref), backend="reference")
            ops.fused_step(**public_kwargs(kw), backend="cpu")
            for name in ("x", "hist", "model_in"):
                _assert_bits(kw[name], ref[name], f"{name} threads={nt}")
    finally:
        torch.set_num_threads(n0)


# ----------------------------------------------------------------------------------------------
# alloc_staggered
# ----------------------------------------------------------------------------------------------
def test_alloc_staggered_places_views_apart_mod_4096():
    specs = [((1, 4, 64, 64), torch.float32), ((1, 1, 4, 64, 64), torch.float32), ((2, 4, 64, 64), torch.float16),
             ((7,), torch.bfloat16), ((3, 5), torch.float64)]
    views = alloc_staggered(*specs, fill=0.0)
    assert [tuple(v.shape) for v in views] == [s for s, _ in specs]
    assert [v.dtype for v in views] == [d for _, d in specs]
    mods = [address_mod_page(v) for v in views]
    assert mods == [(j * DEFAULT_STAGGER) % 4096 for j in range(len(specs))]
    assert all(v.data_ptr() % 64 == 0 and v.is_contiguous() for v in views)
    # No overlap: each view written with its index, read back intact.
    for j, v in enumerate(views):
        v.fill_(j + 1)
    for j, v in enumerate(views):
        assert bool((v == j + 1).all()), j


def test_alloc_staggered_serves_the_fused_step():
    """The step on staggered buffers equals the step on ordinary ones (placement changes nothing)."""
    gen = torch.Generator().manual_seed(9)
    shape = (1, 4, 64, 64)
    kw = make_case(gen, shape, K=1, model="cfg", noise="none", writes="x", model_in="2B",
                   model_dtype=torch.float16)
    x, hist, model_in = alloc_staggered((shape, torch.float32), ((1,) + shape, torch.float32),
                                        ((2,) + shape[1:], torch.float16))
    st = dict(kw, x=x.copy_(kw["x"]), hist=hist.copy_(kw["hist"]), model_in=model_in.fill_(float("nan")),
              bad_row=torch.zeros(1, dtype=torch.int32))
    ops.fused_step(**public_kwargs(st), backend="cpu")
    a, b = run_both(kw)
    for name in ("x", "hist", "model_in"):
        assert torch.equal(st[name], a[name]), name


def test_staggered_offsets_rules():
    offsets, total = staggered_offsets([100, 4096, 1], stagger=1024)
    assert offsets == [0, 1024, 4096 + 2048] and total == offsets[-1] + 1
    assert alloc_staggered() == []


@pytest.mark.parametrize("bad,err", [(((2, 3),), TypeError), (((2, 3), "float32"), TypeError),
                                     (((2, -1), torch.float32), ValueError)])
def test_alloc_staggered_bad_spec(bad, err):
    with pytest.raises(err, match="alloc_staggered: spec 0"):
        alloc_staggered(bad)


def test_alloc_staggered_bad_stagger():
    with pytest.raises(ValueError, match="multiple of 64"):
        alloc_staggered(((2,), torch.float32), stagger=100)
