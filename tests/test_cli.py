"""The ``fastdiff`` command line: every command's exit status and output files; bad input gives one
line on stderr, exit status 2 and no traceback, before any work is done; ``fastdiff check`` passes
here and fails when a kernel is broken."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import check, cli
from fastdiff.cli import main, parse_labels
from fastdiff.models import digits
from fastdiff.reference import philox as philox_oracle
from fastdiff.ops.backends import BACKENDS, load_extension

from conftest import REPO  # noqa: E402
# Subprocesses run torch on one thread: OpenMP threads that wait for each other are slow on a
# shared 2-core machine, and these tests are about exit codes and files, not speed.
ONE_THREAD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_weights = pytest.mark.skipif(
    not (digits.WEIGHTS_DIR / digits.MODEL_FILE).is_file(),
    reason="the shipped digits weights (fastdiff/models/weights/) are not in this checkout")
needs_cpu_extension = pytest.mark.skipif(isinstance(load_extension(), str), reason=str(load_extension()))


@pytest.fixture
def small_cases(monkeypatch):
    """The checks on small sizes only: for the tests of the checks themselves, whose fake backends
    are the (slow) oracles."""
    monkeypatch.setattr(check, "STEP_SHAPES", ((1,), (7,), (2, 3, 5, 7)))
    monkeypatch.setattr(check, "LAYOUT_SHAPES", ((2, 3, 5, 7),))
    monkeypatch.setattr(check, "CFG_SHAPES", ((7,), (2, 3, 5, 7)))
    monkeypatch.setattr(check, "NORMAL_SHAPES", ((7,), (2, 4, 9, 13)))
    monkeypatch.setattr(check, "REDUCTION_SHAPES", ((1, 7), (3, 5, 7, 11)))


def run(capsys, argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, out, err, match=""):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: "), err
    assert "Traceback" not in err and out == ""
    assert match in lines[0], lines[0]


def assert_png(path: Path, size=None):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        if size is not None:
            assert im.size == size
        return im.copy()


class Wrapped:
    """A backend delegating to another one; tests replace single ops to break them."""

    def __init__(self, inner, name="fake"):
        self._inner, self.name = inner, name

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def serves(self, device_type):
        return device_type == "cpu"

    def unavailable_reason(self):
        return None

    @staticmethod
    def philox_uint32(numel, seed, noise_id, device):
        return philox_oracle.philox_uint32(numel, seed, noise_id)


class Ghost(Wrapped):
    """A backend that cannot run on this machine."""

    def unavailable_reason(self):
        return "no ghost device here"


# ---------------------------------------------------------------------------------------------
# In a fresh process, as a user runs it
# ---------------------------------------------------------------------------------------------
def test_python_m_fastdiff_info_and_a_bad_solver():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, timeout=120,
                       env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr
    assert "backend reference  available" in r.stdout and "fastdiff._C:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--solver", "nope"], capture_output=True,
                       text=True, timeout=120, env=ONE_THREAD_ENV)
    assert r.returncode == 2
    assert r.stderr.startswith("fastdiff: error: unknown solver 'nope'") and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr


@needs_weights
def test_python_m_fastdiff_sample_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--steps", "3", "--n", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert r.returncode == 0, r.stderr
    assert "NFE: 3 model evaluations" in r.stdout and "ms per step" in r.stdout
    assert_png(out, size=(2 + 2 * 34, 2 + 10 * 34))   # 10 labels x 2, 8x8 enlarged 4x, 2-pixel gaps


# ---------------------------------------------------------------------------------------------
# Bad input: one line, status 2, nothing written, the model never loaded
# ---------------------------------------------------------------------------------------------
BAD_SAMPLE_ARGS = [
    (["--solver", "nope"], "unknown solver 'nope'"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--steps", "-3"], "--steps: must be >= 1"),
    (["--steps", "ten"], "expected an integer"),
    (["--labels", "1,12"], "digits 0-9"),
    (["--labels", "7-3"], "runs backwards"),
    (["--labels", "x"], "expected digits"),
    (["--n", "0"], "--n: must be >= 1"),
    (["--out", "{tmp}/missing/grid.png"], "does not exist"),
    (["--out", "{tmp}/a_dir.png"], "is a directory"),
    (["--out", "{tmp}/grid.jpg"], "expected a .png file name"),
    (["--option", "nonsense=1"], "has no option(s) ['nonsense']"),
    (["--option", "noequals"], "expected key=value"),
    (["--backend", "gpu9"], "unknown backend 'gpu9'"),
    (["--guidance", "nan"], "must be finite"),
    (["--convention", "2w"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("args,match", BAD_SAMPLE_ARGS, ids=[" ".join(a) for a, _ in BAD_SAMPLE_ARGS])
def test_sample_bad_input(args, match, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_dir.png").mkdir()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(digits, "load_digits_model", no_model)
    before = sorted(tmp_path.iterdir())
    argv = ["sample", "--out", str(tmp_path / "grid.png")] + [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(*run(capsys, argv), match=match)
    assert sorted(tmp_path.iterdir()) == before


def test_sample_on_a_backend_that_cannot_run_here(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(BACKENDS, "ghost", Ghost(BACKENDS["reference"], name="ghost"))
    argv = ["sample", "--backend", "ghost", "--out", str(tmp_path / "g.png")]
    assert_one_line_error(*run(capsys, argv), match="backend 'ghost' cannot run here: no ghost device here")


@pytest.mark.parametrize("argv,match", [
    (["nosuchcommand"], "invalid choice"),
    (["info", "--bogus"], "unrecognized arguments"),
    (["check", "--backend", "nope"], "unknown backend(s) 'nope'"),
    (["check", "--only", "everything"], "unknown op group(s)"),
    (["bench", "--parts", "nope"], "expected some of kernels, accuracy, quality"),
])
def test_other_commands_bad_input(argv, match, capsys):
    assert_one_line_error(*run(capsys, argv), match=match)


def test_parse_labels():
    assert parse_labels("0-9") == list(range(10))
    assert parse_labels("3,3,7") == [3, 3, 7]
    assert parse_labels("0-2, 7") == [0, 1, 2, 7]


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
def grid_tiles(im: Image.Image, rows: int, columns: int, scale: int, pad: int = 2) -> torch.Tensor:
    """The 8x8 images [rows * columns, 1, 8, 8] in [-1, 1] back out of a grid PNG."""
    a = np.asarray(im, dtype=np.float32)
    size = 8 * scale
    tiles = [a[pad + r * (size + pad):pad + r * (size + pad) + size:scale,
               pad + c * (size + pad):pad + c * (size + pad) + size:scale]
             for r in range(rows) for c in range(columns)]
    return torch.from_numpy(np.stack(tiles))[:, None] / 127.5 - 1.0


@needs_weights
def test_sample_grid_rows_are_the_labels_and_the_seed_repeats(tmp_path, capsys, one_thread):
    from fastdiff.models.digits_fd import class_accuracy
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["sample", "--steps", "8", "--labels", "1,0,7", "--n", "3", "--seed", "5", "--scale", "2"]
    status, out, _ = run(capsys, argv + ["--out", str(a)])
    assert status == 0 and f"wrote {a}" in out
    assert run(capsys, argv + ["--out", str(b)])[0] == 0
    assert a.read_bytes() == b.read_bytes()            # same seed, same image
    im = assert_png(a, size=(2 + 3 * 18, 2 + 3 * 18))
    # The shipped classifier reads the digits of row r as label r: the rows follow --labels.
    images = grid_tiles(im, rows=3, columns=3, scale=2)
    assert class_accuracy(images, torch.tensor([1, 1, 1, 0, 0, 0, 7, 7, 7])) >= 7 / 9


@needs_weights
def test_sample_solver_options_convention_and_nfe(tmp_path, capsys, one_thread):
    import fastdiff
    out = tmp_path / "g.png"
    status, text, _ = run(capsys, ["sample", "--solver", "heun", "--option", "ode_space=ve", "--steps", "3",
                                   "--convention", "1+w", "--guidance", "1.5", "--labels", "4", "--n", "2",
                                   "--out", str(out)])
    assert status == 0
    nfe = fastdiff.Sampler.build(solver="heun", solver_options={"ode_space": "ve"}, steps=3,
                                 schedule=digits.digits_schedule(), spacing="trailing",
                                 prediction=digits.PREDICTION).program.nfe
    assert f"NFE: {nfe} model evaluations" in text and "CFG 1.5 (1+w convention)" in text
    assert_png(out)
    status, text, _ = run(capsys, ["sample", "--guidance", "1", "--steps", "2", "--labels", "5", "--n", "1",
                                   "--out", str(out)])
    assert status == 0 and "no CFG" in text and "NFE: 2 model evaluations\n" in text


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------
@needs_cpu_extension
def test_check_passes_here(tmp_path, capsys, one_thread):
    report = tmp_path / "check.json"
    status, out, _ = run(capsys, ["check", "--quick", "--backend", "cpu", "--json", str(report)])
    assert status == 0, out
    assert "| fused_step | cpu |" in out and "| philox | cpu |" in out and "checks passed on cpu" in out
    data = json.loads(report.read_text())
    assert data["failed"] == 0
    statuses = {r["status"] for r in data["results"]}
    assert statuses <= {"pass", "n/a"} and "pass" in statuses
    groups = {r["op"] for r in data["results"]}
    assert {"fused_step", "cfg_combine", "philox"} <= groups


def test_check_passes_a_correct_backend(small_cases):
    """A backend made of the oracles passes every check (the checks do not fail by themselves)."""
    results = check.check_backend(Wrapped(BACKENDS["reference"]), large=False)
    assert not check.failed(results) and {r.status for r in results} == {"pass"}


def _perturb_x(step):
    def broken(*args):
        step(*args)
        x = args[2]
        x[tuple(n - 1 for n in x.shape)] += 1e-4   # x's last element: 5x the state tolerance
    return broken


def _skip_model_in(step):
    at = check.STEP_ARGS.index("model_in")

    def broken(*args):
        args = list(args)
        model_in = args[at]
        if model_in is not None:
            args[at] = model_in.clone()         # writes to a copy: the real model_in stays NaN
        step(*args)
    return broken


def _writes_cond(step):
    def broken(*args):
        step(*args)
        if args[4] is not None:
            args[4].view(-1)[0] = 0.0           # scribbles on a read-only input
    return broken


BREAKAGES = {
    "fused_step perturbs x": ("fused_step", "fused_step", _perturb_x, "above"),
    "fused_step leaves model_in unwritten": ("fused_step", "fused_step", _skip_model_in, "model_in"),
    "fused_step writes its input": ("fused_step", "fused_step", _writes_cond, "read-only input cond"),
    "fused_step raises": ("fused_step", "fused_step", lambda f: (lambda *a: 1 / 0), "raised ZeroDivisionError"),
    "cfg_combine off": ("cfg_combine", "cfg_combine", lambda f: (lambda c, u, s, o=None: f(c, u, s * 1.001, o)), "above"),
    "philox normals off by 8 ulp": ("philox", "philox_normal",
                                    lambda f: (lambda *a: f(*a) * (1 + 8 * 2 ** -23)), "above"),
    "philox words differ": ("philox", "philox_uint32", lambda f: (lambda *a: f(*a) ^ 1), "above"),
    "per_sample_norm off": ("reductions", "per_sample_norm", lambda f: (lambda x: f(x) * (1 + 1e-4)), "above"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_check_fails_when_a_kernel_is_broken(breakage, small_cases):
    group, op, breaker, message = BREAKAGES[breakage]
    backend = Wrapped(BACKENDS["reference"])
    setattr(backend, op, breaker(getattr(backend, op)))
    results = check.check_backend(backend, groups=[group], large=False)
    bad = check.failed(results)
    assert bad, check.render_table(results)
    assert all(r.op in (group, op) or group == "reductions" for r in bad)
    assert any(message in r.detail for r in bad), [r.detail for r in bad]


@needs_cpu_extension
def test_fastdiff_check_exits_1_when_the_cpu_kernel_is_broken(capsys, monkeypatch, one_thread):
    broken = Wrapped(BACKENDS["cpu"], name="cpu")
    broken.fused_step = _perturb_x(BACKENDS["cpu"].fused_step)
    monkeypatch.setitem(BACKENDS, "cpu", broken)
    status, out, _ = run(capsys, ["check", "--quick", "--backend", "cpu", "--only", "fused_step"])
    assert status == 1
    assert "| FAIL |" in out and "FAIL fused_step on cpu" in out and "FAILED" in out


def test_check_skips_a_backend_that_cannot_run(capsys, monkeypatch):
    monkeypatch.setitem(BACKENDS, "ghost", Ghost(BACKENDS["reference"], name="ghost"))
    status, out, _ = run(capsys, ["check", "--backend", "ghost"])
    assert status == 0
    assert "skipped" in out and "no ghost device here" in out and "nothing to compare" in out


# ---------------------------------------------------------------------------------------------
# info, demo
# ---------------------------------------------------------------------------------------------
def test_info_lists_builds_and_backends(capsys):
    status, out, _ = run(capsys, ["info"])
    assert status == 0
    for text in ("fastdiff 0.", "torch ", "fastdiff._C:", "triton", "CUDA extension: ", "backend cpu", "solvers:"):
        assert text in out, text
    if not isinstance(load_extension(), str) and hasattr(load_extension(), "build_info"):
        assert "simd" in out and "openmp" in out


def test_demo_still_runs(capsys, one_thread):
    status, out, _ = run(capsys, ["demo", "--steps", "5", "--batch", "16"])
    assert status == 0 and "max |x - exact ODE solution|" in out


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "--parts" in capsys.readouterr().out


def test_bench_outside_a_source_checkout(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)    # a normal install, run outside any checkout
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run(capsys, ["bench", "--quick"]), match="source checkout")


def test_bench_accuracy_and_kernels_write_json_markdown_and_png(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(REPO)   # where a normal (non-editable) install finds the checkout's benchmarks/
    kernels = "--shapes tiny --impls fastdiff_public_op,eager --copy-mib 4 --min-samples 3 --min-time 0"
    status, out, _ = run(capsys, ["bench", "--quick", "--quiet", "--parts", "accuracy,kernels", "--out-dir",
                                  str(tmp_path), "--kernel-options", kernels])
    assert status == 0
    assert "| DPM-Solver++(2M) |" in out and "eager PyTorch" in out
    accuracy = json.loads((tmp_path / "accuracy_table_quick.json").read_text())
    assert accuracy["budgets"] == [5, 10, 20] and accuracy["rows"]
    kernels = json.loads((tmp_path / "step_bench_quick.json").read_text())
    assert {r["impl"] for r in kernels["results"]} == {"fastdiff_public_op", "eager"}
    for name in ("accuracy_table_quick.md", "step_bench_quick.md"):
        assert (tmp_path / name).read_text().startswith(("|", "Machine"))
    assert_png(tmp_path / "accuracy_vs_nfe_quick.png")
    assert_png(tmp_path / "step_bench_quick.png")


@needs_weights
def test_bench_quality_writes_json_markdown_and_png(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(REPO)
    quality = "--samples 20 --nfe 2,4 --solvers ddim,heun --reference-steps 4"
    status, out, _ = run(capsys, ["bench", "--quick", "--quiet", "--parts", "quality", "--out-dir", str(tmp_path),
                                  "--quality-options", quality])
    assert status == 0 and "| DDIM |" in out and "floor: real held-out images" in out
    report = json.loads((tmp_path / "quality_table_quick.json").read_text())
    assert [r["solver"] for r in report["rows"]] == ["ddim", "heun", "heun"]   # heun in VE and flow coordinates
    for row in report["rows"]:
        for c in row["cells"]:
            assert c["nfe"] <= c["budget"] and 0.0 <= c["class_accuracy"] <= 1.0 and c["digits_fd"] > 0
    assert report["floor"]["images"] == 20 and report["reference"]["nfe"] == 4
    assert (tmp_path / "quality_table_quick.md").read_text().startswith("| solver |")
    assert_png(tmp_path / "quality_table_quick.png")
