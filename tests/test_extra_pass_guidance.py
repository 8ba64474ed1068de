"""Issue 14, extra-pass guidance: PAG, SLG, SEG and AutoGuidance (fastdiff.guiders), their batched
perturbation hooks (fastdiff.integrations.diffusers.perturbed), ``accelerate(pipe, guidance=...)``
and ``fastdiff.sample`` through ``PerturbedModel``; plus a method together with per-sample scales
and FDG's frequency-space rescale.

References, all diffusers 0.42:
* the formulas: ``diffusers.guiders.{PerturbedAttentionGuidance, SkipLayerGuidance,
  SmoothedEnergyGuidance, AutoGuidance}.forward`` on the same cond / uncond / perturbed tensors,
  every step of a run (their step windows included), tolerance ``peer_tolerance`` (diffusers'
  float32 against its float64);
* the perturbation: diffusers' own hooks (layer skip, attention-score skip, smoothed-energy query
  blur) on a separate model call, against our hooks on the appended rows of one batched call;
* end to end: the stock pipelines that have the method (StableDiffusionPAGPipeline,
  StableDiffusion3PAGPipeline, StableDiffusion3Pipeline's skip_guidance_layers), and for all four
  methods diffusers' guider-based loop (what its modular pipelines run: ``set_state``,
  ``prepare_inputs``, ``prepare_models`` / ``cleanup_models`` around each pass, ``guider(...)``),
  tolerance that loop's own float32-vs-float64 error.
"""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import PEER_MARGIN, assert_close_to_peer, peer_tolerance

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
import fastdiff  # noqa: E402
from fastdiff import DiscreteVP, Grid, Guidance  # noqa: E402
from fastdiff.guiders import PAG, SEG, SLG, APG, AutoGuidance, CFGZeroStar, FDG, TCFG  # noqa: E402
from fastdiff.integrations.diffusers.cfg import GuidedOutput  # noqa: E402
from fastdiff.integrations.diffusers.perturbed import Perturbation, PerturbedModel  # noqa: E402
from test_accelerate_guiders import SD_SCHEDULER, SIZE, _sd, _tol  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.guiders import (AutoGuidance as PeerAG, PerturbedAttentionGuidance,  # noqa: E402
                                   SkipLayerGuidance, SmoothedEnergyGuidance)
    from diffusers.hooks import HookRegistry, LayerSkipConfig  # noqa: E402
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook  # noqa: E402
    from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,  # noqa: E402
                                                                _apply_smoothed_energy_guidance_hook)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

MID = "mid_block.attentions.0.transformer_blocks"     # the tiny UNet's mid-block transformer blocks


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. The formulas against diffusers' guider classes, every step of a run.

def _peer(kind, w, s, start, stop, original):
    common = dict(guidance_scale=w, use_original_formulation=original)
    if kind == "pag":
        return PerturbedAttentionGuidance(perturbed_guidance_scale=s, perturbed_guidance_start=start,
                                          perturbed_guidance_stop=stop, perturbed_guidance_layers=[0], **common)
    if kind == "slg":
        return SkipLayerGuidance(skip_layer_guidance_scale=s, skip_layer_guidance_start=start,
                                 skip_layer_guidance_stop=stop, skip_layer_guidance_layers=[0], **common)
    if kind == "seg":
        return SmoothedEnergyGuidance(seg_guidance_scale=s, seg_guidance_start=start, seg_guidance_stop=stop,
                                      seg_guidance_layers=[0], **common)
    return PeerAG(auto_guidance_layers=[0], dropout=1.0, start=start, stop=stop, **common)


def _ours(kind, s, start, stop):
    if kind == "pag":
        return PAG(scale=s, layers=(0,), start=start, stop=stop)
    if kind == "slg":
        return SLG(scale=s, layers=(0,), start=start, stop=stop)
    if kind == "seg":
        return SEG(scale=s, layers=(0,), start=start, stop=stop)
    return AutoGuidance(layers=(0,), start=start, stop=stop)


def _peer_enabled(peer):
    cfg = peer._is_ag_enabled() if isinstance(peer, PeerAG) else peer._is_cfg_enabled()
    extra = (False if isinstance(peer, PeerAG) else
             peer._is_seg_enabled() if isinstance(peer, SmoothedEnergyGuidance) else peer._is_slg_enabled())
    return cfg, extra


