"""Issue 12, drop-in items 2, 5 and 7, and whole pipelines on every drop-in.

* item 2: a pipeline saved after a scheduler swap or ``accelerate`` is a stock diffusers folder
  (``model_index.json`` names diffusers' scheduler class), which stock diffusers loads with its own
  scheduler and fastdiff loads with its drop-in; ``from_pretrained(..., scheduler=<drop-in>)`` works.
* item 5: the lazy CFG tensors of ``accelerate`` read correctly in every way, including fastdiff's
  own C++ ops, ``as_subclass`` and anything else that reaches the storage without Python.
* item 7: the PNDMScheduler drop-in (PLMS with its Runge-Kutta warm-up, ``skip_prk_steps``),
  step-by-step parity with stock PNDM within diffusers' own float32 precision.
* Must show: a whole fp16 tiny SD (and SDXL) pipeline, end to end after ``accelerate(pipe)`` and
  after a swap, for every drop-in class (clip_sample/thresholding on where the class has them),
  saved and reloaded with stock diffusers and with fastdiff.

Everything is built offline from tiny random-weight configs (no downloads).
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import PEER_MARGIN, assert_close_to_peer, peer_tolerance

diffusers = pytest.importorskip("diffusers")
fd = pytest.importorskip("fastdiff.integrations.diffusers")
from fastdiff import ops  # noqa: E402
from fastdiff.integrations.diffusers.cfg import GuidedOutput, tag_model_output  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
logging.getLogger("diffusers").setLevel(logging.ERROR)
diffusers.utils.logging.set_verbosity_error()

SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)


# ---------------------------------------------------------------------------------------------
# Tiny pipelines


def _tiny_vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   latent_channels=4, norm_num_groups=8, sample_size=32).eval()


def _tiny_unet(**extra):
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, **extra).eval()


def _sd(scheduler, dtype=torch.float32):
    pytest.importorskip("transformers")        # diffusers' Stable Diffusion pipelines import it
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=_tiny_unet(),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    inputs = {"prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype),
              "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype)}
    return pipe, inputs


def _sdxl(scheduler, dtype=torch.float32):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = _tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=4 * 6 + 8)
    pipe = diffusers.StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    inputs = {"prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype),
              "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype),
              "pooled_prompt_embeds": torch.randn(1, 8, generator=g).to(dtype),
              "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g).to(dtype)}
    return pipe, inputs


def _run(pipe, inputs, steps=3, **kw):
    kw = {"num_inference_steps": steps, "guidance_scale": 5.0, "output_type": "pt", "height": 16, "width": 16, **kw}
    # Pipelines that pass no generator to step() (SD3) leave a stochastic scheduler to torch's global RNG.
    torch.manual_seed(0)
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), **kw).images


def _scheduler_entry(folder):
    with open(folder / "model_index.json") as f:
        return json.load(f)["scheduler"]


_ABSENT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
               tokenizer_3=None, safety_checker=None,
               feature_extractor=None, image_encoder=None)


def _load(folder, pipeline_class=None, **kw):
    """``from_pretrained`` of a tiny pipeline (its text encoders etc. were None when saved)."""
    cls = pipeline_class or diffusers.DiffusionPipeline
    with open(folder / "model_index.json") as f:
        absent = {k: None for k, v in json.load(f).items() if k in _ABSENT and v == [None, None]}
    pipe = cls.from_pretrained(folder, **absent, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# Item 2: saving and loading


@pytest.mark.parametrize("how", ["accelerate", "swap"])
def test_saved_pipeline_is_a_stock_folder_loaded_by_diffusers_and_by_fastdiff(tmp_path, how):
    stock_scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER, solver_order=3)
    pipe, inputs = _sd(stock_scheduler)
    reference = _run(pipe, inputs)
    if how == "accelerate":
        handle = fd.accelerate(pipe)
    else:
        pipe.scheduler = fd.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, fd.DPMSolverMultistepScheduler)
    ours = _run(pipe, inputs)
    pipe.save_pretrained(tmp_path)
    assert _scheduler_entry(tmp_path) == ["diffusers", "DPMSolverMultistepScheduler"]

    # stock diffusers: its own scheduler, same config, same images
    loaded = _load(tmp_path)
    assert type(loaded.scheduler) is diffusers.DPMSolverMultistepScheduler
    assert _stock_config(loaded.scheduler) == _stock_config(stock_scheduler)
    torch.testing.assert_close(_run(loaded, inputs), reference, rtol=0, atol=1e-5)

    # fastdiff: the drop-in of the same config, same images
    h = fd.accelerate(loaded)
    assert type(loaded.scheduler) is fd.DPMSolverMultistepScheduler
    torch.testing.assert_close(_run(loaded, inputs), ours, rtol=0, atol=1e-5)
    h.remove()
    scheduler = fd.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _stock_config(scheduler) == _stock_config(stock_scheduler)
    if how == "accelerate":
        handle.remove()


def test_from_pretrained_with_a_drop_in_scheduler_passed_explicitly(tmp_path):
    pipe, inputs = _sd(diffusers.EulerDiscreteScheduler(**SD_SCHEDULER))
    fd.accelerate(pipe)
    pipe.save_pretrained(tmp_path)
    drop_in = fd.EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    loaded = _load(tmp_path, scheduler=drop_in)
    assert loaded.scheduler is drop_in
    # and a drop-in of another class, passed to a folder saved by stock diffusers
    stock, _ = _sd(diffusers.DDIMScheduler(**SD_SCHEDULER))
    stock.save_pretrained(tmp_path / "stock")
    other = fd.UniPCMultistepScheduler.from_config(stock.scheduler.config)
    loaded = _load(tmp_path / "stock", diffusers.StableDiffusionPipeline, scheduler=other)
    assert loaded.scheduler is other
    loaded.save_pretrained(tmp_path / "again")
    assert _scheduler_entry(tmp_path / "again") == ["diffusers", "UniPCMultistepScheduler"]


def test_accelerate_keeps_the_config_the_pipeline_fixed_up():
    """StableDiffusionPipeline rewrites an old config's steps_offset to 1 without updating its
    ``_use_default_values``, which ``from_config`` then drops: the drop-in must keep the value."""
    pipe, _ = _sd(diffusers.DDIMScheduler(timestep_spacing="leading"))
    assert pipe.scheduler.config.steps_offset == 1
    stock = pipe.scheduler
    fd.accelerate(pipe)
    assert pipe.scheduler.config.steps_offset == 1
    for s in (stock, pipe.scheduler):
        s.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == stock.timesteps.tolist()


def test_every_drop_in_reports_diffusers_library_and_class():
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
    for name, cls in fd.DROP_INS.items():
        assert cls.__name__ == name and issubclass(cls, getattr(diffusers, name))
        assert _fetch_class_library_tuple(cls.from_config(getattr(diffusers, name)().config)) == ("diffusers", name)
        assert cls.__module__.startswith("fastdiff.")      # the class itself stays fastdiff's (pickle, repr)


# ---------------------------------------------------------------------------------------------
# Item 5: the lazy CFG tensors read correctly in every way


def _lazy(shape=(4, 3, 5), g=2.5, dtype=torch.float32):
    out = tag_model_output(torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype))
    u, c = out.chunk(2)
    pu, pc = out._plain.chunk(2)
    return u + g * (c - u), pu + g * (pc - pu), (c - u), (pc - pu), g * (c - u), g * (pc - pu)


def _fresh(kind):
    d, eager, diff, ediff, scaled, escaled = _lazy()
    return {"guided": (d, eager), "difference": (diff, ediff), "scaled": (scaled, escaled)}[kind]


@pytest.mark.parametrize("kind", ["guided", "difference", "scaled"])
@pytest.mark.parametrize("read", [
    "cfg_combine_cpu", "cfg_combine_reference", "cfg_combine_as_uncond", "as_subclass", "make_subclass", "data",
    "detach", "contiguous", "clone", "numpy", "data_ptr", "storage", "dlpack", "fused_step_cpu", "fused_step_reference",
])
def test_lazy_cfg_tensors_read_correctly_everywhere(kind, read):
    lazy, eager = _fresh(kind)
    assert type(lazy) is not torch.Tensor and lazy.shape == eager.shape
    if read.startswith("cfg_combine"):
        if read == "cfg_combine_as_uncond":
            got = ops.cfg_combine(eager, lazy, 0.0, backend="cpu")           # u + 0 (c - u) = u
        else:
            got = ops.cfg_combine(lazy, None, 1.0, backend=read.split("_")[-1])
    elif read == "as_subclass":
        got = lazy.as_subclass(torch.Tensor)
        assert type(got) is torch.Tensor
    elif read == "make_subclass":
        got = torch.Tensor._make_subclass(torch.Tensor, lazy)
    elif read in ("data", "detach", "contiguous", "clone"):
        got = lazy.data if read == "data" else getattr(lazy, read)()
    elif read == "numpy":
        got = torch.from_numpy(lazy.numpy().copy())
    elif read == "data_ptr":                     # the pointer leads to the value
        import ctypes
        ptr = ctypes.cast(lazy.data_ptr(), ctypes.POINTER(ctypes.c_float))
        got = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(eager.numel(),)).copy()).view(eager.shape)
    elif read == "storage":
        got = torch.empty(0).set_(lazy.untyped_storage(), lazy.storage_offset(), lazy.shape, lazy.stride())
    elif read == "dlpack":
        got = torch.from_dlpack(lazy)
    else:                                         # the fused step reads it as the model output: x' = D
        from fastdiff.program import COL_G, COL_QD, col_out, table_width, OUT_H
        table = torch.zeros(1, table_width(0), dtype=torch.float64)
        table[0, COL_G], table[0, COL_QD], table[0, col_out(0, "x") + OUT_H] = 1.0, 1.0, 1.0
        got = torch.zeros(eager.shape)
        ops.fused_step(table, 0, got, cond=lazy, backend=read.split("_")[-1])
    assert torch.equal(got, eager), f"{read}: max |diff| {float((got - eager).abs().max())}"


def test_lazy_cfg_tensor_in_a_drop_in_step_as_a_plain_model_output():
    """A lazy value that is not the whole formula (``g * (c - u)``) given to step() is its value."""
    _, _, _, _, scaled, escaled = _lazy((2, 4, 4, 4))
    s = fd.EulerDiscreteScheduler(**SD_SCHEDULER)
    ref = diffusers.EulerDiscreteScheduler(**SD_SCHEDULER)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for sch in (s, ref):
        sch.set_timesteps(3)
    got = s.step(scaled, s.timesteps[0], x).prev_sample
    want = ref.step(escaled, ref.timesteps[0], x).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lazy_cfg_tensor_still_reaches_the_step_unevaluated():
    d, eager, *_ = _lazy((2, 4, 4, 4))
    assert type(d) is GuidedOutput and d._cached is None
    assert d.shape == (1, 4, 4, 4) and d.dtype == torch.float32 and d.dim() == 4 and d.device.type == "cpu"
    cond, uncond, g = d.parts()
    assert g == 2.5 and type(cond) is torch.Tensor and type(uncond) is torch.Tensor


# ---------------------------------------------------------------------------------------------
# Item 7: PNDMScheduler


PNDM_GRID = [(skip, prediction, steps, one, offset)
             for skip in (True, False) for prediction in ("epsilon", "v_prediction") for steps in (1, 4, 5, 20, 50)
             for one in (False, True) for offset in (0, 1)]


def _pndm_config(skip, prediction, one, offset=1, **extra):
    # steps_offset=0 (diffusers' default) ends at t = 0, and without set_alpha_to_one its last step
    # goes to alphas_cumprod[0], the same noise level: the identity
    return dict(SD_SCHEDULER, skip_prk_steps=skip, prediction_type=prediction, set_alpha_to_one=one,
                **{**extra, "steps_offset": offset})


def _trajectory(scheduler, steps, dtype, x_init, outputs):
    """Every step's prev_sample of a run fed from its own outputs; model output = o_k + 0.3 x."""
    scheduler.set_timesteps(steps)
    x, xs = x_init.to(dtype), []
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(outputs[k].to(dtype) + 0.3 * x, t, x).prev_sample
        xs.append(x)
    return xs


