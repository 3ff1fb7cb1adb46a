// lowbit::io safetensors (torch-free): round trips through memory and files, the writer's layout
// against bytes the Python library writes, hand-written valid files, every reader rule broken at least
// once (kInvalidArgument with a message naming the problem), and a seeded corruption fuzz loop (run
// it under -fsanitize=address,undefined: "no crash" there means no out-of-bounds access either).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lowbit/io/safetensors.h"

namespace {

using lowbit::Status;
using lowbit::io::Metadata;
using lowbit::io::TensorInfo;
using lowbit::io::TensorView;

std::vector<uint8_t> le64(uint64_t v) {
  std::vector<uint8_t> b(8);
  for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(v >> (8 * i));
  return b;
}

// A file from a header text (used verbatim, no padding) and a data buffer of `data_size` bytes.
std::vector<uint8_t> make_file(const std::string& header, size_t data_size) {
  std::vector<uint8_t> f(8 + header.size() + data_size);
  const auto len = le64(header.size());
  std::copy(len.begin(), len.end(), f.begin());
  std::copy(header.begin(), header.end(), f.begin() + 8);
  for (size_t i = 0; i < data_size; ++i) f[8 + header.size() + i] = static_cast<uint8_t>(i * 7 + 1);
  return f;
}

// Parses a copy held in a heap block of exactly size bytes: unlike a std::vector (whose capacity may
// exceed its size), any read past the end is caught by AddressSanitizer.
Status parse_exact(const uint8_t* data, size_t size, std::vector<TensorInfo>* infos = nullptr,
                   Metadata* meta = nullptr, uint64_t* buffer_offset = nullptr) {
  std::unique_ptr<uint8_t[]> copy(new uint8_t[size == 0 ? 1 : size]);
  if (size) std::memcpy(copy.get(), data, size);
  std::vector<TensorInfo> local;
  Metadata local_meta;
  return lowbit::io::parse_header(size == 0 ? nullptr : copy.get(), size, infos ? infos : &local,
                                  meta ? meta : &local_meta, buffer_offset);
}
Status parse_exact(const std::vector<uint8_t>& f, std::vector<TensorInfo>* infos = nullptr, Metadata* meta = nullptr,
                   uint64_t* buffer_offset = nullptr) {
  return parse_exact(f.data(), f.size(), infos, meta, buffer_offset);
}

#define EXPECT_INVALID(expr, substring)                                                       \
  do {                                                                                        \
    const Status _s = (expr);                                                                 \
    EXPECT_EQ(_s.code, Status::Code::kInvalidArgument) << "expected an error for " #expr;     \
    EXPECT_NE(_s.message.find(substring), std::string::npos)                                  \
        << "message '" << _s.message << "' lacks '" << (substring) << "'";                    \
  } while (0)

std::string temp_path(const std::string& name) { return ::testing::TempDir() + "lowbit_st_" + name; }

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Tensors with distinct byte patterns, one per dtype family, plus empty and 0-dim ones.
struct Sample {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<TensorView> views;
  void add(const std::string& name, const std::string& dtype, std::vector<int64_t> shape) {
    uint64_t n = 0;
    EXPECT_TRUE(lowbit::io::tensor_nbytes(dtype, shape, &n).is_ok());
    std::vector<uint8_t> b(n);
    for (uint64_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i * 31 + name.size() * 17 + 3);
    if (dtype == "BOOL")
      for (auto& x : b) x &= 1;
    bytes.push_back(std::move(b));
    views.push_back({name, dtype, std::move(shape), nullptr, n});
  }
  std::vector<TensorView> finish() {
    for (size_t i = 0; i < views.size(); ++i) views[i].data = bytes[i].empty() ? nullptr : bytes[i].data();
    return views;
  }
};

Sample sample() {
  Sample s;
  s.add("layer.0.weight", "F32", {3, 5});
  s.add("layer.0.scale", "F32", {});
  s.add("empty", "F16", {0, 4});
  s.add("bf", "BF16", {7});
  s.add("d", "F64", {2, 2});
  s.add("codes", "I8", {4, 3});
  s.add("u", "U8", {9});
  s.add("h", "I16", {3});
  s.add("i", "I32", {2, 1, 2});
  s.add("l", "I64", {2});
  s.add("mask", "BOOL", {5});
  s.add("f4", "F4", {6});
  s.add("nam\xc3\xa9 \"quoted\"\n", "U16", {2});
  return s;
}

// ---------------------------------------------------------------------------------------------------
TEST(Safetensors, DtypeSizes) {
  EXPECT_EQ(lowbit::io::dtype_bits("F32"), 32);
  EXPECT_EQ(lowbit::io::dtype_bits("BF16"), 16);
  EXPECT_EQ(lowbit::io::dtype_bits("BOOL"), 8);
  EXPECT_EQ(lowbit::io::dtype_bits("F4"), 4);
  EXPECT_EQ(lowbit::io::dtype_bits("F6_E2M3"), 6);
  EXPECT_EQ(lowbit::io::dtype_bits("C64"), 64);
  EXPECT_EQ(lowbit::io::dtype_bits("f32"), 0);
  uint64_t n = 0;
  ASSERT_TRUE(lowbit::io::tensor_nbytes("F32", {2, 3}, &n).is_ok());
  EXPECT_EQ(n, 24u);
  ASSERT_TRUE(lowbit::io::tensor_nbytes("F64", {}, &n).is_ok());
  EXPECT_EQ(n, 8u);
  ASSERT_TRUE(lowbit::io::tensor_nbytes("F6_E3M2", {4}, &n).is_ok());
  EXPECT_EQ(n, 3u);
  EXPECT_INVALID(lowbit::io::tensor_nbytes("F4", {3}, &n), "whole number of bytes");
  EXPECT_INVALID(lowbit::io::tensor_nbytes("X", {3}, &n), "unknown dtype");
  EXPECT_INVALID(lowbit::io::tensor_nbytes("U8", {-1}, &n), "negative");
  EXPECT_INVALID(lowbit::io::tensor_nbytes("U8", {int64_t(1) << 40, int64_t(1) << 40}, &n), "overflow");
  EXPECT_INVALID(lowbit::io::tensor_nbytes("F64", {int64_t(1) << 62}, &n), "overflow");
}

TEST(Safetensors, MemoryRoundTrip) {
  Sample s = sample();
  const auto views = s.finish();
  Metadata meta{{"format", "pt"}, {"note", "ünï\"code\"\t\x01"}};
  std::vector<uint8_t> file;
  ASSERT_TRUE(lowbit::io::serialize(views, meta, &file).is_ok());

  std::vector<TensorInfo> infos;
  Metadata meta2;
  uint64_t off = 0;
  const Status st = parse_exact(file, &infos, &meta2, &off);
  ASSERT_TRUE(st.is_ok()) << st.message;
  EXPECT_EQ(meta2, meta);
  EXPECT_EQ(off % 8, 0u) << "the header is padded to a multiple of 8";
  ASSERT_EQ(infos.size(), views.size());
  uint64_t expected_begin = 0;
  for (const TensorInfo& info : infos) {
    EXPECT_EQ(info.begin, expected_begin);
    expected_begin = info.end;
    size_t k = 0;
    while (k < views.size() && views[k].name != info.name) ++k;
    ASSERT_LT(k, views.size()) << info.name;
    EXPECT_EQ(info.dtype, views[k].dtype);
    EXPECT_EQ(info.shape, views[k].shape);
    ASSERT_EQ(info.end - info.begin, views[k].nbytes);
    EXPECT_TRUE(std::equal(s.bytes[k].begin(), s.bytes[k].end(), file.begin() + static_cast<std::ptrdiff_t>(off + info.begin)))
        << info.name;
    // Sorted by alignment, so every tensor of >= 1 byte per element sits aligned to its element size.
    const int bits = lowbit::io::dtype_bits(info.dtype);
    if (bits >= 8) EXPECT_EQ((off + info.begin) % (bits / 8), 0u) << info.name;
  }
  EXPECT_EQ(off + expected_begin, file.size());
}

TEST(Safetensors, FileRoundTrip) {
  Sample s = sample();
  const auto views = s.finish();
  const Metadata meta{{"k", "v"}};
  const std::string path = temp_path("roundtrip.safetensors");
  ASSERT_TRUE(lowbit::io::write_file(path, views, meta).is_ok());
  std::vector<uint8_t> mem;
  ASSERT_TRUE(lowbit::io::serialize(views, meta, &mem).is_ok());
  EXPECT_EQ(read_bytes(path), mem) << "write_file and serialize write the same bytes";
  EXPECT_EQ(std::fopen((path + ".tmp").c_str(), "rb"), nullptr) << "the temporary file is renamed away";

  std::vector<TensorInfo> infos;
  std::vector<uint8_t> buffer;
  Metadata meta2;
  const Status st = lowbit::io::read_file(path, &infos, &buffer, &meta2);
  ASSERT_TRUE(st.is_ok()) << st.message;
  EXPECT_EQ(meta2, meta);
  ASSERT_EQ(infos.size(), views.size());
  for (const TensorInfo& info : infos) {
    size_t k = 0;
    while (views[k].name != info.name) ++k;
    EXPECT_TRUE(std::equal(s.bytes[k].begin(), s.bytes[k].end(), buffer.begin() + static_cast<std::ptrdiff_t>(info.begin)))
        << info.name;
  }

  // The on-demand reader: each tensor straight into its own memory; bounds are checked.
  lowbit::io::Reader r;
  ASSERT_TRUE(r.open(path).is_ok());
  for (size_t i = 0; i < r.tensors().size(); ++i) {
    const TensorInfo& info = r.tensors()[i];
    std::vector<uint8_t> dst(info.end - info.begin);
    ASSERT_TRUE(r.read(i, dst.data()).is_ok());
    EXPECT_TRUE(std::equal(dst.begin(), dst.end(), buffer.begin() + static_cast<std::ptrdiff_t>(info.begin)));
  }
  uint8_t one;
  EXPECT_INVALID(r.read(r.tensors().size(), &one), "out of range");
  EXPECT_INVALID(r.read_buffer(r.buffer_size(), 1, &one), "outside the data buffer");
  EXPECT_INVALID(r.read_buffer(1, ~uint64_t(0), &one), "outside the data buffer");
  lowbit::io::Reader moved = std::move(r);
  EXPECT_TRUE(moved.is_open());
  EXPECT_FALSE(r.is_open());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  std::remove(path.c_str());
}

// The Python library (safetensors 0.8, safetensors.torch.save) wrote this header for
// {b: f16[2], a: bf16[2], c: i16[2], z: bool[1], y: u8[1], x: i8[1], w: f64[1], v: i64[1], u: i32[1],
//  t: f32[1], e: f32[0, 3], s: f32[]} with metadata {"k": "v"}. Same tensors here -> same bytes.
TEST(Safetensors, WriterLayoutMatchesPythonLibrary) {
  const std::string expected =
      R"({"__metadata__":{"k":"v"},"v":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
      R"("w":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[16,16]},)"
      R"("s":{"dtype":"F32","shape":[],"data_offsets":[16,20]},"t":{"dtype":"F32","shape":[1],"data_offsets":[20,24]},)"
      R"("u":{"dtype":"I32","shape":[1],"data_offsets":[24,28]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[28,32]},)"
      R"("b":{"dtype":"F16","shape":[2],"data_offsets":[32,36]},"c":{"dtype":"I16","shape":[2],"data_offsets":[36,40]},)"
      R"("x":{"dtype":"I8","shape":[1],"data_offsets":[40,41]},"y":{"dtype":"U8","shape":[1],"data_offsets":[41,42]},)"
      R"("z":{"dtype":"BOOL","shape":[1],"data_offsets":[42,43]}}    )";
  ASSERT_EQ(expected.size(), 688u);
  Sample s;
  s.add("b", "F16", {2});
  s.add("a", "BF16", {2});
  s.add("c", "I16", {2});
  s.add("z", "BOOL", {1});
  s.add("y", "U8", {1});
  s.add("x", "I8", {1});
  s.add("w", "F64", {1});
  s.add("v", "I64", {1});
  s.add("u", "I32", {1});
  s.add("t", "F32", {1});
  s.add("e", "F32", {0, 3});
  s.add("s", "F32", {});
  std::vector<uint8_t> file;
  ASSERT_TRUE(lowbit::io::serialize(s.finish(), {{"k", "v"}}, &file).is_ok());
  ASSERT_GE(file.size(), 8 + expected.size());
  EXPECT_EQ(std::vector<uint8_t>(file.begin(), file.begin() + 8), le64(688));
  EXPECT_EQ(std::string(file.begin() + 8, file.begin() + 8 + 688), expected);
  EXPECT_EQ(file.size(), 8 + 688 + 43u);

  // No tensors, no metadata: "{}" padded to 8 bytes (the Python library's test vector).
  ASSERT_TRUE(lowbit::io::serialize({}, {}, &file).is_ok());
  const std::vector<uint8_t> empty = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
  EXPECT_EQ(file, empty);
}

// ---------------------------------------------------------------------------------------------------
TEST(Safetensors, HandWrittenValidFiles) {
  std::vector<TensorInfo> infos;
  Metadata meta;
  // The example of the format's documentation: I32 [2, 2], 16 bytes, header not padded.
  ASSERT_TRUE(parse_exact(make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", 16), &infos)
                  .is_ok());
  ASSERT_EQ(infos.size(), 1u);
  EXPECT_EQ(infos[0].name, "test");
  EXPECT_EQ(infos[0].shape, (std::vector<int64_t>{2, 2}));

  // Whitespace everywhere, keys in any order, entries out of offset order, escapes, 0-dim and empty
  // tensors (two empties at the same offset), sub-byte dtype, metadata with escapes.
  const std::string h =
      " \t\r\n{ \"__metadata__\" : { \"a\\\"b\" : \"\\u00e9\\ud83d\\ude00\\n\\/\" } ,\n"
      "  \"second\" : { \"shape\" : [ 3 ] , \"data_offsets\" : [ 8 , 20 ] , \"dtype\" : \"F32\" } ,"
      "  \"first\\u0041\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8]},"
      "  \"e1\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[20,20]},"
      "  \"e2\":{\"dtype\":\"U8\",\"shape\":[4,0,2],\"data_offsets\":[20,20]},"
      "  \"nibbles\":{\"dtype\":\"F4\",\"shape\":[2,3],\"data_offsets\":[20,23]},"
      "  \"\xe2\x82\xac\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[23,24]} }   ";
  Status st = parse_exact(make_file(h, 24), &infos, &meta);
  ASSERT_TRUE(st.is_ok()) << st.message;
  ASSERT_EQ(infos.size(), 6u);
  EXPECT_EQ(infos[0].name, "firstA");  // buffer order
  EXPECT_TRUE(infos[0].shape.empty());
  EXPECT_EQ(infos[1].name, "second");
  EXPECT_EQ(infos[5].name, "\xe2\x82\xac");
  EXPECT_EQ(meta.at("a\"b"), "\xc3\xa9\xf0\x9f\x98\x80\n/");

  // Metadata only; an empty header object; a file with nothing but "{}".
  EXPECT_TRUE(parse_exact(make_file(R"({"__metadata__":{}})", 0)).is_ok());
  EXPECT_TRUE(parse_exact(make_file("{}", 0), &infos).is_ok());
  EXPECT_TRUE(infos.empty());
  // Largest representable dimension with a 0 elsewhere (checked multiplication, left to right).
  EXPECT_TRUE(parse_exact(make_file(R"({"a":{"dtype":"U8","shape":[0,9223372036854775807],"data_offsets":[0,0]}})", 0))
                  .is_ok());
}

struct BadCase {
  const char* what;
  std::string header;
  size_t data_size;
  const char* message;
};

TEST(Safetensors, EveryRuleBroken) {
  const std::string ok_entry = R"("dtype":"U8","shape":[2],"data_offsets":[0,2])";
  const std::vector<BadCase> cases = {
      // JSON syntax
      {"empty header", "", 0, "must be a JSON object"},
      {"not an object", R"([1,2])", 0, "must be a JSON object, got an array"},
      {"a string", R"("x")", 0, "must be a JSON object, got a string"},
      {"garbage", "hello", 0, "must be a JSON object, got an invalid token"},
      {"unterminated object", R"({"a":{)" + ok_entry + "}", 2, "expected ',' or '}'"},
      {"trailing data", R"({"a":{)" + ok_entry + "}}x", 2, "unexpected data after the header"},
      {"two objects", "{}{}", 0, "unexpected data after the header"},
      {"nul padding", std::string("{}\0\0", 4), 0, "unexpected data after the header"},
      {"missing colon", R"({"a" {)" + ok_entry + "}}", 2, "expected ':'"},
      {"trailing comma", R"({"a":{)" + ok_entry + "},}", 2, "expected a string, got"},
      {"unquoted key", R"({a:1})", 0, "expected a string"},
      {"unterminated string", R"({"abc)", 0, "unterminated string"},
      {"bad escape", R"({"a\x":{)" + ok_entry + "}}", 2, "invalid escape"},
      {"bad hex digit", R"({"a\u12g4")", 0, "invalid hex digit"},
      {"truncated \\u", R"({"a\u1)", 0, "truncated \\u escape"},
      {"lone high surrogate", R"({"\ud800":{)" + ok_entry + "}}", 2, "unpaired high surrogate"},
      {"lone low surrogate", R"({"\udc00":{)" + ok_entry + "}}", 2, "unpaired low surrogate"},
      {"bad surrogate pair", R"({"\ud800\u0041":{)" + ok_entry + "}}", 2, "not followed by a low surrogate"},
      {"control char", "{\"a\nb\":{" + ok_entry + "}}", 2, "control character"},
      {"invalid UTF-8", "{\"a\xff\":{" + ok_entry + "}}", 2, "invalid UTF-8"},
      {"overlong UTF-8", "{\"\xc0\xaf\":{" + ok_entry + "}}", 2, "invalid UTF-8"},
      {"UTF-8 surrogate", "{\"\xed\xa0\x80\":{" + ok_entry + "}}", 2, "invalid UTF-8"},
      {"truncated UTF-8", "{\"\xe2\x82", 0, "invalid UTF-8"},
      // header object
      {"duplicate tensor", R"({"a":{)" + ok_entry + R"(},"a":{)" + ok_entry + "}}", 2, "duplicate key 'a'"},
      {"entry not an object", R"({"a":[1]})", 0, "tensor 'a' must be a JSON object, got an array"},
      {"entry is null", R"({"a":null})", 0, "got null"},
      {"missing dtype", R"({"a":{"shape":[2],"data_offsets":[0,2]}})", 2, "missing key 'dtype'"},
      {"missing shape", R"({"a":{"dtype":"U8","data_offsets":[0,2]}})", 2, "missing key 'shape'"},
      {"missing offsets", R"({"a":{"dtype":"U8","shape":[2]}})", 2, "missing key 'data_offsets'"},
      {"extra key", R"({"a":{)" + ok_entry + R"(,"foo":"bar"}})", 2, "unknown key 'foo'"},
      {"duplicate field", R"({"a":{"dtype":"U8",)" + ok_entry + "}}", 2, "duplicate key 'dtype'"},
      // dtype
      {"unknown dtype", R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype 'F33'"},
      {"lowercase dtype", R"({"a":{"dtype":"float32","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype"},
      {"dtype number", R"({"a":{"dtype":1,"shape":[2],"data_offsets":[0,2]}})", 2, "dtype must be a string, got a number"},
      // shape
      {"shape not array", R"({"a":{"dtype":"U8","shape":2,"data_offsets":[0,2]}})", 2, "must be a JSON array"},
      {"negative dim", R"({"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}})", 2, "must be non-negative, got -2"},
      {"float dim", R"({"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", 2, "floating-point number 2.0"},
      {"exponent dim", R"({"a":{"dtype":"U8","shape":[2e0],"data_offsets":[0,2]}})", 2, "floating-point"},
      {"bool dim", R"({"a":{"dtype":"U8","shape":[true],"data_offsets":[0,2]}})", 2, "got a boolean"},
      {"null dim", R"({"a":{"dtype":"U8","shape":[null],"data_offsets":[0,2]}})", 2, "got null"},
      {"string dim", R"({"a":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", 2, "got a string"},
      {"nested dim", R"({"a":{"dtype":"U8","shape":[[2]],"data_offsets":[0,2]}})", 2, "got an array"},
      {"leading zero", R"({"a":{"dtype":"U8","shape":[02],"data_offsets":[0,2]}})", 2, "leading zero"},
      {"dim > int64", R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0, "exceeds 2^63"},
      {"dim > uint64", R"({"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,0]}})", 0, "too large"},
      {"numel overflow", R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}})", 0,
       "overflows 64 bits"},
      {"bytes overflow", R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0,
       "overflows 64 bits"},
      {"sub-byte remainder", R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2, "whole number of bytes"},
      // data_offsets
      {"one offset", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0]}})", 2, "exactly 2 integers, got 1"},
      {"three offsets", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}})", 2, "exactly 2 integers, got more"},
      {"offsets object", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":{"b":0}}})", 2, "must be a JSON array"},
      {"negative offset", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[-1,1]}})", 2, "non-negative"},
      {"end before begin", R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}})", 2, "end before they begin"},
      {"size mismatch", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4, "span 4 bytes but dtype F32"},
      {"past the buffer", R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 2, "outside the data buffer of 2"},
      {"huge offsets", R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}})",
       2, "outside the data buffer"},
      {"gap at start", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})", 3, "leaves a gap"},
      {"gap between", R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}})",
       3, "leaves a gap"},
      {"overlap", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
       3, "overlaps tensor 'a'"},
      {"same range twice", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
       2, "overlaps"},
      {"trailing bytes", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 3, "cover 2 bytes but the data buffer holds 3"},
      {"data but no tensors", "{}", 1, "cover 0 bytes"},
      // metadata
      {"metadata not object", R"({"__metadata__":["a"]})", 0, "__metadata__ must be a JSON object"},
      {"metadata null", R"({"__metadata__":null})", 0, "got null"},
      {"metadata number", R"({"__metadata__":{"a":1}})", 0, "value of 'a' must be a string, got a number"},
      {"metadata bool", R"({"__metadata__":{"a":false}})", 0, "got a boolean"},
      {"metadata nested", R"({"__metadata__":{"a":{}}})", 0, "got an object"},
      {"metadata duplicate", R"({"__metadata__":{"a":"1","a":"2"}})", 0, "duplicate key 'a'"},
      {"two metadata", R"({"__metadata__":{},"__metadata__":{}})", 0, "duplicate key '__metadata__'"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    const Status s = parse_exact(make_file(c.header, c.data_size));
    EXPECT_EQ(s.code, Status::Code::kInvalidArgument);
    EXPECT_NE(s.message.find(c.message), std::string::npos) << "message: " << s.message;
    EXPECT_EQ(s.message.rfind("safetensors: ", 0), 0u) << s.message;
  }
}

