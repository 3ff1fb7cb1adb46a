// Test helpers for the fused LSQ input gradients (include/lowbit/kernels/lsq_grad.h), shared by the CPU
// kernel tests (test_kernel_lsq_grad.cpp) and the CUDA ones (test_cuda_lsq_grad.cpp, which upload the same
// host buffers). Header-only, torch-free, gtest-free.
//
// * LsqCase: sizes (outer, C, inner), dtypes, which inputs and outputs, code range, step, and whether the
//   data holds non-finite values. lsq_cases(): the odd sizes both test files run.
// * make_lsq_data: random g / x (as raw dtype bytes), shift, step and gscale that hit every branch: values
//   well inside the range, exact .5 ties of v (power-of-two steps, shifts on a 1/64 grid), clipping on
//   both sides, +-inf, NaN, subnormals, signed zeros; with `nonfinite_g`, also inf / NaN gradients.
// * lsq_reference: the contract computed independently in float64 from the math (fp32 only where the
//   math says fp32: the products g * gscale, the sum x + shift, the quotient v); it also returns the
//   magnitudes the tolerances are relative to.
// * lsq_check: a kernel's outputs against lsq_reference with the documented tolerances (below); returns
//   the first failure as text ("" when all hold).
//
// Tolerances (lsq_grad.h): grad_x is exact up to the one rounding to x's dtype (fp32: equal; fp16 / bf16:
// within half an ulp, the fp16 subnormal step included; the canonical NaN exactly where the reference is
// NaN). The sums
// are float64 sums of the same terms in another order, then one fp32 rounding:
//   |got - ref| <= 2^-24 |ref| + n * 2^-52 * sum|terms| (+ 2^-149 for an fp32 subnormal result),
// and grad_scale's terms are fp32 products fp32(R * g), each within 2^-24 of the float64 R * g, which adds
// 2^-24 * sum|R g| (times the factor 1/sqrt(numel * qmax)).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/lsq_grad.h"

