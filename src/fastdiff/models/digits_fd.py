"""Sample quality of the digits model: digits-FD and class accuracy, judged by a small classifier.

digits-FD is FID's recipe scaled down to 8x8 digits: fit a Gaussian to the penultimate-layer
features of a classifier trained on the same data (``DigitsClassifier``, trained and shipped by
``scripts/train_digits.py``) for the generated and for the real images, and report the Fréchet
distance between the two Gaussians. Like FID it is biased upwards for small sample counts, so
compare numbers only at equal sample counts. ``class_accuracy`` is the fraction of class-conditional
samples the classifier assigns to the label they were generated for.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn

from .digits import (IMAGE_SHAPE, NUM_CLASSES, WEIGHTS_DIR, _build_from_checkpoint, check_config_keys,
                     check_int_field)

__all__ = ["CLASSIFIER_FILE", "CLASSIFIER_SHA256", "DigitsClassifier", "load_digits_classifier",
           "classifier_features", "frechet_distance", "digits_fd", "class_accuracy", "sample_quality"]

CLASSIFIER_FILE = "digits_classifier.safetensors"
CLASSIFIER_SHA256 = "a96b24c35ad94aa4b241879a922a0787a6d4b7a759dee83ff27b9541dbcde3af"


class DigitsClassifier(nn.Module):
    """A small CNN on [B, 1, 8, 8] images in [-1, 1]; ``features`` is its penultimate layer."""

    CONFIG_FIELDS = ("channels", "feature_dim", "num_classes")

    @staticmethod
    def check_config(config: dict) -> dict:
        """The architecture fields, validated (ValueError naming the field)."""
        check_config_keys(config, DigitsClassifier.CONFIG_FIELDS)
        return {"channels": check_int_field("channels", config["channels"]),
                "feature_dim": check_int_field("feature_dim", config["feature_dim"], 1, 65536),
                "num_classes": check_int_field("num_classes", config["num_classes"], 1, 1000)}

    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = self.check_config({"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes})
        c, feature_dim, num_classes = self.config["channels"], self.config["feature_dim"], self.config["num_classes"]
        self.body = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                   # 4x4
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 16, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_digits_classifier(path: Union[str, Path, None] = None, *, sha256: Optional[str] = None) -> DigitsClassifier:
    """The shipped classifier (``path=None``, checked against ``CLASSIFIER_SHA256``) or one at
    ``path`` (checked against ``sha256`` or its ``.sha256`` sidecar), in eval mode."""
    if path is None:
        return _shipped_classifier()
    return _build_from_checkpoint(DigitsClassifier, Path(path), sha256, "DigitsClassifier")


@lru_cache(maxsize=1)
def _shipped_classifier() -> DigitsClassifier:
    return _build_from_checkpoint(DigitsClassifier, WEIGHTS_DIR / CLASSIFIER_FILE, CLASSIFIER_SHA256,
                                  "DigitsClassifier")


def _check_images(name: str, images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{type(images).__name__}{' of dtype ' + str(images.dtype) if isinstance(images, torch.Tensor) else ''}")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape [N, {', '.join(map(str, IMAGE_SHAPE))}], got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or Inf")
    # Judge what a viewer sees: samples are displayed clipped to the data range [-1, 1].
    return images.detach().float().cpu().clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: Optional[DigitsClassifier] = None) -> np.ndarray:
    """Penultimate-layer features [N, feature_dim] (float64) of images [N, 1, 8, 8] in [-1, 1]."""
    classifier = classifier or load_digits_classifier()
    return classifier.features(_check_images("images", images)).double().numpy()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) between two Gaussians."""
    with warnings.catch_warnings():
        # Dead ReLU features have zero variance, so the product is singular; sqrtm still returns
        # the right square root (checked against the eigenvalues of sqrt(cov1) cov2 sqrt(cov1)).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than feature dims): regularise as pytorch-fid does.
        eps = 1e-6 * np.eye(cov1.shape[0])
        covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)  # discard the tiny imaginary parts sqrtm leaves from rounding
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def _gaussian_fit(features: np.ndarray):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def digits_fd(samples: torch.Tensor, reference_images: torch.Tensor, *,
              classifier: Optional[DigitsClassifier] = None) -> float:
    """Fréchet distance between classifier-feature Gaussians of ``samples`` and ``reference_images``
    (both [N, 1, 8, 8], values in [-1, 1]; samples are clipped to it). Needs N >= 2 each."""
    for name, imgs in (("samples", samples), ("reference_images", reference_images)):
        if isinstance(imgs, torch.Tensor) and imgs.dim() >= 1 and imgs.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images to fit a Gaussian, got {imgs.shape[0]}")
    classifier = classifier or load_digits_classifier()
    f_gen = classifier_features(samples, classifier)
    f_ref = classifier_features(reference_images, classifier)
    return frechet_distance(*_gaussian_fit(f_gen), *_gaussian_fit(f_ref))


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels: torch.Tensor, *,
                   classifier: Optional[DigitsClassifier] = None) -> float:
    """Fraction of ``samples`` the classifier assigns to ``labels`` (int tensor [N] of digits 0-9)."""
    images = _check_images("samples", samples)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64/int32 torch.Tensor, got {type(labels).__name__}"
                        f"{' of dtype ' + str(labels.dtype) if isinstance(labels, torch.Tensor) else ''}")
    if tuple(labels.shape) != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] (one per sample), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be digits 0-{NUM_CLASSES - 1}, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    classifier = classifier or load_digits_classifier()
    pred = classifier(images).argmax(dim=1)
    return float((pred == labels.cpu().long()).float().mean())


def sample_quality(samples: torch.Tensor, labels: torch.Tensor, reference_images: torch.Tensor, *,
                   classifier: Optional[DigitsClassifier] = None) -> Dict[str, float]:
    """{"digits_fd": ..., "class_accuracy": ...} of class-conditional samples in one call."""
    classifier = classifier or load_digits_classifier()
    return {"digits_fd": digits_fd(samples, reference_images, classifier=classifier),
            "class_accuracy": class_accuracy(samples, labels, classifier=classifier)}
