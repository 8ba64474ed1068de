"""``accelerate(pipe)``: a diffusers pipeline on fastdiff, without changing the pipeline's code.

    from fastdiff.integrations.diffusers import accelerate
    handle = accelerate(pipe)      # pipe(...) now samples with fastdiff
    images = pipe(prompt_embeds=..., negative_prompt_embeds=..., guidance_scale=7.5).images
    handle.remove()                # the pipeline as it was

Three independent parts, each optional:

* ``scheduler``: the pipeline's scheduler is replaced by the fastdiff drop-in of the same class
  and config, exactly (fastdiff.integrations.diffusers.schedulers, ``pndm``; ``DROP_INS``); a
  config the drop-in cannot run raises NotImplementedError naming the option (pass
  ``scheduler=False`` to keep diffusers' scheduler).
* ``attention``: the denoiser's attention modules that run AttnProcessor2_0 run
  FastdiffAttnProcessor instead (other processors, e.g. joint or rotary attention, are kept).
  ``"auto"`` (default) does so only where fastdiff has an attention kernel for the denoiser's
  device and dtype (the Triton flash kernel on CUDA); elsewhere FastdiffAttnProcessor would call
  the same torch SDPA as AttnProcessor2_0, plus its dispatch, so the processors are kept.
* ``fuse_cfg``: a forward hook tags the denoiser's output, so the pipeline's own CFG formula
  ``u + g * (c - u)`` is recorded instead of computed and the drop-in scheduler combines the two
  branches inside its fused step (fastdiff.integrations.diffusers.cfg). This applies where the
  pipeline writes CFG that way right before ``scheduler.step`` (StableDiffusion, SDXL, SD3,
  PixArt, Flux's true CFG, ...). Where it does something else with the prediction first
  (``guidance_rescale > 0``, DiT's learned-sigma split, slicing, casting), that expression is
  computed as the pipeline wrote it and the step receives the plain tensor: same result, not fused.
  Recording costs ~20 us of Python per step (benchmarks/diffusers_bench.py): on the CPU that is
  more than the eager formula at SD-1.5's latent and less at an SDXL batch; on a GPU it runs
  while the device works, and the formula's three kernels and their memory traffic are saved.

* ``guidance``: a guidance method (fastdiff.guiders) in place of the pipeline's CFG:
  a name (``"apg"``, ``"cfg_zero_star"``, ``"tcfg"``, ``"mambo_g"``, ``"cfg_renorm"``, ``"fdg"``), a
  ``Guider`` instance (``fastdiff.guiders.APG(momentum=-0.5)``) or a ``fastdiff.Guidance`` whose
  ``method`` / ``convention`` are used. The pipeline's recorded ``u + g * (c - u)`` then stands for
  the method's combination with the pipeline's ``guidance_scale`` as g (convention "w", or "1+w"
  from a Guidance); the step index the method sees is the pipeline's loop index (the count of
  ``scheduler.step`` calls since ``set_timesteps``), and per-run state (APG's momentum) restarts
  with every ``set_timesteps``. Per-prompt scales: ``guidance=fastdiff.Guidance([7.5, 3.0])`` (one
  scale per prompt, plain CFG, each prompt's ``num_images_per_prompt`` copies share its scale)
  replaces the pipeline's scalar g; call the pipeline with any ``guidance_scale > 1`` so that it
  runs both branches; ``Guidance([7.5, 3.0], method="apg")`` takes both. Needs ``fuse_cfg``;
  applies only where the pipeline runs CFG as above.
  Extra-pass methods, ``fastdiff.guiders.PAG(scale, layers=("mid",))``, ``SLG(layers=(7, 8, 9))``,
  ``SEG(...)``, ``AutoGuidance(...)``: hooks on the named layers (perturbed.py) perturb chosen batch
  rows; at the steps the method's window includes, the denoiser's [u; c] call becomes one
  [u; c; c] call (every batched input extended), the perturbed output p is kept for the recorded
  formula, and the fused step gets c' = c + (s/g)(c - p) and u (PAG, SLG, SEG). Without CFG the
  method's CFG-off formula is applied right away. AutoGuidance perturbs the uncond rows. PAG's
  layers keep their attention processors (it acts inside torch's SDPA). The pipeline must have
  ``do_classifier_free_guidance`` (SD, SDXL, SD3, PixArt, ...). ``remove()`` takes the hooks off.

Saving and loading: a drop-in records diffusers' library and class in ``model_index.json``, so
``pipe.save_pretrained(folder)`` after a swap or ``accelerate`` writes a stock diffusers folder.
Stock diffusers loads it with its own scheduler of the same config; fastdiff loads it with
``accelerate(DiffusionPipeline.from_pretrained(folder))``, or the scheduler alone with
``DiffusionPipeline.from_pretrained(folder, scheduler=fd.<Class>.from_pretrained(folder, subfolder="scheduler"))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .attention import FastdiffAttnProcessor, replaceable_processor
from .cfg import GuiderContext, tag_model_output
from .schedulers import DROP_INS

__all__ = ["accelerate", "Acceleration", "denoiser_of", "has_attention_kernel"]

_DENOISERS = ("unet", "transformer")


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` or ``pipe.transformer``."""
    for name in _DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no denoiser fastdiff knows (looked for {', '.join(_DENOISERS)})")


