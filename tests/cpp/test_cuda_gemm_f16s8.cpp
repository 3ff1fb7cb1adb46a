// The 16-bit float x int8-code GEMM (gemm_f16s8, gemm_f16s8_sm90.cu) against a float64 reference written
// from its definition: out[i, k] = alpha * sum_r G[i, r] * q[r, k], rounded once to otype.
//
// Tolerance (documented in gemm_f16s8.h): every product is exact in fp32 and the sum is fp32, so the
// error is bounded by a few fp32 ulps of the sum of |terms| (2^-20 of it is used, R up to ~2000 here),
// plus half an ulp of otype for the final rounding (2^-8 relative for bf16, 2^-11 for fp16, none for
// fp32 beyond the accumulation). Skipped unless the device is compute capability 9.0. Cases: tails of
// the 256 x 128 tile and of the 64-element stage, one-element sizes, padded strides, out strides that
// turn the pair stores off, every (G dtype, out dtype) pair, alpha null / set, R = 0 (zeros), repeated
// runs (determinism), bad arguments. The whole output buffer is poisoned before each run (stray writes
// outside the (M, K) window show as changed poison).
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/gemm_f16s8.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using namespace lowbit_test;

class CudaGemmF16S8 : public CudaSm90Test {};

constexpr uint8_t kPoison = 0x7B;

struct Case {
  int64_t M, R, K, ldg, ldq, ldo;
  DType gtype, otype;
  bool with_alpha;
  bool trans = false;  // G stored (R, M), ldg >= M
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " R=" << R << " K=" << K << " ldg=" << ldg << " ldq=" << ldq << " ldo=" << ldo
       << " G=" << lowbit::dtype_name(gtype) << " out=" << lowbit::dtype_name(otype) << " alpha=" << with_alpha << " trans_g=" << trans;
    return os.str();
  }
};

