"""Model calls and fused-step kernel calls per sampling run, for every sampler of issue 13.

    python -m benchmarks.call_count             # markdown table + results/call_count.{json,md}
    python -m benchmarks.call_count --steps 10

fastdiff.Sampler runs a solver as a program of rows; each row is at most one model call and exactly
one call of the fused-step kernel (``ops.prepare_fused_step`` returns it once per run). This
benchmark counts both, at run time, for each of ComfyUI's sampler names that issue 13 adds (default
options; the CFG++ ones with guidance 2.0 and a cond/uncond pair, which is still one batched model
call per evaluation), on a VE Karras grid of ``--steps`` steps ending at sigma = 0, on the analytic
Gaussian mixture. "fused == model" is the claim: no extra kernel launches between model
evaluations. The documented exception: heunpp2 with EDM churn (``s_churn > 0``) adds one
noise-only row (a fused call without a model call) on each churned step; it is measured here too.

Counting: the model is wrapped in a counter; ``fastdiff.ops.prepare_fused_step`` is wrapped so the
step function it returns counts its calls (the sampler looks it up as ``ops.prepare_fused_step``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import fastdiff.ops as ops
from fastdiff import Sampler
from fastdiff.models.gaussian_mixture import GaussianMixture
from fastdiff.schedules import VESchedule, make_grid
from fastdiff.solvers import SOLVERS

RESULTS = Path(__file__).resolve().parent / "results"

# Issue 13's sampler list (ComfyUI name -> fastdiff solver); the table of tests/test_comfy_samplers.py.
ISSUE13 = {
    "euler_cfg_pp": "euler_cfg_pp", "euler_ancestral_cfg_pp": "euler_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp": "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral_cfg_pp",
    "res_multistep": "res_multistep", "res_multistep_cfg_pp": "res_multistep_cfg_pp",
    "res_multistep_ancestral": "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral_cfg_pp",
    "gradient_estimation": "gradient_estimation", "gradient_estimation_cfg_pp": "gradient_estimation_cfg_pp",
    "heunpp2": "heunpp2", "exp_heun_2_x0": "exp_heun_2_x0", "exp_heun_2_x0_sde": "exp_heun_2_x0_sde",
    "seeds_2": "seeds_2", "seeds_3": "seeds_3", "er_sde": "er_sde", "sa_solver": "sa_solver",
    "sa_solver_pece": "sa_solver_pece", "ipndm": "ipndm", "ipndm_v": "ipndm_v", "deis": "deis_comfy",
    "lcm": "lcm", "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun", "cfgpp_ud10_ab": "cfgpp_ud10_ab",
    "ddim": "ddim", "uni_pc": "uni_pc", "uni_pc_bh2": "uni_pc_bh2",
}
CFG_PP = {n for n in ISSUE13 if "cfg_pp" in n or n == "cfgpp_ud10_ab"}
GUIDANCE = 2.0
# (label, ComfyUI name, options): option sets besides the defaults (heunpp2 with churn: the exception)
EXTRA_CASES: List[Tuple[str, str, dict]] = [
    ("heunpp2 s_churn=4", "heunpp2", {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 30.0, "s_noise": 1.007}),
    ("deis rhoab", "deis", {"deis_mode": "rhoab"}),
    ("er_sde ODE", "er_sde", {"solver_type": "ODE"}),
    ("sa_solver_pece eta=0", "sa_solver_pece", {"eta": 0.0}),
]


@contextlib.contextmanager
def counting_fused_steps():
    """Count the calls of every fused-step function that ``ops.prepare_fused_step`` returns."""
    counter = {"fused": 0, "prepared": 0}
    original = ops.prepare_fused_step

    def prepare(*args, **kwargs):
        step = original(*args, **kwargs)
        counter["prepared"] += 1

        def counted(*a, **k):
            counter["fused"] += 1
            return step(*a, **k)
        return counted

    ops.prepare_fused_step = prepare
    try:
        yield counter
    finally:
        ops.prepare_fused_step = original


def count_calls(comfy_name: str, options: Optional[dict] = None, steps: int = 10, batch: int = 4,
                dim: int = 4) -> Dict:
    """One sampling run of ComfyUI's ``comfy_name`` (its fastdiff solver): model calls, fused-step
    calls, rows, noise-only rows (rows without a model call), program NFE."""
    solver = ISSUE13[comfy_name]
    schedule = VESchedule(0.002, 80.0)
    grid = make_grid(schedule, steps, "karras")
    cfg = comfy_name in CFG_PP
    sampler = Sampler.build(solver=solver, solver_options=options or {}, grid=grid, prediction="sample",
                            guidance=GUIDANCE if cfg else None)
    gm = GaussianMixture.default(schedule, dim=dim, prediction="sample", seed=0)
    calls = {"model": 0, "model_batch_rows": 0}

    def model(x, t, **kw):
        calls["model"] += 1
        calls["model_batch_rows"] += x.shape[0]
        return gm(x, t)

    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0))
    run = dict(cond={"c": torch.ones(batch)}, uncond={"c": torch.zeros(batch)}) if cfg else {}
    with counting_fused_steps() as counter:
        x = sampler(model, noise, seed=1, progress=False, backend="reference", **run)
    rows = sampler.program.rows
    return {"name": comfy_name, "solver": solver, "options": {k: v for k, v in (options or {}).items()},
            "guidance": GUIDANCE if cfg else None, "steps": grid.steps, "rows": len(rows),
            "program_nfe": sampler.program.nfe, "model_calls": calls["model"], "fused_calls": counter["fused"],
            "prepared": counter["prepared"], "noise_only_rows": sum(1 for r in rows if not r.needs_model),
            "finite": bool(torch.isfinite(x).all())}


def run(steps: int) -> Dict:
    results, missing = [], []
    for name, solver in ISSUE13.items():
        if solver not in SOLVERS:
            missing.append(name)
            continue
        results.append({"label": name, **count_calls(name, steps=steps)})
    for label, name, opts in EXTRA_CASES:
        if ISSUE13[name] in SOLVERS:
            results.append({"label": label, **count_calls(name, opts, steps=steps)})
    return {"steps": steps, "grid": "VE karras 80 -> 0.002, final 0", "results": results,
            "not_yet_solvers": missing, "torch": torch.__version__}


def render_markdown(report: Dict) -> str:
    lines = ["| sampler | model calls | fused-step calls | noise-only rows | fused == model |",
             "|---|---:|---:|---:|:---:|"]
    for r in report["results"]:
        ok = "yes" if r["fused_calls"] == r["model_calls"] else f"+{r['fused_calls'] - r['model_calls']} (churn)" \
            if r["noise_only_rows"] == r["fused_calls"] - r["model_calls"] else "**no**"
        label = r["label"] + (f" (CFG {r['guidance']})" if r["guidance"] else "")
        lines.append(f"| {label} | {r['model_calls']} | {r['fused_calls']} | {r['noise_only_rows']} | {ok} |")
    lines.append("")
    lines.append(f"One run each, {report['steps']} steps on a {report['grid']} grid, default options unless "
                 "named; model calls counted by wrapping the model, fused-step calls by wrapping the step "
                 "function `ops.prepare_fused_step` returns (prepared once per run). CFG rows run cond and "
                 "uncond as one batched model call."
                 + (f" Not solvers yet (issue 13, in progress): {', '.join(report['not_yet_solvers'])}."
                    if report["not_yet_solvers"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.call_count", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", type=Path, default=RESULTS / "call_count.json")
    p.add_argument("--md", type=Path, default=RESULTS / "call_count.md")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2")
    torch.set_num_threads(1)
    report = run(a.steps)
    markdown = render_markdown(report)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1) + "\n")
    a.md.write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
