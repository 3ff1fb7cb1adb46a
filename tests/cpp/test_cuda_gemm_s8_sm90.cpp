// The Hopper int8 GEMM (gemm_s8_sm90.cu, wgmma + TMA) vs the scalar CPU reference, bitwise.
//
// Each test forces the kernel with LOWBIT_GEMM_S8_KERNEL=wgmma (restored afterwards), so a call the
// sm_90a kernel cannot take fails instead of silently running the mma.sync kernel. Skipped unless the
// device is compute capability 9.0 (the kernel exists only there).
// Cases: every tail of the 128 x 256 tile and of the 128-byte K stage, 16-aligned padded strides (TMA's
// rule), out strides that turn the pair stores off, batches (contiguous, broadcast A, broadcast B, out
// interleaved), the K bound, and determinism over repeated runs. Inputs are random, the whole output
// buffer is poisoned before each run and compared byte for byte (stray writes show as changed poison).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/gemm_s8.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using namespace lowbit_test;

class CudaGemmSm90 : public CudaSm90Test {};

struct Case {
  int64_t M, N, K, batch;
  int64_t lda, ldb, ldo;
  int64_t sA, sB, sO;
  float alpha;
  DType otype;
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " K=" << K << " batch=" << batch << " lda=" << lda << " ldb=" << ldb
       << " ldo=" << ldo << " sA=" << sA << " sB=" << sB << " sO=" << sO << " out=" << lowbit::dtype_name(otype);
    return os.str();
  }
};

size_t span(int64_t batch, int64_t stride, int64_t rows, int64_t ld) {
  return batch == 0 ? 0 : size_t((batch - 1) * stride + rows * ld);
}

void run_case(const Case& c, std::mt19937& rng, CUstream_st* stream, int runs = 1) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.otype);
  const size_t a_bytes = span(c.batch, c.sA, c.M, c.lda) + 16;
  const size_t b_bytes = span(c.batch, c.sB, c.N, c.ldb) + 16;
  const size_t o_bytes = span(c.batch, c.sO, c.M, c.ldo) * es + 64;  // guard bytes after
  std::vector<int8_t> ha, hb;
  std::vector<uint8_t> got;
  ScopedKernel force("wgmma");
  run_gemm_on_device(rng, a_bytes, b_bytes, o_bytes, c.alpha, reinterpret_cast<cudaStream_t>(stream),
                     [&](const GemmOperands& d) {
                       return lowbit::cuda::gemm_s8_scaled_batched(d.A(), c.lda, c.sA, d.B(), c.ldb, c.sB, c.M, c.N,
                                                                   c.K, c.batch, d.alpha_ptr(), c.otype,
                                                                   d.out.bytes(), c.ldo, c.sO, stream);
                     },
                     runs, &ha, &hb, &got);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<uint8_t> ref(o_bytes, kOutPoison);
  const Status rs = lowbit::cpu::gemm_s8_scaled_batched_ref(ha.data(), c.lda, c.sA, hb.data(), c.ldb, c.sB, c.M, c.N,
                                                            c.K, c.batch, &c.alpha, c.otype, ref.data(), c.ldo, c.sO);
  ASSERT_TRUE(rs.is_ok()) << rs.message;
  if (std::memcmp(got.data(), ref.data(), o_bytes) == 0) return;
  for (size_t b = 0; b < o_bytes; ++b) {
    if (got[b] == ref[b]) continue;
    const int64_t e = int64_t(b / es);
    const int64_t so = c.sO > 0 ? c.sO : c.M * c.ldo;
    FAIL() << "first mismatch at byte " << b << " (element " << e << ", row " << (e % so) / c.ldo << ", col "
           << (e % so) % c.ldo << " of batch " << e / so << "): got 0x" << std::hex << int(got[b]) << " want 0x"
           << int(ref[b]) << (ref[b] == kOutPoison ? " (stray write)" : "");
  }
}