@pytest.mark.parametrize("kind", ["pag", "slg", "seg", "ag"])
@pytest.mark.parametrize("w", [5.0, 1.0, 0.0])
@pytest.mark.parametrize("original", [False, True])
@pytest.mark.parametrize("window", [(0.01, 0.2), (0.1, 0.75), (0.0, 1.0)])
def test_formula_and_window_match_diffusers_guider(kind, w, original, window):
    """Every step of a 10-step run, our combination (and where CFG runs in the fused step, its
    fold) against the diffusers guider's forward on the same tensors; the windows agree."""
    N, s = 10, 2.5
    start, stop = window
    shape = (2, 4, 8, 8)
    ours = _ours(kind, s, start, stop)
    g = (1.0 + w) if original else w                     # fastdiff's g of D = u + g (c - u)
    seen_extra = seen_off = 0
    for step in range(N):
        c64, u64, p64 = (_randn(*shape, seed=100 * step + k) for k in range(3))
        c64 = 0.7 * u64 + 0.5 * c64
        p64 = 0.8 * c64 + 0.3 * p64
        preds = {}
        for dt in (torch.float32, torch.float64):
            peer = _peer(kind, w, s, start, stop, original)
            peer.set_state(step, N, torch.tensor(999.0))
            cfg, extra = _peer_enabled(peer)
            kw = {"pred_cond": c64.to(dt)}
            if cfg:
                kw["pred_uncond"] = u64.to(dt)
            if extra:
                kw[{"seg": "pred_cond_seg"}.get(kind, "pred_cond_skip")] = p64.to(dt)
            preds[dt] = peer.forward(**kw).pred
        if kind == "ag":
            assert (ours.active(step, N) and not math.isclose(g, 1.0)) == peer._is_ag_enabled()
            got = ours.combine(c64.float(), u64.float(), g, original, step, {"num_steps": N})
        else:
            assert ours.extra_active(step, N) == extra
            got = ours.combine_extra(c64.float(), u64.float(), p64.float(), g, original, step, N)
            seen_extra += extra
            seen_off += not cfg
            if cfg and extra and g != 0.0:
                # the fused path: the step's own u + g (c' - u) with c' = lerp(p, c, 1 + s / g)
                folded = ours.fold(c64.float(), p64.float(), g)
                fused = u64.float() + g * (folded - u64.float())
                assert_close_to_peer(fused, preds[torch.float32],
                                     peer_tolerance(preds[torch.float32], preds[torch.float64])
                                     + PEER_MARGIN * 8 * torch.finfo(torch.float32).eps * c64.abs().max().item()
                                     * (abs(g) + abs(s) + 1), f"{kind} fold step {step}")
        assert_close_to_peer(got, preds[torch.float32], peer_tolerance(preds[torch.float32], preds[torch.float64]),
                             f"{kind} w={w} original={original} step {step}")
    if kind != "ag" and window == (0.1, 0.75):
        assert seen_extra == 5          # steps 2..6: int(1) < i < int(7.5); the window is exercised


def test_per_sample_g_in_the_formula():
    """A per-sample g vector: each sample as its own scalar run; g_b = 1 takes the CFG-off formula."""
    c, u, p = (_randn(3, 4, 6, 6, seed=k, dtype=torch.float32) for k in range(3))
    for method in (PAG(scale=2.0, layers=(0,)), AutoGuidance(layers=(0,))):
        for one_plus_w in (False, True):
            gs = [4.0, 1.0, 2.5]
            gv = torch.tensor(gs).reshape(3, 1, 1, 1)
            if isinstance(method, AutoGuidance):
                got = method.combine(c, u, gv, one_plus_w, 0, {"num_steps": 4})
            else:
                got = method.combine_extra(c, u, p, gv, one_plus_w, 0, 4)
            for b, g in enumerate(gs):
                if isinstance(method, AutoGuidance):
                    one = method.combine(c[b:b + 1], u[b:b + 1], g, one_plus_w, 0, {"num_steps": 4})
                else:
                    one = method.combine_extra(c[b:b + 1], u[b:b + 1], p[b:b + 1], g, one_plus_w, 0, 4)
                torch.testing.assert_close(got[b:b + 1], one, rtol=0, atol=4e-6)


# ---------------------------------------------------------------------------------------------
# 2. The perturbation: our hooks on the appended rows of one call vs diffusers' hooks on a
#    separate call.

def _tiny_sd3(layers=3):
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4).eval()


def _sd3_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), 500.0))


def _unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(2)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=g))


def _doubled(kw):
    return {k: torch.cat([v, v]) if v.dim() else v for k, v in kw.items()}


def _apply_peer_hook(model, kind, fqn, blur_sigma=None):
    if kind == "pag":
        _apply_layer_skip_hook(model, LayerSkipConfig([0], fqn=fqn, skip_attention=False, skip_attention_scores=True,
                                                      skip_ff=False), name="peer")
    elif kind == "slg":
        _apply_layer_skip_hook(model, LayerSkipConfig([0], fqn=fqn), name="peer")
    elif kind == "seg":
        _apply_smoothed_energy_guidance_hook(model, SmoothedEnergyGuidanceConfig([0], fqn=fqn), blur_sigma, name="peer")