@pytest.mark.parametrize("skip, prediction, steps, one, offset", PNDM_GRID)
def test_pndm_step_by_step_matches_stock(skip, prediction, steps, one, offset):
    config = _pndm_config(skip, prediction, one, offset)
    stock = diffusers.PNDMScheduler(**config)
    ours = fd.PNDMScheduler(**config)
    if not skip and steps < 4:           # diffusers' PRK warm-up needs 4 timesteps: the same error
        with pytest.raises(ValueError) as want:
            stock.set_timesteps(steps)
        with pytest.raises(ValueError) as got:
            ours.set_timesteps(steps)
        assert str(got.value) == str(want.value)
        return
    stock.set_timesteps(steps)
    calls = len(stock.timesteps)
    g = torch.Generator().manual_seed(steps)
    x_init = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=g)
    outputs = [torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=g) for _ in range(calls)]
    peer = _trajectory(diffusers.PNDMScheduler(**config), steps, torch.float32, x_init, outputs)
    peer64 = _trajectory(diffusers.PNDMScheduler(**config), steps, torch.float64, x_init, outputs)
    mine = _trajectory(ours, steps, torch.float32, x_init, outputs)
    assert len(mine) == calls
    for k, (a, p, p64) in enumerate(zip(mine, peer, peer64)):
        assert a.dtype == p.dtype
        # the peer's precision at this call: elementwise, and its worst error over the tensor
        # (where its float32 run happens to hit the float64 value, ours need not)
        tol = peer_tolerance(p, p64) + PEER_MARGIN * float((p.double() - p64).abs().max())
        assert_close_to_peer(a, p, tol, f"call {k} of {calls}")


