"""The fused CFG + DPM-Solver++(2M) step: fastdiff vs eager PyTorch, torch.compile and diffusers.

    python -m benchmarks.step_bench                    # full table, JSON in benchmarks/results/
    python -m benchmarks.step_bench --quick            # CI-sized (tiny, SD-1.5, SDXL shapes)
    python -m benchmarks.step_bench --compare BASE.json [--threshold 10]   # flag regressions

For each shape and thread count: median time per step (and IQR), the bytes the step must move,
GB/s, and that as a percentage of the out-of-cache copy bandwidth measured right before the
shape's rows (same process, same thread count). All rows compute the same step from the same
state (see benchmarks/baselines.py); the model output is one [2B] tensor of both CFG halves.

Bytes the step must move (per element, fp32 state, model dtype of m bytes): read x, both
model-output halves and the history slot, write x and the history slot: 16 + 2m; the
next-model-input epilogue also writes both halves of the model input: + 2m. The baselines do
the same math, so they are charged the same minimum (their temporaries are their own cost).

Regressions (--compare): a fastdiff row whose median is more than --threshold percent slower
than in BASE.json is a regression; the exit status is 1 if there is any. Baseline rows
(eager, torch.compile, diffusers) are printed for context (they show how noisy the machine was)
but never fail the comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import baselines as bl
from .timing import (BandwidthProbe, describe_machine, load_average, machine_info, measure_interleaved,
                     torch_threads)

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES: Dict[str, Tuple[int, ...]] = {
    "tiny": (1, 4, 8, 8),
    "sd15": (1, 4, 64, 64),
    "sdxl": (2, 4, 128, 128),
    "video": (1, 16, 32, 90, 160),
}
SHAPE_TITLES = {"tiny": "tiny", "sd15": "SD-1.5 latent", "sdxl": "SDXL batch 2", "video": "video latent"}
QUICK_SHAPES = ("tiny", "sd15", "sdxl")


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    model_dtype: torch.dtype = torch.float32
    model_input: bool = False          # also writes the next model input (both CFG halves)
    fastdiff: bool = True              # a fastdiff row (a regression here fails --compare)


F16, BF16 = torch.float16, torch.bfloat16
DTYPE_SUFFIX = {torch.float32: "", F16: "_fp16", BF16: "_bf16"}


def compile_key(inplace: bool, model_dtype: torch.dtype, model_input: bool) -> str:
    """The key of the torch.compile row with this epilogue and model dtype."""
    return ("compile_inplace" if inplace else "compile") + DTYPE_SUFFIX[model_dtype] + \
        ("_model_input" if model_input else "")


def _fastdiff_key(model_dtype: torch.dtype, model_input: bool) -> str:
    return "fastdiff_cpu" + DTYPE_SUFFIX[model_dtype] + ("_model_input" if model_input else "")


IMPLS: Tuple[Impl, ...] = (
    Impl("fastdiff_cpu", "fastdiff cpu fused step"),
    Impl("fastdiff_cpu_model_input", "fastdiff cpu fused step + next model input", model_input=True),
    Impl("fastdiff_cpu_fp16", "fastdiff cpu, fp16 model output", model_dtype=F16),
    Impl("fastdiff_cpu_fp16_model_input", "fastdiff cpu, fp16 model output + fp16 next model input",
         model_dtype=F16, model_input=True),
    Impl("fastdiff_cpu_bf16", "fastdiff cpu, bf16 model output", model_dtype=BF16),
    Impl("fastdiff_cpu_bf16_model_input", "fastdiff cpu, bf16 model output + bf16 next model input",
         model_dtype=BF16, model_input=True),
    Impl("fastdiff_public_op", "fastdiff.ops.fused_step (validated, dispatched)"),
    Impl("fastdiff_reference", "fastdiff reference backend"),
    Impl("eager", "eager PyTorch", fastdiff=False),
    Impl("compile", "torch.compile (allocating)", fastdiff=False),
    Impl("compile_model_input", "torch.compile + next model input (cat, allocating)", model_input=True,
         fastdiff=False),
    Impl("compile_fp16", "torch.compile (allocating), fp16 model output", model_dtype=F16, fastdiff=False),
    Impl("compile_bf16", "torch.compile (allocating), bf16 model output", model_dtype=BF16, fastdiff=False),
    # In place: the compiled function writes x, the history and the model input into preallocated
    # buffers, as fastdiff does (the fair baseline for an in-place fused step).
    Impl("compile_inplace", "torch.compile in place", fastdiff=False),
    Impl("compile_inplace_model_input", "torch.compile in place + next model input", model_input=True,
         fastdiff=False),
    Impl("compile_inplace_fp16", "torch.compile in place, fp16 model output", model_dtype=F16, fastdiff=False),
    Impl("compile_inplace_fp16_model_input", "torch.compile in place, fp16 model output + fp16 next model input",
         model_dtype=F16, model_input=True, fastdiff=False),
    Impl("compile_inplace_bf16", "torch.compile in place, bf16 model output", model_dtype=BF16, fastdiff=False),
    Impl("compile_inplace_bf16_model_input", "torch.compile in place, bf16 model output + bf16 next model input",
         model_dtype=BF16, model_input=True, fastdiff=False),
    Impl("diffusers", "diffusers CFG + DPMSolverMultistepScheduler.step", fastdiff=False),
)
IMPL_BY_KEY = {i.key: i for i in IMPLS}


def bytes_moved(numel: int, model_dtype: torch.dtype, model_input: bool) -> int:
    """Minimum bytes of one step (see the module docstring)."""
    m = torch.empty((), dtype=model_dtype).element_size()
    return numel * (16 + 2 * m + (2 * m if model_input else 0))


def step_callable(impl: Impl, problem: bl.StepProblem, log) -> Tuple[object, dict]:
    """A zero-argument callable running one step of ``impl``, and facts to record (compile times)."""
    p = bl.with_model_dtype(problem, impl.model_dtype)
    extra: dict = {}
    if impl.key.startswith("fastdiff_cpu"):
        return bl.FastdiffStep(p, "cpu", impl.model_input), extra
    if impl.key == "fastdiff_public_op":
        return bl.PublicOpStep(p, "cpu", impl.model_input), extra
    if impl.key == "fastdiff_reference":
        return bl.FastdiffStep(p, "reference", impl.model_input), extra
    if impl.key == "eager":
        return (lambda: bl.eager_step(p.x, p.model_out, p.x0_prev, p.scalars)), extra
    if impl.key.startswith("compile_inplace"):
        step = bl.CompiledInplaceStep(p, impl.model_input)
        extra["compile_s"], extra["recompile_s"] = step.compile_times()
        log(f"    {impl.key}: compiled in {extra['compile_s']:.1f} s, recompiled for new scalars in "
            f"{extra['recompile_s']:.1f} s")
        return step, extra
    if impl.key.startswith("compile"):
        # A sampling loop calls the compiled step with new scalars every step: the first call
        # compiles, the second (new scalars) recompiles once with the scalars as inputs; time
        # the kernel the loop then keeps using. (The caller resets dynamo when the thread
        # count changes: a reset here would send the other compiled variant back to compile.)
        fn = bl.compiled_step(impl.model_input)
        previous = bl.step_scalars(p.scheduler, p.step_index - 1, p.scalars.guidance)
        t0 = time.perf_counter()
        fn(p.x, p.model_out, p.x0_prev, previous)
        extra["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn(p.x, p.model_out, p.x0_prev, p.scalars)
        extra["recompile_s"] = time.perf_counter() - t0
        log(f"    {impl.key}: compiled in {extra['compile_s']:.1f} s, recompiled for new scalars in "
            f"{extra['recompile_s']:.1f} s")
        return (lambda: fn(p.x, p.model_out, p.x0_prev, p.scalars)), extra
    if impl.key == "diffusers":
        step = bl.DiffusersStep(p)
        return (lambda: step(p.model_out, p.x)), extra
    raise ValueError(f"unknown implementation {impl.key!r}")


def run(shapes: Sequence[str], threads: Sequence[int], impls: Sequence[Impl], *, min_samples: int,
        min_time: float, copy_mib: int, clock: str = "wall", log=lambda s: None) -> dict:
    """Measure every (shape, threads, impl); returns the report (what the JSON file holds).

    Per (shape, threads) block, the implementations and the two bandwidth probes are measured
    together, their samples interleaved (benchmarks.timing.measure_interleaved)."""
    info = machine_info()
    blocks, results = [], []
    for name in shapes:
        shape = SHAPES[name]
        numel = math.prod(shape)
        log(f"{name} {shape}: preparing the mid-run state")
        problem = bl.make_problem(shape)
        for nt in threads:
            with torch_threads(nt):
                torch._dynamo.reset()        # compile this block's functions afresh for nt threads
                probes = {k: BandwidthProbe(k, copy_mib) for k in BandwidthProbe.KINDS}
                fns, extras = {}, {}
                for impl in impls:
                    fns[impl.key], extras[impl.key] = step_callable(impl, problem, log)
                load = load_average()
                timings = measure_interleaved({**probes, **fns}, min_samples=min_samples, min_time=min_time,
                                              clock=clock)
                bw = {k: p.result(timings[k]) for k, p in probes.items()}
                del probes, fns
                log(f"  threads={nt}: copy {bw['copy']['gbps']:.1f} GB/s, in-place add "
                    f"{bw['inplace_add']['gbps']:.1f} GB/s (load {load[0]})")
                blocks.append({"shape_name": name, "threads": nt, "copy": bw["copy"], "inplace_add": bw["inplace_add"],
                               "load_average": load})
                for impl in impls:
                    t = timings[impl.key]
                    nbytes = bytes_moved(numel, impl.model_dtype, impl.model_input)
                    gbps = nbytes / t.median / 1e9
                    results.append({
                        "shape_name": name, "shape": list(shape), "numel": numel, "threads": nt, "impl": impl.key,
                        "label": impl.label, "model_dtype": str(impl.model_dtype).replace("torch.", ""),
                        "model_input": impl.model_input, "median_s": t.median, "iqr_s": t.iqr,
                        "samples": t.samples, "calls_per_sample": t.number, "bytes": nbytes, "gbps": gbps,
                        "pct_copy": 100.0 * gbps / bw["copy"]["gbps"],
                        "pct_inplace_add": 100.0 * gbps / bw["inplace_add"]["gbps"], **extras[impl.key]})
                    log(f"    {impl.key:32s} {t.median * 1e6:12.1f} us  (IQR {t.iqr * 1e6:.1f}, n={t.samples})")
        del problem
    info["load_average_end"] = load_average()
    report = {"machine": info, "settings": {"shapes": list(shapes), "threads": list(threads),
                                            "impls": [i.key for i in impls], "min_samples": min_samples,
                                            "min_time_s": min_time, "copy_mib": copy_mib, "clock": clock,
                                            "guidance": bl.GUIDANCE, "steps": bl.STEPS,
                                            "step_index": bl.MID_STEP},
              "blocks": blocks, "results": results}
    report["targets"] = evaluate_targets(report)
    return report


# ---------------------------------------------------------------------------------------------
# Reading a report: speedups, targets, markdown, comparison


def _index(report: dict) -> Dict[Tuple[str, int, str], dict]:
    return {(r["shape_name"], r["threads"], r["impl"]): r for r in report["results"]}


def speedups(report: dict, row: dict) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(diffusers / row, allocating torch.compile / row, in-place torch.compile / row) medians; the
    compile rows with the row's epilogue and model dtype (None where not measured)."""
    idx = _index(report)
    key = (row["shape_name"], row["threads"])
    dtype = getattr(torch, row.get("model_dtype", "float32"))
    d = idx.get(key + ("diffusers",))
    c = idx.get(key + (compile_key(False, dtype, row["model_input"]),))
    ci = idx.get(key + (compile_key(True, dtype, row["model_input"]),))
    return tuple(r["median_s"] / row["median_s"] if r else None for r in (d, c, ci))


