"""Issue 14, "Guidance methods": the single-pass guiders (fastdiff.guiders) and per-prompt guidance
scales in an unmodified diffusers pipeline through ``accelerate(pipe, guidance=...)``.

The reference is the stock pipeline's own loop (StableDiffusionPipeline's steps, written out)
with diffusers' scheduler and the same guider applied by hand to the UNet's two branches; the
tolerance is that loop's own float32-vs-float64 precision (conftest.peer_tolerance)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import PEER_MARGIN, assert_close_to_peer, peer_tolerance

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
from fastdiff import Guidance  # noqa: E402
from fastdiff.guiders import APG, as_guider  # noqa: E402
from fastdiff.integrations.diffusers.cfg import GuidedOutput, GuiderContext  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
STEPS, SIZE = 4, 16


def _sd(scheduler, batch=1):
    pytest.importorskip("transformers")        # diffusers' Stable Diffusion pipelines import it
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    inputs = {"prompt_embeds": torch.randn(batch, 7, 16, generator=g),
              "negative_prompt_embeds": torch.randn(batch, 7, 16, generator=g)}
    latents = torch.randn(batch, 4, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor, generator=g)
    return pipe, inputs, latents


def _tol(stock, stock64):
    """The stock run's own precision: elementwise, plus PEER_MARGIN x its worst float32 error
    (as tests/test_dropin_pipelines.py: a whole trajectory's rounding is not elementwise)."""
    return peer_tolerance(stock, stock64) + PEER_MARGIN * float((stock.double() - stock64).abs().max())


def _accelerated(pipe, inputs, latents, guidance, scale=5.0):
    handle = fd.accelerate(pipe, guidance=guidance)
    try:
        return pipe(**inputs, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=scale,
                    output_type="latent", height=SIZE, width=SIZE).images
    finally:
        handle.remove()


@torch.no_grad()
def _stock_loop(pipe, inputs, latents, combine, dtype):
    """StableDiffusionPipeline.__call__ (output_type="latent") written out, diffusers' scheduler,
    with ``combine(c, u, step)`` in place of the pipeline's CFG formula, in ``dtype``."""
    pipe.to(dtype=dtype)
    try:
        # the config as the pipeline fixed it up (from_config would reset _use_default_values keys)
        config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        scheduler = type(pipe.scheduler).from_config(config)
        scheduler.set_timesteps(STEPS)
        embeds = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]]).to(dtype)
        x = latents.to(dtype) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            xin = scheduler.scale_model_input(torch.cat([x] * 2), t)
            out = pipe.unet(xin, t, encoder_hidden_states=embeds, return_dict=False)[0]
            u, c = out.chunk(2)
            x = scheduler.step(combine(c, u, i), t, x, return_dict=False)[0]
        return x
    finally:
        pipe.to(dtype=torch.float32)


def _method_combine(method, g, one_plus_w=False):
    guider, state = as_guider(method), {}

    def combine(c, u, step):
        D = guider.pre(c, step)
        return D.to(c.dtype) if D is not None else guider.combine(c, u, g, one_plus_w, step, state).to(c.dtype)
    return combine


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("method", ["apg", "cfg_zero_star", "tcfg", APG(momentum=-0.5, norm_threshold=2.0, eta=0.3),
                                    "mambo_g", "cfg_renorm"])
def test_accelerated_sd_with_a_guider_equals_the_stock_loop(scheduler, method, monkeypatch):
    pipe, inputs, latents = _sd(getattr(diffusers, scheduler)(**SD_SCHEDULER))
    seen = {}
    original = GuidedOutput.parts
    monkeypatch.setattr(GuidedOutput, "parts", lambda self: (seen.setdefault(id(self), self), original(self))[1])
    ours = _accelerated(pipe, inputs, latents, method)
    # the recorded formula reached the step at every step, standing for the method
    assert len(seen) == STEPS and all(isinstance(o._ctx, GuiderContext) for o in seen.values())
    stock = _stock_loop(pipe, inputs, latents, _method_combine(method, 5.0), torch.float32)
    stock64 = _stock_loop(pipe, inputs, latents, _method_combine(method, 5.0), torch.float64)
    assert_close_to_peer(ours, stock, _tol(stock, stock64), f"{scheduler} {method}")
    if method == "apg":     # defaults (eta 1, threshold 15 above this tiny model's ||c - u||): plain CFG exactly
        return
    # the method matters here: plain CFG is far outside that tolerance
    plain = _stock_loop(pipe, inputs, latents, lambda c, u, i: u + 5.0 * (c - u), torch.float32)
    assert (ours - plain).abs().max() > 10 * torch.as_tensor(_tol(stock, stock64)).max()


