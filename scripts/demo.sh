#!/usr/bin/env bash
# The main job: set-up + build, then the C++ demo (Fashion-MNIST, Q8Linear MLP next to its fp32 twin).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${LOWBIT_BUILD_DIR:-build}
exec "$BUILD/examples/cpp/lowbit_demo" "$@"
