// cuda::quantize_rows_s8 (quantize_rows.h) against the CPU reference, bitwise.
//
// Every case: rows of several kinds (ordinary values over a wide range of magnitudes, all zeros, one
// inf / -inf / NaN, subnormals only, exact ties after the division), x's padding columns filled with NaN
// (a kernel that read them would turn the row non-finite), q and row_scale poisoned before the run with
// guard bytes on both sides; then the whole q and row_scale buffers, guards and row padding included,
// must equal the bytes the CPU reference leaves in identically poisoned buffers, on two runs (determinism).
// Shapes cover both thread-group sizes (a warp per short row, a CTA per long row), N % 8 tails, and the
// vector and element paths (x base offset by one element, odd strides, q offset / odd ldq).
// Skipped at run time when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/quantize_rows.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using namespace lowbit_test;

constexpr uint8_t kQPoison = 0xA5;
constexpr uint8_t kScalePoison = 0xFF;  // 0xFFFFFFFF: a NaN, but never the canonical one the kernel writes
constexpr size_t kGuard = 32;           // poisoned bytes before and after q, and floats around row_scale

class CudaQuantizeRows : public CudaStreamTest {};

struct RowsCase {
  DType t;
  int64_t M, N, ldx, ldq;
  size_t x_off;  // elements the x base is moved by (breaks 16-byte alignment when odd)
  size_t q_off;  // bytes the q base is moved by
  int qmax;
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(t) << " M=" << M << " N=" << N << " ldx=" << ldx << " ldq=" << ldq << " x_off=" << x_off
       << " q_off=" << q_off << " qmax=" << qmax;
    return os.str();
  }
};

void put(std::vector<uint8_t>& buf, size_t idx, DType t, float v) {
  if (t == DType::kFloat32) {
    std::memcpy(&buf[idx * 4], &v, 4);
  } else {
    const uint16_t h = t == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
    std::memcpy(&buf[idx * 2], &h, 2);
  }
}

// Row `i` of kind i % 8 (see the top of the file) at element index `base`; padding [N, ldx) is NaN.
void fill_row(std::vector<uint8_t>& buf, DType t, size_t base, int64_t i, int64_t N, int64_t ldx, int qmax,
              std::mt19937& g) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int64_t> pos(0, N - 1);
  const bool half = t == DType::kFloat16;
  const float mag = std::ldexp(1.0f, int(g() % (half ? 24 : 160)) - (half ? 12 : 80));
  for (int64_t j = N; j < ldx; ++j) put(buf, base + size_t(j), t, std::nanf(""));
  const int kind = int(i % 8);
  if (kind == 1) {  // zeros of both signs
    for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, j % 2 ? -0.0f : 0.0f);
    return;
  }
  if (kind == 5) {  // subnormals of the format (scale rounds coarsely, or underflows to 0 in fp32)
    const float unit = t == DType::kFloat32 ? std::numeric_limits<float>::denorm_min()
                                            : (half ? std::ldexp(1.0f, -24) : std::ldexp(1.0f, -133));
    for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, float(int(g() % 201) - 100) * unit);
    return;
  }
  if (kind == 6) {  // ties: one element +-qmax * s fixes the scale at s (a power of two), the rest (k + 1/2) s
    const float s = std::ldexp(1.0f, half ? int(g() % 8) - 8 : int(g() % 40) - 20);
    for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, (float(int(g() % (2 * qmax)) - qmax) + 0.5f) * s);
    put(buf, base + size_t(pos(g)), t, float(g() % 2 ? qmax : -qmax) * s);
    return;
  }
  for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, normal(g) * mag);
  if (kind == 2) put(buf, base + size_t(pos(g)), t, std::numeric_limits<float>::infinity());
  if (kind == 3) put(buf, base + size_t(pos(g)), t, -std::numeric_limits<float>::infinity());
  if (kind == 4) put(buf, base + size_t(pos(g)), t, std::nanf(""));
}

// Bytes of the q and row_scale buffers after a run: q at [kGuard + q_off, ...), row_scale at float kGuard.
struct Outputs {
  std::vector<uint8_t> q, rs;
};

size_t q_bytes(const RowsCase& c) { return kGuard + c.q_off + size_t(c.M * c.ldq) + kGuard; }
size_t rs_bytes(const RowsCase& c) { return (2 * kGuard + size_t(c.M)) * 4; }

