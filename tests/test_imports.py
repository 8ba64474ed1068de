"""What each entry module loads, and no import cycles in fastdiff.

Each check runs in a fresh interpreter (a subprocess), since this one has long since imported
everything. The rules (DESIGN.md, "One home per concept"):

* ``import fastdiff`` imports no submodule (the public names load on first use, PEP 562);
* the oracles (``fastdiff.reference``) import nothing they judge: no backend, no custom op;
* ``fastdiff.kernels.fused_step`` and ``fastdiff.program`` load no solver, no sampler, no host library;
* the static graph of module-level imports inside src/fastdiff has no cycle.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "fastdiff"

# Modules that only the layers above the kernels may load.
HIGH_LEVEL = ("fastdiff.solvers", "fastdiff.sampler", "fastdiff.guidance", "fastdiff.guiders", "fastdiff.schedules",
              "fastdiff.integrations", "fastdiff.adaptive", "fastdiff.distributed", "fastdiff.cli")
HOST_LIBRARIES = ("diffusers", "transformers", "k_diffusion", "scipy")


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; what it loaded: the fastdiff modules, the host
    libraries, and the fastdiff custom ops registered with torch (if torch was imported)."""
    probe = code + """
import json, sys
ops = []
if "torch" in sys.modules:
    import torch
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdiff::"))
print(json.dumps({"modules": sorted(m for m in sys.modules if m == "fastdiff" or m.startswith("fastdiff.")),
                  "top": sorted({m.split(".")[0] for m in sys.modules}), "custom_ops": ops}))
"""
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO / "tests", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _under(modules, prefixes):
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_import_fastdiff_loads_no_submodule():
    got = loaded_after("import fastdiff")
    assert got["modules"] == ["fastdiff"], got["modules"]
    assert "torch" not in got["top"], "import fastdiff imported torch"


def test_import_reference_registers_nothing_and_loads_no_solver():
    got = loaded_after("import fastdiff.reference")
    assert not _under(got["modules"], ("fastdiff.ops", "fastdiff.kernels")), got["modules"]
    assert got["custom_ops"] == [], f"importing the oracles registered custom ops: {got['custom_ops']}"
    assert not _under(got["modules"], HIGH_LEVEL), got["modules"]
    assert not _under(got["top"], HOST_LIBRARIES + ("triton",)), got["top"]
    # The oracles and the row layout (and the program package the layout sits in), nothing else.
    allowed = ("fastdiff.reference", "fastdiff.program", "fastdiff.parameterization")
    assert set(got["modules"]) - {"fastdiff"} <= set(_under(got["modules"], allowed)), got["modules"]


def test_import_kernels_fused_step_loads_no_solver_or_sampler():
    pytest.importorskip("triton")
    got = loaded_after("import fastdiff.kernels.fused_step")
    assert not _under(got["modules"], HIGH_LEVEL + ("fastdiff.ops",)), got["modules"]
    assert not _under(got["top"], HOST_LIBRARIES), got["top"]


def test_import_program_loads_no_solver_or_sampler():
    got = loaded_after("import fastdiff.program")
    assert not _under(got["modules"], HIGH_LEVEL + ("fastdiff.ops",)), got["modules"]
    assert not _under(got["top"], HOST_LIBRARIES), got["top"]


def test_import_ops_registers_every_op_and_backend_without_solvers():
    got = loaded_after("import fastdiff.ops")
    from fastdiff.ops.backends import OPS
    assert got["custom_ops"] == sorted(f"fastdiff::{op}" for op in OPS)
    assert not _under(got["modules"], HIGH_LEVEL), got["modules"]
    assert not _under(got["top"], HOST_LIBRARIES + ("triton",)), got["top"]
    got = loaded_after("from fastdiff.ops.backends import BACKENDS; print(list(BACKENDS), file=__import__('sys').stderr)")
    assert "fastdiff.ops.triton_backend" in got["modules"] and "fastdiff.ops.cuda_backend" in got["modules"]


def test_import_check_loads_no_solver():
    got = loaded_after("import fastdiff.check")
    assert not _under(got["modules"], HIGH_LEVEL), got["modules"]
    assert not _under(got["top"], HOST_LIBRARIES + ("triton",)), got["top"]


