"""Classifier-free guidance fused into the step, inside unmodified diffusers pipelines.

Pipelines combine the two CFG branches themselves before ``scheduler.step``::

    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

(or, as Flux's true CFG, from two separate model calls). A forward hook on the denoiser tags its
output as a ``ModelPart``; the three tensor operations above on tagged tensors then record what
they would compute instead of computing it: ``chunk(2)`` gives the two halves (real views),
``c - u`` a ``_Difference``, ``g * (c - u)`` a ``_Scaled`` and ``u + g * (c - u)`` a
``GuidedOutput``, which a fastdiff drop-in scheduler takes apart (``parts()``) and combines in
its fused step: the pipeline's three elementwise passes and their temporaries disappear.

Anything else done to a lazy value (a different formula, ``guidance_rescale``'s std, a slice,
``.to``, printing) computes it first, with the pipeline's own formula and operation order, so
the result is what eager PyTorch gives; a lazy value only ever stands for that value. Tensor
metadata (shape, dtype, device, ...) is answered without computing.

Guidance methods (``accelerate(pipe, guidance=...)``): a ``GuiderContext`` travels with the tagged
output, and the recorded ``u + g * (c - u)`` stands for the method's combination instead
(fastdiff.guiders: APG, CFG-Zero*, TCFG, ...), with the pipeline's ``g``, or for plain CFG with
one scale per sample. The drop-in step then receives that combination as its model output (the
method is non-linear: it is computed beside the step, not inside it); anything else that reads
the value gets the same combination.

Cost: recording goes through ``__torch_function__`` (a few microseconds per operation, ~20 us per
step for the four operations); it saves the formula's three elementwise passes over the
latents and their temporaries. On the CPU at SD-1.5's latent (64 KiB per branch) the two are
about even; the saving grows with the latents (SDXL batches, video) and with the cost of a kernel
launch (GPUs).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch.utils._pytree import tree_map

__all__ = ["ModelPart", "GuidedOutput", "GuiderContext", "tag_model_output"]

_T = torch.Tensor
_METADATA = {_T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__, _T.layout.__get__,
             _T.requires_grad.__get__, _T.is_cuda.__get__, _T.dim, _T.size, _T.numel, _T.is_floating_point,
             _T.is_complex, _T.element_size, _T.__len__}
_CHUNK = {_T.chunk, torch.chunk}
_SUB = {_T.__sub__, _T.sub, torch.sub}
_MUL = {_T.__mul__, _T.__rmul__, _T.mul, torch.mul}
_ADD = {_T.__add__, _T.__radd__, _T.add, torch.add}


class _CFGTensor(torch.Tensor):
    """Base of the tagged and lazy tensors: recognizes the CFG expression, computes anything else."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        fused = _record(func, args, kwargs)
        if fused is not None:
            return fused
        args, kwargs = tree_map(_value, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class ModelPart(_CFGTensor):
    """The denoiser's output, or one half of it along the batch (real data, tagged). ``_plain``
    is the same tensor untagged: the recording below works on it, so that it does not go through
    __torch_function__ itself."""

    _whole: bool
    _plain: torch.Tensor
    _ctx = None            # GuiderContext or None


class _Lazy(_CFGTensor):
    """A value not computed yet: a tensor with the value's metadata and no storage of its own.

    Every read computes the value first (once; it is kept): Python reads through
    ``__torch_function__``, and reads that bypass Python (C++ extensions such as fastdiff's own
    ops, ``as_subclass``, ``_make_subclass``) through ``__torch_dispatch__``, since any ATen op on
    it, including the ``contiguous()`` / ``alias`` / ``detach`` that such readers start with, lands
    there. Its strides are 0, so a reader never takes it for contiguous memory and reads its raw
    pointer without that op; a raw pointer read of a one-element value would raise (it has no
    storage), never give a wrong number, and one-element formulas are not recorded at all."""

    _cached: Optional[torch.Tensor]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(_value, (args, kwargs or {}))
        return func(*args, **kwargs)

    def _compute(self) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        if self._cached is None:
            self._cached = self._compute()
        return self._cached


class _Difference(_Lazy):
    def _compute(self):
        return self._c._plain - self._u._plain


class _Scaled(_Lazy):
    def _compute(self):
        return self._g * (self._c._plain - self._u._plain)


class GuiderContext:
    """What the recorded CFG formula stands for under ``accelerate(pipe, guidance=...)``: a
    fastdiff.guiders method (``method``; convention "1+w" if ``one_plus_w``) applied with the
    pipeline's g, and/or per-sample g values (``g_vector``, float64, one per prompt) that replace
    the pipeline's g. ``step`` counts the scheduler's ``step()`` calls since its last
    ``set_timesteps`` (the pipeline's loop index, as diffusers' guiders count) and ``num_steps`` is
    the run's number of inference steps; ``state`` holds the method's per-run state (APG's
    momentum), reset with ``step``. Extra-pass methods (PAG, SLG, SEG): ``perturbed`` is the
    perturbed model's conditional output of the current model call (None where the method's
    window leaves it out), set by accelerate's denoiser hook."""

    def __init__(self, method=None, one_plus_w: bool = False, g_vector=None):
        self.method = method
        self.one_plus_w = bool(one_plus_w)
        self.g_vector = g_vector
        self.step = 0
        self.num_steps = None
        self.perturbed = None
        self.state: dict = {}

    def reset(self, num_steps=None):
        self.step = 0
        self.num_steps = num_steps
        self.perturbed = None
        self.state = {"num_steps": num_steps}

    def _g(self, g: float, like: torch.Tensor):
        if self.g_vector is None:
            return g
        b, n = like.shape[0], len(self.g_vector)
        if b % n:
            raise ValueError(f"{n} per-sample guidance scales for a batch of {b} latents: give one scale per prompt "
                             "(the batch must be a whole multiple of the number of scales)")
        v = torch.as_tensor(self.g_vector, dtype=torch.float64).repeat_interleave(b // n)
        return v.to(device=like.device, dtype=like.dtype if like.dtype == torch.float64 else torch.float32) \
            .reshape((b,) + (1,) * (like.dim() - 1))

    def combine(self, c: torch.Tensor, u: torch.Tensor, g: float) -> torch.Tensor:
        from ...guiders import ExtraPassGuider
        g = self._g(g, c)
        m = self.method
        if m is None:
            cw = c if c.dtype == torch.float64 else c.float()
            uw = u if u.dtype == torch.float64 else u.float()
            return (uw + g * (cw - uw)).to(c.dtype)
        if isinstance(m, ExtraPassGuider):
            return m.combine_extra(c, u, self.perturbed, g, self.one_plus_w, self.step, self.num_steps).to(c.dtype)
        D = m.pre(c, self.step)
        if D is None:
            self.state["num_steps"] = self.num_steps
            D = m.combine(c, u, g, self.one_plus_w, self.step, self.state)
            if isinstance(g, torch.Tensor):      # a prompt with g = 1 has CFG off: c, as its own run
                D = torch.where(torch.isclose(g, torch.ones_like(g)), c.to(D.dtype), D)
        return D.to(c.dtype)

    def fused_parts(self, c: torch.Tensor, u: torch.Tensor, g: float):
        """(cond', uncond, g) for the fused step where the method's output is u + g (cond' - u) with
        the pipeline's scalar g (extra-pass methods: cond' = the method's fold of c and p;
        AutoGuidance: u is already the degraded pass), else None (the combination is computed)."""
        from ...guiders import AutoGuidance, ExtraPassGuider
        m = self.method
        if self.g_vector is not None or math.isclose(g, 0.0) or math.isclose(g, 1.0):
            return None
        if isinstance(m, ExtraPassGuider):
            if self.perturbed is not None and m.extra_active(self.step, self.num_steps):
                return m.fold(c, self.perturbed, g).to(c.dtype), u, g
            return c, u, g
        if isinstance(m, AutoGuidance) and m.active(self.step, self.num_steps):
            return c, u, g
        return None


class GuidedOutput(_Lazy):
    """``u + g * (c - u)`` not computed yet; ``parts()`` gives (c, u, g) to a fused step."""

    _ctx: Optional[GuiderContext] = None

    def _compute(self):
        if self._ctx is not None:
            return self._ctx.combine(self._c._plain, self._u._plain, self._g)
        u = self._u._plain
        return u + self._g * (self._c._plain - u)

    def parts(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
        """(cond, uncond, g) with D = uncond + g (cond - uncond); (D, None, 1.0) if D was computed
        already (then it may have been modified in place, and D is what counts)."""
        if self._cached is not None:
            return self._cached, None, 1.0
        c, u = self._c._plain, self._u._plain
        if c._version != self._versions[0] or u._version != self._versions[1]:
            raise RuntimeError("a CFG branch output was modified in place after the guidance formula was applied; "
                               "the fused step cannot recover the value the pipeline meant")
        if self._ctx is not None:        # a guidance method: its combination, computed beside the step
            fused = self._ctx.fused_parts(c, u, self._g)
            return fused if fused is not None else (self.value(), None, 1.0)
        return c, u, self._g


def tag_model_output(out, ctx: Optional[GuiderContext] = None):
    """The denoiser's output with its tensor tagged (tensor, tuple/list first element, or an output
    object's ``.sample``); anything else is returned unchanged. ``ctx``: the guidance method the
    recorded CFG formula stands for (None: plain CFG, fused into the step)."""
    if isinstance(out, torch.Tensor):
        return _tag(out, ctx=ctx)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (_tag(out[0], ctx=ctx),) + out[1:]
    if isinstance(out, list) and out and isinstance(out[0], torch.Tensor):
        return [_tag(out[0], ctx=ctx)] + out[1:]
    if isinstance(getattr(out, "sample", None), torch.Tensor):
        out.sample = _tag(out.sample, ctx=ctx)
    return out


def _tag(t: torch.Tensor, whole: bool = True, ctx: Optional[GuiderContext] = None) -> ModelPart:
    if isinstance(t, _CFGTensor):
        t = _value(t)
    p = t.as_subclass(ModelPart)
    p._whole, p._plain, p._ctx = whole, t, ctx
    return p


def _placeholder(cls, like: torch.Tensor) -> _Lazy:
    # The metadata of `like`, no storage (see _Lazy), strides 0: never contiguous.
    node = torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=(0,) * like.dim(), dtype=like.dtype,
                                               device=like.device, requires_grad=False)
    node._cached = None
    return node


def _value(a):
    """A tagged or lazy tensor as the plain tensor it stands for; anything else unchanged."""
    if isinstance(a, _Lazy):
        return a.value()
    if isinstance(a, ModelPart):
        return a._plain
    return a


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _record(func, args, kwargs):
    """The lazy value of a recognized step of the CFG formula, or None."""
    if func in _CHUNK:
        x = args[0]
        chunks = args[1] if len(args) > 1 else kwargs.get("chunks")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if type(x) is ModelPart and x._whole and chunks == 2 and dim == 0 and len(args) + len(kwargs) <= 3:
            plain = x._plain
            if plain.dim() > 0 and plain.shape[0] % 2 == 0:
                return tuple(_tag(h, whole=False, ctx=x._ctx) for h in plain.chunk(2, 0))
        return None
    if kwargs or len(args) != 2:
        return None
    a, b = args
    if func in _SUB:
        if (type(a) is ModelPart and type(b) is ModelPart and a is not b and _same_meta(a._plain, b._plain)
                and a._plain.numel() > 1):
            node = _placeholder(_Difference, a._plain)
            node._c, node._u = a, b
            return node
        return None
    if func in _MUL:
        diff, g = (a, b) if type(a) is _Difference else (b, a)
        if type(diff) is _Difference and (type(g) in (float, int) or (isinstance(g, numbers.Real)
                                                                      and not isinstance(g, (bool, torch.Tensor)))):
            node = _placeholder(_Scaled, diff._c._plain)
            node._c, node._u, node._g = diff._c, diff._u, float(g)
            return node
        return None
    if func in _ADD:
        scaled, u = (a, b) if type(a) is _Scaled else (b, a)
        if type(scaled) is _Scaled and u is scaled._u:
            node = _placeholder(GuidedOutput, u._plain)
            node._c, node._u, node._g = scaled._c, scaled._u, scaled._g
            node._ctx = scaled._c._ctx if scaled._c._ctx is not None else scaled._u._ctx
            node._versions = (node._c._plain._version, node._u._plain._version)
            return node
    return None
