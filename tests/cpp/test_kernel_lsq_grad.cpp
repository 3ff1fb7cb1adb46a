// lowbit CPU LSQ input gradients (lsq_grad.h): a hand-computed example (ties to even, clipping on both
// sides, NaN inputs and gradients, gscale); every fast path (AVX-512 where the CPU has it, the portable
// one) at 1, 2 and 3 threads against the scalar reference, grad_x bitwise and the sums bitwise across
// thread counts; the reference and the fast paths against the independent float64 reference of
// lsq_test_util.h on odd sizes, all dtype pairs, with and without shift / gscale; fp16 / bf16 narrowing
// of special values (NaN payloads, overflow, subnormals); argument validation and empty views.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/lsq_grad_internal.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/lsq_grad.h"
#include "lsq_test_util.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using lowbit::LsqGradParams;
using lowbit::Status;
using namespace lowbit_test;

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// A path of the CPU kernel: the reference, or lsq_grad_path(avx512, ., threads).
struct Path {
  bool ref;
  bool avx512;
  int threads;
  std::string str() const {
    if (ref) return "ref";
    return std::string(avx512 ? "avx512" : "portable") + " x" + std::to_string(threads);
  }
};

std::vector<Path> fast_paths() {
  std::vector<Path> v;
  for (bool avx : {false, true}) {
    if (avx && !lowbit::cpu::detail::lsq_grad_avx512_supported()) continue;
    for (int t : {1, 2, 3}) v.push_back({false, avx, t});
  }
  return v;
}

Status run_path(const Path& path, const LsqGradParams& p) {
  if (path.ref) return lowbit::cpu::lsq_grad_ref(p);
  return lowbit::cpu::detail::lsq_grad_path(path.avx512, p, path.threads);
}

