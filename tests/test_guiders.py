"""Single-pass non-linear guidance methods (fastdiff.guiders) against diffusers' guiders.

* Parity, step by step (APG's momentum carried over several evaluations): our
  ``Guider.combine`` through the ``GuidanceHook`` path vs ``diffusers.guiders.<Class>.forward``
  on the same float32 cond/uncond tensors; tolerance ``peer_tolerance(diffusers fp32,
  diffusers fp64)`` (diffusers' own float32 error, with margin).
* CFG renorm (ComfyUI's RenormCFG; diffusers has none): a textbook oracle in float64 written
  from the formula, with ComfyUI's whole-batch branch on one sample at a time.
* End to end: ``fastdiff.sample(..., guidance=Guidance(w, method=...))`` with DPM-Solver++(2M)
  equals diffusers' DPMSolverMultistepScheduler loop with the diffusers guider applied to the
  model outputs (float64; the guider told the step index as a pipeline does), and APG's
  momentum restarts on every run.
* FDG: diffusers' FrequencyDecoupledGuidance with kornia's pyramid (skipped without kornia)
  and over a numpy textbook Laplacian pyramid (always); our pyramid vs the textbook one.
* CFG renorm end to end against the oracle in the same DPM-Solver++ loop.
* No method reads a tensor back to the host (item/bool/float/tolist raise while it runs).
* Bad options raise ValueError.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import DiscreteVP, Grid, Guidance
from fastdiff.guiders import APG, TCFG, CFGRenorm, CFGZeroStar, MamboG
from fastdiff.models import GaussianMixture

from conftest import assert_close_to_peer, peer_tolerance

diffusers = pytest.importorskip("diffusers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import DPMSolverMultistepScheduler  # noqa: E402
    from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance,  # noqa: E402
                                   MagnitudeAwareGuidance, TangentialClassifierFreeGuidance)
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the reference backend.*")
        warnings.filterwarnings("ignore", message=".*Guiders are currently an experimental.*")
        yield


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pairs(shape, n, seed):
    """n (cond, uncond) pairs in float64, correlated as real model outputs are."""
    out = []
    for k in range(n):
        u = _randn(*shape, seed=seed + 2 * k)
        c = 0.8 * u + 0.5 * _randn(*shape, seed=seed + 2 * k + 1)
        out.append((c, u))
    return out


def _peer(kind, opts, w, original):
    o = dict(opts)
    if kind == "apg":
        return AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_momentum=o.get("momentum"),
                                         adaptive_projected_guidance_rescale=o.get("norm_threshold", 15.0),
                                         eta=o.get("eta", 1.0), guidance_rescale=o.get("rescale", 0.0),
                                         use_original_formulation=original)
    if kind == "zero":
        return ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=o.get("zero_init_steps", 1),
                                              guidance_rescale=o.get("rescale", 0.0),
                                              use_original_formulation=original)
    if kind == "tcfg":
        return TangentialClassifierFreeGuidance(guidance_scale=w, guidance_rescale=o.get("rescale", 0.0),
                                                use_original_formulation=original)
    if kind == "mambo":
        return MagnitudeAwareGuidance(guidance_scale=w, alpha=o.get("alpha", 8.0),
                                      guidance_rescale=o.get("rescale", 0.0), use_original_formulation=original)
    raise AssertionError(kind)


def _ours(kind, opts, w, original):
    o = {k: v for k, v in opts.items() if k != "rescale"}
    method = {"apg": APG, "zero": CFGZeroStar, "tcfg": TCFG, "mambo": MamboG}[kind](**o)
    return Guidance(w, convention="1+w" if original else "w", rescale=opts.get("rescale", 0.0), method=method)


def _exact64_patch(kind):
    """diffusers' TCFG and CFG-Zero* cast to float32 inside (``.float()``) even for float64
    inputs; for their float64 reference the same formulas run in float64."""
    import contextlib
    from unittest import mock
    from diffusers.guiders import classifier_free_zero_star_guidance as Zm
    from diffusers.guiders import tangential_classifier_free_guidance as Tm
    if kind == "zero":
        def scale64(cond, uncond, eps=1e-8):
            return (cond * uncond).sum(1, keepdim=True) / ((uncond ** 2).sum(1, keepdim=True) + eps)
        return mock.patch.object(Zm, "cfg_zero_star_scale", scale64)
    if kind == "tcfg":
        def tcfg64(pred_cond, pred_uncond, guidance_scale, use_original_formulation=False):
            M = torch.stack([pred_cond, pred_uncond], 1).flatten(2)
            _, _, Vh = torch.linalg.svd(M, full_matrices=False)
            v1 = Vh[:, 0]
            up = ((pred_uncond.flatten(1) * v1).sum(1, keepdim=True) * v1).reshape(pred_uncond.shape)
            base = pred_cond if use_original_formulation else up
            return base + guidance_scale * (pred_cond - up)
        return mock.patch.object(Tm, "normalized_guidance", tcfg64)
    return contextlib.nullcontext()


def _run_peer(kind, opts, w, original, pairs, dtype, steps):
    if dtype == torch.float64:
        with _exact64_patch(kind):
            return _run_peer32(kind, opts, w, original, pairs, dtype, steps)
    return _run_peer32(kind, opts, w, original, pairs, dtype, steps)


def _run_peer32(kind, opts, w, original, pairs, dtype, steps):
    g = _peer(kind, opts, w, original)
    outs = []
    for i, (c, u) in enumerate(pairs):
        g.set_state(i, steps, torch.tensor(999 - i))
        if i == 0 and kind == "apg" and opts.get("momentum") is not None:
            g.momentum_buffer = MomentumBuffer(opts["momentum"])     # what prepare_inputs does at step 0
        if kind == "mambo" and c.dim() > 3:
            # diffusers' mambo_guidance calls torch.norm(dim=[1, 2, 3]), which torch refuses
            # (matrix_norm needs 2 dims): it runs on [B, seq, C] only. Norms over all non-batch
            # dims are unchanged by flattening the trailing dims, so flatten for it.
            pc, pu = c.to(dtype).flatten(2), u.to(dtype).flatten(2)
            outs.append(g.forward(pc, pu).pred.reshape(c.shape))
            continue
        outs.append(g.forward(c.to(dtype), u.to(dtype)).pred)
    return outs


class _Row:
    def __init__(self, step):
        self.step = step


def _run_ours(guidance, pairs, dtype):
    """The hook's guidance path, row by row (one evaluation per step)."""
    from fastdiff.guidance import GuidanceHook
    hook = GuidanceHook.__new__(GuidanceHook)
    hook.guidance, hook.state = guidance, {}
    hook.g, hook.table, hook.x0_table = None, None, None
    m, g = guidance.method, guidance.g
    outs = []
    for i, (c, u) in enumerate(pairs):
        D = m.pre(c.to(dtype), i)
        if D is None:
            D = m.combine(c.to(dtype), u.to(dtype), g, guidance.convention == "1+w", i, hook.state)
            if guidance.rescale > 0:
                from fastdiff.ops.reductions import cfg_rescale
                D = cfg_rescale(c.to(dtype).to(D.dtype), D, 0.0, guidance.rescale)
        outs.append(D)
    return outs


