// safetensors reader and writer (see include/lowbit/io/safetensors.h). Torch-free; the JSON layer is
// our own: a schema-driven recursive-descent parser that only knows what a safetensors header can
// hold (objects, arrays, strings, non-negative integers), so no DOM is built and memory stays
// proportional to what the header describes.
#include "lowbit/io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <set>
#include <utility>

// Tensor bytes are copied verbatim between memory and file, and the file format is little-endian.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lowbit safetensors I/O assumes a little-endian host"
#endif

namespace lowbit::io {
namespace {

// ---------------------------------------------------------------------------------------------------
// dtypes. rank is the position in the Python library's Dtype enum, which orders by alignment; its
// writer sorts by rank (descending) then name, and so do we, to write byte-identical files.
struct DtypeDesc {
  const char* name;
  int bits;
  int rank;
};
constexpr DtypeDesc kDtypes[] = {
    {"BOOL", 8, 0},         {"F4", 4, 1},           {"F6_E2M3", 6, 2},  {"F6_E3M2", 6, 3},   {"U8", 8, 4},
    {"I8", 8, 5},           {"F8_E5M2", 8, 6},      {"F8_E4M3", 8, 7},  {"F8_E8M0", 8, 8},   {"F8_E4M3FNUZ", 8, 9},
    {"F8_E5M2FNUZ", 8, 10}, {"I16", 16, 11},        {"U16", 16, 12},    {"F16", 16, 13},     {"BF16", 16, 14},
    {"I32", 32, 15},        {"U32", 32, 16},        {"F32", 32, 17},    {"C64", 64, 18},     {"F64", 64, 19},
    {"I64", 64, 20},        {"U64", 64, 21},
};

const DtypeDesc* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Names come from untrusted files; quote them and keep error messages printable and bounded.
std::string quoted(const std::string& s) {
  std::string out = "'";
  const size_t limit = 200;
  for (size_t i = 0; i < s.size() && i < limit; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > limit) out += "...";
  return out + "'";
}

Status nbytes_of(const DtypeDesc& d, const std::vector<int64_t>& shape, uint64_t* nbytes) {
  // Left-to-right checked products, as the Python library does (so both reject the same shapes).
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return Status::invalid("negative dimension in shape " + shape_str(shape));
    const uint64_t u = static_cast<uint64_t>(dim);
    if (u != 0 && numel > std::numeric_limits<uint64_t>::max() / u)
      return Status::invalid("element count of shape " + shape_str(shape) + " overflows 64 bits");
    numel *= u;
  }
  const uint64_t bits = static_cast<uint64_t>(d.bits);
  if (numel > std::numeric_limits<uint64_t>::max() / bits)
    return Status::invalid("byte size of shape " + shape_str(shape) + " with dtype " + d.name + " overflows 64 bits");
  if ((numel * bits) % 8 != 0)
    return Status::invalid("shape " + shape_str(shape) + " with sub-byte dtype " + d.name +
                           " does not fill a whole number of bytes");
  *nbytes = numel * bits / 8;
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// UTF-8: one code point at p (p < end). Strict (RFC 3629): no overlong forms, no surrogates, <= U+10FFFF.
// Returns its length in bytes, 0 if invalid.
size_t utf8_sequence_length(const unsigned char* p, const unsigned char* end) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;  // overlong
    if (c == 0xED) hi = 0x9F;  // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;  // overlong
    if (c == 0xF4) hi = 0x8F;  // > U+10FFFF
  } else {
    return 0;
  }
  if (static_cast<size_t>(end - p) < len) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t i = 2; i < len; ++i)
    if ((p[i] & 0xC0) != 0x80) return 0;
  return len;
}

bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    const size_t n = utf8_sequence_length(p, end);
    if (n == 0) return false;
    p += n;
  }
  return true;
}

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// JSON string literal, escaped as serde_json (the Python library's JSON) does, so headers match
// byte for byte: \" \\ \b \f \n \r \t, other control characters as \u00xx, everything else verbatim.
void append_json_string(std::string* out, const std::string& s) {
  out->push_back('"');
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          *out += buf;
        } else {
          out->push_back(ch);
        }
    }
  }
  out->push_back('"');
}

