// int8 x int8 GEMM, generic translation unit: argument validation, the scalar references, the portable
// OpenMP fallback, CPU-feature dispatch, the workspace for the SIMD kernels, and the batched form.
//
// Contract (gemm_s8.h): out[i, j] = to_otype(float(acc) * alpha), acc = sum_k A[i*lda + k] * B[j*ldb + k]
// exact in int32 (K <= kMaxGemmS8K keeps every sum in range). The references accumulate in uint32, i.e.
// mod 2^32 like the SIMD instructions, which keeps signed overflow out of the picture without a wider type.
// Built without ISA flags: everything here runs on any x86-64.
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/pack_int4.h"

#include <omp.h>

#include <cmath>
#include <memory>
#include <new>
#include <string>

#include "../validate.h"
#include "gemm_s8_internal.h"
#include "cpu_features.h"
#include "lowbit/kernels/float_convert.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

// The shape rules (validate::gemm_shape) and the pointers of A and B, which are read whenever their
// matrix has elements.
Status check_gemm_common(const char* fn, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M,
                         int64_t N, int64_t K) {
  Status s = validate::gemm_shape(fn, lda, ldb, M, N, K);
  if (!s.is_ok()) return s;
  if (A == nullptr && M > 0 && K > 0) return Status::invalid(std::string(fn) + ": A is null but M*K > 0");
  if (B == nullptr && N > 0 && K > 0) return Status::invalid(std::string(fn) + ": B is null but N*K > 0");
  return Status::ok();
}

Status check_scaled(const char* fn, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M,
                    int64_t N, int64_t K, const float* alpha, DType otype, const void* out, int64_t ldo) {
  Status s = check_gemm_common(fn, A, lda, B, ldb, M, N, K);
  if (!s.is_ok()) return s;
  s = validate::gemm_otype(fn, otype);
  if (!s.is_ok()) return s;
  s = validate::gemm_ld(fn, "ldo", ldo, M, N, "N");
  if (!s.is_ok()) return s;
  if (M > 0 && N > 0) {
    if (out == nullptr) return Status::invalid(std::string(fn) + ": out is null but M*N > 0");
    if (alpha == nullptr) return Status::invalid(std::string(fn) + ": alpha is null");
    // A non-finite alpha is not an error: float(acc) * alpha gives inf / NaN outputs, exactly as the
    // CUDA kernels (which never read alpha on the host) do. The QAT layers rely on it (qat_alpha).
  }
  return Status::ok();
}

// Batched arguments: the batch-level rules first, then the per-batch ones of check_scaled (which every
// batch shares, so one check covers them all).
Status check_batched(const char* fn, const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                     int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch, const float* alpha,
                     DType otype, const void* out, int64_t ldo, int64_t strideO) {
  Status s = validate::gemm_batch(fn, strideA, strideB, M, N, batch, otype, strideO);
  if (!s.is_ok()) return s;
  if (batch == 0) {
    // Nothing is read or written, so pointers may be null; the shape rules still apply. Stand-ins that
    // pass the pointer checks of check_scaled (it dereferences only alpha).
    static const int8_t any_s8 = 0;
    static const float any_alpha = 1.0f;
    static float any_out = 0.0f;
    return check_scaled(fn, &any_s8, lda, &any_s8, ldb, M, N, K, &any_alpha, otype, &any_out, ldo);
  }
  return check_scaled(fn, A, lda, B, ldb, M, N, K, alpha, otype, out, ldo);
}

inline int32_t dot_s8_wrap(const int8_t* a, const int8_t* b, int64_t K) {
  uint32_t acc = 0;  // unsigned: wraps mod 2^32 exactly like vpdpbusd / vpaddd
  for (int64_t k = 0; k < K; ++k) acc += uint32_t(int32_t(a[k]) * int32_t(b[k]));
  return int32_t(acc);
}

