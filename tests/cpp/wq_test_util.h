// Test helpers for the weight-only quantized matrices (include/lowbit/kernels/wq.h), shared by the CPU
// kernel tests (test_kernel_wq.cpp) and the CUDA ones (which upload the same host buffers to the device).
// Header-only, torch-free, gtest-free.
//
// What it gives:
// * HostWq: host buffers of one random WqWeight (packed qweight, g_idx, perm, scales / zeros /
//   channel_scale as raw sdtype bytes) plus what the checks need: the UNPACKED codes and the exact fp32
//   values of every sdtype element. make_wq(WqSpec) builds one; HostWq::view() is the kernel descriptor
//   (pointers into the host buffers).
// * The packer is deliberately independent of any kernel: it writes each code bit by bit at bit
//   j*b + t of the little-endian concatenation of its chunk's b words (wq.h), so a kernel that decodes
//   with shifts / funnels is checked against the plain definition.
// * ref_matmul: y = sum_k x[m,k] c[k] W[k,n] (+ bias) in float64, from the kept codes (not the packed
//   words) and the math in wq.h; also the magnitude sum_k |x'| |W| (+ |bias|) that the tolerance is
//   relative to. ref_dequant: the fp32 formula of wq.h, element by element, in original row order.
// * HostFloats: random fp32 / fp16 / bf16 arrays (x, bias) with their exact values as doubles; padding
//   elements of strided matrices are NaN so that a kernel reading them shows up in the result.
// * wq_compare: the documented tolerance check of a kernel output against ref_matmul.
// * WqCase / describe / wq_cases_*: the matmul test cases both test files run (each through its own
//   check_case), and wq_weight_errors: the malformed-descriptor cases both error tests run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/wq.h"

namespace lowbit_test {

// ---------------------------------------------------------------------------------------------------
// Scalar dtype helpers (names prefixed wq_ so they cannot collide with test_util.h).

inline size_t wq_dtype_size(lowbit::DType t) { return t == lowbit::DType::kFloat32 ? 4 : 2; }

// The value v rounds to in dtype t (round to nearest even), as a float.
inline float wq_round_to(lowbit::DType t, float v) {
  switch (t) {
    case lowbit::DType::kFloat32: return v;
    case lowbit::DType::kFloat16: return lowbit::half_to_float(lowbit::float_to_half(v));
    case lowbit::DType::kBFloat16: return lowbit::bf16_to_float(lowbit::float_to_bf16(v));
  }
  return v;
}

// Element idx of an array of dtype t, as a float.
inline float wq_load(lowbit::DType t, const void* p, size_t idx) {
  switch (t) {
    case lowbit::DType::kFloat32: {
      float f;
      std::memcpy(&f, static_cast<const uint8_t*>(p) + 4 * idx, 4);
      return f;
    }
    case lowbit::DType::kFloat16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const uint8_t*>(p) + 2 * idx, 2);
      return lowbit::half_to_float(h);
    }
    case lowbit::DType::kBFloat16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const uint8_t*>(p) + 2 * idx, 2);
      return lowbit::bf16_to_float(h);
    }
  }
  return 0.0f;
}