def test_lazy_public_names_resolve_and_dir_lists_them():
    code = """
import fastdiff
names = list(fastdiff.__all__)
assert set(names) <= set(dir(fastdiff)), set(names) - set(dir(fastdiff))
assert fastdiff.__version__
for n in names:
    getattr(fastdiff, n)
ns = {}
exec("from fastdiff import *", ns)
assert set(names) <= set(ns), set(names) - set(ns)
assert fastdiff.Sampler is __import__("fastdiff.sampler").sampler.Sampler
assert fastdiff.attention.attention   # any submodule, as when the package imported them all
try:
    fastdiff.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("fastdiff.no_such_name did not raise AttributeError")
"""
    got = loaded_after(code)
    assert "fastdiff.sampler" in got["modules"]


# ---------------------------------------------------------------------------------------------
# Import cycles in the static graph (module-level imports only; an import inside a function runs
# later and is not part of the import-time graph)

def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module):
    """Import statements executed at import time: the module body, and inside top-level if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]


def import_graph(root: Path = PACKAGE) -> dict:
    """module -> the fastdiff modules it imports at module level. ``from a import b`` is an edge
    to ``a.b`` when that is a module, else to ``a``; a parent package is not an edge of its child
    (importing ``a.b`` runs ``a/__init__`` first, but that is the package's own business)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py") if "kernels" not in p.relative_to(root).parts[:1]}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            for a in node.names:
                target = f"{base}.{a.name}"
                if target in files:
                    edges.add(target)
                elif base in files:
                    edges.add(base)
        graph[name] = edges - {name}
    return graph


def find_cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module, each as one cycle through it."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(_one_cycle(graph, set(comp)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _one_cycle(graph, comp):
    """A path a -> b -> ... -> a inside the component (breadth first from its first module)."""
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


# Cycles outside this change's files, kept listed so the test fails on any new one, and on this one
# once it is gone (then delete the entry): k_diffusion re-exports comfy_samplers at its end, and
# comfy_samplers imports k_diffusion's helpers.
KNOWN_CYCLES = []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "fastdiff"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from .sub import y\nfrom . import z\ndef f():\n    from . import w\n")
    (pkg / "z.py").write_text("import fastdiff.x\n")
    (pkg / "w.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ..z import something\n")
    (pkg / "sub" / "y.py").write_text("try:\n    from .. import x\nexcept ImportError:\n    pass\n")
    graph = import_graph(pkg)
    assert graph["fastdiff.x"] == {"fastdiff.sub.y", "fastdiff.z"}      # not w: imported inside a function
    assert graph["fastdiff.sub"] == {"fastdiff.z"}
    assert graph["fastdiff.sub.y"] == {"fastdiff.x"}
    assert find_cycles(graph) == [["fastdiff.sub.y", "fastdiff.x", "fastdiff.sub.y"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if set(c) not in KNOWN_CYCLES]
    assert not new, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in new)
    gone = [k for k in KNOWN_CYCLES if k not in [set(c) for c in cycles]]
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_ops_layers_import_in_one_direction():
    """layout < reference < backends < api < reductions < custom_ops: no module imports one after it."""
    order = ["fastdiff.program.layout", "fastdiff.reference", "fastdiff.ops.backends", "fastdiff.ops.api",
             "fastdiff.ops.reductions", "fastdiff.ops.custom_ops"]
    graph = import_graph()
    rank = {}
    for i, layer in enumerate(order):
        for m in graph:
            if m == layer or m.startswith(layer + "."):
                rank[m] = i
    bad = [f"{m} imports {t}" for m in rank for t in graph[m] if t in rank and rank[t] > rank[m]]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# The oracles' one home

def test_oracles_import_only_torch_numpy_and_the_row_layout():
    """Every module of fastdiff/reference imports (anywhere in it) only the standard library,
    torch, numpy, the row layout and its own package."""
    allowed_roots = set(sys.stdlib_module_names) | {"torch", "numpy"}
    bad = []
    for path in sorted((PACKAGE / "reference").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    continue                                   # fastdiff.reference itself
                names = ["fastdiff." + (node.module or "") if node.level == 2 else node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in allowed_roots and name != "fastdiff.program.layout":
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert not bad, bad


def test_no_oracle_left_in_ops():
    """The oracles moved to fastdiff/reference with no module left behind in fastdiff/ops, and no
    file of the checkout imports them from there."""
    assert not (PACKAGE / "ops" / "reference.py").exists() and not (PACKAGE / "ops" / "philox.py").exists()
    stale = []
    for folder in ("src", "tests", "benchmarks", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if "fastdiff/kernels" in path.as_posix():
                continue                                       # (the link to kernels/)
            with warnings.catch_warnings():            # (other files' invalid escape sequences)
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
                        if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(m.startswith(("fastdiff.ops.reference", "fastdiff.ops.philox")) for m in mods):
                    stale.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not stale, stale