namespace lowbit_test {

inline size_t lsq_dtype_size(lowbit::DType t) { return t == lowbit::DType::kFloat32 ? 4 : 2; }

// Element i of a raw dtype buffer as a float (exact widening), and the store (round to nearest even).
inline float lsq_load(lowbit::DType t, const void* p, size_t i) {
  if (t == lowbit::DType::kFloat32) {
    float f;
    std::memcpy(&f, static_cast<const uint8_t*>(p) + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, static_cast<const uint8_t*>(p) + 2 * i, 2);
  return t == lowbit::DType::kFloat16 ? lowbit::half_to_float(h) : lowbit::bf16_to_float(h);
}

inline void lsq_store(lowbit::DType t, void* p, size_t i, float v) {
  if (t == lowbit::DType::kFloat32) {
    std::memcpy(static_cast<uint8_t*>(p) + 4 * i, &v, 4);
  } else {
    const uint16_t h = t == lowbit::DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
    std::memcpy(static_cast<uint8_t*>(p) + 2 * i, &h, 2);
  }
}

struct LsqCase {
  int64_t outer = 1, C = 1, inner = 1;
  lowbit::DType gt = lowbit::DType::kFloat32, xt = lowbit::DType::kFloat32;
  bool shift = true, gscale = false;
  bool want_x = true, want_shift = true, want_scale = true;
  int32_t qmin = -128, qmax = 127;
  float step = 0.25f;
  bool nonfinite_g = false;  // inf / NaN gradients too (the default keeps g finite, x does the rest)
  int64_t numel = -1;        // the gradient scale's count; -1: outer * C * inner
  // A case of shape (o, C, i) with the given dtypes, shift and gscale, every output requested.
  static LsqCase shape(int64_t o, int64_t c, int64_t i, lowbit::DType g, lowbit::DType x, bool sh, bool gs) {
    LsqCase r;
    r.outer = o;
    r.C = c;
    r.inner = i;
    r.gt = g;
    r.xt = x;
    r.shift = sh;
    r.gscale = gs;
    return r;
  }
  int64_t total() const { return outer * C * inner; }
  int64_t count() const { return numel < 0 ? total() : numel; }
  std::string str() const {
    std::ostringstream os;
    os << "(" << outer << ", " << C << ", " << inner << ") g=" << lowbit::dtype_name(gt)
       << " x=" << lowbit::dtype_name(xt) << " shift=" << shift << " gscale=" << gscale << " out=" << want_x
       << want_shift << want_scale << " q=[" << qmin << "," << qmax << "] step=" << step
       << " nonfinite_g=" << nonfinite_g << " numel=" << count();
    return os.str();
  }
};

struct LsqData {
  std::vector<uint8_t> g, x;  // raw dtype bytes, (outer, C, inner) contiguous
  std::vector<float> shift;   // (C,) (empty: none)
  float step = 1.f, gscale = 1.f;
};

// One x value for channel shift `sh`: mostly v in range, ties, clipping, and the odd ones.
inline float lsq_draw_x(std::mt19937& rng, const LsqCase& c, float sh) {
  std::uniform_int_distribution<int> kind(0, 99);
  std::normal_distribution<float> normal(0.f, 1.f);
  const float s = c.step, span = float(c.qmax - c.qmin);
  const int k = kind(rng);
  if (k < 55) return (float(c.qmin) + span * std::uniform_real_distribution<float>(0.f, 1.f)(rng)) * s - sh;
  if (k < 70) {  // v = n + 0.5 exactly when s is a power of two and the sum is exact
    const int n = std::uniform_int_distribution<int>(c.qmin - 2, c.qmax + 1)(rng);
    return (float(n) + 0.5f) * s - sh;
  }
  if (k < 78) return (float(c.qmax) + 1.f + std::abs(normal(rng)) * 50.f) * s - sh;  // above
  if (k < 86) return (float(c.qmin) - 1.f - std::abs(normal(rng)) * 50.f) * s - sh;  // below
  if (k < 88) return float(c.qmax) * s - sh;  // v == qmax exactly (often): inside
  if (k < 90) return float(c.qmin) * s - sh;  // v == qmin exactly (often): inside
  if (k < 92) return std::numeric_limits<float>::infinity();
  if (k < 94) return -std::numeric_limits<float>::infinity();
  if (k < 96) return std::numeric_limits<float>::quiet_NaN();
  if (k < 98) return (k & 1 ? -1.f : 1.f) * 1e-40f;  // fp32 subnormal (0 in fp16, subnormal in bf16)
  return k & 1 ? -0.f : 0.f;
}

inline float lsq_draw_g(std::mt19937& rng, const LsqCase& c) {
  std::uniform_int_distribution<int> kind(0, 99);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int k = kind(rng);
  if (c.nonfinite_g && k < 3) return std::numeric_limits<float>::infinity();
  if (c.nonfinite_g && k < 5) return std::numeric_limits<float>::quiet_NaN();
  if (k < 8) return k & 1 ? -0.f : 0.f;
  if (k < 10) return 3e-6f * normal(rng);  // fp16 subnormals
  return normal(rng) * 2.f;
}

inline LsqData make_lsq_data(const LsqCase& c, std::mt19937& rng) {
  LsqData d;
  d.step = c.step;
  d.gscale = c.gscale ? std::uniform_real_distribution<float>(0.25f, 3.f)(rng) : 1.f;
  if (c.shift) {
    d.shift.resize(size_t(c.C));
    for (auto& v : d.shift) v = float(std::uniform_int_distribution<int>(-128, 128)(rng)) / 64.f;
  }
  const size_t n = size_t(c.total());
  d.g.assign(n * lsq_dtype_size(c.gt), 0);
  d.x.assign(n * lsq_dtype_size(c.xt), 0);
  for (int64_t o = 0; o < c.outer; ++o)
    for (int64_t ch = 0; ch < c.C; ++ch)
      for (int64_t i = 0; i < c.inner; ++i) {
        const size_t e = size_t((o * c.C + ch) * c.inner + i);
        lsq_store(c.gt, d.g.data(), e, lsq_draw_g(rng, c));
        lsq_store(c.xt, d.x.data(), e, lsq_draw_x(rng, c, c.shift ? d.shift[size_t(ch)] : 0.f));
      }
  return d;
}

struct LsqRef {
  std::vector<double> gx;                          // grad_x before the rounding to x's dtype
  std::vector<double> shift, shift_abs;            // per channel: sum and sum of |terms|
  std::vector<int64_t> shift_n;                    // terms per channel
  double scale = 0, scale_abs = 0, factor = 0;     // sum of R*g (not yet scaled), sum |R*g|, 1/sqrt(numel*qmax)
};

inline LsqRef lsq_reference(const LsqCase& c, const LsqData& d) {
  LsqRef r;
  const size_t n = size_t(c.total());
  r.gx.resize(n);
  r.shift.assign(size_t(c.C), 0.0);
  r.shift_abs.assign(size_t(c.C), 0.0);
  r.shift_n.assign(size_t(c.C), 0);
  r.factor = 1.0 / std::sqrt(double(c.count()) * double(c.qmax));
  for (int64_t o = 0; o < c.outer; ++o)
    for (int64_t ch = 0; ch < c.C; ++ch)
      for (int64_t i = 0; i < c.inner; ++i) {
        const size_t e = size_t((o * c.C + ch) * c.inner + i);
        float g = lsq_load(c.gt, d.g.data(), e);
        if (c.gscale) g = float(double(g) * double(d.gscale));  // the exact product, rounded once: fp32 g * gs
        float t = lsq_load(c.xt, d.x.data(), e);
        if (c.shift) t = t + d.shift[size_t(ch)];  // fp32 add (the math's)
        const float v = t / d.step;                // fp32 IEEE quotient (the math's)
        const bool below = double(v) < double(c.qmin), above = double(v) > double(c.qmax);
        const bool inside = !below && !above && !std::isnan(v);
        const double gx = double(g) * (inside ? 1.0 : 0.0);
        r.gx[e] = gx;
        r.shift[size_t(ch)] += gx;
        r.shift_abs[size_t(ch)] += std::fabs(gx);
        r.shift_n[size_t(ch)] += 1;
        const double R = below ? double(c.qmin) : above ? double(c.qmax) : std::nearbyint(double(v)) - double(v);
        r.scale += R * double(g);
        r.scale_abs += std::fabs(R * double(g));
      }
  return r;
}

// |got - want| within the one fp32 rounding of a float64 result plus `extra`. NaN must match NaN.
inline bool lsq_sum_ok(float got, double want, double extra) {
  if (std::isnan(want)) return lowbit::float_to_bits(got) == 0x7fc00000u;  // the canonical NaN
  if (std::isinf(want)) return double(got) == want;
  const double tol = std::ldexp(std::fabs(want), -24) + extra + std::ldexp(1.0, -149);
  return std::fabs(double(got) - want) <= tol;
}

// grad_x element: exact up to the one rounding to dtype t.
inline bool lsq_gx_ok(lowbit::DType t, float got, double want) {
  if (std::isnan(want)) return std::isnan(got);
  if (t == lowbit::DType::kFloat32) {
    return double(got) == want && std::signbit(got) == std::signbit(want);
  }
  if (std::isinf(want)) return double(got) == want;
  const int mant = t == lowbit::DType::kFloat16 ? 11 : 8;           // significand bits
  const double sub = t == lowbit::DType::kFloat16 ? 0x1p-25 : 0x1p-134;  // half the smallest subnormal step
  if (t == lowbit::DType::kFloat16 && std::fabs(want) >= 65520.0) return std::isinf(got) && (got > 0) == (want > 0);
  const double tol = std::ldexp(std::fabs(want), -mant) + sub;
  return std::fabs(double(got) - want) <= tol && (got == 0.f || std::signbit(got) == std::signbit(want));
}

// The outputs of one run (host copies): grad_x as raw x-dtype bytes (may be empty when not requested).
struct LsqOut {
  std::vector<uint8_t> gx;
  std::vector<float> shift;
  float scale = 0.f;
};

// Checks `o` against `r` for case `c`; "" when all hold, else the first failure.
inline std::string lsq_check(const LsqCase& c, const LsqRef& r, const LsqOut& o) {
  std::ostringstream err;
  if (c.want_x) {
    const size_t es = lsq_dtype_size(c.xt);
    const uint32_t nan_bits = c.xt == lowbit::DType::kFloat32 ? 0x7fc00000u
                              : c.xt == lowbit::DType::kFloat16 ? 0x7e00u
                                                                : 0x7fc0u;
    for (size_t e = 0; e < r.gx.size(); ++e) {
      const float got = lsq_load(c.xt, o.gx.data(), e);
      if (std::isnan(r.gx[e])) {  // the canonical NaN of the dtype
        uint32_t bits = 0;
        std::memcpy(&bits, o.gx.data() + es * e, es);
        if (bits != nan_bits) {
          err << "grad_x[" << e << "] has bits 0x" << std::hex << bits << ", want the canonical NaN 0x" << nan_bits;
          return err.str();
        }
        continue;
      }
      if (!lsq_gx_ok(c.xt, got, r.gx[e])) {
        err << "grad_x[" << e << "] = " << got << ", reference " << r.gx[e];
        return err.str();
      }
    }
  }
  if (c.want_shift) {
    for (size_t ch = 0; ch < r.shift.size(); ++ch) {
      const double extra = double(r.shift_n[ch]) * 0x1p-52 * r.shift_abs[ch];
      if (!lsq_sum_ok(o.shift[ch], r.shift[ch], extra)) {
        err << "grad_shift[" << ch << "] = " << o.shift[ch] << ", reference " << r.shift[ch];
        return err.str();
      }
    }
  }
  if (c.want_scale) {
    const double want = r.scale * r.factor;
    const double extra = (0x1p-24 + double(c.total()) * 0x1p-52) * r.scale_abs * r.factor;
    if (!lsq_sum_ok(o.scale, want, extra)) {
      err << "grad_scale = " << o.scale << ", reference " << want;
      return err.str();
    }
  }
  return "";
}

// The sizes both test files run: every mode of the partition (channel-last columns, NCHW-like rows, flat),
// odd sizes, the tails of 8- and 16-wide steps, more than one column block / unit / segment.
inline std::vector<LsqCase> lsq_cases() {
  using lowbit::DType;
  std::vector<LsqCase> v;
  const DType all[3] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const int64_t sizes[][3] = {{1, 1, 1},   {3, 7, 1},   {37, 67, 1}, {5, 16, 1}, {129, 40, 1}, {2, 3, 5},
                              {3, 5, 49},  {2, 4, 64},  {1, 1, 1000}, {7, 1, 1}, {4, 9, 17},  {33, 3, 1}};
  int k = 0;
  for (const auto& sz : sizes)
    for (DType gt : all)
      for (DType xt : all) {
        LsqCase c = LsqCase::shape(sz[0], sz[1], sz[2], gt, xt, k % 3 != 2, k % 2 == 1);
        c.want_shift = k % 5 != 4;
        c.want_x = k % 7 != 6;
        c.want_scale = k % 8 != 7;
        c.step = k % 4 == 3 ? 0.0371f : 0.25f;
        if (k % 6 == 5) {
          c.qmin = -8;
          c.qmax = 7;
        }
        v.push_back(c);
        ++k;
      }
  // Larger: several units, both column blocks / several segments, the parallel split.
  auto add = [&](int64_t o, int64_t C, int64_t i, DType gt, DType xt, bool shift, bool gs) {
    v.push_back(LsqCase::shape(o, C, i, gt, xt, shift, gs));
  };
  add(97, 2050, 1, DType::kFloat32, DType::kBFloat16, true, false);   // column mode, 2 column blocks
  add(301, 264, 1, DType::kFloat32, DType::kFloat32, true, true);     // column mode, 8-aligned
  add(300, 263, 1, DType::kBFloat16, DType::kFloat16, true, false);   // column mode, odd C
  add(6, 13, 1111, DType::kFloat32, DType::kFloat16, true, true);     // row mode, short rows
  add(3, 2, 70001, DType::kFloat16, DType::kFloat32, true, false);    // row mode, several segments
  add(1, 1, 200003, DType::kFloat32, DType::kFloat32, false, true);   // flat
  LsqCase noshift_flat;
  noshift_flat.outer = 5;
  noshift_flat.C = 7;
  noshift_flat.inner = 3001;
  noshift_flat.shift = false;
  noshift_flat.want_shift = false;  // flat: the channel plays no part
  noshift_flat.numel = 1234;        // a broadcast operand's own count
  v.push_back(noshift_flat);
  LsqCase nonfinite = v.back();
  nonfinite.nonfinite_g = true;
  nonfinite.shift = true;
  nonfinite.want_shift = true;
  v.push_back(nonfinite);
  return v;
}

// The kernel parameters for case c over host (or device) buffers; outputs as given.
inline lowbit::LsqGradParams lsq_params(const LsqCase& c, const void* g, const void* x, const float* shift,
                                        const float* step, const float* gscale, void* gx, float* gshift,
                                        float* gscale_out) {
  lowbit::LsqGradParams p;
  p.outer = c.outer;
  p.channels = c.C;
  p.inner = c.inner;
  p.g_type = c.gt;
  p.g = g;
  p.g_scale = c.gscale ? gscale : nullptr;
  p.x_type = c.xt;
  p.x = x;
  p.shift = c.shift ? shift : nullptr;
  p.step = step;
  p.qmin = c.qmin;
  p.qmax = c.qmax;
  p.numel = c.count();
  p.grad_x = c.want_x ? gx : nullptr;
  p.grad_shift = c.want_shift ? gshift : nullptr;
  p.grad_scale = c.want_scale ? gscale_out : nullptr;
  return p;
}

}  // namespace lowbit_test
