"""Issue 14, the last scheduler drop-ins: RePaintScheduler and UniPCMultistepScheduler(solver_p=...).

* RePaint: the full RePaint loop (RePaintPipeline's: iterate ``scheduler.timesteps``, ``step`` where
  t goes down, ``undo_step`` where it goes up, one generator for both) beside stock diffusers, every
  call's outputs within stock's own float32 precision (PEER_MARGIN x |stock fp32 - stock fp64|, as
  tests/test_dropins_more.py), over clip_sample, eta, beta schedules, jump lengths / counts and
  1/5/20/50 steps; ``undo_step`` bit for bit; the output dtypes stock's arithmetic gives; odd and
  non-contiguous inputs; fastdiff's PyTorch reference backend beside its C++ one.
* UniPC with solver_p: stock UniPC with stock DPMSolverMultistep / DPMSolverSinglestep predictors
  (orders, algorithms, prediction types, spacings, SDE with the same global RNG) against the drop-in,
  which runs UniC and solver_p's fastdiff drop-in, step by step, same tolerance rule.
* Both: bad input raises clearly and leaves everything as it was (the generator included), and
  ``accelerate(pipe)`` swaps each in, giving the stock pipeline's images.
"""
from __future__ import annotations

import contextlib
import logging
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import PEER_MARGIN, assert_close_to_peer, peer_tolerance

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

SHAPE = (2, 3, 5, 5)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@contextlib.contextmanager
def _float32_noise(*module_names):
    """Stock's float64 run draws the float32 noise its float32 run draws (then upcast)."""
    import importlib
    from diffusers.utils.torch_utils import randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, **kw):
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32, **kw).to(dtype)
    with contextlib.ExitStack() as stack:
        for name in module_names:
            stack.enter_context(mock.patch.object(importlib.import_module(name), "randn_tensor", draw))
        yield