// Device run on poisoned buffers, twice; both runs must leave the same bytes.
void run_device(const RowsCase& c, const DeviceBuffer& dx, CUstream_st* stream, Outputs* out) {
  const size_t es = dtype_size(c.t);
  DeviceBuffer dq(q_bytes(c)), drs(rs_bytes(c));
  ASSERT_TRUE(dq.ok() && drs.ok()) << "cudaMalloc failed";
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  for (int run = 0; run < 2; ++run) {
    CUDA_ASSERT(cudaMemset(dq.bytes(), kQPoison, dq.size()));
    CUDA_ASSERT(cudaMemset(drs.bytes(), kScalePoison, drs.size()));
    const Status st = lowbit::cuda::quantize_rows_s8(c.t, dx.bytes() + c.x_off * es, c.M, c.N, c.ldx, c.qmax,
                                                     dq.data() + kGuard + c.q_off, c.ldq,
                                                     reinterpret_cast<float*>(drs.bytes()) + kGuard, stream);
    ASSERT_TRUE(st.is_ok()) << st.message;
    CUDA_ASSERT(cudaStreamSynchronize(s));
    CUDA_ASSERT(cudaGetLastError());
    Outputs o{std::vector<uint8_t>(dq.size()), std::vector<uint8_t>(drs.size())};
    CUDA_ASSERT(cudaMemcpy(o.q.data(), dq.bytes(), o.q.size(), cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(o.rs.data(), drs.bytes(), o.rs.size(), cudaMemcpyDeviceToHost));
    if (run == 0) {
      *out = std::move(o);
    } else {
      ASSERT_TRUE(o.q == out->q && o.rs == out->rs) << "a second run on the same inputs gave different bits";
    }
  }
}

// The CPU reference on identically poisoned host buffers.
Outputs run_cpu_ref(const RowsCase& c, const std::vector<uint8_t>& hx) {
  const size_t es = dtype_size(c.t);
  Outputs o{std::vector<uint8_t>(q_bytes(c), kQPoison), std::vector<uint8_t>(rs_bytes(c), kScalePoison)};
  const Status st = lowbit::cpu::quantize_rows_s8_ref(c.t, hx.data() + c.x_off * es, c.M, c.N, c.ldx, c.qmax,
                                                      reinterpret_cast<int8_t*>(o.q.data()) + kGuard + c.q_off, c.ldq,
                                                      reinterpret_cast<float*>(o.rs.data()) + kGuard);
  EXPECT_TRUE(st.is_ok()) << "CPU reference failed: " << st.message;
  return o;
}

// Compares, naming the first differing element.
void expect_equal(const RowsCase& c, const Outputs& got, const Outputs& want) {
  for (size_t b = 0; b < got.rs.size(); b += 4)
    if (std::memcmp(&got.rs[b], &want.rs[b], 4) != 0) {
      const int64_t i = int64_t(b / 4) - int64_t(kGuard);
      float g, w;
      std::memcpy(&g, &got.rs[b], 4);
      std::memcpy(&w, &want.rs[b], 4);
      FAIL() << "row_scale differs at index " << i << (i < 0 || i >= c.M ? " (guard: written out of range)" : "")
             << ": got " << g << " (0x" << std::hex << lowbit::float_to_bits(g) << "), want " << std::dec << w
             << " (0x" << std::hex << lowbit::float_to_bits(w) << ")";
    }
  for (size_t b = 0; b < got.q.size(); ++b)
    if (got.q[b] != want.q[b]) {
      const int64_t e = int64_t(b) - int64_t(kGuard + c.q_off);
      const int64_t i = e >= 0 ? e / c.ldq : -1, j = e >= 0 ? e % c.ldq : e;
      const bool outside = i < 0 || i >= c.M || j >= c.N;
      FAIL() << "q byte differs at row " << i << " col " << j << (outside ? " (guard or row padding)" : "")
             << ": got " << int(int8_t(got.q[b])) << ", want " << int(int8_t(want.q[b]));
    }
}

void run_case(const RowsCase& c, std::mt19937& g, CUstream_st* stream) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.t);
  std::vector<uint8_t> hx((c.x_off + size_t(c.M * c.ldx)) * es, 0);
  for (int64_t i = 0; i < c.M; ++i) fill_row(hx, c.t, c.x_off + size_t(i * c.ldx), i, c.N, c.ldx, c.qmax, g);
  DeviceBuffer dx(hx.size());
  ASSERT_TRUE(dx.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
  Outputs got;
  run_device(c, dx, stream, &got);
  if (::testing::Test::HasFatalFailure()) return;
  expect_equal(c, got, run_cpu_ref(c, hx));
}