// ---------------------------------------------------------------------------------------------------
// JSON reader over [p, end). Every read is bounds-checked against end; errors carry the byte offset.
class Json {
 public:
  // A safetensors header nests 3 deep (header object > tensor object > shape array), and this reader
  // only descends where the schema says so. The limit is a second guard, so that no future use of
  // parse_object / parse_array can recurse without bound on hostile input.
  static constexpr int kMaxDepth = 8;

  Json(const char* data, size_t n) : begin_(data), p_(data), end_(data + n) {}

  Status error(const std::string& what) const {
    return Status::invalid("invalid header JSON at byte " + std::to_string(p_ - begin_) + ": " + what);
  }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  bool at_end() const { return p_ >= end_; }
  bool next_is(char c) const { return p_ < end_ && *p_ == c; }

  // What the next value is, for "expected X, got Y" messages.
  const char* next_kind() const {
    if (p_ >= end_) return "the end of the header";
    switch (*p_) {
      case '{': return "an object";
      case '[': return "an array";
      case '"': return "a string";
      case 't':
      case 'f': return "a boolean";
      case 'n': return "null";
      default: break;
    }
    if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) return "a number";
    return "an invalid token";
  }

  Status parse_string(std::string* out) {
    out->clear();
    if (p_ >= end_ || *p_ != '"') return error(std::string("expected a string, got ") + next_kind());
    ++p_;
    while (true) {
      if (p_ >= end_) return error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        ++p_;
        return Status::ok();
      }
      if (c == '\\') {
        ++p_;
        if (p_ >= end_) return error("unterminated escape sequence");
        const char e = *p_++;
        switch (e) {
          case '"': out->push_back('"'); break;
          case '\\': out->push_back('\\'); break;
          case '/': out->push_back('/'); break;
          case 'b': out->push_back('\b'); break;
          case 'f': out->push_back('\f'); break;
          case 'n': out->push_back('\n'); break;
          case 'r': out->push_back('\r'); break;
          case 't': out->push_back('\t'); break;
          case 'u': {
            uint32_t cp;
            Status s = parse_hex4(&cp);
            if (!s.is_ok()) return s;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return error("unpaired low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              // A high surrogate must be followed by an escaped low surrogate (UTF-16 pair).
              if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return error("unpaired high surrogate in \\u escape");
              p_ += 2;
              uint32_t lo;
              s = parse_hex4(&lo);
              if (!s.is_ok()) return s;
              if (lo < 0xDC00 || lo > 0xDFFF) return error("high surrogate not followed by a low surrogate");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            append_utf8(out, cp);
            break;
          }
          default: return error(std::string("invalid escape sequence '\\") + (e >= 0x20 && e < 0x7f ? e : '?') + "'");
        }
        continue;
      }
      if (c < 0x20) return error("unescaped control character in string");
      const size_t n = utf8_sequence_length(reinterpret_cast<const unsigned char*>(p_),
                                            reinterpret_cast<const unsigned char*>(end_));
      if (n == 0) return error("invalid UTF-8 in string");
      out->append(p_, n);
      p_ += n;
    }
  }

  // A JSON number that must be a non-negative integer fitting uint64. The whole number token is
  // scanned first, so "1.5" is reported as a float rather than as "1" followed by garbage.
  Status parse_uint(uint64_t* out, const std::string& what) {
    if (p_ >= end_ || !(*p_ == '-' || (*p_ >= '0' && *p_ <= '9')))
      return error(what + " must be a non-negative integer, got " + next_kind());
    const char* start = p_;
    const bool negative = *p_ == '-';
    if (negative) ++p_;
    const char* digits = p_;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    const char* digits_end = p_;
    if (digits_end == digits) return error(what + ": '-' without digits");
    bool is_float = false;
    if (p_ < end_ && *p_ == '.') {
      is_float = true;
      ++p_;
      const char* f = p_;
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      if (p_ == f) return error(what + ": malformed number (no digits after '.')");
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      is_float = true;
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      const char* x = p_;
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
      if (p_ == x) return error(what + ": malformed number (no digits in exponent)");
    }
    const std::string token(start, static_cast<size_t>(std::min<ptrdiff_t>(p_ - start, 40)));
    if (digits_end - digits > 1 && *digits == '0') return error(what + ": number with a leading zero: " + token);
    if (is_float) return error(what + " must be an integer, got the floating-point number " + token);
    if (negative) return error(what + " must be non-negative, got " + token);
    uint64_t v = 0;
    for (const char* d = digits; d < digits_end; ++d) {
      const uint64_t digit = static_cast<uint64_t>(*d - '0');
      if (v > (std::numeric_limits<uint64_t>::max() - digit) / 10)
        return error(what + " is too large (more than 2^64 - 1): " + token);
      v = v * 10 + digit;
    }
    *out = v;
    return Status::ok();
  }

  // An object; on_member(key) must consume the member's value. Duplicate keys are an error (the JSON
  // spec leaves them undefined, and for tensor names a silent "last one wins" would hide data).
  template <typename F>
  Status parse_object(const std::string& what, F&& on_member) {
    if (p_ >= end_ || *p_ != '{') return error(what + " must be a JSON object, got " + next_kind());
    if (++depth_ > kMaxDepth) return error("nesting deeper than " + std::to_string(kMaxDepth));
    ++p_;
    std::set<std::string> seen;
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      --depth_;
      return Status::ok();
    }
    std::string key;
    while (true) {
      skip_ws();
      Status s = parse_string(&key);
      if (!s.is_ok()) return s;
      if (!seen.insert(key).second) return error("duplicate key " + quoted(key) + " in " + what);
      skip_ws();
      if (p_ >= end_ || *p_ != ':') return error("expected ':' after key " + quoted(key));
      ++p_;
      skip_ws();
      s = on_member(key);
      if (!s.is_ok()) return s;
      skip_ws();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == '}') {
        ++p_;
        --depth_;
        return Status::ok();
      }
      return error("expected ',' or '}' in " + what);
    }
  }

  // An array; on_element(index) must consume the element.
  template <typename F>
  Status parse_array(const std::string& what, F&& on_element) {
    if (p_ >= end_ || *p_ != '[') return error(what + " must be a JSON array, got " + next_kind());
    if (++depth_ > kMaxDepth) return error("nesting deeper than " + std::to_string(kMaxDepth));
    ++p_;
    skip_ws();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      --depth_;
      return Status::ok();
    }
    for (size_t i = 0;; ++i) {
      skip_ws();
      Status s = on_element(i);
      if (!s.is_ok()) return s;
      skip_ws();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == ']') {
        ++p_;
        --depth_;
        return Status::ok();
      }
      return error("expected ',' or ']' in " + what);
    }
  }

 private:
  Status parse_hex4(uint32_t* cp) {
    if (end_ - p_ < 4) return error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = *p_++;
      uint32_t d;
      if (h >= '0' && h <= '9') d = static_cast<uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') d = static_cast<uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') d = static_cast<uint32_t>(h - 'A' + 10);
      else return error("invalid hex digit in \\u escape");
      v = v * 16 + d;
    }
    *cp = v;
    return Status::ok();
  }

  const char* begin_;
  const char* p_;
  const char* end_;
  int depth_ = 0;
};