inline void store_one(DType t, void* out, int64_t idx, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(out)[idx] = v; break;
    case DType::kFloat16: static_cast<uint16_t*>(out)[idx] = float_to_half(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(out)[idx] = float_to_bf16(v); break;
  }
}

void scaled_rows(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t i0, int64_t i1, int64_t N,
                 int64_t K, float alpha, DType otype, void* out, int64_t ldo, const float* row_scale = nullptr) {
  for (int64_t i = i0; i < i1; ++i) {
    const float ai = row_alpha(alpha, row_scale, i);
    for (int64_t j = 0; j < N; ++j)
      store_one(otype, out, i * ldo + j, float(dot_s8_wrap(A + i * lda, B + j * ldb, K)) * ai);
  }
}

GemmS8Isa detect_isa() {
  // Every flag a per-ISA file is compiled with must be present (cpu_features.h).
  const bool avx2 = cpu_has_avx2_set();
  const bool avx512 = cpu_has_avx512_set();
  if (avx512) return __builtin_cpu_supports("avx512vnni") ? GemmS8Isa::kAvx512vnni : GemmS8Isa::kAvx512bw;
  return avx2 ? GemmS8Isa::kAvx2 : GemmS8Isa::kScalar;
}

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t(1) << 18;

// Batched: below this many multiply-adds per batch, whole batches go to threads (one single-threaded
// GEMM each). Such a GEMM has too few register tiles to keep every core busy, and running it on all
// threads pays a fork / join (and a workspace allocation) per batch; one batch per thread pays one
// fork / join in all, and each thread's A, B and packed panels stay in its own cache. Above it, one
// GEMM already has enough tiles for all threads, and batch-parallel runs would multiply the packing
// buffers by the thread count for no gain.
constexpr int64_t kBatchParallelMaxMacs = int64_t(1) << 24;

size_t out_esize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Base of batch b. A and B may be null when K == 0 (nothing is read); offsetting null is undefined
// behaviour, so it stays null.
inline const int8_t* batch_ptr(const int8_t* p, int64_t b, int64_t stride) { return p ? p + b * stride : p; }

}  // namespace

GemmS8Isa gemm_s8_best_isa() {
  static const GemmS8Isa isa = detect_isa();
  return isa;
}

const char* gemm_s8_isa_name(GemmS8Isa isa) {
  switch (isa) {
    case GemmS8Isa::kAvx512vnni: return "avx512_vnni";
    case GemmS8Isa::kAvx512bw: return "avx512bw";
    case GemmS8Isa::kAvx2: return "avx2";
    case GemmS8Isa::kScalar: return "scalar";
  }
  return "scalar";
}

Status gemm_s8_scaled_isa(GemmS8Isa isa, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M,
                          int64_t N, int64_t K, const float* alpha, DType otype, void* out, int64_t ldo,
                          int nthreads, const float* row_scale) {
  const char* fn = "gemm_s8_scaled";
  Status s = check_scaled(fn, A, lda, B, ldb, M, N, K, alpha, otype, out, ldo);
  if (!s.is_ok()) return s;
  if (M == 0 || N == 0) return Status::ok();
  if (int32_t(isa) > int32_t(gemm_s8_best_isa()))
    return Status::invalid(std::string(fn) + ": ISA " + gemm_s8_isa_name(isa) + " not supported by this CPU");

  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (double(M) * double(N) * double(K > 0 ? K : 1) < double(kParallelMinMacs)) nt = 1;
  const float al = *alpha;

  if (isa == GemmS8Isa::kScalar || K == 0) {
    // K == 0 needs no packing: every output is float(0) * alpha (-0 for negative alpha).
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < M; ++i) scaled_rows(A, lda, B, ldb, i, i + 1, N, K, al, otype, out, ldo, row_scale);
    return Status::ok();
  }

  GemmS8Args args{A, lda, B, ldb, M, N, K, al, otype, out, ldo, row_scale};
  const bool avx512 = isa == GemmS8Isa::kAvx512vnni || isa == GemmS8Isa::kAvx512bw;
  const bool vnni = isa == GemmS8Isa::kAvx512vnni;
  const size_t bytes = avx512 ? gemm_s8_avx512_workspace_bytes(args, vnni, nt) : gemm_s8_avx2_workspace_bytes(args, nt);
  std::unique_ptr<char[]> buf(new (std::nothrow) char[bytes + 64]);
  if (!buf) return Status::invalid(std::string(fn) + ": cannot allocate workspace of " + std::to_string(bytes) + " bytes");
  void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
  if (avx512)
    gemm_s8_avx512(args, vnni, ws, nt);
  else
    gemm_s8_avx2(args, ws, nt);
  return Status::ok();
}