// Stores v rounded once (RNE) to dtype t at element idx.
inline void wq_store(lowbit::DType t, void* p, size_t idx, float v) {
  switch (t) {
    case lowbit::DType::kFloat32: std::memcpy(static_cast<uint8_t*>(p) + 4 * idx, &v, 4); break;
    case lowbit::DType::kFloat16: {
      const uint16_t h = lowbit::float_to_half(v);
      std::memcpy(static_cast<uint8_t*>(p) + 2 * idx, &h, 2);
      break;
    }
    case lowbit::DType::kBFloat16: {
      const uint16_t h = lowbit::float_to_bf16(v);
      std::memcpy(static_cast<uint8_t*>(p) + 2 * idx, &h, 2);
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Float arrays of a chosen dtype (x, bias, outputs).

struct HostFloats {
  lowbit::DType type = lowbit::DType::kFloat32;
  std::vector<uint8_t> bytes;  // n * wq_dtype_size(type)
  std::vector<double> values;  // exact value of every element (NaN for padding)
  const void* data() const { return bytes.empty() ? nullptr : bytes.data(); }
  void* data() { return bytes.empty() ? nullptr : bytes.data(); }
  size_t size() const { return values.size(); }
};

// n elements uniform in [lo, hi), rounded to `type` (values holds the rounded ones).
inline HostFloats random_floats(size_t n, lowbit::DType type, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  HostFloats h;
  h.type = type;
  h.bytes.assign(n * wq_dtype_size(type), 0);
  h.values.resize(n);
  for (size_t i = 0; i < n; ++i) {
    wq_store(type, h.bytes.data(), i, float(d(rng)));
    h.values[i] = wq_load(type, h.bytes.data(), i);
  }
  return h;
}

// (rows, cols) matrix with row stride ld >= cols, elements uniform in [lo, hi); the ld - cols padding
// elements of each row are NaN (a kernel that reads them gets NaN outputs).
inline HostFloats random_matrix(int64_t rows, int64_t cols, int64_t ld, lowbit::DType type, uint32_t seed,
                                double lo = -1.0, double hi = 1.0) {
  const size_t n = size_t(std::max<int64_t>(rows * ld, 1));
  HostFloats h = random_floats(n, type, seed, lo, hi);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = cols; c < ld; ++c) {
      wq_store(type, h.bytes.data(), size_t(r * ld + c), nan);
      h.values[size_t(r * ld + c)] = std::numeric_limits<double>::quiet_NaN();
    }
  if (rows * ld == 0) h.values[0] = std::numeric_limits<double>::quiet_NaN();
  return h;
}

// An output buffer of n elements of `type`, every byte `fill` (a sentinel for "never written").
inline HostFloats sentinel_floats(size_t n, lowbit::DType type, uint8_t fill = 0xA5) {
  HostFloats h;
  h.type = type;
  h.bytes.assign(std::max<size_t>(n, 1) * wq_dtype_size(type), fill);
  h.values.assign(std::max<size_t>(n, 1), 0.0);
  return h;
}

// ---------------------------------------------------------------------------------------------------
// Random weights.

struct WqSegSpec {
  int32_t bits;
  int64_t rows;  // rows of the segment; <= 0 on the LAST segment means "the rest, up to K"
};

struct WqSpec {
  int64_t K = 128;
  int64_t N = 64;
  std::vector<WqSegSpec> segments;  // empty: one 4-bit segment over all K
  // Groups. Uniform (act_order false): g_idx[r] = r / group_size, any group_size >= 1 (not necessarily a
  // multiple of 32: chunks whose rows span two groups are then covered). Act-order: every g_idx[r] drawn
  // uniformly from [0, groups) (groups 0: ceil(K / group_size)), so consecutive rows jump between groups.
  int64_t group_size = 128;
  bool act_order = false;
  int64_t groups = 0;
  bool asym = false;
  bool perm = false;           // random permutation (else perm = null, identity)
  bool channel_scale = false;  // random positive channel_scale (else null)
  lowbit::DType sdtype = lowbit::DType::kFloat16;
  uint32_t seed = 1;
  int64_t extra_qrows = 0;       // word rows past the ones the segments use, random bits (must be ignored)
  bool garbage_padding = false;  // padding rows of a partial last chunk get random codes (must be ignored)
};

struct HostWq {
  int64_t K = 0, N = 0, qrows = 0, groups = 0;
  int32_t nseg = 0;
  int32_t bits[lowbit::kWqMaxSegments] = {};
  int64_t row_end[lowbit::kWqMaxSegments] = {};
  bool asym = false;
  lowbit::DType sdtype = lowbit::DType::kFloat16;

  std::vector<uint32_t> qweight;       // (qrows, N)
  std::vector<int32_t> g_idx;          // (K,)
  std::vector<int32_t> perm;           // (K,) or empty (identity)
  std::vector<uint8_t> scales, zeros;  // (groups, N) raw sdtype bytes
  std::vector<uint8_t> channel_scale;  // (K,) raw sdtype bytes, or empty (null)

  std::vector<uint8_t> codes;   // (K, N) unpacked codes, STORED row order
  std::vector<float> scale_f;   // (groups, N) exact values of scales
  std::vector<float> zero_f;    // (groups, N) exact values of zeros
  std::vector<float> cscale_f;  // (K,) original order, all 1 when channel_scale is null

  // The kernel descriptor (host pointers into this object; valid while it lives and is not resized).
  lowbit::WqWeight view() const {
    lowbit::WqWeight w;
    w.K = K;
    w.N = N;
    w.qweight = qweight.empty() ? nullptr : qweight.data();
    w.qrows = qrows;
    w.nseg = nseg;
    for (int32_t s = 0; s < nseg; ++s) {
      w.bits[s] = bits[s];
      w.row_end[s] = row_end[s];
    }
    w.g_idx = g_idx.empty() ? nullptr : g_idx.data();
    w.groups = groups;
    w.scales = scales.empty() ? nullptr : scales.data();
    w.zeros = zeros.empty() ? nullptr : zeros.data();
    w.sdtype = sdtype;
    w.asym = asym;
    w.perm = perm.empty() ? nullptr : perm.data();
    w.channel_scale = channel_scale.empty() ? nullptr : channel_scale.data();
    return w;
  }

  // Original channel of stored row r.
  int64_t orig(int64_t r) const { return perm.empty() ? r : int64_t(perm[size_t(r)]); }

  int32_t bits_of_row(int64_t r) const {
    for (int32_t s = 0; s < nseg; ++s)
      if (r < row_end[s]) return bits[s];
    return 0;
  }

  // Dequantized stored row r, column n: the fp32 expression of wq.h.
  float w_fp32(int64_t r, int64_t n) const {
    const size_t gi = size_t(int64_t(g_idx[size_t(r)]) * N + n);
    const float s = scale_f[gi], z = zero_f[gi];
    const float q = float(codes[size_t(r * N + n)]);
    return asym ? s * (q - z) : std::fma(s, q, -z);
  }

  // The same in float64 (exact for every sdtype: s has <= 24 significant bits, q <= 8).
  double w_f64(int64_t r, int64_t n) const {
    const size_t gi = size_t(int64_t(g_idx[size_t(r)]) * N + n);
    const double s = scale_f[gi], z = zero_f[gi];
    const double q = double(codes[size_t(r * N + n)]);
    return asym ? s * (q - z) : s * q - z;
  }
};

// Word rows of a segment of `len` rows and width b.
inline int64_t wq_seg_words(int64_t len, int32_t b) { return (len + 31) / 32 * b; }

// Packs the (K, N) codes of w (stored order) into w.qweight by the definition in wq.h: chunk c of a
// segment occupies word rows q0 + c*b .. q0 + c*b + b-1; row j of the chunk is code bits j*b .. j*b+b-1
// of the little-endian concatenation of the chunk's b words. Bit by bit, on purpose. `pad_codes`, when
// not null, supplies the codes of the padding rows past K (else they are 0); the qweight rows past the
// used ones are left as they are.
inline void wq_pack(HostWq& w, const std::vector<uint8_t>* pad_codes = nullptr) {
  const int64_t N = w.N;
  int64_t q0 = 0, start = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    const int32_t b = w.bits[s];
    const int64_t len = w.row_end[s] - start;
    const int64_t chunks = (len + 31) / 32;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t wrow = q0 + c * b;
      for (int64_t i = 0; i < b; ++i)
        for (int64_t n = 0; n < N; ++n) w.qweight[size_t((wrow + i) * N + n)] = 0;
      for (int64_t j = 0; j < 32; ++j) {
        const int64_t r = start + c * 32 + j;
        for (int64_t n = 0; n < N; ++n) {
          uint32_t code = 0;
          if (r < w.row_end[s])
            code = w.codes[size_t(r * N + n)];
          else if (pad_codes != nullptr)
            code = (*pad_codes)[size_t(((r - w.row_end[s]) % 32) * N + n)] & ((1u << b) - 1u);
          for (int32_t t = 0; t < b; ++t) {
            const int64_t pos = j * b + t;
            const uint32_t bit = (code >> t) & 1u;
            w.qweight[size_t((wrow + pos / 32) * N + n)] |= bit << (pos % 32);
          }
        }
      }
    }
    q0 += chunks * b;
    start = w.row_end[s];
  }
}

