// lowbit kernel tier: shared vocabulary. Torch-free: raw pointers, int64 sizes and strides.
#pragma once
#include <cstdint>
#include <string>
#include <utility>

namespace lowbit {

// Element type of a float tensor crossing the kernel boundary.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE binary16
  kBFloat16 = 2,  // bfloat16 (8-bit exponent, 7-bit mantissa)
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Result of a kernel call. Kernels never abort: the op layer turns a bad Status into a TORCH_CHECK
// error; a torch-free caller inspects it.
struct Status {
  enum class Code : int32_t { kOk = 0, kInvalidArgument = 1, kDeviceError = 2 };
  Code code = Code::kOk;
  std::string message;

  static Status ok() { return {}; }
  static Status invalid(std::string msg) { return {Code::kInvalidArgument, std::move(msg)}; }
  static Status device(std::string msg) { return {Code::kDeviceError, std::move(msg)}; }
  bool is_ok() const { return code == Code::kOk; }
};

// One scalar (or vector) operand read in its own dtype (fp32 / fp16 / bf16, widened exactly): its address
// (host memory for the CPU kernels, device memory for the CUDA ones) and dtype.
struct ScalarArg {
  const void* p;
  DType dtype;
};

// Largest reduction length for which an int8 x int8 dot product cannot overflow int32:
// 128 * 128 * K <= 2^31 - 1  <=>  K <= 131071 (at K = 2^17 a row and column of -128s reach 2^31).
// Checked by every s8 GEMM entry point.
constexpr int64_t kMaxGemmS8K = (int64_t(1) << 17) - 1;

}  // namespace lowbit
