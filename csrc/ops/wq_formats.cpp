// Op family "wq" (weight-only layers), format side: packing of codes and GPTQ zero points, round-to-nearest
// quantization of a float weight, BIE's GBA double-quantization decode, and the host-side checks that turn a
// checkpoint's indices (q_groups, q_perm, g_idx) into the runtime form of include/lowbit/kernels/wq.h.
// These run once per layer (prepare, export, conversion), so they are device-generic: index work happens
// on the host, arithmetic on the tensors' own device with ATen.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "lowbit/kernels/wq.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

WqWeight layout_of(const char* op, int64_t N, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows) {
  TORCH_CHECK(seg_bits.size() >= 1 && seg_bits.size() <= size_t(kWqMaxSegments) && seg_bits.size() == seg_rows.size(),
              op, ": seg_bits and seg_rows must have the same length in [1, ", kWqMaxSegments, "], got ",
              seg_bits.size(), " and ", seg_rows.size());
  WqWeight w;
  w.K = seg_rows.back();
  w.N = N;
  w.nseg = static_cast<int32_t>(seg_bits.size());
  for (size_t s = 0; s < seg_bits.size(); ++s) {
    w.bits[s] = static_cast<int32_t>(seg_bits[s]);
    w.row_end[s] = seg_rows[s];
  }
  return w;
}

int64_t packed_rows_checked(const char* op, WqWeight w) {
  // wq_validate with stand-in pointers: only the segment description matters here.
  static const uint32_t kWord = 0;
  static const int32_t kIdx = 0;
  w.qweight = &kWord;
  w.g_idx = &kIdx;
  w.scales = w.zeros = &kWord;
  w.groups = 1;
  w.qrows = std::numeric_limits<int32_t>::max();
  check_status(wq_validate(op, w), op);
  return wq_packed_rows(w);
}

at::Tensor wq_pack_impl(const at::Tensor& codes, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows) {
  const char* op = "lowbit.wq_pack";
  TORCH_CHECK(codes.defined() && codes.dim() == 2 && !at::isFloatingType(codes.scalar_type()) &&
                  codes.scalar_type() != at::kBool,
              op, ": codes must be a 2-D integer tensor (K, N), got ",
              codes.defined() ? c10::toString(codes.scalar_type()) : "None");
  WqWeight w = layout_of(op, codes.size(1), seg_bits, seg_rows);
  TORCH_CHECK(codes.size(0) == w.K, op, ": codes must have K=", w.K, " rows (the last seg_rows entry), got shape ",
              codes.sizes());
  w.qrows = packed_rows_checked(op, w);
  const auto c = codes.to(at::kCPU, at::kInt).contiguous();
  auto q = at::empty({w.qrows, w.N}, c.options());
  check_status(cpu::wq_pack_codes(w, c.data_ptr<int32_t>(), reinterpret_cast<uint32_t*>(q.data_ptr<int32_t>())), op);
  return q.to(codes.device());
}

at::Tensor wq_unpack_impl(const at::Tensor& qweight, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows) {
  const char* op = "lowbit.wq_unpack";
  TORCH_CHECK(qweight.defined() && qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op,
              ": qweight must be a 2-D int32 tensor, got ", qweight.defined() ? c10::toString(qweight.scalar_type()) : "None");
  WqWeight w = layout_of(op, qweight.size(1), seg_bits, seg_rows);
  const int64_t need = packed_rows_checked(op, w);
  TORCH_CHECK(qweight.size(0) >= need, op, ": qweight must have at least ", need, " word rows for these segments, got ",
              qweight.sizes());
  w.qrows = qweight.size(0);
  const auto q = qweight.to(at::kCPU).contiguous();
  auto c = at::empty({w.K, w.N}, q.options());
  check_status(cpu::wq_unpack_codes(w, reinterpret_cast<const uint32_t*>(q.data_ptr<int32_t>()), c.data_ptr<int32_t>()),
               op);
  return c.to(qweight.device());
}

void check_zero_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, op, ": bits must be 1, 2, 4 or 8, got ", bits);
}

