"""Import ``k_diffusion.sampling`` without k-diffusion's package ``__init__``.

The package ``__init__`` pulls in torchvision, scikit-image and more, which do not import beside
this torch; ``sampling`` itself only needs ``k_diffusion.utils``, whose one torchvision import is
unused by the sampling code. So: stub the torchvision modules and register an empty
``k_diffusion`` package pointing at the installed folder, then import the submodule.
"""
from __future__ import annotations

import importlib
import importlib.machinery
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
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        stub = sys.modules.setdefault(name, types.ModuleType(name))
        # A spec, so importlib.util.find_spec(name) still works for libraries that probe for
        # torchvision afterwards (diffusers does: without it, importing diffusers raises ValueError).
        if getattr(stub, "__spec__", None) is None:
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    return importlib.import_module("k_diffusion.sampling")