TEST(Safetensors, LengthPrefixRules) {
  EXPECT_INVALID(parse_exact(nullptr, 0), "cannot hold the 8-byte header length");
  const std::vector<uint8_t> seven = {2, 0, 0, 0, 0, 0, 0};
  EXPECT_INVALID(parse_exact(seven), "cannot hold the 8-byte header length");
  // N > 100 MB, however large the file claims to be.
  std::vector<uint8_t> f = make_file("{}", 0);
  const auto big = le64(100'000'001);
  std::copy(big.begin(), big.end(), f.begin());
  EXPECT_INVALID(parse_exact(f), "exceeds the 100 MB limit");
  const auto huge = le64(~uint64_t(0));
  std::copy(huge.begin(), huge.end(), f.begin());
  EXPECT_INVALID(parse_exact(f), "exceeds the 100 MB limit");
  // N beyond the end of the file (a lying or truncated header).
  f = make_file("{}", 0);
  f[0] = 3;
  EXPECT_INVALID(parse_exact(f), "exceeds the 2 bytes that follow");
  // N shorter than the JSON: the object is cut off.
  f = make_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  f[0] = static_cast<uint8_t>(f[0] - 2);
  EXPECT_INVALID(parse_exact(f), "safetensors: ");
  // A valid file cut anywhere is an error.
  std::vector<uint8_t> good;
  Sample s = sample();
  ASSERT_TRUE(lowbit::io::serialize(s.finish(), {{"k", "v"}}, &good).is_ok());
  for (size_t cut = 0; cut < good.size(); ++cut)
    EXPECT_FALSE(parse_exact(good.data(), cut).is_ok()) << "cut at " << cut;
  EXPECT_TRUE(parse_exact(good).is_ok());
}