Status parse_metadata_object(Json& js, Metadata* metadata) {
  std::string value;
  return js.parse_object("__metadata__", [&](const std::string& key) {
    if (!js.next_is('"'))
      return js.error("__metadata__ value of " + quoted(key) + " must be a string, got " + js.next_kind());
    Status s = js.parse_string(&value);
    if (!s.is_ok()) return s;
    (*metadata)[key] = value;
    return Status::ok();
  });
}

// One tensor entry: exactly the keys dtype, shape, data_offsets; sizes consistent.
Status parse_tensor_entry(Json& js, TensorInfo* t) {
  const std::string who = "tensor " + quoted(t->name);
  bool has_dtype = false, has_shape = false, has_offsets = false;
  const DtypeDesc* desc = nullptr;
  Status s = js.parse_object(who, [&](const std::string& key) -> Status {
    if (key == "dtype") {
      has_dtype = true;
      if (!js.next_is('"')) return js.error(who + ": dtype must be a string, got " + js.next_kind());
      Status st = js.parse_string(&t->dtype);
      if (!st.is_ok()) return st;
      desc = find_dtype(t->dtype);
      if (desc == nullptr) return js.error(who + ": unknown dtype " + quoted(t->dtype));
      return Status::ok();
    }
    if (key == "shape") {
      has_shape = true;
      t->shape.clear();
      return js.parse_array(who + " shape", [&](size_t) -> Status {
        uint64_t d;
        Status st = js.parse_uint(&d, who + ": shape dimension");
        if (!st.is_ok()) return st;
        if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          return js.error(who + ": shape dimension " + std::to_string(d) + " exceeds 2^63 - 1");
        t->shape.push_back(static_cast<int64_t>(d));
        return Status::ok();
      });
    }
    if (key == "data_offsets") {
      has_offsets = true;
      uint64_t v[2] = {0, 0};
      size_t count = 0;
      Status st = js.parse_array(who + " data_offsets", [&](size_t i) -> Status {
        if (i >= 2) return js.error(who + ": data_offsets must hold exactly 2 integers, got more");
        Status e = js.parse_uint(&v[i], who + ": data_offsets entry");
        count = i + 1;
        return e;
      });
      if (!st.is_ok()) return st;
      if (count != 2) return js.error(who + ": data_offsets must hold exactly 2 integers, got " + std::to_string(count));
      t->begin = v[0];
      t->end = v[1];
      return Status::ok();
    }
    return js.error(who + ": unknown key " + quoted(key) + " (a tensor entry has exactly dtype, shape, data_offsets)");
  });
  if (!s.is_ok()) return s;
  if (!has_dtype) return Status::invalid(who + ": missing key 'dtype'");
  if (!has_shape) return Status::invalid(who + ": missing key 'shape'");
  if (!has_offsets) return Status::invalid(who + ": missing key 'data_offsets'");
  if (t->end < t->begin)
    return Status::invalid(who + ": data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
                           "] end before they begin");
  uint64_t nbytes;
  s = nbytes_of(*desc, t->shape, &nbytes);
  if (!s.is_ok()) return Status::invalid(who + ": " + s.message);
  if (t->end - t->begin != nbytes)
    return Status::invalid(who + ": data_offsets [" + std::to_string(t->begin) + ", " + std::to_string(t->end) +
                           "] span " + std::to_string(t->end - t->begin) + " bytes but dtype " + t->dtype +
                           " with shape " + shape_str(t->shape) + " needs " + std::to_string(nbytes));
  return Status::ok();
}