// GPTQ ("v1") zero points: z - 1 stored along N, 32/bits per word, LSB first.
at::Tensor wq_pack_zeros_impl(const at::Tensor& zeros, int64_t bits) {
  const char* op = "lowbit.wq_pack_zeros";
  check_zero_bits(op, bits);
  TORCH_CHECK(zeros.defined() && zeros.dim() == 2 && zeros.scalar_type() != at::kBool, op,
              ": zeros must be a 2-D tensor (groups, N) of integer zero points");
  const int64_t G = zeros.size(0), N = zeros.size(1), per = 32 / bits, words = (N + per - 1) / per;
  auto z = zeros.to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(at::equal(z, z.round()), op, ": zeros must hold integer zero points");
  const double hi = double(int64_t(1) << bits);
  if (z.numel() > 0) {
    const double mn = z.min().item<double>(), mx = z.max().item<double>();
    TORCH_CHECK(mn >= 1 && mx <= hi, op, ": GPTQ zero points are stored minus one, so they must be in [1, ", hi,
                "] for ", bits, " bits, got values in [", mn, ", ", mx, "]");
  }
  auto stored = (z.to(at::kLong) - 1);
  stored = at::constant_pad_nd(stored, {0, words * per - N}, 0).view({G, words, per});
  const auto shifts = at::arange(per, stored.options()) * bits;
  const auto w = at::bitwise_left_shift(stored, shifts).sum(-1);  // disjoint bit fields: the sum is their OR
  return w.to(at::kInt).to(zeros.device());   // two's-complement wrap of words >= 2^31
}

at::Tensor wq_unpack_zeros_impl(const at::Tensor& qzeros, int64_t bits, int64_t N, at::ScalarType dtype) {
  const char* op = "lowbit.wq_unpack_zeros";
  check_zero_bits(op, bits);
  const int64_t per = 32 / bits, words = (N + per - 1) / per;
  TORCH_CHECK(qzeros.defined() && qzeros.dim() == 2 && qzeros.scalar_type() == at::kInt && qzeros.size(1) >= words,
              op, ": qzeros must be int32 (groups, >= ", words, ") for N=", N, " at ", bits, " bits, got ",
              qzeros.defined() ? c10::toString(qzeros.scalar_type()) : "None", " of shape ",
              qzeros.defined() ? qzeros.sizes() : at::IntArrayRef{});
  const auto w = qzeros.narrow(1, 0, words).to(at::kLong) & 0xFFFFFFFFLL;
  const auto shifts = at::arange(per, w.options()) * bits;
  const auto v = at::bitwise_and(at::bitwise_right_shift(w.unsqueeze(-1), shifts), (int64_t(1) << bits) - 1) + 1;
  return v.reshape({qzeros.size(0), words * per}).narrow(1, 0, N).to(dtype);
}