TEST(Safetensors, WriterErrors) {
  std::vector<uint8_t> out;
  const float data[4] = {1, 2, 3, 4};
  auto view = [&](std::string name, std::string dtype, std::vector<int64_t> shape, uint64_t nbytes) {
    return TensorView{std::move(name), std::move(dtype), std::move(shape), data, nbytes};
  };
  EXPECT_INVALID(lowbit::io::serialize({view("a", "F32", {4}, 16), view("a", "F32", {4}, 16)}, {}, &out),
                 "tensor 'a': duplicate name");
  EXPECT_INVALID(lowbit::io::serialize({view("__metadata__", "F32", {4}, 16)}, {}, &out), "reserved");
  EXPECT_INVALID(lowbit::io::serialize({view("a", "FP32", {4}, 16)}, {}, &out), "unknown dtype 'FP32'");
  EXPECT_INVALID(lowbit::io::serialize({view("a", "F32", {4}, 12)}, {}, &out), "nbytes is 12 but dtype F32");
  EXPECT_INVALID(lowbit::io::serialize({view("a", "F32", {-4}, 16)}, {}, &out), "negative dimension");
  EXPECT_INVALID(lowbit::io::serialize({view("a\xff", "U8", {1}, 1)}, {}, &out), "not valid UTF-8");
  EXPECT_INVALID(lowbit::io::serialize({TensorView{"a", "U8", {1}, nullptr, 1}}, {}, &out), "data is null");
  EXPECT_INVALID(lowbit::io::serialize({}, {{"k", "\xc3"}}, &out), "not valid UTF-8");
  EXPECT_INVALID(lowbit::io::write_file(temp_path("no/such/dir/x.safetensors"), {view("a", "F32", {4}, 16)}),
                 "cannot create");
  // A tensor with no elements needs no data.
  EXPECT_TRUE(lowbit::io::serialize({TensorView{"a", "U8", {0}, nullptr, 0}}, {}, &out).is_ok());
}

