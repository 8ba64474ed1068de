"""fastdiff's drop-in diffusers schedulers and ``accelerate(pipe)`` vs diffusers itself.

    python -m benchmarks.diffusers_bench            # full: JSON in benchmarks/results/diffusers_bench.json
    python -m benchmarks.diffusers_bench --quick    # fewer schedulers and samples

1. ``step``: one scheduler step in a sampling run, diffusers' class vs the fastdiff drop-in of the
   same name and config, at the SD-1.5 latent (1x4x64x64) and an SDXL batch (2x4x128x128), in
   the steady state of a 50-step run (the first call of a run, where the drop-in builds its
   program, is timed separately). Each timed call is ``x = scheduler.step(out, t, x).prev_sample``
   as a pipeline makes it: the previous call's output in, the next timestep.
   *+ CFG*: the pipeline's own CFG code before the step, ``u, c = out.chunk(2); d = u + g * (c - u)``,
   on a [2B] model output; for fastdiff that output is tagged as accelerate's forward hook tags
   it, so the formula is recorded and combined inside the fused step (the tagging and recording
   overhead is timed with it).
   *Noise*: a scheduler that draws noise every step (EulerAncestral) spends much of it in
   ``randn_tensor``, which both sides call alike; that draw is timed beside the steps, and the
   row also gives both times and the speedup without it (``*_excl_noise``).
2. ``pipeline``: a tiny Stable Diffusion pipeline (random weights, prompt embeddings given,
   latents out: no VAE), stock vs ``accelerate(pipe)``, time per denoising step. With a model
   this small the scheduler's share of a step is large; with a real UNet the step's absolute
   saving is the same and its share small.

Timing: benchmarks/timing.py (medians over interleaved samples; the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from .timing import load_average, machine_info, measure_interleaved, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = 50
SHAPES = {"SD-1.5 1x4x64x64": (1, 4, 64, 64), "SDXL 2x4x128x128": (2, 4, 128, 128)}
SCHEDULERS = {    # diffusers class name -> the config (Stable Diffusion 1.5's where it has one)
    "DPMSolverMultistepScheduler": SD,
    "EulerDiscreteScheduler": dict(SD, timestep_spacing="leading", steps_offset=1),
    "EulerAncestralDiscreteScheduler": dict(SD, timestep_spacing="leading", steps_offset=1),
    "UniPCMultistepScheduler": SD,
    "DDIMScheduler": dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "HeunDiscreteScheduler": SD,
}
QUICK_SCHEDULERS = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler")
# Schedulers that draw noise at every step (diffusers' randn_tensor, which the drop-in must call
# alike for the same samples): the draw, timed beside them, is reported and taken out of both.
DRAWS_NOISE = ("EulerAncestralDiscreteScheduler",)
GUIDANCE = 7.5


def _quiet_diffusers():
    import diffusers
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


class StepLoop:
    """``fn()`` = the next step of a run of STEPS steps; ``prepare`` starts a new run (untimed,
    including its first call) when fewer than the calls of the next sample are left."""

    def __init__(self, scheduler, shape, cfg: bool, tag=None):
        self.s, self.cfg, self.tag = scheduler, cfg, tag
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(shape, generator=g)
        batch = (2 * shape[0],) + tuple(shape[1:]) if cfg else shape
        self.out = torch.randn(batch, generator=g)
        self.left = 0
        self.max_calls = None
        self.restart()
        self.max_calls = len(self.timesteps) - 1

    def restart(self):
        self.s.set_timesteps(STEPS)
        self.timesteps = list(self.s.timesteps)
        self.i = 0
        self.x = self.x0
        self()                                   # the first call of the run (plan building for fastdiff)
        self.left = len(self.timesteps) - 1

    def prepare(self, number: int):
        if self.left < number:
            self.restart()

    def __call__(self):
        out = self.out
        if self.cfg:
            if self.tag is not None:             # what accelerate's forward hook does to the model output
                out = self.tag(out)
            u, c = out.chunk(2)
            out = u + GUIDANCE * (c - u)
        t = self.timesteps[self.i]
        self.x = self.s.step(out, t, self.x, return_dict=False)[0]
        self.i += 1
        self.left -= 1


def noise_draw(shape):
    """One noise draw as a step draws it: diffusers' randn_tensor, float32 on the CPU, no generator
    (as the step loops call step())."""
    from diffusers.utils.torch_utils import randn_tensor
    return lambda: randn_tensor(shape, generator=None, device=torch.device("cpu"), dtype=torch.float32)


def first_call_time(scheduler, shape, repeats: int = 5) -> float:
    """Median seconds of a run's first step (set_timesteps excluded)."""
    out, x = torch.randn(shape), torch.randn(shape)
    times = []
    for _ in range(repeats):
        scheduler.set_timesteps(STEPS)
        t = scheduler.timesteps[0]
        start = time.perf_counter()
        scheduler.step(out, t, x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_steps(names: List[str], shapes: Dict[str, tuple], threads: int, opts: dict, log) -> List[dict]:
    diffusers = _quiet_diffusers()
    from fastdiff.integrations import diffusers as fd
    from fastdiff.integrations.diffusers.cfg import tag_model_output
    from fastdiff.integrations.diffusers.pipelines import fusing_cfg_pays
    rows = []
    with torch_threads(threads):
        for shape_name, shape in shapes.items():
            for name in names:
                for cfg in (False, True):
                    config = SCHEDULERS[name]
                    ref = getattr(diffusers, name)(**config)
                    ours = getattr(fd, name).from_config(ref.config)
                    # CFG as accelerate(pipe) does it by default (fuse_cfg="auto"): recorded for the
                    # fused step where that pays (fusing_cfg_pays), else the pipeline's own formula.
                    probe = torch.empty((2 * shape[0],) + tuple(shape[1:]))
                    tag = tag_model_output if fusing_cfg_pays(ours, probe) else None
                    fns = {"diffusers": StepLoop(ref, shape, cfg), "fastdiff": StepLoop(ours, shape, cfg, tag)}
                    if name in DRAWS_NOISE:
                        fns["noise"] = noise_draw(shape)
                    t = measure_interleaved(fns, **opts)
                    row = {"shape": shape_name, "scheduler": name, "cfg": cfg, "threads": threads,
                           "cfg_fused": bool(cfg and tag is not None),
                           "diffusers_us": t["diffusers"].median * 1e6, "diffusers_iqr_us": t["diffusers"].iqr * 1e6,
                           "fastdiff_us": t["fastdiff"].median * 1e6, "fastdiff_iqr_us": t["fastdiff"].iqr * 1e6,
                           "speedup": t["diffusers"].median / t["fastdiff"].median}
                    if "noise" in t:
                        noise = t["noise"].median
                        row.update(noise_draw_us=noise * 1e6,
                                   diffusers_us_excl_noise=(t["diffusers"].median - noise) * 1e6,
                                   fastdiff_us_excl_noise=(t["fastdiff"].median - noise) * 1e6,
                                   speedup_excl_noise=(t["diffusers"].median - noise) / (t["fastdiff"].median - noise))
                    if not cfg:
                        row["fastdiff_first_call_ms"] = first_call_time(getattr(fd, name).from_config(ref.config),
                                                                        shape) * 1e3
                    rows.append(row)
                    log(f"{shape_name:18s} {name:32s} cfg={cfg!s:5s} diffusers {row['diffusers_us']:8.1f} us  "
                        f"fastdiff {row['fastdiff_us']:7.1f} us  {row['speedup']:5.1f}x"
                        + (f"  (noise draw {row['noise_draw_us']:.1f} us; without it {row['speedup_excl_noise']:.1f}x)"
                           if "noise_draw_us" in row else ""))
    return rows


# ---------------------------------------------------------------------------------------------
# A tiny pipeline, stock vs accelerated


def tiny_sd_pipeline(latent: int):
    diffusers = _quiet_diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=8).eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DPMSolverMultistepScheduler(**SD), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_pipeline(latents: List[int], steps: int, threads: int, opts: dict, log) -> List[dict]:
    from fastdiff.integrations import diffusers as fd
    rows = []
    with torch_threads(threads):
        for latent in latents:
            stock_pipe, fast_pipe = tiny_sd_pipeline(latent), tiny_sd_pipeline(latent)   # the same weights
            handle = fd.accelerate(fast_pipe)
            size = latent * stock_pipe.vae_scale_factor
            embeds = {"prompt_embeds": torch.randn(1, 7, 16), "negative_prompt_embeds": torch.randn(1, 7, 16)}

            def runner(pipe):
                return lambda: pipe(**embeds, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                                    width=size, output_type="latent", generator=torch.Generator().manual_seed(0)).images

            stock, accelerated = runner(stock_pipe), runner(fast_pipe)
            err = float((stock() - accelerated()).abs().max())
            t = measure_interleaved({"stock": stock, "accelerated": accelerated}, **opts)
            handle.remove()
            row = {"pipeline": f"tiny SD, latents 1x4x{latent}x{latent}, CFG {GUIDANCE}", "steps": steps,
                   "threads": threads, "stock_ms_per_step": t["stock"].median / steps * 1e3,
                   "accelerated_ms_per_step": t["accelerated"].median / steps * 1e3,
                   "saved_us_per_step": (t["stock"].median - t["accelerated"].median) / steps * 1e6,
                   "speedup": t["stock"].median / t["accelerated"].median, "max_abs_latent_difference": err}
            rows.append(row)
            log(f"{row['pipeline']}: stock {row['stock_ms_per_step']:.3f} ms/step, accelerated "
                f"{row['accelerated_ms_per_step']:.3f} ms/step ({row['speedup']:.2f}x), |diff| {err:.2g}")
    return rows


