"""Issue 17's claims, each reproduced in several runs: the fused step per model dtype against
torch.compile (in place and allocating), and the SD-1.5 step across buffer placements.

    python -m benchmarks.dtype_bench --runs 3                      # dtypes at sd15 and video, 1 thread
    python -m benchmarks.dtype_bench --runs 3 --placement-only     # placements only (no compile)
    python -m benchmarks.dtype_bench --runs 3 --dtypes-only --before-ext old/_C.so   # before / after

Before / after: ``--ext PATH`` measures another build of fastdiff._C (e.g. one built from an older
commit's csrc/) in place of the package's own, in the same harness; ``--before-ext PATH`` runs the
dtype table once with that build and once with the current one per run, alternating process by
process (before, after, before, after, ...), and adds a table of the fastdiff step before and
after, each ratio formed between the two processes of one run.

Dtypes: each run is a fresh ``python -m benchmarks.step_bench`` process (1 thread by default, CPU
clock, a shared inductor cache so that only the first run compiles cold) measuring fastdiff's
fused step with fp32, fp16 and bf16 model outputs (with and without the next-model-input
epilogue) beside torch.compile of the same math in place and allocating, and diffusers. The
table gives each time and each ratio as the median and range (min–max) over the runs; a ratio
is formed within a run (the rows of one run are measured interleaved), then summarized.

Placement: the SD-1.5 step (x, the history slot, the [2B] model output and the [2B] model input)
with every buffer at one address modulo 4096 ("aligned"), with buffers from
``fastdiff.ops.buffers.alloc_staggered`` (x, history and model input staggered; the model output
is the caller's and stays aligned), with everything staggered, with a store stream 64 bytes after
a load stream (the 4K-aliasing case of a forward loop), and at random 64-byte offsets; all
interleaved in one measurement per run. Reported: each placement's median µs and the spread
(slowest ÷ fastest placement − 1) per run, median and range over the runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastdiff.program.layout import FLAG_WRITE_X

from . import baselines as bl
from .step_bench import DTYPE_SUFFIX, RESULTS, compile_key
from .timing import describe_machine, load_average, machine_info, measure_interleaved, torch_threads

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
DTYPE_IMPLS = ["fastdiff_cpu" + sfx + mi for sfx in DTYPE_SUFFIX.values() for mi in ("", "_model_input")] + \
    [compile_key(True, dt, mi) for dt in DTYPE_SUFFIX for mi in (False, True)] + \
    [compile_key(False, dt, False) for dt in DTYPE_SUFFIX] + ["diffusers"]


def use_extension(path) -> None:
    """Load the fastdiff._C build at ``path`` as fastdiff._C (before any fastdiff kernel runs: the
    package loads its extension lazily), so the same harness measures another build's kernels."""
    import fastdiff
    if "fastdiff._C" in sys.modules:
        raise RuntimeError("fastdiff._C is already loaded; substitute the build before its first use")
    spec = importlib.util.spec_from_file_location("fastdiff._C", str(path))
    if spec is None or spec.loader is None:
        raise RuntimeError(f"not a loadable extension module: {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["fastdiff._C"] = mod
    fastdiff._C = mod


# step_bench in a subprocess with another fastdiff._C: argv = [ext, step_bench arguments...] (the
# loader of use_extension, inlined: importing this module would import step_bench before runpy).
_STEP_BENCH_WITH_EXT = (
    "import importlib.util, runpy, sys; import torch; import fastdiff; "
    "spec = importlib.util.spec_from_file_location('fastdiff._C', sys.argv[1]); "
    "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
    "sys.modules['fastdiff._C'] = mod; fastdiff._C = mod; "
    "sys.argv = ['benchmarks.step_bench'] + sys.argv[2:]; "
    "runpy.run_module('benchmarks.step_bench', run_name='__main__', alter_sys=True)")


def _med_range(values: Sequence[float], fmt: str) -> str:
    v = sorted(values)
    return f"{fmt.format(float(np.median(v)))} ({fmt.format(v[0])}–{fmt.format(v[-1])})"


# ---------------------------------------------------------------------------------------------
# dtypes: step_bench runs in subprocesses


def dtype_runs(runs: int, shapes: Sequence[str], threads: int, min_samples: int, min_time: float,
               log=lambda s: None, exts: Sequence[Optional[str]] = (None,)) -> List[List[dict]]:
    """``runs`` runs of step_bench, each a fresh process per build in ``exts`` (None: the
    package's own fastdiff._C), the builds alternating within each run. Returns one list of
    reports per build."""
    reports: List[List[dict]] = [[] for _ in exts]
    with tempfile.TemporaryDirectory(prefix="fastdiff_dtype_") as tmp:
        for r in range(runs):
            for k, ext in enumerate(exts):
                out = Path(tmp) / f"run{r}_{k}.json"
                args = ["--shapes", ",".join(shapes), "--threads", str(threads), "--impls", ",".join(DTYPE_IMPLS),
                        "--clock", "cpu", "--inductor-cache", "shared", "--min-samples", str(min_samples),
                        "--min-time", str(min_time), "--json", str(out), "--quiet"]
                if ext is None:
                    cmd = [sys.executable, "-m", "benchmarks.step_bench"] + args
                else:
                    cmd = [sys.executable, "-c", _STEP_BENCH_WITH_EXT, str(ext)] + args
                log(f"dtype run {r + 1}/{runs}{f' (fastdiff._C from {ext})' if ext else ''}: "
                    f"step_bench {' '.join(args)}")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=str(REPO))
                rep = json.loads(out.read_text())
                rep["fastdiff_ext"] = str(ext) if ext else None
                reports[k].append(rep)
    return reports


