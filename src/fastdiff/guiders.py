"""Guidance methods: ``Guidance(scale, method=APG(...))``.

Single-pass (APG, CFGZeroStar, TCFG, MamboG, CFGRenorm, FDG) combine the two CFG outputs;
extra-pass (PAG, SLG, SEG: ``ExtraPassGuider``) add a third, the conditional output of a perturbed
model, and AutoGuidance degrades the unconditional pass (see those classes; the perturbation hooks
are fastdiff.integrations.diffusers.perturbed, used by ``accelerate(pipe, guidance=...)`` and by
``PerturbedModel`` for ``fastdiff.sample``). Below, the single-pass methods.

Each method replaces the linear CFG combination D = u + g (c - u) of the conditional output c
and the unconditional output u (one model evaluation, in the model's own parameterization) by a
per-sample non-linear one built from norms, dot products and projections over the non-batch
dimensions. They run in the ``GuidanceHook`` between the model call and the fused step, in
plain PyTorch, vectorized over the batch and without host synchronisation (no ``.item()``, no
data-dependent branches). The reductions are accumulated in float64; the elementwise work is
float32 (float64 for float64 outputs).

The methods act on the model outputs in the model's own parameterization (the noise prediction
for epsilon models, as diffusers' pipelines apply their guiders; v / x0 / flow otherwise).

Conventions. With ``convention="w"`` (diffusers' default) the guided output is built on the
unconditional base, ``D = u' + g * update``; with ``convention="1+w"`` (diffusers'
``use_original_formulation=True``) on the conditional base, ``D = c + w * update``, w = g - 1.
For CFG-Zero*, TCFG and MAMBO-G the two are the same function of (c, u) (as for plain CFG);
for APG they differ, exactly as in diffusers.

Where CFG is off at an evaluation (g = 1, or outside ``Guidance.interval``) the method returns c,
as diffusers' guiders do when disabled. CFG-Zero*'s zero-init applies whatever the scale.

State (APG's momentum) lives in a per-run state dict that ``GuidanceHook`` creates afresh for
every sampling run, so runs are independent (diffusers resets its buffer at step 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch


def _num(name: str, v) -> float:
    if (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(float(v))):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _dims(x: torch.Tensor, norm_dim=None):
    return list(range(1, x.dim())) if norm_dim is None else list(norm_dim)


_DOT_CHUNK = 1024


def _dot(a: torch.Tensor, b: torch.Tensor, dims) -> torch.Tensor:
    """Per-sample <a, b> over ``dims`` in float64, keepdim. Float32 (and half) inputs: float32 dot
    products of 1024-element chunks (vectorized; error ~ a few eps of the chunk), summed in
    float64 across the chunks; casting whole tensors to float64 instead cost ~25x the time at the
    video latent (7.4M elements: three full-size float64 temporaries per product)."""
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return (a.double() * b.double()).sum(dim=dims, keepdim=True)
    a, b = a.float(), b.float()
    if sorted(int(d) % a.dim() for d in dims) != list(range(1, a.dim())):
        return (a * b).sum(dim=dims, keepdim=True, dtype=torch.float64)
    B = a.shape[0]
    x, y = a.reshape(B, -1), b.reshape(B, -1)
    n = x.shape[1]
    k = n - n % _DOT_CHUNK
    total = torch.zeros(B, dtype=torch.float64, device=a.device)
    if k:
        total = torch.linalg.vecdot(x[:, :k].reshape(B, -1, _DOT_CHUNK),
                                    y[:, :k].reshape(B, -1, _DOT_CHUNK)).double().sum(-1)
    if k < n:
        total = total + torch.linalg.vecdot(x[:, k:], y[:, k:]).double()
    return total.reshape((B,) + (1,) * (a.dim() - 1))


class Guider:
    """Base class of the methods: ``combine(c, u, g, one_plus_w, step, state) -> D``."""

    name = "guider"

    def combine(self, c: torch.Tensor, u: torch.Tensor, g: float, one_plus_w: bool, step: int,
                state: dict) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pre(self, c: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """An output that replaces the model's at this step whatever the scale (None: none)."""
        return None


