// CUDA kernels vs. the scalar CPU references, bitwise.
//
// Every case: fresh random inputs (with padding columns filled with garbage the kernel must not read
// into results), outputs poisoned before the run, then (a) every in-bounds output equal bit for bit to
// the CPU reference, (b) every byte outside the logical output (row padding when ld > width, guard
// bytes before and after) still holding the poison. Odd sizes, odd strides and base pointers offset
// from 16-byte alignment drive the tail and fallback paths of the kernels.
// Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/quantize.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;

using namespace lowbit_test;

// Host float -> the storage bits of dtype t, appended to a byte vector at byte offset `at`.
void put_value(std::vector<uint8_t>& buf, size_t at, DType t, float v) {
  if (t == DType::kFloat32) {
    std::memcpy(&buf[at], &v, 4);
  } else {
    const uint16_t h = t == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
    std::memcpy(&buf[at], &h, 2);
  }
}

class CudaKernels : public CudaStreamTest {};

// ---------------------------------------------------------------------------------------------------
// quantize_s8

struct QuantCase {
  DType xtype;
  int64_t M, K, ldx;
  size_t x_off;        // elements the x base is moved by (breaks 16-byte alignment when odd)
  int shift_mode;      // 0: none, 1: shift aligned, 2: shift offset by one float
  size_t q_off;        // bytes the q base is moved by
  int32_t qmin, qmax;
  float scale;
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(xtype) << " M=" << M << " K=" << K << " ldx=" << ldx << " x_off=" << x_off
       << " shift=" << shift_mode << " q_off=" << q_off << " q=[" << qmin << "," << qmax << "] scale=" << scale;
    return os.str();
  }
};

// Inputs that exercise every branch of the contract: ordinary values, exact .5 ties (when the scale
// is a power of two), values far outside the code range, +-inf, NaN, subnormals, signed zeros.
float draw_input(std::mt19937& rng, float scale) {
  std::uniform_int_distribution<int> kind(0, 99);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int k = kind(rng);
  if (k < 60) return normal(rng) * 40.f * scale;                                    // mostly in range
  if (k < 80) return (float(std::uniform_int_distribution<int>(-140, 140)(rng)) + 0.5f) * scale;  // ties
  if (k < 88) return normal(rng) * 1e4f * scale;                                    // clamps
  if (k < 90) return std::numeric_limits<float>::infinity();
  if (k < 92) return -std::numeric_limits<float>::infinity();
  if (k < 94) return std::numeric_limits<float>::quiet_NaN();
  if (k < 96) return std::numeric_limits<float>::denorm_min() * float(std::uniform_int_distribution<int>(1, 99)(rng));
  if (k < 98) return -0.0f;
  return 3e38f * (k == 98 ? 1.f : -1.f);
}

void run_quant_case(const QuantCase& c, std::mt19937& rng, CUstream_st* stream) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.xtype);
  const size_t x_elems = c.x_off + size_t(c.M) * size_t(c.ldx);
  std::vector<uint8_t> hx(x_elems * es);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t k = 0; k < c.ldx; ++k) {
      // Padding columns get NaN / huge values: if the kernel read them into outputs, codes would differ.
      const float v = k < c.K ? draw_input(rng, c.scale) : (k % 2 ? std::nanf("") : 1e30f);
      put_value(hx, (c.x_off + size_t(i) * c.ldx + k) * es, c.xtype, v);
    }
  const size_t shift_off = c.shift_mode == 2 ? 1 : 0;
  std::vector<float> hshift(shift_off + size_t(c.K) + 1);
  for (auto& s : hshift)  // multiples of scale/16: x + shift stays exact often enough to keep ties
    s = float(std::uniform_int_distribution<int>(-64, 64)(rng)) * c.scale / 16.f;
  if (c.K > 3 && c.shift_mode != 0) hshift[shift_off + 3] = std::numeric_limits<float>::quiet_NaN();

  const size_t q_bytes = c.q_off + size_t(c.M) * size_t(c.K) + 32;
  constexpr uint8_t kPoison = 0xA5;

  DeviceBuffer dx(hx.size()), dshift(hshift.size() * 4), dscale(4), dq(q_bytes);
  ASSERT_TRUE(dx.ok() && dshift.ok() && dscale.ok() && dq.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dshift.bytes(), hshift.data(), hshift.size() * 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dscale.bytes(), &c.scale, 4, cudaMemcpyHostToDevice));

  const float* dshift_p = c.shift_mode == 0 ? nullptr : reinterpret_cast<const float*>(dshift.bytes()) + shift_off;
  std::vector<uint8_t> got;
  run_on_poisoned(dq, kPoison, reinterpret_cast<cudaStream_t>(stream), [&] {
    return lowbit::cuda::quantize_s8(c.xtype, dx.bytes() + c.x_off * es, c.M, c.K, c.ldx, dshift_p,
                                     reinterpret_cast<const float*>(dscale.bytes()), c.qmin, c.qmax,
                                     reinterpret_cast<int8_t*>(dq.bytes() + c.q_off), stream);
  }, &got);
  if (::testing::Test::HasFatalFailure()) return;

  std::vector<int8_t> ref(size_t(c.M) * size_t(c.K) + 1, 0);
  const Status rs = lowbit::cpu::quantize_s8_ref(c.xtype, hx.data() + c.x_off * es, c.M, c.K, c.ldx,
                                                 c.shift_mode == 0 ? nullptr : hshift.data() + shift_off, &c.scale,
                                                 c.qmin, c.qmax, ref.data());
  ASSERT_TRUE(rs.is_ok()) << "CPU reference failed: " << rs.message;

  for (size_t b = 0; b < c.q_off; ++b) ASSERT_EQ(got[b], kPoison) << "byte written before q at -" << (c.q_off - b);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t k = 0; k < c.K; ++k) {
      const size_t e = size_t(i) * c.K + k;
      ASSERT_EQ(int(int8_t(got[c.q_off + e])), int(ref[e])) << "code mismatch at (" << i << ", " << k << ")";
    }
  for (size_t b = c.q_off + size_t(c.M) * c.K; b < q_bytes; ++b)
    ASSERT_EQ(got[b], kPoison) << "byte written past q end at +" << (b - c.q_off - size_t(c.M) * c.K);
}

