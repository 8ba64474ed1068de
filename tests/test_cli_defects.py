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
