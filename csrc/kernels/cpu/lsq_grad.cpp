// LSQ / straight-through input gradients (lsq_grad.h), generic translation unit: validation, the scalar
// reference, the fixed work partition with its partial sums, the portable span and dispatch to
// lsq_grad_avx512.cpp.
//
// Work partition (fixed by the sizes alone, so the sums never depend on the thread count):
//   * column mode (inner == 1 and a shift to add or grad_shift to sum: channels are the last dim): the
//     (outer, C) matrix in units of kRowBlock(C) rows x at most kColBlock columns. A unit adds each of
//     its columns' grad_x over its rows, in row order, into its own slots [row block][c] of the partial
//     buffer; grad_shift[c] then sums the row blocks in order.
//   * row mode (everything else): rows (o, c) of `inner` elements, split into segments of at most
//     kUnitElems; a unit is a run of whole rows (short rows) or one segment (long rows). Each (row,
//     segment) leaves one partial at [o][segment][c]. Without a shift and without grad_shift the channel
//     plays no part and the data is one flat row.
//   * grad_scale: one partial per unit, summed in unit order.
// Both end in the same form, grad_shift[c] = sum over j < J of part[j * C + c], summed in j order.
// Each unit runs start to end on one thread (OpenMP static schedule), in float64.
//
// Rounding in the portable span: rne(v) for v inside [qmin, qmax] (|v| <= 128) is (v + 1.5*2^23) -
// 1.5*2^23, exact in the default rounding mode there, and NaN stays NaN, so R matches the reference's
// std::nearbyint bit for bit without a libm call per element.
#include "lowbit/kernels/lsq_grad.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "../validate.h"
#include "lowbit/kernels/float_convert.h"
#include "lsq_grad_internal.h"
#include "cpu_features.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

constexpr int64_t kUnitElems = int64_t(1) << 16;  // elements per unit: far above the OpenMP per-unit cost
constexpr int64_t kColBlock = 2048;               // column mode: per-column fp64 sums of a unit stay in L1
constexpr int64_t kParallelMinElems = int64_t(1) << 15;  // below this a parallel region costs more than it saves

inline float load_f(DType t, const void* p, int64_t idx) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[idx]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[idx]);
    default: return static_cast<const float*>(p)[idx];
  }
}

// The canonical quiet NaN every NaN output becomes (lsq_grad.h).
constexpr uint32_t kNaN32 = 0x7fc00000u;
constexpr uint16_t kNaN16 = 0x7e00u, kNaNbf16 = 0x7fc0u;
inline float canonical(float v) { return v != v ? bits_to_float(kNaN32) : v; }

inline void store_f(DType t, void* p, int64_t idx, float v) {
  switch (t) {
    case DType::kFloat16: static_cast<uint16_t*>(p)[idx] = v != v ? kNaN16 : float_to_half(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[idx] = v != v ? kNaNbf16 : float_to_bf16(v); break;
    default: static_cast<float*>(p)[idx] = canonical(v); break;
  }
}

template <DType T>
inline float load_t(const void* p, int64_t idx) {
  if (T == DType::kFloat16) return half_to_float(static_cast<const uint16_t*>(p)[idx]);
  if (T == DType::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(p)[idx]);
  return static_cast<const float*>(p)[idx];
}

template <DType T>
inline void store_t(void* p, int64_t idx, float v) {
  if (T == DType::kFloat16)
    static_cast<uint16_t*>(p)[idx] = v != v ? kNaN16 : float_to_half(v);
  else if (T == DType::kBFloat16)
    static_cast<uint16_t*>(p)[idx] = v != v ? kNaNbf16 : float_to_bf16(v);
  else
    static_cast<float*>(p)[idx] = canonical(v);
}

// The portable span: the reference's arithmetic, one element at a time, sums of the span in its order.
template <DType G, DType X>
void span_portable(const LsqArgs& a, const LsqSpan& s) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  double sum_one = 0.0, sum_scale = 0.0;
  for (int64_t k = 0; k < s.n; ++k) {
    const int64_t e = s.base + k;
    float g = load_t<G>(a.g, e);
    if (a.has_gscale) g = g * a.gscale;
    float t = load_t<X>(a.x, e);
    if (s.shift_vec != nullptr)
      t = t + s.shift_vec[k];
    else if (s.has_shift_one)
      t = t + s.shift_one;
    const float v = t / a.step;
    const bool below = v < a.lo, above = v > a.hi;
    const bool inside = !below && !above && v == v;
    const float gx = g * (inside ? 1.0f : 0.0f);
    if (a.grad_x != nullptr) store_t<X>(a.grad_x, e, gx);
    if (s.acc_vec != nullptr) s.acc_vec[k] += double(gx);
    sum_one += double(gx);
    if (s.acc_scale != nullptr) {
      const float r = below ? a.lo : (above ? a.hi : (v + magic) - magic - v);
      sum_scale += double(r * g);
    }
  }
  if (s.acc_one != nullptr) *s.acc_one += sum_one;
  if (s.acc_scale != nullptr) *s.acc_scale += sum_scale;
}

