// lowbit CPU per-row quantizer (quantize_rows.h): the fast paths (AVX-512 where the CPU has it, and the
// portable OpenMP path, at several thread counts) against the scalar reference bitwise, and both against
// an independent float64 reference written here from the contract (its own fp16 / bf16 decoding, double
// arithmetic); hand-computed rows (ties to even, true division, the clamp after a rounded scale, a scale
// that underflows); zero and non-finite rows; padded strides; empty calls; argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/quantize_rows_internal.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/quantize_rows.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit_test::dtype_size;
using lowbit_test::expect_invalid;

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr uint32_t kCanonicalNaN = 0x7fc00000u;
constexpr uint8_t kQPoison = 0x5A;       // q bytes outside the logical output must keep it
constexpr float kScalePoison = -777.0f;  // never a scale the kernel writes (scales are >= 0 or NaN)

uint32_t bits(float f) { return lowbit::float_to_bits(f); }

// ---------------------------------------------------------------------------------------------------
// The float64 reference, independent of the kernels' code: its own decoding of the storage formats and
// double arithmetic.

// An IEEE binary value with `ebits` exponent and `mbits` mantissa bits, exactly, as a double.
double decode_ieee(uint32_t b, int ebits, int mbits) {
  const uint32_t man = b & ((1u << mbits) - 1);
  const uint32_t exp = (b >> mbits) & ((1u << ebits) - 1);
  const bool neg = (b >> (ebits + mbits)) & 1u;
  const int bias = (1 << (ebits - 1)) - 1;
  double v;
  if (exp == (1u << ebits) - 1)
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0)
    v = std::ldexp(double(man), 1 - bias - mbits);  // subnormal
  else
    v = std::ldexp(double(man | (1u << mbits)), int(exp) - bias - mbits);
  return neg ? -v : v;
}

