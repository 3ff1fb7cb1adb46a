// CUDA LSQ input gradients (lsq_grad.h) against the CPU scalar reference and the float64 one of
// lsq_test_util.h: grad_x bitwise equal to lsq_grad_ref (NaNs canonical), grad_shift / grad_scale within
// the documented tolerance of the float64 reference (they are float64 sums in another order, so they may
// differ from the CPU's in the last fp32 bit, no more), and bitwise equal across two runs (deterministic).
// Every case runs twice more with the bases of g, x and grad_x moved by one element (the element-load
// kernels); outputs are poisoned and guarded (nothing written outside them), the workspace is poisoned
// too (its contents need no initialisation). Skipped when the machine has no CUDA device.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "lowbit/kernels/lsq_grad.h"
#include "lsq_test_util.h"

namespace {

using lowbit::DType;
using lowbit::LsqGradParams;
using lowbit::Status;
using namespace lowbit_test;

class CudaLsqGrad : public CudaStreamTest {};

constexpr uint8_t kPoison = 0xA5;  // bytes of every output and workspace before a run
constexpr size_t kGuard = 16;      // poisoned elements after each output

// Runs case c on the device with g, x and grad_x based `off` elements into their buffers, twice; the
// second run must give the first's bits. Fills *out from the first run; fatal failures return early.
void run_device(const LsqCase& c, const LsqData& d, size_t off, CUstream_st* stream, LsqOut* out) {
  const size_t n = size_t(c.total());
  const size_t gs = lsq_dtype_size(c.gt), xs = lsq_dtype_size(c.xt);
  DeviceBuffer dg((off + n) * gs + 1), dx((off + n) * xs + 1), dgx((off + n + kGuard) * xs);
  DeviceBuffer dshift(size_t(c.C) * 4 + 4), dstep(4), dgs(4), dgsh((size_t(c.C) + kGuard) * 4), dgsc(8);
  ASSERT_TRUE(dg.ok() && dx.ok() && dgx.ok() && dshift.ok() && dstep.ok() && dgs.ok() && dgsh.ok() && dgsc.ok());
  CUDA_ASSERT(cudaMemcpy(dg.bytes() + off * gs, d.g.data(), d.g.size(), cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dx.bytes() + off * xs, d.x.data(), d.x.size(), cudaMemcpyHostToDevice));
  if (!d.shift.empty())
    CUDA_ASSERT(cudaMemcpy(dshift.bytes(), d.shift.data(), d.shift.size() * 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dstep.bytes(), &d.step, 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dgs.bytes(), &d.gscale, 4, cudaMemcpyHostToDevice));
  const LsqGradParams p = lsq_params(c, dg.bytes() + off * gs, dx.bytes() + off * xs,
                                     reinterpret_cast<const float*>(dshift.bytes()),
                                     reinterpret_cast<const float*>(dstep.bytes()),
                                     reinterpret_cast<const float*>(dgs.bytes()), dgx.bytes() + off * xs,
                                     reinterpret_cast<float*>(dgsh.bytes()), reinterpret_cast<float*>(dgsc.bytes()));
  size_t ws_bytes = 0;
  const Status wst = lowbit::cuda::lsq_grad_workspace_bytes(p, &ws_bytes);
  ASSERT_TRUE(wst.is_ok()) << wst.message;
  DeviceBuffer ws(ws_bytes);
  ASSERT_TRUE(ws.ok());
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);

