"""Compile every Triton kernel variant to sm_80 and sm_90 cubins without a GPU, and report the
registers, spills and shared memory the compiler assigned (the on-paper occupancy review).

    python -m fastdiff.kernels.report [--out benchmarks/results/triton_compile_report.md] [--arch 80 90]

``VARIANTS`` is the list the compile test (tests/test_triton_compile.py) checks as well: one
place names the dtype/flag combinations that must build. Registers and spills come from
``cuobjdump -res-usage`` (shipped with triton); shared memory is what Triton's launch requests.
Pointer arguments are compiled as 16-byte aligned, as torch allocations are (Triton's JIT makes
the same assumption when it sees them), so the code matches what a GPU run would compile.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ARCHS = (80, 90)
# Per-SM limits for the theoretical occupancy column: registers, shared memory (bytes), warps.
SM_LIMITS = {80: dict(regs=65536, smem=164 * 1024, warps=64, blocks=32),
             90: dict(regs=65536, smem=228 * 1024, warps=64, blocks=32)}
MAX_SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass
class Variant:
    """One compiled specialization of a kernel: argument types, constexprs, launch options."""

    name: str
    kernel: str                       # "module.function" under fastdiff.kernels
    types: Dict[str, str]             # pointer and non-int32 scalar argument types
    constexprs: Dict[str, object]
    options: Dict[str, object] = field(default_factory=dict)

    def resolve(self):
        import importlib
        module, fn = self.kernel.rsplit(".", 1)
        return getattr(importlib.import_module(f"fastdiff.kernels.{module}"), fn)


def _fused_step_variant(model: str, kind: str) -> Variant:
    from fastdiff.program.layout import FLAG_EVAL_Y, FLAG_MODEL_IN_FROM_Y, FLAG_WRITE_X, FLAG_WRITE_Y
    from .fused_step import BLOCK, NUM_WARPS, NOISE_PHILOX, NOISE_TENSOR, layout_constexprs
    from ._common import EXACT_FP
    types = {"table_ptr": "*fp64", "x_ptr": "*fp32", "y_ptr": "*fp32", "cond_ptr": _DT[model],
             "uncond_ptr": _DT[model], "hist_ptr": "*fp32", "noise_ptr": "*fp32", "model_in_ptr": _DT[model],
             "bad_row_ptr": "*i32", "guidance_ptr": "*fp32"}
    if kind == "full":   # DPM-Solver++(2M) + CFG as the sampler runs it: history, Philox, both CFG halves of model_in
        flags = dict(K=2, FLAGS=FLAG_WRITE_X, HIST_WRITES=0b1, HAS_COND=True, HAS_UNCOND=True,
                     NOISE=NOISE_PHILOX, MODEL_IN_HALVES=2,
                     CHECK_FINITE=True, HAS_GUIDANCE=True, STRIDED=False, INDEX_64=False)
        name = f"fused_step {model}: CFG, K=2, Philox, model_in x2, bad_row"
    elif kind == "slots":   # every history slot written in one pass (each read by the outputs too), x and y
        flags = dict(K=3, FLAGS=FLAG_WRITE_X | FLAG_WRITE_Y, HIST_WRITES=0b111, HAS_COND=True, HAS_UNCOND=True,
                     NOISE=NOISE_PHILOX, MODEL_IN_HALVES=2, CHECK_FINITE=True, HAS_GUIDANCE=False, STRIDED=False,
                     INDEX_64=False)
        name = f"fused_step {model}: CFG, K=3, all 3 slots written, x and y, Philox"
    else:      # a multi-stage row on strided tensors: y in and out, a noise tensor
        flags = dict(K=1, FLAGS=FLAG_EVAL_Y | FLAG_WRITE_X | FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y, HAS_COND=True,
                     HIST_WRITES=0, HAS_UNCOND=False, NOISE=NOISE_TENSOR, MODEL_IN_HALVES=1,
                     CHECK_FINITE=False, HAS_GUIDANCE=False, STRIDED=True, INDEX_64=True)
        name = f"fused_step {model}: y, noise tensor, strided, 64-bit index"
        types["numel"] = "i64"
    # table_sc=1: a contiguous table, which Triton's JIT specializes to a constant as it does every 1.
    return Variant(name, "fused_step.fused_step_kernel", types,
                   dict(flags, table_sc=1, BLOCK=BLOCK, **layout_constexprs(flags["K"])),
                   dict(num_warps=NUM_WARPS, **EXACT_FP))


def _cfg_variant(dtype: str) -> Variant:
    from .cfg import BLOCK, NUM_WARPS
    from ._common import EXACT_FP
    return Variant(f"cfg_combine {dtype}", "cfg.cfg_combine_kernel",
                   {"cond_ptr": _DT[dtype], "uncond_ptr": _DT[dtype], "out_ptr": _DT[dtype], "g": "fp32"},
                   dict(HAS_UNCOND=True, STRIDED=False, INDEX_64=False, BLOCK=BLOCK),
                   dict(num_warps=NUM_WARPS, **EXACT_FP))


def _philox_variants() -> List[Variant]:
    from .philox import BLOCK_GROUPS
    from ._common import EXACT_FP
    return [Variant("philox_normal fp32", "philox.philox_normal_kernel", {"out_ptr": "*fp32"},
                    dict(BLOCK_GROUPS=BLOCK_GROUPS, INDEX_64=False), dict(num_warps=4, **EXACT_FP)),
            Variant("philox_uint32", "philox.philox_uint32_kernel",
                    {"out_ptr": "*i64", "num_groups": "i64", "first_group": "i64"},
                    dict(BLOCK_GROUPS=BLOCK_GROUPS), dict(num_warps=4, **EXACT_FP))]


def _reduction_variants() -> List[Variant]:
    from .reductions import BLOCK, NUM_WARPS
    from ._common import EXACT_FP
    opts = dict(num_warps=NUM_WARPS, **EXACT_FP)
    return [
        Variant("cfg_rescale moments fp16", "reductions.cfg_moments_kernel",
                {"c_ptr": "*fp16", "u_ptr": "*fp16", "part_ptr": "*fp32", "g": "fp32"}, dict(BLOCK=BLOCK), opts),
        Variant("cfg_rescale apply fp16", "reductions.cfg_scale_kernel",
                {"c_ptr": "*fp16", "u_ptr": "*fp16", "factor_ptr": "*fp32", "out_ptr": "*fp32", "g": "fp32"},
                dict(HAS_FACTOR=True, BLOCK=BLOCK), opts),
        Variant("error_norm partial sums fp32", "reductions.sum_squares_kernel",
                {"a_ptr": "*fp32", "b_ptr": "*fp32", "ref_ptr": "*fp32", "part_ptr": "*fp32", "rtol": "fp32",
                 "atol": "fp32"}, dict(SCALED_DIFF=True, BLOCK=BLOCK), opts),
        Variant("quantile radix histogram fp32", "reductions.abs_digit_histogram_kernel",
                {"x_ptr": "*fp32", "prefix_ptr": "*i32", "hist_ptr": "*i32"},
                dict(SHIFT=16, RANKS=2, BLOCK=BLOCK), opts),
        Variant("dynamic_threshold apply fp32", "reductions.clamp_divide_kernel",
                {"x_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32"}, dict(BLOCK=BLOCK), opts),
    ]


def _attention_variant(dtype: str, head_dim: int, *, joint: bool = False, bias: bool = False) -> Variant:
    import torch
    from .attention import launch_config, padded_head_dim
    cfg = launch_config(head_dim, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype], joint)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
    types = {n: _DT[dtype] for n in ("q_ptr", "k1_ptr", "v1_ptr", "k2_ptr", "v2_ptr", "out_ptr")}
    types.update(bias_ptr="*fp32", qk_scale="fp32")
    name = f"attention {dtype} D={head_dim}" + (" joint" if joint else "") + (" +bias" if bias else "")
    return Variant(name, "attention.attention_fwd_kernel", types,
                   dict(HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), HAS_BIAS=bias, JOINT=joint,
                        DOT_FP32=dtype == "fp32", PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg), opts)


def variants() -> List[Variant]:
    out = [_fused_step_variant(m, "full") for m in ("fp32", "fp16", "bf16")]
    out.append(_fused_step_variant("fp32", "strided"))
    out.append(_fused_step_variant("fp16", "slots"))
    out += [_cfg_variant(d) for d in ("fp32", "fp16", "bf16")]
    out += _philox_variants()
    out += _reduction_variants()
    out += [_attention_variant("fp16", d) for d in (40, 64, 72, 80, 96, 128)]
    out += [_attention_variant(dt, d) for dt in ("bf16", "fp32") for d in (64, 128)]
    out.append(_attention_variant("fp32", 72, joint=True, bias=True))
    out += [_attention_variant("fp16", d, joint=True, bias=True) for d in (64, 128)]
    return out


# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    variant: Variant
    arch: int
    seconds: float
    cubin_bytes: int
    shared: int                       # bytes of shared memory the launch requests
    num_warps: int
    num_stages: int
    registers: Optional[int] = None   # per thread, from cuobjdump
    spill_bytes: Optional[int] = None  # local memory per thread (spills + stack frame), from cuobjdump

    def occupancy(self) -> Optional[float]:
        """Theoretical warps resident per SM / maximum (registers, shared memory, block limits)."""
        if self.registers is None:
            return None
        lim = SM_LIMITS[self.arch]
        regs_per_block = ((self.registers + 7) // 8 * 8) * 32 * self.num_warps
        blocks = min(lim["regs"] // regs_per_block, lim["blocks"], lim["warps"] // self.num_warps)
        if self.shared:
            blocks = min(blocks, lim["smem"] // (self.shared + 1024))   # 1 KB per block reserved by the driver
        return blocks * self.num_warps / lim["warps"]


def _signature(kernel, v: Variant):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = v.types.get(name, "i32")
            if sig[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def cuobjdump() -> Optional[str]:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG / LOCAL / SHARED per function from ``cuobjdump -res-usage`` ({} if it is missing)."""
    tool = cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(n) for k, n in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text)}


