// CUDA int4 packing and int8 NHWC im2col vs. the CPU kernels, bitwise.
//
// Every case: random inputs (row padding filled with junk), outputs poisoned before the run, then
// (a) every output byte equal to the CPU kernel's, (b) the guard bytes before and after the output still
// holding the poison. Odd sizes, odd strides and base pointers off alignment drive every path: for
// im2col the 16-, 4- and 1-byte unit paths and, on one large input, the int64 index path.
// Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/im2col.h"
#include "lowbit/kernels/pack_int4.h"

#include "cuda_test_util.h"

namespace {

using lowbit::Conv2dShape;
using lowbit::packed_s4_cols;
using lowbit::Status;

using namespace lowbit_test;

constexpr int8_t kPoison = int8_t(0xA5);  // -91: never a code unpack_s4 produces

class CudaInt4Im2col : public CudaStreamTest {};

// Uploads `in` at byte offset in_off of a fresh device buffer, poisons an output of out_len bytes placed
// at byte offset out_off with `guard` poison bytes after it, runs `kernel(d_in, d_out)`, and returns the
// whole output buffer (offset, output, guard).
template <typename Kernel>
void run_device(const std::vector<int8_t>& in, size_t in_off, size_t out_len, size_t out_off, Kernel kernel,
                cudaStream_t stream, std::vector<int8_t>* got) {
  constexpr size_t guard = 64;
  DeviceBuffer din(in_off + in.size()), dout(out_off + out_len + guard);
  ASSERT_TRUE(din.ok() && dout.ok()) << "cudaMalloc failed";
  CUDA_ASSERT(cudaMemcpy(din.data() + in_off, in.data(), in.size(), cudaMemcpyHostToDevice));
  run_on_poisoned(dout, uint8_t(kPoison), stream, [&] { return kernel(din.data() + in_off, dout.data() + out_off); },
                  got);
}

// got = (out_off poison bytes, out_len output bytes, guard poison bytes): compare with want.
void expect_output(const std::vector<int8_t>& got, size_t out_off, const std::vector<int8_t>& want) {
  ASSERT_EQ(got.size(), out_off + want.size() + 64);
  for (size_t i = 0; i < out_off; ++i) ASSERT_EQ(got[i], kPoison) << "written before the output, at -" << (out_off - i);
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(int(got[out_off + i]), int(want[i])) << "output byte " << i << " of " << want.size();
  for (size_t i = out_off + want.size(); i < got.size(); ++i)
    ASSERT_EQ(got[i], kPoison) << "written past the output, at +" << (i - out_off - want.size());
}

// ---------------------------------------------------------------------------------------------------
// pack_s4 / unpack_s4

struct PackCase {
  int64_t rows, K, pad;   // row stride = row length + pad
  size_t in_off, out_off;  // base pointer offsets in bytes
  std::string str() const {
    std::ostringstream os;
    os << "rows=" << rows << " K=" << K << " pad=" << pad << " in_off=" << in_off << " out_off=" << out_off;
    return os.str();
  }
};

const std::vector<PackCase>& pack_cases() {
  static const std::vector<PackCase> cases = [] {
    std::vector<PackCase> v;
    const std::pair<int64_t, int64_t> shapes[] = {{1, 1},   {1, 2},   {3, 17},   {7, 129},  {33, 1001},
                                                  {129, 64}, {1000, 3}, {5, 4097}, {257, 255}, {64, 1024}};
    int i = 0;
    for (const auto& s : shapes)
      for (int64_t pad : {0, 1, 7}) {
        v.push_back({s.first, s.second, pad, size_t(i % 4), size_t((i / 2) % 3)});
        ++i;
      }
    v.push_back({4096, 4097, 3, 1, 0});  // more work than one grid: the grid-stride loop
    // unpack's 16-byte path (K % 32 == 0, aligned bases and row stride), with and without row padding,
    // over more than one grid; and the same shapes just off it (odd padding, misaligned base).
    v.push_back({1031, 4096, 0, 0, 0});
    v.push_back({300, 512, 16, 0, 0});
    v.push_back({300, 512, 5, 0, 0});
    v.push_back({300, 512, 0, 8, 0});
    v.push_back({17, 32, 0, 0, 16});
    return v;
  }();
  return cases;
}

TEST_F(CudaInt4Im2col, PackMatchesCpu) {
  std::mt19937 rng(11);
  for (const auto& c : pack_cases()) {
    SCOPED_TRACE(c.str());
    const int64_t ldc = c.K + c.pad, pc = packed_s4_cols(c.K);
    std::vector<int8_t> codes = random_bytes(size_t(c.rows * ldc), rng, -8, 7);
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t k = c.K; k < ldc; ++k) codes[size_t(r * ldc + k)] = int8_t(0x77);  // junk padding
    std::vector<int8_t> want(size_t(c.rows * pc));
    ASSERT_TRUE(lowbit::cpu::pack_s4(codes.data(), c.rows, c.K, ldc, want.data()).is_ok());
    std::vector<int8_t> got;
    run_device(codes, c.in_off, want.size(), c.out_off,
               [&](const int8_t* in, int8_t* out) { return lowbit::cuda::pack_s4(in, c.rows, c.K, ldc, out, stream()); },
               stream_, &got);
    if (HasFatalFailure()) return;
    expect_output(got, c.out_off, want);
    if (HasFatalFailure()) return;
  }
}

