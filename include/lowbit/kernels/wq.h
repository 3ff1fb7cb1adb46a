// Weight-only quantized matrices ("wq"): the one runtime form that every weight-only checkpoint format
// (GPTQ, GBA asym, GBA sym with double quantization, MBWQ layer-mix and channel-mix; docs/formats.md) is
// brought into by the layers' prepare step, and the kernels that multiply by it.
//
// Logical weight W: (K, N), K input channels in ORIGINAL order, N outputs.   y[m, n] = sum_k x'[m, k] W[k, n]
// with x'[m, k] = x[m, k] * channel_scale[k] (fp32), plus bias[n] when given.
//
// Stored form (WqWeight below):
// * Stored rows r = 0..K-1. Stored row r holds original channel perm[r] (perm: int32 permutation of 0..K-1,
//   or null = identity).
// * The stored rows form 1..6 contiguous SEGMENTS; segment s has width bits[s] in {1, 2, 3, 4, 5, 6, 8}
//   and covers rows [row_end[s-1], row_end[s]) (row_end[-1] = 0, row_end[nseg-1] = K). Every segment but
//   the last has a length that is a multiple of 32.
// * qweight: (qrows, N) uint32 words, row-major, row stride N. A segment is a run of 32-row CHUNKS; a chunk
//   of width b occupies b consecutive word rows (chunk c of the segment: word rows q0 + c*b .. q0 + c*b + b-1,
//   q0 = sum over earlier segments of ceil(len / 32) * bits). For column n, concatenate the chunk's b words
//   little-endian (w0 = bits 0..31, w1 = bits 32..63, ...): row j (0..31) of the chunk has the unsigned code
//   q = bits [j*b, j*b + b). For b in {1, 2, 4, 8} this is GPTQ's row packing (row k in word k / (32/b), bits
//   (k % (32/b)) * b, LSB first); for 3, 5, 6 it is exllamav2's EXL2 layout. The last chunk of the last segment
//   may be partial: rows past K are padding, their bits are ignored. qrows >= the word rows the segments use.
// * Group of stored row r: g = g_idx[r] in [0, groups) (int32, stored order; any pattern, e.g. GPTQ act-order).
//   scales, zeros: (groups, N), row-major, row stride N, dtype sdtype.
// * Dequantized value, in fp32, the same expression on CPU and CUDA:
//     sym  (asym == false): w = fmaf(s, float(q), -z)      (z in weight units: GBA sym, MBWQ, MLX)
//     asym (asym == true):  w = s * (float(q) - z)         (z = integer zero point as a float: GPTQ, GBA asym)
//   with s = scales[g, n], z = zeros[g, n] converted to fp32. W[perm[r], n] = w.
//
// Kernels:
// * wq_matmul: out (M, N) = x' W (+ bias), x (M, K) row stride ldx, dtype xtype; out row stride ldo, same dtype
//   as x; bias (N,) of dtype sdtype or null. fp32 accumulation; the result is rounded once to the output dtype.
//   Deterministic (fixed reduction order, no float atomics) for a given device and shape. The reduction order
//   differs between CPU and CUDA, so they agree to fp32 rounding, not bitwise (tests: rtol 1e-5 on the fp32
//   result relative to sum |x'| |W|).
// * wq_dequantize: dense W[:, n0:n1] in original channel order into out (K, n1 - n0), row stride ldo, dtype
//   otype, each element rounded once from the fp32 w above. channel_scale is NOT applied (BIE's q42fp_weight).
//
// Indices: the CPU entry points check every g_idx and perm entry (a bad one is kInvalidArgument before
// anything is written; perm must be a permutation). CUDA cannot report data errors without a host sync, so
// its kernels clamp g_idx into [0, groups) and perm into [0, K): a corrupted index can never read or write
// out of bounds. The layers validate both once at prepare time (on the host), so a layer never feeds either
// kernel a bad index.
#pragma once
#include <cstddef>

#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

constexpr int kWqMaxSegments = 6;

// True for the widths a segment may have: 1, 2, 3, 4, 5, 6, 8.
constexpr bool wq_bits_supported(int32_t b) { return (b >= 1 && b <= 6) || b == 8; }