double decode64(DType t, const uint8_t* p) {
  if (t == DType::kFloat32) {
    uint32_t b;
    std::memcpy(&b, p, 4);
    return decode_ieee(b, 8, 23);
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return t == DType::kFloat16 ? decode_ieee(h, 5, 10) : decode_ieee(h, 8, 7);
}

struct Result {
  std::vector<int8_t> q;        // M * ldq bytes, padding included
  std::vector<float> row_scale; // M + 1 (the last one a guard)
};

// The contract in double precision. A double quotient of two fp32 values rounded once more to fp32 is
// the correctly rounded fp32 quotient wherever it is normal (53 >= 2 * 24 + 2: double rounding is
// innocuous for division), and where it is not, it is below 2^-126 and gives code 0 either way. The
// scale amax / qmax is also correct when it lands among the fp32 subnormals: amax is a multiple of 2^-149
// and qmax <= 127, so an inexact quotient is at least 2^-157 away from every subnormal midpoint, far
// more than the 2^-179 error of the double quotient. The code is then rne of that fp32 value, as the
// contract says (rounding the double quotient directly would differ next to the half-integers).
Result ref64(DType t, const std::vector<uint8_t>& x, int64_t M, int64_t N, int64_t ldx, int qmax, int64_t ldq) {
  const size_t es = dtype_size(t);
  Result r;
  r.q.assign(size_t(M * ldq), int8_t(kQPoison));
  r.row_scale.assign(size_t(M + 1), kScalePoison);
  for (int64_t i = 0; i < M; ++i) {
    std::vector<double> v(static_cast<size_t>(N));
    double amax = 0.0;
    bool finite = true;
    for (int64_t j = 0; j < N; ++j) {
      v[size_t(j)] = decode64(t, &x[size_t(i * ldx + j) * es]);
      if (!std::isfinite(v[size_t(j)])) finite = false;
      else amax = std::max(amax, std::fabs(v[size_t(j)]));
    }
    int8_t* q = &r.q[size_t(i * ldq)];
    if (!finite || amax == 0.0) {
      r.row_scale[size_t(i)] = finite ? 0.0f : kNaN;
      for (int64_t j = 0; j < N; ++j) q[j] = 0;
      continue;
    }
    const float s = float(amax / double(qmax));
    r.row_scale[size_t(i)] = s;
    for (int64_t j = 0; j < N; ++j) {
      const float quot = float(v[size_t(j)] / double(s));  // s == 0 (underflow): +-inf, or NaN for 0 / 0
      double c = std::isnan(quot) ? 0.0 : std::nearbyint(double(quot));
      c = std::min(std::max(c, double(-qmax)), double(qmax));
      q[j] = int8_t(c);
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------
// Inputs

void put(std::vector<uint8_t>& buf, size_t idx, DType t, float v) {
  if (t == DType::kFloat32) {
    std::memcpy(&buf[idx * 4], &v, 4);
  } else {
    const uint16_t h = t == DType::kFloat16 ? lowbit::float_to_half(v) : lowbit::float_to_bf16(v);
    std::memcpy(&buf[idx * 2], &h, 2);
  }
}

void put_raw16(std::vector<uint8_t>& buf, size_t idx, uint16_t h) { std::memcpy(&buf[idx * 2], &h, 2); }

// One row of one of several kinds: ordinary values over a wide range of magnitudes, all zeros, a row with
// one inf / -inf / NaN, subnormals only, exact ties after the division, near-ties, values near the top of
// the format. Elements [N, ldx) are filled with NaN: a kernel that reads them turns the row non-finite.
void fill_row(std::vector<uint8_t>& buf, DType t, int64_t i, int64_t N, int64_t ldx, int qmax, int kind,
              std::mt19937& g) {
  const size_t base = size_t(i * ldx);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int64_t> pos(0, N - 1);
  // Magnitudes the format holds without overflow (fp16 tops out at 65504).
  const int emax = t == DType::kFloat16 ? 12 : 100;
  std::uniform_int_distribution<int> ex(t == DType::kFloat16 ? -12 : -100, emax);
  const float mag = std::ldexp(1.0f, ex(g));
  for (int64_t j = 0; j < ldx; ++j) put(buf, base + size_t(j), t, kNaN);
  switch (kind) {
    case 0:  // ordinary
    default:
      for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, normal(g) * mag);
      break;
    case 1:  // +0 / -0 only
      for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, (j % 3 == 1) ? -0.0f : 0.0f);
      break;
    case 2: case 3: case 4: {  // one non-finite element anywhere in an ordinary row
      for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, normal(g) * mag);
      const float bad = kind == 2 ? kInf : (kind == 3 ? -kInf : kNaN);
      put(buf, base + size_t(pos(g)), t, bad);
      break;
    }
    case 5: {  // subnormals only (and zeros): amax / qmax may round coarsely or underflow to 0
      std::uniform_int_distribution<int> units(0, 300);
      for (int64_t j = 0; j < N; ++j) {
        const int u = units(g) * (g() % 2 ? 1 : -1);
        if (t == DType::kFloat32) {
          put(buf, base + size_t(j), t, float(u) * std::numeric_limits<float>::denorm_min());
        } else {
          const uint16_t sub = uint16_t((std::abs(u) & (t == DType::kFloat16 ? 0x3ff : 0x7f)) | (u < 0 ? 0x8000 : 0));
          put_raw16(buf, base + size_t(j), sub);
        }
      }
      break;
    }
    case 6: {  // ties: one element qmax * s sets scale s (a power of two), the rest (k + 1/2) * s
      const float s = std::ldexp(1.0f, t == DType::kFloat16 ? int(g() % 8) - 8 : int(g() % 40) - 20);
      std::uniform_int_distribution<int> k(-qmax, qmax - 1);
      for (int64_t j = 0; j < N; ++j) put(buf, base + size_t(j), t, (float(k(g)) + 0.5f) * s);
      put(buf, base + size_t(pos(g)), t, float(g() % 2 ? qmax : -qmax) * s);
      break;
    }
    case 7: {  // near-ties with a non-power-of-two scale: RN((k + 1/2) * s) and its fp32 neighbours
      const float amax = mag * 1.37f;
      const float s = amax / float(qmax);
      std::uniform_int_distribution<int> k(-qmax, qmax - 1), nb(-3, 3);
      for (int64_t j = 0; j < N; ++j) {
        float v = float((double(k(g)) + 0.5) * double(s));
        for (int n = nb(g); n != 0; n += n > 0 ? -1 : 1) v = std::nextafter(v, n > 0 ? kInf : -kInf);
        if (std::fabs(v) > amax) v = 0.25f * s;
        put(buf, base + size_t(j), t, v);
      }
      put(buf, base + size_t(pos(g)), t, -amax);
      break;
    }
    case 8:  // near the top of the format
      for (int64_t j = 0; j < N; ++j)
        put(buf, base + size_t(j), t, normal(g) * (t == DType::kFloat16 ? 20000.f : 1e38f));
      break;
  }
}

constexpr int kKinds = 9;

struct Case {
  DType t;
  int64_t M, N, ldx, ldq;
  int qmax;
  std::string str() const {
    std::ostringstream os;
    os << lowbit::dtype_name(t) << " M=" << M << " N=" << N << " ldx=" << ldx << " ldq=" << ldq << " qmax=" << qmax;
    return os.str();
  }
};

std::vector<uint8_t> make_input(const Case& c, std::mt19937& g, int kind_offset = 0) {
  std::vector<uint8_t> x(size_t(c.M * c.ldx) * dtype_size(c.t));
  for (int64_t i = 0; i < c.M; ++i) fill_row(x, c.t, i, c.N, c.ldx, c.qmax, int((i + kind_offset) % kKinds), g);
  return x;
}

// Runs `f` (the kernel call on q / row_scale) on poisoned outputs.
template <typename F>
Result run_on_poison(const Case& c, F&& f) {
  Result r;
  r.q.assign(size_t(c.M * c.ldq), int8_t(kQPoison));
  r.row_scale.assign(size_t(c.M + 1), kScalePoison);
  const Status s = f(r.q.data(), r.row_scale.data());
  EXPECT_TRUE(s.is_ok()) << s.message;
  return r;
}

Result run_ref(const Case& c, const std::vector<uint8_t>& x) {
  return run_on_poison(c, [&](int8_t* q, float* rs) {
    return lowbit::cpu::quantize_rows_s8_ref(c.t, x.data(), c.M, c.N, c.ldx, c.qmax, q, c.ldq, rs);
  });
}

// a and b hold the same bytes; NaN scales must be the canonical NaN.
void expect_same(const Result& got, const Result& want, const std::string& what) {
  ASSERT_EQ(got.q.size(), want.q.size());
  for (size_t e = 0; e < got.q.size(); ++e)
    ASSERT_EQ(int(got.q[e]), int(want.q[e])) << what << ": q byte " << e;
  ASSERT_EQ(got.row_scale.size(), want.row_scale.size());
  for (size_t i = 0; i < got.row_scale.size(); ++i) {
    if (std::isnan(want.row_scale[i])) {
      ASSERT_EQ(bits(got.row_scale[i]), kCanonicalNaN) << what << ": row_scale " << i << " = " << got.row_scale[i];
    } else {
      ASSERT_EQ(bits(got.row_scale[i]), bits(want.row_scale[i]))
          << what << ": row_scale " << i << " = " << got.row_scale[i] << ", want " << want.row_scale[i];
    }
  }
}

std::vector<bool> fast_paths() {
  std::vector<bool> v{false};
  if (lowbit::cpu::detail::quantize_rows_avx512_supported()) v.push_back(true);
  return v;
}

// ---------------------------------------------------------------------------------------------------

TEST(QuantizeRowsS8, FastAndRefMatchFloat64Reference) {
  const int64_t Ms[] = {1, 3, 9, 17};
  const int64_t Ns[] = {1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 1000, 4097};
  const int qmaxes[] = {127, 7, 1, 63};
  uint32_t seed = 1;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int64_t M : Ms)
      for (int64_t N : Ns) {
        const Case c{t, M, N, N + int64_t(seed % 3) * 5, N + int64_t(seed % 4) * 3, qmaxes[seed % 4]};
        SCOPED_TRACE(c.str());
        std::mt19937 g(seed);
        const std::vector<uint8_t> x = make_input(c, g, int(seed));
        const Result want = ref64(c.t, x, c.M, c.N, c.ldx, c.qmax, c.ldq);
        const Result ref = run_ref(c, x);
        expect_same(ref, want, "reference vs float64");
        if (HasFatalFailure()) return;
        for (bool avx512 : fast_paths())
          for (int nt : {0, 1, 3}) {
            const Result got = run_on_poison(c, [&](int8_t* q, float* rs) {
              return lowbit::cpu::detail::quantize_rows_s8_path(avx512, c.t, x.data(), c.M, c.N, c.ldx, c.qmax, q,
                                                                c.ldq, rs, nt);
            });
            expect_same(got, ref, std::string(avx512 ? "avx512" : "portable") + " threads=" + std::to_string(nt));
            if (HasFatalFailure()) return;
          }
        const Result pub = run_on_poison(c, [&](int8_t* q, float* rs) {
          return lowbit::cpu::quantize_rows_s8(c.t, x.data(), c.M, c.N, c.ldx, c.qmax, q, c.ldq, rs);
        });
        expect_same(pub, ref, "public entry point");
        if (HasFatalFailure()) return;
        ++seed;
      }
}

