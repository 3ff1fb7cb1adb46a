// lowbit CPU int8 GEMM: every instruction-set path this machine can run against the scalar reference
// (bitwise, all output dtypes, odd sizes and strides), the references against independent int64 / double
// computations, edge values, and argument validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/gemm_s8_internal.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/gemm_s8.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit::float_to_bits;
using lowbit::cpu::detail::GemmS8Isa;
using namespace lowbit_test;

const char* isa_name(GemmS8Isa isa) { return lowbit::cpu::detail::gemm_s8_isa_name(isa); }

std::vector<int8_t> random_s8(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  return random_bytes(n, g);
}

struct Problem {
  int64_t M, N, K, lda, ldb, ldo;
  std::vector<int8_t> A, B;
};

Problem make_problem(int64_t M, int64_t N, int64_t K, int64_t pad, uint32_t seed) {
  Problem p{M, N, K, K + pad, K + 2 * pad + 1, N + pad, {}, {}};
  p.A = random_s8(size_t(std::max<int64_t>(M * p.lda, 1)), seed);
  p.B = random_s8(size_t(std::max<int64_t>(N * p.ldb, 1)), seed * 7919u + 1u);
  return p;
}

// Runs `isa` and the reference on p into buffers pre-filled with a sentinel, compares them byte for byte
// (padding columns included, so writes outside the (M, N) window are caught too).
void expect_isa_matches_ref(GemmS8Isa isa, const Problem& p, float alpha, DType ot, int nthreads = 0) {
  const size_t bytes = size_t(std::max<int64_t>(p.M * p.ldo, 1)) * dtype_size(ot);
  std::vector<uint8_t> got(bytes, 0xA5), want(bytes, 0xA5);
  Status s = lowbit::cpu::detail::gemm_s8_scaled_isa(isa, p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N, p.K,
                                                     &alpha, ot, got.data(), p.ldo, nthreads);
  ASSERT_TRUE(s.is_ok()) << s.message;
  s = lowbit::cpu::gemm_s8_scaled_ref(p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N, p.K, &alpha, ot, want.data(),
                                      p.ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  if (std::memcmp(got.data(), want.data(), bytes) != 0) {
    for (size_t b = 0; b < bytes; ++b)
      if (got[b] != want[b]) {
        const int64_t e = int64_t(b / dtype_size(ot));
        FAIL() << isa_name(isa) << " " << lowbit::dtype_name(ot) << " M=" << p.M << " N=" << p.N << " K=" << p.K
               << " threads=" << nthreads << ": first mismatch at row " << e / p.ldo << " col " << e % p.ldo;
      }
  }
}

TEST(GemmS8, ReportsIsa) {
  const std::string isa = lowbit::cpu::gemm_s8_isa();
  EXPECT_TRUE(isa == "avx512_vnni" || isa == "avx512bw" || isa == "avx2" || isa == "scalar") << isa;
  EXPECT_EQ(isa, isa_name(lowbit::cpu::detail::gemm_s8_best_isa()));
  std::cout << "[ gemm_s8 ] fast path: " << isa << "\n";
}

TEST(GemmS8, S8S32RefMatchesInt64Loop) {
  const int64_t sizes[] = {1, 3, 17, 31, 64, 65};
  uint32_t seed = 1;
  for (int64_t M : sizes)
    for (int64_t N : sizes)
      for (int64_t K : {int64_t(1), int64_t(5), int64_t(64), int64_t(257)}) {
        Problem p = make_problem(M, N, K, 3, seed++);
        const int64_t ldc = N + 2;
        std::vector<int32_t> C(size_t(M * ldc), 12345);
        ASSERT_TRUE(
            lowbit::cpu::gemm_s8s8s32_ref(p.A.data(), p.lda, p.B.data(), p.ldb, M, N, K, C.data(), ldc).is_ok());
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            int64_t acc = 0;
            for (int64_t k = 0; k < K; ++k) acc += int64_t(p.A[i * p.lda + k]) * int64_t(p.B[j * p.ldb + k]);
            ASSERT_EQ(C[i * ldc + j], acc) << M << "x" << N << "x" << K << " at " << i << "," << j;
          }
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = N; j < ldc; ++j) ASSERT_EQ(C[i * ldc + j], 12345);
      }
}

