"""The checkout never shadows an installed package, and the tests run against the installed fastdiff.

transformers 5.x installs PyPI's ``kernels`` package and diffusers imports it; fastdiff's Triton
kernels live in a top-level ``kernels/`` folder, which must never be what ``import kernels`` finds,
even when the checkout root is on ``sys.path`` (``python -m pytest`` from the root puts it there).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _inside_checkout(path: str) -> bool:
    p = Path(path).resolve()
    return p == REPO or REPO in p.parents


def test_pypi_kernels_package_is_not_shadowed_and_diffusers_unet_imports():
    kernels = pytest.importorskip("kernels", reason="PyPI's kernels package is not installed")
    assert kernels.__file__ is not None and not _inside_checkout(kernels.__file__), kernels.__file__
    from diffusers.models import UNet2DConditionModel  # noqa: F401  (imports kernels through transformers)


def test_from_the_checkout_root_import_kernels_is_pypis():
    """A fresh interpreter started in the checkout root (sys.path[0] is the root)."""
    pytest.importorskip("kernels", reason="PyPI's kernels package is not installed")
    code = ("import kernels, fastdiff, fastdiff.kernels; "
            "print(kernels.__file__); print(fastdiff.__file__); print(list(fastdiff.kernels.__path__)[0])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kernels_file, fastdiff_file, fd_kernels = r.stdout.split("\n")[:3]
    assert not _inside_checkout(kernels_file), kernels_file
    # fastdiff is the installed package: site-packages, or src/ for an editable install; never a
    # ``fastdiff/`` folder in the root.
    assert Path(fastdiff_file).resolve().parent != REPO / "fastdiff"
    assert Path(fd_kernels).name == "kernels"


def test_fastdiff_kernels_is_installed_with_the_package():
    pytest.importorskip("triton")
    assert importlib.util.find_spec("fastdiff.kernels.fused_step") is not None
    import fastdiff
    import fastdiff.kernels.fused_step as fs
    # the kernels sit inside the fastdiff package that was imported (copied, or linked in src/)
    assert Path(fs.__file__).parent.parent == Path(fastdiff.__file__).parent


def test_the_kernels_folder_is_not_a_regular_package():
    assert (REPO / "kernels").is_dir()
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow PyPI's kernels"
    assert not (REPO / "fastdiff").exists(), "a fastdiff/ folder in the root would shadow the installed package"


def test_no_test_edits_sys_path():
    offenders = []
    for f in sorted((REPO / "tests").glob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*\[.*\]\s*=|sys\.path\s*=", line):
                offenders.append(f"{f.name}:{n}")
    assert not offenders, f"tests edit sys.path: {offenders}"


def test_constraints_pin_every_parity_peer():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower()] = version
    for peer in ("diffusers", "transformers", "k-diffusion", "torchsde", "torchdiffeq", "scipy", "numpy", "triton",
                 "torch", "kernels", "huggingface-hub", "safetensors", "pytest"):
        assert peer in pins, f"{peer} is not pinned in constraints.txt"