// Rows big enough for the parallel region (M * N >= 2^16) at gradient-like widths.
TEST(QuantizeRowsS8, LargeRowsParallel) {
  const Case cases[] = {{DType::kBFloat16, 24, 28672, 28672, 28672, 127},
                        {DType::kFloat16, 40, 4096, 4100, 4096, 127},
                        {DType::kFloat32, 33, 4097, 4097, 4104, 127}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.str());
    std::mt19937 g(seed++);
    const std::vector<uint8_t> x = make_input(c, g);
    const Result ref = run_ref(c, x);
    expect_same(ref, ref64(c.t, x, c.M, c.N, c.ldx, c.qmax, c.ldq), "reference vs float64");
    for (bool avx512 : fast_paths())
      for (int nt : {0, 2, 5}) {
        const Result got = run_on_poison(c, [&](int8_t* q, float* rs) {
          return lowbit::cpu::detail::quantize_rows_s8_path(avx512, c.t, x.data(), c.M, c.N, c.ldx, c.qmax, q, c.ldq,
                                                            rs, nt);
        });
        expect_same(got, ref, std::string(avx512 ? "avx512" : "portable") + " threads=" + std::to_string(nt));
        if (HasFatalFailure()) return;
      }
  }
}

// One fp32 row through every path: its scale and codes.
void expect_row(const std::vector<float>& row, int qmax, float want_scale, const std::vector<int8_t>& want_q) {
  const int64_t N = int64_t(row.size());
  std::vector<uint8_t> x(row.size() * 4);
  std::memcpy(x.data(), row.data(), x.size());
  const Case c{DType::kFloat32, 1, N, N, N, qmax};
  Result want;
  want.q = want_q;
  want.row_scale = {want_scale, kScalePoison};
  expect_same(run_ref(c, x), want, "reference");
  expect_same(ref64(c.t, x, 1, N, N, qmax, N), want, "float64 reference");
  for (bool avx512 : fast_paths()) {
    const Result got = run_on_poison(c, [&](int8_t* q, float* rs) {
      return lowbit::cpu::detail::quantize_rows_s8_path(avx512, c.t, x.data(), 1, N, N, qmax, q, N, rs);
    });
    expect_same(got, want, avx512 ? "avx512" : "portable");
  }
}

