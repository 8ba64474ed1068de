"""The CUDA part, checked on a machine without a GPU (see also tests/test_cuda_emulated.py):

* every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 with the build's flags, torch's half
  flags and warnings as errors (nvcc, ptxas and the host compiler), and every kernel fits: no
  spills or stack, registers within the budget the on-paper occupancy assumes;
* the torch binding passes g++ -fsyntax-only against this torch's headers (it links only against
  a CUDA torch);
* csrc/cuda/tools/host_check.cpp: the host-side helpers against known values (Philox test
  vectors, table columns, addressing, argument checks, conversions);
* setup.py's FASTDIFF_CUDA flag and the CudaBackend's reasons on this machine.

nvcc is slow: the sources compile once per session, in parallel (both archs per nvcc call), and
the binding check runs beside them; about a minute on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO  # noqa: E402

from benchmarks import cuda_report  # noqa: E402

# Registers per thread the fused step may use: <= 96 keeps 5 blocks of 128 threads (31%
# occupancy) resident per SM on A100/H100, the figure the on-paper bandwidth estimate assumes.
FUSED_STEP_MAX_REGISTERS = 96


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(nvcc results per source, binding syntax check), computed once per session."""
    if cuda_report.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out = str(tmp_path_factory.mktemp("nvcc"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        binding = pool.submit(cuda_report.check_binding, out) if shutil.which("g++") else None
        results = cuda_report.compile_sources(cuda_report.ARCHS, out, jobs=2)
        return {r.source: r for r in results}, (binding.result() if binding else None)


@pytest.mark.cuda_compile
@pytest.mark.parametrize("source", cuda_report.SOURCES)
def test_source_compiles_for_sm80_and_sm90_without_warnings(compiled, source):
    r = compiled[0][source]
    assert r.ok, f"{' '.join(r.command)}\n{r.output}"
    for flag in cuda_report.TORCH_FLAGS:
        assert flag in r.command, f"compiled without torch's flag {flag}"
    archs = {k.arch for k in r.kernels}
    assert archs == set(cuda_report.ARCHS), f"kernels reported for {sorted(archs)}"


@pytest.mark.cuda_compile
def test_kernels_fit_without_spills(compiled):
    kernels = [k for r in compiled[0].values() for k in r.kernels]
    names = {k.kernel for k in kernels}
    # K = 0..4 fixed plus the any-K loop, each with and without vectors; CFG; rescale; Philox.
    assert {f"fused_step_kernel<{K}, {v}>" for K in (-1, 0, 1, 2, 3, 4) for v in ("true", "false")} <= names
    assert {"cfg_kernel<true>", "cfg_kernel<false>", "cfg_moments_kernel", "cfg_factor_kernel",
            "philox_normal_kernel", "philox_uint32_kernel"} <= names
    for k in kernels:
        where = f"{k.kernel} sm_{k.arch}"
        assert k.spill_stores == k.spill_loads == 0, f"{where}: spills"
        assert k.stack == 0, f"{where}: {k.stack} B of stack (local arrays)"
        assert k.registers <= 255
        if k.kernel.startswith("fused_step"):
            assert k.registers <= FUSED_STEP_MAX_REGISTERS, f"{where}: {k.registers} registers"
            assert k.occupancy() >= 0.3125


@pytest.mark.cuda_compile
def test_report_lists_every_kernel(compiled, tmp_path):
    results = list(compiled[0].values())
    text = cuda_report.render(results, "nvcc (test)")
    for r in results:
        for k in r.kernels:
            assert f"| `{k.kernel}` | {r.source} | sm_{k.arch} |" in text


@pytest.mark.cuda_compile
def test_torch_binding_passes_syntax_check(compiled):
    r = compiled[1]
    if r is None:
        pytest.skip("no g++")
    assert r.ok, f"{' '.join(r.command)}\n{r.output[-4000:]}"


def test_host_check_program(tmp_path):
    """csrc/cuda/tools/host_check.cpp built with g++ (no nvcc needed, only the CUDA headers)."""
    cxx, inc = shutil.which("g++"), cuda_report.cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    exe = str(tmp_path / "host_check")
    cmd = [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-I", inc,
           *[f for f in cuda_report.TORCH_FLAGS if f.startswith("-D")],
           str(REPO / "csrc" / "cuda" / "tools" / "host_check.cpp"), "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# setup.py and the backend on this (CPU-only) machine
# ----------------------------------------------------------------------------------------------
def _setup_version(**env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch behaviour")
def test_setup_cuda_flag_with_a_cpu_torch():
    r = _setup_version(FASTDIFF_CUDA="1")
    assert r.returncode != 0 and "FASTDIFF_CUDA=1" in r.stderr and "CPU-only" in r.stderr, r.stderr
    r = _setup_version(FASTDIFF_CUDA="maybe")
    assert r.returncode != 0 and "FASTDIFF_CUDA must be auto, 1 or 0" in r.stderr, r.stderr
    r = _setup_version(FASTDIFF_CUDA="auto")
    assert r.returncode == 0, r.stderr


def test_cuda_backend_registered_with_reasons():
    from fastdiff import ops
    from fastdiff.ops import backends, cuda_backend

    assert backends.BACKENDS["cuda"] is cuda_backend.BACKEND
    order = backends.PRIORITY
    assert order.index("cuda") < order.index("reference")
    if "triton" in order:
        assert order.index("cuda") < order.index("triton")
    why = cuda_backend.BACKEND.unavailable_reason()
    if torch.version.cuda is None:
        assert "CPU-only" in why
    if why is not None:
        x = torch.zeros(2, 3)
        from fastdiff.program import table_width
        table = torch.zeros(1, table_width(0), dtype=torch.float64)
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run fused_step"):
            ops.fused_step(table, 0, x, backend="cuda")
        assert torch.equal(x, torch.zeros(2, 3))
    reasons = cuda_backend.BACKEND.not_supported_reasons("fused_step", [torch.zeros(1)], torch.float64)
    assert any("CUDA tensors, got a tensor on cpu" in r for r in reasons)
    assert any("float32, got torch.float64" in r for r in reasons)
    reasons = cuda_backend.BACKEND.not_supported_reasons("cfg_rescale", [torch.zeros(1, dtype=torch.float64)])
    assert any("float32/float16/bfloat16, got torch.float64" in r for r in reasons)
