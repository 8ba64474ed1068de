"""Regression tests for issue 12, "Core sampler and ops", items 9, 10, 11, 13 and 14.

Every bad-input probe asserts three things: the exception type, a message that names what was
expected, and that nothing happened before it (no model call, the caller's tensors unchanged).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastdiff.ops as ops
from fastdiff import Guidance, sample
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.ops.backends import load_extension
from fastdiff.program import FLAG_ALL, FLAG_WRITE_X, FLAG_WRITE_Y, pack_flags, table_width
from fastdiff.program.layout import FLAG_ARG_NAMES, STEP_ARG_NAMES
from fastdiff.schedules import ContinuousVP, DiscreteVP, FlowMatching, VESchedule, make_grid, time_shift

SHAPE = (4, 2, 3)
HAS_C = not isinstance(load_extension(), str)
BACKENDS = ["reference"] + (["cpu"] if HAS_C else [])


@pytest.fixture
def mixture():
    return GaussianMixture.default(DiscreteVP(), dim=6)


@pytest.fixture
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


class Recorder:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        return self.model(x, t)


def run(model, noise, **kw):
    kw.setdefault("steps", 5)
    kw.setdefault("progress", False)
    kw.setdefault("solver", "euler")
    return sample(model, noise, **kw)


def snapshot(*objs):
    """Clones of every tensor in objs (tensors, dicts/tuples/lists of tensors)."""
    out = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            if o.device.type != "meta":
                out.append((o, o.detach().clone()))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)
    for o in objs:
        walk(o)
    return out


def unchanged(snap):
    return all(torch.equal(t.detach(), c) or torch.allclose(t.detach().double(), c.double(), equal_nan=True)
               for t, c in snap)


def assert_rejected(mixture, noise, exc, match, **kw):
    """The run raises exc(match) before any model call and modifies no tensor it was given."""
    model = Recorder(mixture)
    snap = snapshot(noise, kw)
    with pytest.raises(exc, match=match):
        run(model, noise, **kw)
    assert model.calls == 0, "rejected after a model call"
    assert unchanged(snap), "a rejected call modified the caller's tensors"


# =============================================================================================
# Item 9: inpainting masks


def known_data():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("mask_shape", [(4, 1, 3), (1, 2, 3), (1, 1, 3), (2, 3), (3,), (4, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_item9_broadcast_mask_accepted(mixture, noise, mask_shape):
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(mask_shape, generator=gen) < 0.5).float()
    mask.reshape(-1)[0] = 1.0
    known = known_data()
    snap = snapshot(mask, known, noise)
    full = mask.expand(SHAPE).contiguous()
    a = run(mixture, noise, seed=0, inpaint=(known, mask))
    b = run(mixture, noise, seed=0, inpaint=(known, full))
    assert torch.equal(a, b)
    keep = full.bool()
    assert torch.equal(a[keep], known[keep])
    assert unchanged(snap)


@pytest.mark.parametrize("mask_shape", [(2, 4, 2, 3), (1, 4, 2, 3), (4, 2, 3, 1)], ids=lambda s: "x".join(map(str, s)))
def test_item9_larger_mask_rejected_before_model_call(mixture, noise, mask_shape):
    mask = torch.ones(mask_shape)
    assert_rejected(mixture, noise, ValueError, r"mask.*broadcast", inpaint=(known_data(), mask))


def test_item9_nan_in_known_outside_mask_does_not_leak(mixture, noise):
    mask = torch.zeros(SHAPE)
    mask[:, 0] = 1.0
    known = known_data()
    known_nan = known.clone()
    known_nan[:, 1] = float("nan")
    a = run(mixture, noise, seed=0, inpaint=(known_nan, mask))
    b = run(mixture, noise, seed=0, inpaint=(known, mask))
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.isnan(known_nan[:, 1]).all()                 # the caller's tensor untouched


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_item9_nonfinite_known_inside_mask_rejected(mixture, noise, bad):
    mask = torch.zeros(SHAPE)
    mask[:, 0] = 1.0
    known = known_data()
    known[0, 0, 0] = bad
    assert_rejected(mixture, noise, ValueError, r"known.*(NaN|finite)", inpaint=(known, mask))


@pytest.mark.parametrize("value", [-0.5, 1.5, float("nan"), float("inf")])
def test_item9_mask_outside_unit_interval_rejected(mixture, noise, value):
    mask = torch.zeros(SHAPE)
    mask[1, 1, 1] = value
    assert_rejected(mixture, noise, ValueError, r"mask.*\[0, 1\]", inpaint=(known_data(), mask))


@pytest.mark.parametrize("inpaint, exc, match", [
    ("known", TypeError, "inpaint"),
    ((torch.zeros(SHAPE),), TypeError, "inpaint"),
    (([[0.0]], torch.ones(SHAPE)), TypeError, "known"),
    ((torch.zeros(SHAPE), [[1.0]]), TypeError, "mask"),
    ((torch.zeros(SHAPE, dtype=torch.int64), torch.ones(SHAPE)), TypeError, "known"),
    ((torch.zeros(SHAPE), torch.ones(SHAPE, dtype=torch.complex64)), TypeError, "mask"),
], ids=["str", "1-tuple", "known list", "mask list", "known int", "mask complex"])
def test_item9_bad_inpaint_types(mixture, noise, inpaint, exc, match):
    assert_rejected(mixture, noise, exc, match, inpaint=inpaint)


# =============================================================================================
# Item 10: autograd — never a wrong gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["noise", "x_init", "known", "mask", "cond", "uncond", "model_kwargs"])
def test_item10_inputs_requiring_grad_rejected(mixture, noise, backend, which):
    B = SHAPE[0]
    emb = torch.ones(B, 3)
    kw = dict(backend=backend)
    model = (lambda x, t, emb=None: mixture(x, t))
    if which == "noise":
        noise = noise.clone().requires_grad_()
    elif which == "x_init":
        kw["x_init"] = noise.clone().requires_grad_()
    elif which in ("known", "mask"):
        known, mask = known_data(), torch.ones(SHAPE)
        (known if which == "known" else mask).requires_grad_()
        kw["inpaint"] = (known, mask)
    elif which == "cond":
        kw.update(cond={"emb": emb.clone().requires_grad_()})
    elif which == "uncond":
        kw.update(cond={"emb": emb}, uncond={"emb": (-emb).requires_grad_()}, guidance=3.0)
    else:
        kw.update(model_kwargs={"emb": emb.clone().requires_grad_()})
    rec = Recorder(model)
    with pytest.raises(ValueError, match="requires grad"):
        run(rec, noise, **kw)
    assert rec.calls == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_item10_noise_requiring_grad_under_no_grad_is_fine(mixture, noise, backend):
    with torch.no_grad():
        out = run(mixture, noise.clone().requires_grad_(), backend=backend)
    assert not out.requires_grad
    assert torch.equal(out, run(mixture, noise, backend=backend))


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        return self.w * x


@pytest.mark.parametrize("backend", BACKENDS)
def test_item10_model_parameters_requiring_grad_give_no_false_gradient(noise, backend):
    """Sampling is not differentiable: the result carries no autograd history on any backend
    (as diffusers' pipelines and k-diffusion's samplers, which run under no_grad), so a
    backward through it raises instead of returning a wrong gradient."""
    net = TinyNet()
    out = run(net, noise, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):
        out.sum().backward()
    assert net.w.grad is None


def _step_args():
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 4)
    T = torch.randn(2, table_width(1), dtype=torch.float64, generator=gen)
    return dict(table=T, row=0, x=torch.randn(shape, generator=gen), y=torch.randn(shape, generator=gen),
                cond=torch.randn(shape, generator=gen), uncond=torch.randn(shape, generator=gen),
                hist=torch.randn((1,) + shape, generator=gen), hist_write=0, eval_y=False, write_x=True,
                write_y=True, noise=None, seed=5, noise_id=2, model_in=torch.zeros((4, 3, 4)),
                model_in_from_y=False, bad_row=torch.zeros(1, dtype=torch.int32))


def call_step(args, backend="reference"):
    a = dict(args)
    ops.fused_step(a.pop("table"), a.pop("row"), a.pop("x"), **a, backend=backend)


def assert_step_rejected(args, exc, match, backend="reference"):
    snap = snapshot(args)
    with pytest.raises(exc, match=match):
        call_step(args, backend)
    assert unchanged(snap), "a rejected fused_step modified its arguments"


@pytest.mark.skipif(not HAS_C, reason="needs the cpu backend")
@pytest.mark.parametrize("which", ["x", "y", "cond", "uncond", "hist", "table"])
def test_item10_fused_step_without_backward_rejects_inputs_requiring_grad(which):
    """The compiled backends have no backward: asked for by name, they refuse."""
    args = _step_args()
    args[which] = args[which].detach().clone().requires_grad_()
    assert_step_rejected(args, ValueError, "requires grad", "cpu")


@pytest.mark.parametrize("which", ["x", "y", "hist", "model_in", "table"])
def test_item10_fused_step_rejects_leaves_written_in_place_and_table_requiring_grad(which):
    args = _step_args()
    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else v) for k, v in args.items()}
    t = args[which].detach().clone().requires_grad_()
    args[which] = t if which != "hist" else t[:]          # a view of a leaf counts as the leaf
    assert_step_rejected(args, ValueError, "leaf|table requires grad", "reference")


GRAD_CASES = {
    "cfg, K=2, eval y, writes x and y, given noise, model_in": dict(K=2, hist_write=1, eval_y=True, write_y=True,
                                                                   cfg=True, noise="given", model_in=True),
    "cond only, K=1, slot read and written": dict(K=1, hist_write=0, eval_y=False, write_y=False, cfg=False,
                                                  noise="none", model_in=False),
    "philox noise, K=0": dict(K=0, hist_write=-1, eval_y=False, write_y=False, cfg=True, noise="philox",
                              model_in=True),
    "no model, K=3": dict(K=3, hist_write=-1, eval_y=True, write_y=True, cfg=None, noise="given", model_in=False),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_item10_fused_step_gradcheck(case):
    """A correct backward (the bonus): the reference row under autograd, checked by gradcheck in
    float64 against finite differences of the op itself."""
    c = GRAD_CASES[case]
    K, B, sh = c["K"], 2, (2, 3)
    gen = torch.Generator().manual_seed(7)
    T = torch.randn(2, table_width(K), dtype=torch.float64, generator=gen)
    d = torch.float64
    names = ["x", "y"] + (["cond"] if c["cfg"] is not None else []) + (["uncond"] if c["cfg"] else []) \
        + (["hist"] if K else []) + (["noise"] if c["noise"] == "given" else [])
    ins = [torch.randn(((K,) + sh) if n == "hist" else sh, dtype=d, generator=gen, requires_grad=True) for n in names]

    def f(*tensors):
        kw = dict(zip(names, tensors))
        x, y = kw.pop("x").clone(), kw.pop("y").clone()
        hist = kw.pop("hist").clone() if K else None
        mi = torch.zeros((2 * B,) + sh[1:], dtype=d) if c["model_in"] else None
        ops.fused_step(T, 1, x, y=y, hist=hist, hist_write=c["hist_write"], eval_y=c["eval_y"], write_x=True,
                       write_y=c["write_y"], seed=3, noise_id=5 if c["noise"] == "philox" else -1, model_in=mi,
                       **kw)
        return tuple(t for t in (x, y, hist, mi) if t is not None)
    assert torch.autograd.gradcheck(f, ins)


def test_item10_fused_step_float32_gradient_on_auto_matches_float64():
    gen = torch.Generator().manual_seed(1)
    T = torch.randn(1, table_width(1), dtype=torch.float64, generator=gen)
    grads = {}
    for d in (torch.float32, torch.float64):
        g2 = torch.Generator().manual_seed(2)
        c, u = (torch.randn(2, 3, generator=g2).to(d).requires_grad_() for _ in range(2))
        x, h = torch.randn(2, 3, generator=g2).to(d), torch.randn(1, 2, 3, generator=g2).to(d)
        ops.fused_step(T, 0, x, cond=c, uncond=u, hist=h, hist_write=0)
        (x.sum() + 2 * h.sum()).backward()
        grads[d] = (c.grad.double(), u.grad.double())
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item10_cfg_combine_backward(backend):
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    if backend == "reference":
        assert torch.autograd.gradcheck(lambda c, u: ops.cfg_combine(c, u, 3.5, backend=backend), (c, u))
        assert torch.autograd.gradcheck(lambda c: ops.cfg_combine(c, None, 3.5, backend=backend), (c,))
        assert torch.autograd.gradcheck(lambda c, u: ops.cfg_combine(c, u, 1.5, convention="1+w", backend=backend),
                                        (c, u))
    c32, u32 = c.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    out = ops.cfg_combine(c32, u32, 3.5, backend=backend)
    w = torch.randn(out.shape, generator=gen)
    (out * w).sum().backward()
    torch.testing.assert_close(c32.grad, 3.5 * w)
    torch.testing.assert_close(u32.grad, -2.5 * w)


def test_item10_cfg_combine_no_grad_mode_returns_plain_tensor():
    c = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        out = ops.cfg_combine(c, None, 2.0)
    assert not out.requires_grad


# =============================================================================================
# Item 11: overlapping tensors in ops.fused_step


def _flat_args(N=8):
    """A small 1-D fused_step case (batch N of scalars), K = 1."""
    gen = torch.Generator().manual_seed(3)
    T = torch.randn(1, table_width(1), dtype=torch.float64, generator=gen)
    return dict(table=T, row=0, x=torch.randn(N, generator=gen), y=None, cond=torch.randn(N, generator=gen),
                uncond=None, hist=torch.randn(1, N, generator=gen), hist_write=0, eval_y=False, write_x=True,
                write_y=False, noise=None, seed=0, noise_id=-1, model_in=None, model_in_from_y=False, bad_row=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["y shifted over x", "hist is x", "model_in over x", "cond shifted over x",
                                  "hist over y", "bad_row in x", "model_in over hist"])
def test_item11_overlapping_tensors_rejected(backend, case):
    N = 8
    a = _flat_args(N)
    base = torch.randn(3 * N + 8, generator=torch.Generator().manual_seed(4))
    if case == "y shifted over x":
        a.update(x=base[:N], y=base[4:N + 4], write_y=True)
    elif case == "hist is x":
        a.update(hist=a["x"].unsqueeze(0))
    elif case == "model_in over x":
        a.update(x=base[:N], model_in=base[N // 2:N // 2 + N])
    elif case == "cond shifted over x":
        a.update(x=base[:N], cond=base[1:N + 1])
    elif case == "hist over y":
        a.update(y=base[:N], hist=base[2:N + 2].unsqueeze(0), write_y=True)
    elif case == "bad_row in x":
        ib = torch.zeros(N, dtype=torch.int32)
        a.update(x=ib.view(torch.float32), bad_row=ib[3:4])
    elif case == "model_in over hist":
        a.update(hist=base[:N].unsqueeze(0), model_in=base[N - 2:2 * N - 2])
    assert_step_rejected(a, ValueError, "overlap", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item11_disjoint_views_of_one_buffer_are_fine(backend):
    N = 8
    a = _flat_args(N)
    base = torch.randn(4 * N, generator=torch.Generator().manual_seed(4))
    a.update(x=base[:N], y=base[N:2 * N], write_y=True, hist=base[2 * N:3 * N].unsqueeze(0),
             model_in=base[3 * N:4 * N])
    call_step(a, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item11_read_only_input_identical_to_x_is_fine(backend):
    """cond *is* x (a model returning its input): every kernel reads an element before it writes
    that element, so this is well defined on every backend, and equals the copied case."""
    a = _flat_args()
    b = dict(a, x=a["x"].clone(), hist=a["hist"].clone(), cond=a["x"].clone())
    a["cond"] = a["x"]
    call_step(a, backend)
    call_step(b, backend)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["hist"], b["hist"])


def test_item11_prepare_fused_step_rejects_overlapping_buffers():
    N = 8
    base = torch.zeros(2 * N)
    T = torch.zeros(1, table_width(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        ops.prepare_fused_step(base[:N], table=T, y=base[2:N + 2])
    with pytest.raises(ValueError, match="overlap"):
        ops.prepare_fused_step(base[:N], table=T, hist=base[:N].unsqueeze(0))


# =============================================================================================
# Item 13: argument checks of the sampler


def sampler_bad_calls():
    B = SHAPE[0]
    emb = torch.ones(B, 3)
    return {
        "seed float": (TypeError, "seed", dict(solver="euler_ancestral", seed=1.7)),
        "seed str": (TypeError, "seed", dict(solver="euler_ancestral", seed="5")),
        "seed bool": (TypeError, "seed", dict(solver="euler_ancestral", seed=True)),
        "seed negative": (ValueError, "seed", dict(solver="euler_ancestral", seed=-1)),
        "seed too big": (ValueError, "seed", dict(solver="euler_ancestral", seed=2 ** 64)),
        "init_noise_scale str": (TypeError, "init_noise_scale", dict(init_noise_scale="2")),
        "init_noise_scale nan": (ValueError, "init_noise_scale", dict(init_noise_scale=float("nan"))),
        "init_noise_scale negative": (ValueError, "init_noise_scale", dict(init_noise_scale=-1.0)),
        "init_noise_scale bool": (TypeError, "init_noise_scale", dict(init_noise_scale=True)),
        "x_init shape": (ValueError, r"x_init.*\(4, 2, 3\)", dict(x_init=torch.zeros(4, 2, 1))),
        "x_init list": (TypeError, "x_init", dict(x_init=[[0.0]])),
        "x_init int": (TypeError, "x_init", dict(x_init=torch.zeros(SHAPE, dtype=torch.int64))),
        "x_init nan": (ValueError, "x_init", dict(x_init=torch.full(SHAPE, float("nan")))),
        "cond list": (TypeError, "cond", dict(cond=[emb])),
        "uncond list": (TypeError, "uncond", dict(guidance=3.0, cond={"emb": emb}, uncond=[-emb])),
        "model_kwargs list": (TypeError, "model_kwargs", dict(model_kwargs=[emb])),
        "uncond keys differ": (ValueError, "keys", dict(guidance=3.0, cond={"emb": emb}, uncond={"e": -emb})),
        "backend unknown": (ValueError, "backend", dict(backend="cuda9")),
        "progress str": (TypeError, "progress", dict(progress="yes")),
        "callback not callable": (TypeError, "callback", dict(callback=3)),
        "noise_sampler not callable": (TypeError, "noise_sampler", dict(noise_sampler=3)),
        "generator wrong": (TypeError, "generator", dict(solver="euler_ancestral", generator=3)),
        "model_dtype wrong": (TypeError, "model_dtype", dict(model_dtype=torch.int32)),
        "model_dtype str": (TypeError, "model_dtype", dict(model_dtype="float16")),
    }


@pytest.mark.parametrize("case", list(sampler_bad_calls()))
def test_item13_sampler_bad_arguments(mixture, noise, case):
    exc, match, kw = sampler_bad_calls()[case]
    model = Recorder(mixture)
    snap = snapshot(noise, kw)
    with pytest.raises(exc, match=match):
        sample(model, noise, steps=5, **{"progress": False, **kw})
    assert model.calls == 0
    assert unchanged(snap)


def test_item13_noise_on_meta_device(mixture):
    with pytest.raises(ValueError, match="meta"):
        run(Recorder(mixture), torch.empty(SHAPE, device="meta"))


def test_item13_x_init_on_meta_device(mixture, noise):
    assert_rejected(mixture, noise, ValueError, "meta", x_init=torch.empty(SHAPE, device="meta"))


@pytest.mark.parametrize("seed", [np.int64(7), np.uint32(7), 7])
def test_item13_numpy_integer_seed_accepted(mixture, noise, seed):
    a = run(mixture, noise, solver="euler_ancestral", seed=seed)
    b = run(mixture, noise, solver="euler_ancestral", seed=7)
    assert torch.equal(a, b)


def test_item13_numpy_float_init_noise_scale_accepted(mixture, noise):
    a = run(mixture, noise, init_noise_scale=np.float32(2.0))
    b = run(mixture, noise, init_noise_scale=2)
    assert torch.equal(a, b)


def test_item13_uncond_without_guidance_warns_and_is_unused(mixture, noise):
    """Not an error: fastdiff's own helpers (sample_digits, distributed.generate) always pass the
    unconditional inputs and let ``guidance`` decide; but a user who forgot ``guidance=`` is told."""
    emb = torch.ones(SHAPE[0], 3)
    model = Recorder(lambda x, t, emb=None: mixture(x, t))
    with pytest.warns(UserWarning, match="uncond.*guidance"):
        a = run(model, noise, cond={"emb": emb}, uncond={"emb": -emb})
    assert model.calls == 5
    assert torch.equal(a, run(mixture, noise))


def test_item13_uncond_with_guidance_scale_1_is_accepted(mixture, noise):
    """g = 1 skips the unconditional pass by design (guidance sweeps pass uncond throughout)."""
    emb = torch.ones(SHAPE[0], 3)
    model = Recorder(lambda x, t, emb=None: mixture(x, t))
    run(model, noise, guidance=1.0, cond={"emb": emb}, uncond={"emb": -emb})
    assert model.calls == 5


@pytest.mark.parametrize("kw, exc, match", [
    (dict(interval=(1.0,)), ValueError, "interval"),
    (dict(interval=(1.0, 2.0, 3.0)), ValueError, "interval"),
    (dict(interval=1.0), TypeError, "interval"),
    (dict(interval=("a", "b")), TypeError, "interval"),
    (dict(interval=(0.0, float("nan"))), ValueError, "interval"),
    (dict(interval=(float("nan"), 1.0)), ValueError, "interval"),
    (dict(scale="2.5"), ValueError, "scale"),
    (dict(convention=None), ValueError, "convention"),
], ids=["1-tuple", "3-tuple", "number", "strings", "hi nan", "lo nan", "scale str", "convention None"])
def test_item13_guidance_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        Guidance(3.0, **{k: v for k, v in kw.items() if k != "scale"}) if "scale" not in kw else Guidance(**kw)


def test_item13_numpy_guidance_scale_accepted(mixture, noise):
    emb = torch.ones(SHAPE[0], 3)
    model = (lambda x, t, emb=None: mixture(x, t))
    kw = dict(cond={"emb": emb}, uncond={"emb": -emb})
    want = run(model, noise, guidance=3.0, **kw)
    for g in (np.float32(3.0), np.int64(3), Guidance(np.float64(3.0))):
        assert torch.equal(run(model, noise, guidance=g, **kw), want)
    with pytest.raises(TypeError, match="guidance"):
        run(model, noise, guidance=np.bool_(True), **kw)


def test_item13_guidance_interval_infinite_hi_and_numpy_accepted():
    g = Guidance(3.0, interval=(np.float64(0.1), float("inf")))
    assert g.interval == (0.1, float("inf"))


# =============================================================================================
# Item 13: argument checks of the ops


STEP_BAD = {
    "hist_write float": (dict(hist_write=0.5), TypeError, "hist_write"),
    "hist_write bool": (dict(hist_write=True), TypeError, "hist_write"),
    "noise_id float": (dict(noise_id=1.5), TypeError, "noise_id"),
    "noise_id bool": (dict(noise_id=True), TypeError, "noise_id"),
    "noise_id below -1": (dict(noise_id=-2), ValueError, "noise_id"),
    "row bool": (dict(row=True), TypeError, "row"),
    "row float": (dict(row=1.0), TypeError, "row"),
    "seed float": (dict(seed=5.5), TypeError, "seed"),
    "seed str": (dict(seed="5"), TypeError, "seed"),
    "eval_y int": (dict(eval_y=2), TypeError, "eval_y"),
    "write_x str": (dict(write_x="yes"), TypeError, "write_x"),
    "model_in_from_y None": (dict(model_in_from_y=None), TypeError, "model_in_from_y"),
    "table nan": ("nan", ValueError, r"table.*(NaN|finite)"),
    "table inf": ("inf", ValueError, r"table.*(NaN|finite)"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(STEP_BAD))
def test_item13_fused_step_bad_scalars(backend, case):
    change, exc, match = STEP_BAD[case]
    args = _step_args()
    if isinstance(change, str):
        args["table"][0, 3] = float(change)
    else:
        args.update(change)
    assert_step_rejected(args, exc, match, backend)


FLAGS_BAD = {
    "flags bool": (True, TypeError, "flags must be an int"),
    "flags float": (6.0, TypeError, "flags must be an int"),
    "flags next bit": (FLAG_ALL + 1 + FLAG_WRITE_X, ValueError, "flags has unknown row flag bits 0x10"),
    "flags high bit": (FLAG_WRITE_X | (1 << 40), ValueError, "flags has unknown row flag bits 0x10000000000"),
    "flags negative": (-1, ValueError, "flags has unknown row flag bits"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FLAGS_BAD))
def test_item13_fused_step_bad_flags(backend, case):
    """The backends' flags argument (one bitmask) through the validated op: an int with known bits
    only, else an error naming it, and nothing written."""
    from fastdiff.ops import api
    flags, exc, match = FLAGS_BAD[case]
    args = _step_args()
    packed = pack_flags(*(args.pop(n) for n in FLAG_ARG_NAMES))
    assert packed == FLAG_WRITE_X | FLAG_WRITE_Y
    args["hist_writes"] = 1 << args.pop("hist_write")          # (the backends' form: a bitmask of slots)
    snap = snapshot(args)
    with pytest.raises(exc, match=match):
        api._fused_step(*[dict(args, flags=flags).get(k) for k in STEP_ARG_NAMES], backend=backend)
    assert unchanged(snap), "a rejected fused_step modified its arguments"


@pytest.mark.parametrize("backend", BACKENDS)
def test_item13_fused_step_numpy_integers_accepted(backend):
    a, b = _step_args(), _step_args()
    a.update(row=np.int64(0), hist_write=np.int32(0), seed=np.uint64(5), noise_id=np.int16(2),
             eval_y=np.bool_(False), write_x=np.bool_(True))
    call_step(a, backend)
    call_step(b, backend)
    for k in ("x", "y", "hist", "model_in"):
        assert torch.equal(a[k], b[k]), k


def test_item13_fused_step_on_meta_device():
    T = torch.zeros(1, table_width(0), dtype=torch.float64, device="meta")
    m = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        ops.fused_step(T, 0, m)
    with pytest.raises(ValueError, match="meta"):
        ops.prepare_fused_step(m, table=T)


def test_item13_prepare_fused_step_rejects_nonfinite_table():
    x = torch.zeros(2, 3)
    T = torch.zeros(2, table_width(0), dtype=torch.float64)
    T[1, 2] = float("nan")
    with pytest.raises(ValueError, match="table"):
        ops.prepare_fused_step(x, table=T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        (-float("inf"), ValueError), ("2.5", TypeError), (None, TypeError),
                                        (True, TypeError), (torch.tensor(2.0), TypeError)],
                         ids=["nan", "inf", "-inf", "str", "None", "bool", "tensor"])
def test_item13_cfg_combine_bad_scale(backend, scale, exc):
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    snap = snapshot(c, u)
    with pytest.raises(exc, match="scale"):
        ops.cfg_combine(c, u, scale, backend=backend)
    assert unchanged(snap)


@pytest.mark.parametrize("g", [float("nan"), float("inf")])
def test_item13_cfg_combine_custom_op_rejects_nonfinite_scale(g):
    c = torch.randn(2, 3)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.fastdiff.cfg_combine(c, None, g, None, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_item13_cfg_combine_numpy_scale_accepted(backend):
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(ops.cfg_combine(c, u, np.float32(2.5), backend=backend),
                       ops.cfg_combine(c, u, 2.5, backend=backend))
    assert torch.equal(ops.cfg_combine(c, u, np.int64(2), backend=backend), ops.cfg_combine(c, u, 2, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, exc, match", [
    ((2.7, 3), TypeError, "shape"),
    ((2, "3"), TypeError, "shape"),
    ((True, 3), TypeError, "shape"),
    ((2, -1), ValueError, "shape"),
    ("23", TypeError, "shape"),
    (None, TypeError, "shape"),
    (2.0, TypeError, "shape"),
], ids=["float", "str item", "bool", "negative", "str", "None", "float scalar"])
def test_item13_philox_normal_bad_shape(backend, shape, exc, match):
    with pytest.raises(exc, match=match):
        ops.philox_normal(shape, 0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item13_philox_normal_int_and_numpy_shapes(backend):
    want = ops.philox_normal((5,), 3, 1, backend=backend)
    assert torch.equal(ops.philox_normal(5, 3, 1, backend=backend), want)
    assert torch.equal(ops.philox_normal(np.int64(5), 3, 1, backend=backend), want)
    assert torch.equal(ops.philox_normal((np.int64(5),), np.uint64(3), np.int32(1), backend=backend), want)
    assert torch.equal(ops.philox_normal(torch.Size([5]), 3, 1, backend=backend), want)
    assert ops.philox_normal(np.array([2, 3]), 3, 1, backend=backend).shape == (2, 3)


@pytest.mark.parametrize("seed, noise_id, exc, match", [
    (1.5, 0, TypeError, "seed"), (True, 0, TypeError, "seed"), ("1", 0, TypeError, "seed"),
    (-1, 0, ValueError, "seed"), (0, 1.5, TypeError, "noise_id"), (0, True, TypeError, "noise_id"),
    (0, -1, ValueError, "noise_id"),
], ids=["seed float", "seed bool", "seed str", "seed negative", "id float", "id bool", "id negative"])
def test_item13_philox_normal_bad_seed_and_id(seed, noise_id, exc, match):
    with pytest.raises(exc, match=match):
        ops.philox_normal((3,), seed, noise_id)


# =============================================================================================
# Item 14: schedule and grid parameters


SCHEDULE_BAD = {
    "flow T 0": (lambda: FlowMatching(num_train_timesteps=0), ValueError, "num_train_timesteps"),
    "flow T float": (lambda: FlowMatching(num_train_timesteps=10.5), TypeError, "num_train_timesteps"),
    "flow T bool": (lambda: FlowMatching(num_train_timesteps=True), TypeError, "num_train_timesteps"),
    "flow t_max 2": (lambda: FlowMatching(t_max=2.0), ValueError, "t_max"),
    "flow t_min negative": (lambda: FlowMatching(t_min=-0.1), ValueError, "t_min"),
    "flow t_min >= t_max": (lambda: FlowMatching(t_min=0.5, t_max=0.5), ValueError, "t_min"),
    "flow t_min nan": (lambda: FlowMatching(t_min=float("nan")), ValueError, "t_min"),
    "flow t_max str": (lambda: FlowMatching(t_max="1"), TypeError, "t_max"),
    "vp beta_start nan": (lambda: DiscreteVP(beta_start=float("nan")), ValueError, "beta_start"),
    "vp beta_end nan": (lambda: DiscreteVP(beta_end=float("nan")), ValueError, "beta_end"),
    "vp beta_end 1": (lambda: DiscreteVP(beta_end=1.0), ValueError, "beta_end"),
    "vp beta_end inf": (lambda: DiscreteVP(beta_end=float("inf")), ValueError, "beta_end"),
    "vp beta_start 0": (lambda: DiscreteVP(beta_start=0.0), ValueError, "beta_start"),
    "vp beta_start str": (lambda: DiscreteVP(beta_start="0.1"), TypeError, "beta_start"),
    "vp T 1": (lambda: DiscreteVP(num_train_timesteps=1), ValueError, "num_train_timesteps"),
    "vp T float": (lambda: DiscreteVP(num_train_timesteps=100.5), TypeError, "num_train_timesteps"),
    "vp betas nan": (lambda: DiscreteVP(betas=[0.1, float("nan"), 0.2]), ValueError, "betas"),
    "vp schedule None": (lambda: DiscreteVP(beta_schedule=None), ValueError, "beta_schedule"),
    "ve sigma_max inf": (lambda: VESchedule(sigma_max=float("inf")), ValueError, "sigma_max"),
    "ve sigma_data 0": (lambda: VESchedule(sigma_data=0.0), ValueError, "sigma_data"),
    "ve sigma_data nan": (lambda: VESchedule(sigma_data=float("nan")), ValueError, "sigma_data"),
    "cvp beta_max inf": (lambda: ContinuousVP(beta_max=float("inf")), ValueError, "beta_max"),
    "cvp t_max inf": (lambda: ContinuousVP(t_max=float("inf")), ValueError, "t_max"),
}


@pytest.mark.parametrize("case", list(SCHEDULE_BAD))
def test_item14_schedule_parameters_validated(case):
    make, exc, match = SCHEDULE_BAD[case]
    with pytest.raises(exc, match=match):
        make()


def test_item14_numpy_parameters_accepted():
    a = FlowMatching(num_train_timesteps=np.int64(1000), t_max=np.float64(1.0))
    assert a.num_train_timesteps == 1000
    b = DiscreteVP(num_train_timesteps=np.int32(1000), beta_start=np.float32(0.00085).item(), beta_end=0.012)
    assert b.num_train_timesteps == 1000


GRID_BAD = {
    "shift nan": (dict(shift=float("nan")), ValueError, "shift"),
    "shift inf": (dict(shift=float("inf")), ValueError, "shift"),
    "shift 0": (dict(shift=0.0), ValueError, "shift"),
    "shift huge": (dict(shift=1e300), ValueError, "shift"),
    "shift str": (dict(shift="3"), TypeError, "shift"),
    "mu nan": (dict(mu=float("nan")), ValueError, "mu"),
    "mu inf": (dict(mu=float("inf")), ValueError, "mu"),
    "mu huge": (dict(mu=1e3), ValueError, "mu"),
    "mu large": (dict(mu=50.0), ValueError, "mu"),
    "mu very negative": (dict(mu=-1e3), ValueError, "mu"),
    "t_max 2": (dict(t_max=2.0), ValueError, "t_max"),
    "t_min negative": (dict(t_min=-0.5), ValueError, "t_min"),
    "t_min nan": (dict(t_min=float("nan")), ValueError, "t_min"),
}


@pytest.mark.parametrize("case", list(GRID_BAD))
def test_item14_flow_grid_parameters_validated(case):
    kw, exc, match = GRID_BAD[case]
    with pytest.raises(exc, match=match):
        make_grid(FlowMatching(), 4, **kw)


@pytest.mark.parametrize("case", list(GRID_BAD)[:10])
def test_item14_time_shift_validated(case):
    kw, exc, match = GRID_BAD[case]
    with pytest.raises(exc, match=match):
        time_shift(np.linspace(1.0, 0.001, 4), **kw)


@pytest.mark.parametrize("rho, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("7", TypeError)],
                         ids=["0", "negative", "nan", "inf", "str"])
def test_item14_karras_rho_validated(rho, exc):
    with pytest.raises(exc, match="rho"):
        make_grid(VESchedule(), 4, "karras", rho=rho)


@pytest.mark.parametrize("kw, exc, match", [(dict(steps_offset=1.5), TypeError, "steps_offset"),
                                            (dict(steps_offset=-1), ValueError, "steps_offset")])
def test_item14_steps_offset_validated(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_grid(DiscreteVP(), 4, "leading", **kw)


def test_item14_sampler_rejects_bad_grid_options_before_model_call(mixture, noise):
    fm = FlowMatching()
    assert_rejected(GaussianMixture.default(fm, dim=6, prediction="flow"), noise, ValueError, "shift",
                    schedule=fm, prediction="flow", grid_options=dict(shift=float("nan")))


def test_item14_valid_shift_and_mu_still_work():
    a = make_grid(FlowMatching(), 8, shift=3.0)
    b = make_grid(FlowMatching(), 8, mu=math.log(3.0))
    np.testing.assert_allclose(a.t, b.t, rtol=1e-12)
    assert np.all(np.diff(a.t) < 0)


@pytest.mark.parametrize("ks", [[10.0, float("nan"), 0.0], [float("inf"), float("inf"), 1.0, 0.0]],
                         ids=["nan", "inf twice"])
def test_item14_grid_rejects_nan_and_repeated_levels(ks):
    with pytest.raises(ValueError, match="Grid|strictly decrease"):
        from fastdiff.schedules import Grid
        Grid.from_ksigmas(DiscreteVP(zero_terminal_snr=True), np.array(ks))