struct WqWeight {
  int64_t K = 0;                       // input channels (stored rows)
  int64_t N = 0;                       // outputs (columns)
  const uint32_t* qweight = nullptr;   // (qrows, N)
  int64_t qrows = 0;
  int32_t nseg = 0;                    // 1..kWqMaxSegments
  int32_t bits[kWqMaxSegments] = {};   // width of each segment
  int64_t row_end[kWqMaxSegments] = {};  // exclusive end row of each segment; row_end[nseg-1] == K
  const int32_t* g_idx = nullptr;      // (K,) group of each stored row
  int64_t groups = 0;                  // rows of scales / zeros
  const void* scales = nullptr;        // (groups, N), sdtype
  const void* zeros = nullptr;         // (groups, N), sdtype
  DType sdtype = DType::kFloat16;
  bool asym = false;                   // see the dequantized value above
  const int32_t* perm = nullptr;       // (K,) stored row -> original channel, or null (identity)
  const void* channel_scale = nullptr;  // (K,) original order, sdtype, or null (all ones)
  // Tensor-core permission (CUDA wq_matmul only; the CPU ignores it). When true, x has dtype sdtype and
  // sdtype is float16 or bfloat16, the kernel may round x' = x * c once to that 16-bit type and multiply
  // on tensor cores (fp32 accumulation). Today: every segment 2 or 4 bits and 1 <= M <= 64 (mma.sync
  // m16n8k16, wq_tc.cu); on a cc 9.0 device, with N % 4 == 0 and 16-byte aligned words, also any M >= 17
  // (wgmma, wq_wg.cu; per-row formula below for every k-block; from M = 65 with N % 8 == 0 and 16-byte
  // aligned words, scales and zeros, its TMA-fed variant wq_wgt.cu, same formula).
  // It multiplies the integer codes (as c + q, c a power of two, the c * sum x' offsets subtracted per group)
  // and applies each group's (s, z) to the fp32 sums of that group
  // (sym: s * sum x'q - z * sum x'; asym: s * (sum x'q - z * sum x')) where a 4-row x 32/b-code block of
  // words lies in one group, and otherwise dequantizes w16 = rne16(s * q - z) (sym) / rne16(s * (q - z))
  // (asym) per row. Results then differ from the fp32 definition by the 16-bit rounding of x' (and w16)
  // and the changed summation order (tests: 2^-11 (fp16) or 2^-8 (bf16) times sum |x'||W| on top of the
  // fp32 tolerance).
  bool allow_half = false;
};

// Word rows the segments of `w` use: sum over segments of ceil(len / 32) * bits. 0 when the segment
// description is invalid (wq_validate says why).
int64_t wq_packed_rows(const WqWeight& w);

// The argument rules shared by every entry point (sizes, segment description, null pointers, overflow).
// Reads no tensor data. "fn: what, got value" messages.
Status wq_validate(const char* fn, const WqWeight& w);

// wq_validate plus the rules of a wq_matmul call (M >= 0, ldx >= K, ldo >= N, dtypes, null pointers).
Status wq_validate_matmul(const char* fn, const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx,
                          const void* out, int64_t ldo);

// wq_validate plus the rules of a wq_dequantize call (0 <= n0 <= n1 <= N, ldo >= n1 - n0, otype, out).
Status wq_validate_dequantize(const char* fn, const WqWeight& w, int64_t n0, int64_t n1, DType otype,
                              const void* out, int64_t ldo);

namespace cpu {

// x, out, bias, and every pointer in w are host pointers. OpenMP; AVX-512 / AVX2 picked at run time.
Status wq_matmul(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo);

// Scalar reference: single thread, stored rows in increasing order, acc += x'[m, perm[r]] * w in fp32.
Status wq_matmul_ref(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias,
                     void* out, int64_t ldo);

Status wq_dequantize(const WqWeight& w, int64_t n0, int64_t n1, DType otype, void* out, int64_t ldo);

// Packing of unsigned codes into the segment layout above (and back), for writers of checkpoints and
// tests. codes: (K, N) int32 row-major, code of stored row r in [0, 2^bits of r's segment) (checked:
// a code outside is kInvalidArgument, nothing written). qweight: (qrows, N) with qrows >= the word rows
// the segments use; word rows past those, and the padding bits of a partial last chunk, are written 0.
// Only w.K, w.N, w.nseg, w.bits, w.row_end, w.qrows are read from the descriptor.
Status wq_pack_codes(const WqWeight& layout, const int32_t* codes, uint32_t* qweight);
Status wq_unpack_codes(const WqWeight& layout, const uint32_t* qweight, int32_t* codes);

}  // namespace cpu

namespace cuda {

// Bytes of device workspace wq_matmul needs for this weight and M on the current device (split-K partial
// sums); 0 when it needs none. Queries the device's multiprocessor count (no sync).
Status wq_matmul_workspace(const WqWeight& w, int64_t M, size_t* bytes);

// Device pointers; runs on `stream`; allocates nothing. workspace: at least wq_matmul_workspace bytes
// (may be null when that is 0), 16-byte aligned, contents ignored. Capturable in a CUDA graph.
Status wq_matmul(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo, void* workspace, size_t workspace_bytes, CUstream_st* stream);

Status wq_dequantize(const WqWeight& w, int64_t n0, int64_t n1, DType otype, void* out, int64_t ldo,
                     CUstream_st* stream);

// Whether wq_matmul takes the tensor-core path for this call (see WqWeight::allow_half).
bool wq_matmul_uses_tensor_cores(const WqWeight& w, DType xtype, int64_t M);

// The largest M up to which wq_matmul's tensor-core kernels are expected to beat dequantizing the weight
// in column tiles and multiplying with a dense tensor-core GEMM, for this weight and x dtype on the
// current device (H100 measurements, docs/PERFORMANCE.md); 0 when no tensor-core kernel takes the weight.
// Advice for callers that have both paths (the wq_linear op); wq_matmul itself serves any M.
int64_t wq_matmul_fused_max_rows(const WqWeight& w, DType xtype);

}  // namespace cuda
}  // namespace lowbit
