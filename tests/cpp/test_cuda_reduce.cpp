// cuda::sum_abs_f64 (reduce.h) against the float64 reference and the CPU kernel; repeated runs give the
// same bits; bad arguments. Skipped without a CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>

#include "cuda_test_util.h"
#include "lowbit/kernels/reduce.h"
#include "reduce_test_util.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using namespace lowbit_test;

class CudaSumAbs : public CudaStreamTest {};

// Runs the CUDA kernel on in (twice: same bits), returns the sum.
double run_device(const AbsInput& in, int64_t n, CUstream_st* stream, cudaStream_t s) {
  DeviceBuffer x(in.bytes.size()), out(8);
  const size_t ws_bytes = lowbit::cuda::sum_abs_f64_workspace_bytes(n);
  DeviceBuffer ws(ws_bytes);
  EXPECT_TRUE(x.ok() && out.ok() && ws.ok());
  if (!in.bytes.empty()) EXPECT_EQ(cudaMemcpy(x.bytes(), in.bytes.data(), in.bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
  double got[2] = {-1.0, -2.0};
  for (int r = 0; r < 2; ++r) {
    cudaMemset(out.bytes(), 0xFF, 8);
    const lowbit::Status st = lowbit::cuda::sum_abs_f64(in.type, x.bytes(), n, reinterpret_cast<double*>(out.bytes()),
                                                        ws.bytes(), ws_bytes, stream);
    EXPECT_TRUE(st.is_ok()) << st.message;
    EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(&got[r], out.bytes(), 8, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  EXPECT_EQ(std::memcmp(&got[0], &got[1], 8), 0) << "two runs on the same input differ: " << got[0] << " vs " << got[1];
  return got[0];
}

TEST_F(CudaSumAbs, MatchesReferenceAndCpu) {
  std::mt19937 rng(9);
  const int64_t sizes[] = {0, 1, 7, 255, 4095, 4096, 4097, 100003, 1 << 20, (1 << 22) + 13, (1 << 24) + 5};
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t n : sizes) {
      SCOPED_TRACE(std::string(lowbit::dtype_name(t)) + " n=" + std::to_string(n));
      const AbsInput in = random_abs_input(t, n, rng);
      const double got = run_device(in, n, stream(), stream_);
      if (HasFailure()) return;
      double cpu = 0.0;
      ASSERT_TRUE(lowbit::cpu::sum_abs_f64(t, in.bytes.data(), n, &cpu).is_ok());
      const double want = abs_sum_reference(in.values);
      EXPECT_NEAR(got, want, 1e-12 * want + 1e-300);  // float64 sums of one sign: error << n * 2^-53
      EXPECT_NEAR(got, cpu, 1e-12 * want + 1e-300);
    }
  }
}

TEST_F(CudaSumAbs, NanPropagates) {
  std::mt19937 rng(10);
  AbsInput in = random_abs_input(DType::kFloat32, 50000, rng);
  const float nan = std::nanf("");
  std::memcpy(&in.bytes[4 * 31337], &nan, 4);
  EXPECT_TRUE(std::isnan(run_device(in, 50000, stream(), stream_)));
}

// lsq_step on the device: the CPU's bits (same formula; the float64 sums agree to far below an fp32 step at
// these sizes), with eps in each dtype, NaN propagation; bad arguments.
TEST_F(CudaSumAbs, LsqStepMatchesCpu) {
  std::mt19937 rng(12);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t n : {1, 4097, (1 << 20) + 3}) {
      SCOPED_TRACE(std::string(lowbit::dtype_name(t)) + " n=" + std::to_string(n));
      const AbsInput in = random_abs_input(t, n, rng);
      const uint16_t eps_h = lowbit::float_to_half(1e-3f);
      const float eps_f = 1e9f;  // larger than any step here: the result is eps
      DeviceBuffer x(in.bytes.size()), out(4), e(8);
      const size_t ws_bytes = lowbit::cuda::sum_abs_f64_workspace_bytes(n);
      DeviceBuffer ws(ws_bytes);
      ASSERT_TRUE(x.ok() && out.ok() && e.ok() && ws.ok());
      CUDA_ASSERT(cudaMemcpy(x.bytes(), in.bytes.data(), in.bytes.size(), cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaMemcpy(e.bytes(), &eps_h, 2, cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaMemcpy(static_cast<uint8_t*>(e.bytes()) + 4, &eps_f, 4, cudaMemcpyHostToDevice));
      const lowbit::ScalarArg cases[] = {{nullptr, DType::kFloat32}, {e.bytes(), DType::kFloat16},
                                         {static_cast<uint8_t*>(e.bytes()) + 4, DType::kFloat32}};
      const lowbit::ScalarArg host_cases[] = {{nullptr, DType::kFloat32}, {&eps_h, DType::kFloat16},
                                              {&eps_f, DType::kFloat32}};
      for (int c = 0; c < 3; ++c) {
        for (double qmax : {127.0, 7.0}) {
          float want = -1.f, got = -2.f;
          ASSERT_TRUE(lowbit::cpu::lsq_step(t, in.bytes.data(), n, qmax, host_cases[c], &want).is_ok());
          const lowbit::Status st = lowbit::cuda::lsq_step(t, x.bytes(), n, qmax, cases[c],
                                                           reinterpret_cast<float*>(out.bytes()), ws.bytes(), ws_bytes,
                                                           stream());
          ASSERT_TRUE(st.is_ok()) << st.message;
          CUDA_ASSERT(cudaStreamSynchronize(stream_));
          CUDA_ASSERT(cudaMemcpy(&got, out.bytes(), 4, cudaMemcpyDeviceToHost));
          EXPECT_EQ(std::memcmp(&got, &want, 4), 0) << "case " << c << " qmax " << qmax << ": " << got << " vs " << want;
        }
      }
      if (n == 4097) {  // a NaN in x gives a NaN step whatever eps is
        AbsInput bad = in;
        const float nan = std::nanf("");
        if (t == DType::kFloat32) std::memcpy(&bad.bytes[4 * 100], &nan, 4);
        else {
          const uint16_t h = t == DType::kBFloat16 ? 0x7FC0 : 0x7E00;  // a quiet NaN of the dtype
          std::memcpy(&bad.bytes[2 * 100], &h, 2);
        }
        CUDA_ASSERT(cudaMemcpy(x.bytes(), bad.bytes.data(), bad.bytes.size(), cudaMemcpyHostToDevice));
        float got = 0.f;
        ASSERT_TRUE(lowbit::cuda::lsq_step(t, x.bytes(), n, 127.0, cases[2], reinterpret_cast<float*>(out.bytes()),
                                           ws.bytes(), ws_bytes, stream())
                        .is_ok());
        CUDA_ASSERT(cudaStreamSynchronize(stream_));
        CUDA_ASSERT(cudaMemcpy(&got, out.bytes(), 4, cudaMemcpyDeviceToHost));
        EXPECT_TRUE(std::isnan(got));
      }
    }
  }
  DeviceBuffer x(64), out(4), ws(64);
  const float one = 1.f;
  expect_invalid(lowbit::cuda::lsq_step(DType::kFloat32, x.bytes(), 0, 127.0, {nullptr, DType::kFloat32},
                                        reinterpret_cast<float*>(out.bytes()), ws.bytes(), 64, stream()),
                 "n = 0", "n must be");
  expect_invalid(lowbit::cuda::lsq_step(DType::kFloat32, x.bytes(), 8, -1.0, {nullptr, DType::kFloat32},
                                        reinterpret_cast<float*>(out.bytes()), ws.bytes(), 64, stream()),
                 "qmax < 0", "qmax");
  expect_invalid(lowbit::cuda::lsq_step(DType::kFloat32, x.bytes(), 8, 127.0, {&one, static_cast<DType>(4)},
                                        reinterpret_cast<float*>(out.bytes()), ws.bytes(), 64, stream()),
                 "eps dtype", "eps dtype");
  expect_invalid(lowbit::cuda::lsq_step(DType::kFloat32, x.bytes(), 8, 127.0, {nullptr, DType::kFloat32}, nullptr,
                                        ws.bytes(), 64, stream()),
                 "out null", "out");
}

TEST_F(CudaSumAbs, RejectsBadArguments) {
  DeviceBuffer x(64), out(8), ws(64);
  auto* o = reinterpret_cast<double*>(out.bytes());
  expect_invalid(lowbit::cuda::sum_abs_f64(DType::kFloat32, x.bytes(), 16, nullptr, ws.bytes(), 64, stream()), "out null",
                 "out");
  expect_invalid(lowbit::cuda::sum_abs_f64(DType::kFloat32, x.bytes(), 16, o, ws.bytes(), 0, stream()), "workspace",
                 "workspace");
  expect_invalid(lowbit::cuda::sum_abs_f64(DType::kFloat32, x.bytes(), -2, o, ws.bytes(), 64, stream()), "n < 0", "-2");
  expect_invalid(lowbit::cuda::sum_abs_f64(static_cast<DType>(5), x.bytes(), 16, o, ws.bytes(), 64, stream()),
                 "bad dtype", "xtype");
}

}  // namespace