// Out-of-range codes: the device keeps the low 4 bits, i.e. packs what the CPU packs for the code
// sign-extended from those bits.
TEST_F(CudaInt4Im2col, PackKeepsTheLowNibble) {
  std::mt19937 rng(12);
  const int64_t rows = 9, K = 255;
  const std::vector<int8_t> codes = random_bytes(size_t(rows * K), rng);
  std::vector<int8_t> wrapped(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) wrapped[i] = int8_t(((uint8_t(codes[i]) & 0xF) ^ 8) - 8);
  std::vector<int8_t> want(size_t(rows * packed_s4_cols(K)));
  ASSERT_TRUE(lowbit::cpu::pack_s4(wrapped.data(), rows, K, K, want.data()).is_ok());
  std::vector<int8_t> got;
  run_device(codes, 0, want.size(), 0,
             [&](const int8_t* in, int8_t* out) { return lowbit::cuda::pack_s4(in, rows, K, K, out, stream()); },
             stream_, &got);
  if (HasFatalFailure()) return;
  expect_output(got, 0, want);
}

TEST_F(CudaInt4Im2col, UnpackMatchesCpu) {
  std::mt19937 rng(13);
  for (const auto& c : pack_cases()) {
    SCOPED_TRACE(c.str());
    const int64_t ldp = packed_s4_cols(c.K) + c.pad;
    const std::vector<int8_t> packed = random_bytes(size_t(c.rows * ldp), rng);  // every byte value, junk padding
    std::vector<int8_t> want(size_t(c.rows * c.K));
    ASSERT_TRUE(lowbit::cpu::unpack_s4(packed.data(), c.rows, c.K, ldp, want.data()).is_ok());
    std::vector<int8_t> got;
    run_device(packed, c.in_off, want.size(), c.out_off,
               [&](const int8_t* in, int8_t* out) { return lowbit::cuda::unpack_s4(in, c.rows, c.K, ldp, out, stream()); },
               stream_, &got);
    if (HasFatalFailure()) return;
    expect_output(got, c.out_off, want);
    if (HasFatalFailure()) return;
  }
}