TEST_F(CudaKernels, QuantizeMatchesReference) {
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {1, 8}, {3, 17}, {17, 33}, {4, 64}, {127, 129}, {255, 1000}, {33, 4096}, {1000, 24}, {64, 1031}, {129, 256}};
  // (ldx padding, x offset in elements, shift mode, q offset, qmin, qmax, scale)
  struct Variant { int64_t ldx_pad; size_t x_off; int shift_mode; size_t q_off; int32_t qmin, qmax; float scale; };
  const std::vector<Variant> variants = {
      {0, 0, 0, 0, -128, 127, 0.125f},   // tight: vector path when K % 8 == 0
      {0, 0, 1, 0, -8, 7, 0.0371f},      // 4-bit range, shift
      {8, 0, 1, 0, -128, 127, 0.25f},    // padded rows, still 16-byte aligned
      {1, 0, 2, 0, -128, 127, 0.125f},   // odd ldx, misaligned shift: scalar path
      {0, 1, 1, 0, -128, 127, 1e-3f},    // misaligned x
      {8, 0, 0, 3, -8, 7, 7.0f},         // misaligned q
  };
  std::mt19937 rng(20240611);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (const auto& s : shapes)
      for (const auto& v : variants) {
        const QuantCase c{t, s.first, s.second, s.second + v.ldx_pad, v.x_off, v.shift_mode, v.q_off, v.qmin, v.qmax, v.scale};
        run_quant_case(c, rng, stream());
        if (HasFatalFailure()) return;
      }
}

TEST_F(CudaKernels, QuantizeLarge) {
  std::mt19937 rng(7);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    run_quant_case({t, 2048, 4096, 4096, 0, 1, 0, -128, 127, 0.0213f}, rng, stream());
    if (HasFatalFailure()) return;
  }
}