def _to_float64(scheduler):
    """Stock computing in float64: its float32 arrays cast, its formulas unchanged (solver_p too)."""
    for k, v in list(vars(scheduler).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and k != "timesteps":
            setattr(scheduler, k, v.double())
    if getattr(scheduler, "solver_p", None) is not None:
        _to_float64(scheduler.solver_p)
    return scheduler


def _compare(mine, peer, peer64, what=""):
    """Every call's outputs: same count, types and dtypes; values within stock's own precision."""
    assert len(mine) == len(peer) == len(peer64)
    for k, (a, p, p64) in enumerate(zip(mine, peer, peer64)):
        assert len(a) == len(p)
        for j, (aj, pj, pj64) in enumerate(zip(a, p, p64)):
            assert aj.dtype == pj.dtype, (k, j, aj.dtype, pj.dtype)
            assert aj.shape == pj.shape
            tol = peer_tolerance(pj, pj64) + PEER_MARGIN * float((pj.double() - pj64).abs().max())
            assert_close_to_peer(aj, pj, tol, f"{what}call {k} of {len(peer)}, output {j}")


# =============================================================================================
# RePaintScheduler

REPAINT_MODULE = "diffusers.schedulers.scheduling_repaint"


def _inpainting_inputs(seed=0, shape=SHAPE, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    original = torch.rand(shape, dtype=torch.float64, generator=g) * 2 - 1
    mask_shape = (shape[0], 1) + tuple(shape[2:])
    mask = torch.rand(mask_shape, dtype=torch.float64, generator=g)
    mask = mask if soft else (mask > 0.5).double()
    return x, original, mask


def _repaint_loop(scheduler, steps, jump_length, jump_n_sample, dtype, x, original, mask, eta=0.0, seed=0,
                  outputs=None, set_dtype=None):
    """RePaintPipeline's loop; the model output is o_k + 0.3 x (o_k per step call, from ``outputs``).
    Returns every call's outputs: (prev_sample, pred_original_sample) of a step, (sample,) of an undo."""
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    if dtype == torch.float64:
        _to_float64(scheduler)
    scheduler.eta = eta
    g = torch.Generator().manual_seed(seed)
    x, original, mask = x.to(dtype), original.to(dtype), mask.to(dtype)
    if outputs is None:
        outputs = torch.randn((len(scheduler.timesteps),) + tuple(x.shape), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + 1))
    t_last = scheduler.timesteps[0] + 1
    calls, n = [], 0
    for t in scheduler.timesteps:
        if t < t_last:
            out = scheduler.step(outputs[n].to(dtype) + 0.3 * x, t, x, original, mask, g, return_dict=False)
            x, n = out[0], n + 1
            calls.append(out)
        else:
            x = scheduler.undo_step(x, t_last, g)
            calls.append((x,))
        t_last = t
    return calls


REPAINT_GRID = [(clip, eta, steps, jl, jn, beta)
                for clip in (True, False) for eta in (0.0, 0.5, 1.0)
                for steps, jl, jn in ((1, 1, 1), (5, 2, 2), (20, 5, 3), (50, 10, 2))
                for beta in ("linear", "squaredcos_cap_v2")
                if beta == "linear" or (eta == 0.5 and steps in (5, 20))]


@pytest.mark.parametrize("clip, eta, steps, jump_length, jump_n_sample, beta", REPAINT_GRID)
def test_repaint_loop_matches_stock(clip, eta, steps, jump_length, jump_n_sample, beta):
    config = dict(clip_sample=clip, beta_schedule=beta)
    x, original, mask = _inpainting_inputs(steps)
    args = (steps, jump_length, jump_n_sample)
    peer = _repaint_loop(diffusers.RePaintScheduler(**config), *args, torch.float32, x, original, mask, eta)
    with _float32_noise(REPAINT_MODULE):
        peer64 = _repaint_loop(diffusers.RePaintScheduler(**config), *args, torch.float64, x, original, mask, eta)
    mine = _repaint_loop(fd.RePaintScheduler(**config), *args, torch.float32, x, original, mask, eta)
    assert sum(len(c) == 1 for c in mine) == sum(len(c) == 1 for c in peer)      # (undo calls where stock has them)
    _compare(mine, peer, peer64)


def test_repaint_soft_mask_eta_change_and_odd_shapes_match_stock():
    """A mask with values between 0 and 1, a sample of odd size, eta changed between runs on one scheduler."""
    shape = (1, 3, 7, 3)
    x, original, mask = _inpainting_inputs(7, shape, soft=True)
    ours = fd.RePaintScheduler()
    for eta in (0.3, 1.0):
        peer = _repaint_loop(diffusers.RePaintScheduler(), 10, 3, 2, torch.float32, x, original, mask, eta)
        with _float32_noise(REPAINT_MODULE):
            peer64 = _repaint_loop(diffusers.RePaintScheduler(), 10, 3, 2, torch.float64, x, original, mask, eta)
        _compare(_repaint_loop(ours, 10, 3, 2, torch.float32, x, original, mask, eta), peer, peer64, f"eta {eta}: ")


def test_repaint_eta_changed_mid_run_matches_stock():
    """The pipeline sets ``scheduler.eta``; changing it between calls changes the next call's step."""
    def run(s, dtype):
        s.set_timesteps(6, 2, 2)
        if dtype == torch.float64:
            _to_float64(s)
        x, original, mask = (v.to(dtype) for v in _inpainting_inputs(3))
        g = torch.Generator().manual_seed(0)
        calls, t_last = [], s.timesteps[0] + 1
        for n, t in enumerate(s.timesteps):
            s.eta = [0.0, 1.0, 0.4][n % 3]
            if t < t_last:
                out = s.step(0.3 * x, t, x, original, mask, g, return_dict=False)
                x = out[0]
                calls.append(out)
            else:
                x = s.undo_step(x, t_last, g)
                calls.append((x,))
            t_last = t
        return calls
    peer = run(diffusers.RePaintScheduler(), torch.float32)
    with _float32_noise(REPAINT_MODULE):
        peer64 = run(diffusers.RePaintScheduler(), torch.float64)
    _compare(run(fd.RePaintScheduler(), torch.float32), peer, peer64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_repaint_undo_step_is_bit_exact(dtype):
    stock, ours = diffusers.RePaintScheduler(), fd.RePaintScheduler()
    for s in (stock, ours):
        s.set_timesteps(25, 5, 3)
    x = torch.randn(SHAPE).to(dtype)
    before = x.clone()
    for t in (0, 40, 960):
        a = stock.undo_step(x, t, torch.Generator().manual_seed(t))
        b = ours.undo_step(x, t, torch.Generator().manual_seed(t))
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)
    assert torch.equal(x, before)                                   # (the caller's sample is not modified)
    torch.manual_seed(5)                                             # (tensor timestep, torch's global RNG)
    a = stock.undo_step(x, torch.tensor(80))
    torch.manual_seed(5)
    b = ours.undo_step(x, torch.tensor(80))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sample_dtype, model_dtype, part_dtype", [
    (torch.float16, torch.float16, torch.float16), (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.float32, torch.bfloat16), (torch.float64, torch.float64, torch.float32)])
