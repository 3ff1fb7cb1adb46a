// safetensors checkpoints as torch ops (torch.ops.lowbit.safetensors_*) and the libtorch C++ API of
// include/lowbit/io/safetensors_torch.h. The format work (parsing, validation, layout) is the
// torch-free lowbit::io library; this file only maps dtypes and moves bytes between files and tensors.
// The schemas live here rather than in library.cpp: these ops are file I/O, not math.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <set>

#include "lowbit/io/safetensors.h"
#include "lowbit/io/safetensors_torch.h"

namespace lowbit::io {
namespace {

struct DtypePair {
  at::ScalarType torch;
  const char* st;
};
// The first ten are the dtypes the format has always had; the rest exist in both torch 2.11 and the
// Python library (same spellings as safetensors.torch uses), so files with them interchange too.
const DtypePair kDtypeMap[] = {
    {at::kFloat, "F32"},          {at::kHalf, "F16"},
    {at::kBFloat16, "BF16"},      {at::kDouble, "F64"},
    {at::kChar, "I8"},            {at::kByte, "U8"},
    {at::kShort, "I16"},          {at::kInt, "I32"},
    {at::kLong, "I64"},           {at::kBool, "BOOL"},
    {at::kUInt16, "U16"},         {at::kUInt32, "U32"},
    {at::kUInt64, "U64"},         {at::kComplexFloat, "C64"},
    {at::kFloat8_e4m3fn, "F8_E4M3"}, {at::kFloat8_e5m2, "F8_E5M2"},
    {at::kFloat8_e4m3fnuz, "F8_E4M3FNUZ"}, {at::kFloat8_e5m2fnuz, "F8_E5M2FNUZ"},
    {at::kFloat8_e8m0fnu, "F8_E8M0"},
};

const char* to_st_dtype(at::ScalarType t) {
  for (const auto& p : kDtypeMap)
    if (p.torch == t) return p.st;
  return nullptr;
}

bool from_st_dtype(const std::string& s, at::ScalarType* t) {
  for (const auto& p : kDtypeMap)
    if (s == p.st) {
      *t = p.torch;
      return true;
    }
  return false;
}

void check(const Status& s) { TORCH_CHECK(s.is_ok(), s.message); }

constexpr const char* kSaveOp = "lowbit.safetensors_save";
constexpr const char* kLoadOp = "lowbit.safetensors_load";

}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> host;  // keeps the CPU copies alive until the file is written
  std::vector<TensorView> views;
  host.reserve(tensors.size());
  views.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.defined(), kSaveOp, ": tensor '", name, "' is undefined (None)");
    TORCH_CHECK(t.layout() == at::kStrided, kSaveOp, ": tensor '", name, "' has layout ", t.layout(),
                "; only dense (strided) tensors can be saved");
    TORCH_CHECK(!t.is_meta(), kSaveOp, ": tensor '", name, "' is a meta tensor and holds no data");
    const char* st = to_st_dtype(t.scalar_type());
    TORCH_CHECK(st != nullptr, kSaveOp, ": tensor '", name, "' has dtype ", t.scalar_type(),
                ", which has no safetensors equivalent here (supported: float32, float16, bfloat16, float64, int8, "
                "uint8, int16, int32, int64, bool, uint16, uint32, uint64, complex64, float8_e4m3fn, float8_e5m2, "
                "float8_e4m3fnuz, float8_e5m2fnuz, float8_e8m0fnu)");
    // Lazy conjugate / negative views would otherwise be written as their underlying bytes.
    at::Tensor c = t.detach().to(at::kCPU).resolve_conj().resolve_neg().contiguous();
    TensorView v;
    v.name = name;
    v.dtype = st;
    v.shape.assign(c.sizes().begin(), c.sizes().end());
    v.data = c.numel() ? c.data_ptr() : nullptr;
    v.nbytes = c.nbytes();
    host.push_back(std::move(c));
    views.push_back(std::move(v));
  }
  check(write_file(path, views, metadata));
}

