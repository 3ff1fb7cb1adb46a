// lowbit CPU batched int8 GEMM (gemm_s8_scaled_batched): every instruction-set path this machine can
// run, both thread strategies (whole batches per thread, and each batch over all threads), against
// gemm_s8_scaled_ref called batch by batch, bitwise; the batched reference against the same loop;
// broadcast operands (stride 0), padded and interleaved batch layouts, K == 0, empty cases, and
// argument validation.
//
// Every comparison covers the whole output buffer, pre-filled with a sentinel: bytes outside every
// batch's (M, N) window (row padding, gaps between batches) must be left alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/gemm_s8_internal.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/gemm_s8.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit::cpu::detail::GemmS8BatchSplit;
using lowbit::cpu::detail::GemmS8Isa;
using namespace lowbit_test;

const char* split_name(GemmS8BatchSplit s) {
  switch (s) {
    case GemmS8BatchSplit::kAuto: return "auto";
    case GemmS8BatchSplit::kOverBatches: return "over-batches";
    case GemmS8BatchSplit::kWithinBatch: return "within-batch";
  }
  return "?";
}

constexpr uint8_t kSentinel = 0xA5;

// A batched problem: shapes, row strides, batch strides and the buffers they address.
struct Batched {
  int64_t M, N, K, batch;
  int64_t lda, ldb, ldo;
  int64_t sA, sB, sO;
  DType otype;
  float alpha;
  std::vector<int8_t> A, B;
  size_t out_bytes;

  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " K=" << K << " batch=" << batch << " lda=" << lda << " ldb=" << ldb
       << " ldo=" << ldo << " sA=" << sA << " sB=" << sB << " sO=" << sO << " out=" << lowbit::dtype_name(otype)
       << " alpha=" << alpha;
    return os.str();
  }
};

// Layouts: 0 contiguous; 1 padded rows and gaps between batches; 2 A broadcast (sA = 0); 3 B broadcast
// (sB = 0); 4 out interleaved as (M, batch, N) with a padded row, the layout of a transposed head dim.
Batched make_batched(int64_t M, int64_t N, int64_t K, int64_t batch, int layout, DType ot, float alpha,
                     uint32_t seed) {
  Batched p{M, N, K, batch, K, K, N, M * K, N * K, M * N, ot, alpha, {}, {}, 0};
  switch (layout) {
    case 1:
      p.lda = K + 3;
      p.ldb = K + 1;
      p.ldo = N + 2;
      p.sA = M * p.lda + 7;
      p.sB = N * p.ldb + 1;
      p.sO = M * p.ldo + 3;
      break;
    case 2: p.sA = 0; break;
    case 3: p.sB = 0; break;
    case 4:
      p.ldo = batch * N + 1;
      p.sO = N;
      break;
    default: break;
  }
  std::mt19937 g(seed);
  const int64_t last = batch > 0 ? batch - 1 : 0;
  // Row padding and gaps too: garbage that must not leak in.
  p.A = random_bytes(size_t(std::max<int64_t>(last * p.sA + M * p.lda, 1)), g);
  p.B = random_bytes(size_t(std::max<int64_t>(last * p.sB + N * p.ldb, 1)), g);
  p.out_bytes = size_t(std::max<int64_t>(last * p.sO + M * p.ldo, 1)) * dtype_size(ot);
  return p;
}