uint16_t to_bits(float v, DType t) {
  if (t == DType::kFloat16) {
    const __half h = __float2half_rn(v);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
double from_bits(uint16_t b, DType t) {
  if (t == DType::kFloat16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return double(__half2float(h));
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &b, 2);
  return double(__bfloat162float(h));
}
size_t osize(DType t) { return t == DType::kFloat32 ? 4 : 2; }
double read_out(const std::vector<uint8_t>& o, size_t idx, DType t) {
  if (t == DType::kFloat32) {
    float v;
    std::memcpy(&v, o.data() + 4 * idx, 4);
    return double(v);
  }
  uint16_t b;
  std::memcpy(&b, o.data() + 2 * idx, 2);
  return from_bits(b, t);
}

// Runs the case `runs` times on poisoned output; returns the bytes of the first run, checks the others
// match them (determinism).
void run_case(const Case& c, CUstream_st* stream, std::mt19937& rng) {
  SCOPED_TRACE(c.str());
  std::uniform_real_distribution<float> ug(-2.f, 2.f);
  std::uniform_int_distribution<int> uq(-128, 127);
  std::vector<uint16_t> hg(size_t(std::max<int64_t>((c.trans ? c.R : c.M) * c.ldg, 1)));
  for (auto& v : hg) v = to_bits(ug(rng), c.gtype);
  std::vector<int8_t> hq(size_t(std::max<int64_t>(c.R * c.ldq, 1)));
  for (auto& v : hq) v = int8_t(uq(rng));
  const float alpha = 0.3711f;
  const size_t o_bytes = size_t(std::max<int64_t>(c.M * c.ldo, 1)) * osize(c.otype);
  DeviceBuffer dg(hg.size() * 2), dq(hq.size()), da(4), dout(o_bytes);
  ASSERT_TRUE(dg.ok() && dq.ok() && da.ok() && dout.ok());
  CUDA_ASSERT(cudaMemcpy(dg.bytes(), hg.data(), hg.size() * 2, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dq.bytes(), hq.data(), hq.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(da.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  const float* al = c.with_alpha ? reinterpret_cast<const float*>(da.bytes()) : nullptr;
  std::vector<uint8_t> first;
  for (int run = 0; run < 2; ++run) {
    CUDA_ASSERT(cudaMemset(dout.bytes(), kPoison, o_bytes));
    const Status st = lowbit::cuda::gemm_f16s8(c.gtype, dg.bytes(), c.ldg, c.trans, dq.data(), c.ldq, c.M, c.R, c.K,
                                              al, c.otype, dout.bytes(), c.ldo, stream);
    ASSERT_TRUE(st.is_ok()) << st.message;
    CUDA_ASSERT(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
    std::vector<uint8_t> got(o_bytes);
    CUDA_ASSERT(cudaMemcpy(got.data(), dout.bytes(), o_bytes, cudaMemcpyDeviceToHost));
    if (run == 0) {
      first = got;
    } else {
      ASSERT_EQ(std::memcmp(first.data(), got.data(), o_bytes), 0) << "two runs gave different bits";
    }
  }
  const double a = c.with_alpha ? double(alpha) : 1.0;
  const double rel_out = c.otype == DType::kFloat32 ? 0.0 : (c.otype == DType::kBFloat16 ? 0x1p-8 : 0x1p-11);
  int64_t bad = 0;
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t k = 0; k < c.ldo; ++k) {
      const size_t idx = size_t(i * c.ldo + k);
      if (k >= c.K) {  // padding: poison untouched
        for (size_t b = 0; b < osize(c.otype); ++b) {
          if (first[idx * osize(c.otype) + b] != kPoison && bad++ < 5)
            ADD_FAILURE() << "wrote padding at row " << i << " col " << k;
        }
        continue;
      }
      double sum = 0.0, mag = 0.0;
      for (int64_t r = 0; r < c.R; ++r) {
        const size_t gi = c.trans ? size_t(r * c.ldg + i) : size_t(i * c.ldg + r);
        const double term = from_bits(hg[gi], c.gtype) * double(hq[size_t(r * c.ldq + k)]);
        sum += term;
        mag += std::fabs(term);
      }
      // The kernel multiplies its fp32 sum by the fp32 alpha.
      const double ref = sum * a;
      const double tol = 0x1p-20 * mag * a + rel_out * std::fabs(ref) + 1e-30;
      const double got = read_out(first, idx, c.otype);
      if (!(std::fabs(got - ref) <= tol) && bad++ < 5)
        ADD_FAILURE() << "out[" << i << "][" << k << "] = " << got << ", reference " << ref << " (tol " << tol << ")";
    }
  }
  EXPECT_EQ(bad, 0);
}

int64_t up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

TEST_F(CudaGemmF16S8, MatchesFloat64ReferenceOddShapes) {
  std::mt19937 rng(20261122);
  struct Shape { int64_t M, R, K; };
  const Shape shapes[] = {{1, 1, 1},     {300, 200, 333}, {257, 64, 128}, {5, 1000, 17},
                          {513, 77, 260}, {256, 129, 127}, {31, 2001, 48}};
  const DType gts[] = {DType::kBFloat16, DType::kFloat16};
  int n = 0;
  for (const auto& s : shapes) {
    for (DType gt : gts) {
      for (int o = 0; o < 2; ++o) {
        const DType ot = o == 0 ? gt : DType::kFloat32;
        // Strides: tight (rounded to TMA's 16 bytes) or padded; an odd ldo turns the pair stores off.
        const bool pad = (n % 3) == 1, odd_ldo = (n % 4) == 2;
        for (int tr = 0; tr < 2; ++tr) {
          const int64_t g_cols = tr ? s.M : s.R;
          Case c{s.M, s.R, s.K, up(g_cols, 8) + (pad ? 8 : 0), up(s.K, 16) + (pad ? 32 : 0),
                 s.K + (odd_ldo ? 1 : 5), gt, ot, (n % 2) == 0, tr == 1};
          run_case(c, stream(), rng);
          if (HasFatalFailure()) return;
        }
        ++n;
      }
    }
  }
}

TEST_F(CudaGemmF16S8, MultiTileAndEmptySum) {
  std::mt19937 rng(7);
  run_case(Case{777, 640, 515, 640, 528, 515 + 3, DType::kBFloat16, DType::kBFloat16, true}, stream(), rng);
  if (HasFatalFailure()) return;
  run_case(Case{1030, 300, 1100, 304, 1104, 1100, DType::kFloat16, DType::kFloat32, false}, stream(), rng);
  if (HasFatalFailure()) return;
  // Transposed G (the weight-gradient form): several tiles each way, tails in all three sizes.
  run_case(Case{600, 700, 300, 600, 304, 301, DType::kBFloat16, DType::kFloat32, true, true}, stream(), rng);
  if (HasFatalFailure()) return;
  run_case(Case{513, 130, 260, 520, 272, 260, DType::kFloat16, DType::kFloat16, false, true}, stream(), rng);
  if (HasFatalFailure()) return;
  // R = 0: every output is zero, padding untouched.
  const int64_t M = 9, K = 21, ldo = 24;
  DeviceBuffer dout(size_t(M * ldo) * 4), dg(16), dq(16);
  ASSERT_TRUE(dout.ok() && dg.ok() && dq.ok());
  CUDA_ASSERT(cudaMemset(dout.bytes(), kPoison, size_t(M * ldo) * 4));
  const Status st = lowbit::cuda::gemm_f16s8(DType::kFloat16, dg.bytes(), 8, false, dq.data(), 32, M, 0, K, nullptr,
                                            DType::kFloat32, dout.bytes(), ldo, stream());
  ASSERT_TRUE(st.is_ok()) << st.message;
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<float> got(size_t(M * ldo));
  CUDA_ASSERT(cudaMemcpy(got.data(), dout.bytes(), got.size() * 4, cudaMemcpyDeviceToHost));
  uint32_t poison_word;
  std::memset(&poison_word, kPoison, 4);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < ldo; ++k) {
      uint32_t bits;
      std::memcpy(&bits, &got[size_t(i * ldo + k)], 4);
      if (k < K) {
        EXPECT_EQ(bits, 0u) << i << "," << k;
      } else {
        EXPECT_EQ(bits, poison_word) << i << "," << k;
      }
    }
  }
}

TEST_F(CudaGemmF16S8, BadArguments) {
  DeviceBuffer dg(4096), dq(4096), dout(4096);
  ASSERT_TRUE(dg.ok() && dq.ok() && dout.ok());
  auto call = [&](DType gt, int64_t ldg, bool tg, int64_t ldq, int64_t M, int64_t R, int64_t K, DType ot,
                  int64_t ldo, void* out = nullptr, const void* g = nullptr) {
    return lowbit::cuda::gemm_f16s8(gt, g ? g : dg.bytes(), ldg, tg, dq.data(), ldq, M, R, K, nullptr, ot,
                                    out ? out : dout.bytes(), ldo, stream());
  };
  auto expect_invalid = [](const Status& st, const char* needle) {
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message.find(needle), std::string::npos) << st.message;
    EXPECT_NE(st.message.find("lowbit::cuda::gemm_f16s8"), std::string::npos) << st.message;
  };
  expect_invalid(call(DType::kFloat32, 16, false, 16, 4, 4, 4, DType::kFloat32, 4), "G must be float16 or bfloat16");
  expect_invalid(call(DType::kFloat16, 16, false, 16, 4, 4, 4, DType::kBFloat16, 4), "otype must be float32");
  expect_invalid(call(DType::kFloat16, 16, false, 16, -1, 4, 4, DType::kFloat16, 4), "M must be >= 0");
  expect_invalid(call(DType::kFloat16, 3, false, 16, 4, 4, 4, DType::kFloat16, 4), "ldg must be >= R");
  expect_invalid(call(DType::kFloat16, 16, false, 3, 4, 4, 4, DType::kFloat16, 4), "ldq must be >= K");
  expect_invalid(call(DType::kFloat16, 16, false, 16, 4, 4, 4, DType::kFloat16, 3), "ldo must be >= K");
  // Calls the kernel cannot take: a clear error, nothing launched.
  expect_invalid(call(DType::kFloat16, 3, true, 16, 4, 4, 4, DType::kFloat16, 4), "ldg must be >= M");
  expect_invalid(call(DType::kFloat16, 12, false, 16, 4, 4, 4, DType::kFloat16, 4), "cannot run on the sm_90a kernel");
  expect_invalid(call(DType::kFloat16, 16, false, 16, 4, 4, 4, DType::kFloat16, 4, nullptr, dg.bytes() + 2),
                 "cannot run on the sm_90a kernel");
  const Status null_out = lowbit::cuda::gemm_f16s8(DType::kFloat16, dg.bytes(), 16, false, dq.data(), 16, 4, 4, 4,
                                                   nullptr, DType::kFloat16, nullptr, 4, stream());
  expect_invalid(null_out, "out is null");
  // M == 0 / K == 0: nothing to do, fine with null pointers.
  EXPECT_TRUE(lowbit::cuda::gemm_f16s8(DType::kBFloat16, nullptr, 16, false, nullptr, 16, 0, 4, 4, nullptr,
                                       DType::kBFloat16, nullptr, 4, stream())
                  .is_ok());
}

// Not a test of speed (bench/ is): prints the kernel's rate at the Q8Linear backward's shapes.
TEST_F(CudaGemmF16S8, PerfReport) {
  struct Shape { int64_t M, R, K; };
  const Shape shapes[] = {{8192, 4096, 4096}, {8192, 8192, 8192}, {2048, 8192, 8192}};
  const size_t max_g = size_t(8192) * 8192 * 2, max_q = size_t(8192) * 8192, max_out = size_t(8192) * 8192 * 2;
  DeviceBuffer dg(max_g), dq(max_q), dout(max_out);
  ASSERT_TRUE(dg.ok() && dq.ok() && dout.ok());
  {
    std::vector<uint8_t> h = xorshift_bytes(max_q);
    CUDA_ASSERT(cudaMemcpy(dq.bytes(), h.data(), max_q, cudaMemcpyHostToDevice));
    std::vector<uint16_t> g(max_g / 2);
    for (size_t i = 0; i < g.size(); ++i) g[i] = to_bits(float(int(h[i % max_q]) - 128) / 128.f, DType::kBFloat16);
    CUDA_ASSERT(cudaMemcpy(dg.bytes(), g.data(), max_g, cudaMemcpyHostToDevice));
  }
  for (const auto& s : shapes) {
    for (int tr = 0; tr < 2; ++tr) {
      const double ms = median_ms(stream_, [&] {
        return lowbit::cuda::gemm_f16s8(DType::kBFloat16, dg.bytes(), tr ? s.M : s.R, tr == 1, dq.data(), s.K, s.M,
                                        s.R, s.K, nullptr, DType::kBFloat16, dout.bytes(), s.K, stream());
      });
      const double flops = 2.0 * double(s.M) * double(s.R) * double(s.K);
      std::printf("[perf] gemm_f16s8 M=%lld R=%lld K=%lld bf16%s: %.1f us (%.0f TFLOP/s)\n", (long long)s.M,
                  (long long)s.R, (long long)s.K, tr ? " trans_g" : "", ms * 1e3, flops / (ms * 1e-3) / 1e12);
    }
  }
}

}  // namespace