CASES = [
    ("apg", {"momentum": None, "norm_threshold": 0.0, "eta": 1.0}),
    ("apg", {"momentum": -0.5, "norm_threshold": 15.0, "eta": 0.0}),
    ("apg", {"momentum": 0.7, "norm_threshold": 4.0, "eta": 0.3}),
    ("apg", {"momentum": -0.75, "norm_threshold": 2.5, "eta": 1.0, "rescale": 0.7}),
    ("zero", {"zero_init_steps": 0}),
    ("zero", {"zero_init_steps": 2}),
    ("zero", {"zero_init_steps": 1, "rescale": 0.5}),
    ("tcfg", {}),
    ("tcfg", {"rescale": 0.7}),
    ("mambo", {"alpha": 8.0}),
    ("mambo", {"alpha": 0.5, "rescale": 0.3}),
]


@pytest.mark.parametrize("kind,opts", CASES)
@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 16, 5)])
def test_parity_with_diffusers_guiders(kind, opts, original, shape):
    w = 5.0
    steps = 5
    pairs = _pairs(shape, steps, seed=hash((kind, len(shape))) % 1000)
    peer32 = _run_peer(kind, opts, w, original, pairs, torch.float32, steps)
    peer64 = _run_peer(kind, opts, w, original, pairs, torch.float64, steps)
    gd = _ours(kind, opts, w, original)
    ours = _run_ours(gd, pairs, torch.float32)
    for i, (o, p32, p64) in enumerate(zip(ours, peer32, peer64)):
        assert o.dtype == torch.float32
        if kind == "zero" and i < opts["zero_init_steps"]:
            # zero-init: D = 0 (diffusers then rescales 0 by std(cond)/std(0) = NaN when
            # guidance_rescale > 0; we keep the zero)
            assert torch.equal(o, torch.zeros_like(o))
            if opts.get("rescale", 0.0) > 0:
                continue
        # floor: 8 ulps of the output scale (the reductions are over hundreds of elements)
        tol = peer_tolerance(p32, p64) + 8 * torch.finfo(torch.float32).eps * p64.abs().max().item()
        assert_close_to_peer(o, p32, tol, f"{kind} {opts} step {i}")
    # float64 in, float64 out, against diffusers in float64
    ours64 = _run_ours(gd, pairs, torch.float64)
    for o, p64 in zip(ours64, peer64):
        if torch.isnan(p64).any():
            continue
        torch.testing.assert_close(o, p64, rtol=0, atol=1e-6 * p64.abs().max().item())


