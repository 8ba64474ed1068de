"""The ``fastdiff`` command line (also ``python -m fastdiff``).

    fastdiff sample  sample digits from the shipped model with any solver; write a PNG grid;
                     time per step and NFE
    fastdiff bench   the benchmark suite (kernel table, accuracy vs NFE, sample quality vs NFE):
                     markdown, JSON and PNG plots; needs a source checkout (benchmarks/)
    fastdiff check   parity of every kernel on every backend here vs the reference oracles;
                     exit status 1 on any failure (for CI)
    fastdiff info    versions, built extensions, available backends
    fastdiff demo    sample the analytic Gaussian mixture with a solver; error vs the exact ODE
                     solution and time per step (needs no model file)

Errors in the user's arguments print one line, ``fastdiff: error: ...``, and exit with status 2,
without a traceback.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block) and goes through main's handler."""

    def error(self, message):
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {v}")
    return v


def parse_labels(text: str) -> List[int]:
    """Digit labels from "0-9", "3,3,7" or "0-4,7" (ranges inclusive, repeats kept, in order)."""
    labels: List[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            ends = [int(lo)] if not sep else [int(lo), int(hi)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected digits like '0-9' or '3,3,7', got {text!r}")
        if any(not 0 <= d <= 9 for d in ends):
            raise argparse.ArgumentTypeError(f"labels must be digits 0-9, got {part!r} in {text!r}")
        if sep and ends[1] < ends[0]:
            raise argparse.ArgumentTypeError(f"range {part!r} runs backwards; write it as {hi}-{lo}")
        labels += list(range(ends[0], ends[-1] + 1))
    return labels


def _option(text: str):
    """A solver option ``key=value``; the value read as a Python literal (2, 0.5, True, None),
    true/false/none in any case, or else kept as a string (bh1)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    value = value.strip()
    lowered = {"true": True, "false": False, "none": None}
    if value.lower() in lowered:
        return key.strip(), lowered[value.lower()]
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _png_path(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"expected a .png file name, got {text!r}")
    return path


def check_writable(path: Path) -> None:
    """Raise UsageError unless ``path`` can be written (checked before any work is done): by opening
    it for appending, which is what the operating system will allow (root ignores permission bits,
    /proc and read-only mounts refuse anyway); a file created by the check is removed again, an
    existing one is left as it was."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output path {str(path)!r} is a directory; expected a .png file name")
    if not parent.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass


#: |CFG scale| above this is refused: practical scales are 1-20, and near 1e38 / |cond - uncond| the
#: float32 state overflows (the run would end in NaN/Inf after all the work).
MAX_GUIDANCE = 1000.0
#: The PNG grid: at most this many pixels a side and in all (many viewers and decoders refuse more).
MAX_GRID_SIDE = 65535
MAX_GRID_PIXELS = 1 << 28


def grid_size(rows: int, columns: int, scale: int, pad: int = 2, image: int = 8) -> tuple:
    """(width, height) in pixels of the grid save_digit_grid writes."""
    return pad + columns * (image * scale + pad), pad + rows * (image * scale + pad)


def _check_solver_options(name: str, options: dict) -> None:
    """The solver accepts these options; a bad one is named with the value the user gave."""
    import fastdiff
    try:
        fastdiff.get_solver(name, **options)
        return
    except (ValueError, TypeError) as e:
        error = e
    for key, value in options.items():      # name the first option that is wrong on its own
        try:
            fastdiff.get_solver(name, **{key: value})
        except (ValueError, TypeError) as e:
            raise UsageError(f"--option {key}={value!r} (solver {name}): {e}") from None
    given = " ".join(f"--option {k}={v!r}" for k, v in options.items())
    raise UsageError(f"{given} (solver {name}): {error}") from None


# ---------------------------------------------------------------------------------------------
# fastdiff sample
# ---------------------------------------------------------------------------------------------
def _guidance_with_method(args, solver_options: dict):
    """``Guidance(scale, convention, method=NAME(**options))`` from --guidance-method and
    --guidance-option, checked (method, options, and that the solver takes a method) before sampling."""
    import dataclasses

    from fastdiff.guidance import Guidance
    from fastdiff.guiders import METHODS
    name = args.guidance_method
    if name is None:
        raise UsageError("--guidance-option needs --guidance-method (one of "
                         f"{', '.join(sorted(set(METHODS)))})")
    cls = METHODS.get(name.lower())
    if cls is None:
        raise UsageError(f"--guidance-method: unknown guidance method {name!r}; available: "
                         f"{', '.join(sorted(set(METHODS)))}")
    method_options = dict(args.guidance_option or [])
    known = [f.name for f in dataclasses.fields(cls)]
    for key in method_options:
        if key not in known:
            raise UsageError(f"--guidance-option {key}: {name} has no option {key!r}; its options: "
                             f"{', '.join(known) if known else 'none'}")
    try:
        method = cls(**method_options)
        guidance = Guidance(args.guidance, convention=args.convention, method=method)
    except (ValueError, TypeError) as e:
        given = " ".join(f"--guidance-option {k}={v!r}" for k, v in method_options.items())
        raise UsageError(f"--guidance-method {name}{' ' + given if given else ''}: {e}") from None
    from fastdiff.models.digits import PREDICTION, digits_schedule
    from fastdiff.sampler import Sampler
    try:
        Sampler.build(solver=args.solver, steps=args.steps, schedule=digits_schedule(), spacing=args.spacing,
                      prediction=PREDICTION, guidance=guidance, solver_options=solver_options)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--guidance-method {name} with solver {args.solver}: {e}") from None
    return guidance


def save_digit_grid(images, path: Path, columns: int, scale: int = 4, pad: int = 2) -> None:
    """Write images [N, 1, H, W] in [-1, 1] as a PNG grid, ``columns`` per row, each image enlarged
    ``scale`` times (nearest neighbour: the 8x8 pixels stay crisp), ``pad`` gray pixels between."""
    import numpy as np
    import torch
    from PIL import Image

    x = images.detach().float().cpu().clamp(-1.0, 1.0)
    pixels = ((x[:, 0] + 1.0) * 127.5).round().to(torch.uint8).numpy()
    n, h, w = pixels.shape
    rows = -(-n // columns)
    H, W = h * scale, w * scale
    canvas = np.full((pad + rows * (H + pad), pad + columns * (W + pad)), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        tile = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = tile
    Image.fromarray(canvas, mode="L").save(path, format="PNG")


def cmd_sample(args) -> int:
    import fastdiff
    from fastdiff.ops import BACKENDS, guidance_scale_to_g

    # Everything the user typed is checked before the model loads and sampling starts.
    if args.solver not in fastdiff.SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; available: {', '.join(sorted(fastdiff.SOLVERS))}")
    options = dict(args.option or [])
    _check_solver_options(args.solver, options)
    if args.guidance is None:     # no guidance, in either convention
        args.guidance = 1.0 if args.convention == "w" else 0.0
    if abs(args.guidance) > MAX_GUIDANCE:
        raise UsageError(f"--guidance: a CFG scale of {args.guidance:g} is outside [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}] "
                         "(practical scales are 1-20; larger ones overflow the float32 sample)")
    width, height = grid_size(len(args.labels), args.n, args.scale)
    if max(width, height) > MAX_GRID_SIDE or width * height > MAX_GRID_PIXELS:
        raise UsageError(f"the PNG grid would be {width} x {height} pixels (--n {args.n} columns, "
                         f"{len(args.labels)} label rows, --scale {args.scale}); the limit is {MAX_GRID_SIDE} a side "
                         f"and {MAX_GRID_PIXELS >> 20} megapixels: lower --scale or --n")
    if args.backend != "auto" and args.backend not in BACKENDS:
        raise UsageError(f"unknown backend {args.backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if args.backend != "auto" and BACKENDS[args.backend].unavailable_reason():
        raise UsageError(f"backend {args.backend!r} cannot run here: {BACKENDS[args.backend].unavailable_reason()}")
    check_writable(args.out)
    if importlib.util.find_spec("PIL") is None:
        raise UsageError("writing the PNG grid needs Pillow: pip install pillow")
    g = guidance_scale_to_g(args.guidance, args.convention)
    guidance = _guidance_with_method(args, options) if args.guidance_method or args.guidance_option else g

    import torch
    from fastdiff.models.digits import load_digits_model, sample_digits

    model = load_digits_model()
    labels = torch.tensor(args.labels, dtype=torch.int64).repeat_interleave(args.n)

    calls, model_seconds = 0, 0.0

    def timed_model(x, t, **kwargs):
        nonlocal calls, model_seconds
        t0 = time.perf_counter()
        out = model(x, t, **kwargs)
        model_seconds += time.perf_counter() - t0
        calls += 1
        return out

    progress = args.progress if args.progress is not None else bool(sys.stderr.isatty())
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            images = sample_digits(timed_model, labels, solver=args.solver, steps=args.steps, guidance=guidance,
                                   seed=args.seed, spacing=args.spacing, solver_options=options,
                                   backend=args.backend, progress=progress)
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads_before)
    save_digit_grid(images, args.out, columns=args.n, scale=args.scale)

    cfg = f"CFG {args.guidance:g} ({args.convention} convention)" if g != 1.0 else "no CFG"
    if not isinstance(guidance, float):
        cfg += f", guidance method {guidance.method!r}"
    print(f"fastdiff {fastdiff.__version__} sample: digits U-Net (shipped), {args.solver}"
          f"{' ' + str(options) if options else ''}, {args.steps} steps, {args.spacing} spacing, {cfg}, "
          f"seed {args.seed}, {len(labels)} samples (labels {','.join(map(str, args.labels))} x {args.n}), "
          f"backend {args.backend}, {threads} thread{'s' if threads != 1 else ''}")
    print(f"NFE: {calls} model evaluations" + (" (each one batched call of both CFG halves)" if g != 1.0 else ""))
    print(f"time: {total * 1e3:.1f} ms total, {total / args.steps * 1e3:.2f} ms per step "
          f"(model {model_seconds * 1e3:.1f} ms, solver and loop {(total - model_seconds) * 1e3:.1f} ms)")
    print(f"wrote {args.out} ({len(args.labels)} rows x {args.n}, 8x8 digits enlarged x{args.scale})")
    return 0


# ---------------------------------------------------------------------------------------------
# fastdiff bench
# ---------------------------------------------------------------------------------------------
# Where `pip install -e .` left the package: benchmarks/ sits two levels up in a source checkout. After a
# normal `pip install .` this is site-packages' parent, which has no benchmarks/: then the checkout is
# --checkout DIR, or the current directory (or one above it).
CHECKOUT = Path(__file__).resolve().parents[2]     # src/fastdiff/cli.py -> the checkout root

BENCH_PARTS = ("kernels", "accuracy", "quality")
#: ``fastdiff bench`` writes here by default: a fresh folder in the working directory, never the
#: results committed under benchmarks/results (pass --out-dir benchmarks/results to regenerate those).
BENCH_OUT_DIR = Path("fastdiff_bench")
#: What each part needs beyond fastdiff's own dependencies (checked before anything runs).
BENCH_NEEDS = {"kernels": ("matplotlib",), "accuracy": ("matplotlib",),
               "quality": ("matplotlib", "sklearn", "safetensors", "PIL")}
_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow"}


def _bench_parts(text: str) -> List[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in BENCH_PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(BENCH_PARTS)}, got {text!r}")
    return parts


def add_bench_arguments(p: argparse.ArgumentParser, out_dir: Path = BENCH_OUT_DIR) -> argparse.ArgumentParser:
    """The options of the benchmark suite: the one definition, shared by ``fastdiff bench`` (which
    needs them without a checkout, for --help and checking) and ``python -m benchmarks.suite``."""
    p.add_argument("--quick", action="store_true", help="CI-sized runs; output files get a _quick suffix")
    p.add_argument("--parts", type=_bench_parts, default=list(BENCH_PARTS),
                   help=f"comma-separated subset of {','.join(BENCH_PARTS)} (default: all)")
    p.add_argument("--out-dir", type=Path, default=out_dir, help=f"where to write (default {out_dir})")
    p.add_argument("--kernel-options", type=shlex.split, default=[], metavar="ARGS",
                   help="more arguments for benchmarks.step_bench, e.g. \"--shapes sd15 --threads 2\"")
    p.add_argument("--quality-options", type=shlex.split, default=[], metavar="ARGS",
                   help="more arguments for benchmarks.quality_table, e.g. \"--samples 100 --threads 1\"")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdiff bench",
                description="The benchmark suite: kernel table, accuracy and sample quality vs NFE (markdown, "
                            "JSON and a PNG plot per part). It runs the benchmarks/ scripts of a source checkout.",
                epilog="Parts: kernels (step_bench), accuracy (Gaussian mixture), quality (digits model). Needs "
                       "matplotlib (and scikit-learn, safetensors, Pillow for quality).")
    add_bench_arguments(p)
    p.add_argument("--checkout", type=Path, metavar="DIR",
                   help="the source checkout whose benchmarks/ to run (default: the checkout of an editable "
                        "install, else the current directory or the nearest one above it that has benchmarks/)")
    return p


def _is_checkout(root: Path) -> bool:
    return (root / "benchmarks" / "suite.py").is_file()


def find_checkout(explicit: Optional[Path] = None) -> Path:
    """The source checkout to benchmark: ``explicit`` (--checkout), else the checkout of an editable
    install (CHECKOUT), else the working directory or the nearest parent with benchmarks/suite.py."""
    if explicit is not None:
        root = Path(explicit).expanduser().resolve()
        if not _is_checkout(root):
            raise UsageError(f"--checkout {str(explicit)!r} has no benchmarks/suite.py: expected the root of a "
                             "fastdiff source checkout")
        return root
    if _is_checkout(CHECKOUT):
        return CHECKOUT
    cwd = Path.cwd().resolve()
    for root in (cwd, *cwd.parents):
        if _is_checkout(root):
            return root
    raise UsageError("fastdiff bench runs the benchmark scripts of a source checkout (benchmarks/ is not installed "
                     "with the package): run it from the checkout's root, or pass --checkout DIR")


def _benchmark_suite(checkout: Optional[Path] = None):
    """benchmarks.suite from the source checkout (the benchmarks/ folder is not part of the
    installed package)."""
    root = find_checkout(checkout)
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve().parent.parent != root:
        raise UsageError(f"another module named 'benchmarks' is already loaded from {Path(loaded.__file__).parent}, "
                         f"not {root / 'benchmarks'}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("benchmarks.suite")
    if Path(suite.__file__).resolve().parent.parent != root:
        raise UsageError(f"another module named 'benchmarks' shadows the checkout's: {suite.__file__}")
    return suite


def check_writable_dir(path: Path, what: str = "--out-dir") -> None:
    """Raise UsageError unless files can be written in the folder ``path`` (tried: a folder created
    by the check is removed again, so a refused run leaves nothing behind)."""
    import tempfile
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a file, not a folder")
    created = []
    try:
        missing = path
        while not missing.exists():
            created.append(missing)
            missing = missing.parent
        if not missing.is_dir():
            raise UsageError(f"cannot create {what} {str(path)!r}: {str(missing)!r} is a file")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"cannot write {what} {str(path)!r}: {e.strerror or e}") from None
    finally:
        for folder in created:       # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def cmd_bench(args, rest: List[str]) -> int:
    a = _bench_parser().parse_args(rest)      # --help and bad options work without a checkout
    missing = sorted({m for part in a.parts for m in BENCH_NEEDS[part] if importlib.util.find_spec(m) is None})
    if missing:
        names = " ".join(_PIP_NAMES.get(m, m) for m in missing)
        raise UsageError(f"fastdiff bench --parts {','.join(a.parts)} needs {', '.join(missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {names}")
    check_writable_dir(a.out_dir)
    suite = _benchmark_suite(a.checkout)
    return suite.run(a)


# ---------------------------------------------------------------------------------------------
# fastdiff check
# ---------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    import json

    from tqdm.auto import tqdm

    from fastdiff import check

    if args.json is not None:
        check_writable(args.json)
    names = None if not args.backend else [n for part in args.backend for n in part.split(",") if n]
    groups = None if not args.only else [g for part in args.only for g in part.split(",") if g]
    total = len(groups or check.OP_GROUPS) * len(names or check.kernel_backends())
    bar = tqdm(total=total, desc="fastdiff check", leave=False, disable=None)   # None: only on a terminal

    def progress(done: str) -> None:
        bar.set_postfix_str(done)
        bar.update(1)

    t0 = time.perf_counter()
    try:
        results = check.run_checks(names, groups=groups, large=not args.quick, progress=progress)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    print(check.render_table(results))
    bad = check.failed(results)
    for r in bad:
        print(f"FAIL {r.op} on {r.backend} ({r.case}): {r.detail}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": [r.to_json() for r in results], "failed": len(bad),
                                         "seconds": elapsed}, indent=1) + "\n")
    ran = sorted({r.backend for r in results if r.status != check.SKIPPED})
    if not ran:
        print("no kernel backend can run here: fastdiff runs on its reference backend, which is the oracle, "
              "so there is nothing to compare")
    else:
        checked = sum(r.status in (check.PASS, check.FAIL) for r in results)
        print(f"{checked - len(bad)} of {checked} checks passed on {', '.join(ran)} in {elapsed:.1f} s"
              + (f"; {len(bad)} FAILED" if bad else ""))
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# fastdiff info, fastdiff demo
# ---------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    import fastdiff
    from fastdiff.ops import available_backends
    from fastdiff.ops.backends import load_extension

    print(f"fastdiff {fastdiff.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  machine {platform.machine()}  "
          f"threads {torch.get_num_threads()}")
    cuda = f"yes ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "no"
    print(f"cuda available: {cuda}  (torch built with CUDA {torch.version.cuda or 'none'})")
    ext = load_extension()
    if isinstance(ext, str):
        print(f"fastdiff._C: not available: {ext}")
    elif hasattr(ext, "build_info"):
        print("fastdiff._C: built (" + ", ".join(f"{k} {v}" for k, v in ext.build_info()) + ")")
    else:
        print("fastdiff._C: built (no build_info in this build)")
    try:
        import triton
        print(f"triton {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run on the CPU interpreter)"
                                                 if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    except ImportError:
        print("triton: not installed")
    backends = available_backends()
    try:
        from fastdiff.ops.cuda_backend import BACKEND as cuda, load_cuda_extension
        ext = load_cuda_extension()
        print("CUDA extension: " + (ext if isinstance(ext, str) else
                                    "fastdiff._cuda built (" + ", ".join(f"{k} {v}" for k, v in cuda.build_info()) + ")"))
    except ImportError:
        print("CUDA extension: no CUDA backend in this fastdiff")
    for name, why in backends.items():
        print(f"  backend {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"solvers: {', '.join(sorted(fastdiff.SOLVERS))}")
    return 0


def cmd_demo(args) -> int:
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
    print(f"time: {elapsed * 1e3:.1f} ms total, {elapsed / args.steps * 1e6:.0f} us per step "
          f"(backend {args.backend}, including the analytic model)", flush=True)
    if solver.stochastic:
        x64 = x.to(torch.float64)
        mean_err = (x64.mean(0) - mixture.mean).abs().max().item()
        cov_err = (torch.cov(x64.T) - mixture.cov).abs().max().item()
        print(f"max |mean - true mean| = {mean_err:.3e}   max |cov - true cov| = {cov_err:.3e}")
        return 0
    # The reference: scipy's DOP853 at rtol 1e-12 takes far longer than the sampler (tens of seconds
    # for 4096 samples), so it announces itself, shows progress and reports its own time.
    show = args.progress if args.progress is not None else bool(sys.stderr.isatty())
    print(f"fastdiff demo: solving the exact ODE for {args.batch} samples with scipy (DOP853, rtol 1e-12) as "
          "the reference; this takes far longer than sampling", file=sys.stderr, flush=True)
    from tqdm.auto import tqdm
    bar = tqdm(total=1000, desc="exact ODE (reference)", leave=False, disable=not show,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")

    def advance(fraction: float) -> None:
        bar.update(int(fraction * 1000) - bar.n)

    t0 = time.perf_counter()
    try:
        exact = mixture.solve_ode(noise.to(torch.float64) * 80.0, 80.0, float(grid.ksigma[-1]), progress=advance)
    finally:
        bar.close()
    reference_seconds = time.perf_counter() - t0
    err = (x.to(torch.float64) - exact).abs().max().item()
    print(f"max |x - exact ODE solution| = {err:.3e}")
    print(f"reference: exact ODE solution (scipy DOP853, rtol 1e-12) in {reference_seconds:.1f} s, "
          "not included in the time above")
    return 0


def cmd_tune(args) -> int:
    from .tune import run_from_args
    return run_from_args(args)


def cmd_generate(args) -> int:
    from .distributed import run_from_args
    return run_from_args(args)


# ---------------------------------------------------------------------------------------------
# The parser and main
# ---------------------------------------------------------------------------------------------
def _default_threads() -> int:
    import torch
    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.schedules import SPACINGS
    p = _Parser(prog="fastdiff", description="Exact diffusion samplers on fused kernels.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("sample", help="sample digits from the shipped model; write a PNG grid; time per step, NFE",
                       description="Sample class-conditional 8x8 digits from the model fastdiff ships.")
    s.add_argument("--solver", default="dpmpp_2m", help="any of fastdiff.SOLVERS (default dpmpp_2m)")
    s.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                   help="a solver option, repeatable (e.g. --option order=3 --option solver_type=bh1)")
    s.add_argument("--steps", type=_positive_int, default=20)
    s.add_argument("--guidance", type=_finite_float, default=None,
                   help="classifier-free guidance scale on the digit label (default: none, i.e. 1 with --convention "
                        "w, 0 with 1+w; the model's best digits-FD. 2-3 gives prototypical digits with less variety)")
    s.add_argument("--convention", choices=("w", "1+w"), default="w",
                   help="w: uncond + w (cond - uncond) (diffusers); 1+w: (1 + w) cond - w uncond (Ho & Salimans)")
    s.add_argument("--guidance-method", default=None, metavar="NAME",
                   help="a single-pass guidance method in place of plain CFG (fastdiff.guiders): apg, cfg_zero_star, "
                        "tcfg, mambo_g, cfg_renorm, fdg; applied with the --guidance scale")
    s.add_argument("--guidance-option", type=_option, action="append", metavar="KEY=VALUE",
                   help="an option of the guidance method, repeatable (e.g. --guidance-option momentum=-0.5 "
                        "--guidance-option eta=0)")
    s.add_argument("--labels", type=parse_labels, default=list(range(10)), metavar="DIGITS",
                   help="digits, one grid row each: '0-9' (default), '3,3,7', '0-4,7'")
    s.add_argument("--n", type=_positive_int, default=8, help="samples per label (grid columns; default 8)")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--out", type=_png_path, default=Path("fastdiff_digits.png"), help="PNG file to write "
                   "(default fastdiff_digits.png)")
    s.add_argument("--scale", type=_positive_int, default=4, help="enlarge each 8x8 digit this many times (default 4)")
    s.add_argument("--backend", default="auto", help="auto (default), cpu, reference, triton, ...")
    s.add_argument("--spacing", choices=SPACINGS, default="trailing",
                   help="timestep spacing of the grid (default trailing: starts at t = 999, where the cosine "
                        "schedule's signal is really gone)")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch and the fused step (default: torch's default, "
                        f"{_default_threads()} here)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: when stderr is a terminal)")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", add_help=False,
                       help="the benchmark suite: kernel table, accuracy and sample quality vs NFE "
                            "(runs a source checkout's benchmarks/; `fastdiff bench --help` for its options)")
    b.set_defaults(func=cmd_bench, passes_rest=True)

    c = sub.add_parser("check", help="parity of every kernel on every backend here vs the reference oracles "
                                     "(exit status 1 on failure)",
                       description="Compare every kernel on every backend that can run here with the reference "
                                   "oracles; exit status 1 if any check fails. Without a GPU, the Triton kernels run "
                                   "on the CPU interpreter: TRITON_INTERPRET=1 fastdiff check --backend triton --quick "
                                   "(slow: about a minute or more).")
    c.add_argument("--backend", action="append", metavar="NAME[,NAME]",
                   help="check only these backends (default: every kernel backend registered)")
    c.add_argument("--only", action="append", metavar="GROUP[,GROUP]",
                   help="check only these op groups: fused_step, cfg_combine, philox, reductions")
    c.add_argument("--quick", action="store_true", help="leave out the 1000003-element cases")
    c.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="versions, built extensions, available backends")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("tune", help="time steps tuned to the model for a solver and step count (JSON grid file)",
                       description="Tune the time steps of a deterministic solver to the shipped digits model (or the "
                                   "analytic Gaussian mixture): dynamic programming over candidate points, then a "
                                   "continuous refinement of the final error. See fastdiff.tune.")
    from .tune import add_arguments as _tune_arguments
    _tune_arguments(t)
    t.set_defaults(func=cmd_tune)

    g = sub.add_parser("generate", help="N samples of the digits model into a folder, sharded over torchrun ranks, "
                                        "resumable; digits-FD at the end",
                       description="Generate N samples (one PNG each + manifest.json), sharded over the ranks of "
                                   "torchrun (`torchrun --nproc_per_node=2 -m fastdiff generate ...`); sample i is the "
                                   "same bits for any number of ranks. See fastdiff.distributed.")
    from .distributed import add_arguments as _generate_arguments
    _generate_arguments(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="sample the analytic Gaussian mixture; error vs exact; time per step")
    d.add_argument("--solver", default="dpmpp_2m")
    d.add_argument("--steps", type=_positive_int, default=20)
    d.add_argument("--batch", type=_positive_int, default=4096)
    d.add_argument("--dim", type=_positive_int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar for the reference ODE solve (default: when stderr is a terminal)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.command is None:   # no command: the demo (it needs no model file)
            args, rest = parser.parse_known_args(["demo"] + argv)
        if getattr(args, "passes_rest", False):
            return args.func(args, rest)
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except UsageError as e:
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, ArithmeticError, MemoryError) as e:
        # Bad configurations surface as these from the library; one line, no traceback.
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
