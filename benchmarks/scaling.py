"""Time of the fused CFG + DPM-Solver++(2M) step against tensor size, log-log.

    python -m benchmarks.scaling                 # PNG + JSON in benchmarks/results/
    python -m benchmarks.scaling --quick

Small tensors are overhead-bound (the time is flat: call, dispatch, thread start-up); large ones
are bandwidth-bound (the time grows with the bytes). The plot shows where each implementation
crosses from one to the other: fastdiff cpu, eager PyTorch and torch.compile (static shapes,
one compile per size, as step_bench does; the three measured together, samples interleaved),
for 1 and 2 threads, beside two floors measured in the same run: the bytes divided by the copy bandwidth, and the fastdiff._C call on an empty
tensor (argument passing and checks, no elements; measured alongside at every size, median).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from fastdiff.program.layout import FLAG_WRITE_X

from . import baselines as bl
from .step_bench import IMPL_BY_KEY, RESULTS, bytes_moved, step_callable
from .timing import copy_bandwidth, describe_machine, load_average, machine_info, measure_interleaved, torch_threads

DEFAULT_SIZES = tuple(256 * 4 ** k for k in range(8)) + (2 ** 23,)     # 256 .. 4M, 8M
QUICK_SIZES = (256, 4096, 65536, 1048576)
IMPLS = ("fastdiff_cpu", "eager", "compile")


class EmptyCall:
    """fastdiff._C.fused_step on a [1, 0] state: pybind11 argument conversion, the C++ checks and
    the early return; the floor of any fastdiff cpu step. Samples as short as the in-place step's
    (FastdiffStep.max_calls): on a busy machine a longer sample is preempted more often, and its
    wall-clock median would not be comparable."""

    max_calls = bl.FastdiffStep.max_calls

    def __init__(self):
        from fastdiff.ops.backends import BACKENDS

        self.fn = BACKENDS["cpu"].fused_step
        x, out, hist = torch.empty(1, 0), torch.empty(2, 0), torch.empty(1, 1, 0)
        table = bl.make_problem((1, 8)).table
        bad = torch.zeros(1, dtype=torch.int32)
        self.args = (table, bl.MID_STEP, x, None, out[1:], out[:1], hist, 0b1, FLAG_WRITE_X, None, 0, -1, None, bad)

    def __call__(self):
        self.fn(*self.args)


def run(sizes: Sequence[int], threads: Sequence[int], impls: Sequence[str], *, min_samples: int, min_time: float,
        copy_mib: int, clock: str = "wall", log=lambda s: None) -> dict:
    info = machine_info()
    copy: Dict[int, dict] = {}
    empty: Dict[int, List[float]] = {nt: [] for nt in threads}
    points: List[dict] = []
    for nt in threads:
        with torch_threads(nt):
            copy[nt] = copy_bandwidth(copy_mib, min_samples=min_samples, min_time=min_time, clock=clock)
            log(f"threads={nt}: copy {copy[nt]['gbps']:.1f} GB/s")
    for n in sizes:
        problem = bl.make_problem((1, n))
        for nt in threads:
            with torch_threads(nt):
                torch._dynamo.reset()
                made = {key: step_callable(IMPL_BY_KEY[key], problem, log) for key in impls}
                fns = {k: fn for k, (fn, _) in made.items()}
                if "fastdiff_cpu" in impls:         # the call floor, measured alongside at every size
                    fns["empty_call"] = EmptyCall()
                timings = measure_interleaved(fns, min_samples=min_samples, min_time=min_time, clock=clock)
                if "empty_call" in timings:
                    empty[nt].append(timings["empty_call"].median)
                for key in impls:
                    impl, t = IMPL_BY_KEY[key], timings[key]
                    nbytes = bytes_moved(n, impl.model_dtype, impl.model_input)
                    points.append({"numel": n, "threads": nt, "impl": key, "median_s": t.median, "iqr_s": t.iqr,
                                   "samples": t.samples, "bytes": nbytes, "gbps": nbytes / t.median / 1e9,
                                   **made[key][1]})
                    log(f"  numel={n:>8} threads={nt} {key:14s} {t.median * 1e6:10.1f} us")
                del made
        del problem
    info["load_average_end"] = load_average()
    return {"machine": info, "settings": {"sizes": list(sizes), "threads": list(threads), "impls": list(impls),
                                          "min_samples": min_samples, "min_time_s": min_time, "copy_mib": copy_mib,
                                          "clock": clock},
            "copy": {str(k): v for k, v in copy.items()},
            "empty_call_s": {str(k): float(np.median(v)) for k, v in empty.items() if v}, "points": points}


def render_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Machine: {describe_machine(report['machine'])}; load {report['machine']['load_average_start']} at start, "
             f"{report['machine']['load_average_end']} at end.",
             f"Median µs per fused CFG + DPM-Solver++(2M) step on a [1, numel] fp32 state "
             f"({s.get('clock', 'wall')} clock).", ""]
    for nt in s["threads"]:
        c = report["copy"][str(nt)]["gbps"]
        empty = report["empty_call_s"].get(str(nt))
        lines += [f"threads={nt}: copy bandwidth {c:.1f} GB/s"
                  + (f"; empty fastdiff._C call {empty * 1e6:.2f} µs" if empty is not None else ""), "",
                  "| numel | " + " | ".join(s["impls"]) + " | bytes / copy bandwidth |",
                  "|---:|" + "---:|" * (len(s["impls"]) + 1)]
        for n in s["sizes"]:
            row = {p["impl"]: p for p in report["points"] if p["numel"] == n and p["threads"] == nt}
            cells = [f"{row[k]['median_s'] * 1e6:.1f}" if k in row else "" for k in s["impls"]]
            floor = bytes_moved(n, torch.float32, False) / (c * 1e9) * 1e6
            lines.append(f"| {n:,} | " + " | ".join(cells) + f" | {floor:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    colors = {"fastdiff_cpu": "C0", "eager": "C1", "compile": "C2"}
    styles = {1: "--", 2: "-"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sizes = sorted(s["sizes"])
    for nt in s["threads"]:
        for key in s["impls"]:
            pts = sorted((p["numel"], p["median_s"]) for p in report["points"] if p["impl"] == key and p["threads"] == nt)
            if pts:
                ax.loglog([n for n, _ in pts], [t * 1e6 for _, t in pts], styles.get(nt, "-"), marker="o",
                          ms=3, color=colors.get(key), label=f"{IMPL_BY_KEY[key].label}, {nt} thread{'s' * (nt > 1)}")
        bw = report["copy"][str(nt)]["gbps"] * 1e9
        ax.loglog(sizes, [bytes_moved(n, torch.float32, False) / bw * 1e6 for n in sizes], styles.get(nt, "-"),
                  color="0.5", lw=1, label=f"bytes / copy bandwidth ({bw / 1e9:.1f} GB/s), {nt} thread{'s' * (nt > 1)}")
    if report["empty_call_s"]:
        floor = min(report["empty_call_s"].values()) * 1e6
        ax.axhline(floor, color="0.3", ls=":", lw=1, label=f"empty fastdiff._C call ({floor:.2f} µs)")
    ax.set_xlabel("elements in the latent (numel of x)")
    ax.set_ylabel("median time per step (µs)")
    ax.set_title("CFG + DPM-Solver++(2M) step, fp32: overhead-bound → bandwidth-bound"
                 + (" (CPU time)" if s.get("clock") == "cpu" else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    m = report["machine"]
    fig.text(0.01, 0.005, f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['load_average_start'][0]}",
             fontsize=7, color="0.4")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer samples")
    p.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], help="comma-separated numels")
    p.add_argument("--threads", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    p.add_argument("--impls", type=lambda t: t.split(","), default=list(IMPLS), help=f"subset of {', '.join(IMPLS)}")
    p.add_argument("--min-samples", type=int)
    p.add_argument("--min-time", type=float)
    p.add_argument("--copy-mib", type=int)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time (leaves out waiting for a core)")
    p.add_argument("--out", type=Path, default=RESULTS / "step_scaling",
                   help="path stem: writes STEM.json and STEM.png (default results/step_scaling)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    sizes = a.sizes or list(QUICK_SIZES if a.quick else DEFAULT_SIZES)
    if any(n < 1 for n in sizes) or any(t < 1 for t in a.threads):
        p.error("sizes and thread counts must be positive")
    bad = [k for k in a.impls if k not in IMPLS]
    if bad:
        p.error(f"unknown implementation(s) {bad}; expected some of {', '.join(IMPLS)}")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    cache_dir = tempfile.mkdtemp(prefix="fastdiff_bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        report = run(sizes, a.threads, a.impls, min_samples=a.min_samples or (5 if a.quick else 15),
                     min_time=a.min_time if a.min_time is not None else (0.1 if a.quick else 0.3),
                     copy_mib=a.copy_mib or (64 if a.quick else 256), clock=a.clock, log=log)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, a.out.with_suffix(".png"))
    log(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