TEST(Safetensors, ReaderFileErrors) {
  lowbit::io::Reader r;
  EXPECT_INVALID(r.open(temp_path("does_not_exist.safetensors")), "cannot open");
  EXPECT_INVALID(r.open(::testing::TempDir()), "not a regular file");
  const std::string path = temp_path("bad.safetensors");
  write_bytes(path, {1, 2, 3});
  EXPECT_INVALID(r.open(path), "too few for the 8-byte header length");
  std::vector<uint8_t> good;
  Sample s = sample();
  ASSERT_TRUE(lowbit::io::serialize(s.finish(), {}, &good).is_ok());
  write_bytes(path, std::vector<uint8_t>(good.begin(), good.end() - 1));
  EXPECT_INVALID(r.open(path), "lies outside the data buffer");
  EXPECT_FALSE(r.is_open());
  std::vector<TensorInfo> infos;
  std::vector<uint8_t> buffer;
  EXPECT_INVALID(lowbit::io::read_file(path, &infos, &buffer), path);
  good.push_back(0);
  write_bytes(path, good);
  EXPECT_INVALID(lowbit::io::read_file(path, &infos, &buffer), "trailing bytes");
  std::remove(path.c_str());
}

TEST(Safetensors, MetadataJson) {
  Metadata m;
  ASSERT_TRUE(lowbit::io::parse_metadata_json("", &m).is_ok());
  EXPECT_TRUE(m.empty());
  ASSERT_TRUE(lowbit::io::parse_metadata_json(" {\"a\": \"\\u00e9\", \"b\": \"\"} ", &m).is_ok());
  EXPECT_EQ(m, (Metadata{{"a", "\xc3\xa9"}, {"b", ""}}));
  EXPECT_EQ(lowbit::io::metadata_to_json({{"a", "x\"y\\z\n\x1f"}}), "{\"a\":\"x\\\"y\\\\z\\n\\u001f\"}");
  Metadata back;
  ASSERT_TRUE(lowbit::io::parse_metadata_json(lowbit::io::metadata_to_json({{"a", "x\"y\\z\n\x1f"}}), &back).is_ok());
  EXPECT_EQ(back.at("a"), "x\"y\\z\n\x1f");
  EXPECT_INVALID(lowbit::io::parse_metadata_json("{\"a\": 1}", &m), "must be a string");
  EXPECT_INVALID(lowbit::io::parse_metadata_json("{} x", &m), "unexpected data");
  EXPECT_INVALID(lowbit::io::parse_metadata_json("[]", &m), "must be a JSON object");
}