// A random weight per spec. Values are kept in a range where fp16 cannot overflow: |x'| <= ~2,
// |W| <= ~2, sums of K terms stay far below 65504 for the sizes tests use.
inline HostWq make_wq(const WqSpec& spec) {
  using lowbit::DType;
  HostWq w;
  w.K = spec.K;
  w.N = spec.N;
  w.asym = spec.asym;
  w.sdtype = spec.sdtype;
  std::mt19937 rng(spec.seed * 2654435761u + 12345u);

  // Segments.
  std::vector<WqSegSpec> segs = spec.segments;
  if (segs.empty()) segs.push_back({4, spec.K});
  int64_t start = 0;
  w.nseg = int32_t(std::min<size_t>(segs.size(), size_t(lowbit::kWqMaxSegments)));
  for (int32_t s = 0; s < w.nseg; ++s) {
    const bool last = s + 1 == w.nseg;
    const int64_t len = (last && segs[size_t(s)].rows <= 0) ? spec.K - start : segs[size_t(s)].rows;
    w.bits[s] = segs[size_t(s)].bits;
    w.row_end[s] = start + len;
    start += len;
  }
  int64_t used = 0;
  start = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    used += wq_seg_words(w.row_end[s] - start, w.bits[s]);
    start = w.row_end[s];
  }
  w.qrows = used + spec.extra_qrows;

  // Codes (stored order), each in [0, 2^b).
  w.codes.assign(size_t(std::max<int64_t>(spec.K * spec.N, 0)), 0);
  for (int64_t r = 0; r < spec.K; ++r) {
    const int32_t b = std::max(1, std::min(8, w.bits_of_row(r)));
    std::uniform_int_distribution<int> d(0, (1 << b) - 1);
    for (int64_t n = 0; n < spec.N; ++n) w.codes[size_t(r * spec.N + n)] = uint8_t(d(rng));
  }

  // Packed words: random everywhere first (so extra rows hold garbage), then the used rows packed.
  w.qweight.assign(size_t(std::max<int64_t>(w.qrows * spec.N, 1)), 0);
  for (auto& v : w.qweight) v = uint32_t(rng());
  if (spec.garbage_padding) {
    std::vector<uint8_t> pad(size_t(32 * std::max<int64_t>(spec.N, 1)));
    for (auto& p : pad) p = uint8_t(rng());
    wq_pack(w, &pad);
  } else {
    wq_pack(w);
  }
  if (spec.N == 0) w.qweight.clear();

  // Groups.
  const int64_t gs = std::max<int64_t>(spec.group_size, 1);
  w.g_idx.resize(size_t(spec.K));
  if (spec.act_order) {
    w.groups = spec.groups > 0 ? spec.groups : (spec.K + gs - 1) / gs;
    std::uniform_int_distribution<int64_t> d(0, w.groups - 1);
    for (auto& g : w.g_idx) g = int32_t(d(rng));
  } else {
    w.groups = (spec.K + gs - 1) / gs;
    for (int64_t r = 0; r < spec.K; ++r) w.g_idx[size_t(r)] = int32_t(r / gs);
  }

  // Scales, zeros. The width used to size a group's zero point: that of its first row (any float is a
  // valid zero; this keeps W centred).
  std::vector<int32_t> gbits(size_t(w.groups), 4);
  for (int64_t r = spec.K - 1; r >= 0; --r) gbits[size_t(w.g_idx[size_t(r)])] = w.bits_of_row(r);
  const size_t ng = size_t(w.groups * spec.N);
  const size_t es = wq_dtype_size(spec.sdtype);
  w.scales.assign(std::max<size_t>(ng, 1) * es, 0);
  w.zeros.assign(std::max<size_t>(ng, 1) * es, 0);
  w.scale_f.assign(ng, 0.0f);
  w.zero_f.assign(ng, 0.0f);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  for (int64_t g = 0; g < w.groups; ++g) {
    const int32_t b = gbits[size_t(g)];
    const double levels = double((1 << b) - 1);
    for (int64_t n = 0; n < spec.N; ++n) {
      const size_t i = size_t(g * spec.N + n);
      // |W| up to ~2: s * levels in [0.5, 2] (sign of the scale random, as real checkpoints never have,
      // but the formula does not care).
      float s = float((0.5 + 1.5 * u01(rng)) / levels);
      if (u01(rng) < 0.1) s = -s;
      float z;
      if (spec.asym) {
        std::uniform_int_distribution<int> dz(0, (1 << b) - 1);
        z = float(dz(rng));  // integer zero point: exact in every sdtype (<= 255)
      } else {
        z = float(double(s) * (levels / 2.0 + (u01(rng) - 0.5) * levels * 0.25));  // weight units
      }
      wq_store(spec.sdtype, w.scales.data(), i, s);
      wq_store(spec.sdtype, w.zeros.data(), i, z);
      w.scale_f[i] = wq_load(spec.sdtype, w.scales.data(), i);
      w.zero_f[i] = wq_load(spec.sdtype, w.zeros.data(), i);
    }
  }

  // Permutation.
  if (spec.perm) {
    w.perm.resize(size_t(spec.K));
    std::iota(w.perm.begin(), w.perm.end(), 0);
    std::shuffle(w.perm.begin(), w.perm.end(), rng);
  }

  // Channel scale (original order), positive around 1.
  w.cscale_f.assign(size_t(spec.K), 1.0f);
  if (spec.channel_scale) {
    w.channel_scale.assign(size_t(spec.K) * es, 0);
    for (int64_t k = 0; k < spec.K; ++k) {
      wq_store(spec.sdtype, w.channel_scale.data(), size_t(k), float(0.25 + 1.75 * u01(rng)));
      w.cscale_f[size_t(k)] = wq_load(spec.sdtype, w.channel_scale.data(), size_t(k));
    }
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------
// References.

// y (M, N), row stride N, in float64: y[m, n] = sum_k x[m*ldx + k] c[k] W[k, n] (+ bias[n]), computed
// from the unpacked codes with stored row r contributing x[m, perm[r]] c[perm[r]] w(r, n). When mag is
// not null it receives sum_k |x[m,k] c[k]| |W[k,n]| (+ |bias[n]|), the scale of the fp32 rounding error.
inline std::vector<double> ref_matmul(const HostWq& w, const std::vector<double>& x, int64_t M, int64_t ldx,
                                      const std::vector<double>* bias = nullptr, std::vector<double>* mag = nullptr) {
  const int64_t N = w.N;
  std::vector<double> y(size_t(M * N), 0.0), a(size_t(M * N), 0.0);
  std::vector<double> wrow(static_cast<size_t>(N), 0.0);
  for (int64_t r = 0; r < w.K; ++r) {
    const int64_t k = w.orig(r);
    for (int64_t n = 0; n < N; ++n) wrow[size_t(n)] = w.w_f64(r, n);
    for (int64_t m = 0; m < M; ++m) {
      const double xk = x[size_t(m * ldx + k)] * double(w.cscale_f[size_t(k)]);
      double* ym = y.data() + m * N;
      double* am = a.data() + m * N;
      for (int64_t n = 0; n < N; ++n) {
        ym[n] += xk * wrow[size_t(n)];
        am[n] += std::fabs(xk * wrow[size_t(n)]);
      }
    }
  }
  if (bias != nullptr)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        y[size_t(m * N + n)] += (*bias)[size_t(n)];
        a[size_t(m * N + n)] += std::fabs((*bias)[size_t(n)]);
      }
  if (mag != nullptr) *mag = std::move(a);
  return y;
}

