"""Real diffusers pipelines on fastdiff (fastdiff.integrations.diffusers), built offline from tiny
random-weight configs; prompt embeddings are passed directly (no tokenizer or text encoder).

For each pipeline: the stock pipeline's images, the same pipeline with the fastdiff drop-in
scheduler swapped in, and the pipeline after ``accelerate(pipe)`` (drop-in scheduler, fastdiff
attention processor, CFG fused into the step) agree within IMAGE_TOL on images in [0, 1] (the
float32 rounding of a different, equally exact, operation order: observed <= 1e-6). Also: that
CFG really reached the step unevaluated, the lazy CFG tensors themselves, the attention
processor, and accelerate's bad input and undo.
"""
from __future__ import annotations

import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
from fastdiff.integrations.diffusers import base as fd_base  # noqa: E402
from fastdiff.integrations.diffusers.cfg import GuidedOutput, ModelPart, tag_model_output  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

IMAGE_TOL = 1e-5
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _tiny_vae(latent_channels=4, **extra):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra).eval()


def _tiny_unet(**extra):
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, **extra).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    pytest.importorskip("transformers")        # diffusers' Stable Diffusion pipelines import it
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=_tiny_unet(),
                                             scheduler=diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _quiet(pipe), {"prompt_embeds": torch.randn(2, 7, 16), "negative_prompt_embeds": torch.randn(2, 7, 16)}


def _run(pipe, inputs, **kw):
    kw = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "pt", "height": 16, "width": 16, **kw}
    out = pipe(**inputs, generator=torch.Generator().manual_seed(0), **kw)
    return out.images if hasattr(out, "images") else out[0]


def _assert_close(a, b, tol=IMAGE_TOL):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= tol, f"max |difference| {err:.3g} > {tol}"


@pytest.fixture
def guided_steps(monkeypatch):
    """Records the type of every model output a fastdiff scheduler step receives that is not a
    plain tensor (a GuidedOutput when CFG reached the step unevaluated)."""
    seen = []
    unpack = fd_base._unpack

    def spy(model_output):
        seen.append(type(model_output).__name__)
        return unpack(model_output)
    monkeypatch.setattr(fd_base, "_unpack", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Stable Diffusion


@pytest.mark.parametrize("name, config, generator_noise", [
    ("DPMSolverMultistepScheduler", SD_SCHEDULER, False),
    ("EulerAncestralDiscreteScheduler", SD_SCHEDULER, True),
    ("UniPCMultistepScheduler", dict(SD_SCHEDULER, solver_order=3), False),
    ("HeunDiscreteScheduler", dict(SD_SCHEDULER, use_karras_sigmas=True), False),
    ("DPMSolverSinglestepScheduler", dict(SD_SCHEDULER, solver_order=3), False),
])
def test_sd_swapped_scheduler_and_accelerated_match_stock(sd, name, config, generator_noise, guided_steps):
    pipe, inputs = sd
    original = pipe.scheduler
    try:
        pipe.scheduler = getattr(diffusers, name)(**config)
        stock = _run(pipe, inputs)
        pipe.scheduler = getattr(fd, name).from_config(pipe.scheduler.config)
        _assert_close(_run(pipe, inputs), stock)
        assert not guided_steps                      # a plain swap: the pipeline combined CFG itself
        pipe.scheduler = getattr(diffusers, name)(**config)
        handle = fd.accelerate(pipe, attention=True, fuse_cfg=True)    # every part, also where 'auto' would not
        try:
            assert isinstance(pipe.scheduler, getattr(fd, name))
            accelerated = _run(pipe, inputs)
        finally:
            handle.remove()
        _assert_close(accelerated, stock)
        assert guided_steps and set(guided_steps) == {"GuidedOutput"}, guided_steps   # CFG fused into every step
        assert type(pipe.scheduler) is getattr(diffusers, name)
    finally:
        pipe.scheduler = original


def test_sd_accelerated_guidance_rescale_falls_back_to_the_pipelines_cfg(sd, guided_steps):
    """guidance_rescale computes a std of the CFG result: it is computed eagerly, same images."""
    pipe, inputs = sd
    stock = _run(pipe, inputs, guidance_rescale=0.7)
    with_handle = fd.accelerate(pipe)
    try:
        accelerated = _run(pipe, inputs, guidance_rescale=0.7)
    finally:
        with_handle.remove()
    _assert_close(accelerated, stock)
    assert "GuidedOutput" not in guided_steps


def test_sd_accelerated_without_cfg(sd):
    pipe, inputs = sd
    stock = _run(pipe, {"prompt_embeds": inputs["prompt_embeds"]}, guidance_scale=1.0)
    handle = fd.accelerate(pipe)
    try:
        _assert_close(_run(pipe, {"prompt_embeds": inputs["prompt_embeds"]}, guidance_scale=1.0), stock)
    finally:
        handle.remove()


def test_sd_img2img_accelerated_matches_stock(sd):
    """img2img begins mid-schedule (set_begin_index): the multistep warm-up restarts there."""
    pipe, inputs = sd
    img2img = _quiet(diffusers.StableDiffusionImg2ImgPipeline(**pipe.components))
    img2img.scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER, solver_order=3)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(image=image, strength=0.6, num_inference_steps=8)
    stock = _run(img2img, inputs, **kw)
    handle = fd.accelerate(img2img)
    try:
        _assert_close(_run(img2img, inputs, **kw), stock)
    finally:
        handle.remove()


