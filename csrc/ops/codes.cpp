// scaled_codes / transposed_codes (codes.h): contiguous inputs, then the CPU or CUDA kernel of
// include/lowbit/kernels/convert_s8.h.
#include "codes.h"

#include "common.h"
#include "lowbit/kernels/convert_s8.h"

namespace lowbit::ops {

at::Tensor scaled_codes(const at::Tensor& q, at::ScalarType dt, const std::optional<at::Tensor>& scale,
                        const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": codes must be int8, got ", q.scalar_type());
  at::Tensor s;
  if (scale.has_value()) {
    check_scalar(*scale, q, "codes", op, "scale");
    s = as_float(scale->detach()).contiguous();
  }
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const auto qc = q.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dt));
  if (out.numel() == 0) return out;
  const int64_t N = q.dim() == 0 ? 1 : q.size(-1);
  const int64_t M = q.numel() / N;
  const DType ot = kernel_dtype(dt, op, "codes output");
  if (q.is_cpu()) {
    check_status(cpu::cast_s8(qc.data_ptr<int8_t>(), M, N, N, ot, out.data_ptr(), N, sp), op);
    return out;
  }
#ifdef LOWBIT_WITH_CUDA
  if (q.is_cuda()) {
    c10::cuda::CUDAGuard guard(q.device());
    check_status(cuda::cast_s8(qc.data_ptr<int8_t>(), M, N, N, ot, out.data_ptr(), N, current_stream(q), sp), op);
    return out;
  }
#endif
  return (s.defined() ? qc.to(at::kFloat) * s : qc.to(at::kFloat)).to(dt);  // other backends: same math in ATen
}

at::Tensor transposed_codes(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2, op, ": codes to transpose must be 2-D int8, got ",
              q.scalar_type(), " of shape ", q.sizes());
  const auto qc = q.contiguous();
  const int64_t M = q.size(0), N = q.size(1);
  auto out = at::empty({N, M}, q.options());
  if (out.numel() == 0) return out;
  if (q.is_cpu()) {
    check_status(cpu::transpose_s8(qc.data_ptr<int8_t>(), M, N, N, out.data_ptr<int8_t>(), M), op);
    return out;
  }
#ifdef LOWBIT_WITH_CUDA
  if (q.is_cuda()) {
    c10::cuda::CUDAGuard guard(q.device());
    check_status(cuda::transpose_s8(qc.data_ptr<int8_t>(), M, N, N, out.data_ptr<int8_t>(), M, current_stream(q)),
                 op);
    return out;
  }
#endif
  return qc.t().contiguous();
}

}  // namespace lowbit::ops