// Dense W[:, n0:n1] in ORIGINAL row order, (K, n1 - n0) row-major, each element the fp32 expression of
// wq.h (round it with wq_round_to for a 16-bit output: that is exactly what wq_dequantize must store).
inline std::vector<float> ref_dequant(const HostWq& w, int64_t n0, int64_t n1) {
  const int64_t W = n1 - n0;
  std::vector<float> out(size_t(w.K * W), 0.0f);
  for (int64_t r = 0; r < w.K; ++r) {
    const int64_t k = w.orig(r);
    for (int64_t n = n0; n < n1; ++n) out[size_t(k * W + (n - n0))] = w.w_fp32(r, n);
  }
  return out;
}

// Relative rounding unit of an output dtype (half an ulp, relative) and half its smallest subnormal
// spacing (absolute).
inline double wq_out_eps(lowbit::DType t) {
  return t == lowbit::DType::kFloat32 ? 0x1p-24 : t == lowbit::DType::kFloat16 ? 0x1p-11 : 0x1p-8;
}
inline double wq_out_abs(lowbit::DType t) {
  return t == lowbit::DType::kFloat32 ? 0x1p-150 : t == lowbit::DType::kFloat16 ? 0x1p-25 : 0x1p-134;
}

// Checks a kernel output (M, N), row stride ldo, dtype otype, against ref / mag from ref_matmul:
//   |got - ref| <= rtol * mag * (1 + eps) + eps * |ref| + abs
// rtol bounds the fp32 accumulation error relative to sum |x'| |W| (wq.h: 1e-5); eps / abs are the
// single rounding of the fp32 result to otype (wq_out_eps / wq_out_abs). Also checks that the padding
// columns [N, ldo) of every row still hold the sentinel byte `fill` (nothing written outside the window).
// Returns "" when all is well, else a description of the first failure.
inline std::string wq_compare(const void* got, lowbit::DType otype, int64_t M, int64_t N, int64_t ldo,
                              const std::vector<double>& ref, const std::vector<double>& mag, double rtol = 1e-5,
                              int fill = 0xA5) {
  const double eps = wq_out_eps(otype), abs_tol = wq_out_abs(otype);
  const size_t es = wq_dtype_size(otype);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const double g = wq_load(otype, got, size_t(m * ldo + n));
      const double r = ref[size_t(m * N + n)];
      const double tol = rtol * mag[size_t(m * N + n)] * (1.0 + eps) + eps * std::fabs(r) + abs_tol;
      if (!(std::fabs(g - r) <= tol)) {
        std::ostringstream os;
        os.precision(9);
        os << "m=" << m << " n=" << n << ": got " << g << ", reference " << r << ", |diff| " << std::fabs(g - r)
           << " > tol " << tol << " (mag " << mag[size_t(m * N + n)] << ")";
        return os.str();
      }
    }
    if (fill >= 0) {
      const uint8_t* row = static_cast<const uint8_t*>(got) + size_t(m * ldo) * es;
      for (size_t b = size_t(N) * es; b < size_t(ldo) * es; ++b)
        if (row[b] != uint8_t(fill)) {
          std::ostringstream os;
          os << "m=" << m << ": padding byte " << b << " of the output row was overwritten";
          return os.str();
        }
    }
  }
  return "";
}