template <DType G>
void span_portable_x(const LsqArgs& a, const LsqSpan& s) {
  switch (a.x_type) {
    case DType::kFloat32: span_portable<G, DType::kFloat32>(a, s); break;
    case DType::kFloat16: span_portable<G, DType::kFloat16>(a, s); break;
    case DType::kBFloat16: span_portable<G, DType::kBFloat16>(a, s); break;
  }
}

void span_portable_any(const LsqArgs& a, const LsqSpan& s) {
  switch (a.g_type) {
    case DType::kFloat32: span_portable_x<DType::kFloat32>(a, s); break;
    case DType::kFloat16: span_portable_x<DType::kFloat16>(a, s); break;
    case DType::kBFloat16: span_portable_x<DType::kBFloat16>(a, s); break;
  }
}

// validate::lsq_grad. The value of *step is not checked: CUDA cannot read it, so both sides apply the
// formula to whatever it holds (a NaN step gives NaN sums on both, bit for bit the same grad_x).
Status check(const char* fn, const LsqGradParams& p, int64_t* total, bool* wants) {
  return validate::lsq_grad(fn, p, total, wants);
}

// 1 / sqrt(numel * qmax) in float64: the LSQ gradient scale (Esser et al. 2020).
inline double grad_scale_factor(const LsqGradParams& p) { return 1.0 / std::sqrt(double(p.numel) * double(p.qmax)); }

// The outputs of an empty view: grad_shift all 0, grad_scale 0 * factor = 0 (grad_x has no elements).
void write_empty(const LsqGradParams& p) {
  if (p.grad_shift != nullptr)
    for (int64_t c = 0; c < p.channels; ++c) store_f(p.shift_out_type, p.grad_shift, c, 0.0f);
  if (p.grad_scale != nullptr) store_f(p.scale_out_type, p.grad_scale, 0, float(0.0 * grad_scale_factor(p)));
}

LsqArgs make_args(const LsqGradParams& p) {
  LsqArgs a;
  a.g_type = p.g_type;
  a.g = p.g;
  a.has_gscale = p.g_scale != nullptr;
  a.gscale = a.has_gscale ? *p.g_scale : 1.0f;
  a.x_type = p.x_type;
  a.x = p.x;
  a.step = *p.step;
  a.lo = float(p.qmin);
  a.hi = float(p.qmax);
  a.grad_x = p.grad_x;
  return a;
}

// The fixed partition (see the top of the file).
struct Plan {
  bool column_mode = false;
  int64_t rows = 0, len = 0;  // column mode: outer x C; row mode: rows of len elements
  int64_t C = 1;              // channels of the partial layout (1 in the flat case)
  // column mode
  int64_t row_block = 1, n_row_blocks = 0, col_block = 1, n_col_blocks = 0;
  // row mode
  int64_t nseg = 1, seg = 1, pairs = 0, pairs_per_unit = 1;
  int64_t units = 0;
  int64_t J = 0;  // partials per channel
};