TARGETS = (
    # (description, shape, fastdiff impl, measure, goal)
    ("SD-1.5 step: diffusers / fastdiff", "sd15", "fastdiff_cpu", "vs_diffusers", 20.0),
    ("SD-1.5 step: torch.compile in place / fastdiff", "sd15", "fastdiff_cpu", "vs_compile_inplace", 1.0),
    ("video step: % of in-place add bandwidth", "video", "fastdiff_cpu", "pct_inplace_add", 90.0),
    ("video step, fp16 model output: % of in-place add bandwidth", "video", "fastdiff_cpu_fp16", "pct_inplace_add",
     90.0),
    ("video step, bf16 model output: % of in-place add bandwidth", "video", "fastdiff_cpu_bf16", "pct_inplace_add",
     90.0),
    ("video step: diffusers / fastdiff", "video", "fastdiff_cpu", "vs_diffusers", 5.0),
    ("video step: torch.compile in place / fastdiff", "video", "fastdiff_cpu", "vs_compile_inplace", 1.0),
    ("video step, fp16: torch.compile in place / fastdiff", "video", "fastdiff_cpu_fp16", "vs_compile_inplace", 1.0),
    ("video step, bf16: torch.compile in place / fastdiff", "video", "fastdiff_cpu_bf16", "vs_compile_inplace", 1.0),
    ("video step + model input: torch.compile in place / fastdiff", "video", "fastdiff_cpu_model_input",
     "vs_compile_inplace", 1.0),
)


