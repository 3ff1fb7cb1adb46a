// CUDA batched int8 GEMM (cuda::gemm_s8_scaled_batched) vs the scalar CPU batched reference, bitwise.
//
// Every case: random inputs (row padding and the gaps between batches filled with garbage the kernel
// must not use), the whole output buffer poisoned before the run, then the whole buffer compared byte
// for byte with a CPU reference run into an identically poisoned buffer. The reference writes exactly
// the (M, N) window of each batch, so one comparison checks every value and that every byte outside
// the windows (row padding, batch gaps, guard bytes before and after) kept the poison.
// Layouts drive the batch-specific paths: broadcast operands (stride 0), batch strides that break the
// 16-byte alignment of later batches (byte-load fallback), odd out strides (pair stores off in every
// other batch), interleaved outputs, and more batches than gridDim.z holds (several launches).
// Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/gemm_s8.h"

#include "cuda_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;

using namespace lowbit_test;

class CudaGemmBatched : public CudaStreamTest {};

struct BCase {
  int64_t M, N, K, batch;
  int64_t lda, ldb, ldo;
  int64_t sA, sB, sO;   // batch strides (bytes for A, B; elements for out)
  size_t a_off, b_off;  // bytes the A / B bases are moved by
  size_t o_off;         // elements the out base is moved by
  float alpha;
  DType otype;
  std::string str() const {
    std::ostringstream os;
    os << "M=" << M << " N=" << N << " K=" << K << " batch=" << batch << " lda=" << lda << " ldb=" << ldb
       << " ldo=" << ldo << " sA=" << sA << " sB=" << sB << " sO=" << sO << " a_off=" << a_off << " b_off=" << b_off
       << " o_off=" << o_off << " alpha=" << alpha << " out=" << lowbit::dtype_name(otype);
    return os.str();
  }
};

// Bytes / elements spanned by `batch` blocks of `rows` rows of stride ld, `stride` apart.
size_t span(int64_t batch, int64_t stride, int64_t rows, int64_t ld) {
  return batch == 0 ? 0 : size_t((batch - 1) * stride + rows * ld);
}

// Runs one case; with device_runs > 1 the kernel runs again on the same inputs (output re-poisoned) and
// must give the same bits: determinism.
void run_batched_case(const BCase& c, std::mt19937& rng, CUstream_st* stream, int device_runs = 1) {
  SCOPED_TRACE(c.str());
  const size_t es = dtype_size(c.otype);
  const size_t a_bytes = c.a_off + span(c.batch, c.sA, c.M, c.lda) + 1;
  const size_t b_bytes = c.b_off + span(c.batch, c.sB, c.N, c.ldb) + 1;
  const size_t o_bytes = (c.o_off + span(c.batch, c.sO, c.M, c.ldo)) * es + 64;  // 64 guard bytes after
  std::vector<int8_t> ha, hb;
  std::vector<uint8_t> got;
  run_gemm_on_device(rng, a_bytes, b_bytes, o_bytes, c.alpha, reinterpret_cast<cudaStream_t>(stream),
                     [&](const GemmOperands& d) {
                       return lowbit::cuda::gemm_s8_scaled_batched(
                           d.A(c.a_off), c.lda, c.sA, d.B(c.b_off), c.ldb, c.sB, c.M, c.N, c.K, c.batch,
                           d.alpha_ptr(), c.otype, d.out.bytes() + c.o_off * es, c.ldo, c.sO, stream);
                     },
                     device_runs, &ha, &hb, &got);
  if (::testing::Test::HasFatalFailure()) return;

  std::vector<uint8_t> ref(o_bytes, kOutPoison);
  const Status rs = lowbit::cpu::gemm_s8_scaled_batched_ref(ha.data() + c.a_off, c.lda, c.sA, hb.data() + c.b_off,
                                                            c.ldb, c.sB, c.M, c.N, c.K, c.batch, &c.alpha, c.otype,
                                                            ref.data() + c.o_off * es, c.ldo, c.sO);
  ASSERT_TRUE(rs.is_ok()) << "CPU reference failed: " << rs.message;
  if (std::memcmp(got.data(), ref.data(), o_bytes) == 0) return;
  for (size_t b = 0; b < o_bytes; ++b) {
    if (got[b] == ref[b]) continue;
    const int64_t first = int64_t(c.o_off * es);
    const int64_t e = (int64_t(b) - first) / int64_t(es);  // element index from out (may be < 0: guard)
    std::ostringstream where;
    if (int64_t(b) < first) {
      where << "guard byte " << (first - int64_t(b)) << " before out";
    } else {
      where << "element " << e;
      if (c.sO > 0 && c.ldo > 0 && c.ldo * c.M <= c.sO)  // batch-major layout: decode (batch, row, col)
        where << " = (batch " << e / c.sO << ", row " << (e % c.sO) / c.ldo << ", col " << (e % c.sO) % c.ldo << ")";
    }
    FAIL() << "first mismatch at " << where.str() << ": got byte 0x" << std::hex << int(got[b]) << " want 0x"
           << int(ref[b]) << (ref[b] == kOutPoison ? " (outside every output window: stray write)" : "");
  }
}

