#!/usr/bin/env python
"""Train fastdiff's shipped digits model (and the classifier behind digits-FD), reproducibly on a CPU.

    python scripts/train_digits.py                               # the shipped weights -> fastdiff/models/weights/ (~7 min, 2 cores)
    python scripts/train_digits.py --steps 20 --out-dir /tmp/w   # smoke run

Writes ``digits_unet.safetensors`` and ``digits_classifier.safetensors`` (each with a ``.sha256``
sidecar) to ``--out-dir`` and prints their digests; after retraining the shipped weights, copy the
digests into ``MODEL_SHA256`` (fastdiff/models/digits.py) and ``CLASSIFIER_SHA256``
(fastdiff/models/digits_fd.py). With the same seed, torch version and thread count the run is
bit-for-bit repeatable: every random draw comes from seeded generators and torch runs in
deterministic mode.

Recipe: v-prediction on the cosine (squaredcos_cap_v2) DiscreteVP schedule, uniform training
steps t in 0..999, labels dropped to the null label with probability --label-dropout (for CFG),
AdamW with warmup and cosine decay, gradient clipping, and an EMA of the weights (what is shipped).
The U-Net sees the digits without augmentation: they are size-normalised and centred, and shifted
copies would teach it off-centre digits. The classifier does get random 1-pixel shifts, so its
features vary smoothly under small spatial errors of generated samples.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

# The machine's cores are shared: OpenMP threads that spin while waiting for a descheduled peer
# made a 2-thread step ~10x slower under load. Sleeping waiters cost little when the CPU is free.
# (Must be set before torch loads OpenMP; it does not change any result.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # run from a checkout without installing

from fastdiff.models.digits import (BETA_SCHEDULE, MODEL_FILE, NULL_LABEL, PREDICTION, WEIGHTS_DIR,  # noqa: E402
                                    DigitsUNet, digits_schedule, load_digits_data, sample_digits,
                                    save_checkpoint)
from fastdiff.models.digits_fd import CLASSIFIER_FILE, DigitsClassifier, sample_quality  # noqa: E402


def configure_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Zero-initialised output layers produce denormal floats early on, which run ~10x slower on x86.
    torch.set_flush_denormal(True)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, background (-1) filled in."""
    B, _, H, W = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
    rows = dy[:, None] + torch.arange(H)                        # [B, H]
    cols = dx[:, None] + torch.arange(W)                        # [B, W]
    return padded[torch.arange(B)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def lr_at(step: int, total: int, warmup: int, final_fraction: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``final_fraction`` of the peak (a factor on the base lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def train_classifier(images, labels, *, steps: int, seed: int, batch_size: int = 128, lr: float = 2e-3,
                     log_every: int = 0) -> DigitsClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(random_shift(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  classifier step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def train_unet(images, labels, *, steps: int, seed: int, channels=(32, 64), batch_size: int = 128,
               lr: float = 2e-3, warmup: int = 200, ema_decay: float = 0.999, label_dropout: float = 0.12,
               log_every: int = 0) -> DigitsUNet:
    """Train the U-Net; returns the EMA copy of its weights (in eval mode)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = DigitsUNet(channels)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, min(warmup, steps)))
    schedule = digits_schedule()
    abar = torch.from_numpy(schedule.alphas_cumprod).float()
    T = len(abar)
    model.train()
    start, running = time.perf_counter(), None
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < label_dropout] = NULL_LABEL
        t = torch.randint(0, T, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a, s = abar[t].sqrt()[:, None, None, None], (1 - abar[t]).sqrt()[:, None, None, None]
        x_t, v = a * x0 + s * eps, a * eps - s * x0
        loss = F.mse_loss(model(x_t, t.float(), class_labels=y), v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with a short warmup of its own, so a short run is not dominated by the random init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - start
            print(f"  unet step {step + 1}/{steps}  loss(avg) {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{el:.0f}s elapsed, ~{el / (step + 1) * (steps - step - 1):.0f}s left", flush=True)
    ema.train_info = {"final_loss_avg": running}
    return ema.eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR, help="where to write the weights (default: the package's)")
    p.add_argument("--steps", type=int, default=3000, help="U-Net training steps")
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.12)
    p.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=(32, 64),
                   help="U-Net widths at 8x8 and 4x4, e.g. 32,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are repeatable per thread count)")
    p.add_argument("--eval-samples", type=int, default=1000,
                   help="samples for the closing digits-FD / accuracy report (0: skip)")
    p.add_argument("--log-every", type=int, default=250)
    args = p.parse_args(argv)
    for name in ("steps", "classifier_steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.label_dropout < 1:
        p.error(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_torch(args.threads)
    images, labels = load_digits_data("train")
    print(f"digits: {len(labels)} training images; seed {args.seed}, {args.threads} threads, torch {torch.__version__}",
          flush=True)

    t0 = time.perf_counter()
    classifier = train_classifier(images, labels, steps=args.classifier_steps, seed=args.seed,
                                  batch_size=args.batch_size, log_every=args.log_every)
    held_images, held_labels = load_digits_data("heldout")
    with torch.no_grad():
        held_acc = float((classifier(held_images).argmax(1) == held_labels).float().mean())
    t_cls = time.perf_counter() - t0
    print(f"classifier: {t_cls:.1f}s, held-out accuracy {held_acc:.4f}", flush=True)

    t0 = time.perf_counter()
    unet = train_unet(images, labels, steps=args.steps, seed=args.seed, channels=args.channels,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                      label_dropout=args.label_dropout, log_every=args.log_every)
    t_unet = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet: {n_params} parameters, {args.steps} steps in {t_unet:.1f}s", flush=True)

    # No timestamps or paths: a repeated run must write the same bytes.
    common = {"seed": args.seed, "threads": args.threads, "torch": torch.__version__,
              "data": "sklearn load_digits, training split (fastdiff.models.digits.load_digits_data)"}
    cls_digest = save_checkpoint(classifier, args.out_dir / CLASSIFIER_FILE, {
        **common, "config": classifier.config, "steps": args.classifier_steps,
        "heldout_accuracy": round(held_acc, 4)})
    unet_digest = save_checkpoint(unet, args.out_dir / MODEL_FILE, {
        **common, "config": unet.config, "steps": args.steps, "prediction": PREDICTION,
        "beta_schedule": BETA_SCHEDULE, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "ema_decay": args.ema_decay, "label_dropout": args.label_dropout,
        "final_loss_avg": round(unet.train_info["final_loss_avg"], 5)})
    print(f"wrote {args.out_dir / MODEL_FILE}\n  sha256 {unet_digest}")
    print(f"wrote {args.out_dir / CLASSIFIER_FILE}\n  sha256 {cls_digest}", flush=True)

    result = {"unet_sha256": unet_digest, "classifier_sha256": cls_digest, "heldout_accuracy": held_acc,
              "classifier_seconds": t_cls, "unet_seconds": t_unet}
    if args.eval_samples:
        n = args.eval_samples
        sample_labels = torch.arange(n) % 10
        floor = sample_quality(held_images, held_labels, images, classifier=classifier)
        print(f"eval floor (held-out real vs train, {len(held_labels)} images): digits-FD {floor['digits_fd']:.3f}")
        result["floor_fd"] = floor["digits_fd"]
        for guidance in (1.0, 3.0):  # guidance trades variety (FD) for prototypical digits (accuracy)
            t0 = time.perf_counter()
            x = sample_digits(unet, sample_labels, solver="dpmpp_2m", steps=20, guidance=guidance, seed=args.seed)
            q = sample_quality(x, sample_labels, images, classifier=classifier)
            print(f"eval ({n} samples, dpmpp_2m 20 steps, guidance {guidance:g}, {time.perf_counter() - t0:.1f}s): "
                  f"digits-FD {q['digits_fd']:.3f}, class accuracy {q['class_accuracy']:.4f}", flush=True)
            result[f"eval_guidance_{guidance:g}"] = q
    return result


if __name__ == "__main__":
    main()
