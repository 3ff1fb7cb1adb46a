// lowbit CPU int4 packing and int8 NHWC im2col.
//
// pack_s4 / unpack_s4: a hand-worked example, every byte value, round trips on odd K with padded strides
// (padding filled with out-of-range garbage that must be neither read into results nor range-checked),
// the "nothing written past the first bad row" promise on a shape large enough to run in parallel, and
// argument validation.
// im2col_s8_nhwc: checked through what it is for. A direct convolution (seven nested loops over n, p, q,
// o, a, b, c, skipping taps outside the image) on random int8 codes must equal cols . W^T in int64, for
// strides, paddings, dilations, rectangular kernels, non-square images and channel groups; cols must be
// fully written (two runs over different poisons agree) and nothing past it; invalid shapes rejected.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/im2col.h"
#include "lowbit/kernels/pack_int4.h"
#include "test_util.h"

namespace {

using lowbit::Conv2dShape;
using lowbit::Status;
using lowbit::packed_s4_cols;
using lowbit_test::expect_invalid;
using lowbit_test::random_bytes;

// ---------------------------------------------------------------------------------------------------
// pack_s4 / unpack_s4

// The format, written independently of the kernel: high nibble first, two's complement nibbles.
int nibble_value(int n) { return n >= 8 ? n - 16 : n; }

std::vector<int8_t> pack_reference(const std::vector<int8_t>& codes, int64_t rows, int64_t K, int64_t ldc) {
  const int64_t pc = packed_s4_cols(K);
  std::vector<int8_t> p(size_t(rows * pc));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < pc; ++j) {
      const int hi = codes[size_t(r * ldc + 2 * j)] & 0xF;
      const int lo = 2 * j + 1 < K ? codes[size_t(r * ldc + 2 * j + 1)] & 0xF : 0;
      p[size_t(r * pc + j)] = int8_t(hi * 16 + lo - (hi >= 8 ? 256 : 0));
    }
  return p;
}

TEST(PackS4, WorkedExample) {
  const std::vector<int8_t> codes = {-8, 7, 1};
  std::vector<int8_t> packed(2, 99);
  ASSERT_TRUE(lowbit::cpu::pack_s4(codes.data(), 1, 3, 3, packed.data()).is_ok());
  EXPECT_EQ(uint8_t(packed[0]), 0x87);
  EXPECT_EQ(uint8_t(packed[1]), 0x10);
  EXPECT_EQ(packed, (std::vector<int8_t>{-121, 16}));
  std::vector<int8_t> back(3, 99);
  ASSERT_TRUE(lowbit::cpu::unpack_s4(packed.data(), 1, 3, 2, back.data()).is_ok());
  EXPECT_EQ(back, codes);
}

TEST(PackS4, EveryByteUnpacksToItsPair) {
  std::vector<int8_t> packed(256);
  for (int b = 0; b < 256; ++b) packed[size_t(b)] = int8_t(b < 128 ? b : b - 256);
  std::vector<int8_t> codes(512, 99);
  ASSERT_TRUE(lowbit::cpu::unpack_s4(packed.data(), 1, 512, 256, codes.data()).is_ok());
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(int(codes[size_t(2 * b)]), nibble_value(b >> 4)) << "byte 0x" << std::hex << b;
    EXPECT_EQ(int(codes[size_t(2 * b + 1)]), nibble_value(b & 15)) << "byte 0x" << std::hex << b;
  }
  // and back: every pair packs to its byte
  std::vector<int8_t> again(256, 99);
  ASSERT_TRUE(lowbit::cpu::pack_s4(codes.data(), 1, 512, 512, again.data()).is_ok());
  EXPECT_EQ(again, packed);
  // As 256 rows of one byte each with K = 1: only the high nibble is a code, the low one is ignored.
  std::vector<int8_t> single(256, 99);
  ASSERT_TRUE(lowbit::cpu::unpack_s4(packed.data(), 256, 1, 1, single.data()).is_ok());
  for (int b = 0; b < 256; ++b) EXPECT_EQ(int(single[size_t(b)]), nibble_value(b >> 4)) << "byte 0x" << std::hex << b;
}