def test_tcfg_equals_the_svd_projection():
    """The 2x2 closed form vs torch.linalg.svd of [c; u] (float64), incl. degenerate rows."""
    c = _randn(4, 3, 7, seed=5)
    u = _randn(4, 3, 7, seed=6)
    u[1] = 2.0 * c[1]            # rank one
    u[2] = 0.0                   # zero uncond
    c[3] = 0.0; u[3] = 0.0       # all zero
    ours = TCFG().combine(c, u, 1.0, False, 0, {}) - 0 * c  # g = 1: D = c
    torch.testing.assert_close(ours, c)
    g = 3.0
    ours = TCFG().combine(c, u, g, False, 0, {})
    M = torch.stack([c, u], 1).flatten(2)
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    v1 = Vh[:, 0]
    up = ((u.flatten(1) * v1).sum(1, keepdim=True) * v1).reshape(u.shape)
    torch.testing.assert_close(ours, up + g * (c - up), rtol=0, atol=1e-12)


def _renorm_oracle(c, u, g, r):
    """ComfyUI RenormCFG (renorm_cfg_func inside cfg_trunc), one sample at a time."""
    out = []
    for cb, ub in zip(c.double(), u.double()):
        half = ub + g * (cb - ub)
        if r > 0:
            mx = torch.linalg.vector_norm(cb) * r
            nn = torch.linalg.vector_norm(half)
            if nn >= mx:
                half = half * (mx / nn)
        out.append(half)
    return torch.stack(out)