// qat_quantize: the codes and qat_prepare's vector of one launch equal, bit for bit, the CPU's (itself
// qat_prepare + quantize_s8, checked against the reference above), for every x dtype and shift dtype,
// aligned (vector path) and misaligned (scalar path) shifts, odd K, 16-bit steps; nothing written past
// either output.
TEST_F(CudaKernels, QatQuantizeMatchesCpu) {
  using lowbit::ScalarArg;
  std::mt19937 rng(77);
  const auto cs = reinterpret_cast<cudaStream_t>(stream());
  for (DType xt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int st : {-1, 0, 1, 2})  // shift dtype: none, fp32, fp16, bf16
      for (const auto& mk : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {5, 24}, {33, 131}, {64, 1032}})
        for (size_t shift_off : {size_t(0), size_t(1)}) {
          if (st < 0 && shift_off) continue;
          const int64_t M = mk.first, K = mk.second;
          const DType sdt = st < 0 ? DType::kFloat32 : static_cast<DType>(st);
          SCOPED_TRACE(std::string(lowbit::dtype_name(xt)) + " shift=" + std::to_string(st) + " M=" +
                       std::to_string(M) + " K=" + std::to_string(K) + " off=" + std::to_string(shift_off));
          const size_t xs = dtype_size(xt), ss = dtype_size(sdt);
          std::vector<uint8_t> hx(size_t(M * K) * xs), hs((size_t(K) + shift_off) * ss), hsc(3 * 4);
          for (int64_t e = 0; e < M * K; ++e) put_value(hx, size_t(e) * xs, xt, draw_input(rng, 0.03f));
          for (size_t k = 0; k < size_t(K) + shift_off; ++k)
            put_value(hs, k * ss, sdt, float(std::uniform_int_distribution<int>(-64, 64)(rng)) * 0.03f / 16.f);
          put_value(hsc, 0, DType::kBFloat16, 0.03f);  // scale1 (bf16)
          put_value(hsc, 4, DType::kFloat32, 0.002f);  // scale2 (fp32)
          put_value(hsc, 8, DType::kFloat16, 1e-5f);   // eps (fp16)
          const int64_t n = st < 0 ? 0 : K;
          std::vector<int8_t> want_q(size_t(M * K));
          std::vector<float> want_p(size_t(n) + lowbit::kQatPreparedScalars);
          auto args = [&](const uint8_t* x, const uint8_t* sh, const uint8_t* sc) {
            return std::make_tuple(ScalarArg{st < 0 ? nullptr : sh + shift_off * ss, sdt},
                                   ScalarArg{sc, DType::kBFloat16}, ScalarArg{sc + 4, DType::kFloat32},
                                   ScalarArg{sc + 8, DType::kFloat16});
          };
          const auto [hsh, hs1, hs2, he] = args(hx.data(), hs.data(), hsc.data());
          ASSERT_TRUE(lowbit::cpu::qat_quantize(xt, hx.data(), M, K, K, hsh, hs1, hs2, he, -128, 127, want_q.data(),
                                                want_p.data())
                          .is_ok());
          DeviceBuffer dx(hx.size()), dsh(hs.size()), dsc(hsc.size()), dq(want_q.size() + 16),
              dp(want_p.size() * 4 + 16);
          ASSERT_TRUE(dx.ok() && dsh.ok() && dsc.ok() && dq.ok() && dp.ok());
          CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
          CUDA_ASSERT(cudaMemcpy(dsh.bytes(), hs.data(), hs.size(), cudaMemcpyHostToDevice));
          CUDA_ASSERT(cudaMemcpy(dsc.bytes(), hsc.data(), hsc.size(), cudaMemcpyHostToDevice));
          CUDA_ASSERT(cudaMemset(dq.bytes(), 0xA5, dq.size()));
          CUDA_ASSERT(cudaMemset(dp.bytes(), 0xA5, dp.size()));
          const auto [dsh_a, ds1, ds2, de] = args(dx.bytes(), dsh.bytes(), dsc.bytes());
          const Status rs = lowbit::cuda::qat_quantize(xt, dx.bytes(), M, K, K, dsh_a, ds1, ds2, de, -128, 127,
                                                       reinterpret_cast<int8_t*>(dq.bytes()),
                                                       reinterpret_cast<float*>(dp.bytes()), stream());
          ASSERT_TRUE(rs.is_ok()) << rs.message;
          CUDA_ASSERT(cudaStreamSynchronize(cs));
          std::vector<uint8_t> got_q(dq.size()), got_p(dp.size());
          CUDA_ASSERT(cudaMemcpy(got_q.data(), dq.bytes(), got_q.size(), cudaMemcpyDeviceToHost));
          CUDA_ASSERT(cudaMemcpy(got_p.data(), dp.bytes(), got_p.size(), cudaMemcpyDeviceToHost));
          ASSERT_EQ(std::memcmp(got_q.data(), want_q.data(), want_q.size()), 0) << "codes differ";
          ASSERT_EQ(std::memcmp(got_p.data(), want_p.data(), want_p.size() * 4), 0) << "prepared differs";
          for (size_t b = want_q.size(); b < got_q.size(); ++b) ASSERT_EQ(got_q[b], 0xA5) << "q overrun";
          for (size_t b = want_p.size() * 4; b < got_p.size(); ++b) ASSERT_EQ(got_p[b], 0xA5) << "prepared overrun";
        }
  float out[8];
  const float one = 1.f;
  const ScalarArg f{&one, DType::kFloat32};
  EXPECT_FALSE(lowbit::cuda::qat_quantize(DType::kFloat32, &one, 1, 1, 1, f, f, {nullptr, DType::kFloat32}, f, -128,
                                          127, reinterpret_cast<int8_t*>(out), out, stream())
                   .is_ok());
  EXPECT_FALSE(lowbit::cuda::qat_quantize(DType::kFloat32, &one, 1, 1, 1, f, f, f, f, 5, 2,
                                          reinterpret_cast<int8_t*>(out), out, stream())
                   .is_ok());
}

