// lowbit::io: checkpoints in the safetensors format, torch-free (usable from C++ without Python or
// libtorch). Files written here read back in the Python `safetensors` library and vice versa.
//
// Format: 8 bytes little-endian uint64 N; N bytes of UTF-8 JSON (an object: tensor name ->
// {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__": {str: str});
// then the data buffer. Offsets are relative to the buffer; data is little-endian, row-major.
//
// The reader treats every file as hostile: whatever the bytes, it returns a Status (never aborts, never
// reads outside the file). It enforces the Python library's rules (header <= 100 MB and inside the file,
// byte sizes agree with dtype x shape with overflow-checked arithmetic, tensors tile the buffer exactly
// from 0 to its end with no gap or overlap) and is stricter where a lenient reading would hide a broken
// writer: duplicate JSON keys (so duplicate tensor names), unknown keys in a tensor entry, and null /
// booleans / floats anywhere are errors.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"

namespace lowbit::io {

// The Python library's cap; a larger header is treated as corrupt rather than allocated.
constexpr uint64_t kMaxHeaderSize = 100'000'000;

using Metadata = std::map<std::string, std::string>;

// One tensor entry of a parsed header. dtype uses the safetensors spelling ("F32", "BF16", "I8", ...).
struct TensorInfo {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // [begin, end) in the data buffer
};

// One tensor to write: raw little-endian row-major bytes, nbytes == numel x itemsize.
struct TensorView {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  uint64_t nbytes = 0;
};

// Bits per element of a safetensors dtype (F4 = 4, F6_* = 6, BOOL = 8, ...); 0 if the name is unknown.
int dtype_bits(const std::string& dtype);

// Byte size of a tensor: numel x bits / 8, with overflow checks; an element count that does not fill
// whole bytes (sub-byte dtypes) is an error, as in the Python library.
Status tensor_nbytes(const std::string& dtype, const std::vector<int64_t>& shape, uint64_t* nbytes);

// Parses and validates the JSON header text (json, n bytes) of a file whose data buffer holds
// buffer_size bytes. infos come back in buffer order (by offset).
Status parse_header_json(const char* json, size_t n, uint64_t buffer_size, std::vector<TensorInfo>* infos,
                         Metadata* metadata);

// Parses and validates a whole safetensors file held in memory (data, size: every byte of it).
// buffer_offset (optional) receives 8 + N, where the data buffer starts.
Status parse_header(const uint8_t* data, size_t size, std::vector<TensorInfo>* infos, Metadata* metadata,
                    uint64_t* buffer_offset = nullptr);

// "__metadata__"-style JSON object of strings <-> map. An empty or all-whitespace text is an empty map.
Status parse_metadata_json(const std::string& json, Metadata* metadata);
std::string metadata_to_json(const Metadata& metadata);

// Builds the bytes of a file in memory / writes it. Tensors are laid out as the Python library does
// (by dtype alignment, largest first, then by name), so both libraries write identical bytes for the
// same tensors and no metadata. The header is padded with spaces to a multiple of 8 bytes, which
// keeps every tensor 8-byte aligned in the file. Errors: duplicate or reserved ("__metadata__") names,
// unknown dtypes, negative dims, nbytes that disagree with dtype x shape, non-UTF-8 strings.
Status serialize(const std::vector<TensorView>& tensors, const Metadata& metadata, std::vector<uint8_t>* out);
// Writes to "<path>.tmp" then renames it over path, so a crash mid-write never leaves a truncated
// checkpoint under the final name.
Status write_file(const std::string& path, const std::vector<TensorView>& tensors, const Metadata& metadata = {});

// A validated file kept open: the header is read and checked by open(); tensor bytes are read on
// demand, straight into the caller's memory (e.g. a freshly allocated tensor, so loading needs no
// second copy). read() uses positional reads (pread) and may be called from several threads.
class Reader {
 public:
  Reader() = default;
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  Reader(Reader&& other) noexcept;
  Reader& operator=(Reader&& other) noexcept;

  Status open(const std::string& path);
  void close();
  bool is_open() const { return fd_ >= 0; }

  const std::vector<TensorInfo>& tensors() const { return infos_; }
  const Metadata& metadata() const { return metadata_; }
  uint64_t buffer_size() const { return buffer_size_; }
  const std::string& path() const { return path_; }

  // Reads the end - begin bytes of tensors()[index] into dst.
  Status read(size_t index, void* dst) const;
  // Reads nbytes at offset of the data buffer into dst (range-checked against the buffer).
  Status read_buffer(uint64_t offset, uint64_t nbytes, void* dst) const;

 private:
  int fd_ = -1;
  std::string path_;
  uint64_t buffer_offset_ = 0, buffer_size_ = 0;
  std::vector<TensorInfo> infos_;
  Metadata metadata_;
};

// Reads a whole file: the validated header and the data buffer in one piece (tensor i's bytes are
// buffer[infos[i].begin, infos[i].end)).
Status read_file(const std::string& path, std::vector<TensorInfo>* infos, std::vector<uint8_t>* buffer,
                 Metadata* metadata = nullptr);

}  // namespace lowbit::io
