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