// Layout variants of a batched problem (see the file comment). Strides left at -1 become contiguous.
BCase make_case(int64_t M, int64_t N, int64_t K, int64_t batch, int kind, float alpha, DType t) {
  BCase c{M, N, K, batch, K, K, N, -1, -1, -1, 0, 0, 0, alpha, t};
  switch (kind) {
    case 1:  // 16-aligned rows and batch gaps: cp.async in every batch, K tail in the last chunk
      c.lda = round_up16(K) + 16;
      c.ldb = round_up16(K);
      c.ldo = N + 8;
      c.sA = M * c.lda + 48;
      c.sB = N * c.ldb + 32;
      c.sO = M * c.ldo + 6;
      break;
    case 2:  // aligned base and lda, but an odd batch stride: A's later batches misaligned -> byte loads
      c.lda = round_up16(K);
      c.ldb = round_up16(K);
      c.sA = M * c.lda + 1;
      c.sB = N * c.ldb + 16;
      break;
    case 3:  // A broadcast to every batch
      c.lda = round_up16(K);
      c.ldb = round_up16(K);
      c.sA = 0;
      break;
    case 4:  // B broadcast, misaligned bases, odd strides
      c.lda = K + 1;
      c.ldb = K + 3;
      c.ldo = N + 1;
      c.sB = 0;
      c.a_off = 1;
      c.b_off = 7;
      c.o_off = 1;
      break;
    case 5:  // out interleaved as (M, batch, N) plus a pad column, from an odd element offset
      c.ldo = batch * N + 1;
      c.sO = N;
      c.o_off = 1;
      break;
    case 6:  // odd out batch stride: every other batch's out base breaks pair-store alignment
      c.ldo = N + (N % 2);
      c.sO = M * c.ldo + 1;
      break;
    default:  // 0: contiguous batches
      break;
  }
  if (c.sA < 0) c.sA = M * c.lda;
  if (c.sB < 0) c.sB = N * c.ldb;
  if (c.sO < 0) c.sO = M * c.ldo;
  return c;
}

TEST_F(CudaGemmBatched, MatchesReferenceOddShapesAndLayouts) {
  // Tails of the 128-wide tiles, of the 64-byte K stage and of the 16-byte chunks.
  const std::vector<std::array<int64_t, 3>> shapes = {{1, 1, 1},      {3, 17, 33},   {129, 255, 17},
                                                      {17, 129, 1031}, {255, 127, 129}, {33, 33, 1},
                                                      {130, 70, 300}};
  const float alphas[] = {1.7e-4f, -0.031f, 0.5f, 3.0e-3f, 1.0f};  // 0.5 and 1.0 can overflow fp16 to inf
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  std::mt19937 rng(2024);
  int n = 0;
  for (const auto& s : shapes)
    for (int64_t batch : {int64_t(1), int64_t(7)})
      for (int kind = 0; kind <= 6; ++kind) {
        const BCase c = make_case(s[0], s[1], s[2], batch, kind, alphas[n % 5], types[n % 3]);
        ++n;
        run_batched_case(c, rng, stream());
        if (HasFatalFailure()) return;
      }
}