@dataclass(frozen=True)
class APG(Guider):
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416; diffusers'
    ``AdaptiveProjectedGuidance``). Per evaluation, with d = c - u:

        m   = d + momentum * m_prev          (momentum buffer, m_prev = 0 at the run's start;
                                              skipped when momentum is None)
        d   = m * min(1, r / ||m||)          (norm threshold r = ``norm_threshold``; skipped if r <= 0)
        c^  = c / max(||c||, 1e-12)          (norms over ``norm_dim``, default all non-batch dims)
        d_par = <d, c^> c^ ,  d_orth = d - d_par
        D   = u + g (d_orth + eta d_par)     (convention "w")
        D   = c + w (d_orth + eta d_par)     (convention "1+w", w = g - 1)
    """

    momentum: Optional[float] = None
    norm_threshold: float = 15.0
    eta: float = 1.0
    norm_dim: Optional[Union[int, Tuple[int, ...]]] = None
    name = "apg"

    def __post_init__(self):
        if self.momentum is not None:
            _num("APG momentum", self.momentum)
        if _num("APG norm_threshold", self.norm_threshold) < 0:
            raise ValueError(f"APG norm_threshold must be >= 0 (0 disables it), got {self.norm_threshold}")
        _num("APG eta", self.eta)
        nd = self.norm_dim
        if nd is not None:
            nd = (nd,) if isinstance(nd, (int, np.integer)) and not isinstance(nd, bool) else nd
            if (not isinstance(nd, (tuple, list)) or not nd
                    or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in nd)):
                raise ValueError(f"APG norm_dim must be None, an int or a tuple of ints, got {self.norm_dim!r}")
            if any(int(d) == 0 for d in nd):
                raise ValueError("APG norm_dim must not include the batch dimension 0")
            object.__setattr__(self, "norm_dim", tuple(int(d) for d in nd))

    def combine(self, c, u, g, one_plus_w, step, state):
        c, u = _work(c), _work(u)
        dims = _dims(c, self.norm_dim)
        d = c - u
        if self.momentum is not None:
            prev = state.get("apg_momentum")
            d = d if prev is None else torch.add(d, prev, alpha=self.momentum)
            state["apg_momentum"] = d             # (d is never written in place below)
        if self.norm_threshold > 0:
            n = _dot(d, d, dims).sqrt()
            d = d * torch.clamp(self.norm_threshold / n, max=1.0).to(d.dtype)
        cc = _dot(c, c, dims)
        # <d, c^> c^ with c^ = c / max(||c||, 1e-12)  (torch.nn.functional.normalize)
        coef = _dot(d, c, dims) / torch.clamp(cc.sqrt(), min=1e-12).square()
        # update = d_orth + eta d_par = d + (eta - 1) coef c: one pass (each pass over a video
        # latent is ~5 ms on one core)
        update = torch.addcmul(d, c, ((self.eta - 1.0) * coef).to(c.dtype))
        base, k = (c, g - 1.0) if one_plus_w else (u, g)
        return torch.addcmul(base, update, k) if isinstance(k, torch.Tensor) else torch.add(base, update, alpha=k)


@dataclass(frozen=True)
class CFGZeroStar(Guider):
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886; diffusers' ``ClassifierFreeZeroStarGuidance``):

        D = 0                                   at the first ``zero_init_steps`` steps (zero-init)
        a* = <c, u> / (||u||^2 + 1e-8)          (per sample, over all non-batch dims)
        D = a* u + g (c - a* u)                 (= c + (g - 1)(c - a* u): both conventions)

    The step index is the solver step (all evaluations of a multi-stage step share it), as
    diffusers' guider counts pipeline steps.
    """

    zero_init_steps: int = 1
    name = "cfg_zero_star"

    def __post_init__(self):
        z = self.zero_init_steps
        if isinstance(z, bool) or not isinstance(z, (int, np.integer)) or z < 0:
            raise ValueError(f"CFGZeroStar zero_init_steps must be an int >= 0, got {z!r}")

    def pre(self, c, step):
        return torch.zeros_like(_work(c)) if step < self.zero_init_steps else None

    def combine(self, c, u, g, one_plus_w, step, state):
        c, u = _work(c), _work(u)
        dims = _dims(c)
        a = (_dot(c, u, dims) / (_dot(u, u, dims) + 1e-8)).to(c.dtype)
        # a u + g (c - a u) = g c + (1 - g) a u: two passes
        return (c * g).addcmul_(u, (1.0 - g) * a)