def compile_variant(v: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = v.resolve()
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("the kernels were built by the interpreter (TRITON_INTERPRET=1); compile in a process "
                           "started without it")
    sig, attrs = _signature(kernel, v)
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=dict(v.constexprs), attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    seconds = time.perf_counter() - t0
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    md = compiled.metadata
    spills = usage.get("LOCAL", 0) + usage.get("STACK", 0) if usage else None
    return Result(v, arch, seconds, len(cubin), md.shared, md.num_warps, md.num_stages, usage.get("REG"), spills)


def markdown(results: List[Result]) -> str:
    import triton
    lines = [
        "# Triton kernels: compiled for sm_80 / sm_90 (no GPU; generated)",
        "",
        f"Generated by `python -m fastdiff.kernels.report` with triton {triton.__version__}. Registers and "
        "local memory (spills + stack frame) per thread from `cuobjdump -res-usage`; shared memory = bytes the "
        "launch requests; occupancy = "
        "theoretical resident warps / 64 from registers, shared memory and block limits (on paper, not measured).",
        "",
        "| kernel variant | arch | warps | stages | registers | local mem (B) | shared (B) | occupancy | cubin (KB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        occ = r.occupancy()
        lines.append(f"| {r.variant.name} | sm_{r.arch} | {r.num_warps} | {r.num_stages} | "
                     f"{'n/a' if r.registers is None else r.registers} | "
                     f"{'n/a' if r.spill_bytes is None else r.spill_bytes} | {r.shared} | "
                     f"{'n/a' if occ is None else f'{occ:.0%}'} | {r.cubin_bytes / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "triton_compile_report.md"))
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SM_LIMITS))
    args = p.parse_args(argv)
    results = []
    for v in variants():
        for arch in args.arch:
            r = compile_variant(v, arch)
            results.append(r)
            print(f"{v.name:55s} sm_{arch}  regs {r.registers}  spills {r.spill_bytes}  shared {r.shared}  "
                  f"{r.seconds:.1f}s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
