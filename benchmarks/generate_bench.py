"""Sharded generation: samples/s on 1 and 2 processes, and digits-FD of 10,000 samples at NFE 10.

    python -m benchmarks.generate_bench                    both parts (minutes on 2 cores)
    python -m benchmarks.generate_bench --part speed       samples/s, 1 vs 2 torchrun processes
    python -m benchmarks.generate_bench --part quality     digits-FD / class accuracy, three solvers

Each speed run is `torchrun --standalone --nproc_per_node=P -m fastdiff generate` on a fresh folder
(OMP_NUM_THREADS=1 per process), timed by generate itself (sampling + writing, not start-up);
the median of --repeats runs is reported. Results: benchmarks/results/generate_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUALITY_SOLVERS = ("dpmpp_2m", "unipc", "ddim")


def _run(nproc: int, args, timeout=3600):
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastdiff", "generate", "--out", str(Path(d) / "run"), "--no-progress", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode != 0:
            raise SystemExit(f"generate failed:\n{r.stderr[-3000:]}")
        m = re.search(r"generated in ([\d.]+) s = ([\d.]+) samples/s", r.stdout)
        fd = re.search(r"digits-FD ([\d.]+), class accuracy ([\d.]+)%", r.stdout)
        return {"seconds": float(m.group(1)), "samples_per_s": float(m.group(2)),
                "digits_fd": float(fd.group(1)) if fd else None,
                "class_accuracy": float(fd.group(2)) / 100 if fd else None}


def speed(n: int, repeats: int):
    rows = []
    for nproc in (1, 2):
        runs = [_run(nproc, ["-n", str(n), "--steps", "10", "--batch", "64", "--no-metrics"]) for _ in range(repeats)]
        sps = [r["samples_per_s"] for r in runs]
        rows.append({"processes": nproc, "samples_per_s_median": statistics.median(sps), "min": min(sps),
                     "max": max(sps), "runs": repeats, "n": n})
        print(f"{nproc} process(es): {statistics.median(sps):.1f} samples/s (range {min(sps):.1f}-{max(sps):.1f})")
    return rows


def quality(n: int, nproc: int):
    rows = []
    for solver in QUALITY_SOLVERS:
        r = _run(nproc, ["-n", str(n), "--steps", "10", "--solver", solver, "--batch", "100"])
        rows.append({"solver": solver, "nfe": 10, "n": n, **r})
        print(f"{solver}: digits-FD {r['digits_fd']:.3f}, accuracy {100 * r['class_accuracy']:.1f}%")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    p.add_argument("--speed-n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality-n", type=int, default=10000)
    p.add_argument("--quality-procs", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "generate_bench.json"))
    a = p.parse_args(argv)
    out = Path(a.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report["machine"] = {"cores": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}
    if a.part in ("speed", "all"):
        report["speed"] = speed(a.speed_n, a.repeats)
    if a.part in ("quality", "all"):
        report["quality"] = quality(a.quality_n, a.quality_procs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    lines = [f"Machine: {report['machine']['cores']} cores; OMP_NUM_THREADS=1 per process.", ""]
    if "speed" in report:
        lines += ["| processes | samples/s (median) | range | runs | n |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['processes']} | {r['samples_per_s_median']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {r['runs']} | "
                  f"{r['n']} |" for r in report["speed"]]
        lines.append("")
    if "quality" in report:
        lines += ["| solver | NFE | samples | digits-FD | class accuracy |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['solver']} | {r['nfe']} | {r['n']} | {r['digits_fd']:.3f} | {100 * r['class_accuracy']:.1f}% |"
                  for r in report["quality"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
