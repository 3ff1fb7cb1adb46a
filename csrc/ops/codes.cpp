// scaled_codes / mm_codes / mm_weight_codes / transposed_codes (codes.h): contiguous inputs, then the CPU
// or CUDA kernels of include/lowbit/kernels/convert_s8.h, gemm_f16s8.h and quantize.h.
#include "codes.h"

#include <algorithm>

#include "common.h"
#include "lowbit/kernels/convert_s8.h"
#include "lowbit/kernels/gemm_f16s8.h"
#include "lowbit/kernels/quantize.h"

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

namespace {

// The gemm_f16s8 path of mm_codes (Hopper, 16-bit G, out fp32 or G's dtype): returns false, having done
// nothing, where it cannot run; else `out` is allocated (rows, K) once the kernel is known to run (a
// fallback never holds an unused output) and written.
bool mm_codes_kernel(const at::Tensor& G, bool trans_g, const at::Tensor& q, const std::optional<at::Tensor>& scale,
                     at::ScalarType out_dt, at::Tensor& out, const char* op) {
#ifdef LOWBIT_WITH_CUDA
  const auto gdt = G.scalar_type();
  if (!(G.is_cuda() && q.is_cuda() && (gdt == at::kHalf || gdt == at::kBFloat16) &&
        (out_dt == at::kFloat || out_dt == gdt)))
    return false;
  c10::cuda::CUDAGuard guard(G.device());  // the support check reads the current device
  const int64_t R = q.size(0), K = q.size(1), rows = trans_g ? G.size(1) : G.size(0);
  const auto Gc = G.contiguous();
  const auto qc = q.contiguous();
  const DType gt = kernel_dtype(gdt, op, "G");
  if (!cuda::gemm_f16s8_supported(gt, Gc.data_ptr(), Gc.size(1), trans_g, qc.data_ptr<int8_t>(), K, rows, R, K))
    return false;
  at::Tensor s;
  if (scale.has_value()) {
    check_scalar(*scale, G, "G", op, "scale");
    s = as_float(scale->detach()).contiguous();
  }
  out = at::empty({rows, K}, G.options().dtype(out_dt));
  check_status(cuda::gemm_f16s8(gt, Gc.data_ptr(), Gc.size(1), trans_g, qc.data_ptr<int8_t>(), K, rows, R, K,
                                s.defined() ? s.data_ptr<float>() : nullptr, kernel_dtype(out_dt, op, "out"),
                                out.data_ptr(), K, current_stream(G)),
               op);
  return true;
#else
  (void)G, (void)trans_g, (void)q, (void)scale, (void)out_dt, (void)out, (void)op;
  return false;
#endif
}

void check_mm_codes(const at::Tensor& G, bool trans_g, const at::Tensor& q, const char* op) {
  TORCH_CHECK(G.dim() == 2 && q.dim() == 2, op, ": mm_codes needs 2-D G and codes, got ", G.sizes(), " and ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": codes must be int8, got ", q.scalar_type());
  TORCH_CHECK((trans_g ? G.size(0) : G.size(1)) == q.size(0), op, ": G ", G.sizes(),
              (trans_g ? " (transposed)" : ""), " does not match codes of shape ", q.sizes());
}

}  // namespace

at::Tensor mm_codes(const at::Tensor& G, bool trans_g, const at::Tensor& q, const std::optional<at::Tensor>& scale,
                    at::ScalarType out_dt, const char* op) {
  check_mm_codes(G, trans_g, q, op);
  at::Tensor out;
  if (mm_codes_kernel(G, trans_g, q, scale, out_dt, out, op)) return out;
  const auto gdt = G.scalar_type();
  const auto wide = scaled_codes(q, gdt, scale, op);
  const auto Gm = trans_g ? G.t() : G;
  if (out_dt == gdt || gdt == at::kFloat) return as_dtype(at::mm(Gm, wide), out_dt);
  // 16-bit operands, fp32 out: aten::mm's out_dtype form (CUDA) gives the fp32 sum unrounded.
  const auto r = G.is_cuda() ? at::mm(Gm, wide, at::kFloat) : at::mm(Gm, wide);
  return as_dtype(r, out_dt);
}

at::Tensor mm_weight_codes(const at::Tensor& G, const at::Tensor& W, const at::Tensor& scale, const at::Tensor& eps,
                           int64_t qmin, int64_t qmax, int64_t kc, at::ScalarType out_dt, const char* op) {
  TORCH_CHECK(W.dim() == 2 && is_float_dtype(W.scalar_type()), op, ": the weight must be a 2-D float tensor, got ",
              W.scalar_type(), " of shape ", W.sizes());
  TORCH_CHECK(G.dim() == 2 && G.size(1) == W.size(0), op, ": G ", G.sizes(), " does not match the weight ",
              W.sizes());
  TORCH_CHECK(qmin <= qmax && qmin >= -128 && qmax <= 127, op, ": need -128 <= qmin <= qmax <= 127, got ", qmin,
              ", ", qmax);
  TORCH_CHECK(kc >= 1, op, ": the block width must be >= 1, got ", kc);
  check_scalar(scale, W, "weight", op, "scale");
  check_scalar(eps, W, "weight", op, "eps");
  const int64_t M = G.size(0), N = W.size(0), K = W.size(1);
  auto out = at::empty({M, K}, G.options().dtype(out_dt));
  if (M == 0 || K == 0) return out;
  const auto Wc = W.contiguous();
  const auto Gc = G.contiguous();
  const auto s = as_float(scale.detach()).reshape({}).contiguous();
  const auto e = as_float(eps.detach()).reshape({}).contiguous();
  kc = std::min(kc, K);
  const auto buf = at::empty({N * kc}, W.options().dtype(at::kChar));
  const DType wt = kernel_dtype(W.scalar_type(), op, "weight");
  const auto* w0 = static_cast<const char*>(Wc.data_ptr());
  auto* q = buf.data_ptr<int8_t>();
  const float *sp = s.data_ptr<float>(), *ep = e.data_ptr<float>();
#ifdef LOWBIT_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  const auto gdt = G.scalar_type();
  bool kernel = false;
  DType gt = DType::kFloat32;
  if (W.is_cuda()) {
    guard.emplace(W.device());  // the support check reads the current device
    if (G.is_cuda() && (gdt == at::kHalf || gdt == at::kBFloat16) && (out_dt == at::kFloat || out_dt == gdt)) {
      gt = kernel_dtype(gdt, op, "G");
      kernel = true;  // per block below: the row stride of its codes must suit TMA too
    }
  }
#endif
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t w = std::min(kc, K - k0);
    const void* src = w0 + k0 * Wc.element_size();
    if (W.is_cpu()) {
      check_status(cpu::quantize_s8(wt, src, N, w, K, nullptr, sp, int32_t(qmin), int32_t(qmax), q, ep), op);
    } else {
#ifdef LOWBIT_WITH_CUDA
      TORCH_CHECK(W.is_cuda(), op, ": the weight is on ", W.device(), "; its codes are made on the CPU or CUDA only");
      check_status(cuda::quantize_s8(wt, src, N, w, K, nullptr, sp, int32_t(qmin), int32_t(qmax), q,
                                     current_stream(W), ep),
                   op);
      if (kernel && cuda::gemm_f16s8_supported(gt, Gc.data_ptr(), N, false, q, w, M, N, w)) {
        check_status(cuda::gemm_f16s8(gt, Gc.data_ptr(), N, false, q, w, M, N, w, nullptr,
                                      kernel_dtype(out_dt, op, "out"),
                                      static_cast<char*>(out.data_ptr()) + k0 * out.element_size(), K,
                                      current_stream(G)),
                     op);
        continue;
      }
#else
      TORCH_CHECK(false, op, ": the weight is on ", W.device(), "; its codes are made on the CPU only");
#endif
    }
    out.narrow(1, k0, w).copy_(mm_codes(Gc, false, buf.narrow(0, 0, N * w).view({N, w}), std::nullopt, out_dt, op));
  }
  return out;
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