TEST(QuantizeRowsS8, HandComputedRows) {
  // amax 127 -> scale 1: ties go to even, both signs.
  expect_row({127.f, 2.5f, -2.5f, 3.5f, -3.5f, 0.5f, -0.5f, 1.5f, 126.5f, -126.5f, -0.f}, 127, 1.0f,
             {127, 2, -2, 4, -4, 0, 0, 2, 126, -126, 0});
  // amax 4, qmax 127: scale = RN(4 / 127); codes rne(x / scale).
  const float s4 = 4.0f / 127.0f;
  auto rne = [](float v) { return int8_t(std::nearbyint(v)); };
  expect_row({1.f, -2.f, 3.f, -4.f}, 127, s4, {rne(1.f / s4), rne(-2.f / s4), rne(3.f / s4), -127});
  // True division: scale 889 / 127 = 7 exactly; 45.5 / 7 = 6.5 -> 6, but 45.5 * RN(1/7) = 6.5000005 -> 7.
  volatile float seven = 7.0f;
  ASSERT_EQ(std::nearbyint(45.5f * (1.0f / seven)), 7.0f);
  expect_row({889.f, 45.5f, -45.5f}, 127, 7.0f, {127, 6, -6});
  // qmax 1 (ternary codes): scale = amax; |x| / amax = 1/2 is a tie -> 0.
  expect_row({-6.f, 3.f, 3.0000002f, 5.f}, 1, 6.0f, {-1, 0, 1, 1});
  // The clamp after a rounded scale: amax = 11 subnormal units, qmax 5: scale = RN(2.2 units) = 2 units,
  // and amax / scale = 5.5 -> rne 6 -> clamped to 5.
  const float u = std::numeric_limits<float>::denorm_min();
  expect_row({11 * u, -11 * u, 3 * u}, 5, 2 * u, {5, -5, 2});
  // The same at qmax 127: amax = 190 units, scale = RN(1.496 units) = 1 unit, 190 -> 127.
  expect_row({190 * u, -5 * u, 0.f}, 127, u, {127, -5, 0});
  // A scale that underflows to 0: amax = 63 units, 63 / 127 < 1/2 unit -> +0; x / 0 = +-inf clamps, 0 / 0 -> 0.
  expect_row({63 * u, -u, 0.f, -0.f, 2 * u}, 127, 0.0f, {127, -127, 0, 0, 127});
  // 64 units: 64 / 127 > 1/2 unit -> scale = 1 unit, codes = units, clamped.
  expect_row({64 * u, -u, 3 * u}, 127, u, {64, -1, 3});
  // Largest finite input: scale = RN(FLT_MAX / 127) = 0x1.020408p+121 (rounded up), so -FLT_MAX/2 gives
  // -63.499996 -> -63, not the -64 of the exact tie.
  const float big = std::numeric_limits<float>::max();
  ASSERT_EQ(big / 127.0f, 0x1.020408p+121f);
  expect_row({big, -big / 2, 1.0f}, 127, 0x1.020408p+121f, {127, -63, 0});
}