std::vector<std::pair<std::string, at::Tensor>> load_safetensors(const std::string& path,
                                                                 std::map<std::string, std::string>* metadata) {
  Reader r;
  check(r.open(path));
  // Map every dtype before reading any data, so an unsupported one fails fast.
  std::vector<at::ScalarType> types(r.tensors().size());
  for (size_t i = 0; i < types.size(); ++i) {
    const TensorInfo& info = r.tensors()[i];
    TORCH_CHECK(from_st_dtype(info.dtype, &types[i]), kLoadOp, ": '", path, "': tensor '", info.name, "' has dtype ",
                info.dtype, ", which lowbit cannot load as a torch tensor");
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(types.size());
  for (size_t i = 0; i < types.size(); ++i) {
    const TensorInfo& info = r.tensors()[i];
    // The header was validated: the shape's byte size equals the span read, so the read fills t exactly.
    at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(types[i]).device(at::kCPU));
    TORCH_CHECK(static_cast<uint64_t>(t.nbytes()) == info.end - info.begin, kLoadOp, ": internal size mismatch for '",
                info.name, "'");
    if (t.nbytes() > 0) check(r.read(i, t.data_ptr()));
    if (types[i] == at::kBool && t.numel() > 0) {
      // A torch bool holding a byte other than 0/1 is undefined behaviour downstream; reject it here.
      const auto* b = static_cast<const uint8_t*>(t.data_ptr());
      for (int64_t k = 0; k < t.numel(); ++k)
        TORCH_CHECK(b[k] <= 1, kLoadOp, ": '", path, "': tensor '", info.name, "' (BOOL) holds the byte value ",
                    static_cast<int>(b[k]), " at element ", k, "; BOOL data must be 0 or 1");
    }
    out.emplace_back(info.name, std::move(t));
  }
  if (metadata) *metadata = r.metadata();
  return out;
}

std::map<std::string, std::string> load_safetensors_metadata(const std::string& path) {
  Reader r;
  check(r.open(path));
  return r.metadata();
}

namespace {

void safetensors_save_op(std::string path, const c10::List<std::string>& names, at::TensorList tensors,
                         std::string metadata_json) {
  TORCH_CHECK(names.size() == tensors.size(), kSaveOp, ": got ", names.size(), " names but ", tensors.size(),
              " tensors");
  Metadata metadata;
  check(parse_metadata_json(metadata_json, &metadata));
  std::vector<std::pair<std::string, at::Tensor>> items;
  items.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) items.emplace_back(names.get(i), tensors[i]);
  save_safetensors(path, items, metadata);
}

std::tuple<std::vector<std::string>, std::vector<at::Tensor>, std::string> safetensors_load_op(std::string path) {
  Metadata metadata;
  auto items = load_safetensors(path, &metadata);
  std::vector<std::string> names;
  std::vector<at::Tensor> tensors;
  names.reserve(items.size());
  tensors.reserve(items.size());
  for (auto& [name, t] : items) {
    names.push_back(name);
    tensors.push_back(std::move(t));
  }
  return {std::move(names), std::move(tensors), metadata_to_json(metadata)};
}

std::string safetensors_metadata_op(std::string path) { return metadata_to_json(load_safetensors_metadata(path)); }

}  // namespace
}  // namespace lowbit::io

// Registered as catch-all kernels (m.def with a function): the ops take tensors of any device (save)
// or none at all (load), so there is no backend to dispatch on.
TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  // Writes tensors (moved to the CPU, made contiguous) and a JSON object of string metadata ("" or "{}"
  // for none) to a safetensors file. Names must be unique.
  m.def("safetensors_save(str path, str[] names, Tensor[] tensors, str metadata_json) -> ()",
        &lowbit::io::safetensors_save_op);
  // Reads a safetensors file: names and CPU tensors in file order, and the metadata as a JSON object.
  m.def("safetensors_load(str path) -> (str[], Tensor[], str)", &lowbit::io::safetensors_load_op);
  // The metadata of a safetensors file as a JSON object (reads only the header).
  m.def("safetensors_metadata(str path) -> str", &lowbit::io::safetensors_metadata_op);
}