// The attention-score regime: many small matrices in one launch, on both load paths.
TEST_F(CudaGemmBatched, Batch384SmallMatrices) {
  std::mt19937 rng(384);
  run_batched_case(make_case(65, 33, 47, 384, 0, 2e-3f, DType::kFloat16), rng, stream());  // byte loads (K = 47)
  if (HasFatalFailure()) return;
  run_batched_case(make_case(128, 128, 128, 384, 0, 1e-4f, DType::kBFloat16), rng, stream(), 2);  // cp.async
  if (HasFatalFailure()) return;
  run_batched_case(make_case(100, 129, 64, 384, 1, -3e-4f, DType::kFloat32), rng, stream());
  if (HasFatalFailure()) return;
  run_batched_case(make_case(64, 200, 96, 384, 3, 1e-3f, DType::kFloat16), rng, stream());  // one A for all
}

// More batches than gridDim.z holds (65535): the host splits into several launches with moved bases.
TEST_F(CudaGemmBatched, MoreBatchesThanGridZ) {
  std::mt19937 rng(65536);
  const int64_t batch = 70001;
  run_batched_case(make_case(3, 5, 7, batch, 0, 0.25f, DType::kFloat16), rng, stream());  // byte loads
  if (HasFatalFailure()) return;
  run_batched_case(make_case(2, 3, 32, batch, 1, -0.125f, DType::kFloat32), rng, stream());  // cp.async
  if (HasFatalFailure()) return;
  run_batched_case(make_case(4, 3, 40, batch, 4, 0.5f, DType::kBFloat16), rng, stream());  // broadcast B
  if (HasFatalFailure()) return;
  run_batched_case(make_case(3, 5, 0, batch, 0, -1.5f, DType::kFloat32), rng, stream());  // K == 0 fill
}

TEST_F(CudaGemmBatched, ZeroK) {
  std::mt19937 rng(3);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int kind : {0, 5, 6}) {
      run_batched_case(make_case(5, 7, 0, 7, kind, 0.37f, t), rng, stream());
      if (HasFatalFailure()) return;
      run_batched_case(make_case(130, 300, 0, 3, kind, -2.f, t), rng, stream());
      if (HasFatalFailure()) return;
    }
  }
}

// A steady-state pipeline (K = 1024: 16 k-tiles) over several full-tile batches, twice: determinism.
TEST_F(CudaGemmBatched, LargerBatchesDeterministic) {
  std::mt19937 rng(77);
  run_batched_case(make_case(256, 384, 1024, 5, 0, 2.5e-5f, DType::kFloat16), rng, stream(), 3);
  if (HasFatalFailure()) return;
  run_batched_case(make_case(300, 257, 1031, 3, 2, 1e-4f, DType::kFloat32), rng, stream());
}

