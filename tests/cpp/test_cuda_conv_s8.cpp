// CUDA implicit-GEMM convolution of int8 NHWC codes (cuda::conv2d_s8_nhwc) against the convolution
// written from its definition: the int32 sum over taps and channels formed in int64 on the host (exact),
// then the GEMM epilogue's rounding (int -> fp32 nearest even, one fp32 multiply by alpha, -> dtype nearest
// even). Bitwise: every byte of a poisoned output buffer, row padding included (never written), and the
// same bits on a second run.
//
// Cases: strides, padding wider than the kernel's reach (rows of pure padding), dilation, rectangular
// kernels, a channel group in the middle of C, Cg = 16 (several taps per 64-byte k-tile) up to Cg = 64 with
// K = 1600 (sums past 2^24, where the fp32 conversion rounds), out-channel counts past one 128 tile and
// odd ones, odd row strides of out, all three output dtypes. Argument errors are checked without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/conv_s8.h"
#include "lowbit/kernels/float_convert.h"

#include "cuda_test_util.h"
#include "test_util.h"

namespace {

using lowbit::Conv2dShape;
using lowbit::DType;
using lowbit::Status;

using namespace lowbit_test;

class CudaConvS8 : public CudaStreamTest {};

struct ConvCase {
  DType dtype;
  Conv2dShape s;
  int64_t c0, Cg, Og, ldo;
  int lo, hi;  // code range
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(dtype) << " N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " k=" << s.kh
       << "x" << s.kw << " stride=" << s.sh << "," << s.sw << " pad=" << s.ph << "," << s.pw << " dil=" << s.dh << ","
       << s.dw << " c0=" << c0 << " Cg=" << Cg << " Og=" << Og << " ldo=" << ldo << " codes=[" << lo << "," << hi << "]";
    return os.str();
  }
};