TEST(PackS4, RoundTripOddKPaddedStrides) {
  std::mt19937 rng(41);
  std::uniform_int_distribution<int> code(-8, 7), junk(-128, 127);
  for (int64_t K : {1, 3, 17, 64, 129, 1001})
    for (int64_t rows : {1, 2, 7, 33, 600})
      for (int64_t pad : {0, 1, 5}) {
        SCOPED_TRACE("K=" + std::to_string(K) + " rows=" + std::to_string(rows) + " pad=" + std::to_string(pad));
        const int64_t ldc = K + pad, pc = packed_s4_cols(K), ldp = pc + pad + (K & 1);
        std::vector<int8_t> codes(size_t(rows * ldc));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < ldc; ++k)  // padding columns: out-of-range junk, never checked or packed
            codes[size_t(r * ldc + k)] = int8_t(k < K ? code(rng) : (junk(rng) | 0x40));
        const std::vector<int8_t> want = pack_reference(codes, rows, K, ldc);

        std::vector<int8_t> packed(size_t(rows * pc) + 16, 0x5A);
        ASSERT_TRUE(lowbit::cpu::pack_s4(codes.data(), rows, K, ldc, packed.data()).is_ok());
        ASSERT_EQ(std::vector<int8_t>(packed.begin(), packed.begin() + rows * pc), want);
        for (size_t i = size_t(rows * pc); i < packed.size(); ++i) ASSERT_EQ(packed[i], 0x5A) << "written past the end";
        if (K & 1) {
          for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(packed[size_t(r * pc + pc - 1)] & 0xF, 0) << "odd-K low nibble";
        }

        // Re-stride the packed rows to ldp, padding with junk, and unpack.
        std::vector<int8_t> strided(size_t(rows * ldp));
        for (auto& v : strided) v = int8_t(junk(rng));
        for (int64_t r = 0; r < rows; ++r) std::memcpy(&strided[size_t(r * ldp)], &packed[size_t(r * pc)], size_t(pc));
        std::vector<int8_t> back(size_t(rows * K) + 16, 0x5A);
        ASSERT_TRUE(lowbit::cpu::unpack_s4(strided.data(), rows, K, ldp, back.data()).is_ok());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < K; ++k)
            ASSERT_EQ(back[size_t(r * K + k)], codes[size_t(r * ldc + k)]) << "at (" << r << ", " << k << ")";
        for (size_t i = size_t(rows * K); i < back.size(); ++i) ASSERT_EQ(back[i], 0x5A) << "written past the end";
      }
}

TEST(PackS4, OddKUnpackIgnoresTheLastLowNibble) {
  const std::vector<int8_t> packed = {int8_t(0x9F), int8_t(0x3F)};  // last byte: code 3, padding nibble 0xF
  std::vector<int8_t> codes(3, 99);
  ASSERT_TRUE(lowbit::cpu::unpack_s4(packed.data(), 1, 3, 2, codes.data()).is_ok());
  EXPECT_EQ(codes, (std::vector<int8_t>{-7, -1, 3}));
}

TEST(PackS4, BadCodeIsInvalid) {
  for (int bad : {8, -9, 127, -128, 16}) {
    std::vector<int8_t> codes = {0, 1, -8, 7, 3, -2};
    codes[4] = int8_t(bad);  // row 1, col 1 of a 2 x 3 matrix
    std::vector<int8_t> packed(4, 0x5A);
    const Status s = lowbit::cpu::pack_s4(codes.data(), 2, 3, 3, packed.data());
    expect_invalid(s, "code " + std::to_string(bad), std::to_string(bad));
    EXPECT_NE(s.message.find("row 1"), std::string::npos) << s.message;
    EXPECT_NE(s.message.find("col 1"), std::string::npos) << s.message;
    EXPECT_EQ(packed[2], 0x5A) << "bad row written";
    EXPECT_EQ(packed[3], 0x5A) << "bad row written";
  }
}

