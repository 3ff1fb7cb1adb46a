// CUDA quantize-on-load batched matmul (cuda::qmatmul_s8, both kernels) against the scalar CPU references it is defined
// by: quantize_s8_ref of every batch's x and y (step qat_step(scale, eps)), then gemm_s8_scaled_batched_ref
// with alpha = qat_alpha_value. Bitwise: the output buffer (poisoned, padding and batch gaps included) and
// the code buffers, every byte.
//
// Inputs draw the quantizer's hard cases (ties, clamps, +-inf, NaN, subnormals, signed zeros) and leave
// garbage (NaN, huge values) in row padding the kernel must not read. Cases cover both loaders (vector:
// K % 8 == 0 and aligned rows; scalar: anything else), K from 1 to kQMatmulMaxK (padding to 32, several
// k-steps), M and N tails of the tiles, several y chunks and y groups per batch, several x blocks,
// broadcast operands (batch stride 0),
// odd output strides, all three dtypes for data and for the scalars, a step outside StepDiv's fast range,
// and an invalid step (NaN alpha). Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/qmatmul.h"
#include "lowbit/kernels/quantize.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;

using namespace lowbit_test;

class CudaQMatmul : public CudaStreamTest {};

struct QmCase {
  DType dtype;
  int64_t M, N, K, batch;
  int64_t ldx, ldy, ldo;
  int64_t sX, sY, sO;  // batch strides in elements (0: broadcast)
  size_t x_off;        // elements the x base is moved by (an odd one breaks the vector loader's alignment)
  DType sdtype;        // dtype of the three scalars
  float sx, sy, eps;   // scalar values (rounded to sdtype)
  int qmin, qmax;
  bool codes;          // also write qx / qy
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(dtype) << " M=" << M << " N=" << N << " K=" << K << " batch=" << batch << " ldx=" << ldx
       << " ldy=" << ldy << " ldo=" << ldo << " sX=" << sX << " sY=" << sY << " sO=" << sO << " x_off=" << x_off
       << " scalars=" << lowbit::dtype_name(sdtype) << " (" << sx << ", " << sy << ", " << eps << ") q=[" << qmin
       << "," << qmax << "] codes=" << codes;
    return os.str();
  }
};

// fp32 value -> its storage bits in dtype t at byte offset `at` of buf; returns the value as stored.
float put(std::vector<uint8_t>& buf, size_t at, DType t, float v) {
  if (t == DType::kFloat32) {
    std::memcpy(&buf[at], &v, 4);
    return v;
  }
  const uint16_t h = t == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
  std::memcpy(&buf[at], &h, 2);
  return t == DType::kFloat16 ? lowbit::half_to_float(h) : lowbit::bf16_to_float(h);
}

// The quantizer's hard cases around a step s (as the quantize_s8 test draws them).
float draw(std::mt19937& rng, float s) {
  std::uniform_int_distribution<int> kind(0, 99);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int k = kind(rng);
  if (k < 70) return normal(rng) * 4.f * s;                                                         // in range
  if (k < 85) return (float(std::uniform_int_distribution<int>(-10, 10)(rng)) + 0.5f) * s;            // ties
  if (k < 91) return normal(rng) * 1e3f * s;                                                         // clamps
  if (k < 93) return std::numeric_limits<float>::infinity() * (k == 91 ? 1.f : -1.f);
  if (k < 95) return std::numeric_limits<float>::quiet_NaN();
  if (k < 97) return std::numeric_limits<float>::denorm_min() * float(std::uniform_int_distribution<int>(1, 99)(rng));
  return -0.0f;
}

size_t span(int64_t batch, int64_t stride, int64_t rows, int64_t ld) {
  return size_t((batch - 1) * stride + rows * ld);
}