// CPU and CUDA must round t / s identically (IEEE division), then round half to even. The hard inputs are
// those whose quotient lies at or next to a half-integer (where the rounding of t / s decides the code; a
// faster division by a reciprocal would show here first): for many steps (round, random, all-ones mantissas, powers of two, the ends of the
// fast range and outside it), every n + 1/2 for |n| <= 140, t = RN((n + 1/2) * s) and its 6 fp32
// neighbours each side, plus inf / NaN / zero / tiny inputs. Codes compared bitwise (both paths: the
// 16-byte vector kernel and the scalar kernel).
TEST_F(CudaKernels, QuantizeExactAtHalfIntegerBoundaries) {
  std::mt19937 rng(2026);
  std::vector<float> steps = {1.0f, 0.5f, 3.0f, 0.1f, 1.0f / 3.0f, 0.0213f, 1e-3f, 7.77e-5f, 12.5f,
                              std::nextafter(2.0f, 0.0f), std::nextafter(1.0f, 2.0f), 0x1p-60f, 0x1p60f,
                              std::nextafter(0x1p-60f, 0.0f), 0x1p-70f, 0x1.fffffep-3f, 0x1.000002p-7f,
                              // the ends of the CUDA kernel's hoisted-reciprocal range [2^-30, 2^30] (StepDiv)
                              0x1p-30f, 0x1p30f, std::nextafter(0x1p-30f, 0.0f), std::nextafter(0x1p30f, INFINITY),
                              0x1.fffffep-1f, 0x1.fffffep29f};
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> ex(-20, 6);
  for (int i = 0; i < 40; ++i) steps.push_back(std::ldexp(mant(rng), ex(rng)));
  for (float st : steps) {
    SCOPED_TRACE("step " + std::to_string(st));
    std::vector<float> x;
    for (int n = -141; n <= 140; ++n) {
      float t = float((double(n) + 0.5) * double(st));
      for (int k = 0; k < 6; ++k) t = std::nextafter(t, -INFINITY);
      for (int k = 0; k < 13; ++k, t = std::nextafter(t, INFINITY)) x.push_back(t);
    }
    for (float v : {0.0f, -0.0f, INFINITY, -INFINITY, std::nanf(""), 1e-40f, -3e-39f, 3e38f, -3e38f}) x.push_back(v);
    for (float m : {0x1p40f, -0x1p40f, 0x1p20f, -0x1p20f}) {  // around StepDiv's |t / s| = 2^40 switch
      const float t = m * st;
      x.push_back(t);
      x.push_back(std::nextafter(t, 0.0f));
      x.push_back(std::nextafter(t, 2.0f * t));
    }
    while (x.size() % 8 != 0) x.push_back(0.25f * st);
    const int64_t n = int64_t(x.size());
    std::vector<int8_t> want(x.size());
    ASSERT_TRUE(lowbit::cpu::quantize_s8_ref(DType::kFloat32, x.data(), 1, n, n, nullptr, &st, -128, 127,
                                             want.data()).is_ok());
    DeviceBuffer dx(x.size() * 4 + 4), ds(4), dq(x.size() + 16);
    ASSERT_TRUE(dx.ok() && ds.ok() && dq.ok());
    CUDA_ASSERT(cudaMemcpy(ds.bytes(), &st, 4, cudaMemcpyHostToDevice));
    for (size_t off : {size_t(0), size_t(4)}) {  // 0: 16-byte vector path; 4: misaligned, scalar path
      CUDA_ASSERT(cudaMemcpy(dx.bytes() + off, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      ASSERT_TRUE(lowbit::cuda::quantize_s8(DType::kFloat32, dx.bytes() + off, 1, n, n, nullptr,
                                            reinterpret_cast<const float*>(ds.bytes()), -128, 127, dq.data(),
                                            stream())
                      .is_ok());
      CUDA_ASSERT(cudaStreamSynchronize(stream_));
      std::vector<int8_t> got(x.size());
      CUDA_ASSERT(cudaMemcpy(got.data(), dq.bytes(), got.size(), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < x.size(); ++i)
        ASSERT_EQ(int(got[i]), int(want[i])) << "x = " << x[i] << " (" << std::hexfloat << x[i] << std::defaultfloat
                                              << "), x / s = " << double(x[i]) / double(st) << ", offset " << off;
    }
  }
}

// With eps the kernel reads both scalars and takes max(scale, eps) itself (NaN if either is NaN): codes
// equal the CPU reference's with that step, vector and scalar paths.
TEST_F(CudaKernels, QuantizeStepFromScaleAndEps) {
  std::mt19937 rng(77);
  struct Pair { float scale, eps; };
  const Pair pairs[] = {{0.0213f, 1e-5f}, {1e-7f, 0.125f}, {0.5f, 0.5f}, {std::nanf(""), 0.1f}, {0.1f, std::nanf("")},
                        {0.0f, 0.2f}, {0x1p-40f, 0x1p-35f}};
  std::vector<float> x(1000);
  for (const Pair& p : pairs) {
    const float step = lowbit::qat_step(p.scale, p.eps);
    SCOPED_TRACE("scale " + std::to_string(p.scale) + " eps " + std::to_string(p.eps));
    for (auto& v : x) v = draw_input(rng, step == step ? step : 1.0f);
    std::vector<int8_t> want(x.size());
    ASSERT_TRUE(lowbit::cpu::quantize_s8_ref(DType::kFloat32, x.data(), 1, int64_t(x.size()), int64_t(x.size()),
                                             nullptr, &step, -128, 127, want.data()).is_ok());
    const float se[2] = {p.scale, p.eps};
    DeviceBuffer dx(x.size() * 4 + 4), ds(8), dq(x.size() + 16);
    ASSERT_TRUE(dx.ok() && ds.ok() && dq.ok());
    CUDA_ASSERT(cudaMemcpy(ds.bytes(), se, 8, cudaMemcpyHostToDevice));
    const float* d_scale = reinterpret_cast<const float*>(ds.bytes());
    for (size_t off : {size_t(0), size_t(4)}) {  // 0: vector path; 4: misaligned, scalar path
      CUDA_ASSERT(cudaMemcpy(dx.bytes() + off, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
      ASSERT_TRUE(lowbit::cuda::quantize_s8(DType::kFloat32, dx.bytes() + off, 1, int64_t(x.size()),
                                            int64_t(x.size()), nullptr, d_scale, -128, 127, dq.data(), stream(),
                                            d_scale + 1)
                      .is_ok());
      CUDA_ASSERT(cudaStreamSynchronize(stream_));
      std::vector<int8_t> got(x.size());
      CUDA_ASSERT(cudaMemcpy(got.data(), dq.bytes(), got.size(), cudaMemcpyDeviceToHost));
      ASSERT_EQ(got, want) << "offset " << off;
    }
  }
}

TEST_F(CudaKernels, QuantizeEmptyIsNoOp) {
  DeviceBuffer dq(16);
  ASSERT_TRUE(dq.ok());
  CUDA_ASSERT(cudaMemset(dq.bytes(), 0x5A, 16));
  float one = 1.f;
  DeviceBuffer dscale(4);
  CUDA_ASSERT(cudaMemcpy(dscale.bytes(), &one, 4, cudaMemcpyHostToDevice));
  const float* sc = reinterpret_cast<const float*>(dscale.bytes());
  auto* q = reinterpret_cast<int8_t*>(dq.bytes());
  EXPECT_TRUE(lowbit::cuda::quantize_s8(DType::kFloat32, dq.bytes(), 0, 5, 5, nullptr, sc, -128, 127, q, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::quantize_s8(DType::kFloat32, dq.bytes(), 5, 0, 0, nullptr, sc, -128, 127, q, stream()).is_ok());
  expect_untouched(dq, 16, 0x5A, stream_);
}

TEST_F(CudaKernels, QuantizeRejectsInvalidArguments) {
  DeviceBuffer dx(4096), dscale(4), dq(4096);
  ASSERT_TRUE(dx.ok() && dscale.ok() && dq.ok());
  const void* x = dx.bytes();
  const float* sc = reinterpret_cast<const float*>(dscale.bytes());
  int8_t* q = reinterpret_cast<int8_t*>(dq.bytes());
  using lowbit::cuda::quantize_s8;
  expect_invalid(quantize_s8(DType::kFloat32, nullptr, 4, 4, 4, nullptr, sc, -128, 127, q, stream()), "x null");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 4, 4, nullptr, nullptr, -128, 127, q, stream()), "scale null");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 4, 4, nullptr, sc, -128, 127, nullptr, stream()), "q null");
  expect_invalid(quantize_s8(DType::kFloat32, x, -1, 4, 4, nullptr, sc, -128, 127, q, stream()), "M < 0");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, -1, 4, nullptr, sc, -128, 127, q, stream()), "K < 0");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 8, 7, nullptr, sc, -128, 127, q, stream()), "ldx < K");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 4, 4, nullptr, sc, 5, 4, q, stream()), "qmin > qmax");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 4, 4, nullptr, sc, -128, 128, q, stream()), "qmax > 127");
  expect_invalid(quantize_s8(DType::kFloat32, x, 4, 4, 4, nullptr, sc, -129, 127, q, stream()), "qmin < -128");
  expect_invalid(quantize_s8(static_cast<DType>(7), x, 4, 4, 4, nullptr, sc, -128, 127, q, stream()), "bad dtype");
}

