"""Import ``k_diffusion.sampling`` without k-diffusion's package ``__init__``.

The package ``__init__`` pulls in torchvision, scikit-image and more, which do not import beside
this torch; ``sampling`` itself only needs ``k_diffusion.utils``, whose one torchvision import is
unused by the sampling code. So: stub the torchvision modules and register an empty
``k_diffusion`` package pointing at the installed folder, then import the submodule.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def load_kdiffusion_sampling():
    """The ``k_diffusion.sampling`` module; skips the calling test (or, called at import time,
    the whole test module) if k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        import pytest
        pytest.skip("k-diffusion is not installed", allow_module_level=True)
    # Stub torchvision only while k_diffusion.sampling imports (k_diffusion.utils binds its names
    # then), and take the stubs out again: libraries imported later (diffusers, transformers) probe
    # for torchvision and must not find a hollow one.
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    added = [n for n in names if n not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        if "k_diffusion" not in sys.modules:
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["k_diffusion"] = pkg
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in added:
            sys.modules.pop(name, None)
