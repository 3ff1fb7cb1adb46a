// Internal to the sm_90a TMA + mbarrier kernels (gemm_s8_sm90.cu, gemm_f16s8_sm90.cu): the mbarrier and
// bulk-tensor-copy wrappers (device, sm_90a pass only) and the host side every such kernel needs: the
// driver's tensor-map encoder, 3-D byte tensor maps, TMA's alignment rule and the SM count.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "wgmma_internal.cuh"

namespace lowbit {
namespace cuda {
namespace tma_detail {

#ifdef LOWBIT_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Box (k, row, batch) of a 3-D tensor map into shared memory at dst; completes transaction bytes on bar.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int k, int row,
                                         int batch) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row), "r"(batch)
      : "memory");
}
// The shared-memory ring of a TMA pipeline: `stages` stage buffers of `stage_bytes` from the dynamic shared
// base rounded up to 1024 bytes (the 128B swizzle's period; callers reserve the 1024 bytes of slack), then
// the `full` (TMA transaction bytes) and `empty` (consumer arrivals) mbarrier of every stage.
struct Ring {
  uint32_t base, bars;
  int stages;
  __device__ Ring(const void* smem, int n_stages, int stage_bytes) : stages(n_stages) {
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    base = (raw + 1023u) & ~1023u;
    bars = base + uint32_t(n_stages) * uint32_t(stage_bytes);
  }
  __device__ uint32_t full(int s) const { return bars + 8u * uint32_t(s); }
  __device__ uint32_t empty(int s) const { return bars + 8u * uint32_t(stages + s); }
  // Thread 0 initialises the barriers (one TMA arrival per full, `consumer_arrivals` per empty) and makes
  // them visible to the async proxy (the TMA unit completes on them); the caller syncs the block after.
  __device__ void init(uint32_t consumer_arrivals) const {
    if (threadIdx.x != 0) return;
    for (int s = 0; s < stages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), consumer_arrivals);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
};
#endif  // LOWBIT_SM90A_DEVICE

// Grouped raster of a persistent kernel: tile w (of tiles_m x tiles_n) -> (row tile, column tile), `group`
// row tiles per group and the column tiles across it, so the CTAs resident together (consecutive w) share
// row and column tiles in L2.
__host__ __device__ __forceinline__ void grouped_tile(int64_t w, int64_t tiles_m, int64_t tiles_n, int64_t group,
                                                      int64_t* tm, int64_t* tn) {
  const int64_t group_tiles = group * tiles_n;
  const int64_t first_m = (w / group_tiles) * group;
  const int64_t rows_here = (tiles_m - first_m) < group ? (tiles_m - first_m) : group;
  const int64_t in_group = w % group_tiles;
  *tm = first_m + in_group % rows_here;
  *tn = in_group / rows_here;
}

// The driver's cuTensorMapEncodeTiled (through the runtime: no libcuda link), or nullptr.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// TMA's rule for an operand: 16-byte aligned base, row (and batch) strides multiples of 16 bytes.
inline bool tma_ok(const void* p, int64_t ld_bytes, int64_t stride_bytes, int64_t batch) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld_bytes % 16 == 0 && (batch == 1 || stride_bytes % 16 == 0);
}

// 3-D tensor map (K bytes, rows, batches) of an operand seen as bytes (row stride ld, batch stride
// `stride`, in bytes); box box_k bytes x box_rows x 1 (128 and the 128B swizzle unless told), zero fill
// out of bounds. A broadcast operand (or a single batch) gets one batch.
inline bool make_map(CUtensorMap* map, const void* p, int64_t K, int64_t rows, int64_t ld, int64_t stride,
                     int64_t batch, int box_rows, int box_k = 128,
                     CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B) {
  const bool batched = batch > 1 && stride != 0;
  const cuuint64_t dims[3] = {cuuint64_t(K), cuuint64_t(rows), cuuint64_t(batched ? batch : 1)};
  const cuuint64_t strides[2] = {cuuint64_t(ld), cuuint64_t(batched ? stride : ld * rows)};
  const cuuint32_t box[3] = {cuuint32_t(box_k), cuuint32_t(box_rows), 1u};
  const cuuint32_t elem[3] = {1u, 1u, 1u};
  const CUresult r = encode_fn()(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(p), dims, strides, box,
                                 elem, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// SM count of a device, cached per device (132 when it cannot be read).
inline int device_sms(int device) {
  static std::atomic<int> sms[64];
  if (device < 0 || device >= 64) return 132;
  int v = sms[device].load(std::memory_order_acquire);
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
    cudaGetLastError();
    v = 132;
  }
  sms[device].store(v, std::memory_order_release);
  return v;
}

// The current device, or -1.
inline int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

}  // namespace tma_detail
}  // namespace cuda
}  // namespace lowbit