def test_repaint_output_dtypes_are_stocks(sample_dtype, model_dtype, part_dtype):
    x, original, mask = _inpainting_inputs(11)
    x = x.to(sample_dtype)
    eps = (0.3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).to(model_dtype)
    outs = []
    for cls in (diffusers.RePaintScheduler, fd.RePaintScheduler):
        s = cls(eta=0.7)
        s.set_timesteps(10, 2, 2)
        t = s.timesteps[3]
        outs.append(s.step(eps, t, x, original.to(part_dtype), mask.to(part_dtype), torch.Generator().manual_seed(0)))
    assert type(outs[1]) is diffusers.schedulers.scheduling_repaint.RePaintSchedulerOutput
    (p, p0), (a, a0) = ((o.prev_sample, o.pred_original_sample) for o in outs)
    assert a.dtype == p.dtype and a0.dtype == p0.dtype
    # (stock rounds its operations to the dtypes of their operands, the lowest one's precision where it
    # multiplies a float16 input; ours computes in float32: ~10 roundings of the coarsest dtype apart)
    low = max(torch.finfo(d).eps for d in (sample_dtype, model_dtype, part_dtype, torch.float32))
    torch.testing.assert_close(a.double(), p.double(), rtol=0, atol=10 * low * (1 + float(p.double().abs().max())))
    torch.testing.assert_close(a0.double(), p0.double(), rtol=0, atol=10 * low * (1 + float(p0.double().abs().max())))


def test_repaint_non_contiguous_inputs_match_contiguous():
    x, original, mask = (v.float() for v in _inpainting_inputs(4, (2, 3, 6, 5)))
    eps = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(9))

    def strided(v):            # the same values in a transposed / channels-last layout
        w = v.transpose(2, 3).contiguous().transpose(2, 3)
        assert not w.is_contiguous() and torch.equal(w, v)
        return w
    results = []
    for layout in (lambda v: v, strided):
        s = fd.RePaintScheduler(eta=1.0)
        s.set_timesteps(8, 2, 2)
        t = s.timesteps[0]
        out = s.step(layout(eps), t, layout(x), layout(original), layout(mask), torch.Generator().manual_seed(1))
        results.append((out.prev_sample, out.pred_original_sample))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a mask broadcast from one value per sample (a stride-0 expand)
    s = fd.RePaintScheduler(eta=1.0)
    s.set_timesteps(8, 2, 2)
    per_sample = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    out = s.step(eps, s.timesteps[0], x, original, per_sample.expand(2, 3, 6, 5), torch.Generator().manual_seed(1))
    stock = diffusers.RePaintScheduler(eta=1.0)
    stock.set_timesteps(8, 2, 2)
    ref = stock.step(eps, stock.timesteps[0], x, original, per_sample, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=0, atol=1e-6)


def test_repaint_reference_backend_equals_the_fused_one():
    """fastdiff's plain-PyTorch backend (the oracle of its kernels) and its C++ one agree."""
    x, original, mask = _inpainting_inputs(5)
    runs = []
    for backend in ("reference", "cpu"):
        s = fd.RePaintScheduler()
        s.fastdiff_backend = backend
        runs.append(_repaint_loop(s, 10, 2, 2, torch.float32, x, original, mask, 0.8))
    for k, (a, b) in enumerate(zip(*runs)):
        for aj, bj in zip(a, b):
            scale = 1 + float(bj.abs().max())
            torch.testing.assert_close(aj, bj, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale)


