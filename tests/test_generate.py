"""Sharded generation (fastdiff.distributed): every sample independent of how the work was split.

Multi-process tests launch 2 ranks with torchrun's launcher (gloo, loopback rendezvous via
--standalone), each bounded by a timeout; they stop by themselves.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastdiff import distributed as G

pytest.importorskip("PIL")
digits = pytest.importorskip("fastdiff.models.digits")
if not (digits.WEIGHTS_DIR / digits.MODEL_FILE).is_file():
    pytest.skip("the shipped digits weights are not installed", allow_module_level=True)

ENV = dict(os.environ, OMP_NUM_THREADS="1")
SMALL = dict(steps=4, batch=8, progress=False)


def _raw(out: Path) -> torch.Tensor:
    parts = sorted((out / "raw").glob("chunk_*.pt"))
    data = [torch.load(p) for p in parts]
    idx = sum((d["indices"] for d in data), [])
    x = torch.cat([d["samples"] for d in data])
    return x[torch.argsort(torch.tensor(idx))]


def _pngs(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["sha256"]


def _torchrun(script: str, *args, nproc=2, timeout=240, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from fastdiff import distributed as G
    from fastdiff.models import digits as D

    kw = json.loads(sys.argv[2])
    die_after = int(os.environ.get("DIE_AFTER_CALLS", "0"))
    if kw.pop("custom", False):
        base = D.load_digits_model().eval()
        calls = [0]

        class Wrapped(torch.nn.Module):        # the digits model, dying after some calls (a crash)
            def forward(self, x, t, **k):
                calls[0] += 1
                if die_after and calls[0] > die_after:
                    os._exit(17)
                return base(x, t, **k)

        def conditions(idx):
            lab = idx % 10
            return {"class_labels": lab}, {"class_labels": torch.full_like(lab, D.NULL_LABEL)}

        kw.update(model=Wrapped(), shape=D.IMAGE_SHAPE, schedule=D.digits_schedule(), prediction=D.PREDICTION,
                  conditions=conditions)
    r = G.generate(out=sys.argv[1], **kw)
    if int(os.environ.get("RANK", "0")) == 0:      # one line (two ranks' prints would interleave)
        print("RESULT", r.generated, r.done_before, r.world_size, json.dumps(r.metrics))
""")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    p = tmp_path_factory.mktemp("gen") / "gen.py"
    p.write_text(SCRIPT)
    return str(p)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    res = G.generate(n=37, out=out, raw=True, **SMALL)
    return out, res


def test_sample_seed_is_a_fixed_injective_rule():
    seeds = [G.sample_seed(5, i) for i in range(2000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2 ** 64 for s in seeds)
    assert G.sample_seed(5, 7) == G.sample_seed(5, 7) != G.sample_seed(6, 7)
    with pytest.raises(ValueError, match="seed and index"):
        G.sample_seed(-1, 0)


def test_one_process_writes_pngs_manifest_and_metrics(one_process_run):
    out, res = one_process_run
    assert res.generated == 37 and res.done_before == 0 and res.world_size == 1
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(37)]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["done"] == [[0, 37]] and m["config"]["n"] == 37
    assert set(m["sha256"]) >= set(names) and "splitmix64" in m["seed_rule"]
    assert 0.0 <= m["metrics"]["class_accuracy"] <= 1.0 and m["metrics"]["digits_fd"] > 0
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob("**/.*.tmp-*"))


def test_two_ranks_give_the_one_process_samples_bitwise(one_process_run, script, tmp_path):
    out1, res1 = one_process_run
    out2 = tmp_path / "two"
    r = _torchrun(script, str(out2), json.dumps(dict(n=37, raw=True, **SMALL)))
    assert r.stdout.count("RESULT 37 0 2") == 1
    assert torch.equal(_raw(out1), _raw(out2))
    assert _pngs(out1) == _pngs(out2)
    # the metrics were reduced over both ranks (all_reduce of the statistics): the same numbers
    m1, m2 = (json.loads((o / "manifest.json").read_text())["metrics"] for o in (out1, out2))
    assert m2["samples"] == 37 and m2["class_accuracy"] == m1["class_accuracy"]
    assert m2["digits_fd"] == pytest.approx(m1["digits_fd"], rel=1e-9)


def test_killed_run_resumes_to_the_same_final_set(script, tmp_path):
    kw = dict(n=29, raw=True, custom=True, metrics=False, **SMALL)
    ref = tmp_path / "ref"
    _torchrun(script, str(ref), json.dumps(kw), nproc=1)
    out = tmp_path / "killed"
    # 2 ranks, each dies in its second chunk (4 steps -> 4 model calls per chunk)
    env_die = dict(ENV, DIE_AFTER_CALLS="5")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, str(out),
           json.dumps(kw)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env_die)
    assert r.returncode != 0
    done_records = sorted((out / ".chunks").glob("chunk_*.json"))
    assert 0 < len(done_records) < 4                            # some chunks finished, not all
    assert not list(out.glob(".*.tmp-*"))                      # nothing half-written under a final name
    r = _torchrun(script, str(out), json.dumps(kw))
    resumed = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert len(resumed) == 1 and int(resumed[0].split()[2]) == 8 * len(done_records)   # skipped the done ones
    assert torch.equal(_raw(ref), _raw(out))
    assert _pngs(ref) == _pngs(out)