void run_case(const QmCase& c, std::mt19937& rng, CUstream_st* stream) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.dtype);
  const size_t ss = dtype_size(c.sdtype);
  std::vector<uint8_t> hs(3 * ss);
  const float sx = put(hs, 0, c.sdtype, c.sx), sy = put(hs, ss, c.sdtype, c.sy), e = put(hs, 2 * ss, c.sdtype, c.eps);
  const float step_x = lowbit::qat_step(sx, e), step_y = lowbit::qat_step(sy, e);
  const float alpha = lowbit::qat_alpha_value(sx, sy, e);

  // Operands: every element of the buffers written (padding and gaps: garbage the kernel must not use).
  auto fill = [&](size_t elems, size_t off, int64_t rows, int64_t ld, int64_t stride, float step) {
    std::vector<uint8_t> h((off + elems) * es);
    for (size_t i = 0; i < off + elems; ++i) put(h, i * es, c.dtype, (i % 3) ? std::nanf("") : 1e30f);
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < c.K; ++k) put(h, (off + b * stride + r * ld + k) * es, c.dtype, draw(rng, step));
    return h;
  };
  const size_t x_elems = span(c.batch, c.sX, c.M, c.ldx), y_elems = span(c.batch, c.sY, c.N, c.ldy);
  const std::vector<uint8_t> hx = fill(x_elems, c.x_off, c.M, c.ldx, c.sX, step_x);
  const std::vector<uint8_t> hy = fill(y_elems, 0, c.N, c.ldy, c.sY, step_y);
  const size_t out_bytes = span(c.batch, c.sO, c.M, c.ldo) * es + 64;
  const size_t qx_bytes = size_t(c.batch * c.M * c.K) + 16, qy_bytes = size_t(c.batch * c.N * c.K) + 16;

  DeviceBuffer dx(hx.size()), dy(hy.size()), dsc(hs.size()), dout(out_bytes), dqx(qx_bytes), dqy(qy_bytes);
  ASSERT_TRUE(dx.ok() && dy.ok() && dsc.ok() && dout.ok() && dqx.ok() && dqy.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dy.bytes(), hy.data(), hy.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dsc.bytes(), hs.data(), hs.size(), cudaMemcpyHostToDevice));
  constexpr uint8_t kPoison = 0xA5;
  CUDA_ASSERT(cudaMemset(dqx.bytes(), kPoison, qx_bytes));
  CUDA_ASSERT(cudaMemset(dqy.bytes(), kPoison, qy_bytes));

  std::vector<uint8_t> got;
  run_on_poisoned(dout, kOutPoison, reinterpret_cast<cudaStream_t>(stream), [&] {
    return lowbit::cuda::qmatmul_s8(c.dtype, dx.bytes() + c.x_off * es, c.ldx, c.sX, dy.bytes(), c.ldy, c.sY, c.M,
                                    c.N, c.K, c.batch, c.sdtype, dsc.bytes(), dsc.bytes() + ss, dsc.bytes() + 2 * ss,
                                    c.qmin, c.qmax, dout.bytes(), c.ldo, c.sO, c.codes ? dqx.data() : nullptr,
                                    c.codes ? dqy.data() : nullptr, stream);
  }, &got, /*runs=*/2);
  if (::testing::Test::HasFatalFailure()) return;

  // Reference: codes batch by batch, then the batched GEMM on contiguous codes.
  std::vector<int8_t> rqx(size_t(c.batch * c.M * c.K)), rqy(size_t(c.batch * c.N * c.K));
  for (int64_t b = 0; b < c.batch; ++b) {
    ASSERT_TRUE(lowbit::cpu::quantize_s8_ref(c.dtype, hx.data() + (c.x_off + b * c.sX) * es, c.M, c.K, c.ldx, nullptr,
                                             &step_x, c.qmin, c.qmax, rqx.data() + b * c.M * c.K)
                    .is_ok());
    ASSERT_TRUE(lowbit::cpu::quantize_s8_ref(c.dtype, hy.data() + b * c.sY * es, c.N, c.K, c.ldy, nullptr, &step_y,
                                             c.qmin, c.qmax, rqy.data() + b * c.N * c.K)
                    .is_ok());
  }
  std::vector<uint8_t> want(out_bytes, kOutPoison);
  ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_batched_ref(rqx.data(), c.K, c.M * c.K, rqy.data(), c.K, c.N * c.K, c.M, c.N,
                                                      c.K, c.batch, &alpha, c.dtype, want.data(), c.ldo, c.sO)
                  .is_ok());
  if (std::isnan(alpha)) {
    // An invalid step: every output is NaN (whose bit pattern is the device's own: the GPU's multiply
    // returns the canonical NaN, the CPU's the NaN operand), nothing outside the windows is written.
    auto value = [&](const std::vector<uint8_t>& v, size_t e) {
      if (c.dtype == DType::kFloat32) {
        float f;
        std::memcpy(&f, &v[e * 4], 4);
        return f;
      }
      uint16_t h;
      std::memcpy(&h, &v[e * 2], 2);
      return c.dtype == DType::kFloat16 ? lowbit::half_to_float(h) : lowbit::bf16_to_float(h);
    };
    for (size_t e = 0; e < out_bytes / es; ++e) {
      const bool in_window = !std::equal(want.begin() + e * es, want.begin() + (e + 1) * es, std::vector<uint8_t>(es, kOutPoison).begin());
      if (in_window) ASSERT_TRUE(std::isnan(value(got, e))) << "element " << e << " is not NaN";
      else ASSERT_TRUE(std::equal(got.begin() + e * es, got.begin() + (e + 1) * es, want.begin() + e * es)) << "element " << e << " written";
    }
  } else {
    for (size_t i = 0; i < out_bytes; ++i)
      ASSERT_EQ(got[i], want[i]) << "output byte " << i << " (element " << i / es << ") differs";
  }

  std::vector<uint8_t> gqx(qx_bytes), gqy(qy_bytes);
  CUDA_ASSERT(cudaMemcpy(gqx.data(), dqx.bytes(), qx_bytes, cudaMemcpyDeviceToHost));
  CUDA_ASSERT(cudaMemcpy(gqy.data(), dqy.bytes(), qy_bytes, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < qx_bytes; ++i)
    ASSERT_EQ(int(gqx[i]), c.codes && i < rqx.size() ? int(uint8_t(rqx[i])) : int(kPoison)) << "qx byte " << i;
  for (size_t i = 0; i < qy_bytes; ++i)
    ASSERT_EQ(int(gqy[i]), c.codes && i < rqy.size() ? int(uint8_t(rqy[i])) : int(kPoison)) << "qy byte " << i;
}

