// Codes <-> the segment word layout of include/lowbit/kernels/wq.h (checkpoint writers, format
// conversions, tests). Offline work, so plain scalar code: for each column, a chunk's 32 codes of width b
// are laid end to end in a 32*b-bit little-endian bit string held in b words.
#include <string>
#include <vector>

#include "lowbit/kernels/wq.h"
#include "../validate.h"

namespace lowbit {
namespace cpu {
namespace {

// Layout-only checks (the data pointers of `layout` are not used here).
Status check_layout(const char* fn, const WqWeight& layout, int64_t* packed) {
  using validate::invalid_got;
  WqWeight probe = layout;
  probe.groups = 1;
  static const uint32_t kWord = 0;
  static const int32_t kIdx = 0;
  static const uint16_t kHalf = 0;
  probe.qweight = &kWord;
  probe.g_idx = &kIdx;
  probe.scales = probe.zeros = &kHalf;
  probe.sdtype = DType::kFloat16;
  Status st = wq_validate(fn, probe);
  if (!st.is_ok()) return st;
  *packed = wq_packed_rows(layout);
  return Status::ok();
}

}  // namespace

Status wq_pack_codes(const WqWeight& w, const int32_t* codes, uint32_t* qweight) {
  const char* fn = "wq_pack_codes";
  int64_t packed = 0;
  Status st = check_layout(fn, w, &packed);
  if (!st.is_ok()) return st;
  if (w.N == 0) return Status::ok();
  if (codes == nullptr || qweight == nullptr) return Status::invalid(std::string(fn) + ": codes or qweight is null");
  // Range check first, so that nothing is written on bad input.
  int64_t r0 = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    const int64_t lim = int64_t(1) << w.bits[s];
    for (int64_t r = r0; r < w.row_end[s]; ++r)
      for (int64_t n = 0; n < w.N; ++n) {
        const int32_t c = codes[r * w.N + n];
        if (c < 0 || c >= lim)
          return Status::invalid(std::string(fn) + ": code at row " + std::to_string(r) + ", column " +
                                 std::to_string(n) + " must be in [0, " + std::to_string(lim - 1) + "] for " +
                                 std::to_string(w.bits[s]) + "-bit segment " + std::to_string(s) + ", got " +
                                 std::to_string(c));
      }
    r0 = w.row_end[s];
  }
  for (int64_t i = 0; i < w.qrows * w.N; ++i) qweight[i] = 0;
  r0 = 0;
  int64_t q0 = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    const int b = w.bits[s];
    for (int64_t r = r0; r < w.row_end[s]; ++r) {
      const int64_t chunk = (r - r0) / 32, j = (r - r0) % 32;
      const int64_t bit = j * b, word = q0 + chunk * b + bit / 32, sh = bit % 32;
      for (int64_t n = 0; n < w.N; ++n) {
        const uint64_t c = uint32_t(codes[r * w.N + n]);
        const uint64_t v = c << sh;  // up to 39 bits: the part past 32 goes to the next word
        qweight[word * w.N + n] |= uint32_t(v);
        if (sh + b > 32) qweight[(word + 1) * w.N + n] |= uint32_t(v >> 32);
      }
    }
    q0 += (w.row_end[s] - r0 + 31) / 32 * b;
    r0 = w.row_end[s];
  }
  return Status::ok();
}

Status wq_unpack_codes(const WqWeight& w, const uint32_t* qweight, int32_t* codes) {
  const char* fn = "wq_unpack_codes";
  int64_t packed = 0;
  Status st = check_layout(fn, w, &packed);
  if (!st.is_ok()) return st;
  if (w.N == 0) return Status::ok();
  if (codes == nullptr || qweight == nullptr) return Status::invalid(std::string(fn) + ": codes or qweight is null");
  int64_t r0 = 0, q0 = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    const int b = w.bits[s];
    const uint64_t mask = (uint64_t(1) << b) - 1;
    for (int64_t r = r0; r < w.row_end[s]; ++r) {
      const int64_t chunk = (r - r0) / 32, j = (r - r0) % 32;
      const int64_t bit = j * b, word = q0 + chunk * b + bit / 32, sh = bit % 32;
      for (int64_t n = 0; n < w.N; ++n) {
        uint64_t v = qweight[word * w.N + n];
        if (sh + b > 32) v |= uint64_t(qweight[(word + 1) * w.N + n]) << 32;
        codes[r * w.N + n] = int32_t((v >> sh) & mask);
      }
    }
    q0 += (w.row_end[s] - r0 + 31) / 32 * b;
    r0 = w.row_end[s];
  }
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit
