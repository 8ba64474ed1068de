"""Solver math has one home: no ``Row`` is built outside fastdiff/solvers/ (and fastdiff/program/,
which defines it). Drivers and the diffusers drop-ins map their inputs to a grid, a solver and
its options, and take the rows from a solver or a function in fastdiff/solvers/.

The check reads the source (Python's ast, so a ``Row(`` in a docstring or comment is not a
call): a call of ``Row``, of ``<module>.Row`` or of a name ``Row`` was imported as.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List

from conftest import REPO

PACKAGE = REPO / "src" / "fastdiff"
HOMES = ("solvers", "program")          # where rows may be built


def row_calls(source: str, filename: str = "<source>") -> List[int]:
    """Line numbers of the ``Row`` constructor calls in ``source``."""
    tree = ast.parse(source, filename)
    names = {"Row"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname for a in node.names if a.name == "Row" and a.asname)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id in names) or (isinstance(f, ast.Attribute) and f.attr == "Row"):
                lines.append(node.lineno)
    return sorted(lines)


def _outside_homes() -> List[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in HOMES or (PACKAGE / rel.parts[0]).is_symlink():   # (kernels/: Triton, no rows)
            continue
        files.append(path)
    return files


def test_the_detector_finds_row_calls():
    src = ("from fastdiff.program import Row as R, Out\n"
           "import fastdiff.program as P\n"
           "'''Row(step=0) in a docstring is not a call'''\n"
           "a = Row(step=0, out_x=Out(x=1.0))\n"
           "b = R(step=1, out_x=Out(x=1.0))\n"
           "c = P.Row(step=2, out_x=Out(x=1.0))\n"
           "d = Rows(3)  # Row(4) in a comment\n")
    assert row_calls(src) == [4, 5, 6]


def test_the_scan_covers_the_drivers():
    scanned = {p.relative_to(PACKAGE).as_posix() for p in _outside_homes()}
    for expected in ("sampler.py", "integrations/diffusers/schedulers.py", "integrations/diffusers/inverse.py",
                     "integrations/diffusers/repaint.py"):
        assert expected in scanned
    assert not any(s.startswith(("solvers/", "program/")) for s in scanned)


def test_no_row_built_outside_solvers():
    found = []
    for path in _outside_homes():
        for line in row_calls(path.read_text(), str(path)):
            found.append(f"{path.relative_to(REPO)}:{line}")
    assert not found, ("Row built outside fastdiff/solvers/ (move the math into a solver or a function in "
                       "fastdiff/solvers/ and call it):\n  " + "\n  ".join(found))
