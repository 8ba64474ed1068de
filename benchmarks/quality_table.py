"""Sample quality of the shipped digits model vs the number of model evaluations (NFE), per solver.

    python -m benchmarks.quality_table             # results/quality_table.{json,md,png}
    python -m benchmarks.quality_table --quick     # 3 solvers, NFE 5/10/20, 100 samples: results/*_quick.*

The shape of the DPM-Solver and UniPC papers' tables, on a real (small) model: for each solver and
NFE budget, class-conditional samples of fastdiff's digits U-Net (fastdiff.models.digits) are
scored by digits-FD (Fréchet distance in the feature space of the shipped digits classifier; FID's
recipe on 8x8 digits) against the training images, and by class accuracy (the share of samples the
classifier assigns to the label they were generated for). Two rows put the numbers in scale:

* a 1000-step DDPM reference (ancestral sampling, what the model was trained for), and
* the floor: real held-out images (never trained on) scored the same way, against the same
  training images, with the same number of images and the same labels per class. FD is biased
  upwards at small sample counts, so only numbers at equal counts compare; the floor is what a
  perfect sampler would score at this count.

Every cell uses the same labels (``--samples`` of them, balanced over the digits), the same starting
noise (seed 0), no CFG unless ``--guidance`` asks for it ("w" convention), trailing timestep spacing
(sample_digits' default: the first step starts at t = 999, where sigma/alpha is about 2e4), and the
largest number of steps whose NFE fits the budget (a cell of a multi-stage solver that cannot hit
the budget exactly shows the NFE it used). NFE counts model calls; with CFG each call evaluates
both halves in one batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastdiff import Sampler
from fastdiff.models.digits import (PREDICTION, digits_schedule, load_digits_data, load_digits_model,
                                    sample_digits)
from fastdiff.models.digits_fd import load_digits_classifier, sample_quality

from .timing import describe_machine, machine_info

RESULTS = Path(__file__).resolve().parent / "results"
NFE_BUDGETS = (5, 10, 20, 50)
# No CFG: guidance trades diversity for fidelity, and digits-FD (a diversity-sensitive distance)
# rises with it on this model (at scale 2-3 every solver's FD is several times the floor's), which
# would hide the solvers' differences. Class-conditional all the same: the label is the model's input.
GUIDANCE = 1.0
SPACING = "trailing"   # sample_digits' default: start at t = 999, where the signal is really gone

# (label, solver, options): the solvers of the DPM-Solver / UniPC papers' comparisons.
SOLVERS: List[Tuple[str, str, dict]] = [
    ("DDIM", "ddim", {}),
    ("Euler", "euler", {}),
    ("Heun (VE coordinates)", "heun", {}),
    ("Heun (flow coordinates)", "heun", {"ode_space": "flow"}),
    ("DPM-Solver-2M (noise prediction)", "dpm_solver_multistep", {}),
    ("DPM-Solver++(2M)", "dpmpp_2m", {}),
    ("DPM-Solver++(3M)", "dpmpp_3m", {}),
    ("DEIS-2", "deis", {}),
    ("UniPC-2 (bh2)", "unipc", {}),
]
QUICK_SOLVERS = ("ddim", "dpmpp_2m", "unipc")
REFERENCE = ("DDPM", "ddpm", {})
REFERENCE_STEPS = 1000


def steps_within(solver: str, options: dict, budget: int) -> Tuple[int, int]:
    """(steps, NFE): the most steps whose NFE <= budget on the digits grid (at least one step)."""
    def nfe(steps):
        return Sampler.build(solver=solver, solver_options=options, steps=steps, schedule=digits_schedule(),
                             spacing=SPACING, prediction=PREDICTION).program.nfe
    best = (1, nfe(1))
    for steps in range(2, budget + 1):
        n = nfe(steps)
        if n > budget:
            break
        best = (steps, n)
    return best


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def heldout_like(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real held-out images with the same number of each label as ``labels`` (the floor's images)."""
    images, held = load_digits_data("heldout")
    picked = []
    for digit, count in enumerate(torch.bincount(labels, minlength=10).tolist()):
        idx = (held == digit).nonzero().flatten()
        if count > len(idx):
            raise ValueError(f"the held-out set has {len(idx)} images of digit {digit}, {count} needed; "
                             f"use at most {10 * min(int((held == d).sum()) for d in range(10))} samples")
        picked.append(idx[:count])
    idx = torch.cat(picked)
    return images[idx], held[idx]