// The reference's fp32 result is float(acc) * alpha with two roundings: within 2^-23 relative of each
// other, so within ~2^-22 of the exact product; fp16 / bf16 add one more rounding.
TEST(GemmS8, ScaledRefMatchesDouble) {
  const float alpha = 3.7e-4f;
  for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    Problem p = make_problem(17, 31, 300, 2, 99);
    std::vector<uint16_t> o16(size_t(p.M * p.ldo));
    std::vector<float> o32(size_t(p.M * p.ldo));
    void* out = ot == DType::kFloat32 ? static_cast<void*>(o32.data()) : static_cast<void*>(o16.data());
    ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_ref(p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N, p.K, &alpha, ot,
                                                out, p.ldo)
                    .is_ok());
    const double rel = ot == DType::kFloat32 ? 2.5e-7 : ot == DType::kFloat16 ? 1.0e-3 : 8.0e-3;
    const double abs_floor = ot == DType::kFloat16 ? 6.0e-8 : 0.0;  // fp16 subnormal spacing
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t j = 0; j < p.N; ++j) {
        int64_t acc = 0;
        for (int64_t k = 0; k < p.K; ++k) acc += int64_t(p.A[i * p.lda + k]) * int64_t(p.B[j * p.ldb + k]);
        const double exact = double(acc) * double(alpha);
        const size_t idx = size_t(i * p.ldo + j);
        const double got = ot == DType::kFloat32   ? o32[idx]
                           : ot == DType::kFloat16 ? lowbit::half_to_float(o16[idx])
                                                   : lowbit::bf16_to_float(o16[idx]);
        ASSERT_LE(std::fabs(got - exact), rel * std::fabs(exact) + abs_floor)
            << lowbit::dtype_name(ot) << " at " << i << "," << j << " acc=" << acc;
      }
  }
}

TEST(GemmS8, AllPathsMatchRefOddSizes) {
  const int64_t sizes[] = {1, 3, 17, 31, 64, 65};
  uint32_t seed = 100;
  for (GemmS8Isa isa : supported_isas())
    for (int64_t M : sizes)
      for (int64_t N : sizes)
        for (int64_t K : sizes) {
          Problem p = make_problem(M, N, K, 5, seed++);
          const DType ot = DType(seed % 3);
          expect_isa_matches_ref(isa, p, 0.01171875f, ot);
          if (HasFatalFailure()) return;
        }
}

TEST(GemmS8, AllPathsMatchRefLargerShapesAllDtypes) {
  struct S {
    int64_t M, N, K;
  };
  // Cover: the few-row streaming path (M <= 12) and the tiled path, N tails of every width, K tails
  // of every residue mod 4 and mod 64, K > one transpose chunk, and splits over 2 and 3 threads.
  const S shapes[] = {{127, 257, 1000}, {257, 127, 65}, {1000, 17, 31}, {3, 1000, 257}, {12, 100, 999},
                      {13, 49, 130},    {8, 47, 4099},  {5, 1, 1},      {64, 64, 64},   {65, 97, 127}};
  uint32_t seed = 7;
  for (GemmS8Isa isa : supported_isas())
    for (const S& sh : shapes)
      for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        Problem p = make_problem(sh.M, sh.N, sh.K, 7, seed++);
        for (int nt : {0, 1, 3}) {
          expect_isa_matches_ref(isa, p, -2.3e-3f, ot, nt);
          if (HasFatalFailure()) return;
        }
      }
}

