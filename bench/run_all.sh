#!/usr/bin/env bash
# Reproduces every lowbit benchmark table from this checkout into one Markdown file:
#   bench/run_all.sh [OUT.md]          (default: bench/results-<UTC date>.md)
# CPU part always; GPU part when torch sees a GPU. Builds the tree (Release, Python extension, C++
# benchmarks; CUDA when nvcc is there) in $LOWBIT_BENCH_BUILD (default build-bench) and benchmarks that
# build, imported from python/ where it puts its libraries (never a lowbit installed elsewhere), so the
# tables belong to this checkout.
# Environment: PYTHON (python3), LOWBIT_BENCH_THREADS (all cores), LOWBIT_BENCH_JOBS (build jobs),
# LOWBIT_BENCH_CMAKE_ARGS (extra configure arguments, e.g. -DLOWBIT_CUDA_ARCHITECTURES=90a).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/bench/results-$(date -u +%Y-%m-%d).md}
build=${LOWBIT_BENCH_BUILD:-$root/build-bench}
python=${PYTHON:-python3}
threads=${LOWBIT_BENCH_THREADS:-$(nproc)}

echo "== building lowbit in $build" >&2
# LOWBIT_TORCH_HAS_CUDA given explicitly: the top level only computes it on a first configure (before
# Torch_DIR is cached), so a re-run would otherwise build without CUDA.
torch_cuda=$("$python" -c "import torch; print(int(torch.version.cuda is not None))")
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$python")" \
  -DLOWBIT_TORCH_HAS_CUDA="$torch_cuda" \
  -DLOWBIT_BUILD_PYTHON=ON -DLOWBIT_BUILD_BENCH=ON -DLOWBIT_BUILD_TESTS=OFF -DLOWBIT_BUILD_EXAMPLES=OFF \
  ${LOWBIT_BENCH_CMAKE_ARGS:-} >&2
cmake --build "$build" -j "${LOWBIT_BENCH_JOBS:-$(nproc)}" >&2

# With LOWBIT_BUILD_PYTHON outside pip, the build puts lowbit._C and liblowbit.so into python/lowbit.
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
"$python" -c "import lowbit" || { echo "run_all.sh: the built lowbit does not import" >&2; exit 1; }

{
  echo "## lowbit benchmarks ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "Reproduce: \`bench/run_all.sh\` (commit $(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo none))."
  echo
} >> "$out"

echo "== bench/q8_linear.py" >&2
"$python" "$root/bench/q8_linear.py" --device all --threads "$threads" --markdown-out "$out"

# The 4-bit QAT layers and the weight-only layers: CPU always, the GPU when torch sees one.
devices=cpu
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && devices="cpu cuda"
for dev in $devices; do
  for b in q4_layers wq_linear; do
    echo "== bench/$b.py --device $dev" >&2
    "$python" "$root/bench/$b.py" --device "$dev" --markdown-out "$out"
  done
done
if [[ $devices == *cuda* ]]; then
  echo "== bench/llm_decode.py (7B-shaped decoder, CUDA graphs)" >&2
  "$python" "$root/bench/llm_decode.py" --markdown-out "$out"
fi

if [[ -x $build/bench/bench_gemm_s8 ]]; then
  echo "== bench_gemm_s8 (Google Benchmark, $threads OpenMP threads)" >&2
  {
    echo "### lowbit::cpu::gemm_s8_scaled (Google Benchmark, OMP_NUM_THREADS=$threads)"
    echo
    echo '```'
    OMP_NUM_THREADS=$threads "$build/bench/bench_gemm_s8" 2>&1
    echo '```'
    echo
  } | tee -a "$out"
else
  echo "run_all.sh: Google Benchmark not found (libbenchmark-dev), bench_gemm_s8 skipped" | tee -a "$out" >&2
fi
echo "== wrote $out" >&2
