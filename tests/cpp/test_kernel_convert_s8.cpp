// lowbit CPU cast_s8 (int8 codes -> fp32 / fp16 / bf16) and transpose_s8 (int8 (M, N) -> (N, M)).
//
// Both against plain loops written here (the bits of every output element from float_convert.h, which the
// kernel does not use), bitwise, over whole output buffers: the output is poisoned first, with guard
// elements before and after it, so row padding and anything outside the window must still hold the poison.
// Sizes 1 .. 4097 (every pair of 1, 3, 17, 63, 64, 65, 129, 1000, 4097: 8 x 8 sub-block and 64 x 64 block
// edges, the parallel path), padded strides, base pointers off alignment, empty shapes, argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/convert_s8.h"
#include "convert_test_util.h"
#include "lowbit/kernels/float_convert.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit_test::dtype_size;
using lowbit_test::expect_invalid;
using lowbit_test::random_bytes;

constexpr uint8_t kPoison = 0xA5;  // 0xA5A5: a finite fp16 / bf16 value no int8 converts to; fp32 likewise
constexpr int64_t kGuard = 19;     // poisoned elements after the output (and `off` before it)

const int64_t kSizes[] = {1, 3, 17, 63, 64, 65, 129, 1000, 4097};
const DType kTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// The bits of (otype) v, from the scalar conversions of float_convert.h.
uint32_t want_bits(int8_t v, DType t) {
  const float f = float(v);
  switch (t) {
    case DType::kFloat32: return lowbit::float_to_bits(f);
    case DType::kFloat16: return lowbit::float_to_half(f);
    case DType::kBFloat16: return lowbit::float_to_bf16(f);
  }
  return 0;
}

void put_bits(std::vector<uint8_t>& buf, int64_t idx, DType t, uint32_t bits) {
  if (t == DType::kFloat32) std::memcpy(&buf[size_t(idx) * 4], &bits, 4);
  else {
    const uint16_t h = uint16_t(bits);
    std::memcpy(&buf[size_t(idx) * 2], &h, 2);
  }
}

using lowbit_test::CastCase;

// Runs cast_s8 on random codes (row padding included: junk the kernel must not read into the output) into
// a poisoned buffer and compares the whole buffer with the plain loop's.
void check_cast(const CastCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.str());
  const std::vector<int8_t> q = random_bytes(size_t(c.q_off + c.M * c.ldq), rng);
  const size_t es = dtype_size(c.t), elems = size_t(c.out_off + c.M * c.ldo + kGuard);
  std::vector<uint8_t> got(elems * es, kPoison), want(elems * es, kPoison);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < c.N; ++j)
      put_bits(want, c.out_off + i * c.ldo + j, c.t, want_bits(q[size_t(c.q_off + i * c.ldq + j)], c.t));
  const Status s = lowbit::cpu::cast_s8(q.data() + c.q_off, c.M, c.N, c.ldq, c.t, got.data() + c.out_off * es, c.ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  if (got != want) {
    size_t e = 0;
    while (std::memcmp(&got[e * es], &want[e * es], es) == 0) ++e;
    const int64_t rel = int64_t(e) - c.out_off;
    FAIL() << "first difference at element " << e << " (row " << (rel >= 0 ? rel / c.ldo : -1) << ", col "
           << (rel >= 0 ? rel % c.ldo : rel) << ")";
  }
}

using lowbit_test::TransposeCase;

