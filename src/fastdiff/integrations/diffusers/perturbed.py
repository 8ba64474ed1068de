"""The perturbed model of extra-pass guidance (PAG, SLG, SEG, AutoGuidance), batched.

diffusers' guiders run the perturbed model as a separate call, its hooks perturbing the whole
batch. Here the hooks perturb only the batch rows ``Perturbation.rows`` (a slice), so one model
call on [u; c; c] (3B samples) gives u, c and the perturbed p together, the perturbation
applied to the last B rows (PAG, SLG, SEG), or to the first B rows of [u; c] (AutoGuidance,
which degrades the unconditional pass). Rows outside ``rows`` are computed as without hooks;
``rows = None`` (the default between calls) turns every hook off.

What is perturbed, as diffusers' hooks (``diffusers.hooks.layer_skip``,
``diffusers.hooks.smoothed_energy_guidance_utils``), whose registry and helpers are reused:

* ``attention_scores`` (PAG): inside the self-attention modules of the named layers, torch's
  scaled_dot_product_attention returns the values V on the perturbed rows (identity attention
  map) and attends normally on the others (a TorchFunctionMode during the module's forward).
  In joint attention (SD3: image and text tokens in one attention), the identity applies to the
  image-to-image block only, text keys and text queries attending as usual, as diffusers'
  ``PAGJointAttnProcessor2_0`` (diffusers' guider hook cannot perturb SD3's joint processor).
  A processor that does not call torch's SDPA (fastdiff's own attention kernel, for one) raises
  instead of silently not perturbing.
* ``skip_block`` (SLG; AutoGuidance with dropout 1): the named transformer blocks return their
  inputs (hidden states and, where the block returns them, encoder hidden states, at the indices
  diffusers' ``TransformerBlockRegistry`` gives) on the perturbed rows. AutoGuidance with
  dropout < 1: the blocks' feed-forward outputs and then the block outputs on those rows go
  through torch's dropout (training mode), as diffusers' hooks (same draws, same order).
* ``blur_queries`` (SEG): the query projection ``to_q`` of the self-attention modules of the named
  blocks is blurred on the perturbed rows with diffusers' ``SmoothedEnergyGuidanceHook``.

The hooked modules still compute the perturbed rows first (then replace them): simpler than
slicing every batched argument of a block, and it costs only the named layers' share of the
extra pass.

Layers: integers index the block list ``fqn`` ("auto": the first of diffusers'
``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS`` the model has, as ``LayerSkipConfig``); strings are, for
PAG, regexes searched in the denoiser's module names as the PAG pipelines'
``pag_applied_layers`` ("mid", "down.block_2", "transformer_blocks.(1|2)"), and for the others the
full dotted name of a block (a regex matched in full).
"""
from __future__ import annotations

import math
import re
from typing import List, Optional

import torch

__all__ = ["Perturbation", "extend_batch"]

_HOOK = "fastdiff_perturbation"


def _diffusers_hooks():
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES, _get_submodule_from_fqn
    from diffusers.hooks._helpers import TransformerBlockRegistry
    return HookRegistry, ModelHook, _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES, _get_submodule_from_fqn, \
        TransformerBlockRegistry


def _is_self_attention(module, attention_classes) -> bool:
    return isinstance(module, attention_classes) and not getattr(module, "is_cross_attention", False)


def _segments(n: int, rows: slice):
    """(start, stop, perturbed) pieces of range(n) in order."""
    lo, hi, _ = rows.indices(n)
    return [(a, b, p) for a, b, p in ((0, lo, False), (lo, hi, True), (hi, n, False)) if b > a]