def render_dtypes(reports: List[dict]) -> str:
    idx = [{(r["shape_name"], r["threads"], r["impl"]): r for r in rep["results"]} for rep in reports]
    probes = [{(b["shape_name"], b["threads"]): b for b in rep["blocks"]} for rep in reports]
    first = reports[0]
    lines = [f"Machine: {describe_machine(first['machine'])}.",
             "Load average (1 min) at each run's start: "
             + ", ".join(str(rep["machine"]["load_average_start"][0]) for rep in reports)
             + f". {len(reports)} runs, each a fresh process; threads={first['settings']['threads']}; "
             f"{first['settings']['clock']} clock; median (min–max) over the runs.", "",
             "| shape | model dtype | + model input | fastdiff µs | compile in place µs | compile in place ÷ fastdiff "
             "| compile (allocating) ÷ fastdiff | diffusers ÷ fastdiff | % of in-place add |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(k[0], k[1]) for k in idx[0]}, key=lambda k: list(first["settings"]["shapes"]).index(k[0]))
    for shape, nt in keys:
        for dt, sfx in DTYPE_SUFFIX.items():
            for mi in (False, True):
                fk = "fastdiff_cpu" + sfx + ("_model_input" if mi else "")
                if (shape, nt, fk) not in idx[0]:
                    continue
                f = [ix[(shape, nt, fk)]["median_s"] for ix in idx]
                ci = [ix.get((shape, nt, compile_key(True, dt, mi))) for ix in idx]
                ca = [ix.get((shape, nt, compile_key(False, dt, mi))) for ix in idx]
                dd = [ix.get((shape, nt, "diffusers")) for ix in idx]
                pct = [ix[(shape, nt, fk)]["bytes"] / ix[(shape, nt, fk)]["median_s"] / 1e9
                       / pb[(shape, nt)]["inplace_add"]["gbps"] * 100 for ix, pb in zip(idx, probes)]

                def ratio(rows):
                    if any(r is None for r in rows):
                        return ""
                    return _med_range([r["median_s"] / x for r, x in zip(rows, f)], "{:.2f}") + "×"
                lines.append(f"| {shape} | {str(dt).replace('torch.', '')} | {'yes' if mi else 'no'} | "
                             f"{_med_range([x * 1e6 for x in f], '{:,.1f}')} | "
                             f"{_med_range([r['median_s'] * 1e6 for r in ci], '{:,.1f}') if None not in ci else ''} | "
                             f"{ratio(ci)} | {ratio(ca) if not mi else ''} | {ratio(dd) if not mi else ''} | "
                             f"{_med_range(pct, '{:.0f}')}% |")
    return "\n".join(lines)


def render_before_after(before: List[dict], after: List[dict]) -> str:
    """The fastdiff step per shape / dtype / epilogue with the before and the current build; the
    change and the compile-in-place ratio are formed within each run (its two processes)."""
    ib = [{(r["shape_name"], r["threads"], r["impl"]): r for r in rep["results"]} for rep in before]
    ia = [{(r["shape_name"], r["threads"], r["impl"]): r for r in rep["results"]} for rep in after]
    lines = ["Load average (1 min) at each run's start, before / after: "
             + ", ".join(f"{b['machine']['load_average_start'][0]} / {a['machine']['load_average_start'][0]}"
                         for b, a in zip(before, after)) + f". {len(after)} runs; median (min–max).", "",
             "| shape | model dtype | + model input | before µs | after µs | after ÷ before | compile in place ÷ "
             "fastdiff, before | compile in place ÷ fastdiff, after |", "|---|---|---|---:|---:|---:|---:|---:|"]
    shapes = list(after[0]["settings"]["shapes"])
    for shape in shapes:
        for dt, sfx in DTYPE_SUFFIX.items():
            for mi in (False, True):
                fk = "fastdiff_cpu" + sfx + ("_model_input" if mi else "")
                keys = [k for k in ia[0] if k[0] == shape and k[2] == fk]
                for key in keys:
                    if not all(key in d for d in ib + ia):
                        continue
                    b = [d[key]["median_s"] for d in ib]
                    a = [d[key]["median_s"] for d in ia]
                    ck = (key[0], key[1], compile_key(True, dt, mi))
                    has_c = all(ck in d for d in ib + ia)
                    cb = _med_range([d[ck]["median_s"] / x for d, x in zip(ib, b)], "{:.2f}") + "×" if has_c else ""
                    ca = _med_range([d[ck]["median_s"] / x for d, x in zip(ia, a)], "{:.2f}") + "×" if has_c else ""
                    lines.append(f"| {shape} | {str(dt).replace('torch.', '')} | {'yes' if mi else 'no'} | "
                                 f"{_med_range([x * 1e6 for x in b], '{:,.1f}')} | "
                                 f"{_med_range([x * 1e6 for x in a], '{:,.1f}')} | "
                                 f"{_med_range([y / x for x, y in zip(b, a)], '{:.3f}')} | {cb} | {ca} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# placement: in this process


class PlacedStep:
    """The SD-1.5 fused step on buffers at chosen byte offsets modulo 4096 (one allocation)."""

    max_calls = 64

    def __init__(self, problem: bl.StepProblem, offsets: Sequence[int], model_dtype: torch.dtype):
        from fastdiff.ops.backends import BACKENDS

        p = problem
        B, n = p.shape[0], p.numel
        es = torch.empty((), dtype=model_dtype).element_size()
        sizes = [n * 4, n * 4, 2 * n * es, 2 * n * es]        # x, history slot, model output, model input
        self.raw = torch.empty(sum(sizes) + (len(sizes) + 1) * PAGE, dtype=torch.uint8)
        end = (-self.raw.data_ptr()) % PAGE
        views = []
        for size, off in zip(sizes, offsets):
            start = end + ((off - end) % PAGE)
            views.append(self.raw[start:start + size])
            end = start + size
        self.problem = p
        self.x = views[0].view(torch.float32).view(p.shape)
        self.hist = views[1].view(torch.float32).view((1,) + p.shape)
        model_out = views[2].view(model_dtype).view((2 * B,) + p.shape[1:])
        model_out.copy_(p.model_out.to(model_dtype))
        self.uncond, self.cond = model_out[:B], model_out[B:]
        self.model_in = views[3].view(model_dtype).view((2 * B,) + p.shape[1:])
        self.bad_row = torch.zeros(1, dtype=torch.int32)
        self.fn = BACKENDS["cpu"].fused_step
        self.calls = self.max_calls

    def prepare(self, number: int) -> None:
        if self.calls + number > self.max_calls:
            self.x.copy_(self.problem.x)
            self.hist[0].copy_(self.problem.x0_prev)
            self.calls = 0
        self.calls += number

    def __call__(self) -> None:
        p = self.problem
        self.fn(p.table, p.step_index, self.x, None, self.cond, self.uncond, self.hist, 0b1, FLAG_WRITE_X, None, 0, -1,
                self.model_in, self.bad_row)


def placements(seed: int) -> Dict[str, List[int]]:
    """Offsets mod 4096 of (x, history, model output, model input)."""
    from fastdiff.ops.buffers import DEFAULT_STAGGER as S
    rng = random.Random(seed)
    out = {"aligned (all at 0 mod 4096)": [0, 0, 0, 0],
           "alloc_staggered (x, history, model input; model output at 0)": [0, S, 0, 2 * S % PAGE],
           "all staggered": [0, S, 2 * S % PAGE, 3 * S % PAGE],
           # 4K aliasing in a forward loop: a store stream one vector (64 B) after a load stream
           "model input 64 B after the model output": [0, 3008, 1984, 2048],
           "history 64 B after the model output": [0, 2048, 1984, 1024]}
    for r in range(3):
        out[f"random {r + 1}"] = [rng.randrange(0, PAGE, 64) for _ in range(4)]
    return out


def placement_runs(runs: int, dtypes: Sequence[torch.dtype], min_samples: int, min_time: float,
                   log=lambda s: None) -> dict:
    problem = bl.make_problem((1, 4, 64, 64))
    result = {"machine": machine_info(), "runs": []}
    with torch_threads(1):
        for r in range(runs):
            fns, offsets = {}, {}
            for dt in dtypes:
                for name, offs in placements(seed=r).items():
                    fns[(str(dt), name)] = PlacedStep(problem, offs, dt)
                    offsets[name] = offs
            load = load_average()
            t = measure_interleaved(fns, min_samples=min_samples, min_time=min_time, clock="cpu")
            result["runs"].append({"load_average": load, "offsets": offsets,
                                   "median_us": {f"{d}|{n}": v.median * 1e6 for (d, n), v in t.items()}})
            log(f"placement run {r + 1}/{runs} done (load {load[0]})")
    result["machine"]["load_average_end"] = load_average()
    return result


def render_placement(result: dict) -> str:
    runs = result["runs"]
    keys = list(runs[0]["median_us"])
    dtypes = list(dict.fromkeys(k.split("|")[0] for k in keys))
    lines = [f"Machine: {describe_machine(result['machine'])}. SD-1.5 latent 1×4×64×64, guided DPM-Solver++(2M) "
             f"step with the next model input, 1 thread, CPU clock; load (1 min) per run: "
             + ", ".join(str(r["load_average"][0]) for r in runs)
             + f". Median (min–max) over {len(runs)} runs (the random offsets differ per run).", "",
             "| model dtype | placement | µs per step |", "|---|---|---:|"]
    for k in keys:
        d, name = k.split("|")
        lines.append(f"| {d.replace('torch.', '')} | {name} | {_med_range([r['median_us'][k] for r in runs], '{:.2f}')} |")
    lines += ["", "| model dtype | spread across placements (slowest ÷ fastest − 1) |", "|---|---:|"]
    for d in dtypes:
        spreads = []
        for r in runs:
            v = [t for k, t in r["median_us"].items() if k.startswith(d + "|")]
            spreads.append(100 * (max(v) / min(v) - 1))
        lines.append(f"| {d.replace('torch.', '')} | {_med_range(spreads, '{:.1f}')}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dtype_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--shapes", default="sd15,video", help="step_bench shapes for the dtype table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-samples", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--placement-only", action="store_true", help="only the placement table")
    p.add_argument("--dtypes-only", action="store_true", help="only the dtype table")
    p.add_argument("--ext", type=Path, help="measure this build of fastdiff._C instead of the package's own")
    p.add_argument("--before-ext", type=Path, help="dtype table: also measure this (older) build of "
                   "fastdiff._C, alternating with the current one run by run, and compare")
    p.add_argument("--json", type=Path, default=RESULTS / "dtype_bench.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error(f"--runs must be >= 1, got {a.runs}")
    for ext in (a.ext, a.before_ext):
        if ext is not None and not ext.is_file():
            p.error(f"no such extension build: {ext}")
    if a.ext is not None:
        use_extension(a.ext.resolve())
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    out: dict = {"fastdiff_ext": str(a.ext) if a.ext else None,
                 "before_ext": str(a.before_ext) if a.before_ext else None}
    text = []
    if not a.placement_only:
        current = str(a.ext.resolve()) if a.ext else None
        exts = [str(a.before_ext.resolve()), current] if a.before_ext else [current]
        reports = dtype_runs(a.runs, a.shapes.split(","), a.threads, a.min_samples, a.min_time, log, exts)
        out["dtypes"] = reports[-1]
        text.append(render_dtypes(out["dtypes"]))
        if a.before_ext:
            out["dtypes_before"] = reports[0]
            text.append("Before (fastdiff._C from " + str(a.before_ext) + "):\n\n" + render_dtypes(reports[0]))
            text.append("Before / after:\n\n" + render_before_after(reports[0], reports[-1]))
    if not a.dtypes_only:
        out["placement"] = placement_runs(a.runs, (torch.float32, torch.float16), a.min_samples, 0.1, log)
        text.append(render_placement(out["placement"]))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {a.json}")
    print("\n\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
