"""The ``fastdiff`` command line (also ``python -m fastdiff``).

    fastdiff demo   sample the analytic Gaussian mixture with a solver; error vs the exact ODE
                    solution and time per step (the embedded default job; needs no model file)
    fastdiff info   versions, built extensions, available backends

Errors in the user's arguments print one line and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Optional


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def cmd_demo(args) -> int:
    import numpy as np
    import torch

    import fastdiff
    from fastdiff.models import GaussianMixture
    from fastdiff.schedules import VESchedule, make_grid

    if args.solver not in fastdiff.SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; available: {', '.join(sorted(fastdiff.SOLVERS))}")
    solver = fastdiff.get_solver(args.solver)
    schedule = VESchedule(sigma_min=0.002, sigma_max=80.0)
    mixture = GaussianMixture.default(schedule, dim=args.dim, prediction="sample")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, args.dim, generator=gen)
    # Deterministic solvers are compared with the exact ODE solution at sigma_min; stochastic ones
    # with the data distribution's moments.
    grid = make_grid(schedule, args.steps, "karras", final="none" if not solver.stochastic else "zero")
    sampler = fastdiff.Sampler.build(solver=solver, grid=grid, prediction="sample")
    t0 = time.perf_counter()
    x = sampler(mixture, noise, progress=False, seed=args.seed, backend=args.backend)
    elapsed = time.perf_counter() - t0
    nfe = sampler.program.nfe
    print(f"fastdiff {fastdiff.__version__} demo: {args.solver}, {args.steps} steps ({nfe} model evaluations), "
          f"{args.batch} samples of a {args.dim}-d Gaussian mixture, VE/Karras grid 80 -> 0.002")
    if solver.stochastic:
        x64 = x.to(torch.float64)
        mean_err = (x64.mean(0) - mixture.mean).abs().max().item()
        cov_err = (torch.cov(x64.T) - mixture.cov).abs().max().item()
        print(f"max |mean - true mean| = {mean_err:.3e}   max |cov - true cov| = {cov_err:.3e}")
    else:
        exact = mixture.solve_ode(noise.to(torch.float64) * 80.0, 80.0, float(grid.ksigma[-1]))
        err = (x.to(torch.float64) - exact).abs().max().item()
        print(f"max |x - exact ODE solution| = {err:.3e}")
    print(f"time: {elapsed * 1e3:.1f} ms total, {elapsed / args.steps * 1e6:.0f} us per step "
          f"(backend {args.backend}, including the analytic model)")
    return 0


def cmd_info(args) -> int:
    import torch

    import fastdiff
    from fastdiff.ops import available_backends

    print(f"fastdiff {fastdiff.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  machine {platform.machine()}  "
          f"threads {torch.get_num_threads()}")
    print(f"cuda available: {torch.cuda.is_available()}")
    for name, why in available_backends().items():
        print(f"  backend {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"solvers: {', '.join(sorted(fastdiff.SOLVERS))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdiff", description="Exact diffusion samplers on fused kernels.")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="sample the analytic Gaussian mixture; error vs exact; time per step")
    d.add_argument("--solver", default="dpmpp_2m")
    d.add_argument("--steps", type=_positive_int, default=20)
    d.add_argument("--batch", type=_positive_int, default=4096)
    d.add_argument("--dim", type=_positive_int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="versions, built extensions, available backends")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"] + list(argv or []))
    try:
        return args.func(args)
    except UsageError as e:
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, PermissionError) as e:
        # Bad configurations surface as these from the library; one line, no traceback.
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
