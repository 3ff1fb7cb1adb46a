// Google Benchmark of lowbit::cpu::gemm_s8_scaled, the CPU int8 GEMM (int32 accumulation, fused
// dequantizing epilogue). Reports GOP/s with one multiply-add counted as 2 operations. Threads: OpenMP's
// (OMP_NUM_THREADS). Shapes are M rows, N out features, K in features.
//
//   build/bench/bench_gemm_s8 [--benchmark_filter=...] [--benchmark_format=json]
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "lowbit/kernels/gemm_s8.h"

namespace {

// Random non-zero int8: zeros could let a kernel (or the CPU) take shortcuts a real layer never sees.
std::vector<int8_t> random_s8(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(1, 127);
  std::bernoulli_distribution sign(0.5);
  std::vector<int8_t> v(n);
  for (auto& x : v) x = int8_t(sign(rng) ? -dist(rng) : dist(rng));
  return v;
}

// Args: M, N, K, output dtype (lowbit::DType as int).
void BM_gemm_s8_scaled(benchmark::State& state) {
  const int64_t M = state.range(0), N = state.range(1), K = state.range(2);
  const auto otype = static_cast<lowbit::DType>(state.range(3));
  const auto A = random_s8(size_t(M * K), 1), B = random_s8(size_t(N * K), 2);
  std::vector<float> out(size_t(M * N));  // large enough for every dtype (fp32 is the widest)
  const float alpha = 1e-4f;
  for (auto _ : state) {
    auto st = lowbit::cpu::gemm_s8_scaled(A.data(), K, B.data(), K, M, N, K, &alpha, otype, out.data(), N);
    if (!st.is_ok()) {
      state.SkipWithError(st.message.c_str());
      break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // kIsIterationInvariantRate: value * iterations / seconds, printed as "GOP=.../s" (the 1e-9: giga).
  state.counters["GOP"] =
      benchmark::Counter(2e-9 * double(M) * double(N) * double(K), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(lowbit::dtype_name(otype));
}

constexpr int64_t kF32 = int64_t(lowbit::DType::kFloat32), kBF16 = int64_t(lowbit::DType::kBFloat16);

BENCHMARK(BM_gemm_s8_scaled)
    ->ArgNames({"M", "N", "K", "otype"})
    ->Args({1, 4096, 4096, kF32})       // one token: the weight streams from memory
    ->Args({16, 4096, 4096, kF32})      // small batch
    ->Args({128, 512, 784, kF32})       // the demo's first hidden layer
    ->Args({512, 2048, 2048, kF32})     // the q8_linear.py CPU shape
    ->Args({512, 2048, 2048, kBF16})    // same, bf16 epilogue
    ->Args({2048, 2048, 2048, kF32})    // compute bound
    ->Args({509, 2047, 2045, kF32})     // tails in every dimension
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();                    // wall time: OpenMP threads do the work, not the calling thread

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("gemm_s8_isa", lowbit::cpu::gemm_s8_isa());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
