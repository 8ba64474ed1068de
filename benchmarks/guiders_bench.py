"""Non-linear guidance methods: fastdiff (cpu backend) vs diffusers' guider + DPMSolverMultistep.

    python -m benchmarks.guiders_bench [--steps 20] [--shape 1,4,64,64 ...] [--threads 1] [--runs 3]

For each ``--shape`` (default: the SD-1.5 latent 1x4x64x64 and the video latent
1x16x32x90x160), one sampling run of ``--steps`` DPM-Solver++(2M) steps with APG (momentum -0.5,
norm threshold 15, eta 0), CFG-Zero* (zero_init_steps 1) and TCFG, scale 7.5:

* fastdiff: ``fastdiff.sample(..., guidance=Guidance(7.5, method=...), backend="cpu")`` (one
  [2B] model call per step, the method in the GuidanceHook, the fused step);
* diffusers: the pipeline loop, ``guider.set_state``, two model calls, ``guider.forward(c, u)``,
  ``DPMSolverMultistepScheduler.step``.

The model is a cheap stand-in (one multiply-add per element, the same work on both sides), so
the time is the guidance + step overhead. Each of ``--runs`` runs takes the medians of
interleaved samples (A/B/A/B, see benchmarks/timing.py) on ``--threads`` torch threads; the table
gives the median of the runs' medians and their range, per step, with the machine and its load
average before and after. Written to benchmarks/results/guiders_bench.json and
benchmarks/results/guiders.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .timing import describe_machine, load_average, machine_info, measure_interleaved, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shape", nargs="+", default=["1,4,64,64", "1,16,32,90,160"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-samples", type=int, default=5)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    load_before = load_average()
    tables = {}
    for shape in args.shape:
        tables[shape] = _bench_shape(args, tuple(int(v) for v in shape.split(",")))
    out = {"shapes": tables, "steps": args.steps, "threads": args.threads, "runs": args.runs, "scale": 7.5,
           "load_average_before": load_before, "load_average_after": load_average(), "machine": machine_info(),
           "command": "python -m benchmarks.guiders_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "guiders_bench.json").write_text(json.dumps(out, indent=1))
        (RESULTS / "guiders.md").write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = ["# Guidance methods: fastdiff (cpu backend) vs diffusers' guider + DPMSolverMultistep step", "",
             f"Command: `{out['command'].strip()}`  ", f"Machine: {describe_machine(m)}; {m['date']}  ",
             f"Load average (1, 5, 15 min) before {out['load_average_before']}, after {out['load_average_after']} "
             "(a shared 2-core machine: other jobs add noise)  ",
             f"{out['steps']} DPM-Solver++(2M) steps, scale {out['scale']}, {out['threads']} torch thread(s); a cheap "
             "stand-in model (the same on both sides), so the time is guidance + step. Per step: the median over "
             f"{out['runs']} runs of each run's median of A/B-interleaved samples, and the range of the runs' medians.",
             "", "max abs diff: the two runs' final latents. The last two columns: one combination (step 1) "
             "in float32 against the same formula in float64, for fastdiff and for diffusers' guider; at the video "
             "latent diffusers' TCFG (a float32 SVD of two 7.4M-long rows) is off by that much, which is most of "
             "the difference of the runs.",
             "", "| latent | method | fastdiff ms/step | diffusers ms/step | speedup | max abs diff | "
             "fastdiff err vs fp64 | diffusers err vs fp64 |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, table in out["shapes"].items():
        for name, r in table.items():
            lines.append(f"| {shape.replace(',', 'x')} | {name} | {r['fastdiff_ms_per_step']:.3f} "
                         f"({r['fastdiff_range'][0]:.3f}-{r['fastdiff_range'][1]:.3f}) | "
                         f"{r['diffusers_ms_per_step']:.3f} ({r['diffusers_range'][0]:.3f}-"
                         f"{r['diffusers_range'][1]:.3f}) | x{r['speedup']:.2f} | {r['max_abs_diff']:.1e} | "
                         f"{r['fastdiff_vs_float64_one_call']:.1e} | {r['diffusers_vs_float64_one_call']:.1e} |")
    return "\n".join(lines) + "\n"


def _one_call(ours, make, momentum, model, noise, ones, zeros, w, steps):
    """One guided combination at step 1 (after CFG-Zero*'s zero-init): fastdiff in float32, the
    same formula in float64 (tested against diffusers' float64 in tests/test_guiders.py), and
    diffusers' float32 guider: how far each float32 result is from float64."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
    t = torch.full((noise.shape[0],), 500.0)
    c, u = model(noise, t, ones), model(noise, t, zeros)
    one32 = ours.combine(c, u, w, False, 1, {})
    one64 = ours.combine(c.double(), u.double(), w, False, 1, {})
    guider = make()
    guider.set_state(1, steps, torch.tensor(500))
    if momentum is not None:
        guider.momentum_buffer = MomentumBuffer(momentum)
    return one32, one64, guider.forward(c, u).pred


def _bench_shape(args, shape):

    import fastdiff
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance,
                                   TangentialClassifierFreeGuidance)
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
    from fastdiff import DiscreteVP, Grid, Guidance
    from fastdiff.guiders import APG, TCFG, CFGZeroStar

    B = shape[0]
    w = 7.5
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def model(x, t, c):
        return x * 0.5 + c.reshape(-1, *([1] * (x.dim() - 1))) * base.repeat(x.shape[0] // B, *([1] * (x.dim() - 1)))

    sched = DPMSolverMultistepScheduler(**SD)
    sched.set_timesteps(args.steps)
    grid = Grid.from_times(DiscreteVP(), sched.timesteps.numpy().astype(np.float64), final="zero")
    ones, zeros = torch.ones(B), torch.zeros(B)

    methods = {
        "apg": (APG(momentum=-0.5, norm_threshold=15.0, eta=0.0),
                lambda: AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_momentum=-0.5,
                                                  adaptive_projected_guidance_rescale=15.0, eta=0.0), -0.5),
        "cfg_zero_star": (CFGZeroStar(1), lambda: ClassifierFreeZeroStarGuidance(guidance_scale=w,
                                                                                 zero_init_steps=1), None),
        "tcfg": (TCFG(), lambda: TangentialClassifierFreeGuidance(guidance_scale=w), None),
    }

    def fd_run(method):
        gd = Guidance(w, method=method)
        return lambda: fastdiff.sample(model, noise, grid=grid, solver="dpmpp_2m", guidance=gd,
                                       cond={"c": ones}, uncond={"c": zeros}, backend="cpu", progress=False,
                                       solver_options={"lower_order_final": True})

    def df_run(make, momentum):
        guider = make()
        s = DPMSolverMultistepScheduler(**SD)

        def run():
            s.set_timesteps(args.steps)
            x = noise * s.init_noise_sigma
            n = len(s.timesteps)
            for i, t in enumerate(s.timesteps):
                guider.set_state(i, n, t)
                if i == 0 and momentum is not None:
                    guider.momentum_buffer = MomentumBuffer(momentum)
                tt = torch.full((B,), float(t))
                pred = guider.forward(model(x, tt, ones), model(x, tt, zeros)).pred
                x = s.step(pred, t, x).prev_sample
            return x
        return run

    results = {}
    with torch_threads(args.threads), torch.no_grad():
        for name, (ours, make, mom) in methods.items():
            a, b = fd_run(ours), df_run(make, mom)
            err = (a() - b()).abs().max().item()
            one32, one64, peer32 = _one_call(ours, make, mom, model, noise, ones, zeros, w, args.steps)
            fds, dfs = [], []
            for _ in range(args.runs):
                t = measure_interleaved({"fastdiff": a, "diffusers": b}, min_samples=args.min_samples, min_time=1.0,
                                        warmup=1)
                fds.append(t["fastdiff"].median / args.steps * 1e3)
                dfs.append(t["diffusers"].median / args.steps * 1e3)
            fd, df = float(np.median(fds)), float(np.median(dfs))
            results[name] = {"fastdiff_ms_per_step": round(fd, 3), "diffusers_ms_per_step": round(df, 3),
                             "fastdiff_range": [round(min(fds), 3), round(max(fds), 3)],
                             "diffusers_range": [round(min(dfs), 3), round(max(dfs), 3)],
                             "speedup": round(df / fd, 2), "max_abs_diff": err,
                             "fastdiff_vs_float64_one_call": (one32 - one64).abs().max().item(),
                             "diffusers_vs_float64_one_call": (peer32.double() - one64).abs().max().item()}
            print(f"{'x'.join(map(str, shape)):16s} {name:14s} fastdiff {fd:8.3f} ms/step "
                  f"({min(fds):.3f}-{max(fds):.3f})   diffusers {df:8.3f} ms/step ({min(dfs):.3f}-{max(dfs):.3f})   "
                  f"x{df / fd:5.2f}   |diff| {err:.2e}", flush=True)
    return results


if __name__ == "__main__":
    main()
