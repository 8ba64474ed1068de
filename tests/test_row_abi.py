"""The row ABI is declared once: fastdiff/program/layout.py, mirrored by csrc/program_layout.h.

* the header declares exactly the Python module's constants and functions of K (by name);
* its values equal the module's: parsed and evaluated here, and compiled with g++ as
  static_asserts for several K (what the kernels' compiler computes, not what a regex reads);
* no other file in csrc/ writes a column offset (the literals the layout used to be spelled in),
  and no other Python module declares a column constant or re-derives the table width;
* the fused step's argument list (layout.STEP_ARGS, the row booleans as one ``flags`` bitmask) is
  the one every backend declares: the reference, the validated op, the custom op's schema and
  functions, the Triton launcher, the C++ and CUDA signatures and their pybind11 argument names;
  the public op keeps the booleans as keywords and packs them.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fastdiff.program import layout

from conftest import REPO

HEADER = REPO / "csrc" / "program_layout.h"
KS = (0, 1, 2, 3, 4, 5, 7, 16, 64, 1024)

_CONST = re.compile(r"^\s*constexpr\s+(?:int|unsigned)\s+(\w+)\s*=\s*([^;]+);", re.M)
_FUNC = re.compile(r"constexpr\s+int\s+(\w+)\s*\(\s*int\s*(?:K|/\*\s*K\s*\*/)\s*\)\s*\{\s*return\s+([^;]+);\s*\}")


def _c_expr_to_py(expr: str) -> str:
    return re.sub(r"\b(\d+)[uU]\b", r"\1", expr)


def parse_header():
    text = HEADER.read_text()
    consts = {name: _c_expr_to_py(expr) for name, expr in _CONST.findall(text)}
    funcs = {name: _c_expr_to_py(expr) for name, expr in _FUNC.findall(text)}
    return consts, funcs


def _evaluate(consts, funcs):
    """The header's constants and functions as Python values / callables (integer arithmetic only)."""
    env: dict = {}
    for name, expr in consts.items():
        env[name] = eval(expr, {"__builtins__": {}}, dict(env))
    for name, expr in funcs.items():
        env[name] = (lambda e: lambda K: eval(e, {"__builtins__": {}}, dict(env, K=K)))(expr)
    return env


def test_header_declares_the_python_names():
    consts, funcs = parse_header()
    assert set(consts) == set(layout.CONSTANTS), (
        f"constants only in the header: {sorted(set(consts) - set(layout.CONSTANTS))}; "
        f"only in layout.py: {sorted(set(layout.CONSTANTS) - set(consts))}")
    assert set(funcs) == set(layout.FUNCTIONS), (
        f"functions only in the header: {sorted(set(funcs) - set(layout.FUNCTIONS))}; "
        f"only in layout.py: {sorted(set(layout.FUNCTIONS) - set(funcs))}")


def test_header_values_match_the_python_module():
    env = _evaluate(*parse_header())
    for name, value in layout.CONSTANTS.items():
        assert env[name] == value, f"{name}: header {env[name]}, layout.py {value}"
    for K in KS:
        for name, fn in layout.FUNCTIONS.items():
            assert env[name](K) == fn(K), f"{name}({K}): header {env[name](K)}, layout.py {fn(K)}"