def test_pndm_drop_in_is_found_by_accelerate_and_listed():
    pipe, inputs = _sd(diffusers.PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True))
    stock = _run(pipe, inputs, steps=4)
    handle = fd.accelerate(pipe)
    assert type(pipe.scheduler) is fd.PNDMScheduler
    torch.testing.assert_close(_run(pipe, inputs, steps=4), stock, rtol=0, atol=1e-5)
    handle.remove()
    assert "PNDMScheduler" in fd.DROP_INS and fd.DROP_INS["PNDMScheduler"] is fd.PNDMScheduler
    listed = {c.__name__ for c in fd.DPMSolverMultistepScheduler().compatibles}
    assert "PNDMScheduler" in listed and set(listed) & set(fd.DROP_INS) >= {"PNDMScheduler", "DDIMScheduler"}


def test_pndm_unsupported_configurations_say_what():
    s = fd.PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, timestep_spacing="linspace")
    s.set_timesteps(5)
    with pytest.raises(NotImplementedError, match="timestep_spacing='linspace'"):
        s.step(torch.zeros(1, 4), s.timesteps[0], torch.zeros(1, 4))
    s = fd.PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True)
    s.set_timesteps(5)
    s.set_begin_index(2)
    with pytest.raises(NotImplementedError, match="first timestep"):
        s.step(torch.zeros(1, 4), s.timesteps[2], torch.zeros(1, 4))
    with pytest.raises(NotImplementedError, match="prediction_type"):
        fd.PNDMScheduler(prediction_type="sample")


