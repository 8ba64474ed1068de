#!/usr/bin/env bash
# Install fastdiff and its test environment on a fresh machine: torch (CPU wheel), the dev/test
# dependencies at the exact versions of constraints.txt (what the parity tests were written
# against), k-diffusion without its heavy dependency tree (we import only its sampling module),
# then fastdiff itself with its C++ extension.
#
#   bash scripts/install.sh              pinned versions, fastdiff installed normally (what CI runs)
#   bash scripts/install.sh --editable   the same, fastdiff as an editable install (for development)
#   bash scripts/install.sh --latest     the newest version of every dependency (not in CI: for the day
#                                        the pins move; then `python scripts/freeze_constraints.py`)
set -euo pipefail
cd "$(dirname "$0")/.."
editable=0
constraints=(-c constraints.txt)
for arg in "$@"; do
    case "$arg" in
        --editable) editable=1 ;;
        --latest) constraints=() ;;
        *) echo "install.sh: unknown option $arg (expected --editable or --latest)" >&2; exit 2 ;;
    esac
done
PIP="python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
if [ ${#constraints[@]} -eq 0 ]; then
    $PIP install --upgrade --upgrade-strategy eager -r requirements-dev.txt
else
    $PIP install "${constraints[@]}" -r requirements-dev.txt
fi
$PIP install "${constraints[@]}" --no-deps "k-diffusion==0.1.1.post1"
if [ "$editable" = 1 ]; then
    $PIP install "${constraints[@]}" --no-build-isolation -e .
else
    # A normal install: the tests then run against what users get, not against the source tree.
    $PIP install "${constraints[@]}" --no-build-isolation --force-reinstall --no-deps .
fi
# Run from outside the checkout, so this reports the installed package.
(cd / && python -c "import fastdiff, fastdiff.ops as o; print('fastdiff', fastdiff.__version__, 'from', fastdiff.__file__, 'backends:', {k: v is None for k, v in o.available_backends().items()})")