def _started_repaint():
    s = fd.RePaintScheduler(eta=0.5)
    s.set_timesteps(6, 2, 2)
    x, original, mask = (v.float() for v in _inpainting_inputs(6))
    g = torch.Generator().manual_seed(0)
    x = s.step(0.3 * x, s.timesteps[0], x, original, mask, g).prev_sample
    return s, x, original, mask, g


@pytest.mark.parametrize("change, error, match", [
    ("mask_channels", ValueError, "mask has shape"),
    ("mask_grows", ValueError, "mask has shape"),
    ("original_shape", ValueError, "original_image has shape"),
    ("mask_bool", TypeError, "mask must be a floating-point"),
    ("original_int", TypeError, "original_image must be a floating-point"),
    ("mask_list", TypeError, "mask must be a floating-point"),
    ("timestep", ValueError, "not one of this run's timesteps"),
    ("model_shape", ValueError, "model_output has shape"),
    ("model_int", TypeError, "model_output must be a floating-point"),
])
def test_repaint_bad_input_raises_and_changes_nothing(change, error, match):
    s, x, original, mask, g = _started_repaint()
    t = s.timesteps[1]
    eps = 0.3 * x
    kwargs = dict(model_output=eps, timestep=t, sample=x, original_image=original, mask=mask)
    bad = {"mask_channels": dict(mask=torch.ones(2, 2, 5, 5)),
           "mask_grows": dict(mask=torch.ones(2, 3, 5, 5, 1)),
           "original_shape": dict(original_image=torch.zeros(2, 3, 4, 5)),
           "mask_bool": dict(mask=mask > 0.5),
           "original_int": dict(original_image=original.long()),
           "mask_list": dict(mask=mask.tolist()),
           "timestep": dict(timestep=t + 1),
           "model_shape": dict(model_output=eps[:, :2]),
           "model_int": dict(model_output=eps.long())}[change]
    inputs = [v.clone() for v in (x, original, mask)]
    state = g.get_state()
    with pytest.raises(error, match=match):
        s.step(**{**kwargs, **bad}, generator=g)
    assert torch.equal(g.get_state(), state)                      # no noise drawn
    for v, w in zip((x, original, mask), inputs):
        assert torch.equal(v, w)
    # the run goes on as if the bad call never happened: as a scheduler that never saw it
    fresh, x2, original2, mask2, g2 = _started_repaint()
    a = s.step(eps, t, x, original, mask, g)
    b = fresh.step(eps, t, x2, original2, mask2, g2)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.pred_original_sample, b.pred_original_sample)


def test_repaint_refuses_to_step_before_set_timesteps_and_bad_undo_steps():
    s = fd.RePaintScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 10, x, x, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.undo_step(x, 10)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="t \\+ 99"):
        s.undo_step(x, 950)
    with pytest.raises(ValueError, match="got t = -1"):
        s.undo_step(x, -1)
    with pytest.raises(TypeError, match="sample must be"):
        s.undo_step(x.long(), 10)
    assert not hasattr(s, "set_begin_index") and not hasattr(diffusers.RePaintScheduler(), "set_begin_index")