def test_guider_convention_one_plus_w_and_runs_are_independent():
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    method = APG(momentum=0.5, norm_threshold=1.0)
    gd = Guidance(method=method, convention="1+w")
    first = _accelerated(pipe, inputs, latents, gd)
    handle = fd.accelerate(pipe, guidance=gd)
    try:          # two runs on one handle: the momentum and step count restart with set_timesteps
        kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", height=SIZE, width=SIZE)
        a = pipe(**inputs, latents=latents.clone(), **kw).images
        b = pipe(**inputs, latents=latents.clone(), **kw).images
    finally:
        handle.remove()
    assert torch.equal(a, b) and torch.equal(a, first)
    stock = _stock_loop(pipe, inputs, latents, _method_combine(method, 5.0, True), torch.float32)
    stock64 = _stock_loop(pipe, inputs, latents, _method_combine(method, 5.0, True), torch.float64)
    assert_close_to_peer(first, stock, _tol(stock, stock64), "APG 1+w")
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_per_prompt_guidance_scales_equal_one_stock_run_per_prompt():
    """A batch of prompts with different scales in one accelerated call equals the stock pipeline
    run once per prompt with its own guidance_scale (num_images_per_prompt copies share it)."""
    scales = [7.5, 2.0, 4.0]
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER), batch=3)
    latents2 = torch.stack([latents, latents + 0.25], 1).flatten(0, 1)     # prompt k's copies at 2k, 2k + 1
    handle = fd.accelerate(pipe, guidance=Guidance(torch.tensor(scales)))
    try:
        ours = pipe(**inputs, latents=latents2.clone(), num_images_per_prompt=2, num_inference_steps=STEPS,
                    guidance_scale=2.0, output_type="latent", height=SIZE, width=SIZE).images
    finally:
        handle.remove()
    for k, s in enumerate(scales):
        one = {n: v[k:k + 1] for n, v in inputs.items()}
        for j in range(2):
            x = latents2[2 * k + j:2 * k + j + 1]
            kw = dict(num_inference_steps=STEPS, guidance_scale=s, output_type="latent", height=SIZE, width=SIZE)
            stock = pipe(**one, latents=x.clone(), **kw).images
            pipe.to(dtype=torch.float64)
            try:
                stock64 = pipe(**{n: v.double() for n, v in one.items()}, latents=x.double(), **kw).images
            finally:
                pipe.to(dtype=torch.float32)
            assert_close_to_peer(ours[2 * k + j:2 * k + j + 1], stock, _tol(stock, stock64),
                                 f"prompt {k} copy {j} (scale {s})")


def test_accelerate_guidance_argument_errors():
    pipe, _, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    scheduler = pipe.scheduler
    for bad, exc, match in [("nope", ValueError, "unknown guidance method"),
                            (3, TypeError, "guidance must be"),
                            (Guidance(7.5, method="apg"), ValueError, "guidance_scale argument"),
                            (Guidance(7.5), ValueError, "needs a method or per-sample"),
                            (Guidance(method="apg", rescale=0.5), ValueError, "rescale")]:
        with pytest.raises(exc, match=match):
            fd.accelerate(pipe, guidance=bad)
        assert pipe.scheduler is scheduler
    with pytest.raises(ValueError, match="fuse_cfg"):
        fd.accelerate(pipe, guidance="apg", fuse_cfg=False)
    handle = fd.accelerate(pipe, guidance=Guidance([1.5, 2.0]))
    try:
        g = torch.Generator().manual_seed(0)
        with pytest.raises(ValueError, match="per-sample guidance scales for a batch of 3"):
            pipe(prompt_embeds=torch.randn(3, 7, 16, generator=g),
                 negative_prompt_embeds=torch.randn(3, 7, 16, generator=g), num_inference_steps=2, guidance_scale=2.0, output_type="latent", height=SIZE, width=SIZE)
    finally:
        handle.remove()


def _per_prompt_combine(method, s):
    """The method at scale s; at s = 1 CFG is off: the conditional output (after the method's
    scale-independent ``pre``, CFG-Zero*'s zero-init), as diffusers' guiders when disabled."""
    if s != 1.0:
        return _method_combine(method, s)
    guider = as_guider(method)

    def combine(c, u, step):
        D = guider.pre(c, step)
        return c if D is None else D.to(c.dtype)
    return combine