// Runs case c on `d` through `path` into poisoned outputs.
LsqOut run_case(const LsqCase& c, const LsqData& d, const Path& path) {
  LsqOut o;
  o.gx.assign(d.x.size(), 0xFF);  // NaN in every dtype: an element not written shows up
  o.shift.assign(size_t(c.C), kNaN);
  o.scale = kNaN;
  const LsqGradParams p = lsq_params(c, d.g.data(), d.x.data(), d.shift.data(), &d.step, &d.gscale, o.gx.data(),
                                     o.shift.data(), &o.scale);
  const Status st = run_path(path, p);
  EXPECT_TRUE(st.is_ok()) << path.str() << " " << c.str() << ": " << st.message;
  return o;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// ---------------------------------------------------------------------------------------------------
// Hand-computed: (outer, C, inner) = (2, 3, 1), step 0.5, codes [-8, 7], shift {0.5, -0.25, 0}.
//   (0,0) x=1.0  v=(1.0+0.5)/0.5=3     inside  R=0            g=1
//   (0,1) x=2.0  v=(2.0-0.25)/0.5=3.5  inside  R=rne(3.5)-3.5=0.5  g=2
//   (0,2) x=4.6  v=9.2                 above   R=7            g=3
//   (1,0) x=-10  v=-19                 below   R=-8           g=4
//   (1,1) x=1.5  v=2.5                 inside  R=rne(2.5)-2.5=-0.5 (ties to even)  g=5
//   (1,2) x=0.25 v=0.5                 inside  R=-0.5         g=-6
// grad_x = {1, 2, 0, 0, 5, -6}, grad_shift = {1, 7, -6},
// grad_scale = (0 + 1 + 21 - 32 - 2.5 + 3) / sqrt(6 * 7) = -9.5 / sqrt(42).
struct Example {
  std::vector<float> x{1.0f, 2.0f, 4.6f, -10.0f, 1.5f, 0.25f};
  std::vector<float> g{1.f, 2.f, 3.f, 4.f, 5.f, -6.f};
  std::vector<float> shift{0.5f, -0.25f, 0.0f};
  float step = 0.5f, gscale = 1.f;
  bool use_gscale = false;
  std::vector<float> gx = std::vector<float>(6, kNaN), gsh = std::vector<float>(3, kNaN);
  float gsc = kNaN;
  LsqGradParams params() {
    LsqGradParams p;
    p.outer = 2;
    p.channels = 3;
    p.inner = 1;
    p.g = g.data();
    p.g_scale = use_gscale ? &gscale : nullptr;
    p.x = x.data();
    p.shift = shift.data();
    p.step = &step;
    p.qmin = -8;
    p.qmax = 7;
    p.numel = 6;
    p.grad_x = gx.data();
    p.grad_shift = gsh.data();
    p.grad_scale = &gsc;
    return p;
  }
};

std::vector<Path> all_paths() {
  std::vector<Path> v{{true, false, 1}};
  for (const Path& p : fast_paths()) v.push_back(p);
  return v;
}

TEST(LsqGrad, WorkedExample) {
  for (const Path& path : all_paths()) {
    for (bool gs : {false, true}) {
      Example e;
      e.use_gscale = gs;
      e.gscale = 2.0f;
      ASSERT_TRUE(run_path(path, e.params()).is_ok()) << path.str();
      const float m = gs ? 2.0f : 1.0f;
      const float want_x[6] = {1, 2, 0, 0, 5, -6};
      for (int i = 0; i < 6; ++i) EXPECT_EQ(e.gx[i], m * want_x[i]) << path.str() << " i=" << i;
      EXPECT_FALSE(std::signbit(e.gx[2]));  // 3 * 0 = +0
      EXPECT_EQ(e.gsh[0], m * 1.f) << path.str();
      EXPECT_EQ(e.gsh[1], m * 7.f) << path.str();
      EXPECT_EQ(e.gsh[2], m * -6.f) << path.str();
      EXPECT_EQ(e.gsc, float(double(m) * -9.5 / std::sqrt(42.0))) << path.str();
    }
  }
}

// The sums written in fp16 / bf16 (shift_out_type / scale_out_type): float_convert.h's rounding of the
// fp32 outputs, on every path, NaN canonical; a bad output dtype is an error.
TEST(LsqGrad, SumsInSixteenBitDtypes) {
  for (const Path& path : all_paths()) {
    for (DType t : {DType::kFloat16, DType::kBFloat16}) {
      for (bool nan_scale : {false, true}) {
        Example e;
        if (nan_scale) e.x[4] = kNaN;  // R = NaN: grad_scale NaN
        ASSERT_TRUE(run_path(path, e.params()).is_ok()) << path.str();
        Example h;
        if (nan_scale) h.x[4] = kNaN;
        std::vector<uint16_t> sh16(3, 0xDEAD);
        uint16_t sc16[2] = {0xDEAD, 0xBEEF};
        LsqGradParams p = h.params();
        p.grad_shift = sh16.data();
        p.grad_scale = sc16;
        p.shift_out_type = t;
        p.scale_out_type = t;
        ASSERT_TRUE(run_path(path, p).is_ok()) << path.str();
        auto narrow = [t](float v) -> uint16_t {
          if (v != v) return t == DType::kFloat16 ? 0x7e00 : 0x7fc0;
          return t == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
        };
        for (int c = 0; c < 3; ++c) EXPECT_EQ(sh16[c], narrow(e.gsh[c])) << path.str() << " c=" << c;
        EXPECT_EQ(sc16[0], narrow(e.gsc)) << path.str();
        EXPECT_EQ(sc16[1], 0xBEEF) << "wrote past grad_scale";
        EXPECT_EQ(nan_scale, e.gsc != e.gsc);
      }
    }
    Example e;
    LsqGradParams p = e.params();
    p.scale_out_type = static_cast<DType>(6);
    expect_invalid(run_path(path, p), "bad scale_out_type", "scale_out_type");
    p = e.params();
    p.shift_out_type = static_cast<DType>(-1);
    expect_invalid(run_path(path, p), "bad shift_out_type", "shift_out_type");
  }
}

TEST(LsqGrad, WorkedExampleNonFinite) {
  for (const Path& path : all_paths()) {
    {  // NaN x: outside (grad_x = 5 * 0 = 0), R NaN: grad_scale NaN, grad_shift unaffected
      Example e;
      e.x[4] = kNaN;
      ASSERT_TRUE(run_path(path, e.params()).is_ok());
      EXPECT_EQ(e.gx[4], 0.f) << path.str();
      EXPECT_EQ(e.gsh[1], 2.f) << path.str();
      EXPECT_TRUE(std::isnan(e.gsc)) << path.str();
    }
    {  // -inf gradient at a clipped element: -inf * 0 = NaN in grad_x and the channel sum; +inf x: above
      Example e;
      e.g[2] = -kInf;
      e.x[0] = kInf;
      ASSERT_TRUE(run_path(path, e.params()).is_ok());
      EXPECT_TRUE(std::isnan(e.gx[2])) << path.str();
      EXPECT_TRUE(std::isnan(e.gsh[2])) << path.str();
      EXPECT_EQ(e.gx[0], 0.f) << path.str();
      EXPECT_EQ(e.gsh[0], 0.f) << path.str();
      EXPECT_TRUE(std::isinf(e.gsc) && e.gsc < 0) << path.str();  // R * g = 7 * -inf
    }
    {  // negative gradient outside the range: -4 * 0 = -0
      Example e;
      e.g[3] = -4.f;
      ASSERT_TRUE(run_path(path, e.params()).is_ok());
      EXPECT_EQ(e.gx[3], 0.f);
      EXPECT_TRUE(std::signbit(e.gx[3])) << path.str();
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Every case of lsq_cases(): the reference against the float64 one; every fast path bitwise against the
// reference for grad_x, within tolerance of the float64 one for the sums, and bitwise equal sums at 1, 2
// and 3 threads.
TEST(LsqGrad, PathsAgainstReferences) {
  std::mt19937 rng(20261121);
  for (const LsqCase& c : lsq_cases()) {
    const LsqData d = make_lsq_data(c, rng);
    const LsqRef r = lsq_reference(c, d);
    const LsqOut ref = run_case(c, d, {true, false, 1});
    const std::string bad = lsq_check(c, r, ref);
    EXPECT_EQ(bad, "") << "ref " << c.str();
    const LsqOut* first[2] = {nullptr, nullptr};  // per ISA: the 1-thread run
    std::vector<LsqOut> outs;
    outs.reserve(8);
    for (const Path& path : fast_paths()) {
      outs.push_back(run_case(c, d, path));
      const LsqOut& o = outs.back();
      if (c.want_x) EXPECT_TRUE(o.gx == ref.gx) << path.str() << " " << c.str() << ": grad_x differs from ref";
      EXPECT_EQ(lsq_check(c, r, o), "") << path.str() << " " << c.str();
      const LsqOut*& f = first[path.avx512 ? 1 : 0];
      if (f == nullptr) {
        f = &o;
      } else {
        if (c.want_shift)
          for (size_t ch = 0; ch < o.shift.size(); ++ch)
            EXPECT_TRUE(same_bits(o.shift[ch], f->shift[ch])) << path.str() << " " << c.str() << " c=" << ch;
        if (c.want_scale) EXPECT_TRUE(same_bits(o.scale, f->scale)) << path.str() << " " << c.str();
      }
    }
  }
}

// Outputs not requested are not written; inputs are never written.
TEST(LsqGrad, WritesOnlyRequestedOutputs) {
  std::mt19937 rng(7);
  LsqCase c;
  c.outer = 19;
  c.C = 24;
  c.inner = 1;
  const LsqData d = make_lsq_data(c, rng);
  for (const Path& path : all_paths()) {
    for (int mask = 1; mask < 8; ++mask) {
      LsqCase cm = c;
      cm.want_x = mask & 1;
      cm.want_shift = mask & 2;
      cm.want_scale = mask & 4;
      LsqData dd = d;
      const LsqOut o = run_case(cm, dd, path);
      EXPECT_TRUE(dd.g == d.g && dd.x == d.x) << "inputs modified";
      if (!cm.want_x)
        for (uint8_t b : o.gx) ASSERT_EQ(b, 0xFF) << path.str();
      if (!cm.want_shift)
        for (float v : o.shift) ASSERT_TRUE(std::isnan(v)) << path.str();
      if (!cm.want_scale) EXPECT_TRUE(std::isnan(o.scale)) << path.str();
      EXPECT_EQ(lsq_check(cm, lsq_reference(cm, dd), o), "") << path.str() << " mask=" << mask;
    }
  }
}

// Narrowing grad_x to fp16 / bf16: ties, overflow, subnormals must give float_convert.h's bits on every
// path, and NaNs of any sign and payload the canonical NaN of the dtype (g passes through unmasked: x = 0
// is inside).
TEST(LsqGrad, NarrowingSpecialValues) {
  const uint32_t nan_bits[] = {0x7fc00000u, 0xffc00000u, 0x7fe00001u, 0xffc12345u};
  std::vector<float> vals = {65504.f, 65519.f, 65520.f, -65520.f, 1e-8f, -3e-8f, 5.9604645e-8f, 2.9802322e-8f,
                             1.0009765625f, 1.00048828125f, 1.0f + 0x1p-8f, 1.0f + 0x1p-9f, 3.3895314e38f,
                             -0.f, 0.f, kInf, -kInf, 1e-40f};
  for (uint32_t b : nan_bits) vals.push_back(lowbit::bits_to_float(b));
  for (DType xt : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
    LsqCase c;
    c.outer = 1;
    c.C = 1;
    c.inner = int64_t(vals.size());
    c.xt = xt;
    c.shift = false;
    c.want_shift = false;
    c.want_scale = false;
    LsqData d;
    d.step = 1.f;
    d.g.resize(vals.size() * 4);
    std::memcpy(d.g.data(), vals.data(), d.g.size());
    d.x.assign(vals.size() * lsq_dtype_size(xt), 0);  // x = 0 everywhere: inside
    for (const Path& path : all_paths()) {
      const LsqOut o = run_case(c, d, path);
      for (size_t i = 0; i < vals.size(); ++i) {
        const bool nan = std::isnan(vals[i]);
        if (xt == DType::kFloat32) {
          const float got = lsq_load(xt, o.gx.data(), i);
          const float want = nan ? lowbit::bits_to_float(0x7fc00000u) : vals[i];
          EXPECT_TRUE(same_bits(got, want)) << path.str() << " i=" << i;
          continue;
        }
        uint16_t got;
        std::memcpy(&got, o.gx.data() + 2 * i, 2);
        uint16_t want = xt == DType::kFloat16 ? lowbit::float_to_half(vals[i]) : lowbit::float_to_bf16(vals[i]);
        if (nan) want = xt == DType::kFloat16 ? 0x7e00 : 0x7fc0;
        EXPECT_EQ(got, want) << path.str() << " " << lowbit::dtype_name(xt) << " value bits " << std::hex
                             << lowbit::float_to_bits(vals[i]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
TEST(LsqGrad, EmptyAndNothingRequested) {
  for (const Path& path : all_paths()) {
    float sh[3] = {kNaN, kNaN, kNaN}, sc = kNaN, step = 0.5f;
    LsqGradParams p;
    p.outer = 0;
    p.channels = 3;
    p.inner = 4;
    p.qmin = -8;
    p.qmax = 7;
    p.numel = 5;
    p.grad_shift = sh;
    p.grad_scale = &sc;
    p.step = &step;
    ASSERT_TRUE(run_path(path, p).is_ok()) << path.str();
    for (float v : sh) EXPECT_EQ(v, 0.f) << path.str();
    EXPECT_EQ(sc, 0.f) << path.str();
    // Nothing requested: nothing is read, null inputs are fine.
    LsqGradParams none;
    none.outer = 5;
    none.channels = 3;
    none.inner = 2;
    EXPECT_TRUE(run_path(path, none).is_ok()) << path.str();
  }
}

TEST(LsqGrad, ArgumentErrors) {
  for (const Path& path : all_paths()) {
    std::vector<float> g(12, 1.f), x(12, 1.f), gx(12);
    float step = 0.5f, sc = 0.f;
    auto base = [&] {
      LsqGradParams p;
      p.outer = 2;
      p.channels = 3;
      p.inner = 2;
      p.g = g.data();
      p.x = x.data();
      p.step = &step;
      p.qmin = -128;
      p.qmax = 127;
      p.numel = 12;
      p.grad_x = gx.data();
      p.grad_scale = &sc;
      return p;
    };
    const std::string w = path.str();
    LsqGradParams p = base();
    p.outer = -1;
    expect_invalid(run_path(path, p), w, "outer must be >= 0");
    p = base();
    p.channels = -2;
    expect_invalid(run_path(path, p), w, "channels must be >= 0");
    p = base();
    p.inner = -3;
    expect_invalid(run_path(path, p), w, "inner must be >= 0");
    p = base();
    p.g_type = static_cast<DType>(7);
    expect_invalid(run_path(path, p), w, "g_type");
    p = base();
    p.x_type = static_cast<DType>(-1);
    expect_invalid(run_path(path, p), w, "x_type");
    p = base();
    p.qmin = 5;
    p.qmax = 4;
    expect_invalid(run_path(path, p), w, "qmin must be <= qmax");
    p = base();
    p.qmin = -129;
    expect_invalid(run_path(path, p), w, "qmin must be >= -128");
    p = base();
    p.qmax = 128;
    expect_invalid(run_path(path, p), w, "qmax must be <= 127");
    p = base();
    p.qmin = -3;
    p.qmax = 0;
    expect_invalid(run_path(path, p), w, "qmax must be >= 1");
    p = base();
    p.numel = 0;
    expect_invalid(run_path(path, p), w, "numel must be >= 1");
    p = base();
    p.g = nullptr;
    expect_invalid(run_path(path, p), w, "g is null");
    p = base();
    p.x = nullptr;
    expect_invalid(run_path(path, p), w, "x is null");
    p = base();
    p.step = nullptr;
    expect_invalid(run_path(path, p), w, "step is null");
    p = base();
    p.outer = int64_t(1) << 40;
    p.channels = int64_t(1) << 20;
    p.inner = int64_t(1) << 10;
    expect_invalid(run_path(path, p), w, "overflows int64");
    // Without grad_scale, qmax < 1 and numel are irrelevant.
    p = base();
    p.grad_scale = nullptr;
    p.qmin = -3;
    p.qmax = 0;
    p.numel = 0;
    EXPECT_TRUE(run_path(path, p).is_ok()) << w;
  }
}

}  // namespace