TEST_F(CudaInt4Im2col, PackEmptyIsNoOp) {
  DeviceBuffer d(16);
  ASSERT_TRUE(d.ok());
  CUDA_ASSERT(cudaMemset(d.data(), 0x5A, 16));
  EXPECT_TRUE(lowbit::cuda::pack_s4(d.data(), 0, 5, 5, d.data(), stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::pack_s4(nullptr, 3, 0, 0, nullptr, stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::unpack_s4(d.data(), 0, 5, 3, d.data(), stream()).is_ok());
  EXPECT_TRUE(lowbit::cuda::unpack_s4(nullptr, 3, 0, 0, nullptr, stream()).is_ok());
  expect_untouched(d, 16, 0x5A, stream_);
}

// ---------------------------------------------------------------------------------------------------
// im2col_s8_nhwc

struct ConvCase {
  Conv2dShape s;
  int64_t c0, Cg;
  size_t x_off, cols_off;  // base offsets in bytes: a non-zero one forces the 1-byte path
  std::string str() const {
    std::ostringstream os;
    os << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " k=" << s.kh << "x" << s.kw << " s=" << s.sh
       << "," << s.sw << " p=" << s.ph << "," << s.pw << " d=" << s.dh << "," << s.dw << " c0=" << c0 << " Cg=" << Cg
       << " x_off=" << x_off << " cols_off=" << cols_off;
    return os.str();
  }
};

void run_im2col_case(const ConvCase& c, std::mt19937& rng, cudaStream_t stream) {
  SCOPED_TRACE(c.str());
  const Conv2dShape& s = c.s;
  const std::vector<int8_t> x = random_bytes(size_t(s.N * s.H * s.W * s.C), rng);
  std::vector<int8_t> want(size_t(s.N * s.out_h() * s.out_w() * s.kh * s.kw * c.Cg));
  const Status rs = lowbit::cpu::im2col_s8_nhwc(x.data(), s, c.c0, c.Cg, want.data());
  ASSERT_TRUE(rs.is_ok()) << "CPU im2col failed: " << rs.message;
  std::vector<int8_t> got;
  run_device(x, c.x_off, want.size(), c.cols_off,
             [&](const int8_t* in, int8_t* out) {
               return lowbit::cuda::im2col_s8_nhwc(in, s, c.c0, c.Cg, out, reinterpret_cast<CUstream_st*>(stream));
             },
             stream, &got);
  if (::testing::Test::HasFatalFailure()) return;
  expect_output(got, c.cols_off, want);
}

TEST_F(CudaInt4Im2col, Im2colMatchesCpu) {
  //                         N   H   W   C  kh kw sh sw ph pw dh dw    c0  Cg
  const std::vector<std::pair<Conv2dShape, std::pair<int64_t, int64_t>>> shapes = {
      {{2, 5, 7, 3, 1, 1, 1, 1, 0, 0, 1, 1}, {0, 3}},      // 1x1, odd channels: 1-byte units
      {{1, 6, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1}, {0, 4}},      // 4-byte units
      {{2, 9, 6, 5, 3, 3, 2, 2, 1, 1, 1, 1}, {1, 3}},      // stride 2, group, H != W
      {{1, 8, 11, 3, 5, 3, 1, 2, 2, 1, 1, 1}, {0, 3}},     // 5x3
      {{2, 10, 7, 32, 3, 3, 1, 1, 2, 2, 2, 2}, {16, 16}},  // dilation 2, 16-byte units, second group
      {{1, 13, 12, 48, 5, 3, 2, 2, 2, 1, 2, 2}, {0, 32}},  // 16-byte units
      {{3, 7, 5, 24, 1, 1, 2, 2, 0, 0, 1, 1}, {8, 12}},    // 4-byte units (c0 = 8, Cg = 12)
      {{1, 2, 3, 2, 3, 3, 1, 1, 1, 1, 1, 1}, {0, 2}},      // kernel as large as the padded image
      {{1, 1, 1, 3, 5, 3, 1, 1, 2, 1, 1, 1}, {1, 2}},      // one pixel, mostly padding
      {{2, 4, 9, 5, 2, 4, 3, 1, 0, 2, 1, 3}, {4, 1}},      // Cg = 1
      {{4, 31, 29, 64, 3, 3, 1, 1, 1, 1, 1, 1}, {0, 64}},  // larger
      {{2, 17, 23, 40, 3, 3, 2, 2, 1, 1, 1, 1}, {8, 20}},  // 4-byte units, larger, grouped
  };
  std::mt19937 rng(21);
  for (const auto& sh : shapes)
    for (const auto& off : {std::pair<size_t, size_t>{0, 0}, {1, 0}, {0, 3}, {16, 4}}) {
      run_im2col_case({sh.first, sh.second.first, sh.second.second, off.first, off.second}, rng, stream_);
      if (HasFatalFailure()) return;
    }
}

TEST_F(CudaInt4Im2col, Im2colRandomShapes) {
  std::mt19937 rng(22);
  auto pick = [&](int lo, int hi) { return int64_t(std::uniform_int_distribution<int>(lo, hi)(rng)); };
  int done = 0;
  while (done < 80) {
    Conv2dShape s{pick(1, 3), pick(1, 12), pick(1, 12), pick(1, 9) * (done % 3 == 0 ? 16 : 1), pick(1, 5), pick(1, 5),
                  pick(1, 3), pick(1, 3), pick(0, 2), pick(0, 2), pick(1, 2), pick(1, 2)};
    if (s.H + 2 * s.ph < s.dh * (s.kh - 1) + 1 || s.W + 2 * s.pw < s.dw * (s.kw - 1) + 1) continue;
    int64_t Cg = pick(1, int(s.C)), c0 = pick(0, int(s.C - Cg));
    if (done % 3 == 0) {  // keep channel ranges on 16-byte units sometimes
      Cg = (Cg + 15) / 16 * 16;
      c0 = c0 / 16 * 16;
      if (c0 + Cg > s.C) c0 = s.C - Cg;
    }
    run_im2col_case({s, c0, Cg, size_t(done % 5 == 4), 0}, rng, stream_);
    if (HasFatalFailure()) return;
    ++done;
  }
}

// More units than one grid covers, on the 1-byte path (x offset by one byte): the grid-stride loop.
TEST_F(CudaInt4Im2col, Im2colLarge) {
  std::mt19937 rng(23);
  run_im2col_case({{8, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1}, 0, 64, 1, 0}, rng, stream_);
  if (HasFatalFailure()) return;
  run_im2col_case({{8, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1}, 0, 64, 0, 0}, rng, stream_);
}

// An input above 2^31 bytes, so indices into x need int64 (the kernel's int32 path is not taken).
// 3 GiB of device memory and 3 GiB of host memory; skipped where either is missing.
TEST_F(CudaInt4Im2col, Im2colInt64Indexing) {
  const Conv2dShape s{1, 32768, 32768, 3, 3, 3, 97, 89, 2, 1, 5, 7};
  const int64_t c0 = 2, Cg = 1;
  const size_t x_len = size_t(s.N * s.H * s.W * s.C);
  std::vector<int8_t> x;
  try {
    x.resize(x_len);
  } catch (const std::bad_alloc&) {
    GTEST_SKIP() << "cannot allocate " << x_len << " host bytes";
  }
  DeviceBuffer dx(x_len);
  if (!dx.ok()) GTEST_SKIP() << "cannot allocate " << x_len << " device bytes";
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < x_len; i += 8) {  // xorshift, 8 bytes a step: fast enough for 3 GiB
    h ^= h << 13;
    h ^= h >> 7;
    h ^= h << 17;
    std::memcpy(&x[i], &h, std::min<size_t>(8, x_len - i));
  }
  CUDA_ASSERT(cudaMemcpy(dx.data(), x.data(), x_len, cudaMemcpyHostToDevice));
  const size_t cols_len = size_t(s.N * s.out_h() * s.out_w() * s.kh * s.kw * Cg);
  std::vector<int8_t> want(cols_len);
  ASSERT_TRUE(lowbit::cpu::im2col_s8_nhwc(x.data(), s, c0, Cg, want.data()).is_ok());
  DeviceBuffer dcols(cols_len + 64);
  ASSERT_TRUE(dcols.ok());
  CUDA_ASSERT(cudaMemset(dcols.data(), uint8_t(kPoison), cols_len + 64));
  const Status st = lowbit::cuda::im2col_s8_nhwc(dx.data(), s, c0, Cg, dcols.data(), stream());
  ASSERT_TRUE(st.is_ok()) << st.message;
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  std::vector<int8_t> got(cols_len + 64);
  CUDA_ASSERT(cudaMemcpy(got.data(), dcols.data(), got.size(), cudaMemcpyDeviceToHost));
  expect_output(got, 0, want);
}

TEST_F(CudaInt4Im2col, RejectsInvalidArguments) {
  DeviceBuffer a(4096), b(1 << 16);
  ASSERT_TRUE(a.ok() && b.ok());
  using lowbit::cuda::pack_s4;
  using lowbit::cuda::unpack_s4;
  expect_invalid(pack_s4(a.data(), -1, 4, 4, b.data(), stream()), "pack rows < 0");
  expect_invalid(pack_s4(a.data(), 2, -1, 4, b.data(), stream()), "pack K < 0");
  expect_invalid(pack_s4(a.data(), 2, 5, 4, b.data(), stream()), "pack ldc < K");
  expect_invalid(pack_s4(nullptr, 2, 4, 4, b.data(), stream()), "pack codes null");
  expect_invalid(pack_s4(a.data(), 2, 4, 4, nullptr, stream()), "pack packed null");
  expect_invalid(unpack_s4(a.data(), -1, 4, 2, b.data(), stream()), "unpack rows < 0");
  expect_invalid(unpack_s4(a.data(), 2, 5, 2, b.data(), stream()), "unpack ldp < ceil(K/2)");
  expect_invalid(unpack_s4(nullptr, 2, 4, 2, b.data(), stream()), "unpack packed null");
  expect_invalid(unpack_s4(a.data(), 2, 4, 2, nullptr, stream()), "unpack codes null");

  const Conv2dShape ok{1, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1};
  using lowbit::cuda::im2col_s8_nhwc;
  ASSERT_TRUE(im2col_s8_nhwc(a.data(), ok, 0, 4, b.data(), stream()).is_ok());
  Conv2dShape s = ok; s.N = 0;  expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "N = 0");
  s = ok; s.kw = 0;             expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "kw = 0");
  s = ok; s.sh = 0;             expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "sh = 0");
  s = ok; s.dw = 0;             expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "dw = 0");
  s = ok; s.ph = -1;            expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "ph < 0");
  s = ok; s.H = 2; s.kh = 3; s.sh = 2; s.ph = 0;
  expect_invalid(im2col_s8_nhwc(a.data(), s, 0, 4, b.data(), stream()), "kernel > image (Ho < 1)");
  expect_invalid(im2col_s8_nhwc(a.data(), ok, -1, 2, b.data(), stream()), "c0 < 0");
  expect_invalid(im2col_s8_nhwc(a.data(), ok, 0, 0, b.data(), stream()), "Cg = 0");
  expect_invalid(im2col_s8_nhwc(a.data(), ok, 2, 3, b.data(), stream()), "c0 + Cg > C");
  expect_invalid(im2col_s8_nhwc(nullptr, ok, 0, 4, b.data(), stream()), "x null");
  expect_invalid(im2col_s8_nhwc(a.data(), ok, 0, 4, nullptr, stream()), "cols null");
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