def combine_runs(runs: List[List[dict]]) -> List[dict]:
    """One row per (shape, scheduler, CFG): medians over the runs, and the range of the speedups."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for k in ("diffusers_us", "fastdiff_us", "speedup", "fastdiff_first_call_ms", "noise_draw_us",
                  "diffusers_us_excl_noise", "fastdiff_us_excl_noise", "speedup_excl_noise"):
            if k in row:
                row[k] = statistics.median(r[k] for r in rows)
        row["speedup_min"], row["speedup_max"] = min(r["speedup"] for r in rows), max(r["speedup"] for r in rows)
        if "speedup_excl_noise" in row:
            row["speedup_excl_noise_min"] = min(r["speedup_excl_noise"] for r in rows)
            row["speedup_excl_noise_max"] = max(r["speedup_excl_noise"] for r in rows)
        row["runs"] = len(rows)
        out.append(row)
    return out


def render_markdown(report: dict) -> str:
    lines = ["| shape | scheduler | CFG | diffusers µs | fastdiff µs | speedup | fastdiff first call ms |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["step"]:
        first = f"{r['fastdiff_first_call_ms']:.1f}" if "fastdiff_first_call_ms" in r else ""
        cfg = ("yes, fused" if r.get("cfg_fused") else "yes, pipeline's") if r["cfg"] else "no"
        lines.append(f"| {r['shape']} | {r['scheduler']} | {cfg} | {r['diffusers_us']:.1f} | "
                     f"{r['fastdiff_us']:.1f} | {r['speedup']:.1f}×"
                     + (f" ({r['speedup_min']:.1f}–{r['speedup_max']:.1f})" if "speedup_min" in r else "")
                     + f" | {first} |")
    noisy = [r for r in report["step"] if "noise_draw_us" in r]
    if noisy:
        lines += ["", "| shape | scheduler | CFG | noise draw µs | diffusers µs without it | fastdiff µs without it | "
                  "speedup without it |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in noisy:
            lines.append(f"| {r['shape']} | {r['scheduler']} | {'yes' if r['cfg'] else 'no'} | {r['noise_draw_us']:.1f} | "
                         f"{r['diffusers_us_excl_noise']:.1f} | {r['fastdiff_us_excl_noise']:.1f} | "
                         f"{r['speedup_excl_noise']:.1f}×"
                         + (f" ({r['speedup_excl_noise_min']:.1f}–{r['speedup_excl_noise_max']:.1f})"
                            if "speedup_excl_noise_min" in r else "") + " |")
    lines += ["", "| pipeline | steps | stock ms/step | accelerated ms/step | saved µs/step | speedup | max |Δ latent| |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["pipeline"]:
        lines.append(f"| {r['pipeline']} | {r['steps']} | {r['stock_ms_per_step']:.3f} | "
                     f"{r['accelerated_ms_per_step']:.3f} | {r['saved_us_per_step']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['max_abs_latent_difference']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diffusers_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two schedulers, the SD-1.5 shape, fewer samples")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--schedulers", type=lambda t: t.split(","), default=None,
                   help=f"subset of {', '.join(SCHEDULERS)}")
    p.add_argument("--pipeline-steps", type=int, default=10)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, which leaves out waiting for a "
                        "core on a busy machine (use with --threads 1)")
    p.add_argument("--json", type=Path, default=None,
                   help="default results/diffusers_bench.json (quick: results/diffusers_bench_quick.json)")
    p.add_argument("--runs", type=int, default=1,
                   help="repeat the step measurements this many times; each row then reports the median over "
                        "runs and the range (min-max) of the per-run speedups")
    p.add_argument("--no-pipeline", action="store_true", help="only the step table")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    names = a.schedulers or list(QUICK_SCHEDULERS if a.quick else SCHEDULERS)
    bad = [n for n in names if n not in SCHEDULERS]
    if bad:
        p.error(f"unknown scheduler(s) {bad}; expected some of {', '.join(SCHEDULERS)}")
    if a.threads < 1 or a.pipeline_steps < 1 or a.runs < 1:
        p.error("--threads, --pipeline-steps and --runs must be >= 1")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    opts = dict(min_samples=5, min_time=0.2) if a.quick else dict(min_samples=21, min_time=1.0)
    pipeline_opts = dict(min_samples=3 if a.quick else 7, min_time=0.0, sample_time=0.0, warmup=1)
    shapes = {k: v for k, v in SHAPES.items() if not a.quick or k.startswith("SD-1.5")}
    report = {"machine": machine_info(), "threads": a.threads, "clock": a.clock, "load_average_before": load_average(),
              "runs": a.runs,
              "step": combine_runs([bench_steps(names, shapes, a.threads, dict(opts, clock=a.clock), log)
                                    for _ in range(a.runs)]),
              "pipeline": [] if a.no_pipeline else bench_pipeline([16] if a.quick else [16, 64], a.pipeline_steps,
                                                                   a.threads, dict(pipeline_opts, clock=a.clock), log),
              "load_average_after": load_average()}
    out = a.json or RESULTS / ("diffusers_bench_quick.json" if a.quick else "diffusers_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out}")
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