@pytest.mark.parametrize("r", [0.0, 0.5, 1.0, 1.3, 10.0])
def test_cfg_renorm_textbook_oracle(r):
    pairs = _pairs((4, 4, 6, 6), 1, seed=40)
    c, u = pairs[0]
    u[1] = c[1]                                   # D = c: at the cap when r = 1
    expected = _renorm_oracle(c, u, 4.0, r)
    ours = CFGRenorm(r).combine(c.float(), u.float(), 4.0, False, 0, {})
    tol = 8 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert_close_to_peer(ours, expected, tol, f"renorm {r}")
    torch.testing.assert_close(CFGRenorm(r).combine(c, u, 4.0, False, 0, {}), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# End to end: fastdiff.sample vs the diffusers scheduler loop with the diffusers guider

SHAPE = (3, 4, 2, 2)


class CondMixture:
    """Conditional epsilon model: the mixture's exact eps shifted non-linearly by c in {0, 1}."""

    def __init__(self, schedule):
        self.gm = GaussianMixture.default(schedule, dim=int(np.prod(SHAPE[1:])))
        self.batches = []

    def __call__(self, x, t, c):
        self.batches.append(x.shape[0])
        return self.gm(x, t) + 0.4 * c.reshape(-1, 1, 1, 1).to(x.dtype) * torch.tanh(x + 0.5)


def _sched(n):
    s = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(n)
    return s


def _diffusers_loop(sched, model, noise, guider, momentum=None):
    B = noise.shape[0]
    zeros, ones = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    x = noise * sched.init_noise_sigma
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        guider.set_state(i, n, t)
        if i == 0 and momentum is not None:
            guider.momentum_buffer = MomentumBuffer(momentum)
        tt = torch.full((B,), float(t), dtype=torch.float64)
        # [B, C, H*W]: every guider here reduces over all non-batch dims, so this changes nothing
        # but lets diffusers' MagnitudeAwareGuidance run (its torch.norm takes 2 dims at most)
        eps = guider.forward(model(x, tt, ones).flatten(2), model(x, tt, zeros).flatten(2)).pred.reshape(x.shape)
        x = sched.step(eps, t, x).prev_sample
    return x


def _ours_run(model, noise, grid, guidance):
    B = noise.shape[0]
    return fastdiff.sample(model, noise, grid=grid, solver="dpmpp_2m", guidance=guidance,
                           cond={"c": torch.ones(B, dtype=torch.float64)},
                           uncond={"c": torch.zeros(B, dtype=torch.float64)},
                           state_dtype=torch.float64, progress=False,
                           solver_options={"lower_order_final": True})


E2E = [
    (APG(momentum=-0.5, norm_threshold=2.0, eta=0.0),
     lambda w: AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_momentum=-0.5,
                                         adaptive_projected_guidance_rescale=2.0, eta=0.0), -0.5),
    (CFGZeroStar(zero_init_steps=1),
     lambda w: ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1), None),
    (TCFG(), lambda w: TangentialClassifierFreeGuidance(guidance_scale=w), None),
    (MamboG(alpha=2.0), lambda w: MagnitudeAwareGuidance(guidance_scale=w, alpha=2.0), None),
]


@pytest.mark.parametrize("method,peer,momentum", E2E, ids=["apg", "cfg_zero_star", "tcfg", "mambo_g"])
def test_sample_matches_diffusers_loop_with_guider(method, peer, momentum):
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    w = 5.0
    sched = _sched(8)
    noise = _randn(*SHAPE, seed=21)
    expected = _diffusers_loop(sched, model, noise, peer(w), momentum)
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    ours = _ours_run(model, noise, grid, Guidance(w, method=method))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # the method matters: plain CFG is far away
    plain = _ours_run(model, noise, grid, Guidance(w))
    assert (plain - expected).abs().max() > 1e-3
    # a second run is the same (APG's momentum restarts per run)
    again = _ours_run(model, noise, grid, Guidance(w, method=method))
    assert torch.equal(again, ours)


