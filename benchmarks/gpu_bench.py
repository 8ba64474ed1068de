"""GPU benchmark mode: the fused CFG + DPM-Solver++(2M) step and attention on a CUDA device.

    python -m benchmarks.gpu_bench                  # measure (needs a CUDA GPU), write
                                                    #   benchmarks/results/gpu_bench_<gpu>.{md,json}
    python -m benchmarks.gpu_bench --quick          # tiny / SD-1.5 / SDXL shapes only
    python -m benchmarks.gpu_bench --roofline       # the on-paper H100 roofline (runs anywhere)

UNMEASURED HERE: the machines this project is built on have no GPU. Without one, the measuring
mode prints why and exits with status 2 (nothing measured); ``--roofline`` needs no GPU.

Step table, per shape and model dtype (the same state and step as benchmarks/baselines.py):
fastdiff's triton backend (and its cuda backend when built), eager PyTorch, torch.compile and
diffusers' CFG + ``DPMSolverMultistepScheduler.step``. Columns: median time (CUDA events,
``triton.testing.do_bench``), the bytes the step must move (benchmarks.step_bench.bytes_moved),
GB/s, % of the card's peak bandwidth and % of the copy bandwidth measured in the same run.

Attention table, per diffusion-model shape: fastdiff's triton kernel, torch SDPA and the eager
matmul-softmax, in TFLOP/s (4 B H Nq Nkv D flops per forward).

Roofline (``--roofline``): bytes per latent element of the fused step vs what diffusers' eager
CFG + scheduler step moves, counted op by op with a TorchDispatchMode on the CPU (every non-view
aten op: the bytes of its tensor inputs and outputs; 0-d scalars excluded), and the time those
bytes take at H100 SXM's 3.35 TB/s. On paper, not measured.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import baselines as bl
from .step_bench import SHAPE_TITLES, SHAPES, QUICK_SHAPES, bytes_moved

RESULTS = Path(__file__).resolve().parent / "results"
H100_SXM_TBPS = 3.35

# Peak DRAM bandwidth (TB/s) by device-name substring, from the vendors' data sheets; used when
# torch does not report the memory clock and bus width. Override with --peak-tbps.
PEAK_TBPS = {"H100 SXM": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "GH200": 4.0,
             "A100-SXM4-80GB": 2.039, "A100 80GB PCIe": 1.935, "A100": 1.555, "L40S": 0.864, "L40": 0.864,
             "L4": 0.3, "A10G": 0.6, "A10": 0.6, "RTX 4090": 1.008, "RTX 3090": 0.936, "V100": 0.9, "T4": 0.32}


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    head_dim: int
    joint_tokens: int = 0          # second key/value source (text tokens of MMDiT / Flux)


ATTENTION_SHAPES = (
    AttentionShape("SD-1.5 self 64x64 (CFG batch)", 2, 8, 4096, 4096, 40),
    AttentionShape("SD-1.5 cross, 77 text tokens", 2, 8, 4096, 77, 40),
    AttentionShape("SDXL self 64x64", 2, 10, 4096, 4096, 64),
    AttentionShape("SDXL cross, 77 text tokens", 2, 10, 4096, 77, 64),
    AttentionShape("DiT-XL/2 256x256", 2, 16, 256, 256, 72),
    AttentionShape("PixArt cross, 300 T5 tokens", 2, 16, 4096, 300, 72),
    AttentionShape("Flux joint 1024px: image over [image; text]", 1, 24, 4096, 4096, 128, joint_tokens=512),
)


# ---------------------------------------------------------------------------------------------
# On-paper roofline (no GPU)

def count_eager_traffic(fn: Callable[[], object]) -> Tuple[int, int]:
    """(bytes, kernels): what the aten ops ``fn`` dispatches read and write (non-view ops only,
    tensors with more than one element), and how many such ops (each one kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    totals = [0, 0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.numel() > 1]
                if tensors:
                    totals[0] += sum(t.numel() * t.element_size() for t in tensors)
                    totals[1] += 1
            return out

    with Count():
        fn()
    return totals[0], totals[1]


def diffusers_pipeline_step(shape, model_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """What a diffusers Stable Diffusion pipeline runs per denoising step besides the UNet, with
    latents in the model dtype as the pipeline keeps them: the CFG batch ``torch.cat([latents] * 2)``,
    ``scale_model_input``, the CFG combine, ``scheduler.step`` (second-order DPM-Solver++)."""
    p = bl.make_problem(shape, model_dtype)
    s = p.scheduler
    latents = p.x.to(model_dtype)
    saved = [m.to(model_dtype) if m is not None else None for m in s.model_outputs]
    t = s.timesteps[p.step_index]

    def step():
        s._step_index = p.step_index
        s.model_outputs[:] = saved
        model_in = s.scale_model_input(torch.cat([latents] * 2), t)   # the UNet would read this
        uncond, cond = p.model_out.chunk(2)                             # the UNet's output
        eps = uncond + p.scalars.guidance * (cond - uncond)
        return model_in, s.step(eps, t, latents).prev_sample
    return step


def roofline_rows(shapes: Sequence[str] = ("sd15", "sdxl", "video")) -> List[dict]:
    rows = []
    per_element = {}
    for dtype in (torch.float16, torch.float32):
        probe = SHAPES["tiny"]
        nbytes, launches = count_eager_traffic(diffusers_pipeline_step(probe, dtype))
        per_element[dtype] = (nbytes / math.prod(probe), launches)
    for key in shapes:
        numel = math.prod(SHAPES[key])
        for dtype in (torch.float16, torch.float32):
            fused = bytes_moved(numel, dtype, model_input=True)
            eager_b = per_element[dtype][0] * numel
            rows.append(dict(shape=key, title=SHAPE_TITLES[key], dims=SHAPES[key], numel=numel,
                             model_dtype=str(dtype).replace("torch.", ""),
                             fused_bytes_per_element=fused / numel, fused_bytes=fused, fused_launches=1,
                             diffusers_bytes_per_element=per_element[dtype][0], diffusers_bytes=eager_b,
                             diffusers_launches=per_element[dtype][1],
                             fused_us=fused / (H100_SXM_TBPS * 1e12) * 1e6,
                             diffusers_us=eager_b / (H100_SXM_TBPS * 1e12) * 1e6))
    return rows


def roofline_markdown(rows: List[dict]) -> str:
    lines = [f"On paper, not measured: H100 SXM at {H100_SXM_TBPS} TB/s, bandwidth-bound time = bytes / peak "
             "(launch overhead, ~2-5 µs per kernel, not included). fastdiff: one fused kernel per step, fp32 "
             "state, writes the next model input (both CFG halves). diffusers: the pipeline's per-step eager ops "
             "besides the UNet (latents in the model dtype), bytes counted op by op on the CPU.",
             "",
             "| shape | model dtype | fused B/elem | diffusers B/elem | fused bytes | diffusers bytes | "
             "fused µs @3.35 TB/s | diffusers µs @3.35 TB/s | kernels fused / diffusers |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['title']} {'x'.join(map(str, r['dims']))} | {r['model_dtype']} | "
                     f"{r['fused_bytes_per_element']:.0f} | {r['diffusers_bytes_per_element']:.0f} | "
                     f"{_mb(r['fused_bytes'])} | {_mb(r['diffusers_bytes'])} | {r['fused_us']:.2f} | "
                     f"{r['diffusers_us']:.2f} | {r['fused_launches']} / {r['diffusers_launches']} |")
    return "\n".join(lines) + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------
# Measured mode (CUDA)

def no_gpu_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False). This benchmark is ready to run on a GPU "
                "machine and has NOT been measured here; `--roofline` prints the on-paper numbers instead.")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); pip install triton"
    return None