void check_transpose(const TransposeCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.str());
  const std::vector<int8_t> q = random_bytes(size_t(c.q_off + c.M * c.ldq), rng);
  const size_t bytes = size_t(c.out_off + c.N * c.ldo + kGuard);
  std::vector<int8_t> got(bytes, int8_t(kPoison)), want(bytes, int8_t(kPoison));
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < c.N; ++j) want[size_t(c.out_off + j * c.ldo + i)] = q[size_t(c.q_off + i * c.ldq + j)];
  const Status s = lowbit::cpu::transpose_s8(q.data() + c.q_off, c.M, c.N, c.ldq, got.data() + c.out_off, c.ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  if (got != want) {
    size_t e = 0;
    while (got[e] == want[e]) ++e;
    const int64_t rel = int64_t(e) - c.out_off;
    FAIL() << "first difference at byte " << e << " (out row " << (rel >= 0 ? rel / c.ldo : -1) << ", col "
           << (rel >= 0 ? rel % c.ldo : rel) << "): got " << int(got[e]) << ", want " << int(want[e]);
  }
}

// ---------------------------------------------------------------------------------------------------
// cast_s8

// Every code, hand-checked against its value: exact, and 0 -> +0.
TEST(CastS8, EveryCodeIsExact) {
  std::vector<int8_t> q(256);
  for (int v = -128; v < 128; ++v) q[size_t(v + 128)] = int8_t(v);
  std::vector<float> f32(256);
  std::vector<uint16_t> f16(256), bf16(256);
  ASSERT_TRUE(lowbit::cpu::cast_s8(q.data(), 16, 16, 16, DType::kFloat32, f32.data(), 16).is_ok());
  ASSERT_TRUE(lowbit::cpu::cast_s8(q.data(), 16, 16, 16, DType::kFloat16, f16.data(), 16).is_ok());
  ASSERT_TRUE(lowbit::cpu::cast_s8(q.data(), 1, 256, 256, DType::kBFloat16, bf16.data(), 256).is_ok());
  for (int v = -128; v < 128; ++v) {
    const size_t e = size_t(v + 128);
    EXPECT_EQ(f32[e], float(v)) << v;
    EXPECT_EQ(lowbit::half_to_float(f16[e]), float(v)) << v;
    EXPECT_EQ(lowbit::bf16_to_float(bf16[e]), float(v)) << v;
  }
  EXPECT_FALSE(std::signbit(f32[128]));
  EXPECT_EQ(f16[128], 0u);
  EXPECT_EQ(bf16[128], 0u);
  EXPECT_EQ(f16[0], 0xD800u);   // -128
  EXPECT_EQ(bf16[0], 0xC300u);  // -128
  EXPECT_EQ(f16[255], 0x57F0u);  // 127
  EXPECT_EQ(bf16[255], 0x42FEu);  // 127
}

// Every pair of sizes, every dtype; strides dense or padded, bases aligned or not, cycling.
TEST(CastS8, MatchesPlainLoop) {
  std::mt19937 rng(1);
  int k = 0;
  for (int64_t M : kSizes)
    for (int64_t N : kSizes) {
      if (M * N > (int64_t(1) << 22)) continue;  // 4097 x 4097 adds nothing over 1000 x 4097
      for (DType t : kTypes) {
        const int64_t pad_q = (k % 3 == 1) ? 5 : 0, pad_o = (k % 4 == 2) ? 3 : 0;
        check_cast({t, M, N, N + pad_q, N + pad_o, k % 5 == 3 ? 1 : 0, k % 7 == 4 ? 1 : 0}, rng);
        if (::testing::Test::HasFatalFailure()) return;
        ++k;
      }
    }
}

