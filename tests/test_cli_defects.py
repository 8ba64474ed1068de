"""Regression tests for the CLI, weights-loader, k-diffusion and README defects of issue 12
(items 12, 15, 16, 17, 18) and for ``fastdiff bench`` from a normal (non-editable) install."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import cli
from fastdiff.cli import main
from fastdiff.models import digits

from conftest import REPO
from test_cli import assert_one_line_error, assert_png, needs_weights, run


# ---------------------------------------------------------------------------------------------
# fastdiff bench from a normal install: the package does not sit in the checkout, so CHECKOUT
# (the editable install's location) has no benchmarks/; the checkout is the working directory
# or --checkout DIR.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def installed(monkeypatch, tmp_path):
    """fastdiff as `pip install .` leaves it: CHECKOUT is site-packages' parent, no benchmarks/."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(cli, "CHECKOUT", site)
    return site


def test_bench_help_from_a_normal_install_anywhere(installed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--parts" in out and "--checkout" in out and "--out-dir" in out


def test_bench_bad_parts_from_a_normal_install(installed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run(capsys, ["bench", "--parts", "nope"]),
                          match="expected some of kernels, accuracy, quality")


def test_bench_outside_a_checkout_says_how_to_point_at_one(installed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run(capsys, ["bench", "--quick", "--out-dir", str(tmp_path / "o")]),
                          match="--checkout")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(*run(capsys, ["bench", "--checkout", str(tmp_path), "--out-dir", str(tmp_path / "o")]),
                          match="no benchmarks/suite.py")


def test_bench_from_a_normal_install_finds_the_checkout_in_the_cwd(installed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    status, out, _ = run(capsys, ["bench", "--quick", "--quiet", "--parts", "accuracy", "--out-dir", str(tmp_path)])
    assert status == 0 and "| DPM-Solver++(2M) |" in out
    assert_png(tmp_path / "accuracy_vs_nfe_quick.png")


def test_bench_from_a_normal_install_with_checkout_option(installed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(capsys, ["bench", "--checkout", str(REPO), "--quick", "--quiet", "--parts", "accuracy",
                                  "--out-dir", str(tmp_path / "out")])
    assert status == 0 and "| DPM-Solver++(2M) |" in out
    assert (tmp_path / "out" / "accuracy_table_quick.json").is_file()


# ---------------------------------------------------------------------------------------------
# Item 12: non-finite values raise FloatingPointError naming the step, on every driver
# ---------------------------------------------------------------------------------------------
class NaNOnce:
    """A model that returns NaN at its ``bad``-th call and is fine otherwise; counts its calls and
    stops a runaway loop (AssertionError) after ``limit`` calls."""

    def __init__(self, inner, bad=1, limit=400, value=float("nan")):
        self.inner, self.bad, self.limit, self.value, self.calls = inner, bad, limit, value, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        assert self.calls <= self.limit, f"no error after {self.calls} model calls: the driver loops"
        out = self.inner(x, t, **kw)
        return torch.full_like(out, self.value) if self.calls == self.bad else out


def _mixture(dim=2, prediction="sample"):
    from fastdiff.models import GaussianMixture
    from fastdiff.schedules import VESchedule
    return GaussianMixture.default(VESchedule(), dim=dim, prediction=prediction)


KD_NAN_SAMPLERS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
                   "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m",
                   "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_k_dpm_adaptive_raises_on_a_nan_instead_of_looping(value):
    from fastdiff.integrations import k_diffusion as K
    model = NaNOnce(_mixture(), bad=3, value=value)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        K.sample_dpm_adaptive(model, x, 0.02, 80.0)
    assert model.calls < 20


@pytest.mark.parametrize("driver", ["dpm_adaptive", "step_doubling"])
def test_fastdiff_adaptive_raises_floating_point_error_not_max_nfe(driver):
    from fastdiff import adaptive
    from fastdiff.schedules import VESchedule
    model = NaNOnce(_mixture(), bad=2)
    fn = adaptive.sample_dpm_adaptive if driver == "dpm_adaptive" else adaptive.sample_step_doubling
    with pytest.raises(FloatingPointError, match=r"step \d+") as e:
        fn(model, torch.randn(4, 2), schedule=VESchedule(sigma_min=0.02, sigma_max=80.0), prediction="sample",
           max_nfe=300)
    assert "rtol" not in str(e.value) and model.calls < 20


def test_adaptive_raises_when_the_last_noise_makes_the_state_non_finite():
    from fastdiff import adaptive
    from fastdiff.schedules import VESchedule

    def bad_noise(row, x):
        return torch.full_like(x, float("nan"))
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        adaptive.sample_dpm_adaptive(_mixture(), torch.randn(4, 2), schedule=VESchedule(sigma_min=0.02, sigma_max=80.0),
                                     prediction="sample", eta=1.0, noise_sampler=bad_noise, max_nfe=300)


@pytest.mark.parametrize("bad", [1, 4], ids=["predictor", "corrector"])
def test_predictor_corrector_raises_naming_the_step(bad):
    from fastdiff.predictor_corrector import sample_pc
    from fastdiff.schedules import VESchedule
    model = NaNOnce(_mixture(), bad=bad)
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        sample_pc(model, torch.randn(4, 2), predictor="euler", steps=5,
                  schedule=VESchedule(sigma_min=0.02, sigma_max=80.0), spacing="karras", prediction="sample", seed=0)


@pytest.mark.parametrize("name", KD_NAN_SAMPLERS)
def test_k_diffusion_nan_message_gives_advice_that_works(name):
    from fastdiff.integrations import k_diffusion as K
    sigmas = K.get_sigmas_karras(4, 0.02, 80.0, device="cpu").double()
    x = torch.randn(3, 2, dtype=torch.float64) * 80.0
    with pytest.raises(FloatingPointError, match=r"step \d+") as e:
        getattr(K, name)(NaNOnce(_mixture(), bad=2), x, sigmas)
    advice = re.findall(r"check_finite='(\w+)'", str(e.value))
    assert advice == ["off"], str(e.value)
    torch.manual_seed(0)
    out = getattr(K, name)(NaNOnce(_mixture(), bad=2), x, sigmas, check_finite="off")   # the advice works
    assert out.shape == x.shape and not torch.isfinite(out).all()


def test_k_dpm_fast_raises_and_accepts_check_finite():
    from fastdiff.integrations import k_diffusion as K
    x = torch.randn(3, 2, dtype=torch.float64) * 80.0
    with pytest.raises(FloatingPointError, match=r"step \d+"):
        K.sample_dpm_fast(NaNOnce(_mixture(), bad=2), x, 0.02, 80.0, 6)
    out = K.sample_dpm_fast(NaNOnce(_mixture(), bad=2), x, 0.02, 80.0, 6, check_finite="off")
    assert not torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Item 15: fastdiff sample validates everything before sampling; one line, exit 2
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(digits, "load_digits_model", refuse)


SAMPLE_BAD = [
    (["--guidance", "1e300"], "--guidance"),
    (["--guidance=-1e300"], "--guidance"),
    (["--guidance", "1e6", "--convention", "1+w"], "--guidance"),
    (["--scale", "100000"], "--scale"),
    (["--n", "100000"], "--n"),
    (["--solver", "ddim", "--option", "eta=abc"], "eta"),
    (["--solver", "unipc", "--option", "order=2", "--option", "solver_type=nope"], "solver_type"),
    (["--out", "/proc/fastdiff_grid.png"], "cannot write"),
    (["--out", "/sys/fastdiff_grid.png"], "cannot write"),
]


@pytest.mark.parametrize("args,match", SAMPLE_BAD, ids=[" ".join(a) for a, _ in SAMPLE_BAD])
def test_sample_validates_before_sampling(args, match, tmp_path, capsys, no_model):
    argv = ["sample", "--out", str(tmp_path / "grid.png")] + args
    assert_one_line_error(*run(capsys, argv), match=match)
    assert list(tmp_path.iterdir()) == []


def test_sample_option_error_names_the_option(tmp_path, capsys, no_model):
    status, out, err = run(capsys, ["sample", "--solver", "ddim", "--option", "eta=abc", "--out", str(tmp_path / "g.png")])
    assert_one_line_error(status, out, err, match="--option eta='abc'")


def test_sample_writable_check_leaves_no_file_behind(tmp_path, capsys, no_model):
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    assert_one_line_error(*run(capsys, ["sample", "--steps", "0", "--out", str(existing)]), match="--steps")
    assert existing.read_bytes() == b"keep"
    assert_one_line_error(*run(capsys, ["sample", "--solver", "nope", "--out", str(tmp_path / "new.png")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]


# ---------------------------------------------------------------------------------------------
# Item 18: README truthfulness
# ---------------------------------------------------------------------------------------------
README = (REPO / "README.md").read_text()


def test_readme_drop_in_count_is_computed_truthfully():
    pytest.importorskip("diffusers")
    from fastdiff.integrations import diffusers as fd
    stated = [int(n) for n in re.findall(r"(\d+)\s+drop-in scheduler", README)]
    assert all(n == len(fd.DROP_INS) for n in stated), (stated, len(fd.DROP_INS))
    assert "fastdiff.integrations.diffusers.DROP_INS" in README


def _readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_stable_diffusion_snippet_gives_diffusers_timesteps(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import fastdiff
    from fastdiff.schedules import make_grid
    snippet = next(b for b in _readme_python_blocks() if "Stable Diffusion's schedule" in b)
    seen = {}

    def record(model, noise, **kw):
        seen.update(kw)
    monkeypatch.setattr(fastdiff, "sample", record)
    exec(snippet, {"unet_fn": None, "text": None, "empty": None})
    grid = make_grid(seen["schedule"], seen["steps"], seen["spacing"], **seen.get("grid_options", {}))
    # Stable Diffusion 1.x's scheduler config (its PNDM/DDIM: leading spacing, steps_offset=1)
    stock = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    stock.set_timesteps(seen["steps"])
    assert [int(t) for t in grid.t[:seen["steps"]]] == stock.timesteps.tolist()
    assert torch.allclose(torch.as_tensor(seen["schedule"].alphas_cumprod), stock.alphas_cumprod.double())


def test_readme_and_docstring_say_when_k_diffusion_results_differ():
    from fastdiff.integrations import k_diffusion as K
    assert "exactly as before" not in README
    for text in (README, K.__doc__):
        assert 'noise="torch"' in text and "Philox" in text and "same seed" in text


@needs_weights
@pytest.mark.parametrize("convention", ["w", "1+w"])
def test_sample_default_shows_the_model_at_its_best(convention, tmp_path, capsys):
    """No CFG by default (digits-FD 1.95 vs 34.0 at w = 3, from the model's own docstring), and
    the README explains the two digits-FD scales (sample counts)."""
    status, out, _ = run(capsys, ["sample", "--steps", "2", "--n", "1", "--labels", "3", "--convention", convention,
                                  "--out", str(tmp_path / "g.png")])
    assert status == 0 and "no CFG" in out and "NFE: 2 model evaluations\n" in out
    assert "1.95" in digits.__doc__ and "1.95" in README and "34.0" in README
    assert "biased upwards" in README and "--guidance 1" in README


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf"), "2", None])
def test_polyexponential_rejects_bad_rho(rho):
    from fastdiff.integrations import k_diffusion as K
    with pytest.raises((ValueError, TypeError), match="rho"):
        K.get_sigmas_polyexponential(5, 0.1, 10.0, rho=rho)
    assert torch.isfinite(K.get_sigmas_polyexponential(5, 0.1, 10.0, rho=0.5)).all()


# ---------------------------------------------------------------------------------------------
# Item 17: the weights loader validates every architecture field (valid checksum, bad metadata)
# ---------------------------------------------------------------------------------------------
def _checkpoint_with_config(tmp_path, config, cls_name="unet"):
    """A safetensors file (with a matching .sha256 sidecar) whose metadata holds ``config``."""
    pytest.importorskip("safetensors")
    from fastdiff.models.digits_fd import DigitsClassifier
    module = digits.DigitsUNet(channels=(8, 16), heads=2) if cls_name == "unet" else DigitsClassifier(channels=4)
    path = tmp_path / f"{cls_name}.safetensors"
    digits.save_checkpoint(module, path, {"config": config})
    return path


UNET_BAD = [
    ({"channels": [8, 16], "heads": 0, "num_classes": 10}, "heads"),
    ({"channels": [8, 16], "heads": -2, "num_classes": 10}, "heads"),
    ({"channels": [8, 16], "heads": 3, "num_classes": 10}, "heads"),
    ({"channels": [8, 16], "heads": 2.5, "num_classes": 10}, "heads"),
    ({"channels": [8, 16], "heads": True, "num_classes": 10}, "heads"),
    ({"channels": [8, 16], "heads": "2", "num_classes": 10}, "heads"),
    ({"channels": [0, 16], "heads": 2, "num_classes": 10}, "channels"),
    ({"channels": [8], "heads": 2, "num_classes": 10}, "channels"),
    ({"channels": 8, "heads": 2, "num_classes": 10}, "channels"),
    ({"channels": [8, 12], "heads": 2, "num_classes": 10}, "channels"),
    ({"channels": [8, 10 ** 9], "heads": 2, "num_classes": 10}, "channels"),
    ({"channels": [8, 16], "heads": 2, "num_classes": 0}, "num_classes"),
    ({"channels": [8, 16], "heads": 2, "num_classes": None}, "num_classes"),
    ({"channels": [8, 16], "heads": 2}, "num_classes"),
    ({"channels": [8, 16], "heads": 2, "num_classes": 10, "depth": 3}, "depth"),
    ([8, 16, 2], "config"),
]


@pytest.mark.parametrize("config,field", UNET_BAD, ids=[str(c) for c, _ in UNET_BAD])
def test_weights_loader_validates_architecture_fields(config, field, tmp_path):
    path = _checkpoint_with_config(tmp_path, config)
    with pytest.raises(ValueError, match=field) as e:
        digits.load_digits_model(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("config,field", [
    ({"channels": 0, "feature_dim": 64, "num_classes": 10}, "channels"),
    ({"channels": 4, "feature_dim": -1, "num_classes": 10}, "feature_dim"),
    ({"channels": 4, "feature_dim": 64, "num_classes": 0}, "num_classes"),
])
def test_classifier_loader_validates_architecture_fields(config, field, tmp_path):
    from fastdiff.models.digits_fd import load_digits_classifier
    path = _checkpoint_with_config(tmp_path, config, "classifier")
    with pytest.raises(ValueError, match=field):
        load_digits_classifier(path)


def test_valid_small_checkpoint_still_loads(tmp_path):
    path = _checkpoint_with_config(tmp_path, {"channels": [8, 16], "heads": 2, "num_classes": 10})
    model = digits.load_digits_model(path)
    assert model(torch.zeros(1, 1, 8, 8), torch.zeros(1)).shape == (1, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# Item 16: progress and honest timing (demo), bench's up-front checks and fresh output folder,
# sample's progress bar, --spacing and --threads
# ---------------------------------------------------------------------------------------------
def test_demo_reports_the_reference_solve_and_shows_progress(capsys):
    status, out, err = run(capsys, ["demo", "--steps", "5", "--batch", "16"])
    assert status == 0 and "max |x - exact ODE solution|" in out
    assert re.search(r"reference: exact ODE solution .* in \d+\.\d+ s", out), out
    assert "solving the exact ODE" in err            # the slow part announces itself before it starts


def test_demo_progress_bar_follows_the_reference_solve(capsys, monkeypatch):
    from fastdiff.models import GaussianMixture
    seen = []
    original = GaussianMixture.solve_ode

    def spy(self, *a, progress=None, **k):
        seen.append(progress)
        return original(self, *a, progress=progress, **k)
    monkeypatch.setattr(GaussianMixture, "solve_ode", spy)
    assert run(capsys, ["demo", "--steps", "3", "--batch", "8", "--progress"])[0] == 0
    assert callable(seen[0])


def test_solve_ode_progress_callback_reaches_the_end():
    from fastdiff.models import GaussianMixture
    from fastdiff.schedules import VESchedule
    mixture = GaussianMixture.default(VESchedule(), dim=2, prediction="sample")
    fractions = []
    mixture.solve_ode(torch.randn(4, 2, dtype=torch.float64) * 80, 80.0, 0.5, progress=fractions.append)
    assert fractions and fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] == 1.0


def test_bench_without_matplotlib_fails_up_front(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out_dir = tmp_path / "bench"
    assert_one_line_error(*run(capsys, ["bench", "--quick", "--parts", "accuracy", "--out-dir", str(out_dir)]),
                          match="pip install matplotlib")
    assert not out_dir.exists()


def test_bench_defaults_to_a_fresh_folder_not_the_committed_results(capsys):
    args = cli._bench_parser().parse_args([])
    assert args.out_dir == Path("fastdiff_bench")
    assert "benchmarks/results" not in str(args.out_dir)


def test_bench_refuses_an_unusable_out_dir(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(*run(capsys, ["bench", "--out-dir", str(f)]), match="is a file")
    assert_one_line_error(*run(capsys, ["bench", "--out-dir", "/proc/fastdiff_bench"]), match="--out-dir")


@needs_weights
def test_sample_progress_spacing_and_threads(tmp_path, capsys, monkeypatch):
    calls = {}
    real = digits.sample_digits

    def spy(*a, **k):
        calls.update(k)
        return real(*a, **k)
    monkeypatch.setattr(digits, "sample_digits", spy)
    threads = torch.get_num_threads()
    status, out, err = run(capsys, ["sample", "--steps", "3", "--n", "1", "--labels", "2", "--spacing", "leading",
                                    "--threads", "1", "--progress", "--out", str(tmp_path / "g.png")])
    assert status == 0
    assert calls["spacing"] == "leading" and calls["progress"] is True
    assert "fastdiff dpmpp_2m" in err                      # the sampler's progress bar (tqdm, on stderr)
    assert "leading spacing" in out and "1 thread" in out
    assert torch.get_num_threads() == threads             # restored after the run
    status, out, err = run(capsys, ["sample", "--steps", "2", "--n", "1", "--labels", "2", "--no-progress",
                                    "--out", str(tmp_path / "g.png")])
    assert status == 0 and calls["progress"] is False and calls["spacing"] == "trailing" and err == ""


@pytest.mark.parametrize("args,match", [(["--spacing", "nope"], "argument --spacing: invalid choice"),
                                        (["--threads", "0"], "argument --threads: must be >= 1"),
                                        (["--threads", "x"], "argument --threads: expected an integer")])
def test_sample_spacing_and_threads_bad_input(args, match, tmp_path, capsys, no_model):
    assert_one_line_error(*run(capsys, ["sample", "--out", str(tmp_path / "g.png")] + args), match=match)


@needs_weights
def test_sample_every_spacing_runs(tmp_path, capsys):
    from fastdiff.schedules import SPACINGS
    for spacing in SPACINGS:
        status, out, err = run(capsys, ["sample", "--steps", "3", "--n", "1", "--labels", "7", "--spacing", spacing,
                                        "--out", str(tmp_path / "g.png")])
        assert status == 0 and f"{spacing} spacing" in out, (spacing, err)