QmCase plain(DType t, int64_t M, int64_t N, int64_t K, int64_t batch) {
  return {t, M, N, K, batch, K, K, N, M * K, N * K, M * N, 0, t, 0.05f, 0.02f, 1e-5f, -8, 7, true};
}

TEST_F(CudaQMatmul, MatchesReference) {
  std::mt19937 rng(20261122);
  std::vector<QmCase> cases;
  for (DType t : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    cases.push_back(plain(t, 1, 1, 1, 1));                   // everything a tail, scalar loader
    cases.push_back(plain(t, 130, 257, 128, 3));             // M, N tails, three y chunks, vector loader
    cases.push_back(plain(t, 64, 96, 64, 2));
    cases.push_back(plain(t, 129, 40, 256, 2));              // K at the limit
    cases.push_back(plain(t, 37, 141, 72, 2));               // K % 32 != 0 (padded to 96), vector loader
    cases.push_back(plain(t, 45, 33, 13, 4));                // odd K: scalar loader
  }
  // y in several groups of rows per batch (K = 256: 384 rows per CTA; K = 200: 512), x in several blocks.
  cases.push_back(plain(DType::kBFloat16, 300, 800, 256, 2));
  {
    QmCase c = plain(DType::kFloat32, 520, 600, 200, 2);
    c.qmin = -128, c.qmax = 127;                             // |acc| up to K * 2^14
    cases.push_back(c);
  }
  // Several x blocks per CTA on the vector path: x tails, one y chunk or many, two y groups, K of 32 to 128.
  cases.push_back(plain(DType::kBFloat16, 700, 300, 128, 2));
  cases.push_back(plain(DType::kFloat16, 513, 1000, 64, 1));
  cases.push_back(plain(DType::kFloat32, 600, 129, 96, 2));
  cases.push_back(plain(DType::kBFloat16, 520, 2500, 32, 1));
  // 8-bit codes, no codes out, padded rows, odd output stride (no 16-byte stores), broadcast operands.
  {
    QmCase c = plain(DType::kBFloat16, 200, 150, 96, 3);
    c.qmin = -128, c.qmax = 127, c.sx = 0.5f, c.sy = 0.25f;
    c.codes = false;
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kFloat16, 150, 70, 40, 2);
    c.ldx = 48, c.ldy = 56, c.ldo = 77, c.sX = 150 * 48 + 8, c.sY = 70 * 56, c.sO = 150 * 77 + 3;
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kBFloat16, 100, 260, 64, 3);
    c.sX = 0;                                                // one x for every batch
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kFloat32, 140, 50, 32, 3);
    c.sY = 0, c.x_off = 1;                                   // one y for every batch; misaligned x: scalar loader
    cases.push_back(c);
  }
  // Scalars in other dtypes; a step clamped to eps; a step outside StepDiv's fast range; an invalid step.
  {
    QmCase c = plain(DType::kBFloat16, 50, 60, 64, 2);
    c.sdtype = DType::kFloat16;
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kFloat16, 50, 60, 64, 2);
    c.sdtype = DType::kBFloat16, c.sx = 0.f;                 // x's step is eps
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kFloat32, 40, 30, 64, 2);
    c.sx = 3e-10f, c.eps = 1e-12f;                           // below 2^-30: the exact division path
    cases.push_back(c);
  }
  {
    QmCase c = plain(DType::kBFloat16, 20, 30, 32, 1);
    c.sy = std::numeric_limits<float>::quiet_NaN();          // invalid step: NaN alpha, NaN outputs
    cases.push_back(c);
  }
  // Both kernels: the mma.sync one (every architecture) and, on an sm_90a build on a 9.0 device, the
  // wgmma one ("auto" picks it there; elsewhere "auto" is the mma.sync kernel again).
  for (const char* kernel : {"mma", "auto"}) {
    SCOPED_TRACE(kernel);
    ScopedKernel scoped(kernel);
    for (const auto& c : cases) {
      run_case(c, rng, stream());
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(CudaQMatmul, EmptyWritesNothing) {
  DeviceBuffer d(64);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.bytes(), 0x5A, 64));
  const float one = 1.f;
  DeviceBuffer s(4);
  CUDA_ASSERT(cudaMemcpy(s.bytes(), &one, 4, cudaMemcpyHostToDevice));
  for (int which = 0; which < 3; ++which) {
    const int64_t M = which == 0 ? 0 : 4, N = which == 1 ? 0 : 4, batch = which == 2 ? 0 : 1;
    const Status st = lowbit::cuda::qmatmul_s8(DType::kFloat32, d.bytes(), 8, 0, d.bytes(), 8, 0, M, N, 8, batch,
                                               DType::kFloat32, s.bytes(), s.bytes(), s.bytes(), -8, 7, d.bytes(), 4,
                                               16, nullptr, nullptr, stream());
    EXPECT_TRUE(st.is_ok()) << st.message;
  }
  expect_untouched(d, 64, 0x5A, stream_);
}