def test_pndm_solver_variants_equal_the_textbook():
    """fastdiff's pndm solver (skip warm-up, diffusers' v form) against its textbook oracle, float64."""
    from fastdiff import Sampler
    from fastdiff.models.gaussian_mixture import GaussianMixture
    from fastdiff.schedules import DiscreteVP, make_grid
    from fastdiff.textbook.pndm import sample_pndm
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    for steps in (1, 2, 3, 4, 9):
        grid = make_grid(schedule, steps, "leading", steps_offset=1)
        for opts in ({"warmup": "skip"}, {"warmup": "skip", "quantity": "v"}, {"warmup": "prk", "quantity": "v"}):
            for prediction in ("epsilon", "v_prediction"):
                model = GaussianMixture.default(schedule, dim=6, prediction=prediction)
                noise = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
                sampler = Sampler.build(solver="pndm", grid=grid, prediction=prediction, solver_options=opts,
                                        state_dtype=torch.float64)
                out = sampler(model, noise, backend="reference", progress=False)
                ref = sample_pndm(model, noise * schedule.init_noise_scale(float(grid.alpha[0]), float(grid.sigma[0])),
                                  grid, prediction, **opts)
                err = float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
                assert err < 1e-10, (steps, opts, prediction, err)


# ---------------------------------------------------------------------------------------------
# Must show: whole fp16 pipelines on every drop-in class