def test_accelerate_takes_repaint_in_its_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    pipe = diffusers.RePaintPipeline(unet=unet, scheduler=diffusers.RePaintScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    run = lambda: pipe(image=image, mask_image=mask, num_inference_steps=6, eta=0.5, jump_length=2,  # noqa: E731
                       jump_n_sample=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    stock = run()
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is fd.RePaintScheduler and fd.DROP_INS["RePaintScheduler"] is fd.RePaintScheduler
    np.testing.assert_allclose(run(), stock, rtol=0, atol=1e-5)
    handle.remove()
    assert type(pipe.scheduler) is diffusers.RePaintScheduler


# =============================================================================================
# UniPCMultistepScheduler(solver_p=...)

DPM_MODULES = ("diffusers.schedulers.scheduling_dpmsolver_multistep",
               "diffusers.schedulers.scheduling_dpmsolver_singlestep")


def _unipc_trajectory(scheduler, steps, dtype, x_init, outputs, seed=0, begin=None):
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        _to_float64(scheduler)
    if begin is not None:
        scheduler.set_begin_index(begin)
    torch.manual_seed(seed)              # (UniPC passes no generator to solver_p: an SDE draws from torch's)
    x, calls = x_init.to(dtype), []
    for k, t in enumerate(scheduler.timesteps[begin or 0:]):
        out = scheduler.step(outputs[k].to(dtype) + 0.3 * x, t, x, return_dict=False)
        x = out[0]
        calls.append(out)
    return calls


def _unipc_parity(unipc_config, predictor, predictor_config, steps, begin=None):
    import inspect
    accepted = inspect.signature(getattr(diffusers, predictor).__init__).parameters
    predictor_config = {k: v for k, v in predictor_config.items() if k in accepted}
    make = lambda mod: mod.UniPCMultistepScheduler(  # noqa: E731
        solver_p=getattr(diffusers, predictor)(**predictor_config), **unipc_config)
    stock = make(diffusers)
    stock.set_timesteps(steps)
    calls = len(stock.timesteps) - (begin or 0)
    g = torch.Generator().manual_seed(1000 + steps)
    x_init = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    outputs = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(calls)]
    ours = make(fd)
    assert type(ours.solver_p) is getattr(fd, predictor)
    if float(stock.timesteps[begin or 0]) not in stock.solver_p.timesteps.tolist():
        # (diffusers' solver_p then starts at its last timestep and fails or runs off its schedule)
        with pytest.raises(ValueError, match="starts where it finds the first call's timestep"):
            _unipc_trajectory(ours, steps, torch.float32, x_init, outputs, begin=begin)
        return
    peer = _unipc_trajectory(make(diffusers), steps, torch.float32, x_init, outputs, begin=begin)
    with _float32_noise(*DPM_MODULES):
        peer64 = _unipc_trajectory(make(diffusers), steps, torch.float64, x_init, outputs, begin=begin)
    mine = _unipc_trajectory(ours, steps, torch.float32, x_init, outputs, begin=begin)
    _compare(mine, peer, peer64)


UNIPC_CONFIGS = {
    "default": {},
    "order3-bh1": dict(solver_order=3, solver_type="bh1"),
    "order1": dict(solver_order=1),
    "noise": dict(predict_x0=False),
    "v": dict(prediction_type="v_prediction"),
    "disabled": dict(solver_order=3, disable_corrector=[0, 2]),
    "no-lof": dict(lower_order_final=False),
    "trailing": dict(timestep_spacing="trailing"),
    "leading": dict(timestep_spacing="leading", steps_offset=1),
    "karras": dict(use_karras_sigmas=True),
    "sample-threshold": dict(prediction_type="sample", thresholding=True),
}
PREDICTORS = {
    "dpm++2M": ("DPMSolverMultistepScheduler", {}),
    "dpm++3M": ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    "dpm1": ("DPMSolverMultistepScheduler", dict(solver_order=1)),
    "dpm-eps": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    "sde-dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "single2": ("DPMSolverSinglestepScheduler", {}),
    "single3": ("DPMSolverSinglestepScheduler", dict(solver_order=3)),
}
# (a predictor takes UniPC's prediction type and spacing options: diffusers hands it the model output
# as it is, and UniPC's timesteps; stock needs them to agree)
_SHARED = ("prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas", "thresholding")
UNIPC_GRID = [(u, p, steps) for u in UNIPC_CONFIGS for p in PREDICTORS for steps in (1, 5, 20, 50)
              if (u == "default" or steps in (5, 20)) and (p in ("dpm++2M", "single3") or u in ("default", "v"))]


@pytest.mark.parametrize("unipc, predictor, steps", UNIPC_GRID)
def test_unipc_solver_p_matches_stock(unipc, predictor, steps):
    config = UNIPC_CONFIGS[unipc]
    name, predictor_config = PREDICTORS[predictor]
    shared = {k: v for k, v in config.items() if k in _SHARED}
    if predictor_config.get("algorithm_type") == "dpmsolver" and config.get("prediction_type") == "sample":
        pytest.skip("(diffusers' dpmsolver takes no 'sample' prediction with thresholding)")
    _unipc_parity({**SD, **config}, name, {**SD, **shared, **predictor_config}, steps)


def test_unipc_solver_p_mid_run_start_matches_stock():
    """img2img: set_begin_index on UniPC; solver_p finds its start from the first call's timestep."""
    _unipc_parity(dict(SD), "DPMSolverMultistepScheduler", dict(SD), 10, begin=4)


def test_unipc_solver_p_flow_sigmas_match_stock():
    flow = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    _unipc_parity(flow, "DPMSolverMultistepScheduler", flow, 8)


def test_unipc_solver_p_reference_backend_equals_the_fused_one():
    """Corrector and predictor on fastdiff's plain-PyTorch backend, and on its C++ one."""
    runs = []
    for backend in ("reference", "cpu"):
        s = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverSinglestepScheduler(solver_order=3, **SD),
                                       solver_order=3, **SD)
        s.fastdiff_backend = s.solver_p.fastdiff_backend = backend
        g = torch.Generator().manual_seed(4)
        x_init = torch.randn(SHAPE, dtype=torch.float64, generator=g)
        outputs = [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(9)]
        runs.append(_unipc_trajectory(s, 9, torch.float32, x_init, outputs))
    for a, b in zip(*runs):
        scale = 1 + float(b[0].abs().max())
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=8 * torch.finfo(torch.float32).eps * scale)