TEST(QMatmulArgs, BadArgumentsAreRefused) {
  // Validation runs before any device work: no GPU needed.
  uint8_t buf[64] = {};
  auto call = [&](DType t, int64_t K, int64_t ldx, int64_t ldo, int64_t batch, int64_t sO, int qmin, int qmax,
                  const void* scale) {
    return lowbit::cuda::qmatmul_s8(t, buf, ldx, 0, buf, ldx, 0, 2, 2, K, batch, DType::kFloat32, scale, scale, scale,
                                    qmin, qmax, buf, ldo, sO, nullptr, nullptr, nullptr);
  };
  expect_invalid(call(static_cast<DType>(7), 8, 8, 2, 1, 0, -8, 7, buf), "dtype", "dtype");
  expect_invalid(call(DType::kFloat32, 0, 8, 2, 1, 0, -8, 7, buf), "K = 0", "K must be in [1");
  expect_invalid(call(DType::kFloat32, 257, 257, 2, 1, 0, -8, 7, buf), "K > max", "K must be in [1");
  expect_invalid(call(DType::kFloat32, 8, 4, 2, 1, 0, -8, 7, buf), "ldx < K", "ldx");
  expect_invalid(call(DType::kFloat32, 8, 8, 1, 1, 0, -8, 7, buf), "ldo < N", "ldo");
  expect_invalid(call(DType::kFloat32, 8, 8, 2, 2, 0, -8, 7, buf), "strideO 0 with batches", "strideO");
  expect_invalid(call(DType::kFloat32, 8, 8, 2, 1, 0, 3, 2, buf), "qmin > qmax", "qmin");
  expect_invalid(call(DType::kFloat32, 8, 8, 2, 1, 0, -8, 7, nullptr), "null scalars", "x_scale");
}

}  // namespace
