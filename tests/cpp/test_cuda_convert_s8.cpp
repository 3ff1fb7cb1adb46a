// cuda::cast_s8 / cuda::transpose_s8 (convert_s8.h) against the CPU kernels, bitwise.
//
// Every case: random codes (row padding included: junk the kernels must not carry into the output), the
// output buffer poisoned with guard bytes before (the base offset) and after it, the kernel run twice
// (determinism); then the whole device buffer, row padding and guards included, must equal what the CPU
// kernel leaves in an identically poisoned host buffer. Shapes and layouts drive every path: for the cast
// the vector load / store pairs (bases and strides aligned or not, dense pairs folded into one row, row
// tails shorter than a unit, rows shorter than a unit), for the transpose partial 64 x 64 tiles, the
// 16-byte and bytewise global accesses on either side, and long thin shapes with many tiles. "Large"
// tests cover more than one grid-stride step and the perf shapes; they and PerfReport are left out of the
// sanitizer runs. Skipped at run time when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
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
#include "lowbit/kernels/convert_s8.h"
#include "convert_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using namespace lowbit_test;

constexpr uint8_t kPoison = 0xA5;  // no int8 converts to 0xA5A5 / 0xA5A5A5A5; transpose: 1 in 256 bytes match
constexpr int64_t kGuard = 40;     // poisoned bytes after the output

const int64_t kSizes[] = {1, 3, 17, 63, 64, 65, 129, 1000, 4097};
const DType kTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

class CudaConvertS8 : public CudaStreamTest {};

// Uploads all of q, runs `launch(device q, device out)` twice on a poisoned output buffer of out_bytes and
// returns that whole buffer.
template <typename Launch>
void run_device(const std::vector<int8_t>& q, size_t out_bytes, cudaStream_t stream, Launch&& launch,
                std::vector<uint8_t>* got) {
  DeviceBuffer dq(q.size()), dout(out_bytes);
  ASSERT_TRUE(dq.ok() && dout.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(dq.bytes(), q.data(), q.size(), cudaMemcpyHostToDevice));
  run_on_poisoned(dout, kPoison, stream, [&] { return launch(dq.data(), dout.bytes()); }, got, 2);
}

void expect_same_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, size_t elem,
                       int64_t off_elems, int64_t ld) {
  ASSERT_EQ(got.size(), want.size());
  if (got == want) return;
  size_t e = 0;
  while (std::memcmp(&got[e * elem], &want[e * elem], elem) == 0) ++e;
  const int64_t rel = int64_t(e) - off_elems;
  FAIL() << "first difference at element " << e << " of " << got.size() / elem << " (output row "
         << (rel >= 0 ? rel / ld : -1) << ", col " << (rel >= 0 ? rel % ld : rel) << ")";
}

// ---------------------------------------------------------------------------------------------------
// cast_s8

using lowbit_test::CastCase;

