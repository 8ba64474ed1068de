"""Build fastdiff and its C++ CPU extension fastdiff._C.

Install (after torch):  pip install --no-build-isolation .      (or -e . for development)

Environment:
  FASTDIFF_SKIP_EXT=1        build a pure-Python package (the reference backend still works)
  FASTDIFF_CPU_ARCH=<arch>   -march for the C++ kernels: "native" (default), e.g. "x86-64-v3",
                             or "none" for no -march flag (portable baseline build)
  MAX_JOBS=<n>               parallel compile jobs (torch's ninja build)
  FASTDIFF_CUDA=auto|1|0     the CUDA kernels fastdiff._cuda (csrc/cuda): auto (default) builds them
                             when torch is a CUDA build and nvcc is found, 1 requires them (fails with
                             the reason otherwise), 0 skips them
  FASTDIFF_CUDA_ARCHS=<list> GPU archs for them, e.g. "8.0;9.0" (else TORCH_CUDA_ARCH_LIST, else
                             DEFAULT_CUDA_ARCHS below)

The CPU extension fastdiff._C is C++ only (CppExtension); csrc/cuda builds as a separate
CUDAExtension, fastdiff._cuda, so a CPU torch never needs CUDA headers.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    # src/ layout: nothing importable named ``fastdiff`` sits in the checkout root, so running from
    # the root (``python -m pytest``) never shadows the installed package. The Triton kernels keep
    # their top-level folder kernels/, which has no __init__.py, so it can never shadow PyPI's
    # ``kernels`` package; src/fastdiff/kernels is a link to it, which makes it the subpackage
    # fastdiff.kernels in a normal install (copied) and in an editable one (found through the link).
    pkgs = find_packages(where=os.path.join(HERE, "src"), include=["fastdiff", "fastdiff.*"])
    return pkgs + ["fastdiff.kernels"]


def _extensions():
    if os.environ.get("FASTDIFF_SKIP_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    arch = os.environ.get("FASTDIFF_CPU_ARCH", "native").strip() or "native"
    cxx = [
        "-O3",
        "-fopenmp",
        "-fno-math-errno",      # sqrtf -> vsqrtps (the arguments are never negative)
        "-ffp-contract=off",    # no FMA contraction: the reference's rounding, bit-identical on every backend
        "-Wall",
        "-Wno-unknown-pragmas",
    ]
    if arch.lower() != "none":
        cxx.append(f"-march={arch}")
        cxx.append("-mprefer-vector-width=512")   # AVX-512 targets: full-width Philox (~15% faster); else no-op
        cxx.append(f"-DFASTDIFF_CPU_ARCH={arch}")
    # Sources relative to this file (setuptools wants relative paths); C++ only.
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=HERE) + glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
    ext = CppExtension(
        name="fastdiff._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        depends=sorted(glob.glob("csrc/*.h", root_dir=HERE) + glob.glob("csrc/cpu/*.h", root_dir=HERE)),
    )
    exts = [ext]
    cuda_ext = _cuda_extension()
    if cuda_ext is not None:
        exts.append(cuda_ext)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


# T4, A100, RTX 30xx, RTX 40xx / L4 / L40, H100; PTX of the last for newer GPUs.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _cuda_extension():
    """fastdiff._cuda from csrc/cuda (see FASTDIFF_CUDA above), or None."""
    mode = os.environ.get("FASTDIFF_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"FASTDIFF_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    elif CUDA_HOME is None:
        why = "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    else:
        why = None
    if why is not None:
        if mode == "1":
            raise SystemExit(f"FASTDIFF_CUDA=1, but the CUDA kernels cannot be built: {why}")
        return None
    archs = os.environ.get("FASTDIFF_CUDA_ARCHS", "").strip()
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs          # what torch's build reads
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    with open(os.path.join(HERE, "csrc", "cuda", "nvcc_flags.txt")) as f:   # shared with the compile test
        nvcc = [ln.split("#", 1)[0].strip() for ln in f]
    return CUDAExtension(
        name="fastdiff._cuda",
        sources=sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE)) + ["csrc/cuda/torch_binding.cpp"],
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": [flag for flag in nvcc if flag]},
        depends=sorted(glob.glob("csrc/cuda/*.h", root_dir=HERE)) + ["csrc/step_math.h", "csrc/program_layout.h"],
    )


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"": "src"},
    # The shipped digits model: weights and their checksums travel with the package.
    package_data={"fastdiff.models": ["weights/*.safetensors", "weights/*.sha256"],
                  "fastdiff": ["data/*.json"]},       # tuned grids (fastdiff.tune.tuned_grid)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
