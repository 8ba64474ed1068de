"""Error vs number of model evaluations (NFE) for every deterministic solver, on the Gaussian mixture.

    python -m benchmarks.accuracy_table                 # markdown table + results/accuracy_table.json
    python -m benchmarks.accuracy_table --nfe 5,10,20,50 --dim 4 --samples 64

The problem: fastdiff.models.GaussianMixture.default (3 components, seed 0) in ``--dim``
dimensions on the EDM/VE schedule (sigma 80 -> 0.002), ``--samples`` starting points x_T = 80 z
(fixed seed). Every solver runs on the Karras grid (rho = 7) that ends at sigma_min = 0.002
(final='none': no denoising step), in float64 with the reference backend and the model's exact
x0 prediction; the reference is the probability-flow ODE solved by scipy's DOP853 (rtol = atol =
1e-12) over the same range. The error is the RMS over samples and dimensions of x - x_ref
(the data have unit scale).

Each cell uses the largest number of steps whose NFE does not exceed the column's budget; a cell
whose solver needs fewer evaluations than the budget (multi-stage solvers) shows the NFE it used.
Solvers run with their default options (diffusers' lower_order_final=True where they have it,
which lowers the order of the last steps below 15 steps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from fastdiff import Sampler
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import VESchedule, make_grid

RESULTS = Path(__file__).resolve().parent / "results"
NFE_BUDGETS = (5, 10, 20, 50)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

# (label, solver name, options): the foundation's solvers for reference, then the zoo.
SOLVERS: List[Tuple[str, str, dict]] = [
    ("DDIM", "ddim", {}),
    ("Euler", "euler", {}),
    ("Heun (EDM)", "heun", {}),
    ("RK4", "rk4", {}),
    ("DPM-2", "dpm_2", {}),
    ("DPM-Solver-2 (singlestep)", "dpm_solver", {"order": 2}),
    ("DPM-Solver-3 (singlestep)", "dpm_solver", {"order": 3}),
    ("DPM-Solver-2M (noise)", "dpm_solver_multistep", {"order": 2}),
    ("DPM-Solver-3M (noise)", "dpm_solver_multistep", {"order": 3}),
    ("DPM-Solver++(2M)", "dpmpp_2m", {}),
    ("DPM-Solver++(2S)", "dpmpp_2s", {}),
    ("DPM-Solver++(3M)", "dpmpp_3m", {}),
    ("DPM-Solver++(3M), Taylor D2", "dpmpp_3m", {"third_order": "taylor"}),
    ("LMS-2", "lms", {"order": 2}),
    ("LMS-3", "lms", {"order": 3}),
    ("LMS-4", "lms", {"order": 4}),
    ("DEIS-2", "deis", {"order": 2}),
    ("DEIS-3", "deis", {"order": 3}),
    ("UniPC-1 bh2", "unipc", {"order": 1}),
    ("UniPC-2 bh1", "unipc", {"order": 2, "solver_type": "bh1"}),
    ("UniPC-2 bh2", "unipc", {"order": 2}),
    ("UniPC-3 bh1", "unipc", {"order": 3, "solver_type": "bh1"}),
    ("UniPC-3 bh2", "unipc", {"order": 3}),
    ("UniP-3 (no corrector)", "unipc", {"order": 3, "use_corrector": False}),
    ("Euler, flow coordinates", "flow_euler", {}),
    ("Heun, flow coordinates", "flow_heun", {}),
]


def build(name: str, opts: dict, steps: int) -> Sampler:
    grid = make_grid(VESchedule(SIGMA_MIN, SIGMA_MAX), steps, "karras", final="none")
    return Sampler.build(solver=name, solver_options=opts, grid=grid, prediction="sample", state_dtype=torch.float64)


def sampler_within(name: str, opts: dict, budget: int) -> Sampler:
    """The sampler with the most steps whose NFE <= budget (at least one step)."""
    best = build(name, opts, 1)
    for steps in range(2, budget + 1):
        s = build(name, opts, steps)
        if s.program.nfe > budget:
            break
        best = s
    return best


def run(dim: int, samples: int, budgets: Sequence[int], solvers, log=lambda s: None) -> Dict:
    schedule = VESchedule(SIGMA_MIN, SIGMA_MAX)
    gm = GaussianMixture.default(schedule, dim=dim, prediction="sample", seed=0)
    noise = torch.randn(samples, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    ref = gm.solve_ode(noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)
    log(f"reference DOP853 solution: {time.time() - t0:.1f} s")
    rows = []
    for label, name, opts in solvers:
        cells = []
        for budget in budgets:
            s = sampler_within(name, opts, budget)
            x = s(gm, noise, backend="reference", progress=False)
            err = float((x - ref).pow(2).mean().sqrt())
            cells.append({"budget": budget, "nfe": s.program.nfe, "steps": s.grid.steps, "rms_error": err})
        rows.append({"label": label, "solver": name, "options": opts, "cells": cells})
        log(f"{label}: " + ", ".join(f"{c['nfe']} NFE {c['rms_error']:.2e}" for c in cells))
    return {"problem": {"mixture": "GaussianMixture.default(seed=0)", "dim": dim, "samples": samples,
                        "schedule": f"VE sigma {SIGMA_MAX} -> {SIGMA_MIN}", "grid": "karras rho=7, final='none'",
                        "reference": "scipy DOP853 rtol=atol=1e-12", "error": "RMS of x - x_ref"},
            "budgets": list(budgets), "rows": rows, "torch": torch.__version__}


def render_markdown(report: Dict) -> str:
    budgets = report["budgets"]
    lines = ["| solver | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for row in report["rows"]:
        cells = [f"{c['rms_error']:.2e}" + (f" ({c['nfe']})" if c["nfe"] != c["budget"] else "") for c in row["cells"]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    p = report["problem"]
    lines.append("")
    lines.append(f"RMS error at sigma = {SIGMA_MIN} vs the {p['reference']} solution; GaussianMixture in {p['dim']} "
                 f"dimensions, {p['samples']} samples, {p['grid']}; (n): the NFE used when below the budget.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=lambda t: [int(v) for v in t.split(",")], default=list(NFE_BUDGETS),
                   help="NFE budgets (columns), default 5,10,20,50")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--solvers", type=lambda t: t.split(","), default=None,
                   help="subset of solver names (default: all rows)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model's tensors are tiny)")
    p.add_argument("--json", type=Path, default=RESULTS / "accuracy_table.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if not a.nfe or min(a.nfe) < 1:
        p.error(f"--nfe needs positive budgets, got {a.nfe}")
    if a.dim < 1 or a.samples < 1 or a.threads < 1:
        p.error("--dim, --samples and --threads must be >= 1")
    solvers = SOLVERS if a.solvers is None else [s for s in SOLVERS if s[1] in a.solvers]
    if not solvers:
        p.error(f"no rows for solvers {a.solvers}; known: {sorted({s[1] for s in SOLVERS})}")
    torch.set_num_threads(a.threads)
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    report = run(a.dim, a.samples, a.nfe, solvers, log)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {a.json}")
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
