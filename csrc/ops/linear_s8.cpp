// Op family "linear_s8": int8 x int8 GEMM with the fused dequantizing epilogue, and linear_s8s4, the same
// with int4-pair weights. Checks, Meta kernels, CPU/CUDA dispatch; the math is in csrc/kernels/{cpu,cuda}/gemm_s8.*.
#include <torch/library.h>

#include "common.h"
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/pack_int4.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

constexpr const char* kOp = "lowbit.linear_s8";

struct GemmArgs {
  int64_t M, N, K;
  std::vector<int64_t> out_shape;
};

// qx's dtype and rank, the weight's dtype, K's bound, devices, alpha and out_dtype (shared by linear_s8 and
// linear_s8s4); M = the product of qx's leading dims, out shape (..., N).
GemmArgs gemm_args(const char* op, const at::Tensor& qx, const at::Tensor& w, const char* w_name, int64_t N,
                   int64_t K, const at::Tensor& alpha, at::ScalarType out_dtype) {
  TORCH_CHECK(K <= kMaxGemmS8K, op, ": K=", K, " exceeds ", kMaxGemmS8K,
              ", beyond which the int32 accumulator could overflow");
  check_same_device(qx, "qx", w, op, w_name);
  check_scalar(alpha, qx, "qx", op, "alpha");
  kernel_dtype(out_dtype, op, "out_dtype");
  GemmArgs a;
  a.K = K;
  a.N = N;
  a.M = 1;  // product of the leading dims (also right when K == 0)
  for (int64_t d = 0; d + 1 < qx.dim(); ++d) a.M *= qx.size(d);
  a.out_shape = qx.sizes().vec();
  a.out_shape.back() = N;
  return a;
}

void check_int8_operands(const char* op, const at::Tensor& qx, const at::Tensor& w, const char* w_name,
                         const char* w_what) {
  TORCH_CHECK(qx.defined() && qx.scalar_type() == at::kChar, op, ": qx must be an int8 tensor, got ",
              qx.defined() ? c10::toString(qx.scalar_type()) : "None");
  TORCH_CHECK(w.defined() && w.scalar_type() == at::kChar, op, ": ", w_name, " must be an int8 tensor", w_what,
              ", got ", w.defined() ? c10::toString(w.scalar_type()) : "None");
  TORCH_CHECK(qx.dim() >= 1, op, ": qx must have at least one dimension");
}

GemmArgs check_linear_s8(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha,
                         at::ScalarType out_dtype, const std::optional<at::Tensor>& row_scale) {
  check_int8_operands(kOp, qx, qw, "qw", "");
  TORCH_CHECK(qw.dim() == 2, kOp, ": qw must be 2-D (N, K), got shape ", qw.sizes());
  const int64_t K = qw.size(1), N = qw.size(0);
  TORCH_CHECK(qx.size(-1) == K, kOp, ": qx has ", qx.size(-1), " features in its last dim but qw expects K=", K);
  GemmArgs a = gemm_args(kOp, qx, qw, "qw", N, K, alpha, out_dtype);
  if (row_scale.has_value() && row_scale->defined()) {
    const auto& rs = *row_scale;
    TORCH_CHECK(rs.scalar_type() == at::kFloat, kOp, ": row_scale must be float32, got ", rs.scalar_type());
    c10::SymInt rows = 1;  // symbolic under torch.compile
    for (int64_t d = 0; d + 1 < qx.dim(); ++d) rows = rows * qx.sym_size(d);
    TORCH_CHECK(rs.sym_numel() == rows, kOp, ": row_scale must hold one value per row of qx (", rows,
                "), got shape ", rs.sym_sizes());
    check_same_device(qx, "qx", rs, kOp, "row_scale");
  }
  return a;
}

// The per-row multipliers as a contiguous fp32 pointer, or nullptr.
const float* row_scale_ptr(const std::optional<at::Tensor>& row_scale, at::Tensor& keep) {
  if (!row_scale.has_value() || !row_scale->defined()) return nullptr;
  keep = row_scale->detach().contiguous();
  return keep.data_ptr<float>();
}