def test_method_by_name_and_interval():
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    sched = _sched(6)
    noise = _randn(*SHAPE, seed=3)
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    a = _ours_run(model, noise, grid, Guidance(4.0, method="tcfg"))
    b = _ours_run(model, noise, grid, Guidance(4.0, method=TCFG()))
    assert torch.equal(a, b)
    # g = 1 everywhere: the method is never applied and no uncond pass runs
    model.batches.clear()
    c1 = _ours_run(model, noise, grid, Guidance(1.0, method=APG()))
    assert set(model.batches) == {SHAPE[0]}
    torch.testing.assert_close(c1, _ours_run(model, noise, grid, Guidance(1.0)), rtol=0, atol=0)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown guidance method"):
        Guidance(5.0, method="nope")
    with pytest.raises(ValueError, match="Guider instance"):
        Guidance(5.0, method=3)
    with pytest.raises(ValueError, match="norm_threshold"):
        APG(norm_threshold=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        APG(momentum=float("nan"))
    with pytest.raises(ValueError, match="eta"):
        APG(eta="1")
    with pytest.raises(ValueError, match="batch dimension"):
        APG(norm_dim=(0, 1))
    with pytest.raises(ValueError, match="norm_dim"):
        APG(norm_dim="x")
    with pytest.raises(ValueError, match="zero_init_steps"):
        CFGZeroStar(zero_init_steps=-1)
    with pytest.raises(ValueError, match="zero_init_steps"):
        CFGZeroStar(zero_init_steps=1.5)
    with pytest.raises(ValueError, match="alpha"):
        MamboG(alpha=-1.0)
    with pytest.raises(ValueError, match="renorm"):
        CFGRenorm(float("inf"))
    # a method with per-sample scales is allowed (tests/test_extra_pass_guidance.py); FDG's level
    # scales replace the scale, and rescale takes one scalar scale
    assert Guidance([2.0, 3.0], method="apg").per_sample
    with pytest.raises(ValueError, match="per-sample.*FDG"):
        Guidance([2.0, 3.0], method="fdg")
    with pytest.raises(ValueError, match="per-sample"):
        Guidance([2.0, 3.0], method="apg", rescale=0.5)


# ---------------------------------------------------------------------------------------------
# Frequency-decoupled guidance: diffusers' FrequencyDecoupledGuidance (needs kornia for its
# Laplacian pyramid) and, without kornia, the same guider code over a numpy textbook pyramid.

from fastdiff.guiders import FDG, from_pyramid, laplacian_pyramid  # noqa: E402


def _np_blur(x):
    """5x5 binomial [1 4 6 4 1]^2/256 on the last two axes, reflect (mirror without the edge)."""
    k = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16.0
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(2, 2), (2, 2)], mode="reflect")
    H, W = x.shape[-2:]
    rows = sum(k[i] * p[..., i:i + H, :] for i in range(5))
    return sum(k[j] * rows[..., :, j:j + W] for j in range(5))


def _np_down(x):
    """Bilinear halving, align_corners=False: the mean of each 2x2 block."""
    b = _np_blur(x)
    return 0.25 * (b[..., 0::2, 0::2] + b[..., 1::2, 0::2] + b[..., 0::2, 1::2] + b[..., 1::2, 1::2])


def _np_up1(x, axis):
    """Bilinear doubling along ``axis`` (align_corners=False, borders clamped)."""
    x = np.moveaxis(x, axis, -1)
    prev = np.concatenate([x[..., :1], x[..., :-1]], -1)
    nxt = np.concatenate([x[..., 1:], x[..., -1:]], -1)
    out = np.empty(x.shape[:-1] + (2 * x.shape[-1],))
    out[..., 0::2] = 0.75 * x + 0.25 * prev
    out[..., 1::2] = 0.75 * x + 0.25 * nxt
    return np.moveaxis(out, -1, axis)


def _np_up(x):
    return _np_blur(_np_up1(_np_up1(x, -2), -1))


def _np_pyramid(x, levels):
    x = np.asarray(x, dtype=np.float64)
    g = [x]
    for _ in range(levels - 1):
        g.append(_np_down(g[-1]))
    return [g[i] - _np_up(g[i + 1]) for i in range(levels - 1)] + [g[-1]]