Case plain(int64_t M, int64_t N, int64_t K, float alpha, DType t, int64_t ldo_pad = 0) {
  const int64_t ld = round_up16(K);
  return {M, N, K, 1, ld, ld, N + ldo_pad, 0, 0, 0, alpha, t};
}

TEST_F(CudaGemmSm90, MatchesReferenceOddShapes) {
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1},       {3, 17, 33},     {65, 255, 17},   {127, 257, 129}, {129, 511, 1031}, {200, 513, 300},
      {255, 1, 128},   {64, 256, 256},  {128, 256, 127}, {300, 700, 2049}, {1000, 129, 4100}, {17, 1031, 16}};
  const float alphas[] = {1.7e-4f, -0.031f, 0.5f, 3.0e-3f, 1.0f};  // 0.5 and 1.0 overflow fp16 to inf
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::mt19937 rng(90);
  int n = 0;
  for (const auto& s : shapes)
    for (int64_t pad : {0, 1, 8}) {  // pad 1: odd ldo, single-element stores
      run_case(plain(s[0], s[1], s[2], alphas[n % 5], types[n % 3], pad), rng, stream());
      ++n;
      if (HasFatalFailure()) return;
    }
}

TEST_F(CudaGemmSm90, PaddedStridesAndBatches) {
  std::mt19937 rng(91);
  // Padded 16-aligned row strides (garbage in the padding).
  run_case({200, 300, 1000, 1, 1040, 1024, 310, 0, 0, 0, 2e-4f, DType::kBFloat16}, rng, stream());
  if (HasFatalFailure()) return;
  // Contiguous batches with a K tail, gaps between batches.
  run_case({130, 270, 200, 5, 208, 224, 271, 130 * 208 + 32, 270 * 224 + 16, 130 * 271 + 3, 1e-3f, DType::kFloat16},
           rng, stream());
  if (HasFatalFailure()) return;
  // Broadcast A (stride 0), broadcast B.
  run_case({96, 300, 160, 4, 160, 160, 300, 0, 300 * 160, 96 * 300, -2e-4f, DType::kFloat32}, rng, stream());
  if (HasFatalFailure()) return;
  run_case({257, 40, 48, 3, 48, 48, 40, 257 * 48, 0, 257 * 40, 5e-3f, DType::kBFloat16}, rng, stream());
  if (HasFatalFailure()) return;
  // Out interleaved as (M, batch, N).
  run_case({70, 33, 64, 6, 64, 64, 6 * 33, 70 * 64, 33 * 64, 33, 1e-3f, DType::kFloat16}, rng, stream());
}

// Many k-tiles and full tiles, three runs on the same inputs: same bits (determinism).
TEST_F(CudaGemmSm90, LargeDeterministic) {
  std::mt19937 rng(92);
  run_case(plain(1024, 1536, 4096, 2.5e-5f, DType::kBFloat16), rng, stream(), 3);
  if (HasFatalFailure()) return;
  run_case(plain(1000, 1031, 2049, 1e-4f, DType::kFloat32, 9), rng, stream());
}

// The K bound: (2^17 - 1) products of (-128)(-128) = 2^31 - 2^14, exact in int32 and in fp32.
TEST_F(CudaGemmSm90, ExactAtTheKBound) {
  const int64_t M = 3, N = 5, K = lowbit::kMaxGemmS8K, ld = round_up16(K);
  std::vector<int8_t> ha(size_t(M * ld), int8_t(-128)), hb(size_t(N * ld), int8_t(-128));
  GemmOperands d(ha.size(), hb.size(), size_t(M * N) * 4);
  ASSERT_TRUE(d.ok());
  upload(d, ha, hb, 1.0f);
  if (HasFatalFailure()) return;
  ScopedKernel force("wgmma");
  const Status st = lowbit::cuda::gemm_s8_scaled(d.A(), ld, d.B(), ld, M, N, K, d.alpha_ptr(), DType::kFloat32,
                                                 d.out.bytes(), N, stream());
  ASSERT_TRUE(st.is_ok()) << st.message;
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<float> got(size_t(M * N));
  CUDA_ASSERT(cudaMemcpy(got.data(), d.out.bytes(), got.size() * 4, cudaMemcpyDeviceToHost));
  for (size_t e = 0; e < got.size(); ++e) EXPECT_EQ(got[e], 2147467264.0f) << "element " << e;
}

