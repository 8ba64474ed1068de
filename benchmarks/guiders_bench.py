"""Non-linear guidance methods: fastdiff (cpu backend) vs diffusers' guider + DPMSolverMultistep.

    python -m benchmarks.guiders_bench [--steps 20] [--shape 1,4,64,64] [--threads 1]

One sampling run of ``--steps`` DPM-Solver++(2M) steps at the SD-1.5 latent (1x4x64x64) with
APG (momentum -0.5, norm threshold 15, eta 0), CFG-Zero* (zero_init_steps 1) and TCFG, scale 7.5:

* fastdiff: ``fastdiff.sample(..., guidance=Guidance(7.5, method=...), backend="cpu")`` (one
  [2B] model call per step, the method in the GuidanceHook, the fused step);
* diffusers: the pipeline loop, ``guider.set_state``, two model calls, ``guider.forward(c, u)``,
  ``DPMSolverMultistepScheduler.step``.

The model is a cheap stand-in (one multiply-add per element, the same work on both sides), so
the time is the guidance + step overhead. Medians of interleaved samples (A/B/A/B, see
benchmarks/timing.py) on ``--threads`` torch threads; per-step ms printed and written to
benchmarks/results/guiders_bench.json.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .timing import load_average, machine_info, measure_interleaved, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shape", default="1,4,64,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-samples", type=int, default=9)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import fastdiff
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance,
                                   TangentialClassifierFreeGuidance)
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
    from fastdiff import DiscreteVP, Grid, Guidance
    from fastdiff.guiders import APG, TCFG, CFGZeroStar

    shape = tuple(int(s) for s in args.shape.split(","))
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
            t = measure_interleaved({"fastdiff": a, "diffusers": b}, min_samples=args.min_samples, min_time=1.0,
                                    warmup=2)
            fd, df = t["fastdiff"].median / args.steps * 1e3, t["diffusers"].median / args.steps * 1e3
            results[name] = {"fastdiff_ms_per_step": round(fd, 3), "diffusers_ms_per_step": round(df, 3),
                             "speedup": round(df / fd, 2), "max_abs_diff": err}
            print(f"{name:14s} fastdiff {fd:7.3f} ms/step   diffusers {df:7.3f} ms/step   "
                  f"x{df / fd:5.2f}   |diff| {err:.2e}", flush=True)
    out = {"shape": list(shape), "steps": args.steps, "threads": args.threads, "scale": w,
           "load_average": load_average(), "machine": machine_info(), "results": results}
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "guiders_bench.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