@dataclass
class Acceleration:
    """What ``accelerate`` changed on a pipeline; ``remove()`` puts it back."""

    pipe: Any
    scheduler: Optional[Any] = None                     # the original scheduler, if replaced
    processors: Optional[Dict[Any, Any]] = None         # attention module -> its original processor
    hooks: List[Any] = field(default_factory=list)
    guider: Optional[GuiderContext] = None              # the guidance method's context, if any
    wrapped: Optional[Any] = None                       # the scheduler whose step/set_timesteps are wrapped
    perturbation: Optional[Any] = None                  # extra-pass guidance: the perturbed layers' hooks

    def remove(self):
        if self.wrapped is not None:
            for name in ("step", "set_timesteps"):
                self.wrapped.__dict__.pop(name, None)
            self.wrapped = None
        if self.scheduler is not None:
            self.pipe.scheduler = self.scheduler
            self.scheduler = None
        if self.processors is not None:
            for module, processor in self.processors.items():
                module.set_processor(processor)
            self.processors = None
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        if self.perturbation is not None:
            self.perturbation.remove()
            self.perturbation = None


def accelerate(pipe, *, scheduler: bool = True, attention="auto", fuse_cfg="auto",
               attention_backend: str = "auto", guidance=None) -> Acceleration:
    """Run ``pipe`` on fastdiff: drop-in scheduler, fastdiff attention (True, False or "auto"), CFG
    fused into the step (True; "auto": where that is faster than the pipeline's own CFG, see
    ``fusing_cfg_pays``; False), optionally a guidance method or per-prompt scales (``guidance``,
    which always go through the recorded CFG formula; see the module docstring). Returns an
    ``Acceleration`` whose ``remove()`` undoes it."""
    if attention not in (True, False, "auto"):
        raise ValueError(f"attention must be True, False or 'auto', got {attention!r}")
    if fuse_cfg not in (True, False, "auto"):
        raise ValueError(f"fuse_cfg must be True, False or 'auto', got {fuse_cfg!r}")
    ctx = _guider_context(guidance)
    if ctx is not None and not fuse_cfg:
        raise ValueError("guidance= acts through the recorded CFG formula: it needs fuse_cfg=True")
    denoiser = denoiser_of(pipe)
    if attention == "auto":
        attention = has_attention_kernel(denoiser)
    if fuse_cfg and not scheduler and not _is_fastdiff(pipe.scheduler):
        raise ValueError("fuse_cfg needs a fastdiff scheduler to combine the CFG branches; pass scheduler=True "
                         "(or fuse_cfg=False)")
    perturbs = ctx is not None and hasattr(ctx.method, "perturbation")
    if perturbs and not hasattr(type(pipe), "do_classifier_free_guidance"):   # a property, set by __call__
        raise ValueError(f"{ctx.method.name} through accelerate needs a pipeline that says whether it runs CFG "
                         f"(do_classifier_free_guidance); {type(pipe).__name__} has none")
    handle = Acceleration(pipe)
    try:
        if perturbs:
            from .perturbed import Perturbation
            handle.perturbation = Perturbation(denoiser, ctx.method)
        if scheduler and not _is_fastdiff(pipe.scheduler):
            name = type(pipe.scheduler).__name__
            if name not in DROP_INS:
                raise NotImplementedError(f"fastdiff has no drop-in for {name}; available: {', '.join(sorted(DROP_INS))} "
                                          "(pass scheduler=False to keep the pipeline's scheduler)")
            # the same class: the config as it is (from_config would drop the keys listed in
            # _use_default_values, which pipelines do not update when they fix up a config)
            config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
            replacement = DROP_INS[name].from_config(config)
            handle.scheduler = pipe.scheduler
            pipe.scheduler = replacement
        if attention:
            processor = FastdiffAttnProcessor(attention_backend)
            handle.processors = {}
            # PAG's layers keep their processors: the perturbation acts on torch's SDPA inside them
            keep = set(handle.perturbation.modules) if handle.perturbation is not None else set()
            for module in denoiser.modules():
                if module in keep:
                    continue
                if hasattr(module, "set_processor") and replaceable_processor(getattr(module, "processor", None)):
                    handle.processors[module] = module.processor
                    module.set_processor(processor)
        if fuse_cfg:
            if ctx is None:
                handle.hooks.append(denoiser.register_forward_hook(_plain_cfg_hook(pipe, fuse_cfg == "auto")))
            else:
                handle.guider = ctx
                _count_steps(pipe.scheduler, ctx)
                handle.wrapped = pipe.scheduler
                if handle.perturbation is None:
                    handle.hooks.append(denoiser.register_forward_hook(
                        lambda module, args, output: tag_model_output(output, ctx)))
                else:
                    pre, post = _extra_pass_hooks(pipe, ctx, handle.perturbation)
                    handle.hooks.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True))
                    handle.hooks.append(denoiser.register_forward_hook(post))
    except Exception:
        handle.remove()
        raise
    return handle