TEST(CastS8, PaddedStridesAndMisalignedBases) {
  std::mt19937 rng(2);
  for (DType t : kTypes)
    for (int64_t q_off : {0, 1, 3, 8})
      for (int64_t out_off : {0, 1, 3}) {
        check_cast({t, 33, 129, 129, 129, q_off, out_off}, rng);
        check_cast({t, 33, 129, 131, 144, q_off, out_off}, rng);
        check_cast({t, 17, 64, 80, 64, q_off, out_off}, rng);
        check_cast({t, 5, 4097, 4100, 4099, q_off, out_off}, rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
}

// More work than one thread's share, with column spans inside long rows (the row is split over work items).
TEST(CastS8, LongRowsParallel) {
  std::mt19937 rng(3);
  for (DType t : kTypes) {
    check_cast({t, 3, 100003, 100003, 100011, 1, 1}, rng);
    check_cast({t, 1, 300001, 300001, 300001, 0, 0}, rng);
    check_cast({t, 70001, 3, 7, 5, 2, 1}, rng);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(CastS8, EmptyIsNoOp) {
  using lowbit::cpu::cast_s8;
  for (DType t : kTypes) {
    EXPECT_TRUE(cast_s8(nullptr, 0, 5, 0, t, nullptr, 0).is_ok());
    EXPECT_TRUE(cast_s8(nullptr, 4, 0, 0, t, nullptr, 0).is_ok());
    EXPECT_TRUE(cast_s8(nullptr, 0, 0, 7, t, nullptr, 3).is_ok());
  }
  std::vector<int8_t> q(16, 1);
  std::vector<uint8_t> out(64, kPoison);
  EXPECT_TRUE(cast_s8(q.data(), 4, 0, 4, DType::kFloat32, out.data(), 4).is_ok());
  EXPECT_TRUE(cast_s8(q.data(), 0, 4, 4, DType::kFloat16, out.data(), 4).is_ok());
  for (uint8_t b : out) EXPECT_EQ(b, kPoison);
}

TEST(CastS8, RejectsInvalidArguments) {
  using lowbit::cpu::cast_s8;
  std::vector<int8_t> q(64, 0);
  std::vector<float> o(64, 0.f);
  const DType f32 = DType::kFloat32;
  int8_t* qp = q.data();
  float* op = o.data();
  expect_invalid(cast_s8(qp, -1, 4, 4, f32, op, 4), "M < 0", "M must be >= 0, got -1");
  expect_invalid(cast_s8(qp, 4, -2, 4, f32, op, 4), "N < 0", "N must be >= 0, got -2");
  expect_invalid(cast_s8(qp, 4, 4, -1, f32, op, 4), "ldq < 0", "ldq must be >= 0, got -1");
  expect_invalid(cast_s8(qp, 4, 4, 4, f32, op, -1), "ldo < 0", "ldo must be >= 0, got -1");
  expect_invalid(cast_s8(qp, 4, 8, 7, f32, op, 8), "ldq < N", "ldq must be >= N (8), got 7");
  expect_invalid(cast_s8(qp, 4, 8, 8, f32, op, 6), "ldo < N", "ldo must be >= N (8), got 6");
  expect_invalid(cast_s8(qp, 4, 4, 4, static_cast<DType>(3), op, 4), "bad otype", "otype must be");
  expect_invalid(cast_s8(qp, 4, 4, 4, static_cast<DType>(-1), op, 4), "negative otype", "got -1");
  expect_invalid(cast_s8(nullptr, 4, 4, 4, f32, op, 4), "q null", "q must not be null");
  expect_invalid(cast_s8(qp, 4, 4, 4, f32, nullptr, 4), "out null", "out must not be null");
  expect_invalid(cast_s8(qp, 1, 4, 4, f32, reinterpret_cast<uint8_t*>(op) + 2, 4), "fp32 out misaligned",
                 "out must be aligned to its element size (4 bytes for float32), address % 4, got 2");
  expect_invalid(cast_s8(qp, 1, 4, 4, DType::kBFloat16, reinterpret_cast<uint8_t*>(op) + 1, 4),
                 "bf16 out misaligned", "address % 2, got 1");
  const int64_t big = std::numeric_limits<int64_t>::max() / 2;
  expect_invalid(cast_s8(qp, 4, 4, big, f32, op, 4), "M * ldq overflow", "M * ldq must fit int64");
  expect_invalid(cast_s8(qp, 4, 4, 4, f32, op, big), "M * ldo overflow", "M * ldo must fit int64");
  // Argument rules apply even with nothing to do; strides need not cover an empty row set.
  expect_invalid(cast_s8(nullptr, 0, 4, -1, f32, nullptr, 4), "ldq < 0, M = 0", "ldq must be >= 0");
  EXPECT_TRUE(cast_s8(nullptr, 0, 4, 0, f32, nullptr, 0).is_ok());
  const Status s = cast_s8(qp, -1, 4, 4, f32, op, 4);
  EXPECT_EQ(s.message.rfind("lowbit::cpu::cast_s8: ", 0), 0u) << s.message;
  for (float v : o) EXPECT_EQ(v, 0.f);  // nothing written by a rejected call
}

// ---------------------------------------------------------------------------------------------------
// transpose_s8

// The scaled form: (otype)(float(q) * s), one fp32 multiply (the float64 product of an 8-bit and a 24-bit
// significand is exact, so rounding it once to float is the fp32 product) and one RNE rounding to otype;
// scales that overflow fp16 / produce subnormals / are negative or zero included.
TEST(CastS8, ScaledMatchesDefinition) {
  std::mt19937 rng(77);
  const float scales[] = {1.0f, 3.7e-3f, -0.031f, 1234.5f, 6.1e-6f, 0.0f, 1e-30f};
  for (float sc : scales)
    for (DType t : kTypes)
      for (int64_t M : {int64_t(1), int64_t(7), int64_t(65)})
        for (int64_t N : {int64_t(1), int64_t(33), int64_t(1000)}) {
          const int64_t ldq = N + 3, ldo = N + 2;
          const std::vector<int8_t> q = random_bytes(size_t(M * ldq), rng);
          const size_t es = dtype_size(t);
          std::vector<uint8_t> out(size_t(M * ldo) * es, kPoison);
          ASSERT_TRUE(lowbit::cpu::cast_s8(q.data(), M, N, ldq, t, out.data(), ldo, &sc).is_ok());
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < ldo; ++j) {
              const uint8_t* e = out.data() + size_t(i * ldo + j) * es;
              if (j >= N) {
                for (size_t b = 0; b < es; ++b) ASSERT_EQ(e[b], kPoison) << "padding written";
                continue;
              }
              const float f = float(double(q[size_t(i * ldq + j)]) * double(sc));
              uint32_t want = 0, got = 0;
              if (t == DType::kFloat32) std::memcpy(&want, &f, 4);
              else want = t == DType::kFloat16 ? lowbit::float_to_half(f) : lowbit::float_to_bf16(f);
              std::memcpy(&got, e, es);
              ASSERT_EQ(got, want) << lowbit::dtype_name(t) << " s=" << sc << " at " << i << "," << j;
            }
        }
}

TEST(TransposeS8, MatchesPlainLoop) {
  std::mt19937 rng(4);
  int k = 0;
  for (int64_t M : kSizes)
    for (int64_t N : kSizes) {
      const int64_t pad_q = (k % 3 == 1) ? 5 : 0, pad_o = (k % 4 == 2) ? 9 : 0;
      check_transpose({M, N, N + pad_q, M + pad_o, k % 5 == 3 ? 1 : 0, k % 7 == 4 ? 3 : 0}, rng);
      if (::testing::Test::HasFatalFailure()) return;
      ++k;
    }
}

TEST(TransposeS8, PaddedStridesAndMisalignedBases) {
  std::mt19937 rng(5);
  for (int64_t q_off : {0, 1, 7})
    for (int64_t out_off : {0, 3, 8}) {
      check_transpose({64, 64, 64, 64, q_off, out_off}, rng);
      check_transpose({129, 65, 80, 131, q_off, out_off}, rng);
      check_transpose({8, 4097, 4099, 16, q_off, out_off}, rng);
      check_transpose({1000, 17, 33, 1001, q_off, out_off}, rng);
      if (::testing::Test::HasFatalFailure()) return;
    }
}

TEST(TransposeS8, ThinShapes) {
  std::mt19937 rng(6);
  check_transpose({1, 300001, 300001, 1, 0, 0}, rng);
  check_transpose({300001, 1, 2, 300001, 1, 0}, rng);
  check_transpose({2, 70001, 70003, 2, 0, 1}, rng);
  check_transpose({70001, 9, 9, 70001, 0, 0}, rng);
}

// The transpose of the transpose is the input (a second, self-checking route through the blocks).
TEST(TransposeS8, TwiceIsIdentity) {
  std::mt19937 rng(7);
  const int64_t M = 777, N = 1234;
  const std::vector<int8_t> q = random_bytes(size_t(M * N), rng);
  std::vector<int8_t> t(size_t(N * M)), back(size_t(M * N));
  ASSERT_TRUE(lowbit::cpu::transpose_s8(q.data(), M, N, N, t.data(), M).is_ok());
  ASSERT_TRUE(lowbit::cpu::transpose_s8(t.data(), N, M, M, back.data(), N).is_ok());
  EXPECT_EQ(back, q);
}

TEST(TransposeS8, EmptyIsNoOp) {
  using lowbit::cpu::transpose_s8;
  EXPECT_TRUE(transpose_s8(nullptr, 0, 5, 0, nullptr, 0).is_ok());
  EXPECT_TRUE(transpose_s8(nullptr, 4, 0, 0, nullptr, 0).is_ok());
  std::vector<int8_t> q(16, 1), out(16, int8_t(kPoison));
  EXPECT_TRUE(transpose_s8(q.data(), 4, 0, 4, out.data(), 4).is_ok());
  EXPECT_TRUE(transpose_s8(q.data(), 0, 4, 4, out.data(), 4).is_ok());
  for (int8_t b : out) EXPECT_EQ(b, int8_t(kPoison));
}

TEST(TransposeS8, RejectsInvalidArguments) {
  using lowbit::cpu::transpose_s8;
  std::vector<int8_t> q(64, 0), o(64, 0);
  int8_t* qp = q.data();
  int8_t* op = o.data();
  expect_invalid(transpose_s8(qp, -1, 4, 4, op, 4), "M < 0", "M must be >= 0, got -1");
  expect_invalid(transpose_s8(qp, 4, -1, 4, op, 4), "N < 0", "N must be >= 0, got -1");
  expect_invalid(transpose_s8(qp, 4, 4, -1, op, 4), "ldq < 0", "ldq must be >= 0, got -1");
  expect_invalid(transpose_s8(qp, 4, 4, 4, op, -3), "ldo < 0", "ldo must be >= 0, got -3");
  expect_invalid(transpose_s8(qp, 4, 8, 7, op, 4), "ldq < N", "ldq must be >= N (8), got 7");
  expect_invalid(transpose_s8(qp, 8, 4, 4, op, 7), "ldo < M", "ldo must be >= M (8), got 7");
  expect_invalid(transpose_s8(nullptr, 4, 4, 4, op, 4), "q null", "q must not be null");
  expect_invalid(transpose_s8(qp, 4, 4, 4, nullptr, 4), "out null", "out must not be null");
  const int64_t big = std::numeric_limits<int64_t>::max() / 2;
  expect_invalid(transpose_s8(qp, 4, 4, big, op, 4), "M * ldq overflow", "M * ldq must fit int64");
  expect_invalid(transpose_s8(qp, 4, 4, 4, op, big), "N * ldo overflow", "N * ldo must fit int64");
  // ldo covers rows of out (N of them): with N == 0 there are none, whatever M is.
  EXPECT_TRUE(transpose_s8(qp, 4, 0, 4, op, 0).is_ok());
  const Status s = transpose_s8(qp, 4, 4, 4, op, 3);
  EXPECT_EQ(s.message.rfind("lowbit::cpu::transpose_s8: ", 0), 0u) << s.message;
  for (int8_t v : o) EXPECT_EQ(v, 0);
}

}  // namespace