def test_resume_with_different_arguments_is_refused(one_process_run):
    out, _ = one_process_run
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"another run .*steps"):
        G.generate(n=37, out=out, raw=True, **{**SMALL, "steps": 5})
    with pytest.raises(ValueError, match=r"another run .*n\b"):
        G.generate(n=38, out=out, raw=True, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == before


def test_rerun_with_the_same_arguments_skips_everything(one_process_run):
    out, _ = one_process_run
    res = G.generate(n=37, out=out, raw=True, **SMALL)
    assert res.generated == 0 and res.done_before == 37


def test_batch_invariant_mode_is_the_same_bits_for_any_batch(tmp_path):
    a = G.generate(n=11, out=tmp_path / "a", raw=True, batch_invariant=True, steps=3, batch=4, progress=False,
                   metrics=False)
    b = G.generate(n=11, out=tmp_path / "b", raw=True, batch_invariant=True, steps=3, batch=11, progress=False,
                   metrics=False)
    assert a.generated == b.generated == 11
    assert torch.equal(_raw(tmp_path / "a"), _raw(tmp_path / "b"))


def test_stochastic_solver_noise_is_per_sample(tmp_path):
    kw = dict(n=9, raw=True, solver="euler_ancestral", steps=3, progress=False, metrics=False)
    G.generate(out=tmp_path / "a", batch=9, batch_invariant=True, **kw)
    G.generate(out=tmp_path / "b", batch=2, batch_invariant=True, **kw)
    assert torch.equal(_raw(tmp_path / "a"), _raw(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any sampling


def _no_sampling(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(G, "_run_chunk", boom)


def test_n_smaller_than_world_size_is_refused(script, tmp_path):
    r = _torchrun(script, str(tmp_path / "o"), json.dumps(dict(n=1, **SMALL)), check=False)
    assert r.returncode != 0 and "smaller than the world size 2" in r.stderr
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


def test_folder_of_another_run_or_other_files_is_refused(tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        G.generate(n=4, out=tmp_path / "busy", **SMALL)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        G.generate(n=4, out=tmp_path / "file", **SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        G.generate(n=4, out=tmp_path / "missing" / "deeper", **SMALL)


def test_non_writable_folder_is_refused(tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    target = tmp_path / "ro"
    target.mkdir()
    real_access = os.access
    # root may write anywhere, so the permission is simulated where fastdiff asks for it
    monkeypatch.setattr(G.os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode))
    with pytest.raises(PermissionError, match="not writable"):
        G.generate(n=4, out=target, **SMALL)


def test_missing_rendezvous_is_refused(tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="rendezvous is incomplete.*MASTER_ADDR"):
        G.generate(n=4, out=tmp_path / "o", **SMALL)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(n=0), "n must be an integer >= 1"), (dict(n=2.5), "n must be"), (dict(batch=0), "batch must be"),
    (dict(seed=-1), "seed must be"), (dict(seed=2 ** 32), "seed must be"), (dict(guidance=float("nan")), "guidance"),
    (dict(solver="nope"), "nope"), (dict(steps=0), "steps must be"),
])
def test_bad_arguments(tmp_path, monkeypatch, kw, match):
    _no_sampling(monkeypatch)
    args = dict(n=4, out=tmp_path / "o", **SMALL)
    args.update(kw)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        G.generate(**args)
    assert not (tmp_path / "o").exists()


def test_cfg_parallel_pairs_equal_the_single_process_result(script, tmp_path):
    """Two ranks, one per CFG half, exchange once per guided call; per-sample model evaluation
    (batch_invariant) makes the halves' bits independent of the split, so the result is bitwise
    the one-process run."""
    kw = dict(n=6, raw=True, guidance=2.0, batch_invariant=True, metrics=False, steps=3, batch=3, progress=False)
    one = tmp_path / "one"
    G.generate(out=one, **kw)
    two = tmp_path / "two"
    # the config differs (cfg_parallel is part of the run's identity), the bits do not
    _torchrun(script, str(two), json.dumps(dict(kw, cfg_parallel=True)))
    assert torch.equal(_raw(one), _raw(two))
    assert _pngs(one) == _pngs(two)


def test_cfg_parallel_needs_guidance_and_pairs(tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    with pytest.raises(ValueError, match="cfg_parallel needs guidance and an even number of ranks"):
        G.generate(n=4, out=tmp_path / "o", cfg_parallel=True, guidance=2.0, **SMALL)


def test_cli_generate_and_its_errors(tmp_path, capsys):
    from fastdiff.cli import main
    out = tmp_path / "cli"
    assert main(["generate", "--n", "5", "--out", str(out), "--steps", "3", "--batch", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "5 samples in" in text and "digits-FD" in text
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    # a rerun with other arguments: one line, exit 2, nothing touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["generate", "--n", "5", "--out", str(out), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds another run" in err and "steps" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["generate", "--n", "0", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "n must be an integer >= 1" in capsys.readouterr().err


def test_torchrun_command_line_as_documented(tmp_path):
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
           "generate", "-n", "6", "--out", str(out), "--steps", "2", "--batch", "2", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("6 samples in") == 1                 # rank 0 reports
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