Status prefixed(Status s, const std::string& prefix) {
  if (!s.is_ok()) s.message = prefix + s.message;
  return s;
}

// Validates the 8-byte length prefix against the file size; returns N.
Status check_header_length(const uint8_t* first8, uint64_t file_size, uint64_t* n) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | first8[i];
  if (v > kMaxHeaderSize)
    return Status::invalid("header length " + std::to_string(v) + " exceeds the 100 MB limit (corrupt file?)");
  if (v > file_size - 8)
    return Status::invalid("header length " + std::to_string(v) + " exceeds the " + std::to_string(file_size - 8) +
                           " bytes that follow the length field (truncated or corrupt file)");
  *n = v;
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// Writer: the order and the header text, shared by serialize() and write_file().
Status plan(const std::vector<TensorView>& tensors, const Metadata& metadata, std::vector<size_t>* order,
            std::string* header) {
  std::vector<int> ranks(tensors.size());
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorView& t = tensors[i];
    const std::string who = "tensor " + quoted(t.name);
    if (t.name == "__metadata__") return Status::invalid(who + ": the name is reserved for the metadata");
    if (!valid_utf8(t.name)) return Status::invalid(who + ": the name is not valid UTF-8");
    if (!names.insert(t.name).second) return Status::invalid(who + ": duplicate name");
    const DtypeDesc* d = find_dtype(t.dtype);
    if (d == nullptr) return Status::invalid(who + ": unknown dtype " + quoted(t.dtype));
    uint64_t nbytes;
    Status s = nbytes_of(*d, t.shape, &nbytes);
    if (!s.is_ok()) return Status::invalid(who + ": " + s.message);
    if (nbytes != t.nbytes)
      return Status::invalid(who + ": nbytes is " + std::to_string(t.nbytes) + " but dtype " + t.dtype +
                             " with shape " + shape_str(t.shape) + " needs " + std::to_string(nbytes));
    if (nbytes > 0 && t.data == nullptr) return Status::invalid(who + ": data is null");
    ranks[i] = d->rank;
  }
  for (const auto& kv : metadata)
    if (!valid_utf8(kv.first) || !valid_utf8(kv.second))
      return Status::invalid("metadata entry " + quoted(kv.first) + " is not valid UTF-8");

  order->resize(tensors.size());
  for (size_t i = 0; i < order->size(); ++i) (*order)[i] = i;
  std::sort(order->begin(), order->end(), [&](size_t a, size_t b) {
    if (ranks[a] != ranks[b]) return ranks[a] > ranks[b];
    return tensors[a].name < tensors[b].name;  // bytewise, as Rust's String ordering
  });

  // Compact JSON in the Python library's layout: metadata first, then tensors in buffer order.
  std::string& h = *header;
  h = "{";
  bool first = true;
  if (!metadata.empty()) {
    h += "\"__metadata__\":" + metadata_to_json(metadata);
    first = false;
  }
  uint64_t offset = 0;
  for (size_t i : *order) {
    const TensorView& t = tensors[i];
    if (!first) h += ',';
    first = false;
    append_json_string(&h, t.name);
    h += ":{\"dtype\":";
    append_json_string(&h, t.dtype);
    h += ",\"shape\":[";
    for (size_t k = 0; k < t.shape.size(); ++k) h += (k ? "," : "") + std::to_string(t.shape[k]);
    if (t.nbytes > std::numeric_limits<uint64_t>::max() - offset) return Status::invalid("total size overflows 64 bits");
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.nbytes) + "]}";
    offset += t.nbytes;
  }
  h += '}';
  // Spaces (JSON whitespace) up to a multiple of 8: the buffer then starts 8-byte aligned in the file.
  h.append((8 - h.size() % 8) % 8, ' ');
  if (h.size() > kMaxHeaderSize) return Status::invalid("header of " + std::to_string(h.size()) + " bytes exceeds the 100 MB limit");
  return Status::ok();
}