def test_sdxl_accelerated_matches_stock(guided_steps):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = _tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=4 * 6 + 8)
    pipe = _quiet(diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing")))
    inputs = {"prompt_embeds": torch.randn(1, 7, 16), "negative_prompt_embeds": torch.randn(1, 7, 16),
              "pooled_prompt_embeds": torch.randn(1, 8), "negative_pooled_prompt_embeds": torch.randn(1, 8)}
    stock = _run(pipe, inputs)
    handle = fd.accelerate(pipe, fuse_cfg=True)
    try:
        _assert_close(_run(pipe, inputs), stock)
    finally:
        handle.remove()
    assert set(guided_steps) == {"GuidedOutput"}


# ---------------------------------------------------------------------------------------------
# SD3 (flow matching, joint attention) and DiT (class-conditional transformer)


def test_sd3_accelerated_matches_stock(guided_steps):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    pipe = _quiet(diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(shift_factor=0.1, scaling_factor=1.5), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None))
    inputs = {"prompt_embeds": torch.randn(1, 7, 16), "negative_prompt_embeds": torch.randn(1, 7, 16),
              "pooled_prompt_embeds": torch.randn(1, 8), "negative_pooled_prompt_embeds": torch.randn(1, 8)}
    kw = {"height": 16, "width": 16, "guidance_scale": 4.0}
    stock = _run(pipe, inputs, **kw)
    pipe.scheduler = fd.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _assert_close(_run(pipe, inputs, **kw), stock)
    handle = fd.accelerate(pipe, fuse_cfg=True)
    try:
        _assert_close(_run(pipe, inputs, **kw), stock)
    finally:
        handle.remove()
    assert set(guided_steps) == {"GuidedOutput"}


