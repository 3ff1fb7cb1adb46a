// Internal to the sm_90a kernels that run int8 wgmma from shared memory (gemm_s8_sm90.cu, qmatmul.cu): the
// warpgroup synchronisation wrappers and the K-major 128-byte-swizzle matrix descriptor. Defined only in
// the sm_90a device pass (LOWBIT_SM90A_DEVICE); other passes see nothing.
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#ifndef LOWBIT_SM90A_DEVICE
#define LOWBIT_SM90A_DEVICE 1
#endif
#endif

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
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma operands);
// every writing thread issues it before the barrier that publishes the data.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif  // LOWBIT_SM90A_DEVICE

}  // namespace wgmma_detail
}  // namespace cuda
}  // namespace lowbit