@dataclass(frozen=True)
class TCFG(Guider):
    """Tangential CFG (Kwon et al. 2025, arXiv 2503.18137; diffusers'
    ``TangentialClassifierFreeGuidance``). Per sample, M = [c; u] (2 x N): u is replaced by its
    projection on the top right-singular vector v1 of M, u' = <u, v1> v1, and

        D = u' + g (c - u')                     (= c + (g - 1)(c - u'): both conventions)

    v1 = M^T e / ||M^T e|| with e the top eigenvector of the 2 x 2 Gram matrix
    G = [[<c,c>, <c,u>], [<c,u>, <u,u>]], so u' = e_u (e_c c + e_u u) (e unit; closed form for
    the 2 x 2 eigenproblem, no SVD of the N-long rows).
    """

    name = "tcfg"

    def combine(self, c, u, g, one_plus_w, step, state):
        c, u = _work(c), _work(u)
        dims = _dims(c)
        a, b, d = _dot(c, c, dims), _dot(c, u, dims), _dot(u, u, dims)
        lam = 0.5 * (a + d) + torch.sqrt(torch.square(0.5 * (a - d)) + b * b)
        # eigenvector of the top eigenvalue, from the better-conditioned row
        big = a >= d
        e0 = torch.where(big, lam - d, b)
        e1 = torch.where(big, b, lam - a)
        nrm2 = e0 * e0 + e1 * e1
        zero = nrm2 == 0
        e0 = torch.where(zero, torch.ones_like(e0), e0)
        nrm2 = torch.where(zero, torch.ones_like(nrm2), nrm2)
        kc, ku = (e1 * e0 / nrm2).to(c.dtype), (e1 * e1 / nrm2).to(c.dtype)
        # u' + g (c - u') with u' = kc c + ku u: (g + (1 - g) kc) c + (1 - g) ku u, two passes
        return (c * (g + (1.0 - g) * kc)).addcmul_(u, (1.0 - g) * ku)


@dataclass(frozen=True)
class MamboG(Guider):
    """Magnitude-aware mitigation for boosted guidance (MAMBO-G, arXiv 2508.03442; diffusers'
    ``MagnitudeAwareGuidance``). Per sample, over all non-batch dims:

        r = ||c - u|| / ||u||
        D = u + (1 + (g - 1) exp(-alpha r)) (c - u)     (= c + w exp(-alpha r)(c - u), w = g - 1:
                                                         both conventions)
    """

    alpha: float = 8.0
    name = "mambo_g"

    def __post_init__(self):
        if _num("MamboG alpha", self.alpha) < 0:
            raise ValueError(f"MamboG alpha must be >= 0, got {self.alpha}")

    def combine(self, c, u, g, one_plus_w, step, state):
        c, u = _work(c), _work(u)
        dims = _dims(c)
        diff = c - u
        r = _dot(diff, diff, dims).sqrt() / _dot(u, u, dims).sqrt()
        k = (1.0 + (g - 1.0) * torch.exp(-self.alpha * r)).to(c.dtype)
        return u + k * diff


@dataclass(frozen=True)
class CFGRenorm(Guider):
    """CFG renorm (ComfyUI's ``RenormCFG`` node, from Lumina-Image 2.0): plain CFG, then the
    guided output's per-sample norm is capped at ``renorm`` times the conditional output's norm:

        D = u + g (c - u)
        D = D * min(1, renorm ||c|| / ||D||)     (norms over all non-batch dims; renorm <= 0: off)

    ComfyUI rescales when ||D|| >= renorm ||c|| (one Python branch on the whole batch); here
    the cap is per sample, which is the same for one sample and equal at the boundary.
    ComfyUI's ``cfg_trunc`` (CFG only below a timestep) is ``Guidance.interval``.
    """

    renorm: float = 1.0
    name = "cfg_renorm"

    def __post_init__(self):
        _num("CFGRenorm renorm", self.renorm)

    def combine(self, c, u, g, one_plus_w, step, state):
        c, u = _work(c), _work(u)
        D = u + g * (c - u)
        if self.renorm <= 0:
            return D
        dims = _dims(c)
        cap = self.renorm * _dot(c, c, dims).sqrt()
        n = _dot(D, D, dims).sqrt()
        f = torch.where(n >= cap, cap / n, torch.ones_like(n))
        return D * f.to(D.dtype)


