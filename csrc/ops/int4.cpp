// Op family "int4": pack_s4 / unpack_s4 between int8 codes in [-8, 7] and BIE's int4 pairs (first code
// in the high nibble, docs/formats.md). Checks, Meta kernels, dispatch; kernels in csrc/kernels/*/pack_int4.*.
#include <torch/library.h>

#include "common.h"
#include "lowbit/kernels/pack_int4.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

constexpr const char* kPack = "lowbit.pack_s4";
constexpr const char* kUnpack = "lowbit.unpack_s4";

void check_codes(const at::Tensor& codes) {
  TORCH_CHECK(codes.defined() && codes.scalar_type() == at::kChar, kPack, ": codes must be an int8 tensor, got ",
              codes.defined() ? c10::toString(codes.scalar_type()) : "None");
  TORCH_CHECK(codes.dim() >= 1, kPack, ": codes must have at least one dimension");
}

void check_packed(const at::Tensor& packed, int64_t K) {
  TORCH_CHECK(packed.defined() && packed.scalar_type() == at::kChar, kUnpack, ": packed must be an int8 tensor, got ",
              packed.defined() ? c10::toString(packed.scalar_type()) : "None");
  TORCH_CHECK(packed.dim() >= 1, kUnpack, ": packed must have at least one dimension");
  TORCH_CHECK(K >= 0 && packed.size(-1) == packed_s4_cols(K), kUnpack, ": K=", K, " codes need ", packed_s4_cols(K),
              " bytes per row, but packed has shape ", packed.sizes());
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  auto v = sizes.vec();
  v.back() = last;
  return v;
}

at::Tensor pack_s4_meta(const at::Tensor& codes) {
  check_codes(codes);
  return at::empty(with_last(codes.sizes(), packed_s4_cols(codes.size(-1))), codes.options());
}

at::Tensor unpack_s4_meta(const at::Tensor& packed, int64_t K) {
  check_packed(packed, K);
  return at::empty(with_last(packed.sizes(), K), packed.options());
}

at::Tensor pack_s4_impl(const at::Tensor& codes_in) {
  check_codes(codes_in);
  const auto codes = codes_in.contiguous();
  const int64_t K = codes.size(-1), rows = K == 0 ? 0 : codes.numel() / K;
  auto out = at::empty(with_last(codes.sizes(), packed_s4_cols(K)), codes.options());
  if (out.numel() == 0) return out;
  if (codes.is_cpu()) {
    check_status(cpu::pack_s4(codes.data_ptr<int8_t>(), rows, K, K, out.data_ptr<int8_t>()), kPack);
  } else {
#ifdef LOWBIT_WITH_CUDA
    c10::cuda::CUDAGuard guard(codes.device());
    check_status(cuda::pack_s4(codes.data_ptr<int8_t>(), rows, K, K, out.data_ptr<int8_t>(), current_stream(codes)),
                 kPack);
#endif
  }
  return out;
}

at::Tensor unpack_s4_impl(const at::Tensor& packed_in, int64_t K) {
  check_packed(packed_in, K);
  const auto packed = packed_in.contiguous();
  const int64_t cols = packed_s4_cols(K), rows = cols == 0 ? 0 : packed.numel() / cols;
  auto out = at::empty(with_last(packed.sizes(), K), packed.options());
  if (out.numel() == 0) return out;
  if (packed.is_cpu()) {
    check_status(cpu::unpack_s4(packed.data_ptr<int8_t>(), rows, K, cols, out.data_ptr<int8_t>()), kUnpack);
  } else {
#ifdef LOWBIT_WITH_CUDA
    c10::cuda::CUDAGuard guard(packed.device());
    check_status(
        cuda::unpack_s4(packed.data_ptr<int8_t>(), rows, K, cols, out.data_ptr<int8_t>(), current_stream(packed)),
        kUnpack);
#endif
  }
  return out;
}

}  // namespace

at::Tensor pack_s4(const at::Tensor& codes) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::pack_s4", "").typed<decltype(pack_s4)>();
  return op.call(codes);
}

at::Tensor unpack_s4(const at::Tensor& packed, int64_t K) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::unpack_s4", "").typed<decltype(unpack_s4)>();
  return op.call(packed, K);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("pack_s4", &pack_s4_impl);
  m.impl("unpack_s4", &unpack_s4_impl);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("pack_s4", &pack_s4_meta);
  m.impl("unpack_s4", &unpack_s4_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("pack_s4", &pack_s4_impl);
  m.impl("unpack_s4", &unpack_s4_impl);
}
#endif

}  // namespace lowbit::ops
