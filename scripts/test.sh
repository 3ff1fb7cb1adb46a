#!/usr/bin/env bash
# All tests: set-up + build, then the C++ tests (ctest: kernels vs references, C++ modules; CUDA tests
# skip themselves without a GPU) and the Python tests (pytest: ops and layers vs float64 references,
# on CPU and, when present, CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${LOWBIT_BUILD_DIR:-build}
ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)"
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" ${PYTHON:-python3} -m pytest -q tests/python "$@"
