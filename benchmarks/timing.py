"""What every benchmark script here shares: timing with medians, the machine's copy bandwidth,
a description of the machine, and the thread-count setting.

Timing: a *sample* is ``number`` back-to-back calls (``number`` chosen so a sample lasts at least
``sample_time``, which makes timer overhead negligible), reported per call; a measurement takes
samples until it has at least ``min_samples`` and has run ``min_time`` seconds, and reports the
median and the interquartile range over samples. Medians, because this machine is shared: a
sample that lost the CPU to another process is an outlier, not a trend. Implementations that
are to be compared are measured together, their samples interleaved, so that the others' load
at the time falls on all of them alike.

Threads: fastdiff._C runs its OpenMP loops with ``at::get_num_threads()``, i.e. torch's setting,
so ``torch.set_num_threads(n)`` governs fastdiff, eager PyTorch and torch.compile alike
(``OMP_NUM_THREADS`` only sets torch's default at start-up). Inductor fixes the thread count of
its generated code when it compiles, so compile under the count you will run with.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and interquartile range over ``samples`` samples of ``number`` calls."""

    median: float
    iqr: float
    samples: int
    number: int

    def as_dict(self) -> dict:
        return asdict(self)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Sampler:
    """Samples of one callable: ``number`` calls each, after an untimed ``fn.prepare(number)``."""

    def __init__(self, fn: Callable[[], object], sample_time: float, warmup: int, clock: str):
        self.fn = fn
        self.prepare = getattr(fn, "prepare", lambda number: None)
        max_calls = int(getattr(fn, "max_calls", 1 << 20)) - 1      # one call of each sample is untimed
        self.timer = timeit.Timer(fn, timer=CLOCKS[clock])
        self.prepare(warmup)
        for _ in range(warmup):
            fn()
        self.number = 1
        while True:                      # calibrate: double until a sample is long enough
            t = min(self.sample() for _ in range(3))     # min: one preempted sample must not decide
            if t * self.number >= sample_time or 2 * self.number > max_calls:
                break
            self.number *= 2
        self.per_call = []

    def sample(self) -> float:
        # Samples of short calls start with one untimed call: the caches, TLB and branch state the
        # interleaved neighbours (e.g. a 256 MiB copy) left behind would otherwise weigh on the
        # first timed call, and bias short samples by their order. Long calls (one per sample) are
        # timed as they come.
        warm = self.number > 1
        self.prepare(self.number + warm)
        if warm:
            self.fn()
        return self.timer.timeit(self.number) / self.number

    def timing(self) -> Timing:
        q1, med, q3 = np.percentile(self.per_call, [25, 50, 75])
        return Timing(float(med), float(q3 - q1), len(self.per_call), self.number)


def measure_interleaved(fns: Dict[Hashable, Callable[[], object]], *, min_samples: int = 15, min_time: float = 0.5,
                        sample_time: float = 2e-3, warmup: int = 3, clock: str = "wall") -> Dict[Hashable, Timing]:
    """Median time per call of each ``fn()``, taking their samples in turn (A, B, C, A, B, C, ...)
    so that a change in the machine's load during the measurement hits all of them alike: ratios
    between them stay meaningful on a shared machine. Stops when every fn has ``min_samples``
    samples and the whole took ``min_time`` seconds per fn.

    A stateful fn (one that updates its inputs in place) may have ``fn.prepare(number)`` and
    ``fn.max_calls``: ``prepare`` runs untimed before each sample of ``number`` calls (e.g. to
    restore a state that repeated calls would drive to overflow), and no sample makes more than
    ``max_calls`` calls.

    ``clock``: ``"wall"`` (elapsed time, what a user waits) or ``"cpu"`` (CPU time of this
    process, all its threads): on a machine shared with other jobs, the CPU time of
    single-threaded work leaves out the time the process waited for a core, so it shows the
    work itself; it also leaves out time a thread slept (e.g. an OpenMP worker waiting to be
    scheduled), so for several threads prefer wall time."""
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    samplers = {k: _Sampler(fn, sample_time, warmup, clock) for k, fn in fns.items()}
    start = time.perf_counter()
    while (min(len(s.per_call) for s in samplers.values()) < min_samples
           or time.perf_counter() - start < min_time * len(samplers)):
        for s in samplers.values():
            s.per_call.append(s.sample())
    return {k: s.timing() for k, s in samplers.items()}


def measure(fn: Callable[[], object], **options) -> Timing:
    """Median time per call of one ``fn()``; see ``measure_interleaved`` for the options."""
    return measure_interleaved({"fn": fn}, **options)["fn"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch (and so fastdiff._C and inductor's code) on ``n`` threads."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive int, got {n!r}")
    prior = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prior)


class BandwidthProbe:
    """An out-of-cache streaming op on float32 buffers of ``mib`` MiB each; ``nbytes`` is what one
    call counts as moved.

    ``copy``: ``dst.copy_(src)``, counted as read + write. ``inplace_add``: ``a.add_(b)``, counted
    as three streams. The copy's destination lines are read before they are written
    (write-allocate) without being counted; an in-place update pays for exactly what it counts,
    as fastdiff's in-place step does. So a fused step can exceed 100% of the copy bandwidth, and
    the in-place add is the closer ceiling for it."""

    KINDS = ("copy", "inplace_add")

    def __init__(self, kind: str, mib: int = 256):
        if kind not in self.KINDS:
            raise ValueError(f"unknown probe {kind!r}; expected one of {self.KINDS}")
        n = mib * 2 ** 20 // 4
        self.kind, self.mib = kind, mib
        self.a = torch.randn(n)
        if kind == "copy":
            self.b = torch.empty_like(self.a)
            self.b.copy_(self.a)               # fault the pages in before timing
            self.nbytes = 2 * n * 4
        else:
            self.b = torch.randn(n) * 1e-30    # keeps a from growing over many calls
            self.nbytes = 3 * n * 4

    def __call__(self):
        if self.kind == "copy":
            self.b.copy_(self.a)
        else:
            self.a.add_(self.b)

    def result(self, t: Timing) -> Dict[str, float]:
        return {"mib_per_buffer": self.mib, "bytes": self.nbytes, "median_s": t.median, "iqr_s": t.iqr,
                "samples": t.samples, "gbps": self.nbytes / t.median / 1e9}


def copy_bandwidth(mib: int = 256, **measure_options) -> Dict[str, float]:
    """Out-of-cache copy bandwidth with torch's current thread count (see BandwidthProbe)."""
    probe = BandwidthProbe("copy", mib)
    return probe.result(measure(probe, **measure_options))


def load_average() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """The machine and software a result was measured on."""
    from fastdiff.ops.backends import load_extension

    ext = load_extension()
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "avx512": " avx512f" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "fastdiff_C": dict(ext.build_info()) if not isinstance(ext, str) else ext,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_start": load_average(),
    }


def describe_machine(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores{' (AVX-512)' if info.get('avx512') else ''}, "
            f"{info['memory_gib']} GiB; torch {info['torch']}, diffusers {info['diffusers']}, "
            f"python {info['python']}; commit {info['git_commit']}")
