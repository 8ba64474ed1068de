"""Write constraints.txt: the exact versions of every package the test environment installs.

    python scripts/freeze_constraints.py            # from the environment scripts/install.sh set up

It walks the dependency closure of requirements-dev.txt (plus k-diffusion, installed --no-deps,
and the build tools) through the installed packages' metadata, so packages that merely happen to
be on this machine are left out. Use it when moving the pins: `bash scripts/install.sh --latest`,
run the tests, then freeze (README: "Moving the pinned versions").
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# Installed outside requirements-dev.txt by scripts/install.sh (torch: the local CPU wheel).
EXTRA_ROOTS = ["torch", "k-diffusion", "setuptools"]
# k-diffusion is installed --no-deps; only these of its requirements are used (its sampling module).
NO_DEPS = {"k-diffusion"}


def _roots() -> list[str]:
    names = list(EXTRA_ROOTS)
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(Requirement(line).name)
    return names


def closure(roots) -> dict[str, str]:
    env = default_environment()
    seen: dict[str, str] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed: run `bash scripts/install.sh` first")
        seen[name] = dist.version
        if name in NO_DEPS:
            continue
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            todo.append(canonicalize_name(req.name))
    return seen


def main() -> int:
    pins = closure(_roots())
    lines = ["# Exact versions of the test environment (scripts/install.sh installs with -c constraints.txt).",
             "# Written by scripts/freeze_constraints.py; the package's own requirements stay ranges (pyproject.toml).",
             f"# Python {sys.version.split()[0]}."]
    for name in sorted(pins):
        version = re.sub(r"\+.*$", "", pins[name]) if name == "torch" else pins[name]
        lines.append(f"{name}=={version}")
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote constraints.txt: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
