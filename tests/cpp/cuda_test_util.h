// Helpers shared by the CUDA kernel tests (tests/cpp/test_cuda_*.cpp): device detection and the
// skip-without-device fixture, CUDA_ASSERT, an owning device buffer, GEMM operands, runs on poisoned
// outputs, and the event timing of the perf reports; plus, through test_util.h, the helpers the CPU
// kernel tests share too. Header-only; every test file of lowbit_cuda_tests includes it.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "test_util.h"

// ASSERT that a CUDA runtime call succeeded (inside a void function / TEST body).
#define CUDA_ASSERT(expr)                                                             \
  do {                                                                                \
    const cudaError_t err_ = (expr);                                                  \
    ASSERT_EQ(err_, cudaSuccess) << #expr << " failed: " << cudaGetErrorString(err_); \
  } while (0)

namespace lowbit_test {

inline bool cuda_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

// Base of every CUDA test fixture: skips the test when the machine has no CUDA device, and gives each
// test a fresh stream. A blocking one: the tests poison and upload buffers with cudaMemset / cudaMemcpy
// on the legacy default stream, and a non-blocking stream would let a kernel run before (or during)
// those; a blocking stream is ordered after them. (With non-blocking streams a poison memset could land
// after a kernel's stores: a 'different bits' determinism failure that was the test's, not the kernel's.)
class CudaStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device present";
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  CUstream_st* stream() const { return reinterpret_cast<CUstream_st*>(stream_); }
  cudaStream_t stream_ = nullptr;
};

// CudaStreamTest for kernels that exist only on compute capability 9.0 (the sm_90a wgmma kernels):
// skips the test on any other device.
class CudaSm90Test : public CudaStreamTest {
 protected:
  void SetUp() override {
    CudaStreamTest::SetUp();
    if (IsSkipped()) return;
    int dev = 0;
    cudaDeviceProp p{};
    CUDA_ASSERT(cudaGetDevice(&dev));
    CUDA_ASSERT(cudaGetDeviceProperties(&p, dev));
    if (p.major != 9 || p.minor != 0) GTEST_SKIP() << "the sm_90a wgmma kernels need compute capability 9.0";
  }
};

// Sets LOWBIT_GEMM_S8_KERNEL for the test's lifetime.
class ScopedKernel {
 public:
  explicit ScopedKernel(const char* v) {
    const char* old = std::getenv("LOWBIT_GEMM_S8_KERNEL");
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv("LOWBIT_GEMM_S8_KERNEL", v, 1);
  }
  ~ScopedKernel() {
    if (had_) setenv("LOWBIT_GEMM_S8_KERNEL", old_.c_str(), 1);
    else unsetenv("LOWBIT_GEMM_S8_KERNEL");
  }

 private:
  bool had_ = false;
  std::string old_;
};

