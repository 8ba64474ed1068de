"""fastdiff's ops under torch.compile, and the sampling loop's host work.

* Every op is a registered custom op (torch.ops.fastdiff.*): torch.library.opcheck checks the
  schemas (declared mutations), fake implementations and dispatch.
* A sampling loop with a real (tiny conv) model, DPM-Solver++(2M) with CFG (and an SDE solver
  with in-kernel Philox noise), compiles with torch.compile(fullgraph=True) and gives the eager
  loop's result. Default run: the aot_eager backend (a few seconds). The inductor backend
  (C++ code generation, ~25-35 s here) runs with ``-m compile``.
* fastdiff.Sampler's loop reads nothing back from the device per step: every host-sync entry
  point of torch.Tensor is recorded while it runs, and the syncs must not grow with the steps.

Tolerances: the compiled loop calls the same kernels as the eager one and (aot_eager) the same
eager model ops, so the results are bitwise equal; inductor may generate other float32 code
for the model, so there the bound is 1e-5 (atol and rtol) on the final sample.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import sys

import pytest
import torch

import fastdiff
import fastdiff.ops as ops
from fastdiff.ops import custom_ops
from fastdiff.ops import reductions as R
from fastdiff.ops.backends import load_extension, select
from fastdiff.runtime import run_program
from fastdiff.program import FLAG_EVAL_Y, FLAG_WRITE_X, FLAG_WRITE_Y, table_width

dynamo_testing = pytest.importorskip("torch._dynamo.testing")

FASTDIFF_DIR = os.path.dirname(fastdiff.__file__)


class TinyNet(torch.nn.Module):
    """An epsilon model: two convolutions, the time and a float class label through learned
    scales (so the CFG halves differ); nothing in it reads the device."""

    def __init__(self, channels: int = 4, hidden: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.c2 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.t_scale = torch.nn.Parameter(torch.randn(hidden, generator=gen) * 1e-3)
        self.label_scale = torch.nn.Parameter(torch.randn(hidden, generator=gen))
        with torch.no_grad():
            for p in (self.c1.weight, self.c1.bias, self.c2.weight, self.c2.bias):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def forward(self, x, t, label):
        h = self.c1(x) + (t.to(x.dtype)[:, None] * self.t_scale + label[:, None] * self.label_scale)[:, :, None, None]
        return self.c2(torch.nn.functional.silu(h))


@pytest.fixture(scope="module")
def net():
    return TinyNet().eval()


def labels(B):
    """(cond, uncond) kwargs: a label per sample, 0 for the unconditional pass."""
    return {"label": torch.arange(1.0, B + 1)}, {"label": torch.zeros(B)}


def batched(B):
    """The kwargs of one CFG call on [uncond; cond] (what run_program expects)."""
    cond, uncond = labels(B)
    return {"label": torch.cat([uncond["label"], cond["label"]])}


def _init_state(sampler, noise):
    g = sampler.grid
    return noise * g.schedule.init_noise_scale(float(g.alpha[0]), float(g.sigma[0]))


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(s, generator=gen)   # noqa: E731
    T = torch.randn(2, table_width(1), dtype=torch.float64, generator=gen)
    return {
        "fused_step": (T, 1, r(2, 3, 4), r(2, 3, 4), r(2, 3, 4), r(2, 3, 4), r(1, 2, 3, 4), 0,
                       FLAG_WRITE_X | FLAG_WRITE_Y, None, custom_ops.seed_to_int64(2 ** 64 - 3), 2,
                       torch.empty(4, 3, 4), torch.zeros(1, dtype=torch.int32)),
        "cfg_combine": (r(2, 3, 4).half(), r(2, 3, 4).half(), 2.0, torch.float32),
        "philox_normal": ([2, 3, 5], 7, 1, torch.device("cpu")),
        "cfg_rescale": (r(2, 3, 4), r(2, 3, 4), 3.0, 0.7),
        "dynamic_threshold": (r(2, 3, 4).bfloat16(), 0.9, 1.5),
        "error_norm": (r(2, 3, 4), r(2, 3, 4), r(2, 3, 4), 1e-3, 1e-4),
        "per_sample_norm": (r(2, 3, 4).double(),),
    }


@pytest.mark.parametrize("name", custom_ops.OPS)
def test_custom_op_passes_opcheck(name):
    """Schema (the declared mutations are the real ones), fake vs real metadata, autograd
    registration and AOT dispatch, as torch checks them."""
    args = _opcheck_cases()[name]
    result = torch.library.opcheck(getattr(torch.ops.fastdiff, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_custom_ops_validate_and_change_nothing():
    """Called directly, the ops validate like the public functions and write nothing on error."""
    x, c = torch.randn(2, 3), torch.randn(2, 3)
    T = torch.zeros(1, table_width(0), dtype=torch.float64)
    x_before = x.clone()
    with pytest.raises(ValueError, match="different buffer"):
        torch.ops.fastdiff.fused_step(T, 0, x, x, c, None, None, 0, FLAG_EVAL_Y | FLAG_WRITE_X, None, 0, -1, None,
                                      None)
    assert torch.equal(x, x_before)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.fastdiff.cfg_rescale(c, c[:, :2], 2.0, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fastdiff.per_sample_norm(c.int())


def test_seed_round_trips_through_int64():
    for seed in (0, 5, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        s = custom_ops.seed_to_int64(seed)
        assert -2 ** 63 <= s < 2 ** 63 and custom_ops.seed_from_int64(s) == seed
    want = ops.philox_normal((3, 5), 2 ** 64 - 1, 4)
    got = torch.ops.fastdiff.philox_normal([3, 5], custom_ops.seed_to_int64(2 ** 64 - 1), 4, torch.device("cpu"))
    assert torch.equal(got, want)


def test_eager_calls_keep_the_raw_path():
    """Outside torch.compile, dispatch returns the real backend: the Sampler's prepared step is
    the pybind function itself, not the custom op."""
    x = torch.zeros(2, 3)
    T = torch.zeros(1, table_width(0), dtype=torch.float64)
    assert select("fused_step", "auto", [x, T], state_dtype=torch.float32).name != custom_ops.TracedBackend.name
    ext = load_extension()
    if not isinstance(ext, str):
        assert ops.prepare_fused_step(x, table=T) is ext.fused_step


# ----------------------------------------------------------------------------------------------
# compiled loops
# ----------------------------------------------------------------------------------------------
LOOPS = {
    # name: (solver, guidance, seed)
    "dpmpp_2m_cfg": ("dpmpp_2m", 4.0, 0),
    "dpmpp_2m_sde_cfg_philox": ("dpmpp_2m_sde", 3.0, 2 ** 63 + 12345),   # a seed above int64's range
}


def _compiled_vs_eager(net, case, backend, steps=5, shape=(2, 4, 16, 16)):
    solver, guidance, seed = LOOPS[case]
    sampler = fastdiff.Sampler.build(solver=solver, steps=steps, guidance=guidance)
    table = torch.from_numpy(sampler.program.table)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    kwargs = batched(shape[0])

    def loop(x, table):
        return run_program(sampler.program, table, net, x, cfg=True, model_kwargs=kwargs, seed=seed)

    with torch.no_grad():
        x_eager, bad_eager = loop(_init_state(sampler, noise), table)
        # The eager loop is the Sampler's result (the same rows, kernels and noise).
        cond, uncond = labels(shape[0])
        x_sampler = sampler(net, noise, cond=cond, uncond=uncond, seed=seed, progress=False)
        assert torch.equal(x_eager, x_sampler)
        counter = dynamo_testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(loop, fullgraph=True, backend=counter)
        x_comp, bad_comp = compiled(_init_state(sampler, noise), table)
    assert counter.frame_count == 1, "the loop must compile as one graph"
    assert int(bad_comp) == int(bad_eager) == 0
    return x_comp, x_eager


@pytest.mark.parametrize("case", sorted(LOOPS))
def test_sampling_loop_compiles_fullgraph_aot_eager(net, case):
    x_comp, x_eager = _compiled_vs_eager(net, case, "aot_eager")
    assert torch.equal(x_comp, x_eager)


def _explicitly_selected(config) -> bool:
    return "compile" in (config.getoption("markexpr") or "")


@pytest.mark.compile
def test_sampling_loop_compiles_fullgraph_inductor(net, request):
    if not _explicitly_selected(request.config):
        pytest.skip("inductor compile takes ~30 s here: run with -m compile")
    x_comp, x_eager = _compiled_vs_eager(net, "dpmpp_2m_cfg", "inductor")
    torch.testing.assert_close(x_comp, x_eager, atol=1e-5, rtol=1e-5)


def test_table_is_a_graph_input(net):
    """The coefficient table is read by the kernel, not baked into the graph: another guidance
    scale (same rows, other table values) runs through the same compiled graph with the new
    values (a captured graph replaying stale coefficients is the bug class this rules out)."""
    programs = [fastdiff.Sampler.build(solver="dpmpp_2m", steps=4, guidance=g).program for g in (4.0, 1.5)]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")

    kwargs = batched(1)

    def loop(x, table):
        return run_program(programs[0], table, net, x, cfg=True, model_kwargs=kwargs)[0]

    compiled = torch.compile(loop, fullgraph=True, backend=counter)
    with torch.no_grad():
        results = []
        for p in programs:
            table = torch.from_numpy(p.table)
            got = compiled(noise.clone(), table)
            assert torch.equal(got, run_program(p, table, net, noise.clone(), cfg=True, model_kwargs=kwargs)[0])
            results.append(got)
    assert counter.frame_count == 1, "a new table must not recompile"
    assert not torch.equal(results[0], results[1])


def test_public_ops_compile_fullgraph():
    """fastdiff.ops and fastdiff.ops.reductions called inside a compiled function (their
    validation traces; the ops are the custom ops) give the eager results."""
    gen = torch.Generator().manual_seed(5)
    c, u = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)

    def f(c, u):
        return (R.cfg_rescale(c, u, 3.0, 0.5), ops.cfg_combine(c.half(), u.half(), 2.0),
                R.dynamic_threshold(c, 0.9, 1.5), R.per_sample_norm(c), R.error_norm(c, u, c, 1e-3, 1e-4),
                ops.philox_normal((2, 3, 8), 2 ** 64 - 7, 1))

    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
    got = torch.compile(f, fullgraph=True, backend=counter)(c, u)
    assert counter.frame_count == 1
    for g, w in zip(got, f(c, u)):
        assert g.dtype == w.dtype and torch.equal(g, w)


# ----------------------------------------------------------------------------------------------
# host syncs in fastdiff.Sampler's loop
# ----------------------------------------------------------------------------------------------
# The torch.Tensor entry points that read device data into Python (a device->host sync on a GPU).
SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__")


def _call_site():
    """(file, line, source) of the innermost caller inside the fastdiff package (else the
    innermost caller outside torch and this file)."""
    f = sys._getframe(2)
    fallback = None
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(FASTDIFF_DIR):
            return os.path.relpath(name, FASTDIFF_DIR), f.f_lineno, linecache.getline(name, f.f_lineno).strip()
        if fallback is None and "torch" not in name and name != __file__:
            fallback = (name, f.f_lineno, linecache.getline(name, f.f_lineno).strip())
        f = f.f_back
    return fallback


@contextlib.contextmanager
def record_host_syncs():
    """Record every call of SYNC_METHODS on a torch.Tensor (with its call site) in the block."""
    calls = []
    saved = {name: vars(torch.Tensor).get(name) for name in SYNC_METHODS}

    def recording(name, original):
        def method(self, *args, **kwargs):
            calls.append((name,) + _call_site())
            return original(self, *args, **kwargs)
        return method

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)   # it was inherited from torch._C.TensorBase
            else:
                setattr(torch.Tensor, name, original)


SAMPLER_CASES = {
    "dpmpp_2m_cfg": dict(solver="dpmpp_2m", guidance=4.0),
    "sde_philox_rescale": dict(solver="dpmpp_2m_sde", guidance=fastdiff.Guidance(3.0, rescale=0.7)),
    "heun_threshold": dict(solver="heun", guidance=fastdiff.Guidance(
        2.0, x0_clip=fastdiff.DynamicThresholding(0.99, 1.5)), prediction="epsilon"),
}


def _syncs(net, case, steps, **run):
    sampler = fastdiff.Sampler.build(steps=steps, **SAMPLER_CASES[case])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    cond, uncond = labels(1)
    with torch.no_grad(), record_host_syncs() as calls:
        sampler(net, noise, cond=cond, uncond=uncond, progress=False, **run)
    return calls


@pytest.mark.parametrize("case", sorted(SAMPLER_CASES))
def test_sampler_loop_has_no_per_step_host_sync(net, case):
    """The syncs of a whole run (input checks, drawing a seed, the one read of the non-finite
    flag at the end) must not depend on the number of steps."""
    few, many = _syncs(net, case, 3), _syncs(net, case, 7)
    assert sorted(many) == sorted(few), (
        "host syncs that grow with the number of steps (method, file, line, source):\n  "
        + "\n  ".join(map(str, sorted(set(many) - set(few)) or many)))
    # ... and the final read of the flag is the only one after the loop started.
    assert any(site[0] == "item" and "bad_row" in site[3] for site in many), many


def test_sync_recorder_catches_per_step_reads(net):
    """Control: check_finite='step' reads the flag every step by design; the recorder sees it."""
    few = _syncs(net, "dpmpp_2m_cfg", 3, check_finite="step")
    many = _syncs(net, "dpmpp_2m_cfg", 7, check_finite="step")
    assert len(many) > len(few)
    assert torch.Tensor.item is torch._C.TensorBase.item   # the recorder restored torch.Tensor


# Issue 13's samplers under ComfyUI's names (benchmarks/call_count.py's list): no per-step host sync
# in building the program or running it. ComfyUI's sa_solver reads a value back (.item()) every step;
# fastdiff's computes its tau(sigma) window and Adams coefficients on the host from the grid, before
# the loop, and draws its noise in the kernel. All run with CFG (the CFG++ ones need the pair).
def _comfy_sync_cases():
    from benchmarks.call_count import ISSUE13
    from fastdiff.solvers import SOLVERS
    cases = [(n, {}) for n in ISSUE13]
    cases += [("sa_solver", {"tau_interval": (1e9, 0.0)}), ("sa_solver", {"eta": 0.0}),
              ("sa_solver_pece", {"tau_interval": (1e9, 0.0)}), ("er_sde", {"solver_type": "ODE"}),
              ("heunpp2", {"s_churn": 4.0, "s_tmin": 0.05, "s_tmax": 30.0})]
    return [pytest.param(n, o, id=n + "".join(f"-{k}={v}" for k, v in o.items()),
                         marks=[] if ISSUE13[n] in SOLVERS else
                         [pytest.mark.skip(reason=f"{ISSUE13[n]} is not a fastdiff solver yet")])
            for n, o in cases]


def _comfy_syncs(net, name, options, steps):
    from benchmarks.call_count import ISSUE13
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    cond, uncond = labels(1)
    with torch.no_grad(), record_host_syncs() as calls:
        sampler = fastdiff.Sampler.build(solver=ISSUE13[name], solver_options=options, steps=steps, guidance=4.0)
        sampler(net, noise, cond=cond, uncond=uncond, progress=False, seed=5)
    return calls


@pytest.mark.parametrize("name, options", _comfy_sync_cases())
def test_comfy_samplers_have_no_per_step_host_sync(net, name, options):
    few, many = _comfy_syncs(net, name, options, 3), _comfy_syncs(net, name, options, 7)
    assert sorted(many) == sorted(few), (
        f"{name}: host syncs that grow with the number of steps (method, file, line, source):\n  "
        + "\n  ".join(map(str, sorted(set(many) - set(few)) or many)))
    assert any(site[0] == "item" and "bad_row" in site[3] for site in many), many