TEST(QuantizeRowsS8, ZeroAndNonFiniteRows) {
  // Rows of each dtype, by raw storage patterns. Row r of the matrix: {pattern[r], 1.0, -2.0, ...}.
  struct Row { uint32_t f32; uint16_t h; uint16_t bf; bool zero; };
  const Row specials[] = {
      {0x00000000u, 0x0000, 0x0000, true},    // +0 (the whole row is zeros)
      {0x80000000u, 0x8000, 0x8000, true},    // -0 (the whole row is zeros)
      {0x7f800000u, 0x7c00, 0x7f80, false},   // +inf
      {0xff800000u, 0xfc00, 0xff80, false},   // -inf
      {0x7fc00000u, 0x7e00, 0x7fc0, false},   // quiet NaN
      {0xffc00000u, 0xfe00, 0xffc0, false},   // negative NaN
      {0x7f800001u, 0x7c01, 0x7f81, false},   // signalling NaN, smallest payload
      {0x7fffffffu, 0x7fff, 0x7fff, false},   // NaN, largest payload
  };
  const int64_t N = 37, M = int64_t(sizeof(specials) / sizeof(specials[0])) + 1;  // + one ordinary row
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(lowbit::dtype_name(t));
    const size_t es = dtype_size(t);
    std::vector<uint8_t> x(size_t(M * N) * es);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const size_t idx = size_t(i * N + j);
        const bool ordinary = i == M - 1;
        if (!ordinary && (specials[i].zero || j == (i * 7) % N)) {  // the special at a varying column
          if (t == DType::kFloat32) std::memcpy(&x[idx * 4], &specials[i].f32, 4);
          else put_raw16(x, idx, t == DType::kFloat16 ? specials[i].h : specials[i].bf);
        } else {
          put(x, idx, t, float(j % 5) - 2.0f);  // {-2, -1, 0, 1, 2}: amax 2
        }
      }
    const Case c{t, M, N, N, N, 127};
    const Result ref = run_ref(c, x);
    expect_same(ref, ref64(t, x, M, N, N, 127, N), "reference vs float64");
    for (int64_t i = 0; i + 1 < M; ++i) {
      if (specials[i].zero) {
        EXPECT_EQ(bits(ref.row_scale[size_t(i)]), 0u) << "zero row " << i << ": scale must be +0";
      } else {
        EXPECT_EQ(bits(ref.row_scale[size_t(i)]), kCanonicalNaN) << "non-finite row " << i;
      }
      for (int64_t j = 0; j < N; ++j) EXPECT_EQ(ref.q[size_t(i * N + j)], 0) << "row " << i << " col " << j;
    }
    EXPECT_EQ(ref.row_scale[size_t(M - 1)], 2.0f / 127.0f) << "the ordinary row is independent of the others";
    for (bool avx512 : fast_paths()) {
      const Result got = run_on_poison(c, [&](int8_t* q, float* rs) {
        return lowbit::cpu::detail::quantize_rows_s8_path(avx512, t, x.data(), M, N, N, 127, q, N, rs);
      });
      expect_same(got, ref, avx512 ? "avx512" : "portable");
    }
  }
}

