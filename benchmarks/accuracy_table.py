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

Second part (issue 13): every new *deterministic* ComfyUI sampler (``COMFY_SOLVERS``: the stochastic
ones at eta = 0 where that makes them an ODE solver) on every spacing of ``SPACINGS`` (karras,
exponential and ComfyUI's schedulers, ``fastdiff.schedules.COMFY_SPACINGS``) at NFE 5/10/20. Some of
ComfyUI's spacings do not span 80 -> 0.002 on this VE problem (``simple``/``beta`` stop at table levels
above 0.002, ``laplace`` at 0.0032, ``linear_quadratic`` at sigma 13-80, ``align_your_steps``/``gits``
are SD1.5 tables 14.6 -> 0.029, ``ddim_uniform`` starts below 80 for few steps): every run starts from
``noise * sigma_start`` of its own grid and is measured against the DOP853 solution from that grid's
first to its own final noise level. Spacings that raise on a VE schedule are skipped and listed
(``sd_turbo``: discrete schedules only; ``optimal_steps``, ``flux``, ``flux2``: flow-matching tables).
The "best" combination at each NFE is taken over the runs whose grid spans the problem (first level
>= sigma_max / 2, last <= 10 sigma_min: ``FULL_RANGE``), since a grid that stops at sigma = 13 is
trivially "accurate". CFG++ samplers (euler_cfg_pp, ..., cfgpp_ud10_ab) need a cond/uncond pair; with one
model and no guidance they reduce to their base samplers, so they are not rows here. ``lcm`` and the
ancestral/SDE forms at eta > 0 are stochastic and not rows either.
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
from fastdiff.schedules import COMFY_SPACINGS, VESchedule, make_grid

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


# Issue 13's deterministic samplers (ComfyUI names; fastdiff solver, options).
COMFY_SOLVERS: List[Tuple[str, str, dict]] = [
    ("res_multistep", "res_multistep", {}),
    ("ipndm", "ipndm", {}),
    ("ipndm_v", "ipndm_v", {}),
    ("deis (tab)", "deis_comfy", {}),
    ("deis (rhoab)", "deis_comfy", {"deis_mode": "rhoab"}),
    ("gradient_estimation", "gradient_estimation", {}),
    ("heunpp2", "heunpp2", {}),
    ("exp_heun_2_x0", "exp_heun_2_x0", {}),
    ("seeds_2 eta=0", "seeds_2", {"eta": 0.0}),
    ("seeds_3 eta=0", "seeds_3", {"eta": 0.0}),
    ("er_sde ODE", "er_sde", {"solver_type": "ODE"}),
    ("sa_solver eta=0", "sa_solver", {"eta": 0.0}),
    ("sa_solver_pece eta=0", "sa_solver_pece", {"eta": 0.0}),
    ("dpmpp_2m_sde_heun eta=0", "dpmpp_2m_sde_heun", {"eta": 0.0}),
    ("uni_pc", "uni_pc", {}),
    ("uni_pc_bh2", "uni_pc_bh2", {}),
]
COMFY_BUDGETS = (5, 10, 20)
SPACINGS: Tuple[str, ...] = ("karras", "exponential") + tuple(COMFY_SPACINGS)


# Why a spacing raises on this VE problem, in short (the JSON keeps the full error messages).
SKIP_REASONS = {"sd_turbo": "timesteps of a discrete DiscreteVP schedule only",
                "optimal_steps": "flow-matching tables (FLUX by default) outside ksigma 0.002-80",
                "flux": "flow-matching schedules only", "flux2": "flow-matching schedules only"}


def full_range(sigma_start: float, sigma_end: float) -> bool:
    """FULL_RANGE: the grid spans the problem (starts >= sigma_max / 2, ends <= 10 sigma_min)."""
    return sigma_start >= SIGMA_MAX / 2 and sigma_end <= 10 * SIGMA_MIN


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


def build_on(name: str, opts: dict, steps: int, spacing: str) -> Sampler:
    grid = make_grid(VESchedule(SIGMA_MIN, SIGMA_MAX), steps, spacing, final="none")
    return Sampler.build(solver=name, solver_options=opts, grid=grid, prediction="sample", state_dtype=torch.float64)


def samplers_by_budget(name: str, opts: dict, spacing: str, budgets: Sequence[int]) -> Dict[int, Sampler]:
    """For each budget, the sampler on ``spacing`` with the most NFE <= budget (then the most steps);
    step counts the spacing refuses (gits: >= 2 steps) are passed over. Raises the spacing's error
    when it refuses every step count."""
    built, error = [], None
    for steps in range(1, max(budgets) + 1):
        try:
            s = build_on(name, opts, steps, spacing)
        except (ValueError, TypeError) as e:
            error = error or e
            continue
        if s.program.nfe > max(budgets):
            break
        built.append(s)
    if not built:
        raise error if error is not None else ValueError(f"{spacing}: no grid within {max(budgets)} NFE")
    out = {}
    for b in budgets:
        fits = [s for s in built if s.program.nfe <= b]
        if fits:
            out[b] = max(fits, key=lambda s: (s.program.nfe, s.grid.steps))
    return out


