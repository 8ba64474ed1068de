"""Compile every CUDA source of csrc/cuda for sm_80 and sm_90 with warnings as errors, and report
what ptxas assigned each kernel: registers, stack, spills, shared memory, and the theoretical
occupancy that follows on an A100 / H100 (on paper: nothing here runs on a GPU).

    python -m benchmarks.cuda_report [--out benchmarks/results/cuda_compile_report.md] [--arch 80 90]

tests/test_cuda_compile.py runs the same compiles (``compile_sources``). The flags are
csrc/cuda/nvcc_flags.txt (the build's) plus the warning flags below.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
SOURCES = ("fused_step.cu", "cfg.cu", "philox.cu")
ARCHS = (80, 90)
# Warnings are errors here (CI), not in setup.py: a newer nvcc's new warning must not break an install.
WERROR_FLAGS = ["-Werror", "all-warnings", "-Xptxas", "-Werror", "-Xcompiler", "-Wall,-Wextra,-Werror"]
# torch's half flags must be among the build flags: the kernels must compile the way torch builds them.
TORCH_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr")

# Per-SM limits for the occupancy column (CUDA occupancy calculator data).
GPUS = {80: dict(name="A100", regs_per_partition=16384, partitions=4, warps=64, blocks=32, smem=164 * 1024),
        90: dict(name="H100", regs_per_partition=16384, partitions=4, warps=64, blocks=32, smem=228 * 1024)}
RESERVED_SMEM_PER_BLOCK = 1024   # the runtime's per-block reservation on sm_80+


def nvcc_flags() -> List[str]:
    """csrc/cuda/nvcc_flags.txt: the build's nvcc flags."""
    flags = []
    for line in (CUDA_DIR / "nvcc_flags.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            flags.append(line)
    return flags


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_include_dir(nvcc: Optional[str] = None) -> Optional[str]:
    """The CUDA headers of nvcc's toolkit (for host-only builds of the kernel headers with g++):
    beside nvcc, or where nvcc itself says (it may be a wrapper script elsewhere)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return None
    candidates = [Path(os.path.realpath(nvcc)).parent.parent / "include"]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
        candidates += [Path(m) for m in re.findall(r'INCLUDES="-I([^"]+?)"', dry)]
    except (OSError, subprocess.SubprocessError):
        pass
    for inc in candidates:
        if (inc / "cuda_runtime_api.h").exists():
            return str(inc.resolve())
    return None


def launch_threads() -> Dict[str, int]:
    """Threads per block of each kernel, from the constants in csrc/cuda/layout.h."""
    text = (CUDA_DIR / "layout.h").read_text()
    elementwise = int(re.search(r"kThreads = (\d+)", text).group(1))
    moments = int(re.search(r"kMomentThreads = (\d+)", text).group(1))
    return {"cfg_moments_kernel": moments, "cfg_factor_kernel": moments, "": elementwise}


@dataclass
class KernelUsage:
    kernel: str          # demangled-ish name, e.g. fused_step_kernel<2, true>
    arch: int
    registers: int
    stack: int           # bytes of stack frame (local memory)
    spill_stores: int
    spill_loads: int
    shared: int          # static shared memory (bytes)
    threads: int = 0

    def occupancy(self, dynamic_shared: int = 0) -> float:
        """Theoretical resident warps / max warps per SM (registers, shared memory, block limits)."""
        gpu = GPUS[self.arch]
        warps_per_block = -(-self.threads // 32)
        regs_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256          # allocated in units of 256
        warps_by_regs = gpu["partitions"] * (gpu["regs_per_partition"] // regs_per_warp)
        blocks = min(warps_by_regs // warps_per_block, gpu["warps"] // warps_per_block, gpu["blocks"])
        smem = self.shared + dynamic_shared + RESERVED_SMEM_PER_BLOCK
        blocks = min(blocks, gpu["smem"] // smem)
        return blocks * warps_per_block / gpu["warps"]


@dataclass
class CompileResult:
    source: str
    archs: Sequence[int]
    ok: bool
    seconds: float
    command: List[str]
    output: str                       # nvcc's stderr + stdout (ptxas -v lines, warnings, errors)
    kernels: List[KernelUsage] = field(default_factory=list)


_MANGLED = re.compile(r"_ZN8fastdiff4cuda(\d+)(\w+)")


def pretty_kernel(mangled: str) -> str:
    """fused_step_kernel<2, true> from _ZN8fastdiff4cuda17fused_step_kernelILi2ELb1EE..."""
    m = _MANGLED.match(mangled)
    if not m:
        return mangled
    n = int(m.group(1))
    name, rest = m.group(2)[:n], m.group(2)[n:]
    if rest.startswith("I"):
        args = re.findall(r"L([ib])(n?\d+)E", rest.split("EEv", 1)[0] + "E")
        vals = [("-" + v[1:] if v.startswith("n") else v) if t == "i" else ("true" if v == "1" else "false")
                for t, v in args]
        name += "<" + ", ".join(vals) + ">"
    return name


def parse_ptxas(output: str, threads: Dict[str, int]) -> List[KernelUsage]:
    """KernelUsage per 'Compiling entry function' block of nvcc -Xptxas -v output."""
    usages, cur, frame = [], None, (0, 0, 0)
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur, frame = (m.group(1), int(m.group(2))), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            frame = tuple(int(v) for v in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            smem = re.search(r"(\d+) bytes smem", line)
            name = pretty_kernel(cur[0])
            base = name.split("<", 1)[0]
            usages.append(KernelUsage(name, cur[1], int(m.group(1)), frame[0], frame[1], frame[2],
                                      int(smem.group(1)) if smem else 0, threads.get(base, threads[""])))
            cur = None
    return usages


def compile_source(source: str, archs: Sequence[int] = ARCHS, out_dir: Optional[str] = None,
                   nvcc: Optional[str] = None) -> CompileResult:
    """nvcc -c for every arch at once (one -gencode each), warnings as errors, ptxas -v."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out_dir = out_dir or tempfile.mkdtemp(prefix="fastdiff_nvcc_")
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    obj = os.path.join(out_dir, Path(source).stem + "_" + "_".join(map(str, archs)) + ".o")
    cmd = [nvcc, *nvcc_flags(), *WERROR_FLAGS, "-Xptxas", "-v", *gencode, "-c", str(CUDA_DIR / source), "-o", obj]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = r.stderr + r.stdout
    return CompileResult(source, tuple(archs), r.returncode == 0, time.perf_counter() - t0, cmd, out,
                         parse_ptxas(out, launch_threads()) if r.returncode == 0 else [])


def compile_sources(archs: Sequence[int] = ARCHS, out_dir: Optional[str] = None, jobs: Optional[int] = None,
                    sources: Sequence[str] = SOURCES) -> List[CompileResult]:
    """Every source, in parallel (MAX_JOBS or the core count; nvcc is mostly single-threaded)."""
    jobs = jobs or int(os.environ.get("MAX_JOBS", 0)) or os.cpu_count() or 1
    out_dir = out_dir or tempfile.mkdtemp(prefix="fastdiff_nvcc_")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: compile_source(s, archs, out_dir), sources))