// fp16 and bf16 subnormal and extreme inputs, by raw patterns.
TEST(QuantizeRowsS8, HalfAndBf16RawInputs) {
  // fp16: 2^-24 (smallest subnormal), 3 * 2^-24, -0x3ff * 2^-24 (largest subnormal), 65504 (largest).
  const std::vector<uint16_t> h = {0x0001, 0x0003, 0x83FF, 0x0000};
  const std::vector<uint16_t> h2 = {0x7BFF, 0xFBFF, 0x3C00, 0x0001};
  // bf16: 1.0, -3.5, 1.5, and the largest finite 0x7F7F.
  const std::vector<uint16_t> b = {0x3F80, 0xC060, 0x3FC0, 0x7F7F};
  struct In { DType t; const std::vector<uint16_t>* v; int qmax; };
  for (const In& in : {In{DType::kFloat16, &h, 127}, In{DType::kFloat16, &h2, 127}, In{DType::kBFloat16, &b, 127},
                       In{DType::kFloat16, &h, 3}, In{DType::kBFloat16, &b, 7}}) {
    const int64_t N = int64_t(in.v->size());
    std::vector<uint8_t> x(size_t(N) * 2);
    std::memcpy(x.data(), in.v->data(), x.size());
    const Case c{in.t, 1, N, N, N, in.qmax};
    const Result want = ref64(in.t, x, 1, N, N, in.qmax, N);
    expect_same(run_ref(c, x), want, "reference");
    for (bool avx512 : fast_paths()) {
      const Result got = run_on_poison(c, [&](int8_t* q, float* rs) {
        return lowbit::cpu::detail::quantize_rows_s8_path(avx512, in.t, x.data(), 1, N, N, in.qmax, q, N, rs);
      });
      expect_same(got, want, avx512 ? "avx512" : "portable");
    }
  }
  // Spot values: the fp16 subnormal row at qmax 127: amax = 1023 * 2^-24, scale = RN(amax / 127).
  std::vector<uint8_t> x(h.size() * 2);
  std::memcpy(x.data(), h.data(), x.size());
  std::vector<int8_t> q(4, 99);
  float rs = 0.f;
  ASSERT_TRUE(lowbit::cpu::quantize_rows_s8_ref(DType::kFloat16, x.data(), 1, 4, 4, 127, q.data(), 4, &rs).is_ok());
  const float amax = 1023.0f * std::ldexp(1.0f, -24);
  EXPECT_EQ(bits(rs), bits(amax / 127.0f));
  EXPECT_EQ(q[2], -127);
  EXPECT_EQ(q[3], 0);
}

// Padded strides: x's padding columns hold NaN (never read), q's padding bytes keep their poison, and
// the result equals the one from a tightly packed copy.
TEST(QuantizeRowsS8, PaddedStridesLeavePaddingAlone) {
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const Case padded{t, 11, 45, 64, 53, 127};
    const Case tight{t, 11, 45, 45, 45, 127};
    std::mt19937 g(77);
    const std::vector<uint8_t> xp = make_input(padded, g);
    const size_t es = dtype_size(t);
    std::vector<uint8_t> xt(size_t(tight.M * tight.N) * es);
    for (int64_t i = 0; i < tight.M; ++i)
      std::memcpy(&xt[size_t(i * tight.N) * es], &xp[size_t(i * padded.ldx) * es], size_t(tight.N) * es);
    const Result rt = run_ref(tight, xt);
    for (bool avx512 : fast_paths()) {
      const Result rp = run_on_poison(padded, [&](int8_t* q, float* rs) {
        return lowbit::cpu::detail::quantize_rows_s8_path(avx512, t, xp.data(), padded.M, padded.N, padded.ldx, 127,
                                                          q, padded.ldq, rs);
      });
      for (int64_t i = 0; i < padded.M; ++i) {
        for (int64_t j = 0; j < padded.ldq; ++j) {
          const int8_t v = rp.q[size_t(i * padded.ldq + j)];
          if (j < padded.N)
            ASSERT_EQ(v, rt.q[size_t(i * tight.N + j)]) << "row " << i << " col " << j;
          else
            ASSERT_EQ(uint8_t(v), kQPoison) << "q padding written at row " << i << " col " << j;
        }
        ASSERT_EQ(bits(rp.row_scale[size_t(i)]), bits(rt.row_scale[size_t(i)])) << "row " << i;
      }
      ASSERT_EQ(rp.row_scale[size_t(padded.M)], kScalePoison) << "row_scale written past M";
    }
  }
}

