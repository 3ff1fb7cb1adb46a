// CUDA weight-only quantized matmul / dequantize (include/lowbit/kernels/wq.h, csrc/kernels/cuda/wq_matmul.cu).
//
// * wq_matmul against the float64 reference of wq_test_util.h (the math of wq.h on the UNPACKED codes, so
//   packing and decoding are checked too), with the documented tolerance of wq_compare:
//     |y - ref| <= 1e-5 * sum_k |x'_k| |W_kn| (+ |bias|)  +  one rounding of |ref| to the output dtype
//   (the CUDA reduction order differs from the CPU's, so the two agree to fp32 rounding, not bitwise).
//   Every run: the output is poisoned with NaN bytes first (an unwritten element fails), its row padding
//   must stay poisoned, the split-K workspace is filled with NaN bytes (its contents must be ignored), and
//   the call is made twice: both results must be bitwise equal (determinism).
// * Shapes: K = 1, 31, 33, 100, 257, 4096 x N = 1, 3, 5, 37, 130, 5504 (N % 4 != 0 and an unaligned
//   qweight take the scalar-load path, which must give the same bits as the vector path), every width
//   alone, channel-mix mixes of {8, 6, 5, 4, 3, 2, 1}, act-order g_idx (the per-row path), groups
//   straddling chunks, perm + channel_scale, asym / sym, every x dtype and sdtype, bias, M = 1, 2, 3, 5,
//   8, 9, 17, 33, padded strides (x padding is NaN), garbage in the padding bits and extra word rows,
//   columns whose scales / zeros fail the exactness test of the fast dequantization (mixed in one warp).
// * Out-of-range g_idx / perm entries are clamped (wq.h): equal to the reference with clamped indices.
// * CUDA graph capture (the split-K reduce launch included) gives the bits of a direct call.
// * wq_dequantize bitwise equal to the CPU kernel and to the fp32 formula rounded once.
// * Errors (bad segment description, null pointers, strides, dtypes, a too-small or null workspace):
//   kInvalidArgument naming the problem, nothing written. Empty shapes write nothing.
// * SanitizerSmoke: small runs of every path for racecheck / synccheck; LargeLayerShapes (K = 4096,
//   N = 5504 / 5500, 4- and 2-bit) is left out of memcheck by scripts/gpu-check's *Large* filter.
// No timing here (the speed is benchmarked elsewhere). Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/wq.h"

#include "cuda_test_util.h"
#include "wq_test_util.h"

namespace {

using lowbit::DType;
using lowbit::Status;
using lowbit::WqWeight;
using namespace lowbit_test;

constexpr double kRtol = 1e-5;

// Copies n host bytes to d + off (no-op for n == 0). Fatal failures return from here only.
void to_device(const DeviceBuffer& d, const void* h, size_t n, size_t off = 0) {
  if (n == 0) return;
  CUDA_ASSERT(cudaMemcpy(d.bytes() + off, h, n, cudaMemcpyHostToDevice));
}

// A device copy of a HostWq; `w` is its descriptor with device pointers. qoff shifts qweight by that many
// words inside its buffer (1..3: not 16-byte aligned, the scalar-load path).
struct DeviceWq {
  DeviceWq(const HostWq& h, size_t qoff_words)
      : qoff(qoff_words),
        q(4 * (h.qweight.size() + qoff_words)),
        g(4 * h.g_idx.size()),
        perm(4 * h.perm.size()),
        s(h.scales.size()),
        z(h.zeros.size()),
        cs(h.channel_scale.size()) {}
  size_t qoff;
  DeviceBuffer q, g, perm, s, z, cs;
  WqWeight w;
};

void upload_wq(const HostWq& h, DeviceWq* d) {
  ASSERT_TRUE(d->q.ok() && d->g.ok() && d->perm.ok() && d->s.ok() && d->z.ok() && d->cs.ok()) << "cudaMalloc failed";
  to_device(d->q, h.qweight.data(), 4 * h.qweight.size(), 4 * d->qoff);
  to_device(d->g, h.g_idx.data(), 4 * h.g_idx.size());
  to_device(d->perm, h.perm.data(), 4 * h.perm.size());
  to_device(d->s, h.scales.data(), h.scales.size());
  to_device(d->z, h.zeros.data(), h.zeros.size());
  to_device(d->cs, h.channel_scale.data(), h.channel_scale.size());
  d->w = h.view();
  d->w.qweight = h.qweight.empty() ? nullptr : reinterpret_cast<const uint32_t*>(d->q.bytes()) + d->qoff;
  d->w.g_idx = h.g_idx.empty() ? nullptr : reinterpret_cast<const int32_t*>(d->g.bytes());
  d->w.perm = h.perm.empty() ? nullptr : reinterpret_cast<const int32_t*>(d->perm.bytes());
  d->w.scales = h.scales.empty() ? nullptr : d->s.bytes();
  d->w.zeros = h.zeros.empty() ? nullptr : d->z.bytes();
  d->w.channel_scale = h.channel_scale.empty() ? nullptr : d->cs.bytes();
}

class CudaWq : public CudaStreamTest {
 protected:
  // Runs wq_matmul of `h` (already on the device as d) twice on a poisoned output (the workspace poisoned
  // too) and checks it against the float64 reference; *bytes_out (optional) receives the output bytes.
  // allow_half: the tensor-core permission of wq.h, checked with the looser rtol it documents.
  void run_and_check(const WqCase& c, const HostWq& h, const DeviceWq& d, std::vector<uint8_t>* bytes_out = nullptr,
                     bool allow_half = false, double rtol = kRtol) {
    WqWeight w = d.w;
    w.allow_half = allow_half;
    const int64_t M = c.M, N = h.N, K = h.K;
    const int64_t ldx = K + c.ldx_pad, ldo = N + c.ldo_pad;
    const HostFloats x = random_matrix(M, K, ldx, c.xtype, c.spec.seed * 31u + 7u, c.x_lo, c.x_hi);
    HostFloats bias;
    if (c.bias) bias = random_floats(size_t(N), c.spec.sdtype, c.spec.seed * 17u + 3u, -0.5, 0.5);
    DeviceBuffer dx(x.bytes.size()), db(bias.bytes.size());
    ASSERT_TRUE(dx.ok() && db.ok()) << "cudaMalloc failed";
    to_device(dx, x.bytes.data(), x.bytes.size());
    to_device(db, bias.bytes.data(), bias.bytes.size());
    if (HasFatalFailure()) return;

    std::vector<double> mag;
    const std::vector<double> ref = ref_matmul(h, x.values, M, ldx, c.bias ? &bias.values : nullptr, &mag);

    size_t wsb = 0;
    const Status ws_st = lowbit::cuda::wq_matmul_workspace(w, M, &wsb);
    ASSERT_TRUE(ws_st.is_ok()) << ws_st.message;
    DeviceBuffer ws(wsb);
    ASSERT_TRUE(ws.ok()) << "cudaMalloc failed";
    if (wsb > 0) CUDA_ASSERT(cudaMemset(ws.bytes(), 0xFF, wsb));  // NaN: contents must be ignored

    const size_t es = wq_dtype_size(c.xtype);
    DeviceBuffer out(size_t(M * ldo) * es);
    ASSERT_TRUE(out.ok()) << "cudaMalloc failed";
    std::vector<uint8_t> got;
    run_on_poisoned(
        out, kOutPoison, stream_,
        [&] {
          return lowbit::cuda::wq_matmul(w, dx.bytes(), c.xtype, M, ldx, c.bias ? db.bytes() : nullptr,
                                         out.bytes(), ldo, wsb > 0 ? ws.bytes() : nullptr, wsb, stream());
        },
        &got, 2);
    if (HasFatalFailure()) return;
    const std::string err = wq_compare(got.data(), c.xtype, M, N, ldo, ref, mag, rtol, kOutPoison);
    ASSERT_TRUE(err.empty()) << err << " (workspace " << wsb << " bytes)";
    if (bytes_out != nullptr) *bytes_out = std::move(got);
  }