def check_binding(out_dir: Optional[str] = None) -> CompileResult:
    """g++ -fsyntax-only of csrc/cuda/torch_binding.cpp against this torch's headers, as torch's build
    compiles it (C++20, warnings as errors here). A CPU build of torch ships the c10/cuda headers but
    not the generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stub stands in for it. Nothing is
    linked: a CUDA torch is needed for that (setup.py, FASTDIFF_CUDA=1)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    inc = cuda_include_dir()
    if cxx is None or inc is None:
        raise FileNotFoundError("needs g++ and the CUDA headers")
    out_dir = out_dir or tempfile.mkdtemp(prefix="fastdiff_binding_")
    system = list(include_paths()) + [sysconfig.get_paths()["include"], inc]
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in system):
        stub = Path(out_dir) / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        system.append(str(Path(out_dir) / "stub"))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f for p in system for f in ("-isystem", p)],
           str(CUDA_DIR / "torch_binding.cpp")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return CompileResult("torch_binding.cpp", (), r.returncode == 0, time.perf_counter() - t0, cmd,
                         r.stderr + r.stdout)


def render(results: List[CompileResult], nvcc_version: str) -> str:
    lines = [
        "# CUDA kernels: compiled for sm_80 / sm_90 (no GPU; generated)",
        "",
        f"Generated by `python -m benchmarks.cuda_report` with {nvcc_version}. Flags: "
        f"`{' '.join(nvcc_flags())}` plus `{' '.join(WERROR_FLAGS)}` (warnings are errors). Registers, "
        "stack and spills from `ptxas -v`; occupancy = theoretical resident warps / 64 on "
        + " / ".join(f"{g['name']} (sm_{a})" for a, g in GPUS.items())
        + " from registers, shared memory and block limits — on paper, not measured.",
        "",
        "| kernel | source | arch | threads/block | registers | stack (B) | spills st/ld (B) | static smem (B) | occupancy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for k in sorted(r.kernels, key=lambda k: (k.kernel, k.arch)):
            # fused_step's row of coefficients is dynamic shared memory: 4 * (2K + 12) bytes, tiny.
            lines.append(f"| `{k.kernel}` | {r.source} | sm_{k.arch} | {k.threads} | {k.registers} | {k.stack} | "
                         f"{k.spill_stores}/{k.spill_loads} | {k.shared} | {k.occupancy():.0%} |")
    lines += ["", "Compile times (both archs per nvcc call): "
              + ", ".join(f"{r.source} {r.seconds:.0f} s" for r in results), ""]
    lines += ["`fused_step_kernel<K, VEC>`: K = history slots fixed at compile time (-1: any K, a loop), "
              "VEC = 4-wide vector loads/stores (16 B of float32, 8 B of float16/bfloat16; float64 operands take the "
              "scalar path), all of a thread's loads issued before the first use. Dtypes are run-time "
              "arguments of every variant.", ""]
    return "\n".join(lines)


# On-paper bandwidth check (Little's law), labelled as such in the report. Peak DRAM bandwidth
# from the data sheets; the latency is an assumption (typical loaded DRAM latency), not measured.
PAPER_GPUS = {80: dict(name="A100-SXM4-80GB", bandwidth=2.039e12, sms=108, latency=600e-9),
              90: dict(name="H100-SXM5", bandwidth=3.35e12, sms=132, latency=700e-9)}
# The fused step of CFG + DPM-Solver++(2M) with a float16 model: K = 2, 4-wide vectors. Bytes one
# thread (4 elements) loads before its first dependent use: x 16, cond 8, uncond 8, 2 history slots
# 32; the row moves 28 B per element in all (x r/w 8, cond/uncond 4, history r 8 / w 4, model_in 2x2).
PAPER_KERNEL, PAPER_LOAD_BYTES_PER_THREAD, PAPER_BYTES_PER_ELEMENT = "fused_step_kernel<2, true>", 64, 28


def render_on_paper(results: List[CompileResult]) -> str:
    lines = ["## On paper: can the fused step saturate DRAM?", "",
             f"`{PAPER_KERNEL}` (CFG + DPM-Solver++(2M), float16 model, 4-wide vectors; "
             f"{PAPER_BYTES_PER_ELEMENT} B moved per element). Little's law: an SM needs bandwidth x latency / SMs "
             "bytes of loads in flight to keep DRAM busy; the kernel has resident threads x "
             f"{PAPER_LOAD_BYTES_PER_THREAD} B (each thread issues its loads before using them). Peak bandwidth from "
             "the data sheet, latency assumed; nothing measured.", "",
             "| GPU | registers | occupancy | in flight per SM | needed per SM | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arch, gpu in PAPER_GPUS.items():
        k = next((k for r in results for k in r.kernels if k.kernel == PAPER_KERNEL and k.arch == arch), None)
        if k is None:
            continue
        occ = k.occupancy()
        have = occ * GPUS[arch]["warps"] * 32 * PAPER_LOAD_BYTES_PER_THREAD
        need = gpu["bandwidth"] * gpu["latency"] / gpu["sms"]
        lines.append(f"| {gpu['name']} (sm_{arch}, {gpu['bandwidth'] / 1e12:.2f} TB/s, {gpu['latency'] * 1e9:.0f} ns "
                     f"assumed) | {k.registers} | {occ:.1%} | {have / 1024:.1f} KiB | {need / 1024:.1f} KiB | "
                     f"{have / need:.1f}x |")
    lines += ["", "A ratio above 1 means occupancy does not limit the step: it is DRAM-bound and should run at "
              "the fraction of peak a streaming copy reaches on that GPU (typically ~85-92%); unmeasured here.", ""]
    return "\n".join(lines)


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return f"nvcc {m.group(2)}" if m else "nvcc"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_compile_report.md"))
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    args = p.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    results = compile_sources(args.arch)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"{r.source}: compile failed\n{' '.join(r.command)}\n{r.output}", file=sys.stderr)
    if failed:
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render(results, nvcc_version(nvcc)) + "\n" + render_on_paper(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