void put_le64(uint8_t* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}

std::string errno_text() { return std::strerror(errno); }

// pread until n bytes are in, retrying interrupted and short reads; large reads go in 1 GiB pieces
// (Linux transfers at most ~2 GiB per call).
Status pread_full(int fd, void* dst, uint64_t n, uint64_t offset) {
  auto* out = static_cast<uint8_t*>(dst);
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, uint64_t(1) << 30));
    const ssize_t got = ::pread(fd, out, chunk, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status::invalid("read failed: " + errno_text());
    }
    if (got == 0) return Status::invalid("unexpected end of file (was it truncated while being read?)");
    out += got;
    n -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return Status::ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
int dtype_bits(const std::string& dtype) {
  const DtypeDesc* d = find_dtype(dtype);
  return d ? d->bits : 0;
}

Status tensor_nbytes(const std::string& dtype, const std::vector<int64_t>& shape, uint64_t* nbytes) {
  const DtypeDesc* d = find_dtype(dtype);
  if (d == nullptr) return Status::invalid("safetensors: unknown dtype " + quoted(dtype));
  return prefixed(nbytes_of(*d, shape, nbytes), "safetensors: ");
}

namespace {

// parse_header_json without the "safetensors: " prefix on errors (callers add their own context).
Status parse_json_impl(const char* json, size_t n, uint64_t buffer_size, std::vector<TensorInfo>* infos,
                       Metadata* metadata) {
  std::vector<TensorInfo> out;
  Metadata meta;
  Json js(json, n);
  js.skip_ws();
  Status s = js.parse_object("the header", [&](const std::string& key) -> Status {
    if (key == "__metadata__") return parse_metadata_object(js, &meta);
    TensorInfo t;
    t.name = key;
    Status e = parse_tensor_entry(js, &t);
    if (!e.is_ok()) return e;
    out.push_back(std::move(t));
    return Status::ok();
  });
  if (s.is_ok()) {
    js.skip_ws();
    if (!js.at_end()) s = js.error("unexpected data after the header object");
  }
  if (!s.is_ok()) return s;

  // The buffer must be tiled exactly: sorted by offsets (as the Python library sorts them), each tensor
  // begins where the previous one ended, the first at 0 and the last at the end of the buffer. This
  // also rules out overlaps and out-of-bounds offsets.
  std::stable_sort(out.begin(), out.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const TensorInfo& t = out[i];
    const std::string where = "tensor " + quoted(t.name) + " at data_offsets [" + std::to_string(t.begin) + ", " +
                              std::to_string(t.end) + "]";
    if (t.end > buffer_size)
      return Status::invalid(where + " lies outside the data buffer of " +
                             std::to_string(buffer_size) + " bytes (truncated file or lying offsets)");
    if (t.begin < expected)
      return Status::invalid(where + " overlaps tensor " + quoted(out[i - 1].name));
    if (t.begin > expected)
      return Status::invalid(where + " leaves a gap: bytes [" + std::to_string(expected) + ", " +
                             std::to_string(t.begin) + ") belong to no tensor");
    expected = t.end;
  }
  if (expected != buffer_size)
    return Status::invalid("the tensors cover " + std::to_string(expected) + " bytes but the data buffer holds " +
                           std::to_string(buffer_size) + " (trailing bytes belong to no tensor)");
  if (infos) *infos = std::move(out);
  if (metadata) *metadata = std::move(meta);
  return Status::ok();
}

}  // namespace