def _pyr_kernel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    return (torch.outer(k, k) / 256.0).to(device=x.device, dtype=x.dtype)[None, None]


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial blur [1 4 6 4 1]^2 / 256 per channel, reflect padding (kornia's filter2d)."""
    B, C, H, W = x.shape
    y = torch.nn.functional.pad(x.reshape(B * C, 1, H, W), (2, 2, 2, 2), mode="reflect")
    return torch.nn.functional.conv2d(y, _pyr_kernel(x)).reshape(B, C, H, W)


def _pyrdown(x: torch.Tensor) -> torch.Tensor:
    H, W = x.shape[-2:]
    return torch.nn.functional.interpolate(_blur(x), size=(H // 2, W // 2), mode="bilinear", align_corners=False)


def _pyrup(x: torch.Tensor) -> torch.Tensor:
    H, W = x.shape[-2:]
    return _blur(torch.nn.functional.interpolate(x, size=(2 * H, 2 * W), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int):
    """Burt-Adelson Laplacian pyramid as kornia's ``build_laplacian_pyramid`` (reflect borders,
    bilinear resampling, align_corners=False): level i = G_i - pyrup(G_{i+1}), last = G_{levels-1}."""
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_pyrdown(gauss[-1]))
    return [gauss[i] - _pyrup(gauss[i + 1]) for i in range(levels - 1)] + [gauss[-1]]


def from_pyramid(pyr):
    img = pyr[-1]
    for i in range(len(pyr) - 2, -1, -1):
        img = _pyrup(img) + pyr[i]
    return img


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class FDG(Guider):
    """Frequency-decoupled guidance (Sadat et al. 2025, arXiv 2506.19713; diffusers'
    ``FrequencyDecoupledGuidance``). c and u ([B, C, H, W]) are split into Laplacian pyramids
    (``laplacian_pyramid``: 5x5 binomial blur, reflect borders, bilinear x2 resampling, as
    kornia's), and level l gets its own scale s_l and parallel weight p_l:

        d_l = c_l - u_l ;  if p_l != 1:  d_l = p_l d_par + d_orth  (split along c_l, per sample,
                                                                    as APG)
        D_l = u_l + s_l d_l    (convention "w")      D_l = c_l + s_l d_l    (convention "1+w")
        D_l = c_l              where s_l = 1 ("w") or 0 ("1+w")
        D   = from_pyramid(D_0 .. D_{L-1})    (D_{L-1} up, blur, + D_{L-2}, ...)

    ``scales`` are the level scales in ``Guidance.convention``, highest frequency first; the
    ``Guidance`` scale only switches the unconditional pass (and so FDG) on where g != 1 (inside
    ``interval``). ``Guidance.rescale`` applies in data space (diffusers'
    ``guidance_rescale_space="data"``); ``freq_rescale`` (one phi per level, or one for all) in
    frequency space, to each guided level against the cond band (diffusers'
    ``guidance_rescale_space="freq"``): D_l = phi_l D_l std(c_l)/std(D_l) + (1 - phi_l) D_l, std
    per sample over the non-batch dims. H and W must be divisible by 2^(levels - 1) and one of
    them a power of two (kornia pads other sizes, changing the output shape).
    """

    scales: Tuple[float, ...] = (10.0, 5.0)
    parallel_weights: Optional[Tuple[float, ...]] = None
    freq_rescale: Optional[Tuple[float, ...]] = None
    name = "fdg"

    def __post_init__(self):
        sc = self.scales
        if isinstance(sc, (str, bytes)) or not isinstance(sc, (tuple, list)) or len(sc) < 1:
            raise ValueError(f"FDG scales must be a non-empty sequence of level scales, got {sc!r}")
        object.__setattr__(self, "scales", tuple(_num("FDG scale", v) for v in sc))
        pw = self.parallel_weights
        if pw is None:
            pw = (1.0,) * len(self.scales)
        elif isinstance(pw, (int, float, np.integer, np.floating)) and not isinstance(pw, bool):
            pw = (float(pw),) * len(self.scales)
        elif isinstance(pw, (str, bytes)) or not isinstance(pw, (tuple, list)) or len(pw) != len(self.scales):
            raise ValueError(f"FDG parallel_weights must be None, a number or one per level "
                             f"({len(self.scales)}), got {self.parallel_weights!r}")
        object.__setattr__(self, "parallel_weights", tuple(_num("FDG parallel weight", v) for v in pw))
        fr = self.freq_rescale
        if fr is not None:
            if isinstance(fr, (int, float, np.integer, np.floating)) and not isinstance(fr, bool):
                fr = (fr,) * len(self.scales)
            if isinstance(fr, (str, bytes)) or not isinstance(fr, (tuple, list)) or len(fr) != len(self.scales):
                raise ValueError(f"FDG freq_rescale must be None, a number or one per level ({len(self.scales)}), "
                                 f"got {self.freq_rescale!r}")
            fr = tuple(_num("FDG freq_rescale", v) for v in fr)
            if any(not 0.0 <= v <= 1.0 for v in fr):
                raise ValueError(f"FDG freq_rescale values must lie in [0, 1], got {fr}")
            object.__setattr__(self, "freq_rescale", fr)

    def combine(self, c, u, g, one_plus_w, step, state):
        if c.dim() != 4:
            raise ValueError(f"FDG needs [B, C, H, W] model outputs, got shape {tuple(c.shape)}")
        L = len(self.scales)
        H, W = c.shape[-2:]
        if H % (1 << (L - 1)) or W % (1 << (L - 1)) or not (_is_pow2(H) or _is_pow2(W)):
            raise ValueError(f"FDG with {L} levels needs H and W divisible by {1 << (L - 1)} and one of them a "
                             f"power of two, got {H}x{W}")
        c, u = _work(c), _work(u)
        off = 0.0 if one_plus_w else 1.0
        if all(math.isclose(s, off) for s in self.scales):
            return c
        pc, pu = laplacian_pyramid(c, L), laplacian_pyramid(u, L)
        out = []
        rescales = self.freq_rescale or (0.0,) * L
        for cl, ul, s, p, phi in zip(pc, pu, self.scales, self.parallel_weights, rescales):
            if math.isclose(s, off):
                out.append(cl)
                continue
            d = cl - ul
            if not math.isclose(p, 1.0):
                dims = _dims(cl)
                coef = _dot(d, cl, dims) / torch.clamp(_dot(cl, cl, dims).sqrt(), min=1e-12).square()
                d_par = coef.to(cl.dtype) * cl
                d = p * d_par + (d - d_par)
            Dl = (cl if one_plus_w else ul) + s * d
            if phi > 0.0:
                from .ops.reductions import cfg_rescale
                Dl = cfg_rescale(cl, Dl, 0.0, phi)      # uncond = D_l, g = 0: rescales D_l towards c_l
            out.append(Dl)
        return from_pyramid(out)



# ---------------------------------------------------------------------------------------------
# Extra-pass guidance: a third model output p, the conditional pass of a perturbed model.

def _layer_spec(name: str, layers) -> Tuple[Union[int, str], ...]:
    """Layers as a non-empty tuple of block indices (ints) and/or module-name regexes (strings)."""
    if isinstance(layers, (int, np.integer, str)) and not isinstance(layers, bool):
        layers = (layers,)
    if (not isinstance(layers, (tuple, list)) or not layers
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer, str)) for v in layers)):
        raise ValueError(f"{name} layers must be a block index, a module-name regex or a non-empty sequence of "
                         f"them, got {layers!r}")
    if any(isinstance(v, (int, np.integer)) and v < 0 for v in layers):
        raise ValueError(f"{name} layer indices must be >= 0, got {layers!r}")
    return tuple(v if isinstance(v, str) else int(v) for v in layers)


