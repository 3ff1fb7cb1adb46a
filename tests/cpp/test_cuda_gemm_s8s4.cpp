// The int4-weight GEMM (gemm_s8s4_scaled, gemm_s8_sm90.cu: the weights unpacked in registers as wgmma's A
// operand) vs the scalar CPU reference on the unpacked codes (cpu::unpack_s4 + gemm_s8_scaled_ref),
// bitwise; and the CPU form (cpu::gemm_s8s4_scaled) against the same reference.
//
// Skipped unless the device is compute capability 9.0 (the kernel exists only there). Cases: every tail
// of the 256 x 128 tile and of the 128-k stage, odd K (the padding nibble of each row's last byte holds
// random bits and must be ignored), padded strides (multiples of 16, TMA's rule), out strides that turn
// the pair stores off, all output dtypes, inf-producing alphas, repeated runs (determinism). Inputs are
// random bytes (every nibble value), the whole output buffer is poisoned before each run and compared
// byte for byte (stray writes show as changed poison).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/pack_int4.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit::packed_s4_cols;
using namespace lowbit_test;

class CudaGemmS8S4 : public CudaSm90Test {};

struct Case {
  int64_t M, N, K, lda, ldbp, ldo;
  float alpha;
  DType otype;
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " K=" << K << " lda=" << lda << " ldbp=" << ldbp << " ldo=" << ldo
       << " alpha=" << alpha << " out=" << lowbit::dtype_name(otype);
    return os.str();
  }
};

// The reference: unpack every row of Bp to int8 codes, then the scalar int8 GEMM.
std::vector<uint8_t> reference(const Case& c, const std::vector<int8_t>& ha, const std::vector<int8_t>& hb,
                               size_t o_bytes) {
  std::vector<int8_t> codes(size_t(c.N * c.K) + 1);
  Status st = lowbit::cpu::unpack_s4(hb.data(), c.N, c.K, c.ldbp, codes.data());
  EXPECT_TRUE(st.is_ok()) << st.message;
  std::vector<uint8_t> ref(o_bytes, kOutPoison);
  st = lowbit::cpu::gemm_s8_scaled_ref(ha.data(), c.lda, codes.data(), c.K, c.M, c.N, c.K, &c.alpha, c.otype,
                                       ref.data(), c.ldo);
  EXPECT_TRUE(st.is_ok()) << st.message;
  return ref;
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& ref, const Case& c) {
  ASSERT_EQ(got.size(), ref.size());
  if (std::memcmp(got.data(), ref.data(), got.size()) == 0) return;
  const size_t es = dtype_size(c.otype);
  for (size_t b = 0; b < got.size(); ++b) {
    if (got[b] == ref[b]) continue;
    const int64_t e = int64_t(b / es);
    FAIL() << "first mismatch at byte " << b << " (row " << e / c.ldo << ", col " << e % c.ldo << "): got 0x"
           << std::hex << int(got[b]) << " want 0x" << int(ref[b]) << (ref[b] == kOutPoison ? " (stray write)" : "");
  }
}

void run_case(const Case& c, std::mt19937& rng, CUstream_st* stream, int runs = 1) {
  SCOPED_TRACE(c.str());
  const size_t a_bytes = size_t(c.M * c.lda) + 16;
  const size_t b_bytes = size_t(c.N * c.ldbp) + 16;
  const size_t o_bytes = size_t(c.M * c.ldo) * dtype_size(c.otype) + 64;  // guard bytes after
  std::vector<int8_t> ha, hb;
  std::vector<uint8_t> got;
  run_gemm_on_device(rng, a_bytes, b_bytes, o_bytes, c.alpha, reinterpret_cast<cudaStream_t>(stream),
                     [&](const GemmOperands& d) {
                       return lowbit::cuda::gemm_s8s4_scaled(d.A(), c.lda, d.B(), c.ldbp, c.M, c.N, c.K,
                                                             d.alpha_ptr(), c.otype, d.out.bytes(), c.ldo, stream);
                     },
                     runs, &ha, &hb, &got);
  if (::testing::Test::HasFatalFailure()) return;
  const auto ref = reference(c, ha, hb, o_bytes);
  expect_same_bytes(got, ref, c);
  // The CPU form gives the same bytes.
  std::vector<uint8_t> cpu(o_bytes, kOutPoison);
  const Status st = lowbit::cpu::gemm_s8s4_scaled(ha.data(), c.lda, hb.data(), c.ldbp, c.M, c.N, c.K, &c.alpha,
                                                  c.otype, cpu.data(), c.ldo);
  ASSERT_TRUE(st.is_ok()) << st.message;
  expect_same_bytes(cpu, ref, c);
}

Case plain(int64_t M, int64_t N, int64_t K, float alpha, DType t, int64_t ldo_pad = 0, int64_t ld_pad = 0) {
  return {M, N, K, round_up16(K) + ld_pad, round_up16(packed_s4_cols(K)) + ld_pad, N + ldo_pad, alpha, t};
}

