"""Issue 14, "Guidance methods": ``fastdiff sample --guidance-method NAME [--guidance-option KEY=VALUE ...]``
reaches ``fastdiff.Guidance(scale, method=...)``; bad input is one line, exit 2, before the model loads."""
from __future__ import annotations

import pytest
import torch

from fastdiff import Guidance
from fastdiff.guiders import APG, CFGZeroStar, TCFG
from fastdiff.models import digits

from test_cli import assert_one_line_error, assert_png, needs_weights, run


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(digits, "load_digits_model", refuse)


BAD = [
    (["--guidance-method", "nope"], "--guidance-method: unknown guidance method 'nope'; available: apg"),
    (["--guidance-option", "eta=0"], "--guidance-option needs --guidance-method"),
    (["--guidance-method", "apg", "--guidance-option", "etta=0"], "apg has no option 'etta'; its options: momentum"),
    (["--guidance-method", "tcfg", "--guidance-option", "eta=0"], "tcfg has no option 'eta'; its options: none"),
    (["--guidance-method", "apg", "--guidance-option", "eta=abc"], "APG eta must be a finite number"),
    (["--guidance-method", "apg", "--guidance-option", "norm_threshold=-1"], "norm_threshold must be >= 0"),
    (["--guidance-method", "cfg_zero_star", "--guidance-option", "zero_init_steps=-1"], "zero_init_steps"),
    (["--guidance-method", "apg", "--guidance-option", "norm_dim=0"], "batch dimension"),
    (["--guidance-method", "apg", "--guidance-option", "eta"], "--guidance-option: expected key=value"),
    (["--guidance-method", "apg", "--solver", "euler_cfg_pp", "--guidance", "2"],
     "--guidance-method apg with solver euler_cfg_pp"),
]


@pytest.mark.parametrize("args,match", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_sample_guidance_method_bad_input(args, match, tmp_path, capsys, no_model):
    argv = ["sample", "--out", str(tmp_path / "g.png")] + args
    assert_one_line_error(*run(capsys, argv), match=match)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv,expected", [
    (["--guidance", "2.5", "--guidance-method", "apg", "--guidance-option", "momentum=-0.5",
      "--guidance-option", "eta=0", "--guidance-option", "norm_dim=(2, 3)"],
     Guidance(2.5, method=APG(momentum=-0.5, eta=0.0, norm_dim=(2, 3)))),
    (["--guidance", "1.5", "--convention", "1+w", "--guidance-method", "CFG-Zero*", "--guidance-option",
      "zero_init_steps=2"], Guidance(1.5, convention="1+w", method=CFGZeroStar(zero_init_steps=2))),
    (["--guidance", "3", "--guidance-method", "tcfg"], Guidance(3.0, method=TCFG())),
])
def test_sample_guidance_method_reaches_guidance(argv, expected, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake(model, labels, **kw):
        seen.update(kw)
        return torch.zeros(len(labels), 1, 8, 8)
    monkeypatch.setattr(digits, "load_digits_model", lambda *a, **k: None)
    monkeypatch.setattr(digits, "sample_digits", fake)
    status, out, err = run(capsys, ["sample", "--steps", "2", "--n", "1", "--labels", "3",
                                    "--out", str(tmp_path / "g.png")] + argv)
    assert status == 0, err
    assert seen["guidance"] == expected
    assert f"guidance method {seen['guidance'].method!r}" in out and type(expected.method).__name__ in out


def test_sample_without_a_method_still_passes_the_plain_scale(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake(model, labels, **kw):
        seen.update(kw)
        return torch.zeros(len(labels), 1, 8, 8)
    monkeypatch.setattr(digits, "load_digits_model", lambda *a, **k: None)
    monkeypatch.setattr(digits, "sample_digits", fake)
    assert run(capsys, ["sample", "--guidance", "2", "--n", "1", "--out", str(tmp_path / "g.png")])[0] == 0
    assert seen["guidance"] == 2.0 and isinstance(seen["guidance"], float)


@needs_weights
def test_sample_with_a_guidance_method_end_to_end(tmp_path, capsys, monkeypatch):
    """The CLI's images are fastdiff.sample's with that Guidance, and differ from plain CFG's."""
    images = {}
    real = digits.sample_digits

    def spy(*a, **k):
        images["cli"] = real(*a, **k)
        return images["cli"]
    monkeypatch.setattr(digits, "sample_digits", spy)
    out_png = tmp_path / "g.png"
    status, out, err = run(capsys, ["sample", "--steps", "4", "--n", "2", "--labels", "1,7", "--guidance", "3",
                                    "--guidance-method", "cfg_zero_star", "--out", str(out_png)])
    assert status == 0, err
    assert_png(out_png)
    model = digits.load_digits_model()
    labels = torch.tensor([1, 1, 7, 7])
    with torch.inference_mode():
        direct = real(model, labels, steps=4, guidance=Guidance(3.0, method="cfg_zero_star"))
        plain = real(model, labels, steps=4, guidance=3.0)
    assert torch.equal(images["cli"], direct)
    assert not torch.allclose(direct, plain)