class _RowsSDPA(torch.overrides.TorchFunctionMode):
    """SDPA = V on the perturbed rows (where Q and V have the same length, as diffusers'
    AttentionScoreSkipFunctionMode), ordinary attention on the others."""

    def __init__(self, rows: slice, identity_block: Optional[int] = None):
        super().__init__()
        self.rows = rows
        self.identity_block = identity_block
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        args = list(args)
        names = ("query", "key", "value", "attn_mask")
        qkvm = [kwargs.pop(n) if n in kwargs else (args[i] if i < len(args) else None) for i, n in enumerate(names)]
        rest = args[4:]
        q, k, v, mask = qkvm
        self.calls += 1
        n = q.shape[0]
        if q.shape[-2] != v.shape[-2]:
            return func(q, k, v, mask, *rest, **kwargs)
        pieces = []
        for a, b, perturbed in _segments(n, self.rows):
            if perturbed and self.identity_block is not None:
                # joint attention (SD3): identity only within the image block, as diffusers'
                # PAGJointAttnProcessor2_0; text tokens and image-to-text attention stay
                L, I = q.shape[-2], self.identity_block
                full = torch.zeros((L, L), device=q.device, dtype=q.dtype)
                full[:I, :I] = float("-inf")
                full[:I, :I].fill_diagonal_(0)
                pieces.append(func(q[a:b], k[a:b], v[a:b], full[None, None], *rest, **kwargs))
            elif perturbed:
                pieces.append(v[a:b].to(q.dtype) if v.dtype != q.dtype else v[a:b])
            else:
                m = mask[a:b] if (mask is not None and mask.dim() == q.dim() and mask.shape[0] == n) else mask
                pieces.append(func(q[a:b], k[a:b], v[a:b], m, *rest, **kwargs))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class Perturbation:
    """Hooks on ``denoiser`` for ``method`` (a fastdiff.guiders PAG, SLG, SEG or AutoGuidance),
    acting on the batch rows ``self.rows`` only; ``remove()`` takes them off."""

    def __init__(self, denoiser: torch.nn.Module, method):
        (self._Registry, ModelHook, identifiers, attention_classes, get_submodule,
         block_registry) = _diffusers_hooks()
        self.denoiser = denoiser
        self.method = method
        self.rows: Optional[slice] = None
        self.modules: List[torch.nn.Module] = []
        kind = method.perturbation
        owner = self
        blocks = self._blocks(identifiers, get_submodule)

        def output_rows_hook(fn):
            """A hook class that replaces the perturbed rows of a module's output by ``fn(module, those
            rows)`` (the other rows, and every row outside a perturbed call, pass through)."""
            class OutputRowsHook(ModelHook):
                def post_forward(self, module, output):
                    rows = owner.rows
                    if rows is None:
                        return output
                    out = output.clone()
                    out[rows] = fn(module, out[rows])
                    return out
            return OutputRowsHook

        if kind == "attention_scores":
            targets = []
            for block in blocks:
                if _is_self_attention(block, attention_classes):
                    targets.append(block)
                else:
                    targets += [m for m in block.modules() if _is_self_attention(m, attention_classes)]
            targets += self._pag_regex_targets(attention_classes)
            targets = list(dict.fromkeys(targets))
            if not targets:
                raise ValueError(f"{method.name}: no self-attention module in layers {method.layers!r}")

            class AttentionScoresHook(ModelHook):
                def new_forward(self, module, *args, **kwargs):
                    rows = owner.rows
                    if rows is None:
                        return self.fn_ref.original_forward(*args, **kwargs)
                    enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                    hid = kwargs.get("hidden_states", args[0] if args else None)
                    joint = isinstance(enc, torch.Tensor) and not getattr(module, "is_cross_attention", False)
                    mode = _RowsSDPA(rows, hid.shape[1] if joint and hid.dim() == 3 else None)
                    with mode:
                        out = self.fn_ref.original_forward(*args, **kwargs)
                    if mode.calls == 0:
                        raise RuntimeError(f"{owner.method.name} perturbs attention through torch's "
                                           f"scaled_dot_product_attention, which the processor "
                                           f"{type(getattr(module, 'processor', None)).__name__} of this module never "
                                           "called (pass attention=False to accelerate for this method)")
                    return out

            self._install(targets, AttentionScoresHook)

        elif kind == "skip_block":
            dropout = float(getattr(method, "dropout", 1.0))

            class SkipBlockHook(ModelHook):
                def initialize_hook(self, module):
                    self.meta = block_registry.get(type(module))
                    return module

                def new_forward(self, module, *args, **kwargs):
                    out = self.fn_ref.original_forward(*args, **kwargs)
                    rows = owner.rows
                    if rows is None:
                        return out
                    if not math.isclose(dropout, 1.0):
                        if not isinstance(out, torch.Tensor):
                            raise ValueError(f"{owner.method.name} with dropout < 1 needs blocks that return one tensor, "
                                             f"{type(module).__name__} returns {type(out).__name__}")
                        out = out.clone()
                        out[rows] = torch.nn.functional.dropout(out[rows], p=dropout)
                        return out
                    meta = self.meta
                    h = meta._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
                    if meta.return_encoder_hidden_states_index is None:
                        if isinstance(out, torch.Tensor):
                            out = out.clone()
                            out[rows] = h[rows]
                            return out
                        out = list(out)
                        out[meta.return_hidden_states_index] = out[meta.return_hidden_states_index].clone()
                        out[meta.return_hidden_states_index][rows] = h[rows]
                        return tuple(out)
                    e = meta._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs)
                    out = list(out)
                    for idx, src in ((meta.return_hidden_states_index, h), (meta.return_encoder_hidden_states_index, e)):
                        if out[idx] is not None:        # SD3's last block returns no text stream
                            out[idx] = out[idx].clone()
                            out[idx][rows] = src[rows]
                    return tuple(out)

            for b in blocks:
                try:
                    block_registry.get(type(b))
                except ValueError:
                    raise ValueError(f"{method.name}: {type(b).__name__} is not a transformer block diffusers knows how "
                                     "to skip (diffusers.hooks TransformerBlockRegistry)") from None
            if not blocks:
                raise ValueError(f"{method.name}: no block in layers {method.layers!r}")
            self._install(blocks, SkipBlockHook)
            if not math.isclose(dropout, 1.0):
                # diffusers' LayerSkipConfig(skip_ff=True) also drops out the blocks' feed-forward
                # outputs (FeedForwardSkipHook), drawn before the block's own dropout
                from diffusers.hooks._common import _FEEDFORWARD_CLASSES

                self._install([m for b in blocks for m in b.modules() if isinstance(m, _FEEDFORWARD_CLASSES)],
                              output_rows_hook(lambda module, rows: torch.nn.functional.dropout(rows, p=dropout)))

        elif kind == "blur_queries":
            from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook
            blur = SmoothedEnergyGuidanceHook(float(method.blur_sigma))
            targets = []
            for block in blocks:
                for m in block.modules():
                    if _is_self_attention(m, attention_classes) and isinstance(getattr(m, "to_q", None), torch.nn.Linear):
                        targets.append(m.to_q)
            if not targets:
                raise ValueError(f"{method.name}: no self-attention query projection in layers {method.layers!r}")

            self._install(targets, output_rows_hook(lambda module, rows: blur.post_forward(module, rows.clone())))
        else:
            raise ValueError(f"unknown perturbation {kind!r}")

    # -- layer resolution ---------------------------------------------------------------------
    def _blocks(self, identifiers, get_submodule) -> List[torch.nn.Module]:
        method = self.method
        ints = [v for v in method.layers if isinstance(v, int)]
        names = [v for v in method.layers if isinstance(v, str)]
        found: List[torch.nn.Module] = []
        if ints:
            fqn = method.fqn
            if fqn == "auto":
                fqn = next((i for i in sorted(identifiers) if isinstance(getattr(self.denoiser, i, None),
                                                                          torch.nn.ModuleList)), None)
                if fqn is None:
                    raise ValueError(f"{method.name}: the denoiser {type(self.denoiser).__name__} has no block list "
                                     f"diffusers knows ({', '.join(sorted(identifiers))}); pass fqn='<dotted name>'")
            stack = get_submodule(self.denoiser, fqn)
            if not isinstance(stack, torch.nn.ModuleList):
                raise ValueError(f"{method.name}: fqn {fqn!r} is not a torch.nn.ModuleList of blocks in "
                                 f"{type(self.denoiser).__name__}")
            bad = [i for i in ints if i >= len(stack)]
            if bad:
                raise ValueError(f"{method.name}: layer indices {bad} out of range for {fqn!r} ({len(stack)} blocks)")
            found += [stack[i] for i in ints]
        if names and method.perturbation != "attention_scores":
            modules = dict(self.denoiser.named_modules())
            for pattern in names:
                hits = [m for n, m in modules.items() if n and re.fullmatch(pattern, n)]
                if not hits:
                    raise ValueError(f"{method.name}: no module of {type(self.denoiser).__name__} is named {pattern!r}")
                found += hits
        return found

    def _pag_regex_targets(self, attention_classes) -> List[torch.nn.Module]:
        """Self-attention modules whose name contains a layer regex, as the PAG pipelines select
        (``PAGMixin._set_pag_attn_processor``, with its rule against a bare index matching a name's
        last number)."""
        out = []
        for layer_id in (v for v in self.method.layers if isinstance(v, str)):
            hits = []
            for name, module in self.denoiser.named_modules():
                last_id, last_name = layer_id.split(".")[-1], name.split(".")[-1]
                fake = last_id.isnumeric() and last_name.isnumeric() and last_id == last_name
                if _is_self_attention(module, attention_classes) and re.search(layer_id, name) and not fake:
                    hits.append(module)
            if not hits:
                raise ValueError(f"{self.method.name}: no self-attention module of {type(self.denoiser).__name__} "
                                 f"matches layer {layer_id!r}")
            out += hits
        return out

    def _install(self, modules, hook_cls):
        for m in dict.fromkeys(modules):
            self._Registry.check_if_exists_or_initialize(m).register_hook(hook_cls(), _HOOK)
            self.modules.append(m)

    def remove(self):
        for m in self.modules:
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(_HOOK, recurse=False)
        self.modules = []
        self.rows = None


