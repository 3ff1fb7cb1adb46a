// Internal to the sm_90a kernels that run wgmma (gemm_s8_sm90.cu, gemm_f16s8_sm90.cu, qmatmul.cu, wq_wgt.cu): the accumulator operand
// lists of the inline-asm wrappers, the warpgroup synchronisation wrappers and the K-major 128-byte-swizzle
// matrix descriptor. Defined only in
// the sm_90a device pass (LOWBIT_SM90A_DEVICE); other passes see nothing.
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#ifndef LOWBIT_SM90A_DEVICE
#define LOWBIT_SM90A_DEVICE 1
#endif
#endif

// The accumulator operands of an int8 wgmma with n columns (n / 2 int32 per thread, operands %0 ..
// %(n/2 - 1)): the register list text and the matching "+r" constraints on an array d, for n = 16, 64, 128
// and 256 (8, 32, 64 and 128 accumulators). The A / B operands and scale-d follow at %(n/2) on.
#define LOWBIT_WG_ACC_STR_8 \
  "%0, %1, %2, %3, %4, %5, %6, %7"
#define LOWBIT_WG_ACC_STR_32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define LOWBIT_WG_ACC_STR_64 \
  LOWBIT_WG_ACC_STR_32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define LOWBIT_WG_ACC_STR_128 \
  LOWBIT_WG_ACC_STR_64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define LOWBIT_WG_ACC_OPS_8(d) \
  "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7])
#define LOWBIT_WG_ACC_OPS_32(d) \
  "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), \
  "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), \
  "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), \
  "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
#define LOWBIT_WG_ACC_OPS_64(d) \
  LOWBIT_WG_ACC_OPS_32(d), \
  "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), \
  "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), \
  "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), \
  "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
#define LOWBIT_WG_ACC_OPS_128(d) \
  LOWBIT_WG_ACC_OPS_64(d), \
  "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), \
  "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), \
  "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), \
  "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), \
  "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), \
  "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), \
  "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), \
  "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])

// The same operands as fp32 accumulators ("+f" on a float array d: 32, 64 or 128 of them), for the
// 16-bit wgmmas with fp32 accumulation (gemm_f16s8_sm90.cu, wq_wgt.cu).
#define LOWBIT_WG_ACC_OPS_F32(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define LOWBIT_WG_ACC_OPS_F64(d) \
  LOWBIT_WG_ACC_OPS_F32(d), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define LOWBIT_WG_ACC_OPS_F128(d) \
  LOWBIT_WG_ACC_OPS_F64(d), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

namespace lowbit {
namespace cuda {
namespace wgmma_detail {

#ifdef LOWBIT_SM90A_DEVICE
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Shared-memory matrix descriptor: K-major, 128-byte swizzle. Start address >> 4 in bits 0-13, leading
// byte offset (unused by this mode; 1 by convention) in bits 16-29, stride byte offset 1024 B (8 rows of
// 128 B) >> 4 in bits 32-45, layout "128B swizzle" (1) in bits 62-63.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// d (64 x N fp32, N / 2 per thread) = A (64 x 16 of fp16, or bf16 when kBf16; registers a, the
// mma.m16n8k16 fragment per warp) * B (16 x N, descriptor db: K-major, or MN-major when kTransB) +
// (accumulate ? d : 0), for N = 64, 128, 256. gemm_f16s8_sm90.cu and wq_wgt.cu.
#define LOWBIT_WG_F16_MMA(SHAPE, TY, ACCSTR, ACCOPS, A0, A1, A2, A3, DESC, PRED, TRANS)                          \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %" PRED ", 0;\n"                                             \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " {" ACCSTR "}, "                       \
               "{%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" DESC ", p, 1, 1, %" TRANS ";\n}\n"                   \
               : ACCOPS(d)                                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(kTransB ? 1 : 0))
template <int N, bool kBf16, bool kTransB>
__device__ __forceinline__ void wgmma_f16(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                          uint32_t accumulate) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma_f16: N = 64, 128 or 256");
  if constexpr (N == 256) {
    if constexpr (kBf16)
      LOWBIT_WG_F16_MMA("m64n256k16", "bf16", LOWBIT_WG_ACC_STR_128, LOWBIT_WG_ACC_OPS_F128, "128", "129", "130",
                        "131", "132", "133", "134");
    else
      LOWBIT_WG_F16_MMA("m64n256k16", "f16", LOWBIT_WG_ACC_STR_128, LOWBIT_WG_ACC_OPS_F128, "128", "129", "130",
                        "131", "132", "133", "134");
  } else if constexpr (N == 128) {
    if constexpr (kBf16)
      LOWBIT_WG_F16_MMA("m64n128k16", "bf16", LOWBIT_WG_ACC_STR_64, LOWBIT_WG_ACC_OPS_F64, "64", "65", "66", "67",
                        "68", "69", "70");
    else
      LOWBIT_WG_F16_MMA("m64n128k16", "f16", LOWBIT_WG_ACC_STR_64, LOWBIT_WG_ACC_OPS_F64, "64", "65", "66", "67",
                        "68", "69", "70");
  } else {
    if constexpr (kBf16)
      LOWBIT_WG_F16_MMA("m64n64k16", "bf16", LOWBIT_WG_ACC_STR_32, LOWBIT_WG_ACC_OPS_F32, "32", "33", "34", "35",
                        "36", "37", "38");
    else
      LOWBIT_WG_F16_MMA("m64n64k16", "f16", LOWBIT_WG_ACC_STR_32, LOWBIT_WG_ACC_OPS_F32, "32", "33", "34", "35",
                        "36", "37", "38");
  }
}
#undef LOWBIT_WG_F16_MMA
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma operands);
// every writing thread issues it before the barrier that publishes the data.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif  // LOWBIT_SM90A_DEVICE

}  // namespace wgmma_detail
}  // namespace cuda
}  // namespace lowbit