def _fraction(name: str, v) -> Optional[float]:
    if v is None:
        return None
    if not 0.0 <= _num(name, v) <= 1.0:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1] (or None), got {v}")
    return float(v)


def _is_one(g) -> bool:
    return isinstance(g, (int, float)) and math.isclose(g, 1.0)


class ExtraPassGuider(Guider):
    """A method that needs the conditional output of a *perturbed* model, p, beside c and u
    (PAG, SLG, SEG). ``perturbs = "cond"``: the extra pass is the conditional input through the
    perturbed model; a sampler batches it with cond/uncond as one model call of 3B samples
    [u; c; p] with the perturbation applied to the last B rows only
    (``fastdiff.integrations.diffusers.perturbed``).

    The extra term is on at solver step ``step`` of ``num_steps`` where ``scale != 0`` and
    ``int(start * num_steps) < step < int(stop * num_steps)`` (diffusers' guiders' rule, lower
    bound strict; a bound that is None is no bound). With D_cfg = u + g (c - u) (convention "w";
    c + w (c - u) for "1+w") and s = ``scale``, as diffusers' guiders:

        CFG on,  extra on:   D = D_cfg + s (c - p)
        CFG off, extra on:   D = p + s (c - p)      ("w")      D = c + s (c - p)      ("1+w")
        CFG on,  extra off:  D = D_cfg
        CFG off, extra off:  D = c

    (diffusers' PAG *pipelines* use c + s (c - p) without CFG whatever the convention; with CFG
    the two agree.)

    Where the fused step applies CFG itself, ``fold`` gives c' = c + (s / g) (c - p) = lerp(p, c,
    1 + s / g) in one elementwise pass, and the step's own u + g (c' - u) is the formula above
    (same memory traffic as computing D beside the step, and the step keeps its CFG fusion and
    per-sample g). ``combine_extra`` computes D in diffusers' operation order (the oracle and the
    general path: g = 0, per-sample g with some g_b = 1).
    """

    perturbs = "cond"

    def _check_common(self, kind: str):
        object.__setattr__(self, "layers", _layer_spec(kind, self.layers))
        if not isinstance(self.fqn, str) or not self.fqn:
            raise ValueError(f"{kind} fqn must be 'auto' or the dotted name of a block list, got {self.fqn!r}")
        _num(f"{kind} scale", self.scale)
        lo = _fraction(f"{kind} start", self.start)
        hi = _fraction(f"{kind} stop", self.stop)
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(f"{kind} stop ({hi}) must be >= start ({lo})")

    def extra_active(self, step: int, num_steps: Optional[int]) -> bool:
        """Whether the perturbed pass is needed at this step (diffusers' ``_is_slg_enabled``)."""
        if math.isclose(self.scale, 0.0):
            return False
        if num_steps is not None:
            if self.start is not None and not int(self.start * num_steps) < step:
                return False
            if self.stop is not None and not step < int(self.stop * num_steps):
                return False
        return True

    def combine(self, c, u, g, one_plus_w, step, state):
        """Without the perturbed output (extra term off): plain CFG, in diffusers' order."""
        return self.combine_extra(c, u, None, g, one_plus_w, step, state.get("num_steps"))

    def combine_extra(self, c, u, p, g, one_plus_w, step, num_steps):
        """D from c, u (None: CFG off) and p (None: extra term off); ``g`` a number or a per-sample
        tensor [B, 1, ...] (samples with g = 1 take the CFG-off formula)."""
        c = _work(c)
        cfg = u is not None and not _is_one(g)
        extra = p is not None and self.extra_active(step, num_steps)
        s = self.scale
        p = _work(p) if extra else None
        off = None
        if not cfg or isinstance(g, torch.Tensor):
            off = c if not extra else ((c if one_plus_w else p) + s * (c - p))
            if not cfg:
                return off
        u = _work(u)
        gs = (g - 1.0) if one_plus_w else g
        D = (c if one_plus_w else u) + gs * (c - u)
        if extra:
            D = D + s * (c - p)
        if isinstance(g, torch.Tensor):
            D = torch.where(torch.isclose(g, torch.ones_like(g)), off, D)
        return D

    def fold(self, c, p, g: float):
        """c' with u + g (c' - u) = the CFG-on formula: lerp(p, c, 1 + s / g); g a number != 0."""
        c = _work(c)
        return torch.lerp(_work(p), c, 1.0 + self.scale / g)