// Forcing the kernel on a call it cannot take (an lda that is not a multiple of 16) is an error that
// says why, not a silent fallback; the automatic choice runs such a call on the mma.sync kernel.
TEST_F(CudaGemmSm90, ForcedOnIneligibleCallIsAnError) {
  GemmOperands d(4096, 4096, 4096);
  ASSERT_TRUE(d.ok());
  {
    ScopedKernel force("wgmma");
    const Status st = lowbit::cuda::gemm_s8_scaled(d.A(), 17, d.B(), 32, 4, 4, 17, d.alpha_ptr(), DType::kFloat32,
                                                   d.out.bytes(), 4, stream());
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message.find("wgmma"), std::string::npos) << st.message;
  }
  ScopedKernel autochoice("auto");
  EXPECT_TRUE(lowbit::cuda::gemm_s8_scaled(d.A(), 17, d.B(), 32, 100, 4, 17, d.alpha_ptr(), DType::kFloat32,
                                           d.out.bytes(), 4, stream())
                  .is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
}

// Cheap enough for compute-sanitizer (memcheck / racecheck / synccheck): a few k-tiles past the ring.
TEST_F(CudaGemmSm90, SanitizerSmoke) {
  std::mt19937 rng(93);
  run_case(plain(129, 300, 1031, 1e-3f, DType::kFloat16, 1), rng, stream());
  if (HasFatalFailure()) return;
  run_case({65, 257, 600, 2, 608, 608, 257, 65 * 608, 0, 65 * 257, 2e-3f, DType::kBFloat16}, rng, stream());
}

// Not a correctness test: TOP/s of both kernels at a few sizes (median of 10 runs after 2 warm-ups).
TEST_F(CudaGemmSm90, PerfReport) {
  struct Shape { int64_t M, N, K; };
  const Shape shapes[] = {{8192, 8192, 8192}, {8192, 4096, 4096}, {4096, 4096, 4096}, {2048, 4096, 4096},
                          {256, 4096, 4096}, {16, 8192, 8192}};
  const size_t max_ab = size_t(8192) * 8192, max_out = size_t(8192) * 8192 * 2;
  DeviceBuffer da(max_ab), db(max_ab), dout(max_out), dalpha(4);
  ASSERT_TRUE(da.ok() && db.ok() && dout.ok() && dalpha.ok());
  upload_perf_operands(da, db, max_ab);
  if (HasFatalFailure()) return;
  const float alpha = 1e-4f;
  CUDA_ASSERT(cudaMemcpy(dalpha.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  for (const auto& s : shapes) {
    double ms[2];
    const char* names[2] = {"mma", "wgmma"};
    for (int k = 0; k < 2; ++k) {
      ScopedKernel force(names[k]);
      ms[k] = median_ms(stream_, [&] {
        return lowbit::cuda::gemm_s8_scaled(da.data(), s.K, db.data(), s.K, s.M, s.N, s.K,
                                            reinterpret_cast<const float*>(dalpha.bytes()), DType::kBFloat16,
                                            dout.bytes(), s.N, stream());
      });
    }
    const double ops = 2.0 * double(s.M) * double(s.N) * double(s.K);
    std::printf("[perf] gemm_s8 M=%lld N=%lld K=%lld bf16 out: mma %.1f us (%.0f TOP/s), wgmma %.1f us (%.0f TOP/s)\n",
                (long long)s.M, (long long)s.N, (long long)s.K, ms[0] * 1e3, ops / (ms[0] * 1e-3) / 1e12,
                ms[1] * 1e3, ops / (ms[1] * 1e-3) / 1e12);
  }
}

}  // namespace