@pytest.mark.parametrize("kind, blur", [("pag", None), ("slg", None), ("seg", 9999999.0), ("seg", 1.5)])
@torch.no_grad()
def test_batched_perturbation_equals_diffusers_hooks_on_a_unet(kind, blur):
    pipe, _, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    unet = pipe.unet
    kw = _unet_inputs(unet)
    method = {"pag": PAG(layers=(0,), fqn=MID), "slg": SLG(layers=(0,), fqn=MID),
              "seg": SEG(layers=(0,), fqn=MID, blur_sigma=blur or 1.0)}[kind]
    plain = unet(**kw).sample
    P = Perturbation(unet, method)
    try:
        P.rows = slice(2, 4)
        both = unet(**_doubled(kw)).sample
        P.rows = None
        assert torch.equal(unet(**kw).sample, plain)          # rows None: hooks off
    finally:
        P.remove()
    assert torch.equal(unet(**kw).sample, plain)              # removed
    _apply_peer_hook(unet, kind, MID, blur)
    try:
        peer = unet(**kw).sample
    finally:
        HookRegistry.check_if_exists_or_initialize(unet).remove_hook("peer", recurse=True)
    tol = 1e-5 * plain.abs().max().item()         # batch 4 vs 2: the model's last bits only
    torch.testing.assert_close(both[:2], plain, rtol=0, atol=tol)
    torch.testing.assert_close(both[2:], peer, rtol=0, atol=tol)
    assert (peer - plain).abs().max() > 100 * tol                 # the perturbation matters


@torch.no_grad()
def test_batched_perturbation_on_sd3_transformer():
    """SD3: SEG against diffusers' hook; SLG against the transformer's own ``skip_layers`` (the path
    StableDiffusion3Pipeline uses; diffusers' block-skip hook returns SD3's joint block outputs in
    the wrong order); PAG's joint-attention identity block against StableDiffusion3PAGPipeline's
    processor (PAGIdentity on the image block)."""
    tr = _tiny_sd3()
    kw = _sd3_inputs()
    plain = tr(**kw, return_dict=False)[0]
    for method in (SEG(layers=(1,)), SEG(layers=(1,), blur_sigma=2.0), SLG(layers=(1,)), PAG(layers=(1,))):
        P = Perturbation(tr, method)
        try:
            P.rows = slice(2, 4)
            both = tr(**_doubled(kw), return_dict=False)[0]
        finally:
            P.remove()
        if method.name == "seg":
            _apply_smoothed_energy_guidance_hook(tr, SmoothedEnergyGuidanceConfig([1], fqn="transformer_blocks"),
                                                 method.blur_sigma, name="peer")
            try:
                peer = tr(**kw, return_dict=False)[0]
            finally:
                HookRegistry.check_if_exists_or_initialize(tr).remove_hook("peer", recurse=True)
        elif method.name == "slg":
            peer = tr(**kw, return_dict=False, skip_layers=[1])[0]
        else:
            from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0  # noqa: F401
            from diffusers.models.attention_processor import PAGJointAttnProcessor2_0
            attn = tr.transformer_blocks[1].attn
            old = attn.processor
            attn.set_processor(PAGJointAttnProcessor2_0())
            try:      # PAGJointAttnProcessor2_0 runs [cond; perturbed] halves: the second half is p
                peer = tr(**_doubled(kw), return_dict=False)[0][2:]
            finally:
                attn.set_processor(old)
        tol = 1e-5 * plain.abs().max().item()
        torch.testing.assert_close(both[:2], plain, rtol=0, atol=tol)
        torch.testing.assert_close(both[2:], peer, rtol=0, atol=tol)
        assert (peer - plain).abs().max() > 100 * tol, method


@torch.no_grad()
def test_autoguidance_dropout_rows_use_the_same_draws_as_diffusers():
    """AutoGuidance perturbs the uncond rows [0, B) of [u; c]; with dropout < 1 the draws come from
    torch's global generator in the same order as diffusers' hook on a separate call."""
    pipe, _, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    unet = pipe.unet
    kw = _unet_inputs(unet)
    for dropout in (1.0, 0.4):
        P = Perturbation(unet, AutoGuidance(layers=(0,), fqn=MID, dropout=dropout))
        try:
            P.rows = slice(0, 2)
            torch.manual_seed(7)
            both = unet(**_doubled(kw)).sample
        finally:
            P.remove()
        _apply_layer_skip_hook(unet, LayerSkipConfig([0], fqn=MID, dropout=dropout), name="peer")
        try:
            torch.manual_seed(7)
            peer = unet(**kw).sample
        finally:
            HookRegistry.check_if_exists_or_initialize(unet).remove_hook("peer", recurse=True)
        plain = unet(**kw).sample
        tol = 1e-5 * plain.abs().max().item()
        torch.testing.assert_close(both[:2], peer, rtol=0, atol=tol)
        torch.testing.assert_close(both[2:], plain, rtol=0, atol=tol)
        assert (peer - plain).abs().max() > 100 * tol