// Round-to-nearest per group of input channels. The codes are computed against the scales and zeros as
// stored (rounded to the weight's dtype), so the dequantized weight is the nearest representable one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> wq_quantize_rtn_impl(const at::Tensor& weight, int64_t bits,
                                                                    int64_t group_size, c10::string_view mode) {
  const char* op = "lowbit.wq_quantize_rtn";
  check_float_tensor(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.numel() > 0, op, ": weight must be a non-empty 2-D (N, K) tensor, got shape ",
              weight.sizes());
  TORCH_CHECK(wq_bits_supported(static_cast<int32_t>(bits)), op, ": bits must be 1, 2, 3, 4, 5, 6 or 8, got ", bits);
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t gs = group_size == -1 ? K : group_size;
  TORCH_CHECK(gs >= 1, op, ": group_size must be >= 1 or -1 (one group), got ", group_size);
  const bool float_zero = mode == "float_zero", int_zero = mode == "int_zero", int_sym = mode == "int_zero_sym";
  TORCH_CHECK(float_zero || int_zero || int_sym, op,
              ": mode must be 'float_zero', 'int_zero' or 'int_zero_sym', got '", std::string(mode), "'");
  TORCH_CHECK(at::isfinite(weight).all().item<bool>(), op, ": weight has NaN or infinite values");
  const auto dt = weight.scalar_type();
  const int64_t G = (K + gs - 1) / gs;
  const double maxq = double((int64_t(1) << bits) - 1);
  auto W = weight.to(at::kFloat).t();  // (K, N)
  // Pad K to G * gs by repeating the last row, so min / max per group are unchanged.
  if (G * gs > K) W = at::cat({W, W.narrow(0, K - 1, 1).expand({G * gs - K, N})}, 0);
  const auto Wg = W.reshape({G, gs, N});
  auto mn = Wg.amin(1), mx = Wg.amax(1);  // (G, N)
  at::Tensor s, z;
  if (int_zero) {
    // GPTQ's grid: the range widened to include 0, step (max - min) / maxq, z = rne(-min / s) in [0, maxq]. The
    // step is rounded *up* to the dtype, so that the grid [-z*s, (maxq - z)*s] covers the group and every weight
    // is within s/2 of a grid point. GPTQ stores z - 1, so z = 0 (a group with no weight below -s/2, e.g. all
    // positive) cannot be stored: such a group takes the same grid mirrored, s -> -s and z = maxq (the code of
    // each weight becomes maxq - q): -s * (q' - maxq) = s * q. Only the sign of the stored scale differs.
    const auto lo = at::clamp_max(mn, 0).to(at::kDouble), hi = at::clamp_min(mx, 0).to(at::kDouble);
    auto step = (hi - lo) / maxq;
    step = at::where(step > 0, step, at::ones_like(step));  // an all-zero group: any step works
    auto sd = step.to(dt);
    const auto up = at::nextafter(sd, at::full_like(sd, std::numeric_limits<double>::infinity()));
    sd = at::where(sd.to(at::kDouble) < step, up, sd);
    const auto s64 = sd.to(at::kDouble);
    const auto z0 = at::round(-lo / s64);  // in [0, maxq]: -min <= max - min = maxq * step <= maxq * s
    const auto mirror = z0 == 0;
    s = at::where(mirror, -s64, s64).to(at::kFloat);
    z = at::where(mirror, at::full_like(z0, maxq), z0).to(at::kFloat);
  } else {
    if (float_zero) {
      s = (mx - mn) / maxq;
      z = -mn;
    } else {
      s = at::maximum(mn.abs(), mx.abs()) * (2.0 / maxq);
      z = at::full_like(s, double(int64_t(1) << (bits - 1)));
    }
    s = at::where(s > 0, s, at::ones_like(s)).to(dt).to(at::kFloat);  // an all-equal group: any step works
  }
  TORCH_CHECK(at::isfinite(s).all().item<bool>(), op, ": a group's step (max - min) / (2^bits - 1) overflows ",
              c10::toString(dt), "; quantize in a wider dtype");
  z = z.to(dt).to(at::kFloat);
  at::Tensor q;
  const auto sr = s.repeat_interleave(gs, 0).narrow(0, 0, K), zr = z.repeat_interleave(gs, 0).narrow(0, 0, K);
  const auto Wk = W.narrow(0, 0, K);
  if (float_zero) {
    q = at::round((Wk + zr) / sr);
  } else {
    q = at::round(Wk / sr) + zr;
  }
  q = at::clamp(q, 0, maxq).to(at::kInt).contiguous();
  return {q, s.to(dt), z.to(dt)};
}