Plan make_plan(const LsqGradParams& p, int64_t total) {
  Plan pl;
  const bool per_channel = p.shift != nullptr || p.grad_shift != nullptr;
  if (per_channel && p.inner == 1) {
    pl.column_mode = true;
    pl.rows = p.outer;
    pl.len = p.channels;
    pl.C = p.channels;
    pl.col_block = p.channels < kColBlock ? p.channels : kColBlock;
    pl.n_col_blocks = (p.channels + pl.col_block - 1) / pl.col_block;
    pl.row_block = kUnitElems / pl.col_block > 1 ? kUnitElems / pl.col_block : 1;
    pl.n_row_blocks = (p.outer + pl.row_block - 1) / pl.row_block;
    pl.units = pl.n_row_blocks * pl.n_col_blocks;
    pl.J = pl.n_row_blocks;
    return pl;
  }
  if (per_channel) {
    pl.rows = p.outer * p.channels;
    pl.len = p.inner;
    pl.C = p.channels;
  } else {
    pl.rows = 1;
    pl.len = total;
    pl.C = 1;
  }
  pl.seg = pl.len < kUnitElems ? pl.len : kUnitElems;
  pl.nseg = (pl.len + pl.seg - 1) / pl.seg;
  pl.pairs = pl.rows * pl.nseg;
  pl.pairs_per_unit = pl.nseg == 1 ? (kUnitElems / pl.len > 1 ? kUnitElems / pl.len : 1) : 1;
  pl.units = (pl.pairs + pl.pairs_per_unit - 1) / pl.pairs_per_unit;
  pl.J = pl.rows / pl.C * pl.nseg;  // outer * nseg
  return pl;
}

using SpanFn = void (*)(const LsqArgs&, const LsqSpan&);

// Unit u of the column mode: rows [rb*RB, ...) x columns [c0, c1).
void run_column_unit(const Plan& pl, const LsqGradParams& p, const LsqArgs& a, SpanFn span, int64_t u,
                     double* part_shift, double* part_scale) {
  const int64_t rb = u / pl.n_col_blocks, cb = u % pl.n_col_blocks;
  const int64_t c0 = cb * pl.col_block;
  const int64_t c1 = c0 + pl.col_block < pl.len ? c0 + pl.col_block : pl.len;
  const int64_t r0 = rb * pl.row_block;
  const int64_t r1 = r0 + pl.row_block < pl.rows ? r0 + pl.row_block : pl.rows;
  double* acc = part_shift != nullptr ? part_shift + rb * pl.C + c0 : nullptr;
  if (acc != nullptr)
    for (int64_t c = 0; c < c1 - c0; ++c) acc[c] = 0.0;
  double scale = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    LsqSpan s{};
    s.base = r * pl.len + c0;
    s.n = c1 - c0;
    s.shift_vec = p.shift != nullptr ? p.shift + c0 : nullptr;
    s.acc_vec = acc;
    s.acc_scale = part_scale != nullptr ? &scale : nullptr;
    span(a, s);
  }
  if (part_scale != nullptr) part_scale[u] = scale;
}

// Unit u of the row mode: (row, segment) pairs [u*PU, ...).
void run_row_unit(const Plan& pl, const LsqGradParams& p, const LsqArgs& a, SpanFn span, int64_t u,
                  double* part_shift, double* part_scale) {
  const int64_t q0 = u * pl.pairs_per_unit;
  const int64_t q1 = q0 + pl.pairs_per_unit < pl.pairs ? q0 + pl.pairs_per_unit : pl.pairs;
  double scale = 0.0;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t r = q / pl.nseg, sg = q % pl.nseg;
    const int64_t o = r / pl.C, c = r % pl.C;
    const int64_t i0 = sg * pl.seg;
    double one = 0.0;
    LsqSpan s{};
    s.base = r * pl.len + i0;
    s.n = i0 + pl.seg < pl.len ? pl.seg : pl.len - i0;
    s.has_shift_one = p.shift != nullptr;
    s.shift_one = p.shift != nullptr ? p.shift[c] : 0.0f;
    s.acc_one = part_shift != nullptr ? &one : nullptr;
    s.acc_scale = part_scale != nullptr ? &scale : nullptr;
    span(a, s);
    if (part_shift != nullptr) part_shift[(o * pl.nseg + sg) * pl.C + c] = one;
  }
  if (part_scale != nullptr) part_scale[u] = scale;
}

}  // namespace

bool lsq_grad_avx512_supported() {
  static const bool ok = cpu_has_avx512_set();
  return ok;
}

