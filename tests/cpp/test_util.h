// Helpers shared by the C++ kernel tests (tests/cpp/test_kernel_*.cpp, and through cuda_test_util.h the
// CUDA ones): argument-error checks, random int8 fills, output element sizes, and the GEMM instruction
// sets this CPU runs. Header-only, torch-free.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/gemm_s8_internal.h"
#include "lowbit/kernels/common.h"

namespace lowbit_test {

// An argument error: kInvalidArgument with a message (containing `needle`, when not empty).
inline void expect_invalid(const lowbit::Status& s, const std::string& what, const std::string& needle = "") {
  EXPECT_EQ(s.code, lowbit::Status::Code::kInvalidArgument) << what;
  EXPECT_FALSE(s.message.empty()) << what;
  if (!needle.empty()) {
    EXPECT_NE(s.message.find(needle), std::string::npos) << what << ": " << s.message;
  }
}

// n bytes drawn uniformly from [lo, hi].
inline std::vector<int8_t> random_bytes(size_t n, std::mt19937& rng, int lo = -128, int hi = 127) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int8_t> v(n);
  for (auto& x : v) x = int8_t(d(rng));
  return v;
}

// Bytes per element of an output / input dtype.
inline size_t dtype_size(lowbit::DType t) { return t == lowbit::DType::kFloat32 ? 4 : 2; }

// Every GEMM instruction-set path this CPU can run, scalar first.
inline std::vector<lowbit::cpu::detail::GemmS8Isa> supported_isas() {
  using lowbit::cpu::detail::GemmS8Isa;
  std::vector<GemmS8Isa> v;
  for (GemmS8Isa isa : {GemmS8Isa::kScalar, GemmS8Isa::kAvx2, GemmS8Isa::kAvx512bw, GemmS8Isa::kAvx512vnni})
    if (int32_t(isa) <= int32_t(lowbit::cpu::detail::gemm_s8_best_isa())) v.push_back(isa);
  return v;
}

}  // namespace lowbit_test