def test_perturbation_bad_layers():
    pipe, _, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    unet = pipe.unet
    with pytest.raises(ValueError, match="no block list"):
        Perturbation(unet, SLG(layers=(0,)))                            # "auto" finds none in a UNet
    with pytest.raises(ValueError, match="out of range"):
        Perturbation(unet, SLG(layers=(5,), fqn=MID))
    with pytest.raises(ValueError, match="not a torch.nn.ModuleList"):
        Perturbation(unet, SLG(layers=(0,), fqn="mid_block"))
    with pytest.raises(ValueError, match="matches layer 'nothing_here'"):
        Perturbation(unet, PAG(layers=("nothing_here",)))
    with pytest.raises(ValueError, match="is named"):
        Perturbation(unet, SEG(layers=("nothing_here",)))
    for bad, match in [(dict(layers=()), "layers"), (dict(layers=(-1,)), ">= 0"), (dict(layers=(1.5,)), "layers"),
                       (dict(start=1.5), "fraction"), (dict(start=0.5, stop=0.2), "stop"), (dict(scale="2"), "scale"),
                       (dict(fqn=""), "fqn")]:
        with pytest.raises(ValueError, match=match):
            PAG(**bad)
    with pytest.raises(ValueError, match="dropout"):
        AutoGuidance(dropout=1.5)
    with pytest.raises(ValueError, match="blur_sigma"):
        SEG(blur_sigma=0.0)
    # nothing was left on the model
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in unet.modules())


@torch.no_grad()
def test_pag_refuses_a_processor_without_torch_sdpa():
    pipe, _, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    unet = pipe.unet
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())         # the classic processor: baddbmm + softmax, no SDPA
    P = Perturbation(unet, PAG(layers=("mid",)))
    try:
        P.rows = slice(2, 4)
        with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
            unet(**_doubled(_unet_inputs(unet)))
    finally:
        P.remove()


# ---------------------------------------------------------------------------------------------
# 3. End to end through accelerate(pipe): stock pipelines, and diffusers' guider-based loop.

def _run(pipe, inputs, latents, steps, scale, **extra):
    return pipe(**inputs, latents=latents.clone(), num_inference_steps=steps, guidance_scale=scale,
                output_type="latent", height=SIZE, width=SIZE, **extra).images


def _accelerated(pipe, inputs, latents, guidance, steps, scale):
    handle = fd.accelerate(pipe, guidance=guidance)
    try:
        return _run(pipe, inputs, latents, steps, scale)
    finally:
        handle.remove()
        assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.unet.modules()) \
            if hasattr(pipe, "unet") else True


def _pag_stock(pipe, layers):
    stock = diffusers.StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=list(layers))
    stock.set_progress_bar_config(disable=True)
    return stock


@pytest.mark.parametrize("scale, convention", [(5.0, "w"), (1.0, "1+w")])
@pytest.mark.parametrize("layers", [("mid",), ("mid", "up")])
def test_accelerated_sd_pag_equals_stock_pag_pipeline(scale, convention, layers, monkeypatch):
    """StableDiffusionPAGPipeline (DDIM, pag_scale 3, every step) vs accelerate(pipe, PAG) on the
    plain StableDiffusionPipeline: [u; c; c] in one UNet call, the fused step fed c' and u. Without
    CFG (scale 1) the PAG pipeline's c + s (c - p) is convention "1+w"'s formula."""
    steps = 4
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    batches = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    seen = []
    original = GuidedOutput.parts
    monkeypatch.setattr(GuidedOutput, "parts", lambda self: (lambda r: (seen.append(r[1] is not None), r)[1])(
        original(self)))
    try:
        ours = _accelerated(pipe, inputs, latents, Guidance(method=PAG(scale=3.0, layers=layers),
                                                              convention=convention), steps, scale if convention == "w"
                            else 0.0)
    finally:
        hook.remove()
    assert batches == [3 if scale > 1 else 2] * steps                  # one call per step, the extra rows in it
    if scale > 1:
        assert len(seen) >= steps and all(seen)                            # CFG stayed in the fused step
    stock = _pag_stock(pipe, layers)
    ref = _run(stock, inputs, latents, steps, scale, pag_scale=3.0)
    stock.to(dtype=torch.float64)
    try:
        ref64 = _run(stock, {k: v.double() for k, v in inputs.items()}, latents.double(), steps, scale, pag_scale=3.0)
    finally:
        stock.to(dtype=torch.float32)
    assert_close_to_peer(ours, ref, _tol(ref, ref64), f"PAG {layers} scale {scale}")
    plain = _run(pipe, inputs, latents, steps, scale)
    assert (plain - ref).abs().max() > 100 * torch.as_tensor(_tol(ref, ref64)).max()


def _sd3_pipe():
    from test_dropin_pipelines import _sd3
    pipe, inputs = _sd3(diffusers.FlowMatchEulerDiscreteScheduler())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe, inputs, latents