def run(*, samples: int, budgets: Sequence[int], solvers, guidance: float, reference_steps: int,
        model_path: Optional[Path] = None, classifier_path: Optional[Path] = None, progress: bool = True) -> Dict:
    model = load_digits_model(model_path)
    classifier = load_digits_classifier(classifier_path)
    train_images, _ = load_digits_data("train")
    labels = balanced_labels(samples)
    floor_images, floor_labels = heldout_like(labels)

    def quality(images, image_labels):
        q = sample_quality(images, image_labels, train_images, classifier=classifier)
        return {"digits_fd": q["digits_fd"], "class_accuracy": q["class_accuracy"]}

    from tqdm.auto import tqdm
    bar = tqdm(total=len(solvers) * len(budgets) + reference_steps // 50, desc="quality table",
               disable=None if progress else True, leave=False)   # None: only on a terminal

    def cell(solver, options, steps, nfe, weight=1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = sample_digits(model, labels, solver=solver, steps=steps, guidance=guidance, seed=0,
                              solver_options=options)
        seconds = time.perf_counter() - t0
        bar.update(weight)
        return {"steps": steps, "nfe": nfe, **quality(x, labels), "seconds": seconds}

    rows = []
    for label, name, options in solvers:
        cells = []
        for budget in budgets:
            bar.set_postfix_str(f"{label}, NFE {budget}")
            steps, nfe = steps_within(name, options, budget)
            cells.append({"budget": budget, **cell(name, options, steps, nfe)})
        rows.append({"label": label, "solver": name, "options": options, "cells": cells})
    bar.set_postfix_str(f"{REFERENCE[0]}, {reference_steps} steps")
    ref_label, ref_name, ref_options = REFERENCE
    reference = {"label": f"{ref_label}, {reference_steps} steps", "solver": ref_name, "options": ref_options,
                 **cell(ref_name, ref_options, reference_steps, reference_steps, weight=reference_steps // 50)}
    bar.close()
    floor = {"label": "real held-out images", "images": len(floor_labels), **quality(floor_images, floor_labels)}
    return {"setup": {"model": str(model_path or "shipped"), "classifier": str(classifier_path or "shipped"),
                      "samples": samples, "labels": "balanced, arange(samples) % 10", "guidance": guidance,
                      "guidance_convention": "w", "spacing": SPACING, "seed": 0,
                      "fd_reference": f"training split ({len(train_images)} images)",
                      "threads": torch.get_num_threads()},
            "budgets": list(budgets), "rows": rows, "reference": reference, "floor": floor,
            "machine": machine_info()}


def _guidance_text(setup: Dict) -> str:
    g = setup["guidance"]
    return "no CFG" if g == (1.0 if setup["guidance_convention"] == "w" else 0.0) else \
        f"CFG {g:g} ({setup['guidance_convention']} convention)"


def render_markdown(report: Dict) -> str:
    budgets = report["budgets"]
    s = report["setup"]

    def fmt(c):
        return f"{c['digits_fd']:.2f} ({100 * c['class_accuracy']:.1f}%)"

    lines = ["| solver | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for row in report["rows"]:
        cells = [fmt(c) + (f" [{c['nfe']}]" if c["nfe"] != c["budget"] else "") for c in row["cells"]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    ref, floor = report["reference"], report["floor"]
    lines += ["", f"| reference | NFE | digits-FD (class accuracy) |", "|---|---:|---:|",
              f"| {ref['label']} | {ref['nfe']} | {fmt(ref)} |",
              f"| floor: {floor['label']} | — | {fmt(floor)} |", "",
              f"digits-FD (lower is better) and class accuracy of {s['samples']} class-conditional samples per cell "
              f"(labels balanced over 0-9), {_guidance_text(s)}, "
              f"{s['spacing']} spacing, seed {s['seed']} (the same starting noise in every cell); FD against the "
              f"{s['fd_reference']}. [n]: the NFE used where the solver cannot meet the budget exactly. The floor "
              f"scores {floor['images']} real held-out images with the same labels the same way.",
              "", f"Machine: {describe_machine(report['machine'])}; {s['threads']} torch threads."]
    return "\n".join(lines)


def plot(report: Dict, path: Path) -> None:
    """digits-FD and class accuracy vs NFE. The FD axis ends well above the reference and the floor;
    a solver that diverges (FD over 10x the reference's) is named in the legend with its range
    instead of squashing the other lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    ref, floor = report["reference"], report["floor"]
    off_chart = 10.0 * ref["digits_fd"]
    shown = [c["digits_fd"] for row in report["rows"] for c in row["cells"] if c["digits_fd"] <= off_chart]
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in report["rows"]:
        nfe = [c["nfe"] for c in row["cells"]]
        fd = [c["digits_fd"] for c in row["cells"]]
        label = row["label"]
        if max(fd) > off_chart:
            label += f" (FD {min(fd):.0f}-{max(fd):.0f}: off the chart)"
        line, = ax_fd.plot(nfe, fd, marker="o", label=label)
        ax_acc.plot(nfe, [100 * c["class_accuracy"] for c in row["cells"]], marker="o", color=line.get_color())
    for r, label, style in ((ref, ref["label"], dict(color="black", ls="--")),
                            (floor, f"floor: {floor['label']}", dict(color="gray", ls=":"))):
        ax_fd.axhline(r["digits_fd"], label=label, **style)
        ax_acc.axhline(100 * r["class_accuracy"], **style)
    ax_fd.set_ylim(0, 1.15 * max(shown + [ref["digits_fd"], floor["digits_fd"]]))
    for ax in (ax_fd, ax_acc):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
        ax.set_xlabel("NFE (model evaluations)")
        ax.grid(True, which="major", alpha=0.3)
    ax_fd.set_ylabel("digits-FD (lower is better)")
    ax_acc.set_ylabel("class accuracy (%)")
    ax_acc.set_ylim(0, 102)
    s = report["setup"]
    fig.suptitle(f"fastdiff digits model: sample quality vs NFE ({s['samples']} samples per point, "
                 f"{_guidance_text(s)})", fontsize=11)
    ax_fd.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: Dict, stem: Path) -> List[Path]:
    """stem.json, stem.md, stem.png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(render_markdown(report) + "\n")
    plot(report, paths[2])
    return paths


def build_parser(prog: str = "python -m benchmarks.quality_table", parser_class=argparse.ArgumentParser):
    p = parser_class(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"solvers {','.join(QUICK_SOLVERS)}, NFE 5,10,20, "
                   "100 samples, a 200-step DDPM reference; writes *_quick files")
    p.add_argument("--samples", type=int, help="samples per cell (default 250, quick 100; at most 350: the "
                   "floor needs as many held-out images per digit)")
    p.add_argument("--nfe", type=lambda t: [int(v) for v in t.split(",")], help="NFE budgets (default 5,10,20,50)")
    p.add_argument("--solvers", type=lambda t: t.split(","), help="subset of solver names (default: all rows)")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale, w convention (default {GUIDANCE:g}: no CFG)")
    p.add_argument("--reference-steps", type=int, help=f"DDPM reference steps (default {REFERENCE_STEPS}, quick 200)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--model", type=Path, help="U-Net weights to judge instead of the shipped ones (checked "
                   "against their .sha256 sidecar)")
    p.add_argument("--classifier", type=Path, help="classifier weights instead of the shipped ones")
    p.add_argument("--out", type=Path, help="output stem (default results/quality_table[_quick])")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None, *, prog: str = "python -m benchmarks.quality_table", parser_class=argparse.ArgumentParser) -> int:
    p = build_parser(prog, parser_class)
    a = p.parse_args(argv)
    samples = a.samples or (100 if a.quick else 250)
    budgets = a.nfe or ([5, 10, 20] if a.quick else list(NFE_BUDGETS))
    reference_steps = a.reference_steps or (200 if a.quick else REFERENCE_STEPS)
    if samples < 2:
        p.error(f"--samples must be >= 2 (FD fits a Gaussian), got {samples}")
    if not budgets or min(budgets) < 1:
        p.error(f"--nfe needs positive budgets, got {budgets}")
    if reference_steps < 1 or (a.threads is not None and a.threads < 1):
        p.error("--reference-steps and --threads must be >= 1")
    names = a.solvers or (list(QUICK_SOLVERS) if a.quick else None)
    solvers = SOLVERS if names is None else [s for s in SOLVERS if s[1] in names]
    if names is not None and {s[1] for s in solvers} != set(names):
        p.error(f"unknown solver rows {sorted(set(names) - {s[1] for s in SOLVERS})}; "
                f"known: {', '.join(s[1] for s in SOLVERS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    report = run(samples=samples, budgets=budgets, solvers=solvers, guidance=a.guidance,
                 reference_steps=reference_steps, model_path=a.model, classifier_path=a.classifier,
                 progress=not a.quiet)
    stem = a.out or RESULTS / ("quality_table_quick" if a.quick else "quality_table")
    paths = write_outputs(report, stem)
    print(render_markdown(report))
    if not a.quiet:
        print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