// GBA double quantization (BIE prepare_params), computed in the dtype of the dq scales as BIE does.
std::tuple<at::Tensor, at::Tensor> wq_gba_decode_impl(const at::Tensor& qstat, const at::Tensor& qs_zeros,
                                                      const at::Tensor& qs_scales,
                                                      const std::optional<at::Tensor>& qz_zeros,
                                                      const std::optional<at::Tensor>& qz_scales, bool asym, int64_t N) {
  const char* op = "lowbit.wq_gba_decode";
  TORCH_CHECK(qstat.defined() && qstat.scalar_type() == at::kByte, op, ": ", asym ? "qscales" : "qstatistic",
              " must be uint8, got ", qstat.defined() ? c10::toString(qstat.scalar_type()) : "None");
  check_float_tensor(qs_zeros, op, "qscales_zeros");
  check_float_tensor(qs_scales, op, "qscales_scales");
  const auto dt = qs_scales.scalar_type();
  // (G, N) codes (one per output channel), or (G, NB, D) blocks of D channels with NB = ceil(N / D): the
  // last block padded when D does not divide N (the padding codes are decoded and dropped).
  TORCH_CHECK(N >= 1 && (qstat.dim() == 2 || qstat.dim() == 3) && qstat.numel() > 0, op, ": ",
              asym ? "qscales" : "qstatistic", " must be (groups, N) or (groups, ceil(N/D), D) with N=", N, ", got shape ",
              qstat.sizes());
  auto codes = qstat.dim() == 2 ? qstat.unsqueeze(-1) : qstat;
  const int64_t G = codes.size(0), NB = codes.size(1), D = codes.size(2);
  TORCH_CHECK(D >= 1 && NB * D >= N && (NB - 1) * D < N, op, ": ", asym ? "qscales" : "qstatistic", " of shape ",
              qstat.sizes(), " does not hold groups x N=", N, " codes (expected (groups, N) or (groups, ",
              (N + D - 1) / std::max<int64_t>(D, 1), ", ", D, "))");
  auto decode = [&](const at::Tensor& c, const at::Tensor& zz, const at::Tensor& ss, const char* what) {
    std::vector<int64_t> shape;
    try {
      shape = at::infer_size(at::infer_size(c.sizes(), zz.sizes()), ss.sizes());
    } catch (const c10::Error&) {
      shape.clear();
    }
    TORCH_CHECK(shape == c.sizes().vec(), op, ": the ", what, " double-quantization parameters (", zz.sizes(), ", ",
                ss.sizes(), ") do not broadcast over the codes ", c.sizes(),
                " (BIE supports: per (group, N-block) with dq_mode 2, per output channel with dq_mode 1 and D = 1)");
    return ((c.to(dt) - as_dtype(zz, dt)) * as_dtype(ss, dt)).reshape({G, NB * D}).narrow(1, 0, N).contiguous();
  };
  if (asym) {
    return {decode(codes, qs_zeros, qs_scales, "scale"), at::Tensor()};
  }
  TORCH_CHECK(qz_zeros.has_value() && qz_zeros->defined() && qz_scales.has_value() && qz_scales->defined(), op,
              ": the sym format needs qzeros_zeros and qzeros_scales");
  check_float_tensor(*qz_zeros, op, "qzeros_zeros");
  check_float_tensor(*qz_scales, op, "qzeros_scales");
  const auto hi = at::bitwise_right_shift(codes, 4), lo = at::bitwise_and(codes, 15);
  return {decode(hi, qs_zeros, qs_scales, "scale"), decode(lo, *qz_zeros, *qz_scales, "zero")};
}