def _sd3_run(pipe, inputs, latents, steps, **extra):
    return pipe(**inputs, latents=latents.clone(), num_inference_steps=steps, guidance_scale=5.0,
                output_type="latent", height=64, width=64, **extra).images


def _sd3_64(pipe, inputs, latents, steps, **extra):
    pipe.to(dtype=torch.float64)
    try:
        return _sd3_run(pipe, {k: v.double() for k, v in inputs.items()}, latents.double(), steps, **extra)
    finally:
        pipe.to(dtype=torch.float32)


def test_accelerated_sd3_slg_equals_stock_skip_guidance_layers():
    """StableDiffusion3Pipeline(skip_guidance_layers=[0]) (a separate model call on the skip steps)
    vs accelerate(pipe, SLG(layers=(0,))) batching the skipped pass into the CFG call. The window:
    10 steps, (0.01, 0.5): steps 1..4 in both rules."""
    pipe, inputs, latents = _sd3_pipe()
    steps, opts = 10, dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                           skip_layer_guidance_stop=0.5)
    ref = _sd3_run(pipe, inputs, latents, steps, **opts)
    ref64 = _sd3_64(pipe, inputs, latents, steps, **opts)
    handle = fd.accelerate(pipe, guidance=SLG(scale=2.8, layers=(0,), start=0.01, stop=0.5))
    try:
        ours = _sd3_run(pipe, inputs, latents, steps)
    finally:
        handle.remove()
    assert_close_to_peer(ours, ref, _tol(ref, ref64), "SD3 SLG")
    plain = _sd3_run(pipe, inputs, latents, steps)
    assert (plain - ref).abs().max() > 100 * torch.as_tensor(_tol(ref, ref64)).max()


def test_accelerated_sd3_pag_equals_stock_sd3_pag_pipeline():
    pipe, inputs, latents = _sd3_pipe()
    stock = diffusers.StableDiffusion3PAGPipeline(**{k: v for k, v in pipe.components.items()
                                                      if k not in ("image_encoder", "feature_extractor")},
                                                   pag_applied_layers=["transformer_blocks.1"])
    stock.set_progress_bar_config(disable=True)
    steps = 4
    ref = _sd3_run(stock, inputs, latents, steps, pag_scale=3.0)
    ref64 = _sd3_64(stock, inputs, latents, steps, pag_scale=3.0)
    handle = fd.accelerate(pipe, guidance=PAG(scale=3.0, layers=("transformer_blocks.1",)))
    try:
        ours = _sd3_run(pipe, inputs, latents, steps)
    finally:
        handle.remove()
    assert_close_to_peer(ours, ref, _tol(ref, ref64), "SD3 PAG")
    plain = _sd3_run(pipe, inputs, latents, steps)
    assert (plain - ref).abs().max() > 100 * torch.as_tensor(_tol(ref, ref64)).max()


@torch.no_grad()
def _guider_loop(pipe, inputs, latents, guider, steps, dtype, scheduler_cls=diffusers.DDIMScheduler,
                 prompt_scales=None):
    """diffusers' guider-based denoising as its modular pipelines run it, on the SD UNet."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState  # noqa: F401 (guider inputs)
    pipe.to(dtype=dtype)
    try:
        config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        scheduler = scheduler_cls.from_config(config)
        scheduler.set_timesteps(steps)
        x = latents.to(dtype) * scheduler.init_noise_sigma
        data = {"encoder_hidden_states": (inputs["prompt_embeds"].to(dtype), inputs["negative_prompt_embeds"].to(dtype))}
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=steps, timestep=t)
            xin = scheduler.scale_model_input(x, t)
            batches = guider.prepare_inputs(data)
            for batch in batches:
                guider.prepare_models(pipe.unet)
                batch.noise_pred = pipe.unet(xin, t, encoder_hidden_states=batch.encoder_hidden_states).sample
                guider.cleanup_models(pipe.unet)
            x = scheduler.step(guider(batches).pred, t, x).prev_sample
        return x
    finally:
        pipe.to(dtype=torch.float32)


def _guider_pair(kind, w):
    """(fastdiff method, factory of the diffusers guider) for the tiny UNet's mid block."""
    if kind == "pag":
        return (PAG(scale=2.0, layers=(0,), fqn=MID, start=0.1, stop=0.9),
                lambda: PerturbedAttentionGuidance(
                    guidance_scale=w, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.1,
                    perturbed_guidance_stop=0.9, perturbed_guidance_config=LayerSkipConfig(
                        [0], fqn=MID, skip_attention=False, skip_attention_scores=True, skip_ff=False)))
    if kind == "slg":
        return (SLG(scale=2.0, layers=(0,), fqn=MID, start=0.1, stop=0.9),
                lambda: SkipLayerGuidance(guidance_scale=w, skip_layer_guidance_scale=2.0,
                                          skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.9,
                                          skip_layer_config=LayerSkipConfig([0], fqn=MID)))
    if kind == "seg":
        return (SEG(scale=2.0, layers=(0,), fqn=MID, blur_sigma=1.5, start=0.1, stop=0.9),
                lambda: _SEGPeer(guidance_scale=w, seg_guidance_scale=2.0, seg_blur_sigma=1.5, seg_guidance_start=0.1,
                                 seg_guidance_stop=0.9, seg_guidance_config=SmoothedEnergyGuidanceConfig([0], fqn=MID)))
    return (AutoGuidance(layers=(0,), fqn=MID, start=0.0, stop=0.7),
            lambda: PeerAG(guidance_scale=w, auto_guidance_config=LayerSkipConfig([0], fqn=MID, dropout=1.0),
                           start=0.0, stop=0.7))