// ---------------------------------------------------------------------------------------------------
// Matmul test cases shared by the CPU and the CUDA tests. Each test file runs a list through its own
// check_case (the CPU one calls every ISA path, the CUDA one uploads to the device). Where the two test
// a different size or mix under the same name, the generator takes a WqTarget and returns that file's
// list; extras only one file runs stay in that file.

inline constexpr lowbit::DType kWqDtypes[] = {lowbit::DType::kFloat32, lowbit::DType::kFloat16,
                                              lowbit::DType::kBFloat16};

// Every 7th column of every group gets a scale / zero whose fast-dequantization constant is NOT exact in
// fp32 (sym: C = s * 2^7 + z rounds), so kernels that switch between the exact fast form and the generic
// one per group and column (the CUDA-core kernel) must give the bits of the generic formula on both.
// The pair is chosen so that the fast form WOULD round differently (s = 0x1.674p-14, z = 1000.5: codes
// 2, 4, 7, 9, 12, 14 give other bits), so taking it regardless fails the test. asym keeps its random
// scale and takes z = 3.5 (exact: a fast column next to the others).
inline void mix_inexact_fast_constants(HostWq& h, bool asym) {
  const int64_t N = h.N;
  for (int64_t g = 0; g < h.groups; ++g)
    for (int64_t n = 0; n < N; n += 7) {
      const size_t i = size_t(g * N + n);
      const float s = asym ? h.scale_f[i] : 0x1.674p-14f;
      const float z = asym ? 3.5f : 1000.5f;
      wq_store(h.sdtype, h.scales.data(), i, s);
      wq_store(h.sdtype, h.zeros.data(), i, z);
      h.scale_f[i] = wq_load(h.sdtype, h.scales.data(), i);
      h.zero_f[i] = wq_load(h.sdtype, h.zeros.data(), i);
    }
}

