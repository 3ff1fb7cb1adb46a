// Programmatic dependent launch (sm_90+) device side, shared by the kernels that chain a reduce kernel
// behind their main kernel (wq_matmul.cu, lsq_grad.cu). No-ops before sm_90 and when the launch did not
// ask for it.
#pragma once

namespace lowbit {
namespace cuda {

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