// ---------------------------------------------------------------------------------------------------
// gemm_s8_scaled

struct GemmCase {
  int64_t M, N, K, lda, ldb, ldo;
  size_t a_off, b_off;  // bytes the A / B bases are moved by
  size_t o_off;         // elements the out base is moved by
  float alpha;
  DType otype;
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " K=" << K << " lda=" << lda << " ldb=" << ldb << " ldo=" << ldo
       << " a_off=" << a_off << " b_off=" << b_off << " o_off=" << o_off << " alpha=" << alpha
       << " out=" << lowbit::dtype_name(otype);
    return os.str();
  }
};

// Runs one case. With device_runs > 1 the kernel runs again on the same inputs (output re-poisoned)
// and must give the same bits: determinism.
void run_gemm_case(const GemmCase& c, std::mt19937& rng, CUstream_st* stream, int device_runs = 1) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.otype);
  const size_t a_bytes = c.a_off + size_t(c.M) * size_t(c.lda) + 1;
  const size_t b_bytes = c.b_off + size_t(c.N) * size_t(c.ldb) + 1;
  const size_t o_bytes = (c.o_off + size_t(c.M) * size_t(c.ldo)) * es + 64;
  std::vector<int8_t> ha, hb;
  std::vector<uint8_t> got;
  run_gemm_on_device(rng, a_bytes, b_bytes, o_bytes, c.alpha, reinterpret_cast<cudaStream_t>(stream),
                     [&](const GemmOperands& d) {
                       return lowbit::cuda::gemm_s8_scaled(d.A(c.a_off), c.lda, d.B(c.b_off), c.ldb, c.M, c.N, c.K,
                                                           d.alpha_ptr(), c.otype, d.out.bytes() + c.o_off * es, c.ldo,
                                                           stream);
                     },
                     device_runs, &ha, &hb, &got);
  if (::testing::Test::HasFatalFailure()) return;

  std::vector<uint8_t> ref(o_bytes, kOutPoison);
  const Status rs = lowbit::cpu::gemm_s8_scaled_ref(ha.data() + c.a_off, c.lda, hb.data() + c.b_off, c.ldb, c.M, c.N,
                                                    c.K, &c.alpha, c.otype, ref.data() + c.o_off * es, c.ldo);
  ASSERT_TRUE(rs.is_ok()) << "CPU reference failed: " << rs.message;

  const size_t first = c.o_off * es;
  for (size_t b = 0; b < first; ++b) ASSERT_EQ(got[b], kOutPoison) << "written before out, at byte -" << (first - b);
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < c.ldo; ++j) {
      const size_t at = first + (size_t(i) * c.ldo + j) * es;
      if (j < c.N) {
        ASSERT_EQ(0, std::memcmp(&got[at], &ref[at], es))
            << "value mismatch at (" << i << ", " << j << "): got bits 0x" << std::hex
            << (es == 4 ? *reinterpret_cast<const uint32_t*>(&got[at]) : *reinterpret_cast<const uint16_t*>(&got[at]))
            << " want 0x"
            << (es == 4 ? *reinterpret_cast<const uint32_t*>(&ref[at]) : *reinterpret_cast<const uint16_t*>(&ref[at]));
      } else {
        for (size_t b = 0; b < es; ++b)
          ASSERT_EQ(got[at + b], kOutPoison) << "padding column written at (" << i << ", " << j << ")";
      }
    }
  }
  for (size_t b = first + size_t(c.M) * c.ldo * es; b < o_bytes; ++b)
    ASSERT_EQ(got[b], kOutPoison) << "written past out end";
}