// The expectation: gemm_s8_scaled_ref on each batch's pointers, into a sentinel-filled buffer.
std::vector<uint8_t> per_batch_ref(const Batched& p) {
  std::vector<uint8_t> want(p.out_bytes, kSentinel);
  for (int64_t b = 0; b < p.batch; ++b) {
    const Status s = lowbit::cpu::gemm_s8_scaled_ref(p.A.data() + b * p.sA, p.lda, p.B.data() + b * p.sB, p.ldb, p.M,
                                                     p.N, p.K, &p.alpha, p.otype,
                                                     want.data() + size_t(b * p.sO) * dtype_size(p.otype), p.ldo);
    EXPECT_TRUE(s.is_ok()) << s.message;
  }
  return want;
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const Batched& p,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  if (std::memcmp(got.data(), want.data(), got.size()) == 0) return;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) {
      const int64_t e = int64_t(i / dtype_size(p.otype));
      FAIL() << what << " " << p.str() << ": first mismatch at element " << e << " (byte " << i << "), got 0x"
             << std::hex << int(got[i]) << " want 0x" << int(want[i])
             << (want[i] == kSentinel ? " (outside every output window)" : "");
    }
}

void expect_batched_matches_ref(GemmS8Isa isa, const Batched& p, GemmS8BatchSplit split, int nthreads,
                                const std::vector<uint8_t>& want) {
  std::vector<uint8_t> got(p.out_bytes, kSentinel);
  const Status s = lowbit::cpu::detail::gemm_s8_scaled_batched_isa(
      isa, p.A.data(), p.lda, p.sA, p.B.data(), p.ldb, p.sB, p.M, p.N, p.K, p.batch, &p.alpha, p.otype, got.data(),
      p.ldo, p.sO, nthreads, split);
  ASSERT_TRUE(s.is_ok()) << s.message;
  expect_same_bytes(got, want,
                    p, std::string(lowbit::cpu::detail::gemm_s8_isa_name(isa)) + " " + split_name(split) +
                           " threads=" + std::to_string(nthreads));
}

TEST(GemmS8Batched, RefMatchesPerBatchRef) {
  uint32_t seed = 1;
  for (int layout = 0; layout < 5; ++layout)
    for (int64_t batch : {int64_t(1), int64_t(3), int64_t(7)}) {
      Batched p = make_batched(17, 31, 45, batch, layout, DType(seed % 3), -3.1e-3f, seed);
      ++seed;
      const auto want = per_batch_ref(p);
      std::vector<uint8_t> got(p.out_bytes, kSentinel);
      const Status s = lowbit::cpu::gemm_s8_scaled_batched_ref(p.A.data(), p.lda, p.sA, p.B.data(), p.ldb, p.sB, p.M,
                                                               p.N, p.K, p.batch, &p.alpha, p.otype, got.data(), p.ldo,
                                                               p.sO);
      ASSERT_TRUE(s.is_ok()) << s.message;
      expect_same_bytes(got, want, p, "batched ref layout " + std::to_string(layout));
      if (HasFatalFailure()) return;
    }
}

// Odd sizes (tails of every register tile and K group), all layouts, every ISA, both strategies and the
// public entry point.
TEST(GemmS8Batched, AllPathsMatchRefOddSizes) {
  const int64_t sizes[] = {1, 3, 17, 65};
  uint32_t seed = 100;
  for (int64_t M : sizes)
    for (int64_t N : sizes)
      for (int64_t K : {int64_t(1), int64_t(31), int64_t(130)})
        for (int layout = 0; layout < 5; ++layout) {
          const int64_t batch = layout == 0 ? 1 : (layout == 4 ? 7 : 5);
          Batched p = make_batched(M, N, K, batch, layout, DType(seed % 3), 0.01171875f, seed);
          ++seed;
          const auto want = per_batch_ref(p);
          for (GemmS8Isa isa : supported_isas())
            for (GemmS8BatchSplit split : {GemmS8BatchSplit::kOverBatches, GemmS8BatchSplit::kWithinBatch}) {
              expect_batched_matches_ref(isa, p, split, 3, want);
              if (HasFatalFailure()) return;
            }
          std::vector<uint8_t> got(p.out_bytes, kSentinel);
          const Status s = lowbit::cpu::gemm_s8_scaled_batched(p.A.data(), p.lda, p.sA, p.B.data(), p.ldb, p.sB, p.M,
                                                               p.N, p.K, p.batch, &p.alpha, p.otype, got.data(),
                                                               p.ldo, p.sO);
          ASSERT_TRUE(s.is_ok()) << s.message;
          expect_same_bytes(got, want, p, "public entry");
          if (HasFatalFailure()) return;
        }
}