TEST_F(CudaGemmS8S4, MatchesReferenceOddShapes) {
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1},      {3, 17, 2},      {5, 9, 31},       {65, 255, 17},   {255, 127, 129},  {257, 129, 1031},
      {200, 513, 300}, {256, 128, 128}, {256, 128, 127}, {300, 700, 2049}, {1000, 129, 4100}, {17, 1031, 33}};
  const float alphas[] = {1.7e-4f, -0.031f, 0.5f, 3.0e-3f, 1.0e4f};  // 1e4 overflows 16-bit outputs to inf
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::mt19937 rng(94);
  int n = 0;
  for (const auto& s : shapes)
    for (int64_t pad : {0, 1, 8}) {  // pad 1: odd ldo, single-element stores
      run_case(plain(s[0], s[1], s[2], alphas[n % 5], types[n % 3], pad, pad == 8 ? 16 : 0), rng, stream());
      ++n;
      if (HasFatalFailure()) return;
    }
}

// Every tile shape the host picks: 16 and 64 activation rows (M <= 16, <= 64), 256 rows with one consumer
// warpgroup (fewer tiles than SMs) and with two (2000 x 2900: 8 x 23 tiles of 256 x 128).
TEST_F(CudaGemmS8S4, LargeDeterministic) {
  std::mt19937 rng(95);
  run_case(plain(1031, 2049, 3001, 2e-4f, DType::kBFloat16), rng, stream(), 3);
  if (HasFatalFailure()) return;
  run_case(plain(2000, 2900, 777, 1e-4f, DType::kFloat32), rng, stream(), 2);
  if (HasFatalFailure()) return;
  run_case(plain(2048, 1024, 8192, 1e-5f, DType::kFloat16), rng, stream(), 2);
  if (HasFatalFailure()) return;
  run_case(plain(16, 3000, 2049, 3e-3f, DType::kBFloat16, 1), rng, stream(), 2);
  if (HasFatalFailure()) return;
  run_case(plain(40, 1031, 4096, 3e-3f, DType::kFloat16), rng, stream(), 2);
}

// Bad arguments are errors that name the argument; calls the kernel cannot take are refused (the
// callers' fallback is unpack_s4 + gemm_s8_scaled).
TEST_F(CudaGemmS8S4, BadArgumentsAndUnsupportedCalls) {
  GemmOperands d(1 << 16, 1 << 16, 1 << 16);
  ASSERT_TRUE(d.ok());
  auto call = [&](const int8_t* A, int64_t lda, const int8_t* B, int64_t ldbp, int64_t M, int64_t N, int64_t K,
                  int64_t ldo, const float* alpha = nullptr, DType t = DType::kFloat32) {
    return lowbit::cuda::gemm_s8s4_scaled(A, lda, B, ldbp, M, N, K, alpha ? alpha : d.alpha_ptr(), t, d.out.bytes(),
                                          ldo, stream());
  };
  auto expect_invalid = [](const Status& st, const char* word) {
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message.find(word), std::string::npos) << st.message;
  };
  expect_invalid(call(d.A(), 32, d.B(), 8, 4, 4, 32, 4), "ldbp");         // ldbp < ceil(K/2)
  expect_invalid(call(d.A(), 16, d.B(), 16, 4, 4, 32, 4), "lda");         // lda < K
  expect_invalid(call(d.A(), 32, d.B(), 16, 4, 4, 32, 3), "ldo");         // ldo < N
  expect_invalid(call(d.A(), 32, d.B(), 16, -1, 4, 32, 4), "M");
  expect_invalid(call(d.A(), 32, nullptr, 16, 4, 4, 32, 4), "null");
  expect_invalid(call(d.A(), 32, d.B(), 16, 4, 4, 32, 4, nullptr, static_cast<DType>(7)), "otype");
  expect_invalid(call(d.A(1), 32, d.B(), 16, 4, 4, 32, 4), "int4-weight kernel");   // misaligned A
  expect_invalid(call(d.A(), 40, d.B(), 24, 4, 4, 33, 4), "int4-weight kernel");    // ldbp not a multiple of 16
  EXPECT_FALSE(lowbit::cuda::gemm_s8s4_fused_supported(d.A(), 40, d.B(), 24, 4, 4, 33));
  EXPECT_TRUE(lowbit::cuda::gemm_s8s4_fused_supported(d.A(), 48, d.B(), 32, 4, 4, 33));
  {
    ScopedKernel force("mma");
    EXPECT_FALSE(lowbit::cuda::gemm_s8s4_fused_supported(d.A(), 48, d.B(), 32, 4, 4, 33));
  }
  EXPECT_TRUE(call(d.A(), 32, d.B(), 16, 0, 4, 32, 4).is_ok());  // empty output: nothing to do
  // The CPU form checks the same arguments.
  const float one = 1.0f;
  std::vector<int8_t> h(256);
  std::vector<float> out(64);
  EXPECT_FALSE(lowbit::cpu::gemm_s8s4_scaled(h.data(), 32, h.data(), 8, 4, 4, 32, &one, DType::kFloat32, out.data(), 4)
                   .is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
}