// Host copy of a small integer index tensor as int64.
std::vector<int64_t> host_ints(const at::Tensor& t) {
  const auto c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wq_mbwq_layout_impl(const std::optional<at::Tensor>& q_groups, int64_t K,
                                                                   int64_t qrows, int64_t bits, int64_t group_size) {
  const char* op = "lowbit.wq_mbwq_layout";
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  std::vector<int64_t> seg_bits, seg_rows, group_rows, group_bits;
  at::Device dev = at::kCPU;
  if (!q_groups.has_value() || !q_groups->defined()) {
    TORCH_CHECK(wq_bits_supported(static_cast<int32_t>(bits)), op, ": bits must be 1, 2, 3, 4, 5, 6 or 8, got ", bits);
    const int64_t gs = group_size == -1 ? K : group_size;
    TORCH_CHECK(gs >= 1, op, ": group_size must be >= 1 or -1, got ", group_size);
    seg_bits = {bits};
    seg_rows = {K};
    for (int64_t r = 0; r < K; r += gs) {
      group_rows.push_back(std::min(gs, K - r));
      group_bits.push_back(bits);
    }
  } else {
    dev = q_groups->device();
    TORCH_CHECK(!at::isFloatingType(q_groups->scalar_type()) && q_groups->dim() == 1 && q_groups->numel() >= 2 &&
                    q_groups->numel() % 2 == 0,
                op, ": q_groups must be a 1-D integer tensor of (bits, first word row) pairs, got shape ",
                q_groups->sizes());
    const auto v = host_ints(*q_groups);
    const int64_t G = int64_t(v.size()) / 2;
    int64_t rows = 0;
    for (int64_t i = 0; i < G; ++i) {
      const int64_t b = v[2 * i], start = v[2 * i + 1];
      TORCH_CHECK(wq_bits_supported(static_cast<int32_t>(b)), op, ": q_groups group ", i,
                  ": bits must be 1, 2, 3, 4, 5, 6 or 8, got ", b);
      TORCH_CHECK(i > 0 || start == 0, op, ": q_groups: the first group must start at word row 0, got ", start);
      TORCH_CHECK(i == 0 || b <= group_bits.back(), op, ": q_groups group ", i, ": widths must not increase (",
                  group_bits.empty() ? 0 : group_bits.back(), " then ", b, ")");
      int64_t n;
      if (i + 1 < G) {
        const int64_t words = v[2 * i + 3] - start;
        TORCH_CHECK(words > 0 && words % b == 0, op, ": q_groups group ", i, " (", b, "-bit) spans ", words,
                    " word rows, which must be a positive multiple of ", b, " (whole 32-row chunks)");
        n = words / b * 32;
      } else {
        n = K - rows;
        TORCH_CHECK(n >= 1 && start + (n + 31) / 32 * b <= qrows, op, ": q_groups: the last group (", b,
                    "-bit, word row ", start, ") must hold the remaining ", n, " of K=", K,
                    " rows within the qweight's qrows=", qrows, " word rows");
      }
      // A width change must fall on a whole chunk: every segment but the last is a multiple of 32 rows.
      if (i > 0 && b != group_bits.back())
        TORCH_CHECK(rows % 32 == 0, op, ": q_groups group ", i, " starts a new width at row ", rows,
                    ", which is not a multiple of 32");
      group_rows.push_back(n);
      group_bits.push_back(b);
      rows += n;
      if (seg_bits.empty() || seg_bits.back() != b) {
        seg_bits.push_back(b);
        seg_rows.push_back(rows);
      } else {
        seg_rows.back() = rows;
      }
      TORCH_CHECK(rows <= K, op, ": q_groups describe more than K=", K, " rows");
    }
    TORCH_CHECK(seg_bits.size() <= size_t(kWqMaxSegments), op, ": at most ", kWqMaxSegments, " widths per layer");
  }
  std::vector<int32_t> g_idx;
  std::vector<int32_t> gmap;
  g_idx.reserve(K);
  gmap.reserve(2 * K);
  for (size_t i = 0; i < group_rows.size(); ++i)
    for (int64_t j = 0; j < group_rows[i]; ++j) {
      g_idx.push_back(static_cast<int32_t>(i));
      gmap.push_back(static_cast<int32_t>(i));
      gmap.push_back(static_cast<int32_t>(group_rows[i] - j));
    }
  WqWeight w = layout_of(op, 1, seg_bits, seg_rows);
  const int64_t need = packed_rows_checked(op, w);
  TORCH_CHECK(qrows >= need, op, ": qweight has ", qrows, " word rows, the layout needs ", need);
  auto seg = at::empty({2, int64_t(seg_bits.size())}, at::kLong);
  for (size_t s = 0; s < seg_bits.size(); ++s) {
    seg[0][s] = seg_bits[s];
    seg[1][s] = seg_rows[s];
  }
  auto gi = at::tensor(g_idx, at::kInt).to(dev);
  auto gm = at::tensor(gmap, at::kInt).to(dev);
  return {gi, seg, gm};
}

at::Tensor wq_check_perm_impl(const at::Tensor& perm, int64_t K) {
  const char* op = "lowbit.wq_check_perm";
  TORCH_CHECK(perm.defined() && !at::isFloatingType(perm.scalar_type()) && perm.numel() == K, op,
              ": q_perm must be an integer tensor of K=", K, " elements, got ",
              perm.defined() ? c10::toString(perm.scalar_type()) : "None", " of shape ",
              perm.defined() ? perm.sizes() : at::IntArrayRef{});
  auto v = host_ints(perm.reshape({-1}));
  if (perm.scalar_type() == at::kShort)
    for (auto& e : v) e &= 0xFFFF;  // BIE stores q_perm as int16 and reads it as uint16
  const bool all_zero = std::all_of(v.begin(), v.end(), [](int64_t e) { return e == 0; });
  bool identity = true;
  for (int64_t i = 0; i < K; ++i) identity = identity && v[i] == i;
  if ((all_zero && K > 1) || identity) return at::empty({0}, perm.options().dtype(at::kInt));
  std::vector<char> seen(K, 0);
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(v[i] >= 0 && v[i] < K, op, ": q_perm[", i, "] must be in [0, ", K, "), got ", v[i]);
    TORCH_CHECK(!seen[v[i]], op, ": q_perm is not a permutation: channel ", v[i], " appears twice (again at ", i, ")");
    seen[v[i]] = 1;
  }
  return at::tensor(std::vector<int32_t>(v.begin(), v.end()), at::kInt).to(perm.device());
}