  std::vector<uint8_t> first_gx, first_sh, first_sc;
  for (int run = 0; run < 2; ++run) {
    CUDA_ASSERT(cudaMemset(dgx.bytes(), kPoison, dgx.size()));
    CUDA_ASSERT(cudaMemset(dgsh.bytes(), kPoison, dgsh.size()));
    CUDA_ASSERT(cudaMemset(dgsc.bytes(), kPoison, dgsc.size()));
    CUDA_ASSERT(cudaMemset(ws.bytes(), kPoison, ws.size()));
    const Status st = lowbit::cuda::lsq_grad(p, ws_bytes > 0 ? ws.bytes() : nullptr, ws_bytes, stream);
    ASSERT_TRUE(st.is_ok()) << st.message;
    CUDA_ASSERT(cudaStreamSynchronize(cs));
    CUDA_ASSERT(cudaGetLastError());
    std::vector<uint8_t> hgx(dgx.size()), hsh(dgsh.size()), hsc(dgsc.size());
    CUDA_ASSERT(cudaMemcpy(hgx.data(), dgx.bytes(), hgx.size(), cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(hsh.data(), dgsh.bytes(), hsh.size(), cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(hsc.data(), dgsc.bytes(), hsc.size(), cudaMemcpyDeviceToHost));
    if (run == 0) {
      // Nothing outside the outputs (or in an output not asked for) is written.
      const size_t gx_lo = off * xs, gx_hi = (off + n) * xs;
      for (size_t b = 0; b < hgx.size(); ++b)
        if (b < gx_lo || b >= gx_hi || !c.want_x) ASSERT_EQ(hgx[b], kPoison) << "grad_x byte " << b << " written";
      for (size_t b = c.want_shift ? size_t(c.C) * 4 : 0; b < hsh.size(); ++b)
        ASSERT_EQ(hsh[b], kPoison) << "grad_shift byte " << b << " written";
      for (size_t b = c.want_scale ? 4 : 0; b < hsc.size(); ++b)
        ASSERT_EQ(hsc[b], kPoison) << "grad_scale byte " << b << " written";
      out->gx.assign(hgx.begin() + gx_lo, hgx.begin() + gx_hi);
      out->shift.resize(size_t(c.C));
      std::memcpy(out->shift.data(), hsh.data(), size_t(c.C) * 4);
      std::memcpy(&out->scale, hsc.data(), 4);
      first_gx = hgx;
      first_sh = hsh;
      first_sc = hsc;
    } else {
      ASSERT_TRUE(hgx == first_gx) << "grad_x differs between two runs";
      ASSERT_TRUE(hsh == first_sh) << "grad_shift differs between two runs";
      ASSERT_TRUE(hsc == first_sc) << "grad_scale differs between two runs";
    }
  }
}

void check_case(const LsqCase& c, std::mt19937& rng, CUstream_st* stream) {
  SCOPED_TRACE(c.str());
  const LsqData d = make_lsq_data(c, rng);
  const LsqRef r = lsq_reference(c, d);
  LsqOut ref;
  ref.gx.assign(d.x.size(), 0);
  ref.shift.assign(size_t(c.C), 0.f);
  const LsqGradParams hp = lsq_params(c, d.g.data(), d.x.data(), d.shift.data(), &d.step, &d.gscale, ref.gx.data(),
                                      ref.shift.data(), &ref.scale);
  const Status rs = lowbit::cpu::lsq_grad_ref(hp);
  ASSERT_TRUE(rs.is_ok()) << rs.message;
  for (size_t off : {size_t(0), size_t(1)}) {
    SCOPED_TRACE("base offset " + std::to_string(off));
    LsqOut got;
    run_device(c, d, off, stream, &got);
    if (::testing::Test::HasFatalFailure()) return;
    if (c.want_x) {
      for (size_t b = 0; b < ref.gx.size(); ++b)
        ASSERT_EQ(got.gx[b], ref.gx[b]) << "grad_x differs from the CPU reference at element "
                                        << b / lsq_dtype_size(c.xt);
    }
    EXPECT_EQ(lsq_check(c, r, got), "");
  }
}

TEST_F(CudaLsqGrad, MatchesReferences) {
  std::mt19937 rng(20261122);
  for (const LsqCase& c : lsq_cases()) {
    check_case(c, rng, stream());
    if (HasFatalFailure()) return;
  }
}

// Sizes where the grid loops over units (more units than 8 blocks per SM) in each mode, vector paths.
TEST_F(CudaLsqGrad, LargeShapes) {
  std::mt19937 rng(99);
  auto mk = [](int64_t o, int64_t C, int64_t i, DType gt, DType xt, bool shift) {
    LsqCase c = LsqCase::shape(o, C, i, gt, xt, shift, true);
    c.want_shift = shift;
    return c;
  };
  const LsqCase cases[] = {
      mk(4099, 1024, 1, DType::kFloat32, DType::kBFloat16, true),   // linear: column mode, 8 column tiles
      mk(12544, 64, 1, DType::kFloat32, DType::kFloat16, true),     // NHWC conv: small C, tx = 8
      mk(9, 64, 3136, DType::kFloat16, DType::kFloat32, true),      // NCHW conv: row mode, segments
      mk(64, 32, 49, DType::kFloat32, DType::kFloat32, true),       // NCHW 7x7: row mode, o groups
      mk(1, 1, 3000005, DType::kBFloat16, DType::kBFloat16, false)  // flat, tail
  };
  for (const LsqCase& c : cases) {
    check_case(c, rng, stream());
    if (HasFatalFailure()) return;
  }
}

TEST_F(CudaLsqGrad, EmptyViewWritesZeros) {
  DeviceBuffer dsh(3 * 4), dsc(4), dstep(4);
  ASSERT_TRUE(dsh.ok() && dsc.ok() && dstep.ok());
  CUDA_ASSERT(cudaMemset(dsh.bytes(), kPoison, 12));
  CUDA_ASSERT(cudaMemset(dsc.bytes(), kPoison, 4));
  LsqGradParams p;
  p.outer = 0;
  p.channels = 3;
  p.inner = 5;
  p.qmin = -8;
  p.qmax = 7;
  p.numel = 4;
  p.grad_shift = reinterpret_cast<float*>(dsh.bytes());
  p.grad_scale = reinterpret_cast<float*>(dsc.bytes());
  size_t bytes = 1;
  ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(p, &bytes).is_ok());
  EXPECT_EQ(bytes, 0u);
  ASSERT_TRUE(lowbit::cuda::lsq_grad(p, nullptr, 0, stream()).is_ok());
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  float h[4];
  CUDA_ASSERT(cudaMemcpy(h, dsh.bytes(), 12, cudaMemcpyDeviceToHost));
  CUDA_ASSERT(cudaMemcpy(h + 3, dsc.bytes(), 4, cudaMemcpyDeviceToHost));
  for (float v : h) EXPECT_EQ(v, 0.f);
}

// The sums in fp16 / bf16 (shift_out_type / scale_out_type): the CPU kernel's bits (float_convert.h's
// rounding of the fp32 sums, NaN canonical), nothing written past them.
TEST_F(CudaLsqGrad, SumsInSixteenBitDtypes) {
  std::mt19937 rng(21);
  std::normal_distribution<float> nd(0.f, 2.f);
  const int64_t outer = 37, C = 19, n = outer * C;
  std::vector<float> x(n), g(n), shift(C);
  for (auto& v : x) v = nd(rng);
  for (auto& v : g) v = nd(rng);
  for (auto& v : shift) v = 0.1f * nd(rng);
  const float step = 0.05f;
  DeviceBuffer dx(n * 4), dg(n * 4), dsh(C * 4), dstep(4), dgsh(C * 2 + 16), dgsc(16);
  ASSERT_TRUE(dx.ok() && dg.ok() && dsh.ok() && dstep.ok() && dgsh.ok() && dgsc.ok());
  CUDA_ASSERT(cudaMemcpy(dx.bytes(), x.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dg.bytes(), g.data(), n * 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dsh.bytes(), shift.data(), C * 4, cudaMemcpyHostToDevice));
  CUDA_ASSERT(cudaMemcpy(dstep.bytes(), &step, 4, cudaMemcpyHostToDevice));
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    for (bool nan_scale : {false, true}) {
      SCOPED_TRACE(std::string(lowbit::dtype_name(t)) + (nan_scale ? " NaN" : ""));
      std::vector<float> xx = x;
      if (nan_scale) xx[5] = std::numeric_limits<float>::quiet_NaN();
      CUDA_ASSERT(cudaMemcpy(dx.bytes(), xx.data(), n * 4, cudaMemcpyHostToDevice));
      LsqGradParams p;
      p.outer = outer;
      p.channels = C;
      p.inner = 1;
      p.qmin = -8;
      p.qmax = 7;
      p.numel = n;
      p.x = xx.data();
      p.g = g.data();
      p.shift = shift.data();
      p.step = &step;
      std::vector<uint16_t> want_sh(C);
      uint16_t want_sc = 0;
      p.grad_shift = want_sh.data();
      p.grad_scale = &want_sc;
      p.shift_out_type = p.scale_out_type = t;
      ASSERT_TRUE(lowbit::cpu::lsq_grad(p).is_ok());
      p.x = dx.bytes();
      p.g = dg.bytes();
      p.shift = reinterpret_cast<const float*>(dsh.bytes());
      p.step = reinterpret_cast<const float*>(dstep.bytes());
      p.grad_shift = dgsh.bytes();
      p.grad_scale = dgsc.bytes();
      size_t bytes = 0;
      ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(p, &bytes).is_ok());
      DeviceBuffer ws(bytes);
      CUDA_ASSERT(cudaMemset(dgsh.bytes(), kPoison, dgsh.size()));
      CUDA_ASSERT(cudaMemset(dgsc.bytes(), kPoison, dgsc.size()));
      ASSERT_TRUE(lowbit::cuda::lsq_grad(p, bytes ? ws.bytes() : nullptr, bytes, stream()).is_ok());
      CUDA_ASSERT(cudaStreamSynchronize(stream_));
      std::vector<uint8_t> hsh(dgsh.size()), hsc(dgsc.size());
      CUDA_ASSERT(cudaMemcpy(hsh.data(), dgsh.bytes(), hsh.size(), cudaMemcpyDeviceToHost));
      CUDA_ASSERT(cudaMemcpy(hsc.data(), dgsc.bytes(), hsc.size(), cudaMemcpyDeviceToHost));
      EXPECT_EQ(std::memcmp(hsh.data(), want_sh.data(), C * 2), 0) << "grad_shift differs from the CPU";
      EXPECT_EQ(std::memcmp(hsc.data(), &want_sc, 2), 0) << "grad_scale differs from the CPU";
      for (size_t b = C * 2; b < hsh.size(); ++b) ASSERT_EQ(hsh[b], kPoison) << "grad_shift byte " << b << " written";
      for (size_t b = 2; b < hsc.size(); ++b) ASSERT_EQ(hsc[b], kPoison) << "grad_scale byte " << b << " written";
      if (nan_scale) EXPECT_EQ(want_sc, t == DType::kFloat16 ? 0x7e00 : 0x7fc0);
    }
  }
}