Status gemm_s8_scaled_batched_isa(GemmS8Isa isa, const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B,
                                  int64_t ldb, int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch,
                                  const float* alpha, DType otype, void* out, int64_t ldo, int64_t strideO,
                                  int nthreads, GemmS8BatchSplit split) {
  const char* fn = "gemm_s8_scaled_batched";
  Status s = check_batched(fn, A, lda, strideA, B, ldb, strideB, M, N, K, batch, alpha, otype, out, ldo, strideO);
  if (!s.is_ok()) return s;
  if (batch == 0 || M == 0 || N == 0) return Status::ok();
  if (int32_t(isa) > int32_t(gemm_s8_best_isa()))
    return Status::invalid(std::string(fn) + ": ISA " + gemm_s8_isa_name(isa) + " not supported by this CPU");

  const size_t es = out_esize(otype);
  // One batch = gemm_s8_scaled_isa on offset pointers: the same code as the unbatched call, hence the
  // same bits (every path is bitwise equal to the reference, whatever its thread count).
  auto one = [&](int64_t b, int nt) {
    return gemm_s8_scaled_isa(isa, batch_ptr(A, b, strideA), lda, batch_ptr(B, b, strideB), ldb, M, N, K, alpha, otype,
                              static_cast<char*>(out) + size_t(b * strideO) * es, ldo, nt);
  };

  const int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  const double macs = double(M) * double(N) * double(K > 0 ? K : 1);
  const bool over_batches = split == GemmS8BatchSplit::kOverBatches ||
                            (split == GemmS8BatchSplit::kAuto && batch > 1 && nt > 1 &&
                             macs < double(kBatchParallelMaxMacs));
  if (!over_batches) {
    for (int64_t b = 0; b < batch; ++b) {
      s = one(b, nt);
      if (!s.is_ok()) return s;
    }
    return Status::ok();
  }

  // Each batch on one thread (its inner GEMM opens no parallel region: nthreads == 1). Arguments are
  // validated, so the only possible failure is a workspace allocation; keep the first one.
  const int team = int(batch < nt ? batch : nt);
  bool failed = false;
  Status first_error = Status::ok();
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (int64_t b = 0; b < batch; ++b) {
    Status sb = one(b, 1);
    if (!sb.is_ok()) {
#pragma omp critical(lowbit_gemm_s8_batched_error)
      if (!failed) {
        failed = true;
        first_error = sb;
      }
    }
  }
  return failed ? first_error : Status::ok();
}

}  // namespace detail

Status gemm_s8_scaled(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N, int64_t K,
                      const float* alpha, DType otype, void* out, int64_t ldo) {
  return detail::gemm_s8_scaled_isa(detail::gemm_s8_best_isa(), A, lda, B, ldb, M, N, K, alpha, otype, out, ldo);
}