at::Tensor wq_check_g_idx_impl(const at::Tensor& g_idx, int64_t K, int64_t groups) {
  const char* op = "lowbit.wq_check_g_idx";
  TORCH_CHECK(g_idx.defined() && !at::isFloatingType(g_idx.scalar_type()) && g_idx.numel() == K, op,
              ": g_idx must be an integer tensor of K=", K, " elements, got ",
              g_idx.defined() ? c10::toString(g_idx.scalar_type()) : "None", " of shape ",
              g_idx.defined() ? g_idx.sizes() : at::IntArrayRef{});
  const auto v = host_ints(g_idx.reshape({-1}));
  for (int64_t i = 0; i < K; ++i)
    TORCH_CHECK(v[i] >= 0 && v[i] < groups, op, ": g_idx[", i, "] must be in [0, ", groups, ") (groups = rows of scales), got ",
                v[i]);
  // A new tensor (the schema promises no alias of the input), int32 and contiguous.
  return g_idx.reshape({-1}).to(at::kInt, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

at::Tensor wq_permute_rows_impl(const at::Tensor& qweight, int64_t bits, const at::Tensor& rows) {
  const char* op = "lowbit.wq_permute_rows";
  TORCH_CHECK(rows.defined() && rows.dim() == 1 && !at::isFloatingType(rows.scalar_type()), op,
              ": rows must be a 1-D integer tensor");
  const int64_t K = rows.numel();
  const std::vector<int64_t> seg_bits{bits}, seg_rows{K};
  const auto codes = wq_unpack_impl(qweight, seg_bits, seg_rows);  // checks qweight against (bits, K)
  const auto idx = rows.to(codes.device(), at::kLong);
  TORCH_CHECK(K == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < K), op,
              ": rows must be in [0, ", K, ")");
  auto out = wq_pack_impl(codes.index_select(0, idx), seg_bits, seg_rows);
  if (out.size(0) < qweight.size(0))  // keep any extra word rows the input had (zero)
    out = at::cat({out, at::zeros({qweight.size(0) - out.size(0), out.size(1)}, out.options())});
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> wq_sort_groups_impl(const at::Tensor& qweight, const at::Tensor& g_idx,
                                                                   int64_t bits) {
  const char* op = "lowbit.wq_sort_groups";
  TORCH_CHECK(g_idx.defined() && g_idx.dim() == 1 && !at::isFloatingType(g_idx.scalar_type()), op,
              ": g_idx must be a 1-D integer tensor");
  const auto g = g_idx.to(at::kLong);
  const int64_t K = g.numel();
  if (K < 2 || (g.narrow(0, 1, K - 1) >= g.narrow(0, 0, K - 1)).all().item<bool>())
    return {qweight, g_idx, at::empty({0}, g_idx.options().dtype(at::kInt))};
  const auto perm = std::get<1>(g.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  return {wq_permute_rows_impl(qweight, bits, perm), g_idx.index_select(0, perm.to(g_idx.device())).to(at::kInt),
          perm.to(at::kInt).to(g_idx.device())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> wq_quantize_rtn(const at::Tensor& weight, int64_t bits,
                                                               int64_t group_size, c10::string_view mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::wq_quantize_rtn", "")
                       .typed<decltype(wq_quantize_rtn)>();
  return op.call(weight, bits, group_size, mode);
}

at::Tensor wq_pack(const at::Tensor& codes, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::wq_pack", "").typed<decltype(wq_pack)>();
  return op.call(codes, seg_bits, seg_rows);
}

TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) {
  m.impl("wq_permute_rows", &wq_permute_rows_impl);
  m.impl("wq_sort_groups", &wq_sort_groups_impl);
  m.impl("wq_pack", &wq_pack_impl);
  m.impl("wq_unpack", &wq_unpack_impl);
  m.impl("wq_pack_zeros", &wq_pack_zeros_impl);
  m.impl("wq_unpack_zeros", &wq_unpack_zeros_impl);
  m.impl("wq_quantize_rtn", &wq_quantize_rtn_impl);
  m.impl("wq_gba_decode", &wq_gba_decode_impl);
  m.impl("wq_mbwq_layout", &wq_mbwq_layout_impl);
  m.impl("wq_check_perm", &wq_check_perm_impl);
  m.impl("wq_check_g_idx", &wq_check_g_idx_impl);
}

}  // namespace lowbit::ops