def test_header_compiles_to_the_python_values(tmp_path):
    """The same diff through the C++ compiler: static_asserts generated from layout.py."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    lines = [f'#include "{HEADER}"', "namespace L = fastdiff::layout;"]
    for name, value in layout.CONSTANTS.items():
        lines.append(f'static_assert(L::{name} == {value}u, "{name}");')
    for K in KS:
        for name, fn in layout.FUNCTIONS.items():
            lines.append(f'static_assert(L::{name}({K}) == {fn(K)}, "{name}({K})");')
        c = f"L::columns({K})"
        expect = dict(g=layout.COL_G, g0=layout.COL_G0, g1=layout.COL_G1, qy=layout.COL_QY, qd=layout.COL_QD,
                      out_x=layout.col_out(K, "x"),
                      out_y=layout.col_out(K, "y"), out_h=layout.col_out(K, "h"), s_in=layout.col_s_in(K),
                      width=layout.table_width(K))
        for field, v in expect.items():
            lines.append(f'static_assert({c}.{field} == {v}, "columns({K}).{field}");')
    src = tmp_path / "abi.cpp"
    src.write_text("\n".join(lines) + "\n")
    r = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]


def test_python_layout_is_consistent():
    for K in KS:
        assert layout.col_out(K, "x") == layout.col_out_x(K) == layout.OUT_BASE
        assert layout.col_out(K, "y") == layout.col_out_x(K) + layout.out_width(K)
        assert layout.col_out(K, "h") == layout.col_out_h(K) == layout.col_out_y(K) + layout.out_width(K)
        assert layout.col_s_in(K) == layout.table_width(K) - 1 == layout.col_out_h(K) + K * layout.out_width(K)
        for j in range(min(K, 8)):
            assert layout.col_out(K, j) == layout.col_out_slot(K, j) == layout.col_out_h(K) + j * layout.out_width(K)
    with pytest.raises(ValueError):
        layout.col_out(0, "z")
    for bits in range(layout.FLAG_ALL + 1):
        assert layout.pack_flags(*layout.unpack_flags(bits)) == bits
    with pytest.raises(ValueError, match="unknown row flag"):
        layout.unpack_flags(layout.FLAG_ALL + 1)


def test_row_flags():
    from fastdiff.program import Out, Row
    r = Row(step=0, eval_at="y", out_x=Out(x=1.0), out_y=Out(y=1.0), next_eval="y")
    assert layout.unpack_flags(r.flags) == (True, True, True, True)
    r = Row(step=0, out_x=Out(x=1.0), next_eval="x")
    assert layout.unpack_flags(r.flags) == (False, True, False, False)


# ---------------------------------------------------------------------------------------------
# Nobody else spells the layout

# How the layout was written out before it had one home (csrc/cpu/ops.cpp, csrc/cuda/layout.h, ...).
_C_LITERALS = [
    (r"\b[35]\s*\+\s*[23]\s*\*", "the table width spelled out (3 + 2 * ... / 5 + 3 * ...)"),
    (r"\b[45]\s*\+\s*K\b|\bK\s*\+\s*[45]\b", "an out-block width spelled out (4 + K / 5 + K)"),
    (r"\bb[xy]\s*=\s*3\b", "an out-block start spelled out"),
    (r"\bcol\(\s*\d+\s*\)|\bcoefs\[\s*\d+\s*\]|\btrow\[\s*\d+", "a table column read by number"),
    (r"\bwidth\s*-\s*1\b", "s_in as 'the last column'"),
    (r"Columns\s*\{\s*\d", "a Columns value spelled out"),
    (r"constexpr\s+int\s+(?:COL_|OUT_)\w*\s*=", "a layout constant declared outside program_layout.h"),
]


def _csrc_files():
    for ext in ("*.h", "*.cpp", "*.cu", "*.cuh"):
        yield from (REPO / "csrc").rglob(ext)


def test_no_literal_offsets_in_csrc():
    bad = []
    for path in _csrc_files():
        if path == HEADER:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            for pattern, what in _C_LITERALS:
                if re.search(pattern, code):
                    bad.append(f"{path.relative_to(REPO)}:{lineno}: {what}: {line.strip()}")
    assert not bad, "the row layout belongs in csrc/program_layout.h only:\n" + "\n".join(bad)


def test_kernels_include_the_header():
    users = [REPO / "csrc" / "cpu" / "ops.cpp", REPO / "csrc" / "cuda" / "layout.h"]
    for path in users:
        assert '#include "../program_layout.h"' in path.read_text(), f"{path} does not include the layout header"


_PY_LITERALS = [
    (r"^\s*(?:COL_G[01]?|COL_QY|COL_QD|OUT_BASE|OUT_FIXED|OUT_(?:[XYHZ]|HU))\s*(?:,\s*\w+\s*)*=",
     "a column constant declared"),
    (r"^\s*_?(?:COL_G[01]?|COL_QY|COL_QD|OUT_BASE|OUT_FIXED)\s*,", "a column constant declared"),
    (r"\b[35]\s*\+\s*[23]\s*\*\s*\(", "the table width spelled out"),
    (r"OUT_BASE\s*\+\s*[23]\s*\*|OUT_FIXED\s*\+\s*K\b", "a column derived outside layout.py"),
]


def test_no_second_python_layout():
    roots = [REPO / "src" / "fastdiff", REPO / "kernels"]
    own = (REPO / "src" / "fastdiff" / "program" / "layout.py").resolve()
    bad = []
    seen = set()
    for root in roots:
        for path in root.rglob("*.py"):
            real = path.resolve()
            if real == own or real in seen:
                continue
            seen.add(real)
            for lineno, line in enumerate(real.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for pattern, what in _PY_LITERALS:
                    if re.search(pattern, code):
                        bad.append(f"{path.relative_to(REPO)}:{lineno}: {what}: {line.strip()}")
    assert not bad, "the row layout belongs in fastdiff/program/layout.py only:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# The fused step's argument list: layout.STEP_ARGS, and every declaration of it diffed against it

def _params(fn, drop=("self", "backend")):
    import inspect
    return tuple(p for p in inspect.signature(fn).parameters if p not in drop)


def test_row_flags_are_one_argument():
    """The backends take the row booleans as one ``flags`` int (the bitmask), none of them apart;
    the flag names are pack_flags' order, one bit each."""
    names = layout.STEP_ARG_NAMES
    assert dict(layout.STEP_ARGS)["flags"] == "int"
    assert not set(names) & set(layout.FLAG_ARG_NAMES), "a row flag is still an argument of its own"
    assert len(set(names)) == len(names)
    bits = [layout.pack_flags(*(n == m for m in layout.FLAG_ARG_NAMES)) for n in layout.FLAG_ARG_NAMES]
    assert bits == [layout.FLAG_EVAL_Y, layout.FLAG_WRITE_X, layout.FLAG_WRITE_Y, layout.FLAG_MODEL_IN_FROM_Y]
    assert sum(bits) == layout.FLAG_ALL
    for flags in range(layout.FLAG_ALL + 1):
        assert layout.pack_flags(*layout.unpack_flags(flags)) == flags
    for flags in (layout.FLAG_ALL + 1, 1 << 40, -1):
        with pytest.raises(ValueError, match="flags has unknown row flag bits"):
            layout.unpack_flags(flags)


