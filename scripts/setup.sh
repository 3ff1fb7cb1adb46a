#!/usr/bin/env bash
# Idempotent set-up and build on a fresh Debian 12 machine: Debian packages, PyPI packages (torch pinned
# to the GPU machine's 2.11.0), then one CMake build of everything (kernels, ops, Python extension placed
# in python/lowbit for in-tree use, C++ tests, demo, benchmarks). Re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_pkgs=(build-essential cmake ninja-build python3-dev libgtest-dev libbenchmark-dev zlib1g-dev dataset-fashion-mnist)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.11.0' else 1)" 2>/dev/null; then
  echo "setup: installing torch==2.11.0 from PyPI"
  $PY -m pip install -q torch==2.11.0
fi
pip_pkgs=()
# safetensors: the Python library the checkpoint tests check interchange against.
for m in numpy pytest safetensors; do $PY -c "import $m" 2>/dev/null || pip_pkgs+=("$m"); done
# transformers: tests/python/test_transformers.py runs a LlamaForCausalLM through lowbit (pinned).
$PY -c "import transformers, sys; sys.exit(transformers.__version__ != '5.17.0')" 2>/dev/null \
  || pip_pkgs+=("transformers==5.17.0")
if [ ${#pip_pkgs[@]} -gt 0 ]; then $PY -m pip install -q "${pip_pkgs[@]}"; fi

BUILD=${LOWBIT_BUILD_DIR:-build}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_BUILD_PYTHON=ON \
        -DPython3_EXECUTABLE="$(command -v $PY)" ${LOWBIT_CMAKE_ARGS:-}
fi
cmake --build "$BUILD" -j "$(nproc)"