// Owning device allocation (tests may allocate; the kernels never do).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes) != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();  // an out-of-memory error must not surface at the next launch check
    }
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  uint8_t* bytes() const { return static_cast<uint8_t*>(ptr_); }
  int8_t* data() const { return static_cast<int8_t*>(ptr_); }
  size_t size() const { return bytes_; }
  bool ok() const { return ptr_ != nullptr; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// The device operands of a GEMM test: A and B (int8), alpha (one fp32, on the device as the kernels
// take it) and out, with typed views.
struct GemmOperands {
  GemmOperands(size_t a_bytes, size_t b_bytes, size_t out_bytes)
      : a(a_bytes), b(b_bytes), alpha(4), out(out_bytes) {}
  bool ok() const { return a.ok() && b.ok() && alpha.ok() && out.ok(); }
  const int8_t* A(size_t off = 0) const { return a.data() + off; }
  const int8_t* B(size_t off = 0) const { return b.data() + off; }
  const float* alpha_ptr() const { return reinterpret_cast<const float*>(alpha.bytes()); }
  DeviceBuffer a, b, alpha, out;
};

// Copies host A, B (whole buffers) and alpha into `d`. Fatal failures return from here only.
inline void upload(const GemmOperands& d, const std::vector<int8_t>& ha, const std::vector<int8_t>& hb,
                   float alpha) {
  CUDA_ASSERT(cudaMemcpy(d.a.bytes(), ha.data(), ha.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(d.b.bytes(), hb.data(), hb.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(d.alpha.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
}

// Byte fill for GEMM outputs: NaN in every output dtype, never a value the kernels produce here.
constexpr uint8_t kOutPoison = 0xFF;

inline int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }

// Poisons all of `out`, runs `launch()` (a Status-returning enqueue on `stream`), waits, checks that no
// error is pending, and copies all of `out` back into *got. With runs > 1 it does it again (re-poisoned,
// same inputs), and every run must give the bytes of the first: determinism. Fatal failures return from
// here only: callers check HasFatalFailure().
template <typename Launch, typename Byte>
void run_on_poisoned(const DeviceBuffer& out, uint8_t poison, cudaStream_t stream, Launch&& launch,
                     std::vector<Byte>* got, int runs = 1) {
  static_assert(sizeof(Byte) == 1, "byte vectors only");
  std::vector<Byte> again;
  for (int run = 0; run < runs; ++run) {
    CUDA_ASSERT(cudaMemset(out.bytes(), poison, out.size()));
    const lowbit::Status st = launch();
    ASSERT_TRUE(st.is_ok()) << st.message;
    CUDA_ASSERT(cudaStreamSynchronize(stream));
    CUDA_ASSERT(cudaGetLastError());
    std::vector<Byte>& dst = run == 0 ? *got : again;
    dst.assign(out.size(), Byte(0));
    CUDA_ASSERT(cudaMemcpy(dst.data(), out.bytes(), out.size(), cudaMemcpyDeviceToHost));
    if (run > 0) {
      ASSERT_TRUE(*got == again) << "run " << run << " on the same inputs gave different bits";
    }
  }
}

// The device side of one GEMM test case: random A and B of a_bytes / b_bytes (every byte, padding
// included: garbage the kernel must not use) into *ha / *hb and onto the device with alpha, then
// run_on_poisoned (kOutPoison, `runs` runs) of `launch(operands)` over an out buffer of out_bytes.
template <typename Launch>
void run_gemm_on_device(std::mt19937& rng, size_t a_bytes, size_t b_bytes, size_t out_bytes, float alpha,
                        cudaStream_t stream, Launch&& launch, int runs, std::vector<int8_t>* ha,
                        std::vector<int8_t>* hb, std::vector<uint8_t>* got) {
  *ha = random_bytes(a_bytes, rng);
  *hb = random_bytes(b_bytes, rng);
  GemmOperands d(a_bytes, b_bytes, out_bytes);
  ASSERT_TRUE(d.ok()) << "cudaMalloc failed";
  upload(d, *ha, *hb, alpha);
  if (::testing::Test::HasFatalFailure()) return;
  run_on_poisoned(d.out, kOutPoison, stream, [&] { return launch(d); }, got, runs);
}

// After the work queued on `stream`: the first n bytes of `d` all still hold `poison` (nothing written).
inline void expect_untouched(const DeviceBuffer& d, size_t n, uint8_t poison, cudaStream_t stream) {
  CUDA_ASSERT(cudaStreamSynchronize(stream));
  std::vector<uint8_t> got(n);
  CUDA_ASSERT(cudaMemcpy(got.data(), d.bytes(), n, cudaMemcpyDeviceToHost));
  for (uint8_t v : got) EXPECT_EQ(v, poison);
}

// Fast deterministic junk for the perf reports' large inputs (xorshift64, one byte a step).
inline std::vector<uint8_t> xorshift_bytes(size_t n) {
  std::vector<uint8_t> h(n);
  uint64_t st = 0x9E3779B97F4A7C15ull;
  for (auto& v : h) {
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    v = uint8_t(st >> 24);
  }
  return h;
}

// The perf reports' two int8 operands: `bytes` bytes of xorshift junk into a, the same reversed into b.
inline void upload_perf_operands(const DeviceBuffer& a, const DeviceBuffer& b, size_t bytes) {
  std::vector<uint8_t> h = xorshift_bytes(bytes);
  CUDA_ASSERT(cudaMemcpy(a.bytes(), h.data(), bytes, cudaMemcpyHostToDevice));
  std::reverse(h.begin(), h.end());
  CUDA_ASSERT(cudaMemcpy(b.bytes(), h.data(), bytes, cudaMemcpyHostToDevice));
}

// Median time of `launch()` (a Status-returning enqueue on `stream`) over 10 runs, timed with CUDA
// events after 2 warm-ups, in ms; -1 when a launch (or an event) fails.
template <typename Launch>
double median_ms(cudaStream_t stream, Launch&& launch) {
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
    if (e0 != nullptr) cudaEventDestroy(e0);
    return -1.0;
  }
  double result = -1.0;
  bool ok = true;
  for (int w = 0; w < 2 && ok; ++w) ok = launch().is_ok();
  std::vector<float> ms;
  for (int r = 0; r < 10 && ok; ++r) {
    cudaEventRecord(e0, stream);
    ok = launch().is_ok();
    if (!ok) break;
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float t = 0.f;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  if (ok) {
    std::sort(ms.begin(), ms.end());
    result = 0.5 * (ms[4] + ms[5]);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return result;
}

}  // namespace lowbit_test