@dataclass(frozen=True)
class PAG(ExtraPassGuider):
    """Perturbed-attention guidance (Ahn et al. 2024, arXiv 2403.17377; diffusers'
    ``PerturbedAttentionGuidance`` and the PAG pipelines). The perturbed pass replaces the
    self-attention map of the named layers by the identity: the attention output is the value
    projection V (diffusers' ``skip_attention_scores``; cross-attention is untouched).

    ``layers``: block indices in the model's block list ``fqn`` ("auto": ``transformer_blocks``,
    ``blocks``, ... as diffusers' ``LayerSkipConfig``), and/or regexes over the denoiser's module
    names as the PAG pipelines' ``pag_applied_layers`` (``"mid"``, ``"down.block_2"``); every
    self-attention module inside is perturbed. ``start``/``stop``: see ``ExtraPassGuider``
    (None: every step, as the PAG pipelines; diffusers' guider defaults are 0.01 / 0.2).
    """

    scale: float = 3.0
    layers: Tuple[Union[int, str], ...] = ("mid",)
    fqn: str = "auto"
    start: Optional[float] = None
    stop: Optional[float] = None
    name = "pag"
    perturbation = "attention_scores"

    def __post_init__(self):
        self._check_common("PAG")


@dataclass(frozen=True)
class SLG(ExtraPassGuider):
    """Skip-layer guidance (Stability AI, SD 3.5; diffusers' ``SkipLayerGuidance`` and
    ``StableDiffusion3Pipeline(skip_guidance_layers=...)``). The perturbed pass skips the named
    transformer blocks: each returns its inputs (diffusers' ``LayerSkipConfig`` with
    ``skip_attention`` and ``skip_ff``). Defaults as diffusers' (scale 2.8, steps in
    (0.01 N, 0.2 N)); SD 3.5 Medium's recommended layers are (7, 8, 9). The SD3 pipeline's own
    window compares ``i > N start`` and ``i < N stop`` without ``int``: the same steps unless
    ``stop * N`` is fractional.
    """

    scale: float = 2.8
    layers: Tuple[Union[int, str], ...] = (7, 8, 9)
    fqn: str = "auto"
    start: Optional[float] = 0.01
    stop: Optional[float] = 0.2
    name = "slg"
    perturbation = "skip_block"

    def __post_init__(self):
        self._check_common("SLG")


