#!/usr/bin/env bash
# Install fastdiff for development on a fresh machine: torch (CPU wheel), the dev/test
# dependencies, k-diffusion without its heavy dependency tree (we import only its sampling
# module), then fastdiff itself with its C++ extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -r requirements-dev.txt
$PIP install --no-deps "k-diffusion==0.1.1.post1"
$PIP install --no-build-isolation -e .
python -c "import fastdiff, fastdiff.ops as o; print('fastdiff', fastdiff.__version__, 'backends:', {k: v is None for k, v in o.available_backends().items()})"