TEST_F(CudaKernels, GemmMatchesReference) {
  // Sizes from {1, 3, 17, 33, 127, 129, 255, 1000, 1031}: tails of the 128-wide tiles, of the 64-byte
  // K stage and of the 16-byte chunks, in every position. The reference is scalar: keep M*N*K modest.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1},      {3, 17, 33},    {17, 3, 127},   {33, 129, 255}, {127, 33, 1000}, {129, 255, 17},
      {255, 127, 129}, {1000, 17, 1031}, {17, 1031, 33}, {129, 129, 1031}, {1, 1031, 1000}, {1031, 1, 255},
      {255, 1000, 3}, {33, 33, 1},    {1031, 255, 127}, {128, 128, 64}, {256, 128, 1024}};
  // Layout variants: (lda, ldb, ldo) as functions of K, N; base offsets. Covers: tight, odd strides and
  // misaligned bases (byte-load paths for both operands), 16-aligned padded strides with a K tail
  // (cp.async with partial chunks), and each operand alone on the fallback.
  struct Variant { int kind; size_t a_off, b_off, o_off; };
  const std::vector<Variant> variants = {{0, 0, 0, 0}, {1, 1, 7, 1}, {2, 0, 0, 0}, {3, 0, 15, 0}, {4, 3, 0, 2},
                                         {2, 5, 0, 3}};  // last: lda % 16 == 0 but the A base is not aligned
  const float alphas[] = {1.7e-4f, -0.031f, 0.5f, 3.0e-3f, 1.0f};  // 0.5 and 1.0 can overflow fp16 to inf
  std::mt19937 rng(99);
  int n = 0;
  for (const auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    for (const auto& v : variants) {
      int64_t lda = K, ldb = K, ldo = N;
      switch (v.kind) {
        case 1: lda = K + 1; ldb = K + 3; ldo = N + 1; break;
        case 2: lda = round_up16(K) + 16; ldb = round_up16(K); ldo = N + 8; break;
        case 3: lda = round_up16(K); ldb = K + 5; ldo = N + 3; break;
        case 4: lda = K + 2; ldb = round_up16(K); ldo = N; break;
        default: break;
      }
      for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        const GemmCase c{M, N, K, lda, ldb, ldo, v.a_off, v.b_off, v.o_off, alphas[n++ % 5], t};
        run_gemm_case(c, rng, stream());
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(CudaKernels, GemmFewRowsMatchesReference) {
  // M <= 64 with TMA-aligned operands takes the register-weight kernel on Hopper (16- or 64-row activation
  // tiles, 64 weight rows per CTA, 6 / 3 consumers splitting the k-tiles; up to 256 rows its 256-row tile
  // while the 128 x 256 tiles would leave SMs idle): M at both sides of 16, 64 and 256,
  // fewer k-tiles than consumers (K <= 128) and uneven splits, N tails of the 64-row weight tiles, padded
  // strides and every output dtype; bitwise against the CPU reference.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 64, 16},   {1, 200, 4096}, {5, 129, 112},  {16, 1000, 640}, {17, 65, 2064}, {31, 7, 1552},
      {64, 333, 784}, {64, 64, 128}, {9, 4097, 272}, {48, 130, 3072}, {2, 1, 48},     {65, 190, 512},
      {200, 1100, 1040}, {256, 513, 256}, {129, 64, 4112}};
  std::mt19937 rng(123);
  int n = 0;
  const float alphas[] = {2.3e-4f, -0.017f, 0.9f};
  for (const auto& s : shapes)
    for (int pad = 0; pad < 2; ++pad)
      for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        const int64_t M = s[0], N = s[1], K = s[2];
        const int64_t lda = pad ? K + 32 : K, ldb = pad ? K + 16 : K, ldo = pad ? N + 5 : N;
        run_gemm_case({M, N, K, lda, ldb, ldo, 0, 0, pad ? size_t(1) : size_t(0), alphas[n++ % 3], t}, rng, stream());
        if (HasFatalFailure()) return;
      }
}

TEST_F(CudaKernels, GemmNarrowTileMatchesReference) {
  // N <= 64 takes the mma.sync kernel's 128 x 64 tile (forced: on Hopper aligned calls go to wgmma), on
  // both loaders; N = 64 / 65 are the two sides of the switch.
  ScopedKernel force("mma");
  std::mt19937 rng(7);
  const std::vector<std::array<int64_t, 3>> shapes = {{200, 64, 96}, {70, 65, 33}, {129, 1, 1031}, {300, 40, 128},
                                                      {5, 63, 64}};
  for (const auto& s : shapes)
    for (int aligned = 0; aligned < 2; ++aligned)
      for (DType t : {DType::kFloat32, DType::kBFloat16}) {
        const int64_t M = s[0], N = s[1], K = s[2];
        const int64_t ld = aligned ? round_up16(K) : K + 1;
        run_gemm_case({M, N, K, ld, ld, aligned ? N : N + 3, 0, 0, 0, 0.021f, t}, rng, stream());
        if (HasFatalFailure()) return;
      }
}

TEST_F(CudaKernels, GemmLongK) {
  // Many pipeline iterations, up to the largest K the contract allows (random data: no overflow).
  std::mt19937 rng(5);
  run_gemm_case({3, 130, lowbit::kMaxGemmS8K, lowbit::kMaxGemmS8K, lowbit::kMaxGemmS8K, 130, 0, 0, 0, 1e-5f,
                 DType::kFloat32}, rng, stream());
  if (HasFatalFailure()) return;
  run_gemm_case({5, 7, 100003, 100003, 100005, 9, 1, 2, 1, 2e-4f, DType::kBFloat16}, rng, stream());
}