def evaluate_targets(report: dict) -> List[dict]:
    """The issue's speed targets, for each thread count measured (missing rows are skipped)."""
    idx = _index(report)
    out = []
    for desc, shape, impl, what, goal in TARGETS:
        for nt in report["settings"]["threads"]:
            row = idx.get((shape, nt, impl))
            if row is None:
                continue
            vs_d, vs_c, vs_ci = speedups(report, row)
            value = {"vs_diffusers": vs_d, "vs_compile": vs_c, "vs_compile_inplace": vs_ci,
                     "pct_copy": row["pct_copy"], "pct_inplace_add": row.get("pct_inplace_add")}[what]
            if value is None:
                continue
            out.append({"target": desc, "threads": nt, "value": value, "goal": goal, "met": value >= goal})
    return out


def _us(s: float) -> str:
    us = s * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.2f}" if us < 10 else f"{us:.1f}"


def _bytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.1f}×"


def render_markdown(report: dict) -> str:
    info = report["machine"]
    lines = [f"Machine: {describe_machine(info)}",
             f"Load average (1, 5, 15 min): {info['load_average_start']} at start, "
             f"{info.get('load_average_end')} at end. Step {report['settings']['step_index']} of "
             f"{report['settings']['steps']}, CFG scale {report['settings']['guidance']}, fp32 state; "
             f"times are medians per step ({report['settings'].get('clock', 'wall')} clock).", ""]
    by_block: Dict[Tuple[str, int], List[dict]] = {}
    for r in report["results"]:
        by_block.setdefault((r["shape_name"], r["threads"]), []).append(r)
    copy = {(b["shape_name"], b["threads"]): b for b in report["blocks"]}
    idx = _index(report)
    summary_cols = {"fastdiff_cpu": "fastdiff cpu", "fastdiff_cpu_model_input": "fastdiff cpu + model input",
                    "eager": "eager", "compile": "torch.compile", "compile_inplace": "torch.compile in place",
                    "diffusers": "diffusers"}
    if any(k[2] == "fastdiff_cpu" for k in idx):
        lines += ["Summary (median µs per step; the fastdiff columns on the right are for the fused step "
                  "without the epilogue, fp32 model output):", "",
                  "| shape | threads | copy GB/s | in-place add GB/s | " + " | ".join(summary_cols.values())
                  + " | fastdiff GB/s | % of copy | % of in-place add | diffusers ÷ fastdiff | compile ÷ fastdiff "
                  "| compile in place ÷ fastdiff |",
                  "|---|---:|---:|---:|" + "---:|" * (len(summary_cols) + 6)]
        for (name, nt) in by_block:
            f = idx.get((name, nt, "fastdiff_cpu"))
            if f is None:
                continue
            probe = copy[(name, nt)]
            inplace = probe.get("inplace_add", {}).get("gbps")
            cells = [_us(idx[(name, nt, c)]["median_s"]) if (name, nt, c) in idx else "" for c in summary_cols]
            vs_d, vs_c, vs_ci = speedups(report, f)
            lines.append(" | ".join([f"| {name}", str(nt), f"{probe['copy']['gbps']:.1f}",
                                     f"{inplace:.1f}" if inplace else "", *cells, f"{f['gbps']:.1f}",
                                     f"{f['pct_copy']:.0f}%", f"{100 * f['gbps'] / inplace:.0f}%" if inplace else "",
                                     _x(vs_d), _x(vs_c), _x(vs_ci)]) + " |")
        lines += ["", "(Above 100%: the tensors stayed in cache (the probes are out of cache), or, against the copy, "
                  "the copy's uncounted write-allocate reads; see benchmarks/README.md.)", ""]
    dtype_rows = [(name, nt, dt, mi) for (name, nt) in by_block for dt in DTYPE_SUFFIX for mi in (False, True)
                  if (name, nt, _fastdiff_key(dt, mi)) in idx]
    if dtype_rows:
        lines += ["By model dtype (median µs per step; fp32 state; the compile rows do the same math on the same "
                  "dtypes: CFG in fp32, model input cast to the model dtype):", "",
                  "| shape | threads | model dtype | + model input | fastdiff | compile in place | compile "
                  "(allocating) | compile in place ÷ fastdiff | fastdiff GB/s | % of in-place add |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, nt, dt, mi in dtype_rows:
            f = idx[(name, nt, _fastdiff_key(dt, mi))]
            ci = idx.get((name, nt, compile_key(True, dt, mi)))
            c = idx.get((name, nt, compile_key(False, dt, mi)))
            pct = f.get("pct_inplace_add")
            lines.append(f"| {name} | {nt} | {str(dt).replace('torch.', '')} | {'yes' if mi else 'no'} | "
                         f"{_us(f['median_s'])} | {_us(ci['median_s']) if ci else ''} | "
                         f"{_us(c['median_s']) if c else ''} | {_x(ci['median_s'] / f['median_s']) if ci else ''} | "
                         f"{f['gbps']:.1f} | {f'{pct:.0f}%' if pct is not None else ''} |")
        lines.append("")
    for (name, nt), rows in by_block.items():
        shape = rows[0]["shape"]
        c = copy[(name, nt)]
        lines += [f"### {SHAPE_TITLES.get(name, name)} {'×'.join(map(str, shape))} ({rows[0]['numel']:,} elements), "
                  f"threads={nt}: copy bandwidth {c['copy']['gbps']:.1f} GB/s"
                  + (f", in-place add {c['inplace_add']['gbps']:.1f} GB/s" if "inplace_add" in c else "")
                  + f" (load {c['load_average'][0]})", "",
                  "| implementation | median µs | IQR µs | bytes moved | GB/s | % of copy | % of in-place add "
                  "| diffusers ÷ this | compile ÷ this | compile in place ÷ this |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            vs_d, vs_c, vs_ci = speedups(report, r)
            fastdiff_row = IMPL_BY_KEY.get(r["impl"], Impl(r["impl"], r["label"])).fastdiff
            pct = r.get("pct_inplace_add")
            lines.append(f"| {r['label']} | {_us(r['median_s'])} | {_us(r['iqr_s'])} | {_bytes(r['bytes'])} | "
                         f"{r['gbps']:.2f} | {r['pct_copy']:.0f}% | {f'{pct:.0f}%' if pct is not None else ''} | "
                         f"{_x(vs_d) if fastdiff_row else ''} | {_x(vs_c) if fastdiff_row else ''} | "
                         f"{_x(vs_ci) if fastdiff_row else ''} |")
        lines.append("")
    compiles = [r for r in report["results"] if "compile_s" in r]
    if compiles:
        lines += ["torch.compile (mode default, fresh inductor cache unless --inductor-cache shared): "
                  "first call (compile) and second call with the next step's scalars (one recompile); "
                  "the process's first compile also pays inductor's start-up.", "",
                  "| shape | threads | variant | compile s | recompile s |", "|---|---:|---|---:|---:|"]
        for r in compiles:
            lines.append(f"| {r['shape_name']} | {r['threads']} | {r['label']} | {r['compile_s']:.1f} | "
                         f"{r['recompile_s']:.1f} |")
        lines.append("")
    if report.get("targets"):
        lines += ["Targets (issues 4 and 17):", "", "| target | threads | measured | goal | met |", "|---|---:|---:|---:|---|"]
        for t in report["targets"]:
            unit = "%" if "%" in t["target"] else "×"
            lines.append(f"| {t['target']} | {t['threads']} | {t['value']:.1f}{unit} | ≥ {t['goal']:g}{unit} | "
                         f"{'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def compare(base: dict, current: dict, threshold_pct: float) -> Tuple[str, List[dict]]:
    """Markdown comparison of medians and the list of regressed fastdiff rows."""
    if threshold_pct < 0:
        raise ValueError(f"threshold must be >= 0 percent, got {threshold_pct}")
    b_idx, c_idx = _index(base), _index(current)
    lines = [f"Comparison with the base run ({base['machine'].get('date')}, commit {base['machine'].get('git_commit')}): "
             f"a fastdiff row more than {threshold_pct:g}% slower is a regression.", "",
             "| shape | threads | implementation | base µs | now µs | change | |", "|---|---:|---|---:|---:|---:|---|"]
    regressions = []
    for key, now in c_idx.items():
        old = b_idx.get(key)
        if old is None:
            continue
        change = 100.0 * (now["median_s"] / old["median_s"] - 1.0)
        is_fastdiff = IMPL_BY_KEY.get(key[2], Impl(key[2], key[2], fastdiff=key[2].startswith("fastdiff"))).fastdiff
        regressed = is_fastdiff and change > threshold_pct
        if regressed:
            regressions.append({"shape_name": key[0], "threads": key[1], "impl": key[2], "base_s": old["median_s"],
                                "now_s": now["median_s"], "change_pct": change})
        flag = "REGRESSION" if regressed else ("" if is_fastdiff else "(baseline, context only)")
        lines.append(f"| {key[0]} | {key[1]} | {now['label']} | {_us(old['median_s'])} | {_us(now['median_s'])} | "
                     f"{change:+.1f}% | {flag} |")
    missing = sorted(set(b_idx) - set(c_idx))
    if missing:
        lines.append("")
        lines.append(f"{len(missing)} base rows were not measured now (other shapes/threads/impls), e.g. {missing[0]}.")
    if not set(b_idx) & set(c_idx):
        lines.append("")
        lines.append("No row of the base run was measured now: nothing compared.")
    lines.append("")
    lines.append(f"{len(regressions)} regression(s)." if regressions else "No regressions.")
    return "\n".join(lines), regressions


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read benchmark report {path}: {e}")
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise SystemExit(f"{path} is not a step_bench report (no 'results' list)")
    return report


# ---------------------------------------------------------------------------------------------
# Command line


def _csv(kind, choices=None):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}")
        if choices is not None:
            bad = [s for s in items if s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; expected some of {', '.join(choices)}")
        return items
    return parse


def _skipped(key: str, skip: Sequence[str]) -> bool:
    return any(key == s or key.startswith(s + "_") for s in skip)


def _threads(text):
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads expects comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {values}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run: shapes tiny,sd15,sdxl, fewer samples, "
                   "a 64 MiB copy; JSON defaults to results/step_bench_quick.json")
    p.add_argument("--shapes", type=_csv("shapes", SHAPES), help=f"subset of {', '.join(SHAPES)}")
    p.add_argument("--threads", type=_threads, default=[1, 2], help="thread counts (default 1,2)")
    p.add_argument("--impls", type=_csv("implementations", IMPL_BY_KEY),
                   help=f"subset of {', '.join(IMPL_BY_KEY)}")
    p.add_argument("--skip", type=_csv("implementations", IMPL_BY_KEY), default=[],
                   help="implementations to leave out, each with its variants (the names that extend it "
                        "with '_'): e.g. compile leaves out every torch.compile row (cold compiles take "
                        "5-40 s each), fastdiff_cpu_bf16 both bf16 fastdiff rows")
    p.add_argument("--min-samples", type=int, help="samples per measurement (default 21, quick 5)")
    p.add_argument("--min-time", type=float, help="seconds per measurement at least (default 0.5, quick 0.1)")
    p.add_argument("--copy-mib", type=int, help="MiB per buffer of the copy-bandwidth probe (default 256, quick 64)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, which leaves out the time "
                        "it waited for a core on a busy machine (meaningful for --threads 1)")
    p.add_argument("--inductor-cache", choices=("fresh", "shared"), default="fresh",
                   help="fresh: compile into a new temporary inductor cache, so compile times are cold "
                        "(default); shared: the user's cache")
    p.add_argument("--json", type=Path, help="where to write the report (default results/step_bench.json, "
                   "quick: results/step_bench_quick.json)")
    p.add_argument("--compare", type=Path, metavar="BASE.json", help="compare medians with a previous report; "
                   "exit status 1 if a fastdiff row regressed")
    p.add_argument("--current", type=Path, metavar="NOW.json",
                   help="with --compare: compare this existing report instead of running the benchmark")
    p.add_argument("--threshold", type=float, default=10.0, help="regression threshold in percent (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)
    if a.current is not None and a.compare is None:
        p.error("--current needs --compare BASE.json")
    if a.threshold < 0:
        p.error(f"--threshold must be >= 0, got {a.threshold}")
    if a.min_samples is not None and a.min_samples < 1:
        p.error(f"--min-samples must be >= 1, got {a.min_samples}")
    if a.min_time is not None and a.min_time < 0:
        p.error(f"--min-time must be >= 0, got {a.min_time}")
    if a.copy_mib is not None and a.copy_mib < 1:
        p.error(f"--copy-mib must be >= 1, got {a.copy_mib}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    base = load_report(a.compare) if a.compare is not None else None
    if a.current is not None:
        report = load_report(a.current)
    else:
        shapes = a.shapes or (list(QUICK_SHAPES) if a.quick else list(SHAPES))
        impls = [IMPL_BY_KEY[k] for k in (a.impls or IMPL_BY_KEY) if not _skipped(k, a.skip)]
        if not impls:
            raise SystemExit("no implementation left to measure (--impls minus --skip is empty)")
        cache_dir = None
        if a.inductor_cache == "fresh" and any(i.key.startswith("compile") for i in impls):
            cache_dir = tempfile.mkdtemp(prefix="fastdiff_bench_inductor_")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            report = run(shapes, a.threads, impls,
                         min_samples=a.min_samples or (5 if a.quick else 21),
                         min_time=a.min_time if a.min_time is not None else (0.1 if a.quick else 0.5),
                         copy_mib=a.copy_mib or (64 if a.quick else 256), clock=a.clock, log=log)
        finally:
            if cache_dir is not None:
                shutil.rmtree(cache_dir, ignore_errors=True)
        report["settings"]["inductor_cache"] = a.inductor_cache
        out = a.json or RESULTS / ("step_bench_quick.json" if a.quick else "step_bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {out}")
        print(render_markdown(report))
    if base is None:
        return 0
    text, regressions = compare(base, report, a.threshold)
    print(text)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