Status parse_header_json(const char* json, size_t n, uint64_t buffer_size, std::vector<TensorInfo>* infos,
                         Metadata* metadata) {
  if (json == nullptr && n > 0) return Status::invalid("safetensors: header text is null");
  return prefixed(parse_json_impl(json, n, buffer_size, infos, metadata), "safetensors: ");
}

Status parse_header(const uint8_t* data, size_t size, std::vector<TensorInfo>* infos, Metadata* metadata,
                    uint64_t* buffer_offset) {
  if (data == nullptr && size > 0) return Status::invalid("safetensors: data is null");
  if (size < 8)
    return Status::invalid("safetensors: " + std::to_string(size) +
                           " bytes cannot hold the 8-byte header length (truncated file?)");
  uint64_t n;
  Status s = check_header_length(data, size, &n);
  if (!s.is_ok()) return prefixed(s, "safetensors: ");
  s = parse_header_json(reinterpret_cast<const char*>(data + 8), static_cast<size_t>(n), size - 8 - n, infos, metadata);
  if (s.is_ok() && buffer_offset) *buffer_offset = 8 + n;
  return s;
}

Status parse_metadata_json(const std::string& json, Metadata* metadata) {
  Metadata meta;
  Json js(json.data(), json.size());
  js.skip_ws();
  if (!js.at_end()) {
    Status s = parse_metadata_object(js, &meta);
    if (s.is_ok()) {
      js.skip_ws();
      if (!js.at_end()) s = js.error("unexpected data after the metadata object");
    }
    if (!s.is_ok()) return prefixed(s, "safetensors: metadata: ");
  }
  *metadata = std::move(meta);
  return Status::ok();
}

std::string metadata_to_json(const Metadata& metadata) {
  std::string out = "{";
  bool first = true;
  for (const auto& kv : metadata) {
    if (!first) out += ',';
    first = false;
    append_json_string(&out, kv.first);
    out += ':';
    append_json_string(&out, kv.second);
  }
  return out + "}";
}

Status serialize(const std::vector<TensorView>& tensors, const Metadata& metadata, std::vector<uint8_t>* out) {
  std::vector<size_t> order;
  std::string header;
  Status s = plan(tensors, metadata, &order, &header);
  if (!s.is_ok()) return prefixed(s, "safetensors: ");
  uint64_t total = 8 + header.size();
  for (size_t i : order) total += tensors[i].nbytes;
  try {
    out->assign(total, 0);
  } catch (const std::exception&) {
    return Status::invalid("safetensors: cannot allocate " + std::to_string(total) + " bytes");
  }
  put_le64(out->data(), header.size());
  std::memcpy(out->data() + 8, header.data(), header.size());
  uint64_t pos = 8 + header.size();
  for (size_t i : order) {
    if (tensors[i].nbytes) std::memcpy(out->data() + pos, tensors[i].data, tensors[i].nbytes);
    pos += tensors[i].nbytes;
  }
  return Status::ok();
}