// Many small batches (the attention-score regime: one batch per thread), and per-batch sizes above the
// threshold where the automatic choice runs each batch over all threads; default, 1 and 3 threads.
TEST(GemmS8Batched, AutoSplitBothSidesOfTheThreshold) {
  struct S {
    int64_t M, N, K, batch;
    int layout;
  };
  const S shapes[] = {{17, 13, 29, 384, 0},  {9, 40, 64, 96, 4},   {33, 20, 7, 50, 2},
                      {130, 70, 2000, 3, 1}, {257, 129, 600, 2, 3}, {64, 64, 4100, 2, 0}};
  uint32_t seed = 7;
  for (const S& sh : shapes)
    for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      Batched p = make_batched(sh.M, sh.N, sh.K, sh.batch, sh.layout, ot, -2.3e-3f, seed++);
      const auto want = per_batch_ref(p);
      for (GemmS8Isa isa : supported_isas())
        for (int nt : {0, 1, 3}) {
          expect_batched_matches_ref(isa, p, GemmS8BatchSplit::kAuto, nt, want);
          if (HasFatalFailure()) return;
        }
    }
}

TEST(GemmS8Batched, ZeroK) {
  // K == 0: every output of every batch is float(0) * alpha = -0 for negative alpha; A, B may be null.
  const float alpha = -2.0f;
  const int64_t M = 3, N = 4, batch = 5, ldo = N + 1, sO = M * ldo + 2;
  for (DType ot : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const size_t bytes = size_t((batch - 1) * sO + M * ldo) * dtype_size(ot);
    std::vector<uint8_t> got(bytes, kSentinel), want(bytes, kSentinel);
    ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_batched(nullptr, 0, 0, nullptr, 0, 0, M, N, 0, batch, &alpha, ot,
                                                    got.data(), ldo, sO)
                    .is_ok());
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          const size_t at = size_t(b * sO + i * ldo + j) * dtype_size(ot);
          if (ot == DType::kFloat32) {
            const float v = -0.0f;
            std::memcpy(&want[at], &v, 4);
          } else {
            const uint16_t h = ot == DType::kFloat16 ? lowbit::float_to_half(-0.0f) : lowbit::float_to_bf16(-0.0f);
            std::memcpy(&want[at], &h, 2);
          }
        }
    EXPECT_TRUE(got == want) << lowbit::dtype_name(ot);
  }
}

TEST(GemmS8Batched, EmptyIsNoOp) {
  const float one = 1.0f;
  std::vector<int8_t> A(64, 1), B(64, 1);
  std::vector<float> out(16, 7.0f);
  using lowbit::cpu::gemm_s8_scaled_batched;
  // batch == 0: nothing read or written, null pointers fine; M == 0 / N == 0 likewise (strideO 0 too).
  EXPECT_TRUE(gemm_s8_scaled_batched(nullptr, 4, 16, nullptr, 4, 16, 4, 4, 4, 0, nullptr, DType::kFloat32, nullptr,
                                     4, 16)
                  .is_ok());
  EXPECT_TRUE(gemm_s8_scaled_batched(A.data(), 4, 16, B.data(), 4, 16, 0, 4, 4, 3, &one, DType::kFloat32, nullptr, 4,
                                     0)
                  .is_ok());
  EXPECT_TRUE(gemm_s8_scaled_batched(A.data(), 4, 16, B.data(), 4, 16, 4, 0, 4, 3, &one, DType::kFloat32, out.data(),
                                     0, 0)
                  .is_ok());
  for (float v : out) EXPECT_EQ(v, 7.0f);
  // batch == 1 with strideO == 0 is an ordinary GEMM.
  std::vector<float> o1(16, 7.0f), o2(16, 9.0f);
  ASSERT_TRUE(gemm_s8_scaled_batched(A.data(), 4, 0, B.data(), 4, 0, 4, 4, 4, 1, &one, DType::kFloat32, o1.data(), 4,
                                     0)
                  .is_ok());
  ASSERT_TRUE(
      lowbit::cpu::gemm_s8_scaled_ref(A.data(), 4, B.data(), 4, 4, 4, 4, &one, DType::kFloat32, o2.data(), 4).is_ok());
  EXPECT_TRUE(o1 == o2);
}