// Layout variants of one (M, N): tight and aligned (vector x; vector q stores when N % V == 0), x base off
// by one element (element path), odd ldx (element path for 16-bit types), padded aligned ldx with an odd
// ldq and a q base off by 3 (vector x, byte stores).
std::vector<RowsCase> variants(DType t, int64_t M, int64_t N, int qmax) {
  const int64_t padded = (N + 7) / 8 * 8 + 8;
  return {{t, M, N, N, N, 0, 0, qmax},
          {t, M, N, N, N, 1, 0, qmax},
          {t, M, N, N + 3, N, 0, 0, qmax},
          {t, M, N, padded, N + 5, 0, 3, qmax}};
}

TEST_F(CudaQuantizeRows, MatchesReferenceOddShapes) {
  // N: 1, 7 (tails only), 8 / 64 (whole chunks), 1000, 1024 (the last warp-per-row width for 16-bit
  // types: 128 chunks), 1032 (the first CTA-per-row one), 4097, 28672.
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},   {3, 7},    {17, 8},  {9, 64},  {5, 1000},
                                                {3, 1024}, {3, 1032}, {1, 4097}, {3, 4097}, {2, 28672}};
  const int qmaxes[] = {127, 7, 1};
  std::mt19937 g(20260611);
  int k = 0;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (const auto& s : shapes)
      for (const RowsCase& c : variants(t, s.first, s.second, qmaxes[k++ % 3])) {
        run_case(c, g, stream());
        if (HasFatalFailure()) return;
      }
}

// Many rows: grid sizing and the warp-per-row CTAs (8 rows each, the last one partial), and the CTA-per-row
// kernel over thousands of rows.
TEST_F(CudaQuantizeRows, ManyRows) {
  std::mt19937 g(5);
  const RowsCase cases[] = {{DType::kBFloat16, 8191, 7, 7, 7, 0, 0, 127},
                            {DType::kFloat32, 20001, 1, 1, 1, 0, 0, 127},
                            {DType::kFloat16, 8193, 24, 24, 24, 0, 0, 127},
                            {DType::kBFloat16, 1500, 1040, 1040, 1040, 0, 0, 127}};
  for (const RowsCase& c : cases) {
    run_case(c, g, stream());
    if (HasFatalFailure()) return;
  }
}

// Gradient-sized shapes (excluded from sanitizer runs by name).
TEST_F(CudaQuantizeRows, LargeShapes) {
  std::mt19937 g(11);
  const RowsCase cases[] = {{DType::kBFloat16, 8192, 4096, 4096, 4096, 0, 0, 127},
                            {DType::kBFloat16, 64, 28672, 28672, 28672, 0, 0, 127},
                            {DType::kFloat16, 300, 28672, 28672, 28672, 1, 0, 127},
                            {DType::kFloat32, 257, 28672, 28672, 28672, 0, 0, 127}};
  for (const RowsCase& c : cases) {
    run_case(c, g, stream());
    if (HasFatalFailure()) return;
  }
}