class _SEGPeer(SmoothedEnergyGuidance):
    """diffusers' SmoothedEnergyGuidance with the one line its ``prepare_models`` lacks (it never
    counts the passes, so its hook is never applied and the third pass is the plain cond pass):
    ``_count_prepared += 1``, as the other guiders' ``prepare_models`` do. Formula and hook are its own."""

    def prepare_models(self, denoiser):
        self._count_prepared += 1
        super().prepare_models(denoiser)


@pytest.mark.parametrize("kind", ["pag", "slg", "seg", "ag"])
def test_accelerated_sd_equals_diffusers_guider_loop(kind):
    steps, w = 6, 4.0
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    method, peer = _guider_pair(kind, w)
    ours = _accelerated(pipe, inputs, latents, method, steps, w)
    ref = _guider_loop(pipe, inputs, latents, peer(), steps, torch.float32)
    ref64 = _guider_loop(pipe, inputs, latents, peer(), steps, torch.float64)
    assert_close_to_peer(ours, ref, _tol(ref, ref64), f"{kind} vs diffusers' guider loop")
    plain = _run(pipe, inputs, latents, steps, w)
    assert (plain - ref).abs().max() > 100 * torch.as_tensor(_tol(ref, ref64)).max()


def test_accelerate_extra_pass_per_prompt_scales_and_errors():
    """Per-prompt scales with PAG in one batch equal one stock PAG run per prompt; errors."""
    scales, steps = [5.0, 2.0], 3
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER), batch=2)
    ours = _accelerated(pipe, inputs, latents, Guidance(scales, method=PAG(scale=3.0, layers=("mid",))), steps, 2.0)
    stock = _pag_stock(pipe, ("mid",))
    for k, s in enumerate(scales):
        one = {n: v[k:k + 1] for n, v in inputs.items()}
        ref = _run(stock, one, latents[k:k + 1], steps, s, pag_scale=3.0)
        stock.to(dtype=torch.float64)
        try:
            ref64 = _run(stock, {n: v.double() for n, v in one.items()}, latents[k:k + 1].double(), steps, s,
                         pag_scale=3.0)
        finally:
            stock.to(dtype=torch.float32)
        assert_close_to_peer(ours[k:k + 1], ref, _tol(ref, ref64), f"prompt {k} scale {s}")

    class NoFlag:                      # a pipeline that does not say whether it runs CFG
        unet = pipe.unet
        scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="do_classifier_free_guidance"):
        fd.accelerate(NoFlag(), guidance=PAG(layers=("mid",)))
    with pytest.raises(ValueError, match="no block list"):
        fd.accelerate(pipe, guidance=SLG(layers=(0,)))
    assert type(pipe.scheduler).__module__.startswith("diffusers")        # nothing left swapped


# ---------------------------------------------------------------------------------------------
# 4. fastdiff.sample through PerturbedModel, and per-sample scales with a method.

def _unet_model(unet):
    def model(x, t, ehs):
        return unet(x, t, encoder_hidden_states=ehs).sample
    return model


def _sample_unet(pipe, inputs, latents, steps, guidance, model):
    sched = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER)
    sched.set_timesteps(steps)
    grid = Grid.from_times(DiscreteVP(beta_schedule="scaled_linear"), sched.timesteps.numpy().astype(np.float64),
                           final="zero")
    return fastdiff.sample(model, latents.double(), grid=grid, solver="dpmpp_2m", guidance=guidance,
                           cond={"ehs": inputs["prompt_embeds"].double()},
                           uncond={"ehs": inputs["negative_prompt_embeds"].double()},
                           state_dtype=torch.float64, model_dtype=torch.float64, progress=False,
                           solver_options={"lower_order_final": True})