def test_public_fused_step_keeps_its_keywords():
    """fastdiff.ops.fused_step (the users' API) takes the row booleans as keywords and packs them:
    its parameters are STEP_ARGS with ``flags`` spelled out (and ``hist_write``, one slot, beside
    the ``hist_writes`` bitmask)."""
    from fastdiff import ops
    public = _params(ops.fused_step)
    assert set(layout.FLAG_ARG_NAMES) <= set(public)
    assert tuple(n for n in public if n not in layout.FLAG_ARG_NAMES + ("hist_write",)) == \
        tuple(n for n in layout.STEP_ARG_NAMES if n != "flags")


def test_python_declarations_match_step_args():
    from fastdiff import ops
    from fastdiff.ops import api, custom_ops
    from fastdiff.reference import step as reference
    decls = {
        "fastdiff.ops.reference.fused_step": _params(reference.fused_step),
        "fastdiff.ops.api._fused_step": _params(api._fused_step),
        "fastdiff.ops._validate_step": _params(ops._validate_step),
        "custom_ops._fused_step_impl": _params(custom_ops._fused_step_impl),
        "custom_ops._fused_step_fake": _params(custom_ops._fused_step_fake),
        "custom_ops.TracedBackend.fused_step": _params(custom_ops.TracedBackend.fused_step),
    }
    for where, names in decls.items():
        assert names == layout.STEP_ARG_NAMES, f"{where} takes {names}, the ABI is {layout.STEP_ARG_NAMES}"
    assert custom_ops._SCHEMAS["fused_step"] == layout.step_schema(), \
        "the custom op's schema differs from fastdiff.program.layout.step_schema()"


def test_triton_launcher_matches_step_args():
    pytest.importorskip("triton")
    from fastdiff.kernels import fused_step as triton_fused_step
    assert _params(triton_fused_step.fused_step) == layout.STEP_ARG_NAMES


def _cpp_params(text: str, start: str):
    """Parameter names of the C++ function whose declaration begins with ``start``."""
    i = text.index(start) + len(start)
    depth, j = 1, i
    while depth:
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        j += 1
    params = [p.strip() for p in text[i:j - 1].split(",")]
    return tuple(re.findall(r"(\w+)\s*(?:=[^,]*)?$", p)[0] for p in params if p)


def _pybind_args(text: str, op: str):
    i = re.search(r'm\.def\(\s*"' + op + '"', text).end()
    j = text.find("m.def(", i)
    return tuple(re.findall(r'py::arg\("(\w+)"\)', text[i:j if j > 0 else None]))


@pytest.mark.parametrize("path, start", [
    ("csrc/ops.h", "void fused_step("),
    ("csrc/cpu/ops.cpp", "void fused_step("),
    ("csrc/cuda/torch_binding.cpp", "void fused_step("),
])
def test_cpp_signatures_match_step_args(path, start):
    assert _cpp_params((REPO / path).read_text(), start) == layout.STEP_ARG_NAMES, path


@pytest.mark.parametrize("path", ["csrc/bindings.cpp", "csrc/cuda/torch_binding.cpp"])
def test_pybind_arguments_match_step_args(path):
    assert _pybind_args((REPO / path).read_text(), "fused_step") == layout.STEP_ARG_NAMES, path


def test_cuda_argument_struct_has_every_step_arg():
    """csrc/cuda/launch.h's fastdiff_step_args carries each argument (tensors as [B, M] rows; the
    table with its shape and strides; the CFG halves of model_in as a count)."""
    text = (REPO / "csrc" / "cuda" / "launch.h").read_text()
    body = text[text.index("typedef struct fastdiff_step_args {"):text.index("} fastdiff_step_args;")]
    fields = set(re.findall(r"(\w+)\s*;", body))
    assert set(layout.STEP_ARG_NAMES) <= fields, sorted(set(layout.STEP_ARG_NAMES) - fields)