// Large enough to run in parallel and in several blocks: rows from the first bad one on stay untouched,
// rows before it are packed; a later bad row and out-of-range ldc padding do not change that.
TEST(PackS4, NothingWrittenPastTheFirstBadRow) {
  const int64_t rows = 3000, K = 1001, ldc = 1003, pc = packed_s4_cols(K);
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> code(-8, 7);
  std::vector<int8_t> codes(size_t(rows * ldc));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < ldc; ++k) codes[size_t(r * ldc + k)] = int8_t(k < K ? code(rng) : 100);
  const std::vector<int8_t> want = pack_reference(codes, rows, K, ldc);
  for (int64_t bad_row : {0, 1, 1500, 2999}) {
    std::vector<int8_t> c = codes;
    c[size_t(bad_row * ldc + K - 1)] = 9;
    if (bad_row + 7 < rows) c[size_t((bad_row + 7) * ldc)] = -100;
    std::vector<int8_t> packed(size_t(rows * pc), 0x5A);
    const Status s = lowbit::cpu::pack_s4(c.data(), rows, K, ldc, packed.data());
    expect_invalid(s, "bad row " + std::to_string(bad_row), "row " + std::to_string(bad_row) + ", col 1000");
    for (int64_t i = 0; i < bad_row * pc; ++i) ASSERT_EQ(packed[size_t(i)], want[size_t(i)]) << "byte " << i;
    for (int64_t i = bad_row * pc; i < rows * pc; ++i) ASSERT_EQ(packed[size_t(i)], 0x5A) << "byte " << i;
  }
  // and with no bad code, the whole thing
  std::vector<int8_t> packed(size_t(rows * pc), 0x5A);
  ASSERT_TRUE(lowbit::cpu::pack_s4(codes.data(), rows, K, ldc, packed.data()).is_ok());
  EXPECT_EQ(packed, want);
}

TEST(PackS4, RejectsInvalidArguments) {
  std::vector<int8_t> a(64, 0), b(64, 0);
  using lowbit::cpu::pack_s4;
  using lowbit::cpu::unpack_s4;
  expect_invalid(pack_s4(a.data(), -1, 4, 4, b.data()), "pack rows < 0", "rows");
  expect_invalid(pack_s4(a.data(), 2, -1, 4, b.data()), "pack K < 0", "K");
  expect_invalid(pack_s4(a.data(), 2, 4, -1, b.data()), "pack ldc < 0", "ldc");
  expect_invalid(pack_s4(a.data(), 2, 5, 4, b.data()), "pack ldc < K", "ldc must be >= 5");
  expect_invalid(pack_s4(nullptr, 2, 4, 4, b.data()), "pack codes null", "codes");
  expect_invalid(pack_s4(a.data(), 2, 4, 4, nullptr), "pack packed null", "packed");
  expect_invalid(unpack_s4(a.data(), -1, 4, 2, b.data()), "unpack rows < 0", "rows");
  expect_invalid(unpack_s4(a.data(), 2, -3, 2, b.data()), "unpack K < 0", "K");
  expect_invalid(unpack_s4(a.data(), 2, 5, 2, b.data()), "unpack ldp < ceil(K/2)", "ldp must be >= 3");
  expect_invalid(unpack_s4(nullptr, 2, 4, 2, b.data()), "unpack packed null", "packed");
  expect_invalid(unpack_s4(a.data(), 2, 4, 2, nullptr), "unpack codes null", "codes");
  // Empty: nothing read or written, null pointers and any stride fine.
  EXPECT_TRUE(pack_s4(nullptr, 0, 4, 0, nullptr).is_ok());
  EXPECT_TRUE(pack_s4(nullptr, 3, 0, 0, nullptr).is_ok());
  EXPECT_TRUE(unpack_s4(nullptr, 0, 5, 0, nullptr).is_ok());
  EXPECT_TRUE(unpack_s4(nullptr, 3, 0, 0, nullptr).is_ok());
}

// ---------------------------------------------------------------------------------------------------
// im2col_s8_nhwc

struct ConvCase {
  Conv2dShape s;
  int64_t c0, Cg;
  std::string str() const {
    std::ostringstream os;
    os << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " k=" << s.kh << "x" << s.kw << " s=" << s.sh
       << "," << s.sw << " p=" << s.ph << "," << s.pw << " d=" << s.dh << "," << s.dw << " c0=" << c0 << " Cg=" << Cg;
    return os.str();
  }
};

// Output size by counting, independent of the closed form: positions p >= 0 whose last tap
// p*stride + dilation*(k-1) is inside the padded extent.
int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  int64_t n = 0;
  while (n * stride + dil * (k - 1) <= in + 2 * pad - 1) ++n;
  return n;
}