void check_cast(const CastCase& c, std::mt19937& rng, cudaStream_t stream) {
  SCOPED_TRACE(c.str());
  const std::vector<int8_t> q = random_bytes(size_t(c.q_off + c.M * c.ldq), rng);
  const size_t es = dtype_size(c.t), bytes = size_t(c.out_off + c.M * c.ldo) * es + kGuard;
  std::vector<uint8_t> want(bytes, kPoison), got;
  const Status s =
      lowbit::cpu::cast_s8(q.data() + c.q_off, c.M, c.N, c.ldq, c.t, want.data() + c.out_off * es, c.ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  run_device(q, bytes, stream, [&](const int8_t* dq, uint8_t* dout) {
    return lowbit::cuda::cast_s8(dq + c.q_off, c.M, c.N, c.ldq, c.t, dout + c.out_off * es, c.ldo,
                                 reinterpret_cast<CUstream_st*>(stream));
  }, &got);
  if (::testing::Test::HasFatalFailure()) return;
  expect_same_bytes(got, want, es, c.out_off, c.ldo);
}

// Every pair of sizes, dtypes and layouts cycling: aligned padded strides (vector loads and stores), dense
// (folded into one row), q off alignment (element loads), out off alignment (element stores), odd strides.
TEST_F(CudaConvertS8, CastMatchesCpu) {
  std::mt19937 rng(21);
  int k = 0;
  for (int64_t M : kSizes)
    for (int64_t N : kSizes) {
      if (M * N > (int64_t(1) << 22)) continue;
      const DType t = kTypes[k % 3];
      CastCase c{t, M, N, N, N, 0, 0};
      switch (k % 5) {
        case 0: c.ldq = round_up16(N); c.ldo = round_up16(N); break;
        case 1: break;
        case 2: c.ldq = round_up16(N) + 16; c.ldo = round_up16(N); c.q_off = 1; break;
        case 3: c.ldq = round_up16(N); c.ldo = N + 8; c.out_off = 1; break;
        case 4: c.ldq = N + 3; c.ldo = N + 5; c.q_off = 2; c.out_off = 3; break;
      }
      check_cast(c, rng, stream_);
      if (HasFatalFailure()) return;
      ++k;
    }
}

// Each path with each dtype on a few shapes: the unit (8 codes for 16-bit outputs, 4 for fp32) against
// row lengths, strides and base offsets.
TEST_F(CudaConvertS8, CastPathsAndTails) {
  std::mt19937 rng(22);
  for (DType t : kTypes) {
    const CastCase cases[] = {
        {t, 64, 256, 256, 256, 0, 0},      // dense, vector both ways
        {t, 33, 129, 144, 136, 0, 0},      // padded aligned strides, 1-code row tails
        {t, 7, 4097, 4112, 4104, 0, 0},    // long rows, vector with tails
        {t, 63, 17, 17, 17, 0, 0},         // dense odd N: one row of 1071
        {t, 63, 17, 17, 17, 8, 4},         // the same, q 8 bytes off (loads aligned), out 4 elements off
        {t, 33, 129, 144, 136, 1, 0},      // q off alignment: byte loads, vector stores
        {t, 33, 129, 144, 136, 0, 1},      // out off alignment: vector loads, element stores
        {t, 33, 129, 131, 133, 0, 0},      // odd strides: neither
        {t, 1, 10001, 10001, 10001, 3, 5},  // one row, both bases off
        {t, 2000, 3, 8, 8, 0, 0},          // rows shorter than a unit, aligned strides
        {t, 2000, 5, 5, 6, 1, 1},          // the same, nothing aligned
        {t, 5, 8, 8, 12, 0, 0},            // fp32: ldo * 4 = 48 (aligned); 16-bit: 24 (not)
    };
    for (const auto& c : cases) {
      check_cast(c, rng, stream_);
      if (HasFatalFailure()) return;
    }
  }
}

// More units than one grid step covers (blocks are capped at 32 per SM, 8192 codes each per step).
TEST_F(CudaConvertS8, CastLargeMatchesCpu) {
  std::mt19937 rng(23);
  check_cast({DType::kBFloat16, 8192, 8192, 8192, 8192, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_cast({DType::kFloat32, 4099, 8192, 8208, 8200, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_cast({DType::kFloat16, 4097, 8191, 8193, 8200, 1, 0}, rng, stream_);
}

TEST_F(CudaConvertS8, CastEmptyIsNoOp) {
  DeviceBuffer d(256);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.bytes(), 0x5A, 256));
  for (DType t : kTypes) {
    EXPECT_TRUE(lowbit::cuda::cast_s8(nullptr, 0, 5, 0, t, nullptr, 0, stream()).is_ok());
    EXPECT_TRUE(lowbit::cuda::cast_s8(nullptr, 4, 0, 0, t, nullptr, 0, stream()).is_ok());
    EXPECT_TRUE(lowbit::cuda::cast_s8(d.data(), 0, 4, 4, t, d.bytes() + 64, 4, stream()).is_ok());
    EXPECT_TRUE(lowbit::cuda::cast_s8(d.data(), 4, 0, 4, t, d.bytes() + 64, 4, stream()).is_ok());
  }
  expect_untouched(d, 256, 0x5A, stream_);
  CUDA_ASSERT(cudaGetLastError());
}

// The checks are the CPU's (one function): spot-check that they are applied, with the CUDA name.
TEST_F(CudaConvertS8, CastRejectsInvalidArguments) {
  DeviceBuffer d(4096);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.bytes(), 0x5A, 4096));
  using lowbit::cuda::cast_s8;
  const int8_t* q = d.data();
  uint8_t* o = d.bytes() + 1024;
  const DType bf = DType::kBFloat16;
  expect_invalid(cast_s8(q, -1, 4, 4, bf, o, 4, stream()), "M < 0", "M must be >= 0, got -1");
  expect_invalid(cast_s8(q, 4, 8, 7, bf, o, 8, stream()), "ldq < N", "ldq must be >= N (8), got 7");
  expect_invalid(cast_s8(q, 4, 8, 8, bf, o, 6, stream()), "ldo < N", "ldo must be >= N (8), got 6");
  expect_invalid(cast_s8(q, 4, 4, 4, static_cast<DType>(5), o, 4, stream()), "bad otype", "otype must be");
  expect_invalid(cast_s8(nullptr, 4, 4, 4, bf, o, 4, stream()), "q null", "q must not be null");
  expect_invalid(cast_s8(q, 4, 4, 4, bf, nullptr, 4, stream()), "out null", "out must not be null");
  expect_invalid(cast_s8(q, 4, 4, 4, bf, o + 1, 4, stream()), "out misaligned", "address % 2, got 1");
  expect_invalid(cast_s8(q, 4, 4, 4, DType::kFloat32, o + 2, 4, stream()), "fp32 out misaligned", "got 2");
  expect_invalid(cast_s8(q, 4, 4, std::numeric_limits<int64_t>::max() / 2, bf, o, 4, stream()), "overflow",
                 "M * ldq must fit int64");
  const Status s = cast_s8(q, -1, 4, 4, bf, o, 4, stream());
  EXPECT_EQ(s.message.rfind("lowbit::cuda::cast_s8: ", 0), 0u) << s.message;
  expect_untouched(d, 4096, 0x5A, stream_);
  CUDA_ASSERT(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------------
// transpose_s8

using lowbit_test::TransposeCase;

void check_transpose(const TransposeCase& c, std::mt19937& rng, cudaStream_t stream) {
  SCOPED_TRACE(c.str());
  const std::vector<int8_t> q = random_bytes(size_t(c.q_off + c.M * c.ldq), rng);
  const size_t bytes = size_t(c.out_off + c.N * c.ldo + kGuard);
  std::vector<uint8_t> want(bytes, kPoison), got;
  const Status s = lowbit::cpu::transpose_s8(q.data() + c.q_off, c.M, c.N, c.ldq,
                                             reinterpret_cast<int8_t*>(want.data()) + c.out_off, c.ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  run_device(q, bytes, stream, [&](const int8_t* dq, uint8_t* dout) {
    return lowbit::cuda::transpose_s8(dq + c.q_off, c.M, c.N, c.ldq, reinterpret_cast<int8_t*>(dout) + c.out_off,
                                      c.ldo, reinterpret_cast<CUstream_st*>(stream));
  }, &got);
  if (::testing::Test::HasFatalFailure()) return;
  expect_same_bytes(got, want, 1, c.out_off, c.ldo);
}

// Every pair of sizes, layouts cycling: aligned padded strides (16-byte loads and stores), dense (vector
// only where the sizes are multiples of 16), q off alignment (byte loads), out off alignment (byte
// stores), odd strides and offsets.
// The scaled form (dequantized GEMM operand): CUDA vs the CPU kernel, bitwise, for scales that give
// normal, subnormal and overflowing (inf) outputs; vector and element paths.
TEST_F(CudaConvertS8, CastScaledMatchesCpu) {
  std::mt19937 rng(78);
  const float scales[] = {3.7e-3f, -0.031f, 1234.5f, 6.1e-6f, 0.0f, 1e-30f};
  const CastCase cases[] = {{DType::kBFloat16, 33, 1000, 1008, 1000, 0, 0}, {DType::kFloat16, 5, 77, 80, 80, 0, 0},
                            {DType::kFloat32, 9, 129, 131, 130, 1, 1},     {DType::kBFloat16, 1, 4097, 4097, 4097, 3, 1},
                            {DType::kFloat16, 64, 64, 64, 64, 0, 0}};
  for (const CastCase& c : cases)
    for (float sc : scales) {
      SCOPED_TRACE(c.str() + " scale=" + std::to_string(sc));
      const std::vector<int8_t> q = random_bytes(size_t(c.q_off + c.M * c.ldq), rng);
      const size_t es = dtype_size(c.t), bytes = size_t(c.out_off + c.M * c.ldo) * es + kGuard;
      std::vector<uint8_t> want(bytes, kPoison), got;
      ASSERT_TRUE(
          lowbit::cpu::cast_s8(q.data() + c.q_off, c.M, c.N, c.ldq, c.t, want.data() + c.out_off * es, c.ldo, &sc)
              .is_ok());
      DeviceBuffer ds(4);
      ASSERT_TRUE(ds.ok());
      CUDA_ASSERT(cudaMemcpy(ds.bytes(), &sc, 4, cudaMemcpyHostToDevice));
      run_device(q, bytes, stream_, [&](const int8_t* dq, uint8_t* dout) {
        return lowbit::cuda::cast_s8(dq + c.q_off, c.M, c.N, c.ldq, c.t, dout + c.out_off * es, c.ldo, stream(),
                                     reinterpret_cast<const float*>(ds.bytes()));
      }, &got);
      if (HasFatalFailure()) return;
      expect_same_bytes(got, want, es, c.out_off, c.ldo);
      if (HasFatalFailure()) return;
    }
}

TEST_F(CudaConvertS8, TransposeMatchesCpu) {
  std::mt19937 rng(24);
  int k = 0;
  for (int64_t M : kSizes)
    for (int64_t N : kSizes) {
      if (M * N > (int64_t(1) << 22)) continue;
      TransposeCase c{M, N, N, M, 0, 0};
      switch (k % 5) {
        case 0: c.ldq = round_up16(N); c.ldo = round_up16(M); break;
        case 1: break;
        case 2: c.ldq = round_up16(N) + 16; c.ldo = round_up16(M); c.q_off = 1; break;
        case 3: c.ldq = round_up16(N); c.ldo = round_up16(M) + 32; c.out_off = 8; break;
        case 4: c.ldq = N + 3; c.ldo = M + 5; c.q_off = 2; c.out_off = 3; break;
      }
      check_transpose(c, rng, stream_);
      if (HasFatalFailure()) return;
      ++k;
    }
}

TEST_F(CudaConvertS8, TransposePathsAndThinShapes) {
  std::mt19937 rng(25);
  const TransposeCase cases[] = {
      {64, 64, 64, 64, 0, 0},             // one whole tile, vector both ways
      {128, 192, 192, 128, 0, 0},         // whole tiles
      {128, 192, 192, 128, 16, 32},       // the same off 16-byte multiples
      {130, 200, 208, 144, 0, 0},         // partial tiles, aligned strides
      {130, 200, 208, 144, 4, 0},         // q 4-aligned only: byte loads
      {130, 200, 208, 144, 0, 4},         // out 4-aligned only: byte stores
      {1, 100001, 100001, 16, 0, 0},      // one row of q: many tiles along N; ldq never used
      {1, 100001, 100001, 1, 0, 0},       // the same, out rows of one byte
      {100001, 1, 16, 100001, 0, 0},      // one column: one out row, many tiles along M
      {100001, 2, 2, 100016, 0, 0},       // two columns, q rows of 2 bytes
      {3, 70001, 70016, 16, 0, 0},        // short and wide
      {70001, 3, 16, 70016, 0, 0},        // tall and narrow
  };
  for (const auto& c : cases) {
    check_transpose(c, rng, stream_);
    if (HasFatalFailure()) return;
  }
}

// More tiles than one grid-stride step (64 blocks per SM), and the shapes of the perf report.
TEST_F(CudaConvertS8, TransposeLargeMatchesCpu) {
  std::mt19937 rng(26);
  check_transpose({8192, 8192, 8192, 8192, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_transpose({4096, 11008, 11008, 4096, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_transpose({4099, 8191, 8193, 4100, 1, 2}, rng, stream_);
}

TEST_F(CudaConvertS8, TransposeEmptyIsNoOp) {
  DeviceBuffer d(256);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.bytes(), 0x5A, 256));
  EXPECT_TRUE(lowbit::cuda::transpose_s8(nullptr, 0, 5, 0, nullptr, 0, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::transpose_s8(nullptr, 4, 0, 0, nullptr, 0, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::transpose_s8(d.data(), 0, 4, 4, d.data() + 64, 4, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::transpose_s8(d.data(), 4, 0, 4, d.data() + 64, 4, stream()).is_ok());
  expect_untouched(d, 256, 0x5A, stream_);
  CUDA_ASSERT(cudaGetLastError());
}

TEST_F(CudaConvertS8, TransposeRejectsInvalidArguments) {
  DeviceBuffer d(4096);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.bytes(), 0x5A, 4096));
  using lowbit::cuda::transpose_s8;
  const int8_t* q = d.data();
  int8_t* o = d.data() + 1024;
  expect_invalid(transpose_s8(q, 4, -1, 4, o, 4, stream()), "N < 0", "N must be >= 0, got -1");
  expect_invalid(transpose_s8(q, 4, 8, 7, o, 4, stream()), "ldq < N", "ldq must be >= N (8), got 7");
  expect_invalid(transpose_s8(q, 8, 4, 4, o, 7, stream()), "ldo < M", "ldo must be >= M (8), got 7");
  expect_invalid(transpose_s8(nullptr, 4, 4, 4, o, 4, stream()), "q null", "q must not be null");
  expect_invalid(transpose_s8(q, 4, 4, 4, nullptr, 4, stream()), "out null", "out must not be null");
  expect_invalid(transpose_s8(q, 4, 4, 4, o, std::numeric_limits<int64_t>::max() / 2, stream()), "overflow",
                 "N * ldo must fit int64");
  const Status s = transpose_s8(q, 8, 4, 4, o, 7, stream());
  EXPECT_EQ(s.message.rfind("lowbit::cuda::transpose_s8: ", 0), 0u) << s.message;
  expect_untouched(d, 4096, 0x5A, stream_);
  CUDA_ASSERT(cudaGetLastError());
}

// Small runs of each path for compute-sanitizer's racecheck / synccheck (scripts/gpu-check), plus one thin
// transpose with a few more tiles than the grid has blocks, so that some blocks take a second tile: the
// barrier between one tile's shared-memory reads and the next tile's writes is exercised.
TEST_F(CudaConvertS8, SanitizerSmoke) {
  std::mt19937 rng(27);
  check_cast({DType::kBFloat16, 33, 129, 144, 136, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_cast({DType::kFloat32, 17, 65, 67, 66, 1, 1}, rng, stream_);
  if (HasFatalFailure()) return;
  check_transpose({130, 200, 208, 144, 0, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  check_transpose({65, 129, 131, 66, 1, 3}, rng, stream_);
  if (HasFatalFailure()) return;
  int device = 0, sms = 0;
  CUDA_ASSERT(cudaGetDevice(&device));
  CUDA_ASSERT(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t tiles = int64_t(sms) * 64 + 5;  // the launch caps the grid at 64 blocks per SM
  check_transpose({2, 64 * tiles - 7, 64 * tiles - 7, 16, 0, 0}, rng, stream_);
}

// ---------------------------------------------------------------------------------------------------

// Not a correctness test: throughput at the QAT backward's shapes, for the record (median of 10 runs timed
// with CUDA events after 2 warm-ups). Bytes = codes read + outputs written, once each; a device-to-device
// cudaMemcpyAsync of the same size is printed as the attainable copy rate. Printed as "[perf] ..." lines
// and test properties. Excluded from sanitizer runs.
TEST_F(CudaConvertS8, PerfReport) {
  const size_t max_in = size_t(8192) * 8192, max_out = max_in * 4;
  DeviceBuffer din(max_in), dout(max_out);
  ASSERT_TRUE(din.ok() && dout.ok()) << "cudaMalloc failed";
  {
    const std::vector<uint8_t> h = xorshift_bytes(max_in);
    CUDA_ASSERT(cudaMemcpy(din.bytes(), h.data(), max_in, cudaMemcpyHostToDevice));
  }
  {
    const size_t bytes = size_t(8192) * 4096 * 3;  // as much traffic as the bf16 cast of 8192 x 4096
    const double ms = median_ms(stream_, [&] {
      const cudaError_t e = cudaMemcpyAsync(dout.bytes(), dout.bytes() + max_out / 2, bytes / 2,
                                            cudaMemcpyDeviceToDevice, stream_);
      return e == cudaSuccess ? Status::ok() : Status::device(cudaGetErrorString(e));
    });
    ASSERT_GT(ms, 0.0) << "memcpy failed";
    const double gbs = double(bytes) / (ms * 1e-3) / 1e9;
    std::printf("[perf] cudaMemcpyAsync D2D %zu MiB (reference): %.1f us, %.0f GB/s (read + write)\n",
                bytes / 2 >> 20, ms * 1e3, gbs);
    RecordProperty("memcpy_d2d_GBps", std::to_string(gbs));
  }
  struct CastShape {
    int64_t M, N;
    DType t;
  };
  const CastShape casts[] = {{8192, 4096, DType::kBFloat16}, {8192, 4096, DType::kFloat16},
                             {8192, 4096, DType::kFloat32},  {8192, 8192, DType::kBFloat16},
                             {8192, 8192, DType::kFloat32}};
  for (const auto& s : casts) {
    const double ms = median_ms(stream_, [&] {
      return lowbit::cuda::cast_s8(din.data(), s.M, s.N, s.N, s.t, dout.bytes(), s.N, stream());
    });
    ASSERT_GT(ms, 0.0) << "cast_s8 launch failed";
    const double gbs = double(s.M) * double(s.N) * double(1 + dtype_size(s.t)) / (ms * 1e-3) / 1e9;
    std::printf("[perf] cast_s8 %lldx%lld -> %s: %.1f us, %.0f GB/s (read + write)\n", (long long)s.M,
                (long long)s.N, lowbit::dtype_name(s.t), ms * 1e3, gbs);
    RecordProperty(std::string("cast_") + lowbit::dtype_name(s.t) + "_" + std::to_string(s.M) + "x" +
                       std::to_string(s.N) + "_GBps",
                   std::to_string(gbs));
  }
  const std::pair<int64_t, int64_t> transposes[] = {{4096, 4096}, {8192, 8192}, {4096, 11008}, {14336, 4096}};
  for (const auto& s : transposes) {
    const int64_t M = s.first, N = s.second;
    const double ms = median_ms(stream_, [&] {
      return lowbit::cuda::transpose_s8(din.data(), M, N, N, dout.data(), M, stream());
    });
    ASSERT_GT(ms, 0.0) << "transpose_s8 launch failed";
    const double gbs = 2.0 * double(M) * double(N) / (ms * 1e-3) / 1e9;
    std::printf("[perf] transpose_s8 %lldx%lld: %.1f us, %.0f GB/s (read + write)\n", (long long)M, (long long)N,
                ms * 1e3, gbs);
    RecordProperty("transpose_" + std::to_string(M) + "x" + std::to_string(N) + "_GBps", std::to_string(gbs));
  }
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