// Per-row scale (SwitchBack epilogue): out[i, j] = float(acc) * (alpha * row_scale[i]). Every path is
// bitwise equal to the reference (few-row and tiled paths, every dtype, 1 and 3 threads, K == 0), and the
// reference is within two fp32 roundings of the float64 product (acc * alpha * row_scale exactly); rows
// with a zero, negative, NaN or inf scale give the IEEE results.
TEST(GemmS8, RowScaleAllPathsMatchRefAndDouble) {
  struct S {
    int64_t M, N, K;
  };
  const S shapes[] = {{1, 33, 70}, {5, 17, 129}, {12, 40, 64}, {13, 31, 300}, {67, 129, 257}, {9, 7, 0}};
  uint32_t seed = 4242;
  const float alpha = 0.37f;
  for (const S& sh : shapes) {
    Problem p = make_problem(sh.M, sh.N, sh.K, 3, seed++);
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-2.f, 2.f);
    std::vector<float> rs(size_t(sh.M));
    for (auto& v : rs) v = u(g) * 1e-3f;
    rs[0] = 0.f;
    if (sh.M > 2) rs[2] = std::numeric_limits<float>::quiet_NaN();
    if (sh.M > 3) rs[3] = std::numeric_limits<float>::infinity();
    for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      const size_t bytes = size_t(std::max<int64_t>(p.M * p.ldo, 1)) * dtype_size(ot);
      std::vector<uint8_t> want(bytes, 0xA5);
      ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_rows_ref(p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N, p.K, &alpha,
                                                       rs.data(), ot, want.data(), p.ldo)
                      .is_ok());
      std::vector<uint8_t> fast(bytes, 0xA5);
      ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_rows(p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N, p.K, &alpha,
                                                   rs.data(), ot, fast.data(), p.ldo)
                      .is_ok());
      ASSERT_EQ(std::memcmp(fast.data(), want.data(), bytes), 0) << "gemm_s8_scaled_rows M=" << p.M;
      for (GemmS8Isa isa : supported_isas())
        for (int nt : {1, 3}) {
          std::vector<uint8_t> got(bytes, 0xA5);
          ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, p.A.data(), p.lda, p.B.data(), p.ldb, p.M, p.N,
                                                              p.K, &alpha, ot, got.data(), p.ldo, nt, rs.data())
                          .is_ok());
          ASSERT_EQ(std::memcmp(got.data(), want.data(), bytes), 0)
              << isa_name(isa) << " " << lowbit::dtype_name(ot) << " M=" << p.M << " N=" << p.N << " K=" << p.K;
        }
      if (ot != DType::kFloat32) continue;
      const float* o = reinterpret_cast<const float*>(want.data());
      for (int64_t i = 0; i < p.M; ++i)
        for (int64_t j = 0; j < p.N; ++j) {
          int64_t acc = 0;
          for (int64_t k = 0; k < p.K; ++k) acc += int64_t(p.A[i * p.lda + k]) * int64_t(p.B[j * p.ldb + k]);
          const double exact = double(acc) * double(alpha) * double(rs[size_t(i)]);
          const float got = o[i * p.ldo + j];
          if (std::isnan(rs[size_t(i)]) || (std::isinf(rs[size_t(i)]) && acc == 0)) {
            ASSERT_TRUE(std::isnan(got)) << i << "," << j;
          } else if (std::isinf(rs[size_t(i)])) {
            ASSERT_EQ(got, acc > 0 ? INFINITY : -INFINITY) << i << "," << j;
          } else {
            // alpha*rs, float(acc) and the product: three fp32 roundings
            ASSERT_LE(std::fabs(double(got) - exact), 4e-7 * std::fabs(exact)) << i << "," << j << " acc=" << acc;
          }
        }
    }
  }
}

