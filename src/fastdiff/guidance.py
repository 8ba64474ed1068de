"""Guidance: classifier-free guidance and the transforms users combine with it.

CFG is linear, D = uncond + g (cond - uncond), so it folds into the fused step as one per-row
coefficient g. Both conventions in use map onto g:

* ``convention="w"``   (diffusers' guidance_scale, k-diffusion): g = w
* ``convention="1+w"`` (Ho & Salimans' w; Imagen):               g = 1 + w

Where g = 1 (``scale=1`` with "w", ``scale=0`` with "1+w", or outside the ``interval``) the
unconditional pass is skipped altogether (unless the solver uses the unconditional prediction on
its own, as the CFG++ samplers do).

``scale`` may also be one scale per sample (a 1-D tensor, array or sequence of length B: several
requests served in one batch). The fused step then takes the vector of g values and computes
each sample's CFG coefficients from its own g (table columns g0, g1: g_b = g0 + g1 * s_b, which
is s_b inside the interval and 1 outside it); a batch equals the separate runs bit for bit.
The non-linear transforms below take one scalar scale.

``interval=(ksigma_lo, ksigma_hi)`` applies CFG (and its rescale) only at noise levels inside
the interval (Kynkäänniemi et al. 2024); elsewhere g = 1. Classifier guidance and x0 clipping
apply at every model evaluation.

The other transforms are not linear, so they run between the model call and the fused step
(``GuidanceHook``), and only on runs that use them; runs without them keep the fused CFG path.
In the order they are applied at each model evaluation:

1. ``rescale`` (guidance_rescale, Lin et al. 2023, Section 3.4): D is rescaled towards the
   per-sample std of cond, in the model's own parameterization, as diffusers'
   ``rescale_noise_cfg`` does to the noise prediction (for an epsilon model this is exactly
   diffusers; for v/x0/flow models the same formula is applied to v/x0/flow, which is what
   diffusers' pipelines of such models do too). Only where CFG is active (g != 1).
2. ``classifier`` (Dhariwal & Nichol 2021): the score is shifted by s * grad_x log p(y | x_t):
   eps' = eps - s * sigma * grad, i.e. x0' = x0 + s * sigma^2 / alpha * grad. Skipped at points
   with alpha = 0 (pure noise: x_t carries no information about y).
3. ``x0_clip``: ``ClipSample`` (static clipping of x0, diffusers' clip_sample) or
   ``DynamicThresholding`` (Imagen; diffusers' thresholding=True).

``method`` (``fastdiff.guiders``: APG, CFGZeroStar, TCFG, MamboG, CFGRenorm, FDG, or their names)
replaces the linear CFG combination in step 1 by a non-linear per-sample one (norms, dot products,
projections of cond/uncond; see that module for each formula); rescale then applies to its
output with the cond output as reference, as diffusers' guiders do. Stateful methods (APG
momentum) start afresh every sampling run (the state lives in the run's ``GuidanceHook``).
A method also takes per-sample scales (not FDG, whose level scales replace the scale): each
sample gets the method at its own g, and a sample with g = 1 its conditional output.

Extra-pass methods (PAG, SLG, SEG) need the perturbed model's conditional output p: wrap the
model in ``fastdiff.integrations.diffusers.perturbed.PerturbedModel(model, method, B)``, which
evaluates [u; c; c] in one call (perturbed on the last B rows) where the method's window needs p
and hands p to this run's hook. Where CFG is on with a scalar g (not 0), the hook passes
c' = c + (s / g)(c - p) (one elementwise pass) and u to the fused step, which applies
u + g (c' - u), the method's formula; elsewhere it computes the formula. AutoGuidance: the same
wrapper perturbs the uncond rows; the formula is CFG on its window.

Transforms 2 and 3 act on the predicted clean sample x0 (computed exactly from the evaluation
point and D). The step then runs the same solver rows compiled for ``prediction="sample"``
with x0 as the model output, so every solver sees the transformed x0 and the noise
estimate consistent with it, eps = (x - alpha x0) / sigma. This matches diffusers' DDPM,
DPM-Solver(++), UniPC and other data-prediction schedulers; diffusers' DDIM (and PNDM-style
epsilon schedulers) instead keep the model's raw eps next to the thresholded x0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .guiders import FDG, AutoGuidance, ExtraPassGuider, Guider, as_guider, mailbox
from .ops import guidance_scale_to_g
from .ops.reductions import cfg_rescale, dynamic_threshold
from .parameterization import x0_coefficients
from .program import COL_G, COL_G0, COL_G1, Point, Program, Row, compile_program


def _finite(name: str, v) -> float:
    if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(float(v))):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class ClipSample:
    """Static clipping of the predicted x0 to [-range, range] (diffusers' ``clip_sample=True``,
    ``clip_sample_range``)."""

    range: float = 1.0

    def __post_init__(self):
        if not _finite("ClipSample range", self.range) > 0:
            raise ValueError(f"ClipSample range must be > 0, got {self.range}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-self.range, self.range)


@dataclass(frozen=True)
class DynamicThresholding:
    """Imagen's dynamic thresholding (Saharia et al. 2022) of the predicted x0: s = the ``ratio``
    quantile of |x0| per sample, clamped to [1, max_value]; x0 = clamp(x0, -s, s) / s.
    diffusers: ``thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value``."""

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        if not 0.0 < _finite("DynamicThresholding ratio", self.ratio) <= 1.0:
            raise ValueError(f"DynamicThresholding ratio (a percentile) must lie in (0, 1], got {self.ratio}")
        if not _finite("DynamicThresholding max_value", self.max_value) > 0:
            raise ValueError(f"DynamicThresholding max_value (sample_max_value) must be > 0, got {self.max_value}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return dynamic_threshold(x0, self.ratio, self.max_value)


@dataclass(frozen=True, eq=False)
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021): ``classifier(x, t, **kwargs) -> logits``
    [B, classes] on the noisy sample x (the model's input space, time t as given to the model),
    ``labels`` the target class of each sample [B], ``scale`` the guidance scale s."""

    classifier: Callable
    labels: torch.Tensor
    scale: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not callable(self.classifier):
            raise ValueError(f"classifier guidance needs a callable classifier(x, t) -> logits, "
                             f"got {type(self.classifier).__name__}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 or self.labels.is_floating_point():
            got = (f"a {self.labels.dim()}-D {self.labels.dtype} tensor" if isinstance(self.labels, torch.Tensor)
                   else type(self.labels).__name__)
            raise ValueError(f"classifier guidance needs labels as a 1-D integer tensor [B], got {got}")
        _finite("classifier guidance scale", self.scale)

    def grad_log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x sum_b log p(labels_b | x_b), by autograd (the samples are independent)."""
        if self.labels.shape[0] != x.shape[0]:
            raise ValueError(f"classifier guidance labels have {self.labels.shape[0]} entries for a batch of "
                             f"{x.shape[0]}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, t, **self.kwargs)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"the classifier must return logits [B={x.shape[0]}, classes], got "
                                 f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            log_p = torch.log_softmax(logits, dim=-1)
            selected = log_p[torch.arange(x.shape[0], device=logits.device), self.labels.to(logits.device)]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad


X0Clip = Union[ClipSample, DynamicThresholding]


@dataclass(frozen=True)
class Guidance:
    """How model outputs are combined and corrected; see the module docstring."""

    scale: Union[float, Tuple[float, ...]] = 1.0      # a number, or one scale per sample
    convention: str = "w"
    interval: Optional[Tuple[float, float]] = None
    rescale: float = 0.0                              # guidance_rescale, phi in [0, 1]
    x0_clip: Optional[X0Clip] = None
    classifier: Optional[ClassifierGuidance] = None
    method: Optional[Guider] = None                   # a fastdiff.guiders method, or its name

    def __post_init__(self):
        object.__setattr__(self, "method", as_guider(self.method))
        sc = self.scale
        if isinstance(sc, torch.Tensor) or isinstance(sc, (np.ndarray, list, tuple)):
            arr = sc.detach().cpu().double().numpy() if isinstance(sc, torch.Tensor) else np.asarray(sc)
            if arr.ndim != 1 or arr.shape[0] < 1 or not (np.issubdtype(arr.dtype, np.floating)
                                                         or np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"a per-sample guidance scale must be a 1-D sequence of numbers (one per sample), "
                                 f"got shape {tuple(arr.shape)} of {arr.dtype}")
            vals = tuple(_finite("guidance scale", float(v)) for v in arr.tolist())
            object.__setattr__(self, "scale", vals)
            for v in vals:
                guidance_scale_to_g(v, self.convention)          # validates the convention
        else:
            _finite("guidance scale", sc)
            guidance_scale_to_g(sc, self.convention)  # validates the convention
        if self.interval is not None:
            iv = self.interval
            if isinstance(iv, (str, bytes)) or not isinstance(iv, (tuple, list, np.ndarray)):
                raise TypeError(f"guidance interval must be a pair (lo, hi) of noise levels sigma/alpha, "
                                f"got {type(iv).__name__} {iv!r}")
            if len(iv) != 2:
                raise ValueError(f"guidance interval must be a pair (lo, hi) of noise levels sigma/alpha, "
                                 f"got {len(iv)} values: {tuple(iv)!r}")
            for v in iv:
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise TypeError(f"guidance interval bounds must be numbers, got {type(v).__name__} {v!r}")
            lo, hi = float(iv[0]), float(iv[1])
            if not (0 <= lo < hi) or math.isnan(hi):
                raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo < hi <= inf (noise levels "
                                 f"sigma/alpha), got {tuple(iv)!r}")
            object.__setattr__(self, "interval", (lo, hi))
        if not 0.0 <= _finite("guidance rescale (guidance_rescale)", self.rescale) <= 1.0:
            raise ValueError(f"guidance rescale (guidance_rescale) must lie in [0, 1], got {self.rescale}")
        if self.x0_clip is not None and not isinstance(self.x0_clip, (ClipSample, DynamicThresholding)):
            raise TypeError(f"x0_clip must be None, ClipSample(...) or DynamicThresholding(...), "
                            f"got {type(self.x0_clip).__name__}")
        if self.classifier is not None and not isinstance(self.classifier, ClassifierGuidance):
            raise TypeError(f"classifier must be None or ClassifierGuidance(classifier, labels, scale), "
                            f"got {type(self.classifier).__name__}")
        if self.per_sample and (self.rescale > 0.0 or self.acts_on_x0):
            raise ValueError("per-sample guidance scales take no rescale / classifier guidance / x0 clipping "
                             "(those transforms take one scalar scale)")
        if self.per_sample and isinstance(self.method, FDG):
            raise ValueError("per-sample guidance scales take no FDG (its level scales replace the scale)")

    @property
    def per_sample(self) -> bool:
        """Whether ``scale`` holds one scale per sample."""
        return isinstance(self.scale, tuple)

    @property
    def g(self) -> float:
        if self.per_sample:
            raise ValueError("this guidance has one scale per sample: use g_vector()")
        return guidance_scale_to_g(self.scale, self.convention)

    def g_vector(self) -> np.ndarray:
        """The per-sample g values (float64 [B]), both conventions mapped to D = u + g (c - u)."""
        scales = self.scale if self.per_sample else (self.scale,)
        return np.array([guidance_scale_to_g(v, self.convention) for v in scales], dtype=np.float64)

    def active_at(self, point: Point) -> bool:
        """Whether CFG applies at this point (inside the interval, or no interval)."""
        if self.interval is not None:
            lo, hi = self.interval
            return lo <= point.ksigma <= hi
        return True

    def g_at(self, point: Point) -> float:
        """The CFG coefficient at a model evaluation point (1.0 = conditional only). With
        per-sample scales: 1.0 (the table's g column is unused; see g_affine_at)."""
        if self.per_sample or not self.active_at(point):
            return 1.0
        return self.g

    def g_affine_at(self, point: Point) -> Tuple[float, float]:
        """(g0, g1): the g of a sample with per-sample g value s is g0 + g1 * s at this point."""
        return (0.0, 1.0) if self.active_at(point) else (1.0, 0.0)

    @property
    def acts_on_x0(self) -> bool:
        return self.x0_clip is not None or self.classifier is not None

    @property
    def needs_hook(self) -> bool:
        """Whether sampling needs the non-linear path between model call and step."""
        return self.rescale > 0.0 or self.acts_on_x0 or self.method is not None


def as_guidance(guidance) -> Optional[Guidance]:
    if guidance is None or isinstance(guidance, Guidance):
        return guidance
    if isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, (bool, np.bool_)):
        return Guidance(float(guidance))
    if isinstance(guidance, (torch.Tensor, np.ndarray, list, tuple)):
        return Guidance(guidance)                      # one scale per sample
    raise TypeError(f"guidance must be None, a number, a 1-D tensor of per-sample scales or a fastdiff.Guidance, "
                    f"got {type(guidance).__name__}")


class GuidanceHook:
    """The non-linear guidance transforms of one sampling run, between model call and fused step.

    ``hook(i, row, E, cond, uncond, t) -> (table, cond', uncond')``: the coefficient table and
    the model outputs the fused step of row ``i`` is to use. ``E`` is the point the model was
    evaluated at, ``t`` the model time it was given, ``uncond`` None where CFG is off (g = 1).
    ``table`` is the run's device table (compiled for the model's parameterization).
    ``perturbed``: an extra-pass method's p for this evaluation, from a caller that batched the
    perturbed pass itself (else ``PerturbedModel`` leaves it in the method's mailbox)."""

    def __init__(self, guidance: Guidance, program: Program, prediction: str, table: torch.Tensor):
        self.guidance = guidance
        self.prediction = prediction
        self.table = table
        self.g = program.table[:, COL_G]            # host copy: no device read per step
        self.x0_table = None
        self.state: dict = {"num_steps": program.steps}   # per-run state of the method (APG momentum)
        self.g01 = program.table[:, [COL_G0, COL_G1]] if guidance.per_sample else None
        self.g_host = guidance.g_vector() if guidance.per_sample else None
        self.extra = None
        m = guidance.method
        if isinstance(m, ExtraPassGuider):
            # which model evaluations need the perturbed pass, in call order, for the model wrapper
            # (fastdiff.integrations.diffusers.perturbed.PerturbedModel) that computes it
            self.extra = mailbox(m)
            self.extra.start([m.extra_active(r.step, program.steps) for r in program.rows if r.needs_model])
        if guidance.acts_on_x0:
            # The same rows with x0 itself as the model output: h = q_y E + q_x0 D.
            x0_program = compile_program(program.rows, "sample", program.num_slots, program.steps)
            self.x0_table = torch.from_numpy(x0_program.table).to(table.device)

    def __call__(self, i: int, row: Row, E: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                 t: torch.Tensor, perturbed: Optional[torch.Tensor] = None):
        gd = self.guidance
        g = float(self.g[i])
        if self.g01 is not None and uncond is not None:
            # per-sample scales: sample b's g at this row, as the fused step forms it
            gv = self.g01[i, 0] + self.g01[i, 1] * self.g_host
            dt = torch.float64 if cond.dtype == torch.float64 else torch.float32
            g = torch.from_numpy(gv).to(device=cond.device, dtype=dt).reshape((-1,) + (1,) * (cond.dim() - 1))
        # CFG (with rescale = 0: just CFG) in float32/float64 even for half-precision outputs.
        m = gd.method
        if isinstance(m, ExtraPassGuider):
            # p from the caller (a sampler that batched the extra pass itself) or PerturbedModel's mailbox
            p = perturbed if perturbed is not None else (self.extra.take(i) if self.extra is not None else None)
            if p is None and m.extra_active(row.step, self.state["num_steps"]):
                raise RuntimeError(f"{m.name} needs the perturbed model's output at step {row.step}: wrap the model "
                                   "in fastdiff.integrations.diffusers.perturbed.PerturbedModel(model, method, ...)")
            if (not gd.acts_on_x0 and gd.rescale == 0.0 and uncond is not None and not isinstance(g, torch.Tensor)
                    and not math.isclose(g, 0.0) and not math.isclose(g, 1.0)):
                # the fused step applies CFG to (c', u) with c' = c + (s / g)(c - p): one pass here
                cp = m.fold(cond, p, g).to(cond.dtype) if p is not None and m.extra_active(
                    row.step, self.state["num_steps"]) else cond
                return self.table, cp, uncond
            D = m.combine_extra(cond, uncond, p, g, gd.convention == "1+w", row.step, self.state["num_steps"])
            if uncond is not None and gd.rescale > 0.0:
                D = cfg_rescale(cond.to(D.dtype), D, 0.0, gd.rescale)
        elif m is None:
            D = cond if uncond is None else cfg_rescale(cond, uncond, g, gd.rescale)
        else:
            D = m.pre(cond, row.step)
            if D is None:
                if uncond is None and not isinstance(m, AutoGuidance):
                    D = cond
                else:
                    D = m.combine(cond, uncond, g, gd.convention == "1+w", row.step, self.state)
                    if isinstance(g, torch.Tensor):
                        # a sample with g = 1 has CFG off: its output is c, as a scalar run's
                        D = torch.where(torch.isclose(g, torch.ones_like(g)), cond.to(D.dtype), D)
                    if gd.rescale > 0.0:
                        # phi D std(cond)/std(D) + (1 - phi) D: cfg_rescale with uncond = D, g = 0
                        D = cfg_rescale(cond.to(D.dtype), D, 0.0, gd.rescale)
        if not gd.acts_on_x0:
            return self.table, D, None               # g is folded into D

        p = row.point
        A_x, A_d = (float(v) for v in x0_coefficients(self.prediction, p.alpha, p.sigma))
        x0 = A_x * E + A_d * D.to(E.dtype)
        if gd.classifier is not None and p.alpha > 0.0 and gd.classifier.scale != 0.0:
            grad = gd.classifier.grad_log_prob(E, t)
            x0 = x0 + (gd.classifier.scale * p.sigma ** 2 / p.alpha) * grad.to(x0.dtype)
        if gd.x0_clip is not None:
            x0 = gd.x0_clip(x0).to(E.dtype)
        return self.x0_table, x0, None