Status gemm_s8s4_scaled(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                        int64_t K, const float* alpha, DType otype, void* out, int64_t ldo) {
  const char* fn = "lowbit::cpu::gemm_s8s4_scaled";
  // The int8 GEMM's rules on everything but B (whose stand-in stride K passes them), then B's own.
  Status s = detail::check_scaled(fn, A, lda, Bp, K, M, N, K, alpha, otype, out, ldo);
  if (s.is_ok()) s = validate::gemm_ld(fn, "ldbp", ldbp, N, packed_s4_cols(K), "ceil(K/2)");
  if (!s.is_ok()) return s;
  if (M == 0 || N == 0) return Status::ok();
  // One unpacked copy of B (N x K bytes), then the int8 GEMM: the same bits by construction.
  std::unique_ptr<int8_t[]> codes(new (std::nothrow) int8_t[size_t(N) * size_t(K > 0 ? K : 1)]);
  if (!codes) return Status::invalid(validate::err(fn, "out of memory for the unpacked weights"));
  s = unpack_s4(Bp, N, K, ldbp, codes.get());
  if (!s.is_ok()) return s;
  return gemm_s8_scaled(A, lda, codes.get(), K, M, N, K, alpha, otype, out, ldo);
}

Status gemm_s8_scaled_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                          int64_t K, const float* alpha, DType otype, void* out, int64_t ldo) {
  return gemm_s8_scaled_rows_ref(A, lda, B, ldb, M, N, K, alpha, nullptr, otype, out, ldo);
}

Status gemm_s8_scaled_rows(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                           int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                           int64_t ldo) {
  return detail::gemm_s8_scaled_isa(detail::gemm_s8_best_isa(), A, lda, B, ldb, M, N, K, alpha, otype, out, ldo, 0,
                                    row_scale);
}

Status gemm_s8_scaled_rows_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                               int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                               int64_t ldo) {
  Status s = detail::check_scaled("gemm_s8_scaled_ref", A, lda, B, ldb, M, N, K, alpha, otype, out, ldo);
  if (!s.is_ok()) return s;
  if (M == 0 || N == 0) return Status::ok();
  detail::scaled_rows(A, lda, B, ldb, 0, M, N, K, *alpha, otype, out, ldo, row_scale);
  return Status::ok();
}

Status gemm_s8_scaled_batched(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                              int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch, const float* alpha,
                              DType otype, void* out, int64_t ldo, int64_t strideO) {
  return detail::gemm_s8_scaled_batched_isa(detail::gemm_s8_best_isa(), A, lda, strideA, B, ldb, strideB, M, N, K,
                                            batch, alpha, otype, out, ldo, strideO);
}

Status gemm_s8_scaled_batched_ref(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                                  int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch,
                                  const float* alpha, DType otype, void* out, int64_t ldo, int64_t strideO) {
  Status s = detail::check_batched("gemm_s8_scaled_batched_ref", A, lda, strideA, B, ldb, strideB, M, N, K, batch,
                                   alpha, otype, out, ldo, strideO);
  if (!s.is_ok()) return s;
  if (batch == 0 || M == 0 || N == 0) return Status::ok();
  const size_t es = detail::out_esize(otype);
  for (int64_t b = 0; b < batch; ++b)
    detail::scaled_rows(detail::batch_ptr(A, b, strideA), lda, detail::batch_ptr(B, b, strideB), ldb, 0, M, N, K,
                        *alpha, otype, static_cast<char*>(out) + size_t(b * strideO) * es, ldo);
  return Status::ok();
}

Status gemm_s8s8s32_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N, int64_t K,
                        int32_t* C, int64_t ldc) {
  const char* fn = "gemm_s8s8s32_ref";
  Status s = detail::check_gemm_common(fn, A, lda, B, ldb, M, N, K);
  if (!s.is_ok()) return s;
  s = validate::gemm_ld(fn, "ldc", ldc, M, N, "N");
  if (!s.is_ok()) return s;
  if (C == nullptr && M > 0 && N > 0) return Status::invalid(std::string(fn) + ": C is null but M*N > 0");
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = detail::dot_s8_wrap(A + i * lda, B + j * ldb, K);
  return Status::ok();
}

const char* gemm_s8_isa() { return detail::gemm_s8_isa_name(detail::gemm_s8_best_isa()); }

}  // namespace cpu
}  // namespace lowbit
