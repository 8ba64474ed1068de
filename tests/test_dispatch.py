"""Dispatch as data: one registry and one ``select`` for every op (attention included); numeric
priorities decide (never registration order); every failure names each backend's reason."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastdiff import attention as fd_attention
from fastdiff import ops
from fastdiff.cli import main
from fastdiff.ops import backends
from fastdiff.ops.backends import BACKENDS, Backend, available_backends, select


class Fake(Backend):
    """A CPU backend answering every kernel op and attention with a marker."""

    ops = frozenset(backends.OPS + (backends.ATTENTION_OP,))
    device_types = ("cpu",)

    def __init__(self, name, priority, why=None, unsupported=None):
        self.name, self.priority, self._why, self._unsupported = name, priority, why, unsupported

    def unavailable_reason(self):
        return self._why

    def not_supported_reasons(self, op, tensors, state_dtype=None):
        return [self._unsupported] if self._unsupported else super().not_supported_reasons(op, tensors, state_dtype)

    def cfg_combine(self, cond, uncond, scale, out_dtype=None):
        return torch.full_like(cond, float(self.priority))

    def attention(self, q, k1, v1, k2=None, v2=None, bias=None, scale=None):
        return torch.full_like(q, float(self.priority))


@pytest.fixture
def registry():
    """Registers test backends; removes them afterwards."""
    added = []

    def register(*bs):
        for b in bs:
            backends.register_backend(b)
            added.append(b.name)
    yield register
    for name in added:
        backends.unregister_backend(name)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_priority_decides_not_registration_order(registry, order):
    fakes = [Fake("fake_hi", 10_000), Fake("fake_lo", 9_000)]
    registry(*(fakes if order == "forward" else fakes[::-1]))
    x = torch.randn(2, 3)
    assert select("cfg_combine", "auto", [x]).name == "fake_hi"
    assert select("attention", "auto", [torch.randn(1, 1, 2, 4)]).name == "fake_hi"
    assert list(BACKENDS)[:2] == ["fake_hi", "fake_lo"]
    assert backends.PRIORITY[:2] == ("fake_hi", "fake_lo")
    assert torch.equal(ops.cfg_combine(x, x, 2.0), torch.full_like(x, 10_000.0))


def test_builtin_priorities_are_numbers():
    prio = {name: b.priority for name, b in BACKENDS.items()}
    assert prio["reference"] == 0 and all(isinstance(p, int) for p in prio.values())
    assert prio["cpu"] > prio["cuda"] > prio["triton"] > prio["reference"]
    att = fd_attention.ATTENTION_BACKENDS
    assert list(att) == ["triton", "sdpa", "reference"]
    assert att["triton"] is BACKENDS["triton"] and att["reference"] is BACKENDS["reference"]
    assert "sdpa" not in BACKENDS              # sdpa serves attention only


def test_auto_failure_lists_every_backend_with_its_reason(monkeypatch):
    # Nothing can run: every registered backend refuses, each with its own reason.
    for name, b in list(backends._REGISTRY.items()):
        monkeypatch.setattr(b, "unavailable_reason", lambda n=name: f"{n} switched off for the test")
    with pytest.raises(RuntimeError) as e:
        select("cfg_combine", "auto", [torch.randn(2)])
    msg = str(e.value)
    assert "no backend can run cfg_combine" in msg
    for name, b in backends._REGISTRY.items():
        if backends.implements(b, "cfg_combine"):
            assert f"{name}: {name} switched off for the test" in msg
        else:
            assert f"{name}: {name} backend does not implement cfg_combine" in msg


def test_auto_falls_back_to_reference_with_one_warning_naming_the_reason(registry):
    registry(Fake("fake_off", 10_000, why="no fake device here"))
    backends._warned.clear()
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            b = select("dynamic_threshold", "auto", [x])
    assert b.name in ("cpu", "reference")
    if b.name == "reference":
        msgs = [str(m.message) for m in w if "falls back" in str(m.message)]
        assert len(msgs) == 1 and "fake_off: no fake device here" in msgs[0]


def test_explicit_unavailable_backend_raises_with_its_reason(registry):
    registry(Fake("fake_off", -5, why="no fake device here"), Fake("fake_no", -6, unsupported="not these inputs"))
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="backend 'fake_off' cannot run cfg_combine: no fake device here"):
        ops.cfg_combine(x, x, 1.5, backend="fake_off")
    with pytest.raises(RuntimeError, match="backend 'fake_no' cannot run cfg_combine: not these inputs"):
        ops.cfg_combine(x, x, 1.5, backend="fake_no")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="attention backend 'fake_off' cannot run these inputs: no fake device"):
        fd_attention.attention(q, q, q, backend="fake_off")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.cfg_combine(x, x, 1.5, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'sdpa'"):      # sdpa has no cfg_combine
        ops.cfg_combine(x, x, 1.5, backend="sdpa")
    if BACKENDS["triton"].unavailable_reason():
        why = BACKENDS["triton"].unavailable_reason()
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run cfg_combine") as e:
            ops.cfg_combine(x, x, 1.5, backend="triton")
        assert why in str(e.value)


def test_attention_goes_through_the_one_registry(registry):
    q = torch.randn(1, 2, 3, 8)
    assert select("attention", "auto", [q, q, q]).name in ("triton", "sdpa")
    assert select("attention", "sdpa", [q, q, q]) is backends._REGISTRY["sdpa"]
    ref = fd_attention.attention(q, q, q, backend="reference")
    torch.testing.assert_close(fd_attention.attention(q, q, q, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    registry(Fake("fake_att", 10_000))
    assert "fake_att" in fd_attention.ATTENTION_BACKENDS
    assert torch.equal(fd_attention.attention(q, q, q), torch.full_like(q, 10_000.0))
    assert torch.equal(fd_attention.attention(q, q, q, backend="fake_att"), torch.full_like(q, 10_000.0))
    with pytest.raises(ValueError, match="unknown attention backend 'cpu'"):
        fd_attention.attention(q, q, q, backend="cpu")


def test_no_string_matching_in_dispatch():
    import inspect
    src = inspect.getsource(backends.select)
    assert "does not implement" not in src and "tensors, got" not in src


def test_info_still_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, why in available_backends().items():
        assert f"backend {name}" in out