// Extremes of the int8 range at the largest allowed K: the u8 bias trick of the VNNI path overflows
// int32 in its intermediate (-128 * 255 * K) and must still land on the exact result.
TEST(GemmS8, ExtremeValuesAtMaxK) {
  const int64_t K = lowbit::kMaxGemmS8K;
  const int64_t M = 14, N = 3;  // 14 rows: past the few-row path, so the tiled kernels run too
  std::vector<int8_t> A(size_t(M * K)), B(size_t(N * K));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) A[i * K + k] = int8_t(i % 2 == 0 ? -128 : (k % 2 ? 127 : -128));
  for (int64_t k = 0; k < K; ++k) {
    B[k] = 127;
    B[K + k] = -128;
    B[2 * K + k] = int8_t((k * 37) % 256 - 128);
  }
  std::vector<int32_t> C(size_t(M * N));
  ASSERT_TRUE(lowbit::cpu::gemm_s8s8s32_ref(A.data(), K, B.data(), K, M, N, K, C.data(), N).is_ok());
  EXPECT_EQ(C[0], int32_t(-128 * 127 * K));
  EXPECT_EQ(C[1], int32_t(128 * 128 * K));  // 2^31 - 2^14: the largest sum the bound allows
  const float alpha = 1.0f;
  for (GemmS8Isa isa : supported_isas()) {
    std::vector<float> out(size_t(M * N)), ref(size_t(M * N));
    ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, A.data(), K, B.data(), K, M, N, K, &alpha,
                                                        DType::kFloat32, out.data(), N)
                    .is_ok());
    ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_ref(A.data(), K, B.data(), K, M, N, K, &alpha, DType::kFloat32,
                                                ref.data(), N)
                    .is_ok());
    for (int64_t e = 0; e < M * N; ++e) {
      EXPECT_EQ(float_to_bits(out[e]), float_to_bits(ref[e])) << isa_name(isa) << " element " << e;
      EXPECT_EQ(out[e], float(C[e])) << isa_name(isa) << " element " << e;
    }
  }
}

// Output specials: overflow to inf (fp32 and fp16), -0 from a negative alpha, subnormal results that
// stress the fp16 / bf16 rounding of the vector epilogues.
TEST(GemmS8, OutputSpecialsBitwise) {
  const float alphas[] = {3.0e38f, -3.0e38f, 1.0e30f, 70.0f, -1.0f, 1.0e-40f, 3.0e-39f, 1.0e-45f, 6.1e-5f};
  uint32_t seed = 500;
  for (GemmS8Isa isa : supported_isas())
    for (float alpha : alphas)
      for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        Problem p = make_problem(9, 37, 21, 1, seed++);
        // a zero row and column to produce exact zeros (-0 for negative alpha)
        for (int64_t k = 0; k < p.K; ++k) p.A[k] = 0;
        for (int64_t k = 0; k < p.K; ++k) p.B[2 * p.ldb + k] = 0;
        expect_isa_matches_ref(isa, p, alpha, ot);
        Problem q = make_problem(20, 37, 21, 1, seed++);
        expect_isa_matches_ref(isa, q, alpha, ot);
        if (HasFatalFailure()) return;
      }
}

TEST(GemmS8, ZeroSizes) {
  const float alpha = -2.0f;
  std::vector<int8_t> A(64, 1), B(64, 1);
  for (GemmS8Isa isa : supported_isas()) {
    // K == 0: every output is float(0) * alpha = -0.0f for negative alpha
    std::vector<float> out(6, 5.0f);
    ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, A.data(), 0, B.data(), 0, 2, 3, 0, &alpha,
                                                        DType::kFloat32, out.data(), 3)
                    .is_ok());
    for (float v : out) EXPECT_EQ(float_to_bits(v), float_to_bits(-0.0f)) << isa_name(isa);
    std::vector<uint16_t> h(6, 0x1234);
    ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, A.data(), 4, B.data(), 4, 2, 3, 0, &alpha,
                                                        DType::kBFloat16, h.data(), 3)
                    .is_ok());
    for (uint16_t v : h) EXPECT_EQ(v, 0x8000) << isa_name(isa);
    // M == 0 or N == 0: nothing written, null out allowed
    std::vector<float> untouched(4, 7.0f);
    ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, A.data(), 8, B.data(), 8, 0, 3, 8, &alpha,
                                                        DType::kFloat32, nullptr, 3)
                    .is_ok());
    ASSERT_TRUE(lowbit::cpu::detail::gemm_s8_scaled_isa(isa, A.data(), 8, B.data(), 8, 2, 0, 8, &alpha,
                                                        DType::kFloat32, untouched.data(), 0)
                    .is_ok());
    for (float v : untouched) EXPECT_EQ(v, 7.0f);
  }
  std::vector<float> out(6, 5.0f);
  ASSERT_TRUE(
      lowbit::cpu::gemm_s8_scaled_ref(nullptr, 0, nullptr, 0, 2, 3, 0, &alpha, DType::kFloat32, out.data(), 3).is_ok());
  for (float v : out) EXPECT_EQ(float_to_bits(v), float_to_bits(-0.0f));
  std::vector<int32_t> C(6, 9);
  ASSERT_TRUE(lowbit::cpu::gemm_s8s8s32_ref(nullptr, 0, nullptr, 0, 2, 3, 0, C.data(), 3).is_ok());
  for (int32_t v : C) EXPECT_EQ(v, 0);
}