// Cheap enough for compute-sanitizer (memcheck / racecheck / synccheck): every tile shape, tails, more
// k-tiles than ring stages, padded strides.
TEST_F(CudaGemmS8S4, SanitizerSmoke) {
  std::mt19937 rng(96);
  run_case(plain(300, 1031, 1031, 1e-3f, DType::kFloat16, 1), rng, stream());
  if (HasFatalFailure()) return;
  run_case(plain(513, 257, 700, 2e-3f, DType::kFloat32, 0, 16), rng, stream());
  if (HasFatalFailure()) return;
  run_case(plain(9, 200, 1100, 2e-3f, DType::kBFloat16), rng, stream());  // 16-row tiles, 9 k-tiles > 8 stages
  if (HasFatalFailure()) return;
  run_case(plain(33, 130, 1300, 2e-3f, DType::kFloat16, 1), rng, stream());  // 64-row tiles
  if (HasFatalFailure()) return;
  run_case(plain(2000, 2900, 300, 2e-4f, DType::kBFloat16), rng, stream());  // two consumer warpgroups
}

// Not a correctness test: the fused kernel against unpack_s4 + gemm_s8_scaled (median of 10 runs after
// 2 warm-ups each).
TEST_F(CudaGemmS8S4, PerfReport) {
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {{8192, 8192, 8192}, {8192, 4096, 4096}, {4096, 4096, 4096}, {2048, 8192, 8192},
                          {2048, 4096, 4096}, {256, 8192, 8192},  {64, 8192, 8192}, {16, 8192, 8192},
                          {16, 4096, 4096}};
  const size_t max_ab = size_t(8192) * 8192, max_out = size_t(8192) * 8192 * 2;
  DeviceBuffer da(max_ab), db(max_ab / 2), dcodes(max_ab), dout(max_out), dalpha(4);
  ASSERT_TRUE(da.ok() && db.ok() && dcodes.ok() && dout.ok() && dalpha.ok());
  upload_perf_operands(da, dcodes, max_ab / 2);
  CUDA_ASSERT(cudaMemcpy(db.bytes(), dcodes.bytes(), max_ab / 2, cudaMemcpyDeviceToDevice));
  if (HasFatalFailure()) return;
  const float alpha = 1e-4f;
  CUDA_ASSERT(cudaMemcpy(dalpha.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  const auto* al = reinterpret_cast<const float*>(dalpha.bytes());
  for (const auto& s : shapes) {
    const double fused = median_ms(stream_, [&] {
      return lowbit::cuda::gemm_s8s4_scaled(da.data(), s.K, db.data(), s.K / 2, s.M, s.N, s.K, al, DType::kBFloat16,
                                            dout.bytes(), s.N, stream());
    });
    const double fused32 = s.M * s.N * 4 <= int64_t(max_out) ? median_ms(stream_, [&] {
      return lowbit::cuda::gemm_s8s4_scaled(da.data(), s.K, db.data(), s.K / 2, s.M, s.N, s.K, al, DType::kFloat32,
                                            dout.bytes(), s.N, stream());
    }) : -1.0;

    const double gemm = median_ms(stream_, [&] {
      return lowbit::cuda::gemm_s8_scaled(da.data(), s.K, dcodes.data(), s.K, s.M, s.N, s.K, al, DType::kBFloat16,
                                          dout.bytes(), s.N, stream());
    });
    const double two = median_ms(stream_, [&] {
      const Status st = lowbit::cuda::unpack_s4(db.data(), s.N, s.K, s.K / 2, dcodes.data(), stream());
      if (!st.is_ok()) return st;
      return lowbit::cuda::gemm_s8_scaled(da.data(), s.K, dcodes.data(), s.K, s.M, s.N, s.K, al, DType::kBFloat16,
                                          dout.bytes(), s.N, stream());
    });
    const double ops = 2.0 * double(s.M) * double(s.N) * double(s.K);
    std::printf("[perf] gemm_s8s4 M=%lld N=%lld K=%lld bf16 out: fused %.1f us (%.0f TOP/s; fp32 out %.1f us), "
                "unpack + int8 GEMM %.1f us, int8 GEMM alone %.1f us (%.0f TOP/s)\n",
                (long long)s.M, (long long)s.N, (long long)s.K, fused * 1e3, ops / (fused * 1e-3) / 1e12,
                fused32 * 1e3, two * 1e3, gemm * 1e3, ops / (gemm * 1e-3) / 1e12);
  }
}

}  // namespace