def has_attention_kernel(module: torch.nn.Module) -> bool:
    """Whether fastdiff.attention has a kernel of its own (not torch's SDPA, not the reference)
    for the device and dtype of ``module``'s parameters."""
    from ... import attention as fd_attention
    p = next(module.parameters(), None)
    if p is None:
        return False
    probe = torch.empty(1, 1, 1, 8, dtype=p.dtype, device=p.device)
    for name, backend in fd_attention.ATTENTION_BACKENDS.items():
        if name in ("sdpa", "reference"):
            continue
        if not backend.unavailable_reason() and not backend.not_supported_reasons("attention", [probe] * 3):
            return True
    return False


def _is_fastdiff(scheduler) -> bool:
    from .base import FastdiffScheduler
    return isinstance(scheduler, FastdiffScheduler)


# Below this many elements per CFG half, a CPU step computes the pipeline's CFG faster itself than
# through the recording (~35 us of __torch_function__ per step, measured at SD-1.5's latent:
# benchmarks/diffusers_bench.py's CFG rows), and so does any step whose scheduler returns
# pred_original_sample, which needs the guided output itself.
CPU_FUSE_MIN_ELEMENTS = 1 << 16


def fusing_cfg_pays(scheduler, output: torch.Tensor) -> bool:
    """Whether recording the pipeline's CFG for the fused step is faster than computing it: on a
    GPU always (it saves three kernel launches and three passes over the latents; argued, not
    measured here), on the CPU for large latents and schedulers that do not also return x0."""
    if output.device.type != "cpu":
        return True
    return not getattr(scheduler, "_returns_x0", True) and output.numel() // 2 >= CPU_FUSE_MIN_ELEMENTS


def _plain_cfg_hook(pipe, auto: bool):
    """The denoiser's forward hook for plain CFG: tags the output (``auto``: where fusing pays)."""
    def hook(module, args, output):
        if auto:
            try:
                t = _first_tensor(output)
            except TypeError:             # (no tensor to tag: tag_model_output leaves it as it is)
                return output
            if not fusing_cfg_pays(pipe.scheduler, t):
                return output
        return tag_model_output(output)
    return hook