TEST_F(CudaLsqGrad, WorkspaceAndArgumentErrors) {
  DeviceBuffer dg(64 * 4), dx(64 * 4), dgx(64 * 4), dstep(4), dsc(4);
  ASSERT_TRUE(dg.ok() && dx.ok() && dgx.ok() && dstep.ok() && dsc.ok());
  LsqGradParams p;
  p.outer = 4;
  p.channels = 16;
  p.inner = 1;
  p.qmin = -128;
  p.qmax = 127;
  p.numel = 64;
  p.grad_scale = reinterpret_cast<float*>(dsc.bytes());
  // The size needs no data pointers and does not depend on them.
  size_t bytes = 0;
  ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(p, &bytes).is_ok());
  EXPECT_GT(bytes, 0u);
  p.g = dg.bytes();
  p.x = dx.bytes();
  p.step = reinterpret_cast<const float*>(dstep.bytes());
  p.grad_x = dgx.bytes();
  size_t bytes2 = 0;
  ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(p, &bytes2).is_ok());
  EXPECT_EQ(bytes, bytes2);
  DeviceBuffer ws(bytes);
  ASSERT_TRUE(ws.ok());
  expect_invalid(lowbit::cuda::lsq_grad(p, nullptr, bytes, stream()), "null workspace", "workspace_bytes must be >=");
  expect_invalid(lowbit::cuda::lsq_grad(p, ws.bytes(), bytes - 8, stream()), "small workspace",
                 "workspace_bytes must be >=");
  expect_invalid(lowbit::cuda::lsq_grad(p, ws.bytes() + 4, bytes, stream()), "misaligned workspace", "8-byte aligned");
  // No sum requested: no workspace.
  LsqGradParams px = p;
  px.grad_scale = nullptr;
  ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(px, &bytes2).is_ok());
  EXPECT_EQ(bytes2, 0u);
  // The shared argument rules (validate.h), worded as on the CPU.
  LsqGradParams q = p;
  q.qmax = 128;
  expect_invalid(lowbit::cuda::lsq_grad(q, ws.bytes(), bytes, stream()), "qmax", "qmax must be <= 127");
  q = p;
  q.numel = 0;
  expect_invalid(lowbit::cuda::lsq_grad(q, ws.bytes(), bytes, stream()), "numel", "numel must be >= 1");
  q = p;
  q.x = nullptr;
  expect_invalid(lowbit::cuda::lsq_grad(q, ws.bytes(), bytes, stream()), "x", "x is null");
  q = p;
  q.outer = -1;
  expect_invalid(lowbit::cuda::lsq_grad_workspace_bytes(q, &bytes2), "outer", "outer must be >= 0");
  expect_invalid(lowbit::cuda::lsq_grad_workspace_bytes(p, nullptr), "bytes", "bytes is null");
  CUDA_ASSERT(cudaStreamSynchronize(stream_));
  CUDA_ASSERT(cudaGetLastError());
}