def peak_tbps(override: Optional[float]) -> Tuple[float, str]:
    if override:
        return override, "--peak-tbps"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e12, "memory clock x bus width (DDR)"
    for key, tbps in PEAK_TBPS.items():
        if key in props.name:
            return tbps, f"data sheet ({key})"
    raise SystemExit(f"unknown GPU {props.name!r}: pass --peak-tbps")


def bench(fn: Callable[[], object]) -> float:
    """Median seconds per call, CUDA events, L2 flushed between calls (triton.testing.do_bench)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def copy_tbps() -> float:
    n = 512 * 2 ** 20 // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n * 4 / bench(lambda: dst.copy_(src)) / 1e12


def _problem_on(device, shape, dtype) -> bl.StepProblem:
    import dataclasses
    p = bl.make_problem(shape, dtype)
    s = p.scheduler
    s.model_outputs[:] = [m.to(device) if m is not None else None for m in s.model_outputs]
    return dataclasses.replace(p, x=p.x.to(device), x0_prev=p.x0_prev.to(device),
                               model_out=p.model_out.to(device), table=p.table.to(device))


def step_rows(shapes: Sequence[str], peak: float, copy: float, log, *, device="cuda", timer=None,
              with_compile: bool = True) -> List[dict]:
    """The step table (``timer``, default ``bench``; ``device`` other than cuda only for smoke tests)."""
    import fastdiff.ops.triton_backend  # noqa: F401  (registers the backend)
    from fastdiff.ops.backends import BACKENDS
    timer = timer or bench
    rows = []
    for key in shapes:
        for dtype in (torch.float32, torch.float16):
            p = _problem_on(device, SHAPES[key], dtype)
            impls: Dict[str, Callable[[], object]] = {}
            for backend in ("triton", "cuda"):
                if backend in BACKENDS and BACKENDS[backend].unavailable_reason() is None:
                    step = bl.FastdiffStep(p, backend, model_input=True)
                    step.bad_row = torch.zeros(1, dtype=torch.int32, device=device)
                    impls[f"fastdiff {backend} fused step + model input"] = step
            impls["eager PyTorch"] = lambda: bl.eager_step(p.x, p.model_out, p.x0_prev, p.scalars)
            if with_compile:
                torch._dynamo.reset()
                compiled = bl.compiled_step(False)
                compiled(p.x, p.model_out, p.x0_prev, bl.step_scalars(p.scheduler, p.step_index - 1))
                compiled(p.x, p.model_out, p.x0_prev, p.scalars)          # the recompile a loop pays once
                impls["torch.compile"] = lambda: compiled(p.x, p.model_out, p.x0_prev, p.scalars)
            diffusers = bl.DiffusersStep(p)
            impls["diffusers CFG + DPMSolverMultistepScheduler.step"] = lambda: diffusers(p.model_out, p.x)
            for label, fn in impls.items():
                seconds = timer(fn)
                nbytes = bytes_moved(math.prod(SHAPES[key]), dtype, model_input=label.startswith("fastdiff"))
                gbps = nbytes / seconds / 1e9
                rows.append(dict(shape=key, model_dtype=str(dtype).replace("torch.", ""), impl=label,
                                 median_us=seconds * 1e6, bytes=nbytes, gbps=gbps, pct_peak=gbps / (peak * 1e3),
                                 pct_copy=gbps / (copy * 1e3)))
                log(f"  {key:6s} {rows[-1]['model_dtype']:8s} {label:50s} {seconds * 1e6:9.1f} µs {gbps:8.1f} GB/s")
    return rows


def attention_rows(shapes: Sequence[AttentionShape], log, *, device="cuda", timer=None) -> List[dict]:
    from fastdiff.attention import attention, joint_attention
    timer = timer or bench
    rows = []
    for a in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            def make(n):
                return torch.randn(a.batch, a.heads, n, a.head_dim, device=device, dtype=dtype)
            q, k, v = make(a.q_tokens), make(a.kv_tokens), make(a.kv_tokens)
            n_kv = a.kv_tokens + a.joint_tokens
            flops = 4 * a.batch * a.heads * a.q_tokens * n_kv * a.head_dim
            if a.joint_tokens:
                k2, v2 = make(a.joint_tokens), make(a.joint_tokens)
                fns = {b: (lambda b=b: joint_attention(q, k, v, k2, v2, backend=b)) for b in ("triton", "sdpa")}
            else:
                fns = {b: (lambda b=b: attention(q, k, v, backend=b)) for b in ("triton", "sdpa")}
            fns["eager matmul-softmax"] = lambda: torch.softmax(
                (q @ torch.cat([k] + ([k2] if a.joint_tokens else []), 2).transpose(-1, -2)) / math.sqrt(a.head_dim),
                -1) @ torch.cat([v] + ([v2] if a.joint_tokens else []), 2)
            for label, fn in fns.items():
                seconds = timer(fn)
                rows.append(dict(shape=a.name, dtype=str(dtype).replace("torch.", ""), impl=label,
                                 median_us=seconds * 1e6, tflops=flops / seconds / 1e12))
                log(f"  {a.name:45s} {rows[-1]['dtype']:8s} {label:22s} {seconds * 1e6:9.1f} µs "
                    f"{rows[-1]['tflops']:7.1f} TFLOP/s")
    return rows


def measured_markdown(device: str, peak: float, peak_source: str, copy: float, steps: List[dict],
                      attn: List[dict]) -> str:
    lines = [f"# fastdiff on {device}", "",
             f"Peak bandwidth {peak:.2f} TB/s ({peak_source}); copy bandwidth measured in this run "
             f"{copy:.2f} TB/s. Times: medians over CUDA-event timed calls with L2 flushed (triton.testing.do_bench).",
             "", "## CFG + DPM-Solver++(2M) step", "",
             "| shape | model dtype | implementation | median µs | bytes moved | GB/s | % of peak | % of copy |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in steps:
        lines.append(f"| {SHAPE_TITLES[r['shape']]} | {r['model_dtype']} | {r['impl']} | {r['median_us']:.1f} | "
                     f"{_mb(r['bytes'])} | {r['gbps']:.0f} | {r['pct_peak']:.0%} | {r['pct_copy']:.0%} |")
    lines += ["", "## Attention (forward)", "", "| shape | dtype | implementation | median µs | TFLOP/s |",
              "| --- | --- | --- | ---: | ---: |"]
    for r in attn:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['median_us']:.1f} | {r['tflops']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roofline", action="store_true", help="print the on-paper H100 roofline (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="step shapes tiny, SD-1.5, SDXL only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (each compiles ~20 s)")
    ap.add_argument("--peak-tbps", type=float, default=None, help="the card's peak DRAM bandwidth in TB/s")
    ap.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/gpu_bench_<gpu>)")
    args = ap.parse_args(argv)

    if args.roofline:
        print(roofline_markdown(roofline_rows()))
        return 0
    why = no_gpu_reason()
    if why:
        print(f"benchmarks.gpu_bench: {why}", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, flush=True)

    device = torch.cuda.get_device_name(0)
    peak, source = peak_tbps(args.peak_tbps)
    copy = copy_tbps()
    log(f"{device}: peak {peak:.2f} TB/s ({source}), copy {copy:.2f} TB/s")
    steps = step_rows(QUICK_SHAPES if args.quick else tuple(SHAPES), peak, copy, log, with_compile=not args.no_compile)
    attn = attention_rows(ATTENTION_SHAPES, log)
    stem = args.out or RESULTS / ("gpu_bench_" + "".join(c if c.isalnum() else "_" for c in device))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(measured_markdown(device, peak, source, copy, steps, attn))
    stem.with_suffix(".json").write_text(json.dumps(dict(device=device, peak_tbps=peak, peak_source=source,
                                                         copy_tbps=copy, step=steps, attention=attn), indent=1))
    log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