// ---------------------------------------------------------------------------------------------------
// Seeded corruption fuzzing: mutate a valid file's bytes (bit flips, byte stores, inserts, deletes,
// truncation, duplicated chunks, digit edits inside the header, rewritten length prefix) and parse.
// The parser must return (no crash, no sanitizer report); an OK result must describe a file whose
// tensors lie inside it and tile the buffer. Every 64th case also goes through the file reader.
TEST(Safetensors, CorruptionFuzz) {
  Sample s = sample();
  std::vector<uint8_t> good;
  ASSERT_TRUE(lowbit::io::serialize(s.finish(), {{"format", "pt"}, {"n\\u", "v"}}, &good).is_ok());
  uint64_t header_end = 0;
  ASSERT_TRUE(parse_exact(good, nullptr, nullptr, &header_end).is_ok());

  // LOWBIT_FUZZ_CASES / LOWBIT_FUZZ_SEED widen a local run (e.g. 200000 cases under ASan); CI uses
  // the fixed defaults, so failures reproduce.
  const char* env_cases = std::getenv("LOWBIT_FUZZ_CASES");
  const char* env_seed = std::getenv("LOWBIT_FUZZ_SEED");
  const int kCases = env_cases ? std::max(5000, std::atoi(env_cases)) : 6000;
  std::mt19937_64 rng(env_seed ? std::strtoull(env_seed, nullptr, 10) : 20240611);
  auto rnd = [&](size_t n) { return n == 0 ? size_t(0) : static_cast<size_t>(rng() % n); };
  const std::string path = temp_path("fuzz.safetensors");
  int ok_count = 0, error_count = 0;
  for (int it = 0; it < kCases; ++it) {
    std::vector<uint8_t> f = good;
    const int mutations = 1 + static_cast<int>(rnd(3));
    for (int m = 0; m < mutations; ++m) {
      // Most edits target the header, where the parser's logic is; some hit the data too.
      const size_t hot = std::min<size_t>(f.size(), static_cast<size_t>(header_end));
      const size_t pos = rnd(4) ? rnd(hot) : rnd(f.size());
      switch (rnd(10)) {
        case 0:
          if (!f.empty()) f[pos % f.size()] ^= static_cast<uint8_t>(1u << rnd(8));
          break;
        case 1:
          if (!f.empty()) f[pos % f.size()] = static_cast<uint8_t>(rng());
          break;
        case 2: {  // insert random or structural bytes
          static const char kTokens[] = "{}[],:\"\\u0123456789-.e ";
          const size_t n = 1 + rnd(4);
          for (size_t k = 0; k < n; ++k)
            f.insert(f.begin() + static_cast<std::ptrdiff_t>(std::min(pos, f.size())),
                     rnd(2) ? static_cast<uint8_t>(rng()) : static_cast<uint8_t>(kTokens[rnd(sizeof(kTokens) - 1)]));
          break;
        }
        case 3: {  // delete a range
          if (f.empty()) break;
          const size_t at = pos % f.size();
          const size_t n = std::min(f.size() - at, 1 + rnd(16));
          f.erase(f.begin() + static_cast<std::ptrdiff_t>(at), f.begin() + static_cast<std::ptrdiff_t>(at + n));
          break;
        }
        case 4:
          f.resize(rnd(f.size() + 1));
          break;
        case 5: {  // duplicate a chunk of the header somewhere else
          if (f.size() < 2) break;
          const size_t a = rnd(f.size()), n = std::min(f.size() - a, 1 + rnd(40));
          std::vector<uint8_t> chunk(f.begin() + static_cast<std::ptrdiff_t>(a),
                                     f.begin() + static_cast<std::ptrdiff_t>(a + n));
          f.insert(f.begin() + static_cast<std::ptrdiff_t>(rnd(f.size())), chunk.begin(), chunk.end());
          break;
        }
        case 6: {  // change a digit inside the header: shapes and offsets that still parse as JSON
          for (int tries = 0; tries < 64 && hot > 8; ++tries) {
            const size_t at = 8 + rnd(hot - 8);
            if (at < f.size() && f[at] >= '0' && f[at] <= '9') {
              f[at] = static_cast<uint8_t>('0' + rnd(10));
              break;
            }
          }
          break;
        }
        case 7: {  // rewrite the length prefix near its true value, or to anything
          if (f.size() < 8) break;
          uint64_t n = 0;
          for (int i = 7; i >= 0; --i) n = (n << 8) | f[i];
          const uint64_t v = rnd(2) ? n + static_cast<uint64_t>(rnd(33)) - 16 : static_cast<uint64_t>(rng());
          const auto b = le64(v);
          std::copy(b.begin(), b.end(), f.begin());
          break;
        }
        case 8:  // overwrite tensor data: the header stays valid, so these must parse
          if (f.size() > header_end) f[header_end + rnd(f.size() - header_end)] = static_cast<uint8_t>(rng());
          break;
        default:  // append junk
          for (size_t k = 0, n = 1 + rnd(8); k < n; ++k) f.push_back(static_cast<uint8_t>(rng()));
          break;
      }
    }

    std::vector<TensorInfo> infos;
    Metadata meta;
    uint64_t off = 0;
    const Status st = parse_exact(f, &infos, &meta, &off);
    if (st.is_ok()) {
      ++ok_count;
      ASSERT_LE(off, f.size());
      uint64_t expected = 0;
      for (const TensorInfo& t : infos) {
        ASSERT_EQ(t.begin, expected);
        ASSERT_LE(t.begin, t.end);
        uint64_t n = 0;
        ASSERT_TRUE(lowbit::io::tensor_nbytes(t.dtype, t.shape, &n).is_ok());
        ASSERT_EQ(t.end - t.begin, n);
        expected = t.end;
      }
      ASSERT_EQ(off + expected, f.size());
    } else {
      ++error_count;
      ASSERT_EQ(st.code, Status::Code::kInvalidArgument);
      ASSERT_FALSE(st.message.empty());
    }
    if (it % 64 == 0) {  // the file reader must agree with the in-memory parser
      write_bytes(path, f);
      std::vector<TensorInfo> file_infos;
      std::vector<uint8_t> buffer;
      const Status fs = lowbit::io::read_file(path, &file_infos, &buffer);
      ASSERT_EQ(fs.is_ok(), st.is_ok()) << fs.message << " vs " << st.message;
      if (fs.is_ok()) {
        ASSERT_EQ(file_infos.size(), infos.size());
        ASSERT_EQ(off + buffer.size(), f.size());
        ASSERT_TRUE(std::equal(buffer.begin(), buffer.end(), f.begin() + static_cast<std::ptrdiff_t>(off)));
      }
    }
  }
  std::remove(path.c_str());
  EXPECT_EQ(ok_count + error_count, kCases);
  // Both outcomes must occur, or the mutations are not exercising the parser.
  EXPECT_GT(ok_count, 100);
  EXPECT_GT(error_count, kCases / 2);
}

}  // namespace