def test_dit_accelerated_matches_stock(guided_steps):
    """DiT splits off its learned sigma and steps the doubled batch: CFG is left to the pipeline
    (the step gets a plain tensor), the scheduler and attention processors are fastdiff's."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, norm_num_groups=8, num_embeds_ada_norm=1000).eval()
    pipe = _quiet(diffusers.DiTPipeline(transformer=transformer, vae=_tiny_vae(),
                                        scheduler=diffusers.DDIMScheduler(clip_sample=False), id2label={0: "a", 1: "b"}))
    kw = {"class_labels": [1, 0], "num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np"}
    stock = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    handle = fd.accelerate(pipe, attention=True)
    try:
        processors = {type(m.processor).__name__ for m in transformer.modules() if hasattr(m, "set_processor")}
        assert processors == {"FastdiffAttnProcessor"}
        accelerated = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        handle.remove()
    _assert_close(accelerated, stock)
    assert "GuidedOutput" not in guided_steps


# ---------------------------------------------------------------------------------------------
# accelerate: undo and bad input


def test_accelerate_remove_restores_the_pipeline(sd):
    pipe, inputs = sd
    scheduler, unet = pipe.scheduler, pipe.unet
    processors = dict(unet.attn_processors)
    handle = fd.accelerate(pipe, attention=True, fuse_cfg=True)
    assert pipe.scheduler is not scheduler and isinstance(pipe.scheduler, fd.DPMSolverMultistepScheduler)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FastdiffAttnProcessor"}
    assert isinstance(unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 16), return_dict=False)[0], ModelPart)
    handle.remove()
    assert pipe.scheduler is scheduler
    assert unet.attn_processors == processors
    assert type(unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 16), return_dict=False)[0]) is torch.Tensor


def test_accelerate_unsupported_scheduler_raises_and_leaves_the_pipeline(sd):
    pipe, _ = sd
    original = pipe.scheduler
    # a diffusers scheduler class fastdiff has no drop-in for (the list shrinks as drop-ins are added)
    have = set(fd.DROP_INS)                                           # class names
    cls = next(getattr(diffusers, n) for n in ("UnCLIPScheduler", "VQDiffusionScheduler") if n not in have)
    pipe.scheduler = cls()
    processors = dict(pipe.unet.attn_processors)
    try:
        with pytest.raises(NotImplementedError, match=f"no drop-in for {cls.__name__}"):
            fd.accelerate(pipe)
        assert type(pipe.scheduler) is cls
        assert pipe.unet.attn_processors == processors and not pipe.unet._forward_hooks
        handle = fd.accelerate(pipe, scheduler=False, fuse_cfg=False, attention=True)      # attention only
        assert type(pipe.scheduler) is cls
        handle.remove()
        with pytest.raises(ValueError, match="fuse_cfg needs a fastdiff scheduler"):
            fd.accelerate(pipe, scheduler=False)
    finally:
        pipe.scheduler = original


def test_accelerate_needs_a_denoiser_and_a_valid_attention_option(sd):
    with pytest.raises(ValueError, match="no denoiser"):
        fd.accelerate(object())
    with pytest.raises(ValueError, match="attention must be True, False or 'auto'"):
        fd.accelerate(sd[0], attention="yes")


def test_accelerate_auto_attention_keeps_sdpa_where_fastdiff_has_no_kernel(sd):
    """On the CPU fastdiff's attention is torch's SDPA: 'auto' keeps the pipeline's processors."""
    from fastdiff.integrations.diffusers.pipelines import has_attention_kernel
    pipe, _ = sd
    before = dict(pipe.unet.attn_processors)
    handle = fd.accelerate(pipe)
    try:
        expected = has_attention_kernel(pipe.unet)
        kinds = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
        assert kinds == ({"FastdiffAttnProcessor"} if expected else {type(p).__name__ for p in before.values()})
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# The attention processor


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_attention_processor_matches_attn_processor_2_0(backend):
    torch.manual_seed(0)
    unet = _tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        ref = unet(x, t, ctx, encoder_attention_mask=mask).sample
        unet.set_attn_processor(fd.FastdiffAttnProcessor(backend))
        out = unet(x, t, ctx, encoder_attention_mask=mask).sample
    _assert_close(out, ref, 1e-5 * float(ref.abs().max()))


def test_attention_processor_bad_backend():
    with pytest.raises(ValueError, match="unknown attention backend"):
        fd.FastdiffAttnProcessor("flash9")


# ---------------------------------------------------------------------------------------------
# The lazy CFG tensors


def _halves():
    out = tag_model_output(torch.randn(4, 3, 5))
    u, c = out.chunk(2)
    return out, u, c


def test_cfg_expression_is_recorded_not_computed():
    out, u, c = _halves()
    assert isinstance(out, ModelPart) and type(u) is ModelPart
    for expr in (lambda: u + 7.5 * (c - u), lambda: u + (c - u) * 7.5, lambda: (c - u) * 7.5 + u):
        d = expr()
        assert type(d) is GuidedOutput
        assert d.shape == (2, 3, 5) and d.dtype == torch.float32 and d.dim() == 3   # metadata without computing
        assert d._cached is None
        cond, uncond, g = d.parts()
        assert g == 7.5 and torch.equal(cond, c.as_subclass(torch.Tensor)) and torch.equal(uncond, u.as_subclass(torch.Tensor))