@pytest.mark.parametrize("kind", ["pag", "ag"])
@torch.no_grad()
def test_sample_with_perturbed_model_equals_diffusers_guider_loop(kind):
    """fastdiff.sample (DPM-Solver++(2M), float64) with PerturbedModel vs diffusers'
    DPMSolverMultistepScheduler under the guider loop (float64). Tolerance: the same comparison
    with plain CFG (diffusers' ClassifierFreeGuidance), x PEER_MARGIN: diffusers keeps its
    alphas_cumprod in float32, which moves its loop by ~4e-7 relative; the method adds nothing."""
    from diffusers.guiders import ClassifierFreeGuidance
    steps, w = 6, 4.0
    pipe, inputs, latents = _sd(diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER))
    method, peer = _guider_pair(kind, w)
    loop = dict(scheduler_cls=diffusers.DPMSolverMultistepScheduler)
    ref = _guider_loop(pipe, inputs, latents, peer(), steps, torch.float64, **loop)
    ref_cfg = _guider_loop(pipe, inputs, latents, ClassifierFreeGuidance(guidance_scale=w), steps, torch.float64, **loop)
    pipe.unet.to(torch.float64)
    wrapped = PerturbedModel(_unet_model(pipe.unet), method, batch_size=1, denoiser=pipe.unet)
    batches = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        ours = _sample_unet(pipe, inputs, latents, steps, Guidance(w, method=method), wrapped)
        ours_cfg = _sample_unet(pipe, inputs, latents, steps, Guidance(w), _unet_model(pipe.unet))
    finally:
        hook.remove()
        wrapped.remove()
        pipe.unet.to(torch.float32)
    if kind == "pag":                  # the extra rows only where the window needs them: steps 1..4
        assert batches[:steps] == [2, 3, 3, 3, 3, 2]
    tol = PEER_MARGIN * (ours_cfg - ref_cfg).abs().max().item() + 1e-12 * ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    assert (ours - ours_cfg).abs().max() > 100 * tol          # the method matters


def test_sample_per_sample_scales_with_a_method():
    """Guidance([s_1, .., s_B], method=...) in one batch equals B runs with scalar scales (the
    method's per-sample formulas, the fused step fed the combination)."""
    from test_guiders import SHAPE, CondMixture, _sched, _ours_run
    schedule = DiscreteVP()
    model = CondMixture(schedule)
    grid = Grid.from_times(schedule, _sched(6).timesteps.numpy().astype(np.float64), final="zero")
    noise = _randn(*SHAPE, seed=5)
    B = SHAPE[0]
    scales = [4.0 + k for k in range(B)]
    scales[-1] = 1.0                                            # one sample without guidance
    for method in (APG(momentum=-0.5, norm_threshold=3.0), CFGZeroStar(), TCFG()):
        both = _ours_run(model, noise, grid, Guidance(scales, method=method))
        for b, s in enumerate(scales):
            one = _ours_run(model, noise[b:b + 1], grid, Guidance(s, method=method))
            torch.testing.assert_close(both[b:b + 1], one, rtol=0, atol=1e-12, msg=f"{method.name} sample {b}")


def test_sample_extra_pass_without_wrapper_is_a_clear_error():
    from test_guiders import SHAPE, CondMixture, _sched, _ours_run
    schedule = DiscreteVP()
    grid = Grid.from_times(schedule, _sched(4).timesteps.numpy().astype(np.float64), final="zero")
    with pytest.raises(RuntimeError, match="PerturbedModel"):
        _ours_run(CondMixture(schedule), _randn(*SHAPE, seed=1), grid, Guidance(4.0, method=PAG(layers=(0,))))


# ---------------------------------------------------------------------------------------------
# 5. FDG's frequency-space rescale against diffusers (guidance_rescale_space="freq").