// Batch 1 with zero strides is gemm_s8_scaled: the two entry points give the same bits.
TEST_F(CudaGemmBatched, BatchOneEqualsUnbatched) {
  const int64_t M = 129, N = 200, K = 1031;
  std::mt19937 rng(1);
  const std::vector<int8_t> ha = random_bytes(size_t(M * K), rng);
  const std::vector<int8_t> hb = random_bytes(size_t(N * K), rng);
  const float alpha = 3e-4f;
  GemmOperands d(ha.size(), hb.size(), size_t(M * N) * 2);
  DeviceBuffer o2(size_t(M * N) * 2);
  ASSERT_TRUE(d.ok() && o2.ok());
  upload(d, ha, hb, alpha);
  if (HasFatalFailure()) return;
  const DeviceBuffer& o1 = d.out;
  const int8_t *pa = d.A(), *pb = d.B();
  const float* pal = d.alpha_ptr();
  ASSERT_TRUE(
      lowbit::cuda::gemm_s8_scaled(pa, K, pb, K, M, N, K, pal, DType::kFloat16, o1.bytes(), N, stream()).is_ok());
  ASSERT_TRUE(lowbit::cuda::gemm_s8_scaled_batched(pa, K, 0, pb, K, 0, M, N, K, 1, pal, DType::kFloat16, o2.bytes(), N,
                                                   0, stream())
                  .is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<uint8_t> h1(size_t(M * N) * 2), h2(size_t(M * N) * 2);
  CUDA_ASSERT(cudaMemcpy(h1.data(), o1.bytes(), h1.size(), cudaMemcpyDeviceToHost));
  CUDA_ASSERT(cudaMemcpy(h2.data(), o2.bytes(), h2.size(), cudaMemcpyDeviceToHost));
  EXPECT_TRUE(h1 == h2);
}

TEST_F(CudaGemmBatched, EmptyIsNoOp) {
  GemmOperands d(64, 64, 256);
  ASSERT_TRUE(d.ok());
  DeviceBuffer& out = d.out;
  CUDA_ASSERT(cudaMemset(out.bytes(), kOutPoison, 256));
  const int8_t *pa = d.A(), *pb = d.B();
  const float* pal = d.alpha_ptr();
  using lowbit::cuda::gemm_s8_scaled_batched;
  const DType f = DType::kFloat32;
  EXPECT_TRUE(gemm_s8_scaled_batched(nullptr, 8, 8, nullptr, 8, 8, 4, 4, 8, 0, nullptr, f, nullptr, 4, 16, stream())
                  .is_ok());
  EXPECT_TRUE(gemm_s8_scaled_batched(pa, 8, 8, pb, 8, 8, 0, 4, 8, 3, pal, f, out.bytes(), 4, 0, stream()).is_ok());
  EXPECT_TRUE(gemm_s8_scaled_batched(pa, 8, 8, pb, 8, 8, 4, 0, 8, 3, pal, f, out.bytes(), 0, 0, stream()).is_ok());
  expect_untouched(out, 256, kOutPoison, stream_);
}

TEST_F(CudaGemmBatched, RejectsInvalidArguments) {
  GemmOperands d(4096, 4096, 4096);
  ASSERT_TRUE(d.ok());
  const int8_t *pa = d.A(), *pb = d.B();
  const float* pal = d.alpha_ptr();
  void* po = d.out.bytes();
  using lowbit::cuda::gemm_s8_scaled_batched;
  auto expect_invalid = [](const Status& s, const char* what, const char* needle) {
    lowbit_test::expect_invalid(s, what, needle);
    EXPECT_NE(s.message.find("gemm_s8_scaled_batched"), std::string::npos) << what << ": " << s.message;
  };
  const DType f = DType::kFloat16;
  const int64_t big = std::numeric_limits<int64_t>::max();
  auto call = [&](const int8_t* A, int64_t lda, int64_t sA, const int8_t* B, int64_t ldb, int64_t sB, int64_t M,
                  int64_t N, int64_t K, int64_t batch, const float* al, DType t, void* o, int64_t ldo, int64_t sO) {
    return gemm_s8_scaled_batched(A, lda, sA, B, ldb, sB, M, N, K, batch, al, t, o, ldo, sO, stream());
  };
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, -1, pal, f, po, 4, 16), "batch < 0", "batch");
  expect_invalid(call(pa, 8, -32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 4, 16), "strideA < 0", "strideA");
  expect_invalid(call(pa, 8, 32, pb, 8, -32, 4, 4, 8, 2, pal, f, po, 4, 16), "strideB < 0", "strideB");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 4, -16), "strideO < 0", "strideO");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 4, 0), "strideO == 0, batch 2", "strideO");
  expect_invalid(call(pa, 8, big / 2 + 1, pb, 8, 32, 4, 4, 8, 3, pal, f, po, 4, 16), "strideA overflow", "strideA");
  expect_invalid(call(pa, 8, 32, pb, 8, big / 2 + 1, 4, 4, 8, 3, pal, f, po, 4, 16), "strideB overflow", "strideB");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 3, pal, f, po, 4, big / 2), "strideO overflow", "strideO");
  expect_invalid(call(nullptr, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 4, 16), "A null", "A must not be null");
  expect_invalid(call(pa, 8, 32, nullptr, 8, 32, 4, 4, 8, 2, pal, f, po, 4, 16), "B null", "B must not be null");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, nullptr, f, po, 4, 16), "alpha null", "alpha");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, nullptr, 4, 16), "out null", "out");
  expect_invalid(call(pa, 7, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 4, 16), "lda < K", "lda");
  expect_invalid(call(pa, 8, 32, pb, 7, 32, 4, 4, 8, 2, pal, f, po, 4, 16), "ldb < K", "ldb");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, f, po, 3, 16), "ldo < N", "ldo");
  expect_invalid(call(pa, 8, 32, pb, 8, 32, 4, 4, 8, 2, pal, static_cast<DType>(9), po, 4, 16), "bad otype", "otype");
  expect_invalid(call(nullptr, 7, 32, nullptr, 8, 32, 4, 4, 8, 0, nullptr, f, nullptr, 4, 16), "batch 0, lda < K",
                 "lda");
  // K == 0 fill: batch * M * N must fit in int64 (here 2^24 * 2^40; out interleaved so strideO is small)
  const int64_t m20 = int64_t(1) << 20;
  expect_invalid(call(pa, 0, 0, pb, 0, 0, m20, m20, 0, int64_t(1) << 24, pal, f, po, m20, m20), "fill overflow",
                 "batch * M * N overflows");
  CUDA_ASSERT(cudaGetLastError());
}