struct WqCase {
  WqSpec spec;
  int64_t M = 1;
  lowbit::DType xtype = lowbit::DType::kFloat32;
  bool bias = false;
  int64_t ldx_pad = 0, ldo_pad = 0;
  size_t qoff = 0;  // qweight placed this many words into its device buffer (CUDA: 1..3 unaligned)
  double x_lo = -1.0, x_hi = 1.0;  // x uniform in [x_lo, x_hi)
};

inline std::string describe(const WqCase& c) {
  std::string s = "K=" + std::to_string(c.spec.K) + " N=" + std::to_string(c.spec.N) + " M=" + std::to_string(c.M) +
                  " segs={";
  for (const auto& g : c.spec.segments) s += std::to_string(g.bits) + ":" + std::to_string(g.rows) + " ";
  s += "} gs=" + std::to_string(c.spec.group_size) + (c.spec.act_order ? " act-order" : "") +
       (c.spec.asym ? " asym" : " sym") + (c.spec.perm ? " perm" : "") + (c.spec.channel_scale ? " cscale" : "") +
       " x=" + lowbit::dtype_name(c.xtype) + " sd=" + lowbit::dtype_name(c.spec.sdtype) + (c.bias ? " bias" : "") +
       " ldx+" + std::to_string(c.ldx_pad) + " ldo+" + std::to_string(c.ldo_pad) + " qoff=" + std::to_string(c.qoff) +
       " seed=" + std::to_string(c.spec.seed);
  return s;
}

// Which test file a generator's list is for, where the two differ.
enum class WqTarget { kCpu, kCuda };

// K x N over odd sizes (seeds from 1). CPU: K = 1, 31, 33, 100, 257 x N = 1, 3, 5, 37, 130, one 4-bit
// segment, M = 3, fixed pads. CUDA: K and N add 4096 / 5504 (N % 4 != 0 and large shapes), garbage in the
// padding bits and extra word rows, M / bias / pads varying with the seed.
inline std::vector<WqCase> wq_cases_odd_sizes(WqTarget t) {
  const bool cuda = t == WqTarget::kCuda;
  std::vector<int64_t> Ks = {1, 31, 33, 100, 257}, Ns = {1, 3, 5, 37, 130};
  if (cuda) {
    Ks.push_back(4096);
    Ns.push_back(5504);
  }
  std::vector<WqCase> v;
  uint32_t seed = 1;
  for (int64_t K : Ks)
    for (int64_t N : Ns) {
      WqCase c;
      c.spec.K = K;
      c.spec.N = N;
      if (!cuda) c.spec.segments = {{4, K}};
      c.spec.group_size = cuda ? (K >= 1024 ? 128 : 32) : (K >= 64 ? 64 : 16);
      c.spec.asym = seed % 2 == 0;
      if (cuda) {
        c.spec.garbage_padding = true;
        c.spec.extra_qrows = seed % 3;
      }
      c.spec.seed = seed++;
      c.spec.sdtype = kWqDtypes[seed % 3];
      c.xtype = kWqDtypes[(seed / 3) % 3];
      if (cuda) {
        c.M = K * N > 1000000 ? 1 : 1 + int64_t(seed % 3);
        c.bias = seed % 2 == 1;
        c.ldx_pad = seed % 3;
        c.ldo_pad = (seed / 2) % 3;
      } else {
        c.M = 3;
        c.ldx_pad = 3;
        c.ldo_pad = 2;
      }
      v.push_back(c);
    }
  return v;
}

// Every bit width alone, sym and asym, garbage padding bits and 2 extra word rows (seeds from 100).
// CPU: K = 100 (3 chunks + a partial one), N = 37, M = 1, 2, 5. CUDA: K = 257, N = 128 / 130 (vector and
// scalar loads), M and the dtypes varying with the seed.
inline std::vector<WqCase> wq_cases_every_width(WqTarget t) {
  const bool cuda = t == WqTarget::kCuda;
  const std::vector<int64_t> inner = cuda ? std::vector<int64_t>{128, 130} : std::vector<int64_t>{1, 2, 5};
  std::vector<WqCase> v;
  uint32_t seed = 100;
  for (int32_t b : {1, 2, 3, 4, 5, 6, 8})
    for (int64_t i : inner)  // CUDA: N; CPU: M
      for (bool asym : {false, true}) {
        WqCase c;
        c.spec.K = cuda ? 257 : 100;
        c.spec.N = cuda ? i : 37;
        c.spec.segments = {{b, cuda ? 0 : 100}};
        c.spec.group_size = cuda ? 64 : 32;
        c.spec.asym = asym;
        c.spec.garbage_padding = true;
        c.spec.extra_qrows = 2;
        c.spec.seed = seed++;
        if (cuda) {
          c.spec.sdtype = kWqDtypes[seed % 3];
          c.xtype = kWqDtypes[(seed / 3) % 3];
          c.M = 1 + int64_t(seed % 2);
        } else {
          c.xtype = kWqDtypes[seed % 3];
          c.M = i;
          c.bias = i == 2;
        }
        v.push_back(c);
      }
  return v;
}