@pytest.mark.parametrize("original", [False, True])
def test_fdg_freq_rescale_matches_diffusers(original):
    from unittest import mock
    from diffusers.guiders import frequency_decoupled_guidance as Fm
    from test_guiders import _np_pyramid, _np_up
    scales, phis = (6.0, 3.0), (0.7, 0.3)
    c = _randn(2, 4, 16, 16, seed=41)
    u = 0.8 * c + 0.4 * _randn(2, 4, 16, 16, seed=42)

    def pyr(x, levels):
        return [torch.from_numpy(a).to(x.dtype) for a in _np_pyramid(x.double().numpy(), levels)]
    with mock.patch.object(Fm, "_CAN_USE_KORNIA", True), \
            mock.patch.object(Fm, "build_laplacian_pyramid_func", pyr), \
            mock.patch.object(Fm, "upsample_and_blur_func",
                              lambda x: torch.from_numpy(_np_up(x.double().numpy())).to(x.dtype)):
        peer = Fm.FrequencyDecoupledGuidance(guidance_scales=list(scales), guidance_rescale=list(phis),
                                             guidance_rescale_space="freq", use_original_formulation=original)
        peer.set_state(0, 1, torch.tensor(999))
        ref = peer.forward(c, u).pred
    ours = FDG(scales, freq_rescale=phis).combine(c, u, 5.0, original, 0, {})
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    plain = FDG(scales).combine(c, u, 5.0, original, 0, {})
    assert (plain - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="freq_rescale"):
        FDG(scales, freq_rescale=(0.5,))
    with pytest.raises(ValueError, match="freq_rescale"):
        FDG(scales, freq_rescale=1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fold_and_combine_against_the_float64_formula(dtype):
    """The fused path's fold and the computed path against the formula in float64, on odd,
    non-contiguous inputs of every model dtype; the inputs are left as they were."""
    base = [_randn(7, 9, 5, 3, seed=60 + k) for k in range(3)]
    c, u, p = (t.to(dtype).transpose(1, 3) for t in base)        # [3, 5, 9, 7], non-contiguous
    assert not c.is_contiguous()
    before = [t.clone() for t in (c, u, p)]
    c64, u64, p64 = (t.double() for t in (c, u, p))
    m = SLG(scale=1.7, layers=(0,), start=None, stop=None)
    ulp = torch.finfo(torch.float32 if dtype != torch.float64 else torch.float64).eps
    for g, one_plus_w in ((4.0, False), (-2.5, False), (3.0, True), (1.0, False), (1.0, True), (0.0, False)):
        cfg = g != 1.0
        if cfg:
            want = (c64 if one_plus_w else u64) + ((g - 1) if one_plus_w else g) * (c64 - u64) + 1.7 * (c64 - p64)
        else:
            want = (c64 if one_plus_w else p64) + 1.7 * (c64 - p64)
        got = m.combine_extra(c, u, p, g, one_plus_w, 3, 10)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        scale = float(want.abs().max()) + abs(g) * float(c64.abs().max() + u64.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=16 * ulp * scale)
        if cfg and g != 0.0:
            fused = u64 + g * (m.fold(c, p, g).double() - u64)
            torch.testing.assert_close(fused, want, rtol=0, atol=16 * ulp * (abs(g) + 3) * scale)
    for t, b in zip((c, u, p), before):
        assert torch.equal(t, b)


@torch.no_grad()
def test_sample_per_sample_scales_with_pag():
    """Per-sample scales with PAG through PerturbedModel (batch 2: [u; c; c] = 6 rows) equal the
    two runs with scalar scales (float64: the UNet's batch-size rounding is ~1e-15)."""
    steps = 4
    pipe, inputs, latents = _sd(diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER), batch=2)
    method = PAG(scale=2.0, layers=(0,), fqn=MID)
    pipe.unet.to(torch.float64)
    try:
        wrapped = PerturbedModel(_unet_model(pipe.unet), method, batch_size=2, denoiser=pipe.unet)
        try:
            both = _sample_unet(pipe, inputs, latents, steps, Guidance([4.0, 1.0], method=method), wrapped)
        finally:
            wrapped.remove()
        for b, s in enumerate([4.0, 1.0]):
            one = {k: v[b:b + 1] for k, v in inputs.items()}
            with PerturbedModel(_unet_model(pipe.unet), method, batch_size=1, denoiser=pipe.unet) as wrapped:
                ref = _sample_unet(pipe, one, latents[b:b + 1], steps, Guidance(s, method=method), wrapped)
            assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks
                           for m in pipe.unet.modules())            # removed on leaving the block
            torch.testing.assert_close(both[b:b + 1], ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    finally:
        pipe.unet.to(torch.float32)
    with pytest.raises(ValueError, match="batch_size"):
        PerturbedModel(_unet_model(pipe.unet), method, batch_size=0, denoiser=pipe.unet)
    with pytest.raises(ValueError, match="extra-pass"):
        PerturbedModel(_unet_model(pipe.unet), APG(), batch_size=1, denoiser=pipe.unet)


def test_guidance_hook_takes_p_from_its_caller():
    """A sampler that batches the perturbed pass itself hands p to the hook (``perturbed=``): the
    hook folds it for the fused step (CFG on) or computes the CFG-off formula, and p given
    explicitly wins over the mailbox."""
    from fastdiff.guidance import GuidanceHook
    from fastdiff.guiders import mailbox
    from fastdiff.sampler import Sampler
    method = PAG(scale=2.0, layers=(0,))
    sampler = Sampler.build(solver="ddim", steps=4, guidance=Guidance(3.0, method=method), state_dtype=torch.float64)
    prog = sampler.program
    table = torch.from_numpy(prog.table)
    hook = GuidanceHook(sampler.guidance, prog, "epsilon", table)
    c, u, p, E = (_randn(2, 3, 4, 4, seed=80 + k) for k in range(4))
    mailbox(method).put(torch.full_like(p, 1e6))                # would be wrong if read
    row = prog.rows[0]
    tab, cp, up = hook(0, row, E, c, u, torch.zeros(2), perturbed=p)
    assert tab is table and up is u
    torch.testing.assert_close(cp, c + (2.0 / 3.0) * (c - p), rtol=0, atol=1e-14)
    tab, D, none = hook(1, prog.rows[1], E, c, None, torch.zeros(2), perturbed=p)       # CFG off
    assert none is None
    torch.testing.assert_close(D, p + 2.0 * (c - p), rtol=0, atol=1e-14)