// Checks one (shape, group): direct convolution vs cols . W^T with O random filters, cols fully
// written and nothing past it.
void check_conv(const ConvCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.str());
  const Conv2dShape& s = c.s;
  const int64_t Ho = out_size(s.H, s.kh, s.sh, s.ph, s.dh), Wo = out_size(s.W, s.kw, s.sw, s.pw, s.dw);
  ASSERT_GE(Ho, 1);
  ASSERT_GE(Wo, 1);
  ASSERT_EQ(Ho, s.out_h());
  ASSERT_EQ(Wo, s.out_w());
  const int64_t O = 5, L = s.kh * s.kw * c.Cg, rows = s.N * Ho * Wo;
  const std::vector<int8_t> x = random_bytes(size_t(s.N * s.H * s.W * s.C), rng);
  const std::vector<int8_t> w = random_bytes(size_t(O * L), rng);  // OHWI: (o, a, b, c)

  // Direct convolution over the group's channels.
  std::vector<int64_t> want(size_t(rows * O), 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t p = 0; p < Ho; ++p)
      for (int64_t q = 0; q < Wo; ++q)
        for (int64_t o = 0; o < O; ++o) {
          int64_t acc = 0;
          for (int64_t a = 0; a < s.kh; ++a)
            for (int64_t b = 0; b < s.kw; ++b)
              for (int64_t ch = 0; ch < c.Cg; ++ch) {
                const int64_t ih = p * s.sh - s.ph + a * s.dh, iw = q * s.sw - s.pw + b * s.dw;
                if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
                acc += int64_t(x[size_t(((n * s.H + ih) * s.W + iw) * s.C + c.c0 + ch)]) *
                       int64_t(w[size_t(((o * s.kh + a) * s.kw + b) * c.Cg + ch)]);
              }
          want[size_t(((n * Ho + p) * Wo + q) * O + o)] = acc;
        }

  const size_t cols_len = size_t(rows * L), guard = 64;
  std::vector<int8_t> cols(cols_len + guard, 0x5A), cols2(cols_len + guard, int8_t(0xA5));
  Status st = lowbit::cpu::im2col_s8_nhwc(x.data(), s, c.c0, c.Cg, cols.data());
  ASSERT_TRUE(st.is_ok()) << st.message;
  st = lowbit::cpu::im2col_s8_nhwc(x.data(), s, c.c0, c.Cg, cols2.data());
  ASSERT_TRUE(st.is_ok()) << st.message;
  for (size_t i = 0; i < cols_len; ++i) ASSERT_EQ(cols[i], cols2[i]) << "cols byte " << i << " not written";
  for (size_t i = cols_len; i < cols_len + guard; ++i) {
    ASSERT_EQ(cols[i], 0x5A) << "written past cols, +" << (i - cols_len);
    ASSERT_EQ(cols2[i], int8_t(0xA5)) << "written past cols, +" << (i - cols_len);
  }

  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < O; ++o) {
      int64_t acc = 0;
      for (int64_t j = 0; j < L; ++j) acc += int64_t(cols[size_t(r * L + j)]) * int64_t(w[size_t(o * L + j)]);
      ASSERT_EQ(acc, want[size_t(r * O + o)]) << "row " << r << " filter " << o;
    }
}