Status write_file(const std::string& path, const std::vector<TensorView>& tensors, const Metadata& metadata) {
  std::vector<size_t> order;
  std::string header;
  Status s = plan(tensors, metadata, &order, &header);
  if (!s.is_ok()) return prefixed(s, "safetensors: cannot write " + quoted(path) + ": ");
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return Status::invalid("safetensors: cannot create " + quoted(tmp) + ": " + errno_text());
  uint8_t len[8];
  put_le64(len, header.size());
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (size_t k = 0; ok && k < order.size(); ++k) {
    const TensorView& t = tensors[order[k]];
    if (t.nbytes) ok = std::fwrite(t.data, 1, t.nbytes, f) == t.nbytes;
  }
  const std::string werr = ok ? "" : errno_text();
  ok = (std::fclose(f) == 0) && ok;  // fclose flushes: a full disk may only show up here
  if (!ok) {
    const std::string err = werr.empty() ? errno_text() : werr;
    std::remove(tmp.c_str());
    return Status::invalid("safetensors: writing " + quoted(tmp) + " failed: " + err);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = errno_text();
    std::remove(tmp.c_str());
    return Status::invalid("safetensors: cannot rename " + quoted(tmp) + " to " + quoted(path) + ": " + err);
  }
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
Reader::~Reader() { close(); }

Reader::Reader(Reader&& o) noexcept { *this = std::move(o); }

Reader& Reader::operator=(Reader&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = std::exchange(o.fd_, -1);
    path_ = std::move(o.path_);
    buffer_offset_ = o.buffer_offset_;
    buffer_size_ = o.buffer_size_;
    infos_ = std::move(o.infos_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

void Reader::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  infos_.clear();
  metadata_.clear();
  buffer_offset_ = buffer_size_ = 0;
}

Status Reader::open(const std::string& path) {
  close();
  path_ = path;
  const std::string pre = "safetensors: " + quoted(path) + ": ";
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Status::invalid(pre + "cannot open: " + errno_text());
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string err = errno_text();
    ::close(fd);
    return Status::invalid(pre + "cannot stat: " + err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::invalid(pre + "not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  Status s;
  uint64_t n = 0;
  std::string json;
  uint8_t first8[8];
  if (file_size < 8) {
    s = Status::invalid("the file has " + std::to_string(file_size) +
                        " bytes, too few for the 8-byte header length (truncated file?)");
  } else {
    s = pread_full(fd, first8, 8, 0);
    if (s.is_ok()) s = check_header_length(first8, file_size, &n);
    if (s.is_ok()) {
      json.resize(static_cast<size_t>(n));  // n <= 100 MB and <= the file size: a real, bounded allocation
      s = pread_full(fd, json.data(), n, 8);
    }
    if (s.is_ok()) s = parse_json_impl(json.data(), json.size(), file_size - 8 - n, &infos_, &metadata_);
  }
  if (!s.is_ok()) {
    ::close(fd);
    infos_.clear();
    metadata_.clear();
    return prefixed(s, pre);
  }
  fd_ = fd;
  buffer_offset_ = 8 + n;
  buffer_size_ = file_size - 8 - n;
  return Status::ok();
}

Status Reader::read_buffer(uint64_t offset, uint64_t nbytes, void* dst) const {
  if (fd_ < 0) return Status::invalid("safetensors: reader is not open");
  if (offset > buffer_size_ || nbytes > buffer_size_ - offset)
    return Status::invalid("safetensors: " + quoted(path_) + ": read of " + std::to_string(nbytes) + " bytes at " +
                           std::to_string(offset) + " is outside the data buffer of " + std::to_string(buffer_size_) +
                           " bytes");
  if (nbytes == 0) return Status::ok();
  if (dst == nullptr) return Status::invalid("safetensors: destination is null");
  return prefixed(pread_full(fd_, dst, nbytes, buffer_offset_ + offset), "safetensors: " + quoted(path_) + ": ");
}

Status Reader::read(size_t index, void* dst) const {
  if (index >= infos_.size())
    return Status::invalid("safetensors: tensor index " + std::to_string(index) + " out of range (" +
                           std::to_string(infos_.size()) + " tensors)");
  const TensorInfo& t = infos_[index];
  return read_buffer(t.begin, t.end - t.begin, dst);
}

Status read_file(const std::string& path, std::vector<TensorInfo>* infos, std::vector<uint8_t>* buffer,
                 Metadata* metadata) {
  Reader r;
  Status s = r.open(path);
  if (!s.is_ok()) return s;
  std::vector<uint8_t> data;
  try {
    data.resize(static_cast<size_t>(r.buffer_size()));
  } catch (const std::exception&) {
    return Status::invalid("safetensors: " + quoted(path) + ": cannot allocate " + std::to_string(r.buffer_size()) +
                           " bytes for the data");
  }
  s = r.read_buffer(0, data.size(), data.data());
  if (!s.is_ok()) return s;
  if (buffer) *buffer = std::move(data);
  if (infos) *infos = r.tensors();
  if (metadata) *metadata = r.metadata();
  return Status::ok();
}

}  // namespace lowbit::io
