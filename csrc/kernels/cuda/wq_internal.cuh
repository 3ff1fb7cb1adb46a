// Private interface between the two CUDA units of wq_matmul (include/lowbit/kernels/wq.h):
//   wq_matmul.cu  the CUDA-core kernel (any width, any dtype), wq_dequantize, the split-K reduce kernel,
//                 the public entry points and the choice of path;
//   wq_tc.cu      the tensor-core kernel (WqWeight::allow_half, 2- and 4-bit segments, M <= 64);
//   wq_wg.cu      the warpgroup (wgmma, sm_90a) kernel for larger M (2- and 4-bit segments, a launch each).
// Device helpers both kernels use and the host hooks between the units. Nothing here is public API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/wq.h"

namespace lowbit {
namespace cuda {
namespace wq_detail {

// ---------------------------------------------------------------------------------------------------
// Device helpers. dt: 0 fp32, 1 fp16, 2 bf16 (the DType values).

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 ld_stream_v4(const uint32_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_stream(const uint32_t* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// The raw bits of element i (16-bit types zero-extended). Conversion is separate so that a prefetched
// value is not touched until it is needed.
__device__ __forceinline__ uint32_t load_raw(const void* base, int64_t i, int dt) {
  if (dt == 0) return __ldg(static_cast<const unsigned int*>(base) + i);
  return __ldg(static_cast<const unsigned short*>(base) + i);
}
__device__ __forceinline__ float raw_to_float(uint32_t raw, int dt) {
  if (dt == 0) return __uint_as_float(raw);
  if (dt == 1) return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
  return __uint_as_float(raw << 16);  // bf16 -> fp32 is exact
}
__device__ __forceinline__ void store_out(void* out, int64_t i, int dt, float v) {
  if (dt == 0)
    static_cast<float*>(out)[i] = v;
  else if (dt == 1)
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------------
// Host hooks.

struct DeviceInfo {
  int sms = 1;
  int major = 0;
};

// Multiprocessor count and compute capability of the current device (cached per device; no sync).
Status device_info(const char* fn, DeviceInfo* info);

// Ok, or the pending launch error (cleared) as a device Status "fn: what: <CUDA error>".
Status launch_error(const char* fn, const char* what);

// Ok, or why the caller's workspace (wq_matmul_workspace bytes) cannot take `need` bytes: null, too small
// or not 16-byte aligned.
Status check_workspace(const char* fn, const void* workspace, size_t workspace_bytes, size_t need);

// Sums `slots` fp32 partial results ws[slot][M][N] in slot order, adds bias (dtype sdt) and rounds once
// into out (dtype odt, row stride ldo). A programmatic dependent launch on sm_90+ (the kernels before it
// call pdl_trigger()).
Status launch_reduce(const char* fn, const DeviceInfo& dev, cudaStream_t stream, const float* ws, int64_t slots,
                     int64_t M, int64_t N, const void* bias, int sdt, void* out, int odt, int64_t ldo);

// wq_tc.cu. Whether the tensor-core kernel takes this call (xtype null: not known yet, that condition is
// skipped); the workspace it needs (bytes, for any x stride and alignment); and the call itself, for a
// validated weight and call with M >= 1, N >= 1.
bool tc_eligible(const WqWeight& w, int64_t M, const DType* xtype);
Status tc_workspace(const char* fn, const WqWeight& w, int64_t M, int sms, size_t* bytes);
Status tc_matmul(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo, void* workspace, size_t workspace_bytes, const DeviceInfo& dev,
                 cudaStream_t stream);

// The warpgroup kernel's k order (wq_wg.cu): within each 64-row k-block, k-slot 16 s + k (wgmma k-step s,
// k = 2t + 8h + e of the A fragment of lane quad position t) holds the stored row that lane t decodes
// for it from its own words: 4-bit (words 2t, 2t + 1 of 8 rows each; pair s of word 2t + h is rows (s,
// s + 4)): 16t + 8h + s + 4e; 2-bit (word t of 16 rows; pair 2s + h is rows (2s + h, 2s + h + 8)):
// 16t + 2s + h + 8e.
__host__ __device__ __forceinline__ int wg_slot_row(int bits, int slot) {
  const int s = slot >> 4, k = slot & 15, t = (k & 7) >> 1, h = k >> 3, e = k & 1;
  return bits == 4 ? 16 * t + 8 * h + s + 4 * e : 16 * t + 2 * s + h + 8 * e;
}

// x' = x[:, perm] * channel_scale rounded once to the scales' 16-bit dtype for the w.K stored rows, padded
// with zeros to kp (a multiple of 8; of 64 when order != 0) columns, into out (M x kp, 16-byte aligned).
// The tensor-core kernels' prep pass. order 0: stored-row order; 2 / 4: the warpgroup kernel's k-slot
// order (wg_slot_row). k_in: x's input channels (perm entries are clamped into [0, k_in); a segment's
// view has fewer stored rows than that).
Status tc_prep_x(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, int64_t kp, int order,
                 int64_t k_in, void* out, const DeviceInfo& dev, cudaStream_t stream);

// wq_wg.cu (sm_90a). The warpgroup kernel for M >= wg_min_rows() (17; LOWBIT_WQ_WG_MIN_ROWS overrides it,
// read once): segments of 2 or 4 bits, N % 4 == 0, 16-byte aligned words, on a cc 9.0 device with its
// sm_90a code. Same contract as the tc_* hooks above.
int64_t wg_min_rows();
bool wg_eligible(const WqWeight& w, int64_t M, const DType* xtype);
Status wg_workspace(const char* fn, const WqWeight& w, int64_t M, int sms, size_t* bytes);
Status wg_matmul(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo, void* workspace, size_t workspace_bytes, const DeviceInfo& dev,
                 cudaStream_t stream);

// The kernel arguments both warpgroup kernels (wq_wg.cu, wq_wgt.cu) take for one segment view v of a
// weight w, filled by seg_args: v's words, g_idx and K; w's columns, groups, scales and zeros; the group
// size guess of the WHOLE weight (only speed depends on it: the k-blocks whose group is row / gs_guess get
// their (s, z) rows with the stage).
struct WqSegArgs {
  const uint32_t* qweight;  // the segment's words (qrows_used word rows, row stride N)
  int64_t qrows_used, N, K, groups, M;
  const int32_t* g_idx;     // the segment's (K entries)
  const void* scales;
  const void* zeros;
  const void* bias;         // (N,) of the scales' dtype, or null
  void* out;                // (M, ldo)
  int64_t ldo;
  float* partial;           // null: one split, write out; else [split][M][N]
  int64_t mtiles;
  float inv_gs;             // 1 / gs_guess: g_idx[r] is expected to be (row_base + r) / gs_guess
  int row_base;             // the segment's first stored row
  int nkb, kps;             // 64-row k-blocks, and per split
  uint32_t magic;           // Tc<T>::kMagic (through an argument: a register, so mask-and-or is one LOP3)
};
WqSegArgs seg_args(const WqWeight& w, const WqWeight& v, int64_t M, int64_t row_base, const void* bias, void* out,
                   int64_t ldo, float* partial, int64_t mtiles, int64_t nkb, int64_t kps);

// Rows past K in a tail k-block weigh 0 whatever their padding codes: the mask of the two 16-bit halves of
// a lane's A register at k-slots k, k + 1 of the k-block starting at row0 (the warpgroup kernels' k order).
__host__ __device__ __forceinline__ uint32_t wg_tail_keep(int bits, int row0, int k, int K) {
  return (row0 + wg_slot_row(bits, k) < K ? 0x0000FFFFu : 0u) | (row0 + wg_slot_row(bits, k + 1) < K ? 0xFFFF0000u : 0u);
}

// (s0, s1) and (z0, z1) (sym: (-z0, -z1)) of column c in groups g0, g1 (clamped into [0, groups)), as 16-bit
// pairs: the per-row path of the warpgroup kernels, for a pair of rows of different groups.
template <bool kAsym>
__device__ __forceinline__ void wg_row_pair_sz(const void* scales, const void* zeros, int64_t groups, int64_t N,
                                               int32_t g0, int32_t g1, int64_t c, uint32_t* s2, uint32_t* z2) {
  const int64_t a = min(max(int64_t(g0), int64_t(0)), groups - 1), b = min(max(int64_t(g1), int64_t(0)), groups - 1);
  const unsigned short* const sc = static_cast<const unsigned short*>(scales);
  const unsigned short* const zc = static_cast<const unsigned short*>(zeros);
  *s2 = uint32_t(__ldg(sc + a * N + c)) | (uint32_t(__ldg(sc + b * N + c)) << 16);
  *z2 = uint32_t(__ldg(zc + a * N + c)) | (uint32_t(__ldg(zc + b * N + c)) << 16);
  if constexpr (!kAsym) *z2 ^= 0x80008000u;
}

// Whether an sm_90a kernel can run on the device of prop: its binary is the sm_90 one, and its dynamic shared
// memory (smem bytes) is within the device's opt-in limit and granted. The readiness check of the warpgroup
// kernels (wq_wg.cu, wq_wgt.cu), per instantiation.
template <typename Kernel>
bool sm90a_kernel_ready(Kernel kernel, int smem, const cudaDeviceProp& prop) {
  cudaFuncAttributes attr{};
  return size_t(smem) <= prop.sharedMemPerBlockOptin && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
         attr.binaryVersion == 90 &&
         cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess;
}

// wq_wgt.cu (sm_90a). The TMA-fed warpgroup kernel that wg_matmul gives a one-segment view v (2 or 4 bits)
// when wgt_usable(v, M): M >= wgt_min_rows() (65; LOWBIT_WQ_WGT_MIN_ROWS overrides it, read once), N % 8
// == 0, 16-byte aligned words, scales and zeros, a cc 9.0 device with its sm_90a code. wgt_plan: its tiles
// and split-K (a pure function of v's shape, M and the SM count). wgt_launch: one launch on x' (the prep
// pass's k-slot order, kp columns) writing out (+ bias) or, when partial is not null, fp32 partial sums
// partial[split][M][N] for every split. v is a one-segment view of w starting at stored row row_base.
int64_t wgt_min_rows();
bool wgt_usable(const WqWeight& v, int64_t M);
void wgt_plan(const WqWeight& v, int64_t M, int sms, int64_t* mtiles, int64_t* ntiles, int64_t* splits,
              int64_t* kps);
Status wgt_launch(const char* fn, const WqWeight& w, const WqWeight& v, const void* xprep, int64_t kp, int64_t M,
                  int64_t row_base, const void* bias, void* out, int64_t ldo, float* partial, int sms,
                  cudaStream_t stream);

}  // namespace wq_detail
}  // namespace cuda
}  // namespace lowbit