def test_unipc_solver_p_is_a_fastdiff_drop_in_of_the_given_config():
    given = diffusers.DPMSolverSinglestepScheduler(solver_order=3, **SD)
    s = fd.UniPCMultistepScheduler(solver_p=given, **SD)
    assert type(s.solver_p) is fd.DPMSolverSinglestepScheduler
    assert s.solver_p.config.solver_order == 3 and s.solver_p.config.beta_schedule == "scaled_linear"
    assert s.config.solver_p is given                       # (the config records what was given)
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(0.3 * x, t, x).prev_sample
    assert given.step_index is None                          # (the object given is left as it was)
    mine = fd.DPMSolverMultistepScheduler()
    assert fd.UniPCMultistepScheduler(solver_p=mine).solver_p is mine
    out = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler())
    out.set_timesteps(3)
    res = out.step(torch.randn(SHAPE), out.timesteps[0], torch.randn(SHAPE))
    assert type(res) is diffusers.schedulers.scheduling_utils.SchedulerOutput and res.prev_sample.shape == SHAPE


def test_unipc_solver_p_without_a_drop_in_is_refused():
    class MyDPM(diffusers.DPMSolverMultistepScheduler):
        pass
    with pytest.raises(NotImplementedError, match="solver_p='MyDPM'"):
        fd.UniPCMultistepScheduler(solver_p=MyDPM())
    with pytest.raises(NotImplementedError, match="solver_p='UnCLIPScheduler'"):
        fd.UniPCMultistepScheduler(solver_p=diffusers.UnCLIPScheduler())


def _state(s):
    sp = s.solver_p
    run = s._fd_run
    return (s._step_index, run, None if run is None else run.x.clone(), sp._step_index, sp._fd_run,
            None if sp._fd_run is None else sp._fd_run.x.clone())


def _same_state(a, b):
    for u, v in zip(a, b):
        assert (torch.equal(u, v) if isinstance(u, torch.Tensor) else u is v or u == v)


def test_unipc_solver_p_bad_input_raises_and_changes_nothing():
    # a first timestep solver_p's own timesteps lack ('leading' here, 'linspace' there)
    s = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler(), timestep_spacing="leading")
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    before = _state(s)
    with pytest.raises(ValueError, match="starts where it finds the first call's timestep 830 "):
        s.step(0.3 * x, s.timesteps[0], x)
    _same_state(_state(s), before)

    # a solver_p whose step computes with the timestep value (DDIM), on other timesteps than UniPC's
    s = fd.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler(timestep_spacing="linspace"))
    s.set_timesteps(5)
    x = s.step(0.3 * x, s.timesteps[0], x).prev_sample           # (999 in both)
    before = _state(s)
    with pytest.raises(ValueError, match="at its timestep 749, this call at 799"):
        s.step(0.3 * x, s.timesteps[1], x)
    _same_state(_state(s), before)

    # bad model output / timestep mid-run: nothing changes, and the run goes on as one that never saw them
    def started():
        u = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler(**SD), **SD)
        u.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in u.timesteps[:2]:
            x = u.step(0.3 * x, t, x).prev_sample
        return u, x
    s, x = started()
    t = s.timesteps[2]
    before = _state(s)
    for bad, error, match in ((dict(model_output=x[:1]), ValueError, "model_output has shape"),
                              (dict(timestep=s.timesteps[4]), ValueError, "call 3 of this run is at timestep"),
                              (dict(model_output=x.long()), TypeError, "model_output must be"),
                              (dict(sample=x.long()), TypeError, "sample must be")):
        with pytest.raises(error, match=match):
            s.step(**{"model_output": 0.3 * x, "timestep": t, "sample": x, **bad})
        _same_state(_state(s), before)
    fresh, x2 = started()
    assert torch.equal(s.step(0.3 * x, t, x).prev_sample, fresh.step(0.3 * x2, t, x2).prev_sample)