// The largest sum the K bound allows: kMaxGemmS8K = 2^17 - 1 products of (-128)(-128) give 2^31 - 2^14,
// just inside int32; GPU and CPU reference must agree exactly there.
TEST_F(CudaKernels, GemmExactAtTheKBound) {
  const int64_t M = 2, N = 3, K = lowbit::kMaxGemmS8K;
  std::vector<int8_t> ha(size_t(M * K), int8_t(-128)), hb(size_t(N * K), int8_t(-128));
  const float alpha = 1.0f;
  GemmOperands d(ha.size(), hb.size(), size_t(M * N) * 4);
  ASSERT_TRUE(d.ok());
  upload(d, ha, hb, alpha);
  if (HasFatalFailure()) return;
  const Status st = lowbit::cuda::gemm_s8_scaled(d.A(), K, d.B(), K, M, N, K, d.alpha_ptr(), DType::kFloat32,
                                                 d.out.bytes(), N, stream());
  ASSERT_TRUE(st.is_ok()) << st.message;
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<float> got(size_t(M * N)), ref(size_t(M * N));
  CUDA_ASSERT(cudaMemcpy(got.data(), d.out.bytes(), got.size() * 4, cudaMemcpyDeviceToHost));
  ASSERT_TRUE(lowbit::cpu::gemm_s8_scaled_ref(ha.data(), K, hb.data(), K, M, N, K, &alpha, DType::kFloat32,
                                              ref.data(), N).is_ok());
  for (size_t e = 0; e < got.size(); ++e) {
    EXPECT_EQ(got[e], ref[e]) << "element " << e;
    EXPECT_EQ(got[e], 2147467264.0f) << "element " << e;  // 16384 * (2^17 - 1), exact in fp32
  }
}

TEST_F(CudaKernels, GemmZeroK) {
  std::mt19937 rng(3);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    run_gemm_case({5, 7, 0, 0, 0, 9, 0, 0, 1, 0.37f, t}, rng, stream());
    if (HasFatalFailure()) return;
    run_gemm_case({130, 300, 0, 4, 4, 300, 0, 0, 0, -2.f, t}, rng, stream());
    if (HasFatalFailure()) return;
  }
}

TEST_F(CudaKernels, GemmEmptyIsNoOp) {
  GemmOperands d(64, 64, 256);
  ASSERT_TRUE(d.ok());
  DeviceBuffer& out = d.out;
  CUDA_ASSERT(cudaMemset(out.bytes(), kOutPoison, 256));
  const int8_t *pa = d.A(), *pb = d.B();
  const float* pal = d.alpha_ptr();
  EXPECT_TRUE(lowbit::cuda::gemm_s8_scaled(pa, 8, pb, 8, 0, 4, 8, pal, DType::kFloat32, out.bytes(), 4, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::gemm_s8_scaled(pa, 8, pb, 8, 4, 0, 8, pal, DType::kFloat16, out.bytes(), 0, stream()).is_ok());
  expect_untouched(out, 256, kOutPoison, stream_);
}

TEST_F(CudaKernels, GemmRejectsInvalidArguments) {
  GemmOperands d(4096, 4096, 4096);
  ASSERT_TRUE(d.ok());
  const int8_t *pa = d.A(), *pb = d.B();
  const float* pal = d.alpha_ptr();
  void* po = d.out.bytes();
  using lowbit::cuda::gemm_s8_scaled;
  const DType f = DType::kFloat16;
  expect_invalid(gemm_s8_scaled(nullptr, 8, pb, 8, 4, 4, 8, pal, f, po, 4, stream()), "A null");
  expect_invalid(gemm_s8_scaled(pa, 8, nullptr, 8, 4, 4, 8, pal, f, po, 4, stream()), "B null");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, 4, 8, nullptr, f, po, 4, stream()), "alpha null");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, 4, 8, pal, f, nullptr, 4, stream()), "out null");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, -1, 4, 8, pal, f, po, 4, stream()), "M < 0");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, -1, 8, pal, f, po, 4, stream()), "N < 0");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, 4, -1, pal, f, po, 4, stream()), "K < 0");
  expect_invalid(gemm_s8_scaled(pa, 7, pb, 8, 4, 4, 8, pal, f, po, 4, stream()), "lda < K");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 7, 4, 4, 8, pal, f, po, 4, stream()), "ldb < K");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, 4, 8, pal, f, po, 3, stream()), "ldo < N");
  const int64_t big = lowbit::kMaxGemmS8K + 1;
  expect_invalid(gemm_s8_scaled(pa, big, pb, big, 1, 1, big, pal, f, po, 1, stream()), "K > kMaxGemmS8K");
  expect_invalid(gemm_s8_scaled(pa, 8, pb, 8, 4, 4, 8, pal, static_cast<DType>(9), po, 4, stream()), "bad otype");
}

// Large: the steady-state pipeline over many full tiles, plus determinism (two runs, same bits).
TEST_F(CudaKernels, GemmLarge) {
  std::mt19937 rng(1234);
  run_gemm_case({1024, 1024, 4096, 4096, 4096, 1024, 0, 0, 0, 2.5e-5f, DType::kFloat16}, rng, stream(), 3);
  if (HasFatalFailure()) return;
  // Non-multiple-of-tile large shape with fp32 output.
  run_gemm_case({1000, 1031, 2049, 2064, 2049, 1040, 0, 0, 0, 1e-4f, DType::kFloat32}, rng, stream());
}