@dataclass(frozen=True)
class SEG(ExtraPassGuider):
    """Smoothed-energy guidance (Hong 2024, arXiv 2408.00760; diffusers'
    ``SmoothedEnergyGuidance``). The perturbed pass blurs the self-attention *queries* of the named
    blocks (a hook on ``to_q``) over the square grid of the first floor(sqrt(L))^2 tokens, with
    diffusers' ``_gaussian_blur_2d`` and ``blur_sigma``. Note diffusers' branch: sigma above 9999.9
    gets a Gaussian kernel clipped to the grid (near-uniform, reflect padding); a smaller sigma
    gets the grid mean (the opposite of the paper's code, whose infinite blur is the mean).
    fastdiff does what diffusers does. Defaults as diffusers' (scale 2.8, window (0, N): step 0
    excluded by the strict lower bound).
    """

    scale: float = 2.8
    layers: Tuple[Union[int, str], ...] = (7, 8, 9)
    fqn: str = "auto"
    blur_sigma: float = 9999999.0
    start: Optional[float] = 0.0
    stop: Optional[float] = 1.0
    name = "seg"
    perturbation = "blur_queries"

    def __post_init__(self):
        self._check_common("SEG")
        if not _num("SEG blur_sigma", self.blur_sigma) > 0:
            raise ValueError(f"SEG blur_sigma must be > 0, got {self.blur_sigma}")


