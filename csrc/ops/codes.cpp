// scaled_codes / transposed_codes (codes.h): contiguous inputs, then the CPU or CUDA kernel of
// include/lowbit/kernels/convert_s8.h.
#include "codes.h"

#include "common.h"
#include "lowbit/kernels/convert_s8.h"
#include "lowbit/kernels/gemm_f16s8.h"

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

at::Tensor mm_codes(const at::Tensor& G, bool trans_g, const at::Tensor& q, const std::optional<at::Tensor>& scale,
                    at::ScalarType out_dt, const char* op) {
  TORCH_CHECK(G.dim() == 2 && q.dim() == 2, op, ": mm_codes needs 2-D G and codes, got ", G.sizes(), " and ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": codes must be int8, got ", q.scalar_type());
  const int64_t R = q.size(0), K = q.size(1), rows = trans_g ? G.size(1) : G.size(0);
  TORCH_CHECK((trans_g ? G.size(0) : G.size(1)) == R, op, ": G ", G.sizes(), (trans_g ? " (transposed)" : ""),
              " does not match codes of shape ", q.sizes());
  const auto gdt = G.scalar_type();
#ifdef LOWBIT_WITH_CUDA
  if (G.is_cuda() && q.is_cuda() && (gdt == at::kHalf || gdt == at::kBFloat16) &&
      (out_dt == at::kFloat || out_dt == gdt)) {
    c10::cuda::CUDAGuard guard(G.device());  // the support check reads the current device
    const auto Gc = G.contiguous();
    const auto qc = q.contiguous();
    const DType gt = kernel_dtype(gdt, op, "G");
    if (cuda::gemm_f16s8_supported(gt, Gc.data_ptr(), Gc.size(1), trans_g, qc.data_ptr<int8_t>(), K, rows, R, K)) {
      at::Tensor s;
      if (scale.has_value()) {
        check_scalar(*scale, G, "G", op, "scale");
        s = as_float(scale->detach()).contiguous();
      }
      auto out = at::empty({rows, K}, G.options().dtype(out_dt));
      check_status(cuda::gemm_f16s8(gt, Gc.data_ptr(), Gc.size(1), trans_g, qc.data_ptr<int8_t>(), K, rows, R, K,
                                    s.defined() ? s.data_ptr<float>() : nullptr, kernel_dtype(out_dt, op, "out"),
                                    out.data_ptr(), K, current_stream(G)),
                   op);
      return out;
    }
  }
#endif
  const auto wide = scaled_codes(q, gdt, scale, op);
  const auto Gm = trans_g ? G.t() : G;
  if (out_dt == gdt || gdt == at::kFloat) return as_dtype(at::mm(Gm, wide), out_dt);
  // 16-bit operands, fp32 out: aten::mm's out_dtype form (CUDA) gives the fp32 sum unrounded.
  const auto out = G.is_cuda() ? at::mm(Gm, wide, at::kFloat) : at::mm(Gm, wide);
  return as_dtype(out, out_dt);
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