// A few small cases that still cycle the 4-stage pipeline (K = 1031: 17 k-tiles) on each load path,
// cheap enough for compute-sanitizer's racecheck / synccheck.
TEST_F(CudaKernels, SanitizerSmoke) {
  std::mt19937 rng(11);
  const std::vector<GemmCase> cases = {
      {129, 200, 1031, 1040, 1040, 200, 0, 0, 0, 1e-3f, DType::kFloat16},  // cp.async both, K tail
      {129, 200, 1031, 1031, 1031, 201, 1, 0, 1, 1e-3f, DType::kFloat16},  // byte loads both
      {130, 70, 300, 304, 301, 70, 0, 3, 0, 2e-3f, DType::kBFloat16},      // mixed
  };
  for (const auto& c : cases) {
    run_gemm_case(c, rng, stream());
    if (HasFatalFailure()) return;
  }
  run_quant_case({DType::kFloat16, 33, 1024, 1024, 0, 1, 0, -128, 127, 0.05f}, rng, stream());
  if (HasFatalFailure()) return;
  run_quant_case({DType::kFloat32, 33, 1001, 1003, 1, 2, 1, -8, 7, 0.05f}, rng, stream());
}

// Not a correctness test: throughput of the CUDA kernels at a few sizes, for the record (median of 10
// runs timed with CUDA events after 2 warm-ups; random data). Printed as "[perf] ..." lines and test
// properties. Excluded from sanitizer runs (-*Perf*).
TEST_F(CudaKernels, PerfReport) {
  struct Shape { int64_t M, N, K, lda, ldb; const char* what; };
  const Shape shapes[] = {
      {8192, 8192, 8192, 8192, 8192, "square, cp.async path"},
      {4096, 4096, 4096, 4096, 4096, "square, cp.async path"},
      {16, 8192, 8192, 8192, 8192, "skinny M (decode-like)"},
      {8192, 8192, 8200, 8200, 8200, "K % 16 != 0: byte-load fallback"},
  };
  const size_t max_ab = size_t(8192) * 8200, max_out = size_t(8192) * 8192 * 2;
  DeviceBuffer da(max_ab), db(max_ab), dout(max_out), dalpha(4);
  ASSERT_TRUE(da.ok() && db.ok() && dout.ok() && dalpha.ok());
  upload_perf_operands(da, db, max_ab);
  if (HasFatalFailure()) return;
  const float alpha = 1e-5f;
  CUDA_ASSERT(cudaMemcpy(dalpha.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  for (const auto& s : shapes) {
    const double ms = median_ms(stream_, [&] {
      return lowbit::cuda::gemm_s8_scaled(reinterpret_cast<const int8_t*>(da.bytes()), s.lda,
                                          reinterpret_cast<const int8_t*>(db.bytes()), s.ldb, s.M, s.N, s.K,
                                          reinterpret_cast<const float*>(dalpha.bytes()), DType::kFloat16,
                                          dout.bytes(), s.N, stream());
    });
    ASSERT_GT(ms, 0.0) << "gemm launch failed";
    const double tops = 2.0 * double(s.M) * double(s.N) * double(s.K) / (ms * 1e-3) / 1e12;
    std::printf("[perf] gemm_s8_scaled fp16-out M=%lld N=%lld K=%lld (%s): %.3f ms, %.1f TOP/s\n", (long long)s.M,
                (long long)s.N, (long long)s.K, s.what, ms, tops);
    RecordProperty(std::string("gemm_") + std::to_string(s.M) + "x" + std::to_string(s.N) + "x" + std::to_string(s.K) +
                       "_TOPS",
                   std::to_string(tops));
  }
  {
    // quantize: 4096 x 8192 bf16 in (64 MiB, the random bytes of A: some NaN / inf / subnormal values,
    // which take the division's slow path), int8 out (32 MiB, into B), with a shift.
    const int64_t M = 4096, K = 8192;
    DeviceBuffer dshift(size_t(K) * 4), dscale(4);
    ASSERT_TRUE(dshift.ok() && dscale.ok());
    CUDA_ASSERT(cudaMemset(dshift.bytes(), 0, size_t(K) * 4));
    const float scale = 0.02f;
    CUDA_ASSERT(cudaMemcpy(dscale.bytes(), &scale, 4, cudaMemcpyHostToDevice));
    const double ms = median_ms(stream_, [&] {
      return lowbit::cuda::quantize_s8(DType::kBFloat16, da.bytes(), M, K, K,
                                       reinterpret_cast<const float*>(dshift.bytes()),
                                       reinterpret_cast<const float*>(dscale.bytes()), -128, 127,
                                       reinterpret_cast<int8_t*>(db.bytes()), stream());
    });
    ASSERT_GT(ms, 0.0) << "quantize launch failed";
    const double gbs = double(M) * double(K) * 3.0 / (ms * 1e-3) / 1e9;
    std::printf("[perf] quantize_s8 bf16 M=%lld K=%lld: %.3f ms, %.0f GB/s (read + write)\n", (long long)M,
                (long long)K, ms, gbs);
    RecordProperty("quantize_bf16_GBps", std::to_string(gbs));
  }
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