Status lsq_grad_path(bool use_avx512, const LsqGradParams& p, int nthreads) {
  const char* fn = "lsq_grad";
  int64_t total = 0;
  bool wants = false;
  Status st = check(fn, p, &total, &wants);
  if (!st.is_ok() || !wants) return st;
  if (use_avx512 && !lsq_grad_avx512_supported())
    return Status::invalid(validate::err(fn, "AVX-512 path requested but not supported by this CPU"));
  if (total == 0) {
    write_empty(p);
    return Status::ok();
  }

  const LsqArgs a = make_args(p);
  const Plan pl = make_plan(p, total);
  const bool want_shift = p.grad_shift != nullptr, want_scale = p.grad_scale != nullptr;
  const int64_t n_shift = want_shift ? pl.J * pl.C : 0;
  const int64_t n_scale = want_scale ? pl.units : 0;
  std::unique_ptr<double[]> part;
  if (n_shift + n_scale > 0) {
    part.reset(new (std::nothrow) double[size_t(n_shift + n_scale)]);
    if (!part)
      return Status::invalid(validate::err(fn, "cannot allocate " + std::to_string(8 * (n_shift + n_scale)) +
                                                   " bytes of partial sums"));
  }
  double* part_shift = want_shift ? part.get() : nullptr;
  double* part_scale = want_scale ? part.get() + n_shift : nullptr;
  const SpanFn span = use_avx512 ? lsq_span_avx512 : span_portable_any;

  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (total < kParallelMinElems || pl.units < 2) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t u = 0; u < pl.units; ++u) {
    if (pl.column_mode)
      run_column_unit(pl, p, a, span, u, part_shift, part_scale);
    else
      run_row_unit(pl, p, a, span, u, part_shift, part_scale);
  }

  if (want_shift)
    for (int64_t c = 0; c < pl.C; ++c) {
      double sum = 0.0;
      for (int64_t j = 0; j < pl.J; ++j) sum += part_shift[j * pl.C + c];
      store_f(p.shift_out_type, p.grad_shift, c, float(sum));
    }
  if (want_scale) {
    double sum = 0.0;
    for (int64_t u = 0; u < pl.units; ++u) sum += part_scale[u];
    store_f(p.scale_out_type, p.grad_scale, 0, float(sum * grad_scale_factor(p)));
  }
  return Status::ok();
}

}  // namespace detail

Status lsq_grad(const LsqGradParams& p) {
  return detail::lsq_grad_path(detail::lsq_grad_avx512_supported(), p);
}

// The definition: every element in memory order, sums in that order.
Status lsq_grad_ref(const LsqGradParams& p) {
  const char* fn = "lsq_grad_ref";
  int64_t total = 0;
  bool wants = false;
  Status st = detail::check(fn, p, &total, &wants);
  if (!st.is_ok() || !wants) return st;
  if (total == 0) {
    detail::write_empty(p);
    return Status::ok();
  }
  std::unique_ptr<double[]> shift_sum;
  if (p.grad_shift != nullptr) {
    shift_sum.reset(new (std::nothrow) double[size_t(p.channels)]);
    if (!shift_sum) return Status::invalid(validate::err(fn, "cannot allocate the per-channel sums"));
    for (int64_t c = 0; c < p.channels; ++c) shift_sum[c] = 0.0;
  }
  const float s = *p.step, lo = float(p.qmin), hi = float(p.qmax);
  double scale_sum = 0.0;
  for (int64_t o = 0; o < p.outer; ++o)
    for (int64_t c = 0; c < p.channels; ++c)
      for (int64_t i = 0; i < p.inner; ++i) {
        const int64_t e = (o * p.channels + c) * p.inner + i;
        float g = detail::load_f(p.g_type, p.g, e);
        if (p.g_scale != nullptr) g = g * *p.g_scale;
        float t = detail::load_f(p.x_type, p.x, e);
        if (p.shift != nullptr) t = t + p.shift[c];
        const float v = t / s;
        const bool below = v < lo, above = v > hi;
        const bool inside = !below && !above && !std::isnan(v);
        const float gx = g * (inside ? 1.0f : 0.0f);
        if (p.grad_x != nullptr) detail::store_f(p.x_type, p.grad_x, e, gx);
        if (p.grad_shift != nullptr) shift_sum[c] += double(gx);
        const float r = below ? lo : (above ? hi : std::nearbyint(v) - v);
        scale_sum += double(r * g);
      }
  if (p.grad_shift != nullptr)
    for (int64_t c = 0; c < p.channels; ++c) detail::store_f(p.shift_out_type, p.grad_shift, c, float(shift_sum[c]));
  if (p.grad_scale != nullptr)
    detail::store_f(p.scale_out_type, p.grad_scale, 0, float(scale_sum * detail::grad_scale_factor(p)));
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit
