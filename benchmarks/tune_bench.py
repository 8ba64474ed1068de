"""Tuned time steps vs the best fixed spacing, on the Gaussian mixture and on the shipped digits model.

    python -m benchmarks.tune_bench                    both parts; writes the shipped tables too
    python -m benchmarks.tune_bench --part mixture     error vs NFE (exact ODE reference)
    python -m benchmarks.tune_bench --part digits      digits-FD vs NFE (1000 samples per cell) + plot

Mixture: GaussianMixture.default(dim 4, seed 0) on VE sigma 80 -> 0.002 (final='none'), as the
accuracy table; grids tuned on 64 samples (seed 0) against the DOP853 solution; every grid evaluated
on 256 *other* samples (seed 1): RMS error of x vs the exact ODE solution. "best fixed" is the best
of the spacings karras, exponential, uniform and quadratic at that NFE, on the evaluation batch.

Digits: the shipped model (DiscreteVP cosine, v-prediction), no CFG, final='zero'; grids tuned on
32 samples (seed 0, labels i % 10) against a fine UniPC-3 reference; digits-FD and class accuracy of
1000 other samples (seed 1) per cell; "best fixed" is the best FD of trailing, leading, linspace,
karras and exponential at that NFE.

The tuned grids are written to src/fastdiff/data/tuned_grids.json (loadable with
fastdiff.tune.tuned_grid("mixture/dpmpp_2m/5") etc.); results to benchmarks/results/tune_bench.*.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastdiff import sample, tune
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import VESchedule, make_grid

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = Path(__file__).resolve().parent.parent / "src" / "fastdiff" / "data" / "tuned_grids.json"
SOLVERS = ("dpmpp_2m", "unipc", "ipndm")
MIXTURE_NFE = (4, 5, 6, 7, 8, 9, 10)
MIXTURE_SPACINGS = ("karras", "exponential", "uniform", "quadratic")
DIGITS_NFE = (4, 5, 6, 7, 8, 9, 10)
DIGITS_SPACINGS = ("trailing", "leading", "linspace", "karras", "exponential")


def _load_tables() -> dict:
    if TABLES.is_file():
        return json.loads(TABLES.read_text())
    return {"format": 1, "grids": {}}


def _store(tables: dict, name: str, grid, **meta):
    tables["grids"][name] = {"format": 1, "ksigma": [float(v) for v in grid.ksigma],
                             "schedule": tune._schedule_spec(grid.schedule), **meta}


def mixture_part(tables: dict, log=print) -> dict:
    sched = VESchedule(0.002, 80.0)
    gm = GaussianMixture.default(sched, dim=4, prediction="sample", seed=0)

    tune_noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eval_noise = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = gm.solve_ode(eval_noise * 80.0, 80.0, 0.002, rtol=1e-10, atol=1e-10)

    def err(solver, grid):
        x = sample(gm, eval_noise, solver=solver, grid=grid, prediction="sample", backend="reference",
                   state_dtype=torch.float64, progress=False)
        return float((x - truth).pow(2).mean().sqrt())

    rows = []
    for solver in SOLVERS:
        for nfe in MIXTURE_NFE:
            fixed = {sp: err(solver, make_grid(sched, nfe, sp, final="none")) for sp in MIXTURE_SPACINGS}
            best_sp = min(fixed, key=fixed.get)
            t0 = time.perf_counter()
            grid, info = tune.tune_grid(gm, tune_noise, solver=solver, steps=nfe, schedule=sched, prediction="sample",
                                        final="none", reference=gm.ode_trajectory, candidates=40, max_evals=200, return_info=True)
            secs = time.perf_counter() - t0
            tuned = err(solver, grid)
            _store(tables, f"mixture/{solver}/{nfe}", grid, solver=solver, nfe=nfe,
                   tuned_on="GaussianMixture.default(VESchedule(0.002, 80), dim=4, seed=0), 64 samples")
            rows.append({"solver": solver, "nfe": nfe, "fixed": fixed, "best_fixed": best_sp,
                         "best_fixed_error": fixed[best_sp], "tuned_error": tuned, "tune_seconds": secs,
                         "tune_model_calls": info.model_calls, "ksigma": [float(v) for v in grid.ksigma]})
            log(f"mixture {solver} NFE {nfe}: best fixed {best_sp} {fixed[best_sp]:.3e}, tuned {tuned:.3e} "
                f"({secs:.1f} s)")
    return {"rows": rows}


def digits_part(tables: dict, n_eval: int = 1000, log=print) -> dict:
    from fastdiff.models import digits as D
    from fastdiff.models import digits_fd as F

    model = D.load_digits_model().eval()
    sched = D.digits_schedule()
    ref_images = D.load_digits_data("train")[0]
    clf = F.load_digits_classifier()
    tune_labels = torch.arange(32) % 10
    eval_labels = torch.arange(n_eval) % 10
    tune_noise = torch.randn((32,) + D.IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    eval_noise = torch.randn((n_eval,) + D.IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def quality(solver, grid):
        x = sample(model, eval_noise, solver=solver, grid=grid, prediction=D.PREDICTION,
                   cond={"class_labels": eval_labels}, progress=False)
        q = F.sample_quality(x, eval_labels, ref_images, classifier=clf)
        return q["digits_fd"], q["class_accuracy"]

    rows = []
    for solver in SOLVERS:
        for nfe in DIGITS_NFE:
            fixed = {sp: quality(solver, make_grid(sched, nfe, sp, final="zero")) for sp in DIGITS_SPACINGS}
            best_sp = min(fixed, key=lambda k: fixed[k][0])
            t0 = time.perf_counter()
            with torch.no_grad():
                grid, info = tune.tune_grid(model, tune_noise, solver=solver, steps=nfe, schedule=sched,
                                            prediction=D.PREDICTION, cond={"class_labels": tune_labels},
                                            candidates=32, max_evals=120, return_info=True)
            secs = time.perf_counter() - t0
            fd, acc = quality(solver, grid)
            _store(tables, f"digits/{solver}/{nfe}", grid, solver=solver, nfe=nfe,
                   tuned_on="the shipped digits model, no CFG, 32 samples")
            rows.append({"solver": solver, "nfe": nfe, "fixed": {k: {"fd": v[0], "acc": v[1]} for k, v in fixed.items()},
                         "best_fixed": best_sp, "best_fixed_fd": fixed[best_sp][0], "tuned_fd": fd, "tuned_acc": acc,
                         "tune_seconds": secs, "tune_error_start": info.error_start,
                         "tune_error_final": info.error_final, "ksigma": [float(v) for v in grid.ksigma]})
            log(f"digits {solver} NFE {nfe}: best fixed {best_sp} FD {fixed[best_sp][0]:.3f}, tuned FD {fd:.3f} "
                f"({secs:.1f} s)")
    return {"rows": rows, "n_eval": n_eval}


def render(report: dict) -> str:
    lines = []
    if "mixture" in report:
        lines += ["Gaussian mixture (dim 4, VE 80 -> 0.002), RMS error vs the exact ODE solution on 256 evaluation "
                  "samples; tuned on 64 other samples. best fixed: the best of " + ", ".join(MIXTURE_SPACINGS) + ".", "",
                  "| solver | NFE | best fixed (spacing) | tuned | tuned NFE-5 vs best fixed NFE-10 |",
                  "|---|---:|---:|---:|---|"]
        rows = report["mixture"]["rows"]
        for r in rows:
            ten = next((q for q in rows if q["solver"] == r["solver"] and q["nfe"] == 10), None)
            note = ""
            if r["nfe"] == 5 and ten is not None:
                note = ("yes" if r["tuned_error"] <= ten["best_fixed_error"] else "no") + \
                       f" ({r['tuned_error']:.2e} vs {ten['best_fixed_error']:.2e})"
            lines.append(f"| {r['solver']} | {r['nfe']} | {r['best_fixed_error']:.2e} ({r['best_fixed']}) | "
                         f"{r['tuned_error']:.2e} | {note} |")
        lines.append("")
    if "digits" in report:
        lines += [f"Digits model, digits-FD of {report['digits']['n_eval']} samples per cell (lower is better), no CFG; "
                  "best fixed: the best of " + ", ".join(DIGITS_SPACINGS) + ".", "",
                  "| solver | NFE | best fixed FD (spacing) | tuned FD | tuned accuracy |", "|---|---:|---:|---:|---:|"]
        for r in report["digits"]["rows"]:
            lines.append(f"| {r['solver']} | {r['nfe']} | {r['best_fixed_fd']:.3f} ({r['best_fixed']}) | "
                         f"{r['tuned_fd']:.3f} | {100 * r['tuned_acc']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, solver in enumerate(SOLVERS):
        rows = [r for r in report["digits"]["rows"] if r["solver"] == solver]
        nfe = [r["nfe"] for r in rows]
        ax.plot(nfe, [r["best_fixed_fd"] for r in rows], f"C{i}--o", label=f"{solver}, best fixed spacing")
        ax.plot(nfe, [r["tuned_fd"] for r in rows], f"C{i}-s", label=f"{solver}, tuned grid")
    ax.set_xlabel("NFE (model evaluations)")
    ax.set_ylabel("digits-FD (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Shipped digits model: tuned time steps vs the best fixed spacing")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("mixture", "digits", "all"), default="all")
    p.add_argument("--n-eval", type=int, default=1000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = RESULTS / "tune_bench.json"
    report = json.loads(out.read_text()) if out.is_file() else {}
    tables = _load_tables()
    if a.part in ("mixture", "all"):
        report["mixture"] = mixture_part(tables)
    if a.part in ("digits", "all"):
        report["digits"] = digits_part(tables, a.n_eval)
    TABLES.parent.mkdir(parents=True, exist_ok=True)
    TABLES.write_text(json.dumps(tables, indent=1, sort_keys=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    (RESULTS / "tune_bench.md").write_text(render(report))
    if "digits" in report:
        plot(report, RESULTS / "tune_bench_digits.png")
    print(render(report))


if __name__ == "__main__":
    main()