TEST(GemmS8, InvalidArguments) {
  std::vector<int8_t> A(256, 1), B(256, 1);
  std::vector<float> out(256);
  std::vector<int32_t> C(256);
  const float one = 1.0f, inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  using Fn = Status (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, int64_t, const float*,
                        DType, void*, int64_t);
  const Fn fns[] = {&lowbit::cpu::gemm_s8_scaled, &lowbit::cpu::gemm_s8_scaled_ref};
  for (Fn f : fns) {
    const int8_t* a = A.data();
    const int8_t* b = B.data();
    void* o = out.data();
    const DType f32 = DType::kFloat32;
    expect_invalid(f(a, 4, b, 4, -1, 4, 4, &one, f32, o, 4), "M < 0");
    expect_invalid(f(a, 4, b, 4, 4, -1, 4, &one, f32, o, 4), "N < 0");
    expect_invalid(f(a, 4, b, 4, 4, 4, -1, &one, f32, o, 4), "K < 0");
    expect_invalid(f(a, 4, b, 4, 1, 1, lowbit::kMaxGemmS8K + 1, &one, f32, o, 1), "K too large");
    expect_invalid(f(a, 3, b, 4, 4, 4, 4, &one, f32, o, 4), "lda < K");
    expect_invalid(f(a, 4, b, 3, 4, 4, 4, &one, f32, o, 4), "ldb < K");
    expect_invalid(f(a, 4, b, 4, 4, 4, 4, &one, f32, o, 3), "ldo < N");
    expect_invalid(f(a, -1, b, 4, 0, 4, 4, &one, f32, o, 4), "lda negative");
    expect_invalid(f(nullptr, 4, b, 4, 4, 4, 4, &one, f32, o, 4), "A null");
    expect_invalid(f(a, 4, nullptr, 4, 4, 4, 4, &one, f32, o, 4), "B null");
    expect_invalid(f(a, 4, b, 4, 4, 4, 4, &one, f32, nullptr, 4), "out null");
    expect_invalid(f(a, 4, b, 4, 4, 4, 4, nullptr, f32, o, 4), "alpha null");
    // Non-finite alpha: computed, not refused (as on CUDA): acc = 4 here, so inf / NaN outputs.
    ASSERT_TRUE(f(a, 4, b, 4, 4, 4, 4, &inf, f32, o, 4).is_ok());
    for (int e = 0; e < 16; ++e) EXPECT_EQ(out[e], inf);
    ASSERT_TRUE(f(a, 4, b, 4, 4, 4, 4, &nan, f32, o, 4).is_ok());
    for (int e = 0; e < 16; ++e) EXPECT_TRUE(std::isnan(out[e]));
    expect_invalid(f(a, 4, b, 4, 4, 4, 4, &one, DType(7), o, 4), "bad otype");
  }
  const Status s = lowbit::cpu::gemm_s8_scaled(A.data(), 3, B.data(), 4, 4, 4, 4, &one, DType::kFloat32, out.data(), 4);
  EXPECT_NE(s.message.find("lda"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("3"), std::string::npos) << s.message;
  expect_invalid(lowbit::cpu::gemm_s8s8s32_ref(A.data(), 4, B.data(), 4, 4, 4, 4, C.data(), 3), "ldc < N");
  expect_invalid(lowbit::cpu::gemm_s8s8s32_ref(A.data(), 4, B.data(), 4, 4, 4, 4, nullptr, 4), "C null");
  expect_invalid(lowbit::cpu::gemm_s8s8s32_ref(A.data(), 4, B.data(), 4, 4, -4, 4, C.data(), 4), "N < 0");
}

}  // namespace