@dataclass(frozen=True)
class AutoGuidance(Guider):
    """AutoGuidance as diffusers' ``AutoGuidance`` (Karras et al. 2024, arXiv 2406.02507, with the
    "bad model" made from the model itself): the *unconditional* pass runs through a degraded
    model, the named transformer blocks skipped (``dropout=1``, they return their inputs) or their
    outputs dropped out with probability ``dropout`` (torch's dropout, training mode, scaled by
    1 / (1 - dropout); random, from torch's global generator), and

        D = u~ + g (c - u~)  ("w")      D = c + w (c - u~)  ("1+w")     where CFG is on and
        int(start N) <= step < int(stop N);  D = c elsewhere.

    No extra pass: the perturbation is applied to the uncond rows of the usual [u; c] batch.
    """

    layers: Tuple[Union[int, str], ...] = (7, 8, 9)
    dropout: float = 1.0
    fqn: str = "auto"
    start: float = 0.0
    stop: float = 1.0
    name = "auto_guidance"
    perturbs = "uncond"
    perturbation = "skip_block"
    scale = 1.0                       # no extra term of its own

    def __post_init__(self):
        object.__setattr__(self, "layers", _layer_spec("AutoGuidance", self.layers))
        if not isinstance(self.fqn, str) or not self.fqn:
            raise ValueError(f"AutoGuidance fqn must be 'auto' or the dotted name of a block list, got {self.fqn!r}")
        if not 0.0 <= _num("AutoGuidance dropout", self.dropout) <= 1.0:
            raise ValueError(f"AutoGuidance dropout must lie in [0, 1], got {self.dropout}")
        lo, hi = _fraction("AutoGuidance start", self.start), _fraction("AutoGuidance stop", self.stop)
        if hi < lo:
            raise ValueError(f"AutoGuidance stop ({hi}) must be >= start ({lo})")

    def active(self, step: int, num_steps: Optional[int]) -> bool:
        """diffusers' ``_is_ag_enabled`` without the scale test: int(start N) <= step < int(stop N)."""
        if num_steps is None:
            return True
        return int(self.start * num_steps) <= step < int(self.stop * num_steps)

    def combine(self, c, u, g, one_plus_w, step, state):
        c = _work(c)
        if u is None or _is_one(g) or not self.active(step, state.get("num_steps")):
            return c
        u = _work(u)
        D = (c + (g - 1.0) * (c - u)) if one_plus_w else (u + g * (c - u))
        if isinstance(g, torch.Tensor):
            D = torch.where(torch.isclose(g, torch.ones_like(g)), c, D)
        return D


EXTRA_PASS = (PAG, SLG, SEG, AutoGuidance)


class Mailbox:
    """Hands the perturbed output p from the model wrapper that computes it to the
    ``GuidanceHook`` that combines it, one model evaluation at a time. ``plan`` (from the hook, at
    the start of a run): whether evaluation k (in call order) needs the perturbed pass."""

    def __init__(self):
        self.plan = None
        self.calls = 0
        self.value = None

    def start(self, plan):
        self.plan, self.calls, self.value = list(plan), 0, None

    def wanted(self) -> bool:
        """Whether the evaluation about to run needs p (True without a plan); counts the call."""
        k, self.calls = self.calls, self.calls + 1
        return self.plan is None or (k < len(self.plan) and self.plan[k])

    def put(self, p):
        self.value = p

    def take(self, _row=None):
        p, self.value = self.value, None
        return p


_MAILBOXES: dict = {}


def mailbox(method: ExtraPassGuider) -> Mailbox:
    """The mailbox of an extra-pass method instance (by identity)."""
    box = _MAILBOXES.get(id(method))
    if box is None or box[0] is not method:
        box = _MAILBOXES[id(method)] = (method, Mailbox())
    return box[1]


METHODS = {"fdg": FDG, "apg": APG, "cfg_zero_star": CFGZeroStar, "cfg-zero*": CFGZeroStar, "cfgzero*": CFGZeroStar,
           "tcfg": TCFG, "mambo_g": MamboG, "mambo-g": MamboG, "cfg_renorm": CFGRenorm, "renorm": CFGRenorm}


def as_guider(method) -> Optional[Guider]:
    """A ``Guider`` from an instance, a name (``"apg"``, ``"cfg_zero_star"``, ``"tcfg"``,
    ``"mambo_g"``, ``"cfg_renorm"``, ``"fdg"``; default options) or None."""
    if method is None or isinstance(method, Guider):
        return method
    if isinstance(method, str):
        cls = METHODS.get(method.lower())
        if cls is None:
            raise ValueError(f"unknown guidance method {method!r}; one of {sorted(set(METHODS))} or a "
                             "fastdiff.guiders.Guider instance")
        return cls()
    raise ValueError(f"guidance method must be None, a name or a fastdiff.guiders.Guider instance "
                     f"(APG, CFGZeroStar, TCFG, MamboG, CFGRenorm, FDG, PAG, SLG, SEG, AutoGuidance), "
                     f"got {type(method).__name__}")
