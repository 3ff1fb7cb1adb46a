// Argument checks shared by the CPU (csrc/kernels/cpu) and CUDA (csrc/kernels/cuda) entry points, so that
// both sides accept the same arguments and word their errors the same way. Private to the kernel library.
//
// Plain C++17, torch-free and CUDA-free: included from g++ translation units and from nvcc host code.
// Only pure argument rules live here (sizes, strides, null pointers, int64 overflow); a side's own extras
// stay with it (the CPU dereferences host scalars such as *alpha and *scale, which CUDA cannot; CUDA
// checks its grid limits). Not for the per-ISA files (*_avx512.cpp, *_avx2.cpp): see
// cpu/gemm_s8_internal.h for why they must not instantiate std::string.
//
// Every message is "<fn>: <what>", fn being the public name the call came in through.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/im2col.h"
#include "lowbit/kernels/lsq_grad.h"
#include "lowbit/kernels/quantize.h"

namespace lowbit {
namespace validate {

inline std::string err(const char* fn, const std::string& what) { return std::string(fn) + ": " + what; }

// "<fn>: <what>, got <got>"
inline Status invalid_got(const char* fn, const std::string& what, int64_t got) {
  return Status::invalid(err(fn, what + ", got " + std::to_string(got)));
}

// a * b, or false when it overflows int64.
inline bool mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// ---------------------------------------------------------------------------------------------------
// qat_prepare (lowbit/kernels/quantize.h): dtypes, non-null operands, 0 <= n < 2^62.
inline Status qat_prepare(const char* fn, ScalarArg shift, int64_t n, ScalarArg scale1, ScalarArg scale2,
                          ScalarArg eps, const float* out) {
  const std::pair<const char*, ScalarArg> args[] = {{"shift", shift}, {"scale1", scale1}, {"scale2", scale2},
                                                    {"eps", eps}};
  for (const auto& a : args) {
    const int32_t t = static_cast<int32_t>(a.second.dtype);
    if ((a.first != std::string("shift") || n > 0) && (t < 0 || t > 2))
      return invalid_got(fn, std::string(a.first) + " dtype must be float32, float16 or bfloat16", t);
  }
  if (n < 0 || n > (int64_t(1) << 62)) return invalid_got(fn, "n must be in [0, 2^62]", n);
  if (n > 0 && shift.p == nullptr) return Status::invalid(err(fn, "shift is null but n > 0"));
  if (scale1.p == nullptr || scale2.p == nullptr || eps.p == nullptr)
    return Status::invalid(err(fn, "scale1, scale2 and eps must not be null"));
  if (out == nullptr) return Status::invalid(err(fn, "out is null"));
  return Status::ok();
}

// quantize_s8 (lowbit/kernels/quantize.h). All but the value of *scale, which only the CPU can read
// (the caller checks it after an ok here, when M*K > 0).
inline Status quantize_s8(const char* fn, DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx,
                          const float* scale, int32_t qmin, int32_t qmax, const int8_t* q) {
  const int32_t xt = static_cast<int32_t>(xtype);
  if (xt < 0 || xt > 2) return invalid_got(fn, "xtype must be float32, float16 or bfloat16", xt);
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (K < 0) return invalid_got(fn, "K must be >= 0", K);
  if (ldx < 0) return invalid_got(fn, "ldx must be >= 0", ldx);
  if (M > 0 && ldx < K) return invalid_got(fn, "ldx must be >= K (" + std::to_string(K) + ")", ldx);
  if (qmin < -128) return invalid_got(fn, "qmin must be >= -128", qmin);
  if (qmax > 127) return invalid_got(fn, "qmax must be <= 127", qmax);
  if (qmin > qmax)
    return Status::invalid(
        err(fn, "qmin must be <= qmax, got qmin=" + std::to_string(qmin) + " qmax=" + std::to_string(qmax)));
  if (M == 0 || K == 0) return Status::ok();  // nothing to read or write
  if (x == nullptr) return Status::invalid(err(fn, "x is null but M*K > 0"));
  if (q == nullptr) return Status::invalid(err(fn, "q is null but M*K > 0"));
  if (scale == nullptr) return Status::invalid(err(fn, "scale is null"));
  // Every index formed is below M * max(K, ldx).
  if (M > std::numeric_limits<int64_t>::max() / std::max(K, ldx))
    return Status::invalid(err(fn, "M * max(K, ldx) overflows int64 (M=" + std::to_string(M) + ", K=" +
                                       std::to_string(K) + ", ldx=" + std::to_string(ldx) + ")"));
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// lsq_grad (lowbit/kernels/lsq_grad.h). All but the value of *step, which only the CPU can read. On ok,
// *total = outer * C * inner (no int64 overflow) and *wants = whether any output is requested.
inline Status lsq_grad(const char* fn, const LsqGradParams& p, int64_t* total, bool* wants) {
  const int32_t gt = static_cast<int32_t>(p.g_type), xt = static_cast<int32_t>(p.x_type);
  if (gt < 0 || gt > 2) return invalid_got(fn, "g_type must be float32, float16 or bfloat16", gt);
  if (xt < 0 || xt > 2) return invalid_got(fn, "x_type must be float32, float16 or bfloat16", xt);
  const int32_t st = static_cast<int32_t>(p.shift_out_type), ct = static_cast<int32_t>(p.scale_out_type);
  if (st < 0 || st > 2) return invalid_got(fn, "shift_out_type must be float32, float16 or bfloat16", st);
  if (ct < 0 || ct > 2) return invalid_got(fn, "scale_out_type must be float32, float16 or bfloat16", ct);
  if (p.outer < 0) return invalid_got(fn, "outer must be >= 0", p.outer);
  if (p.channels < 0) return invalid_got(fn, "channels must be >= 0", p.channels);
  if (p.inner < 0) return invalid_got(fn, "inner must be >= 0", p.inner);
  if (p.qmin < -128) return invalid_got(fn, "qmin must be >= -128", p.qmin);
  if (p.qmax > 127) return invalid_got(fn, "qmax must be <= 127", p.qmax);
  if (p.qmin > p.qmax)
    return Status::invalid(err(fn, "qmin must be <= qmax, got qmin=" + std::to_string(p.qmin) +
                                       " qmax=" + std::to_string(p.qmax)));
  if (p.grad_scale != nullptr) {
    if (p.qmax < 1) return invalid_got(fn, "qmax must be >= 1 when grad_scale is requested (1/sqrt(numel*qmax))", p.qmax);
    if (p.numel < 1) return invalid_got(fn, "numel must be >= 1 when grad_scale is requested (1/sqrt(numel*qmax))", p.numel);
  }
  int64_t n = 0;
  if (!mul(p.outer, p.channels, &n) || !mul(n, p.inner, &n))
    return Status::invalid(err(fn, "outer * channels * inner overflows int64 (outer=" + std::to_string(p.outer) +
                                       ", channels=" + std::to_string(p.channels) +
                                       ", inner=" + std::to_string(p.inner) + ")"));
  *total = n;
  *wants = p.grad_x != nullptr || p.grad_shift != nullptr || p.grad_scale != nullptr;
  if (!*wants || n == 0) return Status::ok();  // nothing is read
  if (p.g == nullptr) return Status::invalid(err(fn, "g is null but outer*channels*inner > 0"));
  if (p.x == nullptr) return Status::invalid(err(fn, "x is null but outer*channels*inner > 0"));
  if (p.step == nullptr) return Status::invalid(err(fn, "step is null"));
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// gemm_s8 (lowbit/kernels/gemm_s8.h). The pieces; each side calls them in its own order and checks
// pointers itself (the CPU reads *alpha; CUDA skips pointers whenever the output is empty).

inline Status gemm_otype(const char* fn, DType otype) {
  const int32_t v = static_cast<int32_t>(otype);
  if (v < 0 || v > 2) return invalid_got(fn, "otype must be float32, float16 or bfloat16", v);
  return Status::ok();
}

// A stride must cover its row whenever the matrix has rows, and is never negative.
inline Status gemm_ld(const char* fn, const char* name, int64_t ld, int64_t rows, int64_t row_len,
                      const char* row_len_name) {
  if (ld < 0) return invalid_got(fn, std::string(name) + " must be >= 0", ld);
  if (rows > 0 && ld < row_len)
    return invalid_got(fn, std::string(name) + " must be >= " + row_len_name + " (" + std::to_string(row_len) + ")",
                       ld);
  return Status::ok();
}

// M, N, K and the strides of the inputs A (M, K) and B (N, K).
inline Status gemm_shape(const char* fn, int64_t lda, int64_t ldb, int64_t M, int64_t N, int64_t K) {
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (N < 0) return invalid_got(fn, "N must be >= 0", N);
  if (K < 0) return invalid_got(fn, "K must be >= 0", K);
  if (K > kMaxGemmS8K) return invalid_got(fn, "K must be <= kMaxGemmS8K (" + std::to_string(kMaxGemmS8K) + ")", K);
  Status s = gemm_ld(fn, "lda", lda, M, K, "K");
  if (!s.is_ok()) return s;
  return gemm_ld(fn, "ldb", ldb, N, K, "K");
}

// The batch-level rules of gemm_s8_scaled_batched (batch == 1 with zero strides passes them all).
inline Status gemm_batch(const char* fn, int64_t strideA, int64_t strideB, int64_t M, int64_t N, int64_t batch,
                         DType otype, int64_t strideO) {
  if (batch < 0) return invalid_got(fn, "batch must be >= 0", batch);
  if (strideA < 0) return invalid_got(fn, "strideA must be >= 0", strideA);
  if (strideB < 0) return invalid_got(fn, "strideB must be >= 0", strideB);
  if (strideO < 0) return invalid_got(fn, "strideO must be >= 0", strideO);
  // strideO == 0 would make every batch write the same outputs: a race on CUDA, the last batch winning
  // on the CPU. Broadcasting is for inputs only.
  if (batch > 1 && M > 0 && N > 0 && strideO == 0)
    return Status::invalid(err(fn, "strideO must be > 0 when batch > 1 (batch = " + std::to_string(batch) +
                                       "): batches would overwrite one output"));
  // The last batch's base is ptr + (batch - 1) * stride (bytes for out: * element size); keep it in int64.
  if (batch > 1) {
    const int64_t last = batch - 1, big = std::numeric_limits<int64_t>::max();
    const int64_t osize = otype == DType::kFloat32 ? 4 : 2;
    if (strideA > big / last) return invalid_got(fn, "(batch - 1) * strideA overflows int64, strideA", strideA);
    if (strideB > big / last) return invalid_got(fn, "(batch - 1) * strideB overflows int64, strideB", strideB);
    if (strideO > big / last / osize)
      return invalid_got(fn, "(batch - 1) * strideO bytes overflow int64, strideO", strideO);
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// pack_s4 / unpack_s4 (lowbit/kernels/pack_int4.h), minus pack's code range (CPU only). `ld` is the row
// stride of the strided side (codes for pack, packed for unpack), `ld_min` its smallest legal value
// (`ld_rule` says what that is), `ld_name` its name in messages.
inline Status pack_unpack_s4(const char* fn, const void* in, const char* in_name, int64_t rows, int64_t K,
                             int64_t ld, const char* ld_name, int64_t ld_min, const char* ld_rule, const void* out,
                             const char* out_name) {
  if (rows < 0) return invalid_got(fn, "rows must be >= 0", rows);
  if (K < 0) return invalid_got(fn, "K must be >= 0", K);
  if (ld < 0) return invalid_got(fn, std::string(ld_name) + " must be >= 0", ld);
  if (rows > 0 && ld < ld_min)
    return invalid_got(fn, std::string(ld_name) + " must be >= " + std::to_string(ld_min) + " (" + ld_rule + ")", ld);
  if (rows == 0 || K == 0) return Status::ok();  // nothing is read or written: null pointers are fine
  if (in == nullptr) return Status::invalid(err(fn, std::string(in_name) + " is null but rows*K > 0"));
  if (out == nullptr) return Status::invalid(err(fn, std::string(out_name) + " is null but rows*K > 0"));
  // Every address formed is below rows * max(ld, K): make sure that fits int64.
  if (rows > std::numeric_limits<int64_t>::max() / std::max(ld, K))
    return Status::invalid(err(fn, "rows * max(K, " + std::string(ld_name) + ") overflows int64 (rows=" +
                                       std::to_string(rows) + ", K=" + std::to_string(K) + ", " + ld_name + "=" +
                                       std::to_string(ld) + ")"));
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// im2col_s8_nhwc (lowbit/kernels/im2col.h): the contract's checks, plus int64 overflow of every size the
// kernels form. Ho and Wo are computed here from a non-negative numerator: Conv2dShape::out_h() is only
// meaningful after this check.
struct Im2colDims {
  int64_t Ho = 0, Wo = 0;   // output spatial size
  int64_t x_len = 0;        // N*H*W*C
  int64_t cols_len = 0;     // N*Ho*Wo*kh*kw*Cg
  int64_t padded_max = 0;   // max(H + 2ph, W + 2pw): bounds every tap coordinate
};

inline Status im2col_s8_nhwc(const char* fn, const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg,
                             const int8_t* cols, Im2colDims* dims) {
  const std::pair<const char*, int64_t> positive[] = {{"N", s.N}, {"H", s.H}, {"W", s.W}, {"C", s.C},
                                                      {"kh", s.kh}, {"kw", s.kw}, {"sh", s.sh}, {"sw", s.sw},
                                                      {"dh", s.dh}, {"dw", s.dw}, {"Cg", Cg}};
  for (const auto& v : positive)
    if (v.second < 1) return Status::invalid(err(fn, std::string(v.first) + " must be >= 1, got " + std::to_string(v.second)));
  if (s.ph < 0) return Status::invalid(err(fn, "ph must be >= 0, got " + std::to_string(s.ph)));
  if (s.pw < 0) return Status::invalid(err(fn, "pw must be >= 0, got " + std::to_string(s.pw)));
  if (c0 < 0) return Status::invalid(err(fn, "c0 must be >= 0, got " + std::to_string(c0)));
  if (c0 > s.C - Cg)
    return Status::invalid(err(fn, "c0 + Cg must be <= C (" + std::to_string(s.C) + "), got c0=" +
                                       std::to_string(c0) + " Cg=" + std::to_string(Cg)));
  // Extent of the padded image and of the dilated kernel, per axis.
  const int64_t ext_in[2] = {s.H, s.W}, pad[2] = {s.ph, s.pw}, k[2] = {s.kh, s.kw}, d[2] = {s.dh, s.dw},
                st[2] = {s.sh, s.sw};
  int64_t out[2], padded_max = 0;
  for (int i = 0; i < 2; ++i) {
    const char* ax = i == 0 ? "H" : "W";
    int64_t padded = 0, span = 0;
    // Every tap coordinate the kernel forms (p*stride - pad + a*dilation) lies in [-pad, padded), so
    // these two not overflowing keeps all index arithmetic in range.
    if (!mul(pad[i], 2, &padded) || __builtin_add_overflow(padded, ext_in[i], &padded) ||
        !mul(d[i], k[i] - 1, &span))
      return Status::invalid(err(fn, std::string("the padded ") + ax + " extent or the dilated kernel overflows int64"));
    if (padded - span - 1 < 0)
      return Status::invalid(err(fn, std::string("the dilated kernel (") + std::to_string(span + 1) +
                                         ") is larger than the padded input (" + std::to_string(padded) + ") along " +
                                         ax + ": no output (" + (i == 0 ? "Ho" : "Wo") + " < 1)"));
    out[i] = (padded - span - 1) / st[i] + 1;
    padded_max = std::max(padded_max, padded);
  }
  int64_t x_len = 0, rows = 0, row_len = 0, cols_len = 0;
  if (!mul(s.N, s.H, &x_len) || !mul(x_len, s.W, &x_len) || !mul(x_len, s.C, &x_len))
    return Status::invalid(err(fn, "N*H*W*C overflows int64"));
  if (!mul(s.N, out[0], &rows) || !mul(rows, out[1], &rows) || !mul(s.kh, s.kw, &row_len) ||
      !mul(row_len, Cg, &row_len) || !mul(rows, row_len, &cols_len))
    return Status::invalid(err(fn, "N*Ho*Wo*kh*kw*Cg overflows int64"));
  if (x == nullptr) return Status::invalid(err(fn, "x is null"));
  if (cols == nullptr) return Status::invalid(err(fn, "cols is null"));
  dims->Ho = out[0];
  dims->Wo = out[1];
  dims->x_len = x_len;
  dims->cols_len = cols_len;
  dims->padded_max = padded_max;
  return Status::ok();
}

}  // namespace validate
}  // namespace lowbit