def test_laplacian_pyramid_textbook():
    x = _randn(2, 3, 16, 32, seed=9)
    ours, ref = laplacian_pyramid(x, 3), _np_pyramid(x.numpy(), 3)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o.numpy(), r, rtol=0, atol=1e-13)
    torch.testing.assert_close(from_pyramid(ours), x, rtol=0, atol=1e-13)   # exact reconstruction


def _fdg_peer(scales, pw, original, rescale, textbook):
    from contextlib import ExitStack
    from unittest import mock
    from diffusers.guiders import frequency_decoupled_guidance as Fm
    stack = ExitStack()
    if textbook:
        def pyr(x, levels):
            return [torch.from_numpy(a).to(x.dtype) for a in _np_pyramid(x.double().numpy(), levels)]
        stack.enter_context(mock.patch.object(Fm, "_CAN_USE_KORNIA", True))
        stack.enter_context(mock.patch.object(Fm, "build_laplacian_pyramid_func", pyr))
        stack.enter_context(mock.patch.object(
            Fm, "upsample_and_blur_func", lambda x: torch.from_numpy(_np_up(x.double().numpy())).to(x.dtype)))
    with stack:
        g = Fm.FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=pw,
                                          guidance_rescale=rescale, use_original_formulation=original)
    return g, stack


# No level at scale 1 here: diffusers' forward then appends the previous level's cond band
# (a stale loop variable, ``pred_cond_freq``), a bug; ours keeps the level's own cond band,
# checked in test_fdg_sample_and_bad_options.
FDG_CASES = [((10.0, 5.0), None, 0.0), ((7.0, 3.0, 2.0), (0.5, 1.0, 0.2), 0.0), ((6.0, 2.0), 0.0, 0.6)]


def _fdg_compare(textbook, scales, pw, rescale, original, shape):
    from unittest import mock
    from diffusers.guiders import frequency_decoupled_guidance as Fm
    pairs = _pairs(shape, 1, seed=31)
    c, u = pairs[0]
    peers = {}
    for dt in (torch.float32, torch.float64):
        g, _ = _fdg_peer(scales, pw, original, rescale, textbook)
        ctx = []
        if textbook:
            def pyr(x, levels):
                return [torch.from_numpy(a).to(x.dtype) for a in _np_pyramid(x.double().numpy(), levels)]
            ctx = [mock.patch.object(Fm, "build_laplacian_pyramid_func", pyr),
                   mock.patch.object(Fm, "upsample_and_blur_func",
                                     lambda x: torch.from_numpy(_np_up(x.double().numpy())).to(x.dtype))]
        for m in ctx:
            m.start()
        try:
            g.set_state(0, 1, torch.tensor(999))
            peers[dt] = g.forward(c.to(dt), u.to(dt)).pred
        finally:
            for m in ctx:
                m.stop()
    pwt = None if pw is None else (pw if isinstance(pw, float) else tuple(pw))
    gd = Guidance(5.0, convention="1+w" if original else "w", rescale=rescale, method=FDG(scales, pwt))
    ours = _run_ours(gd, pairs, torch.float32)[0]
    p32, p64 = peers[torch.float32], peers[torch.float64]
    if textbook:
        # the textbook pyramid runs in float64 whatever the input: the float32 peer is float64 too
        tol = 2e-6 * p64.abs().max().item()
    else:
        tol = peer_tolerance(p32, p64) + 8 * torch.finfo(torch.float32).eps * p64.abs().max().item()
    assert_close_to_peer(ours, p32, tol, f"fdg {scales} {pw}")
    ours64 = _run_ours(gd, pairs, torch.float64)[0]
    torch.testing.assert_close(ours64, p64, rtol=0, atol=1e-12 * p64.abs().max().item())


@pytest.mark.parametrize("scales,pw,rescale", FDG_CASES)
@pytest.mark.parametrize("original", [False, True])
def test_fdg_matches_diffusers_over_textbook_pyramid(scales, pw, rescale, original):
    _fdg_compare(True, scales, pw, rescale, original, (2, 4, 16, 16))


