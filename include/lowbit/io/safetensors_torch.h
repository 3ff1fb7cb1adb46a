// lowbit::io for libtorch users: safetensors checkpoints from and to at::Tensor (the same code as the
// ops torch.ops.lowbit.safetensors_save / safetensors_load and Python's lowbit.io). Errors are
// c10::Error (TORCH_CHECK) with the file and the broken rule in the message.
//
// Supported dtypes (torch <-> safetensors): float32 F32, float16 F16, bfloat16 BF16, float64 F64,
// int8 I8, uint8 U8, int16 I16, int32 I32, int64 I64, bool BOOL, and also uint16 U16, uint32 U32,
// uint64 U64, complex64 C64, float8_e4m3fn F8_E4M3, float8_e5m2 F8_E5M2, float8_e4m3fnuz F8_E4M3FNUZ,
// float8_e5m2fnuz F8_E5M2FNUZ, float8_e8m0fnu F8_E8M0. Anything else is an error naming the tensor.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace lowbit::io {

// Writes the tensors (any device: copied to the CPU, made contiguous) and string metadata to path.
// Names must be unique; the file is written to "<path>.tmp" and renamed into place.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads every tensor of a validated file as a CPU tensor of the stored dtype and shape, in file order.
// metadata (optional) receives the "__metadata__" entries.
std::vector<std::pair<std::string, at::Tensor>> load_safetensors(const std::string& path,
                                                                 std::map<std::string, std::string>* metadata = nullptr);

// The "__metadata__" entries only (reads and validates the header, not the tensor data).
std::map<std::string, std::string> load_safetensors_metadata(const std::string& path);

}  // namespace lowbit::io
