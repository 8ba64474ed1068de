"""The shipped digits model: weights load and are verified, samples are recognisable digits, the
training script runs and is repeatable, and (slow, opt-in) a full retrain matches the shipped quality."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastdiff.models.digits import (IMAGE_SHAPE, MODEL_FILE, MODEL_SHA256, NULL_LABEL, PREDICTION, WEIGHTS_DIR,
                                    DigitsUNet, load_digits_data, load_digits_model, sample_digits, sha256_of)
from fastdiff.models.digits_fd import (CLASSIFIER_FILE, CLASSIFIER_SHA256, class_accuracy, digits_fd,
                                       load_digits_classifier)

from conftest import REPO  # noqa: E402
TRAIN_SCRIPT = REPO / "scripts" / "train_digits.py"

# Measured on the shipped model with 64 samples (labels 0-9 in turn), 10 dpmpp_2m steps, guidance 2,
# seeds 0-4: class accuracy 1.000 every time, digits-FD 30.9-47.1 against the training set. For scale at
# the same sample count: class-balanced held-out real digits score 22.7-29.4 (FD is biased upwards at
# small counts), uniform noise 597-731, and chance accuracy is 0.1.
MIN_ACCURACY_64 = 0.8
MAX_FD_64 = 80.0
# Shipped model, 1000 samples, dpmpp_2m 20 steps, no guidance, seed 0 (the held-out floor at 360 real
# images is 5.36, and these samples' first 360 score 4.52): the full-retrain reference. Retrained with
# --seed 1 the model scored 1.81 (accuracy 0.990 vs 0.997); the same seed and thread count reproduce
# the shipped file bit for bit. The tolerance is ~7x that seed-to-seed spread; 5 sampler steps
# instead of 20 already cost +2.1.
SHIPPED_FD_1000 = 1.952
FULL_RETRAIN_FD_TOLERANCE = 1.0


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


@pytest.fixture(scope="module")
def train_images():
    return load_digits_data("train")[0]


def _copy_with_sidecar(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    dst.with_name(dst.name + ".sha256").write_text(f"{sha256_of(src)}  {src.name}\n")
    return dst


# ---------------------------------------------------------------------------------------------
# Loading and checksums
# ---------------------------------------------------------------------------------------------
def test_shipped_weights_match_the_recorded_checksums():
    assert sha256_of(WEIGHTS_DIR / MODEL_FILE) == MODEL_SHA256
    assert sha256_of(WEIGHTS_DIR / CLASSIFIER_FILE) == CLASSIFIER_SHA256
    # The sidecars written by the training script agree with the constants in the code.
    assert (WEIGHTS_DIR / (MODEL_FILE + ".sha256")).read_text().split()[0] == MODEL_SHA256
    assert (WEIGHTS_DIR / (CLASSIFIER_FILE + ".sha256")).read_text().split()[0] == CLASSIFIER_SHA256
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total < 8 * 2 ** 20, f"shipped weights are {total / 2 ** 20:.1f} MiB; keep them to a few MB"


def test_shipped_model_loads_and_follows_the_model_convention(model):
    assert isinstance(model, DigitsUNet) and not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 200_000 <= n_params <= 1_500_000
    assert model.training_metadata["prediction"] == PREDICTION
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, *IMAGE_SHAPE)
    t = torch.tensor([999.0, 500.5, 0.0])
    out_cond = model(x, t, class_labels=torch.tensor([1, 7, NULL_LABEL]))
    out_uncond = model(x, t)  # class_labels=None means the null label
    assert out_cond.shape == x.shape and torch.isfinite(out_cond).all()
    assert torch.equal(out_uncond[2], out_cond[2])
    assert not torch.allclose(out_uncond[0], out_cond[0])  # the label matters
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([1, 2]))


def test_missing_weights_file_raises_file_not_found(tmp_path):
    missing = tmp_path / MODEL_FILE
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_digits_model(missing)
    # A weights file without its checksum sidecar (and no sha256=) is refused too.
    shutil.copyfile(WEIGHTS_DIR / MODEL_FILE, missing)
    with pytest.raises(FileNotFoundError, match=r"\.sha256"):
        load_digits_model(missing)
    assert isinstance(load_digits_model(missing, sha256=MODEL_SHA256), DigitsUNet)


def test_corrupt_weights_file_raises_checksum_mismatch(tmp_path):
    path = _copy_with_sidecar(WEIGHTS_DIR / MODEL_FILE, tmp_path)
    assert isinstance(load_digits_model(path), DigitsUNet)  # the intact copy loads
    data = bytearray(path.read_bytes())
    middle = len(data) // 2                    # inside the tensor data: safetensors alone would not notice
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checksum mismatch for {path}.*expected {MODEL_SHA256}"):
        load_digits_model(path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_digits_model(path, sha256=MODEL_SHA256)


def test_unreadable_file_with_matching_checksum_raises_value_error(tmp_path):
    bogus = tmp_path / MODEL_FILE
    bogus.write_bytes(b"\xff" * 64)
    bogus.with_name(bogus.name + ".sha256").write_text(sha256_of(bogus))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_digits_model(bogus)
    # A valid file of the wrong network (the classifier) is named as such.
    cls = _copy_with_sidecar(WEIGHTS_DIR / CLASSIFIER_FILE, tmp_path)
    with pytest.raises(ValueError, match="does not hold DigitsUNet weights"):
        load_digits_model(cls)


def test_classifier_loads_and_recognises_held_out_digits():
    images, labels = load_digits_data("heldout")
    assert class_accuracy(images, labels) >= 0.97
    assert load_digits_classifier() is load_digits_classifier()  # shipped one is cached


# ---------------------------------------------------------------------------------------------
# Metrics and sample quality
# ---------------------------------------------------------------------------------------------
def test_digits_fd_separates_real_digits_from_noise(train_images):
    held, _ = load_digits_data("heldout")
    assert digits_fd(train_images, train_images) == pytest.approx(0.0, abs=1e-6)
    floor = digits_fd(held, train_images)
    noise = torch.rand(len(held), *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 0 < floor < 10
    assert digits_fd(noise, train_images) > 20 * floor


def test_metrics_reject_bad_input(train_images):
    labels = torch.arange(8) % 10
    with pytest.raises(ValueError, match=r"shape \[N, 1, 8, 8\]"):
        digits_fd(torch.zeros(8, 8, 8), train_images)
    with pytest.raises(TypeError, match="floating-point"):
        digits_fd(torch.zeros(8, 1, 8, 8, dtype=torch.int64), train_images)
    with pytest.raises(ValueError, match="at least 2"):
        digits_fd(torch.zeros(1, 1, 8, 8), train_images)
    with pytest.raises(ValueError, match="NaN"):
        class_accuracy(torch.full((8, 1, 8, 8), float("nan")), labels)
    with pytest.raises(ValueError, match="one per sample"):
        class_accuracy(torch.zeros(8, 1, 8, 8), labels[:7])
    with pytest.raises(ValueError, match="digits 0-9"):
        class_accuracy(torch.zeros(8, 1, 8, 8), labels + 5)
    with pytest.raises(TypeError, match="int64"):
        class_accuracy(torch.zeros(8, 1, 8, 8), labels.float())
    with pytest.raises(TypeError, match="int64"):
        sample_digits(None, [1, 2])


def test_ten_step_class_conditional_samples_are_recognisable(model, train_images):
    labels = torch.arange(64) % 10
    x = sample_digits(model, labels, solver="dpmpp_2m", steps=10, guidance=2.0, seed=0)
    assert x.shape == (64, *IMAGE_SHAPE) and torch.isfinite(x).all()
    acc = class_accuracy(x, labels)
    fd = digits_fd(x, train_images)
    assert acc >= MIN_ACCURACY_64, f"class accuracy {acc:.3f} (chance: 0.1)"
    assert 0 < fd < MAX_FD_64, f"digits-FD {fd:.2f}"


# ---------------------------------------------------------------------------------------------
# Training script
# ---------------------------------------------------------------------------------------------
def _train_module():
    spec = importlib.util.spec_from_file_location("train_digits", TRAIN_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ):  # the script sets OMP_WAIT_POLICY for itself; keep ours unchanged
        spec.loader.exec_module(mod)
    return mod


def test_training_script_smoke_run_writes_loadable_weights(tmp_path):
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--steps", "10", "--classifier-steps", "10", "--batch-size", "32",
           "--eval-samples", "0", "--log-every", "5", "--threads", "1", "--out-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "unet step 10/10" in run.stdout and "sha256" in run.stdout
    model = load_digits_model(tmp_path / MODEL_FILE)
    assert model.training_metadata["steps"] == 10
    load_digits_classifier(tmp_path / CLASSIFIER_FILE)


def test_training_script_rejects_bad_arguments(capsys):
    td = _train_module()
    for argv, message in ((["--steps", "0"], "--steps must be >= 1"), (["--label-dropout", "1.5"], "--label-dropout"),
                          (["--channels", "a,b"], "--channels")):
        with pytest.raises(SystemExit) as exit_info:
            td.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_training_twice_with_the_same_seed_gives_identical_weights():
    td = _train_module()
    images, labels = load_digits_data("train")
    kw = dict(steps=3, batch_size=16, channels=(16, 32))
    with torch.random.fork_rng():
        a = td.train_unet(images, labels, seed=0, **kw).state_dict()
        b = td.train_unet(images, labels, seed=0, **kw).state_dict()
        c = td.train_unet(images, labels, seed=1, **kw).state_dict()
        ca = td.train_classifier(images, labels, steps=3, seed=0, batch_size=16).state_dict()
        cb = td.train_classifier(images, labels, steps=3, seed=0, batch_size=16).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters, so the check can fail
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.slow
def test_full_training_reproduces_the_shipped_quality(tmp_path, request, train_images):
    """The full recipe (scripts/train_digits.py defaults) trains a model of the shipped quality."""
    # pytest runs marked tests unless deselected; this one only runs when asked for by name (-m slow).
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("retrains the shipped model (minutes on 2 cores); run with -m slow")
    run = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--eval-samples", "0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=3 * 3600)
    assert run.returncode == 0, run.stderr
    labels = torch.arange(1000) % 10
    scores = {}
    for name, m in (("shipped", load_digits_model()), ("retrained", load_digits_model(tmp_path / MODEL_FILE))):
        x = sample_digits(m, labels, solver="dpmpp_2m", steps=20, guidance=1.0, seed=0)
        scores[name] = (digits_fd(x, train_images), class_accuracy(x, labels))
    assert scores["shipped"][0] == pytest.approx(SHIPPED_FD_1000, abs=0.1)
    assert abs(scores["retrained"][0] - scores["shipped"][0]) <= FULL_RETRAIN_FD_TOLERANCE, scores
    assert scores["retrained"][1] >= scores["shipped"][1] - 0.03, scores
