// Programmatic dependent launch (sm_90+), shared by the kernels that chain behind another (wq_matmul.cu,
// wq_tc.cu, wq_wg.cu, lsq_grad.cu): the device side (no-ops before sm_90 and when the launch did not ask
// for it) and the host-side launch.
#pragma once

#include <cuda_runtime.h>

namespace lowbit {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when pdl is true (the
// caller passes "device is sm_90+"); if the driver refuses the attribute, a plain launch, which is just as
// correct (the kernels' griddepcontrol instructions are then no-ops). Returns the launch's error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       bool pdl, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess && pdl) {
    cudaGetLastError();
    cfg.numAttrs = 0;
    err = cudaLaunchKernelEx(&cfg, kernel, args...);
  }
  return err;
}

// Lets the dependent kernel start launching (its prologue overlaps this kernel's tail).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Waits until the kernels this one depends on have completed and their writes are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace lowbit