def test_unipc_solver_p_reset_on_its_own_restarts_as_in_diffusers():
    """solver_p.set_timesteps() mid-run: diffusers' solver_p then finds its place again from the next
    call's timestep and warms up anew, while UniPC's corrector goes on; so does the drop-in."""
    def run(mod, dtype):
        s = mod.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler(solver_order=3, **SD),
                                        solver_order=3, **SD)
        s.set_timesteps(8)
        if dtype == torch.float64:
            _to_float64(s)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        calls = []
        for k, t in enumerate(s.timesteps):
            if k == 4:
                s.solver_p.set_timesteps(8)
                if dtype == torch.float64:
                    _to_float64(s.solver_p)
            calls.append(s.step(0.3 * x + 0.1, t, x, return_dict=False))
            x = calls[-1][0]
        return calls
    _compare(run(fd, torch.float32), run(diffusers, torch.float32), run(diffusers, torch.float64))


def test_unipc_solver_p_first_call_failure_of_the_predictor_changes_nothing():
    """Where solver_p cannot start its run (a schedule its drop-in refuses), the corrector's run is dropped too."""
    s = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler())
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    with mock.patch.object(type(s.solver_p), "_plan", side_effect=ValueError("refused")):
        with pytest.raises(ValueError, match="refused"):
            s.step(0.3 * x, s.timesteps[0], x)
    assert s._fd_run is None and s._step_index is None and s.solver_p._step_index is None
    stock = diffusers.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler())
    stock.set_timesteps(4)
    a = s.step(0.3 * x, s.timesteps[0], x).prev_sample
    b = stock.step(0.3 * x, stock.timesteps[0], x).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unipc_solver_p_restart_failure_mid_run_changes_nothing():
    """solver_p reset mid-run and then unable to start its new run: the corrector's buffers are put back."""
    def started():
        u = fd.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler(**SD), solver_order=3, **SD)
        u.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in u.timesteps[:3]:
            x = u.step(0.3 * x + 0.1, t, x).prev_sample
        u.solver_p.set_timesteps(6)
        return u, x
    s, x = started()
    t = s.timesteps[3]
    before = _state(s) + (s._fd_run.hist.clone(),)
    with mock.patch.object(type(s.solver_p), "_plan", side_effect=ValueError("refused")):
        with pytest.raises(ValueError, match="refused"):
            s.step(0.3 * x + 0.1, t, x)
    _same_state(_state(s) + (s._fd_run.hist.clone(),), before)
    fresh, x2 = started()
    assert torch.equal(s.step(0.3 * x + 0.1, t, x).prev_sample, fresh.step(0.3 * x2 + 0.1, t, x2).prev_sample)


def test_accelerate_takes_unipc_with_solver_p():
    from test_dropin_pipelines import SD_SCHEDULER, _run, _sd
    predictor = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER)
    pipe, inputs = _sd(diffusers.UniPCMultistepScheduler(solver_p=predictor, **SD_SCHEDULER))
    stock = _run(pipe, inputs, steps=4)
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is fd.UniPCMultistepScheduler
    assert type(pipe.scheduler.solver_p) is fd.DPMSolverMultistepScheduler
    torch.testing.assert_close(_run(pipe, inputs, steps=4), stock, rtol=0, atol=1e-5)
    handle.remove()
    assert pipe.scheduler.solver_p is predictor
