"""Per-step overhead of the whole sampling loop, with a model that costs nothing.

    python -m benchmarks.loop_overhead             # table + results/loop_overhead.json
    python -m benchmarks.loop_overhead --profile   # + cProfile of the fastdiff loop

The "model" returns a preallocated [2B, 4, 8, 8] tensor (both CFG halves), so what is timed is
everything around the model: the solver step, CFG, building the next model input, the loop's
own bookkeeping. At 1×4×8×8 the tensor math is negligible; this is the host cost per step.

Loops (guided, CFG scale 7.5, DPM-Solver++(2M) on Stable Diffusion 1.5's schedule):

* fastdiff.Sampler: built once (coefficient program compiled), then called: ``sampler(model, noise, ...)``.
* fastdiff.sample: the one-call form, which builds the Sampler on every call.
* diffusers pipeline-style: set_timesteps, then per step torch.cat([latents] * 2),
  scheduler.scale_model_input, model, CFG, scheduler.step (DPMSolverMultistepScheduler),
  as StableDiffusionPipeline's denoising loop does.

Reported per step: the whole call divided by the steps (20, a typical run), and the split of a
call into a fixed part and a marginal cost per step, from a straight line through the times at
``--fit-steps`` step counts.

Thread settings matter more than the loops (issue 17): with 2 threads, each of eager PyTorch's
small ops in diffusers' loop wakes libgomp's worker, which then spins (OMP_WAIT_POLICY active by
default) and competes for the other core. ``--variants`` measures each setting in a fresh
subprocess (the wait policy is read once, when libgomp starts) and repeats it ``--runs`` times:

    python -m benchmarks.loop_overhead --variants 1,2,2p --runs 3   # 1 thread; 2; 2 with OMP_WAIT_POLICY=PASSIVE

and reports each loop's µs per step and the diffusers ÷ fastdiff ratio as median and range
(min–max) over the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch

import fastdiff

from . import baselines as bl
from .step_bench import RESULTS
from .timing import describe_machine, load_average, machine_info, measure_interleaved, torch_threads

SHAPE = (1, 4, 8, 8)
STEPS = 20
FIT_STEPS = (10, 20, 40)
TARGET_US = 25.0            # issue 4: whole-loop overhead per step at 1×4×8×8


def zero_cost_model(output: torch.Tensor) -> Callable:
    """model(x, t, **kwargs) -> the same preallocated tensor, whatever the input."""
    def model(x, t, **kwargs):
        return output
    return model


def fastdiff_sampler_loop(steps: int, model: Callable, noise: torch.Tensor) -> Callable[[], torch.Tensor]:
    sampler = bl.fastdiff_sampler_like(bl.sd15_dpm_scheduler(steps))
    return lambda: sampler(model, noise, cond={}, uncond={}, progress=False, seed=0)


def fastdiff_sample_loop(steps: int, model: Callable, noise: torch.Tensor) -> Callable[[], torch.Tensor]:
    from fastdiff.schedules import DiscreteVP
    schedule = DiscreteVP(beta_schedule="scaled_linear")
    return lambda: fastdiff.sample(model, noise, solver="dpmpp_2m", steps=steps, schedule=schedule,
                                   spacing="linspace", prediction="epsilon", guidance=bl.GUIDANCE,
                                   cond={}, uncond={}, progress=False, seed=0)


def diffusers_pipeline_loop(steps: int, model: Callable, noise: torch.Tensor) -> Callable[[], torch.Tensor]:
    scheduler = bl.sd15_dpm_scheduler(steps)
    guidance = bl.GUIDANCE

    def run():
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2)
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = model(latent_model_input, t)
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        return latents
    return run


LOOPS: Dict[str, tuple] = {
    "fastdiff_sampler": ("fastdiff.Sampler (built once, called)", fastdiff_sampler_loop),
    "fastdiff_sample": ("fastdiff.sample (builds the sampler every call)", fastdiff_sample_loop),
    "diffusers": ("diffusers pipeline-style loop", diffusers_pipeline_loop),
}


def run(loops: Sequence[str], threads: int, fit_steps: Sequence[int], *, min_samples: int, min_time: float,
        clock: str = "wall", log=lambda s: None) -> dict:
    info = machine_info()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=gen)
    model = zero_cost_model(torch.randn((2 * SHAPE[0],) + SHAPE[1:], generator=gen))
    results = []
    step_counts = sorted(set(fit_steps) | {STEPS})
    with torch_threads(threads):
        # Every (loop, steps) pair measured together, samples interleaved.
        timings = measure_interleaved({(key, n): LOOPS[key][1](n, model, noise) for key in loops for n in step_counts},
                                      min_samples=min_samples, min_time=min_time, clock=clock)
        for key in loops:
            label = LOOPS[key][0]
            per_steps = {n: timings[(key, n)] for n in step_counts}
            for n, t in per_steps.items():
                log(f"{key:18s} steps={n:3d}: {t.median * 1e6:9.1f} us per call ({t.median / n * 1e6:.1f} per step)")
            ns = np.array(sorted(fit_steps), dtype=float)
            slope, fixed = np.polyfit(ns, [per_steps[int(n)].median for n in ns], 1)
            t20 = per_steps[STEPS]
            results.append({"loop": key, "label": label, "steps": STEPS, "call_median_s": t20.median,
                            "call_iqr_s": t20.iqr, "samples": t20.samples, "per_step_s": t20.median / STEPS,
                            "marginal_per_step_s": float(slope), "fixed_per_call_s": float(fixed),
                            "calls": {str(n): t.as_dict() for n, t in per_steps.items()}})
    info["load_average_end"] = load_average()
    return {"machine": info, "settings": {"shape": list(SHAPE), "threads": threads, "fit_steps": list(fit_steps),
                                          "guidance": bl.GUIDANCE, "min_samples": min_samples, "clock": clock,
                                          "min_time_s": min_time}, "results": results,
            "target_us_per_step": TARGET_US}


def render_markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [f"Machine: {describe_machine(m)}; load {m['load_average_start']} at start, {m['load_average_end']} at end.",
             f"Zero-cost model, {'×'.join(map(str, s['shape']))}, CFG {s['guidance']}, DPM-Solver++(2M), "
             f"threads={s['threads']}; medians ({s.get('clock', 'wall')} clock).", "",
             f"| loop | µs per call ({STEPS} steps) | µs per step | fixed µs per call | marginal µs per step |",
             "|---|---:|---:|---:|---:|"]
    by_key = {r["loop"]: r for r in report["results"]}
    for r in report["results"]:
        lines.append(f"| {r['label']} | {r['call_median_s'] * 1e6:,.0f} | {r['per_step_s'] * 1e6:.1f} | "
                     f"{r['fixed_per_call_s'] * 1e6:,.0f} | {r['marginal_per_step_s'] * 1e6:.1f} |")
    lines.append("")
    f, d = by_key.get("fastdiff_sampler"), by_key.get("diffusers")
    if f is not None:
        us = f["per_step_s"] * 1e6
        lines.append(f"Target: fastdiff.Sampler ≤ {report['target_us_per_step']:g} µs per step: {us:.1f} µs "
                     f"({'met' if us <= report['target_us_per_step'] else 'MISSED'})"
                     + (f"; diffusers' loop is {d['per_step_s'] / f['per_step_s']:.1f}× slower per step." if d else "."))
    return "\n".join(lines)


def parse_variant(text: str) -> tuple:
    """'1' -> (1, None), '2p' -> (2, 'PASSIVE'), '2a' -> (2, 'ACTIVE'): threads and OMP_WAIT_POLICY."""
    t = text.strip().lower()
    policy = {"p": "PASSIVE", "a": "ACTIVE"}.get(t[-1:]) if t[-1:] in ("p", "a") else None
    digits = t[:-1] if policy else t
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"a variant is a thread count with an optional p (passive) or a (active) wait policy, "
                         f"e.g. 1, 2, 2p; got {text!r}")
    return int(digits), policy


def variant_label(threads: int, policy) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}" + (f", OMP_WAIT_POLICY={policy}" if policy else "")


def run_variants(variants: Sequence[str], runs: int, loops: Sequence[str], passthrough: Sequence[str],
                 log=lambda s: None) -> dict:
    """Each variant ``runs`` times, each run a fresh ``python -m benchmarks.loop_overhead`` process
    (so OMP_WAIT_POLICY applies and no run inherits another's warm state); variants interleaved
    run by run. Returns {"variants": [...], "runs": {variant: [report, ...]}}."""
    parsed = [(v, *parse_variant(v)) for v in variants]
    reports: Dict[str, list] = {v: [] for v, _, _ in parsed}
    with tempfile.TemporaryDirectory(prefix="fastdiff_loop_") as tmp:
        for r in range(runs):
            for v, threads, policy in parsed:
                out = Path(tmp) / f"{v}_{r}.json"
                env = dict(os.environ)
                env.pop("OMP_WAIT_POLICY", None)
                if policy:
                    env["OMP_WAIT_POLICY"] = policy
                cmd = [sys.executable, "-m", "benchmarks.loop_overhead", "--threads", str(threads), "--loops",
                       ",".join(loops), "--json", str(out), "--quiet", *passthrough]
                log(f"run {r + 1}/{runs}: {variant_label(threads, policy)}")
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                               cwd=str(Path(__file__).resolve().parent.parent))
                rep = json.loads(out.read_text())
                rep["settings"]["omp_wait_policy"] = policy
                reports[v].append(rep)
    return {"variants": [{"variant": v, "threads": t, "omp_wait_policy": p} for v, t, p in parsed],
            "runs": reports}


def _med_range(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    v = sorted(values)
    return f"{fmt.format(float(np.median(v)))} ({fmt.format(v[0])}–{fmt.format(v[-1])})"


def render_variants(result: dict) -> str:
    runs = len(next(iter(result["runs"].values())))
    first = next(iter(result["runs"].values()))[0]
    m = first["machine"]
    loops = [r["loop"] for r in first["results"]]
    labels = {r["loop"]: r["label"] for r in first["results"]}
    lines = [f"Machine: {describe_machine(m)}; load {m['load_average_start']} at the first run's start.",
             f"Zero-cost model, {'×'.join(map(str, first['settings']['shape']))}, CFG {bl.GUIDANCE}, DPM-Solver++(2M), "
             f"{STEPS} steps; µs per step, median (min–max) of {runs} runs, each a fresh process "
             f"({first['settings'].get('clock', 'wall')} clock).", "",
             "| setting | " + " | ".join(labels[k] for k in loops)
             + (" | diffusers ÷ fastdiff.Sampler |" if {"diffusers", "fastdiff_sampler"} <= set(loops) else " |"),
             "|---|" + "---:|" * (len(loops) + ({"diffusers", "fastdiff_sampler"} <= set(loops)))]
    for v in result["variants"]:
        reps = result["runs"][v["variant"]]
        per = {k: [next(r for r in rep["results"] if r["loop"] == k)["per_step_s"] * 1e6 for rep in reps]
               for k in loops}
        cells = [_med_range(per[k]) for k in loops]
        if {"diffusers", "fastdiff_sampler"} <= set(loops):
            cells.append(_med_range([d / f for d, f in zip(per["diffusers"], per["fastdiff_sampler"])]) + "×")
        lines.append(f"| {variant_label(v['threads'], v['omp_wait_policy'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_fastdiff(top: int = 25) -> str:
    """cProfile of 200 fastdiff.Sampler calls (20 steps each), sorted by own time."""
    import cProfile
    import io
    import pstats

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=gen)
    fn = fastdiff_sampler_loop(STEPS, zero_cost_model(torch.randn((2,) + SHAPE[1:], generator=gen)), noise)
    for _ in range(20):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loop_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples")
    p.add_argument("--loops", type=lambda t: t.split(","), default=list(LOOPS), help=f"subset of {', '.join(LOOPS)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--fit-steps", type=lambda t: [int(v) for v in t.split(",")], default=list(FIT_STEPS))
    p.add_argument("--min-samples", type=int)
    p.add_argument("--min-time", type=float)
    p.add_argument("--json", type=Path, default=None, help="default results/loop_overhead.json "
                   "(quick: results/loop_overhead_quick.json)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time (leaves out waiting for a core)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the fastdiff loop")
    p.add_argument("--variants", type=lambda t: t.split(","), default=None,
                   help="thread settings measured each in fresh subprocesses, e.g. 1,2,2p (p: "
                        "OMP_WAIT_POLICY=PASSIVE, a: ACTIVE); with --runs")
    p.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    bad = [k for k in a.loops if k not in LOOPS]
    if bad:
        p.error(f"unknown loop(s) {bad}; expected some of {', '.join(LOOPS)}")
    if len(set(a.fit_steps)) < 2 or min(a.fit_steps) < 1:
        p.error(f"--fit-steps needs at least two distinct positive step counts, got {a.fit_steps}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if a.variants is not None:
        try:
            for v in a.variants:
                parse_variant(v)
        except ValueError as e:
            p.error(str(e))
        if a.runs < 1:
            p.error(f"--runs must be >= 1, got {a.runs}")
        passthrough = ["--fit-steps", ",".join(map(str, a.fit_steps)), "--clock", a.clock]
        if a.quick:
            passthrough.append("--quick")
        if a.min_samples is not None:
            passthrough += ["--min-samples", str(a.min_samples)]
        if a.min_time is not None:
            passthrough += ["--min-time", str(a.min_time)]
        result = run_variants(a.variants, a.runs, a.loops, passthrough, log=log)
        out = a.json or RESULTS / "loop_overhead_variants.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")
        print(render_variants(result))
        return 0
    report = run(a.loops, a.threads, a.fit_steps, min_samples=a.min_samples or (5 if a.quick else 31),
                 min_time=a.min_time if a.min_time is not None else (0.1 if a.quick else 1.0), clock=a.clock,
                 log=log)
    out = a.json or RESULTS / ("loop_overhead_quick.json" if a.quick else "loop_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")
    print(render_markdown(report))
    if a.profile:
        print("\ncProfile of 200 fastdiff.Sampler calls (20 steps each):\n")
        print(profile_fastdiff())
    return 0


if __name__ == "__main__":
    sys.exit(main())