TEST(QuantizeRowsS8, EmptyIsNoOp) {
  std::vector<int8_t> q(8, 42);
  float rs[2] = {5.f, 5.f};
  const float x[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  using Fn = Status (*)(DType, const void*, int64_t, int64_t, int64_t, int32_t, int8_t*, int64_t, float*);
  for (Fn f : {Fn(&lowbit::cpu::quantize_rows_s8), Fn(&lowbit::cpu::quantize_rows_s8_ref)}) {
    EXPECT_TRUE(f(DType::kFloat32, x, 0, 4, 4, 127, q.data(), 4, rs).is_ok());
    EXPECT_TRUE(f(DType::kFloat32, x, 2, 0, 0, 127, q.data(), 0, rs).is_ok());
    EXPECT_TRUE(f(DType::kFloat32, nullptr, 0, 4, 4, 127, nullptr, 4, nullptr).is_ok());
    EXPECT_TRUE(f(DType::kBFloat16, nullptr, 3, 0, 0, 127, nullptr, 0, nullptr).is_ok());
    EXPECT_TRUE(f(DType::kFloat32, nullptr, 0, 4, 0, 127, nullptr, 0, nullptr).is_ok())
        << "ld >= N is not required when M == 0";
  }
  for (int8_t v : q) EXPECT_EQ(v, 42);
  EXPECT_EQ(rs[0], 5.f);
  EXPECT_EQ(rs[1], 5.f);
}

TEST(QuantizeRowsS8, InvalidArguments) {
  const float x[16] = {};
  std::vector<int8_t> q(16);
  float rs[4];
  using Fn = Status (*)(DType, const void*, int64_t, int64_t, int64_t, int32_t, int8_t*, int64_t, float*);
  for (Fn f : {Fn(&lowbit::cpu::quantize_rows_s8), Fn(&lowbit::cpu::quantize_rows_s8_ref)}) {
    const DType f32 = DType::kFloat32;
    int8_t* o = q.data();
    expect_invalid(f(f32, nullptr, 2, 2, 2, 127, o, 2, rs), "x null", "x must not be null");
    expect_invalid(f(f32, x, 2, 2, 2, 127, nullptr, 2, rs), "q null", "q must not be null");
    expect_invalid(f(f32, x, 2, 2, 2, 127, o, 2, nullptr), "row_scale null", "row_scale must not be null");
    expect_invalid(f(f32, x, -1, 2, 2, 127, o, 2, rs), "M < 0", "M must be >= 0, got -1");
    expect_invalid(f(f32, x, 2, -3, 2, 127, o, 2, rs), "N < 0", "N must be >= 0, got -3");
    expect_invalid(f(f32, x, 2, 2, -2, 127, o, 2, rs), "ldx < 0", "ldx must be >= 0, got -2");
    expect_invalid(f(f32, x, 2, 2, 2, 127, o, -4, rs), "ldq < 0", "ldq must be >= 0, got -4");
    expect_invalid(f(f32, x, 2, 4, 3, 127, o, 4, rs), "ldx < N", "ldx must be >= N (4), got 3");
    expect_invalid(f(f32, x, 2, 4, 4, 127, o, 2, rs), "ldq < N", "ldq must be >= N (4), got 2");
    expect_invalid(f(f32, x, 2, 2, 2, 0, o, 2, rs), "qmax 0", "qmax must be in [1, 127], got 0");
    expect_invalid(f(f32, x, 2, 2, 2, 128, o, 2, rs), "qmax 128", "qmax must be in [1, 127], got 128");
    expect_invalid(f(f32, x, 2, 2, 2, -5, o, 2, rs), "qmax < 0", "got -5");
    expect_invalid(f(DType(9), x, 2, 2, 2, 127, o, 2, rs), "bad dtype", "xtype must be");
    expect_invalid(f(f32, x, int64_t(1) << 40, 2, int64_t(1) << 30, 127, o, 2, rs), "M * ldx overflow", "M * ldx");
    expect_invalid(f(f32, x, int64_t(1) << 40, 2, 2, 127, o, int64_t(1) << 30, rs), "M * ldq overflow", "M * ldq");
    // The entry point's name starts every message.
    const Status s = f(f32, x, 2, 2, 2, 0, o, 2, rs);
    EXPECT_EQ(s.message.rfind("lowbit::cpu::quantize_rows_s8", 0), 0u) << s.message;
  }
}

}  // namespace