FLOW = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"}
# Classes no stock SD/SDXL/SD3 pipeline can run (no init_noise_sigma, another step signature, or no
# step at all): their drop-ins are judged step by step in tests/test_dropins_more.py.
NOT_IN_PIPELINES = {"CogVideoXDPMScheduler", "ScoreSdeVeScheduler", "RePaintScheduler"}
_PIPE = sorted(n for n in fd.DROP_INS if n not in FLOW | NOT_IN_PIPELINES)
FP16_GRID = [("sd", n) for n in _PIPE] + [("sdxl", n) for n in _PIPE] + [("sd3", n) for n in sorted(FLOW)]


def _class_config(name: str) -> dict:
    """The class's config for SD latents, with clip_sample / thresholding on where it has them."""
    import inspect
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    config = {k: v for k, v in SD_SCHEDULER.items() if k in params}
    for option in ("clip_sample", "thresholding"):
        if option in params:
            config[option] = True
    if "noise_sampler_seed" in params:          # else diffusers seeds its Brownian tree at random
        config["noise_sampler_seed"] = 0
    return config


def _sd3(scheduler, dtype=torch.float32):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.1,
                                  scaling_factor=1.5).eval()
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                              tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    inputs = {"prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype),
              "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g).to(dtype),
              "pooled_prompt_embeds": torch.randn(1, 8, generator=g).to(dtype),
              "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g).to(dtype)}
    return pipe, inputs


BUILDERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3}


@pytest.mark.parametrize("kind, name", FP16_GRID)
def test_fp16_pipeline_end_to_end_on_every_drop_in(tmp_path, kind, name):
    """fp16 weights and latents: the stock pipeline, a swap, ``accelerate``; saved after
    ``accelerate`` and loaded by stock diffusers (stock scheduler) and by fastdiff (the drop-in).
    The tolerance is the stock pipeline's own fp16 error: |stock fp16 - stock fp32| on the same
    (fp16-valued) weights, x PEER_MARGIN."""
    config = _class_config(name)
    # (set after construction: StableDiffusionPipeline's constructor turns clip_sample off)
    pipe, inputs = BUILDERS[kind](getattr(diffusers, name)(**config), torch.float16)
    pipe.scheduler = getattr(diffusers, name)(**config)
    steps = 4                                           # PNDM's Runge-Kutta warm-up needs 4
    stock16 = _run(pipe, inputs, steps)
    ref32, ref_inputs = BUILDERS[kind](getattr(diffusers, name)(**config), torch.float16)
    ref32.scheduler = getattr(diffusers, name)(**config)
    ref32.to(dtype=torch.float32)
    stock32 = _run(ref32, {k: v.float() for k, v in ref_inputs.items()}, steps)
    del ref32
    assert stock16.dtype == torch.float16 or stock16.dtype == torch.float32
    assert torch.isfinite(stock16).all()
    tol = PEER_MARGIN * float((stock16.float() - stock32).abs().max()) + 2e-3     # + 2 ulps of fp16 at 1.0

    def close(images, what):
        err = float((images.float() - stock16.float()).abs().max())
        assert images.dtype == stock16.dtype and err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"

    stock_scheduler = pipe.scheduler
    pipe.scheduler = getattr(fd, name).from_config(stock_scheduler.config)         # a swap
    for option in ("clip_sample", "thresholding"):
        if option in config:
            assert pipe.scheduler.config[option] is True
    close(_run(pipe, inputs, steps), "swap")
    pipe.scheduler = stock_scheduler
    handle = fd.accelerate(pipe)                                                     # accelerate
    assert type(pipe.scheduler) is getattr(fd, name)
    accelerated = _run(pipe, inputs, steps)
    close(accelerated, "accelerate")

    pipe.save_pretrained(tmp_path)                                                   # saved, reloaded
    handle.remove()
    assert _scheduler_entry(tmp_path) == ["diffusers", name]
    loaded = _load(tmp_path, torch_dtype=torch.float16)
    assert type(loaded.scheduler) is getattr(diffusers, name)
    # the saved scheduler config as it is (a loading SD pipeline turns clip_sample off again)
    loaded.scheduler = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    assert _stock_config(loaded.scheduler) == _stock_config(stock_scheduler)
    torch.testing.assert_close(_run(loaded, inputs, steps), stock16, rtol=0, atol=0)
    fd.accelerate(loaded)
    assert type(loaded.scheduler) is getattr(fd, name)
    torch.testing.assert_close(_run(loaded, inputs, steps), accelerated, rtol=0, atol=0)