def _guider_context(guidance) -> Optional[GuiderContext]:
    """The GuiderContext of ``accelerate``'s ``guidance`` argument (None: plain CFG)."""
    if guidance is None:
        return None
    from ...guidance import Guidance
    from ...guiders import Guider, as_guider
    if isinstance(guidance, (str, Guider)):
        return GuiderContext(as_guider(guidance))
    if not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be None, a guidance method name, a fastdiff.guiders.Guider or a "
                        f"fastdiff.Guidance, got {type(guidance).__name__}")
    unsupported = [name for name, on in (("interval", guidance.interval is not None),
                                         ("rescale", guidance.rescale > 0.0),
                                         ("x0_clip", guidance.x0_clip is not None),
                                         ("classifier", guidance.classifier is not None)) if on]
    if unsupported:
        raise ValueError(f"accelerate(pipe, guidance=...) takes a Guidance's method, convention and per-sample "
                         f"scales only, not {', '.join(unsupported)} (the pipeline's guidance_scale is its own)")
    if guidance.per_sample:
        return GuiderContext(guidance.method, one_plus_w=guidance.convention == "1+w", g_vector=guidance.g_vector())
    if guidance.method is None:
        raise ValueError("a Guidance for accelerate(pipe) needs a method or per-sample scales; a single scale is the "
                         "pipeline's guidance_scale argument")
    if guidance.scale != 1.0:
        raise ValueError(f"Guidance(scale={guidance.scale:g}) would be ignored: the scale is the pipeline's "
                         "guidance_scale argument (leave the Guidance's scale at its default)")
    return GuiderContext(guidance.method, one_plus_w=guidance.convention == "1+w")


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"extra-pass guidance needs the denoiser to return a tensor, a tuple or an output with .sample, "
                    f"got {type(output).__name__}")


def _with_first_tensor(output, tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor,) + output[1:]
    if isinstance(output, list):
        return [tensor] + output[1:]
    output.sample = tensor
    return output


def _extra_pass_hooks(pipe, ctx: GuiderContext, perturbation):
    """Forward pre-hook and hook on the denoiser for extra-pass guidance.

    PAG / SLG / SEG where the method's window includes the step: the pipeline's call on [u; c]
    (CFG on) or [c] becomes one call on [u; c; c] or [c; c] (every batched input extended by its
    conditional rows), the perturbation on the appended rows; the hook splits the output, keeps p
    in ``ctx.perturbed`` for the recorded CFG formula and gives the pipeline its usual output.
    Without CFG the pipeline applies no formula, so the hook returns the method's CFG-off
    combination itself. AutoGuidance: the uncond rows of [u; c] are perturbed, no extra rows."""
    from ...guiders import AutoGuidance
    from .perturbed import extend_batch
    method = ctx.method
    call = {}

    def pre(module, args, kwargs):
        perturbation.rows = None
        ctx.perturbed = None
        call.clear()
        x = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError("extra-pass guidance needs the denoiser's first input (sample / hidden_states) as a "
                            "batched tensor")
        n, cfg = x.shape[0], bool(pipe.do_classifier_free_guidance)
        if cfg and n % 2:
            raise ValueError(f"a CFG batch of {n} latents: expected [uncond; cond] halves")
        if isinstance(method, AutoGuidance):
            if cfg and method.active(ctx.step, ctx.num_steps):
                perturbation.rows = slice(0, n // 2)
            return None
        if not method.extra_active(ctx.step, ctx.num_steps):
            return None
        args, kwargs = extend_batch(args, kwargs, n, slice(n // 2, n) if cfg else slice(0, n))
        perturbation.rows = slice(n, None)
        call.update(n=n, cfg=cfg)
        return args, kwargs

    def post(module, args, output):
        perturbation.rows = None
        if not call:
            return tag_model_output(output, ctx)
        n, cfg = call["n"], call["cfg"]
        call.clear()
        full = _first_tensor(output)
        main, extra = full[:n], full[n:]
        if cfg:
            ctx.perturbed = extra
            return tag_model_output(_with_first_tensor(output, main), ctx)
        D = method.combine_extra(main, None, extra, 1.0, ctx.one_plus_w, ctx.step, ctx.num_steps)
        return _with_first_tensor(output, D.to(main.dtype))

    return pre, post


def _count_steps(scheduler, ctx: GuiderContext):
    """Wrap ``scheduler``'s step / set_timesteps (on the instance) so that ``ctx.step`` is the
    pipeline's loop index and the method's state restarts with each run."""
    import functools
    step, set_timesteps = scheduler.step, scheduler.set_timesteps

    @functools.wraps(set_timesteps)
    def counted_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        n = getattr(scheduler, "num_inference_steps", None)
        ctx.reset(int(n) if n is not None else len(scheduler.timesteps))
        return out

    @functools.wraps(step)
    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        ctx.step += 1
        return out

    scheduler.set_timesteps = counted_set_timesteps
    scheduler.step = counted_step
