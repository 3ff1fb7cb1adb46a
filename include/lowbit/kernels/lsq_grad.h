// The LSQ / straight-through input gradients of a per-tensor quantizer with a per-channel input shift,
// fused into one pass over the data (the backward of quantize.h; docs/ops.md "Backward").
//
// Every tensor operand is viewed as (outer, C, inner), contiguous: element (o, c, i) at flat index
// (o * C + c) * inner + i. The channel dim is C: inner = 1 when channels are the last dim (linear, NHWC
// conv), inner = H*W for NCHW. Per element, all in fp32 and in this order (the forward quantizer's v,
// rebuilt bit for bit):
//
//   g       = fp32(gA) * gscale                  (one fp32 multiply; skipped when gscale is nullptr)
//   t       = fp32(x) + shift[c]                 (skipped when shift is nullptr)
//   v       = t / s                              (IEEE division, not a multiply by 1/s)
//   below   = v < qmin,   above = v > qmax,   inside = !below && !above && v == v   (NaN v: outside)
//   grad_x  = to_x_dtype( g * (inside ? 1 : 0) )  (a real multiply: inf or NaN g times 0 stays NaN, -g * 0
//                                                  is -0, exactly what ATen's gA * mask gives)
//   R       = qmin if below, qmax if above, else rne(v) - v        (NaN v: R is NaN)
//
// and the reductions, accumulated in float64 and rounded once to fp32:
//
//   grad_shift[c] = sum over (o, i) of fp32 grad_x value above (before the rounding to x's dtype)
//   grad_scale    = fp32( (sum over all elements of fp32(R * g)) * (1 / sqrt(numel * qmax)) )
//
// * `numel` is the element count of the gradient scale (BIE counts the operand before broadcasting); it
//   need not equal outer * C * inner. A NaN anywhere in R * g makes grad_scale NaN (nothing is masked).
// * rne = round half to even. The conversion of grad_x to fp16 / bf16 rounds to nearest even (as
//   float_convert.h). Every NaN output (grad_x in any dtype, the sums) is the canonical positive quiet NaN
//   (0x7fc00000, fp16 0x7e00, bf16 0x7fc0): CPUs and GPUs disagree on the sign and payload of a NaN made
//   by arithmetic (x86: inf * 0 = 0xffc00000; CUDA: 0x7fffffff), so only a fixed NaN keeps them bitwise equal.
// * grad_x is bitwise the same on every path (CPU reference, CPU fast paths, CUDA). The sums are
//   deterministic on each path (a fixed partition of the work into units that depends on the sizes only,
//   not on the thread count, the GPU or timing; partial sums combined in a fixed order; on CUDA the order
//   inside a unit of the NCHW / flat mode also follows the pointers' 16-byte alignment) but paths sum in
//   different orders: they agree to float64 rounding, so the fp32 results match unless that tiny
//   difference straddles an fp32 rounding boundary. Tests: |got - ref| <= 2^-24 |ref| + n 2^-52 sum|terms|
//   against a float64 reference (plus 2^-24 sum|R g| for grad_scale, whose terms are fp32 products).
// * Any subset of the three outputs may be requested (nullptr: not computed, not written).
// * s points to ONE fp32 value, already max(scale, eps), in the memory of the data (host for the CPU
//   kernels, device for CUDA). Its value is not checked (CUDA cannot read it without a sync): every path
//   applies the formula to whatever it holds, so an invalid step (the QAT ops poison their forward output
//   with NaN then) gives the same bits everywhere.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

struct LsqGradParams {
  int64_t outer = 0;               // leading extent of the view (>= 0)
  int64_t channels = 0;            // C, the shift's length (>= 0)
  int64_t inner = 0;               // trailing extent (>= 0); 1 when the channel dim is the last one
  DType g_type = DType::kFloat32;  // dtype of g
  const void* g = nullptr;         // dL/dx_hat, (outer, C, inner) contiguous
  const float* g_scale = nullptr;  // one fp32 multiplier of g, or nullptr (= 1: g used as is)
  DType x_type = DType::kFloat32;  // dtype of x and grad_x
  const void* x = nullptr;         // the quantizer's input, (outer, C, inner) contiguous
  const float* shift = nullptr;    // (C,) fp32 input shift, or nullptr (none)
  const float* step = nullptr;     // one fp32: s = max(scale, eps)
  int32_t qmin = 0, qmax = 0;      // code range: -128 <= qmin <= qmax <= 127 (qmax >= 1 with grad_scale)
  int64_t numel = 0;               // count of the gradient scale 1/sqrt(numel * qmax); >= 1 with grad_scale
  void* grad_x = nullptr;          // out: (outer, C, inner) contiguous in x_type, or nullptr; may be g itself
                                   // when g_type == x_type (every element is read, then written, by one thread)
  void* grad_shift = nullptr;      // out: (C,) in shift_out_type, or nullptr
  void* grad_scale = nullptr;      // out: one value in scale_out_type, or nullptr
  // dtypes of the two sums' outputs: the fp32 value (rounded once from float64) then, for fp16 / bf16,
  // rounded to nearest even once more (NaN canonical), the bits of a .to(dtype) of the fp32 output.
  DType shift_out_type = DType::kFloat32;
  DType scale_out_type = DType::kFloat32;
};

namespace cpu {

// OpenMP-parallel, AVX-512 where the CPU has it; host pointers. Allocates its own partial-sum buffer
// (a Status error, not an exception, when that fails).
Status lsq_grad(const LsqGradParams& p);

// Scalar reference (single thread, no SIMD, memory-order sums): the definition the fast paths match
// bitwise for grad_x.
Status lsq_grad_ref(const LsqGradParams& p);

}  // namespace cpu

namespace cuda {

// Bytes of device workspace lsq_grad needs (a function of the sizes and of which of shift, grad_shift and
// grad_scale are non-null only: never of the device, the data or the pointers' alignment, so it may be
// called before the data exists). 0 when no sum is asked for.
Status lsq_grad_workspace_bytes(const LsqGradParams& p, size_t* bytes);

// Device pointers; runs on `stream`; allocates nothing, never syncs. workspace: at least
// lsq_grad_workspace_bytes, 8-byte aligned (fp64 partial sums; its contents need no initialisation).
// Two launches when a sum is requested (the pass, then a small kernel that adds the partials in a fixed
// order), one otherwise.
Status lsq_grad(const LsqGradParams& p, void* workspace, size_t workspace_bytes, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit
