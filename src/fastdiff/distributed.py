"""Sharded generation on torch.distributed: N samples whose every bit is independent of how the
work was split.

    fastdiff generate --n 10000 --out samples/                         one process
    fastdiff.generate(n=10000, out="samples/")                         the same from Python
    torchrun --nproc_per_node=2 -m fastdiff generate -n 10000 --out samples/

The guarantee. Sample ``i`` starts from its own noise, Philox-4x32-10 keyed by
``sample_seed(seed, i)``, and a stochastic solver draws its step noise from the same key (one
``noise_id`` per draw), so no sample reads another's random numbers. The indices are cut into
chunks of ``batch`` consecutive indices, and chunk ``c`` runs on rank ``c mod world_size``. The
fused solver step is elementwise. So sample ``i`` is the same bits for any world size, any order
of the chunks and after any restart. The model itself is batched: its convolution and matmul
kernels block their sums by batch size, which moves the last bits (measured on the digits model:
2e-6). So a run's batch size is part of its identity, recorded in the manifest. Pass
``batch_invariant=True`` (``--batch-invariant``) to evaluate the model one sample at a time; then
the samples are also the same bits for any batch size, at the cost of speed.

Output: ``DIR/000000.png`` ... (one file per sample, named by zero-padded index), optionally the
raw float32 samples per chunk (``DIR/raw/chunk_000000.pt``), and ``DIR/manifest.json`` (the
config, versions, the seed rule, which indices are done, SHA-256 of every file, metrics). Every file
is written to a temporary name and renamed, so a rank that dies leaves nothing half-written; each
finished chunk leaves a record in ``DIR/.chunks/``. A rerun with the same arguments resumes: it
verifies the manifest's config and the finished chunks' checksums and skips them. A rerun with
different arguments is refused.

Metrics (the shipped digits model): digits-FD and class accuracy of all N samples as written
(decoded from the PNGs), the feature statistics reduced with ``all_reduce`` (sums of features and
of their outer products), not by gathering images.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["generate", "sample_seed", "GenerateResult", "chunk_indices", "SEED_RULE"]

FORMAT = 1
MANIFEST = "manifest.json"
CHUNKS_DIR = ".chunks"
RAW_DIR = "raw"
MASK64 = (1 << 64) - 1
SEED_RULE = ("sample i starts from Philox-4x32-10 noise keyed by sample_seed(seed, i) = "
             "splitmix64((seed << 32) | i) (noise_id 0; a stochastic solver's draw k uses noise_id k + 1); "
             "chunk c = indices [c*batch, (c+1)*batch) runs on rank c mod world_size")


def sample_seed(seed: int, index: int) -> int:
    """The Philox key of sample ``index``: splitmix64 of (seed, index) packed in 64 bits."""
    if not 0 <= seed < 2 ** 32 or not 0 <= index < 2 ** 32:
        raise ValueError(f"seed and index must be in [0, 2**32), got seed={seed}, index={index}")
    z = ((seed << 32) | index) + 0x9E3779B97F4A7C15 & MASK64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK64
    return z ^ (z >> 31)


def chunk_indices(n: int, batch: int) -> List[range]:
    return [range(s, min(s + batch, n)) for s in range(0, n, batch)]


# ---------------------------------------------------------------------------------------------
# Distributed context
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    initialized_here: bool = False

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_max(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0])

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.initialized_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def _init_distributed(device: torch.device, timeout_s: float) -> _Dist:
    """Join the process group torchrun set up (env:// rendezvous), or run as one process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), False)
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is None:
        return _Dist()
    try:
        world, rank = int(env_world), int(os.environ.get("RANK", "-1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={env_world!r} / RANK={os.environ.get('RANK')!r} are not integers") from None
    if world == 1:
        return _Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE={world} is set but the rendezvous is incomplete ({', '.join(missing) or 'RANK'} "
                         "missing or invalid): launch with `torchrun --nproc_per_node=N -m fastdiff generate ...`")
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    from datetime import timedelta
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return _Dist(dist.get_rank(), dist.get_world_size(), True)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _png_bytes(img: torch.Tensor) -> bytes:
    """[C, H, W] in [-1, 1] -> PNG (gray for C == 1, RGB for C == 3), 8 bits."""
    from PIL import Image
    a = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    pil = Image.fromarray(a[0], mode="L") if a.shape[0] == 1 else Image.fromarray(np.moveaxis(a, 0, -1), mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _read_png(path: Path) -> torch.Tensor:
    from PIL import Image
    a = np.asarray(Image.open(path), dtype=np.float32)
    a = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)
    return torch.from_numpy(a / 127.5 - 1.0)


def _name(i: int, width: int) -> str:
    return f"{i:0{width}d}.png"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class GenerateResult:
    out: Path
    n: int
    done_before: int                    # samples found finished (resumed), all ranks
    generated: int                      # samples generated by this run, all ranks
    seconds: float
    world_size: int
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else float("nan")


def _check_positive_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _prepare_out(out: Path, config: dict) -> Optional[dict]:
    """Check the output folder before any sampling; returns the existing manifest (resume) or None."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    manifest_path = out / MANIFEST
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {str(out)!r} is not writable")
        if manifest_path.is_file():
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{manifest_path} is unreadable ({e}); remove the folder or choose another") from None
            if old.get("format") != FORMAT or old.get("config") != config:
                diff = sorted(k for k in set(config) | set(old.get("config", {}))
                              if config.get(k) != old.get("config", {}).get(k))
                raise ValueError(f"{str(out)!r} holds another run (its manifest differs in {', '.join(diff) or 'format'}): "
                                 "rerun with the same arguments to resume, or choose another --out")
            return old
        leftovers = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if leftovers:
            raise ValueError(f"{str(out)!r} is not empty and has no {MANIFEST} (it holds e.g. {leftovers[0]!r}): "
                             "choose an empty or new folder")
        return None
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot create --out {str(out)!r}: {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create --out {str(out)!r}: {str(parent)!r} is not writable")
    return None


def _chunk_done(out: Path, c: int, chunk: range, width: int) -> bool:
    rec = out / CHUNKS_DIR / f"chunk_{c:06d}.json"
    if not rec.is_file():
        return False
    try:
        sums = json.loads(rec.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return False
    for i in chunk:
        name = _name(i, width)
        p = out / name
        if name not in sums or not p.is_file() or _sha256(p.read_bytes()) != sums[name]:
            return False
    return True


def generate(model: Optional[Callable] = None, *, n: int, out, solver: str = "dpmpp_2m", steps: int = 10,
             seed: int = 0, batch: int = 64, guidance: Optional[float] = None, shape: Optional[Sequence[int]] = None,
             schedule=None, prediction: Optional[str] = None, spacing: str = "trailing",
             conditions: Optional[Callable[[torch.Tensor], Tuple[dict, Optional[dict]]]] = None,
             solver_options: Optional[dict] = None, batch_invariant: bool = False, cfg_parallel: bool = False,
             raw: bool = False, metrics: bool = True, progress: bool = True, device="cpu",
             timeout_s: float = 300.0) -> GenerateResult:
    """Generate ``n`` samples into the folder ``out``, sharded over the torch.distributed ranks.

    ``model=None`` uses the shipped digits model (its schedule, v-prediction, labels ``i % 10``,
    metrics on); another ``model(x, t, **kw)`` needs ``shape`` (one sample), ``schedule`` and
    ``prediction``, and ``conditions(indices) -> (cond, uncond)`` kwarg dicts for the batch
    (``uncond`` needed with guidance). ``guidance`` is the CFG scale ("w" convention; None: off).
    ``cfg_parallel``: ranks work in pairs on the same chunk, one evaluating the conditional and one
    the unconditional half of each guided model call, exchanged with one all_gather; both run the
    same fused step. Every rank calls this with the same arguments; see the module docstring."""
    from . import __version__
    from .sampler import Sampler

    n = _check_positive_int("n", n)
    batch = _check_positive_int("batch", batch)
    steps = _check_positive_int("steps", steps)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if n >= 2 ** 32:
        raise ValueError(f"n must be < 2**32, got {n}")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0 <= guidance <= 100:
            raise ValueError(f"guidance must be a number in [0, 100] (or None), got {guidance!r}")
        guidance = float(guidance)
    device = torch.device(device)
    out = Path(out)

    digits = model is None
    if digits:
        from .models import digits as D
        if shape is not None or schedule is not None or prediction is not None or conditions is not None:
            raise ValueError("shape/schedule/prediction/conditions are those of the digits model when model is None")
        model = D.load_digits_model().to(device).eval()
        shape, schedule, prediction = D.IMAGE_SHAPE, D.digits_schedule(), D.PREDICTION

        def conditions(idx: torch.Tensor):
            labels = (idx % 10).to(device)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, D.NULL_LABEL)}
    else:
        if shape is None or schedule is None or prediction is None:
            raise ValueError("a custom model needs shape (of one sample), schedule and prediction")
        metrics = False
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 and not raw:
        raise ValueError(f"PNG output needs samples of shape [C, H, W], got {shape}; pass raw=True for other shapes")
    if len(shape) == 3 and shape[0] not in (1, 3) and not raw:
        raise ValueError(f"PNG output needs 1 or 3 channels, got {shape[0]}; pass raw=True")
    write_png = len(shape) == 3 and shape[0] in (1, 3)

    config = {"n": n, "solver": solver, "steps": steps, "seed": seed, "batch": None if batch_invariant else batch,
              "guidance": guidance, "spacing": spacing, "solver_options": solver_options or {},
              "batch_invariant": bool(batch_invariant), "cfg_parallel": bool(cfg_parallel), "raw": bool(raw),
              "shape": list(shape),
              "prediction": prediction, "model": "digits" if digits else getattr(model, "__class__", type(model)).__name__}

    # Everything that can fail is checked before the process group forms and before any sampling.
    sampler = Sampler.build(solver=solver, steps=steps, schedule=schedule, spacing=spacing, prediction=prediction,
                            guidance=guidance, solver_options=solver_options, device=device)
    stochastic = any(r.noise_id >= 0 for r in sampler.program.rows)
    ctx = _init_distributed(device, timeout_s)
    try:
        if n < ctx.world:
            raise ValueError(f"n={n} is smaller than the world size {ctx.world}: every rank needs a sample")
        if cfg_parallel and (guidance is None or ctx.world % 2):
            raise ValueError("cfg_parallel needs guidance and an even number of ranks (they work in pairs), got "
                             f"guidance={guidance}, world size {ctx.world}")
        # Work groups: one rank each, or a pair of ranks sharing every chunk (CFG-parallel).
        group_size = 2 if cfg_parallel else 1
        groups, group, member = ctx.world // group_size, ctx.rank // group_size, ctx.rank % group_size
        pair = _pair_group(ctx, groups) if cfg_parallel else None
        # Rank 0 checks the folder; every rank gets its verdict (the same error everywhere).
        verdict = None
        if ctx.rank == 0:
            try:
                _prepare_out(out, config)
            except (ValueError, PermissionError) as e:
                verdict = (type(e).__name__, str(e))
        verdict = ctx.broadcast_object(verdict)
        if verdict is not None:
            raise (PermissionError if verdict[0] == "PermissionError" else ValueError)(verdict[1])
        width = max(6, len(str(n - 1)))
        chunks = chunk_indices(n, batch)
        if ctx.rank == 0:
            (out / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
            if raw:
                (out / RAW_DIR).mkdir(exist_ok=True)
            manifest = {"format": FORMAT, "config": config, "seed_rule": SEED_RULE, "complete": False,
                        "versions": {"fastdiff": __version__, "torch": torch.__version__}}
            _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1).encode())
        ctx.barrier()
        # Chunk c belongs to group c mod groups; each rank checks its group's chunks' records.
        mine = [c for c in range(len(chunks)) if c % groups == group]
        writer = member == 0
        todo = [c for c in mine if not _chunk_done(out, c, chunks[c], width)]
        done_before = int(ctx.all_reduce(torch.tensor([writer * sum(len(chunks[c]) for c in mine if c not in todo)],
                                                       dtype=torch.int64))[0])
        rounds = ctx.all_max(len(todo))     # every rank joins every round's all_reduce

        bar = None
        if progress and ctx.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, initial=done_before, desc=f"fastdiff generate ({ctx.world} rank{'s' * (ctx.world > 1)})",
                       unit="sample")
        run_model = _per_sample(model) if batch_invariant else model
        if cfg_parallel:
            run_model = _CfgParallel(run_model, pair, member)
        t0 = time.perf_counter()
        generated = 0
        for k in range(rounds):
            count = 0
            if k < len(todo):
                c = todo[k]
                _run_chunk(sampler, run_model, conditions, chunks[c], c, shape, seed, stochastic, device, out, width,
                           raw, write_png, writer)
                count = len(chunks[c]) * writer
            total = int(ctx.all_reduce(torch.tensor([count], dtype=torch.int64))[0])
            generated += total
            if bar is not None:
                bar.update(total)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        complete = done_before + generated == n
        result_metrics: Dict[str, float] = {}
        if metrics and digits and complete:
            result_metrics = _digits_metrics(ctx, out, chunks, mine if writer else [], width, device)
        ctx.barrier()
        if ctx.rank == 0:
            sums: Dict[str, str] = {}
            for c in range(len(chunks)):
                rec = out / CHUNKS_DIR / f"chunk_{c:06d}.json"
                if rec.is_file():
                    sums.update(json.loads(rec.read_text())["sha256"])
            manifest = {"format": FORMAT, "config": config, "seed_rule": SEED_RULE, "complete": complete,
                        "versions": {"fastdiff": __version__, "torch": torch.__version__},
                        "done": _done_ranges(out, chunks),
                        "world_size_last_run": ctx.world, "sha256": sums, "metrics": result_metrics}
            _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        ctx.barrier()
        return GenerateResult(out, n, done_before, generated, seconds, ctx.world, result_metrics)
    finally:
        ctx.close()


def _done_ranges(out: Path, chunks) -> List[List[int]]:
    """The finished indices as [start, stop) ranges, merged."""
    ranges: List[List[int]] = []
    for c, chunk in enumerate(chunks):
        if (out / CHUNKS_DIR / f"chunk_{c:06d}.json").is_file():
            if ranges and ranges[-1][1] == chunk.start:
                ranges[-1][1] = chunk.stop
            else:
                ranges.append([chunk.start, chunk.stop])
    return ranges


def _per_sample(model: Callable) -> Callable:
    """The model evaluated one sample at a time: its output no longer depends on the batch."""
    def run(x, t, **kw):
        outs = []
        for b in range(x.shape[0]):
            kwb = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0] else v)
                   for k, v in kw.items()}
            o = model(x[b:b + 1], t[b:b + 1] if isinstance(t, torch.Tensor) and t.dim() else t, **kwb)
            outs.append(o.sample if hasattr(o, "sample") else o)
        return torch.cat(outs)
    return run


def _pair_group(ctx: _Dist, groups: int):
    """This rank's process group of two (every rank must create every group, in the same order)."""
    import torch.distributed as dist
    mine = None
    for g in range(groups):
        pg = dist.new_group([2 * g, 2 * g + 1])
        if ctx.rank // 2 == g:
            mine = pg
    return mine


class _CfgParallel:
    """One half of every guided model call: member 0 the unconditional, member 1 the conditional
    half of the [uncond; cond] batch, exchanged with one all_gather. Unguided calls (batch B) run
    whole on both members."""

    def __init__(self, model: Callable, group, member: int):
        self.model, self.group, self.member = model, group, member
        self.batch = None                         # B of the current chunk (set by _run_chunk)

    def __call__(self, x, t, **kw):
        import torch.distributed as dist
        B = self.batch
        if x.shape[0] != 2 * B:
            return self.model(x, t, **kw)
        sl = slice(self.member * B, (self.member + 1) * B)
        kw_half = {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 * B else v)
                   for k, v in kw.items()}
        half = self.model(x[sl], t[sl] if isinstance(t, torch.Tensor) and t.dim() else t, **kw_half)
        half = (half.sample if hasattr(half, "sample") else half).contiguous()
        parts = [torch.empty_like(half) for _ in range(2)]
        dist.all_gather(parts, half, group=self.group)
        return torch.cat(parts)


@torch.no_grad()
def _run_chunk(sampler, model, conditions, chunk: range, c: int, shape, seed: int, stochastic: bool, device,
               out: Path, width: int, raw: bool, write_png: bool, writer: bool = True):
    from . import ops
    seeds = [sample_seed(seed, i) for i in chunk]
    noise = torch.stack([ops.philox_normal(shape, s, 0, device=device) for s in seeds])

    def noise_sampler(row, x):       # a stochastic solver's draw k of sample i: noise_id k + 1 of its key
        return torch.stack([ops.philox_normal(shape, s, row.noise_id + 1, device=device) for s in seeds])
    idx = torch.tensor(list(chunk), dtype=torch.int64)
    cond, uncond = conditions(idx) if conditions is not None else ({}, None)
    if isinstance(model, _CfgParallel):
        model.batch = len(chunk)
    x = sampler(model, noise, cond=cond, uncond=uncond, noise_sampler=noise_sampler if stochastic else None,
                progress=False)
    if not writer:
        return
    sums = {}
    if write_png:
        for j, i in enumerate(chunk):
            data = _png_bytes(x[j])
            name = _name(i, width)
            _atomic_write(out / name, data)
            sums[name] = _sha256(data)
    if raw:
        buf = io.BytesIO()
        torch.save({"indices": list(chunk), "samples": x.detach().cpu().float().clone()}, buf)
        name = f"{RAW_DIR}/chunk_{c:06d}.pt"
        _atomic_write(out / name, buf.getvalue())
        sums[name] = _sha256(buf.getvalue())
    # The record comes last: a chunk is done only once every file of it is in place.
    _atomic_write(out / CHUNKS_DIR / f"chunk_{c:06d}.json",
                  json.dumps({"indices": [chunk.start, chunk.stop], "sha256": sums}).encode())


@torch.no_grad()
def _digits_metrics(ctx: _Dist, out: Path, chunks, mine, width: int, device) -> Dict[str, float]:
    """digits-FD and class accuracy of every sample as written, statistics reduced over ranks."""
    from .models import digits as D
    from .models import digits_fd as F
    clf = F.load_digits_classifier()
    s1 = s2 = None
    count = correct = 0
    for c in mine:
        idx = list(chunks[c])
        imgs = torch.stack([_read_png(out / _name(i, width)) for i in idx])
        feats = torch.from_numpy(F.classifier_features(imgs, clf))
        s1 = feats.sum(0) if s1 is None else s1 + feats.sum(0)
        s2 = feats.T @ feats if s2 is None else s2 + feats.T @ feats
        labels = torch.tensor(idx, dtype=torch.int64) % 10
        correct += int((clf(imgs).argmax(1) == labels).sum())
        count += len(idx)
    dim = clf.features(torch.zeros((1,) + D.IMAGE_SHAPE)).shape[1]
    s1 = torch.zeros(dim, dtype=torch.float64) if s1 is None else s1
    s2 = torch.zeros(dim, dim, dtype=torch.float64) if s2 is None else s2
    stats = torch.cat([s1, s2.reshape(-1), torch.tensor([count, correct], dtype=torch.float64)])
    stats = ctx.all_reduce(stats)
    s1, s2 = stats[:dim], stats[dim:dim + dim * dim].reshape(dim, dim)
    count, correct = float(stats[-2]), float(stats[-1])
    mu = (s1 / count).numpy()
    cov = ((s2 - count * torch.outer(s1 / count, s1 / count)) / (count - 1)).numpy()
    ref = F.classifier_features(D.load_digits_data("train")[0], clf)
    fd = F.frechet_distance(mu, cov, ref.mean(0), np.cov(ref, rowvar=False))
    return {"digits_fd": fd, "class_accuracy": correct / count, "samples": int(count)}


# ---------------------------------------------------------------------------------------------
# Command line (fastdiff generate)
# ---------------------------------------------------------------------------------------------
def add_arguments(p):
    # -n / --num-samples: under torchrun, its own parser takes `--n` for an abbreviation of its options.
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=int, required=True,
                   help="number of samples (write -n N or --num-samples N after torchrun)")
    p.add_argument("--out", required=True, help="output folder (created; a rerun with the same arguments resumes)")
    p.add_argument("--solver", default="dpmpp_2m", help="solver name (fastdiff.SOLVERS); default dpmpp_2m")
    p.add_argument("--steps", type=int, default=10, help="solver steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="base seed, sample i uses sample_seed(seed, i) (default 0)")
    p.add_argument("--batch", type=int, default=64, help="samples per model call (default 64)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, 'w' convention (default: off)")
    p.add_argument("--spacing", default="trailing", help="timestep spacing (default trailing)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="evaluate the model one sample at a time: the same bits for any --batch too (slower)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="ranks in pairs: one evaluates the conditional, one the unconditional half (needs --guidance)")
    p.add_argument("--raw", action="store_true", help="also write the raw float32 samples per chunk (raw/chunk_*.pt)")
    p.add_argument("--no-metrics", action="store_true", help="skip digits-FD and class accuracy at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the ranks wait for each other (default 300)")


def run_from_args(args) -> int:
    result = generate(n=args.n, out=args.out, solver=args.solver, steps=args.steps, seed=args.seed, batch=args.batch,
                      guidance=args.guidance, spacing=args.spacing, batch_invariant=args.batch_invariant,
                      cfg_parallel=args.cfg_parallel,
                      raw=args.raw, metrics=not args.no_metrics, progress=not args.no_progress,
                      timeout_s=args.timeout)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.n} samples in {result.out} ({result.done_before} found done, {result.generated} generated "
              f"in {result.seconds:.1f} s = {result.samples_per_second:.1f} samples/s on {result.world_size} "
              f"rank{'s' * (result.world_size > 1)})")
        if result.metrics:
            print(f"digits-FD {result.metrics['digits_fd']:.3f}, class accuracy "
                  f"{100 * result.metrics['class_accuracy']:.1f}% ({result.metrics['samples']} samples)")
    return 0
