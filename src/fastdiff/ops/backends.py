"""Dispatch as data: one registry of backends, one ``select`` for every op.

A backend is a small object that declares what it serves: ``name``, a numeric ``priority``
(higher is tried first by ``auto``; registration order never matters), ``ops`` (the ops it
implements: the kernel ops of ``OPS`` and/or ``"attention"``), ``device_types`` and ``dtypes``
(what it runs on: None means any), and two methods, xformers style:
``unavailable_reason()`` (why it cannot run on this machine at all, or None) and
``not_supported_reasons(op, tensors, state_dtype=None)`` (why it cannot run *these* inputs; the
base class checks the declared devices and dtypes, subclasses add what data cannot say). Its op
methods take already-validated arguments. Adding a backend means one class and one
``register_backend`` call; no solver changes.

``BACKENDS`` (the kernel backends, what ``fastdiff info`` / ``fastdiff check`` list) and
``fastdiff.attention.ATTENTION_BACKENDS`` are live views of the one registry.

This module imports the oracles (fastdiff.reference: the reference backend runs them) and nothing
else of fastdiff.ops; the modules above it (the validated ops, the custom ops, the triton and
cuda backends) import it. The custom ops plug their traced backend in with
``register_traced_backend`` rather than being imported here.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import MutableMapping
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch

from ..reference import attention as attention_oracle
from ..reference import philox as philox_oracle
from ..reference import reductions as reduction_oracles
from ..reference import step as step_oracle

#: The per-sample reductions (fastdiff.ops.reductions); a backend implements each as a method.
REDUCTION_OPS = ("cfg_rescale", "dynamic_threshold", "error_norm", "per_sample_norm")
#: The kernel ops, each also a torch custom op (fastdiff.ops.custom_ops).
OPS = ("fused_step", "cfg_combine", "philox_normal") + REDUCTION_OPS
ATTENTION_OP = "attention"
ALL_OPS = OPS + (ATTENTION_OP,)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


class Backend:
    """What a backend declares (data) and the two reason methods the dispatcher asks."""

    name = "?"
    #: Higher runs first under ``auto``; ``reference`` (0) is the fallback.
    priority: int = 0
    #: The ops this backend implements.
    ops: FrozenSet[str] = frozenset()
    #: Device types this backend is for (None: any). Skipping a backend that is not for the
    #: inputs' device is normal and never warned about.
    device_types: Optional[Tuple[str, ...]] = None
    #: Floating dtypes of the tensors it reads (None: any).
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    #: dtypes of the solver state (x, y, history) its fused step keeps (None: any).
    state_dtypes: Optional[Tuple[torch.dtype, ...]] = None

    def implements(self, op: str) -> bool:
        return op in self.ops

    def serves(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    def dtypes_for(self, op: str) -> Optional[Tuple[torch.dtype, ...]]:
        """The floating dtypes ``op`` accepts on this backend (default: ``dtypes``)."""
        return self.dtypes

    def unavailable_reason(self) -> Optional[str]:
        return None

    def device_reason(self, tensors) -> Optional[str]:
        for t in tensors:
            if not self.serves(t.device.type):
                where = " or ".join(d.upper() for d in self.device_types or ())
                return f"{self.name} backend runs on {where} tensors, got a tensor on {t.device}"
        return None

    def dtype_reason(self, op: str, tensors) -> Optional[str]:
        allowed = self.dtypes_for(op)
        if allowed is None:
            return None
        for t in tensors:
            if t.is_floating_point() and t.dtype not in allowed:
                return f"{self.name} {op} supports {_dtype_names(allowed)}, got {t.dtype}"
        return None

    def state_reason(self, state_dtype) -> Optional[str]:
        if state_dtype is not None and self.state_dtypes is not None and state_dtype not in self.state_dtypes:
            return f"{self.name} backend keeps the solver state in {_dtype_names(self.state_dtypes)}, got {state_dtype}"
        return None

    def not_supported_reasons(self, op: str, tensors: List[torch.Tensor], state_dtype=None) -> List[str]:
        return [r for r in (self.device_reason(tensors), self.state_reason(state_dtype), self.dtype_reason(op, tensors))
                if r]


class ReferenceBackend(Backend):
    """Plain PyTorch: any device, any floating dtype, every op. The fallback; it runs the oracles
    of fastdiff.reference themselves."""

    name = "reference"
    priority = 0
    ops = frozenset(ALL_OPS)
    fused_step = staticmethod(step_oracle.fused_step)
    cfg_combine = staticmethod(step_oracle.cfg_combine)
    philox_normal = staticmethod(philox_oracle.philox_normal)
    cfg_rescale = staticmethod(reduction_oracles.cfg_rescale)
    dynamic_threshold = staticmethod(reduction_oracles.dynamic_threshold)
    error_norm = staticmethod(reduction_oracles.error_norm)
    per_sample_norm = staticmethod(reduction_oracles.per_sample_norm)

    @staticmethod
    def attention(q, k1, v1, k2=None, v2=None, bias=None, scale=None):
        return attention_oracle.attention(q, k1, v1, k2, v2, bias=bias, scale=scale)


class SdpaBackend(Backend):
    """torch's scaled_dot_product_attention (any device, any dtype q/k/v share); joint attention
    concatenates the sources."""

    name = "sdpa"
    priority = 100
    ops = frozenset({ATTENTION_OP})

    @staticmethod
    def attention(q, k1, v1, k2=None, v2=None, bias=None, scale=None):
        k = k1 if k2 is None else torch.cat([k1, k2], dim=2)
        v = v1 if v2 is None else torch.cat([v1, v2], dim=2)
        mask = None if bias is None else bias.to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@functools.lru_cache(maxsize=None)
def load_extension():
    """fastdiff._C, or the reason it cannot be imported (a string)."""
    try:
        from .. import _C  # noqa: F401
        return _C
    except ImportError as e:  # not built (pure-Python install) or built against another torch
        return f"fastdiff._C is not importable ({e}); reinstall with `pip install --no-build-isolation -e .`"


class CpuBackend(Backend):
    """fastdiff._C: C++ with OpenMP and SIMD, CPU tensors, float32 state (x, y, hist), model
    outputs / noise / model input in float32, float16, bfloat16 or float64."""

    name = "cpu"
    priority = 400
    ops = frozenset(OPS)
    device_types = ("cpu",)
    # float64 is the coefficient table's dtype, and a model dtype the kernel converts.
    dtypes = _FLOAT_DTYPES + (torch.float64,)
    state_dtypes = (torch.float32,)

    def unavailable_reason(self):
        ext = load_extension()
        if isinstance(ext, str):
            return ext
        if not hasattr(ext, "fused_step"):
            return "fastdiff._C was built without the fused step"
        return None

    def not_supported_reasons(self, op, tensors, state_dtype=None):
        reasons = super().not_supported_reasons(op, tensors, state_dtype)
        if not hasattr(load_extension(), op):   # an extension built before the op was added
            reasons.insert(0, f"fastdiff._C was built without {op}; rebuild with `pip install --no-build-isolation -e .`")
        return reasons

    @property
    def fused_step(self):
        """The bound C++ function itself (no Python frame per step); arguments in the order of
        fastdiff.program.layout.STEP_ARGS (that of fastdiff.reference.fused_step), all positional:
        (table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, seed, noise_id, model_in,
         bad_row, guidance), ``flags`` the row's bitmask (layout.FLAG_*), ``hist_writes`` the written slots'."""
        return load_extension().fused_step

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return load_extension().cfg_combine(cond, uncond, float(scale), out_dtype or cond.dtype)

    def philox_normal(self, shape, seed, noise_id, device):
        return load_extension().philox_normal([int(s) for s in shape], int(seed), int(noise_id))

    # Per-sample reductions (csrc/cpu/reductions.cpp): float32 math for float32/float16/bfloat16
    # inputs, float64 for float64, as the reference.
    def cfg_rescale(self, cond, uncond, g, rescale):
        return load_extension().cfg_rescale(cond, uncond, float(g), float(rescale))

    def dynamic_threshold(self, x0, ratio, max_value):
        return load_extension().dynamic_threshold(x0, float(ratio), float(max_value))

    def error_norm(self, a, b, ref, rtol, atol):
        if not a.dtype == b.dtype == ref.dtype:   # mixed dtypes: the reference's conversion to a's math dtype
            md = torch.float64 if a.dtype == torch.float64 else torch.float32
            a, b, ref = a.to(md), b.to(md), ref.to(md)
        return load_extension().error_norm(a, b, ref, float(rtol), float(atol))

    def per_sample_norm(self, x):
        return load_extension().per_sample_norm(x)


# ---------------------------------------------------------------------------------------------
# The registry

_REGISTRY: Dict[str, Backend] = {}


def _priority(b) -> int:
    return int(getattr(b, "priority", 0))


def implements(b, op: str) -> bool:
    """Whether backend ``b`` implements ``op`` (its declared ``ops``; duck-typed objects: the method)."""
    impl = getattr(b, "implements", None)
    return impl(op) if callable(impl) else hasattr(b, op)


def ordered(op: Optional[str] = None) -> List[Backend]:
    """Registered backends (implementing ``op``, if given), highest priority first; ties by name."""
    found = [b for b in _REGISTRY.values() if op is None or implements(b, op)]
    return sorted(found, key=lambda b: (-_priority(b), b.name))


def register_backend(backend: Backend, priority: Optional[int] = None) -> None:
    """Add (or replace) a backend in the registry; ``priority`` overrides the backend's own."""
    if priority is not None:
        backend.priority = int(priority)
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)