@pytest.mark.parametrize("scales,pw,rescale", FDG_CASES)
@pytest.mark.parametrize("original", [False, True])
def test_fdg_matches_diffusers_with_kornia(scales, pw, rescale, original):
    pytest.importorskip("kornia")
    _fdg_compare(False, scales, pw, rescale, original, (2, 4, 32, 16))


def test_fdg_sample_and_bad_options():
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    sched = _sched(5)
    noise = _randn(*SHAPE, seed=4)
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    # one level: FDG is CFG with the level's scale (and parallel weight 1)
    a = _ours_run(model, noise, grid, Guidance(4.0, method=FDG((3.0,))))
    b = _ours_run(model, noise, grid, Guidance(3.0))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # all levels at scale 1: the conditional output
    c1 = _ours_run(model, noise, grid, Guidance(4.0, method=FDG((1.0, 1.0))))
    torch.testing.assert_close(c1, _ours_run(model, noise, grid, Guidance(1.0)), rtol=0, atol=1e-12)
    # a level at scale 1 keeps its own band of the cond output
    cc, uu = _pairs((2, 3, 8, 8), 1, seed=5)[0]
    got = FDG((4.0, 1.0)).combine(cc, uu, 4.0, False, 0, {})
    pc, pu = laplacian_pyramid(cc, 2), laplacian_pyramid(uu, 2)
    torch.testing.assert_close(got, from_pyramid([pu[0] + 4.0 * (pc[0] - pu[0]), pc[1]]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        _ours_run(model, noise, grid, Guidance(4.0, method=FDG((3.0, 2.0, 1.5))))   # 2x2 latent, 3 levels
    with pytest.raises(ValueError, match="scales"):
        FDG(())
    with pytest.raises(ValueError, match="parallel_weights"):
        FDG((2.0, 3.0), (1.0,))
    with pytest.raises(ValueError, match="FDG scale"):
        FDG((2.0, float("nan")))


@pytest.mark.parametrize("method", [APG(momentum=-0.5, norm_threshold=3.0, eta=0.2), CFGZeroStar(0), TCFG(),
                                    MamboG(), CFGRenorm(1.0), FDG((5.0, 2.0), 0.5)],
                         ids=["apg", "cfg_zero_star", "tcfg", "mambo_g", "cfg_renorm", "fdg"])
def test_combine_reads_nothing_back_to_the_host(method, monkeypatch):
    """No .item(), bool(tensor), float(tensor) or .tolist() inside a method (on CUDA each one
    would be a host sync): they raise here while the method runs, twice (APG's momentum)."""
    def boom(*a, **k):
        raise AssertionError("host read-back inside a guidance method")
    c, u = _pairs((2, 4, 8, 8), 1, seed=12)[0]
    state = {}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    try:
        for step in range(2):
            D = method.combine(c.float(), u.float(), 5.0, False, step, state)
    finally:
        monkeypatch.undo()
    assert D.shape == c.shape and torch.isfinite(D).all()


class _RenormPeer:
    """The ComfyUI RenormCFG oracle in the guider interface of the diffusers loop."""

    def __init__(self, w, r):
        self.w, self.r = w, r

    def set_state(self, *a):
        pass

    def forward(self, c, u):
        class Out:
            pass
        o = Out()
        o.pred = _renorm_oracle(c, u, self.w, self.r)
        return o


@pytest.mark.parametrize("r", [0.9, 1.1])
def test_cfg_renorm_sample_matches_the_oracle_loop(r):
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    sched = _sched(8)
    noise = _randn(*SHAPE, seed=22)
    expected = _diffusers_loop(sched, model, noise, _RenormPeer(5.0, r))
    grid = Grid.from_times(schedule, sched.timesteps.numpy().astype(np.float64), final="zero")
    ours = _ours_run(model, noise, grid, Guidance(5.0, method=CFGRenorm(r)))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert (_ours_run(model, noise, grid, Guidance(5.0)) - expected).abs().max() > 1e-3
