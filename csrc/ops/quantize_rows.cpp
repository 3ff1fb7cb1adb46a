// Op family "quantize_rows": per-row symmetric int8 quantization (SwitchBack's quantizer of the output
// gradient in the opt-in int8 backward of the QAT linear layers). Checks, Meta kernel and CPU/CUDA
// dispatch; the math is in csrc/kernels/{cpu,cuda}/quantize_rows.*.
#include <torch/library.h>

#include "common.h"
#include "lowbit/kernels/quantize_rows.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

constexpr const char* kOp = "lowbit.quantize_rows_s8";

void check_quantize_rows(const at::Tensor& x, int64_t qmax) {
  check_float_tensor(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension, got a 0-dim tensor");
  TORCH_CHECK(qmax >= 1 && qmax <= 127, kOp, ": qmax must be in [1, 127], got ", qmax);
}

// Outputs: codes of x's shape, one fp32 scale per row (x's leading shape).
std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x) {
  auto q = at::empty_symint(x.sym_sizes(), x.options().dtype(at::kChar));
  auto rs = at::empty_symint(x.sym_sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  return {q, rs};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_s8_meta(const at::Tensor& x, int64_t qmax) {
  check_quantize_rows(x, qmax);
  return empty_outputs(x);
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> quantize_rows_impl(const at::Tensor& x, int64_t qmax, Launch&& launch) {
  check_quantize_rows(x, qmax);
  auto [q, rs] = empty_outputs(x);
  const int64_t N = x.size(-1);
  const int64_t M = N == 0 ? 0 : x.numel() / N;
  if (q.numel() == 0) {
    rs.zero_();  // rows of no elements: amax 0, scale 0 (as the kernels define an all-zero row)
    return {q, rs};
  }
  const auto xc = x.detach().contiguous();
  check_status(launch(kernel_dtype(xc.scalar_type(), kOp, "x"), xc.data_ptr(), M, N, q.data_ptr<int8_t>(),
                      rs.data_ptr<float>()),
               kOp);
  return {q, rs};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_s8_cpu(const at::Tensor& x, int64_t qmax) {
  return quantize_rows_impl(x, qmax, [&](DType dt, const void* p, int64_t M, int64_t N, int8_t* q, float* rs) {
    return cpu::quantize_rows_s8(dt, p, M, N, N, int32_t(qmax), q, N, rs);
  });
}

#ifdef LOWBIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> quantize_rows_s8_cuda(const at::Tensor& x, int64_t qmax) {
  c10::cuda::CUDAGuard guard(x.device());
  return quantize_rows_impl(x, qmax, [&](DType dt, const void* p, int64_t M, int64_t N, int8_t* q, float* rs) {
    return cuda::quantize_rows_s8(dt, p, M, N, N, int32_t(qmax), q, N, rs, current_stream(x));
  });
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_s8(const at::Tensor& x, int64_t qmax) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::quantize_rows_s8", "")
                       .typed<decltype(quantize_rows_s8)>();
  return op.call(x, qmax);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("quantize_rows_s8", &quantize_rows_s8_cpu); }
TORCH_LIBRARY_IMPL(lowbit, Meta, m) { m.impl("quantize_rows_s8", &quantize_rows_s8_meta); }
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("quantize_rows_s8", &quantize_rows_s8_cuda); }
#endif
// Codes and scales are a quantization, not a function to differentiate: no autograd history.
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("quantize_rows_s8", torch::CppFunction::makeFallthrough()); }

}  // namespace lowbit::ops