TEST(GemmS8Batched, InvalidArguments) {
  std::vector<int8_t> A(1024, 1), B(1024, 1);
  std::vector<float> out(1024);
  const float one = 1.0f, inf = std::numeric_limits<float>::infinity();
  using Fn = Status (*)(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int64_t, const float*, DType, void*, int64_t, int64_t);
  const Fn fns[] = {&lowbit::cpu::gemm_s8_scaled_batched, &lowbit::cpu::gemm_s8_scaled_batched_ref};
  const int64_t big = std::numeric_limits<int64_t>::max();
  for (Fn f : fns) {
    const int8_t* a = A.data();
    const int8_t* b = B.data();
    void* o = out.data();
    const DType f32 = DType::kFloat32;
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, -1, &one, f32, o, 4, 16), "batch < 0", "batch");
    expect_invalid(f(a, 4, -16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, 16), "strideA < 0", "strideA");
    expect_invalid(f(a, 4, 16, b, 4, -1, 4, 4, 4, 2, &one, f32, o, 4, 16), "strideB < 0", "strideB");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, -16), "strideO < 0", "strideO");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, 0), "strideO == 0, batch 2", "strideO");
    expect_invalid(f(a, 4, big / 2 + 1, b, 4, 16, 4, 4, 4, 3, &one, f32, o, 4, 16), "strideA overflow", "strideA");
    expect_invalid(f(a, 4, 16, b, 4, big / 2 + 1, 4, 4, 4, 3, &one, f32, o, 4, 16), "strideB overflow", "strideB");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 3, &one, f32, o, 4, big / 2), "strideO bytes overflow", "strideO");
    // per-batch rules, reported through the batched entry
    expect_invalid(f(a, 3, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, 16), "lda < K", "lda");
    expect_invalid(f(a, 4, 16, b, 3, 16, 4, 4, 4, 2, &one, f32, o, 4, 16), "ldb < K", "ldb");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 3, 16), "ldo < N", "ldo");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, -1, 2, &one, f32, o, 4, 16), "K < 0");
    expect_invalid(f(a, 4, 16, b, 4, 16, -1, 4, 4, 2, &one, f32, o, 4, 16), "M < 0");
    expect_invalid(f(nullptr, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, 16), "A null");
    expect_invalid(f(a, 4, 16, nullptr, 4, 16, 4, 4, 4, 2, &one, f32, o, 4, 16), "B null");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, f32, nullptr, 4, 16), "out null");
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, nullptr, f32, o, 4, 16), "alpha null");
    EXPECT_TRUE(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &inf, f32, o, 4, 16).is_ok()) << "alpha inf: computed (IEEE)";
    expect_invalid(f(a, 4, 16, b, 4, 16, 4, 4, 4, 2, &one, DType(7), o, 4, 16), "bad otype");
    // batch == 0 skips the pointers, not the shape rules
    expect_invalid(f(nullptr, 3, 16, nullptr, 4, 16, 4, 4, 4, 0, nullptr, f32, nullptr, 4, 16), "batch 0, lda < K",
                   "lda");
  }
  const Status s = lowbit::cpu::gemm_s8_scaled_batched(A.data(), 4, 16, B.data(), 4, 16, 4, 4, 4, 2, &one,
                                                       DType::kFloat32, out.data(), 4, 0);
  EXPECT_NE(s.message.find("gemm_s8_scaled_batched"), std::string::npos) << s.message;
}

}  // namespace