// Not a correctness test: the Q4MatMul attention-score shape, 384 x (1024 x 1024 x 128) with fp16 out,
// as one batched launch and (for comparison) as 384 gemm_s8_scaled launches. Median of 10 runs timed
// with CUDA events after 2 warm-ups; printed as "[perf] ..." lines and test properties. No assertion on
// speed. Excluded from sanitizer runs (-*Perf*).
TEST_F(CudaGemmBatched, PerfReport) {
  const int64_t batch = 384, M = 1024, N = 1024, K = 128;
  const size_t a_bytes = size_t(batch * M * K), b_bytes = size_t(batch * N * K);
  const size_t o_bytes = size_t(batch * M * N) * 2;
  DeviceBuffer da(a_bytes), db(b_bytes), dout(o_bytes), dalpha(4);
  ASSERT_TRUE(da.ok() && db.ok() && dout.ok() && dalpha.ok()) << "cudaMalloc failed";
  {
    std::vector<uint8_t> h = xorshift_bytes(a_bytes);
    CUDA_ASSERT(cudaMemcpy(da.bytes(), h.data(), a_bytes, cudaMemcpyHostToDevice));
    std::reverse(h.begin(), h.end());
    CUDA_ASSERT(cudaMemcpy(db.bytes(), h.data(), b_bytes, cudaMemcpyHostToDevice));
  }
  const float alpha = 1e-4f;
  CUDA_ASSERT(cudaMemcpy(dalpha.bytes(), &alpha, 4, cudaMemcpyHostToDevice));
  const auto* pa = reinterpret_cast<const int8_t*>(da.bytes());
  const auto* pb = reinterpret_cast<const int8_t*>(db.bytes());
  const auto* pal = reinterpret_cast<const float*>(dalpha.bytes());
  const double batched_ms = median_ms(stream_, [&] {
    return lowbit::cuda::gemm_s8_scaled_batched(pa, K, M * K, pb, K, N * K, M, N, K, batch, pal, DType::kFloat16,
                                                dout.bytes(), N, M * N, stream());
  });
  ASSERT_GT(batched_ms, 0.0) << "batched launch failed";
  const double loop_ms = median_ms(stream_, [&] {
    for (int64_t b = 0; b < batch; ++b) {
      const Status s = lowbit::cuda::gemm_s8_scaled(pa + b * M * K, K, pb + b * N * K, K, M, N, K, pal, DType::kFloat16,
                                                    dout.bytes() + size_t(b * M * N) * 2, N, stream());
      if (!s.is_ok()) return s;
    }
    return Status::ok();
  });
  ASSERT_GT(loop_ms, 0.0) << "per-batch launches failed";
  const double ops = 2.0 * double(batch) * double(M) * double(N) * double(K);
  const double bytes = double(a_bytes + b_bytes + o_bytes);  // compulsory traffic: read A, B, write out
  for (const auto& [what, ms] : {std::pair<const char*, double>{"batched, 1 launch", batched_ms},
                                 std::pair<const char*, double>{"384 x gemm_s8_scaled", loop_ms}}) {
    std::printf("[perf] gemm_s8 fp16-out %lld x (M=%lld N=%lld K=%lld) %s: %.3f ms, %.1f TOP/s, %.0f GB/s\n",
                (long long)batch, (long long)M, (long long)N, (long long)K, what, ms, ops / (ms * 1e-3) / 1e12,
                bytes / (ms * 1e-3) / 1e9);
  }
  RecordProperty("gemm_batched_384x1024x1024x128_ms", std::to_string(batched_ms));
  RecordProperty("gemm_loop_384x1024x1024x128_ms", std::to_string(loop_ms));
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
