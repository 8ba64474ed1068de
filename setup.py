"""Build fastdiff and its C++ CPU extension fastdiff._C.

Install (after torch):  pip install --no-build-isolation -e .

Environment:
  FASTDIFF_SKIP_EXT=1        build a pure-Python package (the reference backend still works)
  FASTDIFF_CPU_ARCH=<arch>   -march for the C++ kernels: "native" (default), e.g. "x86-64-v3",
                             or "none" for no -march flag (portable baseline build)
  MAX_JOBS=<n>               parallel compile jobs (torch's ninja build)

Only C++ sources are compiled here (CppExtension): CUDA sources under csrc/cuda are never
built by this file, so the build works with a CPU torch even where nvcc is on the PATH.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    pkgs = find_packages(where=HERE, include=["fastdiff", "fastdiff.*"])
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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"fastdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