  // One case with the tensor-core permission (allow_half) at the tolerance it documents, weights uploaded
  // aligned; require_tc: the call must take the tensor-core path.
  void run_tensor_core_case(const WqCase& c, bool require_tc) {
    const HostWq h = make_wq(c.spec);
    DeviceWq d(h, 0);
    upload_wq(h, &d);
    if (HasFatalFailure()) return;
    if (require_tc) {
      WqWeight probe = d.w;
      probe.allow_half = true;
      ASSERT_TRUE(lowbit::cuda::wq_matmul_uses_tensor_cores(probe, c.xtype, c.M));
    }
    run_and_check(c, h, d, nullptr, /*allow_half=*/true, kRtol + 2 * wq_out_eps(c.xtype));
  }

  void check_case(const WqCase& c, std::vector<uint8_t>* bytes_out = nullptr) {
    SCOPED_TRACE(describe(c));
    const HostWq h = make_wq(c.spec);
    DeviceWq d(h, c.qoff);
    upload_wq(h, &d);
    if (HasFatalFailure()) return;
    run_and_check(c, h, d, bytes_out);
  }

  // check_case over a list, stopping at the first fatal failure.
  void check_cases(const std::vector<WqCase>& cases) {
    for (const WqCase& c : cases) {
      check_case(c);
      if (HasFatalFailure()) return;
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// wq_matmul

TEST_F(CudaWq, OddShapes) { check_cases(wq_cases_odd_sizes(WqTarget::kCuda)); }

// The tensor-core path (WqWeight::allow_half: segments of 2 and 4 bits, x of the scales' 16-bit dtype,
// 2 <= M <= 64): w and x' rounded to the 16-bit type, so the bound adds two roundings (2 eps) of sum |x'||W|.
// Partial chunks, odd N, act-order (chunks with several groups), permutation, channel scale, asym, bias,
// one to four m-tiles, and split-K (K = 4096).
TEST_F(CudaWq, TensorCorePath) {
  uint32_t seed = 900;
  struct Shape { int64_t K, N, M; };
  const Shape shapes[] = {{32, 8, 1}, {100, 37, 5}, {257, 130, 16}, {4096, 96, 17}, {512, 64, 33}, {640, 40, 64}};
  for (const Shape& sh : shapes)
    for (int32_t b : {4, 2})
      for (DType t : {DType::kFloat16, DType::kBFloat16}) {
        WqCase c;
        c.spec.K = sh.K;
        c.spec.N = sh.N;
        // A 4/2-bit channel-mix (both segments in one launch) on every other large-enough case.
        if (sh.K > 96 && seed % 2 == 1)
          c.spec.segments = {{b == 4 ? 4 : 2, 64}, {b == 4 ? 2 : 4, 0}};
        else
          c.spec.segments = {{b, 0}};
        c.spec.group_size = seed % 3 == 0 ? 16 : 64;  // 16: chunks with two groups
        c.spec.act_order = seed % 5 == 0;
        c.spec.asym = seed % 2 == 0;
        c.spec.perm = seed % 3 == 1;
        c.spec.channel_scale = seed % 4 == 1;
        c.spec.garbage_padding = true;
        c.spec.sdtype = t;
        c.spec.seed = seed++;
        c.xtype = t;
        c.M = sh.M;
        c.bias = seed % 2 == 0;
        c.ldo_pad = 3;
        SCOPED_TRACE(describe(c));
        run_tensor_core_case(c, /*require_tc=*/false);
        if (HasFatalFailure()) return;
      }
}

// The warpgroup (wgmma) kernel that takes M >= 17 on an sm_90 device (2- and 4-bit segments, N % 4 == 0):
// row tiles of 32 (n = 32; on layers of >= 64 column tiles two 64-column tiles per warpgroup: N = 8200,
// the last 256-column CTA partial), 64 and 128 (two n = 64 wgmmas), 128-row tiles with a partial last one (M = 129,
// 200, 300), the 256-row tile (four n = 64; layers of >= 64 column tiles: N = 8196, M = 257 = two tiles),
// split-K (K = 4096), tail k-blocks (K = 70, 100, 257, 1000: rows past K zeroed), padded x strides,
// columns past N inside a 128-column tile, groups of 128 (one (s, z)
// per k-block), 64, 16 and act-order (k-blocks of several groups: per-row lookups), perm, channel scale,
// asym / sym, bias, garbage in the padding bits and extra word rows. Same tolerance as TensorCorePath.
// Elsewhere (no sm_90a code) the same cases check whichever path takes them.
TEST_F(CudaWq, WarpgroupPath) {
  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_ASSERT(cudaGetDevice(&dev));
  CUDA_ASSERT(cudaGetDeviceProperties(&prop, dev));
  const bool sm90 = prop.major == 9 && prop.minor == 0;
  uint32_t seed = 1700;
  struct Shape { int64_t K, N, M; };
  const Shape shapes[] = {{64, 8, 17},     {100, 132, 40},   {1000, 260, 64}, {640, 124, 200},
                          {4096, 136, 129}, {192, 256, 33},  {320, 64, 100},  {257, 68, 300},
                          {70, 8196, 257},  {320, 516, 29},  {130, 8200, 20}};
  for (const Shape& sh : shapes)
    for (int32_t b : {4, 2})
      for (DType t : {DType::kFloat16, DType::kBFloat16}) {
        WqCase c;
        c.spec.K = sh.K;
        c.spec.N = sh.N;
        // Two cases in five with K > 130 a three-segment channel-mix (96 / 32 / rest rows: segments that
        // start and end mid k-block, one launch each, partial sums over all of them), with and without perm.
        if ((seed % 5 == 2 || seed % 5 == 4) && sh.K > 130)
          c.spec.segments = {{b, 96}, {6 - b, 32}, {b, 0}};
        else
          c.spec.segments = {{b, 0}};
        const int kind = int(seed % 4);
        c.spec.group_size = kind == 0 ? 128 : (kind == 1 ? 64 : 16);
        c.spec.act_order = kind == 3;
        c.spec.asym = seed % 2 == 0;
        c.spec.perm = seed % 3 == 1;
        c.spec.channel_scale = seed % 5 == 1;
        c.spec.garbage_padding = true;
        c.spec.extra_qrows = seed % 2;
        c.spec.sdtype = t;
        c.spec.seed = seed++;
        c.xtype = t;
        c.M = sh.M;
        c.bias = seed % 3 != 0;
        c.ldx_pad = seed % 4 == 0 ? 3 : 0;
        c.ldo_pad = 5;
        SCOPED_TRACE(describe(c));
        run_tensor_core_case(c, /*require_tc=*/sm90);
        if (HasFatalFailure()) return;
      }
}

// The TMA-fed warpgroup kernel (wq_wgt.cu: one-segment views with M >= 65 and N % 8 == 0 on an sm_90 device):
// row tiles of 128 (M <= 128) and 256 with M past one and several tiles, N past a 128-column tile, K ending mid k-block and
// mid 32-row chunk, split-K (long K, few tiles), channel-mix segments (one launch each, partial sums), every
// group kind (128 and 64: one group per k-block, the expected one or not; 16 and act-order: the per-row
// path), sym / asym, perm, channel scale, garbage padding, bias, padded strides, both 16-bit dtypes.
TEST_F(CudaWq, TmaPath) {
  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_ASSERT(cudaGetDevice(&dev));
  CUDA_ASSERT(cudaGetDeviceProperties(&prop, dev));
  const bool sm90 = prop.major == 9 && prop.minor == 0;
  uint32_t seed = 2600;
  struct Shape { int64_t K, N, M; };
  const Shape shapes[] = {{4096, 136, 129}, {1000, 264, 300}, {257, 128, 256}, {70, 8200, 257},
                          {8192, 512, 600}, {640, 8, 700},    {130, 1032, 513}, {3000, 392, 140},
                          {1000, 264, 65},  {4096, 136, 100}, {257, 128, 128}};
  for (const Shape& sh : shapes)
    for (int32_t b : {4, 2})
      for (DType t : {DType::kFloat16, DType::kBFloat16}) {
        WqCase c;
        c.spec.K = sh.K;
        c.spec.N = sh.N;
        if (seed % 5 == 3 && sh.K > 130)
          c.spec.segments = {{b, 96}, {6 - b, 32}, {b, 0}};
        else
          c.spec.segments = {{b, 0}};
        const int kind = int(seed % 5);
        c.spec.group_size = kind <= 1 ? 128 : (kind == 2 ? 64 : 16);
        c.spec.act_order = kind == 4;
        c.spec.asym = seed % 2 == 0;
        c.spec.perm = seed % 3 == 1;
        c.spec.channel_scale = seed % 7 == 1;
        c.spec.garbage_padding = true;
        c.spec.extra_qrows = seed % 2;
        c.spec.sdtype = t;
        c.spec.seed = seed++;
        c.xtype = t;
        c.M = sh.M;
        c.bias = seed % 3 != 0;
        c.ldx_pad = seed % 4 == 0 ? 3 : 0;
        c.ldo_pad = seed % 2 == 0 ? 5 : 0;
        SCOPED_TRACE(describe(c));
        run_tensor_core_case(c, /*require_tc=*/sm90);
        if (HasFatalFailure()) return;
      }
}

// The tensor-core kernel on what decode runs and on its edges: M = 1 .. 64 across the row tiles of 8 and
// 16, group 128 (every k-block in one group: the fp32 per-group scale path) and group 16 (k-blocks of
// several groups: the per-row path), a 2-bit segment ending mid k-block followed by a 4-bit one (the
// rows past the segment must not count), x through the prep kernel (padded row stride, perm, channel
// scale) and read directly, garbage in padding bits and extra word rows, split-K (K = 4096). Each case
// also runs with qweight 4 bytes off alignment (the 4-byte load path): same bits as the aligned run up to
// M = 16 (from M = 17 an sm_90 device gives aligned one-segment words to the warpgroup kernel, wq_wg.cu,
// while the 4-byte path stays here: both are checked against the reference, their bits may differ).
TEST_F(CudaWq, TensorCoreDecodeShapes) {
  uint32_t seed = 1200;
  struct Shape { int64_t K, N, M; };
  const Shape shapes[] = {{4096, 256, 1}, {4096, 130, 3}, {1024, 192, 8}, {1000, 64, 9},
                          {2048, 68, 16}, {480, 256, 17}, {768, 100, 64}};
  for (const Shape& sh : shapes)
    for (int32_t b : {4, 2}) {
      WqCase c;
      c.spec.K = sh.K;
      c.spec.N = sh.N;
      if (seed % 3 == 0)
        c.spec.segments = {{2, 96}, {4, 0}};  // 96 rows: one and a half 2-bit k-blocks
      else if (seed % 3 == 1)
        c.spec.segments = {{4, 32}, {2, 0}};
      else
        c.spec.segments = {{b, 0}};
      c.spec.group_size = seed % 4 == 3 ? 16 : 128;
      c.spec.asym = seed % 2 == 0;
      c.spec.perm = seed % 5 == 2;
      c.spec.channel_scale = seed % 5 == 4;
      c.spec.garbage_padding = true;
      c.spec.extra_qrows = 3;
      c.spec.sdtype = seed % 2 == 0 ? DType::kBFloat16 : DType::kFloat16;
      c.spec.seed = seed++;
      c.xtype = c.spec.sdtype;
      c.M = sh.M;
      c.bias = seed % 3 == 0;
      c.ldx_pad = seed % 4 == 1 ? 3 : 0;
      c.ldo_pad = 2;
      SCOPED_TRACE(describe(c));
      const HostWq h = make_wq(c.spec);
      std::vector<uint8_t> aligned, shifted;
      for (size_t qoff : {size_t(0), size_t(1)}) {
        DeviceWq d(h, qoff);
        upload_wq(h, &d);
        if (HasFatalFailure()) return;
        WqWeight probe = d.w;
        probe.allow_half = true;
        ASSERT_TRUE(lowbit::cuda::wq_matmul_uses_tensor_cores(probe, c.xtype, c.M));
        run_and_check(c, h, d, qoff == 0 ? &aligned : &shifted, /*allow_half=*/true,
                      kRtol + 2 * wq_out_eps(c.xtype));
        if (HasFatalFailure()) return;
      }
      if (c.M <= 16) ASSERT_EQ(aligned, shifted) << "the 4-byte load path must give the bits of the 16-byte one";
    }
}

// The tensor-core fast path multiplies c + q (c up to 1024 fp16 / 128 bf16) and subtracts c * sum x' per
// group (wq_tc.cu): its fp32 cancellation is worst when x' has a large common part. All-positive x
// (uniform in [0.5, 4)) over long K, 2- and 4-bit, sym and asym, fp16 and bf16, groups of 128 and 64 and
// M = 1 / 12, against the float64 reference with the tolerance the tensor-core path documents (wq.h).
TEST_F(CudaWq, TensorCoreOffsetCancellation) {
  uint32_t seed = 7100;
  for (DType t : {DType::kFloat16, DType::kBFloat16})
    for (int32_t b : {2, 4})
      for (bool asym : {false, true}) {
        WqCase c;
        c.spec.K = 8192;
        c.spec.N = 192;
        c.spec.segments = {{b, 0}};
        c.spec.group_size = seed % 2 == 0 ? 128 : 64;
        c.spec.asym = asym;
        c.spec.sdtype = t;
        c.spec.seed = seed++;
        c.xtype = t;
        c.M = seed % 2 == 0 ? 1 : 12;
        c.x_lo = 0.5;
        c.x_hi = 4.0;
        SCOPED_TRACE(describe(c));
        run_tensor_core_case(c, /*require_tc=*/true);
        if (HasFatalFailure()) return;
      }
}

// The decode-sized shapes a layer runs (4-bit and 2-bit, group 128; N = 5504 is the one BIE corrupted
// memory at; N = 5500 is its scalar-path twin), M = 1 and a few rows.
TEST_F(CudaWq, LargeLayerShapes) {
  uint32_t seed = 50;
  for (int32_t b : {4, 2})
    for (int64_t N : {5504, 5500}) {
        const int64_t M = N == 5504 ? 1 : 3;
        WqCase c;
        c.spec.K = 4096;
        c.spec.N = N;
        c.spec.segments = {{b, 0}};
        c.spec.group_size = 128;
        c.spec.asym = b == 4;
        c.spec.seed = seed++;
        c.spec.sdtype = DType::kFloat16;
        c.xtype = M == 1 ? DType::kFloat16 : DType::kBFloat16;
        c.M = M;
        c.bias = M == 3;
        check_case(c);
        if (HasFatalFailure()) return;
      }
}

// Channel-mix on the tensor-core kernel above 64 Mi weights, where every segment takes a launch of its own
// (below, TensorCoreDecodeShapes: one launch for all): a 2-bit segment ending mid k-block, then 4-bit,
// M = 1 and 12 (one and two row tiles), with q_perm.
TEST_F(CudaWq, LargeChannelMixLaunchPerSegment) {
  uint32_t seed = 1400;
  for (int64_t M : {1, 12}) {
    WqCase c;
    c.spec.K = 4352;
    c.spec.N = 16384;  // K * N = 68 Mi weights
    c.spec.segments = {{2, 2080}, {4, 0}};
    c.spec.group_size = 128;
    c.spec.asym = M == 1;
    c.spec.perm = true;
    c.spec.sdtype = DType::kFloat16;
    c.spec.seed = seed++;
    c.xtype = DType::kFloat16;
    c.M = M;
    c.bias = M == 12;
    SCOPED_TRACE(describe(c));
    const HostWq h = make_wq(c.spec);
    DeviceWq d(h, 0);
    upload_wq(h, &d);
    if (HasFatalFailure()) return;
    run_and_check(c, h, d, nullptr, /*allow_half=*/true, kRtol + 2 * wq_out_eps(c.xtype));
    if (HasFatalFailure()) return;
  }
}

TEST_F(CudaWq, EveryWidthAlone) { check_cases(wq_cases_every_width(WqTarget::kCuda)); }

TEST_F(CudaWq, ChannelMixSegments) {
  check_cases(wq_cases_channel_mix());
  if (HasFatalFailure()) return;
  // A large mix: every segment long enough to be split over several blocks (and N % 4 == 0).
  WqCase c;
  c.spec.K = 2048 + 96;
  c.spec.N = 512;
  c.spec.segments = {{8, 256}, {6, 256}, {5, 512}, {4, 512}, {3, 256}, {2, 0}};
  c.spec.group_size = 128;
  c.spec.seed = 208;  // after the 8 seeds of wq_cases_channel_mix
  c.M = 2;
  c.xtype = DType::kFloat16;
  check_case(c);
}

TEST_F(CudaWq, ActOrderPermChannelScale) {
  check_cases(wq_cases_act_order_perm_cscale());
  if (HasFatalFailure()) return;
  // Act-order at a size with several splits, vector loads.
  WqCase c;
  c.spec.K = 1024;
  c.spec.N = 256;
  c.spec.group_size = 128;
  c.spec.act_order = true;
  c.spec.perm = true;
  c.spec.channel_scale = true;
  c.spec.seed = 316;  // after the 16 seeds of wq_cases_act_order_perm_cscale
  c.M = 8;
  c.xtype = DType::kFloat16;
  check_case(c);
}

// Groups of 48 rows: chunks alternate between one group and two (the per-row group path); 7: every chunk
// mixed; 1000: one group over several chunks.
TEST_F(CudaWq, GroupsStraddlingChunks) { check_cases(wq_cases_groups_straddling_chunks()); }

TEST_F(CudaWq, DtypesBiasAndRowCounts) { check_cases(wq_cases_dtypes_bias_rows(WqTarget::kCuda)); }

// The scalar-load path (qweight not 16-byte aligned) computes the same sums in the same order as the
// vector path: bitwise equal outputs.
TEST_F(CudaWq, UnalignedQweightMatchesAligned) {
  uint32_t seed = 600;
  for (int32_t b : {4, 3, 8}) {
    WqCase c;
    c.spec.K = 1000;
    c.spec.N = 260;
    c.spec.segments = {{b, 0}};
    c.spec.group_size = 128;
    c.spec.seed = seed++;
    c.M = 3;
    c.xtype = DType::kFloat16;
    c.bias = true;
    std::vector<uint8_t> aligned;
    check_case(c, &aligned);
    if (HasFatalFailure()) return;
    for (size_t qoff : {1, 2, 3}) {
      c.qoff = qoff;
      std::vector<uint8_t> got;
      check_case(c, &got);
      if (HasFatalFailure()) return;
      EXPECT_TRUE(got == aligned) << "bits " << b << " qoff " << qoff << ": differs from the aligned run";
    }
  }
}

// Scales / zeros whose fast-path constant C = s * 2^(23-P) + z is not exact in fp32 (tiny scale, large
// zero; asym: a non-integer zero point) must fall back to the generic dequantization for their thread,
// while neighbouring threads of the same warp take the fast path.
TEST_F(CudaWq, MixedFastAndGenericColumns) {
  uint32_t seed = 700;
  for (bool asym : {false, true})
    for (int64_t N : {256, 258}) {
      WqCase c;
      c.spec.K = 512;
      c.spec.N = N;
      c.spec.group_size = 128;
      c.spec.asym = asym;
      c.spec.sdtype = DType::kFloat16;
      c.spec.seed = seed++;
      c.M = 2;
      c.xtype = DType::kFloat32;
      SCOPED_TRACE(describe(c));
      HostWq h = make_wq(c.spec);
      mix_inexact_fast_constants(h, asym);
      DeviceWq d(h, 0);
      upload_wq(h, &d);
      if (HasFatalFailure()) return;
      run_and_check(c, h, d);
      if (HasFatalFailure()) return;
    }
}

// Out-of-range g_idx / perm entries (which the layers never pass) are clamped into range: the result is
// the reference computed with the clamped indices, and nothing is read or written out of bounds
// (scripts/gpu-check runs this under compute-sanitizer).
TEST_F(CudaWq, IndicesAreClamped) {
  WqSpec s;
  s.K = 300;
  s.N = 96;
  s.group_size = 64;
  s.perm = true;
  s.seed = 750;
  const HostWq good = make_wq(s);
  HostWq bad = good;   // what the device gets
  HostWq want = good;  // the same with every index clamped: the reference
  for (int64_t r = 0; r < s.K; ++r) {
    const size_t i = size_t(r);
    if (r % 5 == 1) bad.g_idx[i] = int32_t(good.groups + r);
    if (r % 7 == 2) bad.g_idx[i] = -int32_t(r) - 1;
    if (r % 11 == 3) bad.perm[i] = int32_t(s.K + r);
    if (r % 13 == 4) bad.perm[i] = -5;
    want.g_idx[i] = std::min<int32_t>(std::max<int32_t>(bad.g_idx[i], 0), int32_t(good.groups - 1));
    want.perm[i] = std::min<int32_t>(std::max<int32_t>(bad.perm[i], 0), int32_t(s.K - 1));
  }
  WqCase c;
  c.spec = s;
  c.M = 3;
  SCOPED_TRACE(describe(c));
  DeviceWq d(bad, 0);
  upload_wq(bad, &d);
  if (HasFatalFailure()) return;
  run_and_check(c, want, d);
}

// Capturing wq_matmul (split-K main kernels and the reduce kernel) in a CUDA graph and replaying it gives
// the bits of the direct call.
TEST_F(CudaWq, CapturesInCudaGraph) {
  for (int pass = 0; pass < 2; ++pass) {
    WqCase c;
    c.spec.K = 4096;
    c.spec.N = 130;
    c.spec.segments = pass == 0 ? std::vector<WqSegSpec>{{4, 0}} : std::vector<WqSegSpec>{{4, 2048}, {2, 0}};
    c.spec.group_size = 128;
    c.spec.seed = 780 + uint32_t(pass);
    c.M = pass == 0 ? 1 : 3;
    c.xtype = DType::kBFloat16;
    c.bias = true;
    SCOPED_TRACE(describe(c));
    const HostWq h = make_wq(c.spec);
    DeviceWq d(h, 0);
    upload_wq(h, &d);
    if (HasFatalFailure()) return;
    std::vector<uint8_t> direct;
    run_and_check(c, h, d, &direct);
    if (HasFatalFailure()) return;

    const int64_t M = c.M, K = h.K, N = h.N;
    const HostFloats x = random_matrix(M, K, K, c.xtype, c.spec.seed * 31u + 7u);  // the same x as run_and_check
    HostFloats bias = random_floats(size_t(N), c.spec.sdtype, c.spec.seed * 17u + 3u, -0.5, 0.5);
    DeviceBuffer dx(x.bytes.size()), db(bias.bytes.size());
    ASSERT_TRUE(dx.ok() && db.ok());
    to_device(dx, x.bytes.data(), x.bytes.size());
    to_device(db, bias.bytes.data(), bias.bytes.size());
    size_t wsb = 0;
    ASSERT_TRUE(lowbit::cuda::wq_matmul_workspace(d.w, M, &wsb).is_ok());
    ASSERT_GT(wsb, size_t(0)) << "this shape is meant to use the split-K workspace";
    DeviceBuffer ws(wsb), out(size_t(M * N) * 2);
    ASSERT_TRUE(ws.ok() && out.ok());
    CUDA_ASSERT(cudaMemset(out.bytes(), kOutPoison, out.size()));
    if (HasFatalFailure()) return;

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_ASSERT(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeGlobal));
    const Status st = lowbit::cuda::wq_matmul(d.w, dx.bytes(), c.xtype, M, K, db.bytes(), out.bytes(), N, ws.bytes(),
                                              wsb, stream());
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    ASSERT_TRUE(st.is_ok()) << st.message;
    ASSERT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
    CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      CUDA_ASSERT(cudaMemsetAsync(out.bytes(), kOutPoison, out.size(), stream_));
      CUDA_ASSERT(cudaGraphLaunch(exec, stream_));
      CUDA_ASSERT(cudaStreamSynchronize(stream_));
      std::vector<uint8_t> got(out.size());
      CUDA_ASSERT(cudaMemcpy(got.data(), out.bytes(), got.size(), cudaMemcpyDeviceToHost));
      EXPECT_TRUE(got == direct) << "graph replay " << replay << " differs from the direct call";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
}

// Small runs of every code path for compute-sanitizer's racecheck / synccheck (scripts/gpu-check): the
// per-warp x' tile (__syncwarp), the block reduction (__syncthreads), split-K + reduce, the per-row group
// path, the TMA-fed warpgroup kernel, dequantize.
TEST_F(CudaWq, SanitizerSmoke) {
  uint32_t seed = 760;
  for (bool act : {false, true}) {
    WqCase c;
    c.spec.K = 1024 + 40;
    c.spec.N = 130;
    c.spec.segments = {{4, 512}, {3, 0}};
    c.spec.group_size = 64;
    c.spec.act_order = act;
    c.spec.perm = true;
    c.spec.channel_scale = true;
    c.spec.seed = seed++;
    c.M = act ? 9 : 2;
    c.xtype = DType::kFloat16;
    c.bias = true;
    check_case(c);
    if (HasFatalFailure()) return;
  }
  // The TMA-fed warpgroup kernel (mbarrier ring, producer / consumer warpgroups, split-K, per-row groups).
  for (int gs : {128, 16}) {
    WqCase c;
    c.spec.K = 1000;
    c.spec.N = 136;
    c.spec.segments = {{4, 0}};
    c.spec.group_size = gs;
    c.spec.asym = gs == 16;
    c.spec.garbage_padding = true;
    c.spec.sdtype = DType::kBFloat16;
    c.spec.seed = seed++;
    c.M = gs == 16 ? 140 : 70;
    c.xtype = DType::kBFloat16;
    c.bias = true;
    run_tensor_core_case(c, /*require_tc=*/false);
    if (HasFatalFailure()) return;
  }
  WqSpec s;
  s.K = 100;
  s.N = 40;
  s.segments = {{2, 64}, {5, 0}};
  s.seed = seed++;
  const HostWq h = make_wq(s);
  DeviceWq d(h, 0);
  upload_wq(h, &d);
  if (HasFatalFailure()) return;
  DeviceBuffer out(size_t(100 * 40) * 2);
  ASSERT_TRUE(out.ok());
  std::vector<uint8_t> got;
  run_on_poisoned(
      out, kOutPoison, stream_,
      [&] { return lowbit::cuda::wq_dequantize(d.w, 0, 40, DType::kBFloat16, out.bytes(), 40, stream()); }, &got);
}

TEST_F(CudaWq, EmptyShapesWriteNothing) {
  WqSpec s;
  s.K = 64;
  s.N = 40;
  s.seed = 790;
  const HostWq h = make_wq(s);
  DeviceWq d(h, 0);
  upload_wq(h, &d);
  if (HasFatalFailure()) return;
  DeviceBuffer x(64 * 4), out(256);
  ASSERT_TRUE(x.ok() && out.ok());
  CUDA_ASSERT(cudaMemset(out.bytes(), kOutPoison, out.size()));
  size_t wsb = 1;
  ASSERT_TRUE(lowbit::cuda::wq_matmul_workspace(d.w, 0, &wsb).is_ok());
  EXPECT_EQ(wsb, size_t(0));
  Status st = lowbit::cuda::wq_matmul(d.w, x.bytes(), DType::kFloat32, 0, 64, nullptr, out.bytes(), 40, nullptr, 0,
                                      stream());
  EXPECT_TRUE(st.is_ok()) << st.message;
  st = lowbit::cuda::wq_dequantize(d.w, 7, 7, DType::kFloat16, out.bytes(), 1, stream());
  EXPECT_TRUE(st.is_ok()) << st.message;
  WqWeight n0 = d.w;  // N = 0: no pointer is needed
  n0.N = 0;
  n0.qweight = nullptr;
  n0.scales = n0.zeros = nullptr;
  n0.g_idx = nullptr;
  ASSERT_TRUE(lowbit::cuda::wq_matmul_workspace(n0, 5, &wsb).is_ok());
  EXPECT_EQ(wsb, size_t(0));
  st = lowbit::cuda::wq_matmul(n0, x.bytes(), DType::kFloat32, 1, 64, nullptr, out.bytes(), 0, nullptr, 0, stream());
  EXPECT_TRUE(st.is_ok()) << st.message;
  expect_untouched(out, out.size(), kOutPoison, stream_);
}

// ---------------------------------------------------------------------------------------------------
// wq_dequantize: bitwise equal to the CPU kernel and to the fp32 formula of wq.h rounded once.

TEST_F(CudaWq, DequantizeExact) {
  for (const WqDequantCase& dc : wq_dequant_cases(WqTarget::kCuda)) {
    const DType ot = dc.otype;
    const int64_t K = dc.spec.K, n0 = dc.n0, n1 = dc.n1;
    SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(dc.spec.N) + " otype=" + lowbit::dtype_name(ot) +
                 " perm=" + std::to_string(dc.spec.perm) + " seed=" + std::to_string(dc.spec.seed));
    const HostWq h = make_wq(dc.spec);
    DeviceWq d(h, (dc.spec.seed + 1) % 2);  // every other case (even seeds): an unaligned qweight
    upload_wq(h, &d);
    if (HasFatalFailure()) return;
    const int64_t W = n1 - n0, ldo = W + 3;
    const size_t n = size_t(K * ldo);

    const std::vector<float> ref = ref_dequant(h, n0, n1);
    HostFloats want = sentinel_floats(n, ot, kOutPoison);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < W; ++c) wq_store(ot, want.data(), size_t(k * ldo + c), ref[size_t(k * W + c)]);
    HostFloats cpu = sentinel_floats(n, ot, kOutPoison);
    const Status cs = lowbit::cpu::wq_dequantize(h.view(), n0, n1, ot, cpu.data(), ldo);
    ASSERT_TRUE(cs.is_ok()) << cs.message;
    EXPECT_TRUE(cpu.bytes == want.bytes) << "the CPU kernel disagrees with the formula";

    DeviceBuffer out(n * wq_dtype_size(ot));
    ASSERT_TRUE(out.ok());
    std::vector<uint8_t> got;
    run_on_poisoned(
        out, kOutPoison, stream_,
        [&] { return lowbit::cuda::wq_dequantize(d.w, n0, n1, ot, out.bytes(), ldo, stream()); }, &got, 2);
    if (HasFatalFailure()) return;
    if (got != want.bytes) {
      for (size_t i = 0; i < got.size(); ++i)
        if (got[i] != want.bytes[i]) {
          const int64_t e = int64_t(i / wq_dtype_size(ot));
          FAIL() << "first mismatch at row " << e / ldo << " col " << e % ldo << ": got "
                 << wq_load(ot, got.data(), size_t(e)) << ", want " << wq_load(ot, want.data(), size_t(e));
        }
    }
    EXPECT_TRUE(got == cpu.bytes) << "differs from the CPU kernel";
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors: kInvalidArgument, a message naming the problem, nothing written.

class CudaWqErrors : public CudaWq {
 protected:
  void SetUp() override {
    CudaWq::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    host_ = make_wq(wq_error_spec());
    dev_.reset(new DeviceWq(host_, 0));
    upload_wq(host_, dev_.get());
    ASSERT_TRUE(x_.ok() && out_.ok() && ws_.ok());
    CUDA_ASSERT(cudaMemset(x_.bytes(), 0, x_.size()));
    CUDA_ASSERT(cudaMemset(out_.bytes(), kOutPoison, out_.size()));
  }
  Status matmul(const WqWeight& v, const void* x, int64_t M, int64_t ldx, int64_t ldo, DType xt = DType::kFloat32) {
    return lowbit::cuda::wq_matmul(v, x, xt, M, ldx, nullptr, out_.bytes(), ldo, ws_.bytes(), ws_.size(), stream());
  }
  // The weight error `what` from matmul, workspace query and dequantize alike.
  void expect_weight_error(const WqWeight& v, const std::string& what, const std::string& needle) {
    const Status a = matmul(v, x_.bytes(), 2, 96, 16);
    expect_invalid(a, what + " (wq_matmul)", needle);
    EXPECT_EQ(a.message.rfind("lowbit::cuda::wq_matmul: ", 0), size_t(0)) << a.message;
    size_t b = 0;
    expect_invalid(lowbit::cuda::wq_matmul_workspace(v, 2, &b), what + " (wq_matmul_workspace)", needle);
    expect_invalid(lowbit::cuda::wq_dequantize(v, 0, 16, DType::kFloat32, out_.bytes(), 16, stream()),
                   what + " (wq_dequantize)", needle);
  }
  HostWq host_;
  std::unique_ptr<DeviceWq> dev_;
  DeviceBuffer x_{2 * 96 * 4}, out_{96 * 16 * 4}, ws_{1 << 20};
};

TEST_F(CudaWqErrors, WeightDescription) {
  const WqWeight good = dev_->w;
  ASSERT_TRUE(matmul(good, x_.bytes(), 2, 96, 16).is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  CUDA_ASSERT(cudaMemset(out_.bytes(), kOutPoison, out_.size()));
  for (const WqWeightError& e : wq_weight_errors()) {
    WqWeight v = good;
    e.apply(v);
    expect_weight_error(v, e.what, e.needle);
  }
  // Checked on the device only.
  WqWeight v = good;
  v.nseg = 0;
  expect_weight_error(v, "nseg 0", "nseg");
  v = good;
  v.K = 0;
  expect_weight_error(v, "K", "K must be >= 1");
  expect_untouched(out_, out_.size(), kOutPoison, stream_);
}

TEST_F(CudaWqErrors, CallArguments) {
  const WqWeight good = dev_->w;
  expect_invalid(matmul(good, nullptr, 2, 96, 16), "x null", "x is null");
  expect_invalid(matmul(good, x_.bytes(), 2, 95, 16), "ldx < K", "ldx must be >= K (96), got 95");
  expect_invalid(matmul(good, x_.bytes(), 2, 96, 15), "ldo < N", "ldo must be >= N (16), got 15");
  expect_invalid(matmul(good, x_.bytes(), -1, 96, 16), "M < 0", "M must be >= 0");
  expect_invalid(matmul(good, x_.bytes(), 2, 96, 16, DType(3)), "xtype", "xtype");
  expect_invalid(lowbit::cuda::wq_matmul(good, x_.bytes(), DType::kFloat32, 2, 96, nullptr, nullptr, 16, ws_.bytes(),
                                         ws_.size(), stream()),
                 "out null", "out is null");
  size_t b = 0;
  expect_invalid(lowbit::cuda::wq_matmul_workspace(good, -1, &b), "workspace M < 0", "M must be >= 0");
  expect_invalid(lowbit::cuda::wq_matmul_workspace(good, 1, nullptr), "workspace bytes null", "bytes is null");
  auto deq = [&](int64_t n0, int64_t n1, DType ot, void* out, int64_t ldo) {
    return lowbit::cuda::wq_dequantize(good, n0, n1, ot, out, ldo, stream());
  };
  expect_invalid(deq(-1, 4, DType::kFloat32, out_.bytes(), 16), "n0 < 0", "n0 must be in");
  expect_invalid(deq(4, 17, DType::kFloat32, out_.bytes(), 16), "n1 > N", "n1 must be in");
  expect_invalid(deq(5, 4, DType::kFloat32, out_.bytes(), 16), "n1 < n0", "n1 must be in");
  expect_invalid(deq(0, 16, DType::kFloat32, out_.bytes(), 15), "ldo < n1 - n0", "ldo must be >= n1 - n0");
  expect_invalid(deq(0, 16, DType(7), out_.bytes(), 16), "otype", "otype");
  expect_invalid(deq(0, 16, DType::kFloat32, nullptr, 16), "out null", "out is null");
  expect_untouched(out_, out_.size(), kOutPoison, stream_);
}

// A shape that needs the split-K workspace: a workspace one byte short, or null, is an error and nothing
// runs; the exact size works.
TEST_F(CudaWqErrors, Workspace) {
  WqSpec s;
  s.K = 4096;
  s.N = 16;
  s.segments = {{4, 2048}, {2, 0}};  // two segments always need one
  s.seed = 950;
  const HostWq h = make_wq(s);
  DeviceWq d(h, 0);
  upload_wq(h, &d);
  if (HasFatalFailure()) return;
  DeviceBuffer x(4096 * 4);
  ASSERT_TRUE(x.ok());
  CUDA_ASSERT(cudaMemset(x.bytes(), 0, x.size()));
  size_t need = 0;
  ASSERT_TRUE(lowbit::cuda::wq_matmul_workspace(d.w, 1, &need).is_ok());
  ASSERT_GT(need, size_t(0));
  ASSERT_LE(need, ws_.size());
  Status st = lowbit::cuda::wq_matmul(d.w, x.bytes(), DType::kFloat32, 1, 4096, nullptr, out_.bytes(), 16, ws_.bytes(),
                                      need - 1, stream());
  expect_invalid(st, "workspace too small", "workspace_bytes must be >= " + std::to_string(need));
  st = lowbit::cuda::wq_matmul(d.w, x.bytes(), DType::kFloat32, 1, 4096, nullptr, out_.bytes(), 16, nullptr, need,
                               stream());
  expect_invalid(st, "workspace null", "workspace is null");
  expect_untouched(out_, out_.size(), kOutPoison, stream_);
  st = lowbit::cuda::wq_matmul(d.w, x.bytes(), DType::kFloat32, 1, 4096, nullptr, out_.bytes(), 16, ws_.bytes(), need,
                               stream());
  EXPECT_TRUE(st.is_ok()) << st.message;
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