TEST(Im2colS8, MatchesDirectConvolution) {
  //                         N   H   W  C  kh kw sh sw ph pw dh dw   c0 Cg
  const std::vector<ConvCase> cases = {
      {{2, 5, 7, 3, 1, 1, 1, 1, 0, 0, 1, 1}, 0, 3},     // 1x1
      {{1, 6, 9, 4, 3, 3, 1, 1, 1, 1, 1, 1}, 0, 4},     // 3x3 "same"
      {{2, 9, 6, 5, 3, 3, 2, 2, 1, 1, 1, 1}, 0, 5},     // stride 2, H != W
      {{1, 8, 11, 3, 5, 3, 1, 2, 2, 1, 1, 1}, 0, 3},    // 5x3 rectangular, mixed stride and padding
      {{2, 10, 7, 6, 3, 3, 1, 1, 2, 2, 2, 2}, 2, 3},    // dilation 2, a group in the middle
      {{1, 13, 12, 7, 5, 3, 2, 2, 2, 1, 2, 2}, 1, 4},   // stride 2 + dilation 2 + 5x3
      {{3, 7, 5, 8, 1, 1, 2, 2, 0, 0, 1, 1}, 4, 4},     // 1x1 stride 2, second group
      {{1, 2, 3, 2, 3, 3, 1, 1, 1, 1, 1, 1}, 0, 2},     // kernel as large as the padded image
      {{1, 1, 1, 3, 5, 3, 1, 1, 2, 1, 1, 1}, 1, 2},     // a single pixel, all but one tap padding
      {{2, 4, 9, 5, 2, 4, 3, 1, 0, 2, 1, 3}, 4, 1},     // Cg = 1, even kernel, dilation only along W
      {{1, 3, 3, 1, 3, 3, 1, 1, 2, 2, 1, 1}, 0, 1},     // padding wider than half the kernel
      {{4, 32, 30, 16, 3, 3, 1, 1, 1, 1, 1, 1}, 0, 16}, // large enough for the parallel path
      {{2, 17, 23, 24, 3, 3, 2, 2, 1, 1, 1, 1}, 8, 16}, // large, strided, grouped
  };
  std::mt19937 rng(2024);
  for (const auto& c : cases) {
    check_conv(c, rng);
    if (HasFatalFailure()) return;
  }
}

TEST(Im2colS8, RandomShapes) {
  std::mt19937 rng(77);
  auto pick = [&](int lo, int hi) { return int64_t(std::uniform_int_distribution<int>(lo, hi)(rng)); };
  int done = 0;
  while (done < 60) {
    Conv2dShape s{pick(1, 3), pick(1, 12), pick(1, 12), pick(1, 9), pick(1, 5), pick(1, 5),
                  pick(1, 3), pick(1, 3), pick(0, 2), pick(0, 2), pick(1, 2), pick(1, 2)};
    if (out_size(s.H, s.kh, s.sh, s.ph, s.dh) < 1 || out_size(s.W, s.kw, s.sw, s.pw, s.dw) < 1) continue;
    const int64_t Cg = pick(1, int(s.C)), c0 = pick(0, int(s.C - Cg));
    check_conv({s, c0, Cg}, rng);
    if (HasFatalFailure()) return;
    ++done;
  }
}

// A grouped convolution (groups = 3, each its own filters) assembled from one im2col + GEMM per group
// equals the direct grouped convolution.
TEST(Im2colS8, GroupedConvolution) {
  const Conv2dShape s{2, 7, 8, 9, 3, 2, 2, 1, 1, 1, 1, 2};
  const int64_t G = 3, Cg = s.C / G, Og = 2, Ho = s.out_h(), Wo = s.out_w(), L = s.kh * s.kw * Cg;
  std::mt19937 rng(5);
  const std::vector<int8_t> x = random_bytes(size_t(s.N * s.H * s.W * s.C), rng);
  const std::vector<int8_t> w = random_bytes(size_t(G * Og * L), rng);  // (g, o, a, b, c)
  const int64_t rows = s.N * Ho * Wo;
  std::vector<int8_t> cols(size_t(rows * L));
  for (int64_t g = 0; g < G; ++g) {
    ASSERT_TRUE(lowbit::cpu::im2col_s8_nhwc(x.data(), s, g * Cg, Cg, cols.data()).is_ok());
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t p = 0; p < Ho; ++p)
        for (int64_t q = 0; q < Wo; ++q)
          for (int64_t o = 0; o < Og; ++o) {
            const int8_t* wf = &w[size_t((g * Og + o) * L)];
            int64_t direct = 0;
            for (int64_t a = 0; a < s.kh; ++a)
              for (int64_t b = 0; b < s.kw; ++b)
                for (int64_t ch = 0; ch < Cg; ++ch) {
                  const int64_t ih = p * s.sh - s.ph + a * s.dh, iw = q * s.sw - s.pw + b * s.dw;
                  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
                  direct += int64_t(x[size_t(((n * s.H + ih) * s.W + iw) * s.C + g * Cg + ch)]) *
                            int64_t(wf[(a * s.kw + b) * Cg + ch]);
                }
            const int64_t r = (n * Ho + p) * Wo + q;
            int64_t gemm = 0;
            for (int64_t j = 0; j < L; ++j) gemm += int64_t(cols[size_t(r * L + j)]) * int64_t(wf[j]);
            ASSERT_EQ(gemm, direct) << "group " << g << " at (" << n << ", " << p << ", " << q << ", " << o << ")";
          }
  }
}

