"""The whole benchmark suite (what ``fastdiff bench`` runs): markdown, JSON and a PNG plot per part.

    python -m benchmarks.suite                          # every part, full size
    python -m benchmarks.suite --quick                  # CI-sized: a few minutes on 2 cores
    python -m benchmarks.suite --parts accuracy,quality --out-dir /tmp/bench

Parts (files in --out-dir: default benchmarks/results/ here, the committed results; ./fastdiff_bench/
for ``fastdiff bench``; ``--quick`` runs write ``*_quick.*``):

* kernels   the fused step vs eager PyTorch, torch.compile and diffusers (benchmarks.step_bench):
            step_bench.{json,md,png}; --quick leaves out torch.compile and runs 1 thread
* accuracy  error vs NFE of the deterministic solvers on the analytic Gaussian mixture
            (benchmarks.accuracy_table): accuracy_table.{json,md}, accuracy_vs_nfe.png
* quality   digits-FD and class accuracy vs NFE on the shipped digits model
            (benchmarks.quality_table): quality_table.{json,md,png}

``--kernel-options`` / ``--quality-options`` pass further arguments to step_bench / quality_table
(e.g. ``--kernel-options "--shapes sd15 --threads 2"``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from fastdiff.cli import BENCH_PARTS as PARTS, add_bench_arguments

from . import accuracy_table, quality_table, step_bench

RESULTS = Path(__file__).resolve().parent / "results"

QUICK_KERNEL_ARGS = ["--quick", "--threads", "1", "--skip", "compile,compile_model_input"]
QUICK_ACCURACY = dict(dim=4, samples=16, budgets=(5, 10, 20),
                      solvers=("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"))
FULL_ACCURACY = dict(dim=4, samples=64, budgets=accuracy_table.NFE_BUDGETS, solvers=None)


def _plt():
    import matplotlib
    matplotlib.use("Agg")   # files only; never a window
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def plot_kernels(report: dict, path: Path) -> None:
    """Median µs per step of each implementation, one panel per shape, at the largest thread count."""
    plt = _plt()
    from matplotlib.ticker import NullFormatter
    threads = max(report["settings"]["threads"])
    shapes = list(report["settings"]["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.0 + 3.0 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in report["results"] if r["shape_name"] == shape and r["threads"] == threads]
        labels = [r["label"] for r in rows]
        us = [r["median_s"] * 1e6 for r in rows]
        colors = ["tab:blue" if step_bench.IMPL_BY_KEY.get(r["impl"]) is None or step_bench.IMPL_BY_KEY[r["impl"]].fastdiff
                  else "tab:gray" for r in rows]
        ax.barh(range(len(rows)), us, color=colors)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels collide on narrow decades
        ax.set_xlabel("median µs per step (log)")
        numel = rows[0]["numel"] if rows else 0
        ax.set_title(f"{step_bench.SHAPE_TITLES.get(shape, shape)} ({numel:,} el.)", fontsize=9)
        for i, v in enumerate(us):
            ax.text(v, i, f" {v:,.0f}" if v >= 100 else f" {v:.1f}", va="center", fontsize=6)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"One CFG + DPM-Solver++(2M) step, {threads} thread{'s' if threads > 1 else ''}\n"
                 "blue: fastdiff, gray: the baselines", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_kernels(out_dir: Path, quick: bool, options: Sequence[str], log) -> List[Path]:
    stem = out_dir / ("step_bench_quick" if quick else "step_bench")
    json_path = stem.with_suffix(".json")
    argv = (QUICK_KERNEL_ARGS if quick else []) + ["--json", str(json_path)] + list(options)
    log(f"kernels: python -m benchmarks.step_bench {' '.join(argv)}")
    status = step_bench.main(argv)   # prints the markdown table
    if status:
        raise RuntimeError(f"benchmarks.step_bench exited with status {status}")
    report = step_bench.load_report(json_path)
    stem.with_suffix(".md").write_text(step_bench.render_markdown(report) + "\n")
    plot_kernels(report, stem.with_suffix(".png"))
    return [json_path, stem.with_suffix(".md"), stem.with_suffix(".png")]


# ---------------------------------------------------------------------------------------------
# accuracy on the Gaussian mixture
# ---------------------------------------------------------------------------------------------
# The rows drawn in color in the accuracy plot (the rest are thin gray lines; the table has them all).
ACCURACY_HIGHLIGHT = ("DDIM", "Euler", "Heun (EDM)", "DPM-Solver-3 (singlestep)", "DPM-Solver++(2M)",
                      "DPM-Solver++(3M)", "DEIS-3", "UniPC-2 bh2", "UniPC-3 bh2")


def plot_accuracy(report: dict, path: Path) -> None:
    """RMS error vs NFE (log-log): the ACCURACY_HIGHLIGHT rows in color, the others in gray."""
    plt = _plt()
    from matplotlib.ticker import NullLocator
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = iter(plt.get_cmap("tab10").colors)
    others = False
    for row in report["rows"]:
        nfe, err = [c["nfe"] for c in row["cells"]], [c["rms_error"] for c in row["cells"]]
        if row["label"] in ACCURACY_HIGHLIGHT:
            ax.plot(nfe, err, marker="o", markersize=4, lw=1.6, color=next(colors), label=row["label"], zorder=3)
        else:
            ax.plot(nfe, err, lw=0.8, color="0.75", zorder=1, label=None if others else "other solvers (see the table)")
            others = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("RMS error vs the exact ODE solution")
    p = report["problem"]
    ax.set_title(f"Error vs NFE on the {p['dim']}-d Gaussian mixture (exact score), {p['samples']} samples",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_accuracy(out_dir: Path, quick: bool, log, progress: bool) -> List[Path]:
    cfg = QUICK_ACCURACY if quick else FULL_ACCURACY
    solvers = accuracy_table.SOLVERS if cfg["solvers"] is None else [
        s for s in accuracy_table.SOLVERS if s[1] in cfg["solvers"]]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(solvers) + 1, desc="accuracy table", leave=False, disable=None if progress else True)

    def step(line: str) -> None:   # accuracy_table logs once for the reference and once per solver row
        bar.set_postfix_str(line.split(":")[0][:40])
        bar.update(1)

    log(f"accuracy: {len(solvers)} solver rows, NFE {', '.join(map(str, cfg['budgets']))}, {cfg['samples']} samples")
    report = accuracy_table.run(cfg["dim"], cfg["samples"], cfg["budgets"], solvers, step)
    bar.close()
    stem = out_dir / ("accuracy_table_quick" if quick else "accuracy_table")
    png = out_dir / ("accuracy_vs_nfe_quick.png" if quick else "accuracy_vs_nfe.png")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = accuracy_table.render_markdown(report)
    stem.with_suffix(".md").write_text(markdown + "\n")
    plot_accuracy(report, png)
    print(markdown)
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), png]


# ---------------------------------------------------------------------------------------------
# sample quality of the digits model
# ---------------------------------------------------------------------------------------------
def run_quality(out_dir: Path, quick: bool, options: Sequence[str], log, progress: bool) -> List[Path]:
    stem = out_dir / ("quality_table_quick" if quick else "quality_table")
    argv = (["--quick"] if quick else []) + ["--out", str(stem)] + ([] if progress else ["--quiet"]) + list(options)
    log(f"quality: python -m benchmarks.quality_table {' '.join(argv)}")
    quality_table.main(argv)
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]


# ---------------------------------------------------------------------------------------------
def build_parser(prog: str, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m benchmarks.suite``'s options: those of ``fastdiff bench`` (one definition, in
    fastdiff.cli), writing to benchmarks/results by default (the committed results)."""
    p = parser_class(prog=prog, description=__doc__.split("\n\n")[0],
                     epilog="Parts: kernels (step_bench), accuracy (Gaussian mixture), quality (digits model).")
    return add_bench_arguments(p, out_dir=RESULTS)


def main(argv=None, *, prog: str = "python -m benchmarks.suite", parser_class=argparse.ArgumentParser) -> int:
    return run(build_parser(prog, parser_class).parse_args(argv))


def run(a: argparse.Namespace) -> int:
    """Run the parts ``a.parts`` (options as add_bench_arguments defines them)."""
    a.out_dir.mkdir(parents=True, exist_ok=True)
    log: Callable[[str], None] = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    written: Dict[str, List[Path]] = {}
    for part in a.parts:
        print(f"\n## {part}\n")
        if part == "kernels":
            written[part] = run_kernels(a.out_dir, a.quick, a.kernel_options + (["--quiet"] if a.quiet else []), log)
        elif part == "accuracy":
            written[part] = run_accuracy(a.out_dir, a.quick, log, progress=not a.quiet)
        else:
            written[part] = run_quality(a.out_dir, a.quick, a.quality_options, log, progress=not a.quiet)
    print("\nwrote:\n" + "\n".join(f"  {part}: {', '.join(str(p) for p in paths)}" for part, paths in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