def run_comfy(dim: int, samples: int, budgets: Sequence[int], solvers, spacings: Sequence[str],
              log=lambda s: None) -> Dict:
    """Every (solver, spacing, budget) cell of the issue-13 grid; each error against the exact ODE
    solution over the run's own grid range (see the module docstring)."""
    schedule = VESchedule(SIGMA_MIN, SIGMA_MAX)
    gm = GaussianMixture.default(schedule, dim=dim, prediction="sample", seed=0)
    noise = torch.randn(samples, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    refs: Dict[Tuple[float, float], torch.Tensor] = {}

    def reference(s0: float, s1: float) -> torch.Tensor:
        if (s0, s1) not in refs:
            refs[(s0, s1)] = gm.solve_ode(noise * s0, s0, s1)
        return refs[(s0, s1)]

    skipped: Dict[str, str] = {}
    cells = []
    t0 = time.time()
    for spacing in spacings:
        for label, name, opts in solvers:
            try:
                chosen = samplers_by_budget(name, opts, spacing, budgets)
            except (ValueError, TypeError) as e:
                skipped.setdefault(spacing, f"{type(e).__name__}: {e}")
                continue
            for b, s in chosen.items():
                s0, s1 = float(s.grid.sigma[0]), float(s.grid.sigma[-1])
                x = s(gm, noise, backend="reference", progress=False)
                err = float((x - reference(s0, s1)).pow(2).mean().sqrt())
                cells.append({"label": label, "solver": name, "options": opts, "spacing": spacing, "budget": b,
                              "nfe": s.program.nfe, "steps": s.grid.steps, "sigma_start": s0, "sigma_end": s1,
                              "full_range": full_range(s0, s1), "rms_error": err})
        if spacing in skipped:
            log(f"{spacing}: skipped ({skipped[spacing]})")
        else:
            log(f"{spacing}: done ({time.time() - t0:.1f} s, {len(refs)} reference solutions)")
    best = {}
    for b in budgets:
        fair = [c for c in cells if c["budget"] == b and c["full_range"]]
        if fair:
            c = min(fair, key=lambda c: c["rms_error"])
            best[str(b)] = {k: c[k] for k in ("label", "solver", "options", "spacing", "nfe", "steps", "rms_error")}
    return {"budgets": list(budgets), "spacings": list(spacings), "skipped_spacings": skipped,
            "solvers": [{"label": l, "solver": n, "options": o} for l, n, o in solvers],
            "full_range_rule": f"sigma_start >= {SIGMA_MAX / 2} and sigma_end <= {10 * SIGMA_MIN}",
            "cells": cells, "best": best}


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


def _cell(c: Dict, with_spacing: bool = False) -> str:
    text = f"{c['rms_error']:.2e}"
    if with_spacing:
        text += f" {c['spacing']}"
    if c["nfe"] != c["budget"]:
        text += f" ({c['nfe']})"
    return text


def render_comfy_summary(comfy: Dict) -> str:
    """The README's view: per solver and NFE the best full-range spacing and its error, the best
    combination per NFE, and per spacing the best solver."""
    budgets, cells = comfy["budgets"], comfy["cells"]
    fair = [c for c in cells if c["full_range"]]
    lines = ["| sampler (issue 13) | " + " | ".join(f"NFE {b}: best spacing" for b in budgets)
             + " | " + " | ".join(f"karras {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets) + "---:|" * len(budgets)]
    for spec in comfy["solvers"]:
        row = []
        for b in budgets:
            mine = [c for c in fair if c["label"] == spec["label"] and c["budget"] == b]
            row.append(_cell(min(mine, key=lambda c: c["rms_error"]), True) if mine else "-")
        for b in budgets:
            k = [c for c in cells if c["label"] == spec["label"] and c["budget"] == b and c["spacing"] == "karras"]
            row.append(_cell(k[0]) if k else "-")
        lines.append(f"| {spec['label']} | " + " | ".join(row) + " |")
    lines.append("")
    for b in budgets:
        c = comfy["best"].get(str(b))
        if c:
            lines.append(f"**Best at NFE {b}: {c['label']} on {c['spacing']}** ({c['rms_error']:.2e}"
                         + (f", {c['nfe']} NFE" if c["nfe"] != b else "") + ").  ")
    lines.append("")
    lines.append("| spacing | " + " | ".join(f"NFE {b}: best sampler" for b in budgets)
                 + f" | range ({max(budgets)}-NFE grid) |")
    lines.append("|---|" + "---|" * len(budgets) + "---|")
    for sp in comfy["spacings"]:
        if sp in comfy["skipped_spacings"]:
            continue
        row = []
        for b in budgets:
            mine = [c for c in cells if c["spacing"] == sp and c["budget"] == b]
            mine = [c for c in mine if c["full_range"]] or mine      # full-range grids first
            if mine:
                c = min(mine, key=lambda c: c["rms_error"])
                row.append(f"{c['rms_error']:.2e} {c['label']}" + (f" ({c['nfe']})" if c["nfe"] != b else "")
                           + ("" if c["full_range"] else " \\*"))
            else:
                row.append("-")
        last = [c for c in cells if c["spacing"] == sp and c["budget"] == max(budgets)]
        rng = "-"
        if last:
            rng = f"{last[0]['sigma_start']:.3g} → {last[0]['sigma_end']:.3g}" + ("" if last[0]["full_range"] else " \\*")
        lines.append(f"| {sp} | " + " | ".join(row) + f" | {rng} |")
    lines.append("")
    lines.append("Each run is measured at its own grid's final noise level against the exact ODE solution over "
                 "its own range; \* = the grid does not span 80 → 0.002 (" + comfy["full_range_rule"]
                 + "), left out of the best-spacing and best-overall picks; (n): NFE used when below the budget. "
                 "Skipped (the spacing raises on a VE schedule): "
                 + "; ".join(f"`{k}` ({SKIP_REASONS.get(k, v)})" for k, v in comfy["skipped_spacings"].items())
                 + ".")
    return "\n".join(lines)


def render_comfy_full(comfy: Dict) -> str:
    """Every cell: per NFE a table of sampler x spacing."""
    spacings = [sp for sp in comfy["spacings"] if sp not in comfy["skipped_spacings"]]
    out = []
    for b in comfy["budgets"]:
        out += [f"### NFE {b}", "", "| sampler | " + " | ".join(spacings) + " |", "|---|" + "---:|" * len(spacings)]
        for spec in comfy["solvers"]:
            row = []
            for sp in spacings:
                c = [c for c in comfy["cells"] if c["label"] == spec["label"] and c["budget"] == b
                     and c["spacing"] == sp]
                row.append(_cell(c[0]) + ("" if c[0]["full_range"] else "\\*") if c else "-")
            out.append(f"| {spec['label']} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def dump_json(report: Dict) -> str:
    """JSON with the issue-13 grid's cells one per line (hundreds of them)."""
    cells = report.get("comfy", {}).get("cells")
    if cells is None:
        return json.dumps(report, indent=1)
    text = json.dumps({**report, "comfy": {**report["comfy"], "cells": "@CELLS@"}}, indent=1)
    return text.replace('"@CELLS@"', "[\n" + ",\n".join("   " + json.dumps(c) for c in cells) + "\n  ]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=lambda t: [int(v) for v in t.split(",")], default=list(NFE_BUDGETS),
                   help="NFE budgets (columns), default 5,10,20,50")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--solvers", type=lambda t: t.split(","), default=None,
                   help="subset of solver names (default: all rows)")
    p.add_argument("--comfy-nfe", type=lambda t: [int(v) for v in t.split(",")], default=list(COMFY_BUDGETS),
                   help="NFE budgets of the issue-13 sampler x spacing grid, default 5,10,20")
    p.add_argument("--no-comfy", action="store_true", help="skip the issue-13 sampler x spacing grid")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model's tensors are tiny)")
    p.add_argument("--json", type=Path, default=RESULTS / "accuracy_table.json")
    p.add_argument("--md", type=Path, default=RESULTS / "accuracy_table.md")
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
    t0 = time.time()
    report = run(a.dim, a.samples, a.nfe, solvers, log)
    markdown = render_markdown(report)
    if not a.no_comfy:
        comfy_solvers = (COMFY_SOLVERS if a.solvers is None
                         else [s for s in COMFY_SOLVERS if s[1] in a.solvers])
        report["comfy"] = run_comfy(a.dim, a.samples, a.comfy_nfe, comfy_solvers, SPACINGS, log)
        markdown += ("\n\n## Issue 13 samplers x spacings (best spacing per cell)\n\n"
                     + render_comfy_summary(report["comfy"])
                     + "\n\n## Full grid: RMS error per sampler and spacing\n\n" + render_comfy_full(report["comfy"]))
    report["seconds"] = round(time.time() - t0, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(dump_json(report) + "\n")
    a.md.write_text(markdown + "\n")
    log(f"wrote {a.json}, {a.md} ({report['seconds']} s)")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