// CPU and CUDA must form the same scale and round x / scale identically (IEEE division, then half to even).
// The hard inputs lie at or next to a half-integer quotient: for many row maxima (so many scales,
// including subnormal ones, and one whose scale underflows to 0 so that x / 0 gives +-inf and 0 / 0 NaN),
// every (n + 1/2) * scale for |n| < qmax, rounded to fp32, and its 4 fp32 neighbours each side. Both
// kernel paths (16-byte vector and element loads).
TEST_F(CudaQuantizeRows, ExactAtHalfIntegerBoundaries) {
  std::mt19937 g(2026);
  std::vector<float> amaxes = {127.0f, 1.0f, 0.1f, 3.0f, 1e-3f, 12.5f, std::nextafter(2.0f, 0.0f), 0x1p-60f,
                               0x1p60f, 1e-38f, 3e-39f, 1e-43f, 3e38f,
                               3e-44f /* 21 subnormal units: at qmax 127 the scale underflows to 0 */};
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  for (int i = 0; i < 40; ++i) amaxes.push_back(std::ldexp(mant(g), int(g() % 60) - 30));
  for (int qmax : {127, 7}) {
    int64_t N = 0;
    std::vector<std::vector<float>> rows;
    for (float amax : amaxes) {
      const float s = amax / float(qmax);
      std::vector<float> r = {amax};
      for (int n = -qmax; n < qmax; ++n) {
        float v = float((double(n) + 0.5) * double(s));
        for (int k = 0; k < 4; ++k) v = std::nextafter(v, -INFINITY);
        for (int k = 0; k < 9; ++k, v = std::nextafter(v, INFINITY)) r.push_back(std::fabs(v) <= amax ? v : 0.0f);
      }
      N = std::max<int64_t>(N, int64_t(r.size()));
      rows.push_back(r);
    }
    const RowsCase base{DType::kFloat32, int64_t(rows.size()), N, N, N, 0, 0, qmax};
    for (size_t x_off : {size_t(0), size_t(1)}) {
      RowsCase c = base;
      c.x_off = x_off;
      SCOPED_TRACE(c.str());
      std::vector<uint8_t> hx((x_off + size_t(c.M * N)) * 4, 0);
      for (size_t i = 0; i < rows.size(); ++i)
        std::memcpy(&hx[(x_off + i * size_t(N)) * 4], rows[i].data(), rows[i].size() * 4);
      DeviceBuffer dx(hx.size());
      ASSERT_TRUE(dx.ok());
      CUDA_ASSERT(cudaMemcpy(dx.bytes(), hx.data(), hx.size(), cudaMemcpyHostToDevice));
      Outputs got;
      run_device(c, dx, stream(), &got);
      if (HasFatalFailure()) return;
      expect_equal(c, got, run_cpu_ref(c, hx));
      if (HasFatalFailure()) return;
    }
  }
}

TEST_F(CudaQuantizeRows, EmptyIsNoOp) {
  DeviceBuffer dq(16), drs(16);
  ASSERT_TRUE(dq.ok() && drs.ok());
  CUDA_ASSERT(cudaMemset(dq.bytes(), 0x5A, 16));
  CUDA_ASSERT(cudaMemset(drs.bytes(), 0x5A, 16));
  float* rs = reinterpret_cast<float*>(drs.bytes());
  using lowbit::cuda::quantize_rows_s8;
  EXPECT_TRUE(quantize_rows_s8(DType::kFloat32, dq.bytes(), 0, 5, 5, 127, dq.data(), 5, rs, stream()).is_ok());
  EXPECT_TRUE(quantize_rows_s8(DType::kBFloat16, dq.bytes(), 4, 0, 0, 127, dq.data(), 0, rs, stream()).is_ok());
  EXPECT_TRUE(quantize_rows_s8(DType::kFloat16, nullptr, 0, 5, 5, 127, nullptr, 5, nullptr, stream()).is_ok());
  EXPECT_TRUE(quantize_rows_s8(DType::kFloat16, nullptr, 3, 0, 0, 127, nullptr, 0, nullptr, stream()).is_ok());
  expect_untouched(dq, 16, 0x5A, stream_);
  expect_untouched(drs, 16, 0x5A, stream_);
}

TEST_F(CudaQuantizeRows, RejectsInvalidArguments) {
  DeviceBuffer dx(4096), dq(4096), drs(256);
  ASSERT_TRUE(dx.ok() && dq.ok() && drs.ok());
  CUDA_ASSERT(cudaMemset(dq.bytes(), 0x5A, 4096));
  const void* x = dx.bytes();
  int8_t* q = dq.data();
  float* rs = reinterpret_cast<float*>(drs.bytes());
  using lowbit::cuda::quantize_rows_s8;
  const DType f32 = DType::kFloat32;
  expect_invalid(quantize_rows_s8(f32, nullptr, 4, 4, 4, 127, q, 4, rs, stream()), "x null", "x must not be null");
  expect_invalid(quantize_rows_s8(f32, x, 4, 4, 4, 127, nullptr, 4, rs, stream()), "q null", "q must not be null");
  expect_invalid(quantize_rows_s8(f32, x, 4, 4, 4, 127, q, 4, nullptr, stream()), "row_scale null",
                 "row_scale must not be null");
  expect_invalid(quantize_rows_s8(f32, x, -1, 4, 4, 127, q, 4, rs, stream()), "M < 0", "M must be >= 0, got -1");
  expect_invalid(quantize_rows_s8(f32, x, 4, -1, 4, 127, q, 4, rs, stream()), "N < 0", "N must be >= 0, got -1");
  expect_invalid(quantize_rows_s8(f32, x, 4, 8, 7, 127, q, 8, rs, stream()), "ldx < N", "ldx must be >= N (8), got 7");
  expect_invalid(quantize_rows_s8(f32, x, 4, 8, 8, 127, q, 6, rs, stream()), "ldq < N", "ldq must be >= N (8), got 6");
  expect_invalid(quantize_rows_s8(f32, x, 4, 4, 4, 0, q, 4, rs, stream()), "qmax 0", "qmax must be in [1, 127], got 0");
  expect_invalid(quantize_rows_s8(f32, x, 4, 4, 4, 128, q, 4, rs, stream()), "qmax 128", "got 128");
  expect_invalid(quantize_rows_s8(static_cast<DType>(7), x, 4, 4, 4, 127, q, 4, rs, stream()), "bad dtype", "xtype");
  const Status s = quantize_rows_s8(f32, x, 4, 4, 4, 0, q, 4, rs, stream());
  EXPECT_EQ(s.message.rfind("lowbit::cuda::quantize_rows_s8", 0), 0u) << s.message;
  expect_untouched(dq, 4096, 0x5A, stream_);
  CUDA_ASSERT(cudaGetLastError());
}