class RegistryView(MutableMapping):
    """A live name -> backend mapping over the registry, filtered by ``keep``, in priority order.
    Setting an item registers a backend; deleting one unregisters it."""

    def __init__(self, keep: Callable[[Backend], bool]):
        self._keep = keep

    def __getitem__(self, name):
        b = _REGISTRY.get(name)
        if b is None or not self._keep(b):
            raise KeyError(name)
        return b

    def __setitem__(self, name, backend):
        if getattr(backend, "name", name) != name:
            raise ValueError(f"backend named {backend.name!r} registered as {name!r}")
        register_backend(backend)

    def __delitem__(self, name):
        self[name]
        unregister_backend(name)

    def __iter__(self) -> Iterator[str]:
        return iter([b.name for b in ordered() if self._keep(b)])

    def __len__(self) -> int:
        return sum(1 for b in _REGISTRY.values() if self._keep(b))

    def __repr__(self):
        return f"{type(self).__name__}({list(self)})"


#: The kernel backends (those implementing any op of OPS), highest priority first.
BACKENDS = RegistryView(lambda b: any(implements(b, op) for op in OPS))

for _b in (ReferenceBackend(), CpuBackend(), SdpaBackend()):
    register_backend(_b)


def __getattr__(name):
    if name == "PRIORITY":   # the automatic order of the kernel backends, best first (read-only)
        return tuple(BACKENDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Dispatch

_warned = set()

# While torch.compile traces, ``select`` answers for these ops with ``_TRACED[0](backend)``, whose
# methods are the registered custom ops (they choose the backend when they run). Set by
# fastdiff.ops.custom_ops, which sits above this module.
_TRACED: Optional[Tuple[Callable[[str], object], FrozenSet[str]]] = None


def register_traced_backend(factory: Callable[[str], object], ops) -> None:
    """What ``select`` returns for ``ops`` while torch.compile traces: ``factory(backend_name)``."""
    global _TRACED
    _TRACED = (factory, frozenset(ops))


def reasons_for(name: str, op: str, tensors, state_dtype=None) -> List[str]:
    """Why backend ``name`` cannot run ``op`` on these inputs ([] if it can)."""
    b = _REGISTRY[name]
    if not implements(b, op):
        return [f"{name} backend does not implement {op}"]
    why = b.unavailable_reason()
    if why:
        return [why]
    return list(b.not_supported_reasons(op, tensors, state_dtype))


def _label(op: str) -> Tuple[str, str]:
    """(what a backend is called for ``op``, what it runs) in messages."""
    return ("attention backend", "these inputs") if op == ATTENTION_OP else ("backend", op)


def select(op: str, backend: str, tensors, state_dtype=None) -> Backend:
    """The backend to run ``op`` on these tensors. An explicit choice runs or raises with its
    reasons; ``auto`` takes the highest-priority backend that supports the inputs and warns once
    when a backend meant for these inputs' device had to be skipped and ``reference`` runs."""
    if _TRACED is not None and op in _TRACED[1] and torch.compiler.is_compiling():
        # Traced by torch.compile: the registered custom ops, which choose the backend when they run.
        return _TRACED[0](backend)
    kind, what = _label(op)
    candidates = ordered(op)
    if backend != "auto":
        names = [b.name for b in candidates]
        if backend not in names:
            raise ValueError(f"unknown {kind} {backend!r}; expected 'auto' or one of {', '.join(names)}")
        why = reasons_for(backend, op, tensors, state_dtype)
        if why:
            raise RuntimeError(f"{kind} {backend!r} cannot run {what}: " + "; ".join(why))
        return _REGISTRY[backend]
    device_type = tensors[0].device.type if tensors else "cpu"
    skipped = []
    for b in candidates:
        why = reasons_for(b.name, op, tensors, state_dtype)
        if not why:
            if b.name == "reference" and skipped:
                key = (op, tuple(skipped))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"fastdiff: {op} falls back to the reference backend: "
                                  + "; ".join(f"{n}: {r}" for n, r in skipped), RuntimeWarning, stacklevel=3)
            return b
        # Only a backend meant for this device is worth a warning.
        if b.serves(device_type):
            skipped.append((b.name, why[0]))
    # Every registered backend, each with its reason (those lacking the op included).
    listed = "; ".join(f"{b.name}: {'; '.join(reasons_for(b.name, op, tensors, state_dtype))}" for b in ordered())
    raise RuntimeError(f"no backend can run {op}: {listed}")


def available_backends() -> Dict[str, Optional[str]]:
    """name -> None if usable on this machine, else the reason it is not (the kernel backends)."""
    return {name: b.unavailable_reason() for name, b in BACKENDS.items()}