def extend_batch(args, kwargs, n: int, extra: slice):
    """args/kwargs with every tensor of batch ``n`` (dim 0; also inside dicts, lists, tuples)
    extended by its rows ``extra`` at the end: the inputs of the extra pass appended."""
    def ext(v):
        if isinstance(v, torch.Tensor):
            return torch.cat([v, v[extra]]) if v.dim() > 0 and v.shape[0] == n else v
        if isinstance(v, dict):
            return {k: ext(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
            return type(v)(ext(x) for x in v)
        return v
    return tuple(ext(a) for a in args), {k: ext(v) for k, v in kwargs.items()}


class PerturbedModel:
    """``fastdiff.sample`` with extra-pass guidance: wraps ``model(x, t, **kwargs)`` (whose network
    ``denoiser``, default ``model`` itself, is a diffusers model) for ``Guidance(w, method=method)``.

    The sampler calls it on [u; c] (2B rows) or [c] (B rows, CFG off); where the run's plan says
    the method needs p at this evaluation, it evaluates [u; c; c] (or [c; c]) in one call,
    perturbed on the appended rows, hands p to the run's ``GuidanceHook`` (through
    ``fastdiff.guiders.mailbox(method)``) and returns the usual 2B (B) rows. AutoGuidance: the uncond
    rows of a 2B call are perturbed, nothing is appended. ``batch_size`` is B (the samples).

        with PerturbedModel(lambda x, t, ehs: unet(x, t, encoder_hidden_states=ehs).sample,
                            PAG(scale=3.0, layers=("mid",)), batch_size=B, denoiser=unet) as model:
            x = fastdiff.sample(model, noise, guidance=Guidance(7.5, method=model.method), ...)
    """

    def __init__(self, model, method, batch_size: int, denoiser: Optional[torch.nn.Module] = None):
        from ...guiders import AutoGuidance, ExtraPassGuider, mailbox
        if not isinstance(method, (ExtraPassGuider, AutoGuidance)):
            raise ValueError(f"PerturbedModel takes an extra-pass method (PAG, SLG, SEG, AutoGuidance), "
                             f"got {type(method).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be the number of samples (an int >= 1), got {batch_size!r}")
        denoiser = model if denoiser is None else denoiser
        if not isinstance(denoiser, torch.nn.Module):
            raise ValueError("PerturbedModel needs the network to hook: pass denoiser=<the diffusers model>")
        self.model, self.method, self.batch_size = model, method, batch_size
        self.perturbation = Perturbation(denoiser, method)
        self.box = None if isinstance(method, AutoGuidance) else mailbox(method)

    def __call__(self, x, t, **kwargs):
        n, B = x.shape[0], self.batch_size
        if n not in (B, 2 * B):
            raise ValueError(f"PerturbedModel(batch_size={B}) called on a batch of {n}: expected {B} or {2 * B} rows")
        try:
            if self.box is None:
                self.perturbation.rows = slice(0, B) if n == 2 * B else None
                return self.model(x, t, **kwargs)
            if not self.box.wanted():
                return self.model(x, t, **kwargs)
            (x, t), kwargs = extend_batch((x, t), kwargs, n, slice(n - B, n))
            self.perturbation.rows = slice(n, None)
            out = self.model(x, t, **kwargs)
        finally:
            self.perturbation.rows = None
        full = out if isinstance(out, torch.Tensor) else out[0]
        self.box.put(full[n:])
        return full[:n]

    def remove(self):
        """Take the hooks off the denoiser (also on leaving a ``with PerturbedModel(...)`` block)."""
        self.perturbation.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