def test_per_prompt_scales_with_a_method_equal_one_stock_run_per_prompt():
    """Per-prompt scales together with a method (issue 14 leftover): each prompt equals the stock
    loop with the method at that prompt's scale; a prompt at scale 1 gets its conditional output."""
    scales = [6.0, 1.0, 3.0]
    pipe, inputs, latents = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER), batch=3)
    for method in ("cfg_zero_star", APG(momentum=-0.5, norm_threshold=2.0)):
        handle = fd.accelerate(pipe, guidance=Guidance(scales, method=method))
        try:
            ours = pipe(**inputs, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=2.0,
                        output_type="latent", height=SIZE, width=SIZE).images
        finally:
            handle.remove()
        for k, s in enumerate(scales):
            one = {n: v[k:k + 1] for n, v in inputs.items()}
            stock = _stock_loop(pipe, one, latents[k:k + 1], _per_prompt_combine(method, s), torch.float32)
            stock64 = _stock_loop(pipe, one, latents[k:k + 1], _per_prompt_combine(method, s), torch.float64)
            assert_close_to_peer(ours[k:k + 1], stock, _tol(stock, stock64), f"{method} prompt {k} (scale {s})")


# ---------------------------------------------------------------------------------------------
# Every single-pass method through a tiny SD3 pipeline (flow matching, joint attention): the
# stock StableDiffusion3Pipeline loop written out with the method in place of its CFG formula.

def _sd3():
    from test_dropin_pipelines import _sd3 as build
    pipe, inputs = build(diffusers.FlowMatchEulerDiscreteScheduler())
    return pipe, inputs, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _sd3_stock_loop(pipe, inputs, latents, combine, dtype, steps):
    """StableDiffusion3Pipeline.__call__ (output_type="latent") written out, with ``combine``."""
    pipe.to(dtype=dtype)
    try:
        config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        scheduler = type(pipe.scheduler).from_config(config)
        scheduler.set_timesteps(steps)
        embeds = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]]).to(dtype)
        pooled = torch.cat([inputs["negative_pooled_prompt_embeds"], inputs["pooled_prompt_embeds"]]).to(dtype)
        x = latents.to(dtype)
        for i, t in enumerate(scheduler.timesteps):
            xin = torch.cat([x] * 2)
            out = pipe.transformer(hidden_states=xin, timestep=t.expand(2), encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
            u, c = out.chunk(2)
            x = scheduler.step(combine(c, u, i), t, x, return_dict=False)[0]
        return x
    finally:
        pipe.to(dtype=torch.float32)


@pytest.mark.parametrize("method", ["apg", "cfg_zero_star", "tcfg", "mambo_g", "cfg_renorm", "fdg"])
def test_accelerated_sd3_with_every_single_pass_method_equals_the_stock_loop(method):
    steps, scale = 4, 5.0
    pipe, inputs, latents = _sd3()
    handle = fd.accelerate(pipe, guidance=method)
    try:
        ours = pipe(**inputs, latents=latents.clone(), num_inference_steps=steps, guidance_scale=scale,
                    output_type="latent", height=64, width=64).images
    finally:
        handle.remove()
    stock = _sd3_stock_loop(pipe, inputs, latents, _method_combine(method, scale), torch.float32, steps)
    stock64 = _sd3_stock_loop(pipe, inputs, latents, _method_combine(method, scale), torch.float64, steps)
    assert_close_to_peer(ours, stock, _tol(stock, stock64), f"SD3 {method}")
    # the stock loop written out is the stock pipeline (plain CFG)
    plain = pipe(**inputs, latents=latents.clone(), num_inference_steps=steps, guidance_scale=scale,
                 output_type="latent", height=64, width=64).images
    plain_loop = _sd3_stock_loop(pipe, inputs, latents, lambda c, u, i: u + scale * (c - u), torch.float32, steps)
    torch.testing.assert_close(plain_loop, plain, rtol=0, atol=1e-5 * plain.abs().max().item())
    if method not in ("apg", "cfg_renorm"):       # defaults that leave this tiny model's CFG as it is
        assert (ours - plain).abs().max() > 10 * torch.as_tensor(_tol(stock, stock64)).max()
