"""A row writes any set of history slots in one pass (issue 11), and reads only the slots it uses.

The row ABI (fastdiff.program.layout): one out block per history slot, the written slots as one
bitmask ``hist_writes``; a history term with a zero coefficient is absent. Checked here on the
program side (Row.more_writes, the table compiler), on the oracle (fastdiff.reference), and end to
end through the RowExecutor on every backend that runs here: a program whose rows write two slots
each equals the same computation spread over single-write rows. The kernels' own parity with the
oracle over many masks is in the backend tests (test_ops_cpu, test_cuda_emulated,
test_triton_interpret) and the shared harness (fastdiff.check ROW_KINDS).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.program import (OUT_FIXED, OUT_H, OUT_X, Out, Point, Row, col_out_slot, col_out_x, compile_program,
                              hist_mask, mask_slots, table_width)
from fastdiff.reference import step as oracle
from fastdiff.runtime import RowExecutor, device_table

P = Point(t=1.0, alpha=1.0, sigma=1.0, model_t=1.0)


def test_row_writes_and_mask():
    r = Row(step=0, point=P, out_x=Out(x=1.0, h=0.5), hist_write=2, more_writes=((0, Out(x=1.0)), (3, Out(h=2.0))))
    assert [j for j, _ in r.writes] == [2, 0, 3]
    assert r.hist_writes == 0b1101 == hist_mask((2, 0, 3))
    assert mask_slots(r.hist_writes) == (0, 2, 3)
    assert r.writes[0][1] == Out(h=1.0)                        # hist_write's default value: h
    assert Row(step=0, out_x=Out(x=1.0)).hist_writes == 0


@pytest.mark.parametrize("bad, match", [
    (dict(hist_write=1, more_writes=((1, Out(x=1.0)),)), "at most once"),
    (dict(more_writes=((-1, Out(x=1.0)),)), "at most once"),
    (dict(more_writes=((0, Out(z=1.0)),)), "noise_id"),
])
def test_bad_writes_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Row(step=0, out_x=Out(x=1.0), **bad)


def test_compile_lays_out_one_block_per_slot():
    r = Row(step=0, point=P, out_x=Out(x=1.0, hist=((1, 0.25),)), hist_write=1, hist_out=Out(x=3.0),
            more_writes=((0, Out(h=5.0, hist=((1, 7.0),))),))
    T = compile_program([r], "x0", 2, 1).table
    assert T.shape == (1, table_width(2))
    assert T[0, col_out_x(2) + OUT_FIXED + 1] == 0.25
    assert T[0, col_out_slot(2, 1) + OUT_X] == 3.0
    assert T[0, col_out_slot(2, 0) + OUT_H] == 5.0 and T[0, col_out_slot(2, 0) + OUT_FIXED + 1] == 7.0
    with pytest.raises(ValueError, match="out of range"):
        compile_program([Row(step=0, out_x=Out(x=1.0), more_writes=((2, Out(x=1.0)),))], "x0", 2, 1)


def _oracle_case(K=3, shape=(2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(1, table_width(K), dtype=torch.float64, generator=g)
    x, cond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    hist = torch.randn((K,) + shape, generator=g)
    return T, x, cond, hist


def _run_oracle(T, x, cond, hist, mask, flags=2):
    x, hist = x.clone(), hist.clone()
    oracle.fused_step(T, 0, x, None, cond, None, hist, mask, flags, None, 0, -1, None, None)
    return x, hist


def test_oracle_writes_each_slot_from_its_block_after_every_read():
    """Writing slots {0, 2} in one pass = the values each single write would store (all computed
    from the old history: slot 0 is read by slot 2's block and by x)."""
    T, x, cond, hist = _oracle_case()
    both_x, both = _run_oracle(T, x, cond, hist, 0b101)
    only0_x, only0 = _run_oracle(T, x, cond, hist, 0b001)
    only2_x, only2 = _run_oracle(T, x, cond, hist, 0b100)
    assert torch.equal(both[0], only0[0]) and torch.equal(both[2], only2[2]) and torch.equal(both[1], hist[1])
    assert torch.equal(both_x, only0_x) and torch.equal(both_x, only2_x)
    with pytest.raises(ValueError, match="hist_writes must be a bitmask"):
        _run_oracle(T, x, cond, hist, 0b1000)
    with pytest.raises(ValueError, match="hist_writes must be a bitmask"):
        _run_oracle(T, x, cond, hist, -1)


def test_oracle_leaves_zero_coefficient_slots_unread():
    """A NaN slot whose coefficients are zero (a slot the row only writes) does not poison any
    output; a zero history term keeps a -0 result -0 (absent, not + 0 * H)."""
    T, x, cond, hist = _oracle_case(K=2)
    for b in (col_out_x(2), col_out_slot(2, 0), col_out_slot(2, 1)):
        T[0, b + OUT_FIXED + 1] = 0.0
    hist[1].fill_(float("nan"))
    new_x, new_h = _run_oracle(T, x, cond, hist, 0b11)
    assert torch.isfinite(new_x).all() and torch.isfinite(new_h).all()

    T = torch.zeros(1, table_width(1), dtype=torch.float64)
    T[0, col_out_x(1):col_out_x(1) + OUT_FIXED] = -1.0          # x' = -x - E - h - hu (all -0) + 0 * H_0
    x0 = torch.zeros(3)
    new_x, _ = _run_oracle(T, x0, None, torch.ones(1, 3), 0)
    assert torch.equal(torch.signbit(new_x), torch.ones(3, dtype=torch.bool))


def _two_write_program(steps=4):
    """Each step writes two slots in one pass: the running sum of h (slot 0) and the x it started
    from (slot 1), both read by the next step's x output."""
    rows = []
    for k in range(steps):
        out_x = Out(x=0.5, h=0.25, hist=((0, 0.125), (1, -0.0625)) if k else ())
        rows.append(Row(step=k, point=P, out_x=out_x, hist_write=0, hist_out=Out(h=1.0, hist=((0, 1.0),) if k else ()),
                        more_writes=((1, Out(x=1.0)),)))
    return rows


def _textbook(x, outs):
    """The same recurrence in float64: S_k = h_k + S_(k-1), X_k = x_k (before the update),
    x_(k+1) = x/2 + h/4 + S_(k-1)/8 - X_(k-1)/16 (h = the model output: x0-prediction)."""
    x = x.double()
    S = X = None
    for k, h in enumerate(outs):
        h = h.double()
        new_x = 0.5 * x + 0.25 * h + ((0.125 * S - 0.0625 * X) if k else 0.0)
        S, X = (h + S if k else h), x
        x = new_x
    return x, torch.stack([S, X])


def _backends():
    from fastdiff.ops.backends import BACKENDS
    out = []
    for name, b in BACKENDS.items():
        if not b.not_supported_reasons("fused_step", [torch.zeros(1)], torch.float32):
            out.append(name)
    return out


@pytest.mark.parametrize("backend", _backends())
def test_a_program_writing_two_slots_per_row(backend):
    """End to end through the RowExecutor (row_args: the rows' masks): a program whose rows write
    two slots each, slot 1 NaN before its first write (unread until then), on every backend that
    runs here: bit for bit the reference backend's run, and the textbook recurrence."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 3, 5, generator=g)
    outs = [torch.randn(2, 3, 5, generator=g) for _ in range(4)]
    rows = _two_write_program()
    assert all(r.hist_writes == 0b11 for r in rows)
    prog = compile_program(rows, "x0", 2, 4)
    results = []
    for name in (backend, "reference"):
        ex = RowExecutor.allocate(prog, x0, backend=name)
        ex.x.copy_(x0)
        ex.hist.fill_(float("nan"))
        for i, out in enumerate(outs):
            ex.run(i, out)
        assert ex.first_bad_row() == 0
        results.append((ex.x.clone(), ex.hist.clone()))
    (xa, ha), (xb, hb) = results
    assert torch.equal(xa, xb) and torch.equal(ha, hb)
    want_x, want_h = _textbook(x0, outs)
    torch.testing.assert_close(xa.double(), want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ha.double(), want_h, rtol=1e-6, atol=1e-6)