def test_cfg_lazy_values_equal_eager_values_everywhere_else():
    out, u, c = _halves()
    plain = out.as_subclass(torch.Tensor)
    pu, pc = plain.chunk(2)
    eager = pu + 7.5 * (pc - pu)
    d = u + 7.5 * (c - u)
    assert torch.equal(d.std(dim=(1, 2)), eager.std(dim=(1, 2)))          # guidance_rescale's reductions
    assert torch.equal(d[:, :2], eager[:, :2]) and type(d[:, :2]) is torch.Tensor
    assert torch.equal(d.to(torch.float64), eager.to(torch.float64))
    assert torch.equal(torch.cat([d, d]), torch.cat([eager, eager]))
    assert torch.equal(d * 2, eager * 2) and type(d * 2) is torch.Tensor
    assert torch.equal((c - u) * u, (pc - pu) * pu)                         # not the CFG pattern: computed
    assert torch.equal(u + 2.0 * (c - c.clone()), pu + 2.0 * (pc - pc))
    assert "tensor" in repr(d) and "nan" not in repr(d)
    assert torch.equal(out + 1, plain + 1)


def test_cfg_two_model_calls_flux_true_cfg():
    """Flux's true CFG combines the outputs of two separate calls: recorded too."""
    pos, neg = tag_model_output(torch.randn(1, 6)), tag_model_output((torch.randn(1, 6),))[0]
    d = neg + 3.0 * (pos - neg)
    assert type(d) is GuidedOutput
    eager = neg.as_subclass(torch.Tensor) + 3.0 * (pos.as_subclass(torch.Tensor) - neg.as_subclass(torch.Tensor))
    assert torch.equal(d + 0, eager)


def test_cfg_parts_after_in_place_changes():
    out, u, c = _halves()
    d = u + 2.0 * (c - u)
    d.add_(1.0)                                  # an in-place change computes the value and keeps it
    value, none, g = d.parts()
    assert none is None and g == 1.0 and torch.equal(value, d + 0)
    out, u, c = _halves()
    d = u + 2.0 * (c - u)
    c.mul_(3.0)                                  # a branch changed after the formula: cannot be recovered
    with pytest.raises(RuntimeError, match="modified in place"):
        d.parts()


def test_tag_model_output_containers():
    t = torch.randn(2, 3)
    assert isinstance(tag_model_output(t), ModelPart)
    assert isinstance(tag_model_output((t, 1))[0], ModelPart)
    assert isinstance(tag_model_output([t])[0], ModelPart)
    out = diffusers.models.unets.unet_2d_condition.UNet2DConditionOutput(sample=t)
    assert isinstance(tag_model_output(out).sample, ModelPart)
    assert tag_model_output("not a tensor") == "not a tensor"


def test_fuse_cfg_auto_fuses_only_where_it_pays(sd, guided_steps):
    """fuse_cfg='auto' (the default) leaves the pipeline's own CFG where the recording would cost
    more than it saves: small CPU latents, and schedulers that return x0 (they need the guided
    output anyway); the result is stock's either way."""
    from fastdiff.integrations.diffusers.pipelines import CPU_FUSE_MIN_ELEMENTS, fusing_cfg_pays
    big = torch.empty(2, 4, 128, 128)
    assert big.numel() // 2 >= CPU_FUSE_MIN_ELEMENTS
    assert fusing_cfg_pays(fd.DPMSolverMultistepScheduler(), big)
    assert not fusing_cfg_pays(fd.EulerDiscreteScheduler(), big)               # returns pred_original_sample
    assert not fusing_cfg_pays(fd.DPMSolverMultistepScheduler(), torch.empty(2, 4, 8, 8))
    pipe, inputs = sd
    original = pipe.scheduler
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER)
    try:
        stock = _run(pipe, inputs)
        handle = fd.accelerate(pipe)
        try:
            _assert_close(_run(pipe, inputs), stock)
        finally:
            handle.remove()
    finally:
        pipe.scheduler = original
    assert not guided_steps                          # tiny latents: the pipeline's CFG, not recorded
    with pytest.raises(ValueError, match="fuse_cfg must be"):
        fd.accelerate(pipe, fuse_cfg="yes")