// Channel-mix segment mixes at K = 257, N = 130, M = 1 and 9, bias, padded output (seeds 200..207).
inline std::vector<WqCase> wq_cases_channel_mix() {
  const std::vector<std::vector<WqSegSpec>> mixes = {
      {{8, 32}, {6, 64}, {5, 32}, {4, 64}, {3, 32}, {2, 0}},  // 2-bit gets the rest (33 rows at K = 257)
      {{2, 32}, {3, 32}, {5, 64}, {1, 0}},
      {{6, 32}, {8, 0}},
      {{1, 64}, {5, 0}},
  };
  std::vector<WqCase> v;
  uint32_t seed = 200;
  for (const auto& mix : mixes)
    for (int64_t M : {1, 9}) {
      WqCase c;
      c.spec.K = 257;
      c.spec.N = 130;
      c.spec.segments = mix;
      c.spec.group_size = 64;
      c.spec.asym = seed % 2 == 1;
      c.spec.garbage_padding = true;
      c.spec.seed = seed++;
      c.spec.sdtype = kWqDtypes[seed % 3];
      c.M = M;
      c.xtype = kWqDtypes[(seed + 1) % 3];
      c.bias = true;
      c.ldo_pad = 5;
      v.push_back(c);
    }
  return v;
}

// Every combination of act-order g_idx, perm, channel_scale and asym (seeds 300..315).
inline std::vector<WqCase> wq_cases_act_order_perm_cscale() {
  std::vector<WqCase> v;
  uint32_t seed = 300;
  for (bool act : {false, true})
    for (bool perm : {false, true})
      for (bool cs : {false, true})
        for (bool asym : {false, true}) {
          WqCase c;
          c.spec.K = 160;
          c.spec.N = 70;
          c.spec.segments = {{4, 64}, {3, 0}};
          c.spec.group_size = 32;
          c.spec.act_order = act;
          c.spec.groups = act ? 5 : 0;
          c.spec.perm = perm;
          c.spec.channel_scale = cs;
          c.spec.asym = asym;
          c.spec.seed = seed++;
          c.spec.sdtype = kWqDtypes[seed % 3];
          c.M = 5;
          c.xtype = kWqDtypes[(seed / 2) % 3];
          c.bias = (seed % 2) == 0;
          c.ldx_pad = 1;
          v.push_back(c);
        }
  return v;
}

// Groups of 48 rows (chunks alternate between one group and two: the per-row group path), 7 (every chunk
// mixed) and 1000 (one group over several chunks); seeds 400..402.
inline std::vector<WqCase> wq_cases_groups_straddling_chunks() {
  std::vector<WqCase> v;
  uint32_t seed = 400;
  for (int64_t gs : {48, 7, 1000}) {
    WqCase c;
    c.spec.K = 200;
    c.spec.N = 45;
    c.spec.segments = {{5, 96}, {2, 0}};
    c.spec.group_size = gs;
    c.spec.perm = true;
    c.spec.seed = seed++;
    c.M = 4;
    c.xtype = lowbit::DType::kBFloat16;
    v.push_back(c);
  }
  return v;
}

// Every x dtype x sdtype x bias at M = 2, then a row-count sweep (seeds from 500). CPU: K = 96 with
// channel_scale, then K = 129 with perm at M = 1, 2, 3, 5, 9, 17. CUDA: K = 300, then K = 777 at
// M = 1, 2, 3, 5, 8, 9, 17, 33 (every M-tile width, several M-tiles).
inline std::vector<WqCase> wq_cases_dtypes_bias_rows(WqTarget t) {
  const bool cuda = t == WqTarget::kCuda;
  std::vector<WqCase> v;
  uint32_t seed = 500;
  for (lowbit::DType xt : kWqDtypes)
    for (lowbit::DType sd : kWqDtypes)
      for (bool bias : {false, true}) {
        WqCase c;
        c.spec.K = cuda ? 300 : 96;
        c.spec.N = cuda ? 68 : 40;
        c.spec.segments = cuda ? std::vector<WqSegSpec>{{4, 128}, {6, 0}} : std::vector<WqSegSpec>{{4, 32}, {8, 0}};
        c.spec.group_size = cuda ? 64 : 32;
        c.spec.asym = cuda && seed % 2 == 0;
        c.spec.channel_scale = !cuda;
        c.spec.sdtype = sd;
        c.spec.seed = seed++;
        c.M = 2;
        c.xtype = xt;
        c.bias = bias;
        v.push_back(c);
      }
  const std::vector<int64_t> Ms =
      cuda ? std::vector<int64_t>{1, 2, 3, 5, 8, 9, 17, 33} : std::vector<int64_t>{1, 2, 3, 5, 9, 17};
  for (int64_t M : Ms) {
    WqCase c;
    if (cuda) {
      c.spec.K = 777;
      c.spec.N = 200;
      c.spec.group_size = 128;
      c.spec.seed = seed++;
      c.spec.sdtype = kWqDtypes[seed % 3];
      c.xtype = kWqDtypes[(seed / 3) % 3];
      c.bias = M % 2 == 1;
      c.ldx_pad = 3;
    } else {
      c.spec.K = 129;
      c.spec.N = 67;
      c.spec.segments = {{6, 64}, {4, 0}};
      c.spec.group_size = 32;
      c.spec.perm = true;
      c.spec.asym = M % 2 == 1;
      c.spec.seed = seed++;
      c.xtype = kWqDtypes[M % 3];
      c.bias = true;
      c.ldx_pad = 2;
    }
    c.M = M;
    c.ldo_pad = 1;
    v.push_back(c);
  }
  return v;
}