TEST(Im2colS8, PointwiseIsTheInput) {
  const Conv2dShape s{3, 5, 6, 7, 1, 1, 1, 1, 0, 0, 1, 1};
  std::mt19937 rng(9);
  const std::vector<int8_t> x = random_bytes(size_t(s.N * s.H * s.W * s.C), rng);
  std::vector<int8_t> cols(x.size(), 0);
  ASSERT_TRUE(lowbit::cpu::im2col_s8_nhwc(x.data(), s, 0, s.C, cols.data()).is_ok());
  EXPECT_EQ(cols, x);
}

TEST(Im2colS8, RejectsInvalidShapes) {
  std::vector<int8_t> x(4096, 1), cols(1 << 16, 0);
  const Conv2dShape ok{1, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1};
  ASSERT_TRUE(lowbit::cpu::im2col_s8_nhwc(x.data(), ok, 0, 4, cols.data()).is_ok());
  auto bad = [&](Conv2dShape s, int64_t c0, int64_t Cg, const std::string& what, const std::string& mention) {
    expect_invalid(lowbit::cpu::im2col_s8_nhwc(x.data(), s, c0, Cg, cols.data()), what, mention);
  };
  Conv2dShape s = ok; s.N = 0;   bad(s, 0, 4, "N = 0", "N");
  s = ok; s.H = -1;              bad(s, 0, 4, "H < 0", "H");
  s = ok; s.W = 0;               bad(s, 0, 4, "W = 0", "W");
  s = ok; s.C = 0;               bad(s, 0, 1, "C = 0", "C");
  s = ok; s.kh = 0;              bad(s, 0, 4, "kh = 0", "kh");
  s = ok; s.kw = -2;             bad(s, 0, 4, "kw < 0", "kw");
  s = ok; s.sh = 0;              bad(s, 0, 4, "sh = 0", "sh");
  s = ok; s.sw = -1;             bad(s, 0, 4, "sw < 0", "sw");
  s = ok; s.dh = 0;              bad(s, 0, 4, "dh = 0", "dh");
  s = ok; s.dw = 0;              bad(s, 0, 4, "dw = 0", "dw");
  s = ok; s.ph = -1;             bad(s, 0, 4, "ph < 0", "ph");
  s = ok; s.pw = -1;             bad(s, 0, 4, "pw < 0", "pw");
  bad(ok, -1, 2, "c0 < 0", "c0");
  bad(ok, 0, 0, "Cg = 0", "Cg");
  bad(ok, 2, 3, "c0 + Cg > C", "c0 + Cg");
  bad(ok, 0, 5, "Cg > C", "c0 + Cg");
  // Kernel larger than the padded input: no output. H = 2, kh = 3, sh = 2 is the case where the closed
  // form (2 - 3) / 2 + 1 truncates to 1 instead of giving 0.
  s = ok; s.H = 2; s.kh = 3; s.sh = 2; s.ph = 0;  bad(s, 0, 4, "kernel > image (stride 2)", "Ho");
  s = ok; s.W = 4; s.kw = 3; s.dw = 3; s.pw = 0;  bad(s, 0, 4, "dilated kernel > image", "Wo");
  s = ok; s.H = 1; s.kh = 4; s.ph = 1;            bad(s, 0, 4, "kernel > padded image", "Ho");
  // Sizes whose products overflow int64.
  s = ok; s.N = int64_t(1) << 40; s.H = int64_t(1) << 30;  bad(s, 0, 4, "huge input", "overflows");
  expect_invalid(lowbit::cpu::im2col_s8_nhwc(nullptr, ok, 0, 4, cols.data()), "x null", "x");
  expect_invalid(lowbit::cpu::im2col_s8_nhwc(x.data(), ok, 0, 4, nullptr), "cols null", "cols");
}

}  // namespace