at::Tensor linear_s8_meta(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha,
                          at::ScalarType out_dtype, const std::optional<at::Tensor>& row_scale) {
  const auto a = check_linear_s8(qx, qw, alpha, out_dtype, row_scale);
  return at::empty(a.out_shape, qx.options().dtype(out_dtype));
}

at::Tensor linear_s8_cpu(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha,
                         at::ScalarType out_dtype, const std::optional<at::Tensor>& row_scale) {
  const auto a = check_linear_s8(qx, qw, alpha, out_dtype, row_scale);
  auto out = at::empty(a.out_shape, qx.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  auto x = qx.contiguous(), w = qw.contiguous();
  auto al = as_float(alpha.detach()).contiguous();
  at::Tensor rs;
  check_status(cpu::gemm_s8_scaled_rows(x.data_ptr<int8_t>(), a.K, w.data_ptr<int8_t>(), a.K, a.M, a.N, a.K,
                                        al.data_ptr<float>(), row_scale_ptr(row_scale, rs),
                                        kernel_dtype(out_dtype, kOp, "out_dtype"), out.data_ptr(), a.N),
               kOp);
  return out;
}

#ifdef LOWBIT_WITH_CUDA
at::Tensor linear_s8_cuda(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha,
                          at::ScalarType out_dtype, const std::optional<at::Tensor>& row_scale) {
  const auto a = check_linear_s8(qx, qw, alpha, out_dtype, row_scale);
  c10::cuda::CUDAGuard guard(qx.device());
  auto out = at::empty(a.out_shape, qx.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  auto x = qx.contiguous(), w = qw.contiguous();
  int64_t ld = a.K;
  if (a.K % 128 != 0 && a.K > 16 && a.M >= 128) {
    // The GEMM kernels stream rows of codes by TMA / cp.async: a row pitch that is not a multiple of 16
    // bytes sends the call to the byte-load path, and one that is not a multiple of 128 (the TMA box and
    // swizzle line) makes every box straddle lines. H200, M = N = 8192, bf16 out: K = 8200 took 8.96 ms
    // (byte loads), K = 4112 567 us against 383 us at K = 4160. So the codes are re-strided to rows of
    // round_up(K, 128) bytes first: one 2-D copy of each operand (K = 8200: 876 us in all; 4100: 472 us),
    // the same products (the kernels read K bytes per row and zero-fill the rest of the last k-tile), the
    // same outputs bit for bit. Few rows (M < 128) keep the given layout: there the GEMM streams the weight
    // once, and a copy would triple its traffic.
    ld = (a.K + 127) / 128 * 128;
    // One 2-D device copy per operand (ATen's copy_ into a strided view was several times slower).
    auto restride = [&](const at::Tensor& t, int64_t rows) {
      auto buf = at::empty({rows, ld}, t.options());
      C10_CUDA_CHECK(cudaMemcpy2DAsync(buf.data_ptr<int8_t>(), size_t(ld), t.data_ptr<int8_t>(), size_t(a.K),
                                       size_t(a.K), size_t(rows), cudaMemcpyDeviceToDevice,
                                       at::cuda::getCurrentCUDAStream(t.device().index()).stream()));
      return buf;
    };
    x = restride(x, a.M);
    w = restride(w, a.N);
  }
  auto al = as_float(alpha.detach()).contiguous();
  at::Tensor rs;
  check_status(cuda::gemm_s8_scaled_rows(x.data_ptr<int8_t>(), ld, w.data_ptr<int8_t>(), ld, a.M, a.N, a.K,
                                         al.data_ptr<float>(), row_scale_ptr(row_scale, rs),
                                         kernel_dtype(out_dtype, kOp, "out_dtype"), out.data_ptr(), a.N,
                                         current_stream(qx)),
               kOp);
  return out;
}
#endif

// ---- linear_s8s4: the same GEMM with the weights as int4 pairs (pack_s4's format), K from qx.
constexpr const char* kOpS4 = "lowbit.linear_s8s4";

GemmArgs check_linear_s8s4(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                           at::ScalarType out_dtype) {
  check_int8_operands(kOpS4, qx, qw4, "qw4", " of int4 pairs");
  TORCH_CHECK(qw4.dim() == 2, kOpS4, ": qw4 must be 2-D (N, ceil(K/2)), got shape ", qw4.sizes());
  const int64_t K = qx.size(-1), N = qw4.size(0);
  TORCH_CHECK(qw4.size(1) == packed_s4_cols(K), kOpS4, ": qx has K=", K, " features in its last dim, so qw4 needs ",
              packed_s4_cols(K), " bytes per row (two codes per byte), got shape ", qw4.sizes());
  return gemm_args(kOpS4, qx, qw4, "qw4", N, K, alpha, out_dtype);
}

at::Tensor linear_s8s4_meta(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                            at::ScalarType out_dtype) {
  const auto a = check_linear_s8s4(qx, qw4, alpha, out_dtype);
  return at::empty(a.out_shape, qx.options().dtype(out_dtype));
}

at::Tensor linear_s8s4_cpu(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                           at::ScalarType out_dtype) {
  const auto a = check_linear_s8s4(qx, qw4, alpha, out_dtype);
  auto out = at::empty(a.out_shape, qx.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  auto x = qx.contiguous(), w = qw4.contiguous();
  auto al = as_float(alpha.detach()).contiguous();
  check_status(cpu::gemm_s8s4_scaled(x.data_ptr<int8_t>(), a.K, w.data_ptr<int8_t>(), w.size(1), a.M, a.N, a.K,
                                     al.data_ptr<float>(), kernel_dtype(out_dtype, kOpS4, "out_dtype"),
                                     out.data_ptr(), a.N),
               kOpS4);
  return out;
}

#ifdef LOWBIT_WITH_CUDA
// The sm_90a kernel that unpacks the pairs in registers where it can run (Hopper, TMA-friendly strides)
// and is the faster way (M <= kGemmS8S4FusedMaxRows), else unpack_s4 and linear_s8: the same bits either way.
at::Tensor linear_s8s4_cuda(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                            at::ScalarType out_dtype) {
  const auto a = check_linear_s8s4(qx, qw4, alpha, out_dtype);
  c10::cuda::CUDAGuard guard(qx.device());
  auto x = qx.contiguous(), w = qw4.contiguous();
  if (a.M > 0 && a.N > 0 && a.M <= cuda::kGemmS8S4FusedMaxRows &&
      cuda::gemm_s8s4_fused_supported(x.data_ptr<int8_t>(), a.K, w.data_ptr<int8_t>(), w.size(1), a.M, a.N, a.K)) {
    auto out = at::empty(a.out_shape, qx.options().dtype(out_dtype));
    auto al = as_float(alpha.detach()).contiguous();
    check_status(cuda::gemm_s8s4_scaled(x.data_ptr<int8_t>(), a.K, w.data_ptr<int8_t>(), w.size(1), a.M, a.N, a.K,
                                        al.data_ptr<float>(), kernel_dtype(out_dtype, kOpS4, "out_dtype"),
                                        out.data_ptr(), a.N, current_stream(qx)),
                 kOpS4);
    return out;
  }
  return linear_s8_cuda(x, unpack_s4(w, a.K), alpha, out_dtype, std::nullopt);
}
#endif

}  // namespace

at::Tensor linear_s8s4(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                       at::ScalarType out_dtype) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::linear_s8s4", "").typed<decltype(linear_s8s4)>();
  return op.call(qx, qw4, alpha, out_dtype);
}

at::Tensor linear_s8(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha, at::ScalarType out_dtype,
                     const std::optional<at::Tensor>& row_scale) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::linear_s8", "").typed<decltype(linear_s8)>();
  return op.call(qx, qw, alpha, out_dtype, row_scale);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("linear_s8", &linear_s8_cpu);
  m.impl("linear_s8s4", &linear_s8s4_cpu);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("linear_s8", &linear_s8_meta);
  m.impl("linear_s8s4", &linear_s8s4_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("linear_s8", &linear_s8_cuda);
  m.impl("linear_s8s4", &linear_s8s4_cuda);
}
#endif

}  // namespace lowbit::ops