// wq_dequantize cases (seeds from 800): a few shapes (column window [n0, n1)) x every output dtype x perm,
// group 32, act-order / asym / sdtype varying with the seed, channel_scale set (dequantize must ignore it)
// and garbage padding bits. CUDA adds a larger shape.
struct WqDequantCase {
  WqSpec spec;
  lowbit::DType otype = lowbit::DType::kFloat32;
  int64_t n0 = 0, n1 = 0;
};

inline std::vector<WqDequantCase> wq_dequant_cases(WqTarget t) {
  struct Shape {
    int64_t K, N;
    std::vector<WqSegSpec> segs;
    int64_t n0, n1;
  };
  std::vector<Shape> shapes = {
      {1, 1, {{4, 1}}, 0, 1},
      {100, 37, {{3, 100}}, 0, 37},
      {257, 130, {{8, 32}, {6, 64}, {5, 32}, {4, 64}, {3, 32}, {2, 0}}, 5, 101},
      {160, 33, {{1, 32}, {2, 0}}, 32, 33},
  };
  if (t == WqTarget::kCuda) shapes.push_back({1000, 600, {{4, 512}, {5, 0}}, 0, 600});
  std::vector<WqDequantCase> v;
  uint32_t seed = 800;
  for (const Shape& d : shapes)
    for (lowbit::DType ot : kWqDtypes)
      for (bool perm : {false, true}) {
        WqDequantCase c;
        c.spec.K = d.K;
        c.spec.N = d.N;
        c.spec.segments = d.segs;
        c.spec.group_size = 32;
        c.spec.act_order = seed % 3 == 0;
        c.spec.perm = perm;
        c.spec.asym = seed % 2 == 0;
        c.spec.sdtype = kWqDtypes[seed % 3];
        c.spec.channel_scale = true;  // must be ignored
        c.spec.garbage_padding = true;
        c.spec.seed = seed++;
        c.otype = ot;
        c.n0 = d.n0;
        c.n1 = d.n1;
        v.push_back(c);
      }
  return v;
}

// The weight the error tests start from (a good descriptor of it is accepted): K = 96, N = 16, two
// segments, group 32, a permutation.
inline WqSpec wq_error_spec() {
  WqSpec s;
  s.K = 96;
  s.N = 16;
  s.segments = {{4, 64}, {3, 0}};
  s.group_size = 32;
  s.perm = true;
  s.seed = 900;
  return s;
}

// Malformed weight descriptors of the wq_error_spec weight: what, the expected message fragment, and the
// change to a good descriptor.
struct WqWeightError {
  std::string what, needle;
  std::function<void(lowbit::WqWeight&)> apply;
};

inline std::vector<WqWeightError> wq_weight_errors() {
  using lowbit::WqWeight;
  return {
      {"bits 7", "bits must be 1, 2, 3, 4, 5, 6 or 8, got 7", [](WqWeight& v) { v.bits[1] = 7; }},
      {"bits 0", "got 0", [](WqWeight& v) { v.bits[0] = 0; }},
      {"segment length", "multiple of 32", [](WqWeight& v) { v.row_end[0] = 48; }},
      {"row_end != K", "must end at K", [](WqWeight& v) { v.row_end[1] = 90; }},
      {"empty segment", "row_end must exceed", [](WqWeight& v) { v.row_end[1] = 64; }},
      {"nseg", "nseg", [](WqWeight& v) { v.nseg = 7; }},
      {"qrows", "qrows must be >=", [](WqWeight& v) { v.qrows -= 1; }},
      {"groups", "groups must be >= 1", [](WqWeight& v) { v.groups = 0; }},
      {"qweight null", "qweight is null", [](WqWeight& v) { v.qweight = nullptr; }},
      {"g_idx null", "g_idx is null", [](WqWeight& v) { v.g_idx = nullptr; }},
      {"scales null", "scales is null", [](WqWeight& v) { v.scales = nullptr; }},
      {"zeros null", "zeros is null", [](WqWeight& v) { v.zeros = nullptr; }},
      {"sdtype", "sdtype", [](WqWeight& v) { v.sdtype = lowbit::DType(5); }},
  };
}

}  // namespace lowbit_test