// Not a correctness test: throughput at a few training-sized shapes, for the record (median of 10 runs
// timed with CUDA events after 2 warm-ups). Bytes = g + x read, grad_x written (the shift, the partials
// and the sums are noise). Printed as "[perf] ..." lines and test properties. Excluded from sanitizer runs.
TEST_F(CudaLsqGrad, PerfReport) {
  struct Shape {
    int64_t outer, C, inner;
    DType gt, xt;
    bool shift;
    const char* what;
  };
  const Shape shapes[] = {
      {8192, 4096, 1, DType::kFloat32, DType::kFloat32, true, "Q8Linear fp32, M=8192 K=4096"},
      {8192, 4096, 1, DType::kBFloat16, DType::kBFloat16, true, "Q8Linear bf16, M=8192 K=4096"},
      {32 * 56 * 56, 64, 1, DType::kFloat32, DType::kFloat32, true, "Q4Conv2d NHWC 32x64x56x56"},
      {32, 64, 56 * 56, DType::kFloat32, DType::kFloat32, true, "Q4Conv2d NCHW 32x64x56x56"},
      {1, 1, int64_t(64) << 20, DType::kFloat32, DType::kFloat16, false, "Q4MatMul operand, 64M, no shift"},
  };
  int64_t max_n = 0;
  for (const auto& s : shapes) max_n = std::max(max_n, s.outer * s.C * s.inner);
  // Operands of each width, random finite values in [-4, 4) (no NaN: the division's slow path would
  // dominate); a cheap LCG, the sizes are large.
  DeviceBuffer d32a(size_t(max_n) * 4), d32b(size_t(max_n) * 4), d16a(size_t(max_n) * 2), d16b(size_t(max_n) * 2),
      dgx(size_t(max_n) * 4), dshift(4096 * 4), dstep(4), dgsh(4096 * 4), dgsc(4);
  ASSERT_TRUE(d32a.ok() && d32b.ok() && d16a.ok() && d16b.ok() && dgx.ok() && dshift.ok() && dstep.ok() && dgsh.ok() &&
              dgsc.ok());
  {
    uint32_t st = 12345u;
    auto next = [&st] {
      st = st * 1664525u + 1013904223u;
      return (float(st >> 8) * 0x1p-24f - 0.5f) * 8.f;
    };
    std::vector<float> hf(static_cast<size_t>(max_n));
    std::vector<uint16_t> h16(static_cast<size_t>(max_n));
    for (int b = 0; b < 2; ++b) {
      for (auto& v : hf) v = next();
      for (size_t i = 0; i < h16.size(); ++i) h16[i] = lowbit::float_to_bf16(hf[i] * 0.5f);  // |v| < 2: fp16-finite too
      CUDA_ASSERT(cudaMemcpy((b ? d32b : d32a).bytes(), hf.data(), hf.size() * 4, cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaMemcpy((b ? d16b : d16a).bytes(), h16.data(), h16.size() * 2, cudaMemcpyHostToDevice));
    }
  }
  CUDA_ASSERT(cudaMemset(dshift.bytes(), 0, 4096 * 4));
  const float step = 0.05f;
  CUDA_ASSERT(cudaMemcpy(dstep.bytes(), &step, 4, cudaMemcpyHostToDevice));
  for (const auto& s : shapes) {
    LsqGradParams p;
    p.outer = s.outer;
    p.channels = s.C;
    p.inner = s.inner;
    p.g_type = s.gt;
    p.g = s.gt == DType::kFloat32 ? d32a.bytes() : d16a.bytes();
    p.x_type = s.xt;
    p.x = s.xt == DType::kFloat32 ? d32b.bytes() : d16b.bytes();
    p.shift = s.shift ? reinterpret_cast<const float*>(dshift.bytes()) : nullptr;
    p.step = reinterpret_cast<const float*>(dstep.bytes());
    p.qmin = -128;
    p.qmax = 127;
    p.numel = s.outer * s.C * s.inner;
    p.grad_x = dgx.bytes();
    p.grad_shift = s.shift ? reinterpret_cast<float*>(dgsh.bytes()) : nullptr;
    p.grad_scale = reinterpret_cast<float*>(dgsc.bytes());
    size_t bytes = 0;
    ASSERT_TRUE(lowbit::cuda::lsq_grad_workspace_bytes(p, &bytes).is_ok());
    DeviceBuffer ws(bytes);
    ASSERT_TRUE(ws.ok());
    const double ms = median_ms(stream_, [&] { return lowbit::cuda::lsq_grad(p, ws.bytes(), bytes, stream()); });
    ASSERT_GT(ms, 0.0) << "lsq_grad launch failed";
    const double n = double(p.numel);
    const double moved = n * double(lsq_dtype_size(s.gt) + 2 * lsq_dtype_size(s.xt));
    const double gbs = moved / (ms * 1e-3) / 1e9;
    std::printf("[perf] lsq_grad %s (g %s, x %s): %.3f ms, %.0f GB/s, workspace %zu bytes\n", s.what,
                lowbit::dtype_name(s.gt), lowbit::dtype_name(s.xt), ms, gbs, bytes);
    RecordProperty(std::string("lsq_grad_") + std::to_string(s.outer) + "x" + std::to_string(s.C) + "x" +
                       std::to_string(s.inner) + "_GBps",
                   std::to_string(gbs));
  }
  CUDA_ASSERT(cudaGetLastError());
}

}  // namespace
