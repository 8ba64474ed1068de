"""What the row runtime costs around the kernel: the host work of every caller, against its floor.

    python -m benchmarks.runtime_bench                # all groups, 3 runs, markdown + results/runtime_bench.json
    python -m benchmarks.runtime_bench --quick        # one run, fewer samples (CI smoke)
    python -m benchmarks.runtime_bench --only loop,kdiffusion

Groups (1 thread; every group's implementations are timed A/B interleaved in one process, each
group repeated ``--runs`` times; each row reports the median over runs of the per-run medians and
the range (min-max) across runs; CPU clock by default, since the machine is shared):

* ``loop``: a 50-step DPM-Solver++(2M) run at 1x4x8x8 with a zero-cost model (returns a
  preallocated tensor): the *bare loop* (the model call and the prepared kernel, nothing else:
  the floor any driver can reach), a prepared ``fastdiff.Sampler`` called again, and the one-call
  ``fastdiff.sample`` (issue 17 target: <= 1.5x the bare loop).
* ``build``: ``Sampler.build`` for 20 and 50 steps, first build (cache cleared) vs built again.
* ``kdiffusion``: ``fastdiff.integrations.k_diffusion.sample_dpmpp_2m`` vs k-diffusion's own
  ``sample_dpmpp_2m``, per step, with a zero-cost denoiser, at 1x4x8x8 and 1x4x64x64, 20 steps
  (issue 11 target: >= 4x).
* ``dropin_loop``: a diffusers-style 50-step loop (set_timesteps, then step per timestep) of the
  fastdiff drop-in at the SD-1.5 latent, vs 50 of its steady-state steps (issue 17 target: the loop
  within 2x of its steps: setup amortised).
* ``video_setup``: the first call of a prepared Sampler at the video latent 1x16x32x90x160 (one
  step, zero-cost model) vs a repeated call (buffers reused), and the noise finiteness check:
  ``isfinite(x).all()`` vs fastdiff's one-pass check.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .step_bench import RESULTS
from .timing import describe_machine, load_average, machine_info, measure_interleaved, torch_threads

GROUPS = ("loop", "build", "kdiffusion", "dropin_loop", "video_setup")


def _zero_model(out: torch.Tensor) -> Callable:
    def model(x, t, **kwargs):
        return out
    return model


# ---------------------------------------------------------------------------------------------
# Groups: each returns {label: (callable, calls it stands for)}; the time per unit is the
# callable's time divided by that count.

def group_loop(quick: bool) -> Dict[str, tuple]:
    import fastdiff
    from fastdiff.runtime import RowExecutor

    steps, shape = 50, (1, 4, 8, 8)
    noise = torch.randn(shape)
    model = _zero_model(torch.randn(shape))
    sampler = fastdiff.Sampler.build(solver="dpmpp_2m", steps=steps)
    ex = RowExecutor.allocate(sampler.program, noise, model_in_batch=1)
    t = torch.full((1,), 500.0)
    step, table, x, hist, model_in, bad = ex._step, ex.table, ex.x, ex.hist, ex.model_in, ex.bad_row
    args = [a for a in ex.args]

    def bare():
        x.copy_(noise)
        model_in.copy_(x)
        for i, (hw, flags, nid) in enumerate(args):
            out = model(model_in, t)
            step(table, i, x, None, out, None, hist, hw, flags, None, 0, nid, model_in, bad, None)
        return x

    return {
        "bare loop (model call + prepared kernel)": (bare, steps),
        "fastdiff.Sampler (prepared, called again)": (lambda: sampler(model, noise), steps),
        "fastdiff.sample (one call)": (lambda: fastdiff.sample(model, noise, solver="dpmpp_2m", steps=steps), steps),
    }


def group_build(quick: bool) -> Dict[str, tuple]:
    import fastdiff
    from fastdiff import sampler as sampler_module

    def cold(steps):
        def fn():
            sampler_module._BUILD_CACHE.clear()
            return fastdiff.Sampler.build(solver="dpmpp_2m", steps=steps, guidance=7.5)
        return fn

    def warm(steps):
        return lambda: fastdiff.Sampler.build(solver="dpmpp_2m", steps=steps, guidance=7.5)

    return {"Sampler.build, 20 steps, first": (cold(20), 1), "Sampler.build, 20 steps, again": (warm(20), 1),
            "Sampler.build, 50 steps, first": (cold(50), 1), "Sampler.build, 50 steps, again": (warm(50), 1)}


def _kdiffusion():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kdiffusion_loader import load_kdiffusion_sampling
    return load_kdiffusion_sampling()


def group_kdiffusion(quick: bool) -> Dict[str, tuple]:
    import fastdiff.integrations.k_diffusion as K
    KD = _kdiffusion()
    steps = 20
    out = {}
    for shape in ((1, 4, 8, 8), (1, 4, 64, 64)):
        x = torch.randn(shape)
        sigmas = KD.get_sigmas_karras(steps, 0.0292, 14.6146)
        denoiser = _zero_model(torch.randn(shape))
        tag = "x".join(map(str, shape))
        out[f"k-diffusion sample_dpmpp_2m {tag}"] = (lambda x=x, s=sigmas, d=denoiser:
                                                     KD.sample_dpmpp_2m(d, x, s, disable=True), steps)
        out[f"fastdiff K.sample_dpmpp_2m {tag}"] = (lambda x=x, s=sigmas, d=denoiser:
                                                   K.sample_dpmpp_2m(d, x, s, disable=True), steps)
    return out


def group_dropin_loop(quick: bool) -> Dict[str, tuple]:
    from diffusers.utils import logging as dlog
    from fastdiff.integrations import diffusers as fdd
    dlog.set_verbosity_error()
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    shape, steps = (1, 4, 64, 64), 50
    sample, eps = torch.randn(shape), torch.randn(shape)
    out = {}
    for name in ("EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"):
        sched = getattr(fdd, name)(**cfg)

        def loop(s=sched):
            s.set_timesteps(steps)
            x = sample
            for t in s.timesteps:
                x = s.step(eps, t, x).prev_sample
            return x

        steady = getattr(fdd, name)(**cfg)
        steady.set_timesteps(steps)
        t_mid = steady.timesteps[steps // 2]

        def one_step(s=steady, t=t_mid):
            s._step_index = steps // 2
            return s.step(eps, t, sample).prev_sample
        one_step()
        out[f"{name}: 50-step loop (set_timesteps + steps)"] = (loop, steps)
        out[f"{name}: steady-state step"] = (one_step, 1)
    return out


def group_video_setup(quick: bool) -> Dict[str, tuple]:
    import fastdiff
    from fastdiff.sampler import all_finite
    shape = (1, 16, 32, 90, 160) if not quick else (1, 16, 8, 90, 160)
    noise = torch.randn(shape)
    model = _zero_model(torch.randn(shape))

    def first():
        s = fastdiff.Sampler.build(solver="dpmpp_2m", steps=1)   # (a new Sampler: fresh buffers)
        return s(model, noise)

    again = fastdiff.Sampler.build(solver="dpmpp_2m", steps=1)
    again(model, noise)
    return {"Sampler, 1 step, first call (fresh buffers)": (first, 1),
            "Sampler, 1 step, called again (buffers reused)": (lambda: again(model, noise), 1),
            "isfinite(noise).all()": (lambda: bool(torch.isfinite(noise).all()), 1),
            "fastdiff.sampler.all_finite(noise)": (lambda: all_finite(noise), 1)}


GROUP_FNS = {"loop": group_loop, "build": group_build, "kdiffusion": group_kdiffusion,
             "dropin_loop": group_dropin_loop, "video_setup": group_video_setup}


# ---------------------------------------------------------------------------------------------

def run_group(name: str, runs: int, quick: bool, clock: str) -> List[dict]:
    fns = GROUP_FNS[name](quick)
    per_run: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(runs):
        timings = measure_interleaved({k: f for k, (f, _) in fns.items()}, min_samples=5 if quick else 15,
                                      min_time=0.05 if quick else 0.4, clock=clock)
        for k, (_, count) in fns.items():
            per_run[k].append(timings[k].median / count * 1e6)
    return [{"group": name, "label": k, "unit_us": statistics.median(v), "min_us": min(v), "max_us": max(v),
             "runs": v, "per": "step" if fns[k][1] > 1 else "call"} for k, v in per_run.items()]


RATIOS = [  # (group, numerator label prefix, denominator label prefix, what)
    ("loop", "fastdiff.sample", "bare loop", "fastdiff.sample / bare loop (target <= 1.5)"),
    ("loop", "fastdiff.Sampler", "bare loop", "Sampler / bare loop"),
    ("kdiffusion", "k-diffusion sample_dpmpp_2m 1x4x8x8", "fastdiff K.sample_dpmpp_2m 1x4x8x8",
     "k-diffusion / fastdiff at 1x4x8x8 (target >= 4)"),
    ("kdiffusion", "k-diffusion sample_dpmpp_2m 1x4x64x64", "fastdiff K.sample_dpmpp_2m 1x4x64x64",
     "k-diffusion / fastdiff at 1x4x64x64 (target >= 4)"),
    ("dropin_loop", "EulerDiscreteScheduler: 50-step", "EulerDiscreteScheduler: steady", "Euler loop / steady step (target <= 2)"),
    ("dropin_loop", "DDIMScheduler: 50-step", "DDIMScheduler: steady", "DDIM loop / steady step (target <= 2)"),
    ("dropin_loop", "DPMSolverMultistepScheduler: 50-step", "DPMSolverMultistepScheduler: steady",
     "DPM++ loop / steady step (target <= 2)"),
]


def ratios(rows: List[dict]) -> List[dict]:
    out = []
    for group, num, den, what in RATIOS:
        a = next((r for r in rows if r["group"] == group and r["label"].startswith(num)), None)
        b = next((r for r in rows if r["group"] == group and r["label"].startswith(den)), None)
        if a is None or b is None:
            continue
        per_run = [x / y for x, y in zip(a["runs"], b["runs"])]
        out.append({"what": what, "median": statistics.median(per_run), "min": min(per_run), "max": max(per_run)})
    return out


def render_markdown(report: dict) -> str:
    lines = [f"Machine: {describe_machine(report['machine'])}; 1 thread; clock: {report['clock']}; "
             f"{report['runs']} runs; load average {report['machine']['load_average_start']} -> "
             f"{report['load_average_end']}", "",
             "| group | what | median | range over runs | per |", "| --- | --- | ---: | ---: | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['group']} | {r['label']} | {r['unit_us']:.1f} us | {r['min_us']:.1f}-{r['max_us']:.1f} "
                     f"| {r['per']} |")
    lines += ["", "| ratio | median | range over runs |", "| --- | ---: | ---: |"]
    for r in report["ratios"]:
        lines.append(f"| {r['what']} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run, few samples (a smoke run)")
    ap.add_argument("--runs", type=int, default=None, help="repeats of each group (default 3; 1 with --quick)")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default results/runtime_bench[_quick].json)")
    args = ap.parse_args(argv)
    groups = [g for g in args.only.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    runs = args.runs or (1 if args.quick else 3)
    warnings.filterwarnings("ignore")
    info = machine_info()
    rows = []
    with torch_threads(1), torch.no_grad():
        for g in groups:
            rows += run_group(g, runs, args.quick, args.clock)
    report = {"machine": info, "clock": args.clock, "runs": runs, "rows": rows, "ratios": ratios(rows),
              "load_average_end": load_average()}
    out = args.out or RESULTS / ("runtime_bench_quick.json" if args.quick else "runtime_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
