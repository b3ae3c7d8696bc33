#!/usr/bin/env bash
# Set up everything on a fresh machine (idempotent): a virtual environment in .venv with the engine, its test
# tools and the headless Slicer MRML classes. torch is pinned and installed first: an unpinned torch pulls a
# multi-GB CUDA build, and icon-registration/dynamic-network-architectures would drag in torchvision's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c .ci/constraints.txt torch
python -m pip install --quiet -c .ci/constraints.txt -e ".[test,slicer]"

# Headless Chromium for the HTML report browser test (skipped by the test when absent).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: chromium could not be installed; the browser report test will be skipped" >&2
fi
python -c "import torch, LesionLocatorLib; print('LesionLocator ready: torch', torch.__version__)"
