// lowbit CPU weight-only quantized matmul / dequantize (include/lowbit/kernels/wq.h).
//
// * wq_matmul_ref against the float64 reference of wq_test_util.h (the math of wq.h applied to the
//   UNPACKED codes, so packing and decoding are checked too), with the tolerance of wq_compare:
//     |y - ref| <= 1e-5 * sum_k |x'_k| |W_kn| (+ |bias|)  +  one rounding of |ref| to the output dtype.
// * Every ISA path this CPU can run (scalar, AVX2, AVX-512), with 1 and 2 threads and with the default
//   and a forced 32-column block (several blocks even for small N): BITWISE equal to wq_matmul_ref, the
//   design guarantee of wq_internal.h (each output is one fp32 FMA chain over stored rows in order), so
//   also deterministic across thread counts.
// * Odd sizes (K = 1, 31, 33, 100, 257; N = 1, 3, 5, 37, 130), every bit width alone, channel-mix segment
//   mixes, act-order g_idx, groups straddling chunks, perm + channel_scale, asym / sym, all x dtypes and
//   sdtypes, bias and no bias, M = 1, 2, 3, 5, 9, 17, padding bits and extra word rows filled with garbage,
//   padded strides (x padding is NaN, output padding a sentinel).
// * wq_dequantize bitwise equal to the fp32 formula rounded once.
// * No read past the end of any input: every array placed right before a PROT_NONE page.
// * Argument and index errors: non-ok Status whose message names the problem, nothing written.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/wq_internal.h"
#include "lowbit/kernels/wq.h"
#include "test_util.h"
#include "wq_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit::WqWeight;
using lowbit::cpu::detail::WqIsa;
using namespace lowbit_test;

std::vector<WqIsa> wq_isas() {
  std::vector<WqIsa> v;
  for (WqIsa isa : {WqIsa::kScalar, WqIsa::kAvx2, WqIsa::kAvx512})
    if (int32_t(isa) <= int32_t(lowbit::cpu::detail::wq_best_isa())) v.push_back(isa);
  return v;
}