void run_case(const ConvCase& c, std::mt19937& rng, CUstream_st* stream) {
  SCOPED_TRACE(c.str());
  const Conv2dShape& s = c.s;
  const int64_t Ho = s.out_h(), Wo = s.out_w(), rows = s.N * Ho * Wo, K = s.kh * s.kw * c.Cg;
  std::uniform_int_distribution<int> code(c.lo, c.hi);
  std::vector<int8_t> hx(size_t(s.N * s.H * s.W * s.C)), hw(size_t(c.Og * K));
  for (auto& v : hx) v = static_cast<int8_t>(code(rng));
  for (auto& v : hw) v = static_cast<int8_t>(code(rng));
  const float alpha = 0.0123f;
  const size_t es = dtype_size(c.dtype), out_bytes = size_t(rows * c.ldo) * es;

  // Reference, from the definition.
  std::vector<uint8_t> want(out_bytes, kOutPoison);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t p = 0; p < Ho; ++p)
      for (int64_t q = 0; q < Wo; ++q)
        for (int64_t o = 0; o < c.Og; ++o) {
          int64_t acc = 0;
          for (int64_t a = 0; a < s.kh; ++a)
            for (int64_t b = 0; b < s.kw; ++b) {
              const int64_t ih = p * s.sh - s.ph + a * s.dh, iw = q * s.sw - s.pw + b * s.dw;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
              for (int64_t ch = 0; ch < c.Cg; ++ch)
                acc += int64_t(hx[size_t(((n * s.H + ih) * s.W + iw) * s.C + c.c0 + ch)]) *
                       int64_t(hw[size_t(o * K + (a * s.kw + b) * c.Cg + ch)]);
            }
          const float v = static_cast<float>(acc) * alpha;
          const size_t at = size_t(((n * Ho + p) * Wo + q) * c.ldo + o) * es;
          if (c.dtype == DType::kFloat32) {
            std::memcpy(&want[at], &v, 4);
          } else {
            const uint16_t h = c.dtype == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
            std::memcpy(&want[at], &h, 2);
          }
        }

  DeviceBuffer dx(hx.size()), dw(hw.size()), da(4), dout(out_bytes);
  ASSERT_TRUE(dx.ok() && dw.ok() && da.ok() && dout.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dw.bytes(), hw.data(), hw.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(da.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  ASSERT_TRUE(lowbit::cuda::conv2d_s8_nhwc_supported(dx.data(), s, c.c0, c.Cg, dw.data()));
  std::vector<uint8_t> got;
  run_on_poisoned(dout, kOutPoison, reinterpret_cast<cudaStream_t>(stream),
                  [&] {
                    return lowbit::cuda::conv2d_s8_nhwc(dx.data(), s, c.c0, c.Cg, dw.data(), c.Og,
                                                        reinterpret_cast<const float*>(da.bytes()), c.dtype,
                                                        dout.bytes(), c.ldo, stream);
                  },
                  &got, 2);
  if (::testing::Test::HasFatalFailure()) return;
  for (size_t i = 0; i < out_bytes; ++i)
    ASSERT_EQ(int(got[i]), int(want[i])) << "output byte " << i << " (element " << i / es << ")";
}

Conv2dShape shape(int64_t N, int64_t H, int64_t W, int64_t C, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                  int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  return {N, H, W, C, kh, kw, sh, sw, ph, pw, dh, dw};
}

TEST_F(CudaConvS8, MatchesDefinition) {
  std::mt19937 rng(20261122);
  const std::vector<ConvCase> cases = {
      {DType::kBFloat16, shape(2, 9, 11, 32, 3, 3, 1, 1, 1, 1, 1, 1), 0, 32, 20, 20, -8, 7},
      {DType::kFloat16, shape(1, 7, 5, 48, 3, 2, 2, 1, 0, 1, 1, 2), 16, 16, 130, 133, -8, 7},
      {DType::kFloat32, shape(3, 13, 12, 64, 5, 5, 2, 2, 2, 2, 1, 1), 0, 64, 64, 64, -128, 127},
      {DType::kBFloat16, shape(1, 10, 10, 16, 3, 3, 1, 1, 1, 1, 1, 1), 0, 16, 8, 9, -8, 7},
      {DType::kBFloat16, shape(2, 30, 30, 32, 3, 3, 1, 1, 1, 1, 1, 1), 0, 32, 64, 64, -8, 7},
      {DType::kFloat16, shape(1, 15, 17, 32, 3, 3, 1, 2, 3, 3, 2, 3), 0, 32, 17, 17, -8, 7},
      {DType::kFloat32, shape(1, 4, 4, 16, 3, 3, 1, 1, 2, 2, 1, 1), 0, 16, 3, 5, -128, 127},
      {DType::kBFloat16, shape(2, 6, 7, 96, 1, 3, 1, 1, 0, 1, 1, 1), 32, 48, 40, 96, -8, 7},
  };
  for (const auto& c : cases) {
    run_case(c, rng, stream());
    if (HasFatalFailure()) return;
  }
}

TEST(ConvS8Args, BadArgumentsAreRefused) {
  // Validation runs before any device work: no GPU needed.
  alignas(16) static int8_t buf[4096] = {};
  const float* alpha = reinterpret_cast<const float*>(buf);
  const Conv2dShape ok = shape(1, 4, 4, 32, 3, 3, 1, 1, 1, 1, 1, 1);
  auto call = [&](const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w, int64_t Og,
                  int64_t ldo, const float* a, void* out) {
    return lowbit::cuda::conv2d_s8_nhwc(x, s, c0, Cg, w, Og, a, DType::kFloat32, out, ldo, nullptr);
  };
  expect_invalid(call(buf, ok, 0, 32, nullptr, 8, 8, alpha, buf), "null w", "w is null");
  expect_invalid(call(nullptr, ok, 0, 32, buf, 8, 8, alpha, buf), "null x", "x is null");
  expect_invalid(call(buf, ok, 0, 32, buf, 0, 8, alpha, buf), "Og = 0", "Og");
  expect_invalid(call(buf, ok, 0, 32, buf, 8, 7, alpha, buf), "ldo < Og", "ldo");
  expect_invalid(call(buf, ok, 0, 32, buf, 8, 8, nullptr, buf), "null alpha", "alpha");
  expect_invalid(call(buf, ok, 0, 32, buf, 8, 8, alpha, nullptr), "null out", "out");
  expect_invalid(call(buf, ok, 16, 32, buf, 8, 8, alpha, buf), "c0 + Cg > C", "c0 + Cg");
  expect_invalid(call(buf, shape(1, 4, 4, 24, 3, 3, 1, 1, 1, 1, 1, 1), 0, 24, buf, 8, 8, alpha, buf), "C = 24",
                 "multiples of 16");
  expect_invalid(call(buf + 1, ok, 0, 32, buf, 8, 8, alpha, buf), "misaligned x", "16-byte aligned");
  expect_invalid(call(buf, shape(1, 2, 2, 32, 5, 5, 1, 1, 0, 0, 1, 1), 0, 32, buf, 8, 8, alpha, buf),
                 "kernel larger than the input", "larger than the padded input");
  EXPECT_TRUE(lowbit::cuda::conv2d_s8_nhwc_supported(buf, ok, 0, 32, buf));
  EXPECT_FALSE(lowbit::cuda::conv2d_s8_nhwc_supported(buf, ok, 8, 16, buf));
  EXPECT_FALSE(lowbit::cuda::conv2d_s8_nhwc_supported(buf, ok, 0, 32, buf + 8));
  // Preferred: never where unsupported or without output channels; always at <= 128 output channels.
  EXPECT_TRUE(lowbit::cuda::conv2d_s8_nhwc_preferred(buf, ok, 0, 32, buf, 128));
  EXPECT_FALSE(lowbit::cuda::conv2d_s8_nhwc_preferred(buf, ok, 8, 16, buf, 64));
  EXPECT_FALSE(lowbit::cuda::conv2d_s8_nhwc_preferred(buf, ok, 0, 32, buf, 0));
}

}  // namespace
