// The per-row scale form of the CUDA int8 GEMM (gemm_s8_scaled_rows: out = float(acc) * (alpha * rs[i]),
// SwitchBack's input-gradient epilogue) vs the CPU reference, bitwise, on both kernels: mma.sync (forced)
// and the automatic choice (the wgmma kernel on a 9.0 device for 16-byte aligned operands). Row scales
// are random with a zero, a NaN and an inf row; the whole output buffer is poisoned, so stray writes show.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/gemm_s8.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using namespace lowbit_test;

class CudaGemmRows : public CudaStreamTest {};

struct RowCase {
  int64_t M, N, K, lda, ldb, ldo;
  DType otype;
};

void run_rows_case(const RowCase& c, const char* kernel, std::mt19937& rng, CUstream_st* stream) {
  SCOPED_TRACE(::testing::Message() << kernel << " M=" << c.M << " N=" << c.N << " K=" << c.K << " lda=" << c.lda
                                    << " out=" << lowbit::dtype_name(c.otype));
  const size_t es = dtype_size(c.otype);
  const size_t a_bytes = size_t(c.M * c.lda) + 16, b_bytes = size_t(c.N * c.ldb) + 16;
  const size_t o_bytes = size_t(c.M * c.ldo) * es + 64;
  std::vector<float> rs(size_t(c.M));
  std::uniform_real_distribution<float> u(-3e-3f, 3e-3f);
  for (auto& v : rs) v = u(rng);
  rs[0] = 0.f;
  if (c.M > 2) rs[2] = std::numeric_limits<float>::quiet_NaN();
  if (c.M > 4) rs[4] = std::numeric_limits<float>::infinity();
  DeviceBuffer drs(rs.size() * 4);
  ASSERT_TRUE(drs.ok());
  CUDA_ASSERT(cudaMemcpy(drs.bytes(), rs.data(), rs.size() * 4, cudaMemcpyHostToDevice));
  const float alpha = 0.75f;
  std::vector<int8_t> ha, hb;
  std::vector<uint8_t> got;
  ScopedKernel force(kernel);
  run_gemm_on_device(rng, a_bytes, b_bytes, o_bytes, alpha, reinterpret_cast<cudaStream_t>(stream),
                     [&](const GemmOperands& d) {
                       const auto* rsp = reinterpret_cast<const float*>(drs.bytes());
                       return lowbit::cuda::gemm_s8_scaled_rows(d.A(), c.lda, d.B(), c.ldb, c.M, c.N, c.K,
                                                                d.alpha_ptr(), rsp, c.otype, d.out.bytes(), c.ldo,
                                                                stream);
                     },
                     2, &ha, &hb, &got);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<uint8_t> ref(o_bytes, kOutPoison);
  const Status st = lowbit::cpu::gemm_s8_scaled_rows_ref(ha.data(), c.lda, hb.data(), c.ldb, c.M, c.N, c.K, &alpha,
                                                         rs.data(), c.otype, ref.data(), c.ldo);
  ASSERT_TRUE(st.is_ok()) << st.message;
  // Bitwise, except that a NaN matches any NaN: the GPU's fp32 multiply returns the canonical NaN where
  // the CPU keeps the operand's payload (the NaN-scale row).
  auto is_nan = [&](const uint8_t* p) {
    if (c.otype == DType::kFloat32) {
      uint32_t v;
      std::memcpy(&v, p, 4);
      return (v & 0x7fffffffu) > 0x7f800000u;
    }
    uint16_t v;
    std::memcpy(&v, p, 2);
    return c.otype == DType::kFloat16 ? (v & 0x7fffu) > 0x7c00u : (v & 0x7fffu) > 0x7f80u;
  };
  auto is_poison = [&](const uint8_t* p) { return std::all_of(p, p + es, [](uint8_t v) { return v == kOutPoison; }); };
  for (size_t e = 0; e < o_bytes / es; ++e) {
    const uint8_t* g = got.data() + e * es;
    const uint8_t* r = ref.data() + e * es;
    if (std::memcmp(g, r, es) == 0) continue;
    if (!is_poison(r) && is_nan(g) && is_nan(r)) continue;
    FAIL() << "first mismatch at row " << int64_t(e) / c.ldo << " col " << int64_t(e) % c.ldo
           << (is_poison(r) ? " (stray write)" : "");
  }
  for (size_t b = (o_bytes / es) * es; b < o_bytes; ++b) ASSERT_EQ(got[b], ref[b]) << "guard byte " << b;
}

TEST_F(CudaGemmRows, MatchesReferenceBothKernels) {
  std::mt19937 rng(31);
  const RowCase cases[] = {
      {1, 33, 64, 64, 64, 33, DType::kFloat32},          {7, 300, 129, 144, 144, 300, DType::kBFloat16},
      {130, 257, 1000, 1008, 1008, 257, DType::kFloat16}, {300, 129, 4100, 4112, 4112, 130, DType::kBFloat16},
      {257, 70, 33, 33, 35, 71, DType::kFloat32},         // unaligned strides: mma.sync byte-load path
      {9, 5, 0, 16, 16, 5, DType::kBFloat16},             // K == 0: the fill kernel
  };
  for (const char* kernel : {"mma", "auto"})
    for (const RowCase& c : cases) {
      run_rows_case(c, kernel, rng, stream());
      if (HasFatalFailure()) return;
    }
}

// A null row_scale is exactly gemm_s8_scaled.
TEST_F(CudaGemmRows, NullRowScaleIsPlainGemm) {
  const int64_t M = 65, N = 130, K = 96;
  std::mt19937 rng(32);
  std::vector<int8_t> ha = random_bytes(size_t(M * K), rng), hb = random_bytes(size_t(N * K), rng);
  GemmOperands d(ha.size(), hb.size(), size_t(M * N) * 4);
  ASSERT_TRUE(d.ok());
  upload(d, ha, hb, 1e-3f);
  if (HasFatalFailure()) return;
  DeviceBuffer out2(size_t(M * N) * 4);
  ASSERT_TRUE(out2.ok());
  ASSERT_TRUE(lowbit::cuda::gemm_s8_scaled_rows(d.A(), K, d.B(), K, M, N, K, d.alpha_ptr(), nullptr, DType::kFloat32,
                                                d.out.bytes(), N, stream())
                  .is_ok());
  ASSERT_TRUE(lowbit::cuda::gemm_s8_scaled(d.A(), K, d.B(), K, M, N, K, d.alpha_ptr(), DType::kFloat32, out2.bytes(),
                                           N, stream())
                  .is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<uint8_t> a(size_t(M * N) * 4), b(a.size());
  CUDA_ASSERT(cudaMemcpy(a.data(), d.out.bytes(), a.size(), cudaMemcpyDeviceToHost));
  CUDA_ASSERT(cudaMemcpy(b.data(), out2.bytes(), b.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size()), 0);
}

}  // namespace