// Not a correctness test: throughput at SwitchBack gradient shapes, for the record (median of 10 runs
// timed with CUDA events after 2 warm-ups). Bytes = x read once + codes written + scales (the re-read of
// pass 2 should hit L1 / L2 and is not counted). Printed as "[perf] ..." lines and test properties.
// Excluded from sanitizer runs.
TEST_F(CudaQuantizeRows, PerfReport) {
  struct Shape {
    DType t;
    int64_t M, N;
  };
  const Shape shapes[] = {{DType::kBFloat16, 8192, 4096},
                          {DType::kBFloat16, 8192, 14336},
                          {DType::kBFloat16, 8192, 28672},
                          {DType::kFloat16, 8192, 4096},
                          {DType::kFloat32, 8192, 4096},
                          {DType::kBFloat16, 8192, 1024}};
  size_t max_x = 0, max_q = 0;
  for (const auto& s : shapes) {
    max_x = std::max(max_x, size_t(s.M * s.N) * dtype_size(s.t));
    max_q = std::max(max_q, size_t(s.M * s.N));
  }
  DeviceBuffer dx(max_x), dq(max_q), drs(8192 * 4);
  ASSERT_TRUE(dx.ok() && dq.ok() && drs.ok()) << "cudaMalloc failed";
  for (const auto& s : shapes) {
    // Normal values of a per-row magnitude, 4 MiB of them repeated over the buffer (finite: the division's
    // slow path stays out of the timing, as in real gradients).
    const size_t es = dtype_size(s.t), bytes = size_t(s.M * s.N) * es;
    {
      std::mt19937 g(1);
      std::normal_distribution<float> normal(0.f, 1.f);
      std::vector<uint8_t> h(size_t(4) << 20);
      for (size_t e = 0; e < h.size() / es; ++e) put(h, e, s.t, normal(g) * std::ldexp(1.0f, int(e / 4099 % 16) - 8));
      for (size_t off = 0; off < bytes; off += h.size())
        CUDA_ASSERT(cudaMemcpy(dx.bytes() + off, h.data(), std::min(h.size(), bytes - off), cudaMemcpyHostToDevice));
    }
    const double ms = median_ms(stream_, [&] {
      return lowbit::cuda::quantize_rows_s8(s.t, dx.bytes(), s.M, s.N, s.N, 127, dq.data(), s.N,
                                            reinterpret_cast<float*>(drs.bytes()), stream());
    });
    ASSERT_GT(ms, 0.0) << "quantize_rows launch failed";
    const double moved = double(s.M) * double(s.N) * double(es + 1) + double(s.M) * 4.0;
    const double gbs = moved / (ms * 1e-3) / 1e9;
    std::printf("[perf] quantize_rows_s8 %s M=%lld N=%lld: %.3f ms, %.0f GB/s (x read once + codes written)\n",
                lowbit::dtype_name(s.t), (long long)s.M, (long long)s.N, ms, gbs);
    RecordProperty(std::string("quantize_rows_") + lowbit::dtype_name(s.t) + "_" + std::to_string(s.M) + "x" +
                       std::to_string(s.N) + "_GBps",
                   std::to_string(gbs));
  }
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