// The full check of one case (see the top of the file) on the weight w (made from c.spec).
void check_weight(const WqCase& c, const HostWq& w) {
  SCOPED_TRACE(describe(c));
  const WqWeight v = w.view();
  const int64_t M = c.M, N = w.N, K = w.K;
  const int64_t ldx = K + c.ldx_pad, ldo = N + c.ldo_pad;
  const HostFloats x = random_matrix(M, K, ldx, c.xtype, c.spec.seed * 31u + 7u);
  HostFloats bias;
  if (c.bias) bias = random_floats(size_t(N), c.spec.sdtype, c.spec.seed * 17u + 3u, -0.5, 0.5);
  const void* bptr = c.bias ? bias.data() : nullptr;

  std::vector<double> mag;
  const std::vector<double> ref = ref_matmul(w, x.values, M, ldx, c.bias ? &bias.values : nullptr, &mag);

  const size_t on = size_t(M * ldo);
  HostFloats want = sentinel_floats(on, c.xtype);
  Status s = lowbit::cpu::wq_matmul_ref(v, x.data(), c.xtype, M, ldx, bptr, want.data(), ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  const std::string err = wq_compare(want.data(), c.xtype, M, N, ldo, ref, mag);
  ASSERT_TRUE(err.empty()) << "wq_matmul_ref: " << err;

  for (WqIsa isa : wq_isas())
    for (int nt : {1, 2})
      for (int64_t block : {int64_t(0), int64_t(32)}) {
        HostFloats got = sentinel_floats(on, c.xtype);
        s = lowbit::cpu::detail::wq_matmul_isa(isa, v, x.data(), c.xtype, M, ldx, bptr, got.data(), ldo, nt, block);
        ASSERT_TRUE(s.is_ok()) << s.message;
        if (got.bytes != want.bytes) {
          const std::string e = wq_compare(got.data(), c.xtype, M, N, ldo, ref, mag);
          FAIL() << lowbit::cpu::detail::wq_isa_name(isa) << " threads=" << nt << " block=" << block
                 << ": not bitwise equal to wq_matmul_ref" << (e.empty() ? " (within tolerance)" : ": " + e);
        }
      }
  HostFloats got = sentinel_floats(on, c.xtype);
  s = lowbit::cpu::wq_matmul(v, x.data(), c.xtype, M, ldx, bptr, got.data(), ldo);
  ASSERT_TRUE(s.is_ok()) << s.message;
  EXPECT_TRUE(got.bytes == want.bytes) << "wq_matmul: not bitwise equal to wq_matmul_ref";
}

void check_case(const WqCase& c) { check_weight(c, make_wq(c.spec)); }

// check_case over a list, stopping at the first fatal failure.
void check_cases(const std::vector<WqCase>& cases) {
  for (const WqCase& c : cases) {
    check_case(c);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// ---------------------------------------------------------------------------------------------------

TEST(WqKernel, ReportsIsa) {
  const WqIsa best = lowbit::cpu::detail::wq_best_isa();
  std::cout << "[ wq ] fast path: " << lowbit::cpu::detail::wq_isa_name(best) << "\n";
  EXPECT_EQ(wq_isas().back(), best);
}

// The test packer against GPTQ's formula for 4 bits (row k in word k / 8 at bits (k % 8) * 4) and a
// hand-built 3-bit chunk, so that the helper itself is pinned to wq.h.
TEST(WqKernel, TestPackerMatchesLayout) {
  WqSpec s;
  s.K = 70;
  s.N = 3;
  s.segments = {{4, 70}};
  const HostWq w = make_wq(s);
  for (int64_t k = 0; k < 70; ++k)
    for (int64_t n = 0; n < 3; ++n) {
      const uint32_t word = w.qweight[size_t((k / 8) * 3 + n)];
      EXPECT_EQ((word >> ((k % 8) * 4)) & 15u, w.codes[size_t(k * 3 + n)]) << k << "," << n;
    }
  // 3 bits: row 10 occupies bits 30..32, i.e. bits 30, 31 of word 0 and bit 0 of word 1.
  WqSpec s3;
  s3.K = 32;
  s3.N = 1;
  s3.segments = {{3, 32}};
  const HostWq w3 = make_wq(s3);
  const uint32_t q10 = ((w3.qweight[0] >> 30) & 3u) | ((w3.qweight[1] & 1u) << 2);
  EXPECT_EQ(q10, w3.codes[10]);
  const uint32_t q31 = (w3.qweight[2] >> 29) & 7u;
  EXPECT_EQ(q31, w3.codes[31]);
}

TEST(WqKernel, OddSizes) { check_cases(wq_cases_odd_sizes(WqTarget::kCpu)); }

TEST(WqKernel, EveryBitWidthAlone) { check_cases(wq_cases_every_width(WqTarget::kCpu)); }

TEST(WqKernel, ChannelMixSegments) { check_cases(wq_cases_channel_mix()); }

TEST(WqKernel, ActOrderPermChannelScale) { check_cases(wq_cases_act_order_perm_cscale()); }

// Groups of 48 rows: chunks alternate between one group and two (the per-row group path), and the
// sorted act-order layout a layer gets after permuting rows by group.
TEST(WqKernel, GroupsStraddlingChunks) { check_cases(wq_cases_groups_straddling_chunks()); }

TEST(WqKernel, DtypesBiasAndRowCounts) { check_cases(wq_cases_dtypes_bias_rows(WqTarget::kCpu)); }

// Bigger: several column blocks and 32-row chunks per block; M = 12 = one tile of 8 and one of 4.
// Scales / zeros for which a magic-number dequantization (code in the mantissa of 2^23 + q 2^16, one FMA
// against s 2^7 + z) would round differently from fmaf(s, q, -z) (the CUDA-core kernel switches to its
// generic form for them; the CPU kernels must stay bitwise equal to the reference on them too).
TEST(WqKernel, MixedFastAndGenericColumns) {
  uint32_t seed = 700;
  for (int32_t b : {4, 2, 8, 1})
    for (bool asym : {false, true})
      for (int64_t N : {256, 258}) {
        WqCase c;
        c.spec.K = 512;
        c.spec.N = N;
        c.spec.segments = {{b, 0}};
        c.spec.group_size = 128;
        c.spec.asym = asym;
        c.spec.sdtype = DType::kFloat16;
        c.spec.seed = seed++;
        c.M = asym ? 1 : 3;
        c.xtype = DType::kFloat32;
        HostWq h = make_wq(c.spec);
        mix_inexact_fast_constants(h, asym);
        check_weight(c, h);
        if (::testing::Test::HasFatalFailure()) return;
      }
}

TEST(WqKernel, MediumShape) {
  WqCase c;
  c.spec.K = 1024;
  c.spec.N = 300;
  c.spec.segments = {{4, 512}, {2, 256}, {3, 0}};
  c.spec.group_size = 128;
  c.spec.seed = 600;
  c.M = 12;
  c.xtype = DType::kFloat16;
  c.bias = true;
  check_case(c);
}

TEST(WqKernel, DeterministicRepeatedCalls) {
  WqSpec s;
  s.K = 512;
  s.N = 96;
  s.segments = {{3, 256}, {4, 0}};
  s.act_order = true;
  s.perm = true;
  s.seed = 700;
  const HostWq w = make_wq(s);
  const HostFloats x = random_matrix(3, 512, 512, DType::kFloat32, 701);
  HostFloats a = sentinel_floats(3 * 96, DType::kFloat32), b = sentinel_floats(3 * 96, DType::kFloat32);
  ASSERT_TRUE(lowbit::cpu::wq_matmul(w.view(), x.data(), DType::kFloat32, 3, 512, nullptr, a.data(), 96).is_ok());
  ASSERT_TRUE(lowbit::cpu::wq_matmul(w.view(), x.data(), DType::kFloat32, 3, 512, nullptr, b.data(), 96).is_ok());
  EXPECT_TRUE(a.bytes == b.bytes);
}

TEST(WqKernel, EmptyShapesWriteNothing) {
  WqSpec s;
  s.K = 40;
  s.N = 8;
  s.segments = {{4, 40}};
  const HostWq w = make_wq(s);
  HostFloats out = sentinel_floats(16, DType::kFloat32);
  const HostFloats x = random_matrix(1, 40, 40, DType::kFloat32, 1);
  ASSERT_TRUE(lowbit::cpu::wq_matmul(w.view(), x.data(), DType::kFloat32, 0, 40, nullptr, out.data(), 8).is_ok());
  ASSERT_TRUE(lowbit::cpu::wq_matmul(w.view(), nullptr, DType::kFloat32, 0, 40, nullptr, nullptr, 8).is_ok());
  WqWeight v = w.view();
  v.N = 0;
  v.qweight = nullptr;
  v.g_idx = nullptr;
  ASSERT_TRUE(lowbit::cpu::wq_matmul(v, x.data(), DType::kFloat32, 1, 40, nullptr, out.data(), 8).is_ok());
  ASSERT_TRUE(lowbit::cpu::wq_dequantize(w.view(), 3, 3, DType::kFloat32, out.data(), 1).is_ok());
  EXPECT_TRUE(out.bytes == sentinel_floats(16, DType::kFloat32).bytes);
}

// ---------------------------------------------------------------------------------------------------
// Bounds: each input array ends exactly where a PROT_NONE page begins, so a read one byte past any of them
// (a full-vector load of a column tail, a word row past the last chunk, a scale past N) faults.

class GuardedCopy {
 public:
  GuardedCopy(const void* src, size_t bytes) {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    const size_t data_pages = (bytes + page_ - 1) / page_ + 1;
    len_ = (data_pages + 1) * page_;
    void* m = mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return;
    base_ = static_cast<char*>(m);
    mprotect(base_ + data_pages * page_, page_, PROT_NONE);
    ptr_ = base_ + data_pages * page_ - bytes;
    std::memcpy(ptr_, src, bytes);
  }
  ~GuardedCopy() {
    if (base_ != nullptr) munmap(base_, len_);
  }
  GuardedCopy(const GuardedCopy&) = delete;
  GuardedCopy& operator=(const GuardedCopy&) = delete;
  const void* get() const { return ptr_; }
  bool ok() const { return base_ != nullptr; }

 private:
  size_t page_ = 0, len_ = 0;
  char* base_ = nullptr;
  char* ptr_ = nullptr;
};

TEST(WqKernel, NoReadPastAnyInput) {
  uint32_t seed = 650;
  for (int64_t N : {1, 3, 5, 8, 13, 37})
    for (int32_t b : {3, 4, 8})
      for (int64_t M : {1, 3}) {
        WqSpec s;
        s.K = 100;
        s.N = N;
        s.segments = {{b, 64}, {5, 0}};
        s.group_size = 32;
        s.perm = true;
        s.channel_scale = true;
        s.sdtype = DType::kFloat16;
        s.seed = seed++;
        const HostWq w = make_wq(s);
        const DType xt = DType::kBFloat16;
        const HostFloats x = random_matrix(M, 100, 100, xt, seed);
        const HostFloats bias = random_floats(size_t(N), s.sdtype, seed + 1);
        GuardedCopy qw(w.qweight.data(), w.qweight.size() * 4), gi(w.g_idx.data(), w.g_idx.size() * 4),
            pm(w.perm.data(), w.perm.size() * 4), sc(w.scales.data(), size_t(w.groups * N) * 2),
            zr(w.zeros.data(), size_t(w.groups * N) * 2), cs(w.channel_scale.data(), 100 * 2),
            xg(x.data(), size_t(M * 100) * 2), bg(bias.data(), size_t(N) * 2);
        ASSERT_TRUE(qw.ok() && gi.ok() && pm.ok() && sc.ok() && zr.ok() && cs.ok() && xg.ok() && bg.ok());
        WqWeight v = w.view();
        v.qweight = static_cast<const uint32_t*>(qw.get());
        v.g_idx = static_cast<const int32_t*>(gi.get());
        v.perm = static_cast<const int32_t*>(pm.get());
        v.scales = sc.get();
        v.zeros = zr.get();
        v.channel_scale = cs.get();
        HostFloats want = sentinel_floats(size_t(M * N), xt);
        ASSERT_TRUE(lowbit::cpu::wq_matmul_ref(v, xg.get(), xt, M, 100, bg.get(), want.data(), N).is_ok());
        for (WqIsa isa : wq_isas()) {
          HostFloats got = sentinel_floats(size_t(M * N), xt);
          const Status st =
              lowbit::cpu::detail::wq_matmul_isa(isa, v, xg.get(), xt, M, 100, bg.get(), got.data(), N, 1, 0);
          ASSERT_TRUE(st.is_ok()) << st.message;
          EXPECT_TRUE(got.bytes == want.bytes) << lowbit::cpu::detail::wq_isa_name(isa) << " N=" << N << " b=" << b;
        }
        HostFloats d = sentinel_floats(size_t(100 * N), DType::kFloat32);
        ASSERT_TRUE(lowbit::cpu::wq_dequantize(v, 0, N, DType::kFloat32, d.data(), N).is_ok());
      }
}

// ---------------------------------------------------------------------------------------------------
// wq_dequantize: out[perm[r], n - n0] = to_otype(w(r, n)), bitwise; padding columns untouched.

TEST(WqKernel, DequantizeExact) {
  for (const WqDequantCase& dc : wq_dequant_cases(WqTarget::kCpu)) {
    const DType ot = dc.otype;
    const int64_t K = dc.spec.K, n0 = dc.n0, n1 = dc.n1;
    const HostWq w = make_wq(dc.spec);
    const int64_t W = n1 - n0, ldo = W + 3;
    HostFloats out = sentinel_floats(size_t(K * ldo), ot);
    const Status st = lowbit::cpu::wq_dequantize(w.view(), n0, n1, ot, out.data(), ldo);
    ASSERT_TRUE(st.is_ok()) << st.message;
    const std::vector<float> ref = ref_dequant(w, n0, n1);
    HostFloats want = sentinel_floats(size_t(K * ldo), ot);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < W; ++n) wq_store(ot, want.data(), size_t(k * ldo + n), ref[size_t(k * W + n)]);
    if (out.bytes != want.bytes) {
      for (size_t i = 0; i < out.bytes.size(); ++i)
        if (out.bytes[i] != want.bytes[i]) {
          const int64_t e = int64_t(i / wq_dtype_size(ot));
          FAIL() << "K=" << K << " N=" << dc.spec.N << " otype=" << lowbit::dtype_name(ot) << " perm=" << dc.spec.perm
                 << ": first mismatch at row " << e / ldo << " col " << e % ldo;
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors. Each: kInvalidArgument, a message naming the problem, and (matmul) the output untouched.

struct ErrFixture {
  HostWq w;
  HostFloats x;
  ErrFixture() {
    w = make_wq(wq_error_spec());
    x = random_matrix(2, 96, 96, DType::kFloat32, 901);
  }
};

void expect_matmul_error(const WqWeight& v, const void* x, int64_t M, int64_t ldx, int64_t ldo,
                         const std::string& what, const std::string& needle, DType xt = DType::kFloat32) {
  for (int path = 0; path < 2; ++path) {
    HostFloats out = sentinel_floats(size_t(2 * 16 + 8), DType::kFloat32);
    const Status s = path == 0 ? lowbit::cpu::wq_matmul(v, x, xt, M, ldx, nullptr, out.data(), ldo)
                               : lowbit::cpu::wq_matmul_ref(v, x, xt, M, ldx, nullptr, out.data(), ldo);
    expect_invalid(s, what + (path == 0 ? " (wq_matmul)" : " (wq_matmul_ref)"), needle);
    EXPECT_EQ(s.message.rfind(path == 0 ? "wq_matmul: " : "wq_matmul_ref: ", 0), size_t(0)) << s.message;
    EXPECT_TRUE(out.bytes == sentinel_floats(size_t(2 * 16 + 8), DType::kFloat32).bytes) << what << ": output written";
  }
}

TEST(WqKernel, ArgumentErrors) {
  ErrFixture f;
  const WqWeight good = f.w.view();
  const void* x = f.x.data();
  {
    HostFloats out = sentinel_floats(32, DType::kFloat32);
    ASSERT_TRUE(lowbit::cpu::wq_matmul(good, x, DType::kFloat32, 2, 96, nullptr, out.data(), 16).is_ok());
  }
  for (const WqWeightError& e : wq_weight_errors()) {
    WqWeight v = good;
    e.apply(v);
    expect_matmul_error(v, x, 2, 96, 16, e.what, e.needle);
  }
  expect_matmul_error(good, nullptr, 2, 96, 16, "x null", "x is null");
  expect_matmul_error(good, x, 2, 95, 16, "ldx < K", "ldx must be >= K (96), got 95");
  expect_matmul_error(good, x, 2, 96, 15, "ldo < N", "ldo must be >= N (16), got 15");
  expect_matmul_error(good, x, -1, 96, 16, "M < 0", "M must be >= 0");
  expect_matmul_error(good, x, 2, 96, 16, "xtype", "xtype", DType(3));
  {
    HostFloats out = sentinel_floats(32, DType::kFloat32);
    expect_invalid(lowbit::cpu::wq_matmul(good, x, DType::kFloat32, 2, 96, nullptr, nullptr, 16), "out null",
                   "out is null");
  }
}

TEST(WqKernel, IndexErrors) {
  ErrFixture f;
  const void* x = f.x.data();
  {
    HostWq w = f.w;
    w.g_idx[37] = int32_t(w.groups);
    expect_matmul_error(w.view(), x, 2, 96, 16, "g_idx too large",
                        "g_idx[37] must be in [0, groups=" + std::to_string(w.groups) + "), got " +
                            std::to_string(w.groups));
  }
  {
    HostWq w = f.w;
    w.g_idx[95] = -1;
    expect_matmul_error(w.view(), x, 2, 96, 16, "g_idx negative", "g_idx[95] must be in [0, groups=");
  }
  {
    HostWq w = f.w;
    w.perm[3] = 96;
    expect_matmul_error(w.view(), x, 2, 96, 16, "perm out of range", "perm[3] must be in [0, K=96), got 96");
  }
  {
    HostWq w = f.w;
    w.perm[10] = -5;
    expect_matmul_error(w.view(), x, 2, 96, 16, "perm negative", "got -5");
  }
  {
    HostWq w = f.w;
    w.perm[50] = w.perm[20];  // a repeat: not a permutation
    expect_matmul_error(w.view(), x, 2, 96, 16, "perm repeat",
                        "perm must be a permutation: perm[50] repeats perm[20], got " + std::to_string(w.perm[20]));
  }
  // wq_dequantize: the same index checks, nothing written.
  {
    HostWq w = f.w;
    w.g_idx[0] = 1000;
    HostFloats out = sentinel_floats(96 * 16, DType::kFloat16);
    expect_invalid(lowbit::cpu::wq_dequantize(w.view(), 0, 16, DType::kFloat16, out.data(), 16), "dequant g_idx",
                   "wq_dequantize: g_idx[0] must be in [0, groups=");
    EXPECT_TRUE(out.bytes == sentinel_floats(96 * 16, DType::kFloat16).bytes);
    w = f.w;
    w.perm[0] = w.perm[1];
    expect_invalid(lowbit::cpu::wq_dequantize(w.view(), 0, 16, DType::kFloat16, out.data(), 16), "dequant perm",
                   "perm must be a permutation");
    EXPECT_TRUE(out.bytes == sentinel_floats(96 * 16, DType::kFloat16).bytes);
  }
}

TEST(WqKernel, DequantizeArgumentErrors) {
  ErrFixture f;
  const WqWeight v = f.w.view();
  HostFloats out = sentinel_floats(96 * 16, DType::kFloat32);
  expect_invalid(lowbit::cpu::wq_dequantize(v, -1, 4, DType::kFloat32, out.data(), 16), "n0 < 0", "n0 must be in");
  expect_invalid(lowbit::cpu::wq_dequantize(v, 4, 3, DType::kFloat32, out.data(), 16), "n1 < n0", "n1 must be in");
  expect_invalid(lowbit::cpu::wq_dequantize(v, 0, 17, DType::kFloat32, out.data(), 17), "n1 > N", "n1 must be in");
  expect_invalid(lowbit::cpu::wq_dequantize(v, 0, 16, DType::kFloat32, out.data(), 15), "ldo", "ldo must be >=");
  expect_invalid(lowbit::cpu::wq_dequantize(v, 0, 16, DType(9), out.data(), 16), "otype", "otype");
  expect_invalid(lowbit::cpu::wq_dequantize(v, 0, 16, DType::kFloat32, nullptr, 16), "out null", "out is null");
  WqWeight b = v;
  b.bits[0] = 9;
  expect_invalid(lowbit::cpu::wq_dequantize(b, 0, 16, DType::kFloat32, out.data(), 16), "bits", "bits must be");
  EXPECT_TRUE(out.bytes == sentinel_floats(96 * 16, DType::kFloat32).bytes);
}

TEST(WqKernel, UnsupportedIsaIsAnError) {
  if (lowbit::cpu::detail::wq_best_isa() == WqIsa::kAvx512) GTEST_SKIP() << "every ISA is supported here";
  ErrFixture f;
  HostFloats out = sentinel_floats(32, DType::kFloat32);
  expect_invalid(lowbit::cpu::detail::wq_matmul_isa(WqIsa::kAvx512, f.w.view(), f.x.data(), DType::kFloat32, 2, 96,
                                                    nullptr, out.data(), 16),
                 "avx512 forced", "not supported");
}

}  // namespace
